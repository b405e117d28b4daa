"""How long a probe takes, per kind of source: the latency a look at a source adds.

Starts real local servers as the tests do (nginx-rtmp and rtsp-server-perl fed by ffmpeg,
tests/media.py), and times `probe()` on a file, on live RTMP with and without audio, and on
live RTSP; the live ones at the shipped analysis time (2 s) and at FFmpeg's own default (5 s)
as the baseline. Prints the median of `--runs` probes each. A benchmark, not a test.

    python -m bench.probe [--runs 3]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

from streamwatch.probe import probe
from tests.media import LiveSources, Pattern, make_file


async def timed(source: str | Path, runs: int, analyze: float) -> float:
    took = []
    for _ in range(runs):
        start = time.perf_counter()
        await probe(source, timeout=30, live_analyze_seconds=analyze)
        took.append(time.perf_counter() - start)
    return statistics.median(took)


async def main(runs: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        clip = make_file(folder / "clip.mp4", "h264_aac_mp4", Pattern(1280, 720, 30), 10.0)
        print(f"{'source':<28}{'2 s analysis':>14}{'FFmpeg default':>16}")
        print(f"{'file, H.264/AAC 10 s':<28}{await timed(clip, runs, 2.0):>13.2f}s{'':>16}")
        async with LiveSources(folder / "live") as sources:
            live = {
                "RTMP, H.264 + AAC": await sources.rtmp(Pattern(1280, 720, 30)),
                "RTMP, H.264 only": await sources.rtmp(Pattern(1280, 720, 30, audio=False)),
                "RTSP, H.264 + AAC": await sources.rtsp(Pattern(1280, 720, 30)),
            }
            for name, source in live.items():
                shipped = await timed(source.url, runs, 2.0)
                default = await timed(source.url, runs, 5.0)
                print(f"{name:<28}{shipped:>13.2f}s{default:>15.2f}s")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    asyncio.run(main(parser.parse_args().runs))
