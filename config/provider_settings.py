"""The provider calls' settings (llm/pacing.py, tenants/egress.py), from the environment;
star-imported by config.settings (which also sets PROVIDER_ALLOW_PRIVATE_URLS: it defaults to DEBUG).

Pacing under the provider's own limits, per process: a call waits while the provider's
x-ratelimit-remaining-requests / -tokens are at or below the floors, until their reset, or after
a 429 until its Retry-After; never longer than PROVIDER_PACING_MAX_WAIT seconds (then it is
sent). A 429 whose Retry-After is further off is answered at once: a 429 with Retry-After.

PROVIDER_ALLOWED_NETWORKS: CIDRs a provider credential may reach even when private addresses are
not allowed (a self-hosted model's subnet); cloud metadata addresses never."""

import ipaddress

import environ

env = environ.Env()

PROVIDER_PACING = env.bool("PROVIDER_PACING", default=True)
PROVIDER_PACING_MAX_WAIT = env.float("PROVIDER_PACING_MAX_WAIT", default=10.0)
PROVIDER_PACING_REQUEST_FLOOR = env.int("PROVIDER_PACING_REQUEST_FLOOR", default=0)
PROVIDER_PACING_TOKEN_FLOOR = env.int("PROVIDER_PACING_TOKEN_FLOOR", default=0)
# Parsed here: a bad CIDR stops the process at start, not at a tenant's first call.
PROVIDER_ALLOWED_NETWORKS = [
    str(ipaddress.ip_network(network.strip(), strict=False))
    for network in env.list("PROVIDER_ALLOWED_NETWORKS", default=[])
    if network.strip()
]

__all__ = [name for name in dir() if name.startswith("PROVIDER_")]
