"""structlog set-up: readable on a terminal, JSON lines otherwise, with no secret in any line.

Every line, whether from structlog or from a library's standard `logging` call, goes through
the same processors: tracebacks are rendered without local variables (a frame's locals hold
API keys, headers and stream URLs), and then every string in the event, the exception text
included, passes through a `Redactor`. A library's repeated line (aiohttp's "Error handling
request" for each malformed request, asyncio's errors) is let through once a minute, with the
count of those held back: a flood of bad requests cannot become a flood of tracebacks.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Hashable, Mapping, MutableMapping
from typing import Any, Literal, TextIO

import structlog
from structlog.tracebacks import ExceptionDictTransformer

from streamwatch.redact import Redactor

__all__ = ["REPEAT_SECONDS", "Throttle", "configure_logging", "enabled", "scrub"]

# The same library line (or rate-limited daemon report) at most once per this many seconds.
REPEAT_SECONDS = 60.0

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}
_PLAIN = (str, int, float, bool, type(None))


def scrub(value: Any, redact: Callable[[str], str]) -> Any:
    """`value` with `redact` applied to every string in it, nested dicts and lists included.
    Other objects become their `repr()` (what the JSON renderer would print) redacted."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, _PLAIN):
        return value
    if isinstance(value, Mapping):
        return {k: scrub(v, redact) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [scrub(v, redact) for v in value]
    return redact(repr(value))


class Throttle:
    """Lets the first occurrence of each key through, then at most one per `interval`
    seconds, and counts the ones held back in between."""

    def __init__(
        self,
        interval: float = REPEAT_SECONDS,
        *,
        clock: Callable[[], float] = time.monotonic,
        max_keys: int = 1024,
    ) -> None:
        self.interval = interval
        self._clock = clock
        self._max_keys = max_keys
        self._last: dict[Hashable, float] = {}
        self._held: dict[Hashable, int] = {}

    def allow(self, key: Hashable = None) -> int | None:
        """None if this occurrence is to be held back; otherwise how many were held back
        since the last one let through."""
        now = self._clock()
        last = self._last.get(key)
        if last is not None and now - last < self.interval:
            self._held[key] = self._held.get(key, 0) + 1
            return None
        if len(self._last) >= self._max_keys and key not in self._last:
            # Keys are message templates; a library formatting its own text could make them
            # unbounded. Forgetting them all costs at most one extra line each.
            self._last.clear()
            self._held.clear()
        self._last[key] = now
        return self._held.pop(key, 0)


class _Repeats(logging.Filter):
    """Standard-library records: each (logger, message template, level) through `Throttle`;
    a record let through after others were held back carries `suppressed=N`."""

    def __init__(self) -> None:
        super().__init__()
        self._throttle = Throttle()

    def filter(self, record: logging.LogRecord) -> bool:
        held = self._throttle.allow((record.name, str(record.msg), record.levelno))
        if held is None:
            return False
        if held:
            record.suppressed = held
        return True


class _Scrub:
    """The structlog processor that masks secrets in every value of an event."""

    def __init__(self, redactor: Redactor) -> None:
        self.redactor = redactor

    def __call__(
        self, logger: Any, name: str, event_dict: MutableMapping[str, Any]
    ) -> MutableMapping[str, Any]:
        for key, value in event_dict.items():
            if key.startswith("_"):  # structlog's own bookkeeping (the stdlib record)
                continue
            event_dict[key] = scrub(value, self.redactor)
        return event_dict


def _without_locals(exc_info: Any) -> list[dict[str, Any]]:
    """Tracebacks as dicts with no trace of frame locals: structlog 24.1 still writes
    ``"locals": null`` with ``show_locals=False``; later releases leave the key out."""
    stacks: list[dict[str, Any]] = ExceptionDictTransformer(show_locals=False)(exc_info)
    for stack in stacks:
        for frame in stack.get("frames", ()):
            frame.pop("locals", None)
    return stacks


# The filtering wrapper `configure_logging` installed last, and its level.
_configured: tuple[type, int] | None = None


def enabled(level: int) -> bool:
    """Would a line at `level` be logged, as structlog is configured now? For a hot path to
    skip building a line the filtering logger would drop (each call through the module's
    lazy logger binds a new one first). The level is the one `configure_logging` gave the
    wrapper still installed (structlog 24.1, our floor, cannot say a wrapper's level), else
    what the wrapper says, else True (it may log)."""
    wrapper = structlog.get_config()["wrapper_class"]
    if _configured is not None and _configured[0] is wrapper:
        return level >= _configured[1]
    effective = getattr(wrapper, "get_effective_level", None)
    if effective is None:
        return True
    try:
        return bool(level >= effective(None))
    except Exception:  # noqa: BLE001 - a wrapper that needs a real instance: assume it logs
        return True


def configure_logging(
    *,
    level: Literal["debug", "info", "warning", "error"] = "info",
    fmt: Literal["auto", "json", "console"] = "auto",
    stream: TextIO | None = None,
    redactor: Redactor | None = None,
) -> None:
    """Configure structlog, and the standard `logging` root (libraries: warnings and worse),
    for the process. Called from the command line entry. `redactor` masks the secrets the
    caller registered with it; without one, URL credentials are still masked."""
    out = stream or sys.stderr
    console = fmt == "console" or (fmt == "auto" and out.isatty())
    renderer: structlog.typing.Processor = (
        # plain_traceback: rich's or better-exceptions' formatters, picked by default when
        # installed, would print every frame's locals.
        structlog.dev.ConsoleRenderer(
            colors=out.isatty(), exception_formatter=structlog.dev.plain_traceback
        )
        if console
        else structlog.processors.JSONRenderer()
    )
    exceptions: structlog.typing.Processor = (
        # The text is made here, before scrubbing, rather than by the console renderer.
        structlog.processors.format_exc_info
        if console
        else structlog.processors.ExceptionRenderer(_without_locals)
    )
    scrubber = _Scrub(redactor or Redactor())
    timestamper = structlog.processors.TimeStamper(fmt="iso", utc=True)
    global _configured
    wrapper = structlog.make_filtering_bound_logger(_LEVELS[level])
    _configured = (wrapper, _LEVELS[level])
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            timestamper,
            exceptions,
            scrubber,
            renderer,
        ],
        wrapper_class=wrapper,
        logger_factory=structlog.PrintLoggerFactory(file=out),
        cache_logger_on_first_use=False,
    )
    handler = logging.StreamHandler(out)
    handler.set_name("streamwatch")
    handler.addFilter(_Repeats())
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[
                structlog.stdlib.add_log_level,
                structlog.stdlib.add_logger_name,
                structlog.stdlib.ExtraAdder(allow=["suppressed"]),
                timestamper,
            ],
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                exceptions,
                scrubber,
                renderer,
            ],
        )
    )
    root = logging.getLogger()
    for old in [h for h in root.handlers if h.get_name() == "streamwatch"]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(max(logging.WARNING, _LEVELS[level]))
