"""Scenario 1 — crash: SIGKILL at random moments while a stream flows, restart each time.

The service runs as a real subprocess (`python -m consumer run`); the simulator stays in the
test process, so the lists survive the restarts, as Campaign Monitor would. The simulator
delays a third of the requests by `LATENCY_S`, so that imports are in flight when the process is
killed. Each incarnation joins the group (~5 s, ~18 s after a kill: the dead member must time
out first), catches up by itself with what the killed one left uncommitted, gets a new part of
the stream, and is killed in the middle of it. Kill moments, in turn: while an import is in
flight, right after a commit (seen as a change of `cmsync_committed_offset` on /metrics), just
before the next commit (the service commits every second), at a random moment after the group
join, and (chaos) during start-up. The next incarnation is started at once, as the kubelet
would.

The check after each kill: the next incarnation catches up with everything produced so far
(input and claims offsets committed to their ends, no pending change: `wait_all_committed`),
and then every list must equal the expected state computed from the events produced so far. A
committed offset means the change is durable (applied, or recorded in the membership state
from which it will be applied: guarantee 1), so a change committed before it was durable and
then lost by the kill shows as a list that differs. The profiles carry `version` = the
event's occurred_at, mapped to the custom field Version, so the comparison also catches an
older change applied over a newer one. At the end every list is compared again, every
produced record is committed, and every invalid one is on the dead-letter topic.

The repeated writes — import rows carrying a change already applied, removal calls beyond one
per exit event — are counted from the simulator's apply log and reported: the price of
at-least-once delivery after a crash (everything after the last commit is read again).
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from consumer.devtools.simulator import FaultConfig, SimulatorConfig
from tests.faults.support import (
    API_KEY,
    CHAOS,
    FaultRig,
    ServiceProcess,
    dead_letter_source,
    expected_dead_letters,
    note,
    repeated_writes,
    rng_for,
    scaled,
    stream,
)

LATENCY_S = 1.0


async def committed_gauge(proc: ServiceProcess) -> float | None:
    try:
        return (await proc.metrics()).value("cmsync_committed_offset")
    except Exception:  # the process may be between start and serving: not a commit yet
        return None


async def kill_moment(rig: FaultRig, proc: ServiceProcess, kind: str, rng_value: float) -> str:
    """Wait for the moment `kind` describes; returns what it was."""
    if kind == "import":
        await rig.wait_for(
            lambda: rig.sim.in_flight["import"] > 0,
            30,
            f"an import in flight to kill {proc.name} during it",
            [proc],
            every_s=0.01,
        )
        await asyncio.sleep(rng_value * LATENCY_S * 0.5)
        return "during an import"
    if kind in ("commit-after", "commit-before"):
        first = await committed_gauge(proc)
        moved: list[float] = []

        async def commit_seen() -> bool:
            now = await committed_gauge(proc)
            if now is not None and first is not None and now != first:
                moved.append(now)
                return True
            return False

        await rig.wait_for(commit_seen, 30, f"a commit by {proc.name}", [proc], every_s=0.03)
        if kind == "commit-before":
            await asyncio.sleep(0.9 + 0.08 * rng_value)  # commits come every second
            return "just before a commit"
        return "right after a commit"
    await asyncio.sleep(0.2 + 3 * rng_value)
    return "at a random moment"


@pytest.mark.slow(150)
async def test_sigkill_at_random_moments_keeps_lists_exact(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    rng = rng_for("crash")
    kinds = ["import", "commit-after", "import", "commit-before", "random"]
    if CHAOS:
        kinds = [*kinds, "startup", "import", "commit-after", "random", "import", "startup"]
        kinds += ["commit-before"]
    records = stream(scaled(1000, 4000), seed=11, invalid_rate=0.004)
    n_parts = len(kinds) + 1
    size = -(-len(records) // n_parts)
    parts = [records[i * size : (i + 1) * size] for i in range(n_parts)]
    faults = FaultConfig(latency_s=LATENCY_S, p_latency=0.35)
    config = SimulatorConfig(api_keys=(API_KEY,), seed=5, faults=faults)
    started = time.monotonic()
    async with FaultRig(kafka_bootstrap, tmp_path, sim_config=config) as rig:
        violations: list[str] = []
        moments: list[str] = []
        checked: list[int] = []  # records produced when the lists were checked, per kill
        catch_up: list[float] = []  # seconds from a restart's group join to all committed
        proc = rig.spawn("svc0")
        for i, kind in enumerate(kinds):
            if kind == "startup":
                feeder = asyncio.create_task(rig.produce_paced(parts[i], over_s=2))
                await asyncio.sleep(0.5 + 4 * rng.random())  # maybe before the join completes
                moment = "during start-up"
            else:
                await rig.wait_assigned(proc)
                # The restarted service catches up by itself with what the killed one left
                # uncommitted; then each kill finds most of the stream committed, and the
                # check after it has that much to check.
                caught_up_from = time.monotonic()
                await rig.wait_all_committed(90, [proc])
                catch_up.append(time.monotonic() - caught_up_from)
                if moments:  # everything produced so far is through: the lists are exact
                    for dest, problems in rig.list_problems().items():
                        violations += [
                            f"after kill {i} ({moments[-1]}), caught up: {dest}: {p}"
                            for p in problems
                        ]
                    checked.append(len(rig.sent))
                feeder = asyncio.create_task(rig.produce_paced(parts[i], over_s=3))
                moment = await kill_moment(rig, proc, kind, rng.random())
            proc.kill()
            moments.append(moment)
            proc = rig.spawn(f"svc{i + 1}")  # restarted at once, as the kubelet would
            await feeder
            await asyncio.sleep(LATENCY_S + 0.5)  # requests the dead process left in flight land
            committed = await rig.committed()
            assert all(committed[p] <= rig.ends.get(p, 0) for p in committed), committed
        assert not violations, "\n".join(violations)

        final = proc
        await rig.wait_assigned(final)
        await rig.produce(parts[-1])
        committed = await rig.wait_all_committed(120, [final])
        final.terminate()
        assert await final.wait(30) == 0, final.tail()

        assert committed == {p: rig.ends.get(p, 0) for p in committed}
        assert rig.list_problems() == {}
        invalid = expected_dead_letters(rig.sent, rig.dests)
        letters = await rig.dead_letters(invalid)
        missing = invalid - {dead_letter_source(r) for r in letters}
        assert not missing, f"{len(missing)} invalid records not dead-lettered: {missing}"

        repeats = repeated_writes(rig.sim.applied_writes(), rig.sent, rig.dests, rig.list_ids)
        counts = rig.sim.request_counts()
        note(
            f"crash: {len(rig.sent)} records, {len(kinds)} SIGKILLs ({', '.join(moments)}); "
            f"{repeats}; requests: import {sum(counts.get('import', {}).values())}, "
            f"delete {sum(counts.get('delete', {}).values())}, "
            f"unsubscribe {sum(counts.get('unsubscribe', {}).values())}; "
            f"{len(letters)} dead letters for {len(invalid)} invalid records; lists checked "
            f"after each kill at {checked} records; after a restart's join, caught up in "
            f"{', '.join(f'{t:.1f}' for t in catch_up)} s; "
            f"{time.monotonic() - started:.0f} s"
        )
