"""Meter any MCP server from outside: `mcp-metrics wrap` (stdio) and `mcp-metrics proxy` (HTTP).

```bash
mcp-metrics wrap --service files-mcp -- npx -y @modelcontextprotocol/server-filesystem /data
mcp-metrics proxy --listen 127.0.0.1:8080 --upstream http://127.0.0.1:3001
```

Both relay the MCP stream unchanged and record what they observe through the metrics client
(see `observer`); the HTTP proxy needs the `proxy` extra (h11).
"""

from __future__ import annotations

from .frames import LineFramer, SseFramer
from .observer import Observer, Session

__all__ = ["LineFramer", "Observer", "Session", "SseFramer"]
