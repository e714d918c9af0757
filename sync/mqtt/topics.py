"""Every MQTT topic the gateway uses, built in one place (docs/mqtt.md is the contract).

{root}/{device}/up/{stream}      records of one outbox stream (telemetry, events, heartbeat, audit ...)
{root}/{device}/health           retained: online with its status, or offline (the Last Will)
{root}/{device}/down/{name}      downlink to the device (sessions: the signed, retained session set)
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Topics:
    root: str  # versioned, e.g. "fleetgate/v1"
    device: str

    @property
    def base(self) -> str:
        return f"{self.root}/{self.device}"

    def uplink(self, stream: str) -> str:
        return f"{self.base}/up/{stream}"

    def downlink(self, name: str) -> str:
        return f"{self.base}/down/{name}"

    @property
    def health(self) -> str:
        return f"{self.base}/health"
