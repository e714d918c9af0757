"""Power cuts under the real daemon: its state directory on ext4 on a loop device, the power cut by keeping
only what reached the device (tests/power_cut.py), the daemon started again on what is left.

The promise (docs/mqtt.md, Delivery; docs/architecture.md, Durability): a power cut loses at most the live
telemetry the broker had not acknowledged, announced by `records-skipped`; the store opens as it was (not
"corrupt"); and no (stream, seq) is ever used for two different records, or a consumer would drop the second
as a duplicate of the first.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import UTC, datetime

import power_cut
import pytest
from power_cut import PowerCutDisk
from test_uplink_daemon import (
    assert_nothing_lost,
    broker_comes_up,
    decode,
    status,
    uplink_config,
)

from fleetgate.sync.mqtt.envelope import expand

from conftest import wait_until
from gpsfake_fixture import Gpsfake, moving_route
from mosquitto_fixture import free_port

pytestmark = pytest.mark.timeout(240)


@pytest.fixture
def disk(tmp_path) -> Iterator[PowerCutDisk]:
    why = power_cut.available()
    if why is not None:
        pytest.skip(f"power-cut disk: {why}")
    disk = PowerCutDisk(tmp_path / "disk.img", tmp_path / "state")
    try:
        disk.attach()
    except RuntimeError as exc:  # e.g. a container without the right to mount
        pytest.skip(f"power-cut disk: {exc}")
    yield disk
    disk.close()


def live_records(messages: list) -> dict[tuple[str, int], set[tuple]]:
    """Each delivered (stream, seq) with every distinct content it arrived with (boot, mono_ns, data)."""
    seen: dict[tuple[str, int], set[tuple]] = {}
    for topic, payload, _qos, _retain, props in messages:
        if "/up/" in topic:
            envelope = decode(topic, payload, props)
            for r in expand(envelope):
                content = (r["boot"], r["mono_ns"], repr(r["data"]))
                seen.setdefault((envelope["stream"], r["seq"]), set()).add(content)
    return seen


def delivered_count(messages: list) -> int:
    return len(live_records(messages))


@pytest.mark.parametrize("link", ["online", "offline"])
def test_a_power_cut_loses_only_announced_live_records_and_never_reuses_a_seq(
    tmp_path, start_daemon, disk, link
):
    port = free_port()
    db = disk.mount / "fleetgate.db"
    # Short windows (live batches of 0.5 s, stored after 2 s online and 3 s offline) to keep the test short.
    windows = "live_batch_s = 0.5\nmemory_window_s = 2\noffline_window_s = 3"
    config = uplink_config(tmp_path, port, heartbeat_s=0.01, mqtt_extra=windows)
    route, _ = moving_route(tmp_path, start=datetime.now(UTC), stop_end_s=300)  # real time, for 5+ minutes
    # GPS time: records with a trusted wall time are spilled sealed, into the spool's files (spool.py).
    with Gpsfake(route, cycle_s=0.2) as gps, broker_comes_up(port) as (_broker, consumer, proxy):
        config.write_text(config.read_text() + f"\n[gps]\nenabled = true\nport = {gps.port}\n")
        daemon = start_daemon(config)
        daemon.wait_ready()
        for _ in range(2):
            wait_until("GPS time trusted", lambda d=daemon: status(d)["time"]["trusted"])
            before = delivered_count(consumer.messages)
            wait_until(
                "live records delivered", lambda b=before: delivered_count(consumer.messages) > b + 100
            )
            if link == "offline":
                # The broker out of reach long enough for live records to be written to the store.
                proxy.cut("reset")
                wait_until(
                    "live records stored",
                    lambda d=daemon: status(d)["outbox"]["memory"]["heartbeat"]["spilled"] > 50,
                    timeout=60,
                )
                assert status(daemon)["store"]["spool"]["appends"] > 0  # sealed, in the spool's files
            disk.cut(daemon.proc)
            disk.attach()
            proxy.restore()
            daemon = start_daemon(config)
            daemon.wait_ready()
            assert "store corrupt" not in daemon.log, daemon.log[-2000:]  # what reached the device is whole
        wait_until("the outbox to catch up", lambda: status(daemon)["outbox"]["total"] < 50, timeout=90)
        daemon.terminate()
        time.sleep(0.5)  # let the consumer take the last PUBLISHes off the socket
        assert_nothing_lost(db, consumer.messages)  # every seq: delivered, still held, or announced skipped

    reused = {key: contents for key, contents in live_records(consumer.messages).items() if len(contents) > 1}
    assert not reused, f"{len(reused)} seqs carried two different records, e.g. {list(reused.items())[:2]}"
