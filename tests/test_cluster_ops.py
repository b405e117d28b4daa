"""Operating a fleet (`[cluster]`): readiness follows the lease rounds, and `streamwatch fleet
stop` stops every replica's tasks through the store."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import pytest

from streamwatch.emulator import Emulator
from streamwatch.store import PgTarget
from tests import pg
from tests.conftest import Daemon
from tests.test_cluster_daemon import NAMES, STREAMS, A, cluster_toml, running
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
    # A lease of 3 s: a round late under load does not lapse it (readiness would say so).
    await daemon.start(
        STREAMS,
        extra=cluster_toml(A)
        .replace("lease_seconds = 1", "lease_seconds = 3")
        .replace("renew_seconds = 0.3", "renew_seconds = 1"),
    )
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
