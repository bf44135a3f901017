"""Scenario 7, memory during a Campaign Monitor outage: resident memory against record size.

100,000 records wait in the input topic (one segment → one list, each profile entering once)
while Campaign Monitor answers 503 to everything (the simulator's outage fault). The service
runs with default settings (CMSYNC_MAX_PENDING 200,000, CMSYNC_MAX_PENDING_BYTES 64 MiB) as a
subprocess (`python -m consumer run`, the rig's `ServiceProcess`), its resident set sampled
every 100 ms. It reads until a bound pauses intake, and nothing leaves: this is the most the
process holds while Campaign Monitor is down. Measured for profiles of about 1 KB, 4 KB and
60 KB (the schema allows records up to 64 KiB); target: peak RSS ≤ 300 MiB at every size.

Where the bulk of a profile is matters: ``--placement mapped`` (default, the worst case for
the buffers) puts it in a field the list maps (the multi-select `interests`, items of 200
characters), so every pending change carries it; ``unmapped`` puts it in a field no list maps,
so it travels in the input record only.

The run for one size: the bundled broker (its own, stopped afterwards: the backlog would
otherwise stay in its memory), the simulator in this process with the outage on, the records
produced before the service starts, then the service until intake has been paused for
``--hold`` seconds (or, if it never pauses, until everything produced is recorded in the
state) while its /metrics are read every 0.5 s: the peak of `cmsync_pending_bytes` (summed)
and `cmsync_pending_changes`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

from bench.common import (
    MIB,
    Figure,
    Option,
    Result,
    at_most,
    bench_env,
    event_id,
    main_of,
    options,
    produce,
    profile_of,
    quiet_collector,
    simulator,
    start_service,
)
from consumer.devtools.embedded_broker import running_broker
from consumer.devtools.simulator import FaultConfig
from consumer.devtools.synthetic import event_bytes

SEGMENT = "all-customers"
START_MS = 1_764_417_600_000  # 2025-11-29T12:00:00Z
TARGET_MIB = 300
#: Record sizes measured, bytes of the JSON value (the schema's limit is 64 KiB).
SIZES = (1_000, 4_000, 60_000)
ITEM = 200  # characters per multi-select item (Campaign Monitor takes up to 250 per value)

_options = options(
    Option("--records", 100_000, "records waiting per size", "CMSYNC_BENCH_OUTAGE_RECORDS"),
    Option("--partitions", 4, "partitions of the input topic", "CMSYNC_BENCH_OUTAGE_PARTITIONS"),
    Option("--hold", 20.0, "seconds to watch once intake paused", "CMSYNC_BENCH_OUTAGE_HOLD_S"),
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    _options(p)
    p.add_argument(
        "--placement",
        choices=("mapped", "unmapped"),
        default="mapped",
        help="where the bulk of a profile goes (default mapped: the worst case)",
    )
    p.add_argument(
        "--sizes",
        default=",".join(str(s) for s in SIZES),
        help="comma-separated record sizes in bytes (default 1000,4000,60000)",
    )


def record(i: int, size: int, placement: str) -> tuple[bytes, bytes]:
    """(key, value) of profile `i` entering the segment, its value about `size` bytes."""
    profile = profile_of(i)

    def value_of(profile: dict[str, object]) -> bytes:
        return event_bytes(
            event_id=event_id(7, i),
            segment_id=SEGMENT,
            entered=True,
            occurred_at_ms=START_MS + i,
            profile=profile,
        )

    room = max(0, size - len(value_of(profile)))
    if placement == "mapped":
        items = [f"{i:x}-{n}-".ljust(ITEM, "x") for n in range(room // (ITEM + 3))]
        profile["interests"] = items
    else:
        profile["notes"] = "n" * max(0, room - 12)
    return str(profile["id"]).encode(), value_of(profile)


@dataclass
class OutageRun:
    size: int
    value_bytes: int  # mean, as produced
    records: int
    produce_s: float
    rss_joined: int | None
    rss_paused: int | None  # the largest sample up to the moment intake was seen paused
    peak_rss: int | None
    peak_pending_bytes: float
    peak_pending_changes: float
    paused: bool
    consumed: float  # input records read (cmsync_events_consumed_total for the input)
    watched_s: float


async def outage_run(
    size: int, *, records: int, partitions: int, hold_s: float, placement: str
) -> OutageRun:
    label = f"outage-{size}-{placement}"
    async with contextlib.AsyncExitStack() as stack:
        await stack.enter_async_context(quiet_collector())
        broker = await stack.enter_async_context(running_broker())
        sim, base_url, (list_id,) = await stack.enter_async_context(simulator(None, 1))
        sim.sim.set_faults(FaultConfig(outage=True))
        topic = f"bench-{label}"
        env = await bench_env(
            stack,
            topic,
            partitions,
            bootstrap=broker.bootstrap,
            base_url=base_url,
            destinations=[("customers", SEGMENT, list_id)],
            rate_limit_rps=10,
        )
        total = 0

        def events() -> Iterator[tuple[bytes, bytes]]:
            nonlocal total
            for i in range(records):
                key, value = record(i, size, placement)
                total += len(value)
                yield key, value

        produced = await produce(broker.bootstrap, topic, partitions, events())
        service = start_service(env, label)
        peaks = [0.0, 0.0]
        paused_at: float | None = None
        consumed = 0.0
        started = time.monotonic()
        try:
            await service.wait_joined()
            rss_joined = service.peak_rss(time.monotonic() - 0.5)
            while True:
                with contextlib.suppress(Exception):
                    metrics = await service.metrics()
                    peaks[0] = max(peaks[0], metrics.value("cmsync_pending_bytes"))
                    peaks[1] = max(peaks[1], metrics.value("cmsync_pending_changes"))
                    consumed = metrics.value("cmsync_events_consumed_total", topic=topic)
                    if paused_at is None and metrics.value("cmsync_paused_partitions") > 0:
                        paused_at = time.monotonic()
                    done = sum(metrics.committed_offsets(topic).values()) >= records
                    if paused_at is None and done and consumed >= records:
                        paused_at = time.monotonic()  # never paused: everything is in
                if paused_at is not None and time.monotonic() - paused_at >= hold_s:
                    break
                if time.monotonic() - started > 600:
                    break
                service.check_alive()
                await asyncio.sleep(0.5)
            paused = bool(service.events("intake_paused"))
            peak = service.peak_rss()
            until = paused_at if paused_at is not None else time.monotonic()
            rss_paused = max((r for t, r in service.rss_samples if t <= until), default=None)
            watched = time.monotonic() - started
        finally:
            await service.stop()
        return OutageRun(
            size=size,
            value_bytes=total // max(1, records),
            records=records,
            produce_s=produced.last_ack - produced.started,
            rss_joined=rss_joined,
            rss_paused=rss_paused,
            peak_rss=peak,
            peak_pending_bytes=peaks[0],
            peak_pending_changes=peaks[1],
            paused=paused,
            consumed=consumed,
            watched_s=watched,
        )


def _mib(value: float | None) -> float | None:
    return None if value is None else round(value / MIB, 1)


async def scenario(args: argparse.Namespace) -> list[Result]:
    started = time.monotonic()
    placement = args.placement
    sizes = [int(s) for s in args.sizes.split(",") if s]
    result = Result(
        "outage",
        f"7. Memory during a Campaign Monitor outage: {args.records:,} waiting records, "
        f"bulk {placement}",
        settings={
            "records": args.records,
            "partitions": args.partitions,
            "hold_s": args.hold,
            "placement": placement,
            "sizes": sizes,
        },
    )
    for size in sizes:
        print(f"   size {size:,} B: producing {args.records:,} records …", flush=True)
        run = await outage_run(
            size,
            records=args.records,
            partitions=args.partitions,
            hold_s=args.hold,
            placement=placement,
        )
        peak = _mib(run.peak_rss)
        result.add(
            Figure(
                f"peak RSS, {size // 1000} KB records",
                peak,
                "MiB",
                f"≤ {TARGET_MIB} MiB",
                at_most(peak, TARGET_MIB),
                note=(
                    f"{_mib(run.rss_joined)} MiB once joined, {_mib(run.rss_paused)} MiB up to "
                    f"the pause; pending peak "
                    f"{_mib(run.peak_pending_bytes)} MiB in {run.peak_pending_changes:,.0f} "
                    f"changes; {run.consumed:,.0f} of {run.records:,} records read; "
                    f"{'paused' if run.paused else 'never paused'}; mean value "
                    f"{run.value_bytes:,} B; produced in {run.produce_s:.0f} s"
                ),
            )
        )
    result.notes.append(
        "default settings: CMSYNC_MAX_PENDING 200,000 and CMSYNC_MAX_PENDING_BYTES 64 MiB; "
        "the outage lasts the whole run, so what is read stays pending"
    )
    return [result.finish(started)]


main = main_of(
    "python -m bench.outage",
    "Scenario 7: resident memory during a Campaign Monitor outage, against record size.",
    add_arguments,
    scenario,
)

if __name__ == "__main__":
    sys.exit(main())
