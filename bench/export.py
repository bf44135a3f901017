"""Scenario 2, the batch export, streamed, and scenario 5, the service's memory meanwhile.

1,000,000 profiles enter one segment mapped to one list; the simulator permits 10 requests/s
and the service's ceiling is the same (`CMSYNC_RATE_LIMIT_RPS=10`). The fewest requests are
1000 imports of 1000 rows: 100 s at 10/s.

How it runs: the bundled broker, the simulator in this process (recording when each write is
applied), the service as a subprocess (`python -m consumer run`, default settings otherwise).
The service is started and has joined its group *before* the first event is produced, so the
group join (~5 s on the bundled broker) is outside the timing. Time runs from the broker's
first acknowledgement of produced records ("the first event available") to the simulator
applying the last list change; the time until every offset is committed is shown too.
Memory: the service's resident set is sampled every 100 ms from its start to its exit.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import sys
import time
from dataclasses import dataclass

from bench.common import (
    MIB,
    Figure,
    Option,
    Result,
    ServiceProcess,
    at_most,
    bench_env,
    endpoints,
    main_of,
    membership_event,
    options,
    produce,
    quiet_collector,
    simulator,
    start_service,
    wait_committed,
    wait_until,
)
from consumer.devtools.embedded_broker import running_broker

SEGMENT = "all-customers"
START_MS = 1_764_417_600_000  # 2025-11-29T12:00:00Z


@dataclass
class DeliveryRun:
    """What one rate-bound delivery run measured."""

    profiles: int
    rate_rps: float
    instances: int
    partitions: int
    floor_requests: int
    requests: int
    throttled: int
    by_endpoint: dict[str, int]
    time_to_applied_s: float
    time_to_committed_s: float
    produce_s: float
    active: int
    peak_rss: list[int | None]
    rss_after_join: list[int | None]
    peak_pending: list[float]
    rss_series: list[list[tuple[float, float]]]  # per instance: (s since t0, MiB), every 5 s
    per_instance: list[dict[str, int]]  # from each service's /metrics at the end
    applied_memory_settings: int

    @property
    def floor_time_s(self) -> float:
        return self.floor_requests / self.rate_rps


async def delivery_run(
    *,
    profiles: int,
    rate_rps: float,
    instances: int = 1,
    partitions: int = 1,
    label: str = "export",
    extra_env: dict[str, str] | None = None,
) -> DeliveryRun:
    """`profiles` distinct profiles enter one segment → one list, at `rate_rps` permitted."""
    extra = dict(extra_env or {})
    async with contextlib.AsyncExitStack() as stack:
        await stack.enter_async_context(quiet_collector())
        broker = await stack.enter_async_context(running_broker())
        sim, base_url, (list_id,) = await stack.enter_async_context(simulator(rate_rps, 1))
        topic = f"bench-{label}"
        env = await bench_env(
            stack,
            topic,
            partitions,
            bootstrap=broker.bootstrap,
            base_url=base_url,
            destinations=[("customers", SEGMENT, list_id)],
            rate_limit_rps=rate_rps,
            **extra,
        )
        services = [start_service(env, f"{label}-{n}") for n in range(instances)]
        try:
            # Every instance has joined (and, with several, the group has settled: the last
            # one to join was assigned its partitions in the rebalance that included it).
            for service in services:
                await service.wait_joined()
            if instances > 1:
                await asyncio.sleep(2.0)
                for service in services:
                    await service.wait_joined()
            rss_after_join = [s.peak_rss(time.monotonic() - 0.5) for s in services]

            events = (
                membership_event(
                    i, segment_id=SEGMENT, entered=True, occurred_at_ms=START_MS + i, seed=2
                )
                for i in range(profiles)
            )
            peak_pending = [0.0] * instances
            monitor = asyncio.create_task(_watch_pending(services, peak_pending))
            produced = await produce(broker.bootstrap, topic, partitions, events)
            t0 = produced.first_ack
            floor = math.ceil(profiles / 1000)
            timeout = floor / rate_rps * 4 + 120

            async def applied() -> bool:
                return sim.active(list_id) >= profiles

            await wait_until(
                applied, within_s=timeout, every_s=0.1, what="all profiles active", watch=services
            )
            t_applied = sim.last_write() or time.monotonic()

            await wait_committed(services, topic, produced.ends, within_s=60, every_s=0.1)
            t_committed = time.monotonic()
            monitor.cancel()
            per_instance = []
            for service in services:
                metrics = await service.metrics()
                per_instance.append(
                    {
                        "requests": int(metrics.value("cmsync_api_requests_total")),
                        "throttled": int(metrics.value("cmsync_api_throttled_total")),
                        "applied": int(metrics.value("cmsync_changes_applied_total")),
                    }
                )
            rss_series = [_rss_series(s, t0) for s in services]
        finally:
            for service in services:
                await service.stop()
        return DeliveryRun(
            profiles=profiles,
            rate_rps=rate_rps,
            instances=instances,
            partitions=partitions,
            floor_requests=floor,
            requests=sim.requests(),
            throttled=sim.throttled(),
            by_endpoint=sim.by_endpoint(),
            time_to_applied_s=t_applied - t0,
            time_to_committed_s=t_committed - t0,
            produce_s=produced.last_ack - produced.started,
            active=sim.active(list_id),
            peak_rss=[s.peak_rss() for s in services],
            rss_after_join=rss_after_join,
            peak_pending=peak_pending,
            rss_series=rss_series,
            per_instance=per_instance,
            applied_memory_settings=int(extra.get("CMSYNC_APPLIED_MEMORY", "1000000")),
        )


async def _watch_pending(services: list[ServiceProcess], peaks: list[float]) -> None:
    """Peak of each service's pending changes, from /metrics every 0.5 s."""
    while True:
        for n, service in enumerate(services):
            with contextlib.suppress(Exception):
                metrics = await service.metrics()
                peaks[n] = max(peaks[n], metrics.value("cmsync_pending_changes"))
        await asyncio.sleep(0.5)


def _rss_series(service: ServiceProcess, t0: float) -> list[tuple[float, float]]:
    out: list[tuple[float, float]] = []
    for t, rss in service.rss_samples:
        if not out or t - t0 >= out[-1][0] + 5:
            out.append((round(t - t0, 1), round(rss / MIB, 1)))
    return out


def export_results(
    run: DeliveryRun, export: Result, memory: Result, started: float
) -> tuple[Result, Result]:
    """Scenario 2's and scenario 5's tables from one run."""
    floor_time = run.floor_time_s
    export.add(
        Figure("fewest requests (floor)", run.floor_requests),
        Figure("requests sent", run.requests, note=endpoints(run.by_endpoint)),
        Figure(
            "requests / floor",
            run.requests / run.floor_requests,
            "×",
            "≤ 1.02",
            at_most(run.requests / run.floor_requests, 1.02),
        ),
        Figure("floor time", floor_time, "s"),
        Figure("time: first event available → last change applied", run.time_to_applied_s, "s"),
        Figure(
            "time / floor time",
            run.time_to_applied_s / floor_time,
            "×",
            "≤ 1.10",  # issue 11 (was 1.15)
            at_most(run.time_to_applied_s / floor_time, 1.10),
        ),
        Figure("time until everything was through", run.time_to_committed_s, "s"),
        Figure("429 responses", run.throttled, "", "= 0", run.throttled == 0),
        Figure("producing the records took", run.produce_s, "s", note="overlaps the sync"),
    )
    export.settings = {
        "profiles": run.profiles,
        "rate_limit_rps": run.rate_rps,
        "partitions": run.partitions,
        "service": "subprocess `python -m consumer run`, defaults otherwise",
        "timing": "joined before producing; first broker ack → last write applied",
    }
    export.finish(started)
    peak = run.peak_rss[0]
    peak_mib = None if peak is None else peak / MIB
    base = run.rss_after_join[0]
    memory.add(
        Figure("peak RSS", peak_mib, "MiB", "≤ 300", at_most(peak_mib, 300)),
        Figure("RSS after joining (before any event)", None if base is None else base / MIB, "MiB"),
        Figure("peak pending changes (sampled)", run.peak_pending[0]),
        Figure("CMSYNC_APPLIED_MEMORY", run.applied_memory_settings, "entries"),
    )
    memory.settings = {
        "sampling": "psutil RSS every 100 ms, service start to exit",
        "rss_mib_every_5s_since_first_event": run.rss_series[0],
    }
    memory.finish(started)
    return export, memory


add_arguments = options(
    Option(
        "--profiles", 1_000_000, "profiles entering the segment", env="CMSYNC_BENCH_EXPORT_PROFILES"
    ),
    Option(
        "--rate",
        10.0,
        "requests/s the simulator permits and the service's ceiling",
        env="CMSYNC_BENCH_EXPORT_RPS",
    ),
)


def new_results(profiles: int, rate: float) -> tuple[Result, Result]:
    export = Result(
        "export",
        f"2. The batch export, streamed: {profiles:,} profiles → 1 list at {rate:g} requests/s",
    )
    memory = Result("memory", "5. Memory: peak resident set of the service during scenario 2")
    return export, memory


async def run(profiles: int, rate: float) -> list[Result]:
    started = time.monotonic()
    export, memory = new_results(profiles, rate)
    delivery = await delivery_run(profiles=profiles, rate_rps=rate)
    return list(export_results(delivery, export, memory, started))


async def scenario(args: argparse.Namespace) -> list[Result]:
    return await run(args.profiles, args.rate)


main = main_of(
    "python -m bench.export", __doc__.splitlines()[0] if __doc__ else "", add_arguments, scenario
)


if __name__ == "__main__":
    sys.exit(main())
