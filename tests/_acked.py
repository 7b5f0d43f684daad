"""Acknowledged means stored: metrics tagged with unique ids, and the check that every id that
got a 2xx is in the ``metrics`` view exactly once (tests/test_ingest.py, tests/test_faults.py), on
SQLite or PostgreSQL."""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

from tests._helpers import custom
from tests._servers import on_postgres, stored_rows
from tests._traffic import auth, discovery, protocol, tool

_FAMILIES = (lambda: custom(1), auth, tool, discovery, protocol)


def tagged(ident: int) -> dict[str, Any]:
    """A metric of one of the five families (by ``ident``), carrying ``ident`` in its metadata."""
    metric = _FAMILIES[ident % len(_FAMILIES)]()
    return {**metric, "metadata": {**metric.get("metadata", {}), "id": ident}}


def stored_ids(db: Any) -> Counter[int]:
    """The ids stored in the database of ``db``: a SQLite path, ``Settings`` or a
    ``ServiceProcess`` (tests/_servers.py ``stored_rows``)."""
    rows = stored_rows(db, "SELECT metadata FROM metrics")
    return Counter(int(json.loads(m)["id"]) for (m,) in rows)


def assert_all_acked_stored_once(db: Any, acked: list[int]) -> None:
    stored = stored_ids(db)
    missing = [v for v in acked if stored[v] == 0]
    duplicated = [v for v, n in stored.items() if n > 1]
    assert not missing, f"{len(missing)} acknowledged metrics missing, e.g. {missing[:5]}"
    assert not duplicated, f"duplicated: {duplicated[:5]}"
    if not on_postgres(db):
        assert stored_rows(db, "PRAGMA integrity_check") == [("ok",)]
