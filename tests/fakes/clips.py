"""A fake clip host on loopback: clips, redirects, slow and stalled bodies, and a record of
every request (path and headers) so tests can tell what reached it."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from aiohttp import web


@dataclass
class Seen:
    path: str
    headers: dict[str, str]


@dataclass
class ClipHost:
    """`/clip/{n}` answers n bytes; `/redirect?to=URL` answers 302 and sets a cookie (without
    `to`, to itself); `/stall/{n}` sends n bytes then waits for `release`; `/hang` answers
    nothing until `release`."""

    requests: list[Seen] = field(default_factory=list)
    release: asyncio.Event = field(default_factory=asyncio.Event)
    stalled: int = 0  # requests now waiting for `release`
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/clip/{n}", self._clip)
        app.router.add_get("/redirect", self._redirect)
        app.router.add_get("/stall/{n}", self._stall)
        app.router.add_get("/hang", self._hang)
        app.middlewares.append(self._record)
        return app

    @web.middleware
    async def _record(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        self.requests.append(Seen(request.path_qs, dict(request.headers)))
        return await handler(request)

    def _notify(self) -> None:
        self.changed.set()
        self.changed = asyncio.Event()

    async def wait(self, predicate: Callable[[], bool]) -> None:
        while not predicate():
            await self.changed.wait()

    async def _clip(self, request: web.Request) -> web.Response:
        return web.Response(body=b"c" * int(request.match_info["n"]), content_type="video/mp4")

    async def _redirect(self, request: web.Request) -> web.Response:
        target = request.query.get("to", request.path_qs)  # without `to`: a loop
        resp = web.Response(status=302, headers={"Location": target})
        resp.set_cookie("session", "cookie-from-the-clip-host")
        return resp

    async def _stall(self, request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        resp.content_type = "video/mp4"
        await resp.prepare(request)
        await resp.write(b"s" * int(request.match_info["n"]))
        self.stalled += 1
        self._notify()
        try:
            await self.release.wait()
        finally:
            self.stalled -= 1
        return resp

    async def _hang(self, request: web.Request) -> web.Response:
        self.stalled += 1
        self._notify()
        try:
            await self.release.wait()
        finally:
            self.stalled -= 1
        return web.Response(body=b"late")
