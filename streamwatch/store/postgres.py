"""PostgreSQL through asyncpg, as the sync `Connection` the operations are written against.

The operations are sync code (SQLite's sqlite3 is); rather than write each twice, the
writer's and readers' threads run the same code over `PgConnection`, whose `execute` hands
each statement to an event loop of the store's own (`DbLoop`, in its thread, holding every
asyncpg connection) and blocks its thread until the answer: the loop is free meanwhile.
Transactions and savepoints are plain SQL on one connection, so group commit and its retry a
savepoint per operation work as on SQLite. Each statement is rewritten once for PostgreSQL
(`streamwatch.store.sql.to_postgres`) and prepared once per connection.

A connection that breaks (the server went away) fails what is under way with `StoreError`
(the transaction is lost, nothing of it committed); the next transaction reconnects, at most
once a second while the server stays away.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable, Coroutine, Iterable, Iterator, Sequence
from dataclasses import dataclass
from decimal import Decimal
from functools import lru_cache
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import asyncpg
from pydantic import SecretStr

from streamwatch.store.pg_schema import migrate_pg, schema_version
from streamwatch.store.schema import SCHEMA_VERSION, check_version
from streamwatch.store.sql import Connection, to_postgres
from streamwatch.store.types import StoreError

__all__ = [
    "DbLoop",
    "PgConnection",
    "PgCursor",
    "PgReadConnection",
    "PgTarget",
    "check_database",
    "connect_writer_pg",
    "safe_url",
]

T = TypeVar("T")

# Transient: the connection or the server is gone; a new connection may work.
_LOST = (
    asyncpg.exceptions.ConnectionDoesNotExistError,
    asyncpg.exceptions.InterfaceError,
    asyncpg.exceptions.CannotConnectNowError,
    asyncpg.exceptions.AdminShutdownError,
    asyncpg.exceptions.CrashShutdownError,
    asyncpg.exceptions.ConnectionFailureError,
    OSError,
    asyncio.TimeoutError,
)
_RECONNECT_EVERY = 1.0  # seconds between connection attempts while the server is away


def safe_url(url: str) -> str:
    """`url` without its password (if it holds one): what may be shown and logged."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{parts.username or ''}@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


@dataclass(frozen=True)
class PgTarget:
    """A PostgreSQL database to keep the state in: `url` (postgresql://user@host:port/db,
    TLS as its `sslmode`/`sslrootcert` parameters or libpq's PGSSL* variables), the password
    apart (or from PGPASSWORD / ~/.pgpass, as libpq does), and the pool's bounds."""

    url: str
    password: SecretStr | None = None
    pool_size: int = 4
    statement_timeout_seconds: float = 30.0
    connect_timeout_seconds: float = 10.0

    def __str__(self) -> str:
        return safe_url(self.url)

    def __repr__(self) -> str:  # the URL may hold the password (a URL secret): never shown
        return f"PgTarget({safe_url(self.url)!r}, pool_size={self.pool_size})"

    async def connect(self, *, read_only: bool = False) -> asyncpg.Connection:
        """A new connection, or `StoreError` saying why not (never with the password)."""
        settings = {
            "application_name": "streamwatch",
            "statement_timeout": str(int(self.statement_timeout_seconds * 1000)),
        }
        if read_only:
            settings["default_transaction_read_only"] = "on"
        try:
            return await asyncpg.connect(
                self.url,
                password=self.password.get_secret_value() if self.password else None,
                timeout=self.connect_timeout_seconds,
                command_timeout=self.statement_timeout_seconds + self.connect_timeout_seconds,
                server_settings=settings,
                statement_cache_size=0,  # PgConnection keeps its own prepared statements
            )
        except Exception as exc:  # noqa: BLE001 - every failure to connect is said the same way
            raise StoreError(f"cannot connect to {self}: {describe_error(exc)}") from None


def describe_error(exc: BaseException) -> str:
    """What went wrong connecting or talking to the server, in a line (no secrets: asyncpg
    names the host, port, user and database, never the password)."""
    if isinstance(exc, asyncpg.exceptions.InvalidPasswordError):
        return f"authentication failed ({exc})"
    if isinstance(exc, asyncpg.exceptions.InvalidAuthorizationSpecificationError):
        return f"authentication failed ({exc})"
    if isinstance(exc, asyncpg.exceptions.InvalidCatalogNameError):
        return f"the database does not exist ({exc})"
    if isinstance(exc, (OSError, asyncio.TimeoutError)):
        return f"the server is unreachable ({exc or type(exc).__name__})"
    return f"{type(exc).__name__}: {exc}"


class DbLoop:
    """An event loop in a thread of its own, where the store's asyncpg connections live; the
    store's threads hand it coroutines and block until their answer."""

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        self._thread = threading.Thread(target=loop.run_forever, name="streamwatch-pg", daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run `coro` on the loop; block this (other) thread until it is done."""
        if self._loop is None:
            coro.close()
            raise StoreError("the store is not open")
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def stop(self) -> None:
        loop, self._loop = self._loop, None
        if loop is not None and self._thread is not None:
            loop.call_soon_threadsafe(loop.stop)
            self._thread.join()
            loop.close()
            self._thread = None


@lru_cache(maxsize=1024)
def _postgres(sql: str) -> tuple[str, bool]:
    """The statement as PostgreSQL runs it, and whether it returns rows."""
    text = to_postgres(sql)
    head = text.lstrip().split(None, 1)[0].upper() if text.strip() else ""
    return text, head in ("SELECT", "WITH", "VALUES") or " RETURNING " in text.upper()


def _plain(value: Any) -> Any:
    # Integer sums of bigint columns come back as numeric: every one here is an integer.
    return int(value) if isinstance(value, Decimal) else value


class PgCursor:
    """A statement's rows (as tuples) and how many rows it changed."""

    def __init__(self, rows: list[tuple[Any, ...]], rowcount: int) -> None:
        self._rows = rows
        self._next = 0
        self.rowcount = rowcount

    def fetchone(self) -> Any:
        if self._next >= len(self._rows):
            return None
        self._next += 1
        return self._rows[self._next - 1]

    def fetchall(self) -> list[Any]:
        rest, self._next = self._rows[self._next :], len(self._rows)
        return rest

    def __iter__(self) -> Iterator[Any]:
        return iter(self.fetchall())


class PgConnection:
    """One asyncpg connection, used from one thread at a time as a sync `Connection` (see the
    module's docstring)."""

    def __init__(self, target: PgTarget, loop: DbLoop, *, read_only: bool = False) -> None:
        self.target = target
        self._loop = loop
        self._read_only = read_only
        self._conn: asyncpg.Connection | None = None
        self._prepared: dict[str, Any] = {}
        self._broken = False  # lost inside a transaction: refuse until the next BEGIN
        # SAVEPOINT and RELEASE, sent with the next statement (one round trip fewer each).
        self._pending: list[str] = []
        self._last_attempt = 0.0
        self._last_error = ""

    def open(self) -> None:
        """Connect (raises `StoreError` saying why not)."""
        self._connect()

    def _connect(self) -> None:
        now = time.monotonic()
        if self._last_error and now - self._last_attempt < _RECONNECT_EVERY:
            raise StoreError(self._last_error)
        self._last_attempt = now
        try:
            self._conn = self._loop.run(self.target.connect(read_only=self._read_only))
        except StoreError as exc:
            self._last_error = str(exc)
            raise
        self._last_error = ""
        self._prepared = {}
        self._pending = []
        self._broken = False

    @property
    def in_transaction(self) -> bool:
        conn = self._conn
        return conn is not None and not conn.is_closed() and conn.is_in_transaction()

    def close(self) -> None:
        conn, self._conn = self._conn, None
        self._pending = []
        if conn is not None and not conn.is_closed():
            try:
                self._loop.run(asyncio.wait_for(conn.close(), 5))
            except Exception:  # noqa: BLE001 - closing a broken connection: nothing to save
                self._terminate(conn)

    def _terminate(self, conn: asyncpg.Connection) -> None:
        """Drop the connection at once, on the loop that owns it."""

        async def terminate() -> None:
            conn.terminate()

        with contextlib.suppress(StoreError):
            self._loop.run(terminate())

    def execute(self, sql: str, parameters: Sequence[Any] = (), /) -> PgCursor:
        text, returns_rows = _postgres(sql)
        if self._conn is None or self._conn.is_closed():
            self._broken = True
        head = text.lstrip().upper()
        if self._broken:
            self._pending = []
            if head.startswith("ROLLBACK") and not head.startswith("ROLLBACK TO"):
                return PgCursor([], 0)  # the server rolled it back with the connection
            if not head.startswith("BEGIN"):
                raise StoreError(f"the connection to {self.target} was lost")
            self._connect()
        if not parameters and head.startswith(("SAVEPOINT ", "RELEASE ")):
            self._pending.append(text)
            return PgCursor([], 0)
        conn = self._conn
        assert conn is not None
        pending, self._pending = self._pending, []
        try:
            rows, status = self._loop.run(self._run(conn, pending, text, returns_rows, parameters))
        except _LOST as exc:
            self._broken = True
            self._terminate(conn)
            raise StoreError(
                f"the connection to {self.target} was lost: {describe_error(exc)}"
            ) from None
        return PgCursor(rows, _count(status))

    def executemany(self, sql: str, parameters: Iterable[Sequence[Any]], /) -> None:
        for params in parameters:
            self.execute(sql, params)

    async def _run(
        self,
        conn: asyncpg.Connection,
        pending: list[str],
        text: str,
        returns_rows: bool,
        params: Sequence[Any],
    ) -> tuple[list[tuple[Any, ...]], str]:
        if not params and not returns_rows:
            return [], await conn.execute("; ".join([*pending, text]))
        if any(isinstance(p, str) and "\x00" in p for p in params):
            # PostgreSQL's text cannot hold NUL (SQLite's can): stored as U+FFFD instead of
            # refusing the callback it came in, which MAVI would redeliver forever.
            params = [p.replace("\x00", "\ufffd") if isinstance(p, str) else p for p in params]
        if pending:
            await conn.execute("; ".join(pending))
        stmt = self._prepared.get(text)
        if stmt is None:
            stmt = self._prepared[text] = await conn.prepare(text)
        records = await stmt.fetch(*params)
        rows = [tuple(_plain(v) for v in r.values()) for r in records]
        return rows, stmt.get_statusmsg() or ""


def _count(status: str) -> int:
    """Rows a statement changed, from its status ("INSERT 0 1", "UPDATE 3", "SELECT 2")."""
    last = status.rsplit(" ", 1)[-1]
    return int(last) if last.isdigit() else -1


class PgReadConnection:
    """A read connection to the database (see `streamwatch.store.reader`): each `run` is one
    `REPEATABLE READ` read-only transaction. `check_schema`: refuse a database of another
    schema version than this streamwatch's."""

    def __init__(self, target: PgTarget, loop: DbLoop, *, check_schema: bool = True) -> None:
        self._conn = PgConnection(target, loop, read_only=True)
        self._check_schema = check_schema
        self.schema_version = 0

    def open(self) -> None:
        self._conn.open()
        try:
            self.schema_version = schema_version(self._conn)
            if self._check_schema:
                check_version(str(self._conn.target), self.schema_version, migrating=False)
        except BaseException:
            self._conn.close()
            raise

    def run(self, fn: Callable[[Connection], T], *, own_errors: bool = False) -> T:
        """`fn` in one read transaction (its errors are raised as they are, `own_errors` or
        not: the driver's never say anything of a file)."""
        conn = self._conn
        conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
        try:
            result = fn(conn)
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
        return result

    def close(self) -> None:
        self._conn.close()


def connect_writer_pg(target: PgTarget, loop: DbLoop) -> PgConnection:
    """The writer's connection, the database migrated to the current schema."""
    conn = PgConnection(target, loop)
    conn.open()
    try:
        migrate_pg(conn, str(target))
    except BaseException:
        conn.close()
        raise
    return conn


def check_database(target: PgTarget) -> str | None:
    """What keeps `target` from being used as the store, or None: the server unreachable,
    authentication failed, no such database, a schema newer than this streamwatch's, or an
    older one that needs migrating (the daemon's first start does it, under a lock). An
    empty database is fine: the schema is created at the first start. Reads only."""
    loop = DbLoop()
    loop.start()
    conn = PgConnection(target, loop, read_only=True)
    try:
        conn.open()
        version = schema_version(conn)
    except StoreError as exc:
        return str(exc)
    finally:
        conn.close()
        loop.stop()
    if version > SCHEMA_VERSION:
        return (
            f"{target} has schema version {version}, newer than this streamwatch understands "
            f"({SCHEMA_VERSION}); upgrade streamwatch or use another database"
        )
    if 0 < version < SCHEMA_VERSION:
        return (
            f"{target} needs migration (schema {version}, this streamwatch uses "
            f"{SCHEMA_VERSION}): `streamwatch run` migrates it at its start"
        )
    return None
