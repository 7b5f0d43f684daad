"""Validation of ``POST /metrics`` bodies, item by item, into rows for storage.

Three paths, each taken only when the one before it cannot take the body:

1. Typed: the whole body in one msgspec decode into a struct per metric type (a tagged union on
   ``type``) whose dimensions are a struct of that type's typed columns, so msgspec's C code
   checks every value and the row is read off the struct (``_Plan``). Any extra dimension, any
   invalid item, a dimension next to its alias: the next path.
2. Fast: one decode into a generic metric struct with dimensions as a mapping; the dimensions
   are checked in Python (``Validator._row``), extras kept as JSON.
3. Item by item: the body decoded loosely and each item on its own, so that valid items are
   kept and every rejected item is named with its index, field and rule (as OTLP's partial
   success does).

All three share the column rules after the dimensions (``Validator._complete``) and the limits
of the structs, and tests/test_validation_typed.py checks that the typed path gives exactly
what the others give for any body.
"""

from __future__ import annotations

import operator
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Annotated, Any

import msgspec
from msgspec import Meta, Struct

from metrics_service.errors import BadRequest, InvalidPayload
from metrics_service.settings import Settings, valid_service_name
from metrics_service.storage import schema

METRIC_TYPES = (
    "auth_request",
    "tool_execution",
    "tool_discovery",
    "protocol_latency",
    "registry_operation",
    "health_check",
    "custom",
)

#: Every rule an item can be rejected for (the ``rule`` of a rejection; the ``reason`` label of
#: ``metrics_service_metrics_rejected_total``, exported at 0 from start for each of these).
REJECTION_RULES = (
    "charset",
    "enum",
    "finite",
    "format",
    "ge",
    "integer",
    "invalid",
    "le",
    "max_bytes",
    "max_future_skew",
    "max_length",
    "min_length",
    "older_than_retention",
    "range",
    "required",
    "type",
)

#: dimension name -> kind, per metric type; these become typed columns, in this order (the
#: column registry, ``storage/schema.py``, is their one source).
DIMENSIONS = schema.DIMENSIONS
REQUIRED: dict[str, tuple[str, ...]] = {
    "auth_request": ("success",),
    "tool_execution": ("method", "success"),
    "tool_discovery": (),
    "protocol_latency": ("flow_step",),
    "registry_operation": ("operation",),
    "health_check": (),
    "custom": (),
}
#: metadata keys that also get typed columns in ``tool_metrics``.
METADATA_COLUMNS = schema.METADATA_COLUMNS

#: Dimension names the MCP Gateway Registry's clients use for a typed column -> that column.
DIMENSION_ALIASES: dict[str, dict[str, str]] = {
    "tool_discovery": {"top_k_services": "top_k", "top_n_tools": "top_n"},
}
#: Metadata keys that fill a typed column the dimensions left empty (the MCP Gateway Registry's
#: clients put these in ``metadata``), per metric type: metadata key -> column.
METADATA_TO_COLUMN: dict[str, dict[str, str]] = {
    "auth_request": {"error_code": "error_code"},
    "tool_execution": {
        "error_code": "error_code",
        "input_size_bytes": "input_size_bytes",
        "output_size_bytes": "output_size_bytes",
    },
    "tool_discovery": {
        "embedding_time_ms": "embedding_time_ms",
        "search_time_ms": "search_time_ms",
        "faiss_search_time_ms": "search_time_ms",
    },
    "registry_operation": {"error_code": "error_code"},
    "health_check": {"error_code": "error_code"},
}
#: The MCP Gateway Registry's protocol flow step names -> ours.
FLOW_STEP_ALIASES = {
    "initialize_to_tools_list": "initialize->tools/list",
    "tools_list_to_tools_call": "tools/list->tools/call",
    "full_protocol_flow": "initialize->tools/call",
}
#: A ``tool_execution`` whose ``tool_name`` is one of these MCP methods other than tools/call
#: (the reference's clients report ``tools/list`` and ``initialize`` that way), with no method
#: or that same method, is a request for that method naming no tool; any other tool name without
#: a method is a ``tools/call`` of that tool.
MCP_METHODS = frozenset(
    (
        "initialize",
        "ping",
        "tools/list",
        "tools/call",
        "resources/list",
        "resources/read",
        "resources/templates/list",
        "prompts/list",
        "prompts/get",
        "completion/complete",
        "logging/setLevel",
    )
)

_NOT_TOOLS = MCP_METHODS - {"tools/call"}

MAX_DURATION_MS = 86_400_000.0  # one day
MAX_VALUE = 1e15
_MAX_COUNT = 2**62
#: The largest count a typed column takes.
MAX_COUNT = _MAX_COUNT
_TS_MIN_S = 946_684_800.0  # 2000-01-01: anything older is a unit mistake, not an event time
_PATH_RE = re.compile(r" - at `\$(?P<path>[^`]*)`")
_KEY_PATH_RE = re.compile(r" - at `key` in `\$(?P<path>[^`]*)`")


@dataclass(frozen=True, slots=True)
class Rejection:
    index: int
    field: str
    rule: str
    message: str

    def as_dict(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "field": self.field,
            "rule": self.rule,
            "message": self.message,
        }


@dataclass(slots=True)
class Batch:
    """What one request contributes: rows per metric type, ready for ``executemany``."""

    service: str
    rows: dict[str, list[tuple[Any, ...]]] = field(default_factory=dict)
    rejections: list[Rejection] = field(default_factory=list)

    @property
    def accepted(self) -> int:
        return sum(len(r) for r in self.rows.values())


class _Reject(Exception):
    def __init__(self, field: str, rule: str, message: str) -> None:
        self.field, self.rule, self.message = field, rule, message


_FINITE = Annotated[float, Meta(ge=-MAX_VALUE, le=MAX_VALUE)]


#: The fields of a metric besides its type and dimensions (name, type, default): value,
#: duration_ms, timestamp, then metadata.
_COMMON_FIELDS: list[tuple[str, Any, Any]] = [
    ("value", _FINITE, 1.0),
    ("duration_ms", Annotated[float, Meta(ge=0, le=MAX_DURATION_MS)] | None, None),
    ("timestamp", Annotated[str, Meta(max_length=64)] | _FINITE | None, None),
    ("metadata", dict[str, Any], {}),
]


def _dimensions_type(s: Settings) -> Any:
    """Dimensions as a mapping: any name, a scalar value."""
    text = Annotated[str, Meta(max_length=s.max_string_length)]
    dim_value = text | int | _FINITE | bool | None
    return Annotated[
        dict[Annotated[str, Meta(max_length=64)], dim_value], Meta(max_length=s.max_dimensions)
    ]


def _metric_struct(
    name: str, dims: Any, default: Any, head: tuple[Any, ...] = (), **config: Any
) -> type[Struct]:
    """A metric: ``head`` (required fields first), then the common fields around
    ``dimensions`` of type ``dims``."""
    fields = [*head, *_COMMON_FIELDS[:3], ("dimensions", dims, default), _COMMON_FIELDS[3]]
    return msgspec.defstruct(name, fields, **config)


def _envelope(s: Settings, name: str, item: Any) -> type[Struct]:
    """The request body around a list of ``item``."""
    return msgspec.defstruct(
        name,
        [
            ("service", Annotated[str, Meta(min_length=1, max_length=64)]),
            (
                "metrics",
                Annotated[list[item], Meta(min_length=1, max_length=s.max_metrics_per_request)],
            ),
            ("version", Annotated[str, Meta(max_length=64)] | None, None),
            ("instance_id", Annotated[str, Meta(max_length=128)] | None, None),
        ],
    )


def _structs(s: Settings) -> tuple[type[Struct], type[Struct], type[Struct]]:
    # Built with defstruct: the limits come from settings, and string annotations (this module
    # uses postponed evaluation) could not see these local types.
    metric = _metric_struct("Metric", _dimensions_type(s), {}, head=(("type", str),))
    return _envelope(s, "Envelope", metric), _envelope(s, "LooseEnvelope", msgspec.Raw), metric


#: A column kind -> the type of its typed field: exactly the values ``Validator._row`` accepts
#: for it (``count_na``'s -1 and ``code``'s integers converted after decoding).
def _field_type(kind: str, text: Any) -> Any:
    if kind == "str":
        return text | None
    if kind == "bool":
        return bool | None
    if kind == "count":
        return Annotated[int, Meta(ge=0, le=_MAX_COUNT)] | None
    if kind == "count_na":
        return Annotated[int, Meta(ge=-1, le=_MAX_COUNT)] | None
    if kind == "code":
        return text | int | None
    return Annotated[float, Meta(ge=0, le=MAX_DURATION_MS)] | None  # "ms"


def _typed_names(kind: str) -> list[tuple[str, str]]:
    """The typed dimensions of ``kind`` (name, column kind) in column order, then its aliases."""
    spec = DIMENSIONS[kind]
    kinds = dict(spec)
    return [*spec, *((a, kinds[c]) for a, c in DIMENSION_ALIASES.get(kind, {}).items())]


def _typed_envelope(s: Settings) -> type[Struct]:
    """The whole body in one decode, each metric a struct tagged by its ``type`` whose
    dimensions are a struct of the type's typed columns (unknown dimensions refused, so that the
    caller falls back to the path that keeps them). Built only for types whose dimensions fit
    ``max_dimensions``; a metric of another type fails the decode the same way."""
    text = Annotated[str, Meta(max_length=s.max_string_length)]
    variants = []
    for kind in DIMENSIONS:
        names = _typed_names(kind)
        dims: Any
        if not names:  # custom: every dimension is an extra, kept as a mapping
            dims, default = _dimensions_type(s), {}
        elif len(names) <= s.max_dimensions:
            dims = msgspec.defstruct(
                f"{kind}_dimensions",
                [(n, _field_type(k, text), None) for n, k in names],
                forbid_unknown_fields=True,
            )
            default = msgspec.field(default_factory=dims)
        else:
            continue
        variants.append(_metric_struct(f"{kind}_metric", dims, default, tag_field="type", tag=kind))
    union: Any = variants[0]
    for v in variants[1:]:
        union = union | v
    return _envelope(s, "TypedEnvelope", union)


def _rule_of(message: str) -> str:
    if message.startswith("Object missing required field"):
        return "required"
    if "got `" in message or message.startswith("Expected `"):
        if " of length <= " in message:
            return "max_length"
        if " of length >= " in message:
            return "min_length"
        if " >= " in message:
            return "ge"
        if " <= " in message:
            return "le"
        return "type"
    if "out of range" in message:
        return "finite"
    return "invalid"


def _describe(err: msgspec.ValidationError, prefix: str) -> tuple[str, str, str]:
    """msgspec's message -> (field path, rule, message without the path)."""
    text = str(err)
    key = _KEY_PATH_RE.search(text)
    match = key or _PATH_RE.search(text)
    path = match.group("path") if match else ""
    message = text[: match.start()] if match else text
    if message.startswith("Object missing required field `"):
        missing = message.split("`")[1]
        path = f"{path}.{missing}"
    path = path.replace("[...]", "")
    return (prefix + path).lstrip("."), _rule_of(message), message


class Validator:
    """Turns request bodies into a :class:`Batch`; one instance per app (limits from settings)."""

    def __init__(self, settings: Settings, clock: Callable[[], float] = time.time) -> None:
        self._settings = settings
        self._clock = clock
        envelope, loose, metric = _structs(settings)
        self._decoder = msgspec.json.Decoder(envelope)
        self._loose_decoder = msgspec.json.Decoder(loose)
        self._item_decoder = msgspec.json.Decoder(metric)
        self._metric = metric
        self._encode = msgspec.json.Encoder().encode
        typed = _typed_envelope(settings)
        self._typed_decoder = msgspec.json.Decoder(typed)
        #: metric struct -> (type, its typed-row plan, its generated row builder).
        self._plans: dict[type[Any], tuple[str, _Plan, _Builder]] = {}
        for variant in _variants(typed):
            kind = str(variant.__struct_config__.tag)
            self._plans[variant] = (kind, _Plan(kind), _builder(kind, settings.max_metadata_bytes))

    def add_items(
        self, batch: Batch, head: tuple[str, str, str | None], items: list[tuple[int, Any]]
    ) -> None:
        """Validate events built in the process (OTLP spans mapped to events) into ``batch``
        by the same rules as posted items; ``items`` pairs each with its span's index."""
        received_ms, oldest_s, newest_s = self._window()
        convert, metric, rows = msgspec.convert, self._metric, batch.rows
        for index, item in items:
            try:
                try:
                    m = convert(item, metric)
                except msgspec.ValidationError as exc:
                    raise _Reject(*_describe(exc, "")) from None
                _refuse_nul(m)
                table, row = self._row(m, head, received_ms, oldest_s, newest_s)
            except _Reject as rej:
                batch.rejections.append(
                    Rejection(
                        index, f"spans[{index}].{rej.field}".rstrip("."), rej.rule, rej.message
                    )
                )
                continue
            bucket = rows.get(table)
            if bucket is None:
                rows[table] = bucket = []
            bucket.append(row)

    def decode(self, body: bytes) -> Batch:
        """Validate ``body``: raise for a body of the wrong shape, else return the batch with
        its valid rows and its rejected items."""
        # The structs are built at run time (defstruct), so their fields are not known statically.
        envelope: Any
        # First the typed decode: every metric of a known type with only typed dimensions, all
        # valid. Anything else (an extra dimension, an invalid item, a body that is not JSON)
        # takes the paths below, which keep extras and name each rejection.
        # A string holding U+0000 (escaped in JSON, the only way it can be there) is checked
        # item by item: PostgreSQL cannot store it, so no backend takes it (rule ``charset``).
        nul = _NUL_ESCAPE in body
        try:
            envelope = None if nul else self._typed_decoder.decode(body)
        except (msgspec.ValidationError, msgspec.DecodeError, UnicodeDecodeError, RecursionError):
            envelope = None
        if envelope is not None and valid_service_name(envelope.service):
            batch = self._build_typed(envelope)
            if batch is not None:
                return batch
        try:
            envelope = self._decoder.decode(body)
            items = envelope.metrics
            fast = True
        except msgspec.ValidationError:
            envelope = self._decode_loose(body)
            items = envelope.metrics
            fast = False
        except (msgspec.DecodeError, UnicodeDecodeError) as exc:  # invalid UTF-8 in a string
            raise BadRequest(f"request body is not valid JSON: {exc}") from None
        except RecursionError:
            raise BadRequest("request body is nested too deeply") from None
        if not valid_service_name(envelope.service):
            raise InvalidPayload(
                "the request body is invalid",
                details=[
                    {
                        "field": "service",
                        "rule": "pattern",
                        "message": "lower-case letters, digits, '.', '_' or '-', "
                        "starting with a letter or digit",
                    }
                ],
            )
        if nul:
            for name in ("version", "instance_id"):
                value = getattr(envelope, name)
                if value is not None and "\x00" in value:
                    raise InvalidPayload(
                        "the request body is invalid",
                        details=[{"field": name, "rule": "charset", "message": _NUL_MESSAGE}],
                    )
        return self._build(envelope, items, fast, nul)

    def _decode_loose(self, body: bytes) -> Any:
        try:
            return self._loose_decoder.decode(body)
        except msgspec.ValidationError as exc:
            path, rule, message = _describe(exc, "")
            raise InvalidPayload(
                "the request body is invalid",
                details=[{"field": path or "$", "rule": rule, "message": message}],
            ) from None
        except (msgspec.DecodeError, UnicodeDecodeError) as exc:  # invalid UTF-8 in a string
            raise BadRequest(f"request body is not valid JSON: {exc}") from None
        except RecursionError:
            raise BadRequest("request body is nested too deeply") from None

    def window(self) -> tuple[int, float, float]:
        """Now in unix ms, and the oldest and newest event times accepted (unix seconds,
        retention and the 2000-01-01 floor both applied): for rows built elsewhere (OTLP spans)
        by the same rules."""
        received_ms, oldest_s, newest_s = self._window()
        return received_ms, max(oldest_s, _TS_MIN_S), newest_s

    def _window(self) -> tuple[int, float, float]:
        """Now in unix ms, and the oldest and newest event times accepted (unix seconds)."""
        now = self._clock()
        return (
            int(now * 1000),
            now - self._settings.retention_days * 86_400,
            now + self._settings.max_future_skew_s,
        )

    def _build(self, envelope: Any, items: list[Any], fast: bool, nul: bool = False) -> Batch:
        received_ms, oldest_s, newest_s = self._window()
        head = (envelope.service, envelope.version or "", envelope.instance_id)
        batch = Batch(service=envelope.service)
        rows = batch.rows
        decode_item = self._item_decoder.decode
        for index, item in enumerate(items):
            try:
                if not fast:
                    try:
                        item = decode_item(item)
                    except msgspec.ValidationError as exc:
                        raise _Reject(*_describe(exc, "")) from None
                if nul:
                    _refuse_nul(item)
                table, row = self._row(item, head, received_ms, oldest_s, newest_s)
            except _Reject as rej:
                batch.rejections.append(
                    Rejection(
                        index, f"metrics[{index}].{rej.field}".rstrip("."), rej.rule, rej.message
                    )
                )
                continue
            bucket = rows.get(table)
            if bucket is None:
                rows[table] = bucket = []
            bucket.append(row)
        return batch

    def _build_typed(self, envelope: Any) -> Batch | None:
        """The batch of a typed decode, or None if any metric needs the item-by-item path."""
        received_ms, oldest_s, newest_s = self._window()
        service, version, instance = envelope.service, envelope.version or "", envelope.instance_id
        head = (service, version, instance)
        batch = Batch(service=service)
        rows = batch.rows
        plans = self._plans
        try:
            for m in envelope.metrics:
                kind, plan, build = plans[m.__class__]
                # The generated builder takes the common case; anything it does not (an ISO
                # time, an alias, metadata, a rule to report) goes through the general code.
                row = build(m, received_ms, oldest_s, newest_s, service, version, instance)
                if row is not None:
                    bucket = rows.get(kind)
                    if bucket is None:
                        rows[kind] = bucket = []
                    bucket.append(row)
                    continue
                ts_s, value, duration = _when_and_value(kind, m, received_ms, oldest_s, newest_s)
                dims = m.dimensions
                if plan.custom:
                    columns: list[Any] | None = []
                    extra = dims or None
                else:
                    columns = plan.columns(dims)
                    extra = None
                if columns is None:
                    return None
                row = self._complete(
                    kind,
                    plan.required,
                    m.metadata,
                    columns,
                    extra,
                    head,
                    ts_s,
                    received_ms,
                    value,
                    duration,
                )
                bucket = rows.get(kind)
                if bucket is None:
                    rows[kind] = bucket = []
                bucket.append(row)
        except _Reject:
            return None  # the item-by-item path names it
        return batch

    def _row(
        self, m: Any, head: tuple[Any, ...], received_ms: int, oldest_s: float, newest_s: float
    ) -> tuple[str, tuple[Any, ...]]:
        # The hot loop of ingest, run once per metric: one lookup for everything about the
        # type, the dimensions present visited once (usually fewer than the columns), the
        # common kinds checked inline; ``_typed`` raises the precise rejection.
        kind = m.type
        shape = _SHAPES.get(kind)
        if shape is None:
            raise _Reject("type", "enum", "must be one of " + ", ".join(METRIC_TYPES))
        positions, width, required = shape
        ts_s, value, duration = _when_and_value(kind, m, received_ms, oldest_s, newest_s)
        columns: list[Any] = [None] * width
        extra = None
        for name, v in m.dimensions.items():
            found = positions.get(name)
            if found is None:
                if extra is None:
                    extra = {}
                extra[name] = v
            elif v is not None:
                pos, k = found
                cls = v.__class__
                if k == "str":
                    if cls is not str:
                        _typed(v, name, k)
                    columns[pos] = v
                elif k == "bool" and cls is bool:
                    columns[pos] = 1 if v else 0
                elif k == "count" and cls is int and 0 <= v <= _MAX_COUNT:
                    columns[pos] = v
                else:
                    columns[pos] = _typed(v, name, k)
        return kind, self._complete(
            kind, required, m.metadata, columns, extra, head, ts_s, received_ms, value, duration
        )

    def _complete(
        self,
        kind: str,
        required: list[tuple[str, int]],
        meta: dict[str, Any],
        columns: list[Any],
        extra: dict[str, Any] | None,
        head: tuple[Any, ...],
        ts_s: float,
        received_ms: int,
        value: float,
        duration: float | None,
    ) -> tuple[Any, ...]:
        """The rules across columns (required dimensions, the MCP method in a tool name, flow
        step names), the metadata's columns, and the row."""
        tool = kind == "tool_execution"
        if tool and columns[_TOOL_NAME]:
            name = columns[_TOOL_NAME]
            method = columns[_TOOL_METHOD]
            if name in _NOT_TOOLS and (method is None or method == name):
                # The reference's clients put the method in tool_name for every MCP request
                # (tool_name "initialize"): that names no tool.
                columns[_TOOL_METHOD], columns[_TOOL_NAME] = name, None
            elif method is None:
                columns[_TOOL_METHOD] = "tools/call"
        for name, pos in required:
            if columns[pos] is None:
                raise _Reject(f"dimensions.{name}", "required", f"is required for {kind}")
        if kind == "protocol_latency":
            step = columns[_FLOW_STEP]
            columns[_FLOW_STEP] = FLOW_STEP_ALIASES.get(step, step)
        if tool and columns[_TOOL_METHOD] == "tools/call" and not columns[_TOOL_NAME]:
            raise _Reject(
                "dimensions.tool_name", "required", "is required when method is tools/call"
            )
        if meta:
            meta_json = self._encode(meta).decode()
            if len(meta_json) > self._settings.max_metadata_bytes:
                raise _Reject(
                    "metadata",
                    "max_bytes",
                    f"must encode to <= {self._settings.max_metadata_bytes} bytes",
                )
            from_meta = _FROM_METADATA.get(kind)
            if from_meta:
                for key, (pos, k) in from_meta.items():
                    if columns[pos] is None:
                        v = meta.get(key)
                        if v is not None:
                            columns[pos] = _typed(v, key, k, "metadata")
        else:
            meta_json = None
        if tool:
            if meta:
                columns += [
                    _typed(meta.get(name), name, k, "metadata") for name, k in METADATA_COLUMNS
                ]
            else:
                columns += _NO_METADATA
        return (
            int(ts_s * 1000),
            received_ms,
            *head,
            value,
            duration,
            *columns,
            None if extra is None else self._encode(extra).decode(),
            meta_json,
        )


def _when_and_value(
    kind: str, m: Any, received_ms: int, oldest_s: float, newest_s: float
) -> tuple[float, float, float | None]:
    """The event time in unix seconds, the value and the duration, checked."""
    ts = m.timestamp
    if ts is None:
        ts_s = received_ms / 1000
    elif ts.__class__ is str:
        ts_s = _parse_iso(ts)
    else:
        ts_s = float(ts)
    if ts_s > newest_s:
        if ts.__class__ is not str and oldest_s <= ts_s / 1000 <= newest_s:
            raise _Reject(
                "timestamp",
                "max_future_skew",
                "is too far in the future; it looks like unix milliseconds, "
                "send unix seconds (divide by 1000) or an ISO 8601 time",
            )
        raise _Reject("timestamp", "max_future_skew", "is too far in the future")
    if ts_s < oldest_s or ts_s < _TS_MIN_S:
        raise _Reject("timestamp", "older_than_retention", "is older than the retention period")
    value = m.value
    duration = m.duration_ms
    if value < 0 and kind != "custom":
        raise _Reject("value", "ge", "must be >= 0 for this metric type")
    if duration is None and kind == "protocol_latency":
        # Without duration_ms, value is the latency in seconds, as the MCP Gateway Registry's
        # auth server sends it.
        if value > MAX_DURATION_MS / 1000:
            raise _Reject(
                "value",
                "le",
                f"a latency in value is in seconds and must be <= {MAX_DURATION_MS / 1000:.0f}",
            )
        duration = value * 1000.0
        value = 1.0
    return ts_s, value, duration


#: metric type -> ({dimension: (column position, kind)}, number of columns,
#: required (name, position)).
_SHAPES = {
    kind: (
        {
            **{name: (i, k) for i, (name, k) in enumerate(spec)},
            **{
                alias: next((i, k) for i, (n, k) in enumerate(spec) if n == column)
                for alias, column in DIMENSION_ALIASES.get(kind, {}).items()
            },
        },
        len(spec),
        [(name, [n for n, _ in spec].index(name)) for name in REQUIRED[kind]],
    )
    for kind, spec in DIMENSIONS.items()
}
_TOOL_METHOD = _SHAPES["tool_execution"][0]["method"][0]
_TOOL_NAME = _SHAPES["tool_execution"][0]["tool_name"][0]
_FLOW_STEP = _SHAPES["protocol_latency"][0]["flow_step"][0]
#: metric type -> {metadata key: (column position, kind)}.
_FROM_METADATA = {
    kind: {key: _SHAPES[kind][0][column] for key, column in keys.items()}
    for kind, keys in METADATA_TO_COLUMN.items()
}
_NO_METADATA = [None] * len(METADATA_COLUMNS)


_NUL_ESCAPE = b"\\u0000"
_NUL_MESSAGE = "must not contain U+0000 (NUL)"


def _nul_in(value: Any, path: str) -> str | None:
    """The path of the first string in ``value`` (keys included) that holds U+0000."""
    if value.__class__ is str:
        return path if "\x00" in value else None
    if isinstance(value, dict):
        for k, v in value.items():
            key = str(k)
            shown = key.replace("\x00", "\\u0000")
            here = f"{path}.{shown}"
            if "\x00" in key:
                return here
            found = _nul_in(v, here)
            if found:
                return found
    elif isinstance(value, list):
        for i, v in enumerate(value):
            found = _nul_in(v, f"{path}[{i}]")
            if found:
                return found
    return None


def _refuse_nul(m: Any) -> None:
    """Reject a metric with U+0000 in any of its strings (no backend can hold it alike)."""
    for name in ("type", "timestamp", "dimensions", "metadata"):
        found = _nul_in(getattr(m, name), name)
        if found:
            raise _Reject(found, "charset", _NUL_MESSAGE)


def _variants(envelope: type[Struct]) -> list[type[Struct]]:
    """The metric structs of a typed envelope's union."""
    metrics = msgspec.inspect.type_info(envelope)
    assert isinstance(metrics, msgspec.inspect.StructType)
    field = next(f for f in metrics.fields if f.name == "metrics")
    assert isinstance(field.type, msgspec.inspect.ListType)
    union = field.type.item_type
    types = union.types if isinstance(union, msgspec.inspect.UnionType) else (union,)
    return [t.cls for t in types if isinstance(t, msgspec.inspect.StructType)]


class _Plan:
    """How a metric type's typed dimensions become its columns: read in column order, the
    kinds that ``_typed`` converts converted the same way (booleans to 1 and 0, an integer
    error code to text, -1 for "not available" to NULL), an alias moved to its column."""

    __slots__ = ("aliases", "bools", "codes", "custom", "get", "nas", "required", "width")

    def __init__(self, kind: str) -> None:
        names = _typed_names(kind)
        positions, self.width, self.required = _SHAPES[kind]
        self.custom = not names
        self.get = operator.attrgetter(*(n for n, _ in names)) if names else None
        self.bools = [i for i, (_, k) in enumerate(names) if k == "bool"]
        self.codes = [i for i, (_, k) in enumerate(names) if k == "code"]
        self.nas = [i for i, (_, k) in enumerate(names) if k == "count_na"]
        self.aliases = [
            (self.width + i, positions[a][0]) for i, a in enumerate(DIMENSION_ALIASES.get(kind, {}))
        ]

    def columns(self, dims: Any) -> list[Any] | None:
        """The typed columns, or None when a dimension and its alias are both given (which one
        counts depends on their order in the body: the item-by-item path decides)."""
        assert self.get is not None
        got = self.get(dims)
        columns = list(got) if self.width > 1 or self.aliases else [got]
        for i in self.bools:
            v = columns[i]
            if v is not None:
                columns[i] = 1 if v else 0
        for i in self.codes:
            v = columns[i]
            if v.__class__ is int:
                columns[i] = str(v)
        for i in self.nas:
            if columns[i] == -1:
                columns[i] = None
        if self.aliases:
            for at, pos in self.aliases:
                v = columns[at]
                if v is not None:
                    if columns[pos] is not None:
                        return None
                    columns[pos] = v
            del columns[self.width :]
        return columns


#: ``build(m, received_ms, oldest_s, newest_s, service, version, instance)``: the row of a
#: typed metric struct, or None when the general path must decide (see ``_builder``).
_Builder = Callable[[Any, int, float, float, str, str, str | None], tuple[Any, ...] | None]


def _builder(kind: str, max_metadata_bytes: int) -> _Builder:
    """The row of a typed metric of ``kind`` in straight-line code, for the common case only.

    Generated, like the rollup accumulator: the dimensions are read as attributes into locals in
    column order and the row is one tuple display, with no intermediate list, no per-column loop
    and no call (``_when_and_value``, ``_Plan.columns`` and ``_complete`` cost about 1.1 us of
    the 2.2 us per metric of the Python part at batch 100). It returns None, and the general
    path takes the metric, for anything but a numeric or absent timestamp inside the window, a
    value >= 0, no alias, valid metadata and every cross-column rule met: so the general path stays
    the one place that rejects, and whatever the builder returns is what it would have built
    (tests/test_validation_typed.py compares the two on arbitrary bodies)."""
    names = _typed_names(kind)
    if not names:  # custom: the dimensions are extras, encoded by the general path
        return lambda *_: None
    _, width, required = _SHAPES[kind]
    cols = [f"c{i}" for i in range(width)]
    lines = [
        "def build(m, received_ms, oldest_s, newest_s, service, version, instance):",
        "    ts = m.timestamp",
        "    if ts is None:",
        "        ts_s = received_ms / 1000",
        "    elif ts.__class__ is float:",
        "        ts_s = ts",
        "    else:",
        "        return None",
        "    if ts_s > newest_s or ts_s < oldest_s or ts_s < TS_MIN:",
        "        return None",
        "    value = m.value",
        "    duration = m.duration_ms",
        "    if value < 0:",
        "        return None",
    ]
    if kind == "protocol_latency":
        lines += ["    if duration is None:", "        return None"]
    lines.append("    d = m.dimensions")
    for i, (name, k) in enumerate(names[:width]):
        lines.append(f"    c{i} = d.{name}")
        if k == "bool":
            lines += [f"    if c{i} is not None:", f"        c{i} = 1 if c{i} else 0"]
        elif k == "code":
            lines += [f"    if c{i}.__class__ is int:", f"        c{i} = str(c{i})"]
        elif k == "count_na":
            lines += [f"    if c{i} == -1:", f"        c{i} = None"]
    for alias, _ in names[width:]:
        lines += [f"    if d.{alias} is not None:", "        return None"]
    if kind == "tool_execution":
        t, mth = f"c{_TOOL_NAME}", f"c{_TOOL_METHOD}"
        lines += [
            f"    if {t}:",
            f"        if {t} in NOT_TOOLS and ({mth} is None or {mth} == {t}):",
            f"            {mth}, {t} = {t}, None",
            f"        elif {mth} is None:",
            f"            {mth} = 'tools/call'",
        ]
    for _, pos in required:
        lines += [f"    if c{pos} is None:", "        return None"]
    if kind == "protocol_latency":
        lines.append(f"    c{_FLOW_STEP} = FLOW.get(c{_FLOW_STEP}, c{_FLOW_STEP})")
    if kind == "tool_execution":
        lines += [
            f"    if c{_TOOL_METHOD} == 'tools/call' and not c{_TOOL_NAME}:",
            "        return None",
        ]
    # The metadata, as ``_complete`` takes it: encoded and bounded, then the keys that fill a
    # column left empty, then (tool_execution) its metadata columns; a value of the wrong type
    # is the general path's to reject.
    meta_columns = METADATA_COLUMNS if kind == "tool_execution" else ()
    lines += [
        "    meta = m.metadata",
        "    if meta:",
        "        meta_json = ENCODE(meta).decode()",
        f"        if len(meta_json) > {int(max_metadata_bytes)}:",
        "            return None",
        "        try:",
    ]
    for key, (pos, k) in _FROM_METADATA.get(kind, {}).items():
        lines += [
            f"            if c{pos} is None:",
            f"                v = meta.get({key!r})",
            "                if v is not None:",
            f"                    c{pos} = TYPED(v, {key!r}, {k!r}, 'metadata')",
        ]
    for i, (key, k) in enumerate(meta_columns):
        lines.append(f"            m{i} = TYPED(meta.get({key!r}), {key!r}, {k!r}, 'metadata')")
    if not _FROM_METADATA.get(kind) and not meta_columns:
        lines.append("            pass")
    lines += [
        "        except Reject:",
        "            return None",
        "    else:",
        "        meta_json = None",
        *(f"        m{i} = None" for i in range(len(meta_columns))),
    ]
    cols += [f"m{i}" for i in range(len(meta_columns))]
    lines.append(
        "    return (int(ts_s * 1000), received_ms, service, version, instance, value,"
        f" duration, {', '.join(cols)}, None, meta_json)"
    )
    namespace: dict[str, Any] = {
        "TS_MIN": _TS_MIN_S,
        "NOT_TOOLS": _NOT_TOOLS,
        "FLOW": FLOW_STEP_ALIASES,
        "ENCODE": msgspec.json.Encoder().encode,
        "TYPED": _typed,
        "Reject": _Reject,
    }
    exec("\n".join(lines), namespace)
    return namespace["build"]  # type: ignore[no-any-return]


def _typed(value: Any, name: str, kind: str, where: str = "dimensions") -> Any:
    if value is None:
        return None
    if kind == "str":
        if isinstance(value, str):
            return value
        raise _Reject(f"{where}.{name}", "type", "must be a string")
    if kind == "bool":
        if value is True or value is False:
            return int(value)
        raise _Reject(f"{where}.{name}", "type", "must be true or false")
    if kind == "count" or kind == "count_na":
        if type(value) is int and 0 <= value <= _MAX_COUNT:
            return value
        if kind == "count_na" and value == -1 and type(value) is int:
            return None  # the MCP Gateway Registry's "not available"
        raise _Reject(
            f"{where}.{name}",
            "integer",
            "must be an integer >= 0" + (" (or -1: not available)" if kind == "count_na" else ""),
        )
    if kind == "code":
        if isinstance(value, str):
            return value
        if type(value) is int:
            return str(value)
        raise _Reject(f"{where}.{name}", "type", "must be a string or an integer")
    # "ms"
    if type(value) in (int, float) and 0 <= value <= MAX_DURATION_MS:
        return float(value)
    raise _Reject(
        f"{where}.{name}",
        "range",
        f"must be a number of milliseconds in [0, {MAX_DURATION_MS:.0f}]",
    )


def _parse_iso(text: str) -> float:
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        raise _Reject("timestamp", "format", "must be an ISO 8601 time or unix seconds") from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.timestamp()
