"""The rollup rows a commit adds (``rollups.updates``) are exactly what adding its rows one by one
gives: for random rows of every family with cubes, as validation builds them, spread over
several hours and parts, with late rows before the day watermark and None in every optional
column. Exactly: the same rows in the same order, the same types, and floats to the bit (the
sums are taken in row order, and the first of equal minima and maxima is kept, so that
``0.0`` and ``-0.0`` are told apart)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from metrics_service.settings import Settings
from metrics_service.storage import rollups
from metrics_service.validation import Validator

NOW = 1_800_000_000.0  # unix s, 08:00 UTC
TODAY_MS = int(NOW * 1000) // rollups.DAY_MS * rollups.DAY_MS

State = list[Any]


def reference(
    parts: list[dict[str, list[tuple[Any, ...]]]], watermark: int
) -> dict[tuple[str, str], list[tuple[Any, ...]]]:
    """What ``updates`` must give, the plain way: one row at a time into a state per cube and
    key. Hour tables take every row; the day tables of an hourly cube take the late rows' hour
    states, merged in order (as compaction merges hours); a day-only cube takes the late rows."""
    kinds = {kind for part in parts for kind in part}
    out: dict[tuple[str, str], list[tuple[Any, ...]]] = {}
    for cube in rollups.CUBES:
        if cube.kind not in kinds:
            continue
        rows = [r for part in parts for r in part.get(cube.kind, ())]
        if "hour" in cube.levels:
            hours = accumulate(cube, rows, rollups.HOUR_MS)
            out[(cube.name, "hour")] = stored(cube, hours)
            days: dict[tuple[Any, ...], State] = {}
            for (bucket, *dims), state in hours.items():
                if bucket < watermark:
                    day = (bucket - bucket % rollups.DAY_MS, *dims)
                    if day in days:
                        merge(cube, days[day], state)
                    else:
                        days[day] = list(state)
            if days:
                out[(cube.name, "day")] = stored(cube, days)
        else:
            late = [r for r in rows if r[cube.positions["ts"]] < watermark]
            if late:
                out[(cube.name, "day")] = stored(cube, accumulate(cube, late, rollups.DAY_MS))
    return out


def accumulate(
    cube: rollups.Cube, rows: list[tuple[Any, ...]], width: int
) -> dict[tuple[Any, ...], State]:
    pos = cube.positions
    states: dict[tuple[Any, ...], State] = {}
    for r in rows:
        key = (r[pos["ts"]] - r[pos["ts"]] % width, *(r[pos[d]] for d in cube.dims))
        if key not in states:
            states[key] = [0, 0, *(0 for _ in cube.sums)]
            for _ in cube.hists:
                states[key] += [0, 0, None, None, *(0 for _ in range(rollups.NBUCKETS))]
        state = states[key]
        state[0] += 1
        state[1] += r[pos["value"]]
        for i, column in enumerate(cube.sums):
            if r[pos[column]] is not None:
                state[2 + i] += r[pos[column]]
        for column in cube.hists:
            v = r[pos[column]]
            if v is None:
                continue
            o = cube.hist_offset(column)
            state[o] += 1
            state[o + 1] += v
            if state[o + 2] is None or v < state[o + 2]:
                state[o + 2] = v
            if state[o + 3] is None or v > state[o + 3]:
                state[o + 3] = v
            bucket = sum(v > bound for bound in rollups.BOUNDS_MS)  # BOUNDS[b-1] < v <= BOUNDS[b]
            state[o + 4 + bucket] += 1
    return states


def merge(cube: rollups.Cube, into: State, other: State) -> None:
    for i, column in enumerate(cube.state_columns):
        if column.endswith(("_min", "_max")):
            if other[i] is None:
                continue
            if into[i] is None or (
                other[i] < into[i] if column.endswith("_min") else other[i] > into[i]
            ):
                into[i] = other[i]
        else:
            into[i] += other[i]


def stored(cube: rollups.Cube, states: dict[tuple[Any, ...], State]) -> list[tuple[Any, ...]]:
    return [
        (
            key[0],
            *(
                rollups.missing_value(d) if v is None else v
                for d, v in zip(cube.dims, key[1:], strict=True)
            ),
            *state,
        )
        for key, state in states.items()
    ]


def exact(rows: list[tuple[Any, ...]]) -> list[tuple[str, ...]]:
    """Rows compared to the bit: ``repr`` tells 1 from 1.0 and 0.0 from -0.0."""
    return [tuple(map(repr, r)) for r in rows]


def text(*choices: str) -> st.SearchStrategy[str | None]:
    return st.one_of(st.none(), st.sampled_from(choices))


#: Floats whose sums depend on the order of addition (0.1 + 0.2 + 0.3 != 0.1 + (0.2 + 0.3)),
#: zeros of both signs, bucket bounds and the extremes.
inexact = st.sampled_from([0.1, 0.2, 0.3, 0.7, 1.1, 1e-3, 2.675])
durations = st.one_of(
    st.none(),
    inexact,
    st.sampled_from([0.0, -0.0, 0.5, 1.0, 7.5, 599_999.5, 600_000.0, 86_400_000.0]),
    st.floats(min_value=0, max_value=2_000, allow_nan=False),
    st.floats(min_value=0, max_value=86_400_000, allow_nan=False),
)
values = st.one_of(
    inexact,
    st.sampled_from([1.0, 0.0, -0.0, 3.0, 1e15]),
    st.floats(min_value=0, max_value=1e6, allow_nan=False),
)
#: Seconds before NOW: all in the last hour, or mostly in the last two hours and some in
#: earlier days (late rows when the watermark is past them).
last_hour = st.sampled_from([0.5, 59.0, 600.0, 1_800.25, 3_599.0])
ages = st.one_of(
    st.sampled_from([0.0, 0.5, 59.0, 3_600.0, 4_000.25]),
    st.sampled_from([86_400.0, 2 * 86_400 + 100.0, 3 * 86_400 + 7 * 3_600.0]),
    st.floats(min_value=0, max_value=3 * 86_400 + 8 * 3_600),
)
counts = st.one_of(st.none(), st.integers(0, 2**62))
success = st.one_of(st.none(), st.booleans())

#: The dimensions that cubes group by, per family (tool rows: two of them from metadata).
DIMENSIONS: dict[str, dict[str, st.SearchStrategy[Any]]] = {
    "tool_execution": {
        "method": text("tools/call", "tools/list"),
        "tool_name": text("search", "fetch", "t3"),
        "server_name": text("srv", "other"),
        "client_name": text("claude", "cursor"),
        "success": st.booleans(),
    },
    "auth_request": {
        "success": st.booleans(),
        "method": text("jwt", "oauth"),
        "server": text("auth-1", "auth-2"),
        "user_hash": text("u1", "u2", "u3"),
    },
    "tool_discovery": {"query": text("q")},
    "protocol_latency": {
        "flow_step": st.sampled_from(["initialize->tools/list", "tools/list->tools/call"]),
        "server_name": text("srv", "other"),
        "client_name": text("claude"),
    },
    "registry_operation": {
        "operation": st.sampled_from(["register", "delete"]),
        "resource_type": text("server", "agent"),
        "success": success,
    },
    "health_check": {"endpoint": text("/a", "/b"), "healthy": success},
}
TOOL_KEYS = {"agent_id": text("a1", "a2"), "tenant_id": text("t1", "t2")}
#: The other summed and latency columns (in dimensions, or metadata for tool rows).
NUMBERS: dict[str, dict[str, st.SearchStrategy[Any]]] = {
    "tool_execution": {"input_tokens": counts, "output_tokens": counts},
    "tool_discovery": {
        "results_count": counts,
        "embedding_time_ms": durations,
        "search_time_ms": durations,
    },
}


def without_none(d: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if v is not None}


Profile = tuple[dict[str, Any], dict[str, Any]]  # dimensions, metadata keys


def profile(kind: str) -> st.SearchStrategy[Profile]:
    return st.tuples(
        st.fixed_dictionaries(DIMENSIONS[kind]).map(without_none),
        st.fixed_dictionaries(TOOL_KEYS if kind == "tool_execution" else {}).map(without_none),
    )


@st.composite
def related(draw: st.DrawFn, kind: str) -> list[Profile]:
    """A profile and a few more, each differing from an earlier one in one dimension: the
    cubes without that dimension put their rows under one key."""
    out = [draw(profile(kind))]
    choices = {**DIMENSIONS[kind], **(TOOL_KEYS if kind == "tool_execution" else {})}
    for _ in range(draw(st.integers(1, 4))):
        dims, keys = (dict(d) for d in draw(st.sampled_from(out)))
        name = draw(st.sampled_from(sorted(choices)))
        where = keys if name in TOOL_KEYS else dims
        where.pop(name, None)
        where.update(without_none({name: draw(choices[name])}))
        out.append((dims, keys))
    return out


@st.composite
def metric(
    draw: st.DrawFn, kinds: list[str], profiles: dict[str, list[Profile]], hour: bool
) -> dict[str, Any]:
    """A metric of one of ``kinds``, its dimensions one of the family's ``profiles`` (if any:
    few groups, many rows each) or drawn afresh, in the last ``hour`` or over days."""
    kind = draw(st.sampled_from(kinds))
    dims, keys = draw(st.sampled_from(profiles[kind]) if profiles else profile(kind))
    numbers = without_none({k: draw(s) for k, s in NUMBERS.get(kind, {}).items()})
    tool = kind == "tool_execution"
    m: dict[str, Any] = {
        "type": kind,
        "value": draw(values),
        # the last three days and today up to now, most in the last two hours
        "timestamp": NOW - draw(last_hour if hour else ages),
        "dimensions": {**dims, **({} if tool else numbers)},
    }
    duration = draw(durations)
    if duration is not None:
        m["duration_ms"] = duration
    elif kind == "protocol_latency":  # then value is the latency in seconds
        m["value"] = draw(st.floats(min_value=0, max_value=86_400, allow_nan=False))
    if tool:
        m["metadata"] = {**keys, **numbers}
        if m["dimensions"].get("method", "tools/call") == "tools/call":
            m["dimensions"].setdefault("tool_name", "search")  # required then
    return m


VALIDATOR = Validator(Settings(db_path=Path("unused.db")), clock=lambda: NOW)


def rows_of(metrics: list[dict[str, Any]]) -> dict[str, list[tuple[Any, ...]]]:
    body = {"service": "svc", "version": "1", "metrics": metrics}
    batch = VALIDATOR.decode(json.dumps(body).encode())
    assert not batch.rejections, batch.rejections
    return batch.rows


@st.composite
def bodies(draw: st.DrawFn) -> list[list[dict[str, Any]]]:
    """1 to 4 bodies (parts of a commit) of metrics of one to three families. Half of the
    examples take their dimensions from a few profiles per family: few groups of many rows,
    the coarser cubes' keys taking rows of several groups of the finer ones; the others draw
    them for each metric: groups of a row or two. The metrics of a body are in the last hour
    or spread over days."""
    kinds = draw(st.lists(st.sampled_from(sorted(DIMENSIONS)), min_size=1, max_size=3, unique=True))
    few = draw(st.booleans())
    profiles = {k: draw(related(k)) for k in kinds} if few else {}
    body = st.lists(metric(kinds, profiles, draw(st.booleans())), min_size=10, max_size=60)
    return draw(st.lists(body, min_size=1, max_size=4))


@settings(max_examples=200, deadline=None)
@given(bodies(), st.integers(-3, 1))
def test_updates_equal_adding_rows_one_by_one(
    bodies: list[list[dict[str, Any]]], watermark_days: int
) -> None:
    parts = [rows_of(metrics) for metrics in bodies]
    watermark = TODAY_MS + watermark_days * rollups.DAY_MS
    got = {
        (cube.name, level): list(rows) for cube, level, rows in rollups.updates(parts, watermark)
    }
    want = reference(parts, watermark)
    assert got.keys() == want.keys()
    for table, rows in want.items():
        assert exact(got[table]) == exact(rows), table


def test_the_state_is_taken_in_row_order() -> None:
    """A key that takes rows of several groups (``clients``: tools a and b) sums them in row
    order, not group by group; the first of equal minima and maxima is kept (0.0, -0.0)."""
    tool = {"type": "tool_execution", "timestamp": NOW}
    rows = [(0.1, 0.0, "a"), (0.2, -0.0, "b"), (0.3, 0.1, "a"), (0.7, 0.0, "b")] * 10
    metrics = [
        {**tool, "value": v, "duration_ms": d, "dimensions": {"tool_name": t, "success": True}}
        for v, d, t in rows
    ]
    parts = [rows_of(metrics)]
    got = {cube.name: list(rows) for cube, level, rows in rollups.updates(parts, 0)}
    want = reference(parts, 0)
    for name in ("clients", "tools"):
        assert exact(got[name]) == exact(want[(name, "hour")]), name
    cubes = {c.name: c for c in rollups.CUBES}

    def named(name: str, row: tuple[Any, ...]) -> dict[str, Any]:
        cube = cubes[name]
        return dict(zip(["bucket", *cube.dims, *cube.state_columns], row, strict=True))

    in_order = by_tool = 0.0
    for v, _, _ in rows:
        in_order += v
    for tool_name in "ab":
        of_tool = 0.0
        for v, _, t in rows:
            if t == tool_name:
                of_tool += v
        by_tool += of_tool
    (everything,) = (named("clients", row) for row in got["clients"])
    assert everything["n"] == everything["lat_n"] == everything["lat_b00"] == 40
    assert everything["calls"] == in_order != by_tool
    assert repr((everything["lat_min"], everything["lat_max"])) == "(0.0, 0.1)"
    (b,) = (named("tools", row) for row in got["tools"] if named("tools", row)["tool_name"] == "b")
    assert repr((b["lat_sum"], b["lat_min"], b["lat_max"])) == "(0.0, -0.0, -0.0)"
