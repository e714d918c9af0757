#!/usr/bin/env python3
"""The cloud's side of the signed downlink (session sets, edge rules, scooter commands), for operators, development
and the demo.

    python tools/sim/cloud.py keygen --out DIR
    python tools/sim/cloud.py pubkey --secret-file F [--create]
    python tools/sim/cloud.py sign --signing-key F --device-key B64 --device ID --vin VIN --version N \\
                                   --sessions FILE [--issued-at TS]
    python tools/sim/cloud.py publish (the sign options) --host H [--port P] [--tls-ca CA --cert C --key K] \\
                                   [--root fleetgate/v1]

keygen   writes an Ed25519 signing key to DIR/signing.key (base64, mode 0600, never overwritten) and its public
         key to DIR/signing.pub, and prints the public key: put it in the device's sessions.signing_keys.
pubkey   prints the device's X25519 public key (what PINs are sealed to), derived from its secret file;
         --create makes the secret file (32 random bytes, mode 0600) first if it does not exist.
sign     prints the signed session-set message (docs/mqtt.md). --sessions is a JSON file: a list of sessions
         or a REEF answer {"managed_sessions": [...]} for this VIN (id, vin, pin, initialization, completion,
         verification_id; optional expires). --version must rise with every set; --issued-at defaults to now.
publish  signs, then publishes retained at QoS 1 to {root}/{device}/down/sessions and waits for the PUBACK.
command  a signed scooter command for a depot gateway (docs/mqtt.md, "Downlink: scooter commands"): --seq must
         rise with every command to the device; --param NAME=VALUE (JSON if it parses, else a string) for the
         operation's parameters; prints the message, or with --host publishes it (QoS 1, not retained) to
         {root}/{device}/down/scooter-commands.

rules    a signed edge-rule set (docs/mqtt.md, "Downlink: edge rules"): --rules is a JSON file, the list of rules;
         --version must rise with every set; prints the message, or with --host publishes it retained at QoS 1
         to {root}/{device}/down/rules.

    python tools/sim/cloud.py rules --signing-key F --device ID --version N --rules FILE [--host H ...]
    python tools/sim/cloud.py command --signing-key F --device ID --seq N --iot-code IOT --op unlock \
                                   [--param speedMode=2] [--id ID] [--expires-in S] [--via auto|ble|cloud]
                                   [--host H ...]

Exit status 0, or 1 with a message naming what was wrong (2 for a bad command line).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import json
import os
import ssl
import stat
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from nacl.signing import SigningKey

from fleetgate.sync.crypto.device_keys import (
    DeviceSecretError,
    device_public_key_b64,
    generate_secret_file,
    read_secret_file,
)
from fleetgate.sync.crypto.rule_set import seal_rule_set
from fleetgate.sync.crypto.scooter_command import seal_command
from fleetgate.sync.crypto.session_set import seal_session_set
from fleetgate.sync.mqtt.topics import Topics


def _fail(message: str) -> SystemExit:
    return SystemExit(f"cloud.py: {message}")


def keygen(out: Path) -> str:
    out.mkdir(parents=True, exist_ok=True)
    key = SigningKey.generate()
    public = base64.b64encode(bytes(key.verify_key)).decode("ascii")
    try:
        fd = os.open(out / "signing.key", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise _fail(f"{out / 'signing.key'} exists; not overwriting a signing key") from None
    with os.fdopen(fd, "w") as fh:
        os.fchmod(fd, 0o600)
        fh.write(base64.b64encode(bytes(key)).decode("ascii") + "\n")
    (out / "signing.pub").write_text(public + "\n")
    return public


def load_signing_key(path: Path) -> SigningKey:
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
        text = path.read_text().strip()
    except OSError as exc:
        raise _fail(f"signing key {path}: {exc.strerror}") from None
    if mode & 0o077:
        raise _fail(f"signing key {path} has mode {mode:04o}; it must be readable by its owner only")
    try:
        seed = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        seed = b""
    if len(seed) != 32:
        raise _fail(f"signing key {path} is not a base64 Ed25519 seed of 32 bytes (made by keygen)")
    return SigningKey(seed)


def load_sessions(path: Path) -> list[dict[str, Any]]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise _fail(f"sessions file {path}: {exc}") from None
    if isinstance(data, dict) and "managed_sessions" in data:
        data = data["managed_sessions"]
    if not isinstance(data, list):
        raise _fail(f"sessions file {path}: expected a list of sessions or {{'managed_sessions': [...]}}")
    return data


def sign(args: argparse.Namespace) -> bytes:
    issued_at = datetime.now(UTC)
    if args.issued_at:
        try:
            issued_at = datetime.fromisoformat(args.issued_at.replace("Z", "+00:00"))
        except ValueError:
            raise _fail(f"--issued-at {args.issued_at!r} is not an ISO 8601 time") from None
    try:
        return seal_session_set(
            device=args.device,
            vin=args.vin,
            version=args.version,
            issued_at=issued_at,
            sessions=load_sessions(args.sessions),
            signing_key=load_signing_key(args.signing_key),
            device_public_key_b64=args.device_key,
        )
    except ValueError as exc:
        raise _fail(str(exc)) from None


def command(args: argparse.Namespace) -> bytes:
    params: dict[str, Any] = {}
    for item in args.param:
        name, sep, text = item.partition("=")
        if not sep or not name:
            raise _fail(f"--param {item!r} is not NAME=VALUE")
        try:
            params[name] = json.loads(text)
        except ValueError:
            params[name] = text
    now = datetime.now(UTC)
    try:
        return seal_command(
            device=args.device,
            seq=args.seq,
            command_id=args.id or f"{args.op}-{args.seq}",
            iot_code=args.iot_code,
            op=args.op,
            params=params,
            issued_at=now,
            expires=now + timedelta(seconds=args.expires_in) if args.expires_in else None,
            via=args.via,
            signing_key=load_signing_key(args.signing_key),
        )
    except ValueError as exc:
        raise _fail(str(exc)) from None


def rules(args: argparse.Namespace) -> bytes:
    try:
        raw = json.loads(args.rules.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise _fail(f"--rules {args.rules}: {exc}") from None
    if not isinstance(raw, list):
        raise _fail(f"--rules {args.rules}: not a JSON list of rules")
    return seal_rule_set(
        device=args.device,
        version=args.version,
        issued_at=datetime.now(UTC),
        rules=raw,
        signing_key=load_signing_key(args.signing_key),
    )


async def publish(
    args: argparse.Namespace, payload: bytes, name: str = "sessions", retain: bool = True
) -> str:
    import aiomqtt  # only the publishing commands need it

    tls = None
    if args.tls_ca:
        tls = ssl.create_default_context(cafile=args.tls_ca)
        if args.cert:
            tls.load_cert_chain(args.cert, args.key)
    topic = Topics(args.root, args.device).downlink(name)
    async with aiomqtt.Client(
        args.host,
        args.port,
        identifier=f"fleetgate-cloud-sim-{os.getpid()}",
        protocol=aiomqtt.ProtocolVersion.V5,
        tls_context=tls,
        timeout=args.timeout,
    ) as client:
        await client.publish(topic, payload, qos=1, retain=retain, timeout=args.timeout)
    return topic


def _broker_options(p: argparse.ArgumentParser, *, required: bool) -> None:
    p.add_argument("--host", required=required, help="broker host" + ("" if required else ": publish"))
    p.add_argument("--port", type=int, default=8883)
    p.add_argument("--tls-ca", help="CA file: connect with TLS (without it: plain MQTT)")
    p.add_argument("--cert", help="client certificate (PEM), with --tls-ca")
    p.add_argument("--key", help="client certificate's key (PEM)")
    p.add_argument("--root", default="fleetgate/v1", help="topic root")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds for connect and PUBACK")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cloud.py", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("keygen", help="make an Ed25519 signing key")
    p.add_argument("--out", type=Path, required=True)
    p = sub.add_parser("pubkey", help="print a device's X25519 public key from its secret file")
    p.add_argument("--secret-file", type=Path, required=True)
    p.add_argument("--create", action="store_true", help="create the secret file if it does not exist")
    for name in ("sign", "publish"):
        p = sub.add_parser(name, help=f"{name} a session set")
        p.add_argument("--signing-key", type=Path, required=True)
        p.add_argument("--device-key", required=True, help="the device's X25519 public key (base64)")
        p.add_argument("--device", required=True)
        p.add_argument("--vin", required=True)
        p.add_argument("--version", type=int, required=True)
        p.add_argument("--sessions", type=Path, required=True)
        p.add_argument("--issued-at", help="ISO 8601, UTC if no offset (default: now)")
    _broker_options(p, required=True)
    p = sub.add_parser("command", help="sign (and with --host publish) a scooter command for a depot")
    p.add_argument("--signing-key", type=Path, required=True)
    p.add_argument("--device", required=True)
    p.add_argument("--seq", type=int, required=True, help="above every earlier command's to this device")
    p.add_argument("--iot-code", required=True)
    p.add_argument("--op", required=True, help="a Segway operation: unlock, lock, speed-mode ...")
    p.add_argument("--param", action="append", default=[], metavar="NAME=VALUE")
    p.add_argument("--id", help="the command's id (default: OP-SEQ)")
    p.add_argument("--expires-in", type=float, help="seconds until the command expires (default: never)")
    p.add_argument(
        "--via", choices=("auto", "ble", "cloud"), help="the channel (default: not said, which means auto)"
    )
    _broker_options(p, required=False)
    p = sub.add_parser("rules", help="sign (and with --host publish, retained) an edge-rule set")
    p.add_argument("--signing-key", type=Path, required=True)
    p.add_argument("--device", required=True)
    p.add_argument("--version", type=int, required=True, help="above every earlier set's to this device")
    p.add_argument("--rules", type=Path, required=True, help="JSON file: the list of rules")
    _broker_options(p, required=False)
    args = parser.parse_args(argv)

    if args.command == "keygen":
        print(keygen(args.out))
    elif args.command == "pubkey":
        if args.create and not args.secret_file.exists():
            generate_secret_file(args.secret_file)
        try:
            print(device_public_key_b64(read_secret_file(args.secret_file)))
        except DeviceSecretError as exc:
            raise _fail(str(exc)) from None
    elif args.command == "sign":
        sys.stdout.write(sign(args).decode("ascii") + "\n")
    elif args.command == "rules" and not args.host:
        sys.stdout.write(rules(args).decode("ascii") + "\n")
    elif args.command == "rules":
        payload = rules(args)
        try:
            topic = asyncio.run(publish(args, payload, "rules"))
        except Exception as exc:  # aiomqtt.MqttError, ssl and OS errors: one line, no traceback
            raise _fail(f"publish to {args.host}:{args.port} failed: {exc}") from None
        print(f"published {len(payload)} bytes, retained, QoS 1, to {topic}", file=sys.stderr)
    elif args.command == "command" and not args.host:
        sys.stdout.write(command(args).decode("ascii") + "\n")
    elif args.command == "command":
        payload = command(args)
        try:
            topic = asyncio.run(publish(args, payload, "scooter-commands", retain=False))
        except Exception as exc:  # aiomqtt.MqttError, ssl and OS errors: one line, no traceback
            raise _fail(f"publish to {args.host}:{args.port} failed: {exc}") from None
        print(f"published {len(payload)} bytes, QoS 1, to {topic}", file=sys.stderr)
    else:
        if args.cert and not args.tls_ca:
            parser.error("--cert needs --tls-ca")
        payload = sign(args)
        try:
            topic = asyncio.run(publish(args, payload))
        except Exception as exc:  # aiomqtt.MqttError, ssl and OS errors: one line, no traceback
            raise _fail(f"publish to {args.host}:{args.port} failed: {exc}") from None
        print(f"published {len(payload)} bytes, retained, QoS 1, to {topic}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
