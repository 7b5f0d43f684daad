"""Rollups: pre-aggregated history, kept up to date in the same transaction as each raw insert.

This module is the shared logic of every backend (what is aggregated, how states merge, how a
range is split, percentiles); the SQL is the backend's (``storage/sqlite/rollups.py``). Nothing
here imports a database driver.

Each *cube* groups one metric family by a few dimensions, per hour and per UTC day
(``rollup_<cube>_hour``, ``rollup_<cube>_day``; WITHOUT ROWID, clustered by time bucket). A row
holds the event count, the sum of ``value`` (calls), sums such as token counts, and for each
latency column its count, sum, min, max and counts in the fixed buckets of ``BOUNDS_MS``, so that
percentiles over any range come from summed bucket counts.

Several narrow cubes rather than one wide one: a cube's size grows with the product of its
dimensions' cardinalities, and a query reads the smallest cube holding its group and filter
dimensions. A range is split into whole days (day table), whole hours (hour table) and the
partial hours at its ends, aggregated from the raw rows with the same code as at ingest, so
answers are exact over any range. Missing dimension values are stored as ``''`` (``-1`` for a
missing ``success``): primary keys must not hold NULL.
"""

from __future__ import annotations

import collections
import functools
import itertools
import math
import operator
import sys
from bisect import bisect_left, bisect_right
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from metrics_service.storage import schema

# -- Frozen by schema migration 2: changing any of these needs a new migration. ----------------

#: Upper bounds (ms, inclusive) of the latency buckets; the last bucket is everything above.
BOUNDS_MS: tuple[float, ...] = (
    0.5,
    1,
    2,
    3,
    5,
    7.5,
    10,
    15,
    20,
    30,
    50,
    75,
    100,
    150,
    200,
    300,
    500,
    750,
    1_000,
    1_500,
    2_000,
    3_000,
    5_000,
    7_500,
    10_000,
    15_000,
    20_000,
    30_000,
    60_000,
    120_000,
    300_000,
    600_000,
)
NBUCKETS = len(BOUNDS_MS) + 1
HOUR_MS = 3_600_000
DAY_MS = 86_400_000
#: level -> bucket width, coarsest first.
LEVELS: dict[str, int] = {"day": DAY_MS, "hour": HOUR_MS}
#: latency column -> column prefix in rollup tables.
_HIST_PREFIX = {"duration_ms": "lat", "embedding_time_ms": "emb", "search_time_ms": "srch"}


def row_positions(kind: str) -> dict[str, int]:
    """Column name -> position in the rows ``validation`` builds (the column registry)."""
    return schema.row_positions(kind)


@dataclass(frozen=True, slots=True)
class Cube:
    name: str
    kind: str  # metric type
    dims: tuple[str, ...]  # raw column names, the key after the time bucket
    sums: tuple[str, ...] = ()  # raw columns summed
    hists: tuple[str, ...] = ()  # raw latency columns with a bucket histogram
    levels: tuple[str, ...] = ("day", "hour")
    positions: dict[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "positions", row_positions(self.kind))

    def table(self, level: str) -> str:
        return f"rollup_{self.name}_{level}"

    @property
    def state_columns(self) -> list[str]:
        """Rollup columns after the key, in the order of an accumulated state."""
        columns = ["n", "calls", *(f"{c}_sum" for c in self.sums)]
        for h in self.hists:
            p = _HIST_PREFIX[h]
            columns += [f"{p}_n", f"{p}_sum", f"{p}_min", f"{p}_max"]
            columns += [f"{p}_b{i:02d}" for i in range(NBUCKETS)]
        return columns

    def hist_offset(self, column: str) -> int:
        return 2 + len(self.sums) + self.hists.index(column) * (4 + NBUCKETS)


_TOOL_SUMS = ("input_tokens", "output_tokens")
_V2_CUBES: tuple[Cube, ...] = (
    Cube(
        "tools",
        "tool_execution",
        ("service", "server_name", "method", "tool_name", "success"),
        _TOOL_SUMS,
        ("duration_ms",),
    ),
    Cube(
        "clients",
        "tool_execution",
        ("service", "server_name", "client_name", "success"),
        _TOOL_SUMS,
        ("duration_ms",),
    ),
    # An agent belongs to a tenant: keyed together they stay few.
    Cube(
        "agents",
        "tool_execution",
        ("service", "agent_id", "tenant_id", "success"),
        _TOOL_SUMS,
        ("duration_ms",),
    ),
    Cube(
        "tenants",
        "tool_execution",
        ("service", "server_name", "tool_name", "tenant_id", "success"),
        _TOOL_SUMS,
        ("duration_ms",),
    ),
    Cube("auth", "auth_request", ("service", "server", "method", "success"), (), ("duration_ms",)),
    # One row per user and hour would be about as many as raw rows: days only, by compaction.
    Cube("users", "auth_request", ("service", "server", "user_hash", "success"), levels=("day",)),
    Cube(
        "discovery",
        "tool_discovery",
        ("service",),
        ("results_count",),
        ("duration_ms", "embedding_time_ms", "search_time_ms"),
    ),
    Cube(
        "protocol",
        "protocol_latency",
        ("service", "server_name", "client_name", "flow_step"),
        (),
        ("duration_ms",),
    ),
)

# -- end of the frozen part --------------------------------------------------------------------

#: Added by schema migration 4 (frozen there): tool *and* client, for ``tools?client=`` and
#: ``clients?tool=``. Wider than the v2 cubes, so listed after them: ``cube_for`` takes the
#: first fit.
_V4_CUBES: tuple[Cube, ...] = (
    Cube(
        "tool_clients",
        "tool_execution",
        ("service", "server_name", "tool_name", "client_name", "success"),
        _TOOL_SUMS,
        ("duration_ms",),
    ),
)
#: Added by schema migration 5 (frozen there): the registry's operations and health checks.
_V5_CUBES: tuple[Cube, ...] = (
    Cube(
        "registry",
        "registry_operation",
        ("service", "operation", "resource_type", "success"),
        (),
        ("duration_ms",),
    ),
    Cube("health", "health_check", ("service", "endpoint", "healthy"), (), ("duration_ms",)),
)
CUBES: tuple[Cube, ...] = _V2_CUBES + _V4_CUBES + _V5_CUBES

TABLES = tuple(cube.table(level) for cube in CUBES for level in cube.levels)
RAW_TABLE = {kind: schema.TABLE_OF_TYPE[kind] for kind in dict.fromkeys(c.kind for c in CUBES)}
#: Integer dimensions; a missing one is stored as -1 (a missing text dimension as ''): primary
#: keys hold no NULL.
INT_DIMS = frozenset({"success", "healthy"})
MIN_MAX = ("_min", "_max")


def missing_value(dim: str) -> int | str:
    """What a rollup key holds for an absent dimension ``dim``."""
    return -1 if dim in INT_DIMS else ""


def merge_function(column: str) -> str:
    """The SQL aggregate that merges state ``column`` over rows: min, max or sum."""
    return "min" if column.endswith("_min") else "max" if column.endswith("_max") else "sum"


def sql_type(column: str) -> str:
    """The logical type of a state column: ``real`` for calls, sums, minima and maxima, else
    ``integer``; each backend spells it."""
    return "real" if column == "calls" or column.endswith(("_sum", *MIN_MAX)) else "integer"


def bucket_of(value_ms: float) -> int:
    """Index of the latency bucket holding ``value_ms``: ``BOUNDS_MS[i-1] < v <= BOUNDS_MS[i]``."""
    return bisect_left(BOUNDS_MS, value_ms)


# -- accumulation (ingest, and the raw ends of a query range) ----------------------------------


class _Shape:
    """How one cube's states are built, merged and written."""

    def __init__(self, cube: Cube, dims: Sequence[str] | None = None) -> None:
        self.cube = cube
        self.dims = tuple(dims if dims is not None else cube.dims)
        pos = cube.positions
        self.sums = [(pos[c], 2 + i) for i, c in enumerate(cube.sums)]
        self.hists = [(pos[h], cube.hist_offset(h)) for h in cube.hists]
        self.size = 2 + len(cube.sums) + len(cube.hists) * (4 + NBUCKETS)
        template: list[Any] = [0] * self.size
        self.mins = [o + 2 for _, o in self.hists]
        self.maxs = [o + 3 for _, o in self.hists]
        for i in self.mins:
            template[i] = math.inf
        for i in self.maxs:
            template[i] = -math.inf
        self.template = template
        self.additive = [i for i in range(self.size) if i not in self.mins and i not in self.maxs]

    def merge(self, into: list[Any], other: Sequence[Any]) -> None:
        for i in self.additive:
            into[i] += other[i]
        for i in self.mins:
            if other[i] is not None and (into[i] is None or other[i] < into[i]):
                into[i] = other[i]
        for i in self.maxs:
            if other[i] is not None and (into[i] is None or other[i] > into[i]):
                into[i] = other[i]

    def coarsen(
        self, acc: dict[tuple[Any, ...], list[Any]], width: int
    ) -> dict[tuple[Any, ...], list[Any]]:
        out: dict[tuple[Any, ...], list[Any]] = {}
        for key, st in acc.items():
            coarse = (key[0] - key[0] % width, *key[1:])
            have = out.get(coarse)
            if have is None:
                out[coarse] = st.copy()
            else:
                self.merge(have, st)
        return out


_SHAPES = {cube.name: _Shape(cube) for cube in CUBES}
_BY_KIND: dict[str, list[_Shape]] = {}
for _cube in CUBES:
    _BY_KIND.setdefault(_cube.kind, []).append(_SHAPES[_cube.name])


def stored_rows(shape: _Shape, acc: dict[tuple[Any, ...], list[Any]]) -> Iterable[tuple[Any, ...]]:
    """The rows to upsert for accumulated states: ``(bucket, *dims, *state)``, absent
    dimensions as ``missing_value``, an empty minimum and maximum as NULL."""
    ints = [i + 1 for i, d in enumerate(shape.dims) if d in INT_DIMS]
    for key, st in acc.items():
        if None in key:
            k = ["" if v is None else v for v in key]
            for i in ints:
                if key[i] is None:
                    k[i] = -1
            key = tuple(k)
        for i in shape.mins:
            if st[i] == math.inf:
                st[i] = st[i + 1] = None
        yield (*key, *st)


def has_cubes(parts: Sequence[dict[str, list[tuple[Any, ...]]]]) -> bool:
    """Whether rows of ``parts`` feed any cube (if not, nothing needs the watermark)."""
    return any(_BY_KIND.get(kind) for part in parts for kind in part)


def updates(
    parts: Sequence[dict[str, list[tuple[Any, ...]]]], watermark: int
) -> Iterator[tuple[Cube, str, Iterable[tuple[Any, ...]]]]:
    """What inserting ``parts`` adds to the rollups: (cube, level, rows to upsert), where the
    rows merge into existing ones (counts and sums added, minima and maxima kept). Hour tables
    take every row; for a late event whose day is already compacted (before ``watermark``),
    the day tables too. Day-only cubes take only such late events; the rest reach them through
    compaction. Consume each item before taking the next (they share the states)."""
    kinds = {kind for part in parts for kind in part}
    for kind in kinds:
        shapes = _BY_KIND.get(kind, ())
        if not shapes:
            continue
        hourly = tuple(shape for shape in shapes if "hour" in shape.cube.levels)
        daily = [shape for shape in shapes if "hour" not in shape.cube.levels]
        rows = list(itertools.chain.from_iterable(part.get(kind, ()) for part in parts))
        maybe_late = not hourly  # (else the hour keys tell)
        for shape, hours in zip(hourly, _accumulate(hourly, rows, HOUR_MS), strict=True):
            yield shape.cube, "hour", stored_rows(shape, hours)
            if min(map(_BUCKET, hours), default=watermark) < watermark:
                maybe_late = True
                late = {k: st for k, st in hours.items() if k[0] < watermark}
                yield shape.cube, "day", stored_rows(shape, shape.coarsen(late, DAY_MS))
        if daily and maybe_late:
            late_rows = [r for r in rows if r[0] < watermark]
            for shape in daily if late_rows else ():
                (days,) = _accumulate((shape,), late_rows, DAY_MS)
                yield shape.cube, "day", stored_rows(shape, days)


_BUCKET = operator.itemgetter(0)


class _Plan:
    """How ``_accumulate`` groups the rows of a family for ``shapes`` (cubes of that family):
    by the union of their dimensions, each group's state in the layout of ``union`` (a cube
    with the union of their sums and latency columns), from which each shape takes its key
    and state."""

    def __init__(self, shapes: tuple[_Shape, ...]) -> None:
        kind = shapes[0].cube.kind
        dims = tuple(dict.fromkeys(d for shape in shapes for d in shape.dims))
        sums = tuple(dict.fromkeys(c for shape in shapes for c in shape.cube.sums))
        hists = tuple(dict.fromkeys(h for shape in shapes for h in shape.cube.hists))
        self.union = _Shape(Cube(f"_{kind}", kind, dims, sums, hists))
        pos = self.union.cube.positions
        self.key = operator.itemgetter(*(pos[d] for d in dims))
        self.single_dim = len(dims) == 1  # then ``key`` gives a value, not a tuple
        self.nullable = sorted({pos[c] for c in (*sums, *hists)})
        self.columns = [(p, operator.itemgetter(p)) for p in (schema.VALUE, *self.nullable)]
        #: Per shape: its key from a group's (bucket, *dims), and its state from a group's.
        self.shapes: list[tuple[Callable[[Any], Any], Callable[[list[Any]], list[Any]]]] = []
        for shape in shapes:
            key = operator.itemgetter(0, *(1 + dims.index(d) for d in shape.dims))
            where = [0, 1, *(2 + sums.index(c) for c in shape.cube.sums)]
            for h in shape.cube.hists:
                o = self.union.cube.hist_offset(h)
                where += range(o, o + 4 + NBUCKETS)
            project: Callable[[list[Any]], list[Any]] = list.copy
            if where != list(range(self.union.size)):
                project = functools.partial(_taken, operator.itemgetter(*where))
            self.shapes.append((key, project))


def _taken(take: Callable[[list[Any]], tuple[Any, ...]], state: list[Any]) -> list[Any]:
    return list(take(state))


@functools.lru_cache(maxsize=32)
def _plan(shapes: tuple[_Shape, ...]) -> _Plan:
    return _Plan(shapes)


_TS = operator.itemgetter(schema.TS)
#: ``_accumulate`` adds the rows one by one when the first ``_PROBE`` rows have fewer than
#: ``_GROUP_ROWS / len(shapes)`` rows per group on average: then a state per group costs more
#: than it saves (measured on bench rows: about 3 rows per group for the 5 tool cubes, 10 to 25
#: for one cube).
_PROBE, _GROUP_ROWS = 64, 16
#: ``BOUNDS_MS`` as floats: the same comparisons, faster against float values.
_FLOAT_BOUNDS = tuple(map(float, BOUNDS_MS))

if sys.version_info >= (3, 12):
    # sum() of floats is compensated (Neumaier) from 3.12 on; a state's sums are the plain
    # left-to-right additions of the rows.
    def _sum(values: Iterable[Any]) -> Any:
        return functools.reduce(operator.add, values, 0)

else:
    _sum = sum


def _accumulate(
    shapes: tuple[_Shape, ...], rows: Sequence[tuple[Any, ...]], width: int
) -> list[dict[tuple[Any, ...], list[Any]]]:
    """The states of ``rows`` for every cube in ``shapes`` (one dict per shape, keyed by time
    bucket of ``width`` and the cube's dimensions, in the order of each key's first row).

    Each state is exactly what adding the rows one by one in order gives (counts, sums left to
    right, the first of equal minima and maxima), but the work per row is C-level: the rows
    are grouped once by the union of the cubes' dimensions (and the hour, when they span more
    than one), a state is computed per group from its columns (``sum``; a stable sort for the
    minimum, maximum and bucket counts), and a cube's key that takes several groups gets the
    state of those groups' rows together, in row order (never a sum of the groups' sums: float
    addition is not associative). On the bench mix (commits of 800 rows, tool rows feeding 5
    cubes) this takes 0.8 to 1.2 us of CPU per row where the generated per-row loop over the
    cubes (``_accumulator``) took 1.4 to 2.2, on a shared 2-core machine. Rows of many small
    groups (the ``users`` cube's late rows) still take that loop: a state per group would cost
    more than it saves."""
    accs: list[dict[tuple[Any, ...], list[Any]]] = [{} for _ in shapes]
    n = len(rows)
    if not n:
        return accs
    plan = _plan(shapes)
    keys: list[Any] = list(map(plan.key, rows))
    probe = keys[:_PROBE]
    if len(set(probe)) * _GROUP_ROWS > len(probe) * len(shapes):
        _accumulator(shapes)(rows, width, accs)  # small groups: row by row costs less
        return accs
    cols = {p: list(map(get, rows)) for p, get in plan.columns}
    for p in plan.nullable:
        if cols[p][0] is None and cols[p].count(None) == n:
            cols[p] = []  # no values
    ts = list(map(_TS, rows))
    low, high = min(ts), max(ts)
    bucket = low - low % width
    one_bucket = bucket == high - high % width
    if not one_bucket:
        keys = [(t - t % width, k) for t, k in zip(ts, keys, strict=True)]
    # group -> its rows' indices, ascending
    groups: Mapping[Any, Sequence[int]]
    if keys[0] == keys[-1] and keys.count(keys[0]) == n:
        groups = {keys[0]: range(n)}
    else:
        lists: dict[Any, list[int]] = collections.defaultdict(list)
        collections.deque(map(list.append, map(lists.__getitem__, keys), range(n)), 0)
        groups = lists
    idxs = list(groups.values())
    if one_bucket:
        full = [(bucket, *((g,) if plan.single_dim else g)) for g in groups]
    else:
        full = [(t, *((g,) if plan.single_dim else g)) for t, g in groups]
    # the groups' (indices in ``idxs``) state in the layout of ``plan.union``
    states: dict[tuple[int, ...], list[Any]] = {}
    for (key_of, project), acc in zip(plan.shapes, accs, strict=True):
        members: dict[tuple[Any, ...], list[int]] = {}
        for g, key in enumerate(map(key_of, full)):
            members.setdefault(key, []).append(g)
        for key, of in members.items():
            state = states.get(tuple(of))
            if state is None:
                if len(of) == 1:
                    idx = idxs[of[0]]
                elif len(of) == len(idxs):
                    idx = range(n)
                else:
                    idx = sorted(itertools.chain.from_iterable(map(idxs.__getitem__, of)))
                state = states[tuple(of)] = _state(plan.union, cols, idx)
            acc[key] = project(state)
    return accs


Accumulator = Callable[
    [Iterable[tuple[Any, ...]], int, list[dict[tuple[Any, ...], list[Any]]]], None
]


@functools.lru_cache(maxsize=32)
def _accumulator(shapes: tuple[_Shape, ...]) -> Accumulator:
    """``accumulate(rows, width, accs)``: add ``rows`` to the states of every cube in ``shapes``
    (``accs[i]`` for ``shapes[i]``, keyed by time bucket of ``width`` and the cube's dimensions)
    in one pass over the rows, one row at a time: ``_accumulate``'s way for rows of many small
    groups (the ``users`` cube's late rows), where a state per group costs more than a row.

    Generated, as ``dataclasses`` generates ``__init__``: the column positions and state offsets
    of the cubes are literals in straight-line code, so each row is read once and each value is
    bucketed once for all the cubes of its family. A generic loop over cubes, sums and histograms
    costed twice as much per row (about 0.7 us per row and cube)."""
    hist_columns = sorted({p for shape in shapes for p, _ in shape.hists})
    sum_columns = sorted({p for shape in shapes for p, _ in shape.sums})
    names = ", ".join(f"a{i}" for i in range(len(shapes)))
    lines = [
        "def accumulate(rows, width, accs):",
        f"    {names}, = accs",
        *(f"    g{i} = a{i}.get" for i in range(len(shapes))),
        "    for r in rows:",
        "        ts = r[0]",
        "        t = ts - ts % width",
        "        calls = r[5]",
    ]
    for p in sum_columns:
        lines.append(f"        v{p} = r[{p}]")
    for p in hist_columns:
        lines += [
            f"        v{p} = r[{p}]",
            f"        if v{p} is not None:",
            f"            b{p} = bisect(BOUNDS, v{p})",
        ]
    for i, shape in enumerate(shapes):
        idx = [shape.cube.positions[d] for d in shape.dims]
        lines += [
            f"        k = (t, {', '.join(f'r[{j}]' for j in idx)})",
            f"        st = g{i}(k)",
            "        if st is None:",
            f"            st = a{i}[k] = T{i}.copy()",
            "        st[0] += 1",
            "        st[1] += calls",
        ]
        for p, o in shape.sums:
            lines += [f"        if v{p} is not None:", f"            st[{o}] += v{p}"]
        for p, o in shape.hists:
            lines += [
                f"        if v{p} is not None:",
                f"            st[{o}] += 1",
                f"            st[{o + 1}] += v{p}",
                f"            if v{p} < st[{o + 2}]:",
                f"                st[{o + 2}] = v{p}",
                f"            if v{p} > st[{o + 3}]:",
                f"                st[{o + 3}] = v{p}",
                f"            st[{o + 4} + b{p}] += 1",
            ]
    namespace: dict[str, Any] = {"bisect": bisect_left, "BOUNDS": BOUNDS_MS}
    namespace.update({f"T{i}": shape.template for i, shape in enumerate(shapes)})
    exec("\n".join(lines), namespace)
    return namespace["accumulate"]  # type: ignore[no-any-return]


def _state(shape: _Shape, cols: dict[int, list[Any]], idx: Sequence[int]) -> list[Any]:
    """The state of ``shape`` for the rows at ``idx`` (ascending), from the columns ``cols`` of
    the rows (an empty column: no values)."""
    st = shape.template.copy()
    take = _taker(idx, len(cols[schema.VALUE]))
    st[0] = len(idx)
    st[1] = _sum(take(cols[schema.VALUE]))
    for p, o in shape.sums:
        st[o] = _summed(cols[p], take)[1]
    for p, o in shape.hists:
        vs, total = _summed(cols[p], take)
        if not vs:
            continue
        s = sorted(vs)
        st[o] = len(vs)
        st[o + 1] = total
        st[o + 2] = s[0]  # a stable sort: the first of equal minima, as min() gives
        st[o + 3] = s[bisect_left(s, s[-1])]  # and the first of equal maxima
        _count_buckets(s, st, o + 4)
    return st


def _taker(idx: Sequence[int], n: int) -> Callable[[list[Any]], Sequence[Any]]:
    """``take(column)``: the values at ``idx`` (ascending, of ``n`` rows), in order."""
    if len(idx) == n:
        return _same
    if len(idx) == 1:
        return functools.partial(_one, idx[0])
    return operator.itemgetter(*idx)


def _same(col: list[Any]) -> list[Any]:
    return col


def _one(i: int, col: list[Any]) -> tuple[Any]:
    return (col[i],)


def _summed(
    col: list[Any], take: Callable[[list[Any]], Sequence[Any]]
) -> tuple[Sequence[Any], Any]:
    """The values ``take`` takes from ``col`` that are not None, in order, and their sum."""
    if not col:
        return col, 0
    vs = take(col)
    try:
        return vs, _sum(vs)
    except TypeError:  # None among them
        vs = [v for v in vs if v is not None]
        return vs, _sum(vs)


def _count_buckets(s: list[Any], st: list[Any], at: int) -> None:
    """Set ``st[at + i]`` to the number of values of ``s`` (sorted, not empty) in bucket i."""
    first, last = bisect_left(_FLOAT_BOUNDS, s[0]), bisect_left(_FLOAT_BOUNDS, s[-1])
    start = 0
    for i in range(first, last):
        end = bisect_right(s, _FLOAT_BOUNDS[i], start)
        st[at + i] = end - start
        start = end
    st[at + last] = len(s) - start


# -- queries -----------------------------------------------------------------------------------


def cube_for(kind: str, dims: Iterable[str]) -> Cube | None:
    """The smallest cube of ``kind`` holding all ``dims`` (cubes are listed narrowest first)."""
    wanted = set(dims)
    for cube in CUBES:
        if cube.kind == kind and wanted <= set(cube.dims):
            return cube
    return None


def plan(
    cube: Cube, since_ms: int, until_ms: int, watermark_ms: int, finest_ms: int | None = None
) -> list[tuple[str, int, int]]:
    """Split ``[since, until)`` into (level, start, end) segments: whole compacted days, whole
    hours, then raw rows for the rest. ``finest_ms`` (a series resolution) excludes coarser
    levels."""
    levels = [
        (name, w)
        for name, w in LEVELS.items()
        if name in cube.levels and (finest_ms is None or (w <= finest_ms and finest_ms % w == 0))
    ]
    segments: list[tuple[str, int, int]] = []

    def split(lo: int, hi: int, i: int) -> None:
        if lo >= hi:
            return
        if i == len(levels):
            segments.append(("raw", lo, hi))
            return
        name, w = levels[i]
        a, b = -(-lo // w) * w, hi // w * w
        if name == "day":
            b = min(b, watermark_ms)
        if a >= b:
            split(lo, hi, i + 1)
            return
        segments.append((name, a, b))
        split(lo, a, i + 1)
        split(b, hi, i + 1)

    split(since_ms, until_ms, 0)
    return segments


@dataclass(frozen=True, slots=True)
class Query:
    kind: str
    since_ms: int
    until_ms: int
    group: tuple[str, ...] = ()
    filters: dict[str, str | int] = field(default_factory=dict)
    series_ms: int | None = None
    #: Dimensions that must be present: rows missing one are left out, without grouping by
    #: them (``tool_calls``: the calls that name a tool, whichever tool).
    present: tuple[str, ...] = ()


def present_sql(q: Query) -> str:
    """The condition, in both dialects, that leaves out rows missing a ``q.present``
    dimension: ``AND d <> ''`` (``<> -1`` for an integer one) holds for a rollup key that has
    it and for a raw value that has it (a NULL fails it too). Column names come from the
    cubes' fixed dimension lists."""
    return "".join(f" AND {d} <> {missing_value(d)!r}" for d in q.present)


def query_shape(q: Query) -> tuple[_Shape, str]:
    """The shape of ``q``'s states and its source: ``rollup`` (the smallest cube holding the
    group, filter and present dimensions) or ``raw`` (no cube does: an ad-hoc shape over the
    raw rows)."""
    dims = (*q.group, *q.filters, *q.present)
    cube = cube_for(q.kind, dims)
    if cube is not None:
        return _SHAPES[cube.name], "rollup"
    family = next(c for c in CUBES if c.kind == q.kind)
    adhoc = Cube(family.name, q.kind, tuple(dict.fromkeys(dims)), family.sums, family.hists)
    return _Shape(adhoc), "raw"


def query_segments(
    q: Query, source: str, shape: _Shape, watermark_ms: int | None
) -> tuple[list[tuple[str, int, int]], str]:
    """The (level, start, end) segments to read for ``q`` and the source they amount to
    (``raw`` when every segment is raw, e.g. a minute series). ``watermark_ms`` is needed only
    for a ``rollup`` source."""
    if source == "rollup":
        assert watermark_ms is not None
        segments = plan(shape.cube, q.since_ms, q.until_ms, watermark_ms, q.series_ms)
    else:
        segments = [("raw", q.since_ms, q.until_ms)]
    if all(level == "raw" for level, _, _ in segments):
        source = "raw"
    return segments, source


def fold(
    shape: _Shape,
    rows: Iterable[Sequence[Any]],
    keylen: int,
    out: dict[tuple[Any, ...], list[Any]],
) -> None:
    """Merge segment result rows ``(*key, *state)`` into ``out`` (an empty minimum/maximum
    comes as NULL)."""
    for row in rows:
        key = tuple(row[:keylen])
        st = list(row[keylen:])
        for i in shape.mins:
            if st[i] is None:
                st[i], st[i + 1] = math.inf, -math.inf
        have = out.get(key)
        if have is None:
            out[key] = st
        else:
            shape.merge(have, st)


def finish(shape: _Shape, out: dict[tuple[Any, ...], list[Any]]) -> None:
    """Empty minima and maxima back to None once every segment is folded."""
    for st in out.values():
        for i in shape.mins:
            if st[i] == math.inf:
                st[i] = st[i + 1] = None


def merge(cube: Cube, into: list[Any], other: Sequence[Any]) -> None:
    """Add state ``other`` to ``into`` (both shaped by ``cube``)."""
    _shape(cube).merge(into, other)


@functools.lru_cache(maxsize=64)
def _shape(cube: Cube) -> _Shape:
    shape = _SHAPES.get(cube.name)
    return shape if shape is not None and shape.cube == cube else _Shape(cube)


def percentile(cube: Cube, state: Sequence[Any], column: str, q: float) -> float | None:
    """The ``q`` quantile (nearest rank) of ``column`` from the bucket counts, interpolated
    inside its bucket and clamped to the observed min and max: it lies in the bucket that holds
    the exact value."""
    o = cube.hist_offset(column)
    n = state[o]
    if not n:
        return None
    low_seen, high_seen = state[o + 2], state[o + 3]
    rank = max(1, math.ceil(q * n))
    seen = 0
    for i in range(NBUCKETS):
        c = state[o + 4 + i]
        if seen + c >= rank:
            lo = BOUNDS_MS[i - 1] if i else 0.0
            hi = BOUNDS_MS[i] if i < len(BOUNDS_MS) else high_seen
            lo, hi = max(lo, low_seen), min(hi, high_seen)
            return float(lo + (hi - lo) * (rank - seen) / c)
        seen += c
    return float(high_seen)
