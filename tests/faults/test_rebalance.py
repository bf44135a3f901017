"""Scenario 3 — rebalance: instances join and leave the group mid-stream.

Instance A runs alone; while the stream flows, B joins, then C; B leaves gracefully (SIGTERM:
it drains, commits and leaves the group) and C is killed with SIGKILL (it does not leave: the
group notices after the session timeout, 10 s, and its partitions go to A). Each join or leave
is a rebalance in which every owner flushes and commits its revoked partitions first.

At the end the lists match the expected state, every produced record is committed, and no
change was applied out of order (`support.out_of_order_writes`, from the simulator's apply
log: per address the Versions imported never decrease and a removal never undoes a newer add).
The one excused exception is the documented replay after a crash: changes C had applied
above its last commit are applied again, in their original order, by the partitions' next
owner.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from tests.faults.support import (
    FaultRig,
    Replay,
    note,
    out_of_order_writes,
    repeated_writes,
    scaled,
    stream,
)


@pytest.mark.slow(55)
async def test_instances_join_and_leave_mid_stream(kafka_bootstrap: str, tmp_path: Path) -> None:
    records = stream(scaled(1500, 5000), seed=31)
    started = time.monotonic()
    async with FaultRig(kafka_bootstrap, tmp_path, partitions=6) as rig:
        a = rig.spawn("a")
        await rig.wait_assigned(a)
        feeder = asyncio.create_task(
            rig.produce_paced(records, over_s=scaled(25, 70), chunks=scaled(50, 140))
        )
        await asyncio.sleep(2)
        b = rig.spawn("b")
        await rig.wait_for(lambda: bool(b.assigned()), 60, "b got partitions", [a, b])
        c = rig.spawn("c")
        await rig.wait_for(lambda: bool(c.assigned()), 60, "c got partitions", [a, b, c])
        await asyncio.sleep(2)

        b.terminate()  # leaves gracefully
        assert await b.wait(30) == 0, b.tail()
        await rig.wait_for(
            lambda: len(c.events("partitions_assigned")) >= 2, 60, "the group without b", [a, c]
        )
        await asyncio.sleep(2)
        # The gauge follows the assignments (0 while a rebalance is under way): once the group
        # settles, the two members' shares make the whole topic, as their logs say.
        for _ in range(120):
            shares = [(await p.metrics()).value("cmsync_assigned_partitions") for p in (a, c)]
            if sum(shares) == rig.partitions:
                break
            await asyncio.sleep(0.5)
        assert sum(shares) == rig.partitions, (shares, a.tail(), c.tail())
        assert shares == [len(a.assigned() or ()), len(c.assigned() or ())]

        c_partitions = c.assigned() or set()
        c.kill()  # without leaving the group
        killed_at = time.monotonic()  # the simulator's clock is time.monotonic too
        replay = Replay(killed_at, c_partitions, await rig.committed())
        await asyncio.sleep(0.5)  # what c left in flight lands

        await feeder
        committed = await rig.wait_all_committed(120, [a])
        a.terminate()
        assert await a.wait(30) == 0, a.tail()

        assert committed == {p: rig.ends.get(p, 0) for p in range(rig.partitions)}
        assert rig.list_problems() == {}
        writes = rig.sim.applied_writes()
        assert out_of_order_writes(writes, rig.sent, rig.dests, rig.list_ids, [replay]) == []
        incomplete = [e for p in (a, b, c) for e in p.events("revocation_flush_incomplete")]
        assert not incomplete
        repeats = repeated_writes(writes, rig.sent, rig.dests, rig.list_ids)
        rebalances = sum(len(p.events("partitions_assigned")) for p in (a, b, c))
        note(
            f"rebalance: {len(rig.sent)} records over 6 partitions, {rebalances} assignments "
            f"(b left by SIGTERM, c killed owning {sorted(c_partitions)}); "
            f"{repeats}; {time.monotonic() - started:.0f} s"
        )


@pytest.mark.slow(60)
async def test_rebalance_while_campaign_monitor_is_down(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    """A second instance joins while Campaign Monitor answers 503 to everything: the first
    cannot flush its revoked partitions within the revocation budget (20 s), hands them over
    uncommitted (`revocation_flush_incomplete`) and keeps some of them. Nothing may crash, no
    offset may pass an unapplied change, and once Campaign Monitor is back the lists match."""
    from consumer.devtools.simulator import FaultConfig

    records = stream(scaled(400, 1500), seed=32)
    async with FaultRig(kafka_bootstrap, tmp_path, partitions=4) as rig:
        a = rig.spawn("a")
        await rig.wait_assigned(a)
        await rig.produce(records[: len(records) // 2])
        await rig.wait_all_committed(60, [a])
        rig.sim.set_faults(FaultConfig(outage=True))
        await rig.produce(records[len(records) // 2 :])
        await asyncio.sleep(1)
        b = rig.spawn("b")
        await rig.wait_for(lambda: bool(b.assigned()), 90, "b got partitions", [a, b])
        await asyncio.sleep(2)
        rig.sim.set_faults(FaultConfig())
        await rig.wait_all_committed(120, [a, b])
        for proc in (a, b):
            proc.terminate()
        for proc in (a, b):
            assert await proc.wait(30) == 0, proc.tail()
        assert rig.list_problems() == {}
        note(
            f"rebalance during an outage: incomplete revocations "
            f"{len(a.events('revocation_flush_incomplete'))}, a kept {sorted(a.assigned() or [])}"
        )
