"""The daemon on PostgreSQL: `kill -9` during traffic loses no acknowledged callback and
counts no charge twice; a database that goes away mid-traffic turns callbacks and `/readyz`
to 503 until it is back, and nothing acknowledged is lost."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from streamwatch.emulator import Emulator
from streamwatch.store import PgTarget
from tests import pg
from tests.conftest import Daemon, stream_toml, until
from tests.test_restart_kill import Process

STREAMS = (
    stream_toml("one", fps=1)
    + stream_toml("both", fps=3, logo_detection=True)
    + stream_toml("logos", fps=2, content_moderation=False, logo_detection=True)
)


def provider_ticks(emulator: Emulator) -> dict[str, int]:
    """What the emulator charged, per stream (its URL's last part)."""
    out: dict[str, int] = {}
    for task in emulator.tasks.values():
        name = task.url.rsplit("/", 1)[-1]
        out[name] = out.get(name, 0) + task.charged_ticks
    return out


def check_against_provider(target: PgTarget, emulator: Emulator) -> None:
    """Every acknowledged segment callback is stored, each segment is charged once, and the
    ledger equals what the emulator charged, stream by stream."""
    stored = set(pg.rows(target, "SELECT task_id, segment_index FROM segments"))
    acknowledged = {
        (d.task_id, d.segment_index)
        for d in emulator.deliveries
        if d.delivered and d.segment_index is not None and d.status == 0
    }
    assert acknowledged <= stored
    charged = pg.rows(
        target,
        "SELECT task_id, segment_index, count(*) FROM charges WHERE kind = 'segment'"
        " GROUP BY task_id, segment_index HAVING count(*) > 1",
    )
    assert charged == []
    ledger = dict(pg.rows(target, "SELECT stream, sum(ticks) FROM charges GROUP BY stream"))
    assert {k: int(v) for k, v in ledger.items()} == provider_ticks(emulator)


@pytest.fixture
async def process(
    tmp_path: Path, emulator: Emulator, pg_target: PgTarget
) -> AsyncIterator[Process]:
    """`streamwatch run` in its own process, its state in PostgreSQL."""
    p = Process(tmp_path, emulator)
    p.storage = f'url = "{pg_target.url}"'
    yield p
    emulator.webhook = None
    if p.proc is not None:
        await p.kill()


async def test_kill_9_during_traffic_on_postgresql_loses_nothing(
    process: Process, emulator: Emulator, pg_target: PgTarget
):
    """SIGKILL of a daemon storing into PostgreSQL mid-traffic, then a new one: every
    callback acknowledged before the kill is stored, none is charged twice, and the ledger
    equals the emulator's charges to the tick."""
    process.write(STREAMS, supervisor={})
    emulator.webhook = process.webhook
    await process.start()
    await until(emulator, lambda: sum(d.delivered for d in emulator.deliveries) >= 15, 30)
    await process.kill()
    acknowledged_before = {(d.task_id, d.segment_index) for d in emulator.deliveries if d.delivered}
    await process.start()
    await until(emulator, lambda: sum(d.delivered for d in emulator.deliveries) >= 40, 30)
    emulator.balance_ticks = 40  # every task ends (402) within a few segments
    await until(emulator, lambda: all(t.state == "ended" for t in emulator.tasks.values()), 30)
    await until(emulator, lambda: all(d.delivered for d in emulator.deliveries), 30)
    assert await process.stop() == 0
    stored = set(pg.rows(pg_target, "SELECT task_id, segment_index FROM segments"))
    assert {a for a in acknowledged_before if a[1] is not None} <= stored
    check_against_provider(pg_target, emulator)


async def readyz(daemon: Daemon) -> tuple[int, dict[str, object]]:
    assert daemon.app is not None
    assert daemon.app.server is not None
    url = f"{daemon.app.server.base_url}/readyz"
    async with aiohttp.ClientSession() as session, session.get(url) as resp:
        return resp.status, dict(await resp.json())


@pytest.mark.postgresql_only(reason="stops and restarts the PostgreSQL server itself")
async def test_a_database_outage_answers_503_and_loses_nothing(
    daemon: Daemon, emulator: Emulator, pg_cluster: pg.Cluster, pg_target: PgTarget
):
    """The PostgreSQL server stopped mid-traffic: callbacks are answered 503 (the emulator
    redelivers), /readyz is 503 saying why; once it is back the daemon reconnects by itself,
    and in the end every segment is stored once and the ledger equals the emulator's
    charges."""
    await daemon.start(STREAMS)
    await until(emulator, lambda: sum(d.delivered for d in emulator.deliveries) >= 10, 30)
    await asyncio.to_thread(pg_cluster.stop, "fast")
    try:
        await until(emulator, lambda: any(d.last_http == 503 for d in emulator.deliveries), 30)
        status, doc = await readyz(daemon)
        assert status == 503
        problems = doc["problems"]
        assert isinstance(problems, list)
        assert any("store is not writable" in str(p) for p in problems), doc
    finally:
        await asyncio.to_thread(pg_cluster.start)
    before = sum(d.delivered for d in emulator.deliveries)
    await until(emulator, lambda: sum(d.delivered for d in emulator.deliveries) >= before + 20, 30)
    assert (await readyz(daemon))[0] == 200
    assert await daemon.store.charge_totals(since=0, until=10**12), "reads reconnect too"
    emulator.balance_ticks = 40
    await until(emulator, lambda: all(t.state == "ended" for t in emulator.tasks.values()), 30)
    await until(emulator, lambda: all(d.delivered for d in emulator.deliveries), 30)
    await daemon.sup.settle()
    await daemon.stop()
    check_against_provider(pg_target, emulator)
