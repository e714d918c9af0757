"""The managed-session PIN access feature: the device secret, the session book and lockout as saved, the
start-enable output, the access controller, the two session channels (signed MQTT sets, REEF pull) and the
keypad loop; the ``sessions`` and ``pin-test`` control verbs and the ``sessions`` downlink.

Saved state is decoded strictly, and a value that cannot be decoded does not stop the daemon: it is moved
aside (``quarantine/<key>/<wall_ns>`` in the state table, with the reason), reported (a ``state-quarantined``
event and a status alert) and replaced by what fails closed: no session until the next sync, a lockout of
full length, an offline age that is too old, start-enable off.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from fleetgate.config.access import StartEnableConfig
from fleetgate.config.schema import Config
from fleetgate.daemon.access.controller import (
    ENABLED_KEY,
    LOCKOUT_KEY,
    AccessController,
    AccessPolicy,
    is_pin,
)
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
from fleetgate.daemon.runtime.saved_state import SavedState
from fleetgate.daemon.runtime.vehicle import VIN_STATE_KEY, VehicleIdentity
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
from fleetgate.sync.crypto.signed import verify_keys_from_b64
from fleetgate.sync.store.state import StateDecodeError

if TYPE_CHECKING:
    import asyncio

    from fleetgate.daemon.access.reef_poller import ReefPoller

log = logging.getLogger(__name__)

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
    saved = SavedState(core.state, core.events, core.clock)
    book = await saved.load(
        BOOK_KEY,
        SessionBook.from_json,
        lambda: (SessionBook(), None),
        "no session is valid until the next sync",
    )
    now = mono_ns()
    policy = LockoutPolicy(sc.lockout.max_failures, sc.lockout.base_delay_s, sc.lockout.max_delay_s)

    def locked() -> tuple[Lockout, Any]:
        lockout = Lockout.undecodable(policy, core.boot_id, now)
        return lockout, lockout.as_state()

    lockout = await saved.load(
        LOCKOUT_KEY,
        lambda raw: Lockout.restore(policy, core.boot_id, raw, now),
        locked,
        f"locked out for {Lockout(policy, core.boot_id).delay_s(1):g} s from start",
    )
    ever_synced = book.mark is not None
    age = await saved.load(
        AGE_KEY,
        lambda raw: OfflineAge.restore(raw, now, ever_synced),
        lambda: (OfflineAge.lost(now, ever_synced), None),
        "the time since the last sync is unknown: too old until the next sync"
        if ever_synced
        else "the time since the last sync is unknown",
    )
    enabled_by = await saved.load(ENABLED_KEY, _enabled_by, lambda: (None, None), "start-enable stays off")
    # Until OBD answers this run, the VIN an earlier run read: a moved gateway is caught from the start. (A bad
    # saved value: the OBD feature moves it aside and reads the VIN again.)
    with contextlib.suppress(StateDecodeError):
        core.vehicle.remember(await core.state.get(VIN_STATE_KEY))

    def vin_mismatch() -> str | None:
        seen = core.vehicle.vin
        return None if seen is None or seen == sc.vin else seen

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
        enabled_by,
        vin_mismatch,
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
    out = FeatureParts(
        components=[access],
        alerts=[
            saved.alerts,
            lambda: _store_alerts(access),
            lambda: _vin_alerts(sc.vin or "", core.vehicle, access),
        ],
    )
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
        if not is_pin(pin) or not 4 <= len(pin) <= 32:
            return {"outcome": "refused", "reason": "not-a-pin"}
        return (await access.enter(pin, actuate=False, source="cli")).as_dict()

    out.control["pin-test"] = pin_test
    out.status["counters.sessions"] = lambda snap: {
        "decisions": dict(access.counts),
        "wrong_pins_in_a_row": access.lockout.failures,
        "downlink_rejected": dict(sync.rejected),
        "reef_failures": dict(reef.failures) if reef else {},
    }
    out.control["sessions"] = lambda args: _sessions_view(
        sc.vin or "", access, sync, reef, saved, core.vehicle
    )
    return out


def _enabled_by(raw: Any) -> int | None:
    """The session that switched start-enable on, as saved (``{"session_id": id}``), or None."""
    if raw is None:
        return None
    if not isinstance(raw, dict) or raw.keys() != {"session_id"}:
        raise ValueError("start-enable state is not an object with exactly session_id")
    session_id = raw["session_id"]
    if not isinstance(session_id, int) or isinstance(session_id, bool):
        raise ValueError("start-enable session_id is not an integer")
    return session_id


def _vin_alerts(expected: str, vehicle: VehicleIdentity, access: AccessController) -> list[str]:
    seen = access.vin_mismatch()
    if seen is None:
        return []
    return [
        f"vin-mismatch: the sessions are for VIN {expected} but the vehicle answers {seen} ({vehicle.source}): "
        "every session's PIN is refused (vin-mismatch) until the configuration names this vehicle"
    ]


def _store_alerts(access: AccessController) -> list[str]:
    if access.store_error is None:
        return []
    return [
        f"PIN path: the store cannot commit ({access.store_error}); wrong PINs are refused as "
        "store-unavailable and counted in memory only"
    ]


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
    vin: str,
    access: AccessController,
    sync: SessionSync,
    reef: ReefPoller | None,
    saved: SavedState,
    vehicle: VehicleIdentity,
) -> dict[str, Any]:
    mark = access.book.mark
    return {
        "enabled": True,
        "vin": vin,
        "vehicle_vin": vehicle.vin,  # as the vehicle answers (OBD 09 02); null: unknown
        "vehicle_vin_source": vehicle.source,
        "vin_mismatch": access.vin_mismatch() is not None,
        "sessions": access.session_rows(),
        "sync": mark.__dict__ if mark else None,
        "access": access.snapshot(),
        "downlink": sync.snapshot(),
        "reef": reef.snapshot() if reef else None,
        "quarantined": [asdict(q) for q in saved.quarantined],
        "now_wall": time.time(),
    }
