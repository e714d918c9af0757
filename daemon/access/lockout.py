"""Lockout against PIN guessing: after ``max_failures`` wrong PINs in a row, no PIN is checked for a while,
and every further lockout lasts twice as long as the one before (up to ``max_delay_s``). A correct PIN
resets it.

The state survives restarts (the caller persists ``as_state()`` before it tells anyone the PIN was wrong,
so pulling the power after a wrong guess does not undo the count). A lockout's remaining time is kept on
the boot's monotonic clock; after a reboot that clock starts again, so a lockout that was running is
restarted for its full length: a restart can lengthen a lockout, never shorten it. A saved state that cannot
be decoded is not read as "no failures": ``restore`` refuses it and the caller starts ``undecodable``, a
lockout of full length from now (fail closed).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class LockoutPolicy:
    max_failures: int = 5
    base_delay_s: float = 30.0
    max_delay_s: float = 3600.0


@dataclass
class Lockout:
    policy: LockoutPolicy
    boot_id: str
    failures: int = 0  # wrong PINs since the last correct one (or since the last lockout began)
    lockouts: int = 0  # lockouts since the last correct PIN: each doubles the delay
    locked_until_mono_ns: int | None = None
    refused_while_locked: int = 0

    def remaining_s(self, now_mono_ns: int) -> float:
        if self.locked_until_mono_ns is None:
            return 0.0
        return max(0.0, (self.locked_until_mono_ns - now_mono_ns) / 1e9)

    def locked(self, now_mono_ns: int) -> bool:
        return self.remaining_s(now_mono_ns) > 0

    def delay_s(self, lockouts: int) -> float:
        # The exponent is capped: 2.0 ** 1024 overflows, and any policy's max_delay_s is reached far sooner.
        doublings = min(max(0, lockouts - 1), 64)
        return min(self.policy.max_delay_s, self.policy.base_delay_s * 2.0**doublings)

    def failed(self, now_mono_ns: int) -> float:
        """Count a wrong PIN; returns the lockout it starts in seconds (0 if none)."""
        self.failures += 1
        if self.failures < self.policy.max_failures:
            return 0.0
        self.failures = 0
        self.lockouts += 1
        delay = self.delay_s(self.lockouts)
        self.locked_until_mono_ns = now_mono_ns + int(delay * 1e9)
        return delay

    def succeeded(self) -> None:
        self.failures = 0
        self.lockouts = 0
        self.locked_until_mono_ns = None

    def as_state(self) -> dict[str, Any]:
        return {
            "failures": self.failures,
            "lockouts": self.lockouts,
            "boot_id": self.boot_id,
            "locked_until_mono_ns": self.locked_until_mono_ns,
        }

    @classmethod
    def restore(cls, policy: LockoutPolicy, boot_id: str, saved: Any, now_mono_ns: int) -> Lockout:
        """The lockout as saved (None: never saved, no failures); a lockout from another boot (or one longer
        than it can be) restarts for its full length from now. ValueError naming what is wrong if ``saved``
        is not what ``as_state`` wrote."""
        lockout = cls(policy, boot_id)
        if saved is None:
            return lockout
        if not isinstance(saved, dict):
            raise ValueError(f"lockout is {type(saved).__name__}, not an object")
        names = {"failures", "lockouts", "boot_id", "locked_until_mono_ns"}
        if saved.keys() != names:
            raise ValueError(f"lockout keys are {sorted(map(str, saved))}, not {sorted(names)}")
        lockout.failures = _count(saved, "failures")
        lockout.lockouts = _count(saved, "lockouts")
        if not isinstance(saved["boot_id"], str):
            raise ValueError("lockout boot_id is not a string")
        until = saved["locked_until_mono_ns"]
        if until is not None and (not isinstance(until, int) or isinstance(until, bool)):
            raise ValueError("lockout locked_until_mono_ns is neither null nor an integer")
        if until is not None and until > 0:
            full = int(lockout.delay_s(max(1, lockout.lockouts)) * 1e9)
            same_boot = saved["boot_id"] == boot_id
            if not same_boot or until - now_mono_ns > full:
                until = now_mono_ns + full
            lockout.locked_until_mono_ns = until
        return lockout

    @classmethod
    def undecodable(cls, policy: LockoutPolicy, boot_id: str, now_mono_ns: int) -> Lockout:
        """What a saved lockout that cannot be decoded means: locked out, for a first lockout's full length
        from now (the count it held is unknown, so it is not read as zero failures and open)."""
        lockout = cls(policy, boot_id, lockouts=1)
        lockout.locked_until_mono_ns = now_mono_ns + int(lockout.delay_s(1) * 1e9)
        return lockout

    def snapshot(self, now_mono_ns: int) -> dict[str, Any]:
        return {
            "locked": self.locked(now_mono_ns),
            "remaining_s": round(self.remaining_s(now_mono_ns), 1),
            "failures": self.failures,
            "lockouts": self.lockouts,
            "max_failures": self.policy.max_failures,
            "next_delay_s": self.delay_s(self.lockouts + 1),
            "refused_while_locked": self.refused_while_locked,
        }


def _count(saved: dict[str, Any], name: str) -> int:
    value = saved[name]
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"lockout {name} is not a count (an integer >= 0)")
    return value
