"""Monitoring proven live: a real Prometheus scrapes a running `cmsync run`, then every
dashboard query and every alert expression is evaluated through Prometheus's HTTP API.

The sync under test (the rig: real broker, simulator over HTTP, `cmsync run` as a child
process) has a healthy destination, a destination whose ListID Campaign Monitor does not know
(it stalls), and records that are dead-lettered (not JSON; no email address). Prometheus
(Debian's `prometheus` package, which `.ci/run` installs; skipped when missing unless
CMSYNC_REQUIRE_TOOLS=1) scrapes it every second with the target labels a Kubernetes scrape
would add (`namespace`, `pod`) and evaluates `alerts/cmsync.rules.yml` every second.

What is proven: every panel of `dashboards/cmsync.json` returns series for the live service
(names alone are not enough: a wrong label, a join that matches nothing or a metric that is
never exported yields an empty panel here), the dashboard's variables list the live namespace
and pod, every alert expression is accepted, and the two alerts this situation must raise —
CmsyncDestinationStalled and CmsyncDeadLetters — go pending with the right labels, while
CmsyncMetricsAbsent stays quiet.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from consumer.devtools.embedded_broker import free_port
from consumer.devtools.rig import Dest, ServiceProcess, SyncRig
from consumer.devtools.simulator import FaultConfig, SimulatorConfig
from consumer.devtools.synthetic import event_bytes

ROOT = Path(__file__).resolve().parent.parent
REQUIRE_TOOLS = os.environ.get("CMSYNC_REQUIRE_TOOLS") == "1"
RULES_FILE = ROOT / "alerts" / "cmsync.rules.yml"
DASHBOARD_FILE = ROOT / "dashboards" / "cmsync.json"
API_KEY = "live-prometheus-key"
NAMESPACE, POD = "live", "cmsync-live-0"
T0 = 1_764_417_600_000
#: What the dashboard's variables and Grafana's interval stand for in this test.
VARIABLES = {
    "$__rate_interval": "15s",
    "$namespace": NAMESPACE,
    "$pod": ".*",
    "$destination": ".*",
}


def prometheus_binary() -> str:
    path = shutil.which("prometheus")
    if path is None:
        if REQUIRE_TOOLS:
            pytest.fail("prometheus is required (CMSYNC_REQUIRE_TOOLS=1) but not installed")
        pytest.skip("prometheus not installed (CMSYNC_REQUIRE_TOOLS=1 makes this a failure)")
    return path


class Prometheus:
    """A Prometheus server of this test: its HTTP API on a free loopback port."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))

    async def api(self, path: str, **params: str) -> Any:
        async with self.session.get(f"{self.url}/api/v1/{path}", params=params) as response:
            body = await response.json()
        assert body["status"] == "success", (path, params, body)
        return body["data"]

    async def query(self, expr: str) -> list[dict[str, Any]]:
        data = await self.api("query", query=expr)
        assert data["resultType"] in ("vector", "scalar"), (expr, data)
        return list(data["result"]) if data["resultType"] == "vector" else [data["result"]]

    async def ready(self) -> bool:
        try:
            async with self.session.get(f"{self.url}/-/ready") as response:
                return response.status == 200
        except aiohttp.ClientError:
            return False


@contextlib.asynccontextmanager
async def prometheus_scraping(target: ServiceProcess, workdir: Path) -> AsyncIterator[Prometheus]:
    """Prometheus scraping `target` every second and evaluating the alert rules every second
    (their `for:` durations kept, so alerts go pending, not firing)."""
    binary = prometheus_binary()
    rules = yaml.safe_load(RULES_FILE.read_text(encoding="utf-8"))
    for group in rules["groups"]:
        group["interval"] = "1s"
    (workdir / "rules.yml").write_text(yaml.safe_dump(rules), encoding="utf-8")
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(workdir / "rules.yml")],
        "scrape_configs": [
            {
                # Deliberately not "cmsync": nothing may depend on the job's name.
                "job_name": "live-test",
                "scrape_timeout": "1s",
                "static_configs": [
                    {
                        "targets": [f"127.0.0.1:{target.port}"],
                        "labels": {"namespace": NAMESPACE, "pod": POD},
                    }
                ],
            }
        ],
    }
    (workdir / "prometheus.yml").write_text(yaml.safe_dump(config), encoding="utf-8")
    port = free_port()
    log = (workdir / "prometheus.log").open("wb")
    process = await asyncio.create_subprocess_exec(
        binary,
        f"--config.file={workdir / 'prometheus.yml'}",
        f"--storage.tsdb.path={workdir / 'tsdb'}",
        f"--web.listen-address=127.0.0.1:{port}",
        "--log.level=warn",
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    prometheus = Prometheus(f"http://127.0.0.1:{port}")
    try:
        for _ in range(300):  # up to 30 s
            if process.returncode is not None:
                raise RuntimeError((workdir / "prometheus.log").read_text(errors="replace"))
            if await prometheus.ready():
                break
            await asyncio.sleep(0.1)
        else:
            raise TimeoutError("prometheus did not become ready")
        yield prometheus
    finally:
        await prometheus.session.close()
        process.terminate()
        try:
            await asyncio.wait_for(process.wait(), 10)
        except TimeoutError:
            process.kill()
            await process.wait()
        log.close()


def dashboard() -> dict[str, Any]:
    return dict(json.loads(DASHBOARD_FILE.read_text(encoding="utf-8")))


def substituted(expr: str) -> str:
    for variable, value in VARIABLES.items():
        expr = expr.replace(variable, value)
    assert "$" not in expr, expr
    return expr


def event(email: str | None, segment: str, at_ms: int) -> tuple[bytes, bytes]:
    profile: dict[str, object] = {"id": f"p-{at_ms}", "full_name": "Live Test", "city": "Oslo"}
    if email is not None:
        profile["email"] = email
    value = event_bytes(
        event_id=f"live-{segment}-{at_ms}",
        segment_id=segment,
        entered=True,
        occurred_at_ms=at_ms,
        profile=profile,
    )
    return f"p-{at_ms}".encode(), value


@pytest.mark.slow(15)
async def test_dashboard_and_alerts_hold_against_a_live_prometheus(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    prometheus_binary()  # skip (or fail in CI) before starting anything
    dests = [
        Dest("good", "seg-good"),
        # A ListID Campaign Monitor does not know (code 101): the destination stalls.
        Dest("stalled", "seg-stalled", list_id="0123456789abcdef0123456789abcdef"),
    ]
    settings = {
        "CMSYNC_FLUSH_INTERVAL_S": "0.5",
        "CMSYNC_RATE_LIMIT_RPS": "200",
        "CMSYNC_SHUTDOWN_BUDGET_S": "5",
        "CMSYNC_LOG_FORMAT": "json",
    }
    # The first two API requests answer 503: retried, they show on the retry and error panels.
    sim = SimulatorConfig(api_keys=(API_KEY,), faults=FaultConfig(script=[503]))
    async with SyncRig(
        kafka_bootstrap,
        tmp_path,
        dests,
        api_key=API_KEY,
        partitions=2,
        sim_config=sim,
        env=settings,
    ) as rig:
        proc = rig.spawn("live")
        async with prometheus_scraping(proc, tmp_path) as prom:
            await proc.wait_joined(60)
            records = [event(f"good{i}@example.com", "seg-good", T0 + i) for i in range(20)]
            records += [event(f"stuck{i}@example.com", "seg-stalled", T0 + i) for i in range(5)]
            records += [event(None, "seg-good", T0 + 100 + i) for i in range(3)]  # no email
            records += [(b"bad", b"{not json") for _ in range(3)]
            await rig.produce_pairs(records)

            # What Prometheus must have seen before the panels and alerts are judged.
            where = f'namespace="{NAMESPACE}"'
            seen = {
                "stalled": f'cmsync_destination_up{{{where},destination="stalled"}} == 0',
                "dead letters": f"sum(cmsync_dead_letters_total{{{where}}}) >= 6",
                "applied": f"sum(cmsync_changes_applied_total{{{where}}}) >= 20",
            }
            missing: list[str] = []

            async def situation_visible() -> bool:
                missing[:] = [name for name, expr in seen.items() if not await prom.query(expr)]
                return not missing

            try:
                await rig.wait_for(situation_visible, 45, "Prometheus saw the sync", [proc])
            except TimeoutError as error:
                log = (tmp_path / "prometheus.log").read_text(errors="replace")[-2000:]
                raise AssertionError(f"Prometheus never saw: {missing}\n{log}") from error

            # Every panel returns series for the live service (polled: a subquery or a rate
            # needs a few samples of a young series).
            empty: list[str] = []

            async def every_panel_has_data() -> bool:
                empty.clear()
                for panel in dashboard()["panels"]:
                    if panel["type"] == "row":
                        continue
                    results = [await prom.query(substituted(t["expr"])) for t in panel["targets"]]
                    if not any(results):
                        empty.append(panel["title"])
                return not empty

            with contextlib.suppress(TimeoutError):
                await rig.wait_for(every_panel_has_data, 20, "every panel has data", [proc])
            assert not empty, f"panels without data: {empty}"

            # The variables list the live namespace and pod.
            values = {
                name: await prom.api(f"label/{name}/values", **{"match[]": "cmsync_build_info"})
                for name in ("namespace", "pod")
            }
            assert values == {"namespace": [NAMESPACE], "pod": [POD]}

            # Every alert expression is valid PromQL for this server.
            rules = [
                r for g in yaml.safe_load(RULES_FILE.read_text())["groups"] for r in g["rules"]
            ]
            for rule in rules:
                await prom.query(str(rule["expr"]))

            # The expected alerts go pending (their `for:` is minutes), with their labels.
            async def alerts() -> dict[str, list[dict[str, Any]]]:
                found: dict[str, list[dict[str, Any]]] = {}
                for alert in (await prom.api("alerts"))["alerts"]:
                    found.setdefault(alert["labels"]["alertname"], []).append(alert)
                return found

            async def expected_pending() -> bool:
                found = await alerts()
                return {"CmsyncDestinationStalled", "CmsyncDeadLetters"} <= set(found)

            # A rate needs an increase Prometheus saw: under the parallel suite its first scrape
            # could come after the first dead letters, and the counter never moved again. More
            # bad records now, seen as an increase.
            await rig.produce_pairs([(b"bad", b"{not json") for _ in range(3)])
            await rig.wait_for(expected_pending, 45, "the expected alerts pending", [proc])
            found = await alerts()
            [stalled] = found["CmsyncDestinationStalled"]
            assert stalled["state"] == "pending"
            assert stalled["labels"]["namespace"] == NAMESPACE
            assert stalled["labels"]["destination"] == "stalled"
            assert stalled["labels"]["severity"] == "critical"
            dead = {
                (a["labels"]["reason"], a["labels"].get("destination", "")): a["state"]
                for a in found["CmsyncDeadLetters"]
            }
            assert dead == {("invalid_json", ""): "pending", ("missing_email", "good"): "pending"}
            assert "CmsyncMetricsAbsent" not in found
            proc.terminate()
            assert await proc.wait(30) == 0, proc.tail()
