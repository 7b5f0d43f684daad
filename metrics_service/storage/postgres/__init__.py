"""PostgreSQL storage for several replicas (``METRICS_DATABASE_URL=postgresql://...``)."""

from metrics_service.storage.postgres.backend import Backend, Reader
from metrics_service.storage.postgres.migrations import LATEST_VERSION, MIGRATIONS

__all__ = ["LATEST_VERSION", "MIGRATIONS", "Backend", "Reader"]
