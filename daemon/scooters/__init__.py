"""The depot feature (``device.role = "depot"``): a yard of Segway scooters, their cloud API and Bluetooth keys.
Empty until that issue lands; it will import the runtime, drivers (ble), sync (segway) and config, as the others.
"""
