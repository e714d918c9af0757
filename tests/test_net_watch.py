"""daemon/uplink/net_watch.py: rtnetlink messages that add connectivity wake the uplink at once; everything else,
malformed input included, does nothing. The daemon test runs fleetgate in a network namespace of its own
whose loopback interface is down (no coverage), then brings it up and starts a broker there."""

from __future__ import annotations

import json
import struct
import subprocess
from pathlib import Path
from typing import Any

from test_uplink_daemon import status, uplink_config

from fleetgate.daemon.uplink.net_watch import (
    IFF_RUNNING,
    IFF_UP,
    IFINFOMSG,
    NLMSG_HDR,
    RTM_NEWADDR,
    RTM_NEWLINK,
    RTM_NEWROUTE,
    comes_up,
)

from conftest import wait_until
from mosquitto_fixture import MOSQUITTO, free_port

RTM_DELLINK, RTM_DELADDR = 17, 21


def message(kind: int, body: bytes = b"") -> bytes:
    length = NLMSG_HDR.size + len(body)
    return NLMSG_HDR.pack(length, kind, 0, 0, 0) + body + b"\0" * (-length % 4)


def link(flags: int) -> bytes:
    return message(RTM_NEWLINK, IFINFOMSG.pack(0, 1, 2, flags, 0xFFFFFFFF))


def test_links_up_and_running_new_addresses_and_routes_come_up():
    assert comes_up(link(IFF_UP | IFF_RUNNING))
    assert comes_up(message(RTM_NEWADDR, b"\0" * 8))
    assert comes_up(message(RTM_NEWROUTE, b"\0" * 12))
    assert comes_up(link(IFF_UP) + message(RTM_NEWADDR, b"\0" * 8))  # a later message in the same datagram


def test_links_going_down_or_not_yet_running_and_removals_do_not():
    assert not comes_up(link(IFF_UP))  # administratively up, no carrier yet
    assert not comes_up(link(0))
    assert not comes_up(message(RTM_DELLINK, IFINFOMSG.pack(0, 1, 2, 0, 0)))
    assert not comes_up(message(RTM_DELADDR, b"\0" * 8))


def test_malformed_datagrams_are_not_trusted():
    assert not comes_up(b"")
    assert not comes_up(b"\x01\x02\x03")  # shorter than a header
    assert not comes_up(struct.pack("=IHHII", 4, RTM_NEWADDR, 0, 0, 0))  # length smaller than the header
    assert not comes_up(struct.pack("=IHHII", 4096, RTM_NEWADDR, 0, 0, 0))  # longer than the datagram
    assert not comes_up(message(RTM_NEWLINK, b"\0" * 4))  # ifinfomsg cut short
    assert not comes_up(struct.pack("=IHHII", 0, 0, 0, 0, 0) + message(RTM_NEWADDR))  # no progress: stop


def in_netns(pid: int, *cmd: str, **kwargs: Any) -> Any:
    return subprocess.run(["nsenter", "-t", str(pid), "-n", *cmd], check=True, capture_output=True, **kwargs)


def test_the_uplink_connects_as_soon_as_the_network_comes_up(tmp_path: Path, start_daemon):
    """Guards the minute a vehicle back in coverage would otherwise sit offline, waiting out its backoff."""
    port = free_port()
    config = uplink_config(tmp_path, port, heartbeat_s=1.0, backoff_s=(60.0, 60.0))
    daemon = start_daemon(config, prefix=["unshare", "--net", "--"])
    daemon.wait_ready()

    def uplink_backing_off() -> dict[str, Any] | None:
        component = next(c for c in status(daemon)["components"] if c["name"] == "uplink")
        return component if component["state"] == "backoff" else None

    waiting = wait_until("the uplink to back off", uplink_backing_off)
    assert waiting["retry_in_s"] > 20 and "unreachable" in waiting["last_error"].lower(), waiting

    conf = tmp_path / "netns-mosquitto.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\nuser root\nlog_dest stderr\n")
    in_netns(daemon.proc.pid, "ip", "link", "set", "lo", "up")  # coverage returns
    with open(tmp_path / "netns-mosquitto.log", "wb") as log:
        broker = subprocess.Popen(
            ["nsenter", "-t", str(daemon.proc.pid), "-n", MOSQUITTO, "-c", str(conf)], stdout=log, stderr=log
        )
    try:
        # Well before the retry it was waiting for; a connect takes milliseconds after the settle time.
        wait_until("online", lambda: status(daemon)["uplink"]["online"], timeout=waiting["retry_in_s"] - 10)
        health = in_netns(
            daemon.proc.pid, "mosquitto_sub", "-p", str(port), "-t", "fleetgate/v1/+/health", "-C", "1", "-W", "10",
            text=True,
        ).stdout  # fmt: skip
        assert json.loads(health)["online"] is True
        watch = next(c for c in status(daemon)["components"] if c["name"] == "net-watch")
        assert watch["state"] == "running" and watch["restarts"] == 0
        assert "network came up" in daemon.log
    finally:
        broker.terminate()
        broker.wait(10)
