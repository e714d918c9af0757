"""The real `fleetgate run` process: READY, status over the socket, clean stop, kill -9, recovery."""

from __future__ import annotations

import base64
import json
import os
import random
import signal
import socket
import sqlite3
import stat
import time

from nacl.signing import SigningKey

from conftest import FLEETGATE, daemon_config


def status_json(daemon) -> dict:
    result = daemon.cli("status", "--json")
    assert result.returncode in (0, 4), result.stderr
    return json.loads(result.stdout)


def test_daemon_reaches_ready_answers_status_and_stops_on_sigterm(tmp_path, start_daemon):
    daemon = start_daemon(daemon_config(tmp_path), env={"WATCHDOG_USEC": "400000"})
    ready = daemon.wait_ready()
    assert "components running" in ready["STATUS"]
    daemon.notify.wait_for("WATCHDOG", "1")

    status = status_json(daemon)
    assert status["device"]["id"] == "test-0001"
    names = {c["name"]: c for c in status["components"]}
    assert {"control", "heartbeat", "ntp-watch"} <= set(names)
    assert all(c["state"] == "running" and c["restarts"] == 0 for c in names.values())
    assert status["outbox"]["streams"][0]["stream"] == "heartbeat"
    assert status["time"]["source"] in ("ntp", "none")

    human = daemon.cli("status")
    assert human.returncode == 0
    assert "heartbeat" in human.stdout and "components:" in human.stdout

    mode = stat.S_IMODE(os.stat(tmp_path / "control.sock").st_mode)
    assert mode == 0o660

    started = time.monotonic()
    assert daemon.terminate(timeout=10) == 0
    assert time.monotonic() - started < 5
    daemon.notify.wait_for("STOPPING", "1")
    assert not (tmp_path / "control.sock").exists()
    assert "level=error" not in daemon.log


def test_cli_without_daemon_says_so_and_fails(tmp_path):
    import subprocess

    config = daemon_config(tmp_path)
    result = subprocess.run(
        [FLEETGATE, "--config", str(config), "status"],
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
    )
    assert result.returncode == 3
    assert "not running" in result.stderr


def test_second_daemon_on_the_same_socket_refuses_to_start(tmp_path, start_daemon):
    first = start_daemon(daemon_config(tmp_path))
    first.wait_ready()
    second = start_daemon(daemon_config(tmp_path))
    assert second.proc.wait(20) == 1
    assert "another fleetgate daemon is serving" in second.log
    assert status_json(first)["device"]["id"] == "test-0001"


def test_stale_socket_of_a_killed_daemon_is_replaced(tmp_path, start_daemon):
    first = start_daemon(daemon_config(tmp_path))
    first.wait_ready()
    first.kill()
    assert (tmp_path / "control.sock").exists()
    second = start_daemon(daemon_config(tmp_path))
    second.wait_ready()
    assert status_json(second)["components"]


def test_control_socket_survives_bad_requests(tmp_path, start_daemon):
    daemon = start_daemon(daemon_config(tmp_path))
    daemon.wait_ready()

    def ask(raw: bytes) -> dict:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(10)
            sock.connect(str(tmp_path / "control.sock"))
            sock.sendall(raw)
            return json.loads(sock.makefile("rb").readline())

    assert ask(b"not json\n")["error"]["code"] == "bad-json"
    assert ask(b"[1,2]\n")["error"]["code"] == "bad-request"
    assert ask(b'{"v": 99, "cmd": "status"}\n')["error"]["code"] == "bad-version"
    unknown = ask(b'{"v": 1, "cmd": "reboot"}\n')["error"]
    assert unknown["code"] == "unknown-command" and "status" in unknown["message"]
    assert ask(b'{"v": 1, "cmd": "status", "args": 5}\n')["error"]["code"] == "bad-args"
    assert ask(b"x" * 70_000 + b"\n")["error"]["code"] == "too-long"
    assert ask(b'{"v": 1, "cmd": "ping"}\n')["ok"] is True
    assert daemon.proc.poll() is None
    counted = status_json(daemon)["control"]
    assert counted["bad_requests"] >= 4 and counted["internal_errors"] == 0
    assert f"{counted['bad_requests']} bad" in daemon.cli("status").stdout


def test_corrupt_database_is_moved_aside_and_the_daemon_goes_on(tmp_path, start_daemon):
    state = tmp_path / "state"
    state.mkdir()
    (state / "fleetgate.db").write_bytes(b"\x00garbage" * 4096)
    daemon = start_daemon(daemon_config(tmp_path))
    daemon.wait_ready()
    status = status_json(daemon)
    recovered = status["store"]["recovered"]
    assert recovered is not None
    assert os.path.exists(recovered["moved_to"])
    streams = {s["stream"]: s for s in status["outbox"]["streams"]}
    assert streams["events"]["depth"] == 1
    assert "WARNING: database was corrupt" in daemon.cli("status").stdout
    daemon.terminate()
    payload = (
        sqlite3.connect(state / "fleetgate.db")
        .execute("SELECT payload FROM outbox o JOIN streams s ON s.id = o.stream_id WHERE s.name = 'events'")
        .fetchone()[0]
    )
    assert json.loads(payload)["event"] == "store-recovered"


def test_kill_9_while_appending_loses_no_committed_row(tmp_path, start_daemon):
    """Guards against acknowledging a record to anyone before its transaction is durable."""
    config = daemon_config(tmp_path, heartbeat_s=0.001)
    db = tmp_path / "state" / "fleetgate.db"
    rng = random.Random(7)
    highest_reported = 0
    for _round in range(3):
        daemon = start_daemon(config)
        daemon.wait_ready()
        reported = 0
        for _ in range(rng.randint(3, 8)):
            streams = {s["stream"]: s for s in status_json(daemon)["outbox"]["streams"]}
            reported = streams["heartbeat"]["last_seq"]
        daemon.proc.send_signal(signal.SIGKILL)
        daemon.proc.wait(10)
        assert reported > highest_reported, "the daemon did not append between rounds"
        highest_reported = reported

        conn = sqlite3.connect(db)
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        seqs = [
            r[0]
            for r in conn.execute(
                "SELECT seq FROM outbox o JOIN streams s ON s.id = o.stream_id WHERE s.name = 'heartbeat'"
                " ORDER BY seq"
            )
        ]
        conn.close()
        assert seqs[:reported] == list(range(1, reported + 1)), "a reported row is missing"
        assert seqs == list(range(1, len(seqs) + 1)), "sequence has a gap or a duplicate"


def test_a_device_secret_that_cannot_be_used_exits_78_not_1(tmp_path, start_daemon):
    """Guards against a restart loop: exit 1 made systemd restart a daemon whose secret will never do."""
    secret = tmp_path / "device.secret"
    secret.write_bytes(b"too short")
    secret.chmod(0o600)
    config = daemon_config(tmp_path)
    config.write_text(
        config.read_text().replace(
            '[device]\nid = "test-0001"', f'[device]\nid = "test-0001"\nsecret_file = "{secret}"'
        )
        + '\n[sessions]\nenabled = true\nvin = "1D4PT4GKXBW600841"\n'
        + f'signing_keys = ["{base64.b64encode(bytes(SigningKey.generate().verify_key)).decode()}"]\n'
        + '[mqtt]\nenabled = true\nhost = "127.0.0.1"\nport = 9\ntls = false\n'
    )
    daemon = start_daemon(config)
    assert daemon.proc.wait(20) == 78
    assert "PIN access: " in daemon.log and "the device secret is 9 bytes" in daemon.log
    assert "Traceback" not in daemon.log
