"""Scenario 8, consent at scale (issue 13): a list with 100,000 Unsubscribed and 20,000 Bounced
members, the service's flusher starting on it at the default ceiling of 10 requests/s.

Measured: the listing requests of the first full read against the pages it needs (target:
pages + a small constant), how long it takes, and the writes applied while it runs (adds go on,
needing no answer; small removal batches are answered per address), then the requests each
later removal batch costs for its incremental reads. In process: the real flusher, buffer,
gateway and consent knowledge against the simulator over HTTP; no broker is needed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import sys
import time
from collections.abc import Iterable

import aiohttp

from bench.common import Figure, Option, Result, at_most, main_of, options
from consumer.buffer import AppliedMemory, Change, DestinationBuffer, Position
from consumer.campaign_monitor.client import MAX_PAGE_SIZE, ApiKey, CampaignMonitorClient
from consumer.consent import ConsentBook
from consumer.devtools.rig import load_destinations
from consumer.devtools.simulator import Simulator, SimulatorConfig, serve
from consumer.flusher import DestinationFlusher
from consumer.gateway import ApiGateway
from consumer.membership.model import Desired
from consumer.ratelimit import AimdRateLimiter
from consumer.rows import Wanted

API_KEY = "bench-consent-key"
LIST_ID = "0123456789abcdef0123456789abcdef"
LISTING_ENDPOINTS = ("members",)


class _NoLetters:
    async def send(self, letter: object) -> None:
        raise AssertionError("nothing is rejected here")


async def run(unsubscribed: int, bounced: int, rate: float, batches: int) -> Result:
    started = time.monotonic()
    result = Result(
        "consent",
        f"8. Consent: {unsubscribed:,} Unsubscribed + {bounced:,} Bounced, {rate:g} requests/s",
    )
    sim = Simulator(SimulatorConfig(api_keys=(API_KEY,)))
    sim.add_list(LIST_ID, unsubscribe_setting="OnlyThisList")
    for n in range(unsubscribed):
        sim.force_state(LIST_ID, f"u{n}@example.com", "Unsubscribed")
    for n in range(bounced):
        sim.force_state(LIST_ID, f"b{n}@example.com", "Bounced")
    for n in range(batches * 5):
        sim.force_state(LIST_ID, f"member{n}@example.com", "Active")
    pages = math.ceil(unsubscribed / MAX_PAGE_SIZE) + math.ceil(bounced / MAX_PAGE_SIZE)

    served: list[tuple[float, str]] = []
    stop_observing = sim.observe(lambda s: served.append((time.monotonic(), s.endpoint)))
    toml = (
        f'[[destination]]\nname = "news"\nsegment_id = "seg"\nlist_id = "{LIST_ID}"\n'
        'email_field = "email"\n'
    )
    dest = load_destinations(toml, API_KEY)[0]
    released: list[Position] = []
    changed = asyncio.Event()

    def release(positions: Iterable[Position]) -> None:
        released.extend(positions)
        changed.set()

    async with serve(sim) as base_url, aiohttp.ClientSession() as session:
        client = CampaignMonitorClient(base_url, ApiKey(API_KEY), session=session)
        gateway = ApiGateway("CMSYNC_CM_API_KEY", client, AimdRateLimiter(rate))
        consent = ConsentBook({"news": gateway}, refresh_s=300.0).for_destination(dest)
        buffer = DestinationBuffer("news", AppliedMemory(10_000), flush_interval_s=1.0)
        flusher = DestinationFlusher(
            destination=dest,
            buffer=buffer,
            gateway=gateway,
            consent=consent,
            dead_letters=_NoLetters(),
            release=release,
            source_topic="membership",
        )
        seq = 0

        def offer(address: str, active: bool) -> None:
            nonlocal seq
            seq += 1
            desired = Desired(LIST_ID, address, active, {}, seq)
            change = Change(address, active, seq, seq, seq, Wanted(desired, 0), seq)
            buffer.offer(change, time.monotonic())
            flusher.wake()

        async def until_released(count: int) -> None:
            while len(released) < count:
                changed.clear()
                await changed.wait()

        t0 = time.monotonic()
        task = asyncio.create_task(flusher.run())
        try:
            # While the first full read runs: 200 new members, and a few exits in batches
            # of 5 (answered per address).
            for n in range(200):
                offer(f"new{n}@example.com", True)
            for n in range(5):
                offer(f"member{n}@example.com", False)
            # More than the per-address limit: this waits for the first full read.
            await consent.opted_out(
                [f"x{n}@example.com" for n in range(50)], since=t0, activating=False
            )
            warm_s = time.monotonic() - t0
            during = [(t, e) for t, e in served if t - t0 <= warm_s]
            listing = sum(1 for _, e in during if e in LISTING_ENDPOINTS)
            writes = {e: sum(1 for _, x in during if x == e) for e in ("import", "delete", "get")}
            await until_released(205)
            # Later removal batches: each asks the incremental reads first.
            before = len(served)
            for b in range(1, batches):
                for n in range(b * 5, b * 5 + 5):
                    offer(f"member{n}@example.com", False)
                await until_released(205 + b * 5)
                await asyncio.sleep(1.1)  # past the freshness of the last read
            later = [e for _, e in served[before:]]
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            stop_observing()
    later_batches = batches - 1
    later_listing = sum(1 for e in later if e in LISTING_ENDPOINTS)
    result.add(
        Figure("listing pages needed", pages, "pages"),
        Figure(
            "listing requests of the first full read",
            listing,
            "requests",
            target=f"≤ pages + 2 ({pages + 2})",
            met=at_most(listing, pages + 2),
        ),
        Figure("first full read", round(warm_s, 1), "s"),
        Figure("imports sent meanwhile", writes["import"], "requests"),
        Figure("deletes sent meanwhile", writes["delete"], "requests"),
        Figure("per-address reads meanwhile", writes["get"], "requests"),
        Figure(
            "listing requests per later removal batch (5 exits)",
            round(later_listing / max(1, later_batches), 2),
            "requests",
            target="≤ 3",
            met=at_most(later_listing / max(1, later_batches), 3),
        ),
    )
    result.settings = {
        "unsubscribed": unsubscribed,
        "bounced": bounced,
        "rate": rate,
        "batches": batches,
    }
    return result.finish(started)


add_arguments = options(
    Option("--unsubscribed", 100_000, "Unsubscribed members", "CMSYNC_BENCH_CONSENT_UNSUBSCRIBED"),
    Option("--bounced", 20_000, "Bounced members", "CMSYNC_BENCH_CONSENT_BOUNCED"),
    Option("--rate", 10.0, "requests/s ceiling"),
    Option("--batches", 6, "removal batches of 5 (the first during the full read)"),
)


async def scenario(args: argparse.Namespace) -> list[Result]:
    return [await run(args.unsubscribed, args.bounced, args.rate, args.batches)]


main = main_of("python -m bench.consent", "Scenario 8: consent at scale.", add_arguments, scenario)

if __name__ == "__main__":
    sys.exit(main())
