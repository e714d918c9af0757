"""Keys derived from the device secret, and the keyed PIN hash kept at rest.

The device secret is at least 32 random bytes in a file only the daemon's user may read
(``device.secret_file``; ``generate_secret_file`` makes one). Independent keys come from it with
HKDF-SHA256 (RFC 5869, built on ``hmac``), one ``info`` label per purpose, so no key says anything
about another or about the secret:

==========================  ======================================  ==========================================
key                         HKDF ``info``                           use
==========================  ======================================  ==========================================
``pin_key(secret)``         ``fleetgate/v1/pin-hash-key``           32-byte key of the PIN hashes at rest
``box_key(secret)``         ``fleetgate/v1/x25519-box-key``         X25519 private key that opens sealed PINs
``at_rest_box(secret)``     ``fleetgate/v1/at-rest-secretbox-key``  SecretBox sealing Bluetooth keys at rest
==========================  ======================================  ==========================================

(HKDF rather than keyed BLAKE2b: BLAKE2b takes a key of at most 64 bytes, HKDF a secret of any length.)
``device_public_key_b64(secret)`` is the X25519 public key, base64, that the cloud seals PINs to
(``tools/sim/cloud.py pubkey --secret-file F`` prints it).

``hash_pin(pin_key, session_id, pin)`` is HMAC-SHA256 over a domain label, the session id and the PIN,
so the same PIN in two sessions (or on two devices) hashes differently. ``pin_matches`` compares in
constant time. No function here puts a secret, a key or a PIN in an exception message.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import os
import stat
from pathlib import Path

from nacl.public import PrivateKey
from nacl.secret import SecretBox

MIN_SECRET_BYTES = 32
SECRET_FILE_BYTES = 32
PIN_KEY_BYTES = 32

_HKDF_SALT = b"fleetgate device secret v1"
_INFO_PIN_KEY = b"fleetgate/v1/pin-hash-key"
_INFO_BOX_KEY = b"fleetgate/v1/x25519-box-key"
_INFO_AT_REST_KEY = b"fleetgate/v1/at-rest-secretbox-key"
_PIN_HASH_LABEL = b"fleetgate/v1/pin-hash\x00"


class DeviceSecretError(ValueError):
    """The device secret (or its file) cannot be used. The message never contains the secret."""


def _check_secret(secret: bytes) -> None:
    if not isinstance(secret, bytes | bytearray):
        raise DeviceSecretError(f"the device secret must be bytes, not {type(secret).__name__}")
    if len(secret) < MIN_SECRET_BYTES:
        raise DeviceSecretError(
            f"the device secret is {len(secret)} bytes; at least {MIN_SECRET_BYTES} are needed "
            "(make one with generate_secret_file)"
        )


def _hkdf_sha256(secret: bytes, info: bytes, length: int = 32) -> bytes:
    """HKDF-SHA256 (RFC 5869) with this module's fixed salt. ``length`` <= 32 (one expand block)."""
    prk = hmac.digest(_HKDF_SALT, bytes(secret), hashlib.sha256)
    return hmac.digest(prk, info + b"\x01", hashlib.sha256)[:length]


def pin_key(secret: bytes) -> bytes:
    """The 32-byte key of the PIN hashes at rest, derived from the device secret."""
    _check_secret(secret)
    return _hkdf_sha256(secret, _INFO_PIN_KEY)


def box_key(secret: bytes) -> PrivateKey:
    """The device's X25519 private key (opens PINs the cloud sealed to it), derived from the device secret."""
    _check_secret(secret)
    return PrivateKey(_hkdf_sha256(secret, _INFO_BOX_KEY))


def at_rest_box(secret: bytes) -> SecretBox:
    """The XSalsa20-Poly1305 box that seals secrets this device must read back (Segway Bluetooth keys) in its
    state table: a copy of the database without the device secret does not give them away."""
    _check_secret(secret)
    return SecretBox(_hkdf_sha256(secret, _INFO_AT_REST_KEY))


def device_public_key_b64(secret: bytes) -> str:
    """The device's X25519 public key, standard base64 (44 characters): what the cloud seals PINs to."""
    return base64.b64encode(bytes(box_key(secret).public_key)).decode("ascii")


def hash_pin(pin_key: bytes, session_id: int, pin: str) -> bytes:
    """Keyed hash of ``pin`` for session ``session_id``: HMAC-SHA256(pin_key, label || "<id>:<pin>").

    The session id salts the hash, so equal PINs of different sessions give different hashes.
    """
    if len(pin_key) != PIN_KEY_BYTES:
        raise ValueError(f"the PIN key must be {PIN_KEY_BYTES} bytes, not {len(pin_key)}")
    if isinstance(session_id, bool) or not isinstance(session_id, int):
        raise TypeError(f"session_id must be an int, not {type(session_id).__name__}")
    if not isinstance(pin, str):
        raise TypeError(f"pin must be a str, not {type(pin).__name__}")
    # "<id>:" cannot be ambiguous: the id is digits (and maybe "-"), ":" ends it.
    message = _PIN_HASH_LABEL + f"{session_id}:".encode("ascii") + pin.encode("utf-8", "surrogatepass")
    return hmac.digest(pin_key, message, hashlib.sha256)


def pin_matches(pin_key: bytes, session_id: int, pin: str, stored_hash: bytes) -> bool:
    """Whether ``pin`` is the PIN whose hash for ``session_id`` is ``stored_hash`` (constant-time compare)."""
    return hmac.compare_digest(hash_pin(pin_key, session_id, pin), stored_hash)


def read_secret_file(path: str | os.PathLike[str]) -> bytes:
    """The device secret from ``path``: refused if group or others may read it, or if it is too short."""
    p = Path(path)
    try:
        with open(p, "rb") as fh:
            st = os.fstat(fh.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise DeviceSecretError(f"secret file {p} is not a regular file")
            if st.st_mode & 0o077:
                raise DeviceSecretError(
                    f"secret file {p} has mode {stat.S_IMODE(st.st_mode):04o}; it must not be readable by "
                    f"group or others (chmod 600 {p})"
                )
            secret = fh.read(4096)
    except OSError as exc:
        raise DeviceSecretError(f"secret file {p} cannot be read: {exc.strerror}") from None
    try:
        _check_secret(secret)
    except DeviceSecretError as exc:
        raise DeviceSecretError(f"secret file {p}: {exc}") from None
    return secret


def generate_secret_file(path: str | os.PathLike[str]) -> None:
    """Write 32 random bytes to ``path``, mode 0600, atomically; never overwrites (``FileExistsError``).

    The bytes go to a temporary file created with O_EXCL and mode 0600 in the same directory, are
    fsynced, then hard-linked to ``path`` (which fails if it exists): a crash leaves either no secret
    file or a complete one, never a short one the daemon would refuse.
    """
    target = Path(path)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o600)
    try:
        try:
            os.fchmod(fd, 0o600)  # the umask may have taken bits away; the owner must read it
            data = os.urandom(SECRET_FILE_BYTES)
            while data:
                data = data[os.write(fd, data) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.link(tmp, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    dir_fd = os.open(target.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
