"""A fleet of real processes: a replica frozen with SIGSTOP past its lease, then resumed, does
not start or stop anything for the streams another replica adopted meanwhile; a short kill -9
trial (bench.cluster) loses no callback, starts nothing twice and charges nothing twice."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable
from pathlib import Path

import pytest

from bench import cluster as bench_cluster
from streamwatch.emulator import Emulator
from streamwatch.store import PgTarget
from streamwatch.store.leases import rendezvous_owners
from tests import pg
from tests.conftest import ENV, Daemon, config_text, spawn_daemon
from tests.fakes.billed_standin import BilledStandIn
from tests.test_cluster_daemon import NAMES, STREAMS, A, B, cluster_toml, running


async def until(condition: Callable[[], bool], within: float = 20.0) -> None:
    """Wait for a condition on the database (no event to wait on across processes)."""
    async with asyncio.timeout(within):
        while not condition():  # noqa: ASYNC110 - state of another process: polled, bounded
            await asyncio.sleep(0.05)


def owner_of(target: PgTarget) -> dict[str, str]:
    return dict(pg.rows(target, "SELECT stream, owner FROM stream_leases WHERE owner IS NOT NULL"))


def rounds_since(target: PgTarget, replica: str, since: float) -> bool:
    rows = pg.rows(target, "SELECT seen_at FROM replicas WHERE replica_id = ?", (replica,))
    return bool(rows) and rows[0][0] > since


async def test_a_replica_frozen_past_its_lease_acts_on_nothing_it_lost(
    tmp_path: Path, emulator: Emulator, pg_target: PgTarget
):
    """Replica A (its own process) holds its share; frozen with SIGSTOP past its lease, its
    streams are adopted by B; resumed, A's stale view (tasks silent for longer than the stall
    period) starts and stops nothing: no start, no stop at the emulator, the same tasks
    running, and A takes its share back by adoption."""
    share_a = {n for n, r in rendezvous_owners(NAMES, [A, B]).items() if r == A}
    b = Daemon(tmp_path, emulator).on(pg_target)
    # B (on the test's loop) never finds a stall, so that any stop the emulator sees could only
    # be A's; A's stale view has its tasks silent for 10 segments and more.
    await b.start(STREAMS, extra=cluster_toml(B), stall_after_segments=100_000)
    try:
        await b.wait(lambda: len(running(b)) == len(NAMES))
        tasks = running(b)
        (tmp_path / "a").mkdir()
        config = tmp_path / "a" / "streams.toml"
        config.write_text(
            config_text(
                tmp_path / "a" / "state.db",
                base_url=emulator.base_url,
                streams=STREAMS,
                storage=f'url = "{pg_target.url}"',
                extra=cluster_toml(A),
                stall_after_segments=10,
            )
        )
        a = await spawn_daemon(config, ENV)
        try:
            await until(lambda: {s for s, o in owner_of(pg_target).items() if o == A} == share_a)
            a.send_signal(signal.SIGSTOP)
            await b.wait(lambda: len(running(b)) == len(NAMES), within=20)
            assert running(b) == tasks
            (now,) = pg.rows(pg_target, "SELECT extract(epoch FROM clock_timestamp())::float8")[0]
            a.send_signal(signal.SIGCONT)
            await until(lambda: rounds_since(pg_target, A, now))
            # A is live again: B hands its share back and A adopts it, as at the join.
            await until(lambda: {s for s, o in owner_of(pg_target).items() if o == A} == share_a)
            await b.wait(lambda: set(b.sup.streams) == set(NAMES) - share_a, within=20)
        finally:
            if a.returncode is None:
                a.send_signal(signal.SIGCONT)
                a.send_signal(signal.SIGTERM)
                await a.wait()
        assert emulator.stop_calls == []
        assert len(emulator.accepted_starts()) == len(NAMES)
        assert {t.task_id for t in emulator.running_tasks()} == set(tasks.values())
    finally:
        emulator.webhook = None
        await b.stop()


@pytest.mark.timeout(240)
async def test_kill_9_trial_of_a_small_fleet(tmp_path: Path, pg_target: PgTarget):
    """`bench.cluster`, shortened: two replicas as processes, six streams, the emulator in its
    own process behind a proxy spreading callbacks over them, a replica killed with SIGKILL
    and restarted as a new one (every 5-6 s): every callback the emulator had acknowledged is
    stored, each stream's URL was started once, the ledger equals the emulator's charged
    total."""
    args = bench_cluster.parser().parse_args(
        [
            *("--replicas", "2", "--streams", "6", "--seconds", "16", "--kill-every", "5:6"),
            *("--settle", "3", "--lease-seconds", "2", "--seed", "3"),
        ]
    )
    fig = await bench_cluster.run(args, pg_target.url, tmp_path)
    assert fig.kills >= 1
    assert fig.acknowledged > 0
    assert fig.stored == fig.acknowledged
    assert fig.starts == {f"rtmp://cams.test/cam{i:03d}": 1 for i in range(6)}
    assert fig.ledger == fig.charged


@pytest.mark.timeout(240)
async def test_kill_9_trial_against_a_separately_written_stand_in(
    tmp_path: Path, pg_target: PgTarget
):
    """`bench.cluster --mavi-url` runs the shortened kill trial against a stand-in it did not
    start and that shares no code with the emulator (tests/fakes: written from the contract,
    plus only the control endpoints the bench documents): every acknowledged callback stored,
    each URL started once, the ledger equal to the stand-in's own bill."""
    standin = BilledStandIn(key=bench_cluster.KEY, period=0.5)
    async with standin.running():
        control = standin.url.removesuffix("/serve/api/v2") + "/_control"
        args = bench_cluster.parser().parse_args(
            [
                *("--replicas", "2", "--streams", "6", "--seconds", "16", "--kill-every", "5:6"),
                *("--settle", "3", "--lease-seconds", "2", "--seed", "3"),
                *("--mavi-url", standin.url, "--control-url", control),
            ]
        )
        fig = await bench_cluster.run(args, pg_target.url, tmp_path)
    assert fig.kills >= 1
    assert fig.acknowledged > 0
    assert fig.stored == fig.acknowledged == standin.delivered
    assert fig.starts == {f"rtmp://cams.test/cam{i:03d}": 1 for i in range(6)}
    assert fig.ledger == fig.charged == standin.charged_ticks
