"""API keys: generation, hashing, the in-memory key table and failed-auth throttling.

Keys are 32 random bytes (``mcpm_`` + URL-safe base64), stored only as SHA-256 hex digests. A
high-entropy secret needs no slow hash: SHA-256 of 256 random bits cannot be reversed or guessed.
The service holds a map hash -> key in memory, reloaded from the database every
``METRICS_KEY_RELOAD_INTERVAL_S``, so keys revoked by the CLI take effect within seconds and no
request with a known key touches the database to authenticate. An unknown key makes the service
reload the table once before refusing it (at most once a second), so a key created with the CLI
while the service runs works on its first request. A backend that hears of key changes
(PostgreSQL's ``LISTEN``) calls :meth:`Authenticator.keys_changed`, which reloads at once.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import logging
import os
import secrets
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any

from metrics_service.errors import Forbidden, RateLimited, Unauthorized
from metrics_service.ratelimit import RateLimiter
from metrics_service.settings import (
    API_KEY_ENV_PREFIX,
    Settings,
    env_api_keys,
    service_name_from_env,
    valid_service_name,
)
from metrics_service.storage.backend import KeyRecord, StorageBackend

log = logging.getLogger(__name__)

KEY_PREFIX = "mcpm_"
#: The least time between two reloads of the key table caused by unknown keys.
RELOAD_ON_DEMAND_INTERVAL_S = 1.0
ROLES = ("ingest", "admin", "viewer")
#: The ``reason`` of a failed authentication (``metrics_service_auth_failures_total``).
FAILURE_REASONS = ("missing_key", "unknown_key", "wrong_role", "wrong_service", "throttled")


def presented_key(x_api_key: str | bytes | None, authorization: str | bytes | None) -> str | None:
    """The key a request presents: ``X-API-Key``, else the token of ``Authorization: Bearer``
    (the form OpenTelemetry exporters and most HTTP clients send). Any other scheme presents no
    key, so the 401 names the header to use."""
    if x_api_key:
        return x_api_key.decode("latin-1") if isinstance(x_api_key, bytes) else x_api_key
    if not authorization:
        return None
    value = authorization.decode("latin-1") if isinstance(authorization, bytes) else authorization
    scheme, _, token = value.strip().partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


def generate_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


def key_prefix(key: str) -> str:
    """The first characters, enough to tell keys apart in listings, far too few to use."""
    return key[: len(KEY_PREFIX) + 6] if key.startswith(KEY_PREFIX) else key[:6]


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: one active key."""

    key_id: int
    role: str
    service: str | None
    rate_limit_per_min: int | None
    key_hash: str
    #: Every service name this key may report as: its service and its aliases.
    services: frozenset[str] = frozenset()


def _check_new_key(role: str, service: str | None, aliases: tuple[str, ...]) -> None:
    if role not in ROLES:
        raise ValueError(f"role must be one of {', '.join(ROLES)}")
    if role == "ingest" and not service:
        raise ValueError("an ingest key needs a service")
    if aliases and role != "ingest":
        raise ValueError("only an ingest key has service aliases")
    for alias in aliases:
        if not valid_service_name(alias):
            raise ValueError(f"alias {alias!r} is not a valid service name")


async def create_key(
    storage: StorageBackend,
    *,
    service: str | None,
    role: str = "ingest",
    rate_limit_per_min: int | None = None,
    source: str = "cli",
    description: str | None = None,
    aliases: tuple[str, ...] = (),
) -> tuple[str, KeyRecord]:
    """Create a key; return the secret (shown once) and its record."""
    _check_new_key(role, service, aliases)
    secret = generate_key()
    record = await storage.create_key(
        service=service if role == "ingest" else None,
        role=role,
        key_hash=hash_key(secret),
        key_prefix=key_prefix(secret),
        rate_limit_per_min=rate_limit_per_min,
        source=source,
        description=description,
        aliases=tuple(dict.fromkeys(a for a in aliases if a != service)),
    )
    return secret, record


async def rotate_key(
    storage: StorageBackend, key_id: int, *, source: str = "cli"
) -> tuple[str, KeyRecord, KeyRecord] | None:
    """Revoke active key ``key_id`` and create its successor with the same service, role,
    aliases and rate limit, in one transaction; return the new secret (shown once), the revoked
    record and the new one, or None if there is no active key with that id."""
    secret = generate_key()
    rotated = await storage.rotate_key(
        key_id, key_hash=hash_key(secret), key_prefix=key_prefix(secret), source=source
    )
    if rotated is None:
        return None
    return secret, *rotated


async def reconcile_env(storage: StorageBackend, settings: Settings) -> dict[str, Any]:
    """Make the env-sourced keys match ``METRICS_API_KEY_*`` and ``METRICS_ADMIN_API_KEY``."""
    wanted: dict[tuple[str, str | None], tuple[str, str]] = {
        ("ingest", service): (hash_key(key), key_prefix(key))
        for service, key in env_api_keys().items()
    }
    if settings.admin_api_key:
        wanted[("admin", None)] = (
            hash_key(settings.admin_api_key),
            key_prefix(settings.admin_api_key),
        )
    counts = await storage.reconcile_env_keys(wanted)
    for role, service in counts["refused"]:
        log.warning(
            "%s holds a key that was revoked; it stays revoked (a revoked key is never made "
            "active again): put a new key in the variable",
            _variable_of(role, service),
        )
    return counts


def _variable_of(role: str, service: str | None) -> str:
    if role == "admin":
        return "METRICS_ADMIN_API_KEY"
    for var in os.environ:
        upper = var.upper()
        if upper.startswith(API_KEY_ENV_PREFIX) and service_name_from_env(upper) == service:
            return var
    return f"{API_KEY_ENV_PREFIX}{(service or '').upper()}"


class KeyTable:
    """Active keys by hash; replaced whole on reload (readers never see a half-built map).

    ``aliases`` (``METRICS_SERVICE_ALIASES``) maps a service to further names every key of that
    service may report as; a key's own aliases add to them."""

    def __init__(self, aliases: dict[str, tuple[str, ...]] | None = None) -> None:
        self._by_hash: dict[str, Principal] = {}
        self._aliases = aliases or {}

    def __len__(self) -> int:
        return len(self._by_hash)

    def _principal(self, r: KeyRecord) -> Principal:
        services: frozenset[str] = frozenset()
        if r.service is not None:
            services = frozenset((r.service, *r.aliases, *self._aliases.get(r.service, ())))
        return Principal(r.id, r.role, r.service, r.rate_limit_per_min, r.key_hash, services)

    def replace(self, records: list[KeyRecord]) -> None:
        self._by_hash = {r.key_hash: self._principal(r) for r in records if r.revoked_at is None}

    def add(self, record: KeyRecord) -> None:
        table = dict(self._by_hash)
        table[record.key_hash] = self._principal(record)
        self._by_hash = table

    def remove(self, key_id: int) -> None:
        self._by_hash = {h: p for h, p in self._by_hash.items() if p.key_id != key_id}

    def count_role(self, role: str) -> int:
        return sum(1 for p in self._by_hash.values() if p.role == role)

    def lookup(self, presented: str) -> Principal | None:
        digest = hash_key(presented)
        principal = self._by_hash.get(digest)
        # The map lookup is by digest, not by secret; compare_digest keeps the final check
        # constant-time all the same.
        if principal is not None and hmac.compare_digest(principal.key_hash, digest):
            return principal
        return None


class Authenticator:
    """Checks the presented key (``presented_key``); throttles failed attempts per client address.

    A valid key is never throttled: behind a load balancer or NAT many clients share an address,
    and one of them guessing must not lock the others out. Keys are 256 random bits (or long
    secrets from the environment), so the throttle is there to bound the noise of bad clients,
    not to make guessing possible at all.
    """

    def __init__(
        self,
        keys: KeyTable,
        limiter: RateLimiter,
        settings: Settings,
        on_failure: Callable[[str], None] = lambda reason: None,
    ) -> None:
        self.keys = keys
        self._limiter = limiter
        self._failure_limit = settings.auth_failure_limit_per_min
        self._on_failure = on_failure
        self._trusted = settings.trusted_networks
        #: Reloads the key table from the database; set by the app. An unknown key triggers it
        #: once before the key is refused, so a key created with the CLI works at once.
        self.reload: Callable[[], Awaitable[None]] | None = None
        self._reloading: asyncio.Task[None] | None = None
        self._last_reload = -RELOAD_ON_DEMAND_INTERVAL_S
        self._refreshing: asyncio.Task[None] | None = None
        self._stale = False

    def keys_changed(self) -> None:
        """The keys changed in the database (another replica, the CLI): reload them now. Notices
        arriving during a reload cause one more after it, so the last change is always read."""
        self._stale = True
        if self._refreshing is None or self._refreshing.done():
            self._refreshing = asyncio.ensure_future(self._refresh())

    async def _refresh(self) -> None:
        while self._stale and self.reload is not None:
            self._stale = False
            try:
                await self.reload()
            except Exception:
                log.warning(
                    "reloading keys after a change notice failed; the periodic reload retries",
                    exc_info=True,
                )
                return

    async def _lookup_fresh(self, presented: str) -> Principal | None:
        """Look ``presented`` up again after reloading the keys, at most once per
        ``RELOAD_ON_DEMAND_INTERVAL_S`` for the whole process (a flood of bad keys costs one
        small query a second); concurrent unknown keys share the one reload."""
        task = self._reloading
        if task is None or task.done():
            now = time.monotonic()
            if self.reload is None or now - self._last_reload < RELOAD_ON_DEMAND_INTERVAL_S:
                return None
            self._last_reload = now
            task = self._reloading = asyncio.ensure_future(self.reload())
        try:
            await asyncio.shield(task)
        except Exception:
            log.warning("reloading keys for an unknown key failed", exc_info=True)
            return None
        return self.keys.lookup(presented)

    def client_address(self, peer: str | None, forwarded_for: Iterable[str]) -> str:
        """The client's address: the peer's, or, when the peer is a trusted proxy, the last
        ``X-Forwarded-For`` entry (read from the right) that is not a trusted proxy itself."""
        if peer is None:
            return "unknown"
        if not self._is_trusted(peer):
            return peer
        hops = [h.strip() for value in forwarded_for for h in value.split(",") if h.strip()]
        for hop in reversed(hops):
            if not self._is_trusted(hop):
                return hop
        return hops[0] if hops else peer

    def _is_trusted(self, address: str) -> bool:
        if not self._trusted:
            return False
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ip in network for network in self._trusted)

    async def authenticate(self, presented: str | None, client: str, *roles: str) -> Principal:
        principal = self.keys.lookup(presented) if presented else None
        if principal is None and presented:
            principal = await self._lookup_fresh(presented)
        if principal is None:
            # A client that already failed too often is refused without spending more.
            blocked = await self._limiter.peek_exhausted("authfail", client, self._failure_limit)
            if blocked is not None:
                self._on_failure("throttled")
                raise RateLimited(
                    "too many failed authentication attempts from this address",
                    headers={"Retry-After": str(blocked)},
                )
            # The hit itself is the gate (atomic), so a burst of concurrent guesses gets exactly
            # the allowed number of 401s and 429 for the rest.
            decision = await self._limiter.hit("authfail", client, self._failure_limit)
            self._on_failure("missing_key" if not presented else "unknown_key")
            if not decision.allowed:
                raise RateLimited(
                    "too many failed authentication attempts from this address",
                    headers={"Retry-After": str(decision.retry_after_s)},
                )
            raise Unauthorized(
                "missing API key: send it as X-API-Key: <key> (or Authorization: Bearer <key>)"
                if not presented
                else "unknown or revoked API key",
                headers={"WWW-Authenticate": 'ApiKey header="X-API-Key", Bearer'},
            )
        if principal.role not in roles:
            self._on_failure("wrong_role")
            raise Forbidden(f"this key's role ({principal.role}) may not use this endpoint")
        return principal
