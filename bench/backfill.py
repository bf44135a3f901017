"""Scenario 9, backfill (issue 12): a destination added, by a reload, for a segment of 200,000
members the membership state already knows, while a second list's live changes stream.

`cmsync run` syncs a "live" segment to one list and keeps a big segment no destination takes
(``CMSYNC_STATE_KEEP=everything``). The destinations file then gains a destination for the big
segment and the process gets SIGHUP: no restart, no rebalance. From the signal, the new list
fills from the state, while live entries (new addresses of the live segment) keep arriving at
a steady rate on the same API key. Figures:

* backfill: import requests to the new list ÷ the import floor (⌈members / 1000⌉), and the
  time from the signal until the list holds every member ÷ the floor's time (those imports,
  plus the live list's requests meanwhile, at the permitted rate);
* the live list's freshness (simulator apply time − ``occurred_at``) while the backfill runs:
  p99 against `CMSYNC_FLUSH_INTERVAL_S` + 2 s.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import signal
import sys
import time
from pathlib import Path

from bench.common import (
    Figure,
    Option,
    Result,
    at_most,
    bench_env,
    destinations_toml,
    main_of,
    membership_event,
    options,
    produce,
    produce_paced,
    quiet_collector,
    simulator,
    start_service,
    wait_committed,
)
from bench.freshness import quantile
from consumer.devtools.embedded_broker import running_broker
from consumer.devtools.rig import wait_until

BIG, LIVE = "big-segment", "live-segment"
PARTITIONS = 4
IMPORT_ROWS = 1000
T0_MS = 1_764_417_600_000


async def run(members: int, live_per_second: float, rate: float, flush_interval_s: float) -> Result:
    started = time.monotonic()
    result = Result(
        "backfill",
        f"9. Backfill: a destination added for a segment of {members:,} members the state "
        f"knows, {live_per_second:g} live entries/s to another list, {rate:g} requests/s",
    )
    live_events: list[tuple[str, int]] = []  # (address, occurred_at_ms)
    first_live = 10_000_000  # live profiles' numbers, far from the big segment's

    def live(n: int, now_ms: int) -> tuple[bytes, bytes]:
        i = first_live + n
        live_events.append((f"user{i}@example.com", now_ms))
        return membership_event(
            i, segment_id=LIVE, entered=True, occurred_at_ms=now_ms, seed=9, serial=i
        )

    async with contextlib.AsyncExitStack() as stack:
        await stack.enter_async_context(quiet_collector())
        broker = await stack.enter_async_context(running_broker())
        sim, base_url, (live_list, filled_list) = await stack.enter_async_context(
            simulator(rate, 2, per_address=True)
        )
        topic = "bench-backfill"
        env = await bench_env(
            stack,
            topic,
            PARTITIONS,
            bootstrap=broker.bootstrap,
            base_url=base_url,
            destinations=[("live", LIVE, live_list)],
            rate_limit_rps=rate,
            CMSYNC_FLUSH_INTERVAL_S=f"{flush_interval_s:g}",
        )
        produced = await produce(
            broker.bootstrap,
            topic,
            PARTITIONS,
            (
                membership_event(i, segment_id=BIG, entered=True, occurred_at_ms=T0_MS + i)
                for i in range(members)
            ),
        )
        service = start_service(env, "backfill")
        try:
            await service.wait_joined()
            await wait_committed([service], topic, produced.ends, within_s=600)

            both = destinations_toml([("live", LIVE, live_list), ("filled", BIG, filled_list)])
            await asyncio.to_thread(Path(env["CMSYNC_DESTINATIONS_FILE"]).write_text, both)
            requests_before = sim.requests()
            signalled = time.monotonic()
            os.kill(service.pid, signal.SIGHUP)
            feeder = asyncio.create_task(
                produce_paced(broker.bootstrap, topic, PARTITIONS, live_per_second, 3600, live)
            )
            await wait_until(
                lambda: sim.active(filled_list) >= members,
                within_s=600,
                every_s=0.1,
                what="the new list filled",
                watch=[service],
            )
            filled_s = time.monotonic() - signalled
            requests = sim.requests() - requests_before
            feeder.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await feeder
            metrics = await service.metrics()
        finally:
            await service.stop()

    filled_imports = sim.list_writes.get(("import", filled_list), 0)
    floor_imports = math.ceil(members / IMPORT_ROWS)
    other_requests = requests - filled_imports
    floor_s = (floor_imports + other_requests) / rate
    applied = {
        address: wall for wall, endpoint, address in sim.address_writes if endpoint == "import"
    }
    ages = [
        applied[address] - occurred_ms / 1000
        for address, occurred_ms in live_events
        if address in applied and occurred_ms / 1000 <= time.time()
    ]
    seen = [a for a, _ in live_events if a in applied]
    p99 = quantile(ages, 0.99) if ages else None
    objective = flush_interval_s + 2
    result.add(
        Figure(
            "backfill import requests ÷ floor",
            filled_imports / floor_imports,
            "",
            "≤ 1.10",
            at_most(filled_imports / floor_imports, 1.10),
            note=f"{filled_imports} for {members:,} members",
        ),
        Figure(
            "backfill time ÷ floor time",
            filled_s / floor_s,
            "",
            "≤ 1.10",
            at_most(filled_s / floor_s, 1.10),
            note=f"{filled_s:.1f} s against {floor_s:.1f} s ({other_requests} other requests)",
        ),
        Figure(
            "live entries applied during the backfill", len(seen), note=f"{len(live_events)} sent"
        ),
        Figure("live list freshness p50", quantile(ages, 0.5) if ages else None, "s"),
        Figure("live list freshness p99", p99, "s", f"≤ {objective:g} s", at_most(p99, objective)),
        Figure(
            "backfill members sent (service metric)",
            metrics.value("cmsync_backfill_members_total", destination="filled"),
        ),
    )
    result.settings = {
        "members": members,
        "live_per_second": live_per_second,
        "rate_limit_rps": rate,
        "flush_interval_s": flush_interval_s,
        "partitions": PARTITIONS,
        "requests_by_endpoint": sim.by_endpoint(),
    }
    return result.finish(started)


add_arguments = options(
    Option("--members", 200_000, "members of the segment backfilled", env="CMSYNC_BENCH_BACKFILL"),
    Option("--live-per-second", 20.0, "live entries per second to the other list"),
    Option("--rate", 10.0, "requests/s permitted (service and simulator)"),
    Option("--flush-interval", 5.0, "the service's CMSYNC_FLUSH_INTERVAL_S"),
)


async def scenario(args: argparse.Namespace) -> list[Result]:
    return [await run(args.members, args.live_per_second, args.rate, args.flush_interval)]


main = main_of(
    "python -m bench.backfill",
    "Scenario 9: backfill of a destination added by a reload, with a live list beside it.",
    add_arguments,
    scenario,
)

if __name__ == "__main__":
    sys.exit(main())
