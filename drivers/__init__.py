"""Hardware edges, one module or package each (OBD-II, GPS, keypad, start-enable output, BLE).
A driver imports nothing of fleetgate but itself: it knows no cloud, store or daemon.
"""
