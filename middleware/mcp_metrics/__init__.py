"""Report auth, discovery and MCP tool-call metrics to the MCP metrics collection service.

```python
from mcp_metrics import MetricsClient, add_auth_metrics_middleware, instrument_server
```
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .asgi import (
    AuthMetricsMiddleware,
    AuthOutcome,
    AuthRequest,
    add_auth_metrics_middleware,
    report_auth_outcome,
)
from .client import MetricsClient, ThreadedMetricsClient
from .config import ClientConfig
from .discovery import DiscoveryTimer, track_discovery
from .events import hash_value
from .recorder import ClientStats, Recorder
from .tools import track_tool

if TYPE_CHECKING:
    from .mcp import instrument_server

__version__ = "0.1.0"

__all__ = [
    "AuthMetricsMiddleware",
    "AuthOutcome",
    "AuthRequest",
    "ClientConfig",
    "ClientStats",
    "DiscoveryTimer",
    "MetricsClient",
    "Recorder",
    "ThreadedMetricsClient",
    "add_auth_metrics_middleware",
    "hash_value",
    "instrument_server",
    "report_auth_outcome",
    "track_discovery",
    "track_tool",
]


def __getattr__(name: str) -> Any:
    # The MCP integration imports the `mcp` SDK, an optional extra: load it on first use.
    if name == "instrument_server":
        from .mcp import instrument_server

        return instrument_server
    raise AttributeError(f"module 'mcp_metrics' has no attribute {name!r}")
