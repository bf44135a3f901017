"""`cmsync demo`: the embedded default, end to end, verified.

1. start the bundled broker (unless CMSYNC_KAFKA_BOOTSTRAP_SERVERS is set) and the Campaign
   Monitor simulator (unless CMSYNC_CM_BASE_URL is set; then CMSYNC_DEMO_LISTS must name the
   list IDs to use, and the demo needs the simulator's /_sim/ admin API for its counters);
2. create the topics and produce the first part of a synthetic stream: entries, exits,
   updates, duplicates, late events, invalid records, profiles moving to a new address while in
   a segment, addresses shared by several profiles (households), and a list fed by two segments;
3. run the real service on it, in this process, with a live progress line, until every
   produced record is committed and every buffer is empty;
4. stop the service (gracefully), and while it is down, as some people would, unsubscribe a few
   of them in Campaign Monitor itself;
5. start a new service (a restart: its state directory is a fresh temporary one unless
   CMSYNC_STATE_DIR says otherwise, so it restores the membership state from its changelog
   topics), produce the rest of the stream (re-entries of those people among it, and late
   events older than changes applied before the restart) and sync again;
6. read every list back through the API and compare it with the state computed independently
   from the generated events (`synthetic.expected_list`); print a summary; exit 0 only if every
   list matches.

Built on the rig (`consumer.devtools.rig`): its standard workload (`DEMO_DESTINATIONS`,
`DEMO_SEGMENTS`), destinations file, producer, in-process runner and list comparison.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from aiokafka import AIOKafkaProducer

from consumer import observability as obs
from consumer.campaign_monitor.client import ApiKey, CampaignMonitorClient
from consumer.devtools.embedded_broker import create_topics, running_broker
from consumer.devtools.rig import (
    DEMO_DESTINATIONS,
    DEMO_SEGMENTS,
    InProcessService,
    Progress,
    compare,
    create_list,
    destinations_toml,
    produce,
)
from consumer.devtools.simulator import Simulator, SimulatorConfig, serve
from consumer.devtools.synthetic import (
    Produced,
    StreamGenerator,
    expected_list,
    fewest_requests,
    replay,
    stream_facts,
)
from consumer.settings import ConfigError, Settings, load_settings

DEMO_KEY = "demo-api-key-not-a-secret"
PARTITIONS = 6
DESTINATIONS = DEMO_DESTINATIONS
#: The stream's hard cases of guarantee 2 (see `StreamGenerator`).
ADDRESS_CHANGE_RATE = 0.05
HOUSEHOLD_RATE = 0.06
STRAGGLER_RATE = 0.01


# ------------------------------------------------------------------------------- the run


@dataclass
class DemoRun:
    events: int
    seed: int
    rate_limit_rps: float
    records: list[Produced] = field(default_factory=list)
    offsets: list[int] = field(default_factory=list)  # per record, its Kafka offset
    split: int = 0
    self_unsubscribed: dict[str, set[str]] = field(default_factory=dict)
    started: float = field(default_factory=time.monotonic)


def _print(*parts: object) -> None:
    print(*parts, flush=True)


async def _produce(
    bootstrap: str,
    topic: str,
    records: Sequence[Produced],
    kafka: dict[str, Any],
    ends: dict[int, int],
) -> list[int]:
    """Produce; `ends` (per partition, the offset after the last record written) is raised
    from the broker's acknowledgements (see `rig.produce`). Returns each record's offset."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=20, acks="all", **kafka)
    await producer.start()
    try:
        placed = await produce(producer, topic, ((r.key, r.value) for r in records), ends)
    finally:
        await producer.stop()
    return [offset for _, offset in placed]


def _progress_line(label: str) -> Callable[[Progress], None]:
    """A live progress line while a part of the stream syncs (a line every 5 s off a tty)."""
    tty = sys.stdout.isatty()
    last_print = 0.0

    def show(progress: Progress) -> None:
        nonlocal last_print
        if progress.synced:
            if tty:
                print(file=sys.stdout)
            return
        now = time.monotonic()
        if now - last_print >= (0.5 if tty else 5.0):
            last_print = now
            applied = _counter_total(obs.applied_changes)
            line = (
                f"[{label}] committed {progress.done:>7}/{progress.total} records · "
                f"pending {progress.pending:>6} · applied {int(applied):>6} · "
                f"requests {int(_counter_total(obs.api_requests)):>6}"
            )
            print(("\r" + line) if tty else line, end="" if tty else "\n", flush=True)

    return show


def _counter_total(metric: Any) -> float:
    total = 0.0
    for family in metric.collect():
        for sample in family.samples:
            if sample.name.endswith("_total"):
                total += sample.value
    return total


def _requests_by_endpoint() -> Counter[str]:
    counts: Counter[str] = Counter()
    for family in obs.api_requests.collect():
        for sample in family.samples:
            if sample.name.endswith("_total"):
                counts[sample.labels["endpoint"]] += int(sample.value)
    return counts


async def _read_list(client: CampaignMonitorClient, list_id: str) -> dict[str, dict[str, Any]]:
    members: dict[str, dict[str, Any]] = {}
    for state in ("active", "unsubscribed", "deleted", "bounced"):
        async for member in client.members(list_id, state):
            members[str(member["EmailAddress"]).strip().lower()] = member
    return members


@contextlib.asynccontextmanager
async def _simulator(rate_rps: float) -> AsyncIterator[tuple[str, dict[str, str]]]:
    sim = Simulator(SimulatorConfig(api_keys=(DEMO_KEY,), rate_limit_rps=rate_rps, seed=1))
    list_ids = {d.name: create_list(sim, d, api_key=DEMO_KEY) for d in DESTINATIONS}
    async with serve(sim) as base_url:
        yield base_url, list_ids


async def _self_unsubscribe(
    client: CampaignMonitorClient,
    session: aiohttp.ClientSession,
    base_url: str,
    run: DemoRun,
    list_ids: dict[str, str],
    rng: random.Random,
) -> int:
    """Some people unsubscribe themselves: 2 % of each list's active members.

    Done through the simulator's admin API (as the person's click on "unsubscribe" would be),
    so that it neither uses the service's API key nor its rate.
    """
    admin = base_url.removesuffix("/").rsplit("/api/", 1)[0] + "/_sim/lists"
    total = 0
    for d in DESTINATIONS:
        list_id = list_ids[d.name]
        active = [str(m["EmailAddress"]).lower() async for m in client.members(list_id, "active")]
        chosen = rng.sample(sorted(active), k=len(active) // 50)
        for address in chosen:
            body = {"email": address, "state": "Unsubscribed"}
            async with session.post(f"{admin}/{list_id}/state", json=body) as response:
                response.raise_for_status()
        run.self_unsubscribed[d.name] = set(chosen)
        total += len(chosen)
    return total


async def run_demo(args: argparse.Namespace) -> int:
    env = dict(os.environ)
    run = DemoRun(events=args.events, seed=args.seed, rate_limit_rps=args.rate_limit_rps)
    async with contextlib.AsyncExitStack() as stack:
        bootstrap = env.get("CMSYNC_KAFKA_BOOTSTRAP_SERVERS")
        if not bootstrap:
            broker = await stack.enter_async_context(running_broker())
            bootstrap = broker.bootstrap
            _print(f"broker      bundled Tansu at {bootstrap}")
        else:
            _print(f"broker      {bootstrap}")
        given_url = env.get("CMSYNC_CM_BASE_URL")
        if not given_url:
            base_url, list_ids = await stack.enter_async_context(
                _simulator(rate_rps=run.rate_limit_rps * 1.5)
            )
            api_key = DEMO_KEY
            _print(f"simulator   {base_url} (permits {run.rate_limit_rps * 1.5:g} requests/s)")
        else:
            names = env.get("CMSYNC_DEMO_LISTS", "").split(",")
            if len(names) != len(DESTINATIONS) or "CMSYNC_CM_API_KEY" not in env:
                _print(
                    "with CMSYNC_CM_BASE_URL set, CMSYNC_DEMO_LISTS must give "
                    f"{len(DESTINATIONS)} comma-separated empty ListIDs, "
                    "and CMSYNC_CM_API_KEY the key"
                )
                return 2
            list_ids = {d.name: lid.strip() for d, lid in zip(DESTINATIONS, names, strict=True)}
            api_key = env["CMSYNC_CM_API_KEY"]
            base_url = given_url

        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="cmsync-demo-")))
        dest_file = workdir / "destinations.toml"
        dest_file.write_text(destinations_toml(DESTINATIONS, list_ids))
        topic = env.get("CMSYNC_KAFKA_TOPIC", "segment-membership")
        env.update(
            {
                "CMSYNC_KAFKA_BOOTSTRAP_SERVERS": bootstrap,
                "CMSYNC_CM_BASE_URL": base_url,
                "CMSYNC_CM_API_KEY": api_key,
                "CMSYNC_DESTINATIONS_FILE": str(dest_file),
                "CMSYNC_KAFKA_GROUP_ID": env.get(
                    "CMSYNC_KAFKA_GROUP_ID", f"cmsync-demo-{os.getpid()}"
                ),
                "CMSYNC_RATE_LIMIT_RPS": str(run.rate_limit_rps),
                "CMSYNC_FLUSH_INTERVAL_S": env.get("CMSYNC_FLUSH_INTERVAL_S", "1"),
                "CMSYNC_CONSENT_REFRESH_S": "2",
                "CMSYNC_HTTP_PORT": env.get("CMSYNC_HTTP_PORT", "0"),
                "CMSYNC_LOG_LEVEL": env.get("CMSYNC_LOG_LEVEL", "warning"),
            }
        )
        try:
            settings = load_settings(env)
        except ConfigError as exc:
            for problem in exc.problems:
                _print(f"configuration error: {problem}")
            return 2
        obs.configure_logging(settings.log_level, settings.log_format)  # type: ignore[arg-type]
        kafka = {
            k: v for k, v in settings.kafka.client_kwargs().items() if k != "bootstrap_servers"
        }
        await create_topics(bootstrap, {topic: PARTITIONS, settings.kafka.dlq_topic: 1}, **kafka)

        profiles = max(100, args.events // 4)
        gen = StreamGenerator(
            seed=run.seed,
            profiles=profiles,
            segments=DEMO_SEGMENTS,
            address_change_rate=ADDRESS_CHANGE_RATE,
            household_rate=HOUSEHOLD_RATE,
            straggler_rate=STRAGGLER_RATE,
        )
        run.records = gen.generate()
        run.split = int(len(run.records) * 0.7)
        _print(
            f"stream      {len(run.records)} records from {profiles} profiles "
            f"({sum(1 for r in run.records if r.invalid)} invalid), "
            f"{len(DESTINATIONS)} lists, topic {topic!r} × {PARTITIONS} partitions"
        )

        session = await stack.enter_async_context(aiohttp.ClientSession())
        client = CampaignMonitorClient(base_url, ApiKey(api_key), session=session)
        running: InProcessService | None = None  # the service to stop if anything fails
        try:
            t0 = time.monotonic()
            ends: dict[int, int] = {}
            running = first = InProcessService(settings)
            run.offsets = await _produce(bootstrap, topic, run.records[: run.split], kafka, ends)
            await first.wait_synced(ends, every_s=0.2, progress=_progress_line("part 1"))
            # A restart: the late events of part 2 are older than changes applied before it.
            running = None
            await first.stop(settings.shutdown_budget_s + 5)
            n_unsub = await _self_unsubscribe(
                client, session, base_url, run, list_ids, random.Random(run.seed)
            )
            _print(f"people      {n_unsub} unsubscribed themselves in Campaign Monitor")
            kept = settings.state_dir or "none kept: a fresh one, restored from the changelogs"
            _print(f"restart     service stopped and started again (state directory: {kept})")
            running = second = InProcessService(settings)
            run.offsets += await _produce(bootstrap, topic, run.records[run.split :], kafka, ends)
            await second.wait_synced(ends, every_s=0.2, progress=_progress_line("part 2"))
            duration = time.monotonic() - t0
        finally:
            if running is not None:
                await running.stop(settings.shutdown_budget_s + 5)
        return await _verify_and_report(run, client, list_ids, settings, duration)


async def _verify_and_report(
    run: DemoRun,
    client: CampaignMonitorClient,
    list_ids: dict[str, str],
    settings: Settings,
    duration: float,
) -> int:
    requests = _requests_by_endpoint()  # before reading the lists back
    ok = True
    rows = []
    floor_imports = floor_removals = 0
    # The profile fields the service keeps and writes (every demo list maps the same ones).
    written = {"full_name", *(f for d in DESTINATIONS for f in d.custom_fields.values())}
    for d in DESTINATIONS:
        segments = (d.segment_id, *d.more_segments)
        expected = expected_list(
            run.records,
            segments,
            offsets=run.offsets,
            self_unsubscribed=run.self_unsubscribed.get(d.name, set()),
            unsubscribed_at=run.split,
            resubscribe=d.resubscribe,
            written_fields=written,
        )
        members = await _read_list(client, list_ids[d.name])
        problems = compare(expected, members, d.custom_fields)
        imports, removals = fewest_requests(run.records, segments, offsets=run.offsets)
        floor_imports += imports
        floor_removals += removals
        ok &= not problems
        status = "matches" if not problems else "MISMATCH: " + "; ".join(problems)
        counts = f"{len(expected.active):>6} active {len(expected.inactive):>6} inactive"
        rows.append(f"  {d.name:<15} {counts}  {status}")
    valid = [r for r in run.records if not r.invalid]
    unique = {(r.segment_id, r.email, r.occurred_at_ms, r.entered) for r in valid}
    invalid = Counter(r.invalid for r in run.records if r.invalid)
    dead = int(_counter_total(obs.dead_letters))
    routed = {s for d in DESTINATIONS for s in (d.segment_id, *d.more_segments)}
    facts = stream_facts(run.records, routed, after=run.split, offsets=run.offsets)
    union_lines = []
    for d in DESTINATIONS:
        if d.more_segments:
            segments = (d.segment_id, *d.more_segments)
            holders = replay(run.records, segments, offsets=run.offsets).holders()
            both = sum(1 for held in holders.values() if len({s for s, _ in held}) > 1)
            union_lines.append(
                f"{d.name} ({' + '.join(segments)}): {len(holders)} addresses held, "
                f"{both} of them through both segments"
            )
    _print("")
    _print("lists")
    for row in rows:
        _print(row)
    _print("summary")
    n_invalid = sum(invalid.values())
    _print(f"  events produced     {len(run.records)} ({len(valid)} valid, {n_invalid} invalid)")
    _print(f"  unique changes      {len(unique)} (the rest are duplicates)")
    reasons = ", ".join(f"{k} {v}" for k, v in sorted(invalid.items()))
    _print(f"  dead-lettered       {dead} ({reasons})")
    _print(
        f"  address changes     {facts.address_changes} "
        "(a profile moved to a new address while in a segment)"
    )
    _print(f"  shared addresses    {facts.shared_addresses} (named by several profiles)")
    _print(
        f"  late events         {facts.late} ignored (older than the change applied), "
        f"{facts.late_across} of them after the restart, older than a change from before it"
    )
    for line in union_lines:
        _print(f"  two-segment list    {line}")
    _print(
        f"  requests            import {requests['import']} (fewest possible {floor_imports}), "
        f"removals {requests['delete'] + requests['unsubscribe']} "
        f"(fewest possible {floor_removals}), "
        f"member listings {requests['members']}"
    )
    _print(f"  duration            {duration:.1f} s, {len(run.records) / duration:,.0f} events/s")
    _print(f"  result              {'every list matches' if ok else 'LISTS DO NOT MATCH'}")
    return 0 if ok else 1


def cli_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="cmsync demo",
        description="Start a bundled Kafka-compatible broker and the Campaign Monitor simulator "
        "(unless CMSYNC_KAFKA_BOOTSTRAP_SERVERS / CMSYNC_CM_BASE_URL name real ones), produce a "
        "synthetic stream of membership changes, sync it with the real service, and verify every "
        "list against the state computed from the events. Exits 0 only if every list matches.",
    )
    parser.add_argument(
        "--events", type=int, default=100_000, help="approximate stream size (default 100000)"
    )
    parser.add_argument("--seed", type=int, default=7, help="random seed of the stream (default 7)")
    parser.add_argument(
        "--rate-limit-rps",
        type=float,
        default=200.0,
        help="the service's request ceiling; the simulator permits 1.5x this (default 200)",
    )
    args = parser.parse_args(argv)
    try:
        return asyncio.run(run_demo(args))
    except KeyboardInterrupt:
        return 1
