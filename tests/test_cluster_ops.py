"""Operating a fleet (`[cluster]`): readiness follows the lease rounds, and `streamwatch fleet
stop` stops every replica's tasks through the store."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from streamwatch.emulator import Emulator
from streamwatch.store import PgTarget
from tests import pg
from tests.conftest import ENV, Daemon
from tests.test_cluster_daemon import NAMES, STREAMS, A, B, cluster_toml, running
from tests.test_pg_daemon import readyz


async def ready_when(daemon: Daemon, predicate: Callable[[int, list[str]], bool]) -> list[str]:
    """Poll /readyz (another process would) until `predicate(status, problems)`; the
    problems then."""
    async with asyncio.timeout(30):
        while True:
            status, doc = await readyz(daemon)
            problems = (
                [str(p) for p in doc["problems"]] if isinstance(doc["problems"], list) else []
            )
            if predicate(status, problems):
                return problems
            await asyncio.sleep(0.05)


def steady(replica: str) -> str:
    """A lease of 5 s: a round late under load (a command starting beside the replicas, both
    replicas on the test's one event loop) does not lapse it."""
    return cluster_toml(replica, lease=5, renew=1.5)


def lapsing(problems: list[str]) -> bool:
    return any("no lease round has succeeded" in p for p in problems)


@pytest.mark.postgresql_only(reason="stops and restarts the PostgreSQL server itself")
async def test_readiness_turns_off_while_lease_rounds_fail_and_back_after_a_good_one(
    tmp_path: Path, emulator: Emulator, pg_cluster: pg.Cluster, pg_target: PgTarget
):
    """A replica is ready once its first lease round committed; while its rounds fail for
    `lease_seconds` (the replicas table gone, the store still taking writes) /readyz is 503
    saying its leases lapse, and ready again after the next good round; the same through a
    database outage (the server stopped, then started)."""
    daemon = Daemon(tmp_path, emulator).on(pg_target)
    await daemon.start(STREAMS, extra=steady(A))
    try:
        await daemon.wait(lambda: len(running(daemon)) == len(NAMES))
        assert await readyz(daemon) == (200, {"ready": True, "problems": []})
        pg.rows(pg_target, "ALTER TABLE replicas RENAME TO replicas_away")
        try:
            problems = await ready_when(daemon, lambda status, p: status == 503)
            assert lapsing(problems)
            assert not [p for p in problems if "store" in p], "the store itself takes writes"
        finally:
            pg.rows(pg_target, "ALTER TABLE replicas_away RENAME TO replicas")
        await ready_when(daemon, lambda status, p: status == 200)

        await asyncio.to_thread(pg_cluster.stop, "fast")
        try:
            problems = await ready_when(daemon, lambda status, p: lapsing(p))
            assert any("store is not writable" in p for p in problems)
        finally:
            await asyncio.to_thread(pg_cluster.start)
        await ready_when(daemon, lambda status, p: status == 200)
    finally:
        await daemon.stop()


async def fleet_verb(daemon: Daemon, *argv: str) -> tuple[int, str]:
    """`streamwatch fleet …` as its own process against the replica's config file (its store
    URL): the exit code and what it printed (stdout, then stderr)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "streamwatch",
        "fleet",
        *argv,
        "--config",
        str(daemon.config_path),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, **ENV},
    )
    out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode() + err.decode()


async def test_fleet_stop_stops_every_replicas_tasks_and_the_replicas_until_fleet_start(
    tmp_path: Path, emulator: Emulator, pg_target: PgTarget
):
    """`streamwatch fleet stop --wait`, run against the config's store with no replica asked:
    both replicas (`on_shutdown = "keep"`) stop the tasks they own, each exactly once, and
    exit by themselves; the verb waits until no task runs and exits 0. A replica started while
    the mark is there starts nothing and exits; `fleet start` clears the mark and a replica
    starts the streams again. `fleet status` shows the replicas and the running tasks."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = Daemon(tmp_path / "a", emulator).on(pg_target)
    b = Daemon(tmp_path / "b", emulator).on(pg_target)
    try:
        # No stall under load (callbacks reach the owner through the feed): no restart.
        await a.start(STREAMS, extra=steady(A), stall_after_segments=400)
        await a.wait(lambda: len(running(a)) == len(NAMES))
        tasks = running(a)  # handed over to b without a restart: the same ids
        await b.start(STREAMS, extra=steady(B), stall_after_segments=400)
        await b.wait(lambda: len(running(b)) > 0, within=20)
        code, shown = await fleet_verb(a, "status", "--json")
        assert code == 0, shown
        doc = json.loads(shown)
        assert {r["replica_id"] for r in doc["replicas"] if r["live"]} == {A, B}, doc["replicas"]
        assert {r["stream"]: r["task_id"] for r in doc["running"]} == tasks
        assert doc["stopping"] is False

        code, shown = await fleet_verb(a, "stop", "--wait", "--timeout", "30", "--poll", "0.1")
        assert code == 0, shown
        assert "no task running: the fleet is stopped" in shown
        for d in (a, b):
            assert d._task is not None
            async with asyncio.timeout(30):
                await d._task  # each replica exits by itself
        assert sorted(t for t, _ in emulator.stop_calls) == sorted(tasks.values())
        assert pg.rows(pg_target, "SELECT count(*) FROM tasks WHERE ended_at IS NULL") == [(0,)]

        starts = len(emulator.accepted_starts())
        await a.start()  # the mark is still there: it stops at once, starting nothing
        assert a._task is not None
        async with asyncio.timeout(30):
            await a._task
        assert len(emulator.accepted_starts()) == starts

        code, shown = await fleet_verb(a, "start")
        assert (code, shown.strip()) == (0, "fleet stop mark cleared")
        await a.start()
        await a.wait(lambda: len(running(a)) == len(NAMES), within=20)
    finally:
        emulator.webhook = None
        await b.stop()
        await a.stop()


async def test_fleet_stop_wait_times_out_with_exit_6_while_a_task_has_no_replica(
    tmp_path: Path, emulator: Emulator, pg_target: PgTarget
):
    """With the only replica killed (its task left running at MAVI, its lease lapsing), `fleet
    stop --wait` cannot see the task stop: it names it, without an owner, and exits 6 at its
    timeout; a config without a PostgreSQL fleet is refused with exit 1."""
    daemon = Daemon(tmp_path, emulator).on(pg_target)
    await daemon.start(STREAMS, extra=cluster_toml(A))
    await daemon.wait(lambda: len(running(daemon)) == len(NAMES))
    await daemon.crash()
    pg.rows(pg_target, "UPDATE stream_leases SET expires_at = 0")
    code, shown = await fleet_verb(daemon, "stop", "--wait", "--timeout", "0.3", "--poll", "0.1")
    assert code == 6
    assert f"{len(NAMES)} task(s) still running" in shown
    assert "(no owner)" in shown
    daemon.on(tmp_path / "state.db").write(STREAMS)  # SQLite, no [cluster]
    assert (await fleet_verb(daemon, "status"))[0] == 1
