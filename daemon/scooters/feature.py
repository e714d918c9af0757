"""The depot feature (``device.role = "depot"``, ``segway.enabled``): a yard of Segway scooters served through
the Segway fleet cloud.

Parts: the API client (OAuth2, paced), the poller (status, location, battery, Bluetooth keys), the push
receiver (HTTPS, signature checked), the BLE manager (``segway.ble``), the command runner that routes BLE →
cloud → the persistent queue, its worker and retrier (signed MQTT downlink ``scooter-commands`` and the
``scooter`` control verb) and the views (``scooters`` verb, ``segway`` status section). The client secret is
read from its file here, once; it is handed to the client and the receiver and never logged.
"""

from __future__ import annotations

import logging
import re
import uuid
from typing import Any

from fleetgate.config.schema import Config
from fleetgate.config.segway import IOT_CODE_PATTERN
from fleetgate.daemon.runtime.core import Core
from fleetgate.daemon.runtime.feature import FeatureError, FeatureParts
from fleetgate.daemon.runtime.saved_state import SavedState
from fleetgate.daemon.scooters import records
from fleetgate.daemon.scooters.channels import BleChannel, RetryPolicy
from fleetgate.daemon.scooters.commands import VIA, CommandRunner, DeferPolicy, Request
from fleetgate.daemon.scooters.dispatch import Dispatcher, PendingRetrier
from fleetgate.daemon.scooters.downlink import SEQ_KEY, CommandDownlink, last_seq_from_state
from fleetgate.daemon.scooters.key_store import STATE_KEY as KEYS_KEY
from fleetgate.daemon.scooters.key_store import KeyStore
from fleetgate.daemon.scooters.pending import PendingQueue
from fleetgate.daemon.scooters.poller import Poller, PollPolicy
from fleetgate.daemon.scooters.push_receiver import PushReceiver, PushSettings
from fleetgate.daemon.scooters.yard import LEARNT_KEY, Latest, Scooter, Yard, learnt_from_state
from fleetgate.drivers.ble.fleetgate_profile import FleetgateProfile
from fleetgate.drivers.ble.manager import BleManager, BleSettings
from fleetgate.sync.crypto.device_keys import DeviceSecretError, at_rest_box, read_secret_file
from fleetgate.sync.crypto.signed import verify_keys_from_b64
from fleetgate.sync.segway.client import SegwayClient
from fleetgate.sync.segway.pushes import Push, record_body
from fleetgate.sync.segway.regions import api_base

log = logging.getLogger(__name__)

MAX_CLIENT_SECRET_BYTES = 1024
MAX_YARD = 10_000  # scooters learnt from pushes stop being added past this (each is polled)
_IOT_CODE = re.compile(IOT_CODE_PATTERN)


async def build(core: Core) -> FeatureParts:
    if not core.config.segway.enabled:
        return FeatureParts(control={"scooters": lambda args: {"enabled": False, "scooters": []}})
    try:
        return await _build(core)
    except (DeviceSecretError, OSError, ValueError) as exc:
        raise FeatureError(f"depot (Segway): {exc}") from exc


def read_client_secret(path: Any) -> str:
    """The OAuth2 client secret: the file's text, trimmed. Its mode was checked by the configuration."""
    with open(path, "rb") as fh:
        raw = fh.read(MAX_CLIENT_SECRET_BYTES + 1)
    if len(raw) > MAX_CLIENT_SECRET_BYTES:
        raise ValueError(f"client secret file {path} is over {MAX_CLIENT_SECRET_BYTES} bytes: not a secret")
    try:
        secret = raw.decode("ascii").strip()
    except UnicodeDecodeError:
        raise ValueError(f"client secret file {path} is not ASCII text") from None
    if not secret or not secret.isprintable():
        raise ValueError(f"client secret file {path} is empty or holds control characters")
    return secret


async def _build(core: Core) -> FeatureParts:
    config = core.config
    sc = config.segway
    assert sc.client_secret_file is not None and config.device.secret_file is not None  # the schema's job
    client_secret = read_client_secret(sc.client_secret_file)
    keys = KeyStore(at_rest_box(read_secret_file(config.device.secret_file)))
    saved = SavedState(core.state, core.events, core.clock)
    yard = _yard(config, await saved.load(LEARNT_KEY, learnt_from_state, lambda: ([], None), "learnt anew"))
    for iot_code, wall_ns in keys.load(await core.state.get(KEYS_KEY)).items():
        if (scooter := yard.get(iot_code)) is not None:
            scooter.key_fetched_wall_ns = wall_ns
    client = SegwayClient(
        api_base(sc.platform_code, str(sc.api_base) if sc.api_base else None),
        sc.platform_code,
        client_secret,
        ca_file=sc.ca_file,
        timeout_s=sc.timeout_s,
        max_requests_per_s=sc.max_requests_per_s,
        max_concurrent=sc.max_concurrent,
    )
    p = sc.poll
    poller = Poller(
        client,
        yard,
        keys,
        core.outbox,
        core.clock,
        PollPolicy(p.status_s, p.location_s, p.battery_s, p.key_s, p.backoff_max_s),
    )
    ble = _ble(config, yard, keys)
    pending = PendingQueue()
    if bad := await pending.load(core.state):
        log.warning("queued scooter commands dropped: not readable", extra={"count": len(bad)})
        await core.outbox.append([], dict.fromkeys(bad))
    c = sc.commands
    runner = CommandRunner(
        client,
        yard,
        keys,
        core.outbox,
        core.clock,
        RetryPolicy(c.max_attempts, c.retry_s),
        ble=ble,
        pending=pending,
        defer=DeferPolicy(c.defer_s, c.secure_defer_s, c.rotate_key_after_rental),
    )
    dispatcher = Dispatcher(runner)
    runner.followup = dispatcher.submit_nowait
    retrier = PendingRetrier(runner, dispatcher, c.pending_retry_s)
    last_seq = await saved.load(SEQ_KEY, last_seq_from_state, lambda: (None, None), "no seq floor")
    downlink = CommandDownlink(
        config.device.id,
        verify_keys_from_b64(c.signing_keys),
        last_seq,
        runner,
        dispatcher,
        core.outbox,
        core.clock,
        core.events,
    )
    out = FeatureParts(components=[poller, dispatcher, retrier], alerts=[saved.alerts])
    if ble is not None:
        out.components.append(ble.manager)
    if sc.commands.signing_keys:
        out.downlink["scooter-commands"] = downlink.on_mqtt
    receiver = None
    if sc.push.enabled:
        assert sc.push.key_file is not None
        settings = PushSettings(sc.push.bind, sc.push.port, sc.push.cert_file, sc.push.key_file)
        receiver = PushReceiver(settings, client_secret, sc.platform_code, _accept_push(core, yard, ble))
        out.components.append(receiver)

    async def scooter_verb(args: dict[str, Any]) -> dict[str, Any]:
        iot_code, op, params = args.get("iot_code"), args.get("op"), args.get("params", {})
        via = args.get("via", "auto")
        if not isinstance(iot_code, str) or not isinstance(op, str) or not isinstance(params, dict):
            return {"outcome": "refused", "reason": "iot_code and op are strings, params an object"}
        if via not in VIA:
            return {"outcome": "refused", "reason": f"via must be one of {', '.join(VIA)}"}
        if yard.get(iot_code) is None:
            return {"outcome": "refused", "reason": f"{iot_code[:32]!r} is not a scooter of this yard"}
        request = Request(iot_code, op, params, "cli", f"cli-{uuid.uuid4().hex[:12]}", via=via)
        return await dispatcher.submit(request)

    def scooters_view(_args: dict[str, Any]) -> dict[str, Any]:
        views = yard.view()
        for view in views:
            view["pending"] = pending.view(view["iot_code"])
            view["ble"] = ble.manager.view(view["iot_code"]) if ble is not None else None
        return {"enabled": True, "ble": ble is not None, "scooters": views}

    def segway_status(_snapshot: dict[str, Any]) -> dict[str, Any]:
        return {
            **yard.summary(),
            "api": dict(client.counters),
            "poller": poller.status(),
            "commands": {
                **downlink.status(),
                "outcomes": dict(runner.outcomes),
                "channels": dict(runner.channels),
                "pending": len(pending.entries),
                "pending_dropped": pending.dropped,
                "pending_retries": retrier.retries,
            },
            "ble": ble.manager.status() if ble is not None else {"enabled": False},
            "push": receiver.status() if receiver else {"enabled": False},
            "keys_dropped": keys.dropped,
        }

    out.control["scooters"] = scooters_view
    out.control["scooter"] = scooter_verb
    out.status["segway"] = segway_status
    return out


def _ble(config: Config, yard: Yard, keys: KeyStore) -> BleChannel | None:
    b = config.segway.ble
    if not b.enabled:
        return None
    settings = BleSettings(
        adapter=b.adapter,
        max_connections=b.max_connections,
        scan_s=b.scan_s,
        scan_every_s=b.scan_every_s,
        range_timeout_s=b.range_timeout_s,
        min_rssi=b.min_rssi,
        connect_timeout_s=b.connect_timeout_s,
        connect_attempts=b.connect_attempts,
        command_timeout_s=b.command_timeout_s,
        idle_disconnect_s=b.idle_disconnect_s,
    )
    profile = FleetgateProfile()  # the only profile of this build (config.segway.BLE_PROFILES)
    manager = BleManager(profile, settings)
    addresses = {s.iot_code: s.ble_address for s in config.segway.scooters}
    for iot_code in yard.scooters:
        manager.watch(iot_code, addresses.get(iot_code))

    def key_rejected(iot_code: str) -> None:
        # The scooter refused the cached key: fetch it again now rather than at the next key_s.
        if (scooter := yard.get(iot_code)) is not None:
            scooter.next_due["key"] = 0.0
        log.warning(
            "scooter refused its cached Bluetooth key; fetching it again", extra={"iot_code": iot_code}
        )

    return BleChannel(manager, profile, keys, key_rejected)


def _yard(config: Config, learnt: list[str]) -> Yard:
    yard = Yard()
    for s in config.segway.scooters:
        yard.add(Scooter(s.iot_code, s.vin, s.sn, s.model))
    for iot_code in learnt:
        yard.add(Scooter(iot_code, learnt=True))
    return yard


def _accept_push(core: Core, yard: Yard, ble: BleChannel | None) -> Any:
    """The receiver's commit: the push's record (and a newly learnt scooter) in one outbox transaction."""

    async def accept(push: Push) -> None:
        stamp = core.clock.stamp()
        body = record_body(push)
        if push.priority == "event":
            record = records.pushed_event(stamp, body)
        else:
            record = records.reading(stamp, push.iot_code, push.kind, "push", push.at, push.fields)
        state = (
            {LEARNT_KEY: [*yard.learnt_codes(), push.iot_code]} if yard.get(push.iot_code) is None else None
        )
        await core.outbox.append([record], state)
        if state is not None:
            yard.learn(push.iot_code)
            if ble is not None:
                ble.manager.watch(push.iot_code, None)  # recognised by what it advertises
            log.info("scooter learnt from a push", extra={"iot_code": push.iot_code})
        scooter = yard.get(push.iot_code)
        if scooter is not None and push.kind in ("status", "location"):
            scooter.latest[push.kind] = Latest(dict(push.fields), stamp.mono_ns, push.at)

    return accept
