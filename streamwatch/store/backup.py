"""`streamwatch backup`: a consistent copy of the state file, safe while the daemon writes.

SQLite-specific: SQLite's online backup API, from a read-only connection.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path

from streamwatch.store.connection import ReadConnection, UnreadableFile
from streamwatch.store.types import BackupResult, StoreError

__all__ = ["backup"]


def backup(
    source: Path, dest: Path, *, progress: Callable[[int, int], None] | None = None
) -> BackupResult:
    """Copy the state file to `dest` with SQLite's online backup, safe while the daemon runs
    (a consistent snapshot, the WAL included). The source is opened read-only: never created,
    migrated or written. The copy is written beside `dest`, checked with `PRAGMA
    integrity_check`, made a single self-contained file (no -wal), readable by its owner
    only, and renamed into place: a failed backup never replaces a good one. `dest` may be a
    directory: the copy is then named streamwatch-YYYYMMDDTHHMMSSZ.db. `progress(done,
    total)` is called in pages as the copy goes."""
    if not source.is_file():
        raise StoreError(f"no state file at {source}")
    if dest.is_dir():
        dest = dest / time.strftime("streamwatch-%Y%m%dT%H%M%SZ.db", time.gmtime())
    if dest.resolve() == source.resolve():
        raise StoreError("the backup cannot be the state file itself")
    part = dest.with_name(dest.name + ".part")
    part.unlink(missing_ok=True)
    try:
        os.close(os.open(part, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except OSError as exc:
        raise StoreError(f"cannot write the backup {part}: {exc.strerror}") from None

    def step(_status: int, remaining: int, total: int) -> None:
        if progress is not None:
            progress(total - remaining, total)

    def copy(src: sqlite3.Connection) -> int:
        """Copy what `src` sees (its read transaction: one snapshot) into `part`."""
        with contextlib.closing(sqlite3.connect(part)) as dst:
            src.backup(dst, pages=1024, progress=step)
            (version,) = src.execute("PRAGMA user_version").fetchone()
            dst.execute("PRAGMA journal_mode=DELETE")
            (check,) = dst.execute("PRAGMA integrity_check").fetchone()
            if check != "ok":
                raise StoreError(f"the backup failed its integrity check: {check}")
        return int(version)

    reader = ReadConnection(source, check_schema=False)  # any schema: it is copied as it is
    try:
        reader.open()
        with contextlib.closing(reader):
            version = reader.run(copy, own_errors=True)
        with part.open("rb") as f:
            os.fsync(f.fileno())
        os.replace(part, dest)
    except BaseException as exc:
        part.unlink(missing_ok=True)
        if isinstance(exc, UnreadableFile):
            raise StoreError(f"cannot back up {source}: {exc.reason}") from None
        if isinstance(exc, sqlite3.Error):
            raise StoreError(f"cannot back up {source}: {exc}") from None
        if isinstance(exc, OSError):
            raise StoreError(f"cannot write the backup {dest}: {exc.strerror}") from None
        raise
    return BackupResult(dest, version, dest.stat().st_size)
