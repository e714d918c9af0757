"""The supervisor restarts crashed components with growing, jittered delays and reports their state."""

from __future__ import annotations

import asyncio
import random

from fleetgate.daemon.runtime.supervisor import Backoff, State, Supervisor


class Flaky:
    """Fails ``failures`` times, then runs until cancelled."""

    def __init__(self, name: str, failures: int) -> None:
        self.name = name
        self.failures = failures
        self.starts = 0
        self.cleaned_up = False

    async def run(self) -> None:
        self.starts += 1
        if self.starts <= self.failures:
            raise RuntimeError(f"boom {self.starts}")
        try:
            await asyncio.Event().wait()
        finally:
            self.cleaned_up = True


def test_backoff_grows_exponentially_within_jitter_bounds_and_caps():
    backoff = Backoff(initial_s=1.0, max_s=8.0, rng=random.Random(1))
    delays = [backoff.next_delay() for _ in range(6)]
    steps = [1, 2, 4, 8, 8, 8]
    for delay, step in zip(delays, steps, strict=True):
        assert step / 2 <= delay <= step
    backoff.reset()
    assert backoff.next_delay() <= 1.0


def test_jitter_spreads_restarts_of_many_devices():
    delays = {round(Backoff(1.0, 60.0).next_delay(), 6) for _ in range(50)}
    assert len(delays) > 40


def test_crashing_component_is_restarted_and_counted():
    async def main():
        sup = Supervisor(backoff_initial_s=0.01, backoff_max_s=0.05, stable_after_s=10)
        flaky, steady = Flaky("flaky", failures=3), Flaky("steady", failures=0)
        sup.add(flaky)
        sup.add(steady)
        sup.start()
        for _ in range(500):
            if flaky.starts == 4:
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.02)
        statuses = {s["name"]: s for s in sup.status_dicts()}
        await sup.stop(1.0)
        return flaky, steady, statuses, sup

    flaky, steady, statuses, sup = asyncio.run(main())
    assert flaky.starts == 4
    assert statuses["flaky"]["state"] == "running"
    assert statuses["flaky"]["restarts"] == 3
    assert statuses["flaky"]["last_error"] == "RuntimeError: boom 3"
    assert statuses["steady"]["restarts"] == 0 and statuses["steady"]["last_error"] is None
    assert flaky.cleaned_up and steady.cleaned_up
    assert all(s.state == State.STOPPED for s in sup.statuses)


def test_component_that_returns_is_treated_as_a_failure():
    class Quitter:
        name = "quitter"
        runs = 0

        async def run(self) -> None:
            self.runs += 1

    async def main():
        sup = Supervisor(backoff_initial_s=0.01, backoff_max_s=0.01)
        quitter = Quitter()
        sup.add(quitter)
        sup.start()
        while quitter.runs < 3:
            await asyncio.sleep(0.01)
        status = sup.status_dicts()[0]
        await sup.stop(1.0)
        return status

    status = asyncio.run(main())
    assert status["restarts"] >= 2
    assert status["last_error"] == "exited unexpectedly"


def test_stop_does_not_wait_forever_for_a_stubborn_component():
    class Stubborn:
        name = "stubborn"

        async def run(self) -> None:
            while True:
                try:
                    await asyncio.sleep(10)
                except asyncio.CancelledError:
                    continue  # ignores cancellation: a bug the supervisor must survive

    async def main():
        sup = Supervisor()
        sup.add(Stubborn())
        sup.start()
        await asyncio.sleep(0.01)
        await sup.stop(0.2)
        return "stopped"

    # Not asyncio.run(): its clean-up would wait for the stubborn task forever, which is what `fleetgate run`
    # avoids by closing its loop without waiting (see fleetgate.cli).
    loop = asyncio.new_event_loop()
    try:
        assert loop.run_until_complete(main()) == "stopped"
    finally:
        loop.close()


def test_retry_now_cuts_a_backoff_short_and_only_a_backoff():
    """`fleetgate sync now` when coverage is back: the uplink must not sit out the rest of a long backoff."""

    async def main():
        sup = Supervisor(backoff_initial_s=3600, backoff_max_s=3600)
        flaky, steady = Flaky("flaky", failures=1), Flaky("steady", failures=0)
        sup.add(flaky)
        sup.add(steady)
        sup.start()
        while sup.statuses[0].state != State.BACKOFF:
            await asyncio.sleep(0.01)
        waiting = sup.status_dicts()[0]["retry_in_s"]
        answers = (sup.retry_now("steady"), sup.retry_now("nobody"), sup.retry_now("flaky"))
        for _ in range(500):
            if flaky.starts == 2:
                break
            await asyncio.sleep(0.01)
        status = sup.status_dicts()[0]
        await sup.stop(1.0)
        return waiting, answers, flaky.starts, status

    waiting, answers, starts, status = asyncio.run(main())
    assert waiting > 1000  # it had most of an hour to wait
    assert answers == (False, False, True)
    assert starts == 2 and status["state"] == "running" and status["restarts"] == 1
