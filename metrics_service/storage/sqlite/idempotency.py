"""SQL of the ``idempotency_keys`` table (metrics_service/idempotency.py has the rules)."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterable, Sequence
from typing import Any

from metrics_service.idempotency import Claim, Stored

_CLAIM_SQL = (
    "INSERT INTO idempotency_keys (service, key, fingerprint, status, response, committed_at)"
    " VALUES (?, ?, ?, ?, ?, ?)"
    " ON CONFLICT (service, key) DO UPDATE SET fingerprint = excluded.fingerprint,"
    " status = excluded.status, response = excluded.response,"
    " committed_at = excluded.committed_at"
    " WHERE idempotency_keys.committed_at < ?"
)
LOOKUP_SQL = (
    "SELECT fingerprint, status, response FROM idempotency_keys"
    " WHERE service = ? AND key = ? AND committed_at >= ?"
)
DELETE_SQL = (
    "DELETE FROM idempotency_keys WHERE rowid IN (SELECT rowid FROM idempotency_keys"
    " WHERE committed_at < ? LIMIT ?)"
)


def claim(conn: sqlite3.Connection, claims: Iterable[Claim]) -> None:
    """Claim each key inside the caller's transaction; a key still live elsewhere sets
    ``existing``. An expired key is taken over."""
    now = int(time.time() * 1000)
    for c in claims:
        cutoff = now - int(c.window_s * 1000)
        cursor = conn.execute(
            _CLAIM_SQL, (c.service, c.key, c.fingerprint, c.status, c.response, now, cutoff)
        )
        if cursor.rowcount == 0:
            c.existing = lookup(conn, c.service, c.key, c.window_s, cutoff)


def cutoff_of(window_s: float) -> int:
    return int((time.time() - window_s) * 1000)


def stored(row: Sequence[Any] | None) -> Stored | None:
    """A record from a ``LOOKUP_SQL`` row."""
    if row is None:
        return None
    return Stored(str(row[0]), int(row[1]), bytes(row[2]))


def lookup(
    conn: sqlite3.Connection, service: str, key: str, window_s: float, cutoff: int | None = None
) -> Stored | None:
    """The committed record of ``key`` if it is within the window."""
    if cutoff is None:
        cutoff = cutoff_of(window_s)
    return stored(conn.execute(LOOKUP_SQL, (service, key, cutoff)).fetchone())


def delete_expired_chunk(conn: sqlite3.Connection, before_ms: int, limit: int) -> int:
    """Forget up to ``limit`` keys committed before ``before_ms`` (unix ms)."""
    return int(conn.execute(DELETE_SQL, (before_ms, limit)).rowcount)
