"""The daemon against an independent MAVI stand-in that keeps to the contract and no more."""

from __future__ import annotations

import asyncio
from pathlib import Path

from streamwatch.app import App
from streamwatch.config import parse_config
from streamwatch.policy import Phase
from tests.conftest import API_KEY, ENV, SEGMENT, config_text, stream_toml
from tests.fakes.mavi_standin import StandIn


async def test_daemon_works_against_an_independent_stand_in(tmp_path: Path):
    """Segments are stored, a 15 restarts, a removed stream is stopped: nothing emulator-only."""
    flaky = "rtmp://cams.test/flaky"
    standin = StandIn(key=API_KEY, period=SEGMENT, end_after={flaky: (3, 15)})
    async with standin.running():
        path = tmp_path / "streams.toml"
        streams = stream_toml("steady", logo_detection=True) + stream_toml("flaky", flaky)
        path.write_text(config_text(tmp_path / "s.db", base_url=standin.url, streams=streams))
        app = App(parse_config(path.read_text(), environ=ENV), config_path=path, environ=ENV)
        serving = asyncio.create_task(app.serve())
        await app.started.wait()
        assert app.server is not None
        assert app.supervisor is not None
        assert app.store is not None
        sup, store = app.supervisor, app.store
        standin.webhook = app.server.callback_url()
        async with asyncio.timeout(15):
            await sup.wait_until(
                lambda: (
                    (s := sup.streams.get("steady")) is not None
                    and s.run_segments >= 4
                    and (f := sup.streams.get("flaky")) is not None
                    and f.restarts >= 1
                )
            )
        steady_id = sup.streams["steady"].task_id
        assert steady_id is not None
        assert await store.segment_indexes(steady_id) == list(
            range(len(await store.segment_indexes(steady_id)))
        )
        ended = [e.status for e in await store.events(stream="flaky") if e.kind == "task_ended"]
        assert 15 in ended
        totals = await store.stream_totals()
        assert totals["steady"].unsafe_segments >= 1

        path.write_text(
            config_text(
                tmp_path / "s.db", base_url=standin.url, streams=stream_toml("flaky", flaky)
            )
        )
        assert await app.reload()
        async with asyncio.timeout(15):
            await sup.wait_until(lambda: "steady" not in sup.streams)
        assert not standin.tasks[steady_id].running
        assert sup.streams["flaky"].phase in (Phase.RUNNING, Phase.BACKOFF, Phase.STARTING)
        app.request_stop()
        await serving
