"""What preflight saves: the pre-charges a source offline for 10 minutes costs, without and
with `preflight = true`.

Real parts, compressed time: a real RTMP server (nginx-rtmp, tests/media.py) with nothing
published for the equivalent of `--minutes` (default 10), then the feed; the emulator, whose
task follows the real source as MAVI does (no video: the task ends with 15 after its
pre-charge); and the daemon with the shipped restart backoff (5 s doubling to 600 s, jitter
0.2), every period divided by `--scale` (default 50: a 5 s segment lasts 0.1 s). Each run
counts the pre-charges the emulator took while the source was offline, and the probes the
daemon made; then the source comes back and the run waits for the stream to run. The probe
itself is not compressed (an ffprobe process), so at high scales it weighs more than it would.

    python -m bench.preflight [--minutes 10] [--scale 50]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import tempfile
from pathlib import Path

from streamwatch.app import App
from streamwatch.config import parse_config
from streamwatch.emulator import Emulator
from streamwatch.emulator.script import Script
from streamwatch.logs import configure_logging
from streamwatch.policy import Phase
from streamwatch.pricing import segment_cost_ticks, ticks_to_usd
from tests.media import LiveSources, Pattern

ENV = {"SW_SECRET": "bench-callback-secret-0123456789", "MAVI_KEY": "sk-mai-bench"}


def config(db: Path, *, base_url: str, url: str, scale: float, preflight: bool) -> str:
    segment = 5 / scale
    return f"""
[mavi]
backend = "mavi"
base_url = "{base_url}"
api_key = {{ env = "MAVI_KEY" }}
segment_seconds = {segment}

[server]
listen = "127.0.0.1:0"
callback_secret = {{ env = "SW_SECRET" }}

[storage]
path = "{db}"

[supervisor]
tick_seconds = {segment / 2}
restart_initial_seconds = {5 / scale}
restart_max_seconds = {600 / scale}
stall_after_segments = 1000

[[streams]]
name = "cam"
url = "{url}"
preflight = {str(preflight).lower()}
preflight_timeout_seconds = 10
"""


async def run(
    folder: Path, sources: LiveSources, *, minutes: float, scale: float, preflight: bool
) -> tuple[int, int]:
    """Pre-charges taken and probes made while the source was offline for `minutes`."""
    source = await sources.rtmp(Pattern(320, 240, 15, audio=False))
    await source.stop()
    emulator = Emulator(segment_seconds=5 / scale, api_key=ENV["MAVI_KEY"], balance_ticks=10**9)
    emulator.scripts[source.url] = Script(follow_source=True)
    async with emulator.running():
        text = config(
            folder / f"state-{preflight}.db",
            base_url=emulator.base_url,
            url=source.url,
            scale=scale,
            preflight=preflight,
        )
        app = App(parse_config(text, environ=ENV), environ=ENV)
        serving = asyncio.create_task(app.serve())
        await app.started.wait()
        assert app.server is not None
        assert app.supervisor is not None
        emulator.webhook = app.server.callback_url()
        await asyncio.sleep(minutes * 60 / scale)
        precharges = sum(1 for c in emulator.charges if c.kind == "precharge")
        state = app.supervisor.streams["cam"]
        probes = sum(count for _, count in state.probes)
        await source.start()
        async with asyncio.timeout(60):
            await app.supervisor.wait_until(
                lambda: (
                    app.supervisor is not None
                    and app.supervisor.streams["cam"].phase is Phase.RUNNING
                )
            )
        emulator.webhook = None
        app.request_stop()
        with contextlib.suppress(asyncio.CancelledError):
            await serving
    return precharges, probes


async def main(minutes: float, scale: float) -> None:
    price = segment_cost_ticks(fps=1, content_moderation=True, logo_detection=False)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        async with LiveSources(folder / "live") as sources:
            without, _ = await run(folder, sources, minutes=minutes, scale=scale, preflight=False)
            with_, probes = await run(folder, sources, minutes=minutes, scale=scale, preflight=True)
    print(f"source offline for {minutes:g} min (time compressed {scale:g}x), fps 1, moderation:")
    print(
        f"  without preflight: {without} pre-charges (${ticks_to_usd(without * price, places=4)})"
    )
    print(
        f"  with preflight:    {with_} pre-charges (${ticks_to_usd(with_ * price, places=4)}),"
        f" {probes} probes"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--scale", type=float, default=50.0)
    args = parser.parse_args()
    configure_logging(level="error")  # the restarts' own log lines would bury the figures
    asyncio.run(main(args.minutes, args.scale))
