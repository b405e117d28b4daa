"""A MAVI-compatible stand-in for the v2 live-stream API, for demos and tests.

It serves ``POST {prefix}/stream/start`` and ``/stream/stop`` exactly as MAVI-CONTRACT.md
describes, charges with the pricing formula from a starting balance, and posts one callback
per segment to the account's webhook, redelivering those that get no 2xx. What each stream
URL does is scripted (`Script`); unscripted URLs produce a steady, deterministic mix.

Its own state is open to tests: in-process through the attributes, over HTTP through
``GET /_emulator/state``. Nothing under ``/_emulator`` is part of MAVI's API, and the daemon
never calls it. Why one module of this length: the HTTP handlers, the task loops and the
callback delivery all work on one emulated account's state.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import random
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict, dataclass
from typing import Any

import aiohttp
import structlog
from aiohttp import web

from streamwatch.background import Failures
from streamwatch.emulator.script import EmulatorScript, Script
from streamwatch.emulator.videos import BATCH_PREFIX, VideoLibrary
from streamwatch.http import bind, close_runner, local_url
from streamwatch.pricing import segment_cost_ticks
from streamwatch.probe import ProbeError, probe
from streamwatch.redact import redact_url

__all__ = ["API_PREFIX", "Charge", "Delivery", "EmuTask", "Emulator", "StartRecord"]

log = structlog.get_logger("streamwatch.emulator")

API_PREFIX = "/serve/api/v2"
END_MESSAGES = {
    14: "Stream stopped by user",
    15: "No video data in stream",
    16: "Server capacity reached, please retry later",
    402: "Insufficient balance",
}


@dataclass
class EmuTask:
    """One task the emulator runs."""

    task_id: str
    url: str
    fps: int
    content_moderation: bool
    logo_detection: bool
    max_logos: int
    started_at: float
    state: str = "running"  # running | ended
    end_status: int | None = None
    segments_sent: int = 0
    charged_ticks: int = 0

    @property
    def segment_ticks(self) -> int:
        return segment_cost_ticks(
            fps=self.fps,
            content_moderation=self.content_moderation,
            logo_detection=self.logo_detection,
        )


@dataclass(frozen=True)
class Charge:
    task_id: str
    kind: str  # "precharge" | "segment"
    ticks: int
    at: float


@dataclass(frozen=True)
class StartRecord:
    url: str
    http_status: int
    task_id: str | None


@dataclass
class Delivery:
    task_id: str
    segment_index: int | None
    status: int
    attempts: int = 0
    delivered: bool = False
    last_http: int | None = None


class Emulator:
    """The MAVI stand-in. Serve it with `async with emulator.running():`."""

    def __init__(
        self,
        *,
        segment_seconds: float = 5.0,
        balance_ticks: int = 288_000,
        api_key: str | None = None,
        capacity: int | None = None,
        unsafe_every: int = 7,
        scripts: dict[str, Script] | None = None,
        webhook: str | None = None,
        redelivery_attempts: int = 8,
        redelivery_initial_seconds: float = 1.0,
        string_codes: bool = False,
        seed: int = 0,
        source_check_seconds: float | None = None,
        source_timeout_seconds: float = 10.0,
        failures: Failures | None = None,
        answer_delay_seconds: float = 0.0,
    ) -> None:
        self.segment_seconds = segment_seconds
        self.balance_ticks = balance_ticks
        self.api_key = api_key
        self.capacity = capacity
        self.unsafe_every = unsafe_every
        self.scripts: dict[str, Script] = dict(scripts or {})
        self.webhook = webhook
        self.redelivery_attempts = redelivery_attempts
        self.redelivery_initial = redelivery_initial_seconds
        self.string_codes = string_codes
        # Scripts with follow_source: probe the source this often (default: once a segment),
        # each probe within this long.
        self.source_check_seconds = source_check_seconds or segment_seconds
        self.source_timeout_seconds = source_timeout_seconds
        # Hold each start's answer this long after the task is created and pre-charged: the
        # window in which a client that dies has started a task it never heard of.
        self.answer_delay_seconds = answer_delay_seconds
        self.paused = False  # no task processes (or charges) a segment while set
        self.tasks: dict[str, EmuTask] = {}
        self.charges: list[Charge] = []
        self.starts: list[StartRecord] = []
        self.stop_calls: list[tuple[str, int]] = []
        self.deliveries: list[Delivery] = []
        self.posting = 0  # callback POSTs on the wire now (a test waits for 0 to compare)
        self._rng = random.Random(seed)
        self._loops: dict[str, asyncio.Task[None]] = {}
        self._senders: set[asyncio.Task[None]] = set()
        self._followers: set[asyncio.Task[None]] = set()
        self._session: aiohttp.ClientSession | None = None
        self._start_failures_used: dict[str, int] = {}
        self._changed = asyncio.Event()
        self._closing = asyncio.Event()
        self.port: int | None = None
        self.host = "127.0.0.1"
        self.library = VideoLibrary(api_key=api_key, failures=failures)
        self.app = self._make_app()

    # -- serving -------------------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        """What to put in `[mavi] base_url`."""
        return f"{local_url(self.host, self.port or 0)}{API_PREFIX}"

    @property
    def batch_url(self) -> str:
        """The base URL of the emulated v1 batch video API: `[mavi] batch_base_url`."""
        return f"{local_url(self.host, self.port or 0)}{BATCH_PREFIX}"

    @contextlib.asynccontextmanager
    async def running(self, *, host: str = "127.0.0.1", port: int = 0) -> AsyncIterator[Emulator]:
        """Serve on host:port (0 = any free port) until the block ends."""
        self.host = host
        runner = web.AppRunner(self.app, access_log=None)
        await runner.setup()
        self.port = await bind(runner, host, port, what="the emulator")
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))
        log.info(
            "emulator.listening",
            host=host,
            port=self.port,
            base_url=self.base_url,
            batch_base_url=self.batch_url,
        )
        try:
            async with self.library.running():
                try:
                    yield self
                finally:
                    self._closing.set()
                    running = [*self._loops.values(), *self._followers, *self._senders]
                    for task in running:
                        task.cancel()
                    await asyncio.gather(*running, return_exceptions=True)
        finally:
            await close_runner(runner)
            # A start answered while the tasks above were being cancelled began a loop of
            # its own: with the listener closed no more can come, so these are the last.
            late = [*self._loops.values(), *self._followers, *self._senders]
            for task in late:
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)
            await self._session.close()

    def _make_app(self) -> web.Application:
        app = web.Application()
        app.router.add_post(API_PREFIX + "/stream/start", self._start)
        app.router.add_post(API_PREFIX + "/stream/stop", self._stop)
        app.router.add_get("/_emulator/state", self._state)
        app.router.add_get("/_emulator/clips/{task}/{name}", self._clip)
        app.router.add_put("/_emulator/webhook", self._set_webhook)
        app.router.add_put("/_emulator/scripts", self._set_scripts)
        app.router.add_post("/_emulator/balance", self._add_balance)
        app.router.add_put("/_emulator/answer_delay", self._set_answer_delay)
        app.router.add_put("/_emulator/paused", self._set_paused)
        self.library.add_routes(app)
        return app

    # -- state for tests -----------------------------------------------------------------------

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def wait_until(self, predicate: Callable[[], bool]) -> None:
        """Return once `predicate()` holds, checking after each start, charge, end and
        delivery attempt. Bound it with `asyncio.timeout()`."""
        while not predicate():
            await self._changed.wait()

    def running_tasks(self) -> list[EmuTask]:
        return [t for t in self.tasks.values() if t.state == "running"]

    def charged_ticks(self, task_id: str | None = None) -> int:
        return sum(c.ticks for c in self.charges if task_id is None or c.task_id == task_id)

    def accepted_starts(self, url: str | None = None) -> list[StartRecord]:
        return [s for s in self.starts if s.task_id and (url is None or s.url == url)]

    def state(self) -> dict[str, object]:
        """What `GET /_emulator/state` shows. That route has no authentication, so stream
        URLs are shown with their credentials masked."""
        return {
            "balance_ticks": self.balance_ticks,
            "charged_ticks": self.charged_ticks(),
            "tasks": [{**asdict(t), "url": redact_url(t.url)} for t in self.tasks.values()],
            "charges": [asdict(c) for c in self.charges],
            "starts": [{**asdict(s), "url": redact_url(s.url)} for s in self.starts],
            "stops": [{"task_id": t, "http_status": s} for t, s in self.stop_calls],
            "paused": self.paused,
            "answer_delay_seconds": self.answer_delay_seconds,
            "deliveries": {
                "posting": self.posting,
                "total": len(self.deliveries),
                "delivered": sum(d.delivered for d in self.deliveries),
                "attempts": sum(d.attempts for d in self.deliveries),
                "pending": sum(
                    not d.delivered and d.attempts < self.redelivery_attempts
                    for d in self.deliveries
                ),
            },
        }

    # -- the v2 API ----------------------------------------------------------------------------

    def _reply(self, status: int, message: str, data: object = None) -> web.Response:
        code: int | str = str(status) if self.string_codes else status
        body = {"code": code, "message": message, "data": data}
        return web.json_response(body, status=status)

    async def _body(self, request: web.Request) -> Any:
        """The JSON body of an authorised request, or the error response to send instead."""
        given = request.headers.get("Authorization", "")
        if self.api_key is not None and not hmac.compare_digest(
            given.encode(), self.api_key.encode()
        ):
            return self._reply(401, "Invalid API key")
        try:
            return await request.json()
        except ValueError:
            return self._reply(400, "Body must be JSON")

    async def _start(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        if isinstance(body, web.Response):
            return body
        problem = _validate_start(body)
        if problem:
            return self._reply(400, problem)
        url = body["url"]
        script = self.scripts.get(url)
        if script is not None:
            used = self._start_failures_used.get(url, 0)
            if used < len(script.start_failures):
                self._start_failures_used[url] = used + 1
                status = script.start_failures[used]
                self.starts.append(StartRecord(url, status, None))
                resp = self._reply(status, "Scripted failure")
                if status == 429:
                    resp.headers["Retry-After"] = "0"
                return resp
        if self.capacity is not None and len(self.running_tasks()) >= self.capacity:
            self.starts.append(StartRecord(url, 409, None))
            return self._reply(409, "Concurrent stream limit reached")
        task = EmuTask(
            task_id=str(uuid.uuid4()),
            url=url,
            fps=int(body.get("fps", 1)),
            content_moderation=bool(body.get("enable_content_moderation", False)),
            logo_detection=bool(body.get("enable_logo_detection", False)),
            max_logos=int(body.get("max_logos", 5)),
            started_at=time.time(),
        )
        if self.balance_ticks < task.segment_ticks:
            self.starts.append(StartRecord(url, 402, None))
            return self._reply(402, "Insufficient balance")
        self._charge(task, "precharge")
        self.tasks[task.task_id] = task
        self.starts.append(StartRecord(url, 200, task.task_id))
        self._notify()
        self._loops[task.task_id] = asyncio.create_task(self._run_task(task))
        log.info("emulator.task_started", task_id=task.task_id, fps=task.fps)
        if self.answer_delay_seconds:
            with contextlib.suppress(TimeoutError):  # held, unless the emulator is stopping
                async with asyncio.timeout(self.answer_delay_seconds):
                    await self._closing.wait()
        return self._reply(
            200,
            "success",
            {"task_id": task.task_id, "message": "Stream processing started successfully"},
        )

    async def _stop(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        if isinstance(body, web.Response):
            return body
        task_id = body.get("task_id") if isinstance(body, dict) else None
        task = self.tasks.get(task_id) if isinstance(task_id, str) else None
        if task is None or task.state != "running":
            self.stop_calls.append((str(task_id), 400))
            return self._reply(400, "Task not found or already stopped")
        self.stop_calls.append((task.task_id, 200))
        loop = self._loops.pop(task.task_id, None)
        if loop is not None:
            loop.cancel()
        self._end(task, 14)
        return self._reply(
            200, "success", {"task_id": task.task_id, "message": "Stream stopped successfully"}
        )

    # -- test and demo controls ---------------------------------------------------------------

    @property
    def clips_url(self) -> str:
        """Where the emulator serves segment clips (`video_url` points under it)."""
        return f"http://{self.host}:{self.port}/_emulator/clips"

    async def _clip(self, request: web.Request) -> web.Response:
        """A stand-in segment clip: deterministic bytes, so downloads can be checked."""
        name = f"{request.match_info['task']}/{request.match_info['name']}"
        seed = hashlib.sha256(name.encode()).digest()
        return web.Response(body=seed * 2048, content_type="video/mp4")  # 64 KiB

    async def _state(self, request: web.Request) -> web.Response:
        return web.json_response(self.state())

    async def _set_webhook(self, request: web.Request) -> web.Response:
        doc = await request.json()
        self.webhook = doc.get("url")
        return web.json_response({"ok": True})

    async def _set_scripts(self, request: web.Request) -> web.Response:
        doc = await request.json()
        for item in doc:
            script = EmulatorScript.model_validate(item)
            self.scripts[script.url] = Script.from_config(script)
        return web.json_response({"ok": True, "scripts": len(self.scripts)})

    async def _set_answer_delay(self, request: web.Request) -> web.Response:
        doc = await request.json()
        self.answer_delay_seconds = float(doc["seconds"])
        return web.json_response({"ok": True, "answer_delay_seconds": self.answer_delay_seconds})

    async def _set_paused(self, request: web.Request) -> web.Response:
        doc = await request.json()
        self.paused = bool(doc["paused"])
        return web.json_response({"ok": True, "paused": self.paused})

    async def _add_balance(self, request: web.Request) -> web.Response:
        doc = await request.json()
        self.balance_ticks += int(doc["ticks"])
        return web.json_response({"ok": True, "balance_ticks": self.balance_ticks})

    # -- segments ------------------------------------------------------------------------------

    def _charge(self, task: EmuTask, kind: str) -> None:
        ticks = task.segment_ticks
        self.balance_ticks -= ticks
        task.charged_ticks += ticks
        self.charges.append(Charge(task.task_id, kind, ticks, time.time()))
        self._notify()

    def _outcomes(self, task: EmuTask) -> tuple[list[str], str]:
        script = self.scripts.get(task.url)
        if script is not None:
            return script.outcomes, script.then
        return [], "repeat"

    def _default_outcome(self, index: int) -> str:
        if self.unsafe_every and index % self.unsafe_every == self.unsafe_every - 1:
            return "unsafe"
        if index % 5 == 4:
            return "logo:Acme"
        return "safe"

    async def _run_task(self, task: EmuTask) -> None:
        outcomes, then = self._outcomes(task)
        script = self.scripts.get(task.url)
        reorder = script is not None and script.reorder
        held: tuple[dict[str, object], int] | None = None  # a segment kept back to be sent late

        def release() -> None:
            nonlocal held
            if held is not None:
                self._send(held[0], task.task_id, held[1], 0, script)
                held = None

        index = 0
        follower: asyncio.Task[None] | None = None
        try:
            if script is not None and script.follow_source:
                seen = asyncio.Event()
                follower = asyncio.create_task(
                    self._follow_source(task, seen, asyncio.current_task())
                )
                self._followers.add(follower)
                follower.add_done_callback(self._followers.discard)
                await seen.wait()  # MAVI has nothing to process before the video arrives
            while task.state == "running":
                await asyncio.sleep(self.segment_seconds)
                if task.state != "running":
                    break
                if self.paused:
                    continue
                if outcomes and index < len(outcomes):
                    outcome = outcomes[index]
                elif outcomes and then == "repeat":
                    outcome = outcomes[index % len(outcomes)]
                elif outcomes:
                    release()
                    self._end(task, int(then.removeprefix("end:")))
                    return
                else:
                    outcome = self._default_outcome(index)
                if outcome == "error":
                    self._send(_failed(task.task_id), task.task_id, None, -1, script)
                    index += 1
                    continue
                if self.balance_ticks < task.segment_ticks:
                    release()
                    self._end(task, 402)
                    return
                self._charge(task, "segment")
                payload = _segment(task, index, outcome, self.segment_seconds, self.clips_url)
                task.segments_sent += 1
                if reorder and held is None:
                    held = (payload, index)
                else:
                    self._send(payload, task.task_id, index, 0, script)
                    release()
                index += 1
        finally:
            # A held segment was processed and charged: deliver it even when the task was
            # stopped meanwhile.
            release()
            if follower is not None:
                follower.cancel()

    async def _follow_source(
        self, task: EmuTask, seen: asyncio.Event, segments: asyncio.Task[Any] | None
    ) -> None:
        """Probe the task's source until it is gone, then end the task with 15 (no video), as
        MAVI does when a stream it reads stops. The first probe that finds media lets
        segments begin."""
        while task.state == "running":
            try:
                await probe(task.url, timeout=self.source_timeout_seconds)
            except ProbeError as exc:
                log.info("emulator.source_gone", task_id=task.task_id, reason=exc.kind)
                self._end(task, 15)
                if segments is not None:
                    segments.cancel()
                return
            seen.set()
            await asyncio.sleep(self.source_check_seconds)

    def _end(self, task: EmuTask, status: int) -> None:
        if task.state != "running":
            return
        task.state = "ended"
        task.end_status = status
        self._loops.pop(task.task_id, None)
        body: dict[str, object] = {
            "code": self._code(),
            "message": "SUCCESS",
            "task_id": task.task_id,
            "data": {
                "status": status,
                "message": END_MESSAGES[status],
                "data": None,
                "token": None,
            },
        }
        self._send(body, task.task_id, None, status, self.scripts.get(task.url))
        log.info("emulator.task_ended", task_id=task.task_id, status=status)
        self._notify()

    def _code(self) -> int | str:
        return "200" if self.string_codes else 200

    def _send(
        self,
        body: dict[str, object],
        task_id: str,
        index: int | None,
        status: int,
        script: Script | None,
    ) -> None:
        body["code"] = self._code()
        copies = 2 if script is not None and script.duplicate else 1
        for _ in range(copies):
            delivery = Delivery(task_id, index, status)
            self.deliveries.append(delivery)
            sender = asyncio.create_task(self._deliver(delivery, body))
            self._senders.add(sender)
            sender.add_done_callback(self._senders.discard)

    async def _deliver(self, delivery: Delivery, body: dict[str, object]) -> None:
        assert self._session is not None
        delay = self.redelivery_initial
        while delivery.attempts < self.redelivery_attempts:
            delivery.attempts += 1
            self._notify()
            if self.webhook:
                self.posting += 1
                try:
                    async with self._session.post(self.webhook, json=body) as resp:
                        delivery.last_http = resp.status
                        if 200 <= resp.status < 300:
                            delivery.delivered = True
                            return
                except (aiohttp.ClientError, TimeoutError):
                    delivery.last_http = None
                finally:
                    self.posting -= 1
                    self._notify()
            await asyncio.sleep(delay * (0.5 + self._rng.random() / 2))
            delay *= 2
        log.warning(
            "emulator.delivery_exhausted", task_id=delivery.task_id, segment=delivery.segment_index
        )


def _validate_start(body: object) -> str | None:
    if not isinstance(body, dict):
        return "Body must be a JSON object"
    url = body.get("url")
    if not isinstance(url, str) or not url.startswith(
        ("rtmp://", "rtsp://", "rtmps://", "rtsps://", "http://", "https://")
    ):
        return "url must be an rtmp://, rtsp:// or HLS URL"
    fps = body.get("fps", 1)
    if not isinstance(fps, int) or isinstance(fps, bool) or fps < 1:
        return "fps must be an integer >= 1"
    max_logos = body.get("max_logos", 5)
    if not isinstance(max_logos, int) or isinstance(max_logos, bool) or not 1 <= max_logos <= 50:
        return "max_logos must be an integer from 1 to 50"
    for key in ("enable_content_moderation", "enable_logo_detection"):
        if not isinstance(body.get(key, False), bool):
            return f"{key} must be a boolean"
    if not (body.get("enable_content_moderation") or body.get("enable_logo_detection")):
        return "enable content moderation, logo detection or both"
    return None


def _failed(task_id: str) -> dict[str, object]:
    return {
        "code": 200,
        "message": "SUCCESS",
        "task_id": task_id,
        "data": {"status": -1, "message": "Segment processing failed", "data": None, "token": None},
    }


def _segment(
    task: EmuTask, index: int, outcome: str, period: float, clips: str
) -> dict[str, object]:
    frames = task.fps * 5
    data: dict[str, object] = {
        "segment_index": index,
        "start_time": f"{index * 5:.1f}",
        "end_time": f"{(index + 1) * 5:.1f}",
        "video_url": f"{clips}/{task.task_id}/segment_{index}.mp4",
    }
    if task.content_moderation:
        data["content_moderation"] = {
            "has_unsafe_content": outcome == "unsafe",
            "frames_processed": frames,
        }
    if task.logo_detection:
        logos = []
        if outcome.startswith("logo:"):
            logos = [
                {
                    "name": outcome.removeprefix("logo:"),
                    "confidence": 0.93,
                    "bbox": [0.1, 0.1, 0.2, 0.1],
                }
            ][: task.max_logos]
        data["logo_detection"] = {
            "has_logo": bool(logos),
            "logos": logos,
            "frames_processed": frames,
        }
    data["processing_time_ms"] = str(int(period * 160) + 12)
    return {
        "code": 200,
        "message": "SUCCESS",
        "task_id": task.task_id,
        "data": {
            "status": 0,
            "message": "Segment processed successfully",
            "data": data,
            "token": {
                "input": 1200 * task.fps,
                "output": 40,
                "total": 1200 * task.fps + 40,
                "video_tokens": 1100 * task.fps,
                "text_tokens": 100 * task.fps + 40,
            },
        },
    }
