"""Scenario 9 — the membership state under faults: the local cache lost (SIGKILL, the state
directory wiped, restart), a rebalance while a restore runs, and a crash during a backfill.

The service runs with a state directory of its own (as a pod with a persistent volume would),
syncs a first part of a stream with late events (`ordered=False`: changes delivered after a
newer one of the same profile and segment), and is killed with SIGKILL. The directory is
deleted, as a new pod on another node starts with an empty one, and a new process reads the
second part, whose late events are older than changes the first process applied. The state
is rebuilt from the changelog topics, so: the lists equal the model (late events ignored
across the restart), and nothing the first process applied and recorded is imported again.
"""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import pytest

from consumer.devtools.rig import create_list
from consumer.devtools.simulator import SimulatorConfig
from tests.faults.support import API_KEY, VERSION, Dest, FaultRig, note, scaled, stream


@pytest.mark.slow(60)
async def test_a_wiped_state_dir_is_rebuilt_from_the_changelogs(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    records = stream(scaled(600, 2000), seed=91, ordered=False)
    half = len(records) // 2
    state_dir = tmp_path / "state"
    config = SimulatorConfig(api_keys=(API_KEY,), seed=9)
    env = {"CMSYNC_STATE_DIR": str(state_dir)}
    async with FaultRig(kafka_bootstrap, tmp_path, sim_config=config, env=env) as rig:
        first = rig.spawn("first")
        await rig.wait_assigned(first)
        await rig.produce(records[:half])
        await rig.wait_all_committed(90, [first])
        assert rig.list_problems() == {}
        await asyncio.sleep(2.5)  # the applied records are checkpointed every second
        first.kill()
        assert any(state_dir.rglob("*")), "the first process kept no state on disk"
        shutil.rmtree(state_dir)
        writes_before = len(rig.sim.applied_writes())
        imported_before = {
            (w.email, dict(w.fields).get(VERSION))
            for w in rig.sim.applied_writes()
            if w.endpoint == "import"
        }

        second = rig.spawn("second")
        await rig.wait_assigned(second, within_s=90)
        await rig.produce(records[half:])
        await rig.wait_all_committed(120, [second])
        second.terminate()
        assert await second.wait(30) == 0, second.tail()

        assert rig.list_problems() == {}
        again = [
            w
            for w in rig.sim.applied_writes()[writes_before:]
            if w.endpoint == "import" and (w.email, dict(w.fields).get(VERSION)) in imported_before
        ]
        note(
            f"state wiped: {len(records)} records ({half} before the SIGKILL), "
            f"{len(again)} import rows sent again after the restore"
        )
        # Only what the first process had in flight or not yet recorded at the kill may come
        # again: its applied records are checkpointed every second.
        assert len(again) <= 0.05 * len(imported_before), len(again)


@pytest.mark.slow(90)
async def test_a_rebalance_during_a_restore(kafka_bootstrap: str, tmp_path: Path) -> None:
    """B joins a group A runs alone and restores its share of the state; while it restores
    (its /readyz says so), A leaves. The second rebalance starts while B's first restore runs
    (a rebalance callback is not interrupted: the group waits for it, then B revokes what it
    just restored and restores everything); the stream goes on throughout. At the end the
    lists equal the model."""
    records = stream(scaled(800, 3000), seed=93, ordered=False)
    half = len(records) // 2
    async with FaultRig(kafka_bootstrap, tmp_path, partitions=4) as rig:
        a = rig.spawn("a")
        await rig.wait_assigned(a)
        await rig.produce(records[:half])
        await rig.wait_all_committed(90, [a])

        b = rig.spawn("b")

        async def b_restoring() -> bool:
            try:
                status, body = await b.get("/readyz", timeout_s=1)
            except Exception:  # not serving yet
                return False
            return status == 503 and "restoring" in body

        await rig.wait_for(b_restoring, 90, "b restoring its share", [a, b], every_s=0.01)
        a.terminate()  # the second rebalance, while b restores
        feeder = asyncio.create_task(rig.produce_paced(records[half:], over_s=3))
        assert await a.wait(30) == 0, a.tail()
        await feeder
        await rig.wait_all_committed(120, [b])
        b.terminate()
        assert await b.wait(30) == 0, b.tail()

        assert rig.list_problems() == {}
        restores = len(b.events("state_restored"))
        note(
            f"rebalance during a restore: {len(records)} records; b restored {restores} times "
            "(a left during the first); lists exact"
        )
        assert restores >= 2


@pytest.mark.slow(60)
async def test_a_crash_during_a_backfill_converges(kafka_bootstrap: str, tmp_path: Path) -> None:
    """Two destinations are added while the service is down: one for seg-x, a segment no list
    took (the state kept it), one more for seg-a. The process that starts the backfills is
    killed with SIGKILL as soon as it has started them (claims written or not, progress
    checkpointed or not, imports under way or not); the next one resumes them. Both new
    lists end equal to their segments, nothing is removed from them (a backfill only adds),
    and the lists that existed before are not written again."""
    records = stream(scaled(900, 4000), seed=95)
    async with FaultRig(kafka_bootstrap, tmp_path) as rig:
        first = rig.spawn("first")
        await rig.wait_assigned(first)
        await rig.produce(records)
        await rig.wait_all_committed(90, [first])
        assert rig.list_problems() == {}
        first.terminate()
        assert await first.wait(30) == 0, first.tail()

        added = [Dest("x-list", "seg-x"), Dest("a-later", "seg-a")]
        for dest in added:
            rig.dests.append(dest)
            rig.list_ids[dest.name] = create_list(rig.sim, dest, api_key=API_KEY)
        writes_before = len(rig.sim.applied_writes())
        second = rig.spawn("second")
        await rig.wait_for(
            lambda: bool(second.events("backfill_started")), 90, "backfills started", [second]
        )
        second.kill()
        started = len(second.events("backfill_started"))
        filled_then = {dest.name: len(rig.active(dest.name)) for dest in added}

        third = rig.spawn("third")
        await rig.wait_for(lambda: rig.list_problems() == {}, 120, "lists equal", [third])
        third.terminate()
        assert await third.wait(30) == 0, third.tail()

        new_lists = {rig.list_ids[dest.name] for dest in added}
        writes = rig.sim.applied_writes()[writes_before:]
        assert [w for w in writes if w.list_id not in new_lists] == []
        assert [w for w in writes if w.endpoint != "import"] == []
        note(
            f"backfill crash: {started} backfills started before the SIGKILL, lists then "
            f"{filled_then}, equal after the restart: "
            f"{ {d.name: len(rig.active(d.name)) for d in added} }"
        )
