"""Spend control end to end: the ledger against the provider's own charges, and budgets."""

from __future__ import annotations

import re
from datetime import UTC, datetime

from streamwatch.emulator import Script
from streamwatch.ledger import period_bounds
from streamwatch.policy import Phase, Start
from streamwatch.pricing import segment_cost_ticks
from tests.conftest import Daemon, FakeClock, stream_toml, until


async def ledger_ticks(d: Daemon) -> dict[str, int]:
    totals = await d.store.charge_totals(since=0, until=10**12)
    return {t.stream: t.ticks for t in totals}


async def test_ledger_equals_the_providers_charges_to_the_tick(daemon, emulator):
    """Across mixed fps and features, restarts, duplicates and a 402, the daemon's ledger is
    exactly what the emulator charged, stream by stream, and every segment is stored once (on
    either backend)."""
    daemon = daemon
    emulator.scripts["rtmp://cams.test/flaky"] = Script(outcomes=["safe", "unsafe"], then="end:15")
    emulator.scripts["rtmp://cams.test/dupes"] = Script(duplicate=True, reorder=True)
    emulator.scripts["rtmp://cams.test/errs"] = Script(outcomes=["safe", "error"])
    streams = (
        stream_toml("one", fps=1)
        + stream_toml("both", fps=3, logo_detection=True)
        + stream_toml("logos", fps=2, content_moderation=False, logo_detection=True)
        + stream_toml("flaky", "rtmp://cams.test/flaky", fps=5)
        + stream_toml("dupes", "rtmp://cams.test/dupes", fps=2, logo_detection=True)
        + stream_toml("errs", "rtmp://cams.test/errs", fps=4)
    )
    await daemon.start(streams)
    await daemon.wait(lambda: daemon.state("flaky").restarts >= 1)
    await daemon.crash()  # callbacks sent meanwhile are redelivered to the next daemon
    await daemon.start()
    await daemon.wait(lambda: daemon.state("flaky").restarts >= 2)
    await daemon.wait(lambda: daemon.state("dupes").run_segments >= 6)
    emulator.balance_ticks = 40  # runs out within a few segments: every task ends with 402
    await daemon.wait(lambda: daemon.sup.halt is not None and daemon.sup.running_count() == 0)
    await until(emulator, lambda: all(d.delivered for d in emulator.deliveries))
    await daemon.sup.settle()

    url_to_stream = {
        f"rtmp://cams.test/{n}": n for n in ("one", "both", "logos", "flaky", "dupes", "errs")
    }
    provider: dict[str, int] = {}
    for task in emulator.tasks.values():
        name = url_to_stream[task.url]
        provider[name] = provider.get(name, 0) + task.charged_ticks
    assert await ledger_ticks(daemon) == provider
    assert sum(provider.values()) == emulator.charged_ticks()
    for task_id in emulator.tasks:
        row = await daemon.store.task(task_id)
        assert row is not None
        segments = sum(1 for c in emulator.charges if c.task_id == task_id and c.kind == "segment")
        assert row.segments == segments
        assert await daemon.store.segment_count(task_id=task_id) == segments
    # the in-memory counters the budgets use agree with the ledger
    now = daemon.clock()
    assert daemon.sup.spending.spent(None, "month", now) == emulator.charged_ticks()


async def test_precharge_read_as_first_segment(daemon, emulator):
    """With ledger.precharge = first_segment, a task's first segment adds nothing."""
    await daemon.start(stream_toml("cam", fps=2), extra='[ledger]\nprecharge = "first_segment"')
    await daemon.wait(lambda: daemon.state("cam").run_segments >= 3)
    task_id = daemon.state("cam").task_id
    assert task_id is not None
    await daemon.stop()
    per = segment_cost_ticks(fps=2, content_moderation=True, logo_detection=False)
    await daemon.start()
    # Segments made while it was down arrive now (MAVI retries): count once all have.
    await until(
        emulator, lambda: all(d.delivered for d in emulator.deliveries if d.task_id == task_id)
    )
    row = await daemon.store.task(task_id)
    assert row is not None
    stored = row.segments
    charged = (await ledger_ticks(daemon))["cam"]
    assert charged == per * stored, "the pre-charge paid for the first segment"


MIDNIGHT = datetime(2026, 11, 24, tzinfo=UTC).timestamp()


async def test_budget_stops_within_in_flight_and_waits_for_the_next_day(daemon, emulator):
    """A daily stream cap stops the task within the segments in flight, fires 50/80/100 once
    each, keeps the stream stopped (no start, not even its pre-charge), and lets it run again
    when the UTC day rolls over."""
    clock = FakeClock(MIDNIGHT - 3600)
    daemon.clock = clock
    per = segment_cost_ticks(fps=1, content_moderation=True, logo_detection=False)
    cap_usd = "0.05"  # 144 ticks: the pre-charge and 23 segments of 6 ticks
    cap_ticks = 144
    await daemon.start(
        stream_toml("capped") + f'budget = {{ daily_usd = "{cap_usd}" }}\n' + stream_toml("free")
    )
    await daemon.wait(lambda: "capped" in daemon.sup.gate.stop)
    await daemon.wait(lambda: daemon.state("capped").task_id is None)
    first_task = emulator.accepted_starts("rtmp://cams.test/capped")[0].task_id
    assert first_task is not None
    await until(
        emulator, lambda: all(d.delivered for d in emulator.deliveries if d.task_id == first_task)
    )
    spent = daemon.sup.spending.spent("capped", "day", clock())
    assert spent >= cap_ticks
    assert spent - cap_ticks <= 2 * per, "overshoot is at most the segments in flight"
    assert emulator.tasks[first_task].charged_ticks == spent

    assert not [a for a in daemon.sup.step() if isinstance(a, Start) and a.stream == "capped"]
    assert daemon.state("free").phase is Phase.RUNNING, "other streams are not affected"
    events = [e for e in await daemon.events(stream="capped") if e.kind == "budget_threshold"]
    percents = [re.findall(r"(\d+)% used", e.detail) for e in events]
    assert percents == [["50"], ["80"], ["100"]]

    await daemon.stop()  # a daemon restart mid-period: the budget still holds
    await daemon.start()
    assert daemon.sup.spending.spent("capped", "day", clock()) == spent
    assert not [a for a in daemon.sup.step() if isinstance(a, Start) and a.stream == "capped"]
    again = [e for e in await daemon.events(stream="capped") if e.kind == "budget_threshold"]
    assert len(again) == 3, "thresholds already fired do not fire again"

    clock.now = MIDNIGHT + 1  # the next UTC day
    daemon.sup.step()
    await daemon.wait(lambda: daemon.state("capped").phase is Phase.RUNNING)
    assert len(emulator.accepted_starts("rtmp://cams.test/capped")) == 2
    assert daemon.sup.spending.spent("capped", "day", clock()) >= per
    assert period_bounds("day", clock())[0] == MIDNIGHT


async def test_raising_the_cap_and_reloading_releases_the_stream(daemon, emulator):
    """A stream stopped by its budget starts again once the cap is raised and reloaded."""
    daemon.clock = FakeClock(MIDNIGHT - 3600)
    low, high = '"0.02"', '"10.00"'
    await daemon.start(stream_toml("capped") + f"budget = {{ daily_usd = {low} }}\n")
    await daemon.wait(lambda: "capped" in daemon.sup.gate.stop)
    await daemon.wait(lambda: daemon.state("capped").task_id is None)
    daemon.write(stream_toml("capped") + f"budget = {{ daily_usd = {high} }}\n")
    assert daemon.app is not None
    assert await daemon.app.reload()
    await daemon.wait(lambda: daemon.state("capped").phase is Phase.RUNNING)


async def test_account_cap_alert_only_does_not_stop(daemon, emulator):
    """With action = alert-only, crossing the account cap raises events and stops nothing."""
    per = segment_cost_ticks(fps=1, content_moderation=True, logo_detection=False)
    daemon.clock = FakeClock(MIDNIGHT - 3600)
    await daemon.start(
        stream_toml("a") + stream_toml("b"),
        extra='[budgets]\ndaily_usd = "0.02"\naction = "alert-only"',
    )
    await daemon.wait(lambda: daemon.sup.spending.spent(None, "day", daemon.clock()) >= 20 * per)
    assert daemon.sup.running_count() == 2
    kinds = [e.kind for e in await daemon.events()]
    assert kinds.count("budget_threshold") == 3


async def test_forecast_fires_before_the_cap(daemon, emulator):
    """At the current burn rate, a cap that will be reached within the lead time is announced
    once, before it is reached."""
    daemon.clock = FakeClock(MIDNIGHT - 3600)
    # $2.00 = 5760 ticks = 960 segments of 0.05 s: reached in ~48 s at this burn rate
    await daemon.start(
        stream_toml("cam") + 'budget = { daily_usd = "2.00" }\n',
        extra="[budgets]\nforecast_lead_minutes = 5",
    )
    await daemon.wait(lambda: daemon.state("cam").phase is Phase.RUNNING)
    daemon.sup.step()
    events = [e for e in await daemon.events(stream="cam") if e.kind == "budget_forecast"]
    assert len(events) == 1
    assert "projected to be exceeded" in events[0].detail
    daemon.sup.step()
    again = [e for e in await daemon.events(stream="cam") if e.kind == "budget_forecast"]
    assert len(again) == 1, "once per cap and period"


async def test_silent_running_task_accrues_estimated_cost_and_is_flagged(daemon, emulator):
    """A running task whose callbacks stop still bills: its estimated cost counts against the
    budget and the task is flagged once."""
    clock = FakeClock(MIDNIGHT - 7200)
    daemon.clock = clock
    per = segment_cost_ticks(fps=1, content_moderation=True, logo_detection=False)
    await daemon.start(
        stream_toml("quiet") + 'budget = { daily_usd = "0.10" }\n',
        supervisor='on_stall = "wait"',
    )
    await daemon.wait(lambda: daemon.state("quiet").phase is Phase.RUNNING)
    emulator.webhook = "http://127.0.0.1:9/nowhere"  # callbacks stop arriving; billing goes on
    clock.now += 100 * 0.05  # a hundred segment periods later
    daemon.sup.step()
    estimates = daemon.sup.estimates(clock())
    assert estimates["quiet"] >= 90 * per
    assert "quiet" in daemon.sup.gate.stop, "the estimate alone reaches the cap"
    kinds = [e.kind for e in await daemon.events(stream="quiet")]
    assert kinds.count("billing_unreported") == 1


async def test_threshold_events_carry_the_charge_that_crossed(daemon, emulator):
    """With plans far apart (a 30 s tick), each threshold event is still recorded at the
    charge that crossed it: its spend is within one segment past the threshold and its
    percentage is the one at that instant."""
    daemon.clock = FakeClock(MIDNIGHT - 3600)
    per = segment_cost_ticks(fps=1, content_moderation=True, logo_detection=False)
    cap_ticks = 144  # $0.05
    daemon.write(
        stream_toml("cam") + 'budget = { daily_usd = "0.05" }\n',
        extra='[budgets]\naction = "alert-only"\nthresholds = [50, 80]',
    )
    text = daemon.config_path.read_text()
    daemon.config_path.write_text(text.replace("tick_seconds = 0.02", "tick_seconds = 30"))
    await daemon.start()
    await daemon.wait(lambda: daemon.sup.spending.spent("cam", "day", daemon.clock()) > cap_ticks)
    events = [e for e in await daemon.events(stream="cam") if e.kind == "budget_threshold"]
    assert [re.findall(r"(\d+)% used", e.detail) for e in events] == [["50"], ["80"]]
    for event, threshold in zip(events, (50, 80), strict=True):
        spent_usd, cap_usd, percent = re.findall(
            r"used: ([\d.]+) of ([\d.]+) USD \(([\d.]+) %\)", event.detail
        )[0]
        spent = round(float(spent_usd) * 2880)
        assert cap_usd == "0.050000"
        assert threshold * cap_ticks <= spent * 100 < threshold * cap_ticks + per * 100
        assert percent == f"{spent * 1000 // cap_ticks / 10:.1f}"
        assert f"a charge of {per / 2880:.6f} USD to stream cam" in event.detail
        assert event.task_id == daemon.state("cam").task_id
