"""SQLite storage: schema migrations, batched inserts, retention, keys."""

from metrics_service.storage.backend import KeyRecord, Policy
from metrics_service.storage.database import (
    INSERT_SQL,
    TABLE_OF_TYPE,
    TABLES,
    connect,
    count_expired,
    cutoff_ms,
    delete_expired_chunk,
    insert_rows,
    open_database,
    retention_policies,
    set_retention_policy,
    stats,
)
from metrics_service.storage.keys import (
    insert_key,
    list_keys,
    reconcile_env_keys,
    revoke_key,
)
from metrics_service.storage.migrations import LATEST_VERSION

__all__ = [
    "INSERT_SQL",
    "LATEST_VERSION",
    "TABLES",
    "TABLE_OF_TYPE",
    "KeyRecord",
    "Policy",
    "connect",
    "count_expired",
    "cutoff_ms",
    "delete_expired_chunk",
    "insert_key",
    "insert_rows",
    "list_keys",
    "open_database",
    "reconcile_env_keys",
    "retention_policies",
    "revoke_key",
    "set_retention_policy",
    "stats",
]
