"""The depot's three outbox streams (docs/mqtt.md has their schemas).

- ``scooters`` (telemetry priority): what a scooter reported, polled or pushed: status, extra-status,
  location, battery. May be evicted under its disk quota like vehicle telemetry.
- ``scooter-events`` (event priority, never evicted, drains before telemetry): Segway's alert, fault and
  components pushes.
- ``scooter-results`` (audit priority): every command's acceptance and outcome, whoever asked (the MQTT
  downlink or ``fleetgate scooter``), with Segway's code and opId.

A record is flat: ``iot_code``, ``kind``, ``source`` and ``at`` (Segway's own timestamp, seconds, when it gave
one), then the seed's fields under the seed's names.
"""

from __future__ import annotations

from typing import Any

from fleetgate.sync.store import NewRecord, Priority, Stamp

READINGS = "scooters"
EVENTS = "scooter-events"
RESULTS = "scooter-results"


def reading(
    stamp: Stamp, iot_code: str, kind: str, source: str, at: int | None, fields: dict[str, Any]
) -> NewRecord:
    body = {**fields, "iot_code": iot_code, "kind": kind, "source": source, "at": at}
    return NewRecord.json(READINGS, Priority.TELEMETRY, stamp, body)


def pushed_event(stamp: Stamp, body: dict[str, Any]) -> NewRecord:
    return NewRecord.json(EVENTS, Priority.EVENT, stamp, {**body, "source": "push"})


def result(stamp: Stamp, body: dict[str, Any]) -> NewRecord:
    return NewRecord.json(RESULTS, Priority.AUDIT, stamp, body)
