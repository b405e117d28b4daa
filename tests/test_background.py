"""Background work with one owner: a failure is logged with its task's name and traceback,
counted, and then retried with backoff or turned into a clean daemon stop; never silent,
never a tight loop."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from structlog.testing import capture_logs

from streamwatch.alerts.outbox import Alerts, Outbox
from streamwatch.alerts.rules import Router
from streamwatch.alerts.sinks import Alert, Delivery
from streamwatch.background import BackgroundFailed, Backoff, Failures, TaskGroup, repeat
from streamwatch.metrics import Metrics
from streamwatch.store import Location, Store
from streamwatch.supervisor import Supervisor
from tests.conftest import Daemon, stream_toml
from tests.test_alerts import event, rule

SECRET_WORD = "hunter2-in-an-exception"


class Counted:
    """`Failures.count` and `fatal` that remember what they were told."""

    def __init__(self) -> None:
        self.counted: list[str] = []
        self.fatal: list[str] = []

    def failures(self) -> Failures:
        return Failures(count=self.counted.append, fatal=self.fatal.append)


def failed_lines(logs: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    return [line for line in logs if line["event"] == "background.failed"]


async def test_a_loop_that_raises_is_logged_counted_and_backs_off():
    """A loop whose every pass raises makes one pass per backoff, each logged with the
    loop's name and traceback and counted; the backoff doubles up to its maximum and resets
    once a pass succeeds."""
    told = Counted()
    passes = 0
    slept: list[float] = []

    async def once() -> None:
        nonlocal passes
        passes += 1
        if passes != 5:  # the fifth pass succeeds
            raise RuntimeError(f"pass {passes} failed")

    async def sleep(seconds: float) -> None:
        slept.append(seconds)

    async def wait() -> None:
        slept.append(0.0)  # a successful pass waits for work as usual

    with capture_logs() as logs:
        await repeat(
            "alerts.outbox",
            once,
            wait=wait,
            running=lambda: passes < 8,
            on_failure="retry",
            failures=told.failures(),
            backoff=Backoff(initial=1, max=4),
            sleep=sleep,
        )
    assert passes == 8, "one pass per iteration, never more"
    assert slept == [1, 2, 4, 4, 0.0, 1, 2, 4]
    assert told.counted == ["alerts.outbox"] * 7
    assert told.fatal == []
    lines = failed_lines(logs)
    assert len(lines) == 7
    assert all(line["task"] == "alerts.outbox" for line in lines)
    exc = lines[0]["exc_info"]
    assert isinstance(exc, RuntimeError)
    assert exc.__traceback__ is not None, "logged with its traceback"


async def test_a_loop_that_must_not_go_on_ends_and_asks_for_the_daemon_to_stop():
    """With on_failure = "exit", the first failed pass is reported, the daemon is told to
    stop, and the loop makes no second pass."""
    told = Counted()
    passes = 0

    async def once() -> None:
        nonlocal passes
        passes += 1
        raise ValueError("a planning bug")

    async def wait() -> None:
        raise AssertionError("a failed pass does not wait for work")

    with capture_logs() as logs:
        await repeat(
            "supervisor",
            once,
            wait=wait,
            running=lambda: True,
            on_failure="exit",
            failures=told.failures(),
        )
    assert passes == 1
    assert (told.counted, told.fatal) == (["supervisor"], ["supervisor"])
    assert [line["task"] for line in failed_lines(logs)] == ["supervisor"]


async def test_spawned_work_that_fails_is_reported_and_the_rest_goes_on():
    """A task that raises in a group is logged with its name and counted; its siblings and
    the group go on, and settle() waits for all of them."""
    told = Counted()
    done: list[str] = []

    async def fails() -> None:
        await asyncio.sleep(0)
        raise OSError("disk full")

    async def works(name: str) -> None:
        await asyncio.sleep(0)
        done.append(name)

    with capture_logs() as logs:
        async with TaskGroup("evidence", told.failures()) as group:
            group.spawn("evidence.capture", works("a"))
            group.spawn("evidence.capture", fails())
            group.spawn("evidence.capture", works("b"))
            await group.settle()
            assert group.pending == 0
            assert sorted(done) == ["a", "b"]
    assert told.counted == ["evidence.capture"]
    (line,) = failed_lines(logs)
    assert isinstance(line["exc_info"], OSError)
    with pytest.raises(RuntimeError, match="not running"):
        group.spawn("evidence.capture", works("late"))


class Raises:
    """A sink whose deliver() raises instead of answering."""

    name = "broken"
    max_in_flight = 1
    max_attempts = 3

    def __init__(self) -> None:
        self.calls = 0

    async def deliver(self, alerts: list[Alert]) -> Delivery:
        self.calls += 1
        raise RuntimeError(f"formatting bug near {SECRET_WORD}")


async def test_a_sink_that_raises_makes_failed_attempts_with_backoff_then_a_dead_letter(
    location: Location,
):
    """Each raise is one failed attempt: attempts grow, the next one waits for the backoff
    (nothing is retried while it runs, however often the worker looks), and after
    max_attempts the alert is a dead letter. Each raise is logged and counted."""
    now = [1_000.0]
    metrics = Metrics(CollectorRegistry())
    sink = Raises()
    async with Store(location, clock=lambda: now[0]) as store:
        outbox = Outbox(
            store=store,
            sinks={"broken": sink},
            retry_initial=10,
            retry_max=100,
            poll_seconds=1,
            metrics=metrics,
            clock=lambda: now[0],
            failures=Failures(count=lambda t: metrics.background_failures.labels(t).inc()),
        )
        alerts = Alerts(
            router=Router([rule(sinks=["broken"])]),
            outbox=outbox,
            store=store,
            clock=lambda: now[0],
        )
        seen = []
        with capture_logs() as logs:
            async with outbox.running():
                alerts.emit(event())
                await alerts.settle()
                for _ in range(6):
                    for _ in range(20):  # the worker looks again and again: nothing is due
                        await outbox.run_once()
                        await outbox.settle()
                    (row,) = await store.recent_alerts()
                    seen.append((row.attempts, row.state))
                    if row.state == "pending":
                        delay = row.next_at - now[0]
                        assert (
                            10 * 2 ** (row.attempts - 1) / 2
                            <= delay
                            <= 10 * 2 ** (row.attempts - 1)
                        )
                        now[0] = row.next_at
    assert seen == [(1, "pending"), (2, "pending"), (3, "dead")] + [(3, "dead")] * 3
    assert sink.calls == 3, "one call per attempt"
    assert row.last_error == "the sink raised RuntimeError (see the log)"
    value = metrics.registry.get_sample_value
    assert value("streamwatch_background_failures_total", {"task": "alerts.delivery"}) == 3
    assert value("streamwatch_alert_deliveries_total", {"sink": "broken", "outcome": "retry"}) == 2
    assert value("streamwatch_alert_deliveries_total", {"sink": "broken", "outcome": "dead"}) == 1
    lines = failed_lines(logs)
    assert [(line["task"], line["sink"]) for line in lines] == [("alerts.delivery", "broken")] * 3


async def test_the_delivery_loop_does_not_spin_on_a_sink_that_raises(location: Location):
    """Over a fixed number of passes of the delivery loop, with no wait between them, a sink
    that raises is called once: the failed attempt is not due again before its backoff."""
    sink = Raises()
    async with Store(location) as store:
        outbox = Outbox(
            store=store, sinks={"broken": sink}, retry_initial=60, retry_max=60, poll_seconds=1
        )
        alerts = Alerts(router=Router([rule(sinks=["broken"])]), outbox=outbox, store=store)
        passes = 0

        async def no_wait() -> None:
            nonlocal passes
            passes += 1
            await asyncio.sleep(0)

        with capture_logs():
            async with outbox.running():
                alerts.emit(event())
                await alerts.settle()
                await repeat(
                    "alerts.outbox",
                    outbox.run_once,
                    wait=no_wait,
                    running=lambda: passes < 50,
                    on_failure="retry",
                    failures=Failures(),
                )
                await outbox.settle()
    assert passes == 50
    assert sink.calls == 1


async def test_an_alert_that_cannot_be_written_is_logged_and_counted(location: Location):
    """An emitted alert whose write fails is not dropped silently: its task logs it with the
    traceback and counts it."""
    told = Counted()
    async with Store(location) as store:
        outbox = Outbox(
            store=store,
            sinks={},
            retry_initial=1,
            retry_max=1,
            poll_seconds=1,
            failures=told.failures(),
        )
        alerts = Alerts(router=Router([rule(sinks=["s"])]), outbox=outbox, store=store)
        with capture_logs() as logs:
            async with outbox.running():
                await store.close()  # the store is gone: the write fails
                alerts.emit(event())
                await alerts.settle()
    assert told.counted == ["alerts.emit"]
    assert [line["task"] for line in failed_lines(logs)] == ["alerts.emit"]


async def test_a_planning_loop_that_raises_stops_the_daemon_cleanly(
    daemon: Daemon, monkeypatch: pytest.MonkeyPatch
):
    """A supervisor pass that raises is logged and counted, then the daemon drains and stops
    as on SIGTERM and `serve()` raises BackgroundFailed (so `run` exits 1) instead of going
    on without planning or planning in a tight loop."""
    app = await daemon.start(stream_toml("cam"))
    await daemon.wait(lambda: daemon.state("cam").task_id is not None)
    steps = 0

    def broken_step(self: Supervisor) -> list[object]:
        nonlocal steps
        steps += 1
        raise RuntimeError("a planning bug")

    monkeypatch.setattr(Supervisor, "step", broken_step)
    daemon.sup._wake.set()
    assert daemon._task is not None
    with capture_logs() as logs, pytest.raises(BackgroundFailed, match="'supervisor'"):
        async with asyncio.timeout(10):
            await daemon._task
    daemon.app = None
    assert steps == 1
    assert app.failure == "supervisor"
    value = app.registry.get_sample_value
    assert value("streamwatch_background_failures_total", {"task": "supervisor"}) == 1
    events = [line["event"] for line in logs]
    assert events.index("background.failed") < events.index("app.stopped")
    assert "app.tasks_kept" in events, "it drained as on a graceful stop"


async def test_a_reload_that_raises_is_reported_and_the_daemon_goes_on(
    daemon: Daemon, monkeypatch: pytest.MonkeyPatch
):
    """A SIGHUP reload runs in the daemon's task group: one that raises unexpectedly is
    logged and counted, and the daemon keeps its config and runs on."""
    app = await daemon.start(stream_toml("cam"))

    def broken(*args: object, **kwargs: object) -> object:
        raise RuntimeError("reading the file failed oddly")

    monkeypatch.setattr("streamwatch.app.load_config", broken)
    with capture_logs() as logs:
        app.request_reload()
        assert app._daemon is not None
        await app._daemon.settle()
    assert [line["task"] for line in failed_lines(logs)] == ["reload"]
    value = app.registry.get_sample_value
    assert value("streamwatch_background_failures_total", {"task": "reload"}) == 1
    assert app.failure is None
    await daemon.wait(lambda: daemon.state("cam").task_id is not None)
