"""The Segway fleet IoT API (../shared/seeds/segway-emoped-api.md): status codes as typed errors, the push
signature; the OAuth2 client and every query, control and setting follow. Imports nothing else of fleetgate.
"""
