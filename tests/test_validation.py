"""The validator on its own: rows per family, precise rejections, limits."""

from __future__ import annotations

import json
from typing import Any

import pytest

from metrics_service import Settings
from metrics_service.errors import BadRequest
from metrics_service.validation import Validator

NOW = 1_800_000_000.0


@pytest.fixture
def validator(tmp_path: Any) -> Validator:
    return Validator(
        Settings(
            db_path=tmp_path / "m.db", max_string_length=32, max_dimensions=4, max_metadata_bytes=64
        ),
        clock=lambda: NOW,
    )


def decode(v: Validator, metrics: list[Any], **envelope: Any) -> Any:
    body = {"service": "svc", "version": "1", "metrics": metrics, **envelope}
    return v.decode(json.dumps(body).encode())


def rejected(v: Validator, metric: dict[str, Any]) -> tuple[str, str]:
    batch = decode(v, [metric])
    assert batch.accepted == 0, batch
    (rej,) = batch.rejections
    return rej.field, rej.rule


def test_row_layout_of_a_tool_execution(validator: Validator) -> None:
    batch = decode(
        validator,
        [
            {
                "type": "tool_execution",
                "timestamp": "2027-01-15T08:00:00+01:00",
                "duration_ms": 5,
                "dimensions": {
                    "method": "tools/call",
                    "tool_name": "t",
                    "success": False,
                    "extra": "e",
                },
                "metadata": {"agent_id": "a1", "output_tokens": 7},
            }
        ],
        instance_id="i-1",
    )
    ((kind, rows),) = batch.rows.items()
    assert kind == "tool_execution"
    row = rows[0]
    assert row[0] == int(NOW * 1000) - 3_600_000  # NOW is 2027-01-15T08:00:00Z
    assert row[1] == NOW * 1000 and row[2:5] == ("svc", "1", "i-1")
    assert row[5:7] == (1.0, 5.0)
    assert row[7:17] == ("tools/call", "t", None, None, None, 0, None, None, None, None)
    assert row[17:20] == (None, None, None)  # server_path, user_hash, error_code
    assert row[20:22] == (None, None)  # protocol_version, error_type (migration 7)
    # agent_id, tenant_id, input_tokens, output_tokens, trace_id, span_id (migration 7)
    assert row[-8:-2] == ("a1", None, None, 7, None, None)
    assert json.loads(row[-2]) == {"extra": "e"}
    assert json.loads(row[-1]) == {"agent_id": "a1", "output_tokens": 7}


def test_iso_timestamps_are_utc(validator: Validator) -> None:
    batch = decode(
        validator,
        [
            {"type": "custom", "timestamp": "2027-01-15T08:00:00+01:00"},
            {"type": "custom", "timestamp": "2027-01-15T07:00:00"},
            {"type": "custom", "timestamp": "2027-01-15T07:00:00Z"},
        ],
    )
    assert len({row[0] for row in batch.rows["custom"]}) == 1


@pytest.mark.parametrize(
    ("metric", "field", "rule"),
    [
        ({"type": "custom", "value": 1e300}, "value", "le"),
        ({"type": "custom", "value": True}, "value", "type"),
        ({"type": "custom", "duration_ms": 1e12}, "duration_ms", "le"),
        ({"type": "custom", "timestamp": "yesterday"}, "timestamp", "format"),
        ({"type": "custom", "timestamp": NOW + 3600}, "timestamp", "max_future_skew"),
        ({"type": "custom", "timestamp": NOW - 91 * 86_400}, "timestamp", "older_than_retention"),
        ({"type": "custom", "timestamp": 12}, "timestamp", "older_than_retention"),
        ({"type": "custom", "dimensions": {"k": "x" * 33}}, "dimensions", "max_length"),
        (
            {"type": "custom", "dimensions": {"a": 1, "b": 2, "c": 3, "d": 4, "e": 5}},
            "dimensions",
            "max_length",
        ),
        ({"type": "custom", "dimensions": {"k": {"nested": 1}}}, "dimensions", "type"),
        ({"type": "custom", "metadata": {"blob": "x" * 100}}, "metadata", "max_bytes"),
        ({"type": "custom", "metadata": []}, "metadata", "type"),
        ({"value": 1}, "type", "required"),
        (
            {"type": "tool_discovery", "dimensions": {"results_count": -2}},
            "dimensions.results_count",
            "integer",
        ),
        (
            {"type": "tool_discovery", "dimensions": {"results_count": 2.5}},
            "dimensions.results_count",
            "integer",
        ),
        (
            {"type": "tool_discovery", "dimensions": {"search_time_ms": -2}},
            "dimensions.search_time_ms",
            "range",
        ),
        (
            {"type": "tool_execution", "dimensions": {"method": "tools/call", "success": True}},
            "dimensions.tool_name",
            "required",
        ),
        (
            {
                "type": "tool_execution",
                "dimensions": {"method": "tools/call", "tool_name": "t", "success": True},
                "metadata": {"input_tokens": "many"},
            },
            "metadata.input_tokens",
            "integer",
        ),
        ({"type": "protocol_latency", "value": 5}, "dimensions.flow_step", "required"),
        (
            {"type": "protocol_latency", "value": 1e9, "dimensions": {"flow_step": "a"}},
            "value",
            "le",
        ),
        ({"type": "auth_request", "dimensions": {"success": 1}}, "dimensions.success", "type"),
    ],
)
def test_rejections_name_field_and_rule(
    validator: Validator, metric: dict[str, Any], field: str, rule: str
) -> None:
    assert rejected(validator, metric) == (f"metrics[0].{field}", rule)


def test_protocol_latency_takes_value_as_seconds_when_no_duration(validator: Validator) -> None:
    # As the MCP Gateway Registry's auth server sends it: seconds in value, no duration_ms.
    batch = decode(
        validator,
        [
            {
                "type": "protocol_latency",
                "value": 0.0425,
                "dimensions": {"flow_step": "initialize->tools/call"},
            }
        ],
    )
    row = batch.rows["protocol_latency"][0]
    assert row[5] == 1.0 and row[6] == pytest.approx(42.5)


def test_unknown_fields_are_ignored_and_unknown_dimensions_kept(validator: Validator) -> None:
    batch = decode(
        validator,
        [
            {
                "type": "auth_request",
                "colour": "red",
                "dimensions": {"success": True, "region": "eu"},
            }
        ],
        extra_field=1,
    )
    row = batch.rows["auth_request"][0]
    assert json.loads(row[-2]) == {"region": "eu"}


def test_overflowing_numbers_are_rejected_not_infinite(validator: Validator) -> None:
    body = (
        b'{"service":"svc","version":"1","metrics":'
        b'[{"type":"custom","value":1e400},{"type":"custom","value":-1e999}]}'
    )
    batch = validator.decode(body)
    assert [(r.field, r.rule) for r in batch.rejections] == [
        ("metrics[0].value", "finite"),
        ("metrics[1].value", "finite"),
    ]


@pytest.mark.parametrize(
    "body",
    [b"", b"{", b"nul", b'{"a":NaN}', b'{"a":Infinity}', b"\xc3\x28", b'{"a":' + b"[" * 100_000],
)
def test_malformed_bodies_raise_bad_request(validator: Validator, body: bytes) -> None:
    with pytest.raises(BadRequest):
        validator.decode(body)


def test_deep_nesting_in_metadata_is_a_clean_error(validator: Validator) -> None:
    deep = (
        '{"service":"svc","version":"1","metrics":[{"type":"custom","metadata":{"a":'
        + "[" * 50_000
        + "]" * 50_000
        + "}}]}"
    )
    # msgspec's decoder stops at its depth limit: the whole body is refused (400), clearly.
    with pytest.raises(BadRequest, match="nested too deeply"):
        validator.decode(deep.encode())
    # Nesting well within the limit is just metadata.
    shallow = deep.replace("[" * 50_000 + "]" * 50_000, "[" * 10 + "]" * 10)
    shallow = shallow.replace('"type":"custom"', '"type":"custom","value":1')
    batch = validator.decode(shallow.encode())
    assert batch.accepted == 1 and not batch.rejections
