"""Durable state: tasks, callbacks, charges, start intents, orphans, stream records, events,
account state, alert rule state and the outbox, library videos and evidence.

The rest of the daemon depends on the interface (`StateStore`, and `StoreReader` for what
only reads), whose rows are typed (`streamwatch.store.types`). `Store` implements it on one
SQLite file in WAL mode (the embedded default); `ReadOnlyStore` opens such a file for the
commands that only read, and never migrates, writes or creates a file.

Modules, one concept each:

| module | concept |
|---|---|
| `types` | the typed rows, `Halt`, the errors (backend-neutral) |
| `interface` | `StateStore`, `StoreReader`, `AlertTx`, `AlertHook` (backend-neutral) |
| `schema` | migrations and the schema version check |
| `connection` | opening the file: for the writer, read-only, and `check_state_file` |
| `writer` | the writer: group commit, one savepoint per operation, its own thread |
| `reader` | the read connection beside the writer, in its own thread |
| `tasks` | tasks and their callbacks (`apply`, `claim`) |
| `orphans` | callbacks of unknown tasks: counted, priced, parked, reported |
| `intents` | start intents: registering a started task, adopting an unknown one |
| `ledger` | the ledger's queries: charges, orphan charges, totals |
| `streams` | stream records, events, and account state (halt, budgets fired) |
| `alerts` | alert rule state and the outbox |
| `videos` | library videos and evidence |
| `prune` | retention |
| `backup` | the online backup |
| `sqlite` | `Store` and `ReadOnlyStore`, composed of the parts above |

SQLite-specific, and for another backend to do its own way: the writer's thread (sqlite3
blocks; an async driver needs none) and its batching, `BEGIN IMMEDIATE` and savepoints, the
`PRAGMA`s (WAL, `synchronous`, `user_version` as the schema version), the read connection in
its thread (WAL lets it read beside the writer), the snapshot read of an idle file
(`immutable=1`), the online backup API, and the SQL itself. Everything else (the interface,
the rows, the pure decisions in `streamwatch.intent` and `streamwatch.pricing`) is shared.
"""

from streamwatch.store.backup import backup
from streamwatch.store.connection import check_state_file
from streamwatch.store.interface import AlertHook, AlertTx, StateStore, StoreReader
from streamwatch.store.orphans import (
    ORPHAN_BODIES_MAX,
    ORPHAN_BODIES_PER_TASK,
    ORPHAN_BODY_MAX_BYTES,
)
from streamwatch.store.postgres import PgTarget
from streamwatch.store.schema import MIGRATIONS, SCHEMA_VERSION
from streamwatch.store.stores import Location, ReadOnlyStore, Store
from streamwatch.store.types import (
    Adopted,
    ArchivedClip,
    BackupResult,
    CallbackOutcome,
    ChargeTotal,
    EventRow,
    EvidenceRecord,
    Halt,
    LibraryVideo,
    NewAlert,
    OrphanCharges,
    OrphanTotals,
    OutboxRow,
    Pruned,
    Registered,
    SchemaError,
    StoreError,
    StreamRecord,
    StreamTotals,
    TaskRow,
)

__all__ = [
    "MIGRATIONS",
    "ORPHAN_BODIES_MAX",
    "ORPHAN_BODIES_PER_TASK",
    "ORPHAN_BODY_MAX_BYTES",
    "SCHEMA_VERSION",
    "Adopted",
    "AlertHook",
    "AlertTx",
    "ArchivedClip",
    "BackupResult",
    "CallbackOutcome",
    "ChargeTotal",
    "EventRow",
    "EvidenceRecord",
    "Halt",
    "LibraryVideo",
    "Location",
    "NewAlert",
    "OrphanCharges",
    "OrphanTotals",
    "OutboxRow",
    "PgTarget",
    "Pruned",
    "ReadOnlyStore",
    "Registered",
    "SchemaError",
    "StateStore",
    "Store",
    "StoreError",
    "StoreReader",
    "StreamRecord",
    "StreamTotals",
    "TaskRow",
    "backup",
    "check_state_file",
]
