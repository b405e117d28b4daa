"""Background work with one owner.

Whatever the daemon runs besides answering requests — its loops (planning, alert delivery,
retention, systemd pings) and the work they spawn (a supervisor action, an alert delivery, a
clip download, a reload) — runs in a `TaskGroup`: an anyio task group with a name, whose every
task has a name too. Nothing is fire-and-forget: leaving the group waits for what it owns (or
cancels it, when the group is cancelled), and a task that fails is never silent. It is logged
as `background.failed` with the task's name and its traceback (rendered without local
variables and with secrets masked, as every log line), and counted (`Failures.count`:
`streamwatch_background_failures_total{task}` in the daemon). Then the owner's policy applies:

- work spawned once (`spawn`): its owner's state decides what happens next (an alert that
  could not be delivered is a failed attempt with its backoff; a stream whose action failed
  is planned again);
- a loop (`loop`): `"retry"`, after a backoff that doubles from `Backoff.initial` to
  `Backoff.max` and resets when a pass succeeds, or `"exit"`: `Failures.fatal` is told, and
  the daemon stops cleanly and exits non-zero so that its service manager restarts it.
  Never a tight loop.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import anyio
import anyio.abc
import structlog

__all__ = [
    "BackgroundFailed",
    "Backoff",
    "Failures",
    "OnFailure",
    "TaskGroup",
    "hosted",
    "repeat",
]

log = structlog.get_logger("streamwatch.background")
T = TypeVar("T")

OnFailure = Literal["retry", "exit"]


class BackgroundFailed(Exception):
    """A loop the daemon cannot run without failed: the daemon stopped so that its service
    manager starts it again."""

    def __init__(self, task: str) -> None:
        super().__init__(
            f"the background task {task!r} failed (see background.failed); stopped so that"
            " the service manager restarts streamwatch"
        )
        self.task = task


class Failures:
    """Where failed background tasks are reported: the log, `count(task)`, and for a loop
    that must not go on, `fatal(task)` (the daemon's stop)."""

    def __init__(
        self,
        *,
        count: Callable[[str], None] | None = None,
        fatal: Callable[[str], None] | None = None,
    ) -> None:
        self._count = count
        self._fatal = fatal

    def failed(self, task: str, exc: BaseException, **context: Any) -> None:
        """Log `exc` with its traceback under the task's name, and count it."""
        log.error("background.failed", task=task, exc_info=exc, **context)
        if self._count is not None:
            self._count(task)

    def fatal(self, task: str) -> None:
        if self._fatal is not None:
            self._fatal(task)


@dataclass(frozen=True, slots=True)
class Backoff:
    """Seconds to wait after the n-th failure in a row: doubling from `initial` to `max`."""

    initial: float = 1.0
    max: float = 60.0

    def delay(self, failures: int) -> float:
        return float(min(self.max, self.initial * 2.0 ** max(0, failures - 1)))


async def repeat(
    name: str,
    once: Callable[[], Awaitable[None]],
    *,
    wait: Callable[[], Awaitable[None]],
    running: Callable[[], bool],
    on_failure: OnFailure,
    failures: Failures,
    backoff: Backoff = Backoff(),
    sleep: Callable[[float], Awaitable[None]] = anyio.sleep,
) -> None:
    """Run `once()` then `wait()` while `running()`. A pass that raises is reported; then
    the loop sleeps `backoff` and tries again (`"retry"`), or ends after telling
    `failures.fatal` (`"exit"`)."""
    failed = 0
    while running():
        try:
            await once()
        except Exception as exc:  # noqa: BLE001 - a loop's edge: reported, then its policy
            failed += 1
            failures.failed(name, exc, failures_in_a_row=failed)
            if on_failure == "exit":
                failures.fatal(name)
                return
            await sleep(backoff.delay(failed))
            continue
        failed = 0
        await wait()


class TaskGroup:
    """An anyio task group with a name, for one owner's background work. Use
    `async with TaskGroup(name, failures):`; `spawn()` and `loop()` add named tasks to it."""

    def __init__(self, name: str, failures: Failures | None = None) -> None:
        self.name = name
        self.failures = failures or Failures()
        self._group: anyio.abc.TaskGroup | None = None
        self._pending = 0
        self._idle: anyio.Event | None = None
        # Work whose task was cancelled before it ran a step never starts: closed at exit.
        self._unstarted: set[Coroutine[Any, Any, Any]] = set()

    async def __aenter__(self) -> TaskGroup:
        group = anyio.create_task_group()
        await group.__aenter__()
        self._group = group
        return self

    async def __aexit__(self, *exc: Any) -> bool | None:
        group, self._group = self._group, None
        assert group is not None
        try:
            return await group.__aexit__(*exc)
        finally:
            for work in self._unstarted:
                work.close()
                self._pending -= 1
            self._unstarted.clear()
            if self._idle is not None:
                self._idle.set()

    @property
    def running(self) -> bool:
        return self._group is not None

    @property
    def pending(self) -> int:
        """Tasks spawned and not finished."""
        return self._pending

    def spawn(self, name: str, work: Coroutine[Any, Any, Any]) -> None:
        """Run `work` in the group as task `name`; a failure is reported under that name."""
        if self._group is None:
            work.close()
            raise RuntimeError(f"{self.name}: background work refused, the group is not running")
        self._pending += 1
        if self._idle is None or self._idle.is_set():
            self._idle = anyio.Event()
        self._unstarted.add(work)
        self._group.start_soon(self._guard, name, work, name=f"{self.name}:{name}")

    async def _guard(self, name: str, work: Coroutine[Any, Any, Any]) -> None:
        self._unstarted.discard(work)
        try:
            await work
        except Exception as exc:  # noqa: BLE001 - a background task's edge: reported, not lost
            self.failures.failed(name, exc)
        finally:
            self._pending -= 1
            if self._pending == 0 and self._idle is not None:
                self._idle.set()

    def loop(
        self,
        name: str,
        once: Callable[[], Awaitable[None]],
        *,
        wait: Callable[[], Awaitable[None]],
        running: Callable[[], bool],
        on_failure: OnFailure,
        backoff: Backoff = Backoff(),
    ) -> anyio.Event:
        """Run `repeat()` as task `name`; the event returned is set when the loop ends."""
        if self._group is None:
            raise RuntimeError(f"{self.name}: loop {name!r} refused, the group is not running")
        ended = anyio.Event()

        async def run() -> None:
            try:
                await repeat(
                    name,
                    once,
                    wait=wait,
                    running=running,
                    on_failure=on_failure,
                    failures=self.failures,
                    backoff=backoff,
                )
            finally:
                ended.set()

        self._group.start_soon(run, name=f"{self.name}:{name}")
        return ended

    async def settle(self) -> None:
        """Wait until every task spawned so far (and whatever they spawn) has finished."""
        while self._pending:
            assert self._idle is not None
            await self._idle.wait()

    def cancel(self) -> None:
        """Cancel everything the group runs (its exit then waits for them to unwind)."""
        if self._group is not None:
            self._group.cancel_scope.cancel()


@contextlib.asynccontextmanager
async def hosted(context: contextlib.AbstractAsyncContextManager[T]) -> AsyncIterator[T]:
    """Enter and leave `context` (one holding an anyio task group) in a task of its own, for
    an owner whose block may be entered and left in different tasks, which an anyio group
    forbids: a test fixture's set-up and teardown are two tasks. Leaving the block leaves
    `context` and waits for it, even when the owner is cancelled."""
    entered: asyncio.Future[T] = asyncio.get_running_loop().create_future()
    leave = asyncio.Event()

    async def host() -> None:
        async with context as value:
            entered.set_result(value)
            await leave.wait()

    task = asyncio.create_task(host())
    try:
        waiting: set[asyncio.Future[Any]] = {task, entered}
        await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
        if not entered.done():
            await task  # it could not be entered: say why
        yield entered.result()
    finally:
        leave.set()
        if not task.done():
            # Shielded: a cancelled owner still leaves nothing running behind it.
            await asyncio.shield(task)
