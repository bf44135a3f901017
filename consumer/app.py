"""The service: one event loop, one TaskGroup, and the ordering of shutdown written down.

Tasks owned by the TaskGroup: the fetch loop, one flusher per destination, the committer.
The HTTP server (metrics, health) lives beside them for the whole run.

Shutdown (SIGTERM/SIGINT, or `Service.stop()`), all inside CMSYNC_SHUTDOWN_BUDGET_S:
  1. stop fetching: the fetch loop ends at its next poll (≤ 200 ms);
  2. drain: every flusher sends what it buffers without waiting for the flush interval, until
     all buffers are empty or the budget (less a reserve for 3 and 4) is spent;
  3. commit the offsets that are durable now;
  4. close: leave the group, stop the dead-letter producer, the HTTP server, the sessions.
A second signal skips to the end: the process exits at once, committing nothing more.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import signal
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Final

import aiohttp
import structlog
from aiokafka import ConsumerRecord

from consumer import observability as obs
from consumer.buffer import (
    AppliedMemory,
    Change,
    DestinationBuffer,
    Offered,
    Position,
    partition_offset,
)
from consumer.campaign_monitor.client import ApiKey, CampaignMonitorClient
from consumer.deadletter import DeadLetter, DeadLetterQueue
from consumer.events import Invalid, decode_fields, parse_email
from consumer.flusher import REMOVAL_BATCH_SIZE, ApiChannel, DestinationFlusher, payload_of
from consumer.offsets import OffsetTracker
from consumer.ratelimit import AimdRateLimiter
from consumer.settings import ConfigError, Destination, Settings, load_settings
from consumer.source import Source

log = structlog.get_logger("cmsync.app")

#: Part of the shutdown budget kept for committing and closing (steps 3 and 4).
CLOSE_RESERVE_S: Final = 3.0
#: Longest wait for each of the Kafka clients to close when no shutdown deadline applies.
CLOSE_TIMEOUT_S: Final = 10.0
#: Part of the shutdown budget kept for the process to exit once everything is closed.
EXIT_RESERVE_S: Final = 1.5
#: Longest wait for the revoked partitions' changes to be flushed during a rebalance.
REVOKE_BUDGET_S: Final = 20.0
#: Thresholds of the cyclic garbage collector while the service runs (Python's are 700, 10, 10).
#: The buffers hold up to CMSYNC_MAX_PENDING changes, and at Python's defaults collections of
#: the young generations ran so often, and full ones traversed so many live entries, that the
#: collector took over half of the intake time (bench/intake.py). The service makes no
#: reference cycles on its hot path, so collecting less often frees the same memory, later
#: (aiokafka's, when intake pauses, are collected on resuming: Source._apply_backpressure).
GC_THRESHOLDS: Final = (50_000, 50, 100)


def tune_garbage_collector() -> None:
    """Freeze what start-up allocated (modules, clients, settings: alive for the whole run, so
    no collection should traverse it again) and collect the young generations less often."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


@dataclass(slots=True)
class Route:
    destination: Destination
    buffer: DestinationBuffer
    flusher: DestinationFlusher


class Service:
    """Wires source → decode → route → buffers → flushers → tracker → commits."""

    def __init__(self, settings: Settings, *, commit_interval_s: float = 1.0) -> None:
        self.settings = settings
        self._commit_interval_s = commit_interval_s
        self.tracker = OffsetTracker()
        self.applied = AppliedMemory(settings.applied_memory)
        self._stopping = asyncio.Event()
        self._dlq = DeadLetterQueue(settings.kafka.dlq_topic, settings.kafka.client_kwargs())
        self._session: aiohttp.ClientSession | None = None
        self._routes: dict[str, list[Route]] = {}
        self._flushers: list[DestinationFlusher] = []
        self._channels: dict[str, ApiChannel] = {}
        self._background: set[asyncio.Task[None]] = set()
        self._tasks: list[asyncio.Task[None]] = []
        self._draining = False
        self._deadline: float | None = None  # end of the shutdown budget, once stopping
        self.source = Source(
            settings.kafka,
            handle=self._handle,
            committable=self.tracker.committable,
            outstanding=self.tracker.outstanding,
            max_pending=settings.max_pending,
            on_revoked=self._on_revoked,
            on_assigned=self._on_assigned,
        )
        self.health = obs.HealthServer(
            settings.http_port, liveness=self._liveness, readiness=self._readiness
        )

    # ---------------------------------------------------------------- wiring

    def _build_routes(self, session: aiohttp.ClientSession) -> None:
        s = self.settings
        for dest in s.destinations:
            channel = self._channels.get(dest.api_key_env)
            if channel is None:
                limiter = AimdRateLimiter(s.rate_limit_rps)
                client = CampaignMonitorClient(
                    s.cm_base_url, ApiKey(dest.api_key.reveal()), session=session
                )
                channel = ApiChannel(dest.api_key_env, client, limiter)
                client.observer = channel.observe
                self._channels[dest.api_key_env] = channel
            buffer = DestinationBuffer(
                dest.name,
                self.applied,
                flush_interval_s=s.flush_interval_s,
                max_removals=REMOVAL_BATCH_SIZE,
            )
            flusher = DestinationFlusher(
                destination=dest,
                buffer=buffer,
                channel=channel,
                dlq=self._dlq,
                release=self._release,
                source_topic=s.kafka.topic,
                consent_refresh_s=s.consent_refresh_s,
            )
            self._flushers.append(flusher)
            self._routes.setdefault(dest.segment_id, []).append(Route(dest, buffer, flusher))

    def _release(self, positions: Iterable[Position]) -> None:
        release = self.tracker.release
        for held in positions:
            release(*partition_offset(held))

    # ---------------------------------------------------------------- the hot path

    def _handle(self, partition: int, records: Sequence[ConsumerRecord[Any, Any]]) -> None:
        """Decode, validate, route and buffer one fetched batch of one partition.

        The hot path (measured by bench/intake.py): per record one `decode_fields`, one
        `tracker.track`, one `parse_email` per distinct email field of its destinations, one
        `Change` and one `offer` per destination. Metrics are counted here and added once per
        batch: a labelled `inc` costs more than decoding an event. Nothing in here awaits, so
        waking a flusher at the end of the batch is as prompt as waking it when its import
        filled up.
        """
        now = time.monotonic()
        tracker = self.tracker
        track, release = tracker.track, tracker.release
        routes = self._routes
        # segment -> [(email field, offer, destination name)], rebuilt per batch (a few routes)
        plan = {
            segment: [(r.destination.email_field, r.buffer.offer, r.destination.name) for r in rs]
            for segment, rs in routes.items()
        }
        new, late_outcome, duplicate_outcome = Offered.NEW, Offered.LATE, Offered.DUPLICATE
        skipped = invalid = late = duplicate = 0
        coalesced: dict[str, int] = {}
        invalid_reasons: dict[str, int] = {}
        for record in records:
            offset: int = record.offset
            value: bytes = record.value or b""  # None (a tombstone) is invalid as b"" is
            event = decode_fields(value)
            if isinstance(event, Invalid):
                track(partition, offset, 1)
                invalid += 1
                invalid_reasons[event.code] = invalid_reasons.get(event.code, 0) + 1
                self._dead_letter(record, partition, event.code, event.detail, None)
                continue
            event_id, segment_id, entered, occurred_at_ms, profile = event
            targets = plan.get(segment_id)
            if not targets:
                track(partition, offset, 0)
                skipped += 1
                continue
            # One hold per destination: each is released when its change is applied (or
            # superseded, or late), or when its dead letter is acknowledged.
            track(partition, offset, len(targets))
            position = offset << 32 | partition  # buffer.position(), inlined
            payload = payload_of(record.key, value, profile.get("id"))
            id_hash = hash(event_id)  # see Change.event_id
            last_field: str | None = None
            address = raw = None
            for field, offer, name in targets:
                if field != last_field:  # destinations fed by one segment mostly share it
                    raw = profile.get(field)
                    address = parse_email(raw)
                    last_field = field
                if address is None:
                    code = "missing_email" if raw is None else "invalid_email"
                    invalid_reasons[code] = invalid_reasons.get(code, 0) + 1
                    detail = f"profile field {field!r} is missing or not an email address"
                    self._dead_letter(record, partition, code, detail, name)
                    continue
                # seq = the position: ties in occurred_at go to the later offset (contract)
                change = Change(
                    address, entered, occurred_at_ms, position, id_hash, payload, position
                )
                outcome, done = offer(change, now)
                if outcome is not new:
                    if outcome is late_outcome:
                        late += 1
                        for held in done:
                            release(*partition_offset(held))
                    elif outcome is duplicate_outcome:
                        duplicate += 1
                    else:
                        coalesced[name] = coalesced.get(name, 0) + 1
        for targets_of_segment in routes.values():
            for route in targets_of_segment:
                if route.buffer.ready_counts()[0] >= route.buffer.max_adds:
                    route.flusher.wakeup.set()
        obs.events_decoded.labels(topic=self.settings.kafka.topic).inc(len(records) - invalid)
        for reason, n in invalid_reasons.items():
            obs.events_invalid.labels(reason=reason).inc(n)
        if skipped:
            obs.events_skipped.labels(reason="no_destination").inc(skipped)
        if late:
            obs.events_skipped.labels(reason="late").inc(late)
        if duplicate:
            obs.events_skipped.labels(reason="duplicate").inc(duplicate)
        for name, n in coalesced.items():
            obs.changes_coalesced.labels(destination=name).inc(n)

    def _dead_letter(
        self,
        record: ConsumerRecord[Any, Any],
        partition: int,
        code: str,
        detail: str,
        destination: str | None,
    ) -> None:
        letter = DeadLetter(
            key=record.key,
            value=record.value,
            error=code,
            detail=detail,
            source=f"{record.topic}/{partition}/{record.offset}",
            destination=destination,
        )

        async def send() -> None:
            await self._dlq.send(letter)
            self.tracker.release(partition, record.offset)

        task = asyncio.get_running_loop().create_task(send())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # ---------------------------------------------------------------- rebalance

    async def _on_revoked(self, partitions: set[int]) -> None:
        """Flush what the revoked partitions hold, within REVOKE_BUDGET_S (step 1 of handing
        them over; the source then commits them)."""
        log.info("partitions_revoked", partitions=sorted(partitions))
        if not self._draining:
            for flusher in self._flushers:
                flusher.drain()
        deadline = time.monotonic() + REVOKE_BUDGET_S
        while time.monotonic() < deadline:
            if all(self.tracker.outstanding_in(p) == 0 for p in partitions):
                break
            await asyncio.sleep(0.05)
        else:
            log.warning(
                "revocation_flush_incomplete",
                partitions=sorted(partitions),
                pending=sum(self.tracker.outstanding_in(p) for p in partitions),
            )
        if not self._draining:
            for flusher in self._flushers:
                flusher.draining = False

    async def _on_assigned(self, partitions: set[int]) -> None:
        for partition in self.tracker.partitions():
            if partition not in partitions:
                self.tracker.forget(partition)

    # ---------------------------------------------------------------- health

    def _liveness(self) -> tuple[bool, str]:
        dead = [t.get_name() for t in self._tasks if t.done()]
        if dead and not self._stopping.is_set():
            return False, f"tasks ended: {', '.join(dead)}"
        return True, "ok"

    def _readiness(self) -> tuple[bool, str]:
        stalled = [f.destination.name for f in self._flushers if f.stalled_reason]
        if stalled:
            return False, f"destinations stalled: {', '.join(stalled)}"
        if self._stopping.is_set():
            return False, "shutting down"
        return True, "joined" if self.source.joined else "waiting for assignment"

    # ---------------------------------------------------------------- lifecycle

    def stop(self) -> None:
        """Ask for a graceful stop (what SIGTERM does)."""
        self._stopping.set()

    async def run(self) -> None:
        budget = self.settings.shutdown_budget_s
        obs.build_info.info({"version": _version(), "python": sys.version.split()[0]})
        obs.init_labels(
            topic=self.settings.kafka.topic,
            destinations=[d.name for d in self.settings.destinations],
            api_keys={d.api_key_env for d in self.settings.destinations},
            flush_interval_s=self.settings.flush_interval_s,
        )
        await self.health.start()
        self._session = aiohttp.ClientSession()
        # aiohttp silently re-sends a GET or DELETE once when a kept-alive connection drops;
        # that copy bypasses the rate limiter (guarantee 5: found by tests/faults, a 15 % drop
        # rate took one second to 57 requests under a ceiling of 50). Without it the drop
        # surfaces as a TransientError, retried through the limiter with backoff. No public
        # switch exists; aiohttp's own test client sets the same attribute.
        self._session._retry_connection = False
        try:
            self._build_routes(self._session)
            await self._dlq.start()
            await self.source.start()
            tune_garbage_collector()
            log.info(
                "started",
                destinations=[d.name for d in self.settings.destinations],
                topic=self.settings.kafka.topic,
                group=self.settings.kafka.group_id,
            )
            async with asyncio.TaskGroup() as tg:
                fetch = tg.create_task(self.source.fetch_loop(self._stopping), name="fetch")
                flushers = [
                    tg.create_task(f.run(), name=f"flush:{f.destination.name}")
                    for f in self._flushers
                ]
                committer = tg.create_task(
                    self.source.commit_loop(self._commit_interval_s), name="commit"
                )
                self._tasks = [fetch, *flushers, committer]
                await self._stopping.wait()
                deadline = self._deadline = time.monotonic() + budget
                # 1. stop fetching
                await fetch
                # 2. drain
                self._draining = True
                for flusher in self._flushers:
                    flusher.drain()
                await self._drain(deadline - CLOSE_RESERVE_S)
                # 3. commit
                with contextlib.suppress(Exception):  # a failed final commit only means a re-read
                    await asyncio.wait_for(
                        self.source.commit(), max(0.5, deadline - time.monotonic() - 1)
                    )
                for task in [*flushers, committer]:
                    task.cancel()
        finally:
            # 4. close
            await self._close()
        log.info("stopped", pending=self.tracker.outstanding())

    async def _drain(self, until: float) -> None:
        while time.monotonic() < until:
            if self.tracker.outstanding() == 0 and all(f.drained() for f in self._flushers):
                return
            await asyncio.sleep(0.05)
        log.warning("shutdown_drain_incomplete", pending=self.tracker.outstanding())

    async def _close(self) -> None:
        for task in list(self._background):
            task.cancel()
        # Leaving the group and stopping the producer wait on the broker: keep them inside the
        # budget. (A group join in progress holds the consumer's stop() until it completes —
        # found by tests/faults: SIGTERM during a slow join exited after 12 s, budget 10. Cut
        # short, the group notices our absence by the session timeout instead of LeaveGroup.)
        for stop in (self.source.stop, self._dlq.stop):
            left = CLOSE_TIMEOUT_S
            if self._deadline is not None:  # the process must also exit before the deadline
                left = self._deadline - EXIT_RESERVE_S - time.monotonic()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(stop(), max(0.1, left))
        if self._session is not None:
            await self._session.close()
        await self.health.stop()


def _version() -> str:
    from consumer import __version__

    return __version__


async def run_until_signalled(settings: Settings) -> None:
    """Run the service; the first SIGTERM/SIGINT stops it gracefully, a second one forces."""
    service = Service(settings)  # inside the loop: the Kafka clients bind to it
    loop = asyncio.get_running_loop()
    main = asyncio.current_task()
    signals_seen = 0

    def on_signal(signum: int) -> None:
        nonlocal signals_seen
        signals_seen += 1
        if signals_seen == 1:
            log.info("stopping", signal=signal.Signals(signum).name)
            service.stop()
        else:
            log.warning("forced_stop", signal=signal.Signals(signum).name)
            if main is not None:
                main.cancel()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
    try:
        await service.run()
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)


def cli_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="cmsync run",
        description="Run the sync: consume membership events from Kafka, coalesce them per "
        "destination list and flush them to Campaign Monitor, serving /metrics, /healthz and "
        "/readyz, until SIGTERM or SIGINT. Configured entirely by CMSYNC_* environment "
        "variables (see `cmsync check-config --help`).",
    )
    parser.parse_args(argv)
    import os

    try:
        settings = load_settings(os.environ)
    except ConfigError as exc:
        print("configuration error:", file=sys.stderr)
        for problem in exc.problems:
            print(f"  - {problem}", file=sys.stderr)
        return 2
    obs.configure_logging(settings.log_level, settings.log_format)  # type: ignore[arg-type]
    from aiokafka.errors import KafkaConnectionError

    try:
        asyncio.run(run_until_signalled(settings))
    except asyncio.CancelledError:
        return 1
    except KafkaConnectionError as exc:  # at start-up: no broker answered
        log.error("fatal", error=type(exc).__name__, detail=str(exc)[:200])
        servers = ",".join(settings.kafka.bootstrap_servers)
        print(
            f"cmsync run: cannot reach the Kafka brokers at {servers} "
            "(CMSYNC_KAFKA_BOOTSTRAP_SERVERS): check the address and that the brokers are up",
            file=sys.stderr,
        )
        return 1
    except Exception as exc:
        # A task's failure arrives wrapped in the TaskGroup's ExceptionGroup: name the cause.
        cause: BaseException = exc
        while isinstance(cause, BaseExceptionGroup) and cause.exceptions:
            cause = cause.exceptions[0]
        log.error("fatal", error=type(cause).__name__, detail=str(cause)[:200], exc_info=exc)
        return 1
    return 0
