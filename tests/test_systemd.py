"""systemd notify: READY, WATCHDOG, RELOADING/READY and STOPPING on a fake $NOTIFY_SOCKET."""

from __future__ import annotations

import asyncio
import signal
import socket
import time
from pathlib import Path

from streamwatch.app import App
from streamwatch.config import parse_config
from streamwatch.systemd import Notifier
from tests.conftest import free_port, spawn_daemon


def listener(tmp_path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify.sock"))
    sock.setblocking(False)
    return sock


def drain(sock: socket.socket) -> list[str]:
    """Every message waiting on the socket (a sendto is in the buffer when it returns)."""
    out = []
    while True:
        try:
            out.append(sock.recv(4096).decode())
        except BlockingIOError:
            return out


async def receive_until(sock: socket.socket, key: str, seen: list[str]) -> None:
    """Await datagrams until one contains `key`, keeping them all in `seen`."""
    loop = asyncio.get_running_loop()
    while True:
        message = (await loop.sock_recv(sock, 4096)).decode()
        seen.append(message)
        if key in message:
            return


def config(tmp_path: Path, port: int | None = None) -> Path:
    path = tmp_path / "streams.toml"
    path.write_text(f"""
[mavi]
backend = "emulator"
segment_seconds = 0.05
[server]
listen = "127.0.0.1:{port or free_port()}"
[storage]
path = "{tmp_path / "state.db"}"
[[streams]]
name = "cam"
url = "rtmp://cams.test/cam"
""")
    return path


def test_without_a_socket_nothing_happens():
    """No $NOTIFY_SOCKET: every call is a no-op and there is no watchdog."""
    notifier = Notifier({})
    assert not notifier.enabled
    assert notifier.notify(ready=1) is False
    assert notifier.watchdog_seconds is None
    assert (
        Notifier(
            {"NOTIFY_SOCKET": "/x", "WATCHDOG_USEC": "2000000", "WATCHDOG_PID": "1"}
        ).watchdog_seconds
        is None
    ), "another process's watchdog"


async def test_lifecycle_messages_in_order(tmp_path: Path):
    """A real daemon says READY, pings WATCHDOG, wraps a reload in RELOADING/READY, then says
    STOPPING, and exits cleanly."""
    sock = listener(tmp_path)
    messages: list[str] = []

    async def until(key: str, count: int = 1) -> None:
        async with asyncio.timeout(20):
            while sum(key in m for m in messages) < count:
                await receive_until(sock, key, messages)

    env = {"NOTIFY_SOCKET": str(tmp_path / "notify.sock"), "WATCHDOG_USEC": "200000"}
    proc = await spawn_daemon(config(tmp_path), env)
    try:
        await until("WATCHDOG=1", 3)
        proc.send_signal(signal.SIGHUP)
        await until("RELOADING=1")
        await until("READY=1", 2)
        proc.send_signal(signal.SIGTERM)
        assert await proc.wait() == 0
        messages.extend(drain(sock))
    finally:
        if proc.returncode is None:
            proc.kill()
        sock.close()

    def first(key: str, after: int = -1) -> int:
        return next(i for i, m in enumerate(messages) if key in m and i > after)

    ready = first("READY=1")
    assert first("WATCHDOG=1") > ready
    reloading = first("RELOADING=1")
    assert "MONOTONIC_USEC=" in messages[reloading]
    assert first("READY=1", after=reloading) > reloading
    assert first("STOPPING=1") > reloading
    assert any(m.startswith("STATUS=") and "streams running" in m for m in messages)


async def test_a_wedged_event_loop_stops_the_watchdog(tmp_path: Path):
    """While the event loop is blocked no WATCHDOG=1 is sent; once it runs again, pings resume."""
    sock = listener(tmp_path)
    env = {"NOTIFY_SOCKET": str(tmp_path / "notify.sock"), "WATCHDOG_USEC": "20000"}
    app = App(parse_config(config(tmp_path).read_text(), environ={}), environ=env)
    serving = asyncio.create_task(app.serve())
    try:
        await app.started.wait()
        async with asyncio.timeout(10):
            await receive_until(sock, "WATCHDOG=1", [])
        drain(sock)
        # Wedge the loop on purpose: ten watchdog periods pass with nothing able to run.
        time.sleep(0.2)  # noqa: ASYNC251
        assert not [m for m in drain(sock) if "WATCHDOG=1" in m]
        async with asyncio.timeout(10):
            await receive_until(sock, "WATCHDOG=1", [])
    finally:
        app.request_stop()
        await serving
        sock.close()


async def test_no_ready_when_the_port_is_taken(tmp_path: Path):
    """READY=1 means the server is bound: with its port taken the daemon exits 1, names the
    address in its error, and never says READY (systemd then reports a failed start)."""
    sock = listener(tmp_path)
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = busy.getsockname()[1]
    path = config(tmp_path, port)
    env = {"NOTIFY_SOCKET": str(tmp_path / "notify.sock")}
    try:
        proc = await spawn_daemon(path, env, capture=True)
        async with asyncio.timeout(30):
            output, _ = await proc.communicate()
        assert proc.returncode == 1
        assert f"the server cannot listen on 127.0.0.1:{port}" in output.decode()
        assert not any("READY=1" in m for m in drain(sock))
    finally:
        busy.close()
        sock.close()
