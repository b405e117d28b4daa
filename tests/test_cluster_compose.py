"""compose.cluster.yaml: a fleet of two replicas on one PostgreSQL behind nginx, with the MAVI
emulator posting through it. Each file checked by the tool that reads it (docker-compose, the
Compose Specification's schema, `streamwatch check-config` against a real server, promtool,
nginx), the files checked against each other, and the shipped nginx config run for real on
loopback in front of two real replicas, one of them killed mid-traffic."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import sys
import tomllib
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp
import pytest
import yaml
from aiohttp import web

from streamwatch.config import Config, load_config
from streamwatch.emulator import Emulator
from streamwatch.store import PgTarget
from tests import pg
from tests.conftest import API_KEY, cli, free_port, spawn_daemon, tool, until
from tests.fakes.serve import serve
from tests.test_deploy import (
    AFTER_DRAIN,
    ROOT,
    assert_service_address,
    assert_service_url,
    bind_mounts,
    compose,
    dockerfile_env,
    host_path,
    run,
    seconds,
    secret_value,
    service,
)

FLEET = ROOT / "compose.cluster.yaml"
NGINX = ROOT / "deploy" / "nginx" / "streamwatch.conf"
REPLICAS = ("streamwatch-a", "streamwatch-b")
SECRET = "fleet-callback-secret-0123456789"


def replica_env(name: str) -> dict[str, str]:
    """The environment a replica's container runs with: the image's, then compose's."""
    env = service(name, FLEET)["environment"]
    return dockerfile_env() | {k: str(v) for k, v in env.items()}


def replica_config(name: str, environ: dict[str, str] | None = None) -> Config:
    env = replica_env(name)
    path = host_path(name, env["STREAMWATCH_CONFIG"], FLEET)
    return load_config(path, environ=env | (environ or {}))


def nginx_directives(text: str, name: str) -> list[str]:
    """The arguments of every `name …;` directive in an nginx config (comments left out)."""
    lines = (line.split("#", 1)[0] for line in text.splitlines())
    return re.findall(rf"(?m)^[ \t]*{name}[ \t]+([^;{{\n]+);", "\n".join(lines))


def nginx_size(value: str) -> int:
    units = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}
    found = re.fullmatch(r"(\d+)([kmg]?)", value.strip().lower())
    assert found is not None, value
    return int(found.group(1)) * units[found.group(2)]


def test_fleet_compose_file_passes_docker_compose_and_the_specification():
    """docker-compose parses and validates compose.cluster.yaml, and the Compose
    Specification's JSON schema accepts it."""
    code, out = run(tool("docker-compose"), "-f", str(FLEET), "config", "-q")
    assert code == 0, out
    checker = tool("check-jsonschema")
    code, out = run(checker, "--builtin-schema", "vendor.compose-spec", str(FLEET))
    assert code == 0, out


def test_every_mounted_config_of_the_fleet_has_a_check():
    """A config mounted into the fleet's stack but not checked here (or, for Alertmanager and
    Grafana, not the very files compose.yaml mounts and tests/test_deploy.py checks) fails."""
    checked = {
        ("streamwatch-a", "/etc/streamwatch/streams.toml"),
        ("streamwatch-b", "/etc/streamwatch/streams.toml"),
        ("proxy", "/etc/nginx/conf.d/default.conf"),
        ("prometheus", "/etc/prometheus"),
        ("alertmanager", "/etc/alertmanager/alertmanager.yml"),
        ("grafana", "/etc/grafana/provisioning"),
        ("grafana", "/var/lib/grafana/dashboards"),
    }
    services = compose(FLEET)["services"]
    mounted = {(name, target) for name in services for target in bind_mounts(name, FLEET)}
    assert mounted == checked
    for name in ("alertmanager", "grafana"):
        assert bind_mounts(name, FLEET) == bind_mounts(name)
        assert (
            service(name, FLEET)["environment" if name == "grafana" else "command"]
            == (service(name)["environment" if name == "grafana" else "command"])
        )


def test_fleet_replicas_share_the_stacks_database_and_pass_check_config(
    tmp_path: Path, pg_cluster: pg.Cluster
):
    """Both replicas read the same streams-cluster.toml ([cluster] on the `postgres`
    service, its user, database and password secret; MAVI at the `mavi` service), each under a
    host name of its own (the default replica id); with the URL and the secrets pointed at a
    real server, `streamwatch check-config` passes, and fails on a wrong password."""
    db = service("postgres", FLEET)
    hosts = set()
    for name in REPLICAS:
        daemon = service(name, FLEET)
        assert daemon["depends_on"]["postgres"]["condition"] == "service_healthy"
        hosts.add(daemon["hostname"])
        config = replica_config(name)
        assert config.cluster is not None
        assert config.cluster.replica_id is None  # `<host name>-<pid>`
        url = urlsplit(str(config.storage.url))
        assert (url.hostname, url.port) == ("postgres", 5432)
        assert url.username == db["environment"]["POSTGRES_USER"]
        assert url.path.lstrip("/") == db["environment"]["POSTGRES_DB"]
        assert config.storage.password is not None
        assert str(config.storage.password.file).removeprefix("/run/secrets/") in daemon["secrets"]
        assert db["environment"]["POSTGRES_PASSWORD_FILE"] == str(config.storage.password.file)
        assert config.mavi.backend == "mavi"
        assert_service_url(str(config.mavi.base_url).removesuffix("/serve/api/v2"), FLEET)
        assert_service_address(name, config.server.port, FLEET)
        for source in (config.mavi.api_key, config.server.callback_secret):
            assert source is not None
            assert source.file is not None
            assert source.file.name in daemon["secrets"]
            assert str(source.file) == f"/run/secrets/{source.file.name}"
    assert hosts == set(REPLICAS)

    pg_cluster.add_password_user()
    database = pg_cluster.new_database()
    pg_cluster.admin(f"ALTER DATABASE {database} OWNER TO {pg.PASSWORD_USER}")
    files = {
        "STREAMWATCH_DB_PASSWORD_FILE": pg.PASSWORD,
        "MAVI_API_KEY_FILE": API_KEY,
        "STREAMWATCH_CALLBACK_SECRET_FILE": secret_value(),
    }
    real = {"STREAMWATCH_DATABASE_URL": pg_cluster.url(database, user=pg.PASSWORD_USER)}
    for variable, value in files.items():
        (tmp_path / variable).write_text(value + "\n")
        real[variable] = str(tmp_path / variable)
    env = replica_env(REPLICAS[0])
    path = host_path(REPLICAS[0], env["STREAMWATCH_CONFIG"], FLEET)
    result = cli("check-config", "--config", str(path), env=env | real)
    assert result.returncode == 0, result.stderr
    (tmp_path / "STREAMWATCH_DB_PASSWORD_FILE").write_text("wrong\n")
    result = cli("check-config", "--config", str(path), env=env | real)
    assert "authentication failed" in result.stderr
    assert pg.PASSWORD not in result.stderr + result.stdout


def test_fleet_proxy_config_fits_the_replicas_and_the_emulator_posts_through_it():
    """nginx's upstreams are exactly the replicas at the port they listen on, it listens on
    the port the proxy service publishes, the emulator's webhook is the proxy's callback URL
    with the secret the replicas read, and nginx's limits fit the daemon's: bodies up to
    max_body_bytes pass, answers are awaited longer than a statement may take, kept-alive
    connections close before the daemon's idle timeout, callbacks go to another replica on
    errors, timeouts, 502 and 503, sent POSTs included."""
    text = NGINX.read_text()
    assert bind_mounts("proxy", FLEET)["/etc/nginx/conf.d/default.conf"] == NGINX
    configs = {name: replica_config(name) for name in REPLICAS}
    upstreams = [s.split()[0] for s in nginx_directives(text, "server")]
    assert upstreams == [f"{name}:{configs[name].server.port}" for name in REPLICAS]
    (listen,) = nginx_directives(text, "listen")
    assert_service_address("proxy", int(listen), FLEET)
    command = " ".join(service("mavi", FLEET)["command"])
    secret_file = configs[REPLICAS[0]].server.callback_secret
    assert secret_file is not None
    assert secret_file.file is not None
    webhook = f'--webhook "http://proxy:{listen}/callbacks/mavi/$$(cat {secret_file.file})"'
    assert webhook in command
    assert secret_file.file.name in service("mavi", FLEET)["secrets"]
    for config in configs.values():
        assert str(config.server.public_url) == f"http://proxy:{listen}"
        (body,) = nginx_directives(text, "client_max_body_size")
        assert nginx_size(body) >= config.server.max_body_bytes
        (read,) = nginx_directives(text, "proxy_read_timeout")
        assert seconds(read) > config.storage.statement_timeout_seconds
        keepalive = [seconds(v) for v in nginx_directives(text, "keepalive_timeout")]
        assert min(keepalive) < config.server.idle_timeout_seconds
    retried = nginx_directives(text, "proxy_next_upstream")[0].split()
    assert {"error", "timeout", "http_502", "http_503", "non_idempotent"} <= set(retried)


async def test_fleet_emulator_command_posts_to_the_proxy_with_the_secret_from_its_file(
    tmp_path: Path,
):
    """The `mavi` service's command, run by sh as the container runs it (its secret file, its
    listening address and the proxy's address moved to this machine, segments made faster),
    starts the emulator, whose callbacks go to the proxy's callback URL with the secret read
    from the file; its log does not show the secret."""
    mavi = service("mavi", FLEET)
    assert mavi["entrypoint"] == ["/bin/sh", "-c"]
    (command,) = mavi["command"]
    (tmp_path / "secret").write_text(SECRET + "\n")
    paths: asyncio.Queue[str] = asyncio.Queue()

    async def receive(request: web.Request) -> web.Response:
        paths.put_nowait(request.path)
        return web.json_response({"ok": True})

    proxy = web.Application()
    proxy.router.add_post("/{tail:.*}", receive)
    async with serve(proxy) as proxy_url:
        script = (
            command.replace("$$", "$")  # compose's escape for a literal $
            .replace("/run/secrets/callback-secret", str(tmp_path / "secret"))
            .replace("0.0.0.0:9400", "127.0.0.1:0")
            .replace("http://proxy:8080", proxy_url)
        )
        assert script.startswith("exec streamwatch emulator ")
        bin_dir = str(Path(sys.executable).parent)
        proc = await asyncio.create_subprocess_exec(
            "/bin/sh",
            "-c",
            script + " --segment-seconds 0.1",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env={**os.environ, "PATH": f"{bin_dir}:{os.environ.get('PATH', '')}"},
        )
        try:
            assert proc.stdout is not None
            async with asyncio.timeout(20):
                line = (await proc.stdout.readline()).decode()
                assert line.startswith("MAVI emulator: base_url = http://127.0.0.1:"), line
                async with (
                    aiohttp.ClientSession() as http,
                    http.post(
                        f"{line.split(' = ', 1)[1].strip()}/stream/start",
                        json={"url": "rtmp://cams.test/a", "enable_content_moderation": True},
                        headers={"Authorization": API_KEY},
                    ) as resp,
                ):
                    assert resp.status == 200, await resp.text()
                path = await paths.get()
        finally:
            proc.terminate()
            _, err = await proc.communicate()
    assert path == f"/callbacks/mavi/{SECRET}"
    assert SECRET not in err.decode()


def test_fleet_prometheus_scrapes_every_replica_and_loads_the_rules():
    """`promtool check config` passes on prometheus-cluster.yml (rules included), which
    scrapes each replica directly at the port it listens on, never the proxy."""
    path = host_path("prometheus", "/etc/prometheus/prometheus-cluster.yml", FLEET)
    assert f"--config.file=/etc/prometheus/{path.name}" in service("prometheus", FLEET)["command"]
    code, out = run(tool("promtool"), "check", "config", path.name, cwd=path.parent)
    assert code == 0, out
    assert "streamwatch.rules.yml" in out
    doc = yaml.safe_load(path.read_text())
    (job,) = doc["scrape_configs"]
    targets = [t for static in job["static_configs"] for t in static["targets"]]
    assert targets == [f"{name}:{replica_config(name).server.port}" for name in REPLICAS]
    for job in doc["alerting"]["alertmanagers"]:
        for static in job["static_configs"]:
            for target in static["targets"]:
                host, port = target.split(":")
                assert_service_address(host, int(port), FLEET)


def test_fleet_stop_timeouts_leave_room_after_the_drain():
    """Each replica's stop_grace_period exceeds its drain_seconds by AFTER_DRAIN: a replica
    stopped by compose drains and releases its leases instead of being killed."""
    for name in REPLICAS:
        grace = seconds(service(name, FLEET)["stop_grace_period"])
        assert grace >= replica_config(name).supervisor.drain_seconds + AFTER_DRAIN
        assert service(name, FLEET)["stop_signal"] == "SIGTERM"


# --- the real nginx in front of two real replicas ----------------------------------------------


def loopback_nginx_config(tmp_path: Path, listen: int, replicas: list[int]) -> Path:
    """deploy/nginx/streamwatch.conf with its listening port and its upstream servers moved
    to loopback ports (nothing else changed), inside a main config of the test's own."""
    text = NGINX.read_text()
    servers = re.findall(r"(?m)^([ \t]*server[ \t]+)([\w.-]+:\d+)(\s)", text)
    assert len(servers) == len(replicas)
    for (lead, address, after), port in zip(servers, replicas, strict=True):
        text = text.replace(f"{lead}{address}{after}", f"{lead}127.0.0.1:{port}{after}", 1)
    text, n = re.subn(r"(?m)^(\s*listen\s+)\d+;", rf"\g<1>127.0.0.1:{listen};", text)
    assert n == 1
    (tmp_path / "streamwatch.conf").write_text(text)
    main = tmp_path / "nginx.conf"
    main.write_text(
        f"""
daemon off;
worker_processes 1;
pid {tmp_path / "nginx.pid"};
error_log {tmp_path / "error.log"} notice;
events {{ worker_connections 256; }}
http {{
    client_body_temp_path {tmp_path / "body"};
    proxy_temp_path {tmp_path / "proxy"};
    fastcgi_temp_path {tmp_path / "fastcgi"};
    uwsgi_temp_path {tmp_path / "uwsgi"};
    scgi_temp_path {tmp_path / "scgi"};
    include {tmp_path / "streamwatch.conf"};
}}
"""
    )
    return main


async def listening(port: int, proc: asyncio.subprocess.Process, what: str) -> None:
    """Until something accepts connections on 127.0.0.1:port (another process: polled)."""
    async with asyncio.timeout(30):
        while True:
            assert proc.returncode is None, f"{what} exited"
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                await asyncio.sleep(0.05)
                continue
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
            return


async def ready(http: aiohttp.ClientSession, port: int, proc: asyncio.subprocess.Process) -> None:
    """Until the replica's /readyz answers 200 (migrated, first lease round run)."""
    async with asyncio.timeout(30):
        while True:
            assert proc.returncode is None, "a replica exited"
            with contextlib.suppress(aiohttp.ClientError):
                async with http.get(f"http://127.0.0.1:{port}/readyz") as resp:
                    if resp.status == 200:
                        return
            await asyncio.sleep(0.1)  # another process's start: polled, bounded


@contextlib.asynccontextmanager
async def nginx(tmp_path: Path, listen: int, replicas: list[int]) -> AsyncIterator[Path]:
    """The real nginx on 127.0.0.1:listen with the shipped config; yields its folder, where
    `out` is its stdout (the access log) and `err` its stderr."""
    main = loopback_nginx_config(tmp_path, listen, replicas)
    exe = tool("nginx")
    code, out = run(exe, "-t", "-p", str(tmp_path), "-c", str(main), "-e", str(tmp_path / "t.log"))
    assert code == 0, out
    with (tmp_path / "out").open("wb") as out_file, (tmp_path / "err").open("wb") as err_file:
        proc = await asyncio.create_subprocess_exec(
            exe,
            "-p",
            str(tmp_path),
            "-c",
            str(main),
            "-e",
            str(tmp_path / "error.log"),
            stdout=out_file,
            stderr=err_file,
        )
    try:
        await listening(listen, proc, "nginx")
        yield tmp_path
    finally:
        proc.send_signal(signal.SIGQUIT)  # graceful: finish what is in flight
        await proc.wait()


def access_log(folder: Path) -> list[str]:
    return (folder / "out").read_text().splitlines()


class Upstream:
    """A stand-in replica on 127.0.0.1 that reads each request whole, then answers `status`,
    or with `status` None closes the connection without a word (a replica that died after
    reading a callback); keeps the bodies it read."""

    def __init__(self, status: int | None) -> None:
        self.status = status
        self.bodies: list[bytes] = []
        self.port = 0

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = re.search(rb"(?im)^content-length:\s*(\d+)", head)
                self.bodies.append(await reader.readexactly(int(length[1]) if length else 0))
                if self.status is None:
                    break
                answer = b'{"ok": true}'
                writer.write(
                    b"HTTP/1.1 %d X\r\nContent-Type: application/json\r\n" % self.status
                    + b"Content-Length: %d\r\n\r\n%s" % (len(answer), answer)
                )
                await writer.drain()
        writer.close()

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[Upstream]:
        server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = server.sockets[0].getsockname()[1]
        async with server:
            yield self


@pytest.mark.parametrize(
    "failing",
    [pytest.param(None, id="died-mid-request"), pytest.param(503, id="not-stored-retry")],
)
async def test_nginx_sends_a_callback_a_replica_took_but_did_not_store_to_the_next(
    tmp_path: Path, failing: int | None
):
    """The shipped nginx config, run by the real nginx: a callback that one replica read but
    never answered (it died mid-request) or answered 503 (not stored) is sent again to the
    other replica, so MAVI gets 200 for every callback and the other replica got each one."""
    async with (
        Upstream(failing).running() as bad,
        Upstream(200).running() as good,
    ):
        listen = free_port()
        async with nginx(tmp_path, listen, [bad.port, good.port]), aiohttp.ClientSession() as s:
            answers = []
            for i in range(6):
                async with s.post(
                    f"http://127.0.0.1:{listen}/callbacks/mavi/{SECRET}",
                    json={"task_id": "t", "segment_index": i},
                ) as resp:
                    answers.append(resp.status)
    assert answers == [200] * 6
    assert bad.bodies  # the failing replica was tried…
    assert sorted(good.bodies) == sorted(
        f'{{"task_id": "t", "segment_index": {i}}}'.encode() for i in range(6)
    )  # …and the other one got every callback, the failed ones included


@pytest.mark.timeout(120)
async def test_callbacks_through_nginx_are_stored_with_one_replica_killed(
    tmp_path: Path, pg_cluster: pg.Cluster
):
    """The shipped nginx config, run by the real nginx in front of two replica processes
    running the shipped streams-cluster.toml on a real PostgreSQL, takes the emulator's
    callbacks and spreads them over both replicas; with one replica killed (SIGKILL)
    mid-traffic, nginx sends what would have gone to it to the other, so every callback is
    acknowledged at its first attempt (none left to MAVI's redelivery), and every
    acknowledged callback is stored, once. nginx's logs never show the callback secret."""
    pg_cluster.add_password_user()
    database = pg_cluster.new_database()
    pg_cluster.admin(f"ALTER DATABASE {database} OWNER TO {pg.PASSWORD_USER}")
    target_url = pg_cluster.url(database, user=pg.PASSWORD_USER)
    secrets = {
        "STREAMWATCH_DB_PASSWORD_FILE": pg.PASSWORD,
        "MAVI_API_KEY_FILE": API_KEY,
        "STREAMWATCH_CALLBACK_SECRET_FILE": SECRET,
    }
    env = {"STREAMWATCH_DATABASE_URL": target_url, "ALERTMANAGER_URL": "http://127.0.0.1:9"}
    for variable, value in secrets.items():
        (tmp_path / variable).write_text(value + "\n")
        env[variable] = str(tmp_path / variable)
    config = host_path(REPLICAS[0], replica_env(REPLICAS[0])["STREAMWATCH_CONFIG"], FLEET)
    streams = {s["name"] for s in tomllib.loads(config.read_text())["streams"]}
    listen, ports = free_port(), [free_port(), free_port()]
    emulator = Emulator(
        segment_seconds=0.2,
        api_key=API_KEY,
        redelivery_initial_seconds=0.05,
        redelivery_attempts=40,
        webhook=f"http://127.0.0.1:{listen}/callbacks/mavi/{SECRET}",
    )
    (tmp_path / "nginx").mkdir()
    procs: list[asyncio.subprocess.Process] = []
    async with (
        emulator.running(),
        nginx(tmp_path / "nginx", listen, ports) as logs,
        aiohttp.ClientSession() as http,
    ):
        env["MAVI_BASE_URL"] = emulator.base_url
        try:
            for port in ports:
                procs.append(
                    await spawn_daemon(config, env | {"STREAMWATCH_LISTEN": f"127.0.0.1:{port}"})
                )
            for port, proc in zip(ports, procs, strict=True):
                await ready(http, port, proc)
            serving = len(emulator.deliveries)
            # Every stream started (by one replica or the other), callbacks through both.
            await until(
                emulator,
                lambda: (
                    len({t.url for t in emulator.tasks.values()}) == len(streams)
                    and sum(d.delivered for d in emulator.deliveries) >= 40
                ),
                within=30,
            )
            used = " ".join(access_log(logs))
            assert all(f"upstream=127.0.0.1:{port}" in used for port in ports), used

            procs[0].send_signal(signal.SIGKILL)
            await procs[0].wait()
            killed = len(emulator.deliveries)
            retried = f"upstream=127.0.0.1:{ports[0]}, 127.0.0.1:{ports[1]}"
            await until(
                emulator,
                lambda: sum(d.delivered for d in emulator.deliveries[killed:]) >= 60,
                within=30,
            )
            emulator.paused = True
            await until(
                emulator,
                lambda: emulator.posting == 0 and all(d.delivered for d in emulator.deliveries),
                within=30,
            )
        finally:
            for proc in procs:
                if proc.returncode is None:
                    proc.send_signal(signal.SIGTERM)
            for proc in procs:
                await proc.wait()
    # nginx tried the killed replica, and the next one stored what it would have.
    lines = access_log(logs)
    assert any(retried in line and '" 200 ' in line for line in lines), lines[-20:]
    assert [d for d in emulator.deliveries[serving:] if d.attempts != 1] == []
    delivered = {(d.task_id, d.segment_index) for d in emulator.deliveries if d.delivered}
    stored = pg.rows(
        PgTarget(pg_cluster.url(database)),
        "SELECT task_id, segment_index FROM segments"
        " UNION ALL SELECT task_id, segment_index FROM orphan_callbacks",
    )
    assert len(stored) == len(set(stored))
    assert set(stored) == delivered
    everything = "".join((logs / name).read_text() for name in ("out", "err", "error.log"))
    assert SECRET not in everything
    assert "/callbacks/mavi/***" in everything
