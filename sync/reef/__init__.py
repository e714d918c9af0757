"""The REEF managed-sessions API client (HTTPS with mTLS), strict parsing of its answers into typed sessions.
Imports only the root package (its version for the User-Agent); nothing else of fleetgate.
"""
