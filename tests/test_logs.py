"""Log output: JSON lines off a terminal, readable text on one, levels filtered."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator

import pytest
import structlog

from streamwatch.logs import configure_logging


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture(autouse=True)
def _restore_structlog() -> Iterator[None]:
    yield
    structlog.reset_defaults()


def test_json_when_not_a_terminal():
    """With format auto and no terminal, each event is one JSON object with a stable name."""
    out = io.StringIO()
    configure_logging(level="info", fmt="auto", stream=out)
    structlog.get_logger("t").info("segment.stored", stream="cam", segment=3)
    doc = json.loads(out.getvalue())
    assert doc["event"] == "segment.stored"
    assert doc["stream"] == "cam"
    assert doc["level"] == "info"
    assert doc["timestamp"].endswith("Z")


def test_readable_on_a_terminal():
    """With format auto on a terminal, events are rendered for people, not as JSON."""
    out = Tty()
    configure_logging(level="info", fmt="auto", stream=out)
    structlog.get_logger("t").info("app.started", streams=2)
    text = out.getvalue()
    assert "app.started" in text
    assert not text.lstrip().startswith("{")


def test_level_filters():
    """Events below the configured level are dropped."""
    out = io.StringIO()
    configure_logging(level="warning", fmt="json", stream=out)
    log = structlog.get_logger("t")
    log.info("quiet")
    log.warning("loud")
    assert [json.loads(line)["event"] for line in out.getvalue().splitlines()] == ["loud"]
