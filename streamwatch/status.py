"""The daemon's state as documents: `build_status()` for `GET /api/v1/status` (typed as
`StatusDoc`, which `streamwatch status` reads back), and `snapshot()` for a metrics scrape.
Both start from one per-stream view (`stream_views()`), so they can never tell two stories.

The documents hold no secrets and no stream URLs (they may carry credentials). Their field
names are a stable contract (README: Status API).
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import TypedDict

from streamwatch import __version__
from streamwatch.config import Config
from streamwatch.costs import NO_SPEND, LabelSpend, Spend, summary
from streamwatch.ledger import usd
from streamwatch.metrics import Snapshot, StreamView
from streamwatch.store import StoreReader
from streamwatch.supervisor import Supervisor

__all__ = [
    "AccountDoc",
    "CostDoc",
    "OrphansDoc",
    "PreflightDoc",
    "SourceDoc",
    "StatusDoc",
    "StreamDoc",
    "build_status",
    "iso",
    "snapshot",
    "stream_views",
]


class SourceDoc(TypedDict):
    """What the last preflight probe that found media saw of the stream's source."""

    probed_at: str | None
    video_codec: str | None
    resolution: str | None
    fps: float | None
    bitrate: int | None
    audio_codec: str | None


class PreflightDoc(TypedDict):
    """Preflight's account: probes by outcome, and the starts it kept from paying."""

    probes: dict[str, int]
    precharges_avoided: int
    precharges_avoided_usd: str


class StreamDoc(TypedDict):
    name: str
    state: str
    owner: str | None  # [cluster]: the replica holding its lease (None: none, or no cluster)
    configured: bool
    task_id: str | None
    fps: int | None
    content_moderation: bool | None
    logo_detection: bool | None
    labels: dict[str, str]
    last_segment_at: str | None
    segments: int
    unsafe_segments: int
    logo_segments: int
    failed_segments: int
    tasks: int
    restarts: int
    retry_at: str | None
    last_end_status: int | None
    held_reason: str | None
    last_error: str | None
    budget_reason: str | None
    cost: Spend
    preflight: bool | None
    source: SourceDoc | None
    source_offline_since: str | None
    probes: dict[str, int]
    precharges_avoided: int
    precharges_avoided_usd: str


class AccountDoc(TypedDict):
    halted: bool
    halt_reason: str | None
    halt_detail: str | None
    halted_until: str | None


class OrphansDoc(TypedDict):
    tasks: int
    callbacks: int
    live_tasks: int
    uncertain_tasks: int
    stopped_tasks: int
    estimated_today_usd: str
    estimated_month_usd: str
    estimated_burn_usd_per_hour: str


class CostDoc(Spend):
    """The account's spend, by label, and how pre-charges are read."""

    by_label: dict[str, LabelSpend]
    precharge: str


class StatusDoc(TypedDict):
    version: str
    now: str | None
    backend: str
    account: AccountDoc
    streams: list[StreamDoc]
    orphans: OrphansDoc
    alerts: dict[str, int]
    cost: CostDoc
    preflight: PreflightDoc


def iso(ts: float | None) -> str | None:
    """A unix time as an ISO-8601 UTC string (None stays None)."""
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def stream_views(
    supervisor: Supervisor, now: float, *, owned_only: bool = False
) -> dict[str, StreamView]:
    """What is shown of every stream, configured or still known, at `now`. With
    `owned_only` and [cluster], only the streams this replica owns (per-stream metrics come
    from the owner alone)."""
    views = {}
    names = set(supervisor.desired) | set(supervisor.streams)
    fleet = supervisor.fleet
    if owned_only and fleet is not None:
        names = {n for n in names if fleet.owners.get(n) == fleet.replica_id}
    for name in sorted(names):
        spec = supervisor.desired.get(name)
        state = supervisor.streams.get(name)
        views[name] = StreamView(
            state=supervisor.display_state(name, now),
            running=state is not None and state.task_id is not None,
            restarts=state.restarts if state else 0,
            labels=dict(spec.labels) if spec else {},
            fps=spec.fps if spec else None,
            content_moderation=spec.content_moderation if spec else None,
            logo_detection=spec.logo_detection if spec else None,
            preflight=spec.preflight if spec else False,
            probes=dict(state.probes) if state else {},
            precharges_avoided=state.precharges_avoided if state else 0,
            ticks_saved=state.ticks_saved if state else 0,
        )
    return views


async def build_status(
    *, config: Config, supervisor: Supervisor, store: StoreReader, clock: Callable[[], float]
) -> StatusDoc:
    """The status document served by `/api/v1/status`, as of when the store was read."""
    totals = await store.stream_totals()
    orphans = await store.orphan_totals()
    outbox = await store.alert_counts()
    now = clock()
    halt = supervisor.halt
    costs = summary(
        supervisor.spending,
        now=now,
        running=[n for n, s in supervisor.streams.items() if s.task_id],
        estimates=supervisor.estimates(now),
    )
    streams = []
    fleet = supervisor.fleet
    all_probes: dict[str, int] = {}
    avoided = saved = 0
    for name, view in stream_views(supervisor, now).items():
        state = supervisor.streams.get(name)
        total = totals.get(name)
        spec = supervisor.desired.get(name)
        source = state.source if state else None
        for outcome, count in view.probes.items():
            all_probes[outcome] = all_probes.get(outcome, 0) + count
        avoided += view.precharges_avoided
        saved += view.ticks_saved
        owner = fleet.owners.get(name) if fleet is not None else None
        task_id = state.task_id if state else None
        shown = view.state
        if fleet is not None and owner != fleet.replica_id:
            # Another replica's (or nobody's, between owners): what the store says of it.
            task_id = fleet.running.get(name)
            shown = "running" if task_id else view.state
        streams.append(
            StreamDoc(
                name=name,
                state=shown,
                owner=owner,
                configured=name in supervisor.desired,
                task_id=task_id,
                fps=view.fps,
                content_moderation=view.content_moderation,
                logo_detection=view.logo_detection,
                labels=dict(view.labels),
                last_segment_at=iso(total.last_callback_at) if total else None,
                segments=total.segments if total else 0,
                unsafe_segments=total.unsafe_segments if total else 0,
                logo_segments=total.logo_segments if total else 0,
                failed_segments=total.failed_segments if total else 0,
                tasks=total.tasks if total else 0,
                restarts=view.restarts,
                retry_at=iso(state.retry_at) if state else None,
                last_end_status=state.last_end_status if state else None,
                held_reason=state.held_reason if state else None,
                last_error=state.last_error if state else None,
                budget_reason=supervisor.gate.reasons.get(name),
                cost=costs["streams"].get(name, NO_SPEND),
                preflight=spec.preflight if spec else None,
                source=None
                if source is None
                else SourceDoc(
                    probed_at=iso(source.at),
                    video_codec=source.video_codec,
                    resolution=source.resolution,
                    fps=source.fps,
                    bitrate=source.bitrate,
                    audio_codec=source.audio_codec,
                ),
                source_offline_since=iso(state.offline_since) if state else None,
                probes=dict(view.probes),
                precharges_avoided=view.precharges_avoided,
                precharges_avoided_usd=usd(view.ticks_saved),
            )
        )
    account, orphan_costs = costs["account"], costs["orphans"]
    return StatusDoc(
        version=__version__,
        now=iso(now),
        backend=config.mavi.backend,
        account=AccountDoc(
            halted=halt is not None and now < halt.until,
            halt_reason=halt.reason if halt else None,
            halt_detail=halt.detail if halt else None,
            halted_until=iso(halt.until) if halt else None,
        ),
        streams=streams,
        orphans=OrphansDoc(
            tasks=orphans.tasks,
            callbacks=orphans.callbacks,
            live_tasks=orphan_costs["live_tasks"],
            uncertain_tasks=orphans.uncertain,
            stopped_tasks=orphans.stopped,
            estimated_today_usd=orphan_costs["today_usd"],
            estimated_month_usd=orphan_costs["month_usd"],
            estimated_burn_usd_per_hour=orphan_costs["burn_usd_per_hour"],
        ),
        alerts=outbox,
        cost=CostDoc(
            today_usd=account["today_usd"],
            month_usd=account["month_usd"],
            burn_usd_per_hour=account["burn_usd_per_hour"],
            estimated_unreported_usd=account["estimated_unreported_usd"],
            budget=account["budget"],
            by_label=costs["by_label"],
            precharge=config.ledger.precharge,
        ),
        preflight=PreflightDoc(
            probes=dict(sorted(all_probes.items())),
            precharges_avoided=avoided,
            precharges_avoided_usd=usd(saved),
        ),
    )


async def snapshot(*, supervisor: Supervisor, store: StoreReader, now: float) -> Snapshot:
    """The daemon's state for one metrics scrape."""
    halt = supervisor.halt
    fleet = supervisor.fleet
    led = fleet if fleet is not None and fleet.leader else None  # the fleet, if leading it
    return Snapshot(
        fleet_figures=fleet is None or led is not None,
        replicas=len(led.replicas) if led is not None else None,
        unowned=len(set(supervisor.desired) - set(led.owners)) if led is not None else None,
        streams=stream_views(supervisor, now, owned_only=True),
        totals=await store.stream_totals(),
        orphans=await store.orphan_totals(),
        halt_reason=halt.reason if halt is not None and now < halt.until else None,
        all_time_ticks=dict(supervisor.spending.all_time),
        outbox=await store.alert_counts(),
        intents=await store.intent_states(),
        now=now,
    )
