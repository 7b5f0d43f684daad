"""`python -m mcp_metrics.proxy` is `mcp-metrics`."""

from .cli import main

main()
