"""`cmsync run` as a real process: no personal data or secret in its logs or /metrics, and its
live /metrics scrape passes `promtool check metrics`.

The stream goes through every path that logs: adds, removals, invalid records (dead letters),
a row Campaign Monitor rejects, transient 5xx retries, a destination stalled on a bad key.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import orjson
import pytest

from consumer.devtools.embedded_broker import free_port
from tests.harness import API_KEY, Dest, SyncHarness, event

T0 = 1_764_417_600_000
BAD_KEY = "bad-key-5f1c9e0d7a"
PEOPLE = [(f"person{i}.secret@privacy-test.example", f"Zebedee Quux{i}") for i in range(20)]


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:  # noqa: S310 - loopback URL we built
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


async def _wait_for(predicate: object, what: str, within_s: float = 60.0) -> None:
    assert callable(predicate)
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        if predicate():
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


async def test_no_personal_data_or_secret_in_logs_or_metrics(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    dests = [
        Dest("news", "seg-a", custom_fields={"City": "city", "Bio": "bio"}),
        Dest("stalled", "seg-b", api_key_env="CMSYNC_OTHER_KEY"),
    ]
    async with SyncHarness(kafka_bootstrap, tmp_path, dests, partitions=2) as h:
        port = free_port()
        env = {
            **os.environ,
            **h.env(),
            "CMSYNC_HTTP_PORT": str(port),
            "CMSYNC_OTHER_KEY": BAD_KEY,
            "CMSYNC_LOG_LEVEL": "debug",  # the most that could leak: aiokafka/aiohttp debug too
            "CMSYNC_LOG_FORMAT": "json",
        }
        log_path = tmp_path / "service.log"
        with log_path.open("wb") as log_file:
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "consumer",
                "run",
                env=env,
                stdout=log_file,
                stderr=subprocess.STDOUT,
            )
            try:
                records = []
                for i, (email, name) in enumerate(PEOPLE):
                    records.append(event(email, name=name, city="Atlantis", at_ms=T0 + i))
                records.append(event(PEOPLE[0][0], "exited", name=PEOPLE[0][1], at_ms=T0 + 100))
                records.append(  # rejected by Campaign Monitor (over 250 characters)
                    event(PEOPLE[1][0], name=PEOPLE[1][1], extra={"bio": "y" * 300}, at_ms=T0 + 101)
                )
                records.append(event(PEOPLE[2][0], segment="seg-b", name=PEOPLE[2][1]))  # stalls
                records.append(
                    (
                        b"k",
                        b'{"event_id": "x", "profile": {"email": "'
                        + PEOPLE[3][0].encode()
                        + b'"}}',
                    )
                )
                records.append(event("not-an-address " + PEOPLE[4][1], name=PEOPLE[4][1]))
                h.sim.update_faults({"script": [503, 500]})  # retries
                await h.produce(records)

                expected = {email for email, _ in PEOPLE[2:]}
                await _wait_for(
                    lambda: expected <= h.active("news") and PEOPLE[0][0] not in h.active("news"),
                    f"the changes to be applied (active now: {len(h.active('news'))})",
                )
                await _wait_for(
                    lambda: (
                        'cmsync_destination_up{destination="stalled"} 0.0'
                        in _get(f"http://127.0.0.1:{port}/metrics")[1]
                    ),
                    "the stalled destination reported",
                )
                assert _get(f"http://127.0.0.1:{port}/readyz")[0] == 200  # not a readiness matter
                status, metrics = _get(f"http://127.0.0.1:{port}/metrics")
                assert status == 200
                assert "cmsync_dead_letters_total" in metrics
            finally:
                proc.send_signal(signal.SIGTERM)
                try:
                    returncode = await asyncio.wait_for(proc.wait(), 30)
                except TimeoutError:
                    proc.kill()
                    raise
        assert returncode == 0
        logs = log_path.read_text()

    lines = [line for line in logs.splitlines() if line.strip()]
    assert len(lines) > 10
    for line in lines:  # every line is one JSON object
        assert isinstance(orjson.loads(line), dict)
    events = {orjson.loads(line).get("event") for line in lines}
    assert {"flush", "destination_stalled", "stopped"} <= events
    assert any(str(orjson.loads(line).get("logger")).startswith("aiokafka") for line in lines)

    secrets = [API_KEY, BAD_KEY]
    for email, name in PEOPLE:
        secrets += [email, email.split("@")[0], name]
    for haystack, where in ((logs, "logs"), (metrics, "/metrics")):
        leaked = [s for s in secrets if s.lower() in haystack.lower()]
        assert not leaked, f"{len(leaked)} personal values or secrets appear in {where}"
    assert "privacy-test.example" not in logs


@pytest.mark.skipif(
    shutil.which("promtool") is None and not os.environ.get("CMSYNC_REQUIRE_TOOLS"),
    reason="promtool not installed (Debian package prometheus; .ci/run installs it)",
)
async def test_live_metrics_of_the_running_service_pass_promtool(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    async with SyncHarness(kafka_bootstrap, tmp_path, [Dest("news", "seg-a")]) as h:
        service = await h.start()
        try:
            await h.produce([event(f"u{i}@example.com", at_ms=T0 + i) for i in range(30)])
            await h.produce([event("bad", at_ms=T0)])
            await h.wait_synced()
            port = service.health.port
            status, metrics = await asyncio.to_thread(_get, f"http://127.0.0.1:{port}/metrics")
        finally:
            await h.stop()
    assert status == 200
    for name in (
        "cmsync_events_consumed_total",
        "cmsync_changes_applied_total",
        "cmsync_freshness_seconds_bucket",
        "cmsync_committed_offset",
    ):
        assert name in metrics
    promtool = shutil.which("promtool")
    assert promtool is not None
    check = await asyncio.create_subprocess_exec(
        promtool,
        "check",
        "metrics",
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    out, _ = await check.communicate(metrics.encode())
    assert check.returncode == 0, out.decode()
    assert out.strip() == b"", out.decode()  # no lint findings either
