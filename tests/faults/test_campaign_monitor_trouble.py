"""Scenario 5 — Campaign Monitor trouble: throttling, errors, dropped connections, slow
answers and a total outage.

Guarantee 5 (polite): requests per API key stay under CMSYNC_RATE_LIMIT_RPS, slow down on 429
and honour X-RateLimit-* headers — and nothing is lost meanwhile (every list ends exact, every
record is committed). Measured from the simulator's side:
- the peak number of requests in any 1-second window, from the arrival times of every request
  carrying the key (the limiter paces sends at the ceiling with no burst, so a window holds at
  most `CEILING` sends; the +1 allowed is for arrival jitter on a shared machine: requests sent
  1/CEILING s apart can arrive closer);
- "no retry storm": refused attempts (429, 5xx, dropped) against the successful ones, and all
  requests against the fewest that could reach the same lists (`fewest_requests`: one import
  per 1000 adds, one call per removal, per list — a floor the streaming service cannot reach,
  since it flushes every interval, but the ratio shows the overhead);
- the permitted rate (`cmsync_permitted_rate` on /metrics) drops during a 429 storm and climbs
  back to the ceiling once the storm is over (additive increase needs successful traffic, so a
  trickle of changes keeps flowing).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from pathlib import Path

import pytest

from consumer.devtools.simulator import FaultConfig, SimulatorConfig
from consumer.devtools.synthetic import fewest_requests
from tests.faults.support import (
    API_KEY,
    CHAOS,
    FaultRig,
    ServiceProcess,
    change,
    note,
    peak_per_window,
    scaled,
    stream,
    unpaced_requests,
)

CEILING = 10  # CMSYNC_RATE_LIMIT_RPS in the storm tests
WRITES = ("import", "delete", "unsubscribe")


def fewest(rig: FaultRig) -> int:
    records = rig.records()
    return sum(sum(fewest_requests(records, d.segment_id)) for d in rig.dests)


def counts(rig: FaultRig, endpoints: tuple[str, ...] = WRITES) -> Counter[str]:
    out: Counter[str] = Counter()
    for endpoint, by_status in rig.sim.request_counts().items():
        if endpoint in endpoints:
            out.update(by_status)
    return out


def ok(c: Counter[str]) -> int:
    return sum(n for status, n in c.items() if status.startswith("2") or status == "400")


async def scrape_rates(proc: ServiceProcess, into: list[tuple[float, float]]) -> None:
    while proc.alive():
        with contextlib.suppress(Exception):
            metrics = await proc.metrics()
            rate = metrics.value("cmsync_permitted_rate", api_key="CMSYNC_CM_API_KEY")
            into.append((time.monotonic(), rate))
        await asyncio.sleep(0.2)


@pytest.mark.parametrize(
    "headers",
    [
        pytest.param(True, id="rate-headers", marks=pytest.mark.slow(45)),
        pytest.param(False, id="no-rate-headers", marks=pytest.mark.slow(40)),
    ],
)
async def test_429_storm_stays_under_the_ceiling_and_recovers(
    kafka_bootstrap: str, tmp_path: Path, headers: bool
) -> None:
    sim_rate = 4.0  # below the service's ceiling: the service will be throttled
    config = SimulatorConfig(
        api_keys=(API_KEY,), rate_limit_rps=sim_rate, rate_burst=4, rate_headers=headers
    )
    # The consent listing is re-read every 3 s, and "news" has 2500 people who unsubscribed
    # themselves: three pages a listing, which must be paced like every other request.
    env = {"CMSYNC_RATE_LIMIT_RPS": str(CEILING), "CMSYNC_CONSENT_REFRESH_S": "3"}
    records = stream(scaled(45, 250), seed=51)
    async with FaultRig(kafka_bootstrap, tmp_path, sim_config=config, env=env) as rig:
        for i in range(2500):
            rig.sim.force_state(rig.list_ids["news"], f"gone{i}@example.org", "Unsubscribed")
        proc = rig.spawn("svc")
        await rig.wait_assigned(proc)
        rates: list[tuple[float, float]] = []
        scraper = asyncio.create_task(scrape_rates(proc, rates))
        started = time.monotonic()
        await rig.produce(records)
        await rig.wait_all_committed(scaled(90, 300), [proc])
        storm_s = time.monotonic() - started
        storm = counts(rig)
        assert rig.list_problems() == {}
        floor = fewest(rig)
        lowest = min((r for _, r in rates), default=float(CEILING))

        # The storm is over: a trickle of changes (well under the simulator's limit) lets the
        # limiter earn its rate back.
        calm_from = time.monotonic()
        at = max(r.occurred_at_ms for r in records) + 60_000
        i = 0

        async def recovered() -> bool:
            nonlocal i
            i += 1
            await rig.produce([change(f"trickle{i}@example.com", segment="seg-b", at_ms=at + i)])
            return bool(rates) and rates[-1][1] >= CEILING

        await rig.wait_for(
            recovered, 60, "the permitted rate back at the ceiling", [proc], every_s=0.6
        )
        recovered_in = time.monotonic() - calm_from
        await rig.wait_all_committed(60, [proc])
        await asyncio.sleep(0.5)
        unpaced = await unpaced_requests(rig.sim, proc)
        proc.terminate()
        assert await proc.wait(30) == 0, proc.tail()
        scraper.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await scraper
        assert rig.list_problems() == {}

        peak = peak_per_window(rig.sim.request_times(API_KEY))
        throttled = storm["429"]
        listings = sum(rig.sim.request_counts().get("members", {}).values())
        note(
            f"429 storm ({'with' if headers else 'without'} rate headers): simulator allows "
            f"{sim_rate:g}/s, ceiling {CEILING}/s; {len(records)} records synced in "
            f"{storm_s:.1f} s with {ok(storm)} successful writes and {throttled} 429s "
            f"(fewest possible {floor}); peak {peak} requests in 1 s; permitted rate fell to "
            f"{lowest:.2f}/s and was back at {CEILING}/s {recovered_in:.1f} s after the storm; "
            f"{listings} consent listing pages"
        )
        assert unpaced == 0, f"{unpaced} requests bypassed the limiter"
        assert peak <= CEILING + 1, f"{peak} requests in one second, ceiling {CEILING}"
        assert throttled <= ok(storm), f"retry storm: {throttled} 429s for {ok(storm)} successes"
        if headers:
            # X-RateLimit-Remaining / -Reset pace the service before the bucket runs dry.
            assert peak <= sim_rate + 4 + 1  # the simulator's burst, plus arrival jitter
        else:
            assert throttled > 0, "no 429 at all: the scenario tested nothing"
            assert lowest < CEILING, "the limiter never slowed down"


@pytest.mark.slow(35)
async def test_errors_drops_and_latency_spikes(kafka_bootstrap: str, tmp_path: Path) -> None:
    """20 % 5xx, then 10-second latency spikes, then dropped connections — one phase each,
    each with its own part of the stream."""
    ceiling = 50
    env = {"CMSYNC_RATE_LIMIT_RPS": str(ceiling), "CMSYNC_CONSENT_REFRESH_S": "300"}
    records = stream(scaled(450, 1500), seed=52)
    third = len(records) // 3
    parts = [records[:third], records[third : 2 * third], records[2 * third :]]
    phases = [
        ("20 % 5xx", FaultConfig(p_500=0.1, p_503=0.1)),
        ("10 s latency spikes", FaultConfig(latency_s=10.0, p_latency=0.1)),
        ("15 % dropped connections", FaultConfig(p_drop=0.15)),
    ]
    config = SimulatorConfig(api_keys=(API_KEY,), seed=3)
    async with FaultRig(kafka_bootstrap, tmp_path, sim_config=config, env=env) as rig:
        proc = rig.spawn("svc")
        await rig.wait_assigned(proc)
        for (name, faults), part in zip(phases, parts, strict=True):
            rig.sim.reset_stats()
            before = await proc.metrics()
            timeouts_before = before.value("cmsync_api_requests_total", status="0")
            requests_before = before.value("cmsync_api_requests_total")
            rig.sim.set_faults(faults)
            started = time.monotonic()
            await rig.produce(part)
            await rig.wait_all_committed(scaled(90, 240), [proc])
            took = time.monotonic() - started
            rig.sim.set_faults(FaultConfig())
            await asyncio.sleep(0.5)
            unpaced = await unpaced_requests(rig.sim, proc, requests_before)
            phase = counts(rig, (*WRITES, "members"))
            failed = sum(n for s, n in phase.items() if s.startswith("5") or s == "dropped")
            floor = sum(sum(fewest_requests(part, d.segment_id)) for d in rig.dests)
            peak = peak_per_window(rig.sim.request_times(API_KEY))
            status_0 = (await proc.metrics()).value(
                "cmsync_api_requests_total", status="0"
            ) - timeouts_before
            note(
                f"{name}: {len(part)} records synced in {took:.1f} s; requests {dict(phase)} "
                f"(fewest possible writes {floor}); peak {peak}/s; no-response errors seen by "
                f"the service {status_0:.0f}; sent around the limiter {unpaced:.0f}"
            )
            assert rig.list_problems() == {}, name
            assert failed <= ok(phase), f"{name}: retry storm ({failed} failed, {ok(phase)} ok)"
            assert unpaced == 0, f"{name}: {unpaced} requests bypassed the limiter"
            # At 50/s, arrival jitter on a loaded machine moves a request or two between
            # windows; the exact check is the one above (every request took a limiter slot).
            assert peak <= ceiling * 1.1, f"{name}: {peak} requests in one second"
            if "latency" in name:
                assert status_0 == 0, "a slow answer timed out and was retried"
        proc.terminate()
        assert await proc.wait(30) == 0, proc.tail()


OUTAGE_S = 60 if CHAOS else 12


@pytest.mark.slow(50)
async def test_total_outage(kafka_bootstrap: str, tmp_path: Path) -> None:
    """Campaign Monitor answers 503 to everything for OUTAGE_S (60 s under `make chaos`): the
    service holds its changes and offsets, retries with backoff (no storm), and catches up
    once the outage is over. Then a second outage, and SIGTERM during it: the drain cannot
    finish, yet the service exits 0 within its budget, having committed nothing unapplied;
    the next instance applies what was left."""
    budget = 8.0
    env = {
        "CMSYNC_RATE_LIMIT_RPS": "50",
        "CMSYNC_CONSENT_REFRESH_S": "300",
        "CMSYNC_SHUTDOWN_BUDGET_S": str(budget),
    }
    records = stream(scaled(300, 1000), seed=53)
    third = len(records) // 3
    parts = [records[:third], records[third : 2 * third], records[2 * third :]]
    config = SimulatorConfig(api_keys=(API_KEY,), seed=4)
    async with FaultRig(kafka_bootstrap, tmp_path, sim_config=config, env=env) as rig:
        proc = rig.spawn("svc")
        await rig.wait_assigned(proc)
        await rig.produce(parts[0])
        await rig.wait_all_committed(60, [proc])

        rig.sim.reset_stats()
        rig.sim.set_faults(FaultConfig(outage=True))
        await rig.produce(parts[1])
        await asyncio.sleep(OUTAGE_S)
        during = counts(rig, (*WRITES, "members"))
        # An outage holds no offset: the membership state owes the changes to the lists.
        assert await rig.committed() == {p: rig.ends.get(p, 0) for p in range(rig.partitions)}
        assert proc.alive(), proc.tail()
        rig.sim.set_faults(FaultConfig())
        over_at = time.monotonic()
        await rig.wait_all_committed(OUTAGE_S + 60, [proc])
        recovered_in = time.monotonic() - over_at
        assert rig.list_problems() == {}
        attempts = sum(during.values())
        floor = sum(sum(fewest_requests(parts[1], d.segment_id)) for d in rig.dests)
        peak = peak_per_window(rig.sim.request_times(API_KEY))

        # SIGTERM in the middle of a second outage.
        rig.sim.set_faults(FaultConfig(outage=True))
        await rig.produce(parts[2])
        total = len(parts[0]) + len(parts[1]) + len(parts[2])

        async def read_everything() -> bool:
            return (await proc.metrics()).value("cmsync_events_consumed_total") >= total

        await rig.wait_for(read_everything, 30, "the last part read", [proc])
        await asyncio.sleep(1)
        sent_at = time.monotonic()
        proc.terminate()
        code = await proc.wait(budget + 30)
        took = time.monotonic() - sent_at
        assert code == 0, proc.tail()
        assert took <= budget, f"exit took {took:.2f} s, budget {budget} s"
        rig.sim.set_faults(FaultConfig())
        successor = rig.spawn("successor")
        await rig.wait_all_committed(90, [successor])
        successor.terminate()
        assert await successor.wait(30) == 0, successor.tail()
        assert rig.list_problems() == {}
        note(
            f"outage {OUTAGE_S} s: {attempts} requests during the outage (all 503) for a "
            f"part needing at least {floor} writes; synced {recovered_in:.1f} s after it "
            f"ended; peak {peak}/s. SIGTERM during a second outage: exit {code} after "
            f"{took:.1f} s (budget {budget:.0f} s), the state owed the rest, the successor "
            f"synced the rest"
        )
        assert attempts > 0
        # Backoff, not the limiter, bounds the retries: far below the permitted rate.
        assert attempts <= 50 * OUTAGE_S / 4, f"retry storm: {attempts} requests"
