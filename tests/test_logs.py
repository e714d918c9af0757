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
