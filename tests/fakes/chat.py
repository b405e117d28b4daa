"""Fake Slack, Discord and signed-webhook receivers on loopback. Each checks payloads against
the service's documented limits and answers as scripted (errors, 429s, slowness)."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from slack_sdk.errors import SlackObjectFormationError
from slack_sdk.models.blocks import Block
from standardwebhooks.webhooks import Webhook, WebhookVerificationError


@dataclass
class Answer:
    status: int = 200
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0


def slack_problems(doc: dict[str, Any], raw: bytes) -> list[str]:
    problems = []
    blocks = doc.get("blocks", [])
    try:  # Slack's own SDK knows every block's field limits
        for block in Block.parse_all(blocks):
            block.validate_json()
    except SlackObjectFormationError as exc:
        problems.append(f"invalid_blocks: {exc}")
    if len(blocks) > 50:
        problems.append("more than 50 blocks")
    if len(raw) > 13_000:
        problems.append("msg_blocks_too_long")
    for b in blocks:
        text = b.get("text", {}).get("text", "")
        if b["type"] == "section" and len(text) > 3000:
            problems.append("section over 3000 characters")
        if b["type"] == "header" and len(text) > 150:
            problems.append("header over 150 characters")
    if not doc.get("text"):
        problems.append("no fallback text")
    return problems


def discord_problems(doc: dict[str, Any]) -> list[str]:
    problems = []
    embeds = doc.get("embeds", [])
    if len(doc.get("content", "")) > 2000:
        problems.append("content over 2000")
    if len(embeds) > 10:
        problems.append("more than 10 embeds")
    total = 0
    for e in embeds:
        total += len(e.get("title", "")) + len(e.get("description", ""))
        total += len(e.get("footer", {}).get("text", ""))
        if len(e.get("title", "")) > 256 or len(e.get("description", "")) > 4096:
            problems.append("title or description too long")
        if len(e.get("fields", [])) > 25:
            problems.append("more than 25 fields")
        for f in e.get("fields", []):
            total += len(f["name"]) + len(f["value"])
            if len(f["value"]) > 1024:
                problems.append("field value over 1024")
    if total > 6000:
        problems.append("over 6000 characters across embeds")
    return problems


def teams_problems(doc: dict[str, Any], raw: bytes) -> list[str]:
    problems = []
    if len(raw) > 28_000:
        problems.append("payload over 28 KB")
    attachments = doc.get("attachments", [])
    if doc.get("type") != "message" or len(attachments) != 1:
        problems.append("not a message with one attachment")
    else:
        card = attachments[0].get("content", {})
        if attachments[0].get("contentType") != "application/vnd.microsoft.card.adaptive":
            problems.append("not an Adaptive Card")
        if card.get("type") != "AdaptiveCard" or not card.get("body"):
            problems.append("card without body")
    return problems


class ChatFakes:
    """One app with /slack, /discord, /teams, /webhook (and, when asked for, /apprise and
    /alertmanager/api/v2/alerts); `script[path]` answers in order."""

    def __init__(
        self,
        webhook_secret: str,
        services: tuple[str, ...] = ("slack", "discord", "teams", "webhook"),
    ) -> None:
        self.script: dict[str, list[Answer]] = {s: [] for s in services}
        self.received: dict[str, list[dict[str, Any]]] = {s: [] for s in services}
        self.attempts: dict[str, int] = dict.fromkeys(services, 0)
        self.invalid: list[str] = []
        self.max_body: dict[str, int] = {}  # a bigger body gets 413, as from a real receiver
        self._verifier = Webhook(webhook_secret)
        self.changed = asyncio.Event()
        self.app = web.Application()
        self.app.router.add_post("/{service}", self._handle)
        # Alertmanager's API, for a sink whose URL is {base}/alertmanager.
        self.app.router.add_post("/{service}/api/v2/alerts", self._handle)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        service = request.match_info["service"]
        raw = await request.read()
        self.attempts[service] += 1
        try:
            answer = self.script[service].pop(0) if self.script[service] else Answer()
            if answer.delay:
                await asyncio.sleep(answer.delay)
            if len(raw) > self.max_body.get(service, len(raw)):
                return web.json_response({"error": "request entity too large"}, status=413)
            doc = json.loads(raw)
            if service == "slack":
                problems = slack_problems(doc, raw)
            elif service == "discord":
                problems = discord_problems(doc)
            elif service == "teams":
                problems = teams_problems(doc, raw)
            elif service == "alertmanager":
                ok = isinstance(doc, list) and all("labels" in a for a in doc)
                problems = [] if ok else ["not a list of Alertmanager alerts"]
            elif service == "apprise":
                problems = [] if {"title", "message", "type"} <= set(doc) else ["not Apprise JSON"]
            else:
                try:
                    self._verifier.verify(raw, dict(request.headers))
                    problems = []
                except WebhookVerificationError as exc:
                    problems = [f"signature: {exc}"]
            if problems:
                self.invalid.extend(problems)
                return web.json_response({"error": problems}, status=400)
            if answer.status >= 300:
                body = answer.body if answer.body is not None else {"error": "scripted"}
                return web.json_response(body, status=answer.status, headers=answer.headers)
            self.received[service].append({"doc": doc, "headers": dict(request.headers)})
            if service == "discord":
                return web.Response(status=204)
            if service == "teams":
                return web.Response(status=202)  # Workflows: accepted, empty body
            return web.Response(text="ok")
        finally:
            self.changed.set()
            self.changed = asyncio.Event()

    async def wait(self, predicate: Any) -> None:
        while not predicate():
            await self.changed.wait()
