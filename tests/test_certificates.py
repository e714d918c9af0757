"""The certificates the gateway presents, watched for expiry (daemon/runtime/certificates.py)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from fleetgate.daemon.runtime.certificates import CertificateWatch


def certificate(path: Path, days: float) -> Path:
    """A self-signed certificate valid until ``days`` from now (negative: expired)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fleetgate-test-0001")])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=400))
        .not_valid_after(now + timedelta(days=days))
        .sign(key, hashes.SHA256())
    )
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


def test_expiry_is_shown_and_alerted_30_days_ahead(tmp_path: Path) -> None:
    watch = CertificateWatch(
        [
            ("mqtt client", certificate(tmp_path / "far.crt", 200)),
            ("reef client", certificate(tmp_path / "soon.crt", 12)),
            ("push receiver", certificate(tmp_path / "old.crt", -3)),
        ]
    )
    view = {c["name"]: c for c in watch.view()}
    assert 199 < view["mqtt client"]["days_left"] <= 200 and view["mqtt client"]["not_after"].endswith("Z")
    alerts = watch.alerts()
    assert len(alerts) == 2
    assert alerts[0].startswith("certificate-expiring: the reef client certificate") and "renew" in alerts[0]
    assert alerts[1].startswith("certificate-expired: the push receiver certificate")


def test_an_unreadable_certificate_is_an_alert_not_a_crash(tmp_path: Path) -> None:
    (tmp_path / "bad.crt").write_text("not a certificate")
    watch = CertificateWatch([("mqtt client", tmp_path / "bad.crt"), ("reef client", tmp_path / "gone.crt")])
    assert [c["error"] is not None for c in watch.view()] == [True, True]
    assert len(watch.alerts()) == 2 and all(a.startswith("certificate: the ") for a in watch.alerts())
