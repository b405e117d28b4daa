"""`streamwatch backup`: a consistent copy of the state file while the daemon writes to it."""

from __future__ import annotations

import asyncio
import sqlite3
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from streamwatch.emulator import Script
from streamwatch.store import Store
from tests.conftest import ENV, cli, stream_toml


@pytest.mark.sqlite_only(reason="the online backup of the SQLite file (pg_dump on PostgreSQL)")
async def test_backup_while_the_daemon_writes(daemon, emulator, tmp_path: Path):
    """The copy, taken under callback traffic, opens as a state file of the current schema with
    every segment stored before it began; it is one file (no -wal) readable by its owner only;
    the daemon goes on storing."""
    emulator.scripts["rtmp://cams.test/a"] = Script(outcomes=["safe", "unsafe"])
    await daemon.start(stream_toml("a", "rtmp://cams.test/a") + stream_toml("b"))
    await daemon.wait(lambda: daemon.state("a").run_segments >= 5)
    before = await daemon.store.segment_count()
    dest = tmp_path / "backups" / "copy.db"
    dest.parent.mkdir()

    result = await asyncio.to_thread(
        cli, "backup", "--config", str(daemon.config_path), str(dest), env=ENV
    )

    assert result.returncode == 0, result.stderr
    assert f"{dest}: schema {daemon.store.schema_version}" in result.stdout
    assert "integrity ok" in result.stdout
    assert sorted(p.name for p in dest.parent.iterdir()) == ["copy.db"]
    assert stat.S_IMODE(dest.stat().st_mode) == 0o600
    with sqlite3.connect(dest) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("delete",)
    async with Store(dest) as copy:
        assert await copy.segment_count() >= before
    now = daemon.state("a").run_segments
    await daemon.wait(lambda: daemon.state("a").run_segments > now)


@pytest.mark.sqlite_only(reason="the online backup of the SQLite file (pg_dump on PostgreSQL)")
async def test_backup_into_a_folder_gets_a_dated_name(daemon, tmp_path: Path):
    await daemon.start(stream_toml("a"))
    folder = tmp_path / "backups"
    folder.mkdir()
    result = await asyncio.to_thread(
        cli, "backup", "--config", str(daemon.config_path), str(folder), env=ENV
    )
    assert result.returncode == 0, result.stderr
    (made,) = folder.iterdir()
    assert made.name.startswith("streamwatch-")
    assert made.suffix == ".db"


def test_a_failed_backup_keeps_the_previous_one(tmp_path: Path):
    """A state file that is not SQLite: a clear error, the old backup untouched, no leftovers.
    No state file at all: said so, and nothing is created."""
    config = tmp_path / "streams.toml"
    config.write_text(f'[storage]\npath = "{tmp_path / "state.db"}"\n')
    dest = tmp_path / "copy.db"
    dest.write_bytes(b"the previous good backup")

    missing = cli("backup", "--config", str(config), str(dest))
    assert missing.returncode == 1
    assert "no state file at" in missing.stderr
    assert not (tmp_path / "state.db").exists()

    (tmp_path / "state.db").write_bytes(b"not a database" * 1000)
    broken = cli("backup", "--config", str(config), str(dest))
    assert broken.returncode == 1
    assert "cannot back up" in broken.stderr
    assert "Traceback" not in broken.stderr
    assert dest.read_bytes() == b"the previous good backup"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy.db", "state.db", "streams.toml"]


def test_a_closed_pipe_is_not_a_traceback(tmp_path: Path):
    """`streamwatch cost estimate | head -1` style: the reader leaves, the command ends quietly
    with the shell's SIGPIPE status."""
    config = tmp_path / "streams.toml"
    config.write_text("".join(stream_toml(f"cam{i}") for i in range(200)))
    with subprocess.Popen(
        [sys.executable, "-m", "streamwatch", "cost", "estimate", "--config", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    ) as proc:
        assert proc.stdout is not None
        assert proc.stderr is not None
        proc.stdout.close()  # before the command writes anything
        err = proc.stderr.read().decode()
        assert proc.wait(timeout=30) == 141, err
    assert "Traceback" not in err
