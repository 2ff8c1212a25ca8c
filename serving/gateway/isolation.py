"""Prompt caches that never cross tenants: one salt per tenant (or per configured group).

Prefix caching makes a repeated prompt prefix cheap, and ``usage...cached_tokens`` (and
the latency) tells a client whether its prefix was cached. Shared across tenants, that is
an oracle: tenant A can confirm, block by block, what tenant B sent. OpenAI keeps prompt
caches per organization; so do we:

- every engine request carries ``cache_salt`` (vLLM's field, part of every KV block's
  hash) = HMAC-SHA256(secret, the tenant's cache group), replacing whatever the client
  sent, so one tenant's cached blocks never match another tenant's prompt;
- the prefix index in Redis and the affinity keys are scoped the same way (the block
  hash chain starts from the salt), so routing reveals nothing either;
- the response cache is keyed by tenant id.

Tenants named in one ``auth.cache_groups`` entry share a salt (one team, several ids).
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping

__all__ = ["CacheIsolation"]

_DEFAULT_SECRET = b"oss-serving-cache-salt"


class CacheIsolation:
    """The cache salt of each tenant."""

    def __init__(self, groups: Mapping[str, list[str]], secret: str | None = None) -> None:
        self._secret = secret.encode() if secret else _DEFAULT_SECRET
        self._group = {tenant: f"group:{name}" for name, tenants in groups.items() for tenant in tenants}
        self._cache: dict[str, str] = {}

    def salt(self, tenant_id: str) -> str:
        """32 hex characters, the same on every gateway replica for the same tenant."""
        found = self._cache.get(tenant_id)
        if found is None:
            scope = self._group.get(tenant_id, f"tenant:{tenant_id}")
            found = hmac.new(self._secret, scope.encode(), hashlib.sha256).hexdigest()[:32]
            if len(self._cache) < 10_000:
                self._cache[tenant_id] = found
        return found
