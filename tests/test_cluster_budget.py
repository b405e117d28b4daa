"""Budgets across a fleet (`[cluster]`): a cap is decided on the fleet's exact spend, counted in
each charge's transaction, whichever replica stored the charge; a threshold fires once across
the fleet; a start is gated on the fleet's totals read in its intent's transaction."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from decimal import Decimal
from urllib.parse import urlsplit

import pytest

from bench.cluster import Proxy
from streamwatch.config import BudgetsConfig
from streamwatch.emulator import Emulator
from streamwatch.intent import Intent
from streamwatch.ledger import FleetBudget, Spending
from streamwatch.mavi.callbacks import parse_callback
from streamwatch.pricing import segment_cost_ticks
from streamwatch.store import PgTarget, Store
from streamwatch.store.budget import OverBudget
from streamwatch.store.leases import LeaseBook, rendezvous_owners
from tests import pg
from tests.conftest import SEGMENT, Daemon, stream_toml, until
from tests.test_alerts import SECRET as WHSEC
from tests.test_cluster_daemon import A, B, running
from tests.test_ledger import stream

# Every stream here is A's by rendezvous: B owns nothing and only stores callbacks.
OWNED_BY_A = [
    n for n, r in rendezvous_owners([f"cam{i}" for i in range(40)], [A, B]).items() if r == A
]
PER = segment_cost_ticks(fps=1, content_moderation=True, logo_detection=False)


def slow_rounds(replica: str) -> str:
    """Lease rounds far apart (every 8 s): what a replica learns between them comes through
    the database at each charge, not from a round."""
    return f'[cluster]\nreplica_id = "{replica}"\nlease_seconds = 20\nrenew_seconds = 8\n'


def ledger(target: PgTarget, stream: str | None = None) -> int:
    sql = "SELECT coalesce(sum(ticks), 0) FROM charges"
    rows = pg.rows(target, sql + " WHERE stream = ?", (stream,)) if stream else pg.rows(target, sql)
    return int(rows[0][0])


async def test_a_cap_reached_by_charges_another_replica_stored_stops_the_task_within_in_flight(
    fleet: tuple[Daemon, Daemon], emulator: Emulator, pg_target: PgTarget
):
    """A capped stream's owner (A) stops its task within the segments in flight although
    every callback of the task is stored by the other replica (B) and their lease rounds are
    8 s apart: the charge that reaches the cap learns the fleet's total in its own
    transaction, and A reads it through the database at once (a charge near a cap notifies).
    No start follows that the fleet's totals leave no room for (the start gate reads them in
    the intent's transaction)."""
    a, b = fleet
    capped = OWNED_BY_A[0]
    url = f"rtmp://cams.test/{capped}"
    cap_ticks = 1440  # 0.50 USD: the pre-charge and 239 segments, about 12 s of segments
    streams = stream_toml(capped) + 'budget = { daily_usd = "0.50" }\n'
    await a.start(streams, extra=slow_rounds(A))
    await a.wait(lambda: capped in running(a))
    await b.start(streams, extra=slow_rounds(B))  # every callback from now on goes to B
    await a.wait(lambda: capped in a.sup.gate.stop and a.state(capped).task_id is None, within=30)
    emulator.paused = True
    await until(emulator, lambda: all(d.delivered for d in emulator.deliveries))
    await a.sup.settle()
    spent = ledger(pg_target, capped)
    assert spent >= cap_ticks
    assert spent - cap_ticks <= 2 * PER, "overshoot is at most the segments in flight"
    tasks = [s.task_id for s in emulator.accepted_starts(url)]
    assert sum(emulator.tasks[t].charged_ticks for t in tasks if t) == spent
    assert a.state(capped).task_id is None
    stored_by_b = pg.rows(
        pg_target,
        "SELECT count(*) FROM callback_feed WHERE replica = ? AND stream = ?",
        (B, capped),
    )[0][0]
    assert stored_by_b > 0
    assert a.sup.display_state(capped, a.clock()) == "over_budget"


def alert_hook(daemon: Daemon) -> str:
    daemon.env.update({"HOOK_URL": "http://127.0.0.1:9/hook", "HOOK_SECRET": WHSEC})
    return (
        '[[alerts.sinks]]\nname = "hook"\ntype = "webhook"\nurl = { env = "HOOK_URL" }\n'
        'secret = { env = "HOOK_SECRET" }\nmax_attempts = 1\n'
        '[[alerts.rules]]\nname = "money"\nevents = ["budget_threshold"]\nsinks = ["hook"]\n'
        "cooldown_seconds = 0\ngroup_seconds = 0\n"
    )


async def test_a_threshold_two_replicas_cross_together_fires_once_with_one_alert(
    fleet: tuple[Daemon, Daemon], emulator: Emulator, pg_target: PgTarget
):
    """Callbacks spread over both replicas (round robin, as nginx would), each storing and
    charging half of them, lease rounds 8 s apart: the account's 50 % threshold fires once
    across the fleet, one `budget_threshold` event and one alert, recorded by the replica
    whose charge crossed it."""
    a, b = fleet
    names = OWNED_BY_A[:4]
    streams = "".join(stream_toml(n) for n in names)
    budgets = '[budgets]\ndaily_usd = "1.00"\naction = "alert-only"\nthresholds = [50]\n'
    cap_ticks = 2880
    await a.start(streams, extra=slow_rounds(A) + budgets + alert_hook(a))
    await a.wait(lambda: len(running(a)) == len(names))
    await b.start(streams, extra=slow_rounds(B) + budgets + alert_hook(b))
    assert a.app is not None
    assert a.app.server is not None
    assert b.app is not None
    assert b.app.server is not None
    path = urlsplit(a.app.server.callback_url()).path
    ports = [a.app.server.port, b.app.server.port]
    assert None not in ports
    proxy = Proxy([p for p in ports if p is not None])
    async with proxy.running() as port:
        emulator.webhook = f"http://127.0.0.1:{port}{path}"
        await until(emulator, lambda: emulator.charged_ticks() >= cap_ticks * 3 // 4, within=30)
        emulator.paused = True
        await until(emulator, lambda: all(d.delivered for d in emulator.deliveries), within=30)
    await a.sup.settle()
    await b.sup.settle()
    by_replica = dict(
        pg.rows(pg_target, "SELECT replica, count(*) FROM callback_feed GROUP BY replica")
    )
    assert by_replica.get(A, 0) > 0
    assert by_replica.get(B, 0) > 0
    events = pg.rows(pg_target, "SELECT detail FROM events WHERE kind = 'budget_threshold'")
    assert len(events) == 1
    assert "account daily budget 50% used" in events[0][0]
    alerts = [
        r for r in await a.store.recent_alerts(limit=1000) if r.event["kind"] == "budget_threshold"
    ]
    assert len(alerts) == 1
    keys = [k for (k,) in pg.rows(pg_target, "SELECT key FROM budget_fired")]
    today = datetime.now(UTC).date().isoformat()
    assert [k for k in keys if k.endswith(":50")] == [f"*:day:{today}:50"]


async def test_a_start_is_gated_on_the_fleets_spend_in_its_intents_transaction(
    pg_target: PgTarget,
):
    """Replica y, whose own counters saw none of it, may not write the start intent of a
    stream when replica x's charges left the account's cap no room for its pre-charge: the
    intent's transaction reads the fleet's totals and refuses (`OverBudget`), and nothing is
    written; with room for it, the intent is written."""
    budgets = BudgetsConfig(daily_usd=Decimal("0.01"))  # 28 ticks
    mine, theirs = OWNED_BY_A[0], OWNED_BY_A[1]
    specs = [stream(mine), stream(theirs)]
    rules_x = FleetBudget(Spending(budgets=budgets, streams=specs, segment_seconds=SEGMENT))
    rules_y = FleetBudget(Spending(budgets=budgets, streams=specs, segment_seconds=SEGMENT))
    book_x, book_y = LeaseBook("x"), LeaseBook("y")
    async with Store(pg_target) as x, Store(pg_target) as y:
        x.set_fence(book_x)
        y.set_fence(book_y)
        x.set_budget_rules(rules_x)
        y.set_budget_rules(rules_y)
        got = await x.lease_round(book_x, [theirs], lease_seconds=60)
        book_x.update(got.held, deadline=float("inf"))
        got = await y.lease_round(book_y, [mine], lease_seconds=60)
        book_y.update(got.held, deadline=float("inf"))
        now = pg.rows(pg_target, "SELECT extract(epoch FROM now())::double precision")[0][0]
        ok = Intent("first", mine, "u", "s", 1, True, False, 5, now)
        assert await y.begin_start(ok) is None  # 0 of 28 ticks spent: room for 6
        await x.record_task_started(
            task_id="t-x",
            stream=theirs,
            spec_hash="s",
            fps=1,
            content_moderation=True,
            logo_detection=False,
            max_logos=5,
            started_at=now,
        )
        for index in range(3):  # 6 + 3 * 6 = 24 of 28 ticks: no room for another 6
            body = json.dumps(
                {"task_id": "t-x", "data": {"status": 0, "data": {"segment_index": index}}}
            )
            outcome = await x.apply_callback(parse_callback(body), body=body, received_at=now)
            assert outcome.spend is not None
        refused = Intent("second", mine, "u", "s", 1, True, False, 5, now)
        with pytest.raises(OverBudget, match="account daily budget"):
            await y.begin_start(refused)
    assert [r[0] for r in pg.rows(pg_target, "SELECT attempt_id FROM start_intents")] == ["first"]
    assert ledger(pg_target) == 4 * PER
