"""Uploads stream from disk: a file far larger than the uploader's heap limit goes through."""

from __future__ import annotations

import asyncio
import sys
from asyncio.subprocess import PIPE
from pathlib import Path

from streamwatch.emulator import Emulator

CHILD = """
import asyncio, resource, sys
from pathlib import Path
import aiohttp
from pydantic import SecretStr
from streamwatch.mavi.videos import VideoClient

limit = 300 * 1024 * 1024
resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))

async def main():
    async with aiohttp.ClientSession() as session:
        client = VideoClient(session=session, base_url=sys.argv[1], api_key=SecretStr(sys.argv[2]))
        video = await client.upload(Path(sys.argv[3]))
        print(video.video_no)
    # VmHWM, the peak of this process's own memory: ru_maxrss also counts the parent's
    # resident set at fork time (Linux carries it across exec), which grows with the suite.
    status = Path("/proc/self/status").read_text()
    print(int(status.split("VmHWM:")[1].split()[0]) // 1024, file=sys.stderr)

asyncio.run(main())
"""


async def test_upload_of_a_file_larger_than_the_heap_limit(tmp_path: Path):
    """1 GiB goes through a process whose data segment is capped at 300 MiB."""
    big = tmp_path / "big.mp4"
    with big.open("wb") as f:
        f.truncate(1024 * 1024 * 1024)  # sparse: costs no disk
    emu = Emulator(api_key="k")
    async with emu.running():
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", CHILD, emu.batch_url, "k", str(big), stdout=PIPE, stderr=PIPE
        )
        out, err = await proc.communicate()
        assert proc.returncode == 0, err.decode()[-2000:]
        video_no = out.decode().strip()
        assert emu.library.videos[video_no].size == 1024 * 1024 * 1024
    peak_mib = int(err.decode().strip().splitlines()[-1])
    assert peak_mib < 300, f"the uploader peaked at {peak_mib} MiB"
