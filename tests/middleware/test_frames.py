"""The wire framers: however reads cut a stream, the same frames come out, sizes included."""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st
from mcp_metrics.proxy.frames import LineFramer, SseFramer, decode

_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
_messages = st.fixed_dictionaries(
    {"jsonrpc": st.just("2.0"), "id": st.integers(0, 10**6) | st.text(max_size=8)},
    optional={"method": st.text(min_size=1, max_size=16), "params": _json_values},
)


def _cut(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    pieces, start = [], 0
    for point in points:
        pieces.append(data[start:point])
        start = point
    pieces.append(data[start:])
    return pieces


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.lists(_messages, min_size=1, max_size=3), min_size=1, max_size=8),
    st.lists(st.booleans(), min_size=8, max_size=8),
    st.lists(st.integers(0, 10_000), max_size=12),
)
def test_any_split_of_a_line_stream_gives_the_same_frames(
    groups: list[list[dict[str, object]]], as_batch: list[bool], cuts: list[int]
) -> None:
    lines: list[bytes] = []
    for group, batch in zip(groups, as_batch[: len(groups)], strict=True):
        payload: object = group if batch or len(group) > 1 else group[0]
        # ensure_ascii=False: multi-byte characters may be cut in the middle too
        lines.append(json.dumps(payload, ensure_ascii=False).encode())
    stream = b"".join(line + b"\n" for line in lines)
    framer = LineFramer()
    frames = [f for piece in _cut(stream, cuts) for f in framer.feed(piece)]
    assert [f.data for f in frames] == lines
    assert [f.size for f in frames] == [len(line) + 1 for line in lines]
    assert sum(f.size for f in frames) == len(stream)
    assert [decode(f.data) for f in frames] == [
        g if batch or len(g) > 1 else [g[0]]
        for g, batch in zip(groups, as_batch[: len(groups)], strict=True)
    ]
    assert framer.pending_bytes == 0


def test_crlf_blank_lines_and_the_unfinished_tail() -> None:
    framer = LineFramer()
    assert [f.data for f in framer.feed(b'{"a":1}\r\n\n  \n{"b"')] == [b'{"a":1}']
    assert framer.pending_bytes == 4
    frames = framer.feed(b":2}\n")
    assert [(f.data, f.size) for f in frames] == [(b'{"b":2}', 8)]


def test_an_oversized_line_is_reported_by_size_and_the_next_one_is_intact() -> None:
    framer = LineFramer(max_frame_bytes=10)
    big = b'{"x":"' + b"y" * 50 + b'"}'
    frames = []
    for i in range(0, len(big), 7):
        frames += framer.feed(big[i : i + 7])
    frames += framer.feed(b'\n{"id":1}\n')
    assert [(f.data, f.size) for f in frames] == [(None, len(big) + 1), (b'{"id":1}', 9)]


def test_desync_drops_the_partial_line_only() -> None:
    framer = LineFramer()
    framer.feed(b'{"id":1,"meth')
    framer.desync()  # the observer missed bytes here: the rest of this line is not a frame
    frames = framer.feed(b'od":"x"}\n{"id":2}\n')
    assert [f.data for f in frames] == [None, b'{"id":2}']


def test_decode_ignores_what_is_not_json_rpc() -> None:
    assert decode(b"not json") == []
    assert decode(b"42") == []
    assert decode(b'[1, {"id": 1}, "x"]') == [{"id": 1}]
    assert decode(b"\xff\xfe") == []
    assert decode(None) == []


_sse_text = st.text(
    alphabet=st.characters(exclude_characters="\r\n", exclude_categories=["Cs"]), max_size=30
)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["", "message", "endpoint"]),
            st.lists(_sse_text, min_size=1, max_size=3),
        ),
        min_size=1,
        max_size=6,
    ),
    st.sampled_from([b"\n", b"\r\n", b"\r"]),
    st.lists(st.integers(0, 10_000), max_size=12),
)
def test_any_split_of_an_event_stream_gives_the_same_events(
    events: list[tuple[str, list[str]]], eol: bytes, cuts: list[int]
) -> None:
    stream = b": keep-alive comment" + eol + eol
    for name, data in events:
        if name:
            stream += b"event: " + name.encode() + eol
        for line in data:
            stream += b"data: " + line.encode() + eol
        stream += b"id: 7" + eol + eol
    framer = SseFramer()
    got = [e for piece in _cut(stream, cuts) for e in framer.feed(piece)]
    assert [(e.event, e.data, e.id) for e in got] == [
        (name or "message", "\n".join(data), "7") for name, data in events
    ]


def test_an_oversized_event_is_reported_without_its_data() -> None:
    framer = SseFramer(max_event_bytes=16)
    got = framer.feed(b"data: " + b"x" * 40 + b"\n\ndata: ok\n\n")
    assert [(e.data, e.size > 40) for e in got] == [(None, True), ("ok", False)]
