"""Start an aiohttp runner on host:port and learn the port it got (0 = any free port)."""

from __future__ import annotations

from aiohttp import web


async def bind(
    runner: web.AppRunner, host: str, port: int, *, what: str, backlog: int = 128
) -> int:
    """Listen with `runner` (already set up) and return the bound port. Any failure, including
    a socket family the sandbox forbids (asyncio then starts a server with no sockets), is an
    `OSError` naming `what` and the address; the runner is cleaned up first."""
    site = web.TCPSite(runner, host, port, backlog=backlog)
    address = f"{host}:{port}"
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise OSError(f"{what} cannot listen on {address}: {exc.strerror or exc}") from None
    server = site._server
    sockets = getattr(server, "sockets", None) or ()
    if not sockets:
        await runner.cleanup()
        raise OSError(f"{what} cannot listen on {address}: no socket could be opened")
    return int(sockets[0].getsockname()[1])
