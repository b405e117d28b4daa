"""A scripted fake of MAVI's v2 stream endpoints, for client tests: each call pops the next
scripted answer and the request is recorded."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from tests.fakes.serve import serve


@dataclass
class Answer:
    status: int = 200
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0


@dataclass
class Seen:
    path: str
    headers: dict[str, str]
    body: Any


class FakeMavi:
    def __init__(self) -> None:
        self.answers: list[Answer] = []
        self.seen: list[Seen] = []
        self.url = ""

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.seen.append(Seen(request.path, dict(request.headers), await request.json()))
        answer = self.answers.pop(0) if self.answers else Answer(500, {"message": "unscripted"})
        if answer.delay:
            await asyncio.sleep(answer.delay)
        if answer.body is None:
            return web.Response(status=answer.status, headers=answer.headers)
        return web.json_response(answer.body, status=answer.status, headers=answer.headers)

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[FakeMavi]:
        app = web.Application()
        app.router.add_post("/v2/stream/{verb}", self._handle)
        async with serve(app) as base:
            self.url = f"{base}/v2"
            yield self
