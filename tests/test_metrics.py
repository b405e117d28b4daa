"""The /metrics contract: numbers that match the store, Prometheus' own lint, bounded labels."""

from __future__ import annotations

import asyncio
import gzip
import io
from asyncio.subprocess import PIPE
from dataclasses import replace

import aiohttp
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as openmetrics_families,
)
from prometheus_client.parser import text_string_to_metric_families

from streamwatch import __version__
from streamwatch.config import parse_config
from streamwatch.emulator import Script
from streamwatch.ledger import Spending
from streamwatch.metrics import OTHER_LOGO, Snapshot, StateCollector, StreamView, render_page
from streamwatch.pricing import TICKS_PER_USD
from tests.conftest import SECRET, Daemon, stream_toml, tool, until


async def scrape(d: Daemon, *, port: int | None = None) -> str:
    assert d.app is not None
    assert d.app.server is not None
    base = d.app.server.base_url if port is None else f"http://127.0.0.1:{port}"
    async with aiohttp.ClientSession() as s, s.get(f"{base}/metrics") as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain")
        return await resp.text()


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def samples(text: str) -> Samples:
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(found: Samples, name: str, **labels: str) -> float:
    return found[(name, tuple(sorted(labels.items())))]


async def test_scrape_matches_the_store_and_the_ledger(daemon, emulator):
    """Segments, unsafe segments and cost in /metrics equal what the store recorded."""
    url = "rtmp://cams.test/mix"
    emulator.scripts[url] = Script(outcomes=["safe", "unsafe", "logo:Acme", "error"])
    await daemon.start(stream_toml("mix", url, fps=2, logo_detection=True))
    await daemon.wait(lambda: daemon.state("mix").run_segments >= 6)
    await daemon.stop()
    await daemon.start()  # the task is adopted and keeps calling back: counters come from the store
    # A quiet store: no callback reaches the daemon between the scrape and the checks.
    emulator.webhook = None
    await until(emulator, lambda: emulator.posting == 0)
    text = await scrape(daemon)
    found = samples(text)
    totals = (await daemon.store.stream_totals())["mix"]
    charges = await daemon.store.charge_totals(since=0, until=10**12)
    assert value(found, "streamwatch_stream_segments_total", stream="mix") == totals.segments
    assert value(found, "streamwatch_stream_unsafe_segments_total", stream="mix") == (
        totals.unsafe_segments
    )
    assert value(found, "streamwatch_stream_segment_errors_total", stream="mix") == (
        totals.failed_segments
    )
    assert value(found, "streamwatch_stream_cost_usd_total", stream="mix") == pytest.approx(
        charges[0].ticks / TICKS_PER_USD
    )
    assert value(found, "streamwatch_stream_state", stream="mix", state="running") == 1
    assert value(found, "streamwatch_stream_up", stream="mix") == 1
    # fps 2 with both features: (2 + 1) / 720 USD a segment, 3600 / 0.05 segments an hour
    per_hour = (2 + 1) / 720 * (3600 / 0.05)
    assert value(found, "streamwatch_stream_burn_usd_per_hour", stream="mix") == pytest.approx(
        per_hour
    )
    assert value(found, "streamwatch_account_halted", reason="balance") == 0
    build = [dict(k[1]) for k in found if k[0] == "streamwatch_build_info"]
    assert build[0]["version"] == __version__


async def test_live_counters_after_traffic(daemon, emulator):
    """Callbacks, MAVI requests, processing time (one histogram for the fleet, no per-stream
    series), tokens and logos are counted as they happen."""
    url = "rtmp://cams.test/logos"
    emulator.scripts[url] = Script(outcomes=["logo:Acme", "logo:Brand", "safe"])
    await daemon.start(stream_toml("logos", url, logo_detection=True))
    await daemon.wait(lambda: daemon.state("logos").run_segments >= 3)
    found = samples(await scrape(daemon))
    assert value(found, "streamwatch_callbacks_total", outcome="stored") >= 3
    assert value(found, "streamwatch_mavi_requests_total", endpoint="start", outcome="ok") == 1
    assert value(found, "streamwatch_logo_detections_total", stream="logos", logo="Acme") >= 1
    assert value(found, "streamwatch_segment_tokens_total", stream="logos", kind="input") > 0
    assert value(found, "streamwatch_segment_processing_seconds_count") >= 3
    processing = [k for k in found if k[0].startswith("streamwatch_segment_processing_seconds")]
    assert all("stream" not in dict(labels) for _, labels in processing), "a fleet histogram"
    assert value(found, "streamwatch_store_commit_duration_seconds_count") > 0


async def test_logo_names_are_capped_per_stream(daemon, emulator):
    """A detector that invents names cannot grow the series without bound."""
    url = "rtmp://cams.test/noisy"
    emulator.scripts[url] = Script(outcomes=[f"logo:brand{i}" for i in range(8)])
    await daemon.start(
        stream_toml("noisy", url, logo_detection=True), extra="[metrics]\nmax_logo_names = 3"
    )
    await daemon.wait(lambda: daemon.state("noisy").run_segments >= 8)
    found = samples(await scrape(daemon))
    names = {
        dict(k[1])["logo"]
        for k in found
        if k[0] == "streamwatch_logo_detections_total" and dict(k[1])["stream"] == "noisy"
    }
    assert len(names) == 4
    assert OTHER_LOGO in names


async def test_rejections_are_counted_by_reason(daemon, emulator):
    """Every refused callback is counted with why."""
    await daemon.start(stream_toml("cam"))
    assert daemon.app is not None
    assert daemon.app.server is not None
    base = daemon.app.server.base_url
    async with aiohttp.ClientSession() as s:
        await s.post(f"{base}/callbacks/mavi/wrong-secret-000000", data=b"{}")
        await s.post(f"{base}/callbacks/mavi/{SECRET}", data=b"not json")
        await s.post(f"{base}/callbacks/mavi/{SECRET}", data=b'{"task_id": "t"}')
        await s.post(f"{base}/callbacks/mavi/{SECRET}", data=io.BytesIO(b"x" * 1_100_000))
    text = await scrape(daemon)
    found = samples(text)
    for reason in ("secret", "json", "shape", "too_large"):
        assert value(found, "streamwatch_callbacks_rejected_total", reason=reason) == 1
    assert value(found, "streamwatch_callbacks_total", outcome="rejected") == 4
    assert SECRET not in text
    assert "rtmp://" not in text, "stream URLs may carry credentials"


async def test_metrics_on_their_own_listener(daemon, emulator):
    """With [metrics] listen, /metrics moves to its own address and leaves the main one."""
    await daemon.start(stream_toml("cam"), extra='[metrics]\nlisten = "127.0.0.1:0"')
    assert daemon.app is not None
    assert daemon.app.server is not None
    port = daemon.app.server.metrics_port
    assert port is not None
    assert "streamwatch_stream_state" in await scrape(daemon, port=port)
    async with aiohttp.ClientSession() as s, s.get(f"{daemon.app.server.base_url}/metrics") as resp:
        assert resp.status == 404


async def test_live_scrape_passes_promtool_check_metrics(daemon, emulator):
    """Prometheus' own linter finds nothing to say about a scrape under real traffic."""
    promtool = tool("promtool")
    emulator.scripts["rtmp://cams.test/a"] = Script(outcomes=["unsafe", "logo:X"], then="end:15")
    await daemon.start(
        stream_toml("a", "rtmp://cams.test/a", logo_detection=True)
        + stream_toml("b")
        + 'budget = { daily_usd = "5.00" }\n'
        + 'labels = { site = "x" }\n',
        extra='[budgets]\nmonthly_usd = "100.00"',
    )
    await daemon.wait(lambda: daemon.state("a").restarts >= 1)
    await until(emulator, lambda: len(emulator.charges) > 5)
    text = await scrape(daemon)
    proc = await asyncio.create_subprocess_exec(
        promtool, "check", "metrics", stdin=PIPE, stdout=PIPE, stderr=PIPE
    )
    out, err = await proc.communicate(text.encode())
    assert proc.returncode == 0, (out + err).decode()
    assert out.strip() == b""
    assert err.strip() == b""


def test_a_stream_named_account_has_budget_series_of_its_own():
    """The account's caps are `scope="account"`, a stream's `scope="stream"` with its name in
    `stream`: a stream named "account" cannot make the account's series appear twice."""
    config = parse_config(
        '[budgets]\ndaily_usd = "100"\n'
        + stream_toml("account")
        + 'budget = { daily_usd = "5" }\n'
        + stream_toml("lobby"),
        environ={},
    )
    registry = CollectorRegistry()
    spending = Spending(budgets=config.budgets, streams=config.streams, segment_seconds=5)
    StateCollector(registry, spending)
    keys = [
        (s.name, tuple(sorted(s.labels.items())))
        for family in text_string_to_metric_families(generate_latest(registry).decode())
        for s in family.samples
    ]
    assert len(keys) == len(set(keys)), "a series appears twice"
    found = samples(generate_latest(registry).decode())
    cap = "streamwatch_budget_cap_usd"
    assert value(found, cap, scope="account", period="day") == 100
    assert value(found, cap, scope="stream", stream="account", period="day") == 5
    assert value(found, "streamwatch_budget_remaining_usd", scope="account", period="day") == 100
    assert [k for k in found if k[0] == cap and ("stream", "lobby") in k[1]] == []


async def test_openmetrics_when_asked_and_gzip_when_accepted(daemon, emulator):
    """A scraper asking for OpenMetrics gets it (the per-stream series included, `# EOF`
    last), one accepting gzip gets the page compressed, and both say so in their headers."""
    url = "rtmp://cams.test/om"
    emulator.scripts[url] = Script(outcomes=["safe"])
    await daemon.start(stream_toml("om", url))
    await daemon.wait(lambda: daemon.state("om").run_segments >= 2)
    assert daemon.app is not None
    assert daemon.app.server is not None
    page = f"{daemon.app.server.base_url}/metrics"
    accept = {"Accept": "application/openmetrics-text; version=1.0.0", "Accept-Encoding": ""}
    async with aiohttp.ClientSession(auto_decompress=False) as s:
        async with s.get(page, headers=accept) as resp:
            assert resp.headers["Content-Type"].startswith("application/openmetrics-text")
            assert "Content-Encoding" not in resp.headers
            text = await resp.text()
        async with s.get(page, headers={"Accept-Encoding": "gzip"}) as resp:
            assert resp.headers["Content-Encoding"] == "gzip"
            assert resp.headers["Content-Type"].startswith("text/plain")
            plain = gzip.decompress(await resp.read()).decode()
    assert text.endswith("# EOF\n")
    parsed = openmetrics_families(text)  # type: ignore[no-untyped-call]  # unannotated upstream
    families = {f.name: f for f in parsed}
    assert families["streamwatch_stream_segments"].type == "counter"
    (sample,) = families["streamwatch_stream_segments"].samples
    assert sample.name == "streamwatch_stream_segments_total"
    assert sample.labels == {"stream": "om"}
    assert sample.value >= 2
    found = samples(plain)
    assert value(found, "streamwatch_stream_segments_total", stream="om") >= 2
    assert value(found, "streamwatch_stream_state", stream="om", state="running") == 1


async def test_standard_process_and_python_series(daemon, emulator):
    """The page carries the standard process_* and python_* series of Prometheus clients."""
    await daemon.start(stream_toml("cam"))
    found = samples(await scrape(daemon))
    names = {name for name, _ in found}
    assert {"process_resident_memory_bytes", "process_cpu_seconds_total"} <= names
    assert "python_info" in names
    assert any(name.startswith("python_gc_") for name in names)


def test_preflight_counters_per_stream():
    """A stream with preflight has its probes by outcome (every outcome from zero), the
    pre-charges avoided and their price as counters; a stream without it has none."""
    config = parse_config(stream_toml("cam") + stream_toml("plain"), environ={})
    registry = CollectorRegistry()
    spending = Spending(budgets=config.budgets, streams=config.streams, segment_seconds=5)
    collector = StateCollector(registry, spending)
    plain = StreamView(
        state="source_offline",
        running=False,
        restarts=0,
        labels={},
        fps=1,
        content_moderation=True,
        logo_detection=False,
    )
    cam = replace(
        plain,
        preflight=True,
        probes={"ok": 1, "unreachable": 2},
        precharges_avoided=2,
        ticks_saved=12,
    )
    collector.snapshot = Snapshot(streams={"cam": cam, "plain": plain})
    page, _ = render_page(registry, collector.stream_families({}), "")
    found = samples(page.decode())
    probes = "streamwatch_stream_probes_total"
    assert value(found, probes, stream="cam", outcome="ok") == 1
    assert value(found, probes, stream="cam", outcome="unreachable") == 2
    assert value(found, probes, stream="cam", outcome="timeout") == 0
    assert value(found, "streamwatch_stream_precharges_avoided_total", stream="cam") == 2
    saved = value(found, "streamwatch_stream_precharges_avoided_usd_total", stream="cam")
    assert saved == 12 / TICKS_PER_USD
    assert value(found, "streamwatch_stream_state", stream="cam", state="source_offline") == 1
    assert [k for k in found if k[0] == probes and ("stream", "plain") in k[1]] == []
