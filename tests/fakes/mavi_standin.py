"""An independent MAVI stand-in written from MAVI-CONTRACT.md alone.

It shares no code with `streamwatch.emulator` and sends only what the contract documents:
string `code` values (as the reference table types them), segment callbacks without optional
blocks for disabled features, null `data`/`token` for end statuses, no test endpoints. The
daemon must work against it unchanged; whatever only works against our own emulator fails here.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web

from tests.fakes.serve import serve


@dataclass
class Task:
    task_id: str
    url: str
    body: dict[str, Any]
    running: bool = True
    segments: int = 0


@dataclass
class StandIn:
    key: str
    period: float
    end_after: dict[str, tuple[int, int]] = field(default_factory=dict)  # url -> (n, status)
    webhook: str = ""
    tasks: dict[str, Task] = field(default_factory=dict)
    ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))
    loops: list[asyncio.Task[None]] = field(default_factory=list)
    url: str = ""

    async def start(self, request: web.Request) -> web.Response:
        if request.headers.get("Authorization") != self.key:
            return web.json_response({"code": "401", "message": "unauthorized"}, status=401)
        body = await request.json()
        task = Task(f"standin-{next(self.ids):04d}", body["url"], body)
        self.tasks[task.task_id] = task
        self.loops.append(asyncio.create_task(self.segments(task)))
        return web.json_response(
            {
                "code": "200",
                "message": "success",
                "data": {
                    "task_id": task.task_id,
                    "message": "Stream processing started successfully",
                },
            }
        )

    async def stop(self, request: web.Request) -> web.Response:
        if request.headers.get("Authorization") != self.key:
            return web.json_response({"code": "401", "message": "unauthorized"}, status=401)
        task = self.tasks.get((await request.json()).get("task_id", ""))
        if task is None or not task.running:
            return web.json_response({"code": "400", "message": "not found"}, status=400)
        task.running = False
        await self.post(task, 14)
        return web.json_response(
            {
                "code": "200",
                "message": "success",
                "data": {"task_id": task.task_id, "message": "Stream stopped successfully"},
            }
        )

    async def segments(self, task: Task) -> None:
        limit, status = self.end_after.get(task.url, (-1, 0))
        while task.running:
            await asyncio.sleep(self.period)
            if not task.running:
                return
            if limit >= 0 and task.segments >= limit:
                task.running = False
                await self.post(task, status)
                return
            await self.post(task, 0)
            task.segments += 1

    async def post(self, task: Task, status: int) -> bool:
        """Post a callback until it is answered 2xx (True), or give up (False)."""
        data: dict[str, Any] | None = None
        token: dict[str, int] | None = None
        if status == 0:
            i = task.segments
            data = {
                "segment_index": i,
                "start_time": f"{5 * i}.0",
                "end_time": f"{5 * i + 5}.0",
                "video_url": f"https://standin.invalid/{task.task_id}/{i}.mp4",
                "processing_time_ms": "640",
            }
            if task.body.get("enable_content_moderation"):
                data["content_moderation"] = {
                    "has_unsafe_content": i % 3 == 2,
                    "frames_processed": 5,
                }
            if task.body.get("enable_logo_detection"):
                data["logo_detection"] = {"has_logo": False, "logos": [], "frames_processed": 5}
            token = {"input": 10, "output": 2, "total": 12, "video_tokens": 8, "text_tokens": 4}
        payload = {
            "code": "200",
            "message": "SUCCESS",
            "task_id": task.task_id,
            "data": {"status": status, "message": "m", "data": data, "token": token},
        }
        for _ in range(50):  # the provider retries failed callbacks
            try:
                async with aiohttp.ClientSession() as s, s.post(self.webhook, json=payload) as r:
                    if r.status < 300:
                        return True
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(self.period)
        return False

    def app(self) -> web.Application:
        """MAVI's stream API: start and stop, nothing else."""
        app = web.Application()
        app.router.add_post("/serve/api/v2/stream/start", self.start)
        app.router.add_post("/serve/api/v2/stream/stop", self.stop)
        return app

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[StandIn]:
        async with serve(self.app()) as base:
            self.url = f"{base}/serve/api/v2"
            try:
                yield self
            finally:
                for loop in self.loops:
                    loop.cancel()
                await asyncio.gather(*self.loops, return_exceptions=True)
