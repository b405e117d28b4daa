"""The evidence archive: flagged segments' clips on disk, in the alert, in the library."""

from __future__ import annotations

import asyncio
import contextlib
import os
import stat
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from streamwatch.app import App
from streamwatch.config import EvidenceConfig, parse_config
from streamwatch.emulator import Script
from streamwatch.evidence import Evidence
from streamwatch.mavi.callbacks import SegmentReport
from streamwatch.store import EvidenceRecord, Location, Store
from tests.conftest import stream_toml
from tests.fakes.chat import ChatFakes
from tests.fakes.clips import ClipHost
from tests.fakes.serve import serve
from tests.test_alerts import SECRET as WHSEC
from tests.test_alerts_daemon import alerting, hook_alerts
from tests.test_app import builtin_config, run_until_segments


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
            + f'\n[evidence]\npath = "{archive}"\nupload = true\nallow_hosts = ["127.0.0.1"]\n'
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
    assert sorted(r.segment_index for r in records) == [0, 2]
    for r in records:
        assert r.error is None
        assert r.size == 64 * 1024
        assert len(await asyncio.to_thread(Path(r.path).read_bytes)) == 64 * 1024
        assert r.video_no in emulator.library.videos, "uploaded to the library"
    clip0 = next(r.path for r in records if r.segment_index == 0)
    assert alerts[0]["evidence"] == clip0
    assert not list(archive.rglob("*.part"))


async def test_retention_by_age_then_size(tmp_path: Path, location: Location):
    """Clips older than retention_days go first, then the oldest until under max_bytes."""
    now = [1_000_000.0]
    async with Store(location, clock=lambda: now[0]) as store:
        evidence = Evidence(
            config=EvidenceConfig(path=tmp_path, retention_days=1, max_bytes=250),
            store=store,
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
        assert [r.segment_index for r in await store.evidence()] == [2, 3]


# -- URLs from callbacks: SSRF, credentials, redirects ------------------------------------------


def report(url: str | None, index: int = 0, task: str = "task-1") -> SegmentReport:
    return SegmentReport(
        task_id=task,
        segment_index=index,
        start_time=0.0,
        end_time=5.0,
        video_url=url,
        unsafe=True,
        has_logo=None,
        logos=(),
        frames_processed=None,
        processing_ms=None,
        tokens=None,
    )


@dataclass
class Rig:
    evidence: Evidence
    store: Store
    committed: asyncio.Event

    async def rows_when(
        self, predicate: Callable[[list[EvidenceRecord]], bool]
    ) -> list[EvidenceRecord]:
        """The evidence rows once `predicate` holds, re-read after every store commit."""
        while True:
            self.committed.clear()
            rows = await self.store.evidence()
            if predicate(rows):
                return rows
            await self.committed.wait()


@contextlib.asynccontextmanager
async def archive(
    tmp_path: Path, trusted: tuple[str, ...] = (), **config: Any
) -> AsyncIterator[Rig]:
    """A running archive on a fresh store."""
    committed = asyncio.Event()
    async with Store(tmp_path / "s.db", on_commit=lambda *_: committed.set()) as store:
        evidence = Evidence(
            config=EvidenceConfig(path=tmp_path / "archive", **config),
            store=store,
            trusted_prefixes=trusted,
        )
        async with evidence.running():
            yield Rig(evidence, store, committed)


async def capture_all(rig: Rig, urls: list[str]) -> list[EvidenceRecord]:
    for i, url in enumerate(urls):
        rig.evidence.capture("cam", report(url, i))
    await rig.evidence.settle()
    return sorted(await rig.store.evidence(), key=lambda r: r.segment_index)


async def test_internal_clip_urls_are_refused_and_recorded(tmp_path: Path):
    """Without allow_hosts, clip URLs on loopback (any spelling, or a name resolving to it),
    link-local metadata, private ranges and non-http schemes are never fetched; each refusal
    is the evidence row's error, naming no credentials."""
    host = ClipHost()
    async with serve(host.app()) as base, archive(tmp_path) as rig:
        port = base.rsplit(":", 1)[1]
        urls = [
            f"{base}/clip/10",
            f"http://user:hunter2@localhost:{port}/clip/10",
            f"http://[::1]:{port}/clip/10",
            f"http://[::ffff:127.0.0.1]:{port}/clip/10",
            f"http://2130706433:{port}/clip/10",
            f"http://0177.0.0.1:{port}/clip/10",
            "http://169.254.169.254/latest/meta-data/iam/",
            "http://10.0.0.8/clip",
            "file:///etc/passwd",
            "javascript:alert(1)",
        ]
        rows = await capture_all(rig, urls)
    assert host.requests == []
    assert len(rows) == len(urls)
    for row in rows:
        assert row.error is not None
        assert row.error.startswith("refused"), row.error
        assert row.size == 0
        assert "hunter2" not in row.error
        assert "user" not in row.error
    assert not list((tmp_path / "archive").rglob("*.*"))


async def test_redirects_are_checked_at_every_hop(tmp_path: Path):
    """A redirect from an allowed host to an internal address is refused; redirects between
    allowed places are followed (a bounded number of times) without credentials or cookies."""
    host = ClipHost()
    internal = ClipHost()
    async with (
        serve(host.app()) as base,
        serve(internal.app()) as inner,
        archive(tmp_path, allow_hosts=["localhost"]) as rig,
    ):
        origin = "http://u:pw@localhost:" + base.rsplit(":", 1)[1]
        rows = await capture_all(
            rig,
            [
                f"{origin}/redirect?to={inner}/clip/5",
                f"{origin}/redirect?to=http://[::1]:{inner.rsplit(':', 1)[1]}/clip/5",
                f"{origin}/redirect?to=/clip/7",
                f"{origin}/redirect?to=ftp://localhost/clip",
                f"{origin}/redirect?to=/redirect?to=/redirect",
            ],
        )
    assert internal.requests == []
    assert [r.error is None for r in rows] == [False, False, True, False, False]
    assert (rows[0].error or "").startswith(f"refused {inner}/clip/5: 127.0.0.1 is a loopback")
    assert rows[2].size == 7
    assert "redirects" in (rows[4].error or "")
    assert host.requests
    for seen in host.requests:
        assert "Authorization" not in seen.headers
        assert "Cookie" not in seen.headers
    assert all("pw" not in (r.error or "") for r in rows)


async def test_emulator_clips_are_trusted_but_not_the_rest_of_it(tmp_path: Path, emulator):
    """The built-in emulator's clip prefix is fetched without allow_hosts; its other routes
    (its state shows the webhook URL) are not."""
    async with archive(tmp_path, trusted=(emulator.clips_url + "/",)) as rig:
        base = emulator.clips_url.removesuffix("/_emulator/clips")
        rows = await capture_all(
            rig, [f"{emulator.clips_url}/t/segment_0.mp4", f"{base}/_emulator/state"]
        )
    assert rows[0].error is None
    assert rows[0].size == 64 * 1024
    assert (rows[1].error or "").startswith("refused")


# -- leftovers, budgets, starvation -------------------------------------------------------------


async def test_failed_downloads_leave_no_part_files(tmp_path: Path):
    """A download refused for its size, or one that times out, removes its .part file."""
    host = ClipHost()
    async with (
        serve(host.app()) as base,
        archive(
            tmp_path,
            allow_hosts=["127.0.0.1"],
            max_clip_bytes=300 * 1024,
            download_timeout_seconds=0.3,
        ) as rig,
    ):
        rows = await capture_all(rig, [f"{base}/clip/{400 * 1024}", f"{base}/stall/{64 * 1024}"])
        host.release.set()
    assert rows[0].error == "clip larger than max_clip_bytes"
    assert rows[1].error == "clip download timed out after 0.3 s"
    assert list((tmp_path / "archive").rglob("*.part")) == []


async def test_stale_part_files_are_removed_at_start(tmp_path: Path):
    """.part files not written to for longer than the download timeout (a crash's leftovers)
    are deleted when the archive starts; younger ones are left alone."""
    folder = tmp_path / "archive" / "cam" / "t"
    folder.mkdir(parents=True)
    stale, fresh, clip = folder / "segment_1.part", folder / "segment_2.part", folder / "a.mp4"
    for f in (stale, fresh, clip):
        f.write_bytes(b"x" * 100)
    old = time.time() - 121
    os.utime(stale, (old, old))
    os.utime(clip, (old, old))
    async with archive(tmp_path, download_timeout_seconds=120):
        pass
    assert (stale.exists(), fresh.exists(), clip.exists()) == (False, True, True)


async def test_bytes_in_flight_count_toward_max_bytes(tmp_path: Path):
    """A download that would take the bytes in flight over max_bytes is abandoned (its .part
    removed, the error recorded), and retention makes room for the downloads under way."""
    host = ClipHost()
    async with (
        serve(host.app()) as base,
        archive(tmp_path, allow_hosts=["127.0.0.1"], max_bytes=1000) as rig,
    ):
        old = []
        for i in range(3):
            p = tmp_path / f"old{i}.mp4"
            p.write_bytes(b"o" * 300)
            await rig.store.record_evidence(
                stream="cam", task_id="t", segment_index=100 + i, path=str(p), size=300
            )
            old.append(p)
        # Both stall after 600 bytes: whichever is read second finds 1,200 in flight.
        rig.evidence.capture("cam", report(f"{base}/stall/600", 0))
        rig.evidence.capture("cam", report(f"{base}/stall/600", 1))
        rows = await rig.rows_when(lambda rows: any(r.error for r in rows))
        assert [r.error for r in rows if r.error] == ["downloads in flight would exceed max_bytes"]
        assert rig.evidence.partial_bytes == 600
        assert await rig.evidence.prune() == [str(old[0]), str(old[1])]
        host.release.set()
        await rig.evidence.settle()
        rows = await rig.store.evidence()
    assert sorted((r.size, r.error is None) for r in rows if r.segment_index < 2) == [
        (0, False),
        (600, True),
    ]
    assert list((tmp_path / "archive").rglob("*.part")) == []


async def test_a_full_queue_refuses_captures(tmp_path: Path):
    """With every download slot busy and max_queued_downloads waiting, a further capture is
    refused and recorded instead of piling up."""
    host = ClipHost()
    async with (
        serve(host.app()) as base,
        archive(
            tmp_path, allow_hosts=["127.0.0.1"], max_downloads=1, max_queued_downloads=1
        ) as rig,
    ):
        assert rig.evidence.capture("cam", report(f"{base}/hang", 0)) is not None
        await host.wait(lambda: host.stalled == 1)
        assert rig.evidence.capture("cam", report(f"{base}/clip/3", 1)) is not None
        assert rig.evidence.capture("cam", report(f"{base}/clip/3", 2)) is None
        host.release.set()
        await rig.evidence.settle()
        rows = {r.segment_index: r for r in await rig.store.evidence()}
    assert "max_queued_downloads" in (rows[2].error or "")
    assert rows[1].size == 3


async def test_clips_and_folders_are_private_whatever_the_umask(tmp_path: Path):
    """Under umask 000 the archive's folders are 0700 and its clips 0600."""
    host = ClipHost()
    previous = os.umask(0)
    try:
        async with serve(host.app()) as base, archive(tmp_path, allow_hosts=["127.0.0.1"]) as rig:
            rows = await capture_all(rig, [f"{base}/clip/10"])
    finally:
        os.umask(previous)
    clip = Path(rows[0].path)
    modes = [os.stat(p).st_mode for p in (clip, clip.parent, clip.parent.parent, clip.parents[2])]
    assert [stat.S_IMODE(m) for m in modes] == [0o600, 0o700, 0o700, 0o700]
    assert clip.parents[2] == tmp_path / "archive"


async def test_slow_clip_downloads_do_not_delay_a_stream_start(daemon, emulator, tmp_path):
    """150 clip downloads stuck on a slow host hold at most max_downloads connections of the
    archive's own pool: a stream added meanwhile starts against MAVI at once."""
    host = ClipHost()
    async with serve(host.app()) as base:
        extra = f'[evidence]\npath = "{tmp_path / "archive"}"\nallow_hosts = ["127.0.0.1"]\n'
        app = await daemon.start(stream_toml("first"), extra=extra)
        assert app.evidence is not None
        await daemon.wait(lambda: daemon.sup.running_count() == 1)
        for i in range(150):
            app.evidence.capture("first", report(f"{base}/hang", i))
        await host.wait(lambda: host.stalled == 4)
        daemon.write(stream_toml("first") + stream_toml("second"), extra=extra)
        assert await app.reload()
        await daemon.wait(lambda: daemon.state("second").task_id is not None)
        assert host.stalled == 4, "no more than max_downloads at once"
        host.release.set()
        await app.evidence.settle()
    assert len(host.requests) == 150


async def test_builtin_emulator_clips_are_archived_without_allow_hosts(tmp_path: Path):
    """With backend = "emulator" the in-process emulator's clips (and only its clip prefix)
    are trusted: flagged segments are archived without any allow_hosts."""
    text = (
        builtin_config(tmp_path / "s.db")
        + "evidence = true\n"
        + f'[emulator]\nunsafe_every = 1\n[evidence]\npath = "{tmp_path / "archive"}"\n'
    )
    await run_until_segments(App(parse_config(text, environ={}), environ={}), 2)
    async with Store(tmp_path / "s.db") as store:
        rows = await store.evidence()
    assert len(rows) >= 2
    assert [r.error for r in rows] == [None] * len(rows)
    assert all(r.size == 64 * 1024 for r in rows)


async def test_stop_abandons_stuck_downloads_and_says_so(tmp_path: Path):
    """Stopping does not wait out the download timeout: captures still stuck after the short
    grace are abandoned, their .part removed and their rows saying why."""
    host = ClipHost()
    async with serve(host.app()) as base:
        async with archive(tmp_path, allow_hosts=["127.0.0.1"], max_downloads=1) as rig:
            rig.evidence.capture("cam", report(f"{base}/stall/1000", 0))
            rig.evidence.capture("cam", report(f"{base}/clip/10", 1))
            await host.wait(lambda: host.stalled == 1)
        host.release.set()
    async with Store(tmp_path / "s.db") as store:
        rows = sorted(await store.evidence(), key=lambda r: r.segment_index)
    assert [r.error for r in rows] == [
        "abandoned: streamwatch stopped before the clip was downloaded"
    ] * 2
    assert list((tmp_path / "archive").rglob("*.part")) == []
