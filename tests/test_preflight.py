"""Preflight end to end, against real media: a real RTMP server (nginx-rtmp) fed by ffmpeg, the
daemon probing it before each start, and the emulator's task following the same source (it
ends with 15 when the feed stops, as MAVI does). Skipped without ffmpeg and nginx-rtmp, unless
STREAMWATCH_REQUIRE_TOOLS=1."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp

from streamwatch.cli import render_status
from streamwatch.emulator.script import Script
from streamwatch.policy import Phase
from streamwatch.store import Store
from tests.conftest import Daemon, free_port, stream_toml, tool
from tests.media import LiveSource, LiveSources, Pattern

PASSWORD = "pa55-w0rd-preflight"
SMALL = Pattern(width=320, height=240, fps=15, audio=False)
# A live probe reads 2 s of media; the RTMP handshake and a cold ffprobe add to that.
PROBE_TIMEOUT = 8


def with_password(source: LiveSource) -> str:
    """The source's URL with credentials in it (nginx-rtmp ignores them, the logs must not
    show them)."""
    return source.url.replace("rtmp://", f"rtmp://viewer:{PASSWORD}@")


async def preflighted(daemon: Daemon, url: str, *, fps: int = 1) -> None:
    """Run the daemon with one stream on `url`, preflight on, its emulated task following the
    real source."""
    daemon.emulator.scripts[url] = Script(follow_source=True)
    daemon.emulator.source_timeout_seconds = PROBE_TIMEOUT
    stream = stream_toml(
        "cam", url, fps=fps, preflight=True, preflight_timeout_seconds=PROBE_TIMEOUT
    )
    # The emulated task sends nothing before its own first probe has seen the source (2-3 s):
    # no stall before that.
    await daemon.start(stream, stall_after_segments=600)


async def status(daemon: Daemon) -> dict[str, Any]:
    assert daemon.app is not None
    assert daemon.app.server is not None
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"{daemon.app.server.base_url}/api/v1/status") as resp,
    ):
        return dict(await resp.json())


async def test_an_offline_source_is_not_started_until_it_is_back(
    daemon: Daemon, live_sources: LiveSources, capsys
):
    """Source down: no start and no pre-charge at MAVI, state source_offline (event and alert
    opened once, the avoided pre-charges counted and priced); source back: one start, the
    offline event resolved, the probe's summary in the status API; the URL's password never
    shown."""
    source = await live_sources.rtmp(SMALL)
    await source.stop()  # the server is up, nothing publishes
    await preflighted(daemon, with_password(source))
    await daemon.wait(lambda: daemon.state("cam").precharges_avoided >= 2, within=40)
    state = daemon.state("cam")
    assert state.phase is Phase.SOURCE_OFFLINE
    assert daemon.emulator.starts == []
    assert daemon.emulator.charges == []
    # fps 1, content moderation: a pre-charge is one segment, 3 * (1 + 1) ticks.
    assert state.ticks_saved == 6 * state.precharges_avoided
    doc = await status(daemon)
    (cam,) = doc["streams"]
    assert cam["state"] == "source_offline"
    assert cam["source_offline_since"] is not None
    assert cam["precharges_avoided"] >= 2
    assert cam["probes"].get("ok", 0) == 0
    assert doc["preflight"]["precharges_avoided"] == cam["precharges_avoided"]
    table = render_status(doc)  # type: ignore[arg-type]  # the document, as JSON gave it
    assert "offline" in table.splitlines()[1]
    assert "pre-charge(s) avoided" in table

    await source.start()
    await daemon.wait(lambda: daemon.state("cam").phase is Phase.RUNNING, within=40)
    assert len(daemon.emulator.starts) == 1
    kinds = [e.kind for e in await daemon.events(stream="cam")]
    assert kinds.count("source_offline") == 1
    assert kinds.index("source_offline") < kinds.index("source_online")
    assert kinds.index("source_online") < kinds.index("task_started")
    doc = await status(daemon)
    (cam,) = doc["streams"]
    assert cam["source"]["video_codec"] == "h264"
    assert cam["source"]["resolution"] == "320x240"
    assert cam["source"]["fps"] == 15
    assert cam["source_offline_since"] is None
    assert cam["probes"]["ok"] == 1
    assert "h264 320x240 15fps" in render_status(doc)  # type: ignore[arg-type]
    text = str(doc) + capsys.readouterr().out
    text += "".join(e.detail for e in await daemon.events())
    assert PASSWORD not in text
    assert "supervisor.source_offline" in text  # the log was read


async def test_a_task_ended_by_its_source_restarts_only_once_the_source_is_back(
    daemon: Daemon, live_sources: LiveSources
):
    """The feed stops mid-task: the emulator ends the task with 15, and the daemon does not
    start again (probes only) until the source is back, then starts once. fps above the
    source's frame rate is warned about once, not again for the same source."""
    source = await live_sources.rtmp(SMALL)
    await preflighted(daemon, source.url, fps=20)
    await daemon.wait(lambda: daemon.state("cam").run_segments >= 2, within=40)
    first = daemon.state("cam").task_id
    assert len(daemon.emulator.starts) == 1

    await source.stop()
    await daemon.wait(lambda: daemon.state("cam").precharges_avoided >= 2, within=40)
    assert daemon.state("cam").last_end_status == 15
    assert daemon.state("cam").phase is Phase.SOURCE_OFFLINE
    assert len(daemon.emulator.starts) == 1

    await source.start()
    await daemon.wait(
        lambda: daemon.state("cam").phase is Phase.RUNNING and daemon.state("cam").task_id != first,
        within=40,
    )
    assert len(daemon.emulator.starts) == 2
    warned = [e for e in await daemon.events(stream="cam") if e.kind == "fps_above_source"]
    assert len(warned) == 1
    assert "fps = 20" in warned[0].detail
    assert "15" in warned[0].detail


async def test_a_probe_under_way_holds_up_no_other_stream_and_no_shutdown(daemon: Daemon):
    """A preflight probe of a source that never answers runs in the background: another
    stream starts meanwhile, and a shutdown cancels the probe instead of waiting for its
    timeout (longer than the test's own)."""
    tool("ffprobe")
    accepted = asyncio.Event()

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.set()
        await reader.read()  # answers nothing, until the prober goes
        writer.close()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        streams = stream_toml(
            "cam",
            f"rtmp://127.0.0.1:{port}/live/test",
            preflight=True,
            preflight_timeout_seconds=120,
        )
        await daemon.start(streams + stream_toml("other"))
        async with asyncio.timeout(20):
            await accepted.wait()
        await daemon.wait(lambda: daemon.state("other").phase is Phase.RUNNING)
        assert daemon.state("cam").phase is Phase.STARTING  # still probing
        await daemon.stop()
        assert [s.url for s in daemon.emulator.starts] == ["rtmp://cams.test/other"]
    finally:
        server.close()
        await server.wait_closed()


async def test_an_outage_and_what_it_saved_survive_a_restart(daemon: Daemon):
    """What preflight counted (since when the source is offline, probes, pre-charges avoided)
    is in the state file: the next process goes on from it, without a second
    `source_offline` event for the same outage, and still starts nothing."""
    tool("ffprobe")
    closed = free_port()  # nothing listens: connection refused
    await daemon.start(
        stream_toml("cam", f"rtmp://127.0.0.1:{closed}/live/x", preflight=True),
        stall_after_segments=600,
    )
    await daemon.wait(lambda: daemon.state("cam").precharges_avoided >= 2)
    await daemon.stop()
    async with Store(daemon.location) as store:
        kept = (await store.streams())["cam"]
    assert kept.offline_since is not None
    assert kept.precharges_avoided >= 2
    assert dict(kept.probes)["unreachable"] == kept.precharges_avoided
    await daemon.start()
    assert daemon.state("cam").offline_since == kept.offline_since
    await daemon.wait(lambda: daemon.state("cam").precharges_avoided > kept.precharges_avoided + 1)
    kinds = [e.kind for e in await daemon.events(stream="cam")]
    assert kinds.count("source_offline") == 1
    assert daemon.emulator.starts == []
