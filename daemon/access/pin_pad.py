"""Supervised component: PINs from the keypad to the access decision, and its outcome back as feedback.

An unplugged keypad ends the loop with ``KeypadError``; the supervisor reopens it with backoff.
"""

from __future__ import annotations

from typing import Any

from fleetgate.daemon.access.controller import AccessController
from fleetgate.drivers.keypad import BadInput, EntryAbandoned, Keypad, KeypadError, PinEntered


class PinPad:
    name = "keypad"
    expected_errors = (KeypadError,)

    def __init__(self, keypad: Keypad, access: AccessController) -> None:
        self._keypad = keypad
        self._access = access
        self.counts = {"entries": 0, "abandoned": 0, "bad_input": 0}

    async def run(self) -> None:
        async with self._keypad:
            async for event in self._keypad.entries():
                if isinstance(event, PinEntered):
                    self.counts["entries"] += 1
                    decision = await self._access.enter(event.digits, source="keypad")
                    await self._keypad.feedback(decision.outcome)  # type: ignore[arg-type]
                elif isinstance(event, EntryAbandoned):
                    self.counts["abandoned"] += 1
                elif isinstance(event, BadInput):
                    self.counts["bad_input"] += 1

    def snapshot(self) -> dict[str, Any]:
        return {"port": self._keypad.describe(), **self.counts}
