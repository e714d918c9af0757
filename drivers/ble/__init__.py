"""Bluetooth LE to the scooters of a depot's yard (bleak): the profile seam and the connection manager.

- ``profile``: the interface a lock protocol implements (``ScooterProfile``, ``GattLink``, ``BleAnswer``, errors).
- ``fleetgate_profile``: fleetgate's own lock profile (docs/ble-profile.md), central side.
- ``manager``: scanning, presence, connections and operations (``BleManager``, ``BleSettings``); imports bleak.
"""
