"""A throwaway PostgreSQL cluster for the tests: `initdb` in a temporary folder, its own port on
127.0.0.1 and its socket in that folder, never a system service. Run as an unprivileged user
when the tests run as root (PostgreSQL refuses to run as root).
"""

from __future__ import annotations

import asyncio
import itertools
import os
import pwd
import shutil
import sqlite3
import subprocess
import tempfile
import threading
from collections.abc import Coroutine, Sequence
from pathlib import Path
from typing import Any, TypeVar

import asyncpg

from streamwatch.store import PgTarget
from streamwatch.store.sql import to_postgres


def _newest_bin() -> Path:
    """Debian's PostgreSQL binaries (not on PATH), the newest major version installed."""
    found = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/initdb"),
        key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit() else 0,
    )
    return found[-1].parent if found else Path("/usr/lib/postgresql/15/bin")


BIN = (
    Path(os.environ["STREAMWATCH_PG_BIN"]) if "STREAMWATCH_PG_BIN" in os.environ else _newest_bin()
)
T = TypeVar("T")
PASSWORD_USER = "sw_secret_user"
PASSWORD = "pw-Secr3t-for-tests-only"


def in_thread(coro: Coroutine[Any, Any, T]) -> T:
    """Run `coro` to completion on a loop of its own, in a thread of its own (callable from a
    sync fixture or from a test's running loop alike)."""
    result: list[T] = []
    error: list[BaseException] = []

    def run() -> None:
        try:
            result.append(asyncio.run(coro))
        except BaseException as exc:  # noqa: BLE001 - handed back to the caller
            error.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    if error:
        raise error[0]
    return result[0]


class Cluster:
    """One cluster per test session; `new_database()` gives each test an empty database."""

    def __init__(self, port: int, *, durable: bool = False) -> None:
        """`durable`: fsync and full-page writes on, as a real server runs (for benchmarks;
        the tests' cluster skips them)."""
        self.port = port
        self.durable = durable
        self.dir = Path(tempfile.mkdtemp(prefix="streamwatch-pg-"))
        self.data = self.dir / "data"
        self._user: str | None = None
        if os.geteuid() == 0:
            self._user = "postgres" if _user_exists("postgres") else "nobody"
            uid = pwd.getpwnam(self._user).pw_uid
            os.chown(self.dir, uid, -1)
        self._names = itertools.count(1)

    def _run(self, *argv: str) -> None:
        cmd = list(argv)
        if self._user is not None:
            cmd = ["runuser", "-u", self._user, "--", *cmd]
        subprocess.run(cmd, check=True, capture_output=True, timeout=120)

    def start(self) -> None:
        if not self.data.exists():
            self._run(
                str(BIN / "initdb"),
                "-D",
                str(self.data),
                "-U",
                "postgres",
                "-A",
                "trust",
                "--no-sync",
                "-E",
                "UTF8",
                "--locale=C",
            )
            # Loopback TCP connections of one user need its password (the secret's test);
            # every other connection is trusted.
            hba = self.data / "pg_hba.conf"
            hba.write_text(
                f"local all all trust\nhost all {PASSWORD_USER} 127.0.0.1/32 scram-sha-256\n"
                "host all all 127.0.0.1/32 trust\n"
            )
        self._run(
            str(BIN / "pg_ctl"),
            "-D",
            str(self.data),
            "-w",
            "-l",
            str(self.dir / "log"),
            "-o",
            f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c max_connections=200"
            + ("" if self.durable else " -c fsync=off -c full_page_writes=off"),
            "start",
        )

    def stop(self, mode: str = "fast") -> None:
        self._run(str(BIN / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop")

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)

    def url(self, database: str, user: str = "postgres") -> str:
        return f"postgresql://{user}@127.0.0.1:{self.port}/{database}"

    def admin(self, *statements: str) -> None:
        """Run statements as the superuser on the `postgres` database."""

        async def run() -> None:
            conn = await asyncpg.connect(self.url("postgres"))
            try:
                for statement in statements:
                    await conn.execute(statement)
            finally:
                await conn.close()

        in_thread(run())

    def new_database(self) -> str:
        """An empty database of its own (its name)."""
        name = f"t{os.getpid()}_{next(self._names)}"
        self.admin(f"CREATE DATABASE {name} TEMPLATE template0")
        return name

    def drop_database(self, name: str) -> None:
        """Drop a test's database, whatever still holds connections to it."""
        self.admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")

    def add_password_user(self) -> None:
        self.admin(
            f"DO $$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{PASSWORD_USER}')"
            f" THEN CREATE ROLE {PASSWORD_USER} LOGIN PASSWORD '{PASSWORD}'; END IF; END $$"
        )


def _user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


def available() -> bool:
    return (BIN / "initdb").exists() and (BIN / "pg_ctl").exists()


def rows(location: Path | PgTarget, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
    """What `sql` (as the store writes it, see streamwatch.store.sql) returns from the state
    at `location`, read outside the store: for tests that look at rows no query returns. An
    SQLite file is opened read-only (beside a running or killed daemon, it changes nothing)."""
    if isinstance(location, Path):
        conn = sqlite3.connect(f"file:{location}?mode=ro", uri=True)
        try:
            return conn.execute(sql, params).fetchall()
        finally:
            conn.close()

    async def run() -> list[tuple[Any, ...]]:
        conn = await asyncpg.connect(location.url)
        try:
            return [tuple(r.values()) for r in await conn.fetch(to_postgres(sql), *params)]
        finally:
            await conn.close()

    return in_thread(run())
