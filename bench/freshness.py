"""Scenario 6, freshness: a steady 2,000 events/s for 60 s with a generous rate limit (1000
requests/s, service and simulator); p50 and p99 of apply time − ``occurred_at``.

Every event is stamped with the wall time at which it is produced (``occurred_at``). 90 % are
entries of new addresses, 10 % exits of addresses that entered at least 10 s earlier (each
address enters once and exits at most once), so every event has exactly one list change to wait
for: the import row of its address, or the deletion of its address. The simulator notes the
wall time at which it handles each of those; freshness of an event is that time minus its
``occurred_at``. The service's own `cmsync_freshness_seconds` histogram is read too, as a
cross-check (its buckets are 1 s wide around the objective, so its quantiles are coarser).

The objective is p99 ≤ `CMSYNC_FLUSH_INTERVAL_S` + 2 s. Removals wait the flush interval by
design (sending one early forfeits coalescing), so p99 sits just above the interval.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from collections import deque

from bench.common import (
    Figure,
    Option,
    Result,
    at_most,
    bench_env,
    histogram_quantile,
    main_of,
    membership_event,
    options,
    produce_paced,
    quiet_collector,
    simulator,
    start_service,
    wait_committed,
)
from consumer.devtools.embedded_broker import running_broker

SEGMENT = "newsletter"
PARTITIONS = 2
EXIT_SHARE = 0.1
EXIT_AFTER_S = 10.0


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]


async def run(per_second: int, duration_s: float, rate: float, flush_interval_s: float) -> Result:
    started = time.monotonic()
    result = Result(
        "freshness",
        f"6. Freshness: {per_second:,} events/s for {duration_s:g} s, "
        f"{rate:g} requests/s permitted",
    )
    events: list[tuple[str, bool, int]] = []  # (address, entered, occurred_at_ms)
    entered_at: deque[tuple[float, int]] = deque()  # (wall s, profile) that may exit
    next_profile = 0
    exits_due = 0.0

    def make(_n: int, now_ms: int) -> tuple[bytes, bytes]:
        nonlocal next_profile, exits_due
        exits_due += EXIT_SHARE
        if exits_due >= 1 and entered_at and entered_at[0][0] <= now_ms / 1000 - EXIT_AFTER_S:
            exits_due -= 1
            _, i = entered_at.popleft()
            entered = False
        else:
            i = next_profile
            next_profile += 1
            entered_at.append((now_ms / 1000, i))
            entered = True
        events.append((f"user{i}@example.com", entered, now_ms))
        return membership_event(
            i, segment_id=SEGMENT, entered=entered, occurred_at_ms=now_ms, seed=6, serial=_n
        )

    async with contextlib.AsyncExitStack() as stack:
        await stack.enter_async_context(quiet_collector())
        broker = await stack.enter_async_context(running_broker())
        sim, base_url, (list_id,) = await stack.enter_async_context(
            simulator(rate, 1, per_address=True)
        )
        topic = "bench-freshness"
        env = await bench_env(
            stack,
            topic,
            PARTITIONS,
            bootstrap=broker.bootstrap,
            base_url=base_url,
            destinations=[("newsletter", SEGMENT, list_id)],
            rate_limit_rps=rate,
            CMSYNC_FLUSH_INTERVAL_S=f"{flush_interval_s:g}",
        )
        service = start_service(env, "freshness")
        try:
            await service.wait_joined()
            produced = await produce_paced(
                broker.bootstrap, topic, PARTITIONS, per_second, duration_s, make
            )

            await wait_committed([service], topic, produced.ends, within_s=120)
            metrics = await service.metrics()
        finally:
            await service.stop()
    imported: dict[str, float] = {}
    deleted: dict[str, float] = {}
    for wall, endpoint, address in sim.address_writes:
        book = imported if endpoint == "import" else deleted
        book.setdefault(address, wall)
    ages: list[float] = []
    adds: list[float] = []
    missing = 0
    for address, entered, occurred_ms in events:
        applied = (imported if entered else deleted).get(address)
        if applied is None:
            missing += 1
            continue
        ages.append(applied - occurred_ms / 1000)
        if entered:
            adds.append(ages[-1])
    objective = flush_interval_s + 2
    p50 = quantile(ages, 0.5) if ages else None
    p99 = quantile(ages, 0.99) if ages else None
    h50 = histogram_quantile(metrics, "cmsync_freshness_seconds", 0.5)
    h99 = histogram_quantile(metrics, "cmsync_freshness_seconds", 0.99)
    achieved = produced.records / (produced.last_ack - produced.started)
    result.add(
        Figure("events produced", produced.records, note=f"{achieved:,.0f}/s achieved"),
        Figure("events whose change was not seen applied", missing, "", "= 0", missing == 0),
        Figure("freshness p50 (simulator apply times)", p50, "s"),
        Figure(
            "freshness p99 (simulator apply times)",
            p99,
            "s",
            f"≤ {objective:g} s",
            at_most(p99, objective),
        ),
        Figure("freshness max", max(ages) if ages else None, "s"),
        Figure("entries only: p50 / p99", _pair(adds)),
        Figure(
            "service histogram p50 / p99",
            None if h50 is None or h99 is None else f"{h50:.2f} / {h99:.2f} s",
            note="interpolated in its buckets",
        ),
        Figure("requests sent", sim.requests(), note=f"429s {sim.throttled()}"),
    )
    result.settings = {
        "events_per_second": per_second,
        "duration_s": duration_s,
        "rate_limit_rps": rate,
        "flush_interval_s": flush_interval_s,
        "exit_share": EXIT_SHARE,
        "partitions": PARTITIONS,
        "requests_by_endpoint": sim.by_endpoint(),
    }
    return result.finish(started)


def _pair(values: list[float]) -> str | None:
    if not values:
        return None
    return f"{quantile(values, 0.5):.2f} / {quantile(values, 0.99):.2f} s"


add_arguments = options(
    Option("--per-second", 2000, "events per second", env="CMSYNC_BENCH_FRESHNESS_EPS"),
    Option("--duration", 60.0, "seconds of steady stream", env="CMSYNC_BENCH_FRESHNESS_S"),
    Option("--rate", 1000.0, "requests/s permitted"),
    Option(
        "--flush-interval",
        5.0,
        "the service's CMSYNC_FLUSH_INTERVAL_S; the default is the service's own",
    ),
)


async def scenario(args: argparse.Namespace) -> list[Result]:
    return [await run(args.per_second, args.duration, args.rate, args.flush_interval)]


main = main_of(
    "python -m bench.freshness", "Scenario 6: freshness at a steady rate.", add_arguments, scenario
)

if __name__ == "__main__":
    sys.exit(main())
