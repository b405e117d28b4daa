"""Money over time: spend per stream and account per UTC day and calendar month, budgets,
forecasts and estimates of what MAVI bills but has not reported.

The charges themselves are written by the store, in the same transaction as the start or the
segment they pay for. This module keeps per-period counters of them in memory (loaded from the
store at start), and decides, purely, what the budgets demand:

- `BudgetGate`: which streams must stop (a cap is reached) and which may not start (the
  pre-charge of a start would cross a cap). `plan()` obeys it.
- `BudgetEvent`s: thresholds crossed (default 50/80/100 %) and "projected to exceed" forecasts,
  each once per cap and period. A threshold is found by the charge that crosses it
  (`charge`), so its event carries that charge and the spend and percentage right after it;
  only a crossing made by estimates of unreported segments is found by the periodic `check`.
  What has fired is a value the caller keeps (and persists): both take it and return it
  anew with the events' keys added, never changing the one they were given.

Money is integer ticks of 1/2880 USD throughout; USD appears only for display.
"""

from __future__ import annotations

import calendar
import functools
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import date, timedelta
from decimal import Decimal
from typing import Literal, cast

from streamwatch.config import BudgetsConfig, StreamConfig
from streamwatch.pricing import TICKS_PER_USD, segment_cost_ticks, ticks_to_usd, usd_to_ticks
from streamwatch.store.types import FiredThreshold, SpendTotal

__all__ = [
    "ORPHAN_LIVE_SEGMENTS",
    "PERIODS",
    "BudgetEvent",
    "BudgetGate",
    "Cap",
    "Fired",
    "FleetBudget",
    "Period",
    "Spending",
    "burn_ticks_per_second",
    "caps_for",
    "period_bounds",
    "period_key",
    "segment_ticks",
    "stream_ticks_per_hour",
    "threshold_events",
    "unreported_segments",
    "usd",
    "usd_per_hour",
]

Period = Literal["day", "month"]
PERIODS: tuple[Period, ...] = ("day", "month")
# An orphan task heard from within this many segment periods is counted as burning.
ORPHAN_LIVE_SEGMENTS = 3


_EPOCH = date(1970, 1, 1)


def _utc_date(ts: float) -> date:
    # Whole days by floor division, not datetime.fromtimestamp: that rounds to the
    # microsecond and would put an instant just before midnight into the next day.
    return _EPOCH + timedelta(days=math.floor(ts / 86_400))


def period_key(period: Period, ts: float) -> str:
    """The UTC day (``2026-11-23``) or calendar month (``2026-11``) that `ts` falls in."""
    return _period_key(period, math.floor(ts / 86_400))


@functools.lru_cache(maxsize=64)
def _period_key(period: Period, day_number: int) -> str:
    # Cached: every stored segment's charge asks for the key of its day and month.
    day = _EPOCH + timedelta(days=day_number)
    return day.isoformat() if period == "day" else day.isoformat()[:7]


def period_bounds(period: Period, ts: float) -> tuple[float, float]:
    """The [start, end) of the UTC day or calendar month containing `ts`, as unix times."""
    day = _utc_date(ts)
    if period == "day":
        first, length = day, 1
    else:
        first, length = day.replace(day=1), calendar.monthrange(day.year, day.month)[1]
    start = (first - _EPOCH).days * 86_400
    return float(start), float(start + length * 86_400)


def burn_ticks_per_second(spec: StreamConfig, segment_seconds: float) -> float:
    """What a running task of `spec` costs per second of wall time."""
    return segment_ticks(spec) / segment_seconds


def usd_per_hour(ticks_per_second: float) -> Decimal:
    """A burn rate as USD per hour, rounded to cents-and-more for display."""
    return Decimal(ticks_per_second * 3600 / TICKS_PER_USD).quantize(Decimal("0.0001"))


def usd(ticks: int) -> str:
    """Ticks as a USD string with six decimals: exact enough to add up, easy to read."""
    return str(ticks_to_usd(ticks))


def unreported_segments(
    *, started_at: float, now: float, segment_seconds: float, received: int, slack: int
) -> int:
    """Segments MAVI has presumably processed (and billed) but not yet reported: the periods
    elapsed since the start, less the callbacks received, less `slack` for delivery delay."""
    elapsed = math.floor(max(0.0, now - started_at) / segment_seconds)
    return max(0, elapsed - received - slack)


def segment_ticks(spec: StreamConfig) -> int:
    """What one segment of a task of `spec` costs."""
    return segment_cost_ticks(
        fps=spec.fps,
        content_moderation=spec.content_moderation,
        logo_detection=spec.logo_detection,
    )


@dataclass(frozen=True, slots=True)
class Cap:
    """One budget: the account's (stream None) or a stream's, for a day or a month."""

    stream: str | None
    period: Period
    ticks: int

    @property
    def scope(self) -> str:
        return f"stream {self.stream}" if self.stream else "account"

    @property
    def label(self) -> str:
        return "daily" if self.period == "day" else "monthly"


@dataclass(frozen=True, slots=True)
class BudgetGate:
    """What the budgets allow now: streams to stop, and streams that may not start."""

    stop: frozenset[str] = frozenset()
    no_start: frozenset[str] = frozenset()
    reasons: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class BudgetEvent:
    """A threshold crossed or a forecast made; `key` makes it fire once per cap and period.

    `percent` is the threshold (for a forecast, the whole percentage used); `spent_ticks` and
    `used_permille` are the spend against the cap and its share (in tenths of a percent,
    rounded down) when it was found: for a threshold crossed by a charge, right after that
    charge, which `charge_stream` and `charge_ticks` name."""

    kind: Literal["budget_threshold", "budget_forecast"]
    key: str
    cap: Cap
    period_key: str
    spent_ticks: int
    percent: int
    detail: str
    used_permille: int = 0
    charge_stream: str | None = None
    charge_ticks: int = 0


def _permille(spent: int, cap: int) -> int:
    """`spent` as tenths of a percent of `cap`, rounded down (never shown above the truth)."""
    return spent * 1000 // cap if cap else 1000


def _percent_text(permille: int) -> str:
    return f"{permille // 10}.{permille % 10} %"


def caps_for(budgets: BudgetsConfig, streams: Iterable[StreamConfig]) -> list[Cap]:
    """Every configured cap, in ticks."""
    owners: list[tuple[str | None, Decimal | None, Decimal | None]] = [
        (None, budgets.daily_usd, budgets.monthly_usd),
        *((s.name, s.budget.daily_usd, s.budget.monthly_usd) for s in streams),
    ]
    caps = []
    for stream, daily, monthly in owners:
        amounts: tuple[tuple[Period, Decimal | None], ...] = (("day", daily), ("month", monthly))
        caps += [Cap(stream, p, usd_to_ticks(a)) for p, a in amounts if a is not None]
    return caps


Fired = frozenset[str]
"""The keys (`BudgetEvent.key`) of the budget events raised in the current periods."""


def threshold_events(
    cap: Cap,
    spent: int,
    at: float,
    fired: Fired,
    *,
    thresholds: Iterable[int],
    note: str,
    charge: tuple[str, int] | None = None,
) -> list[BudgetEvent]:
    """The thresholds of `cap` that `spent` has reached and `fired` does not hold yet."""
    key = period_key(cap.period, at)
    permille = _permille(spent, cap.ticks)
    events = []
    for threshold in thresholds:
        ident = f"{cap.stream or '*'}:{cap.period}:{key}:{threshold}"
        if permille < threshold * 10 or ident in fired:
            continue
        events.append(
            BudgetEvent(
                "budget_threshold",
                ident,
                cap,
                key,
                spent,
                threshold,
                f"{cap.scope} {cap.label} budget {threshold}% used: {usd(spent)} of "
                f"{usd(cap.ticks)} USD ({_percent_text(permille)}), {note}",
                used_permille=permille,
                charge_stream=charge[0] if charge else None,
                charge_ticks=charge[1] if charge else 0,
            )
        )
    return events


class Spending:
    """Per-period spend counters and the budget decisions built on them."""

    def __init__(
        self,
        *,
        budgets: BudgetsConfig,
        streams: Iterable[StreamConfig],
        segment_seconds: float,
    ) -> None:
        self._counters: dict[tuple[str, Period, str], int] = {}
        self._account: dict[tuple[Period, str], int] = {}  # the same, summed over streams
        self.all_time: dict[str, int] = {}  # every charge ever recorded, per stream
        # Estimates of billed but unreported segments as of the last `check`: a charge counts
        # against a cap on top of them, as the check does.
        self._estimates: Mapping[str, int] = {}
        # Orphan tasks' estimated charges: they count against the account's caps only.
        self._orphans: dict[tuple[Period, str], int] = {}
        self._orphan_rates: dict[str, tuple[int, float]] = {}  # task -> (segment ticks, last)
        self.segment_seconds = segment_seconds
        self.configure(budgets, streams)

    def configure(self, budgets: BudgetsConfig, streams: Iterable[StreamConfig]) -> None:
        """Take new caps (a reload): the next gate and check use them."""
        self.budgets = budgets
        self.specs = {s.name: s for s in streams}
        self.caps = caps_for(budgets, self.specs.values())

    def take_totals(self, totals: Iterable[SpendTotal]) -> None:
        """[cluster]: take the fleet's confirmed spend (every replica's charges), as a charge's
        transaction or the store found it. A period's spend only grows: an older answer that
        arrives after a newer one changes nothing."""
        for t in totals:
            period = cast(Period, t.period)
            if t.stream is None:
                k = (period, t.period_key)
                self._account[k] = max(self._account.get(k, 0), t.ticks)
            else:
                c = (t.stream, period, t.period_key)
                self._counters[c] = max(self._counters.get(c, 0), t.ticks)

    def load(self, period: Period, key: str, by_stream: Mapping[str, int]) -> None:
        """Seed one period's counters from the store."""
        for stream, ticks in by_stream.items():
            self._counters[(stream, period, key)] = ticks
        self._account[(period, key)] = sum(by_stream.values())

    def add(self, stream: str, ticks: int, at: float) -> None:
        """Count a charge the store has recorded."""
        self.all_time[stream] = self.all_time.get(stream, 0) + ticks
        for period in PERIODS:
            key = period_key(period, at)
            k = (stream, period, key)
            self._counters[k] = self._counters.get(k, 0) + ticks
            self._account[(period, key)] = self._account.get((period, key), 0) + ticks

    def charge(
        self, stream: str, ticks: int, at: float, *, fired: Fired
    ) -> tuple[Fired, list[BudgetEvent]]:
        """Count a charge the store has recorded, and find the thresholds it crossed that are
        not in `fired`: each event carries the charge and the spend and percentage right after
        it. Returns what has fired now and the events, for the caller to record."""
        self.add(stream, ticks, at)
        if not ticks:
            return fired, []
        events: list[BudgetEvent] = []
        for cap in self.caps:
            if cap.stream not in (None, stream):
                continue
            spent = self.effective(cap, at, self._estimates)
            events += self._thresholds(
                cap,
                spent,
                at,
                fired,
                note=f"after a charge of {usd(ticks)} USD to stream {stream}",
                charge=(stream, ticks),
            )
        return fired | {e.key for e in events}, events

    def _thresholds(
        self,
        cap: Cap,
        spent: int,
        at: float,
        fired: Fired,
        *,
        note: str,
        charge: tuple[str, int] | None = None,
    ) -> list[BudgetEvent]:
        return threshold_events(
            cap, spent, at, fired, thresholds=self.budgets.thresholds, note=note, charge=charge
        )

    def load_orphans(self, period: Period, key: str, ticks: int) -> None:
        """Seed one period's orphan estimates from the store."""
        self._orphans[(period, key)] = ticks

    def add_orphan(self, ticks: int, at: float) -> None:
        """Count (or, negative, take back) an orphan estimate the store has recorded."""
        for period in PERIODS:
            k = (period, period_key(period, at))
            self._orphans[k] = self._orphans.get(k, 0) + ticks

    def orphan_spent(self, period: Period, now: float) -> int:
        """Estimated spend of orphan tasks in the period holding `now`."""
        return self._orphans.get((period, period_key(period, now)), 0)

    def note_orphan(self, task_id: str, segment_ticks: int, at: float) -> None:
        """An orphan task called back (its burn counts in the account's forecast)."""
        self._orphan_rates[task_id] = (segment_ticks, at)

    def forget_orphan(self, task_id: str) -> None:
        """An orphan ended, was stopped or was adopted: it burns no more as an orphan."""
        self._orphan_rates.pop(task_id, None)

    def orphan_burn(self, now: float) -> float:
        """Ticks per second of the orphans heard from in the last `ORPHAN_LIVE_SEGMENTS`
        periods."""
        horizon = now - ORPHAN_LIVE_SEGMENTS * self.segment_seconds
        return sum(
            ticks / self.segment_seconds
            for ticks, last in self._orphan_rates.values()
            if last >= horizon
        )

    def live_orphans(self, now: float) -> int:
        horizon = now - ORPHAN_LIVE_SEGMENTS * self.segment_seconds
        return sum(1 for _, last in self._orphan_rates.values() if last >= horizon)

    def spent(self, stream: str | None, period: Period, now: float) -> int:
        """Confirmed spend of a stream (or the account, for None) in the period holding `now`."""
        key = period_key(period, now)
        if stream is not None:
            return self._counters.get((stream, period, key), 0)
        return self._account.get((period, key), 0)

    def near_cap(self, stream: str, at: float) -> bool:
        """Whether the stream's or the account's spend is within one pre-charge of a cap, so
        that the budget gate may have changed (cheap: for the callback path)."""
        if self.budgets.action != "stop":
            return False
        spec = self.specs.get(stream)
        margin = segment_ticks(spec) if spec is not None else 0
        return any(
            self.effective(cap, at, {}) + margin >= cap.ticks
            for cap in self.caps
            if cap.stream in (None, stream)
        )

    def near_account_cap(self, at: float) -> bool:
        """Whether the account is within one segment of the dearest configured stream of an
        account cap (an orphan's charge may have changed the gate)."""
        if self.budgets.action != "stop":
            return False
        margin = max((segment_ticks(s) for s in self.specs.values()), default=0)
        return any(
            self.effective(cap, at, {}) + margin >= cap.ticks
            for cap in self.caps
            if cap.stream is None
        )

    def effective(self, cap: Cap, now: float, estimates: Mapping[str, int]) -> int:
        """Spend against `cap`: confirmed charges plus the estimates of unreported ones, and
        for the account's caps the estimated spend of orphan tasks."""
        if cap.stream:
            return self.spent(cap.stream, cap.period, now) + estimates.get(cap.stream, 0)
        orphans = self.orphan_spent(cap.period, now)
        return self.spent(None, cap.period, now) + sum(estimates.values()) + orphans

    def streams_charged(self) -> set[str]:
        """Every stream with a charge in a counted period (configured or not)."""
        return {k[0] for k in self._counters}

    def gate(self, now: float, estimates: Mapping[str, int] | None = None) -> BudgetGate:
        """Which streams must stop and which may not start, counting estimates of billed but
        unreported segments as spent (the conservative reading)."""
        if self.budgets.action != "stop" or not self.caps:
            return BudgetGate()
        est = estimates or {}
        stop: set[str] = set()
        no_start: set[str] = set()
        reasons: dict[str, str] = {}
        for cap in self.caps:
            spent = self.effective(cap, now, est)
            affected = [cap.stream] if cap.stream else list(self.specs)
            for name in affected:
                spec = self.specs.get(name) if name else None
                if spec is None:
                    continue
                if spent >= cap.ticks:
                    stop.add(name)
                    no_start.add(name)
                    reasons[name] = f"{cap.scope} {cap.label} budget reached"
                elif spent + segment_ticks(spec) > cap.ticks:
                    no_start.add(name)
                    reasons.setdefault(
                        name,
                        f"a start's pre-charge would exceed the {cap.scope} {cap.label} budget",
                    )
        return BudgetGate(frozenset(stop), frozenset(no_start), reasons)

    def check(
        self,
        now: float,
        *,
        running: Iterable[str],
        fired: Fired,
        estimates: Mapping[str, int] | None = None,
    ) -> tuple[Fired, list[BudgetEvent]]:
        """Thresholds crossed and forecasts due that are not in `fired`, and what has fired
        with them. Charges find their own crossings (`charge`); what is left here is a
        crossing made by the estimates of unreported segments, and forecasts."""
        est = estimates or {}
        self._estimates = dict(est)
        burn = {
            name: burn_ticks_per_second(self.specs[name], self.segment_seconds)
            for name in running
            if name in self.specs
        }
        events = []
        for cap in self.caps:
            key = period_key(cap.period, now)
            spent = self.effective(cap, now, est)
            percent = spent * 100 // cap.ticks if cap.ticks else 100
            base = f"{cap.stream or '*'}:{cap.period}:{key}"
            unreported = spent - self.spent(cap.stream, cap.period, now)
            note = (
                f"{usd(unreported)} USD of it estimated for segments billed but not reported"
                if unreported
                else "found by the periodic check"
            )
            events += self._thresholds(cap, spent, now, fired, note=note)
            rate = (
                burn.get(cap.stream, 0.0)
                if cap.stream
                else sum(burn.values()) + self.orphan_burn(now)
            )
            ident = f"{base}:forecast"
            if spent < cap.ticks and rate > 0 and ident not in fired:
                seconds_to_cap = (cap.ticks - spent) / rate
                period_left = period_bounds(cap.period, now)[1] - now
                lead = self.budgets.forecast_lead_minutes * 60
                if seconds_to_cap <= min(lead, period_left):
                    events.append(
                        BudgetEvent(
                            "budget_forecast",
                            ident,
                            cap,
                            key,
                            spent,
                            int(percent),
                            f"{cap.scope} {cap.label} budget projected to be exceeded in "
                            f"{seconds_to_cap / 60:.0f} min at {usd_per_hour(rate)} USD/h",
                        )
                    )
        return fired | {e.key for e in events}, events

    def prune(self, fired: Fired, now: float) -> Fired:
        """Drop the counters of periods that are over; returns `fired` without their keys."""
        current = {period_key(p, now) for p in PERIODS}
        for k in [k for k in self._counters if k[2] not in current]:
            del self._counters[k]
        for a in [a for a in self._account if a[1] not in current]:
            del self._account[a]
        for o in [o for o in self._orphans if o[1] not in current]:
            del self._orphans[o]
        return frozenset(f for f in fired if f.split(":")[2] in current)


class FleetBudget:
    """[cluster]: the budgets as the store asks them in a charge's or a start's transaction
    (`streamwatch.store.budget.BudgetRules`), on the fleet's exact totals. It reads the caps
    and thresholds of `spending` as they are (a reload swaps them whole)."""

    def __init__(self, spending: Spending) -> None:
        self._spending = spending

    def periods(self, at: float) -> list[tuple[str, str, float, float]]:
        """Each period holding `at`: its name, its key, its [start, end)."""
        return [(p, period_key(p, at), *period_bounds(p, at)) for p in PERIODS]

    def capped(self) -> list[tuple[str, str]]:
        """(scope, period) of every cap: `*` for the account's, else the stream's name."""
        return sorted({(cap.stream or "*", cap.period) for cap in self._spending.caps})

    def counted(self, stream: str, at: float) -> list[tuple[str, tuple[str, str, float, float]]]:
        caps = {(cap.stream or "*", cap.period) for cap in self._spending.caps}
        return [
            (scope, span)
            for scope in ("*", stream)  # the account's first: one lock order
            for span in self.periods(at)
            if (scope, span[0]) in caps
        ]

    def _caps(self, stream: str, totals: Iterable[SpendTotal]) -> list[tuple[Cap, int]]:
        """The caps a charge to `stream` counts against, each with its fleet total."""
        spent = {(t.stream, t.period): t.ticks for t in totals}
        return [
            (cap, spent.get((cap.stream, cap.period), 0))
            for cap in self._spending.caps
            if cap.stream in (None, stream)
        ]

    def crossed(
        self, stream: str, ticks: int, at: float, totals: Iterable[SpendTotal]
    ) -> list[FiredThreshold]:
        thresholds = self._spending.budgets.thresholds
        out = []
        for cap, spent in self._caps(stream, totals):
            before = _permille(spent - ticks, cap.ticks)
            for event in threshold_events(
                cap,
                spent,
                at,
                frozenset(),
                thresholds=thresholds,
                note=f"after a charge of {usd(ticks)} USD to stream {stream}",
                charge=(stream, ticks),
            ):
                if before < event.percent * 10:  # crossed by this charge
                    out.append(
                        FiredThreshold(
                            event.key, cap.stream, cap.period, event.percent, event.detail
                        )
                    )
        return out

    def near_cap(self, stream: str, at: float, totals: Iterable[SpendTotal]) -> bool:
        if self._spending.budgets.action != "stop":
            return False
        # A cap within any stream's pre-charge: a start somewhere may be refused now.
        margin = max((segment_ticks(s) for s in self._spending.specs.values()), default=0)
        return any(spent + margin >= cap.ticks for cap, spent in self._caps(stream, totals))

    def refuse_start(self, stream: str, at: float, totals: Iterable[SpendTotal]) -> str | None:
        spec = self._spending.specs.get(stream)
        if self._spending.budgets.action != "stop" or spec is None:
            return None
        precharge = segment_ticks(spec)
        for cap, spent in self._caps(stream, totals):
            if spent + precharge > cap.ticks:
                return (
                    f"a start's pre-charge of {usd(precharge)} USD would exceed the {cap.scope}"
                    f" {cap.label} budget: {usd(spent)} of {usd(cap.ticks)} USD spent by the"
                    " fleet"
                )
        return None


def stream_ticks_per_hour(spec: StreamConfig, segment_seconds: float) -> int:
    """Whole ticks a running task of `spec` costs per hour (exact when 3600 / segment_seconds
    is whole, as with MAVI's 5 s)."""
    return round(segment_ticks(spec) * 3600 / segment_seconds)
