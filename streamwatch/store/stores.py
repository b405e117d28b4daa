"""`Store` (the daemon's: one writer, readers beside it) and `ReadOnlyStore` (the commands
that only read), each composed of the concept modules' parts, on either backend: a `Path` is
an SQLite state file, a `PgTarget` a PostgreSQL database.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Self

from streamwatch.intent import OrphanPricer, Pricer
from streamwatch.store.alerts import OutboxReads, OutboxWrites
from streamwatch.store.budget import BudgetReads, BudgetWrites
from streamwatch.store.connection import ReadConnection, connect_writer
from streamwatch.store.intents import IntentReads, IntentWrites
from streamwatch.store.interface import AlertHook, StateStore, StoreReader
from streamwatch.store.leases import FleetReads, LeaseWrites
from streamwatch.store.ledger import LedgerReads
from streamwatch.store.orphans import OrphanWrites
from streamwatch.store.postgres import DbLoop, PgReadConnection, PgTarget, connect_writer_pg
from streamwatch.store.prune import PruneWrites
from streamwatch.store.reader import Reader
from streamwatch.store.streams import StreamReads, StreamWrites
from streamwatch.store.tasks import TaskReads, TaskWrites
from streamwatch.store.videos import VideoReads, VideoWrites
from streamwatch.store.writer import Context, Writer

__all__ = ["Location", "ReadOnlyStore", "Store"]

# Where the state is: an SQLite file, or a PostgreSQL database.
Location = Path | PgTarget


class ReadOnlyStore(
    TaskReads, IntentReads, LedgerReads, StreamReads, OutboxReads, VideoReads, FleetReads
):
    """A state file or database opened for reading only: `async with ReadOnlyStore(path) as
    store:`. It must exist and be of this streamwatch's schema (an older one is refused, not
    migrated); nothing is written, and no file is created beside it."""

    def __init__(self, path: Location) -> None:
        self.path = path
        self._loop: DbLoop | None = None
        if isinstance(path, PgTarget):
            self._loop = DbLoop()
            self._reader = Reader([PgReadConnection(path, self._loop)])
        else:
            self._reader = Reader([ReadConnection(path)])

    async def __aenter__(self) -> Self:
        if self._loop is not None:
            self._loop.start()
        try:
            await self._reader.open()
        except BaseException:
            if self._loop is not None:
                self._loop.stop()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        try:
            await self._reader.close()
        finally:
            if self._loop is not None:
                self._loop.stop()


class Store(
    TaskReads,
    TaskWrites,
    IntentReads,
    IntentWrites,
    OrphanWrites,
    LedgerReads,
    StreamReads,
    StreamWrites,
    OutboxReads,
    OutboxWrites,
    VideoReads,
    VideoWrites,
    PruneWrites,
    LeaseWrites,
    FleetReads,
    BudgetReads,
    BudgetWrites,
):
    """The daemon's store. Use `async with Store(path) as store:`: the file (or the
    database's schema) is created if missing and migrated. Writes go through one writer
    (group commit, a failing operation refused alone, in its thread); reads go through read-only
    connections beside it, in threads of their own, and never wait for the writer."""

    def __init__(
        self,
        path: Location,
        *,
        batch_max: int = 512,
        clock: Callable[[], float] = time.time,
        precharge_covers_first_segment: bool = False,
        on_commit: Callable[[float, int], None] | None = None,
        orphan_pricer: Pricer | None = None,
    ) -> None:
        """`orphan_pricer` prices the segments of unknown tasks (default: as if no stream
        were configured)."""
        self.path = path
        self._clock = clock
        self._context = Context(first_free=precharge_covers_first_segment)
        self._context.pricer = orphan_pricer or OrphanPricer()
        self._loop: DbLoop | None = None
        if isinstance(path, PgTarget):
            loop = self._loop = DbLoop()
            self._writer = Writer(
                lambda: connect_writer_pg(path, loop),
                str(path),
                self._context,
                batch_max=batch_max,
                on_commit=on_commit,
            )
            self._reader = Reader([PgReadConnection(path, loop) for _ in range(path.pool_size)])
        else:
            file = path
            self._writer = Writer(
                lambda: connect_writer(file),
                str(path),
                self._context,
                batch_max=batch_max,
                on_commit=on_commit,
            )
            self._reader = Reader([ReadConnection(path, beside_writer=True)])

    @property
    def commits(self) -> int:
        """Transactions committed, for tests and benchmarks."""
        return self._writer.commits

    def set_alert_hook(self, hook: AlertHook | None) -> None:
        """Route alerts with `hook` inside the operations that record callbacks and events."""
        self._context.hook = hook

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def open(self) -> None:
        """Open (creating if needed) the file or schema, migrate it, and start the writer;
        then open the read connections beside it."""
        if self._loop is not None:
            self._loop.start()
        try:
            await self._writer.open()
            try:
                await self._reader.open()
            except BaseException:
                await self._writer.close()
                raise
        except BaseException:
            if self._loop is not None:
                self._loop.stop()
            raise

    async def close(self) -> None:
        """Finish every queued operation, then close the file. The database's event loop
        stops even when closing a connection fails (a server gone away)."""
        try:
            await self._writer.stop()
            await self._reader.close()
            # Last: the last connection to close checkpoints the WAL into the file and removes
            # it (a read-only one cannot), so a stopped daemon leaves one self-contained file.
            await self._writer.close()
        finally:
            if self._loop is not None:
                self._loop.stop()

    async def check_writable(self) -> None:
        """Raise unless a write transaction commits (for readiness probes)."""
        await self._write(lambda ctx: ctx.conn.execute("UPDATE settings SET key = key WHERE false"))


if TYPE_CHECKING:  # the type checker holds each to the interface it implements

    def _implements(store: Store, reader: ReadOnlyStore) -> tuple[StateStore, StoreReader]:
        return store, reader
