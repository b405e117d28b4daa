"""Durable state: tasks, callbacks, charges, start intents, orphans, stream records, events,
account state, alert rule state and the outbox, library videos and evidence.

The rest of the daemon depends on the interface (`StateStore`, and `StoreReader` for what
only reads), whose rows are typed (`streamwatch.store.types`). `Store` implements it on one
SQLite file in WAL mode (the embedded default, a `Path`) or on a PostgreSQL database (a
`PgTarget`); `ReadOnlyStore` opens either for the commands that only read, and never
migrates, writes or creates anything.

Each operation is written once: sync code over a `Connection` (`streamwatch.store.sql`), in a
portable subset of SQL that PostgreSQL's connection rewrites once per statement. The writer's
group commit (and its retry a savepoint per operation when one fails) is the same on both.

Modules, one concept each:

| module | concept |
|---|---|
| `types` | the typed rows, `Halt`, the errors (backend-neutral) |
| `interface` | `StateStore`, `StoreReader`, `AlertTx`, `AlertHook` (backend-neutral) |
| `sql` | the `Connection` protocol, and the SQL rewritten for PostgreSQL |
| `schema` | SQLite's migrations and the schema version check (both backends) |
| `pg_schema` | PostgreSQL's migrations, on the same version numbers, under an advisory lock |
| `connection` | opening the SQLite file: for the writer, read-only, and `check_state_file` |
| `postgres` | PostgreSQL through asyncpg, as a sync `Connection`; `check_database` |
| `writer` | the writer: group commit, a failing operation refused alone, its own thread |
| `reader` | the read connections beside the writer, in threads of their own |
| `tasks` | tasks and their callbacks (`apply`, `claim`) |
| `orphans` | callbacks of unknown tasks: counted, priced, parked, reported |
| `intents` | start intents: registering a started task, adopting an unknown one |
| `ledger` | the ledger's queries: charges, orphan charges, totals |
| `streams` | stream records, events, and account state (halt, budgets fired) |
| `alerts` | alert rule state and the outbox |
| `videos` | library videos and evidence |
| `leases` | `[cluster]` (PostgreSQL): leases, the fence, the leader lock, the callback feed |
| `budget` | `[cluster]` (PostgreSQL): the fleet's spend per charge, budget events fired once |
| `prune` | retention |
| `backup` | the online backup (SQLite) |
| `copy` | `store copy`: the whole state into an empty store of either backend, verified |
| `stores` | `Store` and `ReadOnlyStore`, composed of the parts above |

What differs between the backends: SQLite's connection (WAL, `synchronous`, `user_version`
as the schema version, the snapshot read of an idle file with `immutable=1`, the online
backup API, the file's mode); PostgreSQL's (asyncpg on an event loop in a thread of its own,
statements prepared once per connection, reconnection after the server went away, a
`schema_version` table, identities instead of `INTEGER PRIMARY KEY`, `REPEATABLE READ`
reads, `pool_size` read connections), each backend's DDL, and the few statements
`sql.to_postgres` rewrites. Everything else (the operations, the interface, the rows, the
pure decisions in `streamwatch.intent` and `streamwatch.pricing`) is shared.
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
    FiredThreshold,
    FleetSpend,
    Halt,
    LibraryVideo,
    NewAlert,
    OrphanCharges,
    OrphanTotals,
    OutboxRow,
    Pruned,
    Registered,
    SchemaError,
    SpendTotal,
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
    "FiredThreshold",
    "FleetSpend",
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
    "SpendTotal",
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
