"""Metric event shapes as the service's `POST /metrics` contract defines them.

Events are plain dicts: they are the JSON payload, built once on the recording path.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from typing import Any

__all__ = [
    "AUTH_REQUEST",
    "CUSTOM",
    "PROTOCOL_LATENCY",
    "TOOL_DISCOVERY",
    "TOOL_EXECUTION",
    "hash_value",
]

AUTH_REQUEST = "auth_request"
TOOL_EXECUTION = "tool_execution"
TOOL_DISCOVERY = "tool_discovery"
PROTOCOL_LATENCY = "protocol_latency"
CUSTOM = "custom"

MAX_DIMENSIONS = 32
MAX_DIMENSION_CHARS = 256

# Metadata keys the service extracts into their own columns.
METADATA_KEYS = ("agent_id", "tenant_id", "input_tokens", "output_tokens")


def hash_value(value: str, *, salt: str | None = None, length: int = 16) -> str:
    """A stable, non-reversible label for a user id or a query: truncated sha256(salt + value).

    The salt defaults to `METRICS_HASH_SALT`; set one so that common values (emails, short queries)
    cannot be recovered by hashing a dictionary.
    """
    if salt is None:
        salt = os.environ.get("METRICS_HASH_SALT", "")
    digest = hashlib.sha256((salt + value).encode("utf-8", "surrogatepass")).hexdigest()
    return digest[:length]


def clean_dimensions(dimensions: Mapping[str, Any]) -> dict[str, Any]:
    """Keep what the service accepts: no None, strings cut to 256 chars, at most 32 keys."""
    out: dict[str, Any] = {}
    for key, value in dimensions.items():
        if value is None:
            continue
        if isinstance(value, str):
            if len(value) > MAX_DIMENSION_CHARS:
                value = value[:MAX_DIMENSION_CHARS]
        elif not isinstance(value, (bool, int, float)):
            value = str(value)[:MAX_DIMENSION_CHARS]
        out[key] = value
        if len(out) == MAX_DIMENSIONS:
            break
    return out


def clean_metadata(metadata: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """Drop None values and coerce the keys the service types (a bad type rejects the event)."""
    if not metadata:
        return None
    out: dict[str, Any] = {}
    for key, value in metadata.items():
        if value is None:
            continue
        if key in _STR_METADATA:
            value = str(value)[:MAX_DIMENSION_CHARS]
        elif key in _COUNT_METADATA:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                continue
            value = int(value)
        out[key] = value
    return out or None


_STR_METADATA = frozenset({"agent_id", "tenant_id"})
_COUNT_METADATA = frozenset({"input_tokens", "output_tokens"})
