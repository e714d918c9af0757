"""Run every long-lived component as a supervised asyncio task.

A component that raises (or returns, which a long-lived task should never do) is logged, counted and
restarted after an exponential backoff with jitter; one that then runs for ``stable_after_s`` has its
backoff reset. Each component's state, restart count and last error are kept for ``fleetgate status``.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import random
import time
from dataclasses import dataclass, field
from typing import Protocol

log = logging.getLogger(__name__)


class Component(Protocol):
    name: str
    # Optional: exception types that are part of the component's normal life (a device unplugged, a server
    # gone); they are logged as one warning line instead of an error with a traceback.
    # expected_errors: tuple[type[Exception], ...]

    async def run(self) -> None:
        """Do the work until cancelled. Clean up on CancelledError; raise on failure."""


class State(enum.StrEnum):
    STARTING = "starting"
    RUNNING = "running"
    BACKOFF = "backoff"
    STOPPED = "stopped"


@dataclass
class ComponentStatus:
    name: str
    state: State = State.STARTING
    restarts: int = 0
    last_error: str | None = None
    last_error_wall: float | None = None
    running_since_mono: float | None = None
    next_start_mono: float | None = None

    def as_dict(self, now_mono: float) -> dict[str, object]:
        return {
            "name": self.name,
            "state": str(self.state),
            "restarts": self.restarts,
            "last_error": self.last_error,
            "last_error_at": self.last_error_wall,
            "up_s": None if self.running_since_mono is None else round(now_mono - self.running_since_mono, 1),
            "retry_in_s": None if self.next_start_mono is None else round(self.next_start_mono - now_mono, 1),
        }


@dataclass
class Backoff:
    initial_s: float
    max_s: float
    failures: int = 0
    rng: random.Random = field(default_factory=random.Random)

    def next_delay(self) -> float:
        """Equal jitter: half the exponential step, plus a random part up to the other half."""
        self.failures += 1
        step = min(self.max_s, self.initial_s * 2 ** (self.failures - 1))
        return step / 2 + self.rng.uniform(0, step / 2)

    def reset(self) -> None:
        self.failures = 0


class Supervisor:
    def __init__(
        self, backoff_initial_s: float = 1.0, backoff_max_s: float = 60.0, stable_after_s: float = 30.0
    ) -> None:
        self._backoff_initial_s = backoff_initial_s
        self._backoff_max_s = backoff_max_s
        self._stable_after_s = stable_after_s
        self._components: dict[str, Component] = {}
        self._status: dict[str, ComponentStatus] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._retry_now: dict[str, asyncio.Event] = {}

    def add(self, component: Component) -> None:
        if component.name in self._components:
            raise ValueError(f"component {component.name!r} added twice")
        self._components[component.name] = component
        self._status[component.name] = ComponentStatus(component.name)
        self._retry_now[component.name] = asyncio.Event()

    def retry_now(self, name: str) -> bool:
        """Cut the backoff of component ``name`` short (a technician's "sync now" when coverage is back);
        returns whether it was waiting to restart."""
        status = self._status.get(name)
        if status is None or status.state != State.BACKOFF:
            return False
        self._retry_now[name].set()
        return True

    def start(self) -> None:
        for name, component in self._components.items():
            if name not in self._tasks:
                self._tasks[name] = asyncio.create_task(
                    self._keep_running(component), name=f"supervise:{name}"
                )

    @property
    def statuses(self) -> list[ComponentStatus]:
        return list(self._status.values())

    def status_dicts(self) -> list[dict[str, object]]:
        now = time.monotonic()
        return [s.as_dict(now) for s in self._status.values()]

    async def _keep_running(self, component: Component) -> None:
        status = self._status[component.name]
        backoff = Backoff(self._backoff_initial_s, self._backoff_max_s)
        while True:
            status.state = State.RUNNING
            status.next_start_mono = None
            started = status.running_since_mono = time.monotonic()
            try:
                await component.run()
                error = "exited unexpectedly"
            except asyncio.CancelledError:
                status.state = State.STOPPED
                status.running_since_mono = None
                raise
            except Exception as exc:
                error = f"{type(exc).__name__}: {exc}"
                expected = isinstance(exc, getattr(component, "expected_errors", ()))
                log.log(
                    logging.WARNING if expected else logging.ERROR,
                    "component failed",
                    exc_info=not expected,
                    extra={"component": component.name, "error": error},
                )
            if time.monotonic() - started >= self._stable_after_s:
                backoff.reset()
            delay = backoff.next_delay()
            status.restarts += 1
            status.last_error = error
            status.last_error_wall = time.time()
            status.state = State.BACKOFF
            status.running_since_mono = None
            status.next_start_mono = time.monotonic() + delay
            log.warning(
                "component restarting",
                extra={"component": component.name, "delay_s": round(delay, 2), "restarts": status.restarts},
            )
            woken = self._retry_now[component.name]
            woken.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(woken.wait(), delay)

    async def stop(self, timeout_s: float = 4.0) -> None:
        """Cancel every component and wait up to ``timeout_s`` for them to finish cleaning up."""
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        if tasks:
            done, pending = await asyncio.wait(tasks, timeout=timeout_s)
            for task in pending:
                log.error("component did not stop in time", extra={"task": task.get_name()})
            for task in done:
                with contextlib.suppress(asyncio.CancelledError):
                    exc = task.exception()
                    if exc is not None:
                        log.error("component failed while stopping", extra={"error": repr(exc)})
        self._tasks.clear()
