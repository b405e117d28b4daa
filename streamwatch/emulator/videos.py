"""The emulator's MAVI v1 batch video API, under ``/api/serve/video``: every answer is HTTP 200
with a string `code` (`0000` success), as MAVI's own, and every `data` has exactly the fields and
JSON types of the vendor's response examples (`LibraryVideo.wire()`, `clip_wire()`). Uploads are
counted and hashed while they stream in, never kept or decoded (so every video lasts
`DURATION_SECONDS`); videos become `PARSE` after `parse_seconds`, and the upload callback is
posted if one was given. Per-minute limits answer `0429`; `busy_next` forces that for tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import time
from collections import deque
from collections.abc import AsyncIterator, Coroutine
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import BodyPartReader, web

from streamwatch.background import Failures, TaskGroup, hosted

__all__ = ["BATCH_PREFIX", "DURATION_SECONDS", "LibraryVideo", "VideoLibrary"]

BATCH_PREFIX = "/api/serve/video"
# Uploads are never decoded, so the emulator cannot know a video's length: it says this.
DURATION_SECONDS = 30
LIMITS = {
    "upload": 10,
    "searchDB": 200,
    "searchAI": 20,
    "searchVideoFragment": 10,
    "chat": 10,
    "subTranscription": 20,
    "getTranscription": 50,
}


@dataclass
class LibraryVideo:
    video_no: str
    name: str
    size: int
    sha256: str
    upload_ms: int
    status: str = "UNPARSE"

    def wire(self) -> dict[str, object]:
        """The video as upload, searchDB and searchAI show it: four strings."""
        return {
            "videoNo": self.video_no,
            "videoName": self.name,
            "videoStatus": self.status,
            "uploadTime": str(self.upload_ms),
        }

    def clip_wire(self, start_s: int, end_s: int) -> dict[str, object]:
        """One searchVideoFragment hit: the video's fields, its duration and the clip's bounds,
        all strings of whole seconds."""
        return {
            **self.wire(),
            "duration": str(DURATION_SECONDS),
            "fragmentStartTime": str(start_s),
            "fragmentEndTime": str(end_s),
        }


@dataclass
class _Task:
    task_no: str
    video_no: str
    kind: str
    polls_left: int


@dataclass
class VideoLibrary:
    """State and routes of the batch API."""

    api_key: str | None = None
    parse_seconds: float = 0.05
    polls_to_finish: int = 2
    per_minute: dict[str, int] = field(default_factory=lambda: dict(LIMITS))
    busy_next: int = 0  # answer this many calls with 0429 first
    videos: dict[str, LibraryVideo] = field(default_factory=dict)
    tasks: dict[str, _Task] = field(default_factory=dict)
    callbacks: list[dict[str, object]] = field(default_factory=list)
    calls: list[str] = field(default_factory=list)
    _seen: dict[str, deque[float]] = field(default_factory=dict)
    _counter: int = 0
    failures: Failures | None = None
    # Parsing and upload callbacks run in this group, entered by `running()`.
    _tasks: TaskGroup | None = None

    def add_routes(self, app: web.Application) -> None:
        p = BATCH_PREFIX
        app.router.add_post(f"{p}/upload", self._upload)
        app.router.add_get(f"{p}/searchDB", self._search_db)
        app.router.add_post(f"{p}/searchAI", self._search_ai)
        app.router.add_post(f"{p}/searchVideoFragment", self._fragments)
        app.router.add_post(f"{p}/chat", self._chat)
        app.router.add_post(f"{p}/subTranscription", self._sub_transcription)
        app.router.add_get(f"{p}/getTranscription", self._get_transcription)
        app.router.add_delete(f"{p}/delete", self._delete)

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[VideoLibrary]:
        """Own the library's background work (parsing, upload callbacks) in a task group of
        its own task (the emulator is often served by a test fixture, whose set-up and
        teardown are two tasks); on exit, cancel what is left of it."""
        async with hosted(TaskGroup("emulator", self.failures)) as tasks:
            self._tasks = tasks
            try:
                yield self
            finally:
                self._tasks = None
                tasks.cancel()

    async def settle(self) -> None:
        """Wait for background work (parsing, upload callbacks) to finish."""
        if self._tasks is not None:
            await self._tasks.settle()

    # -- helpers ------------------------------------------------------------------------------

    @staticmethod
    def _answer(code: str, data: object = None, msg: str = "success") -> web.Response:
        """`{"code", "msg", "data"}`; without `data` when there is none, as MAVI documents for
        delete (`{"code", "msg"}`)."""
        doc: dict[str, object] = {"code": code, "msg": msg}
        if data is not None:
            doc["data"] = data
        return web.json_response(doc)

    def _gate(self, request: web.Request, endpoint: str) -> web.Response | None:
        self.calls.append(endpoint)
        if self.api_key is not None and not hmac.compare_digest(
            request.headers.get("Authorization", "").encode(), self.api_key.encode()
        ):
            return self._answer("0401", msg="invalid api key")
        if self.busy_next > 0:
            self.busy_next -= 1
            return self._answer("0429", msg="too busy")
        limit = self.per_minute.get(endpoint)
        if limit is not None:
            seen = self._seen.setdefault(endpoint, deque())
            now = time.monotonic()
            while seen and now - seen[0] > 60:
                seen.popleft()
            if len(seen) >= limit:
                return self._answer("0429", msg="rate limit")
            seen.append(now)
        return None

    def _unknown(self, video_nos: list[Any]) -> web.Response | None:
        """0001 naming the videoNos that are not in the library, if any (MAVI does not document
        its answer; an empty result would look like "nothing matched")."""
        missing = [str(n) for n in video_nos if n not in self.videos]
        if not missing:
            return None
        return self._answer("0001", msg=f"videoNos not in the library: {', '.join(missing[:5])}")

    def _next_no(self, prefix: str) -> str:
        self._counter += 1
        return f"{prefix}{self._counter:010d}"

    def _spawn(self, coro: Coroutine[object, object, None]) -> None:
        if self._tasks is None:
            coro.close()
            raise RuntimeError("the emulator's video library is not running")
        self._tasks.spawn("emulator.video", coro)

    # -- routes ---------------------------------------------------------------------------------

    async def _upload(self, request: web.Request) -> web.Response:
        if (refused := self._gate(request, "upload")) is not None:
            return refused
        reader = await request.multipart()
        part = await reader.next()
        if not isinstance(part, BodyPartReader) or part.name != "file":
            return self._answer("0001", msg="multipart field 'file' is required")
        digest, size = hashlib.sha256(), 0
        while chunk := await part.read_chunk(256 * 1024):
            digest.update(chunk)
            size += len(chunk)
        name = part.filename or "upload"
        video = LibraryVideo(
            self._next_no("VI"), name, size, digest.hexdigest(), int(time.time() * 1000)
        )
        self.videos[video.video_no] = video
        self._spawn(self._parse(video, request.query.get("callBackUri")))
        return self._answer("0000", video.wire())

    async def _parse(self, video: LibraryVideo, callback: str | None) -> None:
        await asyncio.sleep(self.parse_seconds)
        video.status = "PARSE" if video.size > 0 else "FAIL"
        if callback:
            body: dict[str, object] = {
                "videoNo": video.video_no,
                "clientId": "emulator",
                "status": video.status,
            }
            self.callbacks.append(body)
            try:
                async with aiohttp.ClientSession() as s, s.post(callback, json=body):
                    pass
            except aiohttp.ClientError:
                pass

    async def _search_db(self, request: web.Request) -> web.Response:
        if (refused := self._gate(request, "searchDB")) is not None:
            return refused
        q = request.query
        try:
            page = int(q.get("page", 1))
            size = int(q.get("pageSize", 20))
        except ValueError:
            return self._answer("0001", msg="page and pageSize are numbers")
        if page < 1 or not 1 <= size <= 200:
            return self._answer("0001", msg="page from 1, pageSize from 1 to 200")
        found = [
            v
            for v in self.videos.values()
            if (not q.get("videoStatus") or v.status == q["videoStatus"])
            and (not q.get("startTime") or v.upload_ms >= int(q["startTime"]))
            and (not q.get("endTime") or v.upload_ms <= int(q["endTime"]))
        ]
        pages = max(1, -(-len(found) // size))
        chunk = found[(page - 1) * size : page * size]
        return self._answer(
            "0000",
            {
                "page": pages,
                "current": page,
                "total": len(found),
                "pageSize": size,
                "videoData": [v.wire() for v in chunk],
            },
        )

    async def _body(self, request: web.Request) -> Any:
        try:
            return await request.json()
        except ValueError:
            return None

    async def _search_ai(self, request: web.Request) -> web.Response:
        if (refused := self._gate(request, "searchAI")) is not None:
            return refused
        body = await self._body(request)
        if not isinstance(body, dict) or not body.get("searchValue"):
            return self._answer("0001", msg="searchValue is required")
        words = {w.lower() for w in str(body["searchValue"]).split()}
        hits = [
            v.wire()
            for v in self.videos.values()
            if v.status == "PARSE" and words & set(v.name.lower().replace(".", " ").split())
        ]
        return self._answer("0000", {"videos": hits})

    async def _fragments(self, request: web.Request) -> web.Response:
        if (refused := self._gate(request, "searchVideoFragment")) is not None:
            return refused
        body = await self._body(request)
        nos = body.get("videoNos") if isinstance(body, dict) else None
        if not isinstance(nos, list) or not body.get("searchValue"):
            return self._answer("0001", msg="videoNos and searchValue are required")
        if len(nos) > 50:
            return self._answer("0003", msg="at most 50 videos per call")
        if (unknown := self._unknown(nos)) is not None:
            return unknown
        clips = [self.videos[n].clip_wire(5, 10) for n in nos]
        return self._answer("0000", {"videos": clips})

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        if (refused := self._gate(request, "chat")) is not None:
            return refused
        body = await self._body(request)
        if not isinstance(body, dict) or not body.get("message"):
            return self._answer("0001", msg="message is required")
        nos = body.get("videoNos", [])
        if not isinstance(nos, list):
            return self._answer("0001", msg="videoNos is a list")
        if (unknown := self._unknown(nos)) is not None:
            return unknown
        answer = f"The {len(nos)} video(s) show what you asked about: {body['message']}"
        if not body.get("stream"):
            return self._answer("0000", {"msg": answer})
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for word in answer.split(" "):
            chunk = {"code": "0000", "msg": "success", "data": {"msg": word + " "}}
            await resp.write(f"data: {json.dumps(chunk)}\n\n".encode())
        await resp.write_eof()
        return resp

    async def _sub_transcription(self, request: web.Request) -> web.Response:
        if (refused := self._gate(request, "subTranscription")) is not None:
            return refused
        body = await self._body(request)
        if not isinstance(body, dict) or body.get("videoNo") not in self.videos:
            return self._answer("0001", msg="videoNo is not in the library")
        # The vendor's own example also sends "AUDIO/VIDEO" (both).
        if body.get("type", "AUDIO") not in ("AUDIO", "VIDEO", "AUDIO/VIDEO"):
            return self._answer("0001", msg="type is AUDIO, VIDEO or AUDIO/VIDEO")
        task = _Task(
            self._next_no("TR"), body["videoNo"], body.get("type", "AUDIO"), self.polls_to_finish
        )
        self.tasks[task.task_no] = task
        return self._answer("0000", {"taskNo": task.task_no})

    async def _get_transcription(self, request: web.Request) -> web.Response:
        if (refused := self._gate(request, "getTranscription")) is not None:
            return refused
        task = self.tasks.get(request.query.get("taskNo", ""))
        if task is None:
            return self._answer("0001", msg="unknown taskNo")
        task.polls_left -= 1
        done = task.polls_left <= 0
        lines = [
            {"id": 1, "startTime": 0.0, "endTime": 4.5, "content": "hello from the emulator"},
            {"id": 2, "startTime": 4.5, "endTime": 9.0, "content": "a second line"},
        ]
        return self._answer(
            "0000",
            {
                "status": "FINISH" if done else "UNFINISHED",
                "type": task.kind,
                "videoNo": task.video_no,
                "taskNo": task.task_no,
                "transcriptions": lines if done else [],
            },
        )

    async def _delete(self, request: web.Request) -> web.Response:
        if (refused := self._gate(request, "delete")) is not None:
            return refused
        body = await self._body(request)
        if not isinstance(body, list) or not all(isinstance(n, str) for n in body):
            return self._answer("0001", msg="a JSON array of videoNos")
        if len(body) > 500:
            return self._answer("0003", msg="at most 500 per call")
        missing = [n for n in body if n not in self.videos]
        if missing:
            return self._answer("0409", msg=f"already deleted: {missing[:5]}")
        for n in body:
            del self.videos[n]
        return self._answer("0000")
