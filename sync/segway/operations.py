"""Every query, control and setting of the Segway API (the seed's sections) as typed data.

Each ``Operation`` names its path and method as the seed writes them, the pydantic model of its parameters
beyond ``iotCode`` and the model of the answer's ``data``. Request models are strict (no ``True`` for ``1``,
no ``"1"`` for ``1``, no unknown fields) and carry the seed's ranges and allowed values, so a bad value is
refused here, naming the field, before anything is sent: Segway would answer 15004 after a round trip, or
worse, pass a value on to a vehicle. Answer models are strict about the types of the fields they know, but
ignore fields they do not (Segway adds fields) and accept what the seed itself writes two ways: the status
example's ``remainderRange`` for the table's ``remainingRange``, and ``gpsUtcTime`` as a numeric string.
Field names are the seed's camelCase JSON names, including its spelling ``temperatrue``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import AliasChoices, BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

Kind = Literal["query", "control", "setting"]


def _exact_int(value: Any) -> Any:
    """``Literal[1]`` alone takes ``True`` and ``1.0`` (they compare equal to 1): refuse all but an int."""
    if type(value) is not int:
        raise ValueError(f"expected an integer, got {_type_name(value)}")
    return value


def _seconds(value: Any) -> Any:
    """A UTC timestamp in seconds: a number, or the numeric string the seed's location example shows."""
    if isinstance(value, str) and value.isascii() and value.isdigit() and len(value) <= 12:
        return int(value)
    return value


def _type_name(value: Any) -> str:
    return {bool: "a boolean", float: "a number with a fraction", str: "a string"}.get(
        type(value), type(value).__name__
    )


# Enumerations of the seed ("0→ no setting 1→off 2→on" ...), ints only.
Switch = Annotated[Literal[0, 1, 2], BeforeValidator(_exact_int)]
Switch3 = Annotated[Literal[0, 1, 2, 3], BeforeValidator(_exact_int)]
OneToThree = Annotated[Literal[1, 2, 3], BeforeValidator(_exact_int)]
Interval = Annotated[int, Field(strict=True, ge=10, le=65535)]
SpeedLimit = Annotated[int, Field(strict=True, ge=6, le=42)]
BLE_KEY_PATTERN = r"^[A-Za-z0-9]{8}$"  # pydantic's (Rust) regex: $ is the very end, no trailing newline
BleKey = Annotated[str, Field(strict=True, pattern=BLE_KEY_PATTERN)]
UtcSeconds = Annotated[int, BeforeValidator(_seconds)]


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class _Answer(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True, frozen=True)


# -- requests ------------------------------------------------------------------------------------------------


class LocationRequest(_Request):
    realTimeLocation: bool | None = None  # true: ask the vehicle now rather than the last report


class ThrottleResponseRequest(_Request):
    controlType: Annotated[Literal[0, 1], BeforeValidator(_exact_int)]  # 0 off, 1 on


class SoundRequest(_Request):
    controlType: OneToThree  # sound1, sound2 (toot), sound3


class RentalSettingRequest(_Request):
    saddleSwitch: Switch3 | None = None
    tailboxSwitch: Switch3 | None = None
    helmetCheck: Switch | None = None
    saddleCheck: Switch | None = None
    tailboxCheck: Switch | None = None


class SwitchSettingRequest(_Request):
    bssDisplay: Switch | None = None
    alertCheck: Switch | None = None
    berLevel: Switch3 | None = None
    alertSensitivity: OneToThree | None = None
    lowPowerValue: Annotated[int, Field(strict=True, ge=10, le=30)] | None = None
    displayTime: Switch | None = None
    displayODO: Switch | None = None
    lowSpeedLimit: SpeedLimit | None = None
    mediumSpeedLimit: SpeedLimit | None = None
    highSpeedLimit: SpeedLimit | None = None


class SwitchEnableRequest(_Request):
    assistedMode: Switch | None = None
    crashWarning: Switch | None = None
    kickstandCheck: Switch | None = None
    cruiseSwitch: Switch | None = None
    speedModeSwitch: Switch | None = None
    handlebarSwitch: Switch | None = None
    lowPowerSwitch: Switch | None = None
    saddleCheck: Switch | None = None


class LampEffect(_Request):
    mode: Annotated[Literal[1, 2], BeforeValidator(_exact_int)]  # 1 off, 2 always on
    color: Annotated[Literal[1, 2, 3, 4, 5, 6, 7], BeforeValidator(_exact_int)]  # green .. white


class AmbientSettingRequest(_Request):
    bright: OneToThree  # the seed's table says "brightrequired": the name is bright, and it is required
    parkingMode: LampEffect  # "parkingModerequired", likewise
    cruiseMode: LampEffect | None = None
    readyMode: LampEffect | None = None
    faultMode: LampEffect | None = None


class MoeqMask(_Request):
    """Each vehicle sound: 0 disable, 1 enable, 2 keep as it is."""

    unlocked: Switch | None = None
    locked: Switch | None = None
    openBoxes: Switch | None = None
    kickstand: Switch | None = None
    helmet: Switch | None = None
    turning: Switch | None = None
    ready: Switch | None = None
    unReady: Switch | None = None
    gearUp: Switch | None = None
    gearDown: Switch | None = None
    enterCruise: Switch | None = None
    exitCruise: Switch | None = None
    setSuccess: Switch | None = None
    setFailed: Switch | None = None
    defenseOn: Switch | None = None
    error: Switch | None = None
    lowPower: Switch | None = None
    batteryInserted: Switch | None = None


class SoundSettingRequest(_Request):
    workMode: Switch
    volume: OneToThree | None = None
    moeqMask: MoeqMask | None = None


class SpeedModeRequest(_Request):
    speedMode: OneToThree  # low, medium, high


class BluetoothKeySettingRequest(_Request):
    key: BleKey


class LocationInterval(_Request):
    unlockStatus: Interval
    lockStatus: Interval


class StatusInterval(_Request):
    ridingStatus: Interval
    nonRiding: Interval
    lockStatus: Interval


class UploadIntervalRequest(_Request):
    locationInterval: LocationInterval
    statusInterval: StatusInterval


class TimeAdjustRequest(_Request):
    utcOffset: Annotated[int, Field(strict=True, ge=-43200, le=43200)]  # seconds, without DST
    dstOffset: Annotated[Literal[0, 3600], BeforeValidator(_exact_int)]


# -- answers (``data``) --------------------------------------------------------------------------------------


class Status(_Answer):
    iotCode: str
    online: bool
    locked: bool
    lockVoltage: int  # mV
    networkSignal: int  # 2 (weakest) .. 32
    charging: bool
    powerPercent: int
    speedMode: int  # 1 low, 2 medium, 3 high
    speed: float
    odometer: int  # metres
    # Units of 10 m. The table says remainingRange, the example remainderRange: either is taken.
    remainingRange: int = Field(validation_alias=AliasChoices("remainingRange", "remainderRange"))
    totalRidingSecs: int
    statusUtcTime: UtcSeconds


class ExtraStatus(_Answer):
    iotCode: str
    seatCaskHelmet: int  # helmets in the seat cask, 0-2
    tailboxHelmet: int
    peopleSat: int  # 0 no, 1 yes
    cruiseStatus: int  # 0 unlocked, 1 locked (likewise below)
    saddleStatus: int
    tailboxStatus: int
    handlebarStatus: int
    kickstand: int  # 0 closed, 1 open


class Location(_Answer):
    iotCode: str
    latitude: float  # WGS84
    longitude: float
    satelliteNumber: int
    hdop: float
    altitude: float  # metres above sea level
    gpsUtcTime: UtcSeconds  # the example writes it as a string


class BatteryData(_Answer):
    batteryPort: int  # 1, 2, 3
    batteryPercent: int
    batteryVoltage: float  # V
    cycleTimes: int
    temperatrue: float  # °C; the seed's spelling is the wire name


class BatteryInfo(_Answer):
    iotCode: str
    charging: bool
    vehiclePercent: int
    batteryCount: int
    drivingVoltage: float  # V
    currentPower: float  # W
    iotPercent: int
    iotVoltage: int  # 411 -> 4.11 V
    batteryData: list[BatteryData]


class BluetoothKey(_Answer):
    iotCode: str
    key: BleKey


# -- the catalogue -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Operation:
    name: str
    kind: Kind
    method: Literal["GET", "POST"]
    path: str
    request: type[BaseModel] | None  # parameters beyond iotCode; None: iotCode only
    response: type[BaseModel] | None  # the answer's data; None: data is null


def _q(name: str, path: str, response: type[BaseModel], request: type[BaseModel] | None = None) -> Operation:
    return Operation(name, "query", "GET", path, request, response)


def _c(name: str, path: str, request: type[BaseModel] | None = None) -> Operation:
    return Operation(name, "control", "POST", path, request, None)


def _s(name: str, path: str, request: type[BaseModel]) -> Operation:
    return Operation(name, "setting", "POST", path, request, None)


OPERATIONS: dict[str, Operation] = {
    op.name: op
    for op in (
        _q("status", "/api/v2/vehicle/query/current/status", Status),
        _q("extra-status", "/api/v2/mopeds/query/current/extra-status", ExtraStatus),
        _q("location", "/api/v2/vehicle/query/current/location", Location, LocationRequest),
        _q("battery-info", "/api/v2/mopeds/query/current/battery-info", BatteryInfo),
        _q("bluetooth-key", "/api/v2/vehicle/query/current/bluetooth-key", BluetoothKey),
        _c("start-rental", "/api/v2/mopeds/control/startRental"),
        _c("end-rental", "/api/v2/mopeds/control/endRental"),
        _c("unlock", "/api/v2/vehicle/control/unlock"),
        _c("lock", "/api/v2/vehicle/control/lock"),
        _c("throttle-response", "/api/v2/vehicle/control/throttle-response", ThrottleResponseRequest),
        _c("saddle", "/api/v2/mopeds/control/saddle"),
        _c("tailbox", "/api/v2/mopeds/control/tailbox"),
        _c("battery-cover", "/api/v2/vehicle/control/battery-cover"),
        _c("sound", "/api/v2/vehicle/control/sound", SoundRequest),
        _s("rental-setting", "/api/v2/mopeds/setting/rental", RentalSettingRequest),
        _s("switch-setting", "/api/v2/mopeds/setting/switch", SwitchSettingRequest),
        _s("switch-enable", "/api/v2/mopeds/setting/able-switch", SwitchEnableRequest),
        _s("ambient-setting", "/api/v2/vehicle/setting/ambient", AmbientSettingRequest),
        _s("sound-setting", "/api/v2/vehicle/setting/sound", SoundSettingRequest),
        _s("speed-mode", "/api/v2/vehicle/setting/speed-mode", SpeedModeRequest),
        _s("bluetooth-key-setting", "/api/v2/vehicle/setting/bluetooth-key", BluetoothKeySettingRequest),
        _s("upload-interval", "/api/v2/vehicle/setting/interval", UploadIntervalRequest),
        _s("time-adjust", "/api/v2/vehicle/setting/time-adjust", TimeAdjustRequest),
    )
}


class UnknownOperation(ValueError):
    """A name that is not in ``OPERATIONS``."""


class InvalidParams(ValueError):
    """Parameters an operation does not take, or values outside the seed's ranges. ``field`` is the dotted
    path of the first bad one (``moeqMask.helmet``). The message never holds a value: a bluetooth key is one."""

    def __init__(self, op: str, field: str, problem: str) -> None:
        super().__init__(f"{op}: {field}: {problem}")
        self.op = op
        self.field = field
        self.problem = problem


def operation(op: Operation | str) -> Operation:
    """The ``Operation`` itself, or the one of that name."""
    if isinstance(op, Operation):
        return op
    try:
        return OPERATIONS[op]
    except (KeyError, TypeError):
        raise UnknownOperation(f"no Segway operation is named {str(op)[:40]!r}") from None


def params_for(op: Operation | str, values: Mapping[str, Any]) -> dict[str, Any]:
    """``values`` checked against the operation's request model, as the JSON (or query) parameters to send,
    optional ones left out when None. ``iotCode`` is the client's to add. Raises ``InvalidParams``."""
    operation_ = operation(op)
    name = operation_.name
    if not isinstance(values, Mapping):
        raise InvalidParams(
            name, "params", f"expected a mapping of names to values, got {_type_name(values)}"
        )
    if "iotCode" in values:
        raise InvalidParams(name, "iotCode", "is the call's own argument, not one of its parameters")
    if operation_.request is None:
        if values:
            field = str(next(iter(values)))[:40]
            raise InvalidParams(name, field, "not a parameter: this operation takes iotCode only")
        return {}
    try:
        model = operation_.request.model_validate(dict(values))
    except ValidationError as exc:
        # The first error, located, without its input (the value may be a bluetooth key).
        error = exc.errors(include_url=False, include_input=False, include_context=False)[0]
        field = ".".join(str(part) for part in error["loc"]) or "params"
        raise InvalidParams(name, field[:80], error["msg"]) from None
    return model.model_dump(exclude_none=True)
