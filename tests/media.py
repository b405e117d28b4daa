"""Real media for tests: files made by ffmpeg, and live sources — a real RTMP server (nginx with
Debian's RTMP module) or a real RTSP server (Debian's rtsp-server-perl), each on its own free
loopback port with its config, pid and log files in a temp dir, fed by ffmpeg with a test
pattern and a tone. A source starts and stops on demand: stopping the feed is a source going
offline while its server stays up, as when a camera or an encoder drops.

`LiveSources` (the `live_sources` fixture in conftest.py) makes them and stops whatever is left
at the end of the test.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from tests.conftest import free_port, missing, tool

NGINX_RTMP_MODULE = Path("/usr/lib/nginx/modules/ngx_rtmp_module.so")
READY_WITHIN = 20.0


@dataclass(frozen=True)
class Pattern:
    """What the feeding ffmpeg is told to produce (the test pattern and a 440 Hz tone)."""

    width: int = 640
    height: int = 360
    fps: int = 25
    audio: bool = True
    sample_rate: int = 48_000
    channels: int = 2

    def ffmpeg_inputs(self, *, seconds: float | None = None) -> list[str]:
        until = f":duration={seconds}" if seconds is not None else ""
        args = ["-f", "lavfi", "-i", f"testsrc2=size={self.width}x{self.height}:rate={self.fps}"]
        args[-1] += until
        if self.audio:
            args += ["-f", "lavfi", "-i", f"sine=frequency=440:sample_rate={self.sample_rate}"]
            args[-1] += until
        return args

    def live_encoding(self) -> list[str]:
        """H.264 with a keyframe every second and no B-frames, AAC: what encoders send live."""
        args = ["-c:v", "libx264", "-preset", "ultrafast", "-tune", "zerolatency"]
        args += ["-g", str(self.fps), "-pix_fmt", "yuv420p", "-b:v", "400k"]
        if self.audio:
            args += ["-c:a", "aac", "-b:a", "64k", "-ac", str(self.channels)]
        return args


class _Process:
    """A child process with its output in a log file; `stop()` asks (SIGTERM), then kills."""

    def __init__(self, argv: Sequence[str], log: Path) -> None:
        self.argv = list(argv)
        self.log = log
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self, *, stdout: int | None = None) -> asyncio.subprocess.Process:
        with self.log.open("ab") as out:
            self.proc = await asyncio.create_subprocess_exec(
                *self.argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=stdout if stdout is not None else out,
                stderr=out,
            )
        return self.proc

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""

    async def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.returncode is not None:
            return
        proc.terminate()
        try:
            async with asyncio.timeout(5):
                await proc.wait()
        except TimeoutError:
            proc.kill()
            await proc.wait()


async def _wait_listening(port: int, process: _Process, what: str) -> None:
    """Until something accepts TCP connections on 127.0.0.1:port (or the server died)."""
    async with asyncio.timeout(READY_WITHIN):
        while True:
            if not process.running:
                raise RuntimeError(f"{what} exited at start:\n{process.output()}")
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                await asyncio.sleep(0.02)
                continue
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
            return


class RtmpServer:
    """nginx with the RTMP module on 127.0.0.1:port, application `live`. Players of a stream
    nobody publishes are turned away at once (`idle_streams off`), as most servers do."""

    def __init__(self, workdir: Path) -> None:
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.process = _Process(
            [
                tool("nginx"),
                "-p",
                str(self.dir),
                "-c",
                str(self.dir / "nginx.conf"),
                "-e",
                str(self.dir / "error.log"),
            ],
            self.dir / "nginx.out",
        )
        if not NGINX_RTMP_MODULE.exists():
            missing(f"the nginx RTMP module is not installed ({NGINX_RTMP_MODULE})")
        (self.dir / "nginx.conf").write_text(
            f"""
daemon off;
master_process off;
worker_processes 1;
pid {self.dir / "nginx.pid"};
error_log {self.dir / "error.log"} info;
load_module {NGINX_RTMP_MODULE};
events {{ worker_connections 64; }}
rtmp {{
    server {{
        listen 127.0.0.1:{self.port};
        application live {{
            live on;
            record off;
            idle_streams off;
        }}
    }}
}}
"""
        )

    def url(self, name: str) -> str:
        return f"rtmp://127.0.0.1:{self.port}/live/{name}"

    publish_url = url

    async def start(self) -> None:
        await self.process.start()
        await _wait_listening(self.port, self.process, "nginx")

    async def stop(self) -> None:
        await self.process.stop()


def _free_udp_block(size: int) -> int:
    """The first of `size` consecutive UDP ports on 127.0.0.1 that were free a moment ago."""
    for _ in range(50):
        base = random.randrange(40_000, 60_000, 2)
        socks: list[socket.socket] = []
        try:
            for port in range(base, base + size):
                s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                socks.append(s)
                s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no block of free UDP ports")


class RtspServer:
    """rtsp-server-perl: encoders publish (ANNOUNCE/RECORD) on one port, players read on
    another; RTP over UDP from a block of ports of its own."""

    def __init__(self, workdir: Path) -> None:
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.source_port = free_port()
        self.process = _Process(
            [
                tool("rtsp-server-perl"),
                "--clientport",
                str(self.port),
                "--serverport",
                str(self.source_port),
                "--client_listen_address",
                "127.0.0.1",
                "--source_listen_address",
                "127.0.0.1",
                # It counts up by two per stream and per player, and starts over when idle.
                "--rtp_start_port",
                str(_free_udp_block(200)),
                "--loglevel",
                "2",
            ],
            self.dir / "rtsp-server.log",
        )

    def url(self, name: str) -> str:
        return f"rtsp://127.0.0.1:{self.port}/{name}"

    def publish_url(self, name: str) -> str:
        return f"rtsp://127.0.0.1:{self.source_port}/{name}"

    async def start(self) -> None:
        await self.process.start()
        await _wait_listening(self.port, self.process, "rtsp-server-perl")
        await _wait_listening(self.source_port, self.process, "rtsp-server-perl")

    async def stop(self) -> None:
        await self.process.stop()


class Feed:
    """ffmpeg pushing the pattern, in real time, to a server. `start()` returns once a second
    of frames (a keyframe among them) has gone out."""

    def __init__(self, url: str, pattern: Pattern, log: Path) -> None:
        self.url = url
        self.pattern = pattern
        mux = ["-f", "flv"] if url.startswith("rtmp") else ["-f", "rtsp"]
        self.process = _Process(
            [
                tool("ffmpeg"),
                "-hide_banner",
                "-nostdin",
                "-v",
                "error",
                "-re",
                *pattern.ffmpeg_inputs(),
                *pattern.live_encoding(),
                "-progress",
                "pipe:1",
                "-stats_period",
                "0.1",
                *mux,
                url,
            ],
            log,
        )
        self._drain: asyncio.Task[None] | None = None

    async def start(self) -> None:
        # rtsp-server-perl can refuse a publisher that comes back right after the previous one
        # left ("RECORD 404" while it still tears the old session down): ffmpeg exits at once,
        # and publishing again a moment later works.
        for attempt in range(3):
            if await self._publish():
                return
            await self.stop()
            if attempt < 2:
                await asyncio.sleep(0.5)
        raise RuntimeError(f"ffmpeg did not publish {self.url}:\n{self.process.output()}")

    async def _publish(self) -> bool:
        """Start ffmpeg; True once a second of frames went out, False if it exited first or
        took longer than `READY_WITHIN`."""
        proc = await self.process.start(stdout=asyncio.subprocess.PIPE)
        assert proc.stdout is not None
        sent = asyncio.Event()
        self._drain = asyncio.create_task(self._read_progress(proc.stdout, sent))
        waiting = asyncio.create_task(sent.wait())
        try:
            await asyncio.wait(
                {waiting, self._drain}, timeout=READY_WITHIN, return_when="FIRST_COMPLETED"
            )
        finally:
            waiting.cancel()
        return sent.is_set()

    async def _read_progress(self, stdout: asyncio.StreamReader, sent: asyncio.Event) -> None:
        # ffmpeg writes frame=N every 0.1 s; reading it all also keeps the pipe from filling.
        async for line in stdout:
            key, _, value = line.decode().strip().partition("=")
            if key == "frame" and value.isdigit() and int(value) >= self.pattern.fps:
                sent.set()

    async def stop(self) -> None:
        await self.process.stop()
        if self._drain is not None:
            await self._drain
            self._drain = None


class LiveSource:
    """A live stream on its own server: `url` is what players read. `stop()` ends the feed
    (the source goes offline, the server stays up); `start()` brings it back."""

    def __init__(self, server: RtmpServer | RtspServer, name: str, pattern: Pattern) -> None:
        self.server = server
        self.name = name
        self.pattern = pattern
        self.url = server.url(name)
        self.feed = Feed(server.publish_url(name), pattern, server.dir / f"feed-{name}.log")

    async def start(self) -> None:
        await self.feed.start()

    async def stop(self) -> None:
        await self.feed.stop()

    async def close(self) -> None:
        await self.feed.stop()
        await self.server.stop()


class LiveSources:
    """Makes live sources, each on its own server and port; closes what is left at the end."""

    def __init__(self, workdir: Path) -> None:
        self.dir = workdir
        self._made: list[LiveSource] = []

    async def rtmp(self, pattern: Pattern = Pattern(), *, name: str = "test") -> LiveSource:
        return await self._start(RtmpServer(self._subdir("rtmp")), name, pattern)

    async def rtsp(self, pattern: Pattern = Pattern(), *, name: str = "test") -> LiveSource:
        return await self._start(RtspServer(self._subdir("rtsp")), name, pattern)

    def _subdir(self, kind: str) -> Path:
        return self.dir / f"{kind}-{len(self._made)}"

    async def _start(self, server: RtmpServer | RtspServer, name: str, p: Pattern) -> LiveSource:
        source = LiveSource(server, name, p)
        self._made.append(source)
        await server.start()
        await source.start()
        return source

    async def __aenter__(self) -> LiveSources:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for source in reversed(self._made):
            await source.close()


def make_file(path: Path, kind: str, pattern: Pattern = Pattern(), seconds: float = 2.0) -> Path:
    """A short media file of one kind: `h264_aac_mp4`, `vp9_opus_webm`, `mp3`, `random_bytes`
    or `truncated_mp4` (an MP4 cut before its index)."""
    ffmpeg = tool("ffmpeg")
    base = [ffmpeg, "-hide_banner", "-nostdin", "-v", "error", "-y"]
    if kind == "h264_aac_mp4":
        argv = [*base, *pattern.ffmpeg_inputs(seconds=seconds), "-c:v", "libx264"]
        argv += ["-preset", "ultrafast", "-pix_fmt", "yuv420p", "-c:a", "aac", "-b:a", "96k"]
        argv += ["-ac", str(pattern.channels), "-movflags", "+faststart", str(path)]
    elif kind == "vp9_opus_webm":
        argv = [*base, *pattern.ffmpeg_inputs(seconds=seconds), "-c:v", "libvpx-vp9"]
        argv += ["-deadline", "realtime", "-cpu-used", "8", "-b:v", "300k", "-c:a", "libopus"]
        argv += ["-ac", str(pattern.channels), str(path)]
    elif kind == "mp3":
        tone = f"sine=frequency=440:sample_rate=44100:duration={seconds}"
        argv = [*base, "-f", "lavfi", "-i", tone]
        argv += ["-c:a", "libmp3lame", "-b:a", "128k", str(path)]
    elif kind == "random_bytes":
        path.write_bytes(random.Random(7).randbytes(64 * 1024))
        return path
    elif kind == "truncated_mp4":
        whole = path.with_name(path.stem + "-whole.mp4")
        video_only = Pattern(pattern.width, pattern.height, pattern.fps, audio=False)
        argv = [*base, *video_only.ffmpeg_inputs(seconds=seconds), "-c:v", "libx264"]
        argv += ["-preset", "ultrafast", "-pix_fmt", "yuv420p", str(whole)]
        subprocess.run(argv, check=True, timeout=60)
        data = whole.read_bytes()
        path.write_bytes(data[: len(data) // 2])  # the index (moov) is written last
        return path
    else:
        raise ValueError(kind)
    subprocess.run(argv, check=True, timeout=60)
    return path
