"""Scenario 4, scale-out: scenario 2 (1,000,000 profiles → one list, 10 requests/s permitted)
with two service processes in one consumer group, sharing one API key, on a topic with two
partitions. Each process limits itself to the same ceiling (`CMSYNC_RATE_LIMIT_RPS=10`), so
together they offer twice what the key allows until the simulator's 429s and rate headers push
them back (AIMD); the figure is how close to the floor time they get, and at what cost in 429s.

Both processes are started and have joined (the group has settled with one partition each)
before the first event is produced; time runs from the first acknowledgement to the last list
change applied.
"""

from __future__ import annotations

import argparse
import sys
import time

from bench.common import MIB, Figure, Option, Result, at_most, main_of, options
from bench.export import DeliveryRun, delivery_run


def results(run: DeliveryRun, result: Result, started: float) -> Result:
    floor_time = run.floor_time_s
    ratio = run.time_to_applied_s / floor_time
    result.add(
        Figure("fewest requests (floor)", run.floor_requests),
        Figure(
            "requests sent (incl. 429s)",
            run.requests,
            note=", ".join(f"{k} {v}" for k, v in sorted(run.by_endpoint.items())),
        ),
        Figure("429 responses", run.throttled, note="reported; no target"),
        Figure("floor time", floor_time, "s"),
        Figure("time: first event available → last change applied", run.time_to_applied_s, "s"),
        Figure("time / floor time", ratio, "×", "≤ 1.25", at_most(ratio, 1.25)),
        Figure("time until everything was through", run.time_to_committed_s, "s"),
        Figure(
            "requests per instance (its /metrics)",
            " / ".join(str(i["requests"]) for i in run.per_instance),
            note="429s " + " / ".join(str(i["throttled"]) for i in run.per_instance),
        ),
        Figure(
            "peak RSS per instance",
            " / ".join("—" if r is None else f"{r / MIB:.0f}" for r in run.peak_rss) + " MiB",
        ),
    )
    result.settings = {
        "profiles": run.profiles,
        "rate_limit_rps": run.rate_rps,
        "instances": run.instances,
        "partitions": run.partitions,
        "per_instance": run.per_instance,
        "timing": "all joined before producing; first broker ack → last write applied",
    }
    return result.finish(started)


async def run(profiles: int, rate: float, instances: int) -> Result:
    started = time.monotonic()
    result = Result(
        "scaleout",
        f"4. Scale-out: scenario 2 with {instances} processes sharing one API key "
        f"({profiles:,} profiles, {rate:g} requests/s)",
    )
    delivery = await delivery_run(
        profiles=profiles,
        rate_rps=rate,
        instances=instances,
        partitions=max(2, instances),
        label="scaleout",
    )
    return results(delivery, result, started)


add_arguments = options(
    Option(
        "--profiles",
        1_000_000,
        "profiles entering the segment",
        env="CMSYNC_BENCH_SCALEOUT_PROFILES",
    ),
    Option(
        "--rate",
        10.0,
        "requests/s the simulator permits and each process's ceiling",
        env="CMSYNC_BENCH_EXPORT_RPS",
    ),
    Option("--instances", 2, "service processes"),
)


async def scenario(args: argparse.Namespace) -> list[Result]:
    return [await run(args.profiles, args.rate, args.instances)]


main = main_of(
    "python -m bench.scaleout",
    "Scenario 4: two processes sharing one API key.",
    add_arguments,
    scenario,
)

if __name__ == "__main__":
    sys.exit(main())
