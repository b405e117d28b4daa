"""Opening the state file: for the writer (created owner-only, WAL, migrated), and read-only
(no migration, no write, no file created), plus the state-file check `check-config` runs.

A read-only open of a file nobody has open reads it as a snapshot (`immutable=1`): SQLite
would otherwise create the -wal and -shm companions, and leave them behind, even for a
`mode=ro` connection. Every read then checks that no writer appeared meanwhile (a -wal or
-journal beside the file, or the file itself changed); if one did, the read is done again
beside it, through the shared WAL index like any reader (`mode=ro`). A connection that must
see a writer's commits (the daemon's own reads) always reads that way.

SQLite-specific throughout.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import stat
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import structlog

from streamwatch.store.schema import SCHEMA_VERSION, check_version, migrate
from streamwatch.store.types import StoreError

__all__ = ["ReadConnection", "UnreadableFile", "check_state_file", "connect_writer"]

log = structlog.get_logger("streamwatch.store")
T = TypeVar("T")


def connect_writer(path: Path) -> sqlite3.Connection:
    """The writer's connection: the file created (owner-only) if missing, WAL, synchronous
    commits, migrated to the current schema."""
    if path.parent and not path.parent.exists():
        raise StoreError(f"the directory for the state file does not exist: {path.parent}")
    try:
        _owner_only(path)
    except OSError as exc:
        raise StoreError(f"cannot open the state file {path}: {exc.strerror}") from None
    try:
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30)
        conn.execute("PRAGMA journal_mode=WAL")
        # FULL: a commit is on disk before any callback in it is acknowledged.
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA foreign_keys=ON")
        migrate(conn, path)
    except sqlite3.Error as exc:
        raise StoreError(f"cannot open the state file {path}: {exc}") from None
    return conn


class UnreadableFile(StoreError):
    """SQLite could not read the file (`reason`: what it said)."""

    def __init__(self, path: Path, reason: object) -> None:
        super().__init__(f"cannot read the state file {path}: {reason}")
        self.reason = str(reason)


class ReadConnection:
    """A read-only connection (see the module's docstring). `beside_writer`: always read
    through the shared WAL index, seeing every commit made before each read began.
    `check_schema`: refuse a file of another schema version than this streamwatch's."""

    def __init__(self, path: Path, *, beside_writer: bool = False, check_schema: bool = True):
        self.path = path
        self._beside_writer = beside_writer
        self._check_schema = check_schema
        self._conn: sqlite3.Connection | None = None
        self._snapshot = False
        self.schema_version = 0

    def open(self) -> None:
        """Open the file (it must exist) and read its schema version."""
        if not self.path.is_file():
            raise StoreError(f"no state file at {self.path}")
        quiet = not self._beside_writer and self._signature()[0] == (False, False)
        self._connect(snapshot=quiet)
        try:
            (version,) = self.run(lambda c: c.execute("PRAGMA user_version").fetchone())
            self.schema_version = int(version)
            if self._check_schema:
                check_version(self.path, self.schema_version, migrating=False)
        except BaseException:
            self.close()
            raise

    def run(self, fn: Callable[[sqlite3.Connection], T], *, own_errors: bool = False) -> T:
        """`fn` in one read transaction: a consistent view of the file as last committed.
        SQLite's errors are raised as `UnreadableFile`, unless `fn` has `own_errors` (it
        also writes elsewhere: they are its own)."""
        if self._conn is None:
            raise StoreError("the store is not open")
        if self._snapshot:
            before = self._signature()
            if before[0] == (False, False):
                result = self._in_transaction(fn, own_errors)
                if self._signature() == before:
                    return result
            # A writer opened the file: from now on, read beside it.
            self.close()
            self._connect(snapshot=False)
        return self._in_transaction(fn, own_errors)

    def close(self) -> None:
        if self._conn is not None:
            conn, self._conn = self._conn, None
            conn.close()

    def _connect(self, *, snapshot: bool) -> None:
        uri = f"{self.path.resolve().as_uri()}?mode=ro" + ("&immutable=1" if snapshot else "")
        try:
            self._conn = sqlite3.connect(
                uri, uri=True, isolation_level=None, check_same_thread=False, timeout=30
            )
        except sqlite3.Error as exc:
            raise UnreadableFile(self.path, exc) from None
        self._snapshot = snapshot

    def _in_transaction(self, fn: Callable[[sqlite3.Connection], T], own_errors: bool) -> T:
        conn = self._conn
        assert conn is not None
        try:
            conn.execute("BEGIN")
            try:
                return fn(conn)
            finally:
                conn.execute("COMMIT")
        except sqlite3.DatabaseError as exc:
            if own_errors:
                raise
            raise UnreadableFile(self.path, exc) from None

    def _signature(self) -> tuple[tuple[bool, bool], tuple[int, int, int, int]]:
        """Is a writer beside the file (a -wal or -journal), and the file's identity, size and
        times: what changes when anything writes to it."""
        companions = (
            self.path.with_name(self.path.name + "-wal").exists(),
            self.path.with_name(self.path.name + "-journal").exists(),
        )
        st = self.path.stat()
        return companions, (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def check_state_file(path: Path) -> str | None:
    """What keeps `path` from being used as the state file, or None: its folder must exist and
    be writable (SQLite keeps its -wal beside it), and a file already there must be a
    streamwatch state file this version understands (an older one is migrated at start).
    Reads only: never creates, writes or migrates."""
    path = path.absolute()  # a relative path is relative to where the daemon starts: say where
    folder = path.parent
    if path.is_dir():
        return f"{path} is a folder; name a file in it, e.g. {path / 'streamwatch.db'}"
    if not folder.is_dir():
        return f"the folder {folder} does not exist; create it, or name a file in another folder"
    if not os.access(folder, os.W_OK | os.X_OK):
        return f"cannot create files in {folder} (as this user); the state file needs to"
    if not path.exists():
        return None  # created at the first start
    if not path.is_file():
        return f"{path} is not a regular file"
    reader = ReadConnection(path, check_schema=False)
    try:
        reader.open()
        with contextlib.closing(reader):
            tables = reader.run(
                lambda c: {r[0] for r in c.execute("SELECT name FROM sqlite_master")}
            )
    except UnreadableFile as exc:
        return (
            f"{path} is not a streamwatch state file ({exc.reason}); move it away or name "
            "another file"
        )
    version = reader.schema_version
    if version > SCHEMA_VERSION:
        return (
            f"{path} has schema version {version}, newer than this streamwatch understands "
            f"({SCHEMA_VERSION}); upgrade streamwatch or restore a backup"
        )
    if (version == 0 and tables) or (version > 0 and "tasks" not in tables):
        return f"{path} is an SQLite database but not a streamwatch state file; name another file"
    return None


def _owner_only(path: Path) -> None:
    """Create the state file readable by its owner only (0600), whatever the umask: SQLite
    would create it 0644, and its -wal and -shm files take the main file's mode. An existing
    file (or companion) that others may read is tightened to match."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        _tighten(path, os.fstat(fd).st_mode, lambda mode: os.fchmod(fd, mode))
    finally:
        os.close(fd)
    for suffix in ("-wal", "-shm"):
        companion = path.with_name(path.name + suffix)
        try:
            st = companion.stat()
        except FileNotFoundError:
            continue
        _tighten(companion, st.st_mode, companion.chmod)


def _tighten(path: Path, mode: int, chmod: Callable[[int], None]) -> None:
    if not mode & 0o077:
        return
    try:
        chmod(stat.S_IMODE(mode) & 0o700)
    except PermissionError:  # another user's file: say so, the daemon can still run
        log.warning("store.file_not_private", path=str(path), mode=oct(stat.S_IMODE(mode)))
    else:
        log.info("store.file_made_private", path=str(path), was=oct(stat.S_IMODE(mode)))
