"""The evidence archive: flagged segments' clips on disk, in the alert, in the library."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp

from streamwatch.config import EvidenceConfig
from streamwatch.emulator import Script
from streamwatch.evidence import Evidence
from streamwatch.store import Store
from tests.conftest import stream_toml
from tests.fakes.chat import ChatFakes
from tests.fakes.serve import serve
from tests.test_alerts import SECRET as WHSEC
from tests.test_alerts_daemon import alerting, hook_alerts


async def test_flagged_segments_are_archived_and_named_in_the_alert(daemon, emulator, tmp_path):
    """Unsafe and watch-listed logo segments are downloaded; safe ones are not; the alert says
    where the clip is; with upload on, the clip is also in the MAVI library."""
    fakes = ChatFakes(WHSEC)
    url = "rtmp://cams.test/door"
    emulator.scripts[url] = Script(
        outcomes=["unsafe", "safe", "logo:Acme", "logo:Other"], then="end:14"
    )
    archive = tmp_path / "archive"
    async with serve(fakes.app) as base:
        extra = (
            alerting(
                daemon,
                base,
                """
[[alerts.rules]]
name = "unsafe"
events = ["unsafe_content"]
sinks = ["hook"]
group_seconds = 0
""",
            )
            + f'\n[evidence]\npath = "{archive}"\nupload = true\n'
        )
        await daemon.start(
            stream_toml("door", url, logo_detection=True)
            + 'evidence = true\nwatch_logos = ["Acme"]\n',
            extra=extra,
        )
        await daemon.wait(
            lambda: daemon.state("door").task_id is None and daemon.state("door").run_segments >= 4
        )
        assert daemon.app is not None
        assert daemon.app.evidence is not None
        await daemon.app.evidence.settle()
        async with asyncio.timeout(10):
            await fakes.wait(lambda: len(fakes.received["webhook"]) >= 1)
        alerts = await hook_alerts(fakes)
    records = await daemon.store.evidence()
    assert sorted(r["segment_index"] for r in records) == [0, 2]
    for r in records:
        assert r["error"] is None
        assert r["size"] == 64 * 1024
        assert len(await asyncio.to_thread(Path(r["path"]).read_bytes)) == 64 * 1024
        assert r["video_no"] in emulator.library.videos, "uploaded to the library"
    clip0 = next(r["path"] for r in records if r["segment_index"] == 0)
    assert alerts[0]["evidence"] == clip0
    assert not list(archive.rglob("*.part"))


async def test_retention_by_age_then_size(tmp_path: Path):
    """Clips older than retention_days go first, then the oldest until under max_bytes."""
    now = [1_000_000.0]
    async with (
        aiohttp.ClientSession() as session,
        Store(tmp_path / "s.db", clock=lambda: now[0]) as store,
    ):
        evidence = Evidence(
            config=EvidenceConfig(path=tmp_path, retention_days=1, max_bytes=250),
            store=store,
            session=session,
            clock=lambda: now[0],
        )
        paths = []
        for i, (age_days, size) in enumerate([(3, 100), (0.5, 100), (0.2, 100), (0.1, 100)]):
            now[0] = 1_000_000.0 - age_days * 86_400
            p = tmp_path / f"c{i}.mp4"
            p.write_bytes(b"x" * size)
            await store.record_evidence(
                stream="s", task_id="t", segment_index=i, path=str(p), size=size
            )
            paths.append(p)
        now[0] = 1_000_000.0
        removed = await evidence.prune()
        assert removed == [str(paths[0]), str(paths[1])]
        assert [p.exists() for p in paths] == [False, False, True, True]
        assert [r["segment_index"] for r in await store.evidence()] == [2, 3]
