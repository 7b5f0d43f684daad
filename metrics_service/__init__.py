"""MCP metrics service: authenticated ingest, SQLite storage, OpenTelemetry export."""

__version__ = "0.1.0"

from metrics_service.app import create_app
from metrics_service.settings import Settings, load_settings

__all__ = ["Settings", "__version__", "create_app", "load_settings"]
