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
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import signal
import time
from collections.abc import Callable, Iterable, Mapping
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
from streamwatch.store import Store
from streamwatch.supervisor import Supervisor
from streamwatch.systemd import Notifier

__all__ = ["App"]

log = structlog.get_logger("streamwatch.app")


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
        self.store: Store | None = None
        self.supervisor: Supervisor | None = None
        self.server: Server | None = None
        self.emulator: Emulator | None = None
        self.alerts: Alerts | None = None
        self.evidence: Evidence | None = None
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
        cfg = self.config
        metrics = self.metrics
        async with contextlib.AsyncExitStack() as stack:
            store = Store(
                cfg.storage.path,
                batch_max=cfg.storage.batch_max,
                clock=self._clock,
                precharge_covers_first_segment=cfg.ledger.precharge == "first_segment",
                on_commit=metrics.commit,
                orphan_pricer=self.pricer,
            )
            self.store = await stack.enter_async_context(store)
            session = await stack.enter_async_context(aiohttp.ClientSession())
            base_url, api_key = cfg.mavi.base_url, self.secrets.api_key
            if cfg.mavi.backend == "emulator":
                self.emulator = self._build_emulator()
                await stack.enter_async_context(
                    self.emulator.running(host=cfg.emulator.host, port=cfg.emulator.port)
                )
                base_url = self.emulator.base_url
                api_key = SecretStr(self.emulator.api_key or "emulator")
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
            self.supervisor = Supervisor(
                client=client,
                store=self.store,
                policy=self._policy(cfg),
                tick_seconds=cfg.supervisor.tick_seconds,
                spending=spending,
                clock=self._clock,
                redact=self.redactor,
                failures=self.failures,
            )
            await stack.enter_async_context(self.supervisor.running())
            await self.supervisor.load(cfg.streams)
            # The archive fetches clip URLs from callbacks on its own guarded pool, so slow
            # or hostile clip hosts never hold the connections MAVI's API needs.
            self.evidence = Evidence(
                config=cfg.evidence,
                store=self.store,
                videos=VideoClient(
                    session=session,
                    base_url=self.emulator.batch_url if self.emulator else cfg.mavi.batch_base_url,
                    api_key=api_key,
                    retry=cfg.mavi.retry,
                    on_request=metrics.mavi_request,
                )
                if cfg.evidence.upload
                else None,
                clock=self._clock,
                trusted_prefixes=[self.emulator.clips_url + "/"] if self.emulator else [],
                failures=self.failures,
            )
            await stack.enter_async_context(self.evidence.running())
            if cfg.alerts.rules:
                outbox = Outbox(
                    store=self.store,
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
                await stack.enter_async_context(outbox.running())
                supervisor = self.supervisor
                self.alerts = Alerts(
                    router=Router(cfg.alerts.rules),
                    outbox=outbox,
                    store=self.store,
                    specs=lambda: supervisor.desired,
                    evidence=self.evidence,
                    clock=self._clock,
                )
                # From here on, what the store records carries its alerts in the same commit.
                self.store.set_alert_hook(self.alerts)
            self.server = Server(
                config=cfg,
                store=self.store,
                supervisor=self.supervisor,
                callback_secret=self.secrets.callback_secret,
                status_token=self.secrets.status_token,
                metrics=metrics,
                collector=StateCollector(self.registry, spending),
                evidence=self.evidence,
                clock=self._clock,
            )
            # Callbacks claimed when a task is recorded or adopted go where live ones go.
            self.supervisor.set_after_commit(self.server.after_commit)
            await stack.enter_async_context(self.server.running())
            if self.emulator is not None:
                self.emulator.webhook = self.server.callback_url()
            log.info(
                "app.started",
                backend=cfg.mavi.backend,
                streams=len(cfg.streams),
                adopted=self.supervisor.running_count(),
                status_url=f"{self.server.base_url}/api/v1/status",
            )
            self.started.set()
            self.systemd.notify(ready=1, status=self._status_line())
            async with TaskGroup("daemon", self.failures) as daemon:
                self._daemon = daemon
                sup = self.supervisor
                planning = daemon.loop(
                    "supervisor",
                    sup.run_once,
                    wait=sup.wait_for_work,
                    running=lambda: not sup.stopping,
                    on_failure="exit",
                )
                if self.systemd.enabled:
                    daemon.loop(
                        "systemd",
                        self._tell_systemd,
                        wait=lambda: self._pause(self._systemd_interval),
                        running=self._running,
                        on_failure="exit",
                    )
                if self.alerts is not None:
                    outbox = self.alerts.outbox
                    daemon.loop(
                        "alerts.outbox",
                        outbox.run_once,
                        wait=outbox.wait_for_work,
                        running=lambda: not outbox.stopping,
                        on_failure="retry",
                    )
                if cfg.storage.segment_retention_days is not None:
                    keep = cfg.storage.segment_retention_days * 86_400
                    interval = min(3600.0, keep / 10)
                    daemon.loop(
                        "prune",
                        lambda: self._prune(keep),
                        wait=lambda: self._pause(interval),
                        running=self._running,
                        on_failure="retry",
                        backoff=Backoff(min(60.0, interval), interval),
                    )
                await self._stop.wait()
                self.systemd.notify(stopping=1, status="draining")
                await self._drain(planning)
                if self.alerts is not None:
                    # What is in the outbox now is delivered by this or the next process.
                    await self.alerts.settle()
                    await self.alerts.outbox.stop()
                # What is left (waits, backoffs, a reload under way) ends here.
                daemon.cancel()
            self._daemon = None
        log.info("app.stopped")
        if self.failure is not None:
            raise BackgroundFailed(self.failure)

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

    async def _prune(self, keep_seconds: float) -> None:
        """One pass of `[storage] segment_retention_days`: at start, then hourly (more often
        for a retention shorter than ten hours), until the daemon stops."""
        assert self.store is not None
        before = self._clock() - keep_seconds
        pruned = await self.store.prune(before, stop=self._stop.is_set)
        if any(dataclasses.astuple(pruned)):
            log.info("store.pruned", before=before, **dataclasses.asdict(pruned))

    async def _drain(self, planning: anyio.Event) -> None:
        assert self.supervisor is not None
        assert self.store is not None
        # The built-in emulator ends with this process, and its tasks with it: stop them
        # properly rather than leave records of tasks that no longer exist anywhere.
        stop_tasks = self.config.supervisor.on_shutdown == "stop" or self.emulator is not None
        stopped = await self.supervisor.shutdown(stop_tasks=stop_tasks)
        await planning.wait()
        if not stop_tasks:
            log.info(
                "app.tasks_kept",
                running=self.supervisor.running_count(),
                note="MAVI keeps processing and billing them while the daemon is down",
            )
            return
        # Keep serving a little so the final callbacks of the stopped tasks are stored.
        deadline = self._clock() + self.config.supervisor.drain_seconds
        pending = set(stopped)
        while pending and self._clock() < deadline:
            for task_id in list(pending):
                row = await self.store.task(task_id)
                if row is None or row.end_status is not None:
                    pending.discard(task_id)
            if pending:
                await asyncio.sleep(min(0.05, self.config.supervisor.drain_seconds / 10 or 0.01))
        log.info("app.drained", stopped=len(stopped), final_callbacks_missing=len(pending))

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

    @staticmethod
    def _policy(cfg: Config) -> Policy:
        return Policy.from_config(
            cfg.supervisor,
            segment_seconds=cfg.mavi.segment_seconds,
            max_running=cfg.mavi.max_running,
        )


def shapes(streams: Iterable[StreamConfig]) -> list[Shape]:
    """What the callbacks of each stream's task show (to price orphans like them)."""
    return [Shape(s.content_moderation, s.logo_detection, s.fps) for s in streams]
