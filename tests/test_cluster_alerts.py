"""Alerts from a fleet through a real Alertmanager: a condition raised and delivered by one
replica and resolved by another is resolved at Alertmanager, and only the leader re-posts."""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
from pydantic import SecretStr

from streamwatch.alerts import Router
from streamwatch.alerts.outbox import Alerts, Outbox
from streamwatch.alerts.sinks.alertmanager import AlertmanagerSink
from streamwatch.store import PgTarget, Store
from streamwatch.store.leases import LeaseBook
from tests.test_alertmanager import CONFIG, active, running_alertmanager
from tests.test_alerts import event, rule


@contextlib.asynccontextmanager
async def replica(
    target: PgTarget, name: str, alertmanager: str, session: aiohttp.ClientSession
) -> AsyncIterator[tuple[Alerts, Outbox, AlertmanagerSink]]:
    """One replica's alert pipeline on the shared database, as the daemon wires it."""
    async with Store(target) as store:
        store.set_fence(LeaseBook(name))
        sink = AlertmanagerSink(
            name="am", url=SecretStr(alertmanager), session=session, timeout_seconds=5
        )
        outbox = Outbox(
            store=store, sinks={"am": sink}, retry_initial=0.01, retry_max=0.05, poll_seconds=0.05
        )
        outbox.shared = True
        alerts = Alerts(router=Router([rule(sinks=["am"])]), outbox=outbox, store=store)
        store.set_alert_hook(alerts)
        async with outbox.running():
            yield alerts, outbox, sink


async def test_a_condition_resolved_by_another_replica_is_resolved_and_only_the_leader_reposts(
    tmp_path: Path, pg_target: PgTarget
):
    """Replica Y delivers a stream's stall to Alertmanager; replica X, which never saw it,
    delivers its resolution with the firing alert's labels (read from the shared store), so
    Alertmanager holds nothing active; a re-post comes from the leader only, with the fleet's
    active set."""
    (tmp_path / "am.yml").write_text(CONFIG)
    async with (
        running_alertmanager(tmp_path / "am.yml", tmp_path) as base,
        aiohttp.ClientSession() as session,
        replica(pg_target, "x", base, session) as (alerts_x, outbox_x, sink_x),
        replica(pg_target, "y", base, session) as (alerts_y, outbox_y, sink_y),
    ):
        now = time.time()  # Alertmanager compares startsAt/endsAt with its own clock
        alerts_y.emit(event(kind="stream_stalled", severity="warning", stream="cam", at=now))
        await alerts_y.settle()
        assert await outbox_y.deliver_due() == 1
        await outbox_y.settle()
        assert [a["labels"]["alertname"] for a in await active(base)] == [
            "streamwatch_stream_stalled"
        ]
        assert sink_x.active == {}  # x never delivered it

        alerts_x.emit(
            event(kind="stream_stalled", severity="info", stream="cam", resolved=True, at=now)
        )
        await alerts_x.settle()
        assert await outbox_x.deliver_due() == 1
        await outbox_x.settle()
        assert await active(base) == []

        alerts_y.emit(event(kind="stream_stalled", severity="warning", stream="cam2", at=now))
        await alerts_y.settle()
        assert await outbox_y.deliver_due() == 1
        await outbox_y.settle()
        outbox_x.leads = lambda: True
        outbox_y.leads = lambda: False
        sink_y.active = {}
        await outbox_y.repost_due()
        assert sink_y.active == {}  # not the leader: it neither read nor re-posted the set
        assert sink_x.active == {}
        await outbox_x.repost_due()
        assert len(sink_x.active) == 1  # the fleet's set, read from the store
