"""API keys -> ``Tenant``: who may use which adapter, the base model, the admin routes.

Keys file (``--api-keys FILE``, DESIGN section 4)::

    {"keys": [
      {"key": "sha256:<hex of the key>", "tenant": "ops",  "admin": true},
      {"key": "sk-acme-123",             "tenant": "acme", "adapters": ["acme-support"], "allow_base": false},
      {"key": "sk-lab-456",              "tenant": "lab",  "adapters": "*"}
    ]}

``adapters`` defaults to none, ``allow_base`` to true, ``admin`` and ``metrics`` to false. ``/metrics``
names adapters that served traffic, so with a keys file it answers only keys with ``"metrics": true`` (a
scrape key: ``{"key": ..., "tenant": "prometheus", "metrics": true}``) or ``"admin": true``. Keys are kept only as sha256
digests and compared in constant time against every entry. Without a keys file access is open and the admin
routes answer loopback callers only.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

from fastapi import Depends, Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from server.api.errors import ApiError

OPEN_TENANT = "anonymous"
_SHA256_PREFIX = "sha256:"
_HEX64 = re.compile(r"[0-9a-fA-F]{64}")


class ApiKeysFileError(ValueError):
    """The keys file cannot be used; the message names the file and what to fix."""


@dataclass(slots=True, frozen=True)
class Tenant:
    """The caller, as its API key describes it. ``adapters`` None means every adapter ("*")."""

    name: str
    adapters: frozenset[str] | None = frozenset()
    allow_base: bool = True
    admin: bool = False
    metrics: bool = False  # may scrape /metrics

    def may_use_adapter(self, adapter: str) -> bool:
        return self.adapters is None or adapter in self.adapters


OPEN_ACCESS = Tenant(OPEN_TENANT, adapters=None, allow_base=True, admin=False)


class _KeyEntry(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    key: str = Field(min_length=1)
    tenant: str = Field(min_length=1, max_length=128)
    adapters: list[str] | Literal["*"] = Field(default_factory=list)
    allow_base: bool = True
    admin: bool = False
    metrics: bool = False


class _KeysFile(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    keys: list[_KeyEntry]


def key_digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8")).digest()


class KeyRing:
    """The loaded keys: sha256 digest -> tenant."""

    def __init__(self, entries: list[tuple[bytes, Tenant]]) -> None:
        self._entries = entries

    def __len__(self) -> int:
        return len(self._entries)

    def tenant_for(self, key: str) -> Tenant | None:
        """The tenant whose key is ``key``; None if none matches. Looks at every entry whatever matches,
        comparing digests with ``hmac.compare_digest``, so timing reveals neither key nor position."""
        digest = key_digest(key)
        found: Tenant | None = None
        for stored, tenant in self._entries:
            if hmac.compare_digest(stored, digest) and found is None:
                found = tenant
        return found


def _entry_digest(raw: str, where: str) -> bytes:
    if raw.startswith(_SHA256_PREFIX):
        hexdigest = raw[len(_SHA256_PREFIX) :]
        if not _HEX64.fullmatch(hexdigest):
            raise ApiKeysFileError(f"{where}: 'sha256:' must be followed by 64 hex digits")
        return bytes.fromhex(hexdigest)
    return key_digest(raw)


def load_api_keys(path: Path | str) -> KeyRing:
    """Read and validate a keys file; raises ``ApiKeysFileError`` with an actionable message."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ApiKeysFileError(f"cannot read the API keys file {path}: {exc.strerror or exc}") from exc
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ApiKeysFileError(f"the API keys file {path} is not valid JSON: {exc}") from exc
    try:
        parsed = _KeysFile.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "the top level"
        raise ApiKeysFileError(
            f"the API keys file {path} is invalid at {where}: {first['msg']} "
            '(expected {"keys": [{"key": ..., "tenant": ..., "adapters": [...] | "*", '
            '"allow_base": bool, "admin": bool, "metrics": bool}]})'
        ) from exc
    if not parsed.keys:
        raise ApiKeysFileError(f"the API keys file {path} lists no keys")

    entries: list[tuple[bytes, Tenant]] = []
    seen: set[bytes] = set()
    for i, entry in enumerate(parsed.keys):
        where = f"{path}: keys[{i}] (tenant {entry.tenant!r})"
        digest = _entry_digest(entry.key, where)
        if digest in seen:
            raise ApiKeysFileError(f"{where}: the same key appears twice")
        seen.add(digest)
        adapters = None if entry.adapters == "*" else frozenset(entry.adapters)
        entries.append((digest, Tenant(entry.tenant, adapters, entry.allow_base, entry.admin, entry.metrics)))
    return KeyRing(entries)


# ---------------------------------------------------------------------------------------- dependencies


def _unauthorized(message: str) -> ApiError:
    return ApiError(
        401,
        message,
        type="authentication_error",
        code="invalid_api_key",
        headers={"WWW-Authenticate": "Bearer"},
    )


def bearer_key(request: Request) -> str | None:
    header = request.headers.get("authorization")
    if header is None:
        return None
    scheme, _, key = header.strip().partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        return None
    return key.strip()


def is_loopback(host: str | None) -> bool:
    if not host:
        return False
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback


def authenticate(request: Request) -> Tenant:
    """The caller's tenant (``OPEN_ACCESS`` without a keys file); 401 for a missing or unknown key."""
    keyring: KeyRing | None = request.app.state.keyring
    if keyring is None:
        return OPEN_ACCESS
    key = bearer_key(request)
    if key is None:
        raise _unauthorized("missing API key: send 'Authorization: Bearer <key>'")
    tenant = keyring.tenant_for(key)
    if tenant is None:
        raise _unauthorized("invalid API key")
    return tenant


def require_admin(request: Request) -> Tenant:
    """An admin caller: an admin key (401 without a valid key, 403 for a tenant key); without a keys file,
    any loopback caller (403 for others)."""
    keyring: KeyRing | None = request.app.state.keyring
    if keyring is None:
        host = request.client.host if request.client else None
        if not is_loopback(host):
            raise ApiError(
                403,
                "admin routes answer only loopback callers when the server runs without --api-keys",
                type="permission_error",
                code="admin_required",
            )
        return Tenant(OPEN_TENANT, adapters=None, allow_base=True, admin=True)
    tenant = authenticate(request)
    if not tenant.admin:
        raise ApiError(
            403, "this route needs an admin API key", type="permission_error", code="admin_required"
        )
    return tenant


def require_metrics(request: Request) -> Tenant:
    """A caller that may scrape ``/metrics``: anyone without a keys file; with one, a key with
    ``"metrics": true`` or ``"admin": true`` (401 without a valid key, 403 for other keys)."""
    if request.app.state.keyring is None:
        return OPEN_ACCESS
    tenant = authenticate(request)
    if not (tenant.metrics or tenant.admin):
        raise ApiError(
            403,
            'this route needs a key with "metrics": true (or an admin key) in the --api-keys file',
            type="permission_error",
            code="metrics_key_required",
        )
    return tenant


TenantDep = Annotated[Tenant, Depends(authenticate)]
AdminDep = Annotated[Tenant, Depends(require_admin)]
MetricsDep = Annotated[Tenant, Depends(require_metrics)]
