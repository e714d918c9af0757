"""Configuration of the depot role: the Segway fleet cloud (OAuth2 client, polling, pushes, commands) and the
yard of scooters it serves (../shared/seeds/segway-emoped-api.md)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, HttpUrl, StrictBool, model_validator

from fleetgate.config.access import PublicKey
from fleetgate.config.types import Float, Int, ResolvedPath, SecretFile, Section, pem_problems

PLATFORM_CODE_PATTERN = r"^[AEUC][A-Za-z0-9]{1,31}$"  # the first letter picks Segway's region
IOT_CODE_PATTERN = r"^[0-9A-Za-z]{6,32}$"  # the IoT module's IMEI (15 digits; the seed's examples vary)
BLE_ADDRESS_PATTERN = r"^[0-9A-Fa-f]{2}(:[0-9A-Fa-f]{2}){5}$"
BLE_PROFILES = ("fleetgate",)  # drivers/ble: the lock protocols this build has (docs/ble-profile.md)


class ScooterConfig(Section):
    iot_code: str = Field(pattern=IOT_CODE_PATTERN, description="Segway's iotCode: the IoT module's IMEI.")
    vin: str | None = Field(None, max_length=32, description="The scooter's VIN or frame number, if known.")
    sn: str | None = Field(None, max_length=64, description="The scooter's serial number, if known.")
    model: str | None = Field(None, max_length=32, description="Model, e.g. 'E-moped C80' (informational).")
    ble_address: str | None = Field(
        None,
        pattern=BLE_ADDRESS_PATTERN,
        description="The scooter's Bluetooth address (AA:BB:CC:DD:EE:FF); unset: recognised by what it "
        "advertises, if its profile says (docs/ble-profile.md).",
    )


class SegwayPollConfig(Section):
    status_s: Float = Field(
        60.0, ge=5, le=86_400, description="Ask each scooter's status (and extra-status) this often."
    )
    location_s: Float = Field(300.0, ge=5, le=86_400, description="Ask each scooter's location this often.")
    battery_s: Float = Field(
        600.0, ge=5, le=86_400, description="Ask each scooter's battery info this often."
    )
    key_s: Float = Field(
        6 * 3600.0,
        ge=60,
        le=30 * 86_400,
        description="Fetch each scooter's Bluetooth key this often (kept sealed at rest for the BLE unlock).",
    )
    backoff_max_s: Float = Field(
        900.0,
        ge=1,
        le=86_400,
        description="A scooter whose queries fail is asked less often, doubling up to this (per scooter).",
    )


class SegwayPushConfig(Section):
    enabled: StrictBool = Field(
        False, description="Listen for Segway's pushes (alerts, faults, location, status)."
    )
    bind: str = Field(
        "127.0.0.1",
        min_length=1,
        description="Address to listen on: the interface Segway (or a reverse proxy in front) reaches.",
    )
    port: Int = Field(8443, ge=0, le=65535, description="HTTPS port of the push receiver (0: any free one).")
    cert_file: ResolvedPath = Field(
        Path("/etc/fleetgate/push.crt"),
        description="The receiver's server certificate chain (PEM), the name Segway is configured to call.",
    )
    key_file: SecretFile | None = Field(
        None, description="The server certificate's private key (PEM, mode 0600). Required when enabled."
    )

    @model_validator(mode="after")
    def _key_when_enabled(self) -> SegwayPushConfig:
        if self.enabled and self.key_file is None:
            raise ValueError("key_file is required when the push receiver is enabled")
        if self.enabled:
            problems = pem_problems("cert_file", self.cert_file, "CERTIFICATE")
            problems += pem_problems("key_file", self.key_file, "PRIVATE KEY")
            if problems:
                raise ValueError("; ".join(problems))
        return self


class SegwayCommandsConfig(Section):
    signing_keys: list[PublicKey] = Field(
        default_factory=list,
        description="Ed25519 public keys (base64) scooter commands on the MQTT downlink must be signed with; "
        "none: the downlink takes no commands.",
    )
    max_attempts: Int = Field(
        3,
        ge=1,
        le=20,
        description="Tries of a command Segway answers with a retryable code (device offline...).",
    )
    retry_s: Float = Field(5.0, gt=0, le=3600, description="Wait before the second try; doubles after each.")
    defer_s: Float = Field(
        900.0,
        ge=0,
        le=7 * 86_400,
        description="A command no channel can run now (BLE out of range, the cloud or the scooter offline) "
        "waits in the persistent queue this long, unless it carries its own expiry; 0: never queued.",
    )
    secure_defer_s: Float = Field(
        86_400.0,
        ge=0,
        le=30 * 86_400,
        description="The same for commands that make a scooter safe (lock, end-rental): 'lock as soon as "
        "possible'. They are retried until done or this old.",
    )
    pending_retry_s: Float = Field(
        60.0,
        ge=1,
        le=3600,
        description="Queued commands are tried again this often (and at once over BLE "
        "when their scooter comes into range).",
    )
    rotate_key_after_rental: StrictBool = Field(
        True,
        description="After a rental ends, set a new random Bluetooth key through the cloud and read it back, "
        "so a past renter's copy stops working.",
    )


class SegwayBleConfig(Section):
    enabled: StrictBool = Field(
        False, description="Run commands over Bluetooth LE when a scooter is in range and its key is cached."
    )
    adapter: str = Field("hci0", pattern=r"^hci[0-9]{1,2}$", description="The BlueZ adapter to use.")
    profile: str = Field(
        "fleetgate",
        description="The scooters' lock protocol (one of: " + ", ".join(BLE_PROFILES) + "; a vendor's "
        "routine is another profile, docs/ble-profile.md).",
    )
    max_connections: Int = Field(
        2, ge=1, le=8, description="Most scooters connected at once (controllers manage a handful)."
    )
    scan_s: Float = Field(4.0, gt=0, le=60, description="Length of one scan window.")
    scan_every_s: Float = Field(
        10.0, gt=0, le=600, description="A scan window starts this often (equal to scan_s: scan always)."
    )
    range_timeout_s: Float = Field(
        30.0, gt=0, le=3600, description="A scooter not heard for this long is out of range."
    )
    min_rssi: Int = Field(
        -95, ge=-127, le=0, description="Weaker than this (dBm), a scooter counts as out of range."
    )
    connect_timeout_s: Float = Field(
        10.0, gt=0, le=60, description="How long one connection attempt may take."
    )
    connect_attempts: Int = Field(3, ge=1, le=10, description="Connection attempts per command.")
    command_timeout_s: Float = Field(5.0, gt=0, le=60, description="How long each answer may take.")
    idle_disconnect_s: Float = Field(
        20.0, gt=0, le=600, description="A connection with nothing to do is closed after this long."
    )

    @model_validator(mode="after")
    def _known_profile(self) -> SegwayBleConfig:
        if self.profile not in BLE_PROFILES:
            raise ValueError(f"profile {self.profile!r} is not one of {', '.join(BLE_PROFILES)}")
        if self.scan_every_s < self.scan_s:
            raise ValueError("scan_every_s must be at least scan_s")
        return self


class SegwayConfig(Section):
    enabled: StrictBool = Field(
        False, description="Serve a yard of Segway scooters through the Segway fleet cloud."
    )
    platform_code: str = Field(
        "A00000",
        pattern=PLATFORM_CODE_PATTERN,
        description="Segway platform code (the OAuth2 client_id); its first letter picks the region's domain.",
    )
    client_secret_file: SecretFile | None = Field(
        None,
        description="File holding the OAuth2 client_secret (also the push signature key); mode 0600. "
        "Required when enabled.",
    )
    api_base: HttpUrl | None = Field(
        None, description="Base URL instead of the region's (tests, private deployments). https only."
    )
    ca_file: ResolvedPath | None = Field(
        None, description="CA certificate(s) for the API's server certificate; unset: the system's."
    )
    timeout_s: Float = Field(10.0, gt=0, le=120, description="How long one API request may take.")
    max_requests_per_s: Float = Field(
        5.0, gt=0, le=100, description="Most API requests per second, all scooters together."
    )
    max_concurrent: Int = Field(4, ge=1, le=32, description="Most API requests in flight at once.")
    poll: SegwayPollConfig = SegwayPollConfig()
    push: SegwayPushConfig = SegwayPushConfig()
    commands: SegwayCommandsConfig = SegwayCommandsConfig()
    ble: SegwayBleConfig = SegwayBleConfig()
    scooters: list[ScooterConfig] = Field(
        default_factory=list,
        description="The yard: [[segway.scooters]] tables with iot_code (and vin, sn, model). Scooters that "
        "push to this gateway are added as they are seen.",
    )

    @model_validator(mode="after")
    def _complete(self) -> SegwayConfig:
        if self.enabled and self.client_secret_file is None:
            raise ValueError("client_secret_file is required when segway is enabled")
        if self.api_base is not None and self.api_base.scheme != "https":
            raise ValueError("api_base must be https:// (the client secret and tokens travel on it)")
        codes = [s.iot_code for s in self.scooters]
        if len(codes) != len(set(codes)):
            raise ValueError("scooters: an iot_code appears more than once")
        addresses = [s.ble_address.upper() for s in self.scooters if s.ble_address]
        if len(addresses) != len(set(addresses)):
            raise ValueError("scooters: a ble_address appears more than once")
        return self
