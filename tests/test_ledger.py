"""Ledger arithmetic: periods, caps, the budget gate, thresholds and forecasts."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from streamwatch.config import BudgetCaps, BudgetsConfig, StreamConfig
from streamwatch.ledger import (
    Fired,
    Spending,
    period_bounds,
    period_key,
    unreported_segments,
)
from streamwatch.pricing import segment_cost_ticks

PER = segment_cost_ticks(fps=1, content_moderation=True, logo_detection=False)  # 6 ticks
CAP = Decimal("0.10")  # caps are whole cents: 288 ticks, 48 segments
CAP_TICKS = 288
NOON = datetime(2026, 11, 23, 12, tzinfo=UTC).timestamp()


def stream(name: str, **budget: Decimal) -> StreamConfig:
    return StreamConfig(
        name=name,
        url=f"rtmp://h/{name}",
        fps=1,
        content_moderation=True,
        logo_detection=False,
        max_logos=5,
        budget=BudgetCaps(**budget),
    )


times = st.floats(min_value=0, max_value=4_102_444_800, allow_nan=False)  # 1970..2100


@given(ts=times)
def test_period_bounds_contain_the_instant(ts):
    """Every instant lies in [start, end) of its day and month, whose keys agree."""
    for period in ("day", "month"):
        start, end = period_bounds(period, ts)
        assert start <= ts < end
        assert period_key(period, start) == period_key(period, ts)
        assert period_key(period, end) != period_key(period, ts)


@given(ts=times)
def test_month_is_made_of_its_days(ts):
    """A month's length is a whole number of days between 28 and 31, starting on the 1st."""
    start, end = period_bounds("month", ts)
    days = (end - start) / 86_400
    assert days in (28, 29, 30, 31)
    assert datetime.fromtimestamp(start, UTC).day == 1
    assert period_bounds("day", start)[0] == start


@pytest.mark.parametrize(
    ("iso", "day", "month"),
    [
        ("2026-12-31T23:59:59.999", "2026-12-31", "2026-12"),
        ("2027-01-01T00:00:00", "2027-01-01", "2027-01"),
        ("2028-02-29T12:00:00", "2028-02-29", "2028-02"),
    ],
)
def test_period_keys_are_utc(iso, day, month):
    """Keys are UTC calendar days and months, across year ends and leap days."""
    ts = datetime.fromisoformat(iso).replace(tzinfo=UTC).timestamp()
    assert period_key("day", ts) == day
    assert period_key("month", ts) == month


@given(charges=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 40 * 86_400)), max_size=50))
def test_counters_sum_to_the_charges_of_each_period(charges):
    """The account's spend in a period is exactly the sum of the charges made in it."""
    spending = Spending(budgets=BudgetsConfig(), streams=[], segment_seconds=5)
    base = datetime(2026, 11, 1, tzinfo=UTC).timestamp()
    for ticks, offset in charges:
        spending.add("s", ticks, base + offset)
    probe = base + 20 * 86_400
    for period in ("day", "month"):
        key = period_key(period, probe)
        expected = sum(t for t, o in charges if period_key(period, base + o) == key)
        assert spending.spent(None, period, probe) == expected


def spending_for(*streams: StreamConfig, **budgets: object) -> Spending:
    return Spending(budgets=BudgetsConfig(**budgets), streams=streams, segment_seconds=5)


def test_gate_stops_at_the_cap_and_refuses_a_start_whose_precharge_would_cross_it():
    """At the cap the stream stops; one segment below it, it may run but may not restart."""
    spending = spending_for(stream("a", daily_usd=CAP))
    spending.add("a", CAP_TICKS - PER, NOON)
    gate = spending.gate(NOON)
    assert gate.stop == frozenset()
    assert gate.no_start == frozenset()
    spending.add("a", 1, NOON)
    gate = spending.gate(NOON)
    assert gate.stop == frozenset()
    assert gate.no_start == {"a"}, "a pre-charge would cross the cap"
    spending.add("a", PER, NOON)
    assert spending.gate(NOON).stop == {"a"}


def test_account_cap_gates_every_stream_and_counts_removed_streams():
    """The account cap counts all spend, even of streams no longer configured."""
    spending = spending_for(stream("a"), stream("b"), daily_usd=CAP)
    spending.add("removed", CAP_TICKS, NOON)
    assert spending.gate(NOON).stop == {"a", "b"}


def test_gate_resets_with_the_day_and_month_caps_persist():
    """A daily cap clears at midnight UTC; a monthly cap does not."""
    spending = spending_for(stream("d", daily_usd=CAP), stream("m", monthly_usd=CAP))
    spending.add("d", CAP_TICKS, NOON)
    spending.add("m", CAP_TICKS, NOON)
    assert spending.gate(NOON).stop == {"d", "m"}
    assert spending.gate(NOON + 86_400).stop == {"m"}


def test_alert_only_never_gates():
    """With action = alert-only the gate is always open."""
    spending = spending_for(stream("a", daily_usd=CAP), action="alert-only")
    spending.add("a", 100 * CAP_TICKS, NOON)
    assert spending.gate(NOON).stop == frozenset()


def test_estimates_count_against_caps():
    """Billed-but-unreported estimates are spend for the gate."""
    spending = spending_for(stream("a", daily_usd=CAP))
    assert spending.gate(NOON, {"a": CAP_TICKS}).stop == {"a"}


def test_thresholds_fire_once_each_per_period():
    """50/80/100 % fire once each, and again in the next period."""
    spending = spending_for(stream("a", daily_usd=CAP))
    fired: Fired = frozenset()
    spending.add("a", CAP_TICKS // 2, NOON)
    fired, events = spending.check(NOON, running=[], fired=fired)
    assert [e.percent for e in events] == [50]
    spending.add("a", CAP_TICKS // 2, NOON)
    fired, events = spending.check(NOON, running=[], fired=fired)
    assert [e.percent for e in events] == [80, 100]
    assert spending.check(NOON, running=[], fired=fired) == (fired, [])
    tomorrow = NOON + 86_400
    fired = spending.prune(fired, tomorrow)
    assert fired == set()
    spending.add("a", CAP_TICKS, tomorrow)
    assert len(spending.check(tomorrow, running=[], fired=fired)[1]) == 3


@pytest.mark.parametrize(
    ("charges", "crossing", "thresholds", "spent", "permille"),
    [
        # 48 segments of 6 ticks make the 288-tick cap: 50 % is crossed by the 24th charge,
        # 80 % (230.4 ticks) by the 39th, at 234 ticks = 81.2 %.
        ([PER] * 48, 24, [50], 144, 500),
        ([PER] * 48, 39, [80], 234, 812),
        ([PER] * 48, 48, [100], 288, 1000),
        # One large charge crosses two thresholds at once: both carry it.
        ([100, 150], 2, [50, 80], 250, 868),
        # A charge that lands exactly on a threshold crosses it.
        ([143, 1], 2, [50], 144, 500),
    ],
)
def test_a_threshold_is_found_by_the_charge_that_crosses_it(
    charges, crossing, thresholds, spent, permille
):
    """The threshold event comes from the charge that crosses it and carries that charge,
    the spend right after it and the percentage at that instant, not what a later check
    sees; it fires once."""
    spending = spending_for(stream("a", daily_usd=CAP))
    fired: Fired = frozenset()
    found = {}
    for n, ticks in enumerate(charges, start=1):
        fired, events = spending.charge("a", ticks, NOON, fired=fired)
        for event in events:
            found[event.percent] = (n, event)
    hits = {p: hit for p, hit in found.items() if p in thresholds}
    assert sorted(hits) == thresholds
    for n, event in hits.values():
        assert n == crossing
        assert event.spent_ticks == spent
        assert event.used_permille == permille
        assert (event.charge_stream, event.charge_ticks) == ("a", charges[crossing - 1])
        assert f"{permille // 10}.{permille % 10} %" in event.detail
        assert f"a charge of 0.{charges[crossing - 1] * 1_000_000 // 2880:06d}" in event.detail
    assert spending.check(NOON, running=[], fired=fired) == (fired, []), "each fires once"


def test_an_account_threshold_is_crossed_by_any_streams_charge():
    """The account cap counts every stream: the charge of whichever stream crosses it is the
    one its event names."""
    spending = spending_for(stream("a"), stream("b"), daily_usd=CAP)
    fired: Fired = frozenset()
    fired, events = spending.charge("a", 140, NOON, fired=fired)
    assert events == []
    _, (event,) = spending.charge("b", 6, NOON, fired=fired)
    assert (event.cap.stream, event.percent, event.spent_ticks) == (None, 50, 146)
    assert "a charge of 0.002083 USD to stream b" in event.detail


def test_estimates_that_cross_a_threshold_are_found_by_the_check():
    """Estimates of unreported segments are no charge: the periodic check finds the crossing
    they make and says how much of the spend is estimated."""
    spending = spending_for(stream("a", daily_usd=CAP))
    fired, _ = spending.charge("a", 100, NOON, fired=frozenset())
    _, (event,) = spending.check(NOON, running=[], fired=fired, estimates={"a": 50})
    assert (event.percent, event.spent_ticks, event.charge_stream) == (50, 150, None)
    assert "0.017361 USD of it estimated" in event.detail


HUNDRED = 2880 * 100


@pytest.mark.parametrize(
    ("lead_minutes", "left_ticks", "fires"),
    [
        (60, 720 * PER, True),  # 720 segments = exactly one hour at 5 s per segment
        (60, 721 * PER, False),
        (0, 1 * PER, False),
    ],
)
def test_forecast_fires_within_the_lead_time(lead_minutes, left_ticks, fires):
    """'Projected to exceed' fires when the burn rate reaches the cap within the lead time."""
    spending = spending_for(stream("a", daily_usd=Decimal(100)), forecast_lead_minutes=lead_minutes)
    spending.add("a", HUNDRED - left_ticks, NOON)
    _, events = spending.check(NOON, running=["a"], fired=frozenset())
    assert any(e.kind == "budget_forecast" for e in events) == fires


def test_forecast_ignores_caps_the_period_ends_before():
    """A daily cap that would be reached only after midnight is not forecast."""
    late = datetime(2026, 11, 23, 23, 30, tzinfo=UTC).timestamp()
    spending = spending_for(stream("a", daily_usd=Decimal(100)), forecast_lead_minutes=600)
    spending.add("a", HUNDRED - 720 * PER, late)  # an hour of burn left, 30 min of the day
    _, events = spending.check(late, running=["a"], fired=frozenset())
    assert [e for e in events if e.kind == "budget_forecast"] == []


@given(
    elapsed=st.floats(0, 10**6, allow_nan=False),
    received=st.integers(0, 10**6),
    slack=st.integers(0, 10),
)
def test_unreported_segments_is_never_negative_and_bounded(elapsed, received, slack):
    """The estimate is between zero and the periods elapsed."""
    n = unreported_segments(
        started_at=0, now=elapsed, segment_seconds=5, received=received, slack=slack
    )
    assert 0 <= n <= elapsed // 5


def test_thresholds_config_is_validated():
    """Thresholds are percentages; they are sorted and de-duplicated."""
    assert BudgetsConfig(thresholds=[100, 50, 50]).thresholds == [50, 100]
    with pytest.raises(ValueError, match="percentages"):
        BudgetsConfig(thresholds=[0])
    assert timedelta(days=1).total_seconds() == 86_400


def test_near_cap_wakes_the_planner_only_close_to_a_cap():
    """The callback path replans only when a charge brings spend within a pre-charge of a cap."""
    spending = spending_for(stream("a", daily_usd=CAP), stream("b"))
    spending.add("a", CAP_TICKS - 2 * PER, NOON)
    assert not spending.near_cap("a", NOON)
    assert not spending.near_cap("b", NOON), "b has no cap and there is no account cap"
    spending.add("a", PER, NOON)
    assert spending.near_cap("a", NOON)
    assert not spending_for(stream("a", daily_usd=CAP), action="alert-only").near_cap("a", NOON)


def test_what_has_fired_is_returned_anew_with_the_events_keys():
    """`charge` and `check` return what has fired with their events' keys added and leave
    the value they were given as it was: the caller keeps it (and persists it with each
    event)."""
    spending = spending_for(stream("a", daily_usd=CAP))
    given: Fired = frozenset({"*:day:2026-11-22:50"})
    fired, events = spending.charge("a", CAP_TICKS // 2, NOON, fired=given)
    assert [e.percent for e in events] == [50]
    assert fired == given | {events[0].key}
    assert given == {"*:day:2026-11-22:50"}
    spending.add("a", CAP_TICKS // 2, NOON)
    after, more = spending.check(NOON, running=[], fired=fired)
    assert [e.percent for e in more] == [80, 100]
    assert after == fired | {e.key for e in more}
    assert spending.prune(after, NOON) == after - {"*:day:2026-11-22:50"}, "yesterday's key"
