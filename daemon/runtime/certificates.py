"""Component ``cert-watch``: the expiry of the certificates the gateway presents (MQTT client, REEF client,
the depot's push receiver), so a fleet renews them before a vehicle drops off the cloud.

Each certificate file is read at start and every 12 hours (a renewal replaces the file): its ``notAfter``
is in the status (``certificates``) and the retained health message; within ``WARN_DAYS`` of it, or past
it, or unreadable, an alert says which and when.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from cryptography import x509

from fleetgate.config.schema import Config

WARN_DAYS = 30
CHECK_EVERY_S = 12 * 3600


@dataclass
class Checked:
    name: str
    file: Path
    not_after: datetime | None = None
    error: str | None = None

    def days_left(self, now: float) -> float | None:
        return None if self.not_after is None else round((self.not_after.timestamp() - now) / 86_400, 1)

    @property
    def not_after_text(self) -> str | None:
        return None if self.not_after is None else self.not_after.strftime("%Y-%m-%dT%H:%M:%SZ")

    def as_dict(self, now: float) -> dict[str, Any]:
        return {
            "name": self.name,
            "file": str(self.file),
            "not_after": self.not_after_text,
            "days_left": self.days_left(now),
            "error": self.error,
        }


def presented(config: Config) -> list[tuple[str, Path]]:
    """The certificates this configuration makes the gateway present."""
    out = []
    if config.mqtt.enabled and config.mqtt.tls:
        out.append(("mqtt client", config.mqtt.tls_files.cert_file))
    if config.sessions.enabled and config.sessions.reef.enabled:
        out.append(("reef client", config.sessions.reef.cert_file))
    if config.segway.enabled and config.segway.push.enabled:
        out.append(("push receiver", config.segway.push.cert_file))
    return out


def check(name: str, path: Path) -> Checked:
    try:
        cert = x509.load_pem_x509_certificate(path.read_bytes())
    except (OSError, ValueError) as exc:
        return Checked(name, path, error=f"cannot be read as a PEM certificate: {exc}")
    return Checked(name, path, cert.not_valid_after_utc)


class CertificateWatch:
    name = "cert-watch"

    def __init__(self, certificates: list[tuple[str, Path]]) -> None:
        self._certificates = certificates
        self.checked: list[Checked] = [check(name, path) for name, path in certificates]

    async def run(self) -> None:
        while True:
            self.checked = [check(name, path) for name, path in self._certificates]
            await asyncio.sleep(CHECK_EVERY_S)

    def view(self) -> list[dict[str, Any]]:
        now = time.time()
        return [c.as_dict(now) for c in self.checked]

    def alerts(self) -> list[str]:
        now = time.time()
        out = []
        for c in self.checked:
            left = c.days_left(now)
            if c.error is not None:
                out.append(f"certificate: the {c.name} certificate {c.file} {c.error}")
            elif left is not None and left <= 0:
                out.append(
                    f"certificate-expired: the {c.name} certificate {c.file} expired {c.not_after_text}"
                )
            elif left is not None and left <= WARN_DAYS:
                out.append(
                    f"certificate-expiring: the {c.name} certificate {c.file} expires {c.not_after_text} "
                    f"(in {left:g} days): renew it"
                )
        return out
