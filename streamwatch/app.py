"""The daemon's lifecycle: build the parts, run them, stop them in reverse.

`App.serve()` opens the store, the HTTP client session, the emulator (with the built-in
backend), the supervisor and the server, each entering one `AsyncExitStack`, then runs the
daemon's loops in one task group (`background.TaskGroup`) until `request_stop()`. Teardown is
the stack unwinding, so every part that was started is stopped even when another fails.
`App.run()` is `serve()` with signal handlers: SIGTERM/SIGINT drain and stop (a second one
stops at once), SIGHUP reloads `streams.toml` (a task of the daemon's group).

Each loop has a policy for when a pass fails (README, "Background work"): the planning loop
and the systemd notifier stop the daemon cleanly, which then exits non-zero
(`BackgroundFailed`) for its service manager to restart it; alert delivery and retention are
retried with backoff.

Why one module of this length (a little over 500 lines): startup, the main loop and shutdown
share the parts `startup()` returns and the order they were entered in; apart, each would
have to know the others' order.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import signal
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import anyio
import structlog
from prometheus_client import CollectorRegistry
from pydantic import SecretStr

from streamwatch.alerts import Router
from streamwatch.alerts.outbox import Alerts, Outbox
from streamwatch.alerts.sinks.registry import build_sinks
from streamwatch.background import BackgroundFailed, Backoff, Failures, TaskGroup
from streamwatch.cluster import Cluster, default_replica_id
from streamwatch.config import (
    Config,
    ConfigError,
    Secrets,
    StreamConfig,
    load_config,
    public_value_problems,
    resolve_secrets,
    secret_values,
)
from streamwatch.emulator import Emulator, Script
from streamwatch.evidence import Evidence
from streamwatch.intent import OrphanPricer, Shape
from streamwatch.ledger import Spending
from streamwatch.mavi.streams import StreamClient
from streamwatch.mavi.videos import VideoClient
from streamwatch.metrics import Metrics, StateCollector
from streamwatch.policy import Policy
from streamwatch.pricing import usd_to_ticks
from streamwatch.redact import Redactor, url_secrets
from streamwatch.server import Server
from streamwatch.storage import storage_location
from streamwatch.store import PgTarget, Pruned, Store
from streamwatch.supervisor import Supervisor
from streamwatch.systemd import Notifier

__all__ = ["App"]

log = structlog.get_logger("streamwatch.app")


@dataclass(frozen=True, slots=True)
class Parts:
    """What `App.startup()` built and started, in the order it did."""

    store: Store
    emulator: Emulator | None  # with the built-in backend
    supervisor: Supervisor
    evidence: Evidence
    alerts: Alerts | None  # with alert rules
    server: Server
    cluster: Cluster | None = None  # with [cluster]


class App:
    """One daemon. Tests build it directly and call `request_stop()`; `cli` calls `run()`."""

    def __init__(
        self,
        config: Config,
        *,
        config_path: Path | None = None,
        secrets: Secrets | None = None,
        environ: Mapping[str, str] | None = None,
        clock: Callable[[], float] = time.time,
        redactor: Redactor | None = None,
    ) -> None:
        self.config = config
        self.config_path = config_path
        self._environ = os.environ if environ is None else environ
        self.secrets = secrets or resolve_secrets(config, environ=self._environ)
        # What must never leave the process in clear: shared with the log set-up (cli), the
        # MAVI client and the supervisor (errors, events, alerts, the status API).
        self.redactor = redactor or Redactor()
        self.redactor.add(*secret_values(config, self.secrets))
        self._clock = clock
        self._stop = asyncio.Event()
        self.started = asyncio.Event()
        self._parts: Parts | None = None  # once started
        self.reloads = 0
        self._systemd_beats = 0
        # One registry per App: tests build as many daemons as they like, side by side.
        self.registry = CollectorRegistry()
        self.systemd = Notifier(self._environ)
        self.metrics = Metrics(self.registry, max_logo_names=config.metrics.max_logo_names)
        # Background failures are logged and counted; those of a loop the daemon cannot run
        # without stop it (`failure` names the task, and `serve()` raises BackgroundFailed).
        self.failures = Failures(
            count=lambda task: self.metrics.background_failures.labels(task).inc(),
            fatal=self._fail,
        )
        self.failure: str | None = None
        self._daemon: TaskGroup | None = None
        # Orphan segments are priced against the configured streams (replaced at a reload).
        self.pricer = OrphanPricer(shapes(config.streams))

    # The running parts, None before `startup()`; kept after a stop for inspection (tests).

    @property
    def store(self) -> Store | None:
        return self._parts.store if self._parts else None

    @property
    def emulator(self) -> Emulator | None:
        return self._parts.emulator if self._parts else None

    @property
    def supervisor(self) -> Supervisor | None:
        return self._parts.supervisor if self._parts else None

    @property
    def evidence(self) -> Evidence | None:
        return self._parts.evidence if self._parts else None

    @property
    def alerts(self) -> Alerts | None:
        return self._parts.alerts if self._parts else None

    @property
    def server(self) -> Server | None:
        return self._parts.server if self._parts else None

    def _fail(self, task: str) -> None:
        if self.failure is None:
            self.failure = task
            log.error("app.stopping_after_failure", task=task)
        self.request_stop()

    def request_reload(self) -> None:
        """Reload `streams.toml` in the daemon's task group (what SIGHUP does); nothing
        before the daemon runs."""
        if self._daemon is not None and self._daemon.running:
            self._daemon.spawn("reload", self.reload())

    def request_stop(self) -> None:
        """Begin a graceful stop (what SIGTERM does)."""
        self._stop.set()

    async def run(self) -> None:
        """Serve with signal handlers installed; returns after a graceful stop."""
        loop = asyncio.get_running_loop()
        main = asyncio.current_task()
        assert main is not None
        signals = 0

        def on_stop_signal(signame: str) -> None:
            nonlocal signals
            signals += 1
            if signals == 1:
                log.info("app.stop_requested", signal=signame)
                self.request_stop()
            else:
                log.warning("app.forced_exit", signal=signame)
                main.cancel()

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, on_stop_signal, sig.name)
        loop.add_signal_handler(signal.SIGHUP, self.request_reload)
        try:
            await self.serve()
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)

    async def serve(self) -> None:
        """Start every part, run until asked to stop, then drain and stop in reverse. Raises
        `BackgroundFailed` after a clean stop caused by a loop that failed."""
        async with contextlib.AsyncExitStack() as stack:
            parts = self._parts = await self.startup(stack)
            log.info(
                "app.started",
                backend=self.config.mavi.backend,
                streams=len(self.config.streams),
                adopted=parts.supervisor.running_count(),
                status_url=f"{parts.server.base_url}/api/v1/status",
                event_loop=type(asyncio.get_running_loop()).__module__.partition(".")[0],
            )
            self.started.set()
            self.systemd.notify(ready=1, status=self._status_line())
            async with TaskGroup("daemon", self.failures) as daemon:
                self._daemon = daemon
                planning = self._loops(daemon, parts)
                await self._stop.wait()
                await self.shutdown(parts, planning)
                # What is left (waits, backoffs, a reload under way) ends here.
                daemon.cancel()
            self._daemon = None
        log.info("app.stopped")
        if self.failure is not None:
            raise BackgroundFailed(self.failure)

    async def startup(self, stack: contextlib.AsyncExitStack) -> Parts:
        """Build and start every part, each entering `stack` (so that leaving it stops them in
        reverse), and return them."""
        cfg, metrics = self.config, self.metrics
        store = await stack.enter_async_context(
            Store(
                storage_location(cfg, environ=self._environ),
                batch_max=cfg.storage.batch_max,
                clock=self._clock,
                precharge_covers_first_segment=cfg.ledger.precharge == "first_segment",
                on_commit=metrics.commit,
                orphan_pricer=self.pricer,
            )
        )
        session = await stack.enter_async_context(aiohttp.ClientSession())
        base_url, batch_url, api_key = (
            cfg.mavi.base_url,
            cfg.mavi.batch_base_url,
            self.secrets.api_key,
        )
        emulator = None
        if cfg.mavi.backend == "emulator":
            emulator = await stack.enter_async_context(
                self._build_emulator().running(host=cfg.emulator.host, port=cfg.emulator.port)
            )
            base_url, batch_url = emulator.base_url, emulator.batch_url
            api_key = SecretStr(emulator.api_key or "emulator")
        assert api_key is not None, "resolve_secrets requires a key with backend = mavi"
        client = StreamClient(
            session=session,
            base_url=base_url,
            api_key=api_key,
            retry=cfg.mavi.retry,
            timeout_seconds=cfg.mavi.request_timeout_seconds,
            on_request=metrics.mavi_request,
            redact=self.redactor,
        )
        spending = Spending(
            budgets=cfg.budgets, streams=cfg.streams, segment_seconds=cfg.mavi.segment_seconds
        )
        supervisor = Supervisor(
            client=client,
            store=store,
            policy=Policy.from_config(
                cfg.supervisor,
                segment_seconds=cfg.mavi.segment_seconds,
                max_running=cfg.mavi.max_running,
            ),
            tick_seconds=cfg.supervisor.tick_seconds,
            spending=spending,
            clock=self._clock,
            redact=self.redactor,
            failures=self.failures,
        )
        await stack.enter_async_context(supervisor.running())
        cluster = None
        if cfg.cluster is not None:
            cluster = Cluster(
                store=store,
                supervisor=supervisor,
                replica_id=cfg.cluster.replica_id or default_replica_id(),
                lease_seconds=cfg.cluster.lease_seconds,
                streams=lambda: list(supervisor.desired),
                on_change=lambda change, n: metrics.lease_changes.labels(change).inc(n),
                on_fleet_stop=lambda: self._fleet_stop(supervisor),
            )
            cluster.attach()
            assert isinstance(store.path, PgTarget), "[cluster] is refused without PostgreSQL"
            await stack.enter_async_context(cluster.listening(store.path))
            await cluster.follow_once()  # the feed followed from here on
            await cluster.budgets_configured()
        await supervisor.load(cfg.streams)
        if cluster is not None:
            await cluster.run_once()  # the first lease round: this replica's share, adopted
        # The archive fetches clip URLs from callbacks on its own guarded pool, so slow or
        # hostile clip hosts never hold the connections MAVI's API needs.
        videos = VideoClient(
            session=session,
            base_url=batch_url,
            api_key=api_key,
            retry=cfg.mavi.retry,
            on_request=metrics.mavi_request,
        )
        evidence = Evidence(
            config=cfg.evidence,
            store=store,
            videos=videos if cfg.evidence.upload else None,
            clock=self._clock,
            trusted_prefixes=[emulator.clips_url + "/"] if emulator else [],
            failures=self.failures,
        )
        await stack.enter_async_context(evidence.running())
        alerts = None
        if cfg.alerts.rules:
            outbox = Outbox(
                store=store,
                sinks=build_sinks(
                    cfg.alerts.sinks, self.secrets.sinks, session=session, clock=self._clock
                ),
                retry_initial=cfg.alerts.retry_initial_seconds,
                retry_max=cfg.alerts.retry_max_seconds,
                poll_seconds=cfg.alerts.poll_seconds,
                metrics=metrics,
                clock=self._clock,
                failures=self.failures,
            )
            if cluster is not None:
                outbox.shared = True
                outbox.leads = lambda: cluster.leader
            await stack.enter_async_context(outbox.running())
            alerts = Alerts(
                router=Router(cfg.alerts.rules),
                outbox=outbox,
                store=store,
                specs=lambda: supervisor.desired,
                evidence=evidence,
                clock=self._clock,
            )
            # From here on, what the store records carries its alerts in the same commit. Set
            # after both are built: the alerts write through this store.
            store.set_alert_hook(alerts)
        server = Server(
            config=cfg,
            store=store,
            supervisor=supervisor,
            callback_secret=self.secrets.callback_secret,
            status_token=self.secrets.status_token,
            metrics=metrics,
            collector=StateCollector(self.registry, spending),
            evidence=evidence,
            clock=self._clock,
        )
        # Callbacks claimed when a task is recorded or adopted go where live ones go: the
        # server's pipeline, which is built on the supervisor, so it is set after both.
        supervisor.set_after_commit(server.after_commit)
        if cluster is not None:
            server.readiness.append(cluster.lease_problem)
        await stack.enter_async_context(server.running())
        if emulator is not None:
            # The account's webhook (MAVI's console setting), known once the server listens.
            emulator.webhook = server.callback_url()
        return Parts(store, emulator, supervisor, evidence, alerts, server, cluster)

    def _fleet_stop(self, supervisor: Supervisor) -> None:
        """`streamwatch fleet stop`: start nothing more, and stop as with `on_shutdown =
        "stop"` (the tasks this replica owns are stopped, their final callbacks awaited)."""
        supervisor.stop_planning()
        self.request_stop()

    def _loops(self, daemon: TaskGroup, parts: Parts) -> anyio.Event:
        """Start the daemon's loops; returns the planning loop's end."""
        sup = parts.supervisor
        planning = daemon.loop(
            "supervisor",
            sup.run_once,
            wait=sup.wait_for_work,
            running=lambda: not sup.stopping,
            on_failure="exit",
        )
        cluster = parts.cluster
        if cluster is not None:
            assert self.config.cluster is not None
            renew = self.config.cluster.renew_every
            daemon.loop(
                "cluster",
                cluster.run_once,
                # Until the replica leaves, not until the stop is asked: its leases stay valid
                # while it drains, so the stops of `on_shutdown = "stop"` or `fleet stop` are
                # not refused by the fence.
                wait=lambda: asyncio.sleep(renew),
                running=lambda: not cluster.left,
                on_failure="retry",
                backoff=Backoff(min(1.0, renew), renew),
            )
            tick = self.config.supervisor.tick_seconds
            daemon.loop(
                "cluster.feed",
                cluster.follow_once,
                wait=lambda: cluster.wait_for_feed(tick),
                # Until the replica leaves: while it drains, the final callbacks of the tasks
                # it stopped may be stored by another replica.
                running=lambda: not cluster.left,
                on_failure="retry",
                backoff=Backoff(tick, max(tick, renew)),
            )
        if self.systemd.enabled:
            daemon.loop(
                "systemd",
                self._tell_systemd,
                wait=lambda: self._pause(self._systemd_interval),
                running=self._running,
                on_failure="exit",
            )
        if parts.alerts is not None:
            outbox = parts.alerts.outbox
            daemon.loop(
                "alerts.outbox",
                outbox.run_once,
                wait=outbox.wait_for_work,
                running=lambda: not outbox.stopping,
                on_failure="retry",
            )
        retention = self.config.storage.segment_retention_days
        if retention is not None:
            interval = min(3600.0, retention * 86_400 / 10)

            async def prune() -> None:
                if parts.cluster is None or parts.cluster.leader:  # [cluster]: one replica
                    await self.prune_once()

            daemon.loop(
                "prune",
                prune,
                wait=lambda: self._pause(interval),
                running=self._running,
                on_failure="retry",
                backoff=Backoff(min(60.0, interval), interval),
            )
        return planning

    async def shutdown(self, parts: Parts, planning: anyio.Event) -> None:
        """Drain: stop planning (and, as configured, the tasks, waiting a little for their
        final callbacks), deliver what the outbox holds. The parts themselves stop as the
        exit stack unwinds."""
        self.systemd.notify(stopping=1, status="draining")
        await self._drain(parts, planning)
        if parts.alerts is not None:
            # What is in the outbox now is delivered by this or the next process.
            await parts.alerts.settle()
            await parts.alerts.outbox.stop()

    def _running(self) -> bool:
        return not self._stop.is_set()

    def _status_line(self) -> str:
        """A short summary for `systemctl status`."""
        if self.supervisor is None or self.store is None:
            return "starting"
        now = self._clock()
        running = self.supervisor.running_count()
        seen = [s.last_seen for s in self.supervisor.streams.values() if s.last_seen]
        last = f", last callback {now - max(seen):.0f}s ago" if seen else ""
        halted = ", account HALTED" if self.supervisor.halt is not None else ""
        return f"{running}/{len(self.supervisor.desired)} streams running{last}{halted}"

    @property
    def _systemd_interval(self) -> float:
        return self.systemd.watchdog_seconds or 10.0

    async def _tell_systemd(self) -> None:
        """WATCHDOG=1 from the event loop itself (so a wedged loop stops the pings), and a
        fresh STATUS now and then (every 10 s or so)."""
        if self.systemd.watchdog_seconds is not None:
            self.systemd.notify(watchdog=1)
        status_every = max(1, int(10.0 / self._systemd_interval))
        if self._systemd_beats % status_every == 0:
            self.systemd.notify(status=self._status_line())
        self._systemd_beats += 1

    async def _pause(self, seconds: float) -> None:
        """Sleep for `seconds`, or less if the daemon is asked to stop meanwhile."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._stop.wait()

    async def prune_once(self) -> Pruned:
        """One pass of `[storage] segment_retention_days` (its loop runs one at start, then
        hourly, more often for a retention shorter than ten hours): delete the segment records
        older than the retention. Returns what was deleted."""
        retention = self.config.storage.segment_retention_days
        assert self._parts is not None, "started"
        assert retention is not None, "[storage] segment_retention_days is set"
        before = self._clock() - retention * 86_400
        pruned = await self._parts.store.prune(before, stop=self._stop.is_set)
        if any(dataclasses.astuple(pruned)):
            log.info("store.pruned", before=before, **dataclasses.asdict(pruned))
        return pruned

    async def _drain(self, parts: Parts, planning: anyio.Event) -> None:
        supervisor = parts.supervisor
        # The built-in emulator ends with this process, and its tasks with it: stop them
        # properly rather than leave records of tasks that no longer exist anywhere.
        stop_tasks = self.config.supervisor.on_shutdown == "stop" or parts.emulator is not None
        if parts.cluster is not None and parts.cluster.fleet_stopping:
            stop_tasks = True  # `streamwatch fleet stop`: every replica stops what it owns
        elif parts.cluster is not None and stop_tasks:
            # [cluster]: the tasks stop only with the fleet's last replica; otherwise the
            # others adopt them.
            stop_tasks = await parts.cluster.last_replica()
        # `fleet stop`: no replica remains to stop what this one leaves running, so a stop
        # that failed (MAVI, the database) is tried again.
        fleet_stop = parts.cluster is not None and parts.cluster.fleet_stopping
        stopped = await supervisor.shutdown(stop_tasks=stop_tasks, attempts=3 if fleet_stop else 1)
        await planning.wait()
        if parts.cluster is not None and not stop_tasks:
            await parts.cluster.leave()  # the others adopt at their next round
        if not stop_tasks:
            log.info(
                "app.tasks_kept",
                running=supervisor.running_count(),
                note="MAVI keeps processing and billing them while the daemon is down",
            )
            return
        # Keep serving a little so the final callbacks of the stopped tasks are stored: the
        # supervisor says when the last of them is.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.config.supervisor.drain_seconds):
                await supervisor.wait_until(lambda: not supervisor.ending)
        log.info(
            "app.drained", stopped=len(stopped), final_callbacks_missing=len(supervisor.ending)
        )
        if parts.cluster is not None:
            await parts.cluster.leave()

    async def reload(self) -> bool:
        """Re-read the config file (SIGHUP). Streams are reconciled; other sections need a
        restart and are reported. A bad file changes nothing. True if applied."""
        if self.config_path is None or self.supervisor is None:
            return False
        self.systemd.reloading()
        try:
            new = load_config(self.config_path, environ=self._environ)
            problems = public_value_problems(new, self.secrets)
            if problems:
                raise ConfigError(str(self.config_path), problems)
        except ConfigError as exc:
            log.error("app.reload_failed", problems=[str(p) for p in exc.problems])
            self.systemd.notify(ready=1, status="reload failed: " + self._status_line())
            return False
        reloadable = ("streams", "budgets")
        untouched = [
            name
            for name in type(new).model_fields
            if name not in reloadable and getattr(new, name) != getattr(self.config, name)
        ]
        if untouched:
            log.warning("app.reload_needs_restart", sections=untouched)
        for stream in new.streams:
            self.redactor.add(*url_secrets(stream.url))
        self.config = self.config.model_copy(
            update={"streams": new.streams, "budgets": new.budgets}
        )
        if self.server is not None:
            self.server.set_config(self.config)
        self.supervisor.reload(new.streams, new.budgets)
        if self._parts is not None and self._parts.cluster is not None:
            await self._parts.cluster.budgets_configured()
        self.pricer.configure(shapes(new.streams))
        self.reloads += 1
        self.systemd.notify(ready=1, status=self._status_line())
        log.info("app.reloaded", streams=len(new.streams))
        return True

    def _build_emulator(self) -> Emulator:
        emu = self.config.emulator
        return Emulator(
            segment_seconds=self.config.mavi.segment_seconds,
            balance_ticks=usd_to_ticks(emu.balance_usd),
            capacity=emu.capacity,
            unsafe_every=emu.unsafe_every,
            scripts={s.url: Script.from_config(s) for s in emu.scripts},
            redelivery_initial_seconds=self.config.mavi.segment_seconds,
            failures=self.failures,
        )


def shapes(streams: Iterable[StreamConfig]) -> list[Shape]:
    """What the callbacks of each stream's task show (to price orphans like them)."""
    return [Shape(s.content_moderation, s.logo_detection, s.fps) for s in streams]
