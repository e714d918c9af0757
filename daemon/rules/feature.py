"""The edge-rules feature: signed rule sets from ``down/rules``, every reading evaluated, crossings reported.

- A rule set (sync/crypto/rule_set.py) is verified, judged fresh (versions only go up; the retained message
  again is a duplicate), and every rule checked (definitions.py). A set with one bad rule is refused whole
  (``rule-set-rejected``, counted by reason): applying part of what the cloud meant would be a guess. An
  applied set is saved with the rules' states in one commit (``rules-applied``), so it is in force offline
  and after a restart; a rule kept from the set before (same id: rules are immutable, as in the seed) keeps
  its state, so it does not report a first evaluation again.
- Each reading the sink takes goes through the evaluator at once (``ReadingSink.on_reading``). A crossing is
  a ``rule-enter`` / ``rule-leave`` event at events priority, stamped with the reading that caused it, and
  is committed with the states it leaves. States changed without a report (a crossing suppressed by a
  time profile or cooldown) are saved within ``SAVE_EVERY_S`` and at a clean stop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from nacl.signing import VerifyKey

from fleetgate.daemon.rules.definitions import Rule, RuleError, parse_rules
from fleetgate.daemon.rules.evaluator import Crossing, Evaluator, RuleState
from fleetgate.daemon.rules.odometer import (
    Odometer,
    OdometerState,
    Trigger,
    parse_anchor,
    parse_triggers,
)
from fleetgate.daemon.runtime.core import Core
from fleetgate.daemon.runtime.feature import FeatureParts
from fleetgate.daemon.runtime.saved_state import SavedState
from fleetgate.sync.crypto.rule_set import RuleSet, open_rule_set
from fleetgate.sync.crypto.signed import SignedRejected, format_timestamp, judge_fresh, verify_keys_from_b64
from fleetgate.sync.store import NewRecord, Stamp

log = logging.getLogger(__name__)

SET_KEY = "rules.set"
STATE_KEY = "rules.state"
ODOMETER_KEY = "rules.odometer"
SAVED_SET_KEYS = {"version", "issued_at", "digest", "rules", "odometer", "odometerTriggers"}
MAX_PAYLOAD_BYTES = 4 * 1024 * 1024  # 1,000 rules of 100-vertex polygons are ~3 MB of JSON
SAVE_EVERY_S = 60.0
MAX_WAITING = 10_000  # crossings not yet committed (a flapping rule with a stalled store): oldest dropped
REJECTION_EVENT_EVERY_S = 60.0
ODOMETER_SIGNALS = frozenset({"odometer", "vehicle_speed", "gps_position"})


@dataclass(frozen=True)
class SavedSet:
    """The applied set as saved (``raw``, what ``_apply`` wrote) and its rules and triggers, parsed once."""

    raw: dict[str, Any]
    rules: list[Rule]
    triggers: list[Trigger]


def decode_set(raw: Any) -> SavedSet | None:
    """The saved set; ValueError (RuleError is one) naming what is wrong."""
    if raw is None:
        return None
    if not isinstance(raw, dict) or set(raw) != SAVED_SET_KEYS:
        raise ValueError(f"the saved rule set is not {sorted(SAVED_SET_KEYS)}")
    bytes.fromhex(raw["digest"])
    return SavedSet(raw, parse_rules(raw["rules"]), parse_triggers(raw["odometerTriggers"] or []))


def decode_odometer(raw: Any) -> OdometerState:
    if raw is None:
        return OdometerState()
    if not isinstance(raw, dict) or set(raw) != set(OdometerState.__dataclass_fields__):
        raise ValueError("the saved odometer is not what this version writes")
    return OdometerState(**raw)


def decode_states(raw: Any) -> dict[str, RuleState]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ValueError("the saved rule states are not an object")
    out = {}
    for rule_id, value in raw.items():
        if not isinstance(value, dict) or set(value) != {
            "evaluated",
            "covered",
            "last_reported",
            "last_crossing",
        }:
            raise ValueError(f"the saved state of rule {rule_id!r} is not what this version writes")
        out[rule_id] = RuleState(**value)
    return out


class EdgeRules:
    """Component ``rules``: commits crossings as they come; the rule set comes through ``on_mqtt``."""

    name = "rules"

    def __init__(self, core: Core, verify_keys: list[VerifyKey], saved: SavedSet | None,
                 states: dict[str, RuleState], odometer: OdometerState) -> None:  # fmt: skip
        self._core = core
        self._device = core.config.device.id
        self._verify_keys = verify_keys
        self._applied = None if saved is None else saved.raw  # {version, issued_at, digest, rules, ...}
        self._rules: list[Rule] = [] if saved is None else saved.rules
        self.evaluator = Evaluator(self._rules, states)
        self.odometer = Odometer([] if saved is None else saved.triggers, odometer)
        self._waiting: list[NewRecord] = []
        self._wake = asyncio.Event()
        self._dirty = False
        self._saved_changes = 0
        self._lock = asyncio.Lock()
        self._last_rejection_event: dict[str, float] = {}
        self.counts = {"applied": 0, "duplicate": 0, "crossings": 0, "dropped": 0, "distance_triggers": 0}
        self.rejected: dict[str, int] = {}

    # -- readings ------------------------------------------------------------------------------------------

    def observe(self, signal: str, value: Any, stamp: Stamp) -> None:
        crossings = self.evaluator.observe(signal, value, stamp.wall_ns, stamp.trusted)
        records = [self._record(c, stamp) for c in crossings]
        if signal in ODOMETER_SIGNALS:
            before = (self.odometer.state.anchor_m, self.odometer.state.distance_m)
            fired = self.odometer.observe(signal, value, stamp.mono_ns)
            records += [self._distance_record(t, stamp) for t in fired]
            # Distance driven, a new anchor: saved within SAVE_EVERY_S (one small commit a minute while driving).
            self._dirty = (
                self._dirty or (self.odometer.state.anchor_m, self.odometer.state.distance_m) != before
            )
        if records:
            self._waiting += records
            self.counts["crossings"] += len(crossings)
            overflow = len(self._waiting) - MAX_WAITING
            if overflow > 0:
                del self._waiting[:overflow]
                self.counts["dropped"] += overflow
            self._wake.set()
        if self.evaluator.state_changes != self._saved_changes:
            self._saved_changes = self.evaluator.state_changes
            self._dirty = True

    def _record(self, crossing: Crossing, stamp: Stamp) -> NewRecord:
        body = {
            "rule": {"id": crossing.rule.id, "name": crossing.rule.name},
            "direction": crossing.direction,
            "firstEval": crossing.first_eval,
            "trigger": {"signal": crossing.signal, "value": crossing.value},
            "snapshot": crossing.snapshot,
            "rule_set_version": None if self._applied is None else self._applied["version"],
        }
        if crossing.direction == "enter":
            return self._core.events.record("rule-enter", body, stamp)
        return self._core.events.record("rule-leave", body, stamp)

    def _distance_record(self, trigger: Trigger, stamp: Stamp) -> NewRecord:
        self.counts["distance_triggers"] += 1
        body = {
            "odometerTrigger": trigger.as_json(),
            "estimatedOdometer": round(self.odometer.estimate_m or 0.0, 1),
        }
        return self._core.events.record("distance-trigger", body, stamp)

    async def run(self) -> None:
        try:
            while True:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), SAVE_EVERY_S)
                self._wake.clear()
                await self._commit()
        finally:
            with contextlib.suppress(Exception):
                await asyncio.shield(self._commit())

    async def _commit(self) -> None:
        if not self._waiting and not self._dirty:
            return
        records, self._waiting = self._waiting, []
        self._dirty = False
        try:
            await self._core.events.emit(
                *records, state={STATE_KEY: self._states_json(), ODOMETER_KEY: self.odometer.state.as_json()}
            )
        except Exception:
            self._waiting[:0] = records  # kept for the next try
            self._dirty = True
            raise

    def _states_json(self) -> dict[str, Any]:
        return {rule_id: state.as_json() for rule_id, state in self.evaluator.states.items()}

    # -- the downlink ----------------------------------------------------------------------------------------

    async def on_mqtt(self, payload: bytes) -> None:
        async with self._lock:
            try:
                if len(payload) > MAX_PAYLOAD_BYTES:
                    raise SignedRejected("malformed", f"payload of {len(payload)} bytes is too large")
                new = open_rule_set(payload, verify_keys=self._verify_keys, device=self._device)
                applied = self._applied
                last = None if applied is None else (
                    applied["version"], _utc(applied["issued_at"]), bytes.fromhex(applied["digest"]))  # fmt: skip
                if judge_fresh(new.version, new.issued_at, new.digest, last) == "duplicate":
                    self.counts["duplicate"] += 1
                    return
                try:
                    rules = parse_rules(new.rules)
                    triggers = parse_triggers(new.odometer_triggers or [])
                    anchor = None if new.odometer is None else parse_anchor(new.odometer)
                except RuleError as exc:
                    raise SignedRejected("malformed-rule", str(exc)) from None
            except SignedRejected as exc:
                await self._rejected(exc)
                return
            await self._apply(new, rules, triggers, anchor)

    async def _apply(
        self, new: RuleSet, rules: list[Rule], triggers: list[Trigger], anchor: float | None
    ) -> None:
        old = self.evaluator.states
        kept = {r.id: old[r.id] for r in rules if r.id in old}
        evaluator = Evaluator(rules, kept)
        saved = {"version": new.version, "issued_at": format_timestamp(new.issued_at), "digest": new.digest.hex(),
                 "rules": new.rules, "odometer": new.odometer, "odometerTriggers": new.odometer_triggers}  # fmt: skip
        await self._commit()  # crossings of the old set first, with the states they left
        states = {rule_id: state.as_json() for rule_id, state in evaluator.states.items()}
        self.odometer.set_triggers(triggers)
        # The same reading in the next set is not a new reading: it must not undo the distance driven since.
        if anchor is not None and new.odometer != (self._applied or {}).get("odometer"):
            self._waiting += [
                self._distance_record(t, self._core.clock.stamp())
                for t in self.odometer.anchor(anchor, "cloud")
            ]
        body = {"version": new.version, "rules": len(rules), "kept": len(kept)}
        await self._core.events.emit(
            self._core.events.record("rules-applied", body),
            state={SET_KEY: saved, STATE_KEY: states, ODOMETER_KEY: self.odometer.state.as_json()},
        )
        self._applied, self._rules, self.evaluator = saved, rules, evaluator
        self._saved_changes = 0
        # Judge the new rules on what is known now, as the next readings would.
        for signal, latest in list(self._core.sink.latest.items()):
            self.observe(signal, latest.value, self._core.clock.stamp())
        self.counts["applied"] += 1
        log.info("rule set applied", extra=body)

    async def _rejected(self, exc: SignedRejected) -> None:
        self.rejected[exc.reason] = self.rejected.get(exc.reason, 0) + 1
        log.warning("rule set rejected", extra={"reason": exc.reason, "detail": exc.detail})
        now = time.monotonic()
        if now - self._last_rejection_event.get(exc.reason, -1e9) >= REJECTION_EVENT_EVERY_S:
            self._last_rejection_event[exc.reason] = now
            await self._core.events.emit_now(
                "rule-set-rejected",
                {"reason": exc.reason, "detail": exc.detail, "count": self.rejected[exc.reason]},
            )

    # -- what `fleetgate rules` shows -------------------------------------------------------------------------

    def view(self) -> dict[str, Any]:
        states = self.evaluator.states
        return {
            "enabled": True,
            "version": None if self._applied is None else self._applied["version"],
            "issued_at": None if self._applied is None else self._applied["issued_at"],
            "rules": [
                {
                    "id": r.id,
                    "name": r.name,
                    "boundaries": r.boundaries,
                    "time_profile": bool(r.windows),
                    "cooldown_s": r.cooldown_s,
                    **states[r.id].as_json(),
                }
                for r in self._rules
            ],
            "odometer": {
                "estimate_m": None
                if self.odometer.estimate_m is None
                else round(self.odometer.estimate_m, 1),
                "source": self.odometer.state.source,
                "triggers": [t.as_json() for t in self.odometer.triggers],
            },
            "counts": dict(self.counts),
            "suppressed": dict(self.evaluator.suppressed),
            "rejected": dict(self.rejected),
        }


def _utc(text: str) -> datetime:
    """A wire timestamp (``format_timestamp``) back to a datetime."""
    return datetime.fromisoformat(text[:-1]).replace(tzinfo=UTC)


async def build(core: Core) -> FeatureParts:
    if not core.config.rules.enabled:
        return FeatureParts(control={"rules": lambda args: {"enabled": False, "rules": []}})
    saved_state = SavedState(core.state, core.events, core.clock)
    saved = await saved_state.load(SET_KEY, decode_set, lambda: (None, None), "no rules until the next set")
    states = await saved_state.load(STATE_KEY, decode_states, lambda: ({}, None), "every rule unevaluated")
    odometer = await saved_state.load(ODOMETER_KEY, decode_odometer, lambda: (OdometerState(), None),
                                      "no odometer estimate until the next anchor")  # fmt: skip
    rules = EdgeRules(core, verify_keys_from_b64(core.config.rules.signing_keys), saved, states, odometer)
    core.sink.on_reading(rules.observe)
    return FeatureParts(
        components=[rules],
        control={"rules": lambda args: rules.view()},
        downlink={"rules": rules.on_mqtt},
        status={"rules": lambda snap: {k: v for k, v in rules.view().items() if k != "rules"}},
        alerts=[saved_state.alerts],
    )
