"""Shared fixtures: a fast emulator on loopback and daemons built against it.

Daemons in these tests use `backend = "mavi"` with the emulator's base URL, exactly as a user
with a real account would, so the emulator outlives daemon restarts (adoption tests) and
nothing depends on the in-process wiring of the built-in backend.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, Self

import pytest
import stamina
import structlog

from streamwatch.app import App
from streamwatch.config import Config, parse_config
from streamwatch.emulator import Emulator
from streamwatch.policy import StreamState
from streamwatch.store import EventRow, Location, PgTarget, Store
from streamwatch.supervisor import Supervisor
from tests import pg

if TYPE_CHECKING:
    from tests.media import LiveSources

SECRET = "test-callback-secret-0123456789"
API_KEY = "sk-mai-test-key"
ENV = {"SW_SECRET": SECRET, "MAVI_KEY": API_KEY, "SW_TOKEN": "status-token-xyz"}
SEGMENT = 0.05


@pytest.fixture(autouse=True)
def _plain_tracebacks() -> Iterator[None]:
    """structlog's default output, with tracebacks rendered plain as the daemon's own console
    output does (streamwatch.logs): the default picks rich's formatter, which prints every
    frame's locals, some 0.3 s of the event loop per logged failure (a test whose store is
    closed under the daemon spent seconds on them)."""
    structlog.reset_defaults()
    processors = structlog.get_config()["processors"]
    structlog.configure(
        processors=[
            *processors[:-1],
            structlog.dev.ConsoleRenderer(exception_formatter=structlog.dev.plain_traceback),
        ]
    )
    yield
    structlog.reset_defaults()


@pytest.fixture(autouse=True)
def _no_retry_sleeps() -> Any:
    """HTTP retries still happen in tests, without their backoff sleeps."""
    with stamina.set_testing(True, attempts=4, cap=True):
        yield


def config_text(
    db: Path,
    *,
    base_url: str,
    streams: str = "",
    supervisor: str = "",
    extra: str = "",
    mavi: str = "",
    token: bool = False,
    stall_after_segments: int = 40,
    storage: str = "",
    server: str = "",
    batch_url: str = "http://127.0.0.1:9/api/serve/video",
) -> str:
    return f"""
[mavi]
backend = "mavi"
base_url = "{base_url}"
batch_base_url = "{batch_url}"
api_key = {{ env = "MAVI_KEY" }}
segment_seconds = {SEGMENT}
{mavi}
[mavi.retry]
attempts = 3
initial_seconds = 0.01
max_seconds = 0.05
timeout_seconds = 5

[server]
listen = "127.0.0.1:0"
callback_secret = {{ env = "SW_SECRET" }}
{'status_token = { env = "SW_TOKEN" }' if token else ""}
{server}

[storage]
path = "{db}"
{storage}

[supervisor]
tick_seconds = 0.02
stall_after_segments = {stall_after_segments}
restart_initial_seconds = 0.05
restart_max_seconds = 0.2
restart_jitter = 0.0
balance_recheck_seconds = 30
drain_seconds = 2
stable_after_segments = 3
{supervisor}

{extra}

{streams}
"""


def storage_toml(location: Location) -> str:
    """The `[storage]` key that keeps the state at `location`."""
    if isinstance(location, PgTarget):
        return f'url = "{location.url}"'
    return f'path = "{location}"'


def stream_toml(name: str, url: str | None = None, **fields: Any) -> str:
    lines = [
        "[[streams]]",
        f'name = "{name}"',
        f'url = "{url or f"rtmp://cams.test/{name}"}"',
    ]
    for key, value in fields.items():
        lines.append(f"{key} = {str(value).lower() if isinstance(value, bool) else value}")
    return "\n".join(lines) + "\n"


@pytest.fixture
async def emulator() -> AsyncIterator[Emulator]:
    emu = Emulator(
        segment_seconds=SEGMENT,
        api_key=API_KEY,
        redelivery_initial_seconds=0.02,
        redelivery_attempts=20,
    )
    async with emu.running():
        yield emu


class Located:
    """Where a test daemon keeps its state: `db` (an SQLite file) unless `on()` moves it to a
    PostgreSQL database; `storage` is the [storage] lines that say so."""

    db: Path
    storage: str
    location: Location

    def on(self, location: Location) -> Self:
        """Keep the state at `location` (a PostgreSQL database, or an SQLite file)."""
        self.location = location
        if isinstance(location, PgTarget):
            self.storage = storage_toml(location)
        else:
            self.db = location
            self.storage = ""
        return self


class Daemon(Located):
    """Starts and stops `App`s on one state file, as a service manager would."""

    def __init__(self, tmp_path: Path, emulator: Emulator) -> None:
        self.db = tmp_path / "state.db"
        self.config_path = tmp_path / "streams.toml"
        self.emulator = emulator
        self.app: App | None = None
        self._task: asyncio.Task[None] | None = None
        self.clock: Callable[[], float] = time.time
        self.env = dict(ENV)
        self.storage = ""  # more [storage] lines (a PostgreSQL url)
        self.location: Location = self.db

    def write(self, streams: str, **kwargs: Any) -> Config:
        kwargs.setdefault("storage", self.storage)
        text = config_text(
            self.db,
            base_url=self.emulator.base_url,
            batch_url=self.emulator.batch_url,
            streams=streams,
            **kwargs,
        )
        self.config_path.write_text(text)
        return parse_config(text, environ=self.env)

    async def start(self, streams: str | None = None, **kwargs: Any) -> App:
        if streams is not None:
            self.write(streams, **kwargs)
        config = parse_config(self.config_path.read_text(), environ=self.env)
        app = App(config, config_path=self.config_path, environ=self.env, clock=self.clock)
        self._task = asyncio.create_task(app.serve())
        started = asyncio.create_task(app.started.wait())
        done, _ = await asyncio.wait({self._task, started}, return_when=asyncio.FIRST_COMPLETED)
        if self._task in done:
            started.cancel()
            self._task.result()
        assert app.server is not None
        self.emulator.webhook = app.server.callback_url()
        self.app = app
        return app

    async def stop(self) -> None:
        if self.app is not None and self._task is not None:
            self.app.request_stop()
            await self._task
        self.app = None
        self._task = None

    async def crash(self) -> None:
        """Stop without the graceful path: what SIGKILL leaves behind, as far as the store and
        MAVI can tell (tasks keep running, nothing is drained)."""
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self.app = None
        self._task = None

    @property
    def sup(self) -> Supervisor:
        assert self.app is not None
        assert self.app.supervisor is not None
        return self.app.supervisor

    def state(self, name: str) -> StreamState:
        """The supervisor's view of a stream (a fresh idle state before its first plan)."""
        return self.sup.streams.get(name, StreamState(name))

    @property
    def store(self) -> Store:
        assert self.app is not None
        assert self.app.store is not None
        return self.app.store

    async def events(self, *, stream: str | None = None) -> list[EventRow]:
        """The recorded events, once every event already decided has been written."""
        await self.sup.settle()
        return await self.store.events(stream=stream)

    async def wait(self, predicate: Callable[[], bool], within: float = 10.0) -> None:
        """Wait for a supervisor condition, failing the test after `within` seconds."""
        async with asyncio.timeout(within):
            await self.sup.wait_until(predicate)


@pytest.fixture
async def daemon(tmp_path: Path, emulator: Emulator, location: Location) -> AsyncIterator[Daemon]:
    """A daemon against the emulator, its state in SQLite, then in PostgreSQL (the same test
    on both backends; `sqlite_only` tests on SQLite alone, `postgresql_only` ones on
    PostgreSQL alone)."""
    d = Daemon(tmp_path, emulator).on(location)
    yield d
    # Stop deliveries first: a callback connection accepted while the server closes would
    # only be noise at teardown.
    emulator.webhook = None
    await d.stop()


class FakeClock:
    """Wall time the test sets: the daemon's periods, stalls and estimates follow it."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for servers in other processes)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def tool(name: str, *alternatives: str) -> str:
    """The path of an external checker (promtool, amtool, systemd-analyze, kubernetes-validate…):
    on PATH, or installed next to this interpreter by a dev dependency. Missing, the test is
    skipped, unless STREAMWATCH_REQUIRE_TOOLS=1 (set by .ci/run): then it fails, so that CI
    cannot pass by checking nothing."""
    here = str(Path(sys.executable).parent)
    for candidate in (name, *alternatives):
        found = shutil.which(candidate) or shutil.which(candidate, path=here)
        if found:
            return found
    missing(f"{name} is not installed")


def missing(why: str) -> NoReturn:
    """Skip the test for want of an external tool, or fail it under STREAMWATCH_REQUIRE_TOOLS=1."""
    if os.environ.get("STREAMWATCH_REQUIRE_TOOLS") == "1":
        pytest.fail(f"{why} (STREAMWATCH_REQUIRE_TOOLS=1)")
    pytest.skip(why)


async def spawn_daemon(
    config: Path, env: dict[str, str], *, capture: bool = False
) -> asyncio.subprocess.Process:
    """`streamwatch run -c CONFIG` in its own process, as a service manager starts it; `env`
    adds to this environment. With `capture`, stdout and stderr come back as one pipe."""
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "streamwatch",
        "run",
        "-c",
        str(config),
        env={**os.environ, **env},
        stdout=asyncio.subprocess.PIPE if capture else asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.STDOUT if capture else asyncio.subprocess.DEVNULL,
    )


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run the installed `streamwatch` command as a user would, with a time limit."""
    return subprocess.run(
        [sys.executable, "-m", "streamwatch", *args],
        capture_output=True,
        text=True,
        check=False,
        timeout=30,
        env={**os.environ, **(env or {})},
    )


async def until(emulator: Emulator, predicate: Callable[[], bool], within: float = 10.0) -> None:
    """Wait for a condition on the emulator's own records."""
    async with asyncio.timeout(within):
        await emulator.wait_until(predicate)


@pytest.fixture
async def live_sources(tmp_path: Path) -> AsyncIterator[LiveSources]:
    """Live RTMP/RTSP sources on real servers, started and stopped on demand (tests/media.py)."""
    from tests.media import LiveSources

    async with LiveSources(tmp_path / "live") as sources:
        yield sources


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[pg.Cluster]:
    """A throwaway PostgreSQL cluster for the session (tests/pg.py)."""
    if not pg.available():
        missing(f"PostgreSQL is not installed (no initdb in {pg.BIN})")
    cluster = pg.Cluster(free_port())
    try:
        cluster.start()
        yield cluster
    finally:
        with contextlib.suppress(subprocess.SubprocessError):
            cluster.stop("immediate")
        cluster.remove()


@pytest.fixture
def pg_target(pg_cluster: pg.Cluster) -> Iterator[PgTarget]:
    """An empty PostgreSQL database of this test's own, dropped after it (the cluster stays
    small: each database is some 1,000 files)."""
    name = pg_cluster.new_database()
    yield PgTarget(pg_cluster.url(name), pool_size=2)
    pg_cluster.drop_database(name)


BACKENDS = ("sqlite", "postgresql")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """A test that keeps state (`location`, hence `daemon`) runs once per backend, minus the
    one its `sqlite_only` or `postgresql_only` marker leaves out; the PostgreSQL runs carry
    the `postgresql` marker (`-m "not postgresql"` leaves them out)."""
    if "location" not in metafunc.fixturenames:
        return
    only = [
        name
        for name in BACKENDS
        if metafunc.definition.get_closest_marker(f"{name}_only") is not None
    ]
    if len(only) > 1:
        raise pytest.UsageError(
            f"{metafunc.definition.nodeid}: both sqlite_only and postgresql_only"
        )
    backends = only or list(BACKENDS)
    metafunc.parametrize(
        "location",
        [
            pytest.param(name, marks=[pytest.mark.postgresql] if name == "postgresql" else [])
            for name in backends
        ],
        indirect=True,
        ids=backends,
    )


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests on the PostgreSQL cluster itself (`pg_target`, `pg_cluster`) carry the
    `postgresql` marker too."""
    for item in items:
        if "pg_cluster" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.postgresql)


@pytest.fixture
def location(request: pytest.FixtureRequest, tmp_path: Path) -> Location:
    """Where a test keeps its state: an SQLite file, then an empty PostgreSQL database
    (parametrized by `pytest_generate_tests`: the same test runs on both backends)."""
    if request.param == "sqlite":
        return tmp_path / "state.db"
    target: PgTarget = request.getfixturevalue("pg_target")
    return target


@pytest.fixture
async def fleet(
    tmp_path: Path, emulator: Emulator, pg_target: PgTarget
) -> AsyncIterator[tuple[Daemon, Daemon]]:
    """Two replicas' daemons on one database (each with its own config file)."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = Daemon(tmp_path / "a", emulator).on(pg_target)
    b = Daemon(tmp_path / "b", emulator).on(pg_target)
    yield a, b
    emulator.webhook = None
    await b.stop()
    await a.stop()
