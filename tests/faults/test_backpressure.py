"""Scenario 6 — backpressure: a large backlog waits, Campaign Monitor is slow, and
CMSYNC_MAX_PENDING is tiny.

Guarantee 4 (bounded): memory is bounded by CMSYNC_MAX_PENDING; past it, intake pauses and
resumes. The backlog (~90 MB: records of ~6 KB, a profile with a long unmapped field) is
produced before the service starts, the simulator delays every request, and the service may
hold 500 pending changes. The resident size of the service process is sampled every 100 ms
(psutil); its growth over the size at start-up must stay under `BOUND` — a generous bound:
without backpressure the same backlog grows the process by about 130 MiB (measured; `make
chaos` runs that comparison), with it by about 40 MiB, which is not the 500 changes but
fixed costs: aiokafka's fetch buffers (the bundled broker answers a fetch with ~5 MB per
partition) and one fetch of up to 5000 records taken before the pause applies. Intake must
have paused and resumed (the `intake_paused` / `intake_resumed` log lines), and at the end
nothing is lost: the list matches and every record is committed.

The test has a broker of its own, stopped afterwards: the backlog would otherwise stay in the
memory of the session's broker.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path

import pytest

from consumer.devtools.embedded_broker import EmbeddedBroker
from consumer.devtools.simulator import CustomFieldSpec, FaultConfig, SimulatorConfig
from consumer.devtools.synthetic import Produced
from tests.faults.support import (
    API_KEY,
    CHAOS,
    Dest,
    FaultRig,
    change,
    note,
    sample_rss,
    scaled,
)

MiB = 1024 * 1024
BOUND = 64 * MiB


def backlog(n: int) -> list[Produced]:
    notes = "n" * 6000  # an unmapped profile field: it travels in the record, not to the list
    return [
        change(f"member{i}@example.com", at_ms=1_764_417_600_000 + i, extra={"notes": notes})
        for i in range(n)
    ]


async def run_backlog(
    bootstrap: str, tmp: Path, records: list[Produced], max_pending: int
) -> tuple[int, int, int, int, float]:
    """(RSS at start-up, peak RSS, pauses, resumes, seconds) of one service draining the
    backlog."""
    faults = FaultConfig(latency_s=0.1, p_latency=1.0)
    config = SimulatorConfig(api_keys=(API_KEY,), seed=6, faults=faults)
    env = {
        "CMSYNC_MAX_PENDING": str(max_pending),
        "CMSYNC_RATE_LIMIT_RPS": "20",
        # What CMSYNC_MAX_PENDING bounds is under test here; the applied-time memory has its
        # own bound (24 MiB at the default of 1,000,000, a fixed cost that took the growth
        # over start-up from ~40 to ~65 MiB). Room for every record of the backlog.
        "CMSYNC_APPLIED_MEMORY": str(len(records)),
    }
    dests = [Dest("news", "seg-a")]
    async with FaultRig(bootstrap, tmp, dests=dests, sim_config=config, env=env) as rig:
        await rig.produce(records)
        proc = rig.spawn(f"pending-{max_pending}")
        samples: list[int] = []
        sampler = asyncio.create_task(sample_rss(proc, samples))
        await rig.wait_for(lambda: bool(proc.events("started")), 60, "start-up", [proc])
        at_start = max(samples, default=proc.rss())
        started = time.monotonic()
        await rig.wait_all_committed(scaled(120, 300), [proc])
        took = time.monotonic() - started
        proc.terminate()
        assert await proc.wait(30) == 0, proc.tail()
        sampler.cancel()
        assert rig.list_problems() == {}
        assert len(rig.members("news")) == len(records)
        pauses = len(proc.events("intake_paused"))
        resumes = len(proc.events("intake_resumed"))
        return at_start, max(samples), pauses, resumes, took


@pytest.mark.slow(28)
async def test_tiny_max_pending_bounds_memory(tmp_path: Path) -> None:
    records = backlog(scaled(15_000, 30_000))
    backlog_bytes = sum(len(r.value) for r in records)
    broker = EmbeddedBroker()
    await asyncio.to_thread(broker.start)
    try:
        at_start, peak, pauses, resumes, took = await run_backlog(
            broker.bootstrap, tmp_path, records, max_pending=500
        )
        growth = peak - at_start
        note(
            f"backpressure: backlog {len(records)} records ({backlog_bytes / MiB:.0f} MiB), "
            f"CMSYNC_MAX_PENDING 500, simulator 0.1 s a request: drained in {took:.1f} s; RSS "
            f"{at_start / MiB:.0f} MiB at start-up, peak {peak / MiB:.0f} MiB "
            f"(+{growth / MiB:.1f} MiB, bound +{BOUND / MiB:.0f} MiB); intake paused "
            f"{pauses}×, resumed {resumes}×"
        )
        assert pauses >= 1, "intake never paused"
        assert resumes >= 1, "intake never resumed"
        assert growth < BOUND, f"memory grew by {growth / MiB:.0f} MiB"
        if CHAOS:
            at_start, peak, pauses, _, took = await run_backlog(
                broker.bootstrap, tmp_path, records, max_pending=200_000
            )
            note(
                f"backpressure, same backlog with CMSYNC_MAX_PENDING 200000: drained in "
                f"{took:.1f} s; peak RSS {peak / MiB:.0f} MiB "
                f"(+{(peak - at_start) / MiB:.1f} MiB); intake paused {pauses}×"
            )
    finally:
        await asyncio.to_thread(broker.stop)


#: Bytes of pending changes the outage scenario allows (CMSYNC_MAX_PENDING_BYTES).
OUTAGE_LIMIT = 4 * MiB
#: What may land past the bound before intake pauses (the source checks after each partition's
#: batch and leaves the rest of a fetch in Kafka): aiokafka asks for at most 1 MiB per
#: partition (max_partition_fetch_bytes), an input batch and a claims batch may both land
#: before the check, and the buffers estimate a desired state of these profiles at about 1.5
#: times its claim's encoded size. Measured: 0.5 to 1.6 MiB past it.
ONE_FETCH = 3 * MiB


#: The options of the list's multi-select that carries the bulk (values of 200 characters).
BULK_OPTIONS = tuple(f"option-{k}-".ljust(200, "i") for k in range(18))


def large_mapped(n: int) -> list[Produced]:
    """Profiles of ~4 KB whose bulk is a mapped multi-select (every option of the list's
    field, which the list can hold): every pending change keeps it."""
    return [
        change(
            f"big{i}@example.com",
            at_ms=1_764_417_600_000 + i,
            extra={"interests": list(BULK_OPTIONS)},
        )
        for i in range(n)
    ]


@pytest.mark.slow(30)
async def test_outage_with_large_records_is_bounded_in_bytes(tmp_path: Path) -> None:
    """Campaign Monitor is down while records of ~4 KB (their bulk mapped to the list) wait:
    intake pauses on CMSYNC_MAX_PENDING_BYTES long before CMSYNC_MAX_PENDING, the pending
    bytes gauge never exceeds the bound plus one partition's batch, and once Campaign Monitor
    is back everything is applied (nothing lost) and intake resumed."""
    records = large_mapped(scaled(3_000, 20_000))
    dest = Dest(
        "news",
        "seg-a",
        custom_fields={"City": "city", "Interests": "interests", "Version": "version"},
        fields=(
            CustomFieldSpec("City"),
            CustomFieldSpec("Interests", "MultiSelectMany", BULK_OPTIONS),
            CustomFieldSpec("Version"),
        ),
    )
    config = SimulatorConfig(api_keys=(API_KEY,), seed=7, faults=FaultConfig(outage=True))
    env = {"CMSYNC_MAX_PENDING_BYTES": str(OUTAGE_LIMIT), "CMSYNC_FLUSH_INTERVAL_S": "0.5"}
    broker = EmbeddedBroker()
    await asyncio.to_thread(broker.start)
    try:
        async with FaultRig(
            broker.bootstrap, tmp_path, dests=[dest], sim_config=config, env=env
        ) as rig:
            await rig.produce(records)
            proc = rig.spawn("outage-bytes")
            rss: list[int] = []
            sampler = asyncio.create_task(sample_rss(proc, rss))
            gauge: list[float] = []
            changes: list[float] = []
            paused: list[float] = []

            async def watch() -> None:
                while proc.alive():
                    with contextlib.suppress(Exception):
                        metrics = await proc.metrics()
                        gauge.append(metrics.value("cmsync_pending_bytes"))
                        changes.append(metrics.value("cmsync_pending_changes"))
                        paused.append(metrics.value("cmsync_paused_partitions"))
                    await asyncio.sleep(0.1)

            watcher = asyncio.create_task(watch())
            # Paused by the bytes bound, and it stays paused while Campaign Monitor is down.
            await rig.wait_for(
                lambda: sum(1 for p in paused if p > 0) >= 20, scaled(90, 240), "paused", [proc]
            )
            pause = proc.events("intake_paused")[0]
            rig.sim.set_faults(FaultConfig())
            await rig.wait_all_committed(scaled(120, 300), [proc])
            watcher.cancel()
            proc.terminate()
            assert await proc.wait(30) == 0, proc.tail()
            sampler.cancel()
            peak = max(gauge)
            note(
                f"outage, {len(records)} records of ~4 KB mapped: intake paused at "
                f"{pause['pending']} changes, {pause['pending_bytes'] / MiB:.1f} MiB "
                f"(bound {OUTAGE_LIMIT / MiB:.0f} MiB, {pause['bound']}); pending bytes "
                f"gauge peak {peak / MiB:.1f} MiB, {max(changes):.0f} changes; RSS peak "
                f"{max(rss) / MiB:.0f} MiB; resumed {len(proc.events('intake_resumed'))}×"
            )
            assert pause["bound"] == "bytes"
            assert pause["pending"] < len(records)
            assert peak <= OUTAGE_LIMIT + ONE_FETCH, f"{peak / MiB:.1f} MiB pending"
            assert max(paused) >= 1
            assert proc.events("intake_resumed"), "intake never resumed"
            assert rig.list_problems() == {}
            assert len(rig.members("news")) == len(records)
    finally:
        await asyncio.to_thread(broker.stop)
