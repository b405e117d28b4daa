"""The service artifacts (systemd unit, compose stack, Kubernetes manifests), each checked by the
tool that consumes it, and checked against each other: a port, a secret name, a mount path or a
stop timeout that drifts apart in two files fails here, not at 3 a.m.

The external checkers come from the dev extras (kubernetes-validate, check-jsonschema, hadolint)
or from Debian packages that .ci/run installs (systemd, docker-compose, prometheus,
prometheus-alertmanager); see `tool()`."""

from __future__ import annotations

import re
import secrets
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from ipaddress import ip_address
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from streamwatch.config import Config, ServerConfig, load_config, resolve_secrets
from streamwatch.guard import effective_limit
from tests import pg
from tests.conftest import cli, tool

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
UNIT = DEPLOY / "systemd" / "streamwatch.service"
COMPOSE = ROOT / "compose.yaml"
K8S = DEPLOY / "kubernetes"
DOCKERFILE = DEPLOY / "docker" / "Dockerfile"
# Time for the work after the drain: stopping tasks (on_shutdown = "stop"), closing the store.
AFTER_DRAIN = 10.0


def run(*argv: str, cwd: Path = ROOT) -> tuple[int, str]:
    proc = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=120, check=False)
    return proc.returncode, proc.stdout + proc.stderr


def seconds(value: str | int) -> float:
    """A duration as systemd, compose or Kubernetes write it: 30, "30", "30s", "1m30s"."""
    if isinstance(value, int):
        return float(value)
    parts = re.fullmatch(r"(?:(\d+)m)?(?:(\d+)s?)?", value.strip())
    assert value.strip(), "an empty duration"
    assert parts is not None, f"not a duration: {value!r}"
    return float(int(parts.group(1) or 0) * 60 + int(parts.group(2) or 0))


def secret_value() -> str:
    return secrets.token_urlsafe(24)


def toml_secret_sources(node: Any) -> Iterator[dict[str, str]]:
    """Every `{ env = … }` / `{ file = … }` table in a parsed streams.toml."""
    if isinstance(node, dict):
        if set(node) in ({"env"}, {"file"}):
            yield node
        for value in node.values():
            yield from toml_secret_sources(value)
    elif isinstance(node, list):
        for value in node:
            yield from toml_secret_sources(value)


# --- systemd ----------------------------------------------------------------------------------


def unit_settings(text: str, section: str = "Service") -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    current = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = line.strip("[]")
        elif current == section:
            key, _, value = line.partition("=")
            settings.setdefault(key, []).append(value)
    return settings


def runnable_unit(tmp_path: Path, text: str | None = None) -> Path:
    """The unit with ExecStart pointing at this checkout's installed `streamwatch` (verify
    checks that the program exists) and a config that exists."""
    exe = Path(sys.executable).parent / "streamwatch"
    assert exe.exists(), exe
    config = tmp_path / "streams.toml"
    config.write_text((DEPLOY / "systemd" / "streams.toml").read_text())
    text = UNIT.read_text() if text is None else text
    text = text.replace("/opt/streamwatch/bin/streamwatch", str(exe)).replace(
        "/etc/streamwatch/streams.toml", str(config)
    )
    unit = tmp_path / "streamwatch.service"
    unit.write_text(text)
    return unit


def test_unit_passes_systemd_analyze_verify(tmp_path: Path):
    """`systemd-analyze verify` accepts the unit with nothing to say (it warns, with exit code 0,
    about values it ignores, so silence is the criterion)."""
    analyze = tool("systemd-analyze")
    code, out = run(analyze, "verify", str(runnable_unit(tmp_path)))
    assert (code, out) == (0, "")


@pytest.mark.parametrize(
    ("good", "bad"),
    [("Type=notify", "Type=notfy"), ("ProtectSystem=strict", "ProtectSystem=strcit")],
)
def test_verify_check_catches_an_ignored_setting(tmp_path: Path, good: str, bad: str):
    """The check above is not blind: a typo systemd would silently ignore makes it speak."""
    analyze = tool("systemd-analyze")
    unit = runnable_unit(tmp_path, UNIT.read_text().replace(good, bad))
    code, out = run(analyze, "verify", str(unit))
    assert "ignoring" in out, (code, out)


def test_unit_is_hardened(tmp_path: Path):
    """`systemd-analyze security` rates the unit 2.0 or lower ("OK"; the default is 9.6)."""
    analyze = tool("systemd-analyze")
    _, out = run(analyze, "security", "--offline=true", str(runnable_unit(tmp_path)))
    found = re.search(r"Overall exposure level for streamwatch\.service: ([\d.]+)", out)
    assert found is not None, out
    assert float(found.group(1)) <= 2.0, out


def test_unit_is_a_notify_service_with_a_watchdog():
    """What the daemon implements (READY, WATCHDOG, RELOADING, STOPPING) is what the unit asks."""
    unit = unit_settings(UNIT.read_text())
    assert unit["Type"] == ["notify"]
    assert seconds(unit["WatchdogSec"][0]) > 0
    assert unit["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert unit["DynamicUser"] == ["yes"]
    assert unit["StateDirectory"] == ["streamwatch"]


def test_file_limits_let_the_default_connection_cap_stand():
    """The unit's LimitNOFILE and the compose service's nofile ulimit leave room for the
    default [server] max_connections, with the state file and outbound requests beside it."""
    default = ServerConfig().max_connections
    unit = unit_settings(UNIT.read_text())
    assert effective_limit(default, int(unit["LimitNOFILE"][0])) == default
    nofile = yaml.safe_load(COMPOSE.read_text())["services"]["streamwatch"]["ulimits"]["nofile"]
    assert effective_limit(default, min(nofile["soft"], nofile["hard"])) == default


def test_unit_credentials_are_the_files_the_config_reads(tmp_path: Path):
    """The LoadCredential= names are exactly the credentials deploy/systemd/streams.toml reads,
    and with them in $CREDENTIALS_DIRECTORY `streamwatch check-config` passes."""
    config = DEPLOY / "systemd" / "streams.toml"
    loaded = {
        value.partition(":")[0]: value.partition(":")[2]
        for value in unit_settings(UNIT.read_text())["LoadCredential"]
    }
    read = {
        Path(source["file"]).name
        for source in toml_secret_sources(tomllib.loads(config.read_text()))
        if source.get("file", "").startswith("${CREDENTIALS_DIRECTORY")
    }
    assert set(loaded) == read == {"mavi_api_key", "callback_secret"}
    assert all(path.startswith("/etc/streamwatch/credentials/") for path in loaded.values())

    creds = tmp_path / "credentials"
    creds.mkdir()
    env = {"CREDENTIALS_DIRECTORY": str(creds), "STREAMWATCH_STATE": str(tmp_path / "sw.db")}
    missing = cli("check-config", "--config", str(config), env=env)
    assert missing.returncode != 0
    assert "mavi_api_key" in missing.stderr
    for name in loaded:
        (creds / name).write_text(secret_value() + "\n")
    ok = cli("check-config", "--config", str(config), env=env)
    assert ok.returncode == 0, ok.stderr
    assert "backend mavi" in ok.stdout


def on_password_database(
    text: str, loaded: set[str], pg_cluster: pg.Cluster, tmp_path: Path
) -> tuple[Path, Path]:
    """The systemd `streams.toml` (`text`, its PostgreSQL lines uncommented) made to run: the
    credentials the unit loads (`loaded`) are exactly those the config reads; its `url` names
    a new database of `pg_cluster` owned by the password user; each credential is a file in a
    credentials folder. Returns the config file and that folder."""
    read = {
        Path(source["file"]).name
        for source in toml_secret_sources(tomllib.loads(text))
        if source.get("file", "").startswith("${CREDENTIALS_DIRECTORY")
    }
    assert loaded == read == {"mavi_api_key", "callback_secret", "db_password"}
    pg_cluster.add_password_user()
    name = pg_cluster.new_database()
    pg_cluster.admin(f"ALTER DATABASE {name} OWNER TO {pg.PASSWORD_USER}")
    url = re.search(r'^url = "([^"]+)"', text, re.M)
    assert url is not None
    config = tmp_path / "streams.toml"
    config.write_text(text.replace(url.group(1), pg_cluster.url(name, user=pg.PASSWORD_USER)))
    creds = tmp_path / "credentials"
    creds.mkdir()
    for credential in loaded:
        (creds / credential).write_text(secret_value() + "\n")
    (creds / "db_password").write_text(pg.PASSWORD + "\n")
    return config, creds


def test_unit_and_config_postgresql_lines_keep_the_password_a_credential(
    tmp_path: Path, pg_cluster: pg.Cluster
):
    """The commented PostgreSQL lines of the unit and of streams.toml, uncommented, agree: the
    password is a credential the unit loads and the config reads, and with the URL pointed at
    a real server `streamwatch check-config` passes."""
    unit = "\n".join(
        line.removeprefix("#") if line.startswith("#LoadCredential=") else line
        for line in UNIT.read_text().splitlines()
    )
    text = (DEPLOY / "systemd" / "streams.toml").read_text()
    lines = [line for line in text.splitlines() if not line.startswith("path = ")]
    text = "\n".join(
        line.removeprefix("#") if line.startswith(("#url = ", "#password = ")) else line
        for line in lines
    )
    loaded = {v.partition(":")[0] for v in unit_settings(unit)["LoadCredential"]}
    config, creds = on_password_database(text, loaded, pg_cluster, tmp_path)
    ok = cli("check-config", "--config", str(config), env={"CREDENTIALS_DIRECTORY": str(creds)})
    assert ok.returncode == 0, ok.stderr


# --- compose ----------------------------------------------------------------------------------


def compose(file: Path = COMPOSE) -> dict[str, Any]:
    doc = yaml.safe_load(file.read_text())
    assert isinstance(doc, dict)
    return doc


def service(name: str, file: Path = COMPOSE) -> dict[str, Any]:
    svc = compose(file)["services"][name]
    assert isinstance(svc, dict)
    return svc


def bind_mounts(name: str, file: Path = COMPOSE) -> dict[str, Path]:
    """Container path -> checkout path, for the service's `./…` bind mounts."""
    mounts = {}
    for volume in service(name, file).get("volumes", []):
        source, target = volume.split(":")[:2]
        if source.startswith("./"):
            mounts[target] = ROOT / source
    return mounts


def host_path(name: str, container_path: str, file: Path = COMPOSE) -> Path:
    """Where a file the service reads inside its container comes from in this checkout."""
    for target, source in bind_mounts(name, file).items():
        if container_path == target or container_path.startswith(target.rstrip("/") + "/"):
            found = source / container_path[len(target) :].lstrip("/")
            assert found.exists(), f"{name}: {container_path} -> {found} does not exist"
            return found
    raise AssertionError(f"{name}: nothing is mounted at {container_path}")


def flag(name: str, option: str, file: Path = COMPOSE) -> str:
    for arg in service(name, file).get("command", []):
        if arg.startswith(f"--{option}="):
            return str(arg.split("=", 1)[1])
    raise AssertionError(f"{name}: no --{option}")


def assert_service_address(host: str, port: int, file: Path = COMPOSE) -> None:
    """host:port is a service of the stack listening on that port in its container."""
    services = compose(file)["services"]
    assert host in services, f"{host} is not a service of {file.name}"
    container_ports = {int(p.rsplit(":", 1)[1]) for p in services[host].get("ports", [])}
    assert port in container_ports, f"{host} does not listen on {port}: {container_ports}"


def assert_service_url(url: str, file: Path = COMPOSE) -> None:
    found = re.fullmatch(r"https?://([^:/]+):(\d+)/?", url)
    assert found is not None, url
    assert_service_address(found.group(1), int(found.group(2)), file)


def dockerfile_env() -> dict[str, str]:
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    env: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("ENV "):
            env |= dict(pair.split("=", 1) for pair in line[4:].split())
    return env


def streamwatch_env() -> dict[str, str]:
    """The environment the streamwatch container runs with: the image's, then compose's."""
    return dockerfile_env() | {k: str(v) for k, v in service("streamwatch")["environment"].items()}


def test_compose_file_passes_docker_compose():
    """docker-compose itself parses and validates the file."""
    code, out = run(tool("docker-compose"), "-f", str(COMPOSE), "config", "-q")
    assert code == 0, out


def test_compose_file_matches_the_compose_specification(tmp_path: Path):
    """The Compose Specification's JSON schema (the one docker compose v2 uses) accepts it, and
    rejects a broken copy."""
    checker = tool("check-jsonschema")
    code, out = run(checker, "--builtin-schema", "vendor.compose-spec", str(COMPOSE))
    assert code == 0, out
    broken = tmp_path / "compose.yaml"
    broken.write_text(COMPOSE.read_text().replace("stop_grace_period: 30s", "stop_grace_perio: 1"))
    code, out = run(checker, "--builtin-schema", "vendor.compose-spec", str(broken))
    assert code != 0, out


def test_every_mounted_config_has_a_check_here():
    """A config mounted into the stack but not checked below fails this test."""
    checked = {
        ("streamwatch", "/etc/streamwatch/streams.toml"),
        ("streamwatch-pg", "/etc/streamwatch/streams.toml"),
        ("prometheus", "/etc/prometheus"),
        ("alertmanager", "/etc/alertmanager/alertmanager.yml"),
        ("grafana", "/etc/grafana/provisioning"),
        ("grafana", "/var/lib/grafana/dashboards"),
    }
    mounted = {(name, target) for name in compose()["services"] for target in bind_mounts(name)}
    assert mounted == checked
    for name, target in mounted:
        assert bind_mounts(name)[target].exists(), (name, target)


def test_compose_streamwatch_config_passes_check_config(tmp_path: Path):
    """The daemon's config, in the container's environment: `streamwatch check-config` passes
    (a temporary folder standing in for the state volume), it listens on the published port,
    keeps state on the volume and alerts the stack's Alertmanager."""
    env = streamwatch_env()
    path = host_path("streamwatch", env["STREAMWATCH_CONFIG"])
    volume = {"STREAMWATCH_STATE": str(tmp_path / "streamwatch.db")}
    result = cli("check-config", "--config", str(path), env=env | volume)
    assert result.returncode == 0, result.stderr
    config = load_config(path, environ=env)
    assert config.mavi.backend == "emulator"
    assert_service_address("streamwatch", config.server.port)
    assert ip_address(config.server.host).is_unspecified  # listens beyond loopback
    volumes = [v.split(":") for v in service("streamwatch")["volumes"]]
    state = [target for source, target, *_ in volumes if source in compose()["volumes"]]
    assert config.storage.path.parent == Path(state[0])
    sinks = resolve_secrets(config, environ=env).sinks
    assert_service_url(sinks["alertmanager"][0].get_secret_value())


def test_compose_postgres_profile_runs_streamwatch_on_the_stacks_database(
    tmp_path: Path, pg_cluster: pg.Cluster
):
    """The `postgres` profile: the official image with a volume and a healthcheck, and a
    daemon whose config names that service, its user, database and password secret; with the
    URL and secret pointed at a real server, `streamwatch check-config` passes."""
    db = service("postgres")
    assert db["image"].startswith("postgres:")
    assert db["profiles"] == service("streamwatch-pg")["profiles"] == ["postgres"]
    assert "pg_isready" in " ".join(db["healthcheck"]["test"])
    assert any(v.split(":")[0] in compose()["volumes"] for v in db["volumes"])
    daemon = service("streamwatch-pg")
    assert daemon["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert db["secrets"] == daemon["secrets"] == ["postgres-password"]
    secret_file = f"/run/secrets/{db['secrets'][0]}"
    assert db["environment"]["POSTGRES_PASSWORD_FILE"] == secret_file
    env = dockerfile_env() | {k: str(v) for k, v in daemon["environment"].items()}
    path = host_path("streamwatch-pg", env["STREAMWATCH_CONFIG"])
    config = load_config(path, environ=env)
    url = urlsplit(str(config.storage.url))
    assert (url.hostname, url.port) == ("postgres", 5432)
    assert url.username == db["environment"]["POSTGRES_USER"]
    assert url.path.lstrip("/") == db["environment"]["POSTGRES_DB"]
    assert config.storage.password is not None
    assert config.storage.password.file == Path(secret_file)
    pg_cluster.add_password_user()
    name = pg_cluster.new_database()
    pg_cluster.admin(f"ALTER DATABASE {name} OWNER TO {pg.PASSWORD_USER}")
    (tmp_path / "pw").write_text(pg.PASSWORD + "\n")
    real = {
        "STREAMWATCH_DATABASE_URL": pg_cluster.url(name, user=pg.PASSWORD_USER),
        "STREAMWATCH_DB_PASSWORD_FILE": str(tmp_path / "pw"),
    }
    result = cli("check-config", "--config", str(path), env=env | real)
    assert result.returncode == 0, result.stderr
    (tmp_path / "pw").write_text("wrong\n")
    result = cli("check-config", "--config", str(path), env=env | real)
    assert "authentication failed" in result.stderr
    assert pg.PASSWORD not in result.stderr + result.stdout


def test_compose_prometheus_config_passes_promtool():
    """`promtool check config` (which also checks the rule files it names) on the mounted
    config; every scrape and Alertmanager target is a service of the stack."""
    path = host_path("prometheus", flag("prometheus", "config.file"))
    code, out = run(tool("promtool"), "check", "config", path.name, cwd=path.parent)
    assert code == 0, out
    assert "SUCCESS" in out
    assert "streamwatch.rules.yml" in out
    doc = yaml.safe_load(path.read_text())
    targets = [
        target
        for section in (doc["scrape_configs"], doc["alerting"]["alertmanagers"])
        for job in section
        for static in job["static_configs"]
        for target in static["targets"]
    ]
    assert targets
    for target in targets:
        host, port = target.split(":")
        assert_service_address(host, int(port))


def test_compose_alertmanager_config_passes_amtool():
    path = host_path("alertmanager", flag("alertmanager", "config.file"))
    code, out = run(tool("amtool"), "check-config", str(path))
    assert code == 0, out
    assert "SUCCESS" in out


def test_compose_grafana_provisions_the_dashboard_from_the_stack_prometheus():
    """Grafana's provisioning (YAML it reads at start) loads the dashboards folder that is
    mounted, the home dashboard exists there, and the datasource is the stack's Prometheus."""
    provisioning = host_path("grafana", "/etc/grafana/provisioning")
    providers = [
        provider
        for file in sorted((provisioning / "dashboards").glob("*.yml"))
        for provider in yaml.safe_load(file.read_text())["providers"]
    ]
    assert providers
    for provider in providers:
        folder = host_path("grafana", provider["options"]["path"])
        assert sorted(folder.glob("*.json")), folder
    home = service("grafana")["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    dashboard = yaml.safe_load(host_path("grafana", home).read_text())  # JSON is YAML
    assert dashboard["title"] == "streamwatch"
    datasources = [
        source
        for file in sorted((provisioning / "datasources").glob("*.yml"))
        for source in yaml.safe_load(file.read_text())["datasources"]
    ]
    assert [s["type"] for s in datasources] == ["prometheus"]
    assert_service_url(datasources[0]["url"])
    assert datasources[0]["url"].startswith("http://prometheus:")


# --- Kubernetes -------------------------------------------------------------------------------


def manifests() -> dict[str, dict[str, Any]]:
    """kind -> object, for every manifest in deploy/kubernetes/."""
    found: dict[str, dict[str, Any]] = {}
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            assert doc["kind"] not in found, f"two {doc['kind']}s"
            found[doc["kind"]] = doc
    return found


def container() -> dict[str, Any]:
    containers = manifests()["Deployment"]["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    result = containers[0]
    assert isinstance(result, dict)
    return result


def k8s_config(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """The ConfigMap's streams.toml as the pod sees it, and an environment like the pod's."""
    pod = manifests()["Deployment"]["spec"]["template"]["spec"]
    args = container()["args"]
    config_path = args[args.index("--config") + 1]
    mount = next(
        m
        for m in container()["volumeMounts"]
        if config_path.startswith(m["mountPath"].rstrip("/") + "/")
    )
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    configmap = manifests()["ConfigMap"]
    assert volume["configMap"]["name"] == configmap["metadata"]["name"]
    key = config_path[len(mount["mountPath"]) :].lstrip("/")
    path = tmp_path / key
    path.write_text(configmap["data"][key])
    env = {e["name"]: secret_value() for e in container()["env"] if "valueFrom" in e}
    return path, env


def test_kubernetes_manifests_pass_strict_schema_validation(tmp_path: Path):
    """kubernetes-validate --strict (the API's own OpenAPI schemas, unknown fields rejected)
    passes on every manifest and fails on a misspelt field."""
    validate = tool("kubernetes-validate")
    files = sorted(str(p) for p in K8S.glob("*.yaml"))
    assert len(files) == 4
    code, out = run(validate, "--strict", *files)
    assert code == 0, out
    broken = tmp_path / "deployment.yaml"
    broken.write_text(
        (K8S / "deployment.yaml")
        .read_text()
        .replace("terminationGracePeriodSeconds", "terminationGracePeriodSecond")
    )
    code, out = run(validate, "--strict", str(broken))
    assert code != 0, out


def test_kubernetes_config_reads_exactly_the_secrets_the_deployment_provides(tmp_path: Path):
    """The config's `{ env = … }` secrets are the Deployment's secretKeyRef variables, and with
    them `streamwatch check-config` passes on the ConfigMap's streams.toml (a temporary folder
    standing in for the state volume)."""
    path, env = k8s_config(tmp_path)
    read = {s["env"] for s in toml_secret_sources(tomllib.loads(path.read_text())) if "env" in s}
    provided = {
        e["name"]
        for e in container()["env"]
        if "secretKeyRef" in e.get("valueFrom", {})
        and not e["valueFrom"]["secretKeyRef"].get("optional")
    }
    assert read == provided == {"MAVI_API_KEY", "STREAMWATCH_CALLBACK_SECRET"}
    volume = {"STREAMWATCH_STATE": str(tmp_path / "streamwatch.db")}
    result = cli("check-config", "--config", str(path), env=env | volume)
    assert result.returncode == 0, result.stderr


def test_kubernetes_postgresql_variant_reads_the_database_url_from_its_secret(
    tmp_path: Path, pg_cluster: pg.Cluster
):
    """deploy/kubernetes/postgresql/ replaces the ConfigMap (it passes kubernetes-validate
    --strict) with one keeping the state in PostgreSQL at the URL of the Secret the
    Deployment passes (optional, so the SQLite variant runs without it); with that URL
    pointing at a real server, password included, `streamwatch check-config` passes."""
    variant = K8S / "postgresql" / "configmap.yaml"
    code, out = run(tool("kubernetes-validate"), "--strict", str(variant))
    assert code == 0, out
    doc = yaml.safe_load(variant.read_text())
    assert doc["metadata"]["name"] == manifests()["ConfigMap"]["metadata"]["name"]
    path, env = k8s_config(tmp_path)
    path.write_text(doc["data"][path.name])
    read = {s["env"] for s in toml_secret_sources(tomllib.loads(path.read_text())) if "env" in s}
    refs = {
        e["name"]: e["valueFrom"]["secretKeyRef"]
        for e in container()["env"]
        if "secretKeyRef" in e.get("valueFrom", {})
    }
    assert read == set(refs)
    assert refs["STREAMWATCH_DATABASE_URL"]["optional"] is True
    pg_cluster.add_password_user()
    name = pg_cluster.new_database()
    pg_cluster.admin(f"ALTER DATABASE {name} OWNER TO {pg.PASSWORD_USER}")
    url = pg_cluster.url(name, user=pg.PASSWORD_USER).replace("@", f":{pg.PASSWORD}@", 1)
    result = cli("check-config", "--config", str(path), env=env | {"STREAMWATCH_DATABASE_URL": url})
    assert result.returncode == 0, result.stderr
    assert pg.PASSWORD not in result.stdout + result.stderr


def test_kubernetes_objects_agree_with_each_other_and_the_config(tmp_path: Path):
    """Ports, probes, labels, the volume claim, the state path and the user line up."""
    objects = manifests()
    deployment, svc = objects["Deployment"], objects["Service"]
    pvc = objects["PersistentVolumeClaim"]
    path, env = k8s_config(tmp_path)
    config: Config = load_config(path, environ=env)
    pod = deployment["spec"]["template"]
    ports = {p["name"]: p["containerPort"] for p in container()["ports"]}

    # One writer of the state file, never two pods at once.
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"]["type"] == "Recreate"
    # Labels: the Deployment and the Service select this pod.
    labels = pod["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert svc["spec"]["selector"].items() <= labels.items()
    # Ports: the config listens where the pod, the probes, the Service and the scrape point.
    assert ip_address(config.server.host).is_unspecified  # listens beyond loopback
    assert ports["http"] == config.server.port
    assert [p["targetPort"] for p in svc["spec"]["ports"]] == ["http"]
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        get = container()[probe]["httpGet"]
        assert get["port"] == "http"
        assert get["path"] in {"/readyz", "/healthz"}
    assert pod["metadata"]["annotations"]["prometheus.io/port"] == str(config.server.port)
    assert pod["metadata"]["annotations"]["prometheus.io/path"] == "/metrics"
    # State: the claim exists and the config's state file is on it.
    mounts = {m["name"]: m["mountPath"] for m in container()["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    state = next(n for n, v in volumes.items() if "persistentVolumeClaim" in v)
    assert volumes[state]["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]
    assert config.storage.path.parent == Path(mounts[state])
    # The image's user (Dockerfile USER) is the pod's non-root user.
    uid = re.search(r"^USER (\d+):(\d+)$", DOCKERFILE.read_text(), re.M)
    assert uid is not None
    assert pod["spec"]["securityContext"]["runAsUser"] == int(uid.group(1))
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    assert container()["securityContext"]["readOnlyRootFilesystem"] is True


# --- all three --------------------------------------------------------------------------------


def test_every_stop_timeout_leaves_room_after_the_drain(tmp_path: Path):
    """systemd's TimeoutStopSec, compose's stop_grace_period and Kubernetes'
    terminationGracePeriodSeconds each exceed the drain_seconds of the config they run by at
    least AFTER_DRAIN seconds; otherwise the final callbacks and the last commit are killed."""
    creds = {"CREDENTIALS_DIRECTORY": str(tmp_path)}
    systemd_drain = load_config(DEPLOY / "systemd" / "streams.toml", environ=creds)
    k8s_path, k8s_env = k8s_config(tmp_path)
    env = streamwatch_env()
    compose_config = load_config(host_path("streamwatch", env["STREAMWATCH_CONFIG"]), environ=env)
    pairs = {
        "systemd": (
            unit_settings(UNIT.read_text())["TimeoutStopSec"][0],
            systemd_drain.supervisor.drain_seconds,
        ),
        "compose": (
            service("streamwatch")["stop_grace_period"],
            compose_config.supervisor.drain_seconds,
        ),
        "kubernetes": (
            manifests()["Deployment"]["spec"]["template"]["spec"]["terminationGracePeriodSeconds"],
            load_config(k8s_path, environ=k8s_env).supervisor.drain_seconds,
        ),
    }
    for where, (grace, drain) in pairs.items():
        assert seconds(grace) >= drain + AFTER_DRAIN, (where, grace, drain)
    assert service("streamwatch")["stop_signal"] == "SIGTERM"
    assert "STOPSIGNAL SIGTERM" in DOCKERFILE.read_text()
