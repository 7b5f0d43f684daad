"""SQL for the ``api_keys`` table. Keys are stored only as SHA-256 hashes."""

from __future__ import annotations

import dataclasses
import sqlite3
import time
from collections.abc import Sequence
from typing import Any

from metrics_service.storage.backend import KeyRecord
from metrics_service.storage.sqlite.transaction import write_transaction

#: ``KeyRecord`` field -> its column in ``api_keys``, in field order: the one list that both the
#: SELECTs and ``_record`` follow.
_COLUMN_OF = {
    f.name: "service_aliases" if f.name == "aliases" else f.name
    for f in dataclasses.fields(KeyRecord)
}
_COLUMNS = ", ".join(_COLUMN_OF.values())


def record(row: Sequence[Any]) -> KeyRecord:
    values = dict(zip(_COLUMN_OF, row, strict=True))
    values["aliases"] = tuple(a for a in (values["aliases"] or "").split(",") if a)
    return KeyRecord(**values)


def _now_ms() -> int:
    return int(time.time() * 1000)


def insert_key(
    conn: sqlite3.Connection,
    *,
    service: str | None,
    role: str,
    key_hash: str,
    key_prefix: str,
    rate_limit_per_min: int | None,
    source: str,
    description: str | None = None,
    aliases: tuple[str, ...] = (),
    created_at: int | None = None,
    revoked_at: int | None = None,
) -> KeyRecord:
    cursor = conn.execute(
        "INSERT INTO api_keys (service, role, key_hash, key_prefix, rate_limit_per_min, source,"
        " description, created_at, revoked_at, service_aliases)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING " + _COLUMNS,
        (
            service,
            role,
            key_hash,
            key_prefix,
            rate_limit_per_min,
            source,
            description,
            _now_ms() if created_at is None else created_at,
            revoked_at,
            ",".join(aliases) or None,
        ),
    )
    return record(cursor.fetchone())


def list_sql(active_only: bool) -> str:
    where = " WHERE revoked_at IS NULL" if active_only else ""
    return f"SELECT {_COLUMNS} FROM api_keys{where} ORDER BY id"


def list_keys(conn: sqlite3.Connection, *, active_only: bool = False) -> list[KeyRecord]:
    return [record(row) for row in conn.execute(list_sql(active_only)).fetchall()]


def revoke_key(conn: sqlite3.Connection, key_id: int) -> KeyRecord | None:
    """Revoke by id; return the record, or None if there is no such key."""
    conn.execute(
        "UPDATE api_keys SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL",
        (_now_ms(), key_id),
    )
    row = conn.execute(f"SELECT {_COLUMNS} FROM api_keys WHERE id = ?", (key_id,)).fetchone()
    return record(row) if row else None


def rotate_key(
    conn: sqlite3.Connection, key_id: int, *, key_hash: str, key_prefix: str, source: str
) -> tuple[KeyRecord, KeyRecord] | None:
    """In one transaction: revoke active key ``key_id`` and create its successor (the same
    service, role, aliases, rate limit and description). None if no active key has that id."""
    with write_transaction(conn):
        row = conn.execute(
            f"SELECT {_COLUMNS} FROM api_keys WHERE id = ? AND revoked_at IS NULL", (key_id,)
        ).fetchone()
        if row is None:
            return None
        old = record(row)
        revoked = revoke_key(conn, key_id)
        assert revoked is not None
        new = insert_key(
            conn,
            service=old.service,
            role=old.role,
            key_hash=key_hash,
            key_prefix=key_prefix,
            rate_limit_per_min=old.rate_limit_per_min,
            source=source,
            description=old.description,
            aliases=old.aliases,
        )
    return revoked, new


def reconcile_env_keys(
    conn: sqlite3.Connection, wanted: dict[tuple[str, str | None], tuple[str, str]]
) -> dict[str, Any]:
    """Make the active ``source='env'`` keys exactly ``wanted``.

    ``wanted`` maps (role, service) -> (key_hash, key_prefix). A changed key replaces the old one;
    an env key whose variable is gone is revoked. A revoked key stays revoked: a secret that was
    revoked (through the API, the CLI or a replaced variable) is never made active again by its
    variable. Returns counts of kept, added and revoked keys, and under ``refused`` the
    (role, service) whose variable holds a revoked key.
    """
    counts: dict[str, Any] = {"kept": 0, "added": 0, "revoked": 0, "refused": []}
    with write_transaction(conn):
        kept: set[tuple[str, str | None]] = set()
        for key in list_keys(conn, active_only=True):
            if key.source != "env":
                continue
            want = wanted.get((key.role, key.service))
            if want is not None and want[0] == key.key_hash:
                kept.add((key.role, key.service))
                continue
            revoke_key(conn, key.id)
            counts["revoked"] += 1
        counts["kept"] = len(kept)
        for (role, service), (key_hash, prefix) in wanted.items():
            if (role, service) in kept:
                continue
            row = conn.execute(
                "SELECT id, revoked_at FROM api_keys WHERE key_hash = ?", (key_hash,)
            ).fetchone()
            if row is not None and row[1] is not None:
                counts["refused"].append((role, service))
            elif row is not None:
                # The same secret already exists (e.g. created by the CLI): adopt that row.
                conn.execute(
                    "UPDATE api_keys SET source = 'env', role = ?, service = ? WHERE id = ?",
                    (role, service, row[0]),
                )
                counts["added"] += 1
            else:
                insert_key(
                    conn,
                    service=service,
                    role=role,
                    key_hash=key_hash,
                    key_prefix=prefix,
                    rate_limit_per_min=None,
                    source="env",
                )
                counts["added"] += 1
    return counts
