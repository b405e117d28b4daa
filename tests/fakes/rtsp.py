"""An RTSP server that wants credentials and takes none: what a camera answers a player with
a wrong password (401 with a Basic challenge, to every request)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator


async def _answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            cseq = next(
                (
                    line.split(b":", 1)[1].strip()
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"cseq:")
                ),
                b"0",
            )
            writer.write(
                b"RTSP/1.0 401 Unauthorized\r\nCSeq: " + cseq + b"\r\n"
                b'WWW-Authenticate: Basic realm="camera"\r\nContent-Length: 0\r\n\r\n'
            )
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


@contextlib.asynccontextmanager
async def refusing_rtsp() -> AsyncIterator[str]:
    """Yield rtsp://127.0.0.1:PORT of a server that refuses every player."""
    server = await asyncio.start_server(_answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"rtsp://127.0.0.1:{port}"
    finally:
        server.close()
        await server.wait_closed()
