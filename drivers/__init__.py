"""Hardware edges, one module or package each (OBD-II, GPS, keypad, start-enable output, BLE)."""
