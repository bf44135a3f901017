"""Scenario 4 — broker stall: the broker process is stopped (SIGSTOP) for longer than the
consumer's session timeout (aiokafka's default, 10 s; the service does not expose it), then
continued (SIGCONT).

The test has a broker of its own (stopping the session's broker would stall every other test
of this worker). While the broker is stopped the service cannot fetch, commit or heartbeat;
when it comes back the group has expired the member, so the service must rejoin by itself —
no restart, no operator. Then the stream goes on, the lists match the expected state and
every produced record is committed.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from consumer.devtools.embedded_broker import EmbeddedBroker
from tests.faults.support import FaultRig, note, scaled, stream

STALL_S = scaled(13, 45)  # chaos: also past aiokafka's request timeout (40 s)


@pytest.mark.slow(25)
async def test_service_recovers_by_itself_after_a_broker_stall(tmp_path: Path) -> None:
    broker = EmbeddedBroker()
    await asyncio.to_thread(broker.start)
    records = stream(scaled(900, 3000), seed=41)
    half = len(records) // 2
    try:
        async with FaultRig(broker.bootstrap, tmp_path) as rig:
            proc = rig.spawn("svc")
            await rig.wait_assigned(proc)
            await rig.produce(records[:half])

            async def some_applied() -> bool:
                return len(rig.sim.applied_writes()) > 0

            await rig.wait_for(some_applied, 60, "the first changes applied", [proc])
            stopped_at = time.monotonic()
            broker.pause()
            try:
                await asyncio.sleep(STALL_S)
                assert proc.alive(), proc.tail()
            finally:
                broker.resume()
            continued_at = time.monotonic()
            await rig.produce(records[half:])
            committed = await rig.wait_all_committed(120, [proc])
            recovered_in = time.monotonic() - continued_at
            proc.terminate()
            assert await proc.wait(30) == 0, proc.tail()

            assert committed == {p: rig.ends.get(p, 0) for p in range(rig.partitions)}
            assert rig.list_problems() == {}
            note(
                f"broker stall: {len(records)} records; broker stopped "
                f"{continued_at - stopped_at:.1f} s; everything committed {recovered_in:.1f} s "
                f"after SIGCONT; assignments {len(proc.events('partitions_assigned'))}, "
                f"revocations {len(proc.events('partitions_revoked'))}, "
                f"commit failures {len(proc.events('commit_failed'))}"
            )
    finally:
        await asyncio.to_thread(broker.stop)
