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
from consumer.buffer import AppliedMemory, Change, DestinationBuffer, Offered, Position
from consumer.campaign_monitor.client import ApiKey, CampaignMonitorClient
from consumer.deadletter import DeadLetter, DeadLetterQueue
from consumer.events import Invalid, decode, parse_email
from consumer.flusher import ApiChannel, DestinationFlusher, RawRecord
from consumer.offsets import OffsetTracker
from consumer.ratelimit import AimdRateLimiter
from consumer.settings import ConfigError, Destination, Settings, load_settings
from consumer.source import Source

log = structlog.get_logger("cmsync.app")

#: Part of the shutdown budget kept for committing and closing (steps 3 and 4).
CLOSE_RESERVE_S: Final = 3.0
#: Longest wait for the revoked partitions' changes to be flushed during a rebalance.
REVOKE_BUDGET_S: Final = 20.0


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
        self._seq = 0
        self._draining = False
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
            buffer = DestinationBuffer(dest.name, self.applied, flush_interval_s=s.flush_interval_s)
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
        for partition, offset in positions:
            release(partition, offset)

    # ---------------------------------------------------------------- the hot path

    def _handle(self, partition: int, records: Sequence[ConsumerRecord[Any, Any]]) -> None:
        """Decode, validate, route and buffer one fetched batch of one partition."""
        now = time.monotonic()
        track, release = self.tracker.track, self.tracker.release
        routes = self._routes
        skipped = invalid = 0
        for record in records:
            offset: int = record.offset
            value: bytes | None = record.value
            event = decode(value)
            if isinstance(event, Invalid):
                track(partition, offset, 1)
                invalid += 1
                obs.events_invalid.labels(reason=event.code).inc()
                self._dead_letter(record, partition, event.code, event.detail, None)
                continue
            targets = routes.get(event.segment_id)
            if not targets:
                track(partition, offset, 0)
                skipped += 1
                continue
            offers: list[tuple[Route, str]] = []
            rejects: list[tuple[Route, str]] = []
            for route in targets:
                raw = event.profile.get(route.destination.email_field)
                address = parse_email(raw)
                if address is None:
                    rejects.append((route, "missing_email" if raw is None else "invalid_email"))
                else:
                    offers.append((route, address))
            track(partition, offset, len(offers) + len(rejects))
            payload = RawRecord(record.key, value or b"", partition, offset)
            for route, address in offers:
                self._seq += 1
                change = Change(
                    key=address,
                    entered=event.entered,
                    occurred_at_ms=event.occurred_at_ms,
                    seq=self._seq,
                    event_id=event.event_id,
                    payload=payload,
                    position=(partition, offset),
                )
                outcome, done = route.buffer.offer(change, now)
                for pos in done:
                    release(*pos)
                if outcome is not Offered.NEW:
                    self._count_coalesced(route.destination.name, outcome)
                if route.buffer.ready_counts()[0] >= route.buffer.max_adds:
                    route.flusher.wakeup.set()
            for route, code in rejects:
                obs.events_invalid.labels(reason=code).inc()
                field = route.destination.email_field
                detail = f"profile field {field!r} is missing or not an email address"
                self._dead_letter(record, partition, code, detail, route.destination.name)
        obs.events_decoded.labels(topic=self.settings.kafka.topic).inc(len(records) - invalid)
        if skipped:
            obs.events_skipped.labels(reason="no_destination").inc(skipped)

    @staticmethod
    def _count_coalesced(destination: str, outcome: Offered) -> None:
        if outcome is Offered.LATE:
            obs.events_skipped.labels(reason="late").inc()
        elif outcome is Offered.DUPLICATE:
            obs.events_skipped.labels(reason="duplicate").inc()
        else:
            obs.changes_coalesced.labels(destination=destination).inc()

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
        try:
            self._build_routes(self._session)
            await self._dlq.start()
            await self.source.start()
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
                deadline = time.monotonic() + budget
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
        with contextlib.suppress(Exception):
            await self.source.stop()
        with contextlib.suppress(Exception):
            await self._dlq.stop()
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
    try:
        asyncio.run(run_until_signalled(settings))
    except asyncio.CancelledError:
        return 1
    except Exception as exc:
        log.error("fatal", error=type(exc).__name__, detail=str(exc)[:200])
        return 1
    return 0
