"""The writer: every write goes through it, one operation after another, in one thread.

Operations queued while a commit is in progress run together in the next transaction, so a
burst of callbacks costs one fsync, not one each. One failing operation does not fail its
batch-mates: the batch runs as one plain transaction; if an operation fails, the transaction
is rolled back and the batch applied again a savepoint per operation (`Writer._run_batch`).
A coroutine awaiting an operation resumes only after the transaction holding it committed.

An operation is a function of the `Context`: the connection, inside the batch's transaction,
and what the operations share in the writer's thread (the alert hook, the orphan pricer, the
open intents they cache).

The same on both backends: the operations are sync code over a `Connection`; on PostgreSQL
each statement is handed to the store's event loop while this thread waits
(`streamwatch.store.postgres`), and `BEGIN IMMEDIATE` is `BEGIN`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, TypeVar, cast

import structlog

from streamwatch.intent import Intent, OrphanPricer, Pricer
from streamwatch.store.reader import ReadSide
from streamwatch.store.sql import Connection
from streamwatch.store.types import StoreError

if TYPE_CHECKING:
    from streamwatch.store.budget import BudgetRules
    from streamwatch.store.interface import AlertHook
    from streamwatch.store.leases import LeaseBook

__all__ = ["Context", "WriteSide", "Writer"]

log = structlog.get_logger("streamwatch.store")
T = TypeVar("T")


class Context:
    """What an operation sees, in the writer's thread: the connection (inside the batch's
    transaction) and the state the operations share."""

    def __init__(self, *, first_free: bool) -> None:
        self._conn: Connection | None = None
        # How to read MAVI's pre-charge (undocumented): as its own charge (False, the
        # conservative default) or as payment for the task's first processed segment.
        self.first_free = first_free
        self.hook: AlertHook | None = None
        self.pricer: Pricer = OrphanPricer()
        # The open intents, cached between the operations that change them: each such
        # operation drops the cache, as does any rollback.
        self.open_intents: list[Intent] | None = None
        self.alerts_written = False  # outbox rows written in this batch
        # [cluster]: the leases this replica holds, checked by the operations acting on a
        # stream (`streamwatch.store.leases.fence`); None: a single daemon owns every stream.
        self.fence: LeaseBook | None = None
        # [cluster]: the budgets, for the fleet's spend counted with each charge and the
        # start gate (`streamwatch.store.budget`); None: a single daemon counts its own.
        self.budget: BudgetRules | None = None

    @property
    def conn(self) -> Connection:
        assert self._conn is not None, "operations run only while the writer is open"
        return self._conn

    def rolled_back(self) -> None:
        """Something this thread cached may have been rolled back: forget it."""
        self.open_intents = None


_Op = Callable[[Context], object]
_Queued = tuple[_Op, "asyncio.Future[object]", bool]  # the op, its answer, alone


class Writer:
    """The store's one writer (see the module's docstring)."""

    def __init__(
        self,
        opener: Callable[[], Connection],
        where: str,
        context: Context,
        *,
        batch_max: int,
        on_commit: Callable[[float, int], None] | None,
    ) -> None:
        self._opener = opener  # in the writer's thread: the connection, migrated
        self.where = where  # the file or database, as it may be shown
        self.context = context
        self._batch_max = batch_max
        self._on_commit = on_commit  # (seconds, operations) after each commit
        self._queue: asyncio.Queue[_Queued] = asyncio.Queue()
        # An operation that must run alone, taken from the queue while a batch was being
        # filled: it is the next batch, by itself.
        self._held: _Queued | None = None
        self._loop_task: asyncio.Task[None] | None = None
        # One thread runs every operation (on PostgreSQL too: the operations are sync code
        # waiting on the store's loop). SQLite's allocations stay in one malloc arena
        # instead of one per thread of the default pool (which kept RSS high after bursts).
        self._thread: ThreadPoolExecutor | None = None
        self.commits = 0  # transactions committed, for tests and benchmarks

    async def open(self) -> None:
        """Open (creating if needed) the file or database, migrate it, and start the loop."""
        self.context.open_intents = None
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="streamwatch-store")
        try:
            self.context._conn = await self._in_thread(self._opener)
        except BaseException:
            self._thread.shutdown(wait=False)
            self._thread = None
            raise
        self._loop_task = asyncio.create_task(self._write_loop(), name="store-writer")

    async def stop(self) -> None:
        """Finish every queued operation; from then on, refuse new ones."""
        if self._loop_task is not None:
            await self._queue.join()
            self._loop_task.cancel()
            await asyncio.gather(self._loop_task, return_exceptions=True)
            self._loop_task = None

    async def close(self) -> None:
        """Stop, then close the file."""
        await self.stop()
        if self.context._conn is not None:
            conn, self.context._conn = self.context._conn, None
            await self._in_thread(conn.close)
        if self._thread is not None:
            self._thread.shutdown(wait=True)
            self._thread = None

    async def run(self, op: Callable[[Context], T], *, alone: bool = False) -> T:
        """Queue `op`; its result once the transaction holding it committed. `alone`: in a
        transaction of its own, never batched with others. The lease round, release and leave
        take exclusive locks on lease rows; batched after a callback that locked a task row,
        they would hold that row while waiting for a lease row that another replica's fenced
        stop holds while it waits for the same task row: a deadlock PostgreSQL breaks by
        failing one side."""
        if self._loop_task is None:
            raise StoreError("the store is not open")
        future: asyncio.Future[object] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((op, future, alone))
        return cast(T, await future)  # the result of `op`, set by the loop

    async def _in_thread(self, fn: Callable[..., T], *args: object) -> T:
        assert self._thread is not None
        return await asyncio.get_running_loop().run_in_executor(self._thread, fn, *args)

    async def _write_loop(self) -> None:
        while True:
            first, self._held = self._held or await self._queue.get(), None
            batch = [first]
            while not first[2] and len(batch) < self._batch_max and not self._queue.empty():
                queued = self._queue.get_nowait()
                if queued[2]:
                    self._held = queued
                    break
                batch.append(queued)
            started = time.perf_counter()
            self.context.alerts_written = False
            try:
                results = await self._in_thread(self._run_batch, [op for op, _, _ in batch])
                if self._on_commit is not None:
                    self._on_commit(time.perf_counter() - started, len(batch))
                hook = self.context.hook
                if self.context.alerts_written and hook is not None:
                    hook.committed()
            except Exception as exc:  # noqa: BLE001 - the commit failed: nothing in the batch is stored
                log.error("store.commit_failed", error=str(exc), batch=len(batch))
                results = [StoreError(f"could not commit to {self.where}: {exc}")] * len(batch)
            for (_, future, _), result in zip(batch, results, strict=True):
                if not future.done():
                    if isinstance(result, BaseException):
                        future.set_exception(result)
                    else:
                        future.set_result(result)
                self._queue.task_done()

    def _run_batch(self, ops: list[_Op]) -> list[object]:
        """The batch in one transaction. First as it is, without a savepoint per operation
        (a third of a callback's cost in the writer); if an operation fails, the whole
        transaction is rolled back and the batch applied again one savepoint per operation,
        so that the failing one is refused alone and its batch-mates are stored. An operation
        may thus run twice (the first run rolled back): what it does besides the transaction
        must bear that (the context's caches are dropped, `alerts_written` recomputed)."""
        ctx = self.context
        conn = ctx.conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            try:
                results = [op(ctx) for op in ops]
            except Exception:  # noqa: BLE001 - applied again below, each op in a savepoint
                conn.execute("ROLLBACK")
                ctx.rolled_back()
                ctx.alerts_written = False
                conn.execute("BEGIN IMMEDIATE")
                results = [self._in_savepoint(op) for op in ops]
            conn.execute("COMMIT")
        except BaseException:
            ctx.rolled_back()
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        self.commits += 1
        return results

    def _in_savepoint(self, op: _Op) -> object:
        """`op`'s result, or the exception that failed it (its changes rolled back)."""
        ctx = self.context
        conn = ctx.conn
        conn.execute("SAVEPOINT op")
        try:
            result = op(ctx)
        except Exception as exc:  # noqa: BLE001 - one bad op must not fail its batch-mates
            conn.execute("ROLLBACK TO op")
            conn.execute("RELEASE op")
            ctx.rolled_back()
            return exc
        conn.execute("RELEASE op")
        return result


class WriteSide(ReadSide):
    """What the store's write mixins share: the writer, and the clock that dates what they
    record when the caller does not say when."""

    _writer: Writer
    _clock: Callable[[], float]

    async def _write(self, op: Callable[[Context], T], *, alone: bool = False) -> T:
        return await self._writer.run(op, alone=alone)
