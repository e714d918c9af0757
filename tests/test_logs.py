"""Log lines are structured and never carry a secret, whatever a caller passes."""

from __future__ import annotations

import json
import logging

from fleetgate.daemon.runtime.logs import JsonFormatter, LogfmtFormatter


def make_record(**extra) -> logging.LogRecord:
    record = logging.LogRecord("fleetgate.test", logging.WARNING, __file__, 1, "pin rejected", None, None)
    for key, value in extra.items():
        setattr(record, key, value)
    return record


def test_logfmt_quotes_values_that_need_it():
    line = LogfmtFormatter().format(make_record(component="keypad", error='bad "byte" 0x1b'))
    assert line.startswith('level=warning logger=fleetgate.test msg="pin rejected" component=keypad')
    assert 'error="bad \\"byte\\" 0x1b"' in line


def test_secret_fields_are_masked_in_both_formats():
    record = make_record(
        pin="4711", client_secret="s3cr3t", access_token="zq9tok", device_key="k3y", session="abc"
    )
    for formatter in (LogfmtFormatter(), JsonFormatter()):
        line = formatter.format(record)
        for secret in ("4711", "s3cr3t", "zq9tok", "k3y"):
            assert secret not in line
        assert "abc" in line


def test_json_lines_parse():
    body = json.loads(JsonFormatter().format(make_record(outbox_depth=3)))
    assert body["level"] == "warning" and body["outbox_depth"] == 3 and body["ts"].endswith("Z")


def run_daemon_briefly(tmp_path, journal: bool) -> list[str]:
    """`fleetgate run` for a moment, stderr into a file; with ``journal``, JOURNAL_STREAM names that file as
    systemd names the journal's stream. An OBD port that does not exist makes warnings."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    from conftest import daemon_config, wait_until

    config = daemon_config(tmp_path, f'[obd]\nenabled = true\nport = "{tmp_path / "no-such-port"}"\n')
    log = tmp_path / f"stderr-{journal}.log"
    with open(log, "wb") as err:
        st = os.fstat(err.fileno())
        env = {**os.environ, "JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}" if journal else "8:12345"}
        fleetgate = str(Path(sys.executable).with_name("fleetgate"))
        proc = subprocess.Popen([fleetgate, "--config", str(config), "run"], stderr=err, env=env)
        try:
            wait_until(
                "a warning", lambda: "level=warning" in log.read_text() or "level=error" in log.read_text()
            )
            time.sleep(0.2)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=20)
    return [line for line in log.read_text().splitlines() if line]


def test_under_journald_each_line_carries_its_priority(tmp_path):
    lines = run_daemon_briefly(tmp_path, journal=True)
    for line in lines:
        level = line.split("level=", 1)[1].split(" ", 1)[0]
        wanted = {"debug": "<7>", "info": "<6>", "warning": "<4>", "error": "<3>", "critical": "<2>"}[level]
        assert line.startswith(wanted + "level="), line
    assert any(line.startswith(("<4>", "<3>")) for line in lines)  # so journalctl -p warning shows them


def test_elsewhere_each_line_carries_its_time(tmp_path):
    import re

    lines = run_daemon_briefly(tmp_path, journal=False)  # a JOURNAL_STREAM that is not this stderr
    assert lines and all(
        re.match(r"ts=\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z level=", line) for line in lines
    ), lines[:3]
