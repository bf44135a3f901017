"""Scenario 10, reconcile (issue 12): a list of 1,000,000 members with 1 % drift, repaired by
`cmsync reconcile` through the running service at 10 requests/s.

The drift: 0.5 % of the members missing from the list, 0.4 % with a custom field changed by
hand (stale), and 0.1 % as many people added by hand (extra, removed: ``extras = "remove"``).
The fewest requests are the listing pages (1,000 rows a page of the Active members, one page
each of the Deleted, Unsubscribed and Bounced ones) plus the repairs (one import per 1,000
missing or stale, one delete per extra); at 10 requests/s that is the floor's time.

How it runs: the bundled broker, the simulator in this process, the service and the command
as subprocesses (`cmsync run`, `cmsync reconcile`). Running the service through a million
events first would take most of the run, so both sides are seeded directly: the simulator's
list as the sync would have written it (then the drift), and the membership state's addresses
changelog as the service writes it (every member held, applied, nothing owed). The service is
started and has restored that state before the timing starts. Time runs from the start of the
command to the simulator applying the last repair; requests are every API request the
simulator answered meanwhile (the command's and the service's), against the floor.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import psutil
from aiokafka import AIOKafkaProducer

from bench.common import (
    MIB,
    REPO,
    Figure,
    Option,
    Result,
    at_most,
    bench_env,
    endpoints,
    main_of,
    options,
    quiet_collector,
    simulator,
    start_service,
    wait_until,
)
from consumer.campaign_monitor.client import MAX_PAGE_SIZE
from consumer.devtools import _simstate as model
from consumer.devtools.embedded_broker import running_broker
from consumer.devtools.rig import DEMO_FIELDS, Dest
from consumer.devtools.simulator import Served, Simulator
from consumer.membership import changelog
from consumer.membership.changelog import InternalTopics, ensure_internal_topics
from consumer.membership.codec import address_key, encode_address, fingerprint
from consumer.membership.model import AddressState, Applied, Holding

SEGMENT = "all-customers"
DESTINATION = "bench-0"
T0_MS = 1_764_417_600_000
#: The drift, as shares of the members: missing from the list, a field changed by hand, and
#: people added by hand.
MISSING, STALE, EXTRA = 0.005, 0.004, 0.001


def _fields(i: int) -> dict[str, Any]:
    return {"full_name": f"Person {i}", "city": f"City {i % 97}"}


def _address(i: int) -> str:
    return f"member{i:07d}@example.com"


def seed_list(sim: Simulator, list_id: str, members: int) -> tuple[int, int, int]:
    """The list as the sync would have written it, then the drift; returns the counts of
    missing, stale and extra addresses."""
    lst = sim.state.lists[list_id]
    now = int(time.time())
    missing = int(members * MISSING)
    stale = int(members * STALE)
    extra = int(members * EXTRA)

    def put(email: str, name: str, city: str) -> None:
        lst.subscribers[email] = model.Subscriber(
            email, name, model.ACTIVE, ("City", city), "", now, now
        )

    for i in range(missing, members):  # the first `missing` are gone
        fields = _fields(i)
        city = "Changed by hand" if i < missing + stale else fields["city"]
        put(_address(i), fields["full_name"], city)
    for k in range(extra):
        put(f"hand{k:07d}@example.com", f"Added by hand {k}", "Nowhere")
    lst.counts[model.ACTIVE] += len(lst.subscribers)
    lst.versions[model.ACTIVE] += 1
    return missing, stale, extra


async def seed_state(bootstrap: str, topic: str, list_id: str, members: int) -> None:
    """Stage 2's state as the service writes it: every member holding its address, applied."""
    topics = InternalTopics.of_group(topic)  # bench_env's group is the topic's name
    await ensure_internal_topics({"bootstrap_servers": bootstrap}, topic, topics)

    def records() -> Any:
        for i in range(members):
            fields = _fields(i)
            state = AddressState(
                {(SEGMENT, f"p{i}"): Holding((T0_MS, i), True, fields, 0)},
                revision=1,
                applied=Applied.ACTIVE,
                applied_fingerprint=fingerprint(fields),
            )
            yield address_key(list_id, _address(i)), encode_address(state)

    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5)
    await producer.start()
    try:
        await changelog.send_batched(producer, topics.addresses_changelog, 0, records())
    finally:
        await producer.stop()


async def reconcile_command(env: dict[str, str]) -> tuple[int, str, str, int]:
    """`cmsync reconcile` as a child process: (exit code, stdout, stderr, peak resident
    bytes, sampled every 200 ms)."""
    inherited = {k: v for k, v in os.environ.items() if not k.startswith("CMSYNC_")}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "consumer",
        "reconcile",
        env={**inherited, **env},
        cwd=REPO,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    peak = 0

    async def sample() -> None:
        nonlocal peak
        with contextlib.suppress(psutil.Error):
            process = psutil.Process(proc.pid)
            while True:
                peak = max(peak, process.memory_info().rss)
                await asyncio.sleep(0.2)

    sampler = asyncio.create_task(sample())
    out, err = await proc.communicate()
    sampler.cancel()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode(), peak


async def run(members: int, rate: float) -> Result:
    started = time.monotonic()
    result = Result(
        "reconcile",
        f"10. reconcile: {members:,} members, 1 % drift, {rate:g} requests/s",
    )
    async with contextlib.AsyncExitStack() as stack:
        await stack.enter_async_context(quiet_collector())
        broker = await stack.enter_async_context(running_broker())
        recorder, base_url, (list_id,) = await stack.enter_async_context(simulator(rate, 1))
        topic = f"bench-reconcile-{os.getpid()}-{int(time.time())}"
        env = await bench_env(
            stack,
            topic,
            1,
            bootstrap=broker.bootstrap,
            base_url=base_url,
            destinations=[(DESTINATION, SEGMENT, list_id)],
            rate_limit_rps=rate,
        )
        dest = Dest(
            DESTINATION,
            SEGMENT,
            custom_fields=DEMO_FIELDS,
            consent_to_track="Unchanged",
            extras="remove",
        )
        destinations = Path(env["CMSYNC_DESTINATIONS_FILE"])
        await asyncio.to_thread(destinations.write_text, dest.toml(list_id))
        missing, stale, extra = seed_list(recorder.sim, list_id, members)
        seeding = time.monotonic()
        await seed_state(broker.bootstrap, topic, list_id, members)
        result.notes.append(
            f"state seeded: {members:,} records in {time.monotonic() - seeding:.1f} s"
        )
        service = start_service(env, "reconcile-service")
        stack.callback(service.close)
        await service.wait_joined(within_s=600)
        await asyncio.sleep(3.0)  # the flusher's start: list checks and first consent reads
        before = recorder.requests()
        before_by = recorder.by_endpoint()

        served: list[Served] = []
        stop_watching = recorder.sim.observe(served.append)
        t0 = time.monotonic()
        code, out, err, peak_rss = await reconcile_command(env)
        command_s = time.monotonic() - t0
        stop_watching()
        listed = [x.arrived - t0 for x in served if x.endpoint == "members"]
        handling = sorted(x.at - x.arrived for x in served if x.endpoint == "members")
        if handling:
            median, p90 = handling[len(handling) // 2], handling[int(len(handling) * 0.9)]
            result.notes.append(
                f"a listing page took the simulator {median * 1000:.0f} ms (median), "
                f"{p90 * 1000:.0f} ms (p90) to answer"
            )
        if listed:
            result.notes.append(
                f"the command's first request {served[0].arrived - t0:.1f} s after its start; "
                f"{len(listed)} listing requests from {listed[0]:.1f} s to {listed[-1]:.1f} s "
                f"({(len(listed) - 1) / max(1e-9, listed[-1] - listed[0]):.2f} a second)"
            )
        if code != 0:
            raise RuntimeError(f"cmsync reconcile exited {code}: {err[-500:]}")
        [row] = [line.split() for line in out.splitlines() if line.startswith(DESTINATION + " ")]
        expected, active, found_missing, found_extra, found_stale, protected, sent = map(
            int, row[1:]
        )
        repairs = missing + stale + extra

        async def repaired() -> bool:
            metrics = await service.metrics()
            taken = metrics.value("cmsync_drift_repairs_total", destination=DESTINATION)
            busy = metrics.value("cmsync_pending_changes", destination=DESTINATION)
            return taken >= sent and not busy and recorder.active(list_id) == members

        await wait_until(repaired, within_s=1800, what="every repair applied", watch=[service])
        end = recorder.last_write() or time.monotonic()
        elapsed = end - t0
        requests = recorder.requests() - before
        after_by = recorder.by_endpoint()
        spent = {e: n - before_by.get(e, 0) for e, n in after_by.items() if n > before_by.get(e, 0)}
        throttled = recorder.throttled()
        still_stale = sum(
            1
            for i in range(missing, missing + stale)
            if recorder.sim.state.lists[list_id].subscribers[_address(i)].fields[1]
            != _fields(i)["city"]
        )
        await service.stop()

    pages = math.ceil(active / MAX_PAGE_SIZE) + 3  # Active, then Deleted, Unsubscribed, Bounced
    floor = pages + math.ceil((missing + stale) / MAX_PAGE_SIZE) + extra
    floor_s = floor / rate
    result.add(
        Figure(
            "drift found: missing / stale / extra",
            f"{found_missing} / {found_stale} / {found_extra}",
            target=f"{missing} / {stale} / {extra}",
            met=(found_missing, found_stale, found_extra) == (missing, stale, extra),
        ),
        Figure("members expected / protected", f"{expected} / {protected}"),
        Figure("repairs sent", sent, target=str(repairs), met=sent == repairs),
        Figure("floor (listing pages + imports + deletes)", floor, "requests"),
        Figure("requests", requests, "requests", note=endpoints(spent)),
        Figure(
            "requests ÷ floor",
            round(requests / floor, 3),
            target="≤ 1.05",
            met=at_most(requests / floor, 1.05),
        ),
        Figure("the command's run (restore, listing, repairs sent)", round(command_s, 1), "s"),
        Figure("the command's peak RSS", round(peak_rss / MIB), "MiB"),
        Figure("time to the last repair applied", round(elapsed, 1), "s"),
        Figure(
            "time ÷ floor time",
            round(elapsed / floor_s, 3),
            target=f"≤ 1.10 (floor {floor_s:.0f} s)",
            met=at_most(elapsed / floor_s, 1.10),
        ),
        Figure("stale left after the repairs", still_stale, target="0", met=still_stale == 0),
        Figure("429 responses", throttled, target="0", met=throttled == 0),
    )
    result.settings = {
        "members": members,
        "rate": rate,
        "missing": missing,
        "stale": stale,
        "extra": extra,
    }
    return result.finish(started)


add_arguments = options(
    Option(
        "--members",
        1_000_000,
        "members of the list (20000 for a quick run)",
        "CMSYNC_BENCH_RECONCILE_MEMBERS",
    ),
    Option("--rate", 10.0, "requests/s ceiling (service, command and simulator)"),
)


async def scenario(args: argparse.Namespace) -> list[Result]:
    return [await run(args.members, args.rate)]


main = main_of(
    "python -m bench.reconcile",
    "Scenario 10: reconcile a list with 1 % drift.",
    add_arguments,
    scenario,
)

if __name__ == "__main__":
    sys.exit(main())
