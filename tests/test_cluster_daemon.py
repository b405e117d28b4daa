"""Two daemons on one PostgreSQL database as a fleet (`[cluster]`), against the emulator: each
stream owned by one replica, handed over when a replica joins, adopted when one dies, and
never started twice."""

from __future__ import annotations

import asyncio
import functools
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp

from streamwatch.emulator import Emulator, Script
from streamwatch.policy import Phase, Stop
from streamwatch.store import PgTarget, Store
from streamwatch.store.leases import LeaseBook, rendezvous_owners
from tests import pg
from tests.conftest import Daemon, stream_toml
from tests.test_metrics import samples, scrape, value

NAMES = [f"cam{i}" for i in range(6)]
STREAMS = "".join(stream_toml(n) for n in NAMES)
A, B = "replica-1", "replica-2"


def cluster_toml(replica: str, *, lease: float = 3, renew: float = 0.3) -> str:
    # A lease of 3 s: a test waits a few seconds for an expiry (the database's clock), and a
    # replica on a loaded machine still survives several late rounds (0.3 s apart).
    return (
        f'[cluster]\nreplica_id = "{replica}"\nlease_seconds = {lease}\nrenew_seconds = {renew}\n'
    )


def running(daemon: Daemon) -> dict[str, str]:
    """The streams the daemon's supervisor runs a task for: name -> task id."""
    return {
        n: s.task_id
        for n, s in daemon.sup.streams.items()
        if s.phase is Phase.RUNNING and s.task_id is not None
    }


async def start(
    daemon: Daemon, replica: str, *, stall_after_segments: int = 40, lease: float = 3
) -> None:
    extra = cluster_toml(replica, lease=lease)
    await daemon.start(STREAMS, extra=extra, stall_after_segments=stall_after_segments)


def segments_charged(emulator: Emulator, task_id: str) -> int:
    return sum(1 for c in emulator.charges if c.task_id == task_id and c.kind == "segment")


async def test_a_joining_replica_takes_its_share_and_a_killed_ones_streams_are_adopted(
    fleet: tuple[Daemon, Daemon], emulator: Emulator, pg_target: PgTarget
):
    """A lone replica starts every stream; a second one joining takes over its rendezvous
    share without a restart; the first killed without releasing anything (kill -9), the
    second adopts its streams once their leases expire: the same task ids throughout, each
    stream's URL started once at the emulator, every lease's epoch grown."""
    a, b = fleet
    share_b = {n for n, r in rendezvous_owners(NAMES, [A, B]).items() if r == B}
    assert share_b
    assert share_b != set(NAMES)
    await start(a, A)
    await a.wait(lambda: len(running(a)) == len(NAMES))
    tasks = running(a)

    await start(b, B)  # the emulator now calls back to b
    await b.wait(lambda: set(running(b)) == share_b, within=20)
    await a.wait(lambda: set(a.sup.streams) == set(NAMES) - share_b)
    assert running(b) == {n: tasks[n] for n in share_b}

    await a.crash()
    await b.wait(lambda: len(running(b)) == len(NAMES), within=20)
    assert running(b) == tasks
    assert Counter(s.url for s in emulator.accepted_starts()) == {
        f"rtmp://cams.test/{n}": 1 for n in NAMES
    }
    assert len(emulator.running_tasks()) == len(NAMES)
    leases = pg.rows(pg_target, "SELECT owner, epoch FROM stream_leases")
    assert {owner for owner, _ in leases} == {B}
    assert all(epoch >= 2 for _, epoch in leases)  # one change of owner at least


async def test_a_replica_stopping_gracefully_hands_its_streams_over_at_once(
    fleet: tuple[Daemon, Daemon], emulator: Emulator, pg_target: PgTarget
):
    """A replica stopped gracefully (on_shutdown = "keep") leaves its tasks running and
    releases its leases as it goes: the other adopts every stream, the same task ids, none
    started twice; the leaving replica is no longer live."""
    a, b = fleet
    await start(a, A)
    await a.wait(lambda: len(running(a)) == len(NAMES))
    tasks = running(a)
    await start(b, B)
    await b.wait(lambda: len(running(b)) > 0, within=20)
    await a.stop()
    assert pg.rows(pg_target, "SELECT owner FROM stream_leases WHERE owner = ?", (A,)) == []
    await b.wait(lambda: len(running(b)) == len(NAMES), within=20)
    assert running(b) == tasks
    assert len(emulator.accepted_starts()) == len(NAMES)
    assert await b.store.live_replicas() == [B]


async def test_the_owner_reacts_to_callbacks_another_replica_stored(
    fleet: tuple[Daemon, Daemon], emulator: Emulator
):
    """Callbacks all reach the replica that does not own a stream: its owner learns of them
    through the database (notified, and polled each tick), so its tasks are not taken for
    stalled (no restart), and the end of one of them (15, no video) is restarted by its
    owner, once."""
    a, b = fleet
    share_a = sorted(n for n, r in rendezvous_owners(NAMES, [A, B]).items() if r == A)
    ending = share_a[0]
    url = f"rtmp://cams.test/{ending}"
    emulator.scripts[url] = Script(outcomes=["safe"] * 60, then="end:15")
    await start(a, A, stall_after_segments=20)
    await a.wait(lambda: len(running(a)) == len(NAMES))
    first = running(a)
    await start(b, B, stall_after_segments=20)  # every callback from now on goes to b
    await a.wait(lambda: set(a.sup.streams) == set(share_a), within=20)
    steady = [first[n] for n in share_a if n != ending]
    async with asyncio.timeout(30):
        # Three stall periods of callbacks a never received itself.
        await emulator.wait_until(lambda: all(segments_charged(emulator, t) >= 60 for t in steady))
    await a.wait(lambda: running(a).get(ending) not in (None, first[ending]), within=20)
    assert a.app is not None
    cluster = a.app._parts.cluster if a.app._parts else None
    assert cluster is not None
    assert cluster.followed > 0
    assert cluster.notified > 0  # woken by LISTEN/NOTIFY, not only by its tick
    starts = Counter(s.url for s in emulator.accepted_starts())
    assert starts == {f"rtmp://cams.test/{n}": 2 if n == ending else 1 for n in NAMES}
    assert {n: running(a)[n] for n in share_a if n != ending} == {
        n: first[n] for n in share_a if n != ending
    }


async def test_the_account_halt_and_its_resume_reach_every_replica(
    fleet: tuple[Daemon, Daemon], emulator: Emulator
):
    """A 402 ending one replica's task halts the whole fleet (the other replica takes the halt
    from the store at its next round and starts nothing), and a resume on the other replica
    lifts it on both."""
    a, b = fleet
    share_b = sorted(n for n, r in rendezvous_owners(NAMES, [A, B]).items() if r == B)
    emulator.scripts[f"rtmp://cams.test/{share_b[0]}"] = Script(
        outcomes=["safe"] * 40, then="end:402"
    )
    await start(a, A)
    await a.wait(lambda: len(running(a)) == len(NAMES))
    await start(b, B)
    await b.wait(lambda: b.sup.halt is not None, within=20)
    await a.wait(lambda: a.sup.halt is not None, within=20)
    # Both may have halted on their own (a few ms apart): the later halt in the store wins on
    # each at its next round.
    await a.wait(lambda: a.sup.halt == b.sup.halt, within=20)
    await a.sup.resume()
    await b.wait(lambda: b.sup.halt is None, within=20)


async def status(d: Daemon) -> dict[str, Any]:
    assert d.app is not None
    assert d.app.server is not None
    url = f"{d.app.server.base_url}/api/v1/status"
    async with aiohttp.ClientSession() as s, s.get(url) as resp:
        assert resp.status == 200
        doc: dict[str, Any] = await resp.json()
        return doc


async def test_metrics_add_up_over_replicas_and_status_names_each_owner(
    fleet: tuple[Daemon, Daemon], emulator: Emulator
):
    """Per-stream series come only from each stream's owner (every stream once over the fleet),
    the fleet figures and `streamwatch_cluster_replicas` from the leader alone, the lease
    changes are counted; the status API of either replica shows every stream, its owner and
    its running task."""
    a, b = fleet
    owner = rendezvous_owners(NAMES, [A, B])
    share_b = {n for n, r in owner.items() if r == B}
    # Leases of 10 s (rounds still every 0.3 s): the counts below are exact only if no round
    # is so late under load that a lease lapses and is claimed again.
    await start(a, A, lease=10)
    await a.wait(lambda: len(running(a)) == len(NAMES))
    tasks = running(a)
    await start(b, B, lease=10)
    await b.wait(lambda: set(running(b)) == share_b, within=20)
    await a.wait(lambda: set(a.sup.streams) == set(NAMES) - share_b)
    # One more round each, so both fleet views hold the settled owners.
    for d in (a, b):
        assert d.app is not None
        assert d.app._parts is not None
        cluster = d.app._parts.cluster
        assert cluster is not None
        await cluster.run_once()
    found = {A: samples(await scrape(a)), B: samples(await scrape(b))}
    up = {
        dict(labels)["stream"]: replica
        for replica, got in found.items()
        for (name, labels), v in got.items()
        if name == "streamwatch_stream_up" and v == 1
    }
    assert up == owner
    replicas = [got.get(("streamwatch_cluster_replicas", ())) for got in found.values()]
    assert sorted(replicas, key=str) == [2.0, None]
    unowned = [got.get(("streamwatch_cluster_streams_unowned", ())) for got in found.values()]
    assert sorted(unowned, key=str) == [0.0, None]
    spend = [("streamwatch_orphan_tasks", ()) in got for got in found.values()]
    assert sorted(spend) == [False, True]
    assert value(found[A], "streamwatch_stream_lease_changes_total", change="claimed") == 6
    assert value(found[A], "streamwatch_stream_lease_changes_total", change="handed_back") == len(
        share_b
    )
    assert value(found[B], "streamwatch_stream_lease_changes_total", change="claimed") == len(
        share_b
    )
    for d in (a, b):
        doc = await status(d)
        shown = {s["name"]: (s["owner"], s["state"], s["task_id"]) for s in doc["streams"]}
        assert shown == {n: (owner[n], "running", tasks[n]) for n in NAMES}


async def test_the_leader_counts_configured_streams_no_replica_holds(
    emulator: Emulator, pg_target: PgTarget, tmp_path: Path
):
    """`streamwatch_cluster_streams_unowned` (leader only): a replica that joined the fleet but
    never claims (here a heartbeat row with no process behind it) has its share handed back by
    the leader and left unowned, and the leader counts exactly those streams."""
    d = Daemon(tmp_path, emulator).on(pg_target)
    await d.start(STREAMS, extra=cluster_toml(A, lease=60, renew=20))
    try:
        await d.wait(lambda: len(running(d)) == len(NAMES))
        pg.rows(
            pg_target,
            "INSERT INTO replicas (replica_id, started_at, seen_at, expires_at, leaving)"
            " VALUES ('ghost', 0, 0, 1e12, 0)",
        )
        share = {n for n, r in rendezvous_owners(NAMES, [A, "ghost"]).items() if r == "ghost"}
        assert share, "the ghost's share is not empty for these names"
        assert d.app is not None
        assert d.app._parts is not None
        cluster = d.app._parts.cluster
        assert cluster is not None
        await cluster.run_once()  # hands the ghost's share back
        await cluster.run_once()  # sees it unowned
        found = samples(await scrape(d))
        assert found[("streamwatch_cluster_streams_unowned", ())] == len(share)
        assert found[("streamwatch_cluster_replicas", ())] == 2
    finally:
        await d.stop()


async def test_max_running_holds_across_the_fleet(fleet: tuple[Daemon, Daemon], emulator: Emulator):
    """`[mavi] max_running` caps the account's tasks over the whole fleet: with a cap of 3 and
    6 streams over two replicas, a replica counts what the other runs, and no fourth task is
    ever started."""
    a, b = fleet
    cap = "max_running = 3"
    await a.start(STREAMS, extra=cluster_toml(A), mavi=cap)
    await a.wait(lambda: len(running(a)) == 3)
    await b.start(STREAMS, extra=cluster_toml(B), mavi=cap)
    assert b.app is not None
    assert b.app._parts is not None
    cluster = b.app._parts.cluster
    assert cluster is not None
    await b.wait(lambda: cluster.rounds >= 4, within=20)
    await a.wait(lambda: a.sup.fleet is not None and len(a.sup.fleet.replicas) == 2)
    assert len(emulator.accepted_starts()) == 3
    assert len(running(a)) + len(running(b)) == 3


async def test_a_stop_refused_by_the_fence_is_neither_sent_nor_reported_as_a_failure(
    fleet: tuple[Daemon, Daemon], emulator: Emulator, pg_target: PgTarget
):
    """A replica whose lease moved in the database while its own view still holds it (its
    local deadline not passed) decides to stop a stream removed from its config: the stop
    mark is refused in its transaction, so MAVI is not asked, and the refusal is neither a
    `stop_failed` event nor a background failure; the task keeps running, and the replica
    stops acting on the stream at once (no retry loop until its next lease round)."""
    a, _ = fleet
    await a.start(
        STREAMS,
        extra=cluster_toml(A, lease=60, renew=20),
    )
    await a.wait(lambda: len(running(a)) == len(NAMES))
    pg.rows(pg_target, "UPDATE replicas SET expires_at = 0")
    pg.rows(pg_target, "UPDATE stream_leases SET expires_at = 0")
    async with Store(pg_target) as store:
        intruder = LeaseBook("intruder")
        taken = await store.lease_round(intruder, NAMES, lease_seconds=60)
        assert sorted(taken.claimed) == NAMES
    assert a.app is not None
    config = a.app.config
    a.sup.reload([s for s in config.streams if s.name != "cam0"], config.budgets)
    actions = a.sup.step()
    assert any(isinstance(x, Stop) and x.stream == "cam0" for x in actions)
    await a.sup.settle()
    assert emulator.stop_calls == []
    assert [e for e in await a.events() if e.kind == "stop_failed"] == []
    failures = a.app.registry.get_sample_value(
        "streamwatch_background_failures_total", {"task": "supervisor.stop"}
    )
    assert not failures
    assert len(emulator.running_tasks()) == len(NAMES)
    # Not tried again and again until the next round: the replica stopped acting on it.
    assert a.app._parts is not None
    assert a.app._parts.cluster is not None
    assert "cam0" not in a.app._parts.cluster.owned()


def runs_all(daemon: Daemon) -> bool:
    return len(running(daemon)) == len(NAMES)


def runs_any(daemon: Daemon) -> bool:
    return len(running(daemon)) > 0


async def test_a_rolling_restart_restarts_no_task_and_loses_no_callback(
    fleet: tuple[Daemon, Daemon], emulator: Emulator, pg_target: PgTarget
):
    """Each replica in turn stopped gracefully and started again while callbacks flow (the
    one receiving them too: MAVI redelivers what was refused meanwhile): every task keeps its
    id, no stream is started again, and every callback the emulator had delivered is stored."""
    a, b = fleet
    await start(a, A)
    await a.wait(lambda: len(running(a)) == len(NAMES))
    tasks = running(a)
    await start(b, B)  # callbacks go to b from here on
    share_b = {n for n, r in rendezvous_owners(NAMES, [A, B]).items() if r == B}
    await b.wait(lambda: set(running(b)) == share_b, within=20)
    for first, second, replica in ((a, b, A), (b, a, B)):
        await first.stop()
        await second.wait(functools.partial(runs_all, second), within=20)
        await start(first, replica)
        await first.wait(functools.partial(runs_any, first), within=20)
    # Settled: every stream run by its preferred owner again (a's rounds re-check this).
    await a.wait(lambda: set(running(a)) | set(running(b)) == set(NAMES), within=20)
    owned = {**running(a), **running(b)}
    assert owned == tasks
    assert Counter(s.url for s in emulator.accepted_starts()) == {
        f"rtmp://cams.test/{n}": 1 for n in NAMES
    }
    emulator.paused = True
    async with asyncio.timeout(30):
        await emulator.wait_until(
            lambda: all(d.delivered for d in emulator.deliveries) and not emulator.posting
        )
    stored = pg.rows(pg_target, "SELECT count(*) FROM segments")[0][0]
    assert stored == sum(1 for d in emulator.deliveries if d.delivered)


async def test_on_shutdown_stop_stops_the_tasks_only_with_the_last_replica(
    fleet: tuple[Daemon, Daemon], emulator: Emulator
):
    """With `on_shutdown = "stop"`, a replica stopping while another runs hands its streams
    over and stops nothing; the last replica stopping stops every task (the fleet stops)."""
    a, b = fleet
    for d, replica in ((a, A), (b, B)):
        await d.start(STREAMS, extra=cluster_toml(replica), supervisor='on_shutdown = "stop"')
        await d.wait(functools.partial(runs_any, d), within=20)
    await a.stop()
    assert emulator.stop_calls == []
    await b.wait(functools.partial(runs_all, b), within=20)
    await b.stop()
    assert sorted(t for t, _ in emulator.stop_calls) == sorted(
        t.task_id for t in emulator.tasks.values()
    )
    assert len(emulator.stop_calls) == len(NAMES)
