"""OBD-II through an ELM327 adapter (python-obd), for asyncio callers."""

from .adapter import ObdAdapter
from .commands import SIGNALS, decode_vin, odometer_km
from .model import AdapterInfo, Dtc, ObdError, Sample

__all__ = ["SIGNALS", "AdapterInfo", "Dtc", "ObdAdapter", "ObdError", "Sample", "decode_vin", "odometer_km"]
