"""``fleetgate keys``: provisioning a gateway (docs/security.md). The secret is made once, owner-only, and
never printed; the printed PIN sealing key is the one whose private half opens what the cloud seals to it."""

from __future__ import annotations

import base64
import json
import stat

from nacl.public import PublicKey, SealedBox
from nacl.signing import SigningKey
from test_config import run_cli

from fleetgate.sync.crypto.device_keys import box_key, read_secret_file
from fleetgate.sync.crypto.signed import key_id

from conftest import write_config


def test_keys_generates_the_secret_once_and_prints_only_public_keys(tmp_path):
    signer = SigningKey.generate()
    pinned = base64.b64encode(bytes(signer.verify_key)).decode()
    config = write_config(
        tmp_path / "fleetgate.toml",
        f'[device]\nid = "veh-0042"\nsecret_file = "keys/device.secret"\n\n[mqtt]\nenabled = true\n'
        f'tls = false\n\n[sessions]\nenabled = true\nvin = "1D4PT4GKXBW600841"\nsigning_keys = ["{pinned}"]\n',
    )
    secret_path = tmp_path / "keys" / "device.secret"

    missing = run_cli("--config", str(config), "keys")
    assert missing.returncode == 78 and "--generate" in missing.stderr and not secret_path.exists()

    made = run_cli("--config", str(config), "keys", "--generate", "--json")
    assert made.returncode == 0, made.stderr
    first = json.loads(made.stdout)
    assert first["generated"] is True and first["device"] == "veh-0042"
    assert first["secret_file"] == str(secret_path)
    assert stat.S_IMODE(secret_path.stat().st_mode) == 0o600
    assert first["session_signing_key_ids"] == [key_id(signer.verify_key)]
    assert first["scooter_command_signing_key_ids"] == []

    again = run_cli("--config", str(config), "keys", "--generate", "--json")
    assert json.loads(again.stdout) == {**first, "generated": False}  # never made twice, never overwritten

    secret = read_secret_file(secret_path)
    human = run_cli("--config", str(config), "keys")
    assert human.returncode == 0 and first["x25519_public_key"] in human.stdout
    for output in (made.stdout, again.stdout, human.stdout):
        assert secret.hex() not in output and base64.b64encode(secret).decode() not in output

    # What the cloud seals to the printed key, the gateway opens.
    sealed = SealedBox(PublicKey(base64.b64decode(first["x25519_public_key"]))).encrypt(b"271828")
    assert SealedBox(box_key(secret)).decrypt(sealed) == b"271828"


def test_keys_without_a_secret_file_says_what_to_set(tmp_path):
    config = write_config(tmp_path / "fleetgate.toml", '[device]\nid = "veh-0042"\n')
    result = run_cli("--config", str(config), "keys")
    assert result.returncode == 78
    assert "device.secret_file" in result.stderr and "--secret-file" in result.stderr
