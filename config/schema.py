"""The configuration schema: every key, its type, its default and what it is for.

The descriptions double as the operator documentation (``fleetgate config schema`` prints them, and
docs/configuration.md is generated from them). Unknown keys are errors. Relative paths are resolved
against the directory of the file that names them, so a shipped file works from any working directory.
Secrets are never inline: the config names a file, and that file must be readable by its owner only.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, Literal, get_args, get_origin

from pydantic import AfterValidator, BaseModel, Field, StrictBool, field_validator, model_validator
from pydantic.fields import FieldInfo

from fleetgate.config.access import KeypadConfig, RulesConfig, SessionsConfig, StartEnableConfig
from fleetgate.config.segway import SegwayConfig
from fleetgate.config.signals import CATALOGUE
from fleetgate.config.types import (
    Baudrate,
    Float,
    Int,
    ResolvedPath,
    SecretFile,
    Section,
    pem_problems,
    resolve_device,
)

DEVICE_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$"


class DeviceConfig(Section):
    id: str = Field(
        "fleetgate-dev",
        pattern=DEVICE_ID_PATTERN,
        description="Device id: unique in the fleet; part of every MQTT topic and every record id. "
        "Letters, digits, '-' and '_', at most 64.",
    )
    role: Literal["vehicle", "depot"] = Field(
        "vehicle", description="Where the gateway sits: on a vehicle, or at a depot serving many scooters."
    )
    secret_file: SecretFile | None = Field(
        None,
        description="File with the device secret (keys PIN hashes at rest). Must be mode 0600 or 0400. "
        "Required once PIN access is enabled.",
    )


class StoreConfig(Section):
    state_dir: ResolvedPath = Field(
        Path("/var/lib/fleetgate"),
        description="Directory for the SQLite database and other state; systemd's StateDirectory= creates it.",
    )
    database: str = Field(
        "fleetgate.db",
        pattern=r"^[A-Za-z0-9._-]+$",
        description="File name of the database inside state_dir.",
    )
    synchronous: Literal["full", "normal"] = Field(
        "full",
        description="SQLite durability. 'full' fsyncs every group commit and survives power loss; 'normal' "
        "survives a crash of the daemon but may lose the last commits on power loss, and then hands out again "
        "seq numbers the broker already has (a consumer drops those records as duplicates: "
        "tests/test_power_cut.py shows it); only for a state directory with its own power backup.",
    )
    max_batch: Int = Field(
        5000, ge=1, le=100_000, description="Most records written in one group commit (one transaction)."
    )
    quota_mb: dict[str, Annotated[Float, Field(gt=0, le=1_048_576)]] = Field(
        default_factory=lambda: {"telemetry": 256.0, "heartbeat": 8.0, "events": 64.0},
        description="Disk quota per stream (MiB). Over it, the stream's oldest telemetry records are evicted "
        "(counted, reported by a `telemetry-evicted` event); events, session and audit records never are, and "
        "a stream they alone keep over quota raises an alert in status and health. Unlisted streams: no quota.",
    )

    @property
    def quota_bytes(self) -> dict[str, int]:
        return {name: int(mb * 1024 * 1024) for name, mb in self.quota_mb.items()}  # bounded: fits int64

    @property
    def db_path(self) -> Path:
        return self.state_dir / self.database


class ControlConfig(Section):
    socket_path: ResolvedPath = Field(
        Path("/run/fleetgate/control.sock"),
        description="Unix socket the technician CLI talks to; systemd's RuntimeDirectory= creates its folder.",
    )
    socket_group: str | None = Field(
        None,
        description="Group given access to the control socket (mode 0660); unset keeps the daemon's own group.",
    )
    max_clients: Int = Field(8, ge=1, le=256, description="Most CLI connections served at once.")


class LogConfig(Section):
    level: Literal["debug", "info", "warning", "error"] = Field(
        "info", description="Least severe level logged."
    )
    format: Literal["logfmt", "json"] = Field(
        "logfmt", description="Line format on stderr (journald stores each line as one entry)."
    )


class SupervisorConfig(Section):
    backoff_initial_s: Float = Field(
        1.0, gt=0, le=60, description="Delay before the first restart of a crashed component (seconds)."
    )
    backoff_max_s: Float = Field(60.0, gt=0, le=3600, description="Longest delay between restarts (seconds).")
    stable_after_s: Float = Field(
        30.0,
        gt=0,
        le=86_400,
        description="A component that ran this long without crashing has its backoff reset.",
    )
    stop_timeout_s: Float = Field(
        4.0, gt=0, le=30, description="Time components get to stop on SIGTERM before they are cancelled."
    )

    @model_validator(mode="after")
    def _max_not_below_initial(self) -> SupervisorConfig:
        if self.backoff_max_s < self.backoff_initial_s:
            raise ValueError("backoff_max_s must not be smaller than backoff_initial_s")
        return self


class HeartbeatConfig(Section):
    interval_s: Float = Field(
        60.0,
        ge=0.001,
        le=86_400,
        description="How often a heartbeat record (uptime, component states, outbox depth) enters the outbox.",
    )


DEFAULT_OBD_SCHEDULE: dict[str, float] = {
    "vehicle_speed": 1.0,
    "rpm": 1.0,
    "engine_load": 2.0,
    "throttle_position": 2.0,
    "coolant_temp": 10.0,
    "fuel_level": 30.0,
    "control_module_voltage": 10.0,
    "bms_pack_soc": 30.0,
    "odometer": 60.0,
}


class ObdConfig(Section):
    enabled: StrictBool = Field(
        False, description="Read the vehicle's OBD-II port through an ELM327 adapter."
    )
    port: Annotated[str, AfterValidator(resolve_device)] = Field(
        "/dev/ttyUSB0",
        min_length=1,
        description="Serial device of the ELM327 adapter (a relative path resolves against this file's folder; "
        "pyserial URLs such as rfc2217://host:port are passed as they are).",
    )
    baudrate: Baudrate | None = Field(
        38400,
        description="Serial speed; unset lets python-obd try the usual ones (slow).",
    )
    protocol: str | None = Field(
        None,
        pattern=r"^[1-9A-C]$",
        description="ELM327 protocol number ('6' = ISO 15765-4 CAN 11-bit 500k); unset detects it (slower).",
    )
    timeout_s: Float = Field(
        1.0, gt=0, le=30, description="How long one query may take before it counts as no answer."
    )
    schedule: dict[str, Annotated[Float, Field(gt=0, le=86_400)]] = Field(
        default_factory=lambda: dict(DEFAULT_OBD_SCHEDULE),
        description="Seconds between samples of each signal, by catalogue name (docs/signals.md). "
        "A signal not listed is not sampled.",
    )
    dtc_interval_s: Float = Field(
        30.0, gt=0, le=86_400, description="Seconds between reads of MIL status and stored DTCs."
    )
    adapter_voltage_interval_s: Float = Field(
        10.0, gt=0, le=86_400, description="Seconds between reads of the adapter's supply voltage (ATRV)."
    )

    @model_validator(mode="after")
    def _schedule_is_sane(self) -> ObdConfig:
        obd_signals = sorted(name for name, s in CATALOGUE.items() if s.source.startswith("OBD"))
        unknown = [name for name in self.schedule if name not in obd_signals]
        if unknown:
            raise ValueError(
                f"schedule names unknown OBD signals: {', '.join(unknown)} (known: {', '.join(obd_signals)})"
            )
        return self


class GpsConfig(Section):
    enabled: StrictBool = Field(False, description="Read position and time from gpsd.")
    host: str = Field("127.0.0.1", min_length=1, description="gpsd host.")
    port: Int = Field(2947, ge=1, le=65535, description="gpsd port.")
    silence_timeout_s: Float = Field(
        10.0,
        gt=0,
        le=600,
        description="A gpsd connection that sends nothing for this long is dropped and reopened; a gpsd that "
        "accepts and stays silent never stalls the daemon.",
    )
    sample_interval_s: Float = Field(
        1.0, gt=0, le=3600, description="Least time between two position readings (trips use every fix)."
    )


class TripsConfig(Section):
    ignition_on_s: Float = Field(
        2.0, ge=0, le=600, description="Running evidence must last this long before a `startup` (seconds)."
    )
    ignition_off_s: Float = Field(
        10.0,
        ge=0,
        le=3600,
        description="Stopped evidence (RPM 0 or no answer, voltage below running_voltage_v) must last this long "
        "before a `shutdown` (seconds); bridges stalls and start-stop systems.",
    )
    running_voltage_v: Float = Field(
        13.2,
        gt=0,
        le=60,
        description="A control-module voltage (PID 42, answered only while the ECU is awake) at or above this "
        "means the alternator or DC-DC converter is charging, i.e. ignition on (EVs report no RPM at a "
        "standstill). The adapter's own voltage (ATRV) is not used: it is the battery, there with the ignition off.",
    )
    moving_speed_kmh: Float = Field(
        3.0,
        gt=0,
        le=100,
        description="At or above this speed the vehicle is moving (average-moving speed, stop count).",
    )
    hard_accel_mps2: Float = Field(
        3.0,
        gt=0,
        le=100,
        description="Speed gain between two samples at or above this (m/s²) counts as hard acceleration.",
    )
    hard_brake_mps2: Float = Field(
        3.5,
        gt=0,
        le=100,
        description="Speed loss between two samples at or above this (m/s²) counts as hard braking.",
    )
    max_sample_gap_s: Float = Field(
        5.0,
        gt=0,
        le=3600,
        description="Speed samples further apart than this are not integrated into distance or acceleration.",
    )
    checkpoint_interval_s: Float = Field(
        60.0,
        gt=0,
        le=86_400,
        description="How often a trip in progress is saved, so it survives a restart (seconds); a power cut "
        "loses at most this much of its statistics. Each save writes ~2 KB to flash.",
    )


class MqttTlsConfig(Section):
    ca_file: ResolvedPath = Field(
        Path("/etc/fleetgate/ca.crt"), description="CA certificate(s) the broker's must chain to."
    )
    cert_file: ResolvedPath = Field(
        Path("/etc/fleetgate/device.crt"),
        description="This device's client certificate (PEM); its CN is the device id.",
    )
    key_file: SecretFile | None = Field(
        None, description="The client certificate's private key (PEM, mode 0600). Required when TLS is on."
    )


class MqttConfig(Section):
    enabled: StrictBool = Field(False, description="Forward the outbox to an MQTT broker.")
    host: str = Field("localhost", min_length=1, description="Broker host name or address.")
    port: Int = Field(8883, ge=1, le=65535, description="Broker port (8883: MQTT over TLS).")
    tls: StrictBool = Field(
        True,
        description="TLS with a client certificate. Plain TCP (false) is for development on loopback only.",
    )
    tls_files: MqttTlsConfig = MqttTlsConfig()
    topic_root: str = Field(
        "fleetgate/v1",
        pattern=r"^[A-Za-z0-9_-]+(/[A-Za-z0-9_-]+)*$",
        description="Versioned prefix of every topic; the device id follows it (docs/mqtt.md).",
    )
    keepalive_s: Int = Field(
        30, ge=5, le=600, description="MQTT keepalive: a dead link is noticed within about 1.5 times this."
    )
    connect_timeout_s: Float = Field(10.0, gt=0, le=120, description="How long connecting may take.")
    publish_timeout_s: Float = Field(
        30.0,
        gt=0,
        le=600,
        description="A message not acknowledged (PUBACK) within this is treated as a dead link.",
    )
    max_inflight: Int = Field(
        16, ge=1, le=1000, description="Messages published and not yet acknowledged, at most (QoS 1)."
    )
    max_message_bytes: Int = Field(
        128 * 1024,
        ge=1024,
        le=16 * 1024 * 1024,
        description="Largest message payload before compression (bytes).",
    )
    compress_min_bytes: Int = Field(
        512,
        ge=0,
        le=16 * 1024 * 1024,
        description="Messages at least this big are zlib-compressed (declared in the message).",
    )
    live_share: Float = Field(
        0.25,
        ge=0,
        le=1,
        description="Share of messages that carry the newest telemetry while a backlog drains, so live data "
        "overtakes the backlog. 0 (no live lane) or at least 0.001 (one message in 1000).",
    )
    health_interval_s: Float = Field(
        300.0,
        ge=5,
        le=3600,
        description="The retained health message is published after each connect, within 5 s when a "
        "component changes state or wall-time trust changes, and otherwise this often (~500 bytes each time "
        "on a metered link; the Last Will says offline whatever this is).",
    )
    live_batch_s: Float = Field(
        9.0,
        ge=0,
        le=60,
        description="Live telemetry goes out at most this long after the sink hands it over (it gathers "
        "readings for 1 s), the readings of that time in one message: longer means fewer, larger messages, "
        "fewer bytes on a metered link (tools/bench/footprint.py); 0 sends each second's at once.",
    )
    live_encoding: Literal["compact", "json"] = Field(
        "compact",
        description="Live telemetry messages: 'compact' (envelope version 2: numbers as deltas from one base, "
        "zlib with a preset dictionary; ~4x fewer bytes) or 'json' (version 1, as the backlog), for consumers "
        "that do not read version 2 yet (docs/mqtt.md).",
    )
    memory_window_s: Float = Field(
        12.0,
        ge=0,
        le=300,
        description="Live telemetry stays in memory, never written to flash, until the broker acknowledges "
        "it or it is this old (then it is stored and drained as backlog). A power cut or kill -9 loses at most "
        "this long of readings the broker had not acknowledged. 0: every reading is stored first.",
    )
    offline_window_s: Float = Field(
        60.0,
        ge=0,
        le=600,
        description="While the uplink is not connected, live telemetry is written to flash this often instead "
        "(with pack_offline: sealed, in one page-aligned write to the spool beside the database, the trip "
        "checkpoint with it): fewer, larger writes; a longer window costs less flash per reading "
        "(tools/bench/footprint.py). A power cut or kill -9 while offline loses at most this "
        "long of readings; online the bound stays memory_window_s. 0 or less than memory_window_s: "
        "memory_window_s.",
    )
    pack_offline: StrictBool = Field(
        True,
        description="While the broker is unreachable, seal the telemetry backlog into ready-made compressed "
        "messages (a message's worth at a time), so it drains at link speed when coverage returns and takes "
        "less disk under its quota.",
    )

    @field_validator("live_share")
    @classmethod
    def _live_share_zero_or_usable(cls, share: float) -> float:
        # the drain sends a live message every round(1 / share): a share near 0 would overflow it
        if 0 < share < 0.001:
            raise ValueError("must be 0 (no live lane) or at least 0.001")
        return share

    @model_validator(mode="after")
    def _window_covers_the_batch(self) -> MqttConfig:
        if self.memory_window_s and self.memory_window_s < self.live_batch_s + 1:
            raise ValueError(
                "memory_window_s must be at least live_batch_s + 1 s (else live readings are stored before "
                "they are sent), or 0"
            )
        return self

    @model_validator(mode="after")
    def _tls_needs_a_key(self) -> MqttConfig:
        if self.enabled and self.tls and self.tls_files.key_file is None:
            raise ValueError(
                "tls_files.key_file is required when TLS is on (or set tls = false for development)"
            )
        if self.enabled and self.tls:
            tls = self.tls_files
            problems = pem_problems("tls_files.ca_file", tls.ca_file, "CERTIFICATE")
            problems += pem_problems("tls_files.cert_file", tls.cert_file, "CERTIFICATE")
            problems += pem_problems("tls_files.key_file", tls.key_file, "PRIVATE KEY")
            if problems:
                raise ValueError("; ".join(problems))
        return self


class TimeConfig(Section):
    trust_ntp: StrictBool = Field(
        True, description="Trust the system clock once the kernel reports NTP synchronisation."
    )
    trust_gps: StrictBool = Field(
        True, description="Trust GPS time after gps_confirmations consistent fixes."
    )
    gps_confirmations: Int = Field(
        3, ge=1, le=100, description="Consistent GPS fixes needed before GPS time is trusted."
    )
    gps_max_spread_s: Float = Field(
        1.0,
        gt=0,
        le=60,
        description="Most the GPS-minus-monotonic offsets of those fixes may differ (seconds).",
    )


class Config(Section):
    """The whole configuration file."""

    device: DeviceConfig = DeviceConfig()
    store: StoreConfig = StoreConfig()
    control: ControlConfig = ControlConfig()
    log: LogConfig = LogConfig()
    supervisor: SupervisorConfig = SupervisorConfig()
    heartbeat: HeartbeatConfig = HeartbeatConfig()
    obd: ObdConfig = ObdConfig()
    gps: GpsConfig = GpsConfig()
    trips: TripsConfig = TripsConfig()
    time: TimeConfig = TimeConfig()
    mqtt: MqttConfig = MqttConfig()
    sessions: SessionsConfig = SessionsConfig()
    rules: RulesConfig = RulesConfig()
    keypad: KeypadConfig = KeypadConfig()
    start_enable: StartEnableConfig = StartEnableConfig()
    segway: SegwayConfig = SegwayConfig()

    @model_validator(mode="after")
    def _pin_access_complete(self) -> Config:
        if self.sessions.enabled and self.device.secret_file is None:
            raise ValueError("sessions.enabled needs device.secret_file (the key of the PIN hashes at rest)")
        if self.sessions.signing_keys and self.sessions.enabled and not self.mqtt.enabled:
            raise ValueError("sessions.signing_keys is for the MQTT downlink, but mqtt.enabled is false")
        if self.rules.enabled and not self.mqtt.enabled:
            raise ValueError("rules.enabled needs mqtt.enabled: rule sets arrive on the MQTT downlink")
        if self.segway.enabled and self.device.role != "depot":
            raise ValueError('segway.enabled is for a depot gateway: set device.role = "depot"')
        if self.segway.enabled and self.device.secret_file is None:
            raise ValueError(
                "segway.enabled needs device.secret_file (the key of the Bluetooth keys at rest)"
            )
        if self.segway.commands.signing_keys and self.segway.enabled and not self.mqtt.enabled:
            raise ValueError(
                "segway.commands.signing_keys is for the MQTT downlink, but mqtt.enabled is false"
            )
        return self


def _bounds(metadata: Iterable[object]) -> str:
    """' (> 0, ≤ 86400)' from a field's constraints, '' without any."""
    shown: list[str] = []
    for item in metadata:
        if isinstance(item, FieldInfo):
            inner = _bounds(item.metadata)
            shown += [inner[2:-1]] if inner else []
        for attr, sign in (("gt", ">"), ("ge", "≥"), ("lt", "<"), ("le", "≤")):
            if (bound := getattr(item, attr, None)) is not None:  # annotated_types.Gt and its kin
                shown.append(f"{sign} {bound}")
    return f" ({', '.join(shown)})" if shown else ""


def _type_name(annotation: object) -> str:
    """A reader's name for a field type: 'path or unset', "one of 'full', 'normal'", 'float (> 0)' ..."""
    args = get_args(annotation)
    if get_origin(annotation) is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if get_origin(annotation) is Annotated:
        return _type_name(args[0]) + _bounds(args[1:])
    if args and type(None) in args:
        return " or ".join(_type_name(a) for a in args if a is not type(None)) + " or unset"
    if annotation is Path:
        return "path"
    if get_origin(annotation) is dict:
        return f"table of {_type_name(args[1])}"
    return getattr(annotation, "__name__", str(annotation))


def describe(model: type[BaseModel] = Config, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """Every key as (dotted path, type, default, description), in schema order."""
    rows: list[tuple[str, str, str, str]] = []
    for name, field in model.model_fields.items():
        path = f"{prefix}{name}"
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            rows.extend(describe(annotation, f"{path}."))
            continue
        value = field.get_default(call_default_factory=True)
        if isinstance(value, dict):  # as TOML writes it
            default = "{ " + ", ".join(f"{k} = {v}" for k, v in value.items()) + " }"
        else:
            default = "" if value is None else str(value)
        rows.append(
            (path, _type_name(annotation) + _bounds(field.metadata), default, field.description or "")
        )
    return rows


def schema_markdown() -> str:
    """The configuration reference, as docs/configuration.md holds it."""
    lines = [
        "# Configuration reference",
        "",
        "Generated from `config/schema.py` by `fleetgate config schema`; a test keeps this file current.",
        "Relative paths resolve against the folder of the file that names them. Unknown keys are errors.",
        "Numbers must lie in the range shown with their type; inf, nan and true/false are refused.",
        "",
    ]
    section = None
    for key, type_name, default, description in describe():
        head = key.split(".")[0]
        if head != section:
            section = head
            lines += [
                "",
                f"## [{section}]",
                "",
                "| key | type | default | description |",
                "|---|---|---|---|",
            ]
        shown = f"`{default}`" if default else ""
        lines.append(f"| `{key}` | {type_name} | {shown} | {description} |")
    return "\n".join(lines).replace("\n\n\n", "\n\n") + "\n"
