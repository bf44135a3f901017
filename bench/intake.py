"""Scenario 1, intake: events/s through decode + validate + route + coalesce, against a bare
aiokafka `getmany` loop that only counts the records, on the same topic in the same run.

The stream is the demo's (`consumer.devtools.synthetic.StreamGenerator` with the demo's four
segments: updates, exits, re-entries, duplicates, late events, CloudEvents, 0.3 % invalid
records) scaled to ~1,000,000 records in one partition of the bundled broker. The service side
is the real `Intake.handle`, wired by `Service.pipeline` as `cmsync run` wires it (routes and
buffers for the demo's four lists, dead letters sent to the broker), called from the same
`getmany` loop as the reference, with the flushers not running: no HTTP, and the buffers keep
everything. Both loops use the
service's fetch settings; each pass reads the whole topic from the start with a fresh
consumer (and, on the service side, a fresh Service). Passes alternate (reference, service,
reference, service, …) after one untimed warm-up read, and the best pass of each side counts
(interference on a shared machine only ever slows a pass down). A third loop that only
decodes and validates shows how much of the budget the JSON parse and the JSON Schema take.

``CMSYNC_BENCH_GC_THRESHOLDS=a,b,c`` (a diagnostic, off by default) runs the service passes
with `gc.set_threshold(a, b, c)` instead of Python's defaults, which `cmsync run` uses.

The clock of a pass starts before its first `getmany` (consumer started, partition assigned,
positioned at the beginning) and stops after the last record was handled.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import gc
import io
import os
import pstats
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Final

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition

from bench.common import Figure, Result, at_least, env_int, produce, script
from consumer import observability as obs
from consumer.app import Service, tune_garbage_collector
from consumer.devtools.embedded_broker import create_topics, running_broker
from consumer.devtools.rig import (
    DEMO_DESTINATIONS,
    DEMO_SEGMENTS,
    destinations_toml,
    service_env,
)
from consumer.devtools.synthetic import StreamGenerator
from consumer.events import decode_fields
from consumer.settings import load_settings
from consumer.tuning import FETCH_TIMEOUT_MS, MAX_RECORDS_PER_FETCH

TOPIC = "bench-intake"
#: Longest wait, after a pass, for its dead letters to be acknowledged (not timed).
LETTERS_WAIT_S: Final = 10.0
Handler = Callable[[int, Sequence[ConsumerRecord[Any, Any]]], None]


class GcClock:
    """Time spent in the cyclic garbage collector, per generation, while armed."""

    def __init__(self) -> None:
        self.seconds = [0.0, 0.0, 0.0]
        self.collections = [0, 0, 0]
        self._start = 0.0

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._start = time.perf_counter()
        else:
            generation = info["generation"]
            self.seconds[generation] += time.perf_counter() - self._start
            self.collections[generation] += 1

    @contextlib.contextmanager
    def armed(self) -> Any:
        gc.callbacks.append(self)
        try:
            yield self
        finally:
            gc.callbacks.remove(self)


async def read_all(bootstrap: str, expected: int, handle: Handler | None) -> float:
    """Read the topic from the start with the service's fetch settings; returns records/s."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        max_poll_records=MAX_RECORDS_PER_FETCH,
    )
    await consumer.start()
    try:
        tp = TopicPartition(TOPIC, 0)
        consumer.assign([tp])
        await consumer.seek_to_beginning(tp)
        seen = 0
        started = time.perf_counter()
        while seen < expected:
            batches = await consumer.getmany(
                timeout_ms=FETCH_TIMEOUT_MS, max_records=MAX_RECORDS_PER_FETCH
            )
            for part, records in batches.items():
                if handle is not None:
                    handle(part.partition, records)
                    # what Source.fetch_loop does per batch besides handling it
                    obs.events_consumed.labels(topic=part.topic, partition=str(part.partition)).inc(
                        len(records)
                    )
                seen += len(records)
        return seen / (time.perf_counter() - started)
    finally:
        await consumer.stop()


def _decode_only(_partition: int, records: Sequence[ConsumerRecord[Any, Any]]) -> None:
    for record in records:
        decode_fields(record.value)


async def service_pass(
    bootstrap: str, expected: int, env: dict[str, str], profile: bool = False
) -> tuple[float, dict[str, Any], str]:
    """One pass through a fresh Service's `Intake.handle`; (records/s, facts, profile text)."""
    settings = load_settings(env)
    service = Service(settings)
    gc_clock = GcClock()
    thresholds = gc.get_threshold()
    tune_garbage_collector()  # as Service.run does once the service has started
    tuned = os.environ.get("CMSYNC_BENCH_GC_THRESHOLDS")  # diagnostic, e.g. "700,10,10"
    if tuned:
        gc.set_threshold(*(int(x) for x in tuned.split(",")))
    profile_text = ""
    try:
        # the real routes and buffers; the flushers are built but not started
        async with service.pipeline() as intake:
            gc.collect()
            with gc_clock.armed():
                started = time.perf_counter()
                if profile:
                    profiler = cProfile.Profile()
                    profiler.enable()
                rate = await read_all(bootstrap, expected, intake.handle)
                if profile:
                    profiler.disable()
                    out = io.StringIO()
                    pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(18)
                    profile_text = out.getvalue()
                elapsed = time.perf_counter() - started
            # let the dead letters reach the broker (not timed: they are acknowledged async)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(LETTERS_WAIT_S):
                    await intake.wait_until(lambda: intake.letters_in_flight() == 0)
            buffered = sum(route.buffer.pending() for route in intake.routes)
            holds = intake.tracker.outstanding()
    finally:
        gc.set_threshold(*thresholds)
        gc.unfreeze()
        with contextlib.suppress(Exception):
            await service.source.stop()  # never started: this only closes its client
    facts = {
        "gc_seconds": round(sum(gc_clock.seconds), 2),
        "gc_share": round(sum(gc_clock.seconds) / elapsed, 3),
        "gc_full_collections": gc_clock.collections[2],
        "buffered_entries_at_end": buffered,
        "holds_at_end": holds,
    }
    del service
    gc.collect()
    return rate, facts, profile_text


def _env(bootstrap: str, workdir: Path) -> dict[str, str]:
    dest_file = workdir / "destinations.toml"
    list_ids = {d.name: f"{n:032x}" for n, d in enumerate(DEMO_DESTINATIONS)}
    dest_file.write_text(destinations_toml(DEMO_DESTINATIONS, list_ids))
    return service_env(
        bootstrap=bootstrap,
        topic=TOPIC,
        group="bench-intake",  # never joined: the passes read with consumers of their own
        base_url="http://127.0.0.1:9/api/v3.3",  # never called: no flusher runs
        api_key="bench-intake",
        destinations_file=dest_file,
        CMSYNC_HTTP_PORT="0",
    )


async def run(events: int, rounds: int, profile: bool) -> Result:
    started = time.monotonic()
    result = Result(
        "intake",
        f"1. Intake: decode + validate + route + coalesce vs a bare getmany loop "
        f"(~{events:,} events)",
    )
    async with running_broker() as broker:
        await create_topics(broker.bootstrap, {TOPIC: 1, f"{TOPIC}.dlq": 1})
        t = time.monotonic()
        # The demo's stream, scaled: the demo makes ~3.45 records per profile.
        records = StreamGenerator(
            seed=11, profiles=max(100, round(events / 3.45)), segments=DEMO_SEGMENTS
        ).generate()
        generated_s = time.monotonic() - t
        invalid = sum(1 for r in records if r.invalid)
        mean_bytes = sum(len(r.value) for r in records) / len(records)
        produced = await produce(broker.bootstrap, TOPIC, 1, ((r.key, r.value) for r in records))
        del records
        gc.collect()  # the generated objects would otherwise make every collection slower
        n = produced.records
        with tempfile.TemporaryDirectory(prefix="cmsync-bench-") as tmp:
            env = _env(broker.bootstrap, Path(tmp))
            await read_all(broker.bootstrap, n, None)  # warm-up: the broker's first read is slow
            reference: list[float] = []
            service: list[float] = []
            facts: list[dict[str, Any]] = []
            for _ in range(rounds):
                reference.append(await read_all(broker.bootstrap, n, None))
                rate, fact, _ = await service_pass(broker.bootstrap, n, env)
                service.append(rate)
                facts.append(fact)
            decode_only = await read_all(broker.bootstrap, n, _decode_only)
            profile_text = ""
            if profile:
                _, _, profile_text = await service_pass(broker.bootstrap, n, env, profile=True)
    best_ref, best_svc = max(reference), max(service)
    fact = facts[service.index(best_svc)]
    ratio = best_svc / best_ref
    result.add(
        Figure("records in the topic", n, note=f"{invalid:,} invalid, {mean_bytes:.0f} B avg"),
        Figure("bare getmany loop", best_ref, "events/s", note=_all(reference)),
        Figure("service: decode+validate+route+coalesce", best_svc, "events/s", note=_all(service)),
        Figure("ratio service / bare loop", ratio, "", "≥ 0.50", at_least(ratio, 0.5)),
        Figure(
            "decode + validate only (same loop)",
            decode_only,
            "events/s",
            note=f"ratio {decode_only / best_ref:.2f}",
        ),
        Figure(
            "service pass: share of time in the GC",
            100 * fact["gc_share"],
            "%",
            note=f"{fact['gc_full_collections']} full collections",
        ),
        Figure("buffered entries at the end (no flushers)", fact["buffered_entries_at_end"]),
    )
    result.settings = {
        "events": n,
        "rounds": rounds,
        "partitions": 1,
        "generate_s": round(generated_s, 1),
        "produce_s": round(produced.last_ack - produced.started, 1),
        "reference_rates": reference,
        "service_rates": service,
        "service_facts": facts,
    }
    if profile_text:
        print(profile_text)
        result.notes.append("cProfile of one extra service pass printed above")
    return result.finish(started)


def _all(rates: list[float]) -> str:
    return "passes " + ", ".join(f"{r / 1000:.0f}k" for r in rates)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--events",
        type=int,
        default=env_int("CMSYNC_BENCH_INTAKE_EVENTS", 1_000_000),
        help="approximate records in the topic (env CMSYNC_BENCH_INTAKE_EVENTS; default 1000000)",
    )
    p.add_argument(
        "--rounds",
        type=int,
        default=env_int("CMSYNC_BENCH_INTAKE_ROUNDS", 2),
        help="passes per side, alternating (default 2; the best counts)",
    )
    p.add_argument(
        "--profile", action="store_true", help="also print a cProfile of one service pass"
    )


async def scenario(args: argparse.Namespace) -> list[Result]:
    return [await run(args.events, args.rounds, args.profile)]


def main(argv: list[str] | None = None) -> int:
    return script(
        "python -m bench.intake",
        "Scenario 1: intake throughput against a bare loop.",
        add_arguments,
        scenario,
        argv,
    )


if __name__ == "__main__":
    sys.exit(main())
