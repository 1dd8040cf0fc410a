"""The deploy/ files: every YAML parses, and the Dockerfile, compose file, Kubernetes manifests
and systemd units hold together (with each other, with the settings and with the package)."""

from __future__ import annotations

import configparser
import json
import os
import re
import shlex
import shutil
import subprocess
import tomllib
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

import dispatcher
from dispatcher.api.probes import READY_BOUND
from dispatcher.failover import parse_sentinel_url
from dispatcher.settings import Settings
from dispatcher.worker.loop import stop_budget

# Settings built from a mapping of DISPATCHER_* variables; `where` names it in messages.
SettingsFromEnv = Callable[[Mapping[str, Any], str], Settings]

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "kubernetes"
SYSTEMD = DEPLOY / "systemd"
DOCKERFILE = DEPLOY / "Dockerfile"
COMPOSE = DEPLOY / "docker-compose.yml"
COMPOSE_HA = DEPLOY / "docker-compose.ha.yml"
KUSTOMIZATION = K8S / "kustomization.yaml"

YAML_FILES = sorted(p for p in DEPLOY.rglob("*") if p.suffix in (".yml", ".yaml"))
MANIFEST_FILES = sorted(p for p in K8S.glob("*.y*ml") if p.name != KUSTOMIZATION.name)
DEFAULT_GRACE = Settings.model_fields["shutdown_grace"].default


def load_yaml(path: Path) -> list[Any]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


# ---- settings ---------------------------------------------------------------------------


@pytest.fixture
def settings_from_env(monkeypatch: pytest.MonkeyPatch) -> SettingsFromEnv:
    """Build Settings from a mapping of DISPATCHER_* variables, and nothing else."""

    def build(env: Mapping[str, Any], where: str) -> Settings:
        for key in os.environ:
            if key.startswith("DISPATCHER_"):
                monkeypatch.delenv(key)
        for key, value in env.items():
            assert key.startswith("DISPATCHER_"), f"{where}: {key} is not a DISPATCHER_ setting"
            field = key.removeprefix("DISPATCHER_").lower()
            assert field in Settings.model_fields, f"{where}: {key} is no setting"
            if value is not None:
                monkeypatch.setenv(key, str(value))
        return Settings()

    return build


# ---- YAML ---------------------------------------------------------------------------------


def test_expected_files_exist() -> None:
    for path in (DOCKERFILE, COMPOSE, KUSTOMIZATION, DEPLOY / "README.md"):
        assert path.is_file(), rel(path)
    assert (SYSTEMD / "dispatcher-api.service").is_file()
    assert (SYSTEMD / "dispatcher-worker@.service").is_file()
    assert MANIFEST_FILES


@pytest.mark.parametrize("path", YAML_FILES, ids=[rel(p) for p in YAML_FILES])
def test_yaml_parses(path: Path) -> None:
    docs = load_yaml(path)
    assert docs, f"{rel(path)} has no document"
    for doc in docs:
        assert isinstance(doc, dict) and doc, f"{rel(path)}: a document is not a mapping"


# ---- Dockerfile ---------------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    result: list[tuple[str, str]] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        instruction, _, args = (pending + line).partition(" ")
        result.append((instruction.upper(), args.strip()))
        pending = ""
    assert not pending, "the Dockerfile ends inside a continued line"
    return result


def dockerfile_stages() -> list[list[tuple[str, str]]]:
    """The instructions of each stage, FROM first; ARG defaults given before FROM applied."""
    instructions = dockerfile_instructions()
    args: dict[str, str] = {}
    stages: list[list[tuple[str, str]]] = []
    for instruction, value in instructions:
        if instruction == "ARG" and not stages:
            name, _, default = value.partition("=")
            args[name] = default
            continue
        if instruction == "FROM":
            value = re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m[1], m[0]), value)
            stages.append([])
        assert stages, f"{instruction} before the first FROM"
        stages[-1].append((instruction, value))
    return stages


def test_dockerfile_is_multi_stage_on_slim_python() -> None:
    stages = dockerfile_stages()
    assert len(stages) >= 2
    for stage in stages:
        image = stage[0][1].split()[0]
        assert image == "python:3.11-slim", image
    build_name = stages[0][0][1].split()[-1]
    assert stages[0][0][1].lower().split()[-2:] == ["as", build_name]
    build_runs = " ".join(v for i, v in stages[0] if i == "RUN")
    assert "pip wheel" in build_runs
    # The final stage installs the wheels built in the first one.
    final_runs = " ".join(v for i, v in stages[-1] if i in ("RUN", "COPY"))
    assert f"from={build_name}" in final_runs or f"--from={build_name}" in final_runs
    assert "install" in final_runs and "--no-index" in final_runs


def test_dockerfile_runs_dispatcher_as_non_root() -> None:
    final = dockerfile_stages()[-1]
    users = [v for i, v in final if i == "USER"]
    assert users, "the final stage has no USER"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0"), users[-1]
    entrypoint = [v for i, v in final if i == "ENTRYPOINT"]
    assert entrypoint and json.loads(entrypoint[-1]) == ["dispatcher"]
    cmd = [v for i, v in final if i == "CMD"]
    assert cmd and json.loads(cmd[-1]) == ["api"]
    exposed = {p for i, v in final if i == "EXPOSE" for p in v.split()}
    assert {"8080", "9108"} <= exposed


def test_dockerfile_copies_what_the_wheel_build_needs() -> None:
    """The COPY sources exist at the repo root (the build context), cover what hatchling
    reads, and are not excluded by deploy/Dockerfile.dockerignore."""
    build = dockerfile_stages()[0]
    sources: set[str] = set()
    for instruction, value in build:
        if instruction == "COPY" and "--from" not in value:
            sources.update(s.rstrip("/") for s in value.split()[:-1] if not s.startswith("--"))
    for source in sources:
        assert (ROOT / source).exists(), f"COPY {source}: not in the build context"
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    needed = {"pyproject.toml", pyproject["project"]["readme"]}
    needed.update(pyproject["tool"]["hatch"]["build"]["targets"]["wheel"]["packages"])
    assert needed <= sources, f"not copied: {needed - sources}"
    ignore = DEPLOY / "Dockerfile.dockerignore"
    patterns = [
        line.strip()
        for line in ignore.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    if "*" in patterns:
        kept = {p[1:].rstrip("/") for p in patterns if p.startswith("!")}
        assert sources <= kept, f"excluded by {ignore.name}: {sources - kept}"


def dockerfile_uid() -> str:
    final = dockerfile_stages()[-1]
    return [v for i, v in final if i == "USER"][-1].split(":")[0]


# ---- docker compose -----------------------------------------------------------------------


def compose() -> dict[str, Any]:
    [doc] = load_yaml(COMPOSE)
    assert isinstance(doc, dict)
    return doc


def duration_seconds(value: str) -> float:
    """A compose duration: 60s, 1m30s, 90s, 1h."""
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", value)
    assert parts and "".join(n + u for n, u in parts) == value, f"bad duration {value!r}"
    scale = {"h": 3600, "m": 60, "s": 1, "ms": 0.001, "us": 0.000001}
    return sum(float(n) * scale[u] for n, u in parts)


def as_argv(command: str | list[str]) -> list[str]:
    return shlex.split(command) if isinstance(command, str) else [str(a) for a in command]


def test_compose_services() -> None:
    services = compose()["services"]
    assert {"redis", "api", "worker"} <= services.keys()


def test_compose_redis_is_durable_and_checked() -> None:
    doc = compose()
    redis = doc["services"]["redis"]
    assert str(redis["image"]).startswith("redis:7")
    command = " ".join(as_argv(redis["command"]))
    assert "--appendonly yes" in command
    assert "--appendfsync everysec" in command
    named = [v.split(":")[0] for v in redis["volumes"] if ":/data" in v]
    assert named and named[0] in (doc.get("volumes") or {}), "redis /data is no named volume"
    assert as_argv(redis["healthcheck"]["test"])[-2:] == ["redis-cli", "ping"]


@pytest.mark.parametrize("name", ["api", "worker"])
def test_compose_app_services(name: str, settings_from_env: SettingsFromEnv) -> None:
    service = compose()["services"][name]
    context = (COMPOSE.parent / service["build"]["context"]).resolve()
    assert context == ROOT
    assert (context / service["build"]["dockerfile"]).resolve() == DOCKERFILE
    assert service["depends_on"]["redis"]["condition"] == "service_healthy"
    assert as_argv(service["command"]) == [name]
    settings = settings_from_env(service["environment"], f"compose {name}")
    assert settings.redis_url is not None and "@redis:" in settings.redis_url.replace("//", "@")
    assert settings.api_host == "0.0.0.0"
    assert "healthcheck" in service


def test_compose_api() -> None:
    api = compose()["services"]["api"]
    assert any(str(p).split(":")[-1] == "8080" for p in api["ports"])
    check = " ".join(as_argv(api["healthcheck"]["test"]))
    assert "urllib" in check and "/healthz" in check


def test_compose_worker(settings_from_env: SettingsFromEnv) -> None:
    services = compose()["services"]
    worker = services["worker"]
    assert worker["image"] == services["api"]["image"], "one image for api and worker"
    assert worker.get("deploy", {}).get("replicas", 1) >= 2
    assert "ports" not in worker, "a published port would stop `--scale worker=N`"
    settings = settings_from_env(worker["environment"], "compose worker")
    assert "stop_grace_period" in worker
    assert duration_seconds(worker["stop_grace_period"]) > stop_budget(settings)
    assert as_argv(worker["healthcheck"]["test"])[-1:] == ["dispatcher-alive"]


def test_compose_keeps_the_history_in_postgres(settings_from_env: SettingsFromEnv) -> None:
    services = compose()["services"]
    postgres = services["postgres"]
    assert str(postgres["image"]).startswith("postgres:")
    assert any(":/var/lib/postgresql/data" in v for v in postgres["volumes"])
    assert "pg_isready" in as_argv(postgres["healthcheck"]["test"])
    assert "ports" not in postgres, "PostgreSQL stays inside the compose network"
    migrate = services["migrate"]
    assert as_argv(migrate["command"]) == ["db", "upgrade"]
    assert "postgres" in migrate["depends_on"]
    for name in ("api", "worker"):
        service = services[name]
        settings = settings_from_env(service["environment"], f"compose {name}")
        assert settings.history_url is not None and "@postgres:5432/" in settings.history_url


# ---- Kubernetes ---------------------------------------------------------------------------


def manifests() -> list[dict[str, Any]]:
    return [doc for path in MANIFEST_FILES for doc in load_yaml(path)]


def of_kind(kind: str) -> list[dict[str, Any]]:
    return [doc for doc in manifests() if doc["kind"] == kind]


def deployment(component: str) -> dict[str, Any]:
    """The Deployment whose container runs `dispatcher <component>`."""
    found = [
        d
        for d in of_kind("Deployment")
        if (d["spec"]["template"]["spec"]["containers"][0].get("args") or [None])[0] == component
    ]
    assert len(found) == 1, f"{len(found)} Deployments run `dispatcher {component}`"
    return found[0]


def container(doc: dict[str, Any]) -> dict[str, Any]:
    [only] = doc["spec"]["template"]["spec"]["containers"]
    assert isinstance(only, dict)
    return only


def config_data() -> dict[str, str]:
    [config] = of_kind("ConfigMap")
    data = config["data"]
    assert isinstance(data, dict)
    return data


def pod_ports(doc: dict[str, Any]) -> dict[str, int]:
    ports: dict[str, int] = {}
    for c in doc["spec"]["template"]["spec"]["containers"]:
        for port in c.get("ports", []):
            ports[str(port["containerPort"])] = port["containerPort"]
            if "name" in port:
                ports[port["name"]] = port["containerPort"]
    return ports


def test_every_manifest_is_named() -> None:
    for path in MANIFEST_FILES:
        for doc in load_yaml(path):
            assert doc.get("apiVersion"), f"{rel(path)}: no apiVersion"
            assert doc.get("kind"), f"{rel(path)}: no kind"
            assert doc.get("metadata", {}).get("name"), f"{rel(path)}: {doc['kind']} has no name"
            assert doc["kind"] != "Secret", f"{rel(path)}: no Secret in the repository"


def test_kustomization_lists_every_manifest() -> None:
    [kustomization] = load_yaml(KUSTOMIZATION)
    assert kustomization["kind"] == "Kustomization"
    listed = set(kustomization["resources"])
    assert listed == {p.name for p in MANIFEST_FILES}
    images = {i["name"] for i in kustomization.get("images", [])}
    for doc in of_kind("Deployment"):
        for c in doc["spec"]["template"]["spec"]["containers"]:
            assert c["image"].split(":")[0] in images | {c["image"]}


def test_the_deployed_image_is_this_versions(repo_root: Path) -> None:
    """deploy/ runs what this version's image holds (its probe, `dispatcher-alive`, is
    0.2.0's): the tags name this version, so no node runs an older image of the same tag."""
    version = tomllib.loads((repo_root / "pyproject.toml").read_text())["project"]["version"]
    assert dispatcher.__version__ == version
    [kustomization] = load_yaml(KUSTOMIZATION)
    assert {i.get("newTag") for i in kustomization["images"]} == {version}
    [compose] = load_yaml(COMPOSE)
    tags = {s["image"].rsplit(":", 1)[1] for s in compose["services"].values() if "image" in s}
    assert tags >= {version} and not {t for t in tags if t.startswith("0.")} - {version}


def test_deployment_selectors_match_their_pods() -> None:
    for doc in of_kind("Deployment"):
        selector = doc["spec"]["selector"]["matchLabels"]
        labels = doc["spec"]["template"]["metadata"]["labels"]
        assert selector and selector.items() <= labels.items(), doc["metadata"]["name"]


@pytest.mark.parametrize("kind", ["Service", "PodDisruptionBudget"])
def test_selectors_match_a_deployment(kind: str) -> None:
    assert of_kind(kind)
    for doc in of_kind(kind):
        selector = doc["spec"]["selector"]
        selector = selector.get("matchLabels", selector) if kind != "Service" else selector
        targets = [
            d
            for d in of_kind("Deployment")
            if selector.items() <= d["spec"]["template"]["metadata"]["labels"].items()
        ]
        assert len(targets) == 1, f"{kind} {doc['metadata']['name']} selects {len(targets)}"
        if kind == "Service":
            for port in doc["spec"]["ports"]:
                assert str(port["targetPort"]) in pod_ports(targets[0])


def test_config_map_settings_parse(settings_from_env: SettingsFromEnv) -> None:
    settings = settings_from_env(config_data(), "ConfigMap")
    assert settings.api_host == "0.0.0.0"
    assert settings.log_format == "json"
    assert settings.worker_metrics_port is not None


def test_pods_reference_config_and_secret() -> None:
    config_names = {c["metadata"]["name"] for c in of_kind("ConfigMap")}
    readme = (DEPLOY / "README.md").read_text()
    for doc in of_kind("Deployment"):
        c = container(doc)
        refs = {e["configMapRef"]["name"] for e in c.get("envFrom", []) if "configMapRef" in e}
        assert refs and refs <= config_names
        env = {e["name"]: e for e in c.get("env", [])}
        assert "DISPATCHER_REDIS_URL" in env
        for var in env.values():
            if "valueFrom" in var:
                ref = var["valueFrom"]["secretKeyRef"]
                assert ref["name"] == "dispatcher-secrets"
                assert f"{ref['key']}=" in readme, f"README does not create key {ref['key']}"
            else:
                assert "TOKEN" not in var["name"], f"{var['name']} must come from the Secret"


def test_pods_run_as_the_image_user() -> None:
    for doc in of_kind("Deployment"):
        pod = doc["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert str(pod["securityContext"]["runAsUser"]) == dockerfile_uid()
        assert container(doc)["securityContext"]["allowPrivilegeEscalation"] is False


def test_prometheus_annotations_name_a_pod_port() -> None:
    for doc in of_kind("Deployment"):
        annotations = doc["spec"]["template"]["metadata"].get("annotations", {})
        assert annotations.get("prometheus.io/scrape") == "true", doc["metadata"]["name"]
        assert annotations["prometheus.io/port"] in pod_ports(doc)
        assert annotations.get("prometheus.io/path", "/metrics") == "/metrics"
    data = config_data()
    assert str(data["DISPATCHER_WORKER_METRICS_PORT"]) in pod_ports(deployment("worker"))
    assert str(data["DISPATCHER_API_PORT"]) in pod_ports(deployment("api"))


# The longest each probed endpoint takes, as its code documents it (seconds): /readyz asks
# every shard at once within READY_BOUND; /healthz and `dispatcher-alive` ask nothing (a file).
PROBE_BOUNDS = {"/readyz": READY_BOUND, "/healthz": 0.0, "dispatcher-alive": 0.0}
HTTP_MARGIN = 1.0  # the request's own time
# A probe that starts a process: its imports (`dispatcher-alive`, the standard library's
# only, and `python -c "import urllib.request; ..."`: 0.1 s; the whole CLI, `dispatcher
# worker --check`, ~3 s on a busy 2-core machine).
PROCESS_MARGIN = {"dispatcher-alive": 1.0, "python": 1.0}
OTHERS = ("redis-cli", "pg_isready")  # Redis' and PostgreSQL's own checks


def probe_bound(command: list[str]) -> float:
    """The bound of what an exec probe or compose healthcheck runs, its process's start in."""
    text = " ".join(command)
    for endpoint, bound in PROBE_BOUNDS.items():
        if endpoint in text:
            inner = re.search(r"timeout=(\d+(?:\.\d+)?)", text)  # urllib's own, if any
            if inner:
                assert float(inner[1]) > bound + HTTP_MARGIN, f"{text}: its timeout is too short"
                bound = float(inner[1])
            [start] = [m for p, m in PROCESS_MARGIN.items() if p in command]
            return bound + start
    raise AssertionError(f"a probe of nothing PROBE_BOUNDS knows: {text}")


def test_every_probe_outlasts_its_endpoints_bound() -> None:
    """A probe whose timeout is shorter than the endpoint's answer fails on a healthy
    process: /readyz waited 5 s for a frozen shard under a 3 s readiness probe, and every API
    pod went NotReady (review)."""
    checked = 0
    for doc in of_kind("Deployment"):
        for c in doc["spec"]["template"]["spec"]["containers"]:
            for kind in ("readinessProbe", "livenessProbe", "startupProbe"):
                probe = c.get(kind)
                if probe is None:
                    continue
                timeout = probe.get("timeoutSeconds", 1)  # Kubernetes' default
                if "httpGet" in probe:
                    bound = PROBE_BOUNDS[probe["httpGet"]["path"]] + HTTP_MARGIN
                else:
                    bound = probe_bound(probe["exec"]["command"])
                assert timeout > bound, f"{doc['metadata']['name']} {kind}: {timeout} s"
                checked += 1
    for path in (COMPOSE, COMPOSE_HA):
        [doc] = load_yaml(path)
        for name, service in doc["services"].items():
            test = service.get("healthcheck", {}).get("test")
            if test is None or any(other in as_argv(test) for other in OTHERS):
                continue
            timeout = duration_seconds(service["healthcheck"]["timeout"])
            assert timeout > probe_bound(as_argv(test)), f"{rel(path)} {name}: {timeout} s"
            checked += 1
    for path in UNITS.values():
        assert "WatchdogSec" not in path.read_text(), f"{rel(path)}: a probe to bound here"
    assert checked >= 5


def test_api_deployment_probes() -> None:
    api = container(deployment("api"))
    ports = pod_ports(deployment("api"))
    readiness, liveness = api["readinessProbe"]["httpGet"], api["livenessProbe"]["httpGet"]
    assert readiness["path"] == "/readyz"
    assert liveness["path"] == "/healthz"
    assert str(readiness["port"]) in ports and str(liveness["port"]) in ports
    assert api["resources"]["limits"] and api["resources"]["requests"]


def test_worker_deployment(settings_from_env: SettingsFromEnv) -> None:
    doc = deployment("worker")
    worker = container(doc)
    for key in ("requests", "limits"):
        assert {"cpu", "memory"} <= worker["resources"][key].keys(), key
    assert worker["livenessProbe"]["exec"]["command"] == ["dispatcher-alive"]
    # The check retries Redis for a while when it is down: the probe timeout must bound it.
    assert worker["livenessProbe"]["timeoutSeconds"] >= 5
    grace = doc["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace >= 30
    settings = settings_from_env(config_data(), "ConfigMap")
    assert grace > stop_budget(settings)
    assert "replicas" not in doc["spec"], "the HorizontalPodAutoscaler owns the replica count"


def test_the_api_pods_migrate_the_history_schema_first() -> None:
    api = deployment("api")
    [init] = api["spec"]["template"]["spec"]["initContainers"]
    assert init["args"][:2] == ["db", "upgrade"] and init["image"] == container(api)["image"]
    for doc in (api, deployment("worker")):
        env = {e["name"]: e for e in container(doc)["env"]}
        ref = env["DISPATCHER_HISTORY_URL"]["valueFrom"]["secretKeyRef"]
        assert ref["key"] == "history-url" and ref["optional"] is True  # absent: Redis


def test_no_api_start_waits_for_postgres() -> None:
    """The API works while PostgreSQL is away (history reads answer 503), but every
    deployment ran `dispatcher db upgrade` before it, which fails then: an API restart
    during a PostgreSQL outage crash-looped (review). The pre-start steps pass
    --if-reachable (an outage is a warning; reachable, a failed upgrade still holds the API
    back), and compose's `migrate` runs beside the API, retried until it succeeds."""
    [init] = deployment("api")["spec"]["template"]["spec"]["initContainers"]
    assert init["args"] == ["db", "upgrade", "--if-reachable"]
    for path in UNITS.values():
        for step in directive_values(path, "Service", "ExecStartPre"):
            if " db upgrade" in step:
                assert step.endswith(" db upgrade --if-reachable"), f"{rel(path)}: {step}"
    services = compose()["services"]
    for name, service in services.items():
        assert "migrate" not in service.get("depends_on", {}), f"compose {name} waits for it"
    assert services["migrate"]["restart"] == "on-failure"
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_started"


def test_hpa_scales_the_worker_deployment() -> None:
    [hpa] = of_kind("HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    target = hpa["spec"]["scaleTargetRef"]
    worker = deployment("worker")
    assert (target["apiVersion"], target["kind"]) == (worker["apiVersion"], "Deployment")
    assert target["name"] == worker["metadata"]["name"]
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    resources = [m["resource"]["name"] for m in hpa["spec"]["metrics"] if m["type"] == "Resource"]
    assert "cpu" in resources
    assert "cpu" in container(worker)["resources"]["requests"], "CPU utilisation needs a request"


def test_kustomize_renders() -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed")
    done = subprocess.run(
        [kubectl, "kustomize", str(K8S)], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    rendered = [d for d in yaml.safe_load_all(done.stdout) if d]
    assert len(rendered) == len(manifests())


@pytest.mark.parametrize("path", MANIFEST_FILES, ids=lambda p: p.name)
def test_manifests_validate_strictly_against_the_kubernetes_schemas(path: Path) -> None:
    """Offline schema validation (kubernetes-validate bundles the schemas): every object,
    every field known, for Kubernetes 1.33."""
    for document in yaml.safe_load_all(path.read_text()):
        if document:
            kubernetes_validate.validate(document, "1.33", strict=True)


# ---- systemd ------------------------------------------------------------------------------

UNITS = {
    "api": SYSTEMD / "dispatcher-api.service",
    "worker": SYSTEMD / "dispatcher-worker@.service",
}


def unit(path: Path) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # keep case, as documented
    parser.read_string(path.read_text(), source=str(path))
    return parser


def directive_values(path: Path, section: str, key: str) -> Iterator[str]:
    """Every value of a directive that may repeat (configparser keeps the last one)."""
    current = None
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if line.startswith("[") and line.endswith("]"):
            current = line[1:-1]
        elif current == section and line.partition("=")[0].strip() == key:
            yield line.partition("=")[2].strip()


def systemd_seconds(value: str) -> float:
    units = {"": 1, "s": 1, "sec": 1, "min": 60, "m": 60, "h": 3600, "ms": 0.001}
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", value)
    assert parts, f"bad time span {value!r}"
    return sum(float(n) * units[u] for n, u in parts)


def env_file(path: Path) -> dict[str, str]:
    values: dict[str, str] = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if line and not line.startswith("#"):
            key, sep, value = line.partition("=")
            assert sep, f"{rel(path)}: {line!r} is no KEY=VALUE"
            values[key.strip()] = value.strip()
    return values


@pytest.mark.parametrize("name", ["api", "worker"])
def test_systemd_unit(name: str) -> None:
    path = UNITS[name]
    parsed = unit(path)
    service = parsed["Service"]
    exec_start = service["ExecStart"]
    assert exec_start.startswith("/"), "ExecStart needs an absolute path"
    assert exec_start.split()[0].endswith("/dispatcher")
    assert f"dispatcher {name}" in exec_start and "--check" not in exec_start
    assert service["User"] not in ("root", "0")
    assert "/etc/dispatcher/env" in directive_values(path, "Service", "EnvironmentFile")
    assert service["KillSignal"] == "SIGTERM"
    assert service["Restart"] == "on-failure"
    for key, value in {
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "PrivateTmp": "yes",
        "ProtectHome": "yes",
    }.items():
        assert service.get(key) == value, key
    assert parsed["Install"]["WantedBy"] == "multi-user.target"


def test_systemd_worker_outlives_its_grace() -> None:
    service = unit(UNITS["worker"])["Service"]
    example = env_file(SYSTEMD / "env.example")
    grace = float(example.get("DISPATCHER_SHUTDOWN_GRACE", DEFAULT_GRACE))
    settings_budget = stop_budget(Settings.model_construct(shutdown_grace=grace))
    assert systemd_seconds(service["TimeoutStopSec"]) > settings_budget
    # A per-instance file, read after the shared one, so that its values win.
    files = list(directive_values(UNITS["worker"], "Service", "EnvironmentFile"))
    assert files[0] == "/etc/dispatcher/env"
    assert any("%i" in f and f.startswith("-") for f in files[1:])


def test_systemd_env_example(settings_from_env: SettingsFromEnv) -> None:
    example = env_file(SYSTEMD / "env.example")
    settings = settings_from_env(example, "env.example")
    assert settings.redis_url is not None
    assert "DISPATCHER_WORKER_METRICS_PORT" not in example, "it must differ per worker instance"


def test_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze, true = shutil.which("systemd-analyze"), shutil.which("true")
    if analyze is None or true is None:
        pytest.skip("systemd-analyze is not installed")
    copies = []
    for path in UNITS.values():
        text = re.sub(r"^(ExecStart(?:Pre)?)=\S+", rf"\1={true}", path.read_text(), flags=re.M)
        copy = tmp_path / path.name.replace("@.", "@1.")
        copy.write_text(text)
        copies.append(copy)
    done = subprocess.run(
        [analyze, "verify", *map(str, copies)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    output = done.stdout + done.stderr
    ours = [line for line in output.splitlines() if any(c.name in line for c in copies)]
    assert not ours, "\n".join(ours)


def test_compose_ha_adds_a_replica_and_three_sentinels_watching_the_master() -> None:
    """Each node and sentinel keeps its configuration file on its volume, written at its
    first start only: Sentinel records a failover there. Written afresh at each start (and
    the replica's role a flag), three sentinels restarted together watched the old master
    again, and a promoted replica restarted copied it again (review)."""
    [ha] = load_yaml(COMPOSE_HA)
    services = ha["services"]
    for node in ("redis", "redis-replica"):
        argv = as_argv(services[node]["command"])
        command = " ".join(argv)
        assert argv[:2] == ["redis-server", "/data/redis.conf"], node
        assert "--appendonly yes" in command and "--appendfsync everysec" in command, node
        assert f"--replica-announce-ip {node}" in command, node
        assert "--replicaof" not in command, node  # a flag would undo a failover's rewrite
        entry = " ".join(
            as_argv(services[node].get("entrypoint") or ha["x-redis-node"]["entrypoint"])
        )
        assert "exec docker-entrypoint.sh" in entry, node  # Redis as the image's `redis` user
        assert any(v.endswith(":/data") for v in services[node]["volumes"]), node
    first = " ".join(as_argv(services["redis-replica"]["entrypoint"]))
    assert '[ -f /data/redis.conf ] || echo "replicaof redis 6379" > /data/redis.conf' in first
    sentinels = sorted(name for name in services if name.startswith("sentinel-"))
    assert len(sentinels) == 3
    for name in sentinels:
        script = " ".join(as_argv(services[name]["command"]))
        assert "[ -f /data/sentinel.conf ] || cat > /data/sentinel.conf" in script, name
        assert "sentinel monitor dispatcher redis 6379 2" in script, name
        assert "resolve-hostnames yes" in script and "--sentinel" in script, name
        assert services[name]["volumes"] == [f"{name}-data:/data"], name
        assert f"{name}-data" in ha["volumes"], name


def test_every_redis_has_a_maxmemory_and_evicts_nothing() -> None:
    """Without a maxmemory a full Redis grows until the host's OOM killer ends it, and the
    DispatcherRedisNearlyFull alert has nothing to measure against. The HA file's `command`
    replaced the base file's whole, and dropped its --maxmemory (review)."""
    checked = 0
    for path in (COMPOSE, COMPOSE_HA):
        [doc] = load_yaml(path)
        for name, service in doc["services"].items():
            argv = as_argv(service.get("command") or [])
            if not argv or argv[0] != "redis-server" or "--sentinel" in argv:
                continue
            if argv[1].endswith(".conf"):  # the node's own file first (the HA file's)
                argv = argv[1:]
            flags = dict(zip(argv[1::2], argv[2::2], strict=False))
            assert flags.get("--maxmemory", "").strip(), f"{rel(path)} {name}: no --maxmemory"
            assert flags.get("--maxmemory-policy") == "noeviction", f"{rel(path)} {name}"
            checked += 1
    assert checked == 3  # redis, and the HA file's redis and redis-replica


@pytest.mark.parametrize("name", ["migrate", "api", "worker"])
def test_compose_ha_processes_find_the_master_through_the_sentinels(
    name: str, settings_from_env: SettingsFromEnv
) -> None:
    [ha] = load_yaml(COMPOSE_HA)
    base, override = compose()["services"][name], ha["services"][name]
    environment = {**base["environment"], **override["environment"]}  # compose merges them
    settings = settings_from_env(environment, f"compose ha {name}")
    assert settings.redis_url is not None
    target = parse_sentinel_url(settings.redis_url)
    sentinels = sorted(n for n in ha["services"] if n.startswith("sentinel-"))
    assert sorted(host for host, _ in target.sentinels) == sentinels
    assert {port for _, port in target.sentinels} == {26379} and target.master == "dispatcher"
    replicas = sum(1 for n in ha["services"] if n.startswith("redis-replica"))
    assert 1 <= settings.redis_min_replicas <= replicas
    assert set(sentinels) <= override["depends_on"].keys()


# ---- README ---------------------------------------------------------------------------------


def test_readme_covers_the_ways_to_deploy() -> None:
    text = (DEPLOY / "README.md").read_text()
    for needle in (
        "docker build -f deploy/Dockerfile",
        "appendonly yes",
        "appendfsync everysec",
        "Sentinel",
        "systemctl enable --now",
        "docker compose -f deploy/docker-compose.yml",
        "deploy/docker-compose.ha.yml",
        "redis+sentinel://",
        "DISPATCHER_REDIS_MIN_REPLICAS",
        "kubectl apply -k deploy/kubernetes",
        "dispatcher-secrets",
        "deploy/grafana/dispatcher.json",
        "promtool check rules deploy/prometheus/alerts.yml",
    ):
        assert needle in text, needle
