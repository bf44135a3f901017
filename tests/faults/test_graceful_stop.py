"""Scenario 2 — graceful stop: SIGTERM mid-stream.

The service reads a stream while its buffers hold changes (a long flush interval keeps them
there) and the simulator answers slowly (imports in flight); then SIGTERM. Guarantee 6: it
stops fetching, flushes, commits and exits 0 within CMSYNC_SHUTDOWN_BUDGET_S — measured from
the signal to the process's exit. Everything it had read is then applied (the lists match the
expected state) and committed (the group's offsets equal the ends of what was produced). A
restart re-sends nothing already applied: the simulator's apply log grows only by the changes
produced after the restart.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from consumer.devtools.simulator import FaultConfig, SimulatorConfig
from consumer.membership.changelog import InternalTopics
from tests.faults.support import (
    API_KEY,
    CHAOS,
    VERSION,
    FaultRig,
    change,
    note,
    scaled,
    stream,
)

BUDGET_S = 15.0 if CHAOS else 10.0


@pytest.mark.slow(30)
async def test_sigterm_flushes_commits_and_exits_within_the_budget(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    faults = FaultConfig(latency_s=0.3, p_latency=0.3)
    config = SimulatorConfig(api_keys=(API_KEY,), seed=2, faults=faults)
    env = {
        "CMSYNC_FLUSH_INTERVAL_S": "3",  # changes wait in the buffers when SIGTERM comes
        "CMSYNC_SHUTDOWN_BUDGET_S": str(BUDGET_S),
        "CMSYNC_RATE_LIMIT_RPS": "500" if CHAOS else "200",
    }
    records = stream(scaled(700, 1500), seed=21)
    async with FaultRig(kafka_bootstrap, tmp_path, sim_config=config, env=env) as rig:
        proc = rig.spawn("first")
        await rig.wait_assigned(proc)
        await rig.produce(records)

        claims_topic = InternalTopics.of_group(rig.group).claims

        async def read_everything() -> bool:
            # The input, and the claims its stage 1 wrote (stage 2 fills the buffers).
            metrics = await proc.metrics()
            if metrics.value("cmsync_events_consumed_total", topic=rig.topic) < len(records):
                return False
            claims = sum(end for _, end in (await rig.claims_progress()).values())
            return metrics.value("cmsync_events_consumed_total", topic=claims_topic) >= claims

        await rig.wait_for(read_everything, 60, "the service read the whole stream", [proc])
        applied_before = len(rig.sim.applied_writes())

        sent_at = time.monotonic()
        proc.terminate()
        code = await proc.wait(BUDGET_S + 30)
        took = time.monotonic() - sent_at
        drained = len(rig.sim.applied_writes()) - applied_before
        note(
            f"graceful: {len(records)} records read; {applied_before} writes applied before "
            f"SIGTERM, {drained} by the drain; exit {code} after {took:.2f} s "
            f"(budget {BUDGET_S:.0f} s)"
        )
        assert code == 0, proc.tail()
        assert took <= BUDGET_S, f"exit took {took:.2f} s, budget {BUDGET_S} s"
        assert drained > 0, "nothing was buffered at SIGTERM: the scenario tested nothing"
        assert not proc.events("shutdown_drain_incomplete"), proc.tail()
        assert proc.events("stopped")

        assert await rig.committed() == {p: rig.ends.get(p, 0) for p in range(rig.partitions)}
        assert rig.list_problems() == {}

        # A restart re-sends nothing already applied.
        writes_at_stop = len(rig.sim.applied_writes())
        counts_at_stop = rig.sim.request_counts()
        again = rig.spawn("restarted")
        await rig.wait_assigned(again)
        at = max(r.occurred_at_ms for r in records) + 60_000
        fresh = [change(f"fresh{i}@example.com", at_ms=at + i) for i in range(20)]
        fresh.append(change("fresh0@example.com", False, at_ms=at + 1_000))
        await rig.produce(fresh)
        await rig.wait_all_committed(60, [again])
        again.terminate()
        assert await again.wait(BUDGET_S + 30) == 0, again.tail()

        new_writes = rig.sim.applied_writes()[writes_at_stop:]
        fresh_rows = {(r.email, str(r.occurred_at_ms)) for r in fresh if r.entered}
        old_rows = [
            w
            for w in new_writes
            if w.endpoint == "import" and (w.email, dict(w.fields)[VERSION]) not in fresh_rows
        ]
        assert not old_rows, f"{len(old_rows)} import rows re-sent after the restart"
        assert {w.email for w in new_writes} <= {r.email for r in fresh}
        counts = rig.sim.request_counts()
        after = {
            endpoint: sum(counts.get(endpoint, {}).values())
            - sum(counts_at_stop.get(endpoint, {}).values())
            for endpoint in ("import", "delete", "unsubscribe")
        }
        note(f"graceful: requests after the restart (fresh data only): {after}")
        assert after["delete"] + after["unsubscribe"] == 2  # fresh0's removal, in two lists
        assert rig.list_problems() == {}


async def test_sigterm_while_joining_the_group_exits_0(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    """SIGTERM before the group join completed (a pod stopped right after it started), here
    while the join is slow: a killed member is still in the group, so the join waits for its
    session to time out."""
    budget = 10.0
    env = {"CMSYNC_SHUTDOWN_BUDGET_S": str(budget)}
    async with FaultRig(kafka_bootstrap, tmp_path, env=env) as rig:
        first = rig.spawn("first")
        await rig.wait_assigned(first)
        first.kill()
        proc = rig.spawn("joining")
        await rig.wait_for(lambda: bool(proc.events("started")), 30, "start-up", [proc])
        await asyncio.sleep(1)
        assert proc.assigned() is None
        sent_at = time.monotonic()
        proc.terminate()
        assert await proc.wait(60) == 0, proc.tail()
        took = time.monotonic() - sent_at
        note(f"graceful: SIGTERM during a slow group join, exit 0 after {took:.2f} s")
        assert took <= budget, f"exit took {took:.2f} s, budget {budget} s"
