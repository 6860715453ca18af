"""The deployment files (deploy/compose, deploy/k8s) parse and agree with the code and each other.

No containers run and nothing touches the network: the files are read as YAML/JSON, checked
against what voxbus' code defines (services, settings, metric names, NATS roles), and handed to
the real tools where this machine has them (``docker compose config``, ``kubectl kustomize``,
``nats-server -t``).
"""

from __future__ import annotations

import ast
import importlib.util
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from voxbus.subjects import Stage

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
COMPOSE_DIR = DEPLOY / "compose"
COMPOSE_FILE = COMPOSE_DIR / "compose.yaml"
K8S = DEPLOY / "k8s"
ADAPTER = K8S / "prometheus-adapter"
DASHBOARD = COMPOSE_DIR / "grafana" / "dashboards" / "voxbus.json"
CODE_DIRS = (ROOT / "voxbus", ROOT / "services")

SCALED = ("stt", "llm", "tts", "orchestrator")
"""Stages with a replica count in compose (the gateway's published UDP range is per replica)."""
AUTOSCALED = (*SCALED, "gateway")
"""Stages with a HorizontalPodAutoscaler in k8s (the control plane is one replica)."""
NATS_NODES = ("nats-1", "nats-2", "nats-3")
PROMQL_BUILTINS = {"up"}
"""Series Prometheus makes itself, which the dashboard may chart beside voxbus' own."""

PENDING_METRICS: set[str] = set()
"""Metric names decided for issue 11 that the code did not define yet when the dashboard was
written (histograms unless named ``_total``); once the code defines one, its kind there counts."""


# --- helpers ------------------------------------------------------------------------------

def load_yaml_all(path: Path) -> list:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def compose() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text())


_DEFAULT = re.compile(r"\$\{[A-Z0-9_]+:?-([^}]*)\}")
_OTHER = re.compile(r"\$\{([A-Z0-9_]+)[^}]*\}")


def resolve(value) -> str:
    """A compose value with ``${VAR:-default}`` replaced by its default (others: ``<VAR>``)."""
    return _OTHER.sub(r"<\1>", _DEFAULT.sub(r"\1", str(value)))


def env_of(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: "" if v is None else str(v) for k, v in env.items()}


def voxbus_services(c: dict) -> dict[str, dict]:
    """Long-running services that run the voxbus image as a voxbus service."""
    return {name: s for name, s in c["services"].items()
            if "VOXBUS_METRICS_PORT" in env_of(s) and s.get("restart") != "no"
            and s.get("command") and s["command"][0] in {st.value for st in Stage}}


def code_text() -> str:
    return "\n".join(p.read_text() for d in CODE_DIRS for p in sorted(d.rglob("*.py")))


def code_settings() -> set[str]:
    """Every VOXBUS_ variable the code names (config.py's settings and the few read elsewhere,
    e.g. VOXBUS_LOG_LEVEL); a name ending in ``_`` is a prefix, not a variable."""
    return {n for n in re.findall(r"VOXBUS_[A-Z0-9_]+", code_text()) if not n.endswith("_")}


def code_metrics() -> dict[str, str]:
    """Metric name -> kind for every prometheus_client metric the code constructs."""
    found = {}
    for kind, name in re.findall(r"\b(Counter|Gauge|Histogram|Summary)\(\s*\n?\s*[\"']"
                                 r"([a-zA-Z_:][a-zA-Z0-9_:]*)[\"']", code_text()):
        if kind == "Counter" and not name.endswith("_total"):
            name += "_total"  # prometheus_client exposes counters with the suffix
        found[name] = kind
    return found


def cli_stage_list() -> tuple[str, ...]:
    """The ``for name in (...)`` tuple in voxbus/cli.py that adds one subcommand per stage."""
    tree = ast.parse((ROOT / "voxbus" / "cli.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.For) and isinstance(node.iter, ast.Tuple):
            names = tuple(e.value for e in node.iter.elts if isinstance(e, ast.Constant))
            if "stt" in names and "orchestrator" in names:
                return names
    raise AssertionError("voxbus/cli.py has no stage loop (for name in ('stt', ...))")


def k8s_docs() -> list[dict]:
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    docs = []
    for res in kust["resources"]:
        for doc in load_yaml_all(K8S / res):
            doc["_file"] = res
            docs.append(doc)
    return docs


def k8s_name(stage: Stage) -> str:
    """A stage's Deployment name: its value, with ``-`` for ``_`` (no ``_`` in k8s names)."""
    return stage.value.replace("_", "-")


def k8s_find(kind: str, name: str) -> dict:
    found = [d for d in k8s_docs() if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"k8s: expected one {kind} {name!r}, found {len(found)}"
    return found[0]


def k8s_configmap_env() -> dict[str, str]:
    return {k: str(v) for k, v in k8s_find("ConfigMap", "voxbus-config")["data"].items()}


def container_env(container: dict) -> dict[str, object]:
    """The container's environment: envFrom the voxbus ConfigMap, then its own ``env``
    (a value, or the valueFrom mapping)."""
    env: dict[str, object] = {}
    for source in container.get("envFrom", []):
        ref = source.get("configMapRef", {}).get("name")
        if ref == "voxbus-config":
            env.update(k8s_configmap_env())
    for item in container.get("env", []):
        env[item["name"]] = item.get("value", item.get("valueFrom"))
    return env


def deploy_files() -> list[Path]:
    return sorted(p for p in DEPLOY.rglob("*") if p.is_file() and "__pycache__" not in p.parts)


# --- every file -----------------------------------------------------------------------------

def test_every_yaml_and_json_parses():
    yamls = [p for p in deploy_files() if p.suffix in (".yaml", ".yml")]
    assert len(yamls) >= 15, yamls
    for path in yamls:
        assert load_yaml_all(path), f"{path} is empty"
    for path in (p for p in deploy_files() if p.suffix == ".json"):
        json.loads(path.read_text())


def test_every_voxbus_variable_in_deploy_files_is_a_setting_of_the_code():
    known = code_settings()
    assert {"VOXBUS_NATS_URL", "VOXBUS_METRICS_PORT", "VOXBUS_HTTP_PORT"} <= known
    unknown = {}
    for path in deploy_files():
        for name in re.findall(r"VOXBUS_[A-Z0-9_]+", path.read_text()):
            if name not in known and name != "VOXBUS_IMAGE":  # compose's own image variable
                unknown.setdefault(name, set()).add(str(path.relative_to(ROOT)))
    assert not unknown, f"VOXBUS_ variables no code reads (a typo, or a setting removed): {unknown}"


# --- compose ------------------------------------------------------------------------------

def test_compose_has_every_service():
    services = set(compose()["services"])
    stages = set(cli_stage_list())
    assert {"stt", "llm", "tts", "orchestrator", "gateway"} <= stages
    wanted = (stages | {s.value for s in Stage} | {"gateway", "control", "prometheus", "grafana",
                                                    "nats-auth", "llm-endpoint", *NATS_NODES})
    assert wanted <= services, f"compose.yaml lacks {sorted(wanted - services)}"
    running = voxbus_services(compose())
    for stage in Stage:
        assert running[stage.value]["command"] == [stage.value], stage


def test_compose_one_replica_count_per_stage_and_healthchecks():
    c = compose()
    variables = set()
    for stage in SCALED:
        replicas = str(c["services"][stage].get("deploy", {}).get("replicas", ""))
        m = re.fullmatch(r"\$\{([A-Z_]+_REPLICAS):-(\d+)\}", replicas)
        assert m, f"{stage}: deploy.replicas should be ${{{stage.upper()}_REPLICAS:-1}}, " \
                  f"not {replicas!r}"
        assert m.group(1) == f"{stage.upper()}_REPLICAS"
        variables.add(m.group(1))
    assert len(variables) == len(SCALED)
    for name, service in c["services"].items():
        if service.get("restart") == "no" or name == "recording":
            continue  # one-shots
        test = service.get("healthcheck", {}).get("test")
        assert test and test[0] in ("CMD", "CMD-SHELL"), f"{name} has no healthcheck"
    for name, service in voxbus_services(c).items():
        port = env_of(service)["VOXBUS_METRICS_PORT"]
        probe = " ".join(service["healthcheck"]["test"])
        assert f"127.0.0.1:{port}/healthz" in probe, f"{name}: healthcheck is not /healthz " \
                                                    f"on VOXBUS_METRICS_PORT {port}"
        assert int(str(service["stop_grace_period"]).rstrip("s")) > float(
            env_of(service).get("VOXBUS_DRAIN_GRACE_S", 30)), f"{name}: no time to drain"


def test_compose_services_connect_to_the_whole_cluster_each_as_its_own_user():
    c = compose()
    roles = set()
    for name, service in voxbus_services(c).items():
        env = env_of(service)
        servers = env["VOXBUS_NATS_URL"].split(",")
        assert servers == [f"nats://{n}:4222" for n in NATS_NODES], name
        assert env["VOXBUS_JS_REPLICAS"] == "3", name
        role = env["VOXBUS_NATS_USER"]
        assert role == name, f"{name} connects as {role!r}"
        assert re.fullmatch(rf"\$\{{NATS_{role.upper()}_PASSWORD:\?[^}}]+\}}",
                            env["VOXBUS_NATS_PASSWORD"]), f"{name}: password not from .env"
        roles.add(role)
    assert roles == {s.value for s in Stage}
    rec = env_of(c["services"]["recording"])
    assert rec["VOXBUS_NATS_USER"] == "admin"


def test_compose_nats_cluster_nodes():
    c = compose()
    render = _render_module()
    names = set()
    for node in NATS_NODES:
        s = c["services"][node]
        env = env_of(s)
        names.add(env["NATS_SERVER_NAME"])
        for role in render.ROLES:
            assert render.password_variable(role) in env, f"{node} lacks {role}'s password"
        assert "NATS_CLUSTER_PASSWORD" in env
        cmd = " ".join(s["command"])
        for other in NATS_NODES:
            assert f"@{other}:6222" in cmd, f"{node} has no route to {other}"
        assert "$$NATS_CLUSTER_PASSWORD" in cmd  # expanded by the container's shell
        mounts = {v.split(":")[1]: v.split(":")[0] for v in s["volumes"]}
        assert mounts["/etc/nats/nats.conf"] == "./nats/nats.conf"
        assert mounts["/etc/nats/auth"] == "nats-auth"
        assert s["depends_on"]["nats-auth"]["condition"] == "service_completed_successfully"
        assert "/healthz" in " ".join(s["healthcheck"]["test"])
    assert names == set(NATS_NODES)
    auth = c["services"]["nats-auth"]
    assert auth["entrypoint"][-1].endswith("deploy/render_nats_auth.py")
    assert auth["command"] == ["--out", "/auth/auth.conf"]
    assert "nats-auth:/auth" in auth["volumes"]
    conf = (COMPOSE_DIR / "nats" / "nats.conf").read_text()
    assert "include ./auth/auth.conf" in conf and "jetstream" in conf
    assert (K8S / "nats.conf").read_text() == conf, "deploy/k8s/nats.conf differs from compose's"


def test_compose_gateway_publishes_http_and_its_webrtc_udp_range():
    gw = compose()["services"]["gateway"]
    env = env_of(gw)
    assert env["VOXBUS_HTTP_HOST"] == "0.0.0.0"
    assert "VOXBUS_ICE_SERVERS" in env and "VOXBUS_GATEWAY_SECRET" in env
    ports = [resolve(p) for p in gw["ports"]]
    assert f"8080:{env['VOXBUS_HTTP_PORT']}" in ports
    first, last = resolve(gw["sysctls"]["net.ipv4.ip_local_port_range"]).split()
    assert int(first) < int(last)
    assert f"{first}-{last}:{first}-{last}/udp" in ports, (ports, first, last)


def test_compose_llm_stage_reaches_the_endpoint():
    c = compose()
    env = env_of(c["services"]["llm"])
    assert resolve(env["OPENAI_BASE_URL"]) == "http://llm-endpoint:8000/v1"
    endpoint = c["services"]["llm-endpoint"]
    code = " ".join(endpoint["command"])
    assert "LocalLlmServer" in code and "port=8000" in code  # voxbus up's own flags
    assert "8000/v1/models" in " ".join(endpoint["healthcheck"]["test"])


def test_docker_compose_config():
    if shutil.which("docker") is None:
        pytest.skip("no docker binary on this machine")
    if subprocess.run(["docker", "compose", "version"], capture_output=True).returncode:
        pytest.skip("docker has no compose plugin on this machine")
    env_file = COMPOSE_DIR / ".env.test"
    env_file.write_text(_render_module().new_env())
    try:
        done = subprocess.run(["docker", "compose", "-f", str(COMPOSE_FILE), "--env-file",
                               str(env_file), "config", "-q"], capture_output=True, text=True,
                              timeout=60)
    finally:
        env_file.unlink()
    assert done.returncode == 0, done.stderr


# --- Prometheus and Grafana ---------------------------------------------------------------

def test_prometheus_scrapes_every_voxbus_service():
    prom = yaml.safe_load((COMPOSE_DIR / "prometheus" / "prometheus.yml").read_text())
    scraped = {}
    for job in prom["scrape_configs"]:
        for sd in job.get("dns_sd_configs", []):
            for name in sd["names"]:
                scraped[name] = sd["port"]
    for name, service in voxbus_services(compose()).items():
        assert name in scraped, f"Prometheus does not scrape {name}"
        assert scraped[name] == int(env_of(service)["VOXBUS_METRICS_PORT"]), name


def _dashboard_exprs() -> list[str]:
    dash = json.loads(DASHBOARD.read_text())
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)), "panel ids repeat"
    exprs = []
    for panel in dash["panels"]:
        for target in panel.get("targets", []):
            assert target["datasource"]["uid"] == "prometheus"
            exprs.append(target["expr"])
    return exprs


def test_grafana_dashboard_queries_only_metrics_the_code_defines():
    defined = code_metrics()
    assert {"voxbus_load", "voxbus_sessions", "voxbus_stage_errors_total"} <= set(defined)
    exprs = _dashboard_exprs()
    for expr in exprs:
        names = re.findall(r"\b(voxbus_[a-z0-9_]+)", expr)
        others = set(re.findall(r"\b([a-z_]+)\s*(?:==|\{|\[|\)$)", expr)) - {"voxbus"}
        assert names or others & PROMQL_BUILTINS, f"no voxbus metric in {expr!r}"
        for name in names:
            base = re.sub(r"_(bucket|sum|count)$", "", name)
            if base != name:
                kind = defined.get(base, "Histogram" if base in PENDING_METRICS else None)
                assert kind == "Histogram", f"{name}: {base} is no histogram in the code ({expr})"
                assert name.endswith("_bucket") == ("histogram_quantile" in expr), expr
            else:
                assert name in defined or name in PENDING_METRICS, \
                    f"the dashboard charts {name}, which no code defines ({expr})"
    text = "\n".join(exprs)
    for figure in ("eou_delay", "stt_ttfs", "llm_ttft", "tts_ttfa", "e2e_latency", "bus_hop"):
        for q in ("0.5", "0.95"):
            assert re.search(rf"histogram_quantile\({q}, sum by \(le[^)]*\) \(rate\("
                             rf"voxbus_{figure}_seconds_bucket\[", text), (figure, q)
    assert "sum by (stage, code) (rate(voxbus_stage_errors_total" in text
    assert "by (stage) (voxbus_load)" in text and "by (stage) (voxbus_sessions)" in text


def test_grafana_provisioning_points_at_prometheus_and_the_dashboard():
    prov = COMPOSE_DIR / "grafana" / "provisioning"
    ds = yaml.safe_load((prov / "datasources" / "prometheus.yaml").read_text())["datasources"]
    assert [(d["uid"], d["url"]) for d in ds] == [("prometheus", "http://prometheus:9090")]
    provider = yaml.safe_load((prov / "dashboards" / "voxbus.yaml").read_text())["providers"][0]
    mounts = dict(v.split(":")[:2] for v in compose()["services"]["grafana"]["volumes"])
    assert mounts["./grafana/dashboards"] == provider["options"]["path"]
    assert mounts["./grafana/provisioning"] == "/etc/grafana/provisioning"


# --- NATS authorization -------------------------------------------------------------------

def _render_module():
    spec = importlib.util.spec_from_file_location("render_nats_auth",
                                                  DEPLOY / "render_nats_auth.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_nats_auth_is_rendered_from_the_code():
    render = _render_module()
    nats_auth = pytest.importorskip("voxbus.nats_auth")
    assert tuple(nats_auth.ROLES) == render.ROLES
    text = render.render("vox")
    for role in render.ROLES:
        line = next(ln for ln in text.splitlines() if f'user: "{role}"' in ln)
        assert f"password: ${render.password_variable(role)}," in line
        perms = json.loads(line.split("permissions: ", 1)[1][:-1])
        assert perms == nats_auth.permissions(role, "vox")
    env = dict(line.split("=", 1) for line in render.new_env().split())
    assert len(env) == len(render.ROLES) + 1 + len(render.OTHER_SECRETS)
    for value in env.values():  # nats-server reads a variable as a value: keep it a string
        assert re.fullmatch(r"[A-Za-z][A-Za-z0-9]{42}", value)


def test_nats_conf_is_valid_for_nats_server(tmp_path):
    pytest.importorskip("voxbus.nats_auth")
    from voxbus.natsd import nats_server_binary

    render = _render_module()
    (tmp_path / "auth").mkdir()
    (tmp_path / "auth" / "auth.conf").write_text(render.render("vox"))
    (tmp_path / "nats.conf").write_text((K8S / "nats.conf").read_text())
    env = dict(line.split("=", 1) for line in render.new_env().split())
    env["NATS_SERVER_NAME"] = "nats-0"
    done = subprocess.run([nats_server_binary(), "-t", "-c", str(tmp_path / "nats.conf")],
                          env=env, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stdout + done.stderr
    del env["NATS_STT_PASSWORD"]  # the check can fail: a role without its password
    done = subprocess.run([nats_server_binary(), "-t", "-c", str(tmp_path / "nats.conf")],
                          env=env, capture_output=True, text=True, timeout=30)
    assert done.returncode != 0 and "NATS_STT_PASSWORD" in done.stdout + done.stderr


# --- Kubernetes ---------------------------------------------------------------------------

API_VERSIONS = {
    "Namespace": "v1", "ConfigMap": "v1", "Service": "v1", "Secret": "v1",
    "Deployment": "apps/v1", "StatefulSet": "apps/v1",
    "HorizontalPodAutoscaler": "autoscaling/v2", "PodDisruptionBudget": "policy/v1",
}


def _check_pod_spec(where: str, spec: dict) -> None:
    containers = spec.get("initContainers", []) + spec["containers"]
    assert spec["containers"], f"{where}: no containers"
    volumes = {v["name"] for v in spec.get("volumes", [])}
    for c in containers:
        assert c.get("name") and c.get("image"), f"{where}: a container needs name and image"
        for item in c.get("env", []):
            assert set(item) in ({"name", "value"}, {"name", "valueFrom"}), (where, item)
            assert isinstance(item.get("value", ""), str), f"{where}: {item['name']} not a string"
        names = {p["name"] for p in c.get("ports", [])}
        for p in c.get("ports", []):
            assert isinstance(p["containerPort"], int) and 0 < p["containerPort"] < 65536
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            if probe not in c:
                continue
            handler = next(k for k in ("httpGet", "tcpSocket", "grpc", "exec") if k in c[probe])
            port = c[probe][handler].get("port")
            assert port is None or port in names or port in {
                p["containerPort"] for p in c.get("ports", [])}, f"{where}: {probe} port {port}"
        for mount in c.get("volumeMounts", []):
            assert mount["name"] in volumes or where.startswith("StatefulSet"), (where, mount)


def test_k8s_manifests_have_their_required_fields():
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    listed = set(kust["resources"])
    on_disk = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == on_disk, f"kustomization.yaml resources vs files: {listed ^ on_disk}"
    for gen in kust.get("configMapGenerator", []):
        for f in gen["files"]:
            assert (K8S / f).is_file(), f
    for doc in k8s_docs():
        kind, meta = doc.get("kind"), doc.get("metadata", {})
        where = f"{kind} {meta.get('name')} ({doc['_file']})"
        assert doc.get("apiVersion") == API_VERSIONS.get(kind), where
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", meta.get("name", "")), where
        if kind in ("Deployment", "StatefulSet"):
            spec = doc["spec"]
            selector = spec["selector"]["matchLabels"]
            labels = spec["template"]["metadata"]["labels"]
            assert selector.items() <= labels.items(), f"{where}: selector misses its pods"
            _check_pod_spec(where, spec["template"]["spec"])
        if kind == "Service":
            assert doc["spec"]["ports"] and doc["spec"]["selector"], where
        if kind == "PodDisruptionBudget":
            assert doc["spec"]["selector"]["matchLabels"], where


def test_k8s_deployment_hpa_and_pdb_per_stage():
    docs = k8s_docs()
    config = k8s_configmap_env()
    grace = float(config["VOXBUS_DRAIN_GRACE_S"])
    for stage in Stage:
        dep = k8s_find("Deployment", k8s_name(stage))
        pod = dep["spec"]["template"]["spec"]
        (c,) = pod["containers"]
        assert c["args"] == [stage.value] and c["image"] == "voxbus"
        assert pod["terminationGracePeriodSeconds"] > grace, f"{stage}: no time to drain"
        labels = dep["spec"]["template"]["metadata"]["labels"]
        pdbs = [d for d in docs if d["kind"] == "PodDisruptionBudget"
                and d["spec"]["selector"]["matchLabels"].items() <= labels.items()]
        assert len(pdbs) == 1, f"{stage}: {len(pdbs)} PodDisruptionBudgets"
        hpas = [d for d in docs if d["kind"] == "HorizontalPodAutoscaler"
                and d["spec"]["scaleTargetRef"]["name"] == stage.value]
        if stage.value not in AUTOSCALED:
            assert not hpas and dep["spec"]["replicas"] == 1
            continue
        assert "replicas" not in dep["spec"], f"{stage}: the HPA owns the replica count"
        (hpa,) = hpas
        spec = hpa["spec"]
        assert spec["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                          "name": stage.value}
        assert 1 <= spec["minReplicas"] < spec["maxReplicas"]
        (metric,) = spec["metrics"]
        assert metric["type"] == "Pods"
        assert metric["pods"]["metric"]["name"] == "voxbus_load"
        target = metric["pods"]["target"]
        assert target["type"] == "AverageValue"
        value = target["averageValue"]
        load = int(value[:-1]) / 1000 if str(value).endswith("m") else float(value)
        assert 0 < load < 1, f"{stage}: voxbus_load is 0-1, target {value}"


def test_k8s_ports_credentials_and_probes_match_the_settings():
    for stage in Stage:
        dep = k8s_find("Deployment", k8s_name(stage))
        template = dep["spec"]["template"]
        (c,) = template["spec"]["containers"]
        env = container_env(c)
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        metrics = int(env["VOXBUS_METRICS_PORT"])
        assert ports["metrics"] == metrics, stage
        assert template["metadata"]["annotations"]["prometheus.io/port"] == str(metrics), stage
        assert c["readinessProbe"].get("httpGet", {}).get("path", "/healthz") == "/healthz"
        assert env["VOXBUS_NATS_USER"] == stage.value
        ref = env["VOXBUS_NATS_PASSWORD"]["secretKeyRef"]
        assert ref == {"name": "voxbus", "key": f"NATS_{stage.value.upper()}_PASSWORD"}
        assert env["VOXBUS_WORKER_ID"] == {"fieldRef": {"fieldPath": "metadata.name"}}
        servers = str(env["VOXBUS_NATS_URL"]).split(",")
        assert servers == [f"nats://nats-{i}.nats-headless:4222" for i in range(3)]
        if stage == Stage.GATEWAY:
            assert ports["http"] == int(env["VOXBUS_HTTP_PORT"])
            assert env["VOXBUS_HTTP_HOST"] == "0.0.0.0" and "VOXBUS_ICE_SERVERS" in env
            assert template["spec"]["hostNetwork"] is True  # ICE candidates: the node's
        if stage == Stage.CONTROL:
            assert ports["grpc"] == int(str(env["VOXBUS_CONTROL_ADDRESS"]).rsplit(":", 1)[1])
            assert c["readinessProbe"]["grpc"]["port"] == ports["grpc"]
    for doc in k8s_docs():
        if doc["kind"] != "Service" or doc["metadata"]["name"].startswith("nats"):
            continue
        dep = k8s_find("Deployment", doc["metadata"]["name"])
        (c,) = dep["spec"]["template"]["spec"]["containers"]
        names = {p["name"] for p in c["ports"]}
        for p in doc["spec"]["ports"]:
            assert p["targetPort"] in names, (doc["metadata"]["name"], p)


def test_k8s_nats_statefulset():
    render = _render_module()
    sts = k8s_find("StatefulSet", "nats")
    spec = sts["spec"]
    assert spec["replicas"] == 3 and spec["serviceName"] == "nats-headless"
    assert k8s_find("Service", "nats-headless")["spec"]["clusterIP"] == "None"
    pod = spec["template"]["spec"]
    (init,) = pod["initContainers"]
    assert "/app/deploy/render_nats_auth.py" in init["command"]
    (nats,) = pod["containers"]
    env = {e["name"] for e in nats["env"]}
    assert {render.password_variable(r) for r in render.ROLES} <= env
    assert {"NATS_SERVER_NAME", "NATS_CLUSTER_PASSWORD"} <= env
    routes = nats["command"][nats["command"].index("--routes") + 1].split(",")
    assert [r.rsplit("@", 1)[1] for r in routes] == [
        f"nats-{i}.nats-headless:6222" for i in range(3)]
    assert all("$(NATS_CLUSTER_PASSWORD)" in r for r in routes)
    mounts = {m["mountPath"]: m for m in nats["volumeMounts"]}
    assert mounts["/etc/nats/nats.conf"]["subPath"] == "nats.conf"
    assert "/etc/nats/auth" in mounts and "/data" in mounts


def test_prometheus_adapter_rule_exposes_voxbus_load():
    (cm,) = load_yaml_all(ADAPTER / "config.yaml")
    assert cm["kind"] == "ConfigMap" and cm["apiVersion"] == "v1"
    rules = yaml.safe_load(cm["data"]["config.yaml"])["rules"]
    values = yaml.safe_load((ADAPTER / "values.yaml").read_text())
    assert values["rules"]["custom"] == rules, "the ConfigMap and the Helm values differ"
    (rule,) = rules
    assert rule["seriesQuery"].startswith("voxbus_load{")
    assert rule["name"]["as"] == "voxbus_load"
    assert rule["resources"]["overrides"]["pod"] == {"resource": "pod"}
    assert "voxbus_load" in code_metrics()


def test_kubectl_kustomize_builds():
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("no kubectl on this machine (the manifests' fields are checked above)")
    # kustomize runs offline; `kubectl apply --dry-run` would need a cluster.
    done = subprocess.run([kubectl, "kustomize", str(K8S)], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    built = [d for d in yaml.safe_load_all(done.stdout) if d]
    assert all(d["metadata"].get("namespace") == "voxbus" for d in built
               if d["kind"] != "Namespace")
    kinds = [d["kind"] for d in built]
    assert kinds.count("HorizontalPodAutoscaler") == len(AUTOSCALED)
    assert kinds.count("Deployment") == len(Stage) + 1  # and the embedded LLM endpoint
    (cm,) = [d for d in built if d["metadata"]["name"].startswith("nats-config-")]
    sts = next(d for d in built if d["kind"] == "StatefulSet")
    assert sts["spec"]["template"]["spec"]["volumes"][0]["configMap"]["name"] == \
        cm["metadata"]["name"]


def test_k8s_manifests_validate_against_the_kubernetes_schemas():
    kv = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate not installed "
                             "(its schemas are the check; the required fields are checked above)")
    docs = [{k: v for k, v in d.items() if k != "_file"} for d in k8s_docs()]
    docs += load_yaml_all(ADAPTER / "config.yaml")
    for doc in docs:
        kv.validate(doc, "1.30.0", strict=True)  # raises on a misplaced or unknown field


# --- the image ----------------------------------------------------------------------------

def test_dockerfile_installs_the_readme_way():
    dockerfile = (COMPOSE_DIR / "Dockerfile").read_text()
    assert "pip install -r requirements.txt" in dockerfile
    assert "GGML_NATIVE=OFF" in (ROOT / "requirements.txt").read_text()
    assert 'ENTRYPOINT ["voxbus"]' in dockerfile
    ignored = (COMPOSE_DIR / "Dockerfile.dockerignore").read_text().split()
    for needed in ("requirements.txt", "pyproject.toml", "deploy", "voxbus", "services"):
        assert needed not in ignored, f"the image needs {needed}"
    for service in compose()["services"].values():
        if "build" in service:
            assert service["build"] == {"context": "../..",
                                        "dockerfile": "deploy/compose/Dockerfile"}
