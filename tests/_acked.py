"""Acknowledged means stored: metrics tagged with unique ids, and the check that every id that
got a 2xx is in the ``metrics`` view exactly once (tests/test_ingest.py, tests/test_faults.py)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from tests._helpers import custom, db_rows
from tests._traffic import auth, discovery, protocol, tool

_FAMILIES = (lambda: custom(1), auth, tool, discovery, protocol)


def tagged(ident: int) -> dict[str, Any]:
    """A metric of one of the five families (by ``ident``), carrying ``ident`` in its metadata."""
    metric = _FAMILIES[ident % len(_FAMILIES)]()
    return {**metric, "metadata": {**metric.get("metadata", {}), "id": ident}}


def stored_ids(db: Path) -> Counter[int]:
    return Counter(
        int(v) for (v,) in db_rows(db, "SELECT json_extract(metadata, '$.id') FROM metrics")
    )


def assert_all_acked_stored_once(db: Path, acked: list[int]) -> None:
    stored = stored_ids(db)
    missing = [v for v in acked if stored[v] == 0]
    duplicated = [v for v, n in stored.items() if n > 1]
    assert not missing, f"{len(missing)} acknowledged metrics missing, e.g. {missing[:5]}"
    assert not duplicated, f"duplicated: {duplicated[:5]}"
    assert db_rows(db, "PRAGMA integrity_check") == [("ok",)]
