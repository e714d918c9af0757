"""Configuration of the managed-session PIN path: sessions and their sync, the keypad, the start-enable output."""

from __future__ import annotations

import base64
import binascii
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AfterValidator, Field, HttpUrl, StrictBool, model_validator

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

VIN_PATTERN = r"^[A-HJ-NPR-Z0-9]{11,17}$"  # 17 for road vehicles; REEF's examples include shorter ones

SerialPort = Annotated[str, AfterValidator(resolve_device)]


def _ed25519_public_key(value: str) -> str:
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("not base64") from None
    if len(raw) != 32:
        raise ValueError(f"an Ed25519 public key is 32 bytes; this one is {len(raw)}")
    return value


def _hex_bytes(value: str) -> str:
    try:
        bytes.fromhex(value)
    except ValueError:
        raise ValueError(f"{value!r} is not hex bytes (e.g. 'A0 01 01 A2')") from None
    return value


HexBytes = Annotated[str, AfterValidator(_hex_bytes)]
PublicKey = Annotated[str, AfterValidator(_ed25519_public_key)]


class LockoutConfig(Section):
    max_failures: Int = Field(5, ge=1, le=100, description="Wrong PINs in a row that start a lockout.")
    base_delay_s: Float = Field(
        30.0, gt=0, le=86_400, description="The first lockout's length; each next one doubles."
    )
    max_delay_s: Float = Field(3600.0, gt=0, le=7 * 86_400, description="Longest lockout.")


class ReefConfig(Section):
    enabled: StrictBool = Field(
        False, description="Pull this vehicle's sessions from the REEF API (HTTPS, mTLS)."
    )
    base_url: HttpUrl = Field(
        HttpUrl("https://reef.api.arcimoto.com/v1"), description="REEF base URL (https only), up to /v1."
    )
    ca_file: ResolvedPath = Field(
        Path("/etc/fleetgate/reef-ca.crt"),
        description="CA certificate(s) REEF's server certificate must chain to.",
    )
    cert_file: ResolvedPath = Field(
        Path("/etc/fleetgate/device.crt"), description="This device's client certificate for REEF (PEM)."
    )
    key_file: SecretFile | None = Field(
        None, description="The client certificate's private key (PEM, mode 0600). Required when enabled."
    )
    poll_interval_s: Float = Field(
        300.0,
        ge=10,
        le=86_400,
        description="Pull when no channel has synchronized for this long (also at start and on every MQTT "
        "reconnect).",
    )
    retry_s: Float = Field(
        60.0, ge=1, le=86_400, description="After a failed pull, try again this much later."
    )
    timeout_s: Float = Field(10.0, gt=0, le=120, description="How long one request may take.")

    @model_validator(mode="after")
    def _https_with_key(self) -> ReefConfig:
        if self.base_url.scheme != "https":
            raise ValueError("base_url must be https:// (REEF authenticates with mTLS)")
        if self.enabled and self.key_file is None:
            raise ValueError("key_file is required when the REEF pull is enabled")
        if self.enabled:
            problems = pem_problems("ca_file", self.ca_file, "CERTIFICATE")
            problems += pem_problems("cert_file", self.cert_file, "CERTIFICATE")
            problems += pem_problems("key_file", self.key_file, "PRIVATE KEY")
            if problems:
                raise ValueError("; ".join(problems))
        return self


class SessionsConfig(Section):
    enabled: StrictBool = Field(
        False,
        description="Managed sessions: a synchronized PIN turns start-enable on (needs device.secret_file).",
    )
    vin: str | None = Field(
        None, pattern=VIN_PATTERN, description="This vehicle's VIN, as the cloud keys its sessions."
    )
    signing_keys: list[PublicKey] = Field(
        default_factory=list,
        description="Ed25519 public keys (base64) the session downlink must be signed with; more than one "
        "during a key rotation.",
    )
    max_offline_age_s: Float = Field(
        72 * 3600.0,
        gt=0,
        le=366 * 86_400,
        description="A session set not confirmed by the cloud for longer than this opens nothing (running "
        "time when wall time is untrusted; see docs/security.md).",
    )
    end_while_moving: Literal["defer", "immediate"] = Field(
        "defer",
        description="When a session ends while the vehicle moves: switch start-enable off once it stops "
        "(defer) or at once.",
    )
    moving_above_kmh: Float = Field(
        3.0, ge=0, le=100, description="Speed above which the vehicle counts as moving."
    )
    lockout: LockoutConfig = LockoutConfig()
    reef: ReefConfig = ReefConfig()

    @model_validator(mode="after")
    def _complete(self) -> SessionsConfig:
        if self.enabled and self.vin is None:
            raise ValueError("vin is required when sessions are enabled")
        if self.enabled and not self.signing_keys and not self.reef.enabled:
            raise ValueError("sessions need a channel: signing_keys for the MQTT downlink, or reef.enabled")
        return self


class KeypadConfig(Section):
    enabled: StrictBool = Field(False, description="Read PINs from a serial keypad.")
    port: SerialPort = Field("/dev/ttyUSB1", description="Serial device (or a pyserial URL).")
    baudrate: Baudrate = Field(9600, description="Serial speed.")
    protocol: Literal["keys", "line"] = Field(
        "keys",
        description="'keys': one ASCII character per key, 0-9, '*' clears, '#' enters. 'line': digits ended by "
        "CR or LF.",
    )
    inter_key_timeout_s: Float = Field(
        5.0, gt=0, le=120, description="A partial entry with no key for this long is discarded."
    )
    max_digits: Int = Field(12, ge=4, le=32, description="Longer entries are refused.")
    feedback_accepted: HexBytes = Field("47 0A", description="Bytes sent to the keypad for an accepted PIN.")
    feedback_refused: HexBytes = Field("52 0A", description="Bytes sent for a refused PIN.")
    feedback_locked_out: HexBytes = Field("4C 0A", description="Bytes sent while PIN entry is locked out.")


class StartEnableConfig(Section):
    kind: Literal["log", "serial-relay", "gpio"] = Field(
        "log",
        description="The start-enable output: a serial relay board, a GPIO line, or log-only for development.",
    )
    port: SerialPort = Field("/dev/ttyUSB2", description="serial-relay: serial device (or a pyserial URL).")
    baudrate: Baudrate = Field(9600, description="serial-relay: serial speed.")
    on_command: HexBytes = Field(
        "A0 01 01 A2",
        description="serial-relay: bytes that close the relay (default: LCUS-1 board, relay 1).",
    )
    off_command: HexBytes = Field("A0 01 00 A1", description="serial-relay: bytes that open the relay.")
    gpio_chip: ResolvedPath = Field(Path("/dev/gpiochip0"), description="gpio: the GPIO character device.")
    gpio_line: Int = Field(17, ge=0, le=65_535, description="gpio: line offset on the chip.")
    active_low: StrictBool = Field(False, description="gpio: the line is low when start is enabled.")


class RulesConfig(Section):
    enabled: StrictBool = Field(
        False,
        description="Edge rules (docs/mqtt.md, down/rules): geofences and signal thresholds evaluated on every "
        "reading, offline too; crossings are rule-enter / rule-leave events.",
    )
    signing_keys: list[PublicKey] = Field(
        default_factory=list,
        description="Ed25519 public keys (base64) rule sets must be signed with; more than one during a key "
        "rotation.",
    )

    @model_validator(mode="after")
    def _signed(self) -> RulesConfig:
        if self.enabled and not self.signing_keys:
            raise ValueError("rules need signing_keys: rule sets arrive signed on the MQTT downlink")
        return self
