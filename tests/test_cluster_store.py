"""Stream leases on PostgreSQL (`[cluster]`): claims, renewals, expiry, the fair share by
rendezvous hashing, the epoch that grows on every change of owner, and the fence that refuses
a replica's writes for a stream whose lease moved."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator

import asyncpg
import pytest

from streamwatch.config import ConfigError, parse_config
from streamwatch.intent import Intent
from streamwatch.mavi.callbacks import StreamEnded, parse_callback
from streamwatch.store import NewAlert, PgTarget, Store
from streamwatch.store.alerts import CLAIM_SECONDS
from streamwatch.store.leases import Fenced, LeaseBook, rendezvous_owners
from tests import pg

STREAMS = [f"cam{i:02d}" for i in range(40)]
LEASE = 15.0


def intent(attempt: str, stream: str) -> Intent:
    return Intent(attempt, stream, "urlhash", "spec", 1, True, False, 5, 1000.0)


@contextlib.asynccontextmanager
async def replica(target: PgTarget, name: str) -> AsyncIterator[tuple[Store, LeaseBook]]:
    """A store as one replica opens it, fenced by its own lease book."""
    book = LeaseBook(name)
    async with Store(target) as store:
        store.set_fence(book)
        yield store, book


async def lease_round(store: Store, book: LeaseBook, streams: list[str] = STREAMS) -> list[str]:
    """One round, applied to the book as the daemon applies it; the streams claimed."""
    result = await store.lease_round(book, streams, lease_seconds=LEASE)
    book.update(result.held, deadline=float("inf"))
    return result.claimed


def expire(target: PgTarget, replica_id: str) -> None:
    """What `lease_seconds` without a round does to a replica (it died): its heartbeat and its
    leases expire, on the database's clock."""
    pg.rows(target, "UPDATE replicas SET expires_at = 0 WHERE replica_id = ?", (replica_id,))
    pg.rows(target, "UPDATE stream_leases SET expires_at = 0 WHERE owner = ?", (replica_id,))


def owners(target: PgTarget) -> dict[str, tuple[str | None, int]]:
    rows = pg.rows(target, "SELECT stream, owner, epoch FROM stream_leases")
    return {s: (o, e) for s, o, e in rows}


def test_rendezvous_moves_only_the_joining_replicas_share():
    """A third replica joining takes streams only from the others' shares (each stream either
    stays where it was or moves to the newcomer), and every replica gets some."""
    two = rendezvous_owners(STREAMS, ["a", "b"])
    three = rendezvous_owners(STREAMS, ["a", "b", "c"])
    assert set(two) == set(three) == set(STREAMS)
    assert all(three[s] in (two[s], "c") for s in STREAMS)
    assert {three[s] for s in STREAMS} == {"a", "b", "c"}


async def test_a_lone_replica_claims_every_stream_at_epoch_one_and_renews(pg_target: PgTarget):
    """The only live replica claims every configured stream (epoch 1); its next round renews
    them (later expiry) without changing the epoch or claiming again."""
    async with replica(pg_target, "a") as (store, book):
        assert await lease_round(store, book) == STREAMS
        first = dict(pg.rows(pg_target, "SELECT stream, expires_at FROM stream_leases"))
        assert owners(pg_target) == dict.fromkeys(STREAMS, ("a", 1))
        assert await lease_round(store, book) == []
        assert owners(pg_target) == dict.fromkeys(STREAMS, ("a", 1))
        later = dict(pg.rows(pg_target, "SELECT stream, expires_at FROM stream_leases"))
        assert all(later[s] > first[s] for s in STREAMS)
        assert await store.live_replicas() == ["a"]


async def test_two_replicas_settle_on_the_rendezvous_split(pg_target: PgTarget):
    """A replica joining a running one gets its fair share: the holder finds the newcomer's
    streams misplaced and hands them back, the newcomer claims them, and the split is the
    rendezvous split (disjoint, complete, both non-empty)."""
    async with replica(pg_target, "a") as (a, book_a), replica(pg_target, "b") as (b, book_b):
        await lease_round(a, book_a)
        assert await lease_round(b, book_b) == []  # all held and valid: nothing to take
        found = await a.lease_round(book_a, STREAMS, lease_seconds=LEASE)
        want = rendezvous_owners(STREAMS, ["a", "b"])
        assert found.replicas == ["a", "b"]
        assert found.misplaced == sorted(s for s in STREAMS if want[s] == "b")
        assert await a.release_leases(book_a, found.misplaced) == found.misplaced
        book_a.drop(found.misplaced)
        assert await lease_round(b, book_b) == found.misplaced
        got = owners(pg_target)
        assert {s: o for s, (o, _) in got.items()} == want
        assert all(got[s][1] == (2 if want[s] == "b" else 1) for s in STREAMS)
        assert set(book_a.epochs) | set(book_b.epochs) == set(STREAMS)
        assert not set(book_a.epochs) & set(book_b.epochs)


async def test_a_dead_replicas_leases_are_claimed_once_expired_with_a_new_epoch(
    pg_target: PgTarget,
):
    """While a replica's leases are valid nobody else takes them; once its heartbeat and leases
    expired, the survivor claims every stream, each epoch one higher, and the dead replica's
    next round (it was only stalled) finds them lost."""
    async with replica(pg_target, "a") as (a, book_a), replica(pg_target, "b") as (b, book_b):
        await lease_round(a, book_a)
        await lease_round(b, book_b)
        expire(pg_target, "a")
        assert await lease_round(b, book_b) == STREAMS
        assert owners(pg_target) == dict.fromkeys(STREAMS, ("b", 2))
        woke = await a.lease_round(book_a, STREAMS, lease_seconds=LEASE)
        assert woke.lost == STREAMS
        assert woke.held == {}
        assert woke.claimed == []


async def test_a_replica_past_its_lease_cannot_start_stop_or_record(pg_target: PgTarget):
    """Fencing: once another replica claimed the stream, the stalled replica's start intent,
    task record and stop mark are refused in their transaction and leave nothing behind,
    while the new owner's go through."""
    async with replica(pg_target, "a") as (a, book_a), replica(pg_target, "b") as (b, book_b):
        await lease_round(a, book_a, ["cam"])
        await a.record_task_started(
            task_id="t-old",
            stream="cam",
            spec_hash="spec",
            fps=1,
            content_moderation=True,
            logo_detection=False,
            max_logos=5,
            started_at=1000.0,
        )
        expire(pg_target, "a")
        assert await lease_round(b, book_b, ["cam"]) == ["cam"]
        # "a" still believes it holds the lease (it has not run a round since it stalled).
        assert book_a.epochs == {"cam": 1}
        with pytest.raises(Fenced):
            await a.begin_start(intent("a-1", "cam"))
        with pytest.raises(Fenced):
            await a.mark_stop_requested("t-old")
        with pytest.raises(Fenced):
            await a.record_task_started(
                task_id="t-a",
                stream="cam",
                spec_hash="spec",
                fps=1,
                content_moderation=True,
                logo_detection=False,
                max_logos=5,
                started_at=1001.0,
            )
        assert pg.rows(pg_target, "SELECT attempt_id FROM start_intents") == []
        assert pg.rows(pg_target, "SELECT task_id, stop_requested FROM tasks") == [("t-old", 0)]
        assert await b.begin_start(intent("b-1", "cam")) is None
        await b.mark_stop_requested("t-old")
        assert pg.rows(pg_target, "SELECT attempt_id FROM start_intents") == [("b-1",)]
        assert pg.rows(pg_target, "SELECT stop_requested FROM tasks") == [(1,)]


async def test_a_graceful_leave_hands_every_lease_back_at_once(pg_target: PgTarget):
    """A replica leaving releases its leases and drops out of the live set in one
    transaction: the other claims them at its next round, without waiting for expiry."""
    async with replica(pg_target, "a") as (a, book_a), replica(pg_target, "b") as (b, book_b):
        await lease_round(a, book_a)
        await lease_round(b, book_b)
        assert await a.leave(book_a) == STREAMS
        assert await b.live_replicas() == ["b"]
        assert await lease_round(b, book_b) == STREAMS
        assert owners(pg_target) == dict.fromkeys(STREAMS, ("b", 2))


def test_cluster_config_needs_postgresql_and_a_renewal_within_the_lease():
    """`[cluster]` with the state in SQLite is refused with the fix named; a renewal period
    of half the lease or more is refused; defaults: 15 s leases renewed every 5 s."""
    with pytest.raises(ConfigError, match=r"\[cluster\] needs the state in PostgreSQL"):
        parse_config("[cluster]\n", environ={})
    with pytest.raises(ConfigError, match="renew_seconds"):
        parse_config(
            '[storage]\nurl = "postgresql://u@h/db"\n[cluster]\nlease_seconds = 10\n'
            "renew_seconds = 5\n",
            environ={},
        )
    config = parse_config('[storage]\nurl = "postgresql://u@h/db"\n[cluster]\n', environ={})
    assert config.cluster is not None
    assert (config.cluster.lease_seconds, config.cluster.renew_every) == (15.0, 5.0)


async def record_task(store: Store, task_id: str, stream: str) -> None:
    await store.record_task_started(
        task_id=task_id,
        stream=stream,
        spec_hash="spec",
        fps=1,
        content_moderation=True,
        logo_detection=False,
        max_logos=5,
        started_at=1000.0,
    )


async def test_the_feed_gives_the_owner_every_callback_another_replica_stored(
    pg_target: PgTarget,
):
    """Callbacks stored by a replica that does not own the stream reach the owner through the
    feed, in order, each once, with what the policy needs (segment, failure, end); a row of a
    transaction still open when a later one committed is not skipped: the cursor waits for
    it (a row-id cursor would have moved past it)."""
    async with replica(pg_target, "a") as (a, book_a), replica(pg_target, "b") as (b, book_b):
        await lease_round(a, book_a, ["cam"])
        await lease_round(b, book_b, ["cam"])
        await record_task(a, "t1", "cam")
        entries, cursor = await a.feed(None, ["cam"])
        assert entries == []
        start = cursor
        early = await asyncpg.connect(pg_target.url)
        try:
            tx = early.transaction()
            await tx.start()
            await early.execute(
                "INSERT INTO callback_feed (stream, task_id, replica, kind, segment_index)"
                " VALUES ('cam', 't1', 'b', 'segment', 0)"
            )
            for index in (1, 2):
                raw = json.dumps(
                    {
                        "task_id": "t1",
                        "data": {"status": 0, "data": {"segment_index": index}},
                    }
                ).encode()
                await b.apply_callback(parse_callback(raw), body=raw, received_at=1001.0)
            ended = b'{"task_id": "t1", "data": {"status": 15, "message": "no video"}}'
            await b.apply_callback(parse_callback(ended), body=ended, received_at=1002.0)
            waiting, cursor = await a.feed(cursor, ["cam"])
            assert waiting == []  # behind the open transaction's row: held back, not skipped
            await tx.commit()
        finally:
            await early.close()
        entries, cursor = await a.feed(cursor, ["cam"])
        seen = [
            (e.replica, type(e.callback).__name__, getattr(e.callback, "segment_index", None))
            for e in entries
        ]
        assert seen == [
            ("b", "SegmentReport", 0),
            ("b", "SegmentReport", 1),
            ("b", "SegmentReport", 2),
            ("b", "StreamEnded", None),
        ]
        assert isinstance(entries[-1].callback, StreamEnded)
        assert entries[-1].callback.status == 15
        assert (await a.feed(cursor, ["cam"]))[0] == []
        assert (await a.feed(start, ["other"]))[0] == []  # only the streams asked for


async def test_each_due_alert_is_claimed_by_one_replica(pg_target: PgTarget):
    """Two replicas asking for due alerts at once get disjoint sets that together hold every
    due alert; a claimed alert is not due again for the other replica (until the claim ends),
    so each is delivered once; without [cluster] the read claims nothing."""
    alerts = [
        NewAlert(f"al-{i}", "hook", "rule", f"g{i}", {"kind": "test"}, 0.0) for i in range(200)
    ]
    async with replica(pg_target, "a") as (a, _), replica(pg_target, "b") as (b, _):
        await a.enqueue_alerts(alerts)
        got_a, got_b = await asyncio.gather(
            a.due_alerts(1000.0, limit=150), b.due_alerts(1000.0, limit=150)
        )
        ids_a, ids_b = {r.alert_id for r in got_a}, {r.alert_id for r in got_b}
        assert not ids_a & ids_b
        assert ids_a | ids_b == {al.alert_id for al in alerts}
        assert await a.due_alerts(1000.0) == []
        assert await b.due_alerts(1000.0 + CLAIM_SECONDS - 1) == []
        assert len(await b.due_alerts(1000.0 + CLAIM_SECONDS)) == 200  # the claimer died
    later = 1000.0 + 2 * CLAIM_SECONDS
    async with Store(pg_target) as single:
        assert len(await single.due_alerts(later)) == 200
        assert len(await single.due_alerts(later)) == 200


async def test_one_replica_leads_at_a_time_and_the_lead_passes_when_it_leaves(
    pg_target: PgTarget,
):
    """The first replica to run a round takes the leader lock and keeps it round after round;
    the other does not lead while it lives, and leads from the round after it left."""
    async with replica(pg_target, "a") as (a, book_a), replica(pg_target, "b") as (b, book_b):
        assert (await a.lease_round(book_a, STREAMS, lease_seconds=LEASE)).leader
        assert not (await b.lease_round(book_b, STREAMS, lease_seconds=LEASE)).leader
        assert (await a.lease_round(book_a, STREAMS, lease_seconds=LEASE)).leader
        assert not (await b.lease_round(book_b, STREAMS, lease_seconds=LEASE)).leader
        await a.leave(book_a)
        assert (await b.lease_round(book_b, STREAMS, lease_seconds=LEASE)).leader


async def test_a_running_task_of_a_stream_no_longer_configured_is_claimed(pg_target: PgTarget):
    """A stream removed from the config while its owner was down still has a running task:
    its lease is claimed like a configured stream's, so an owner stops it (nobody would)."""
    async with replica(pg_target, "a") as (a, book_a):
        await lease_round(a, book_a, ["gone"])  # configured then
        await record_task(a, "t-gone", "gone")
        await a.leave(book_a)
    async with replica(pg_target, "b") as (b, book_b):
        assert await lease_round(b, book_b, ["cam"]) == ["cam", "gone"]
