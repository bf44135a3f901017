"""What the scenarios share: figures and their table/JSON, machine facts, fast producing, the
service as a subprocess (the rig's `ServiceProcess`, with memory sampling), and the simulator
with a `Recorder` of the writes it applied (its public observer).

Clocks: every time a scenario reports is taken in the bench process with `time.monotonic()`
(the producer's acknowledgements and the simulator's handlers both run here), so start and end
of an interval come from the same clock. Freshness uses wall time (`time.time()`), because
``occurred_at`` is wall time.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import math
import os
import platform
import sys
import tempfile
import time
import zlib
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import psutil
from aiokafka import AIOKafkaProducer

from consumer.devtools import rig
from consumer.devtools.embedded_broker import create_topics
from consumer.devtools.rig import DEMO_FIELDS, Dest, Metrics, ServiceProcess, wait_until
from consumer.devtools.simulator import Served, Simulator, SimulatorConfig, serve
from consumer.devtools.synthetic import CITIES, INTERESTS, TIERS, event_bytes

__all__ = ["Metrics", "ServiceProcess", "wait_until"]  # re-exported for the scenarios

REPO = Path(__file__).resolve().parent.parent
RESULTS_DIR = Path(__file__).resolve().parent / "results"
LATEST = RESULTS_DIR / "latest.json"
LOGS_DIR = RESULTS_DIR / "logs"
API_KEY = "bench-api-key-not-a-secret"
MIB = 1024 * 1024


# --------------------------------------------------------------------------- figures


@dataclass
class Figure:
    """One measured figure. ``met`` is None for figures without a target (context)."""

    name: str
    value: float | int | str | None
    unit: str = ""
    target: str = ""
    met: bool | None = None
    note: str = ""


@dataclass
class Result:
    """One scenario's outcome: its figures, the settings it ran with, and notes."""

    key: str
    title: str
    figures: list[Figure] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    started_at: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))
    wall_s: float = 0.0
    load_before: tuple[float, float, float] = field(default_factory=os.getloadavg)
    load_after: tuple[float, float, float] = (0.0, 0.0, 0.0)

    def add(self, *figures: Figure) -> None:
        self.figures.extend(figures)

    def finish(self, started: float) -> Result:
        self.wall_s = round(time.monotonic() - started, 1)
        self.load_after = os.getloadavg()
        return self


def at_most(value: float | None, limit: float) -> bool | None:
    return None if value is None else value <= limit


def at_least(value: float | None, limit: float) -> bool | None:
    return None if value is None else value >= limit


def _show(value: float | int | str | None, unit: str) -> str:
    if value is None:
        return "—"
    if isinstance(value, str):
        return value
    if isinstance(value, int) or (isinstance(value, float) and value.is_integer() and value > 99):
        text = f"{int(value):,}"
    elif abs(value) >= 100:
        text = f"{value:,.0f}"
    elif abs(value) >= 10:
        text = f"{value:.1f}"
    else:
        text = f"{value:.2f}"
    return f"{text} {unit}".rstrip()


def _load(load: Sequence[float]) -> str:
    return "/".join(f"{x:.2f}" for x in load)


def print_result(result: Result) -> None:
    """The scenario's table: every figure, its target, and whether it was met."""
    width = max([len(f.name) for f in result.figures] + [30])
    print()
    print(f"== {result.title}")
    print(f"   {'figure':<{width}}  {'value':>16}  {'target':<14} status")
    for f in result.figures:
        status = "" if f.met is None else ("met" if f.met else "MISSED")
        line = f"   {f.name:<{width}}  {_show(f.value, f.unit):>16}  {f.target:<14} {status}"
        print(line.rstrip() + (f"   ({f.note})" if f.note else ""))
    print(
        f"   scenario wall time {result.wall_s:.0f} s; load average 1/5/15 min "
        f"{_load(result.load_before)} before, {_load(result.load_after)} after "
        f"({os.cpu_count()} CPUs)"
    )
    for note in result.notes:
        print(f"   note: {note}")
    sys.stdout.flush()


def print_summary(results: Sequence[Result]) -> None:
    """Every figure that has a target, one line each."""
    print("\nsummary: every figure with a target")
    for result in results:
        for f in result.figures:
            if f.met is None:
                continue
            status = "met" if f.met else "MISSED"
            scenario = f"{result.title.split('.')[0]}. {result.key}"
            value = _show(f.value, f.unit)
            print(f"   {scenario:<14} {f.name:<52} {value:>12}  {f.target:<10} {status}")
    sys.stdout.flush()


def machine() -> dict[str, Any]:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "memory_gib": round(psutil.virtual_memory().total / 1024**3, 1),
    }


def write_results(results: Iterable[Result], command: str) -> Path:
    """Merge the results into bench/results/latest.json (a scenario run alone replaces only
    its own entry; each entry carries its own start time) and return the path."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    document: dict[str, Any] = {}
    with contextlib.suppress(OSError, ValueError):
        document = json.loads(LATEST.read_text())
    scenarios = document.get("scenarios", {})
    for result in results:
        scenarios[result.key] = asdict(result)
    document.update(
        {
            "updated_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "command": command,
            "machine": machine(),
            "scenarios": scenarios,
        }
    )
    LATEST.write_text(json.dumps(document, indent=2) + "\n")
    return LATEST


def report(results: list[Result], command: str) -> None:
    path = write_results(results, command)
    print(f"\nfigures written to {path}")


#: A scenario as `python -m bench` and its own script run it: parsed arguments in, results out.
Scenario = Callable[[argparse.Namespace], Coroutine[Any, Any, list[Result]]]


def script(
    prog: str,
    description: str,
    add_arguments: Callable[[argparse.ArgumentParser], None],
    scenario: Scenario,
    argv: list[str] | None,
) -> int:
    """The `main` of a scenario's own script: parse, run, print, write the JSON."""
    p = parser(prog, description)
    add_arguments(p)
    results = asyncio.run(scenario(p.parse_args(argv)))
    for result in results:
        print_result(result)
    report(results, f"{prog} " + " ".join(sys.argv[1:] if argv is None else argv))
    return 0


class ScriptMain(Protocol):
    def __call__(self, argv: list[str] | None = None) -> int: ...


def main_of(
    prog: str,
    description: str,
    add_arguments: Callable[[argparse.ArgumentParser], None],
    scenario: Scenario,
) -> ScriptMain:
    """A scenario script's ``main(argv=None)`` (see `script`)."""

    def main(argv: list[str] | None = None) -> int:
        return script(prog, description, add_arguments, scenario, argv)

    return main


def endpoints(counts: dict[str, int]) -> str:
    """Requests per endpoint, for a figure's note."""
    return ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))


# --------------------------------------------------------------------------- settings


def env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return int(value.replace("_", "")) if value else default


def env_float(name: str, default: float) -> float:
    value = os.environ.get(name)
    return float(value) if value else default


def parser(prog: str, description: str) -> argparse.ArgumentParser:
    return argparse.ArgumentParser(prog=prog, description=description)


@dataclass(frozen=True)
class Option:
    """One option of a scenario: its default is read from the variable `env` when that is set
    (sizes for `make bench` come from the environment); the help ends with both."""

    flag: str
    default: int | float
    help: str
    env: str | None = None


def options(*declared: Option) -> Callable[[argparse.ArgumentParser], None]:
    """A scenario's `add_arguments`: each option typed as its default is."""

    def add_arguments(p: argparse.ArgumentParser) -> None:
        for o in declared:
            value = o.default if isinstance(o.default, int) else f"{o.default:g}"
            shown = f"(env {o.env}; default {value})" if o.env else f"(default {value})"
            if isinstance(o.default, int):
                default: float = env_int(o.env, o.default) if o.env else o.default
                p.add_argument(o.flag, type=int, default=default, help=f"{o.help} {shown}")
            else:
                default = env_float(o.env, o.default) if o.env else o.default
                p.add_argument(o.flag, type=float, default=default, help=f"{o.help} {shown}")

    return add_arguments


# --------------------------------------------------------------------------- events


def profile_of(i: int, *, version: int = 0) -> dict[str, object]:
    """A realistic profile (the fields the demo's generator uses), deterministic in `i`."""
    n = i * 2654435761 + version * 40503
    return {
        "id": f"cust-{i}",
        "email": f"user{i}@example.com",
        "full_name": f"Customer {i}",
        "city": CITIES[n % len(CITIES)] if n % 20 else None,
        "tier": TIERS[(n >> 3) % len(TIERS)],
        "interests": [INTERESTS[(n >> 5) % len(INTERESTS)]] if n % 3 else [],
        "lifetime_value": round((n % 500_000) / 100, 2),
    }


def event_id(seed: int, i: int) -> str:
    """A UUID-shaped, unique, deterministic event id."""
    h = zlib.crc32(i.to_bytes(8, "little"), seed) << 96 | i
    x = f"{h:032x}"[-32:]
    return f"{x[:8]}-{x[8:12]}-{x[12:16]}-{x[16:20]}-{x[20:]}"


def membership_event(
    i: int,
    *,
    segment_id: str,
    entered: bool,
    occurred_at_ms: int,
    seed: int = 0,
    serial: int | None = None,
    version: int = 0,
) -> tuple[bytes, bytes]:
    """(Kafka key, value) of one native v1 event for profile `i`: the bytes `synthetic`'s
    generator makes (same encoder), without its per-stream timeline."""
    profile = profile_of(i, version=version)
    value = event_bytes(
        event_id=event_id(seed, i if serial is None else serial),
        segment_id=segment_id,
        entered=entered,
        occurred_at_ms=occurred_at_ms,
        profile=profile,
    )
    return str(profile["id"]).encode(), value


# --------------------------------------------------------------------------- kafka


def partition_of(key: bytes, partitions: int) -> int:
    """Same key, same partition (what the contract needs). crc32, not the Java client's murmur2:
    aiokafka's murmur2 is pure Python and would dominate the time to produce a million records."""
    return zlib.crc32(key) % partitions


@dataclass
class Produced:
    """What a `produce` call wrote: per partition the offset after its last record, the number
    of records, and when the first and the last batch were acknowledged (monotonic)."""

    ends: dict[int, int]
    records: int
    first_ack: float
    last_ack: float
    started: float


async def produce(
    bootstrap: str,
    topic: str,
    partitions: int,
    records: Iterable[tuple[bytes, bytes]],
    *,
    batch_bytes: int = 1 << 20,
) -> Produced:
    """Produce as fast as the broker takes it: whole record batches (`send_batch`), keyed.

    End offsets come from the acknowledgements (base offset + records of the batch): the
    bundled broker answers ListOffsets wrongly.
    """
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, acks="all", max_batch_size=batch_bytes, linger_ms=0
    )
    await producer.start()
    ends: dict[int, int] = {}
    acks: list[float] = []
    count = 0
    started = time.monotonic()

    def acknowledged(partition: int, size: int) -> Callable[[asyncio.Future[Any]], None]:
        def done(future: asyncio.Future[Any]) -> None:
            if future.cancelled() or future.exception() is not None:
                return
            acks.append(time.monotonic())
            end = future.result().offset + size
            ends[partition] = max(ends.get(partition, 0), end)

        return done

    try:
        builders = {p: producer.create_batch() for p in range(partitions)}
        futures: list[asyncio.Future[Any]] = []

        async def send(partition: int) -> None:
            batch = builders[partition]
            future = await producer.send_batch(batch, topic, partition=partition)
            future.add_done_callback(acknowledged(partition, batch.record_count()))
            futures.append(future)
            builders[partition] = producer.create_batch()

        for key, value in records:
            p = partition_of(key, partitions)
            if builders[p].append(key=key, value=value, timestamp=None) is None:
                await send(p)
                builders[p].append(key=key, value=value, timestamp=None)
            count += 1
        for p in range(partitions):
            if builders[p].record_count():
                await send(p)
        await asyncio.gather(*futures)
    finally:
        await producer.stop()
    return Produced(ends, count, min(acks, default=started), max(acks, default=started), started)


async def produce_paced(
    bootstrap: str,
    topic: str,
    partitions: int,
    per_second: float,
    duration_s: float,
    make: Callable[[int, int], tuple[bytes, bytes]],
) -> Produced:
    """A steady stream: ``make(n, now_ms)`` builds record n, stamped with the wall time it is
    sent at; records go out in 10 ms ticks, each acknowledged by the broker."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=2)
    await producer.start()
    ends: dict[int, int] = {}
    futures: list[asyncio.Future[Any]] = []
    n = 0
    started = time.monotonic()
    try:
        tick = 0.01
        while True:
            elapsed = time.monotonic() - started
            if elapsed >= duration_s:
                break
            due = min(int(elapsed * per_second) + 1, int(duration_s * per_second))
            while n < due:
                key, value = make(n, int(time.time() * 1000))
                futures.append(
                    await producer.send(
                        topic, key=key, value=value, partition=partition_of(key, partitions)
                    )
                )
                n += 1
            await asyncio.sleep(tick)
        metas = await asyncio.gather(*futures)
    finally:
        await producer.stop()
    for meta in metas:
        ends[meta.partition] = max(ends.get(meta.partition, 0), meta.offset + 1)
    return Produced(ends, n, started, time.monotonic(), started)


# --------------------------------------------------------------------------- the service


def destinations_toml(destinations: Iterable[tuple[str, str, str]]) -> str:
    """(name, segment_id, list_id) → a destinations file with the demo's field mapping."""
    dests = [
        (Dest(name, segment, custom_fields=DEMO_FIELDS, consent_to_track="Unchanged"), list_id)
        for name, segment, list_id in destinations
    ]
    return "\n".join(dest.toml(list_id) for dest, list_id in dests)


async def bench_env(
    stack: contextlib.AsyncExitStack,
    topic: str,
    partitions: int,
    *,
    bootstrap: str,
    base_url: str,
    destinations: Iterable[tuple[str, str, str]],
    rate_limit_rps: float,
    **extra: str,
) -> dict[str, str]:
    """Create `topic` (and its dead-letter topic) and return the CMSYNC_* environment of a
    `cmsync run` of it, in consumer group `topic` (`rig.service_env` with the bench's API key,
    `rate_limit_rps` and info logs; `extra` wins). The destinations file (see
    `destinations_toml`) goes to a directory removed when `stack` closes."""
    await create_topics(bootstrap, {topic: partitions, f"{topic}.dlq": 1})
    workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="cmsync-bench-")))
    destinations_file = workdir / "destinations.toml"
    destinations_file.write_text(destinations_toml(destinations))
    return rig.service_env(
        bootstrap=bootstrap,
        topic=topic,
        group=topic,
        base_url=base_url,
        api_key=API_KEY,
        destinations_file=destinations_file,
        CMSYNC_RATE_LIMIT_RPS=f"{rate_limit_rps:g}",
        CMSYNC_LOG_LEVEL="info",
        **extra,
    )


def start_service(env: dict[str, str], log_name: str, *, sample_s: float = 0.1) -> ServiceProcess:
    """`cmsync run` as a child process, its log in bench/results/logs/, its resident memory
    sampled every `sample_s` from start to exit."""
    LOGS_DIR.mkdir(parents=True, exist_ok=True)
    service = ServiceProcess(env, LOGS_DIR / f"{log_name}.log", name=log_name, cwd=REPO)
    service.sample_rss(sample_s)
    return service


def histogram_quantile(metrics: Metrics, name: str, q: float) -> float | None:
    """Prometheus-style quantile (linear within a bucket) of a histogram summed over labels."""
    buckets: dict[float, float] = {}
    for labels, value in metrics.samples.get(f"{name}_bucket", []):
        le = float(labels["le"])
        buckets[le] = buckets.get(le, 0.0) + value
    if not buckets:
        return None
    bounds = sorted(buckets)
    count = buckets[bounds[-1]]
    if count == 0:
        return None
    rank = q * count
    lower, below = 0.0, 0.0
    for bound in bounds:
        cumulative = buckets[bound]
        if cumulative >= rank:
            if math.isinf(bound):
                return lower
            inside = cumulative - below
            return lower + (bound - lower) * ((rank - below) / inside if inside else 1.0)
        lower, below = bound, cumulative
    return lower


# --------------------------------------------------------------------------- this process


@contextlib.asynccontextmanager
async def quiet_collector(every_s: float = 1.0) -> AsyncIterator[None]:
    """Keep this process's cyclic GC from stalling the simulator.

    This process plays Campaign Monitor; its heap grows with the simulated lists (a million
    subscribers) and, in some scenarios, the generated records kept for the expected state.
    A full collection of such a heap stops the simulator's event loop for up to a second,
    after which the queued requests arrive at its rate limiter in a burst (spurious 429s) and
    the service's requests wait (lost rate slots). Real Campaign Monitor does neither, so
    everything alive is moved out of the collector's sight (`gc.freeze`) every `every_s`;
    young garbage is still collected, and the frozen objects are given back at the end.
    """

    async def freeze() -> None:
        while True:
            gc.freeze()
            await asyncio.sleep(every_s)

    task = asyncio.create_task(freeze())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        gc.unfreeze()
        gc.collect()


# --------------------------------------------------------------------------- the simulator


WRITE_ENDPOINTS = frozenset({"import", "add", "delete", "unsubscribe"})


class Recorder:
    """Watches a simulator (its public observer): when each write request was handled
    (monotonic, in this process) and, when asked, the wall time at which each address was
    written. A write answered with an error (e.g. Code 203, not in list) is done too; one
    refused before it reached the list (rate limit, fault) is not."""

    def __init__(self, sim: Simulator, *, per_address: bool = False) -> None:
        self.sim = sim
        self.writes: list[tuple[float, str]] = []  # (monotonic after applying, endpoint)
        self.per_address = per_address
        self.address_writes: list[tuple[float, str, str]] = []  # (wall, endpoint, address)
        self.list_writes: dict[tuple[str, str], int] = {}  # (endpoint, list) -> requests
        sim.observe(self._served)

    def _served(self, served: Served) -> None:
        if not served.handled or served.endpoint not in WRITE_ENDPOINTS:
            return
        self.writes.append((served.at, served.endpoint))
        key = (served.endpoint, served.list_id)
        self.list_writes[key] = self.list_writes.get(key, 0) + 1
        if self.per_address:
            for address in served.addresses:
                self.address_writes.append((served.wall, served.endpoint, address))

    def requests(self) -> int:
        return sum(sum(by_status.values()) for by_status in self.sim.request_counts().values())

    def throttled(self) -> int:
        return sum(by_status.get("429", 0) for by_status in self.sim.request_counts().values())

    def by_endpoint(self) -> dict[str, int]:
        return {e: sum(by_status.values()) for e, by_status in self.sim.request_counts().items()}

    def active(self, list_id: str) -> int:
        return int(self.sim.state.lists[list_id].stats()["TotalActiveSubscribers"])

    def members(self, list_id: str) -> dict[str, dict[str, Any]]:
        return self.sim.list_state(list_id)

    def last_write(self) -> float | None:
        return self.writes[-1][0] if self.writes else None


@contextlib.asynccontextmanager
async def simulator(
    rate_limit_rps: float | None, lists: int, *, per_address: bool = False
) -> AsyncIterator[tuple[Recorder, str, list[str]]]:
    """A simulator over HTTP, recorded, with `lists` OnlyThisList lists of our API key, each
    with the fields of `DEMO_FIELDS` (what `destinations_toml` maps).

    ``CMSYNC_BENCH_RATE_HEADERS=0`` turns its X-RateLimit-* headers off (a diagnostic: how much
    of a delivery scenario's time the service's reading of those headers costs).
    """
    sim = Simulator(
        SimulatorConfig(
            api_keys=(API_KEY,),
            rate_limit_rps=rate_limit_rps,
            rate_headers=os.environ.get("CMSYNC_BENCH_RATE_HEADERS", "1") != "0",
            seed=1,
        )
    )
    recorder = Recorder(sim, per_address=per_address)
    list_ids = [
        rig.create_list(sim, Dest(f"bench-{n}", "", custom_fields=DEMO_FIELDS), api_key=API_KEY)
        for n in range(lists)
    ]
    async with serve(sim) as base_url:
        yield recorder, base_url, list_ids


def chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


async def wait_committed(
    services: Sequence[ServiceProcess],
    topic: str,
    ends: dict[int, int],
    *,
    within_s: float,
    every_s: float = 0.25,
    settle_s: float = 1.5,
) -> None:
    """Until everything produced is through: the services' /metrics show every partition of
    `topic` committed up to `ends` (per partition, the furthest any of them committed), and
    no lag (the input and the membership state's claims topic) and no pending change in any
    of them, for `settle_s` in a row (the lag gauge is refreshed every second: a claims
    partition written to just before could still show its old end). Fails if a service
    exits. (Committed no longer means applied: it means recorded in the membership state.)"""
    quiet_since: list[float] = []

    async def through() -> bool:
        done: dict[int, int] = {}
        busy = 0.0
        for service in services:
            metrics = await service.metrics()
            for p, offset in metrics.committed_offsets(topic).items():
                done[p] = max(done.get(p, 0), offset)
            busy += metrics.value("cmsync_consumer_lag") + metrics.value("cmsync_pending_changes")
        if busy or not all(done.get(p, 0) >= end for p, end in ends.items()):
            quiet_since.clear()
            return False
        if not quiet_since:
            quiet_since.append(time.monotonic())
        return time.monotonic() - quiet_since[0] >= settle_s

    await wait_until(
        through,
        within_s=within_s,
        every_s=every_s,
        what="everything produced applied",
        watch=services,
    )
