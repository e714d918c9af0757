"""Cryptography at the device edge: keys derived from the device secret, PIN hashes, and signed, PIN-sealed
session sets (verify and, for the cloud side, seal). libsodium via pynacl; imports nothing else of fleetgate.
"""
