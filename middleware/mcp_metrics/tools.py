"""A plain decorator that records `tool_execution` for one tool handler, without the MCP SDK.

Also the helpers the MCP instrumentation shares: payload sizes and "did the tool fail".
"""

from __future__ import annotations

import functools
import inspect
import json
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any, TypeVar, cast

from .recorder import Recorder

__all__ = ["is_error_result", "payload_size", "track_tool"]

logger = logging.getLogger("mcp_metrics")

_F = TypeVar("_F", bound=Callable[..., Any])
MetadataHook = Callable[[Mapping[str, Any], Any], "Mapping[str, Any] | None"]
_DISPATCH_NAMES = ("name", "tool_name")
_ARGUMENT_NAMES = ("arguments", "args", "params")


# One encoder, built once: json.dumps() with options builds a new one per call.
_encode_json = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, default=str).encode


def payload_size(obj: Any) -> int:
    """Bytes of the JSON form of `obj` (pydantic models as they go on the wire)."""
    if obj is None:
        return 0
    kind = type(obj)
    if kind is dict or kind is list:
        try:
            return len(_encode_json(obj).encode("utf-8", "surrogatepass"))
        except (TypeError, ValueError):
            return len(str(obj).encode("utf-8", "surrogatepass"))
    if kind is str:
        return len(obj.encode("utf-8", "surrogatepass"))
    if isinstance(obj, (bytes, bytearray)):
        return len(obj)
    dump = getattr(obj, "model_dump_json", None)
    if dump is not None:
        try:
            return len(dump(by_alias=True, exclude_none=True).encode())
        except Exception:
            pass
    try:
        return len(_encode_json(obj).encode("utf-8", "surrogatepass"))
    except (TypeError, ValueError):
        return len(str(obj).encode("utf-8", "surrogatepass"))


def is_error_result(result: Any) -> bool:
    """True for an MCP `CallToolResult` with isError set, as a model or as a wire dict."""
    if type(result) is dict or isinstance(result, Mapping):
        return result.get("isError") is True or result.get("is_error") is True
    flag = getattr(result, "isError", None)  # mcp 1.x field name
    if flag is None:
        flag = getattr(result, "is_error", None)  # mcp 2.x
    return flag is True


def track_tool(
    client: Recorder,
    tool_name: str | None = None,
    *,
    server_name: str | None = None,
    transport: str | None = None,
    measure_sizes: bool = True,
    metadata: Mapping[str, Any] | MetadataHook | None = None,
) -> Callable[[_F], _F]:
    """Record a `tool_execution` event for every call of a tool handler (sync or async).

    ```python
    @track_tool(metrics, server_name="weather", transport="stdio")
    async def get_forecast(city: str) -> dict: ...

    # A dispatcher `(name, arguments)` reports the name it was called with:
    @track_tool(metrics, metadata=lambda args, result: {"agent_id": args["arguments"].get("agent")})
    async def call_tool(name: str, arguments: dict) -> CallToolResult: ...
    ```

    A raised exception or a result with `isError` counts as a failure; the exception is re-raised
    unchanged. `metadata` (a dict, or a hook given the bound arguments and the result) rides in
    the event's metadata: `agent_id`, `tenant_id`, `input_tokens`, `output_tokens`.
    """

    def decorate(func: _F) -> _F:
        signature = inspect.signature(func)
        params = list(signature.parameters)
        dispatch = tool_name is None and bool(params) and params[0] in _DISPATCH_NAMES
        argument_param = next((p for p in params if p in _ARGUMENT_NAMES), None)
        fixed_name = tool_name or func.__name__

        def finish(
            args: tuple[Any, ...],
            kwargs: dict[str, Any],
            result: Any,
            failed: bool,
            start: float,
            error: str | None,
        ) -> None:
            try:
                duration_ms = (time.perf_counter() - start) * 1000.0
                try:
                    bound = signature.bind_partial(*args, **kwargs).arguments
                except TypeError:
                    bound = dict(kwargs)
                name = fixed_name
                if dispatch:
                    called = bound.get(params[0])
                    name = called if isinstance(called, str) else fixed_name
                dims: dict[str, Any] = {"server_name": server_name, "transport": transport}
                if measure_sizes:
                    payload = (
                        bound.get(argument_param)
                        if dispatch and argument_param
                        else {k: v for k, v in bound.items() if k not in ("self", "cls", "ctx")}
                    )
                    dims["input_size_bytes"] = payload_size(payload)
                    dims["output_size_bytes"] = (
                        0 if failed and result is None else payload_size(result)
                    )
                meta: Mapping[str, Any] | None = (
                    metadata(bound, result) if callable(metadata) else metadata
                )
                if error is not None:
                    meta = {**(meta or {}), "error": error}
                    dims["error_type"] = error
                elif failed:
                    dims["error_type"] = "tool_error"  # semconv: CallToolResult with isError
                client.record_tool_execution(
                    tool_name=name,
                    success=not failed,
                    duration_ms=duration_ms,
                    metadata=meta,
                    **dims,
                )
            except Exception:  # never into the host
                logger.debug("failed to record a tool_execution metric", exc_info=True)

        if inspect.iscoroutinefunction(func):

            @functools.wraps(func)
            async def async_wrapper(*args: Any, **kwargs: Any) -> Any:
                start = time.perf_counter()
                try:
                    result = await func(*args, **kwargs)
                except BaseException as exc:
                    finish(args, kwargs, None, True, start, type(exc).__name__)
                    raise
                finish(args, kwargs, result, is_error_result(result), start, None)
                return result

            return cast(_F, async_wrapper)

        @functools.wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                result = func(*args, **kwargs)
            except BaseException as exc:
                finish(args, kwargs, None, True, start, type(exc).__name__)
                raise
            finish(args, kwargs, result, is_error_result(result), start, None)
            return result

        return cast(_F, wrapper)

    return decorate
