"""Managed-session PIN access: session book, offline policy, lockout, the access decision and audit, the two
session channels (signed MQTT sets, REEF pull) and the keypad loop. Imports the runtime, drivers, sync, config.
"""
