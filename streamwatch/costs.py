"""Money as documents: the status document's spend and budget use (`summary`), what the
config costs (`estimate`, for `streamwatch cost estimate` and `check-config`) and what was
charged over a range (`cost_report`, for `streamwatch cost`). Typed, so that the server, the
command line and the tests read the same fields; USD as decimal strings.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Literal, Protocol, TypedDict

from streamwatch.config import BudgetsConfig, StreamConfig
from streamwatch.ledger import (
    Period,
    Spending,
    burn_ticks_per_second,
    caps_for,
    segment_ticks,
    stream_ticks_per_hour,
    usd,
    usd_per_hour,
)

__all__ = [
    "NO_SPEND",
    "BudgetUse",
    "CapEstimate",
    "Charges",
    "CostGroup",
    "CostReport",
    "Estimate",
    "Grouping",
    "LabelSpend",
    "OrphanCharges",
    "OrphanCost",
    "OrphanSpend",
    "PreflightCost",
    "Preflighted",
    "RateEstimate",
    "Spend",
    "StreamEstimate",
    "Summary",
    "cost_report",
    "estimate",
    "group_charges",
    "preflight_cost",
    "summary",
]


class BudgetUse(TypedDict, total=False):
    """A scope's caps and their use this period (only the configured caps are present)."""

    daily_usd: str
    daily_used_percent: int
    monthly_usd: str
    monthly_used_percent: int


class Spend(TypedDict):
    """What a stream (or the account) spent this UTC day and month, burns and has presumably
    been billed for without a report yet, with its budget use. USD as decimal strings."""

    today_usd: str
    month_usd: str
    burn_usd_per_hour: str
    estimated_unreported_usd: str
    budget: BudgetUse


class OrphanSpend(TypedDict):
    """The estimated spend of tasks this daemon did not start."""

    today_usd: str
    month_usd: str
    burn_usd_per_hour: str
    live_tasks: int


class LabelSpend(TypedDict):
    today_usd: str
    month_usd: str


class Summary(TypedDict):
    """Spend, burn, estimates and budget use: the status document's money."""

    account: Spend
    orphans: OrphanSpend
    streams: dict[str, Spend]
    by_label: dict[str, LabelSpend]


NO_SPEND = Spend(
    today_usd=usd(0),
    month_usd=usd(0),
    burn_usd_per_hour=str(usd_per_hour(0.0)),
    estimated_unreported_usd=usd(0),
    budget=BudgetUse(),
)
"""The spend of a stream nothing was charged for."""


def summary(
    spending: Spending,
    *,
    now: float,
    running: Iterable[str],
    estimates: Mapping[str, int],
) -> Summary:
    """Spend, burn, estimates and budget use for the status document (USD as strings)."""
    live = set(running)

    def burn(names: Iterable[str]) -> float:
        return sum(
            burn_ticks_per_second(spending.specs[n], spending.segment_seconds)
            for n in names
            if n in live and n in spending.specs
        )

    def budget(stream: str | None) -> BudgetUse:
        out = BudgetUse()
        for cap in spending.caps:
            if cap.stream != stream:
                continue
            used = spending.effective(cap, now, estimates)
            percent = used * 100 // cap.ticks if cap.ticks else 100
            if cap.period == "day":
                out["daily_usd"], out["daily_used_percent"] = usd(cap.ticks), percent
            else:
                out["monthly_usd"], out["monthly_used_percent"] = usd(cap.ticks), percent
        return out

    def spend(stream: str | None, names: Iterable[str], unreported: int) -> Spend:
        return Spend(
            today_usd=usd(spending.spent(stream, "day", now)),
            month_usd=usd(spending.spent(stream, "month", now)),
            burn_usd_per_hour=str(usd_per_hour(burn(names))),
            estimated_unreported_usd=usd(unreported),
            budget=budget(stream),
        )

    streams = {
        name: spend(name, [name], estimates.get(name, 0))
        for name in sorted(set(spending.specs) | spending.streams_charged())
    }
    labels: dict[str, dict[Period, int]] = {}
    for name, spec in spending.specs.items():
        for k, v in spec.labels.items():
            entry = labels.setdefault(f"{k}={v}", {"day": 0, "month": 0})
            entry["day"] += spending.spent(name, "day", now)
            entry["month"] += spending.spent(name, "month", now)
    return Summary(
        account=spend(None, live, sum(estimates.values())),
        orphans=OrphanSpend(
            today_usd=usd(spending.orphan_spent("day", now)),
            month_usd=usd(spending.orphan_spent("month", now)),
            burn_usd_per_hour=str(usd_per_hour(spending.orphan_burn(now))),
            live_tasks=spending.live_orphans(now),
        ),
        streams=streams,
        by_label={
            k: LabelSpend(today_usd=usd(v["day"]), month_usd=usd(v["month"]))
            for k, v in sorted(labels.items())
        },
    )


# -- what the config costs, and what was charged: the `cost` command's documents -------------


class StreamEstimate(TypedDict):
    name: str
    fps: int
    features: list[str]
    segment_usd: str
    hour_usd: str
    day_usd: str
    days30_usd: str


class RateEstimate(TypedDict):
    hour_usd: str
    day_usd: str
    days30_usd: str


class CapEstimate(TypedDict):
    scope: str
    period: str
    usd: str
    hours_at_full_burn: float | None


class Estimate(TypedDict):
    """What the config costs if every stream runs all the time (`streamwatch cost estimate`)."""

    streams: list[StreamEstimate]
    total: RateEstimate
    budgets: list[CapEstimate]
    note: str


def _rates(per_hour: int) -> RateEstimate:
    return RateEstimate(
        hour_usd=usd(per_hour), day_usd=usd(per_hour * 24), days30_usd=usd(per_hour * 24 * 30)
    )


def estimate(
    streams: Sequence[StreamConfig], budgets: BudgetsConfig, *, segment_seconds: float
) -> Estimate:
    """What `streams` cost per hour, day and 30 days if they all run all the time, and how
    long each budget lasts at that burn."""
    per_hour = {s.name: stream_ticks_per_hour(s, segment_seconds) for s in streams}
    total_hour = sum(per_hour.values())
    caps = []
    for cap in caps_for(budgets, streams):
        rate = per_hour[cap.stream] if cap.stream else total_hour
        hours = cap.ticks / rate if rate else None
        caps.append(
            CapEstimate(
                scope=cap.scope,
                period=cap.label,
                usd=usd(cap.ticks),
                hours_at_full_burn=round(hours, 2) if hours is not None else None,
            )
        )
    return Estimate(
        streams=[
            StreamEstimate(
                name=s.name,
                fps=s.fps,
                features=[
                    f
                    for f, on in (("moderation", s.content_moderation), ("logos", s.logo_detection))
                    if on
                ],
                segment_usd=usd(segment_ticks(s)),
                **_rates(per_hour[s.name]),
            )
            for s in streams
        ],
        total=_rates(total_hour),
        budgets=caps,
        note="one pre-charge per start comes on top; restarts add one each",
    )


class Charges(Protocol):
    """A stream's charges over a range (the store's `ChargeTotal`)."""

    @property
    def stream(self) -> str: ...
    @property
    def precharges(self) -> int: ...
    @property
    def segments(self) -> int: ...
    @property
    def ticks(self) -> int: ...


class OrphanCharges(Protocol):
    """Orphan tasks' estimated charges over a range (the store's `OrphanCharges`)."""

    @property
    def tasks(self) -> int: ...
    @property
    def precharges(self) -> int: ...
    @property
    def segments(self) -> int: ...
    @property
    def ticks(self) -> int: ...
    @property
    def uncertain_tasks(self) -> int: ...


class Preflighted(Protocol):
    """What preflight kept of a stream (the store's `StreamRecord`)."""

    @property
    def probes(self) -> tuple[tuple[str, int], ...]: ...
    @property
    def precharges_avoided(self) -> int: ...
    @property
    def ticks_saved(self) -> int: ...


class PreflightCost(TypedDict):
    """Preflight's account since the state file began (not limited to the report's range):
    probes by outcome, pre-charges avoided and what they would have cost."""

    probes: dict[str, int]
    precharges_avoided: int
    precharges_avoided_usd: str


def preflight_cost(records: Iterable[Preflighted]) -> PreflightCost:
    """Preflight's figures summed over the streams' records."""
    probes: dict[str, int] = {}
    avoided = ticks = 0
    for r in records:
        for outcome, count in r.probes:
            probes[outcome] = probes.get(outcome, 0) + count
        avoided += r.precharges_avoided
        ticks += r.ticks_saved
    return PreflightCost(
        probes=dict(sorted(probes.items())),
        precharges_avoided=avoided,
        precharges_avoided_usd=usd(ticks),
    )


class CostGroup(TypedDict):
    name: str
    precharges: int
    segments: int
    usd: str


class OrphanCost(TypedDict):
    tasks: int
    precharges: int
    segments: int
    estimated_usd: str
    uncertain_tasks: int


class CostReport(TypedDict):
    """What was charged over a UTC range, by stream or by label (`streamwatch cost`)."""

    since: str
    until: str
    by: str
    precharge: str
    groups: list[CostGroup]
    total_usd: str
    orphans: OrphanCost
    total_with_orphans_usd: str
    preflight: PreflightCost


Grouping = Literal["stream", "label"]


def group_charges(
    totals: Iterable[Charges], specs: Mapping[str, StreamConfig], *, by: Grouping
) -> list[CostGroup]:
    """Charges totalled per stream, or per label value (`key=value`; a stream with several
    labels counts in each, one without in `(no labels)`), sorted by name."""
    groups: dict[str, tuple[int, int, int]] = {}

    def add(key: str, t: Charges) -> None:
        p, s, ticks = groups.get(key, (0, 0, 0))
        groups[key] = (p + t.precharges, s + t.segments, ticks + t.ticks)

    for t in totals:
        if by == "stream":
            add(t.stream, t)
            continue
        spec = specs.get(t.stream)
        if spec is None:
            add("(stream not configured)", t)
        elif not spec.labels:
            add("(no labels)", t)
        for k, v in (spec.labels if spec else {}).items():
            add(f"{k}={v}", t)
    return [
        CostGroup(name=name, precharges=p, segments=s, usd=usd(ticks))
        for name, (p, s, ticks) in sorted(groups.items())
    ]


def cost_report(
    totals: Sequence[Charges],
    orphans: OrphanCharges,
    *,
    specs: Mapping[str, StreamConfig],
    by: Grouping,
    since: float,
    until: float,
    precharge: str,
    preflight: PreflightCost | None = None,
) -> CostReport:
    """The charges of [since, until) grouped `by` stream or label, with the orphans' estimate
    apart; `precharge` says how pre-charges are read (`[ledger] precharge`)."""
    confirmed = sum(t.ticks for t in totals)
    return CostReport(
        since=datetime.fromtimestamp(since, UTC).isoformat(),
        until=datetime.fromtimestamp(until, UTC).isoformat(),
        by=by,
        precharge=precharge,
        groups=group_charges(totals, specs, by=by),
        total_usd=usd(confirmed),
        orphans=OrphanCost(
            tasks=orphans.tasks,
            precharges=orphans.precharges,
            segments=orphans.segments,
            estimated_usd=usd(orphans.ticks),
            uncertain_tasks=orphans.uncertain_tasks,
        ),
        total_with_orphans_usd=usd(confirmed + orphans.ticks),
        preflight=preflight or preflight_cost(()),
    )
