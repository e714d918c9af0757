"""The contract between the runtime and a feature: a feature's ``build`` gets the core and returns its parts.

A feature never registers anything itself and never reaches into another feature: what it needs of the
others (the reading sink, events, the uplink's connect signal) comes through the core it is handed.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from fleetgate.daemon.runtime.control import Handler
from fleetgate.daemon.runtime.supervisor import Component

if TYPE_CHECKING:
    from fleetgate.daemon.runtime.core import Core

# An MQTT downlink message's payload, handed to the feature that owns its topic (``down/<name>``).
Downlink = Callable[[bytes], Awaitable[None]]
# A section of ``fleetgate status``: given the snapshot as built so far, the section's value.
StatusView = Callable[[dict[str, Any]], Any]
# Lines for status's "alerts" (also in the health message): what an operator must look at, now.
AlertSource = Callable[[], list[str]]


@dataclass
class FeatureParts:
    """What a feature hands the runtime to supervise, answer and route."""

    components: list[Component] = field(default_factory=list)
    control: dict[str, Handler] = field(default_factory=dict)  # control-socket verbs
    downlink: dict[str, Downlink] = field(default_factory=dict)  # by topic name under down/
    status: dict[str, StatusView] = field(default_factory=dict)  # by section path, e.g. "outbox.packer"
    alerts: list[AlertSource] = field(default_factory=list)


class FeatureError(Exception):
    """A feature cannot start with this configuration or device (a secret unreadable, a file missing)."""


Build = Callable[["Core"], Awaitable[FeatureParts]]
