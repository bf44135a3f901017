"""Operations artefacts: Kubernetes manifests and components, Dockerfile, dependency locks,
alert rules and inhibitions, dashboard, metrics, the health server, the log format, and the
commands the docs show. (A live Prometheus against a running service: test_live_prometheus.py.)

External tools (`kubectl` for kustomize, `promtool`) are skipped when missing, unless
CMSYNC_REQUIRE_TOOLS=1 (what `.ci/run` sets): then a missing tool fails the test.
"""

from __future__ import annotations

import asyncio
import copy
import importlib.metadata
import importlib.util
import itertools
import json
import logging
import os
import re
import shlex
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
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
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
CUSTOM_KINDS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"),
    ("monitoring.coreos.com/v1", "PrometheusRule"),
    ("monitoring.coreos.com/v1alpha1", "AlertmanagerConfig"),
}
COMPONENTS = ROOT / "k8s" / "components"
#: The Secret the Deployment reads its credentials from; no kustomization of ours renders it.
CREDENTIALS_SECRET = "cmsync-credentials"
CONTRACT_VARIABLES = {v.name for v in VARIABLES}
SECRET_VARIABLES = {v.name for v in VARIABLES if v.secret}
DEFAULTS = {v.name: v.default for v in VARIABLES}

RULES_FILE = ROOT / "alerts" / "cmsync.rules.yml"
RULES_TEST_FILE = ROOT / "alerts" / "cmsync.rules.test.yml"
INHIBIT_FILE = ROOT / "alerts" / "alertmanager.inhibit.yml"
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


class KubeLoader(yaml.SafeLoader):
    """PyYAML reads a plain `=` (kustomize writes AlertmanagerConfig's `matchType: =` so) as
    YAML 1.1's value tag and fails; Kubernetes, on YAML 1.2, reads the string "="."""


KubeLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:value"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


def load_documents(text: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.load_all(text, Loader=KubeLoader) if doc]


@cache
def _render(kustomization: str) -> tuple[dict[str, Any], ...]:
    result = run_tool(tool("kubectl"), "kustomize", str(ROOT / kustomization))
    assert result.returncode == 0, result.stderr
    return tuple(load_documents(result.stdout))


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


def test_kustomizations_render_every_kind() -> None:
    base = sorted(o["kind"] for o in _render("k8s/base"))
    expected = ["ConfigMap", "ConfigMap", "CronJob", "Deployment", "NetworkPolicy"]
    expected += ["PodDisruptionBudget"]
    expected += ["Service", "ServiceAccount", "ServiceMonitor"]
    assert base == expected  # no Secret: `apply -k` must never overwrite the real one
    example = sorted(o["kind"] for o in _render("k8s/overlays/example"))
    added = ["AlertmanagerConfig", "ConfigMap", "Namespace", "PrometheusRule"]
    assert example == sorted(expected + added)


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


def test_credentials_come_from_one_existing_secret(rendered: list[dict[str, Any]]) -> None:
    assert not [o for o in rendered if o["kind"] == "Secret"]
    refs = [v["valueFrom"]["secretKeyRef"] for v in container(rendered)["env"] if "valueFrom" in v]
    assert refs
    assert {ref["name"] for ref in refs} == {CREDENTIALS_SECRET}
    # Each variable is read from the key of its own name (what `kubectl create secret
    # --from-literal=NAME=…` and the credentials-from-file component produce).
    assert all(
        ref["key"] == v["name"] for ref, v in zip(refs, container(rendered)["env"], strict=False)
    )


def render_with(
    tmp_path: Path, components: list[str], files: dict[str, str] | None = None
) -> list[dict[str, Any]]:
    """Renders the base plus the given components in a throwaway overlay."""
    shutil.copytree(ROOT / "k8s", tmp_path / "k8s")
    overlay = tmp_path / "k8s" / "overlays" / "test"
    overlay.mkdir()
    kustomization = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": ["../../base"],
        "components": [f"../../components/{c}" for c in components],
    }
    (overlay / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
    for name, text in (files or {}).items():
        (overlay / name).write_text(text, encoding="utf-8")
    result = run_tool(tool("kubectl"), "kustomize", str(overlay))
    assert result.returncode == 0, result.stderr
    return load_documents(result.stdout)


def test_example_overlay_documents_a_generated_secret_that_works(tmp_path: Path) -> None:
    """The commented "generated Secret" block of the example overlay, uncommented, builds the
    Secret the Deployment reads (with every key it needs, and its hashed name followed)."""
    shutil.copytree(ROOT / "k8s", tmp_path / "k8s")
    overlay = tmp_path / "k8s" / "overlays" / "example"
    text = (overlay / "kustomization.yaml").read_text(encoding="utf-8")
    block = re.search(
        r"^# --- generated Secret.*?^(# secretGenerator:.*?)^# --- end", text, re.M | re.S
    )
    assert block, "the example overlay lost its generated-Secret block"
    enabled = "\n".join(line[2:] for line in block.group(1).splitlines())
    (overlay / "kustomization.yaml").write_text(text + enabled + "\n", encoding="utf-8")
    keys = ("CMSYNC_CM_API_KEY", "CMSYNC_KAFKA_SASL_PASSWORD", "CMSYNC_CM_API_KEY_EU")
    (overlay / "credentials.env").write_text("".join(f"{k}=fake\n" for k in keys))
    result = run_tool(tool("kubectl"), "kustomize", str(overlay))
    assert result.returncode == 0, result.stderr
    objects = load_documents(result.stdout)
    secret = the(objects, "Secret")
    assert secret["metadata"]["name"].startswith(CREDENTIALS_SECRET + "-")  # content hash
    for var in container(objects)["env"]:
        ref = var["valueFrom"]["secretKeyRef"]
        assert ref["name"] == secret["metadata"]["name"]  # kustomize rewrote the reference
        assert ref["key"] in secret["data"]
    for version in K8S_VERSIONS:
        kubernetes_validate.validate(secret, version, strict=True)


def test_kafka_mtls_component_mounts_the_client_certificate(tmp_path: Path) -> None:
    objects = render_with(tmp_path, ["kafka-mtls"])
    for obj in objects:
        if (obj["apiVersion"], obj["kind"]) not in CUSTOM_KINDS:
            kubernetes_validate.validate(obj, K8S_VERSIONS[-1], strict=True)
    env = {v["name"]: v["value"] for v in container(objects)["env"] if "value" in v}
    mount = next(m for m in container(objects)["volumeMounts"] if m["name"] == "kafka-tls")
    files = ("CMSYNC_KAFKA_SSL_CAFILE", "CMSYNC_KAFKA_SSL_CERTFILE", "CMSYNC_KAFKA_SSL_KEYFILE")
    for name in files:
        assert env[name].startswith(mount["mountPath"] + "/")
    assert env["CMSYNC_KAFKA_SECURITY_PROTOCOL"] == "SSL"
    volume = next(
        v
        for v in the(objects, "Deployment")["spec"]["template"]["spec"]["volumes"]
        if v["name"] == "kafka-tls"
    )
    assert volume["secret"]["secretName"] == "cmsync-kafka-tls"
    assert set(files) <= CONTRACT_VARIABLES


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
    assert probes["startupProbe"]["path"] == "/readyz"  # started = joined and restored
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
    # Reserved = allowed: a node under memory pressure does not evict or OOM-kill the pod for
    # using what its limit grants.
    assert resources["requests"]["memory"] == resources["limits"]["memory"]
    assert container(rendered)["args"] == ["run"]


def _reconcile_job(objects: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the CronJob's spec, its pod's spec)."""
    cron = by_name(objects, "CronJob", "cmsync-reconcile")["spec"]
    return cron, cron["jobTemplate"]["spec"]["template"]["spec"]


def _same_pod_as_the_deployment(objects: list[dict[str, Any]]) -> None:
    """The reconcile Job's pod runs what the Deployment runs, with what it runs with."""
    deployment = the(objects, "Deployment")["spec"]["template"]["spec"]
    _, pod = _reconcile_job(objects)
    [job] = pod["containers"]
    service = container(objects)
    for key in ("image", "envFrom", "env", "resources", "securityContext"):
        assert job.get(key) == service.get(key), key
    assert job["args"] == ["reconcile"]
    for key in ("securityContext", "serviceAccountName", "automountServiceAccountToken"):
        assert pod[key] == deployment[key], key
    # Every mount of the service but its state directory (the Job restores into /tmp).
    volumes = {v["name"]: v for v in deployment["volumes"] if v["name"] != "state"}
    assert {v["name"]: v for v in pod["volumes"] if v["name"] != "tmp"} == {
        name: v for name, v in volumes.items() if name != "tmp"
    }
    service_mounts = [m for m in service["volumeMounts"] if m["name"] != "state"]
    assert job["volumeMounts"] == service_mounts


def test_reconcile_cronjob_runs_nightly_one_at_a_time_like_the_deployment(
    rendered: list[dict[str, Any]],
) -> None:
    cron, pod = _reconcile_job(rendered)
    assert cron["concurrencyPolicy"] == "Forbid"
    minute, hour, *every_day = cron["schedule"].split()
    assert every_day == ["*", "*", "*"]
    assert minute.isdigit()
    assert hour.isdigit()
    assert pod["restartPolicy"] == "Never"
    _same_pod_as_the_deployment(rendered)
    labels = cron["jobTemplate"]["spec"]["template"]["metadata"]["labels"]
    policy = the(rendered, "NetworkPolicy")["spec"]["podSelector"]["matchLabels"]
    assert _selects(policy, labels)  # the Job reaches Kafka and Campaign Monitor too
    # It serves nothing: no port, no probe, not behind the Service.
    assert not _selects(the(rendered, "Service")["spec"]["selector"], labels)
    [job] = pod["containers"]
    assert not {"ports", "livenessProbe", "readinessProbe", "startupProbe"} & set(job)


def test_reconcile_cronjob_gets_the_kafka_client_certificate_too(tmp_path: Path) -> None:
    objects = render_with(tmp_path, ["kafka-mtls"])
    _same_pod_as_the_deployment(objects)
    _, pod = _reconcile_job(objects)
    assert "kafka-tls" in {v["name"] for v in pod["volumes"]}


def test_the_documented_on_demand_reconcile_names_the_cronjob() -> None:
    command = "kubectl create job --from=cronjob/cmsync-reconcile cmsync-reconcile-now"
    assert command in (ROOT / "docs" / "operations.md").read_text(encoding="utf-8")
    assert command in (ROOT / "README.md").read_text(encoding="utf-8")


def test_network_policy_allows_what_the_service_needs(rendered: list[dict[str, Any]]) -> None:
    policy = the(rendered, "NetworkPolicy")["spec"]
    assert sorted(policy["policyTypes"]) == ["Egress", "Ingress"]
    egress_ports = {(p["protocol"], p["port"]) for rule in policy["egress"] for p in rule["ports"]}
    assert {("UDP", 53), ("TCP", 53), ("TCP", 443)} <= egress_ports
    # Kafka: exactly the ports of the configured bootstrap servers (set per overlay).
    servers = settings_env(rendered)["CMSYNC_KAFKA_BOOTSTRAP_SERVERS"].split(",")
    kafka_ports = {("TCP", int(server.rsplit(":", 1)[1])) for server in servers}
    assert kafka_ports <= egress_ports
    assert egress_ports - kafka_ports == {("UDP", 53), ("TCP", 53), ("TCP", 443)}
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
    # What the monitoring stack selects by: the same label on all three objects.
    for kind in ("ServiceMonitor", "PrometheusRule", "AlertmanagerConfig"):
        assert the(objects, kind)["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert "release" not in the(list(_render("k8s/base")), "ServiceMonitor")["metadata"]["labels"]


def load_render_module() -> Any:
    spec = importlib.util.spec_from_file_location("k8s_render", COMPONENTS / "render.py")
    assert spec
    assert spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generated_component_files_are_fresh() -> None:
    for path, text in load_render_module().rendered().items():
        assert path.read_text(encoding="utf-8") == text, f"{path.name} is stale: make manifests"


def test_prometheus_rule_component_carries_the_rules_with_the_overlay_runbook_base() -> None:
    objects = list(_render("k8s/overlays/example"))
    rule = the(objects, "PrometheusRule")
    base = yaml.safe_load((ROOT / "k8s/overlays/example/runbook-base.yaml").read_text())["data"]
    expected = yaml.safe_load(RULES_FILE.read_text(encoding="utf-8"))["groups"]
    for group in expected:
        for r in group["rules"]:
            if "alert" in r:
                anchor = r["annotations"]["runbook_url"].split("#", 1)[1]
                r["annotations"]["runbook_url"] = f"{base['base']}#{anchor}"
    assert rule["spec"]["groups"] == expected
    assert not [o for o in objects if o["metadata"]["name"] == "cmsync-runbook-base"]


def test_alertmanager_config_component_carries_the_inhibitions() -> None:
    config = the(list(_render("k8s/overlays/example")), "AlertmanagerConfig")
    source = yaml.safe_load(INHIBIT_FILE.read_text(encoding="utf-8"))["inhibit_rules"]
    rules = config["spec"]["inhibitRules"]
    assert len(rules) == len(source)
    for rule, original in zip(rules, source, strict=True):
        assert rule["equal"] == original["equal"]
        for key, matchers in (
            ("sourceMatch", "source_matchers"),
            ("targetMatch", "target_matchers"),
        ):
            rendered = [f'{m["name"]} {m["matchType"]} "{m["value"]}"' for m in rule[key]]
            assert [m.replace('"', "") for m in rendered] == [
                m.replace('"', "") for m in original[matchers]
            ]


def test_grafana_dashboard_component_is_a_sidecar_configmap() -> None:
    objects = list(_render("k8s/overlays/example"))
    configmap = by_name(objects, "ConfigMap", "cmsync-dashboard")
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    [(name, text)] = configmap["data"].items()
    assert name.endswith(".json")
    board = json.loads(text)
    source = json.loads(DASHBOARD_FILE.read_text(encoding="utf-8"))
    assert board["uid"] == source["uid"]
    assert board["panels"] == source["panels"]
    assert "__inputs" not in board  # import-dialog only; provisioning does not resolve it
    assert "${DS_" not in text


def test_dockerfile_is_non_root_and_ships_the_schemas() -> None:
    text = (ROOT / "Dockerfile").read_text(encoding="utf-8")
    instructions = [line.split(None, 1) for line in text.splitlines() if line and line[0] != "#"]
    froms = [rest for word, *rest in instructions if word == "FROM"]
    assert len(froms) >= 2, "multi-stage"
    assert re.search(r"^USER 10001(:10001)?$", text, re.MULTILINE)
    # The schema is package data (consumer.schemas = schemas/): the builder copies the folder
    # before it builds the wheel, and the image reads the wheel's copy, not a loose one.
    steps = dockerfile_instructions()
    schemas_copy = next(
        i for i, (w, r) in enumerate(steps) if w == "COPY" and r.startswith("schemas/")
    )
    wheel_build = next(i for i, (w, r) in enumerate(steps) if w == "RUN" and "pip wheel" in r)
    runtime = next(i for i, (w, r) in enumerate(steps) if w == "FROM" and "runtime" in r)
    assert schemas_copy < wheel_build < runtime
    assert "CMSYNC_SCHEMA_DIR" not in text
    assert 'ENTRYPOINT ["cmsync"]' in text
    assert 'CMD ["run"]' in text
    assert re.search(r"^EXPOSE 9400$", text, re.MULTILINE)
    assert not re.search(r"(API_KEY|PASSWORD|SECRET|TOKEN)\w*=", text), "no secrets in the image"
    ignored = (ROOT / ".dockerignore").read_text(encoding="utf-8").split()
    for needed in ("!pyproject.toml", "!README.md", "!LICENSE", "!consumer/", "!schemas/"):
        assert needed in ignored
    for lock in ("!requirements/runtime.txt", "!requirements/build.txt"):
        assert lock in ignored


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(instruction, arguments) of the Dockerfile, continuation lines joined."""
    text = (ROOT / "Dockerfile").read_text(encoding="utf-8").replace("\\\n", " ")
    lines = [line.strip() for line in text.splitlines()]
    return [
        (words[0], words[1] if len(words) > 1 else "")
        for words in (line.split(None, 1) for line in lines if line and not line.startswith("#"))
    ]


def test_dockerfile_base_image_is_pinned_by_tag_and_digest() -> None:
    args = dict(
        rest.split("=", 1)
        for word, rest in dockerfile_instructions()
        if word == "ARG" and "=" in rest
    )
    image = args["PYTHON_IMAGE"]
    assert re.fullmatch(r"python:3\.11\.\d+-slim-bookworm@sha256:[0-9a-f]{64}", image), image
    froms = [rest for word, rest in dockerfile_instructions() if word == "FROM"]
    assert froms
    assert all(f.startswith("${PYTHON_IMAGE}") for f in froms)


def test_dockerfile_installs_the_locked_dependencies_before_the_code() -> None:
    steps = dockerfile_instructions()
    builder = steps[: next(i for i, (w, r) in enumerate(steps) if w == "FROM" and "runtime" in r)]
    copies = [(i, rest) for i, (word, rest) in enumerate(builder) if word == "COPY"]
    runs = [(i, rest) for i, (word, rest) in enumerate(builder) if word == "RUN"]
    lock_copy = next(i for i, rest in copies if "requirements/runtime.txt" in rest)
    code_copy = next(i for i, rest in copies if rest.startswith("consumer/"))
    locked_install = next(
        i for i, rest in runs if "--require-hashes -r requirements/runtime.txt" in rest
    )
    # The dependency layer (lock copy + hashed install) comes before any code is copied, so
    # a code change does not rebuild it; the package goes on top without resolving anything.
    assert lock_copy < locked_install < code_copy
    assert not [rest for i, rest in copies if i < locked_install and "pyproject" in rest]
    package_install = next(i for i, rest in runs if "pip install --no-deps" in rest)
    assert package_install > code_copy
    assert [rest for i, rest in runs if "pip install" in rest and "--no-deps" not in rest] == [
        rest for i, rest in runs if "--require-hashes" in rest
    ], "every other pip install is a hashed lock"


def test_image_carries_oci_version_and_revision_labels() -> None:
    steps = dockerfile_instructions()
    runtime = steps[next(i for i, (w, r) in enumerate(steps) if w == "FROM" and "runtime" in r) :]
    declared = {rest.split("=", 1)[0] for word, rest in runtime if word == "ARG"}
    labels = " ".join(rest for word, rest in runtime if word == "LABEL")
    assert {"VERSION", "REVISION"} <= declared
    assert 'org.opencontainers.image.version="${VERSION}"' in labels
    assert 'org.opencontainers.image.revision="${REVISION}"' in labels
    assert 'org.opencontainers.image.licenses="Apache-2.0"' in labels
    assert "Apache License" in (ROOT / "LICENSE").read_text(encoding="utf-8")


# =============================================================================================
# Locked dependencies

LOCKS = {name: ROOT / "requirements" / f"{name}.txt" for name in ("runtime", "build", "dev")}
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def locked(name: str) -> dict[str, str]:
    """Package name (normalised) -> version pinned in requirements/<name>.txt."""
    pins: dict[str, str] = {}
    text = LOCKS[name].read_text(encoding="utf-8")
    for entry in re.split(r"\n(?=\S)", text):
        if entry.startswith("#") or not entry.strip():
            continue
        requirement = entry.split(" \\", 1)[0].split(" ;", 1)[0].strip()
        assert "==" in requirement, f"{name}: not pinned: {requirement}"
        hashes = re.findall(r"--hash=sha256:[0-9a-f]{64}", entry)
        assert hashes, f"{name}: no hash for {requirement}"
        package, version = requirement.split("==")
        pins[canonicalize_name(package)] = version
    assert pins, f"{name}: empty lock"
    return pins


def test_locks_pin_and_hash_every_package() -> None:
    runtime, build, dev = locked("runtime"), locked("build"), locked("dev")
    # The dev lock is constrained by the others: the tests run what the image ships.
    assert {p: dev.get(p) for p in runtime} == runtime
    assert {p: dev.get(p) for p in build} == build


@pytest.mark.parametrize(
    ("lock", "declared"),
    [
        ("runtime", PYPROJECT["project"]["dependencies"]),
        (
            "dev",
            PYPROJECT["project"]["dependencies"]
            + PYPROJECT["project"]["optional-dependencies"]["dev"],
        ),
        ("build", PYPROJECT["build-system"]["requires"]),
    ],
)
def test_locks_satisfy_pyproject(lock: str, declared: list[str]) -> None:
    """A dependency changed in pyproject.toml without `make lock` fails here."""
    pins = locked(lock)
    for text in declared:
        requirement = Requirement(text)
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{lock} lock lacks {name}: run `make lock`"
        assert requirement.specifier.contains(pins[name], prereleases=True), (
            f"{lock} lock pins {name}=={pins[name]}, pyproject.toml asks {requirement.specifier}:"
            " run `make lock`"
        )
    build_in = (ROOT / "requirements" / "build.in").read_text(encoding="utf-8")
    assert [line for line in build_in.splitlines() if line and line[0] != "#"] == list(
        PYPROJECT["build-system"]["requires"]
    )


def test_the_runtime_lock_is_what_is_installed() -> None:
    """The venv the tests run in has the versions the image ships (`make venv` installs them)."""
    for package, version in locked("runtime").items():
        assert importlib.metadata.version(package) == version, f"{package}: run `make venv`"


def test_makefile_installs_from_the_locks_and_reinstalls_when_they_change() -> None:
    text = (ROOT / "Makefile").read_text(encoding="utf-8")
    stamp_rule = re.search(r"^\$\(STAMP\): (.+)\n((?:\t.+\n)+)", text, re.MULTILINE)
    assert stamp_rule
    prerequisites, recipe = stamp_rule.groups()
    assert "$(LOCKS)" in prerequisites.split()
    assert re.search(r"^LOCKS\s*:=.*requirements/dev\.txt", text, re.MULTILINE)
    assert "pip install --quiet --require-hashes -r requirements/dev.txt" in recipe
    assert "pip install --quiet --no-deps --no-build-isolation -e ." in recipe
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert re.search(r"^make test$", ci, re.MULTILINE)


# =============================================================================================
# aiohttp's private retry switch (consumer/app.py sets ClientSession._retry_connection)


class DroppingServer:
    """HTTP/1.1 server that answers the first request of each connection with keep-alive and
    drops the connection, unanswered, on the second: what a load balancer closing an idle
    kept-alive connection looks like to a client. Counts the requests it read."""

    def __init__(self) -> None:
        self.requests = 0
        self.server: asyncio.Server | None = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        served = 0
        try:
            while await reader.readuntil(b"\r\n\r\n"):
                self.requests += 1
                served += 1
                if served > 1:
                    break  # drop the kept-alive connection without a response
                writer.write(
                    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: keep-alive\r\n\r\nok"
                )
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def __aenter__(self) -> str:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()


@pytest.mark.parametrize("retry_switched_off", [False, True])
async def test_aiohttp_retry_connection_switch_still_works(retry_switched_off: bool) -> None:
    """The service turns off aiohttp's silent re-send of an idempotent request on a dropped
    kept-alive connection (the copy would bypass the rate limiter) through the private
    attribute `ClientSession._retry_connection`: no public switch exists. This test fails loudly
    when an aiohttp upgrade renames or ignores it (the lock pins aiohttp; the upgrade that
    breaks this is the one to read). Both halves matter: without the switch aiohttp re-sends
    (3 requests, success) — proof the scenario triggers the retry — and with it, it does not
    (2 requests, the drop surfaces as an error the service retries through its limiter)."""
    sources = "".join(p.read_text(encoding="utf-8") for p in (ROOT / "consumer").rglob("*.py"))
    assert "._retry_connection = False" in sources, "the service no longer sets the switch"
    dropping = DroppingServer()
    async with dropping as url, aiohttp.ClientSession() as session:
        assert getattr(session, "_retry_connection", None) is True, "aiohttp renamed the switch"
        if retry_switched_off:
            session._retry_connection = False  # the same assignment as consumer/app.py
        async with session.get(f"{url}/first") as response:
            assert await response.read() == b"ok"
        if retry_switched_off:
            with pytest.raises(aiohttp.ServerDisconnectedError):
                async with session.get(f"{url}/second") as response:
                    await response.read()
            assert dropping.requests == 2
        else:
            async with session.get(f"{url}/second") as response:
                assert await response.read() == b"ok"
            assert dropping.requests == 3


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


#: Where the runbooks live: every runbook_url is <one base>#alert-<name>, the anchor a heading
#: "Alert: <name>" of this file.
RUNBOOKS = ROOT / "docs" / "operations.md"


def runbook_sections() -> dict[str, str]:
    """anchor -> text of every heading's section in docs/operations.md."""
    text = RUNBOOKS.read_text(encoding="utf-8")
    parts = re.split(r"^#+\s+(.+)$", text, flags=re.MULTILINE)
    return {_anchor(heading): body for heading, body in zip(parts[1::2], parts[2::2], strict=True)}


@pytest.mark.parametrize("alert", ALERTS)
def test_every_alert_has_severity_annotations_and_a_runbook(alert: str) -> None:
    rule = next(r for r in load_rules() if r.get("alert") == alert)
    assert alert.startswith("Cmsync")
    severity = rule["labels"]["severity"]
    assert severity in ("critical", "warning")
    annotations = rule["annotations"]
    assert set(annotations) == {"summary", "description", "runbook_url"}
    base, anchor = annotations["runbook_url"].split("#", 1)
    assert anchor == _anchor("Alert: " + alert)
    # Absolute, and the same base for every rule (one substitution changes them all).
    assert re.fullmatch(r"https://[^\s#]+/operations\.md", base), base
    assert {
        r["annotations"]["runbook_url"].split("#")[0] for r in load_rules() if "alert" in r
    } == {base}
    # The runbook opens with the alert's severity: what pages is what the runbook calls urgent.
    section = runbook_sections()[anchor]
    assert section.strip().startswith(f"*{severity}*"), f"runbook of {alert} says otherwise"


def _anchor(heading: str) -> str:
    """GitHub's heading anchor: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_every_runbook_anchor_exists_in_the_operations_guide() -> None:
    anchors = set(runbook_sections())
    for rule in load_rules():
        if "alert" in rule:
            anchor = rule["annotations"]["runbook_url"].split("#", 1)[1]
            assert anchor in anchors, f"docs/operations.md has no section '{rule['alert']}' runbook"


def _aggregation_labels(expr: str) -> set[str]:
    """Labels every top-level aggregation of a rule keeps (the intersection of its `by`s)."""
    groups = [
        {label.strip() for label in group.split(",")}
        for group in re.findall(r"\bby\s*\(([^)]*)\)", expr)
    ]
    assert groups, expr
    return set.intersection(*groups)


def test_inhibitions_name_real_alerts_and_labels_both_sides_keep() -> None:
    """Inhibition needs the `equal` labels on source and target alike, or it never matches."""
    rules = {r["alert"]: r for r in load_rules() if "alert" in r}
    inhibit = yaml.safe_load(INHIBIT_FILE.read_text(encoding="utf-8"))["inhibit_rules"]
    assert inhibit
    inhibited: set[str] = set()
    for rule in inhibit:
        sides = []
        for key in ("source_matchers", "target_matchers"):
            [matcher] = rule[key]
            parsed = re.fullmatch(r"(\w+) (=~|=) \"?([^\"]+)\"?", matcher)
            assert parsed, matcher
            name, operator, value = parsed.groups()
            assert name == "alertname"
            names = [n for n in rules if re.fullmatch(value, n)] if operator == "=~" else [value]
            assert names
            assert set(names) <= set(rules), names
            sides.append(names)
        for alert in sides[0] + sides[1]:
            kept = _aggregation_labels(str(rules[alert]["expr"]))
            assert set(rule["equal"]) <= kept, f"{alert} drops {set(rule['equal']) - kept}"
        # A cause is never its own symptom, and a cause pages at least as loud.
        assert not set(sides[0]) & set(sides[1])
        inhibited |= set(sides[1])
    # The issue that asked for this: no progress is inhibited by a stall and by an API outage.
    assert "CmsyncNoProgress" in inhibited
    assert rules["CmsyncNoProgress"]["labels"]["severity"] == "warning"


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
        "cmsync_memory_limit_bytes",
        "cmsync_max_pending",
        "cmsync_flush_interval_seconds",
    ):
        assert needed in used


def test_dashboard_filters_by_namespace_and_pod_and_shows_the_lifecycle() -> None:
    dashboard = json.loads(DASHBOARD_FILE.read_text(encoding="utf-8"))
    variables = [v["name"] for v in dashboard["templating"]["list"]]
    assert variables[:3] == ["datasource", "namespace", "pod"]
    titles = {p["title"]: p for p in dashboard["panels"]}
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            if "label_values" in target["expr"] or "namespace" not in target["expr"]:
                continue
            # Every selector that picks a namespace picks the pod too.
            for _, matchers in re.findall(r"\b(\w+)\{([^}]*)\}", target["expr"]):
                if "$namespace" in matchers:
                    assert 'pod=~"$pod"' in matchers, (panel["title"], target["expr"])
    exprs = {
        title: " ".join(t["expr"] for t in panel.get("targets", []))
        for title, panel in titles.items()
    }
    assert "cmsync_assigned_partitions" in exprs["Partitions assigned per pod"]
    assert "changes(" in exprs["Rebalances (assignment changes, last hour)"]
    assert "process_start_time_seconds" in exprs["Restarts (last hour)"]
    memory = exprs["Memory per pod against its limit"]
    assert "process_resident_memory_bytes" in memory
    assert "cmsync_memory_limit_bytes" in memory


def stat_thresholds(panel: dict[str, Any]) -> list[float]:
    steps = panel["fieldConfig"]["defaults"].get("thresholds", {}).get("steps", [])
    return [step["value"] for step in steps if step["value"] is not None]


def test_dashboard_thresholds_come_from_the_settings_not_constants() -> None:
    """A coloured threshold is either a ratio to a bound the service exports from its settings
    (1 = at the bound) or a count of events (≥ 1 dead letter, ≥ 1 stalled destination)."""
    dashboard = json.loads(DASHBOARD_FILE.read_text(encoding="utf-8"))
    for panel in dashboard["panels"]:
        values = stat_thresholds(panel) if "fieldConfig" in panel else []
        if not values:
            continue
        expr = " ".join(t["expr"] for t in panel["targets"])
        if values == [1]:
            settings = ("cmsync_flush_interval_seconds", "cmsync_max_pending", "_limit_bytes")
            counted = ("count(", "increase(", "cmsync_destination_up")
            assert any(m in expr for m in settings + counted), panel["title"]
        else:
            pytest.fail(f"{panel['title']}: hard-coded thresholds {values}")


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("536870912\n", 536870912.0),  # cgroup v2, 512Mi
        ("max\n", None),  # cgroup v2, unlimited
        ("9223372036854771712\n", None),  # cgroup v1, unlimited
    ],
)
def test_memory_limit_is_read_from_the_cgroup(
    tmp_path: Path, content: str, expected: float | None
) -> None:
    limit = tmp_path / "memory.max"
    limit.write_text(content, encoding="ascii")
    value = obs.cgroup_memory_limit([str(tmp_path / "missing"), str(limit)])
    if expected is None:
        assert value != value  # NaN: no limit
    else:
        assert value == expected
    assert obs.cgroup_memory_limit([str(tmp_path / "missing")]) != obs.cgroup_memory_limit(
        [str(tmp_path / "missing")]
    )  # nothing readable: NaN


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
    replacements = {
        "$__rate_interval": "5m",
        "$namespace": ".*",
        "$pod": ".*",
        "$destination": ".*",
    }
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
    assert 'cmsync_dead_letters_total{destination="ops-dest",reason="cm_rejected"} 0.0' in body
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


# =============================================================================================
# Commands in the docs (docs/development.md, "Commands in the docs", says what is covered)

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE_RE = re.compile(r"^([ \t]*)```(\w*)[^\n]*\n(.*?)^\1```", re.MULTILINE | re.DOTALL)
DEFAULT_RUNBOOK_BASE = "https://github.com/your-org/cmsync/blob/main/docs/operations.md"


def fenced_blocks(path: Path, language: str) -> list[str]:
    text = path.read_text(encoding="utf-8")
    return [
        "\n".join(line[len(indent) :] for line in body.splitlines())
        for indent, lang, body in FENCE_RE.findall(text)
        if lang == language
    ]


def documented_commands() -> list[tuple[str, str]]:
    """(page, command) of every command in a fenced `sh` block of the docs."""
    commands = []
    for path in DOCS:
        for block in fenced_blocks(path, "sh"):
            for line in block.replace("\\\n", " ").splitlines():
                line = line.split(" #", 1)[0].strip()
                for command in line.split("&&") if line else []:
                    commands.append((path.name, command.strip()))
    return commands


@cache
def cmsync_help(*command: str) -> str:
    result = run_tool(sys.executable, "-m", "consumer", *command, "--help")
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def cmsync_commands() -> set[str]:
    section = cmsync_help().split("commands:", 1)[1]
    return set(re.findall(r"^  ([a-z-]+)\s", section, re.MULTILINE))


def makefile_targets() -> set[str]:
    text = (ROOT / "Makefile").read_text(encoding="utf-8")
    return set(re.findall(r"^([a-z][\w-]*):", text, re.MULTILINE))


def check_cmsync(words: list[str]) -> None:
    sub = words[1]
    assert sub in cmsync_commands(), f"no command `cmsync {sub}`"
    usage = cmsync_help(sub)
    for word in words[2:]:
        if word.startswith("-"):
            flag = word.split("=", 1)[0]
            assert re.search(rf"(^|\s|\[){re.escape(flag)}\b", usage), f"`cmsync {sub} {flag}`"


def check_kubectl(words: list[str], tmp_path: Path) -> None:
    args = [w for w in words[1:]]
    if args[:1] == ["-n"]:
        args = args[2:]
    verb = args[0]
    if verb == "kustomize" or (verb in ("apply", "diff") and args[1] == "-k"):
        target = args[-1]
        assert (ROOT / target / "kustomization.yaml").is_file(), target
        _render(target)
        return
    example = list(_render("k8s/overlays/example"))
    if verb == "create" and args[1:3] == ["secret", "generic"]:
        assert args[3] == CREDENTIALS_SECRET
        keys = {a.split("=", 2)[1] for a in args if a.startswith("--from-literal=")}
        referenced = {v["valueFrom"]["secretKeyRef"]["key"] for v in container(example)["env"]}
        assert keys == referenced, (
            f"the documented Secret has {keys}, the Deployment reads {referenced}"
        )
        return
    if verb == "create" and args[1] == "job":  # a Job from the reconcile CronJob, now
        [source] = [a.removeprefix("--from=") for a in args if a.startswith("--from=")]
        kind, name = source.split("/")
        assert kind == "cronjob"
        by_name(example, "CronJob", name)
        assert args[-1].startswith(name), "the documented Job is named after its CronJob"
        return
    pod_labels = the(example, "Deployment")["spec"]["template"]["metadata"]["labels"]
    for selector in [args[i + 1] for i, a in enumerate(args) if a == "-l"]:
        key, value = selector.split("=")
        assert pod_labels.get(key) == value, selector
    for ref in [a for a in args if "/" in a]:
        kind, name = ref.split("/")
        if kind == "job":  # the one documented above (`create job`)
            assert name.startswith(
                by_name(example, "CronJob", "cmsync-reconcile")["metadata"]["name"]
            )
            continue
        assert kind == "deployment"
        assert the(example, "Deployment")["metadata"]["name"] == name
    assert verb in ("get", "describe", "logs", "rollout"), f"unchecked kubectl {verb}"


def check_command(page: str, command: str, tmp_path: Path) -> None:
    words = shlex.split(command)
    while words and re.fullmatch(r"[A-Z_]+=.*", words[0]):
        words = words[1:]  # VAR=value prefixes
    program = words[0]
    if program == "make":
        assert set(words[1:]) <= makefile_targets(), command
    elif program == "cmsync":
        check_cmsync(words)
    elif program == "export":
        for assignment in words[1:]:
            name = assignment.split("=", 1)[0]
            known = name in CONTRACT_VARIABLES or name.removesuffix("_FILE") in SECRET_VARIABLES
            assert known, f"unknown setting {name}"
    elif program in (".", "source"):
        assert words[1] == ".venv/bin/activate", command  # what `make venv` creates
    elif program == "kubectl":
        check_kubectl(words, tmp_path)
    elif program == "docker":
        args = dict(itertools.pairwise(words))
        if words[1] == "build":
            declared = {
                rest.split("=", 1)[0] for word, rest in dockerfile_instructions() if word == "ARG"
            }
            build_args = [words[i + 1] for i, w in enumerate(words) if w == "--build-arg"]
            assert {a.split("=", 1)[0] for a in build_args} <= declared, command
            assert "-t" in args
        else:
            assert words[1] == "run", command
            rest, valued = words[2:], {"--env-file", "-v", "-e", "-p", "--name"}
            while rest[0].startswith("-"):
                rest = rest[2:] if rest[0] in valued else rest[1:]
            assert rest[1] in cmsync_commands(), f"`{rest[1]}` is not a cmsync command"
    elif program == "promtool":
        result = run_tool(tool("promtool"), *words[1:])
        assert result.returncode == 0, result.stdout + result.stderr
    elif program == "sed":
        result = run_tool("sed", *words[1:-2])  # without the redirection
        assert result.returncode == 0, result.stderr
        assert words[-2] == ">"
        assert DEFAULT_RUNBOOK_BASE in (ROOT / words[-3]).read_text(encoding="utf-8")
        assert DEFAULT_RUNBOOK_BASE not in result.stdout
        assert "runbook_url" in result.stdout
    elif program == "kcat":
        args = dict(itertools.pairwise(words))
        assert "-P" in words
        assert args["-t"] == DEFAULTS["CMSYNC_KAFKA_TOPIC"]
        assert words[-1].endswith(".json")
        assert fenced_blocks(ROOT / page if page == "README.md" else ROOT / "docs" / page, "json")
    elif program == "git":
        assert words[1:] == ["rev-parse", "HEAD"], command
    else:
        pytest.fail(f"{page}: no check for `{command}` (add one to check_command)")


def test_documented_commands(tmp_path: Path) -> None:
    commands = documented_commands()
    assert len(commands) >= 10, commands
    for page, command in commands:
        # $(...) and "$VAR" are shell expansions a reader's shell does; check the words around.
        command = re.sub(r'"\$\([^)]*\)"|"\$\w+"', "VALUE", command)
        check_command(page, command, tmp_path)


def test_documented_events_are_valid(tmp_path: Path) -> None:
    from consumer.events import decode  # the service's decoder

    blocks = [b for path in DOCS for b in fenced_blocks(path, "json")]
    assert blocks
    for block in blocks:
        result = decode(block.encode())
        assert type(result).__name__ == "MembershipChange", (result, block)


def test_documented_destinations_files_load(tmp_path: Path) -> None:
    blocks = [b for path in DOCS for b in fenced_blocks(path, "toml")]
    assert len(blocks) >= 2
    for i, block in enumerate(blocks):
        file = tmp_path / f"destinations-{i}.toml"
        file.write_text(block, encoding="utf-8")
        env = {
            "CMSYNC_KAFKA_BOOTSTRAP_SERVERS": "localhost:9092",
            "CMSYNC_CM_API_KEY": "fake-key",
            "CMSYNC_DESTINATIONS_FILE": str(file),
        }
        try:
            assert load_settings(env).destinations
        except ConfigError as error:
            pytest.fail(f"documented destinations file rejected: {error.problems}\n{block}")


def test_inline_commands_in_prose_exist() -> None:
    for path in DOCS:
        text = FENCE_RE.sub("", path.read_text(encoding="utf-8"))
        for command in re.findall(r"`((?:cmsync|make) [a-z][^`]*)`", text):
            words = command.split()
            if words[0] == "make":
                assert words[1] in makefile_targets(), f"{path.name}: `{command}`"
            else:
                assert words[1] in cmsync_commands(), f"{path.name}: `{command}`"


def test_every_setting_is_documented() -> None:
    text = (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")
    missing = {name for name in CONTRACT_VARIABLES if f"`{name}`" not in text}
    assert not missing, f"docs/configuration.md does not document {sorted(missing)}"


def test_readme_is_a_front_page() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    first = fenced_blocks(ROOT / "README.md", "sh")[0].splitlines()
    assert [line.split()[:2] for line in first] == [["make", "demo"], ["make", "test"]]
    assert readme.index("```sh") < readme.index("\n## ")  # the two commands come first
    for page in ("configuration", "operations", "upgrade", "troubleshooting", "architecture"):
        assert f"(docs/{page}.md)" in readme, page
    assert "(docs/performance.md)" in readme
    assert len(readme.splitlines()) < 150


def test_links_between_the_docs_resolve() -> None:
    """Every relative link of README.md and docs/ names an existing file and heading."""
    link_re = re.compile(r"\]\(([^)\s]+)\)")
    for path in DOCS:
        text = FENCE_RE.sub("", path.read_text(encoding="utf-8"))
        for target in link_re.findall(text):
            if re.match(r"[a-z]+:", target):
                continue  # absolute URL
            file, _, anchor = target.partition("#")
            linked = (path.parent / file).resolve() if file else path
            assert linked.exists(), f"{path.name}: broken link {target}"
            if anchor:
                headings = re.findall(r"^#+\s+(.+)$", linked.read_text(encoding="utf-8"), re.M)
                anchors = {_anchor(h) for h in headings}
                assert anchor in anchors, f"{path.name}: no heading for {target}"
