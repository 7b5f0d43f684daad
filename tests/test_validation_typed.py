"""The typed decode (one msgspec pass into a struct per metric type) gives exactly what the
item-by-item path gives, for any body: the same rows, the same rejections, the same errors."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from metrics_service.errors import ApiError
from metrics_service.settings import Settings
from metrics_service.storage import schema
from metrics_service.validation import DIMENSION_ALIASES, METRIC_TYPES, Batch, Validator

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
from _workload import metric

NOW = 1_800_000_000.0


class ItemByItem(Validator):
    """The service's validator with the typed decode switched off."""

    def _build_typed(self, envelope: Any) -> Batch | None:
        return None


class Counting(Validator):
    """The service's validator, counting the bodies the typed decode took whole."""

    typed = 0

    def _build_typed(self, envelope: Any) -> Batch | None:
        batch = super()._build_typed(envelope)
        self.typed += batch is not None
        return batch


def _pair(**overrides: Any) -> tuple[Counting, ItemByItem]:
    s = Settings(db_path=Path("unused.db"), **overrides)
    return Counting(s, clock=lambda: NOW), ItemByItem(s, clock=lambda: NOW)


def _outcome(v: Validator, body: bytes) -> Any:
    try:
        batch = v.decode(body)
    except ApiError as error:
        return ("error", error.status, str(error), getattr(error, "details", None))
    return (batch.service, batch.rows, [r.as_dict() for r in batch.rejections])


names = st.sampled_from(
    sorted(
        {n for spec in schema.DIMENSIONS.values() for n, _ in spec}
        | {a for aliases in DIMENSION_ALIASES.values() for a in aliases}
        | {"extra_dim", "span_kind"}
    )
)
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-3, max_value=2**63),
    st.floats(min_value=-10.0, max_value=2e8, allow_nan=False),
    st.sampled_from(["", "x", "tools/call", "initialize", "initialize_to_tools_list", "404"]),
    st.text(max_size=5),
    st.just("y" * 300),
)
metrics = st.fixed_dictionaries(
    {"type": st.sampled_from([*METRIC_TYPES, "bogus"])},
    optional={
        "value": st.one_of(st.floats(min_value=-5, max_value=1e5, allow_nan=False), st.none()),
        "duration_ms": st.one_of(st.floats(min_value=-1, max_value=1e8), st.integers(0, 10)),
        "timestamp": st.one_of(
            st.floats(min_value=NOW - 90 * 86_400, max_value=NOW + 600),
            st.just(NOW * 1000),
            st.sampled_from(["2027-01-15T08:00:00Z", "2027-01-15", "not a time"]),
        ),
        "dimensions": st.dictionaries(names, scalars, max_size=8),
        "metadata": st.dictionaries(
            st.sampled_from(
                [
                    "agent_id",
                    "input_tokens",
                    "output_tokens",
                    "trace_id",
                    "error_code",
                    "input_size_bytes",
                    "search_time_ms",
                    "faiss_search_time_ms",
                    "k",
                ]
            ),
            scalars,
            max_size=3,
        ),
    },
)


@settings(max_examples=400, deadline=None)
@given(items=st.lists(metrics, min_size=1, max_size=6), version=st.sampled_from([None, "1.2"]))
def test_any_body_gives_the_same_rows_and_rejections_either_way(
    items: list[dict[str, Any]], version: str | None
) -> None:
    typed, item_by_item = _pair()
    body = json.dumps({"service": "svc", "version": version, "metrics": items}).encode()
    assert _outcome(typed, body) == _outcome(item_by_item, body)


@pytest.mark.parametrize(
    ("overrides", "typed_bodies"),
    [({}, 1), ({"max_dimensions": 4}, 0), ({"max_string_length": 8}, 0)],
)
def test_the_bench_workload_takes_the_typed_decode_and_matches(
    overrides: dict[str, Any], typed_bodies: int
) -> None:
    """With the defaults the workload is decoded typed; a limit the typed structs cannot hold
    (fewer dimensions allowed than a type has) or one its values break falls back, and agrees."""
    typed, item_by_item = _pair(**overrides)
    body = json.dumps(
        {"service": "svc", "metrics": [metric(i, NOW - i) for i in range(40)]}
    ).encode()
    assert _outcome(typed, body) == _outcome(item_by_item, body)
    assert typed.typed == typed_bodies


class Generated(Validator):
    """The service's validator, counting the metrics its generated builders built."""

    built = 0

    def __init__(self, s: Settings, clock: Any) -> None:
        super().__init__(s, clock=clock)
        for variant, (kind, plan, build) in self._plans.items():
            self._plans[variant] = (kind, plan, self._counted(build))

    def _counted(self, build: Any) -> Any:
        def counted(*args: Any) -> Any:
            row = build(*args)
            self.built += row is not None
            return row

        return counted


def test_the_generated_builders_build_the_bench_workload_as_the_general_path_does() -> None:
    """Every metric of the workload, with metadata or without, takes its type's generated
    builder (none is left to the general path), and the rows are those of the item-by-item
    path."""
    s = Settings(db_path=Path("unused.db"))
    generated, item_by_item = Generated(s, clock=lambda: NOW), ItemByItem(s, clock=lambda: NOW)
    meta = {
        "trace_id": "4bf92f3577b34da6a3ce929d0e0e4736",
        "span_id": "00f067aa0ba902b7",
        "agent_id": "a1",
        "input_tokens": 12,
        "error_code": 500,
        "search_time_ms": 2.5,
        "faiss_search_time_ms": 9,
        "note": {"nested": [1, 2]},
    }
    items = [
        *(metric(i, NOW - i) for i in range(40)),
        *({**metric(i), "timestamp": None} for i in range(4)),
        *({**metric(i, NOW), "metadata": meta} for i in range(8)),
    ]
    body = json.dumps({"service": "svc", "version": "2", "metrics": items}).encode()
    assert _outcome(generated, body) == _outcome(item_by_item, body)
    assert generated.built == len(items)


_VALUES = {
    "str": st.text(max_size=4) | st.sampled_from(["tools/call", "initialize", "tools/list"]),
    "bool": st.booleans(),
    "count": st.integers(min_value=0, max_value=10**6),
    "count_na": st.integers(min_value=-1, max_value=50),
    "code": st.integers(min_value=0, max_value=600) | st.sampled_from(["E1", "timeout"]),
    "ms": st.floats(min_value=0, max_value=5000) | st.integers(min_value=0, max_value=5000),
}


@st.composite
def typed_metric(draw: st.DrawFn) -> dict[str, Any]:
    kind = draw(st.sampled_from([k for k in METRIC_TYPES if schema.DIMENSIONS[k]]))
    spec = schema.DIMENSIONS[kind]
    chosen = draw(st.lists(st.sampled_from(spec), unique=True, max_size=len(spec)))
    item: dict[str, Any] = {
        "type": kind,
        "timestamp": draw(st.floats(min_value=NOW - 86_400, max_value=NOW)),
        "dimensions": {n: draw(st.none() | _VALUES[k]) for n, k in chosen},
    }
    if draw(st.booleans()):
        item["duration_ms"] = draw(st.floats(min_value=0, max_value=1e4))
    if draw(st.booleans()):
        item["metadata"] = {"input_tokens": draw(st.integers(0, 99)), "agent_id": "a"}
    return item


@settings(max_examples=300, deadline=None)
@given(items=st.lists(typed_metric(), min_size=1, max_size=8))
def test_typed_bodies_take_the_typed_decode_whenever_every_item_is_valid(
    items: list[dict[str, Any]],
) -> None:
    typed, item_by_item = _pair()
    body = json.dumps({"service": "svc", "metrics": items}).encode()
    got = _outcome(typed, body)
    assert got == _outcome(item_by_item, body)
    assert typed.typed == (1 if not got[2] else 0)


@pytest.mark.parametrize(
    ("kind", "dims"),
    [
        ("tool_discovery", {"results_count": -1, "query": "q"}),  # "not available"
        ("tool_discovery", {"results_count": 0, "top_k_services": 5, "top_n_tools": 2}),
        ("tool_discovery", {"embedding_time_ms": 3, "search_time_ms": 1.5}),
        ("auth_request", {"success": False, "error_code": 401}),
        ("auth_request", {"success": True, "error_code": "E_EXPIRED"}),
        ("tool_execution", {"tool_name": "initialize", "success": True}),  # a method as tool
        ("tool_execution", {"tool_name": "t", "success": True, "input_size_bytes": 0}),
        ("protocol_latency", {"flow_step": "initialize_to_tools_list"}),
        ("health_check", {"status_code": 200, "healthy": True}),
        ("registry_operation", {"operation": "register", "success": False}),
    ],
)
def test_each_conversion_of_the_typed_decode_matches(kind: str, dims: dict[str, Any]) -> None:
    typed, item_by_item = _pair()
    body = json.dumps(
        {
            "service": "svc",
            "metrics": [{"type": kind, "timestamp": NOW, "dimensions": dims}],
        }
    ).encode()
    assert _outcome(typed, body) == _outcome(item_by_item, body)
    assert typed.typed == 1


def test_an_extra_dimension_or_an_alias_beside_its_column_falls_back() -> None:
    typed, item_by_item = _pair()
    for dims in (
        {"tool_name": "t", "method": "tools/call", "success": True, "mine": 1},
        {"top_k": 3, "top_k_services": 4},
        {"top_k_services": 4, "top_k": 3},
    ):
        kind = "tool_discovery" if "top_k" in dims else "tool_execution"
        body = json.dumps(
            {"service": "svc", "metrics": [{"type": kind, "timestamp": NOW, "dimensions": dims}]}
        ).encode()
        assert _outcome(typed, body) == _outcome(item_by_item, body)
    assert typed.typed == 0
