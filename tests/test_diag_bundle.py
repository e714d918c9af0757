"""``fleetgate diag bundle`` against a daemon holding synchronized sessions (real broker, keypad and relay
ptys): everything a support engineer needs is in it, and not one byte of a PIN, the device secret or a
secret-looking configuration value."""

from __future__ import annotations

import base64
import io
import json
import subprocess
import tarfile
from pathlib import Path

from test_access_daemon import (  # noqa: F401  (rig and pty_pairs are fixtures)
    PIN,
    WRONG_PIN,
    pty_pairs,
    rig,
    session,
    synced_version,
    type_pin,
)

from conftest import FLEETGATE, wait_until

INLINE_SECRET = "hunter2-do-not-ship"


def members(bundle: Path) -> dict[str, bytes]:
    with tarfile.open(bundle) as tar:
        assert all(m.mode == 0o600 for m in tar.getmembers())
        return {m.name.split("/", 1)[1]: tar.extractfile(m).read() for m in tar.getmembers()}  # type: ignore[union-attr]


def test_the_bundle_has_every_view_and_no_pin_key_or_secret(rig) -> None:  # noqa: F811
    rig.cloud.publish(rig.cloud.sign([session(3)]))
    wait_until("set applied", lambda: synced_version(rig.daemon) == 1)
    assert type_pin(rig.keypad, PIN) == b"G\n"
    assert type_pin(rig.keypad, WRONG_PIN) == b"R\n"
    # A secret someone wrote into the file by mistake (fleetgate takes files naming secrets, never values).
    config_text = rig.config.read_text()
    rig.config.write_text(config_text + f'\n# a note\n[extra]\npassword = "{INLINE_SECRET}"\n')
    out = rig.tmp_path / "bundle.tar.gz"
    done = subprocess.run(
        [FLEETGATE, "--config", str(rig.config), "diag", "bundle", "-o", str(out), "--json"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    rig.config.write_text(config_text)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["file"] == str(out) and (out.stat().st_mode & 0o777) == 0o600
    files = members(out)
    for view in ("status", "obd", "gps", "queue", "sessions", "rules", "scooters", "store"):
        assert f"{view}.json" in files or f"not included: {view}" in files["README.txt"].decode(), view
    status = json.loads(files["status.json"])
    assert status["device"]["id"] == "test-0001"
    sessions = json.loads(files["sessions.json"])
    assert [s["id"] for s in sessions["sessions"]] == [3]
    store = json.loads(files["store.json"])
    assert store["quick_check"] == "ok" and store["page_count"] > 0 and "fleetgate.db" in store["files"]
    assert json.loads(files["obd.json"])["enabled"] is False  # OBD disabled here: said, not hidden
    config = files["config.toml"].decode()
    assert (
        'password = "(masked)"' in config
        and "signing_keys" in config
        and str(rig.cloud.secret_file) in config
    )
    versions = json.loads(files["versions.json"])
    assert versions["fleetgate"] and versions["sqlite"] and "journal.txt" in files

    everything = b"".join(files.values()) + out.read_bytes()
    secret = rig.cloud.secret_file.read_bytes()
    forbidden = {
        "the PIN": PIN.encode(),
        "the wrong PIN": WRONG_PIN.encode(),
        "the inline secret": INLINE_SECRET.encode(),
        "the device secret": secret,
        "the device secret (hex)": secret.hex().encode(),
        "the device secret (base64)": base64.b64encode(secret),
    }
    for what, data in forbidden.items():
        assert data not in everything, f"{what} is in the bundle"
    with tarfile.open(fileobj=io.BytesIO(out.read_bytes())) as tar:  # and the archive itself is whole
        assert len(tar.getmembers()) == len(files)


def test_secret_looking_values_are_masked_and_file_paths_kept() -> None:
    from fleetgate.diag import mask_config

    text = """[segway]
client_secret_file = "/etc/fleetgate/segway.secret"
client_secret = "abc123"
api_token="t0k3n"
  private_key = 'PEM'
signing_key = "AAAA"
signing_keys = ["pub1", "pub2"]
# password = "a comment is left as written"
id = "demo-0001"
"""
    masked = mask_config(text)
    for secret in ("abc123", "t0k3n", "'PEM'", "AAAA"):
        assert secret not in masked
    for kept in ('client_secret_file = "/etc/fleetgate/segway.secret"', 'signing_keys = ["pub1", "pub2"]',
                 'id = "demo-0001"', "# password = "):  # fmt: skip
        assert kept in masked
