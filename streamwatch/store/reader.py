"""The read side: queries on a read-only connection of their own, in a thread of their own, so
that they never queue behind the writer's transactions. In WAL mode a reader runs beside the
writer and sees every transaction committed before its read began: a caller that awaited a
write reads it back.

SQLite-specific (the connection and its thread).
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from streamwatch.store.connection import ReadConnection
from streamwatch.store.schema import SCHEMA_VERSION
from streamwatch.store.types import StoreError

__all__ = ["ReadSide", "Reader", "Row"]

T = TypeVar("T")
# A result row as sqlite3 gives it: its columns are typed by the schema, not by sqlite3.
Row = tuple[Any, ...]


class Reader:
    """One read-only connection, used from one thread (see `ReadConnection` for the modes)."""

    def __init__(self, path: Path, *, beside_writer: bool) -> None:
        self._conn = ReadConnection(path, beside_writer=beside_writer)
        self._thread: ThreadPoolExecutor | None = None

    async def open(self) -> None:
        """Open the file read-only; refuses one of another schema (`SchemaError`)."""
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="streamwatch-read")
        try:
            await self._in_thread(self._conn.open)
        except BaseException:
            self._thread.shutdown(wait=False)
            self._thread = None
            raise

    async def run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """`fn` in one read transaction, in the reader's thread."""
        return await self._in_thread(self._conn.run, fn)

    async def close(self) -> None:
        """Close once the reads under way have finished."""
        if self._thread is not None:
            await self._in_thread(self._conn.close)
            self._thread.shutdown(wait=True)
            self._thread = None

    async def _in_thread(self, fn: Callable[..., T], *args: object) -> T:
        if self._thread is None:
            raise StoreError("the store is not open")
        return await asyncio.get_running_loop().run_in_executor(self._thread, fn, *args)


class ReadSide:
    """What the store's query mixins share: the reader their queries run on."""

    _reader: Reader

    async def _read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        return await self._reader.run(fn)

    @property
    def schema_version(self) -> int:
        """The schema version this store reads and writes (a file of another one is
        migrated by the writer, or refused)."""
        return SCHEMA_VERSION
