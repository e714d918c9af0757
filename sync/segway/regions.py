"""Which Segway domain serves a platform: the first letter of the platform code picks the region (the seed's
Note 1). A test or a private deployment names its own base URL instead."""

from __future__ import annotations

DOMAINS = {
    "A": "https://apac-api.segwaydiscovery.com",
    "E": "https://eu-api.segwaydiscovery.com",
    "U": "https://us-api.segwaydiscovery.com",
    "C": "https://cn-api.segwaydiscovery.com",
}


def api_base(platform_code: str, override: str | None = None) -> str:
    """The API's base URL for ``platform_code`` (e.g. ``A20081`` → apac), or ``override`` when given."""
    if override:
        return override.rstrip("/")
    region = platform_code[:1]
    if region not in DOMAINS:
        raise ValueError(
            f"platform code {platform_code[:20]!r} does not start with one of {', '.join(DOMAINS)}: "
            "no Segway region is known for it"
        )
    return DOMAINS[region]
