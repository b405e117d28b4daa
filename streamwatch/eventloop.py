"""The event loop `streamwatch run` serves on: uvloop when it is installed (the `speed`
extra: `pip install 'streamwatch[speed]'`), else asyncio's own.

uvloop makes aiohttp's part of every request cheaper (the HTTP parsing, the socket writes).
`STREAMWATCH_EVENT_LOOP=asyncio` keeps asyncio's loop even when uvloop is installed;
`=uvloop` insists on it (an error if it is missing); unset or `auto`, uvloop if present.
"""

from __future__ import annotations

import asyncio
import importlib
import os
from collections.abc import Callable, Coroutine, Mapping
from typing import Any, TypeVar

__all__ = ["ENV", "EventLoopError", "loop_factory", "run"]

ENV = "STREAMWATCH_EVENT_LOOP"
T = TypeVar("T")
LoopFactory = Callable[[], asyncio.AbstractEventLoop]


class EventLoopError(RuntimeError):
    """The event loop asked for cannot be had."""


def loop_factory(environ: Mapping[str, str] | None = None) -> tuple[str, LoopFactory | None]:
    """The loop's name (`uvloop` or `asyncio`) and its factory (None: asyncio's default)."""
    choice = (os.environ if environ is None else environ).get(ENV, "auto").strip() or "auto"
    if choice not in ("auto", "asyncio", "uvloop"):
        raise EventLoopError(f"{ENV} must be auto, asyncio or uvloop (got {choice!r})")
    if choice == "asyncio":
        return "asyncio", None
    try:
        uvloop = importlib.import_module("uvloop")
    except ImportError:
        if choice == "uvloop":
            raise EventLoopError(
                f"{ENV}=uvloop but uvloop is not installed: pip install 'streamwatch[speed]'"
            ) from None
        return "asyncio", None
    factory: LoopFactory = uvloop.new_event_loop
    return "uvloop", factory


def run(main: Coroutine[Any, Any, T], *, environ: Mapping[str, str] | None = None) -> T:
    """`asyncio.run(main)` on the loop `loop_factory` picks."""
    try:
        _, factory = loop_factory(environ)
    except EventLoopError:
        main.close()
        raise
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main)
