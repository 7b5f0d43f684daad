"""The one way this package writes: an immediate transaction, rolled back whole on any error."""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator


@contextlib.contextmanager
def write_transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """``BEGIN IMMEDIATE`` (the write lock up front, so a busy database fails here and not at
    ``COMMIT`` after the work), then ``COMMIT``; any exception rolls back and propagates.

    >>> with write_transaction(conn):  # doctest: +SKIP
    ...     conn.execute("DELETE FROM auth_metrics WHERE ts < ?", (cutoff,))
    """
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
