"""SIGKILL while alerts are pending: after a restart every one of them still arrives."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

from streamwatch.store import Location
from tests import pg
from tests.conftest import free_port, spawn_daemon, storage_toml
from tests.fakes.chat import Answer, ChatFakes
from tests.fakes.serve import serve
from tests.test_alerts import SECRET as WHSEC


def config(tmp_path: Path, location: Location, port: int) -> Path:
    path = tmp_path / "streams.toml"
    path.write_text(f"""
[mavi]
backend = "emulator"
segment_seconds = 0.05
[server]
listen = "127.0.0.1:{port}"
[storage]
{storage_toml(location)}
[supervisor]
tick_seconds = 0.02
[[emulator.scripts]]
url = "rtmp://cams.test/bad"
outcomes = ["unsafe"]
[alerts]
retry_initial_seconds = 0.05
retry_max_seconds = 0.1
poll_seconds = 0.05
[[alerts.sinks]]
name = "hook"
type = "webhook"
url = {{ env = "HOOK_URL" }}
secret = {{ env = "HOOK_SECRET" }}
max_attempts = 100
[[alerts.rules]]
name = "unsafe"
events = ["unsafe_content"]
sinks = ["hook"]
cooldown_seconds = 0
group_seconds = 0
[[streams]]
name = "bad"
url = "rtmp://cams.test/bad"
""")
    return path


def outbox(location: Location) -> dict[str, str]:
    return dict(pg.rows(location, "SELECT alert_id, state FROM alert_outbox"))


async def test_pending_alerts_survive_sigkill(tmp_path: Path, location: Location):
    """Alerts the receiver refused are in the outbox; SIGKILL loses none of them."""
    fakes = ChatFakes(WHSEC)
    fakes.script["webhook"] = [Answer(503)] * 10_000  # the receiver is down
    async with serve(fakes.app) as base:
        env = {"HOOK_URL": f"{base}/webhook", "HOOK_SECRET": WHSEC}
        path = config(tmp_path, location, free_port())
        daemon = await spawn_daemon(path, env)
        async with asyncio.timeout(30):
            await fakes.wait(lambda: fakes.attempts["webhook"] >= 10)
        daemon.send_signal(signal.SIGKILL)
        await daemon.wait()
        pending = outbox(location)
        assert pending, "alerts were written before delivery was tried"
        assert set(pending.values()) == {"pending"}

        fakes.script["webhook"] = []  # the receiver is back
        daemon = await spawn_daemon(path, env)
        try:
            async with asyncio.timeout(30):
                await fakes.wait(
                    lambda: (
                        set(pending)
                        <= {
                            a["id"]
                            for m in fakes.received["webhook"]
                            for a in m["doc"]["data"]["alerts"]
                        }
                    )
                )
        finally:
            daemon.send_signal(signal.SIGTERM)
            await daemon.wait()
    delivered = [a["id"] for m in fakes.received["webhook"] for a in m["doc"]["data"]["alerts"]]
    assert len(delivered) == len(set(delivered)), "each alert arrives once here"
    assert fakes.invalid == []
