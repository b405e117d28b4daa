"""The event loop `streamwatch run` serves on (streamwatch.eventloop)."""

from __future__ import annotations

import asyncio

import pytest

from streamwatch.eventloop import ENV, EventLoopError, loop_factory, run


async def _loop_module() -> str:
    return type(asyncio.get_running_loop()).__module__.partition(".")[0]


def test_uvloop_is_used_when_installed():
    """With uvloop installed (the dev extra has it) and no choice made, the daemon's coroutine
    runs on uvloop."""
    assert loop_factory({})[0] == "uvloop"
    assert run(_loop_module(), environ={}) == "uvloop"


def test_asyncio_can_be_insisted_on():
    """STREAMWATCH_EVENT_LOOP=asyncio keeps asyncio's own loop even with uvloop installed."""
    assert loop_factory({ENV: "asyncio"}) == ("asyncio", None)
    assert run(_loop_module(), environ={ENV: "asyncio"}) == "asyncio"


def test_an_unknown_choice_is_one_clear_error():
    """A misspelt STREAMWATCH_EVENT_LOOP is refused with the values it takes, before any loop
    runs (the coroutine is closed, not left unawaited)."""
    with pytest.raises(EventLoopError, match="auto, asyncio or uvloop"):
        run(_loop_module(), environ={ENV: "uv-loop"})
