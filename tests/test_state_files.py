"""The state file and its -wal and -shm companions are readable by their owner only."""

from __future__ import annotations

import asyncio
import os
import signal
import stat
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from streamwatch.store import Store
from tests.conftest import free_port
from tests.test_store import register


def modes(folder: Path) -> dict[str, str]:
    return {p.name: oct(stat.S_IMODE(p.stat().st_mode)) for p in sorted(folder.iterdir())}


@pytest.fixture
def umask() -> Iterator[None]:
    """The most permissive umask, as a careless service manager or shell may leave it."""
    old = os.umask(0)
    yield
    os.umask(old)


async def test_new_state_files_are_owner_only_whatever_the_umask(tmp_path: Path, umask):
    """Under umask 000 the store creates the state file, its WAL and its shared-memory file
    with mode 0600."""
    async with Store(tmp_path / "state.db") as store:
        await register(store, "t1")
        assert modes(tmp_path) == dict.fromkeys(
            ["state.db", "state.db-shm", "state.db-wal"], "0o600"
        )


async def test_existing_open_state_files_are_tightened(tmp_path: Path):
    """A state file (and WAL) that an older version left 0644 is made 0600 when opened."""
    async with Store(tmp_path / "state.db") as store:
        await register(store, "t1")
    for name in ("state.db", "state.db-wal"):
        (tmp_path / "state.db").with_name(name).touch()
        (tmp_path / name).chmod(0o644)
    async with Store(tmp_path / "state.db") as store:
        assert await store.task("t1") is not None
        assert modes(tmp_path) == dict.fromkeys(
            ["state.db", "state.db-shm", "state.db-wal"], "0o600"
        )


async def test_a_daemon_under_umask_000_writes_private_state(tmp_path: Path):
    """`streamwatch run` started with umask 000 stores callbacks in owner-only files."""
    config = tmp_path / "streams.toml"
    config.write_text(f"""
[mavi]
segment_seconds = 0.05
[server]
listen = "127.0.0.1:{free_port()}"
[storage]
path = "{tmp_path / "state" / "state.db"}"
[logging]
format = "json"
[[streams]]
name = "cam"
url = "rtmp://cams.test/cam"
""")
    (tmp_path / "state").mkdir()
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "streamwatch",
        "run",
        "-c",
        str(config),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        preexec_fn=lambda: os.umask(0),
    )
    assert proc.stdout is not None
    try:
        async with asyncio.timeout(30):
            while b'"segment.stored"' not in await proc.stdout.readline():
                pass
        files = modes(tmp_path / "state")  # while it runs: a clean stop removes -wal and -shm
    finally:
        proc.send_signal(signal.SIGTERM)
        await proc.communicate()
    assert files == dict.fromkeys(["state.db", "state.db-shm", "state.db-wal"], "0o600")
