"""The start protocol, crash-safe by construction: the intent is written, then MAVI is asked,
then its answer is recorded. `Starts.start()` does that I/O and says how it ended; it changes
no stream state: the supervisor applies the outcome with the pure decisions of `policy`.

Every way a start can end is one of three outcomes:
- `Started`: MAVI answered with a task id and the task is recorded (with its pre-charge and
  the early callbacks it claimed);
- `Adopted`: the previous start's task showed up while this one wrote its intent;
- `StartFailed`: a refusal, or a failure before MAVI was asked, closes the intent
  (`unanswered` is None); anything else (a timeout, a malformed answer, a failed write of
  the answer, any unexpected error) leaves it open for its task to be adopted
  (`unanswered` is the intent's attempt id).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from streamwatch.config import StreamConfig
from streamwatch.intent import Intent, is_definitive, url_hash
from streamwatch.mavi.errors import MaviError
from streamwatch.mavi.streams import StartRequest
from streamwatch.store import Adopted, Registered, StateStore

__all__ = ["StartFailed", "StartOutcome", "Started", "Starts", "StreamStarter"]


class StreamStarter(Protocol):
    """What the supervisor needs from a MAVI stream client."""

    async def start(self, request: StartRequest) -> str: ...

    async def stop(self, task_id: str) -> bool: ...


@dataclass(frozen=True, slots=True)
class Started:
    """MAVI started `task_id` at `at`, and the store recorded it."""

    task_id: str
    spec_hash: str
    at: float
    registered: Registered


@dataclass(frozen=True, slots=True)
class StartFailed:
    """The start did not end with a recorded task. `detail` is the error as it may be shown;
    `unanswered` the attempt id of the intent left open, if MAVI may have started the task."""

    error: Exception
    detail: str
    unanswered: str | None


StartOutcome = Started | Adopted | StartFailed


class Starts:
    """Runs the start protocol against the store and MAVI."""

    def __init__(
        self,
        *,
        client: StreamStarter,
        store: StateStore,
        clock: Callable[[], float],
        text: Callable[[str], str],
    ) -> None:
        """`text` makes an error's text fit to be shown (secrets masked, length capped)."""
        self._client = client
        self._store = store
        self._clock = clock
        self._text = text

    async def start(self, name: str, spec: StreamConfig) -> StartOutcome:
        """Start a task for stream `name` as `spec` says."""
        intent = Intent(
            attempt_id=uuid.uuid4().hex,
            stream=name,
            url_hash=url_hash(spec.url),
            spec_hash=spec.spec_hash(),
            fps=spec.fps,
            content_moderation=spec.content_moderation,
            logo_detection=spec.logo_detection,
            max_logos=spec.max_logos,
            created_at=self._clock(),
        )
        try:
            # Written before the call: a crash from here on leaves a trace to adopt from.
            adopted = await self._store.begin_start(intent)
        except Exception as exc:  # noqa: BLE001 - not written, so MAVI is not asked: back off
            return StartFailed(exc, self._detail(exc), unanswered=None)
        if adopted is not None:  # the previous start's task showed up after all
            return adopted
        request = StartRequest(
            url=spec.url,
            content_moderation=spec.content_moderation,
            logo_detection=spec.logo_detection,
            fps=spec.fps,
            max_logos=spec.max_logos,
        )
        try:
            task_id = await self._client.start(request)
        except Exception as exc:  # noqa: BLE001 - any failure ends the start in a known state
            return await self._failed(exc, intent)
        now = self._clock()
        try:
            registered = await self._store.record_task_started(
                task_id=task_id,
                stream=name,
                spec_hash=spec.spec_hash(),
                fps=spec.fps,
                content_moderation=spec.content_moderation,
                logo_detection=spec.logo_detection,
                max_logos=spec.max_logos,
                started_at=now,
                attempt_id=intent.attempt_id,
            )
        except Exception as exc:  # noqa: BLE001 - MAVI started it: the open intent adopts it
            return await self._failed(exc, intent)
        return Started(task_id, spec.spec_hash(), now, registered)

    async def _failed(self, error: Exception, intent: Intent) -> StartFailed:
        """A refusal closes the intent; anything else (or a refusal whose intent could not be
        closed: adopting is then the safe reading) leaves it open."""
        detail = self._detail(error)
        if is_definitive(error):
            try:
                await self._store.close_intent(intent.attempt_id, state="failed", detail=detail)
            except Exception:  # noqa: BLE001 - still open: then adopting is the safe reading
                return StartFailed(error, detail, unanswered=intent.attempt_id)
            return StartFailed(error, detail, unanswered=None)
        return StartFailed(error, detail, unanswered=intent.attempt_id)

    def _detail(self, error: Exception) -> str:
        text = str(error) if isinstance(error, MaviError) else f"{type(error).__name__}: {error}"
        return self._text(text)
