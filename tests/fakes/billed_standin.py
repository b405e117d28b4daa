"""The independent MAVI stand-in (tests/fakes/mavi_standin.py) with what `bench.cluster`
documents a stand-in must add for its kill trial, and nothing of streamwatch's emulator: a
bill kept with MAVI-CONTRACT.md's price formula (a pre-charge at each accepted start, one
segment per processed segment), a pause, a count of its deliveries, and the three control
endpoints (`PUT /_control/webhook`, `PUT /_control/paused`, `GET /_control/state`)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

from aiohttp import web

from tests.fakes.mavi_standin import StandIn, Task


def segment_ticks(body: dict[str, Any]) -> int:
    """The contract's price of one 5-second segment, in 1/2880 USD: 5 * rate * (1 + (fps - 1)
    * 0.5) / 3600, rate 2.00 $/h with both features and 1.50 $/h with one."""
    features = bool(body.get("enable_content_moderation")) + bool(body.get("enable_logo_detection"))
    rate = Fraction(2) if features == 2 else Fraction(3, 2)
    usd = 5 * rate * (1 + Fraction(int(body.get("fps", 1)) - 1, 2)) / 3600
    ticks = usd * 2880
    assert ticks.denominator == 1, ticks
    return ticks.numerator


@dataclass
class BilledStandIn(StandIn):
    paused: bool = False
    charged_ticks: int = 0
    starts: list[dict[str, str | None]] = field(default_factory=list)
    delivered: int = 0  # callbacks answered 2xx
    unsettled: int = 0  # callbacks being posted (or waiting to be posted again)

    async def start(self, request: web.Request) -> web.Response:
        before = set(self.tasks)
        answer = await super().start(request)
        new = [t for t in self.tasks.values() if t.task_id not in before]
        if new:
            self.charged_ticks += segment_ticks(new[0].body)  # the pre-charge
            self.starts.append({"url": new[0].url, "task_id": new[0].task_id})
        else:
            self.starts.append({"url": (await request.json()).get("url"), "task_id": None})
        return answer

    async def segments(self, task: Task) -> None:
        while task.running:
            await asyncio.sleep(self.period)
            if task.running and not self.paused:
                self.charged_ticks += segment_ticks(task.body)
                await self.post(task, 0)
                task.segments += 1

    async def post(self, task: Task, status: int) -> bool:
        self.unsettled += 1
        try:
            delivered = await super().post(task, status)
        finally:
            self.unsettled -= 1
        self.delivered += delivered
        return delivered

    async def _webhook(self, request: web.Request) -> web.Response:
        self.webhook = str((await request.json())["url"])
        return web.json_response({})

    async def _paused(self, request: web.Request) -> web.Response:
        self.paused = bool((await request.json())["paused"])
        return web.json_response({})

    async def _state(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "deliveries": {
                    "delivered": self.delivered,
                    "posting": self.unsettled,
                    "pending": 0,  # a retry waits inside its post: counted as posting
                },
                "starts": self.starts,
                "charged_ticks": self.charged_ticks,
            }
        )

    def app(self) -> web.Application:
        app = super().app()
        app.router.add_put("/_control/webhook", self._webhook)
        app.router.add_put("/_control/paused", self._paused)
        app.router.add_get("/_control/state", self._state)
        return app
