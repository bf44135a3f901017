"""Scenario 8 — misconfiguration: a bad API key, a wrong ListID, an unreachable broker, an
unreadable or invalid destinations file.

- A destination whose key or list Campaign Monitor refuses stalls — alone: its list gets
  nothing, `cmsync_destination_up` is 0 for it (1 for the healthy one, which keeps syncing),
  /readyz and /healthz stay 200 (drains and rollouts go on; a restart would not help), and the
  offsets move on (the membership state owes its changes); SIGTERM still exits 0 within the
  budget.
- `cmsync run` against a broker nobody answers on exits non-zero with a message naming the
  broker setting, in seconds (chaos: also against a port that accepts connections and never
  answers, which takes aiokafka's request timeout, 40 s).
- A destinations file that is missing, a directory, not TOML, or TOML describing no valid
  destination: exit 2 and a message naming CMSYNC_DESTINATIONS_FILE (or, for a file that was
  read, what is wrong in it), before anything starts.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from consumer.devtools.embedded_broker import free_port
from tests.faults.support import (
    API_KEY,
    CHAOS,
    REPO,
    Dest,
    FaultRig,
    ServiceProcess,
    change,
    note,
)

T0 = 1_764_417_600_000


@pytest.mark.slow(12)
async def test_bad_key_and_wrong_list_stall_only_their_destinations(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    dests = [
        Dest("good", "seg-a"),
        Dest("badkey", "seg-b", api_key_env="CMSYNC_BAD_KEY"),
        Dest("badlist", "seg-c", list_id="0123456789abcdef0123456789abcdef"),
    ]
    env = {"CMSYNC_BAD_KEY": "not-a-key-of-this-account", "CMSYNC_SHUTDOWN_BUDGET_S": "6"}
    async with FaultRig(kafka_bootstrap, tmp_path, dests=dests, partitions=1, env=env) as rig:
        proc = rig.spawn("svc")
        await rig.wait_assigned(proc)
        records = [
            change("a1@example.com", at_ms=T0),
            change("b1@example.com", segment="seg-b", at_ms=T0),  # offset 1: the first stall
            change("a2@example.com", at_ms=T0 + 1),
            change("c1@example.com", segment="seg-c", at_ms=T0),
            change("a3@example.com", at_ms=T0 + 2),
        ]
        await rig.produce(records)

        def good_synced() -> bool:
            active = {a for a, m in rig.members("good").items() if m["State"] == "Active"}
            return active == {"a1@example.com", "a2@example.com", "a3@example.com"}

        await rig.wait_for(good_synced, 30, "the healthy destination synced", [proc])

        async def both_stalled() -> bool:
            metrics = await proc.metrics()
            return (
                metrics.value("cmsync_destination_up", destination="badkey") == 0
                and metrics.value("cmsync_destination_up", destination="badlist") == 0
                and metrics.has("cmsync_destination_up", destination="badlist")
            )

        await rig.wait_for(both_stalled, 30, "both bad destinations stalled", [proc])
        metrics = await proc.metrics()
        assert metrics.value("cmsync_destination_up", destination="good") == 1
        ready_status, ready_body = await proc.get("/readyz")
        live_status, _ = await proc.get("/healthz")
        reason = orjson.loads(ready_body)["reason"]
        assert (ready_status, reason) == (200, "joined")  # a metric and an alert, not readiness
        assert live_status == 200
        await asyncio.sleep(2.5)  # several commit ticks
        # Past the stalled changes: the membership state owes them to their lists.
        assert await rig.committed() == {0: len(records)}
        stalled_logs = proc.events("destination_stalled")
        assert {line["destination"] for line in stalled_logs} == {"badkey", "badlist"}

        started = time.monotonic()
        proc.terminate()
        code = await proc.wait(30)
        took = time.monotonic() - started
        assert code == 0, proc.tail()
        assert took <= 6, f"exit took {took:.1f} s, budget 6 s"
        assert await rig.committed() == {0: len(records)}
        assert "not-a-key-of-this-account" not in proc.log_path.read_text()
        assert API_KEY not in proc.log_path.read_text()
        note(
            f"misconfiguration: bad key and wrong ListID stalled (destination_up 0, /readyz "
            f"200: {reason!r}); offsets committed to 5 of 5 (the state owes the stalled "
            f"changes); SIGTERM exit 0 in {took:.1f} s"
        )


def run_cli(env: dict[str, str], timeout_s: float) -> tuple[int, str, float]:
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "consumer", "run"],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )
    return done.returncode, done.stdout + done.stderr, time.monotonic() - started


def base_env(tmp_path: Path, bootstrap: str) -> dict[str, str]:
    dest_file = tmp_path / "destinations.toml"
    dest_file.write_text(Dest("news", "seg-a").toml("0123456789abcdef0123456789abcdef"))
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith("CMSYNC_")}
    env.update(
        {
            "CMSYNC_KAFKA_BOOTSTRAP_SERVERS": bootstrap,
            "CMSYNC_CM_API_KEY": API_KEY,
            "CMSYNC_CM_BASE_URL": "http://127.0.0.1:9/api/v3.3",
            "CMSYNC_DESTINATIONS_FILE": str(dest_file),
            "CMSYNC_HTTP_PORT": "0",
        }
    )
    return env


@contextlib.contextmanager
def silent_listener() -> Iterator[int]:
    """A port that accepts TCP connections and never answers (a hung broker)."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(16)
        yield server.getsockname()[1]


@pytest.mark.parametrize("kind", ["refused", *(["silent"] if CHAOS else [])])
async def test_unreachable_broker_exits_non_zero_with_a_clear_message(
    tmp_path: Path, kind: str
) -> None:
    with contextlib.ExitStack() as stack:
        # "refused": nobody listens on a free port
        port = stack.enter_context(silent_listener()) if kind == "silent" else free_port()
        env = base_env(tmp_path, f"127.0.0.1:{port}")
        code, output, took = await asyncio.to_thread(run_cli, env, 120)
    note(f"unreachable broker ({kind}): exit {code} after {took:.1f} s")
    assert code == 1, output
    assert "CMSYNC_KAFKA_BOOTSTRAP_SERVERS" in output, output
    assert f"127.0.0.1:{port}" in output, output
    assert took < (60 if kind == "silent" else 20)


@pytest.mark.parametrize("kind", ["missing", "directory", "not-toml", "no-destination"])
async def test_bad_destinations_file_exits_2_naming_it(tmp_path: Path, kind: str) -> None:
    env = base_env(tmp_path, "127.0.0.1:9")
    path = tmp_path / "bad.toml"
    if kind == "directory":
        path.mkdir()
    elif kind == "not-toml":
        path.write_text("[[destination]\nname = ")
    elif kind == "no-destination":
        path.write_text('[[destination]]\nname = "news"\n')  # no segment, list or email field
    env["CMSYNC_DESTINATIONS_FILE"] = str(path)
    code, output, took = await asyncio.to_thread(run_cli, env, 60)
    assert code == 2, output
    if kind == "no-destination":  # the file was read: the message names what it lacks
        assert 'destination #1 "news": required key "email_field" is missing' in output
    else:
        assert "CMSYNC_DESTINATIONS_FILE" in output, output
    assert "Traceback" not in output
    assert took < 20


async def test_sigterm_while_the_broker_never_answers_exits_within_the_budget(
    tmp_path: Path,
) -> None:
    """SIGTERM while the service still waits for a broker that accepts connections and never
    answers: it stops starting at once (nothing was read, nothing is owed) and exits 0 within
    CMSYNC_SHUTDOWN_BUDGET_S, not after the Kafka client's request timeout (40 s)."""
    budget = 5.0
    with silent_listener() as port:
        env = base_env(tmp_path, f"127.0.0.1:{port}") | {
            "CMSYNC_SHUTDOWN_BUDGET_S": str(budget),
            "CMSYNC_LOG_FORMAT": "json",
        }
        proc = ServiceProcess(env, tmp_path / "svc.log", name="svc", cwd=REPO)
        await asyncio.sleep(3)  # started, waiting for the broker
        sent_at = time.monotonic()
        proc.terminate()
        code = await proc.wait(budget + 30)
        took = time.monotonic() - sent_at
    note(f"SIGTERM against a silent broker: exit {code} after {took:.1f} s")
    assert code == 0, proc.tail()
    assert took <= budget, f"exit took {took:.1f} s, budget {budget} s"
    assert proc.events("stopping_before_start"), proc.tail()


async def test_a_broker_that_refuses_sasl_exits_non_zero_naming_the_security_settings(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    """The bundled broker speaks PLAINTEXT only: a release configured for SASL is refused at
    the handshake. The service exits 1 at once (it never turns ready, so a rollout stops), and
    says which settings to check, without the password."""
    env = base_env(tmp_path, kafka_bootstrap) | {
        "CMSYNC_KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT",
        "CMSYNC_KAFKA_SASL_MECHANISM": "PLAIN",
        "CMSYNC_KAFKA_SASL_USERNAME": "svc",
        "CMSYNC_KAFKA_SASL_PASSWORD": "s3cret-pw-never-printed",
    }
    code, output, took = await asyncio.to_thread(run_cli, env, 120)
    note(f"broker refusing SASL: exit {code} after {took:.1f} s")
    assert code == 1, output
    assert "CMSYNC_KAFKA_SECURITY_PROTOCOL=SASL_PLAINTEXT" in output, output
    assert "CMSYNC_KAFKA_SASL_MECHANISM=PLAIN" in output, output
    assert "s3cret-pw-never-printed" not in output
    assert "Traceback" not in output
