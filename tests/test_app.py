"""The App with the built-in emulator backend, as the README's first command runs it."""

from __future__ import annotations

import asyncio
from pathlib import Path

from pymavi import MaviClient
from structlog.testing import capture_logs

from streamwatch.app import App
from streamwatch.config import parse_config
from streamwatch.store import Store
from tests.conftest import free_port, stream_toml


def builtin_config(db: Path) -> str:
    return f"""
[mavi]
backend = "emulator"
segment_seconds = 0.05
[server]
listen = "127.0.0.1:0"
[storage]
path = "{db}"
[supervisor]
tick_seconds = 0.02
on_shutdown = "keep"
[[streams]]
name = "cam"
url = "rtmp://cams.test/cam"
"""


async def run_until_segments(app: App, n: int) -> None:
    serving = asyncio.create_task(app.serve())
    await app.started.wait()
    assert app.supervisor is not None
    sup = app.supervisor
    async with asyncio.timeout(10):
        await sup.wait_until(
            lambda: (s := sup.streams.get("cam")) is not None and s.run_segments >= n
        )
    app.request_stop()
    await serving


async def test_builtin_emulator_runs_and_stops_its_tasks_on_shutdown(tmp_path: Path):
    """With the built-in backend segments flow with no account, and a restart starts afresh
    instead of adopting tasks that died with the previous process."""
    cfg = parse_config(builtin_config(tmp_path / "s.db"), environ={})
    first = App(cfg, environ={})
    await run_until_segments(first, 2)
    assert first.emulator is not None
    assert not first.emulator.running_tasks()
    await run_until_segments(App(cfg, environ={}), 1)
    async with Store(tmp_path / "s.db") as store:
        tasks = await store.tasks("cam")
        kinds = [e.kind for e in await store.events(stream="cam")]
    assert len(tasks) == 2
    assert all(t.ended_at is not None for t in tasks)
    assert "task_adopted" not in kinds


async def test_builtin_emulator_listens_where_configured(tmp_path: Path):
    """`[emulator] listen` puts the built-in emulator on a known port, so a program (here the
    vendor's SDK) reaches its batch API while the daemon runs; the startup log names both URLs."""
    port = free_port()
    text = builtin_config(tmp_path / "s.db") + f'[emulator]\nlisten = "127.0.0.1:{port}"\n'
    app = App(parse_config(text, environ={}), environ={})
    with capture_logs() as logs:
        serving = asyncio.create_task(app.serve())
        await app.started.wait()
    assert app.emulator is not None
    listening = [e for e in logs if e["event"] == "emulator.listening"]
    batch = f"http://127.0.0.1:{port}/api/serve/video"
    assert [(e["base_url"], e["batch_base_url"]) for e in listening] == [
        (f"http://127.0.0.1:{port}/serve/api/v2", batch)
    ]
    sdk = MaviClient("any-key", base_url=batch + "/")
    video = tmp_path / "clip.mp4"
    video.write_bytes(b"\x00" * 1024)
    try:
        video_no, _ = await asyncio.to_thread(sdk.upload_video, str(video))
        await app.emulator.library.settle()
        assert list(await asyncio.to_thread(sdk.search_video_metadata)) == [video_no]
    finally:
        app.request_stop()
        await serving


async def test_segment_retention_prunes_while_the_daemon_runs(daemon):
    """With `segment_retention_days` set, a pass of the retention loop deletes the segment
    records older than it while callbacks keep being stored; the stream's totals (counters,
    status) keep every segment."""
    # 0.00002 days = 1.7 s. Segments come every 0.05 s here: 60 of them take 3 s.
    await daemon.start(stream_toml("a"), storage="segment_retention_days = 0.00002")
    await daemon.wait(lambda: daemon.state("a").run_segments >= 60)
    task_id = daemon.state("a").task_id
    assert task_id is not None
    await daemon.app.prune_once()
    assert (await daemon.store.segment_indexes(task_id))[0] > 0
    kept = await daemon.store.segment_count(task_id=task_id)
    row = await daemon.store.task(task_id)
    assert row is not None
    assert row.segments > kept
    now = daemon.state("a").run_segments
    await daemon.wait(lambda: daemon.state("a").run_segments > now)
