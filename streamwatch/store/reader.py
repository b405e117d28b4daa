"""The read side: queries on read-only connections of their own, in threads of their own, so
that they never queue behind the writer's transactions. A reader sees every transaction
committed before its read began: a caller that awaited a write reads it back.

SQLite: one read-only connection beside the writer (WAL lets it read beside it). PostgreSQL:
`[storage] pool_size` connections, each read one `REPEATABLE READ` transaction.
"""

from __future__ import annotations

import asyncio
import queue
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol, TypeVar

from streamwatch.store.schema import SCHEMA_VERSION
from streamwatch.store.sql import Connection
from streamwatch.store.types import StoreError

__all__ = ["ReadConn", "ReadSide", "Reader", "Row"]

T = TypeVar("T")
# A result row as the driver gives it: its columns are typed by the schema.
Row = tuple[Any, ...]


class ReadConn(Protocol):
    """A read connection: opened (its schema checked), then `run(fn)` in one read
    transaction, from one thread at a time."""

    schema_version: int

    def open(self) -> None: ...

    def run(self, fn: Callable[[Connection], T]) -> T: ...

    def close(self) -> None: ...


class Reader:
    """Read connections, each used by one thread at a time."""

    def __init__(self, connections: Sequence[ReadConn]) -> None:
        self._connections = list(connections)
        self._idle: queue.SimpleQueue[ReadConn] = queue.SimpleQueue()
        self._thread: ThreadPoolExecutor | None = None

    async def open(self) -> None:
        """Open the connections; refuses a store of another schema (`SchemaError`)."""
        self._thread = ThreadPoolExecutor(
            max_workers=len(self._connections), thread_name_prefix="streamwatch-read"
        )
        opened: list[ReadConn] = []
        try:
            for conn in self._connections:
                await self._in_thread(conn.open)
                opened.append(conn)
                self._idle.put(conn)
        except BaseException:
            for conn in opened:
                conn.close()
            self._thread.shutdown(wait=False)
            self._thread = None
            raise

    @property
    def schema_version(self) -> int:
        return self._connections[0].schema_version

    async def run(self, fn: Callable[[Connection], T]) -> T:
        """`fn` in one read transaction, in a reader's thread."""
        return await self._in_thread(self._run, fn)

    def _run(self, fn: Callable[[Connection], T]) -> T:
        conn = self._idle.get()
        try:
            return conn.run(fn)
        finally:
            self._idle.put(conn)

    async def close(self) -> None:
        """Close once the reads under way have finished."""
        if self._thread is not None:
            thread, self._thread = self._thread, None
            thread.shutdown(wait=True)
            for conn in self._connections:
                conn.close()

    async def _in_thread(self, fn: Callable[..., T], *args: object) -> T:
        if self._thread is None:
            raise StoreError("the store is not open")
        return await asyncio.get_running_loop().run_in_executor(self._thread, fn, *args)


class ReadSide:
    """What the store's query mixins share: the reader their queries run on."""

    _reader: Reader

    async def _read(self, fn: Callable[[Connection], T]) -> T:
        return await self._reader.run(fn)

    @property
    def schema_version(self) -> int:
        """The schema version this store reads and writes (a file of another one is
        migrated by the writer, or refused)."""
        return SCHEMA_VERSION
