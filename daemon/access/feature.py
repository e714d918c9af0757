"""The managed-session PIN access feature: the device secret, the session book and lockout as saved, the
start-enable output, the access controller, the two session channels (signed MQTT sets, REEF pull) and the
keypad loop; the ``sessions`` and ``pin-test`` control verbs and the ``sessions`` downlink.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from fleetgate.config.access import StartEnableConfig
from fleetgate.config.schema import Config
from fleetgate.daemon.access.controller import ENABLED_KEY, LOCKOUT_KEY, AccessController, AccessPolicy
from fleetgate.daemon.access.lockout import Lockout, LockoutPolicy
from fleetgate.daemon.access.pin_pad import PinPad
from fleetgate.daemon.access.session_book import STATE_KEY as BOOK_KEY
from fleetgate.daemon.access.session_book import SessionBook
from fleetgate.daemon.access.session_policy import STATE_KEY as AGE_KEY
from fleetgate.daemon.access.session_policy import OfflineAge
from fleetgate.daemon.access.session_sync import SessionSync
from fleetgate.daemon.runtime.clock import mono_ns
from fleetgate.daemon.runtime.core import Core
from fleetgate.daemon.runtime.feature import FeatureError, FeatureParts
from fleetgate.daemon.runtime.readings import ReadingSink
from fleetgate.drivers.keypad import Keypad, KeypadSettings
from fleetgate.drivers.output import (
    GpioLine,
    GpioLineSettings,
    LogOnly,
    SerialRelay,
    SerialRelaySettings,
    StartEnable,
)
from fleetgate.sync.crypto.device_keys import DeviceSecretError, box_key, pin_key, read_secret_file
from fleetgate.sync.crypto.session_set import verify_keys_from_b64

if TYPE_CHECKING:
    import asyncio

    from fleetgate.daemon.access.reef_poller import ReefPoller

MOVING_FRESH_S = 10.0  # a speed reading older than this says nothing about moving now
SPEED_SIGNALS = ("vehicle_speed", "gps_speed")


def output_for(cfg: StartEnableConfig) -> StartEnable:
    if cfg.kind == "serial-relay":
        return SerialRelay(
            SerialRelaySettings(
                cfg.port, cfg.baudrate, bytes.fromhex(cfg.on_command), bytes.fromhex(cfg.off_command)
            )
        )
    if cfg.kind == "gpio":
        return GpioLine(GpioLineSettings(str(cfg.gpio_chip), cfg.gpio_line, cfg.active_low))
    return LogOnly()


def moving_from(sink: ReadingSink, above_kmh: float) -> Callable[[], bool]:
    def moving() -> bool:
        now = mono_ns()
        for signal in SPEED_SIGNALS:
            latest = sink.latest.get(signal)
            fresh = latest is not None and (now - latest.stamp.mono_ns) / 1e9 <= MOVING_FRESH_S
            if fresh and isinstance(latest.value, int | float) and latest.value > above_kmh:
                return True
        return False

    return moving


async def build(core: Core) -> FeatureParts:
    if not core.config.sessions.enabled:
        return FeatureParts(control={"sessions": lambda args: {"enabled": False}})
    try:
        return await _build(core)
    except (DeviceSecretError, OSError) as exc:
        raise FeatureError(f"PIN access: {exc}") from exc


async def _build(core: Core) -> FeatureParts:
    config = core.config
    sc = config.sessions
    assert sc.vin is not None and config.device.secret_file is not None  # the schema ensures it
    secret = read_secret_file(config.device.secret_file)
    state = core.state
    book = SessionBook.from_json(await state.get(BOOK_KEY))
    now = mono_ns()
    lockout = Lockout.restore(
        LockoutPolicy(sc.lockout.max_failures, sc.lockout.base_delay_s, sc.lockout.max_delay_s),
        core.boot_id,
        await state.get(LOCKOUT_KEY),
        now,
    )
    age = OfflineAge.restore(await state.get(AGE_KEY), now, ever_synced=book.mark is not None)
    enabled = await state.get(ENABLED_KEY)
    access = AccessController(
        book,
        pin_key(secret),
        lockout,
        age,
        output_for(config.start_enable),
        core.outbox,
        core.clock,
        AccessPolicy(sc.max_offline_age_s, sc.end_while_moving),
        moving_from(core.sink, sc.moving_above_kmh),
        core.sink.set_session,
        enabled.get("session_id") if isinstance(enabled, dict) else None,
    )
    sync = SessionSync(
        sc.vin,
        config.device.id,
        book,
        pin_key(secret),
        box_key(secret),
        verify_keys_from_b64(sc.signing_keys),
        core.outbox,
        core.clock,
        core.events,
        access,
    )
    out = FeatureParts(components=[access])
    if sc.signing_keys:
        out.downlink["sessions"] = sync.on_mqtt
    reef = _reef_poller(config, sync, core.uplink_connected) if sc.reef.enabled else None
    if reef is not None:
        out.components.append(reef)
    if config.keypad.enabled:
        kc = config.keypad
        keypad = Keypad(
            KeypadSettings(
                kc.port,
                kc.baudrate,
                kc.protocol,
                kc.inter_key_timeout_s,
                kc.max_digits,
                bytes.fromhex(kc.feedback_accepted),
                bytes.fromhex(kc.feedback_refused),
                bytes.fromhex(kc.feedback_locked_out),
            )
        )
        out.components.append(PinPad(keypad, access))

    async def pin_test(args: dict[str, Any]) -> dict[str, Any]:
        pin = args.get("pin")
        if not isinstance(pin, str) or not pin.isdigit() or not 4 <= len(pin) <= 32:
            return {"outcome": "refused", "reason": "not-a-pin"}
        return (await access.enter(pin, actuate=False, source="cli")).as_dict()

    out.control["pin-test"] = pin_test
    out.control["sessions"] = lambda args: _sessions_view(sc.vin or "", access, sync, reef)
    return out


def _reef_poller(config: Config, sync: SessionSync, reconnected: asyncio.Event) -> ReefPoller:
    # Imported only when REEF is configured: httpx and its TLS stack are not needed otherwise.
    from fleetgate.daemon.access.reef_poller import ReefPoller
    from fleetgate.sync.reef.client import ReefClient

    rc = config.sessions.reef
    assert rc.key_file is not None  # the schema ensures it

    def client() -> ReefClient:
        return ReefClient(
            str(rc.base_url).rstrip("/"),
            ca_file=rc.ca_file,
            cert_file=rc.cert_file,
            key_file=rc.key_file,
            timeout_s=rc.timeout_s,
        )

    return ReefPoller(client, config.sessions.vin or "", sync, rc.poll_interval_s, rc.retry_s, reconnected)


def _sessions_view(
    vin: str, access: AccessController, sync: SessionSync, reef: ReefPoller | None
) -> dict[str, Any]:
    mark = access.book.mark
    return {
        "enabled": True,
        "vin": vin,
        "sessions": access.session_rows(),
        "sync": mark.__dict__ if mark else None,
        "access": access.snapshot(),
        "downlink": sync.snapshot(),
        "reef": reef.snapshot() if reef else None,
        "now_wall": time.time(),
    }
