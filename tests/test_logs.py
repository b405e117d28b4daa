"""Log output: JSON lines off a terminal, readable text on one, levels filtered."""

from __future__ import annotations

import gc
import io
import json
import logging
from collections.abc import Iterator

import pytest
import structlog

from streamwatch.logs import Throttle, configure_logging, enabled
from streamwatch.redact import Redactor

KEY = "sk-mai-live-0123456789abcdef"
URL = "rtsp://admin:RtspSecret987@cam.test:554/live"


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture(autouse=True)
def _restore_structlog() -> Iterator[None]:
    # Garbage an earlier test left (an event loop's pending task) is collected now, not while
    # a test below has the root logger pointed at its buffer, where asyncio's complaint about
    # it would land as an extra line.
    gc.collect()
    root = logging.getLogger()
    level = root.level
    yield
    structlog.reset_defaults()
    for handler in [h for h in root.handlers if h.get_name() == "streamwatch"]:
        root.removeHandler(handler)
    root.setLevel(level)


def fail_with_secrets_in_locals() -> None:
    """Fails the way the start path once did: `int("²")` with the key and URL in locals."""
    headers = {"Authorization": KEY}
    body = {"url": URL}
    assert headers
    assert body
    int("²")


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


@pytest.mark.parametrize("fmt", ["json", "console"])
def test_tracebacks_show_no_locals_and_no_secrets(fmt):
    """An exception logged with exc_info renders its frames without local variables, and the
    secrets in the event's values and in the exception text are masked."""
    out = io.StringIO()
    configure_logging(level="info", fmt=fmt, stream=out, redactor=Redactor([KEY]))
    try:
        fail_with_secrets_in_locals()
    except ValueError as exc:
        structlog.get_logger("t").error(
            "background.failed", exc_info=exc, error=f"{exc} for {URL} with {KEY}"
        )
    text = out.getvalue()
    assert "fail_with_secrets_in_locals" in text  # the traceback is there
    for leak in (KEY, "RtspSecret987", "headers", "Authorization"):
        assert leak not in text
    assert "rtsp://admin:***@cam.test:554/live" in text


def test_library_log_lines_are_rendered_and_scrubbed_the_same_way():
    """A library's standard-logging warning with a traceback becomes one JSON line, with the
    logger's name, no locals and no secrets."""
    out = io.StringIO()
    configure_logging(level="info", fmt="json", stream=out, redactor=Redactor([KEY]))
    try:
        fail_with_secrets_in_locals()
    except ValueError:
        logging.getLogger("aiohttp.server").exception("Error handling request to %s", URL)
    logging.getLogger("aiohttp.access").info("below warning: not shown")
    (line,) = out.getvalue().splitlines()
    doc = json.loads(line)
    assert doc["logger"] == "aiohttp.server"
    assert doc["event"] == "Error handling request to rtsp://admin:***@cam.test:554/live"
    assert doc["exception"][0]["exc_type"] == "ValueError"
    assert "locals" not in doc["exception"][0]["frames"][0]
    assert KEY not in line
    assert "RtspSecret987" not in line


def test_non_string_values_are_scrubbed_too():
    """Objects logged as values (an exception, a nested list) are masked like strings."""
    out = io.StringIO()
    configure_logging(level="info", fmt="json", stream=out, redactor=Redactor([KEY]))
    structlog.get_logger("t").warning(
        "mavi.request_retry", error=RuntimeError(KEY), urls=[URL, {"nested": (URL,)}]
    )
    text = out.getvalue()
    assert KEY not in text
    assert "RtspSecret987" not in text
    (doc,) = [d for d in map(json.loads, text.splitlines()) if d["event"] == "mavi.request_retry"]
    assert doc["urls"][1]["nested"] == ["rtsp://admin:***@cam.test:554/live"]


def test_throttle_lets_one_through_per_interval_and_counts_the_rest():
    """The first occurrence passes at once, later ones within the interval are held back
    and counted, and the next one let through carries that count; keys are independent."""
    now = [0.0]
    throttle = Throttle(60, clock=lambda: now[0])
    assert throttle.allow("a") == 0
    assert [throttle.allow("a") for _ in range(3)] == [None, None, None]
    assert throttle.allow("b") == 0
    now[0] = 60.0
    assert throttle.allow("a") == 3
    assert throttle.allow("a") is None


def test_a_flood_of_library_errors_is_one_line():
    """aiohttp logging a traceback for each of a thousand malformed requests writes one line;
    another message still gets through."""
    out = io.StringIO()
    configure_logging(level="info", fmt="json", stream=out)
    server = logging.getLogger("aiohttp.server")
    for i in range(1000):
        try:
            raise ValueError(i)
        except ValueError:
            server.exception("Error handling request from %s", f"127.0.0.{i % 250}")
    server.error("something else")
    assert [json.loads(line)["event"] for line in out.getvalue().splitlines()] == [
        "Error handling request from 127.0.0.0",
        "something else",
    ]


def test_enabled_follows_the_configured_level():
    """`enabled(level)` says whether the configured logger writes a line at that level (the
    callback path skips building the debug line of a segment nobody will see)."""
    configure_logging(level="info", fmt="json", stream=io.StringIO())
    assert not enabled(logging.DEBUG)
    assert enabled(logging.INFO)
    configure_logging(level="debug", fmt="json", stream=io.StringIO())
    assert enabled(logging.DEBUG)
    structlog.reset_defaults()
    assert enabled(logging.DEBUG), "structlog's default logger writes every level"
