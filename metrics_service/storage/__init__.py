"""Storage: the backend interface (``backend``), the column registry (``schema``), the rollup
logic every backend shares (``rollups``), and the backends (``sqlite``; ``postgres``).

The service uses only :class:`StorageBackend` (``create_backend(settings)`` picks one from
``METRICS_DATABASE_URL``). The SQLite functions re-exported here work on a plain connection,
for tools, benchmarks and tests.
"""

from metrics_service.storage.backend import (
    KeyRecord,
    Policy,
    Reader,
    StorageBackend,
    create_backend,
    cutoff_ms,
)
from metrics_service.storage.schema import TABLE_OF_TYPE, TABLES
from metrics_service.storage.sqlite.database import (
    INSERT_SQL,
    connect,
    insert_rows,
    open_database,
)
from metrics_service.storage.sqlite.migrations import LATEST_VERSION

__all__ = [
    "INSERT_SQL",
    "LATEST_VERSION",
    "TABLES",
    "TABLE_OF_TYPE",
    "KeyRecord",
    "Policy",
    "Reader",
    "StorageBackend",
    "connect",
    "create_backend",
    "cutoff_ms",
    "insert_rows",
    "open_database",
]
