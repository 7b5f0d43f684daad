"""Record `tool_discovery` events around a registry's semantic search.

By default the query is hashed: no search text leaves the process unless `query_mode` says so.
"""

from __future__ import annotations

import functools
import inspect
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from typing import Any, Literal, TypeVar, cast

from .events import TOOL_DISCOVERY, hash_value
from .recorder import Recorder

__all__ = ["DiscoveryTimer", "QueryMode", "track_discovery"]

logger = logging.getLogger("mcp_metrics")

QueryMode = Literal["hash", "truncate", "full", "omit"]
_F = TypeVar("_F", bound=Callable[..., Any])


def _query_label(query: str | None, mode: QueryMode, max_chars: int) -> str | None:
    if query is None or mode == "omit":
        return None
    if mode == "hash":
        return hash_value(query)
    if mode == "truncate":
        return query[:max_chars]
    if mode == "full":
        return query
    raise ValueError(f"query_mode must be hash, truncate, full or omit, not {mode!r}")


class DiscoveryTimer:
    """One discovery in progress; `track_discovery` yields it.

    Time the phases with `timer.phase("embedding")` / `timer.phase("search")` or set
    `embedding_time_ms` / `search_time_ms` yourself; set `results_count` before the block ends.
    """

    __slots__ = (
        "_start",
        "embedding_time_ms",
        "metadata",
        "query",
        "results_count",
        "search_time_ms",
        "top_k",
        "top_n",
    )

    def __init__(
        self, query: str | None, top_k: int | None, top_n: int | None, metadata: dict[str, Any]
    ) -> None:
        self.query = query
        self.top_k = top_k
        self.top_n = top_n
        self.results_count: int | None = None
        self.embedding_time_ms: float | None = None
        self.search_time_ms: float | None = None
        self.metadata = metadata
        self._start = time.perf_counter()

    @contextmanager
    def phase(self, name: Literal["embedding", "search"]) -> Iterator[None]:
        """Time a block as the embedding or the search phase (adds up if used twice)."""
        start = time.perf_counter()
        try:
            yield
        finally:
            elapsed = (time.perf_counter() - start) * 1000.0
            attr = f"{name}_time_ms"
            setattr(self, attr, (getattr(self, attr) or 0.0) + elapsed)


class _Tracker:
    """Context manager (sync and async) and decorator; see `track_discovery`."""

    def __init__(
        self,
        client: Recorder,
        query: str | None,
        top_k: int | None,
        top_n: int | None,
        query_mode: QueryMode,
        query_max_chars: int,
        metadata: dict[str, Any] | None,
    ) -> None:
        _query_label("", query_mode, query_max_chars)  # reject a bad mode at set-up
        self._client = client
        self._query = query
        self._top_k = top_k
        self._top_n = top_n
        self._mode: QueryMode = query_mode
        self._max_chars = query_max_chars
        self._metadata = metadata or {}
        self._timer: DiscoveryTimer | None = None

    def __enter__(self) -> DiscoveryTimer:
        self._timer = DiscoveryTimer(self._query, self._top_k, self._top_n, dict(self._metadata))
        return self._timer

    def __exit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
        if self._timer is not None:
            _emit(self._client, self._timer, self._mode, self._max_chars, exc_type)
            self._timer = None

    async def __aenter__(self) -> DiscoveryTimer:
        return self.__enter__()

    async def __aexit__(self, exc_type: type[BaseException] | None, *rest: object) -> None:
        self.__exit__(exc_type, *rest)

    def __call__(self, func: _F) -> _F:
        """Decorate a search function; query/top_k/top_n are read from its arguments by name
        and results_count from len() of what it returns."""
        signature = inspect.signature(func)
        client, mode, max_chars, static_meta = (
            self._client,
            self._mode,
            self._max_chars,
            self._metadata,
        )
        defaults: dict[str, Any] = {
            "query": self._query,
            "top_k": self._top_k,
            "top_n": self._top_n,
        }

        def begin(args: tuple[Any, ...], kwargs: dict[str, Any]) -> DiscoveryTimer:
            values = dict(defaults)
            try:
                bound = signature.bind_partial(*args, **kwargs)
                bound.apply_defaults()
                for key in values:
                    if key in bound.arguments:
                        values[key] = bound.arguments[key]
            except TypeError:
                pass
            query = values["query"]
            return DiscoveryTimer(
                query if isinstance(query, str) else None,
                values["top_k"],
                values["top_n"],
                dict(static_meta),
            )

        def finish(timer: DiscoveryTimer, result: Any, exc: type[BaseException] | None) -> None:
            if timer.results_count is None and result is not None:
                with suppress(TypeError):
                    timer.results_count = len(result)
            _emit(client, timer, mode, max_chars, exc)

        if inspect.iscoroutinefunction(func):

            @functools.wraps(func)
            async def async_wrapper(*args: Any, **kwargs: Any) -> Any:
                timer = begin(args, kwargs)
                try:
                    result = await func(*args, **kwargs)
                except BaseException as exc:
                    finish(timer, None, type(exc))
                    raise
                finish(timer, result, None)
                return result

            return cast(_F, async_wrapper)

        @functools.wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            timer = begin(args, kwargs)
            try:
                result = func(*args, **kwargs)
            except BaseException as exc:
                finish(timer, None, type(exc))
                raise
            finish(timer, result, None)
            return result

        return cast(_F, wrapper)


def _emit(
    client: Recorder,
    timer: DiscoveryTimer,
    mode: QueryMode,
    max_chars: int,
    exc_type: type[BaseException] | None,
) -> None:
    try:
        duration_ms = (time.perf_counter() - timer._start) * 1000.0
        metadata = timer.metadata
        if exc_type is not None:
            metadata = {**metadata, "error": exc_type.__name__}
        client.record(
            TOOL_DISCOVERY,
            duration_ms=duration_ms,
            dimensions={
                "query": _query_label(timer.query, mode, max_chars),
                "results_count": timer.results_count if timer.results_count is not None else 0,
                "top_k": timer.top_k,
                "top_n": timer.top_n,
                "embedding_time_ms": timer.embedding_time_ms,
                "search_time_ms": timer.search_time_ms,
            },
            metadata=metadata or None,
        )
    except Exception:  # never into the host
        logger.debug("failed to record a tool_discovery metric", exc_info=True)


def track_discovery(
    client: Recorder,
    query: str | None = None,
    *,
    top_k: int | None = None,
    top_n: int | None = None,
    query_mode: QueryMode = "hash",
    query_max_chars: int = 64,
    metadata: dict[str, Any] | None = None,
) -> _Tracker:
    """Record one `tool_discovery` event per search, as a context manager or a decorator.

    ```python
    with track_discovery(metrics, query, top_k=10, top_n=3) as d:
        with d.phase("embedding"):
            vector = embed(query)
        with d.phase("search"):
            hits = index.search(vector, 10)
        d.results_count = len(hits)

    @track_discovery(metrics, query_mode="truncate")
    async def search(query: str, top_k: int = 10) -> list[Tool]: ...
    ```

    `query_mode`: "hash" (default, sha256 prefix), "truncate" (first `query_max_chars`
    characters), "full" or "omit".
    """
    return _Tracker(client, query, top_k, top_n, query_mode, query_max_chars, metadata)
