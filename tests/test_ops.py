"""Operations artefacts: Kubernetes manifests, Dockerfile, alert rules, dashboard, metrics,
the health server and the log format.

External tools (`kubectl` for kustomize, `promtool`) are skipped when missing, unless
CMSYNC_REQUIRE_TOOLS=1 (what `.ci/run` sets): then a missing tool fails the test.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import aiohttp
import kubernetes_validate
import pytest
import structlog
import yaml
from prometheus_client.metrics import MetricWrapperBase

from consumer import observability as obs
from consumer.settings import VARIABLES, ConfigError, load_settings

ROOT = Path(__file__).resolve().parent.parent
REQUIRE_TOOLS = os.environ.get("CMSYNC_REQUIRE_TOOLS") == "1"

KUSTOMIZATIONS = ("k8s/base", "k8s/overlays/example")
#: Kubernetes versions the manifests are validated against: the oldest we support, the newest
#: kubernetes-validate knows.
K8S_VERSIONS = ("1.28", kubernetes_validate.utils.latest_version())
#: Kinds that are custom resources: no schema offline, their shape is checked by hand.
CUSTOM_KINDS = {("monitoring.coreos.com/v1", "ServiceMonitor")}
CONTRACT_VARIABLES = {v.name for v in VARIABLES}
SECRET_VARIABLES = {v.name for v in VARIABLES if v.secret}
DEFAULTS = {v.name: v.default for v in VARIABLES}

RULES_FILE = ROOT / "alerts" / "cmsync.rules.yml"
RULES_TEST_FILE = ROOT / "alerts" / "cmsync.rules.test.yml"
DASHBOARD_FILE = ROOT / "dashboards" / "cmsync.json"


def tool(name: str) -> str:
    """Path of an external tool: on PATH, or in the virtualenv (e.g. kubectl from PyPI)."""
    path = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if path is None:
        if REQUIRE_TOOLS:
            pytest.fail(f"{name} is required (CMSYNC_REQUIRE_TOOLS=1) but not installed")
        pytest.skip(f"{name} not installed (CMSYNC_REQUIRE_TOOLS=1 makes this a failure)")
    return path


def run_tool(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(  # noqa: S603 - fixed tool paths and arguments of ours
        args, input=stdin, capture_output=True, text=True, timeout=60, check=False, cwd=ROOT
    )


# =============================================================================================
# Kubernetes manifests


@cache
def _render(kustomization: str) -> tuple[dict[str, Any], ...]:
    result = run_tool(tool("kubectl"), "kustomize", str(ROOT / kustomization))
    assert result.returncode == 0, result.stderr
    return tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc)


@pytest.fixture(params=KUSTOMIZATIONS)
def rendered(request: pytest.FixtureRequest) -> list[dict[str, Any]]:
    return copy.deepcopy(list(_render(request.param)))


def the(objects: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [o for o in objects if o["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def by_name(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert found, f"{kind}/{name} is referenced but not rendered"
    return found[0]


def container(objects: list[dict[str, Any]]) -> dict[str, Any]:
    containers = the(objects, "Deployment")["spec"]["template"]["spec"]["containers"]
    assert [c["name"] for c in containers] == ["cmsync"]
    return dict(containers[0])


def settings_env(objects: list[dict[str, Any]]) -> dict[str, str]:
    """The non-secret environment of the container: envFrom ConfigMaps, then plain env values."""
    env: dict[str, str] = {}
    c = container(objects)
    for source in c.get("envFrom", []):
        assert set(source) == {"configMapRef"}, "envFrom only from ConfigMaps (secrets by key)"
        env.update(by_name(objects, "ConfigMap", source["configMapRef"]["name"])["data"])
    for var in c.get("env", []):
        if "value" in var:
            env[var["name"]] = var["value"]
    return env


def destinations_document(objects: list[dict[str, Any]]) -> tuple[str, str]:
    """(path inside the container, content) of the mounted destinations file."""
    c = container(objects)
    path = settings_env(objects)["CMSYNC_DESTINATIONS_FILE"]
    volumes = {
        v["name"]: v for v in the(objects, "Deployment")["spec"]["template"]["spec"]["volumes"]
    }
    for mount in c["volumeMounts"]:
        source = volumes[mount["name"]].get("configMap")
        if source is None:
            continue
        data = by_name(objects, "ConfigMap", source["name"])["data"]
        # key -> file name inside the volume (`items` maps keys to paths, else key = file name)
        files = {item["key"]: item["path"] for item in source.get("items", [])} or {
            k: k for k in data
        }
        for key, name in files.items():
            sub_path = mount.get("subPath")
            if sub_path is None:
                file = mount["mountPath"].rstrip("/") + "/" + name
            elif sub_path == name:
                file = mount["mountPath"]
            else:
                continue
            if file == path:
                return path, str(data[key])
    raise AssertionError(f"CMSYNC_DESTINATIONS_FILE={path} is not a file of a mounted ConfigMap")


def test_kustomizations_render_every_kind(rendered: list[dict[str, Any]]) -> None:
    kinds = sorted(o["kind"] for o in rendered)
    expected = ["ConfigMap", "ConfigMap", "Deployment", "NetworkPolicy", "PodDisruptionBudget"]
    expected += ["Secret", "Service", "ServiceAccount", "ServiceMonitor"]
    assert [k for k in kinds if k != "Namespace"] == expected


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_objects_validate_against_kubernetes_schemas(
    rendered: list[dict[str, Any]], version: str
) -> None:
    for obj in rendered:
        if (obj["apiVersion"], obj["kind"]) in CUSTOM_KINDS:
            continue
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as error:
            pytest.fail(f"{obj['kind']}/{obj['metadata']['name']} (k8s {version}): {error.message}")


def test_schema_validation_catches_a_misspelt_field() -> None:
    deployment = copy.deepcopy(the(list(_render("k8s/base")), "Deployment"))
    security = deployment["spec"]["template"]["spec"]["containers"][0]["securityContext"]
    security["readOnlyRootFileSystem"] = security.pop("readOnlyRootFilesystem")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSIONS[-1], strict=True)


def test_every_env_var_is_a_setting_of_the_contract_or_a_named_api_key(
    rendered: list[dict[str, Any]],
) -> None:
    c = container(rendered)
    _, document = destinations_document(rendered)
    api_key_vars = {
        d.get("api_key_env", "CMSYNC_CM_API_KEY") for d in tomllib.loads(document)["destination"]
    }
    names = [var["name"] for var in c.get("env", [])] + list(settings_env(rendered))
    unknown = set(names) - CONTRACT_VARIABLES - api_key_vars
    assert not unknown, f"not settings of the contract: {sorted(unknown)}"
    # Every key a destination names is provided, from a Secret.
    from_secrets = {v["name"] for v in c["env"] if "secretKeyRef" in v.get("valueFrom", {})}
    assert api_key_vars <= from_secrets
    # Secrets never sit in a ConfigMap or a literal value.
    plain = set(settings_env(rendered))
    assert not (plain & (SECRET_VARIABLES | api_key_vars))
    assert from_secrets >= SECRET_VARIABLES


def test_secret_references_resolve(rendered: list[dict[str, Any]]) -> None:
    for var in container(rendered)["env"]:
        ref = var["valueFrom"]["secretKeyRef"]
        secret = by_name(rendered, "Secret", ref["name"])
        keys = set(secret.get("stringData", {})) | set(secret.get("data", {}))
        assert ref["key"] in keys or ref.get("optional") is True, ref
        # No credential is committed: the manifests carry empty placeholders only.
        assert all(value == "" for value in secret.get("stringData", {}).values())
        assert not secret.get("data")


def test_rendered_configuration_loads(rendered: list[dict[str, Any]], tmp_path: Path) -> None:
    """The settings the manifests give the container are accepted by `load_settings`."""
    path, document = destinations_document(rendered)
    copy_of_file = tmp_path / "destinations.toml"
    copy_of_file.write_text(document, encoding="utf-8")
    env = settings_env(rendered) | {"CMSYNC_DESTINATIONS_FILE": str(copy_of_file)}
    # What an operator provides in the Secret: the API keys, and the SASL password when the
    # configured protocol uses SASL (left empty, i.e. unset, otherwise).
    sasl = env.get("CMSYNC_KAFKA_SECURITY_PROTOCOL", "").startswith("SASL_")
    for var in container(rendered)["env"]:
        if "valueFrom" in var:
            needed = var["name"] != "CMSYNC_KAFKA_SASL_PASSWORD" or sasl
            env[var["name"]] = "fake-" + var["name"].lower() if needed else ""
    try:
        settings = load_settings(env)
    except ConfigError as error:
        pytest.fail(f"rendered settings rejected: {error.problems}")
    assert settings.destinations
    assert path.startswith("/")


def test_destinations_file_is_mounted_where_the_settings_look(
    rendered: list[dict[str, Any]],
) -> None:
    path, document = destinations_document(rendered)
    assert path == settings_env(rendered)["CMSYNC_DESTINATIONS_FILE"]
    assert "[[destination]]" in document
    mount = next(m for m in container(rendered)["volumeMounts"] if m["name"] == "destinations")
    assert mount["readOnly"] is True


def test_grace_period_exceeds_the_drain_budget(rendered: list[dict[str, Any]]) -> None:
    spec = the(rendered, "Deployment")["spec"]["template"]["spec"]
    default = DEFAULTS["CMSYNC_SHUTDOWN_BUDGET_S"]
    assert default is not None
    budget = float(settings_env(rendered).get("CMSYNC_SHUTDOWN_BUDGET_S", default))
    # Room for the kubelet's SIGTERM delivery and the process's own exit after the drain.
    assert spec["terminationGracePeriodSeconds"] >= budget + 10


def test_probes_and_ports_agree(rendered: list[dict[str, Any]]) -> None:
    c = container(rendered)
    default = DEFAULTS["CMSYNC_HTTP_PORT"]
    assert default is not None
    http_port = int(settings_env(rendered).get("CMSYNC_HTTP_PORT", default))
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"http": http_port}
    probes = {
        kind: c[kind]["httpGet"] for kind in ("startupProbe", "livenessProbe", "readinessProbe")
    }
    for probe in probes.values():
        assert ports.get(probe["port"], probe["port"]) == http_port
    assert probes["livenessProbe"]["path"] == "/healthz"
    assert probes["startupProbe"]["path"] == "/healthz"
    assert probes["readinessProbe"]["path"] == "/readyz"

    service = the(rendered, "Service")
    [service_port] = service["spec"]["ports"]
    assert ports.get(service_port["targetPort"], service_port["targetPort"]) == http_port

    monitor = the(rendered, "ServiceMonitor")
    [endpoint] = monitor["spec"]["endpoints"]
    assert endpoint["port"] == service_port["name"]
    assert endpoint["path"] == "/metrics"

    policy = the(rendered, "NetworkPolicy")
    ingress_ports = [p["port"] for rule in policy["spec"]["ingress"] for p in rule["ports"]]
    assert ingress_ports == [http_port]


def _selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def test_labels_and_selectors_match(rendered: list[dict[str, Any]]) -> None:
    deployment = the(rendered, "Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert _selects(deployment["spec"]["selector"]["matchLabels"], pod_labels)
    assert _selects(the(rendered, "Service")["spec"]["selector"], pod_labels)
    assert _selects(
        the(rendered, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"], pod_labels
    )
    assert _selects(
        the(rendered, "NetworkPolicy")["spec"]["podSelector"]["matchLabels"], pod_labels
    )
    service = the(rendered, "Service")
    monitor = the(rendered, "ServiceMonitor")
    assert _selects(monitor["spec"]["selector"]["matchLabels"], service["metadata"]["labels"])
    # The alert CmsyncMetricsAbsent expects job="cmsync": the Service's name by default.
    assert service["metadata"]["name"] == "cmsync"
    assert "jobLabel" not in monitor["spec"]
    account = the(rendered, "ServiceAccount")
    assert (
        deployment["spec"]["template"]["spec"]["serviceAccountName"] == account["metadata"]["name"]
    )


def test_pod_is_locked_down(rendered: list[dict[str, Any]]) -> None:
    spec = the(rendered, "Deployment")["spec"]["template"]["spec"]
    assert spec["automountServiceAccountToken"] is False
    assert the(rendered, "ServiceAccount")["automountServiceAccountToken"] is False
    pod = spec["securityContext"]
    assert pod["runAsNonRoot"] is True
    assert pod["runAsUser"] == 10001
    assert pod["seccompProfile"] == {"type": "RuntimeDefault"}
    sc = container(rendered)["securityContext"]
    assert sc["runAsNonRoot"] is True
    assert sc["runAsUser"] == 10001
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
    resources = container(rendered)["resources"]
    assert set(resources["requests"]) == {"cpu", "memory"}
    assert set(resources["limits"]) == {"cpu", "memory"}
    assert container(rendered)["args"] == ["run"]


def test_network_policy_allows_what_the_service_needs(rendered: list[dict[str, Any]]) -> None:
    policy = the(rendered, "NetworkPolicy")["spec"]
    assert sorted(policy["policyTypes"]) == ["Egress", "Ingress"]
    egress_ports = {(p["protocol"], p["port"]) for rule in policy["egress"] for p in rule["ports"]}
    assert {("UDP", 53), ("TCP", 53), ("TCP", 443), ("TCP", 9092)} <= egress_ports
    [ingress] = policy["ingress"]
    [source] = ingress["from"]
    assert source["namespaceSelector"]["matchLabels"] == {
        "kubernetes.io/metadata.name": "monitoring"
    }


def test_example_overlay_customises_the_base() -> None:
    objects = list(_render("k8s/overlays/example"))
    namespace = the(objects, "Namespace")["metadata"]["name"]
    for obj in objects:
        if obj["kind"] != "Namespace":
            assert obj["metadata"].get("namespace") == namespace, obj["kind"]
    deployment = the(objects, "Deployment")
    assert deployment["spec"]["replicas"] == 3
    image = container(objects)["image"]
    assert re.fullmatch(r"[\w./-]+/cmsync:[\w.-]+", image), image
    assert container(objects)["resources"]["limits"]["memory"] == "768Mi"  # the patch
    base = container(list(_render("k8s/base")))
    assert base["image"] == "cmsync"
    assert base["resources"]["limits"]["memory"] == "512Mi"


def test_dockerfile_is_non_root_and_ships_the_schemas() -> None:
    text = (ROOT / "Dockerfile").read_text(encoding="utf-8")
    instructions = [line.split(None, 1) for line in text.splitlines() if line and line[0] != "#"]
    froms = [rest for word, *rest in instructions if word == "FROM"]
    assert len(froms) >= 2, "multi-stage"
    assert re.search(r"^USER 10001(:10001)?$", text, re.MULTILINE)
    assert re.search(r"^COPY schemas/ (\S+)$", text, re.MULTILINE)
    schema_dir = re.search(r"CMSYNC_SCHEMA_DIR=(\S+)", text)
    copied_to = re.search(r"^COPY schemas/ (\S+)$", text, re.MULTILINE)
    assert schema_dir
    assert copied_to
    assert schema_dir.group(1).rstrip("/") == copied_to.group(1).rstrip("/")
    assert 'ENTRYPOINT ["cmsync"]' in text
    assert 'CMD ["run"]' in text
    assert re.search(r"^EXPOSE 9400$", text, re.MULTILINE)
    assert not re.search(r"(API_KEY|PASSWORD|SECRET|TOKEN)\w*=", text), "no secrets in the image"
    ignored = (ROOT / ".dockerignore").read_text(encoding="utf-8").split()
    for needed in ("!pyproject.toml", "!README.md", "!consumer/", "!schemas/"):
        assert needed in ignored


# =============================================================================================
# Alert rules


def load_rules() -> list[dict[str, Any]]:
    document = yaml.safe_load(RULES_FILE.read_text(encoding="utf-8"))
    return [rule for group in document["groups"] for rule in group["rules"]]


ALERTS = [rule["alert"] for rule in load_rules() if "alert" in rule]


def test_promtool_checks_the_rules() -> None:
    result = run_tool(tool("promtool"), "check", "rules", str(RULES_FILE))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(load_rules())} rules found" in result.stdout


def test_promtool_unit_tests_of_the_rules_pass() -> None:
    result = run_tool(tool("promtool"), "test", "rules", str(RULES_TEST_FILE))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_promtool_unit_tests_can_fail(tmp_path: Path) -> None:
    """A mutated rule (error ratio threshold raised) must make the unit tests fail."""
    promtool = tool("promtool")
    text = RULES_FILE.read_text(encoding="utf-8")
    assert "> 0.05" in text
    (tmp_path / RULES_FILE.name).write_text(text.replace("> 0.05", "> 0.5"), encoding="utf-8")
    shutil.copy(RULES_TEST_FILE, tmp_path / RULES_TEST_FILE.name)
    result = run_tool(promtool, "test", "rules", str(tmp_path / RULES_TEST_FILE.name))
    assert result.returncode != 0
    assert "CmsyncApiErrorRatioHigh" in result.stdout + result.stderr


@pytest.mark.parametrize("alert", ALERTS)
def test_every_alert_is_unit_tested_firing_and_not_firing(alert: str) -> None:
    tests = yaml.safe_load(RULES_TEST_FILE.read_text(encoding="utf-8"))["tests"]
    cases = [
        case for test in tests for case in test["alert_rule_test"] if case["alertname"] == alert
    ]
    assert any(case["exp_alerts"] for case in cases), f"{alert}: no case where it fires"
    assert any(not case["exp_alerts"] for case in cases), f"{alert}: no case where it stays quiet"


@pytest.mark.parametrize("alert", ALERTS)
def test_every_alert_has_severity_annotations_and_a_runbook(alert: str) -> None:
    rule = next(r for r in load_rules() if r.get("alert") == alert)
    assert alert.startswith("Cmsync")
    assert rule["labels"]["severity"] in ("critical", "warning")
    annotations = rule["annotations"]
    assert set(annotations) == {"summary", "description", "runbook_url"}
    assert annotations["runbook_url"] == f"README.md#{_anchor('Alert: ' + alert)}"


def _anchor(heading: str) -> str:
    """GitHub's heading anchor: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_every_runbook_anchor_exists_in_the_readme() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    anchors = {_anchor(m.group(1)) for m in re.finditer(r"^#+\s+(.+)$", readme, re.MULTILINE)}
    for rule in load_rules():
        if "alert" in rule:
            anchor = rule["annotations"]["runbook_url"].split("#", 1)[1]
            assert anchor in anchors, f"README.md has no section '{rule['alert']}' runbook"


# =============================================================================================
# Metric names used by the dashboard and the rules


def exported_metrics() -> dict[str, tuple[str, ...]]:
    """Every sample name REGISTRY exports -> label names of its metric (plus `le`)."""
    names: dict[str, tuple[str, ...]] = {}
    for value in vars(obs).values():
        if not isinstance(value, MetricWrapperBase):
            continue
        # prometheus_client keeps these private; there is no public accessor.
        base, labels = value._name, tuple(value._labelnames)
        kind = value._type
        if kind == "counter":
            names[base + "_total"] = labels
        elif kind == "histogram":
            names[base + "_bucket"] = (*labels, "le")
            names[base + "_sum"] = names[base + "_count"] = labels
        elif kind == "info":
            names[base + "_info"] = ("version", "python")
        else:
            names[base] = labels
    registered = {sample.name for family in obs.REGISTRY.collect() for sample in family.samples}
    # Everything found above is on REGISTRY (labelled metrics without children yield no samples).
    assert {
        "cmsync_build_info",
        "cmsync_paused_partitions",
        "cmsync_flush_interval_seconds",
    } <= registered
    return names


#: Labels the scrape adds (Prometheus Operator target labels).
TARGET_LABELS = {"namespace", "pod", "job", "instance", "service", "endpoint", "container"}
METRIC_RE = re.compile(r"\bcmsync_[a-z0-9_]+\b")
SELECTOR_RE = re.compile(r"\b(cmsync_[a-z0-9_]+)\{([^}]*)\}")
GROUPING_RE = re.compile(r"\b(?:by|on|without|ignoring|group_left|group_right)\s*\(([^)]*)\)")


def dashboard_exprs() -> list[str]:
    dashboard = json.loads(DASHBOARD_FILE.read_text(encoding="utf-8"))
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            exprs.append(variable["query"]["query"])
    return exprs


def rule_exprs() -> list[str]:
    return [str(rule["expr"]) for rule in load_rules()]


@pytest.mark.parametrize("source", ["dashboard", "rules"])
def test_every_referenced_metric_and_label_is_exported(source: str) -> None:
    exprs = dashboard_exprs() if source == "dashboard" else rule_exprs()
    exported = exported_metrics()
    used: set[str] = set()
    for expr in exprs:
        metrics = set(METRIC_RE.findall(expr))
        used |= metrics
        unknown = metrics - set(exported)
        assert not unknown, f"{source} uses metrics that are not exported: {unknown} in {expr}"
        allowed = TARGET_LABELS | {"le"} | {label for m in metrics for label in exported[m]}
        labels = {
            matcher.split("=")[0].strip(" !~")
            for _, matchers in SELECTOR_RE.findall(expr)
            for matcher in matchers.split(",")
            if matcher.strip()
        }
        labels |= {
            label.strip() for group in GROUPING_RE.findall(expr) for label in group.split(",")
        }
        labels |= set(re.findall(r"label_values\([^,]+,\s*(\w+)\)", expr))
        labels.discard("")
        assert labels <= allowed, f"{source}: unknown labels {labels - allowed} in {expr}"
    assert used, "the regex found no metric at all"


def test_the_dashboard_shows_every_metric_an_operator_needs() -> None:
    used = {m for expr in dashboard_exprs() for m in METRIC_RE.findall(expr)}
    for needed in (
        "cmsync_events_consumed_total",
        "cmsync_changes_applied_total",
        "cmsync_consumer_lag",
        "cmsync_freshness_seconds_bucket",
        "cmsync_api_requests_total",
        "cmsync_api_throttled_total",
        "cmsync_permitted_rate",
        "cmsync_pending_changes",
        "cmsync_dead_letters_total",
        "cmsync_destination_up",
        "cmsync_flush_duration_seconds_bucket",
        "cmsync_paused_partitions",
    ):
        assert needed in used


def test_dashboard_is_importable_and_uses_the_datasource_variable() -> None:
    dashboard = json.loads(DASHBOARD_FILE.read_text(encoding="utf-8"))
    assert dashboard["uid"] == "cmsync-overview"
    assert dashboard["title"] == "cmsync"
    assert isinstance(dashboard["schemaVersion"], int)
    assert dashboard["schemaVersion"] >= 36
    assert dashboard["time"] == {"from": "now-6h", "to": "now"}
    [input_] = dashboard["__inputs"]
    assert (input_["type"], input_["pluginId"]) == ("datasource", "prometheus")
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    expected = {"type": "prometheus", "uid": "${datasource}"}
    ids = []
    cells: set[tuple[int, int]] = set()
    for panel in dashboard["panels"]:
        ids.append(panel["id"])
        box = panel["gridPos"]
        assert box["x"] + box["w"] <= 24
        area = {
            (x, y)
            for x in range(box["x"], box["x"] + box["w"])
            for y in range(box["y"], box["y"] + box["h"])
        }
        assert not area & cells, f"panel {panel['title']!r} overlaps another"
        cells |= area
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == expected, panel["title"]
        assert panel["targets"]
        for target in panel["targets"]:
            assert target["datasource"] == expected, panel["title"]
            for name in re.findall(r"\$(\w+)", target["expr"]):
                assert name.startswith("__") or name in variables, f"undefined ${name}"
    assert len(ids) == len(set(ids))


def test_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    """promtool parses every dashboard query (Grafana variables replaced by sample values)."""
    promtool = tool("promtool")
    replacements = {"$__rate_interval": "5m", "$namespace": ".*", "$destination": ".*"}
    rules = []
    for i, expr in enumerate(dashboard_exprs()):
        if expr.startswith("label_values("):
            continue
        for variable, value in replacements.items():
            expr = expr.replace(variable, value)
        assert "$" not in expr, expr
        rules.append({"record": f"dashboard:query_{i}", "expr": expr})
    file = tmp_path / "dashboard.rules.yml"
    file.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = run_tool(promtool, "check", "rules", str(file))
    assert result.returncode == 0, result.stdout + result.stderr


# =============================================================================================
# Health server


class Checks:
    def __init__(self) -> None:
        self.alive: tuple[bool, str] = (True, "ok")
        self.ready: tuple[bool, str] = (True, "joined")
        self.ready_raises = False

    def liveness(self) -> tuple[bool, str]:
        return self.alive

    def readiness(self) -> tuple[bool, str]:
        if self.ready_raises:
            raise RuntimeError("boom")
        return self.ready


@pytest.fixture
async def server() -> Any:
    checks = Checks()
    health = obs.HealthServer(
        0, liveness=checks.liveness, readiness=checks.readiness, host="127.0.0.1"
    )
    await health.start()
    assert health.port != 0
    async with aiohttp.ClientSession(f"http://127.0.0.1:{health.port}") as session:
        yield health, checks, session
    await health.stop()


def touch_metrics() -> None:
    obs.init_labels(
        topic="ops-test",
        destinations=["ops-dest"],
        api_keys=["CMSYNC_CM_API_KEY"],
        flush_interval_s=5,
    )
    obs.events_consumed.labels(topic="ops-test", partition="0").inc(3)
    obs.api_requests.labels(endpoint="import", status="200").inc()
    obs.api_latency.labels(endpoint="import").observe(0.12)
    obs.flushes.labels(destination="ops-dest", outcome="ok").inc()
    obs.flush_duration.labels(destination="ops-dest").observe(0.4)
    obs.freshness.labels(destination="ops-dest").observe(5.5)
    obs.retries.labels(destination="ops-dest", reason="transient").inc()
    obs.permitted_rate.labels(api_key="CMSYNC_CM_API_KEY").set(7.5)
    obs.committed_offset.labels(topic="ops-test", partition="0").set(3)
    obs.consumer_lag.labels(topic="ops-test", partition="0").set(0)
    obs.applied_changes.labels(destination="ops-dest", kind="add").inc(2)


async def test_metrics_endpoint_serves_the_prometheus_text_format(server: Any) -> None:
    _, _, session = server
    touch_metrics()
    async with session.get("/metrics") as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        body = await response.text()
    assert 'cmsync_events_consumed_total{partition="0",topic="ops-test"} 3.0' in body
    assert 'cmsync_dead_letters_total{reason="cm_rejected"} 0.0' in body  # primed
    assert 'cmsync_destination_up{destination="ops-dest"} 1.0' in body
    assert "cmsync_build_info{" in body
    assert "_created" not in body
    promtool = tool("promtool")
    result = run_tool(promtool, "check", "metrics", stdin=body)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout + result.stderr == ""  # no lint findings either


async def test_metrics_endpoint_speaks_openmetrics_when_asked(server: Any) -> None:
    _, _, session = server
    headers = {"Accept": "application/openmetrics-text; version=1.0.0; charset=utf-8"}
    async with session.get("/metrics", headers=headers) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("application/openmetrics-text")
        body = await response.text()
    assert body.endswith("# EOF\n")
    assert "# TYPE cmsync_build info" in body


async def test_health_endpoints_follow_the_checks(server: Any) -> None:
    _, checks, session = server
    for path in ("/healthz", "/readyz"):
        async with session.get(path) as response:
            assert response.status == 200
            assert (await response.json())["status"] == "ok"
    checks.alive = (False, "tasks ended: flusher-vip")
    async with session.get("/healthz") as response:
        assert response.status == 503
        assert await response.json() == {"status": "fail", "reason": "tasks ended: flusher-vip"}
    async with session.get("/readyz") as response:
        assert response.status == 200  # readiness is its own check
    checks.ready = (False, "destinations stalled: vip")
    async with session.get("/readyz") as response:
        assert response.status == 503
        assert (await response.json())["reason"] == "destinations stalled: vip"
    checks.ready_raises = True
    async with session.get("/readyz") as response:
        assert response.status == 503
        assert await response.json() == {"status": "fail", "reason": "check raised RuntimeError"}


async def test_health_server_stops_listening(server: Any) -> None:
    health, _, session = server
    await health.stop()
    with pytest.raises(aiohttp.ClientConnectionError):
        async with session.get("/healthz"):
            pass


def test_forget_partition_drops_its_gauges() -> None:
    obs.consumer_lag.labels(topic="ops-forget", partition="4").set(12)
    obs.committed_offset.labels(topic="ops-forget", partition="4").set(99)
    obs.forget_partition("ops-forget", 4)
    obs.forget_partition("ops-forget", 4)  # twice: harmless
    samples = [s for f in obs.REGISTRY.collect() for s in f.samples]
    assert not [s for s in samples if s.labels.get("topic") == "ops-forget"]


# =============================================================================================
# Logging


@pytest.fixture
def logs(capsys: pytest.CaptureFixture[str]) -> Iterator[pytest.CaptureFixture[str]]:
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    yield capsys
    for handler in root.handlers[:]:
        if handler not in handlers:
            root.removeHandler(handler)
    root.setLevel(level)
    structlog.reset_defaults()
    structlog.contextvars.clear_contextvars()


def json_lines(out: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def test_json_logs_carry_level_logger_time_and_context(logs: pytest.CaptureFixture[str]) -> None:
    obs.configure_logging("info", "json")
    log = structlog.get_logger("cmsync.test")
    structlog.contextvars.bind_contextvars(destination="vip")
    log.info("flush", adds=3, duration_s=0.25)
    log.debug("not shown at info")
    [line] = json_lines(logs.readouterr().out)
    assert list(line)[:4] == ["timestamp", "level", "logger", "event"]
    assert line["level"] == "info"
    assert line["logger"] == "cmsync.test"
    assert line["event"] == "flush"
    assert (line["adds"], line["duration_s"], line["destination"]) == (3, 0.25, "vip")
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d+Z", line["timestamp"])


def test_stdlib_logs_are_rendered_the_same_way(logs: pytest.CaptureFixture[str]) -> None:
    obs.configure_logging("info", "json")
    structlog.contextvars.bind_contextvars(partition=3)
    logging.getLogger("aiokafka.consumer").warning("Heartbeat failed for group %s", "cmsync")
    logging.getLogger("aiohttp.access").debug("filtered by level")
    [line] = json_lines(logs.readouterr().out)
    assert line["logger"] == "aiokafka.consumer"
    assert line["level"] == "warning"
    assert line["event"] == "Heartbeat failed for group cmsync"
    assert line["partition"] == 3


def test_exceptions_are_rendered_and_redacted(logs: pytest.CaptureFixture[str]) -> None:
    obs.configure_logging("info", "json")
    log = structlog.get_logger("cmsync.test")
    try:
        raise ValueError("rejected ada.lovelace@example.com")
    except ValueError:
        log.exception("flush_failed")
        logging.getLogger("aiohttp.client").exception("request failed")
    lines = json_lines(logs.readouterr().out)
    assert [line["event"] for line in lines] == ["flush_failed", "request failed"]
    for line in lines:
        assert line["level"] == "error"
        assert "Traceback" in line["exception"]
        assert "ValueError: rejected <redacted>" in line["exception"]


def test_email_addresses_are_redacted_everywhere(logs: pytest.CaptureFixture[str]) -> None:
    obs.configure_logging("debug", "json")
    log = structlog.get_logger("cmsync.test")
    structlog.contextvars.bind_contextvars(who="bound@example.org")
    log.info(
        "sending Ada@Example.COM",
        row={"email": "x.y+tag@sub.example.co.uk", "list": ["z@example.io", 1]},
        url="/api/v3.3/subscribers/abc.json?email=ada%40example.com",
        plain="no address here, just an @ sign and 100% of the time",
        obj=ValueError("eve@example.net"),
    )
    logging.getLogger("aiokafka").info("key %s", "mallory@example.com")
    out = logs.readouterr().out
    assert "@example" not in out.lower()
    assert "%40example" not in out
    first, second = json_lines(out)
    assert first["event"] == "sending <redacted>"
    assert first["row"] == {"email": "<redacted>", "list": ["<redacted>", 1]}
    assert first["url"] == "/api/v3.3/subscribers/abc.json?email=<redacted>"
    assert first["plain"] == "no address here, just an @ sign and 100% of the time"
    assert first["obj"] == "<redacted>"
    assert first["who"] == "<redacted>"
    assert second["event"] == "key <redacted>"


def test_console_format_is_for_people(logs: pytest.CaptureFixture[str]) -> None:
    obs.configure_logging("info", "console")
    structlog.get_logger("cmsync.test").info("flush", who="ada@example.com")
    out = logs.readouterr().out
    assert "flush" in out
    assert "who=<redacted>" in out
    with pytest.raises(json.JSONDecodeError):
        json.loads(out)


def test_auto_format_is_json_off_a_terminal(logs: pytest.CaptureFixture[str]) -> None:
    assert not sys.stdout.isatty()  # captured by pytest
    obs.configure_logging("info", "auto")
    structlog.get_logger("cmsync.test").info("hello")
    assert json_lines(logs.readouterr().out)[0]["event"] == "hello"


def test_reconfiguring_keeps_one_handler(logs: pytest.CaptureFixture[str]) -> None:
    obs.configure_logging("info", "json")
    obs.configure_logging("warning", "json")
    structlog.get_logger("cmsync.test").info("hidden")
    structlog.get_logger("cmsync.test").warning("shown")
    assert [line["event"] for line in json_lines(logs.readouterr().out)] == ["shown"]


@pytest.mark.parametrize(("level", "fmt"), [("loud", "json"), ("info", "xml")])
def test_unknown_level_or_format_is_refused(level: str, fmt: Any) -> None:
    with pytest.raises(ValueError, match="unknown log"):
        obs.configure_logging(level, fmt)
