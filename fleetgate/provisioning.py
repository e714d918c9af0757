"""``fleetgate keys``: a gateway's public keys for provisioning, and its device secret made once.

Run on the device, as root or the daemon's user (the secret file is readable by its owner only). The cloud needs
the **X25519 PIN sealing key** to seal PINs into session sets for this device (docs/security.md,
"Provisioning a gateway"); the signing-key ids show which cloud keys the configuration pins. Nothing secret
is ever printed: the secret stays in its file, the keys derived from it in memory for the one derivation.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from fleetgate.config.loader import load_config
from fleetgate.sync.crypto.device_keys import device_public_key_b64, generate_secret_file, read_secret_file
from fleetgate.sync.crypto.signed import key_id, verify_keys_from_b64


class ProvisioningError(Exception):
    """What is missing or wrong, said for an operator; never contains a secret."""


def secret_file_named_in(config_path: Path | None) -> Path | None:
    """``device.secret_file`` as the configuration file writes it (relative to the file), read without
    validating the rest: before ``--generate`` the file it names does not exist, and full loading refuses
    exactly that."""
    if config_path is None or not config_path.exists():
        return None
    try:
        raw = tomllib.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ProvisioningError(f"{config_path}: {exc}") from None
    named = raw.get("device", {}).get("secret_file") if isinstance(raw.get("device"), dict) else None
    if named is None:
        return None
    if not isinstance(named, str):
        raise ProvisioningError(f"{config_path}: device.secret_file is not a string")
    path = Path(named)
    return path if path.is_absolute() else (config_path.parent / path).absolute()


def report(config_path: Path | None, secret_file: Path | None, generate: bool) -> dict[str, Any]:
    """The public keys of this gateway; with ``generate``, the device secret is made first if missing.

    ``config_path`` None: the embedded defaults (no signing keys pinned)."""
    path = secret_file or secret_file_named_in(config_path)
    if path is None:
        raise ProvisioningError(
            "no device secret file: set device.secret_file in the configuration or pass --secret-file"
        )
    generated = False
    if generate and not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        generate_secret_file(path)
        generated = True
    try:
        secret = read_secret_file(path)
    except (OSError, ValueError) as exc:
        hint = "" if generate else " (fleetgate keys --generate makes one)"
        raise ProvisioningError(f"{exc}{hint}") from None
    config = load_config(config_path)
    return {
        "device": config.device.id,
        "secret_file": str(path),
        "generated": generated,
        "x25519_public_key": device_public_key_b64(secret),
        "session_signing_key_ids": [key_id(k) for k in verify_keys_from_b64(config.sessions.signing_keys)],
        "scooter_command_signing_key_ids": [
            key_id(k) for k in verify_keys_from_b64(config.segway.commands.signing_keys)
        ],
    }


def render(keys: dict[str, Any]) -> str:
    def ids(values: list[str]) -> str:
        return ", ".join(values) if values else "none pinned"

    made = "made now, mode 0600" if keys["generated"] else "exists"
    return "\n".join(
        [
            f"device                          {keys['device']}",
            f"device secret                   {keys['secret_file']} ({made})",
            f"PIN sealing key (X25519)        {keys['x25519_public_key']}",
            f"session-set signing keys        {ids(keys['session_signing_key_ids'])}",
            f"scooter-command signing keys    {ids(keys['scooter_command_signing_key_ids'])}",
            "",
            "Give the PIN sealing key to the cloud with the device id: it seals every PIN to it.",
        ]
    )
