"""Tenants: API keys read from a file (``memfit serve --api-keys FILE``), each belonging to a tenant,
with an optional byte quota, or to an admin.

The file is JSON, one object per key::

    {"sk-alpha-1": {"tenant": "alpha", "quota": "256MiB"},
     "sk-beta-1":  {"tenant": "beta"},
     "sk-ops":     {"admin": true}}

A stored context belongs to the tenant whose key made it: its id is a hash that covers the tenant
(the same text stored by two tenants gets two ids, so storing it says nothing about the other), and
every read, question and delete of it by another tenant gets the same 404 as an id that was never
stored. Plain chats' prompt caches are kept per tenant too. An admin key reads, lists and deletes
any tenant's contexts. Quotas count the bytes of a tenant's stored entries in the shared store, so
replicas sharing Redis enforce one quota.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from memfit.units import parse_bytes

_TENANT = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
MIN_KEY_CHARS = 8


@dataclass(frozen=True)
class Identity:
    """Who sent a request: their tenant (whose contexts they see), whether they are an admin (who
    sees every tenant's), and their tenant's byte quota (None: unlimited)."""

    tenant: str = ""
    admin: bool = False
    quota_bytes: int | None = None

    def owns(self, tenant: str) -> bool:
        return self.admin or tenant == self.tenant


OPEN = Identity(admin=True)  # a server without --api-keys: one user, who may do everything


def load_api_keys(path: "str | Path") -> dict[str, Identity]:
    """API key -> Identity from a JSON file (see the module's docstring); a clear ValueError names
    what is wrong with it."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"API keys file {path} does not exist") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"API keys file {path} is not readable JSON: {e}") from None
    if not isinstance(raw, dict) or not raw:
        raise ValueError(f"API keys file {path} must be a JSON object of at least one key: "
                         '{"KEY": {"tenant": "NAME", "quota": "256MiB"}, "ADMIN-KEY": {"admin": true}}')
    keys = {}
    for key, spec in raw.items():
        where = f"API keys file {path}, key {key[:4]}...:"
        if len(key) < MIN_KEY_CHARS or any(c.isspace() for c in key):
            raise ValueError(f"{where} keys need at least {MIN_KEY_CHARS} characters and no spaces")
        if not isinstance(spec, dict) or set(spec) - {"tenant", "quota", "admin"}:
            raise ValueError(f'{where} expected {{"tenant": NAME, "quota": SIZE}} or {{"admin": true}}, got {spec!r}')
        admin = spec.get("admin", False)
        tenant = spec.get("tenant", "")
        if not isinstance(admin, bool) or not isinstance(tenant, str):
            raise ValueError(f"{where} admin must be true or false and tenant a string")
        if not admin and not _TENANT.match(tenant):
            raise ValueError(f"{where} tenant must be 1-64 letters, digits, '_', '.' or '-', got {tenant!r}")
        quota = spec.get("quota")
        try:
            if isinstance(quota, bool) or not isinstance(quota, (str, int, type(None))):
                raise ValueError(f"expected a size such as 256MiB or a number of bytes, got {quota!r}")
            quota = parse_bytes(quota)
            if quota is not None and quota < 0:
                raise ValueError(f"a quota cannot be negative ({quota})")
        except ValueError as e:
            raise ValueError(f"{where} quota: {e}") from None
        keys[key] = Identity(tenant, admin, quota)
    return keys
