"""The Kafka side: one aiokafka consumer, its rebalance listener, pause/resume and commits.

One consumer reads every topic the service consumes (the input, and the claims topic that
feeds stage 2 of the membership state), as Kafka Streams does: one group, one assignment.
Auto-commit is off: the only offsets ever committed are the ones ``committable`` calls durable.
aiokafka does not commit on `stop()` and does not call the revocation callback then either, so
shutdown commits explicitly before stopping.

A handler that raises `KafkaError` (its checkpoint was not acknowledged) or `ReadAgain` kept
nothing of the batch: the partition is read again from the batch's first offset.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import structlog
from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from aiokafka.abc import ConsumerRebalanceListener
from aiokafka.errors import KafkaError

from consumer import observability as obs
from consumer.settings import KafkaSettings
from consumer.tuning import (
    FETCH_TIMEOUT_MS,
    LOW_WATER,
    MAX_RECORDS_PER_FETCH,
    REBALANCE_TIMEOUT_MS,
)

log = structlog.get_logger("cmsync.source")


class ReadAgain(Exception):  # noqa: N818  # not an error: a request to the source
    """Raised by a handler that kept nothing of a batch: read it again from its first offset."""


class RecordHandler(Protocol):
    def __call__(
        self, topic: str, partition: int, records: Sequence[ConsumerRecord[Any, Any]]
    ) -> Awaitable[None]: ...


#: The partitions of a rebalance callback, by topic (every consumed topic present).
Partitions = dict[str, set[int]]


@dataclass(frozen=True, slots=True)
class Backpressure:
    """When intake pauses and resumes (guarantee 4), pure: two bounds, pending changes
    (CMSYNC_MAX_PENDING) and their estimated bytes (CMSYNC_MAX_PENDING_BYTES). Intake pauses
    when either is reached and resumes once both are at or below their low-water marks
    (`LOW_WATER` of each bound), so one bound cannot resume what the other paused."""

    max_pending: int
    max_pending_bytes: int

    def reached(self, pending: int, pending_bytes: int) -> str | None:
        """The bound reached ("changes" or "bytes"), or None: pause when not None."""
        if pending >= self.max_pending:
            return "changes"
        if pending_bytes >= self.max_pending_bytes:
            return "bytes"
        return None

    def relieved(self, pending: int, pending_bytes: int) -> bool:
        """Both at or below their low-water marks: resume a paused intake."""
        return pending <= int(self.max_pending * LOW_WATER) and pending_bytes <= int(
            self.max_pending_bytes * LOW_WATER
        )


class Source:
    """Fetches records, pauses under backpressure, commits what ``committable`` says is
    durable. ``topics``: the input topic first (the lag and assignment gauges are about it),
    then any internal topic consumed beside it."""

    def __init__(
        self,
        settings: KafkaSettings,
        *,
        topics: Sequence[str],
        handle: RecordHandler,
        committable: Callable[[str, int], int | None],
        outstanding: Callable[[], int],
        max_pending: int,
        outstanding_bytes: Callable[[], int],
        max_pending_bytes: int,
        on_revoked: Callable[[Partitions], Awaitable[None]],
        on_assigned: Callable[[Partitions], Awaitable[None]],
    ) -> None:
        self.topic = topics[0]
        self.topics = tuple(topics)
        self._handle = handle
        self._committable = committable
        self._outstanding = outstanding
        self._outstanding_bytes = outstanding_bytes
        self._backpressure = Backpressure(max_pending, max_pending_bytes)
        self._on_revoked = on_revoked
        self._on_assigned = on_assigned
        self._committed: dict[TopicPartition, int] = {}
        self._fetched: dict[TopicPartition, int] = {}  # offset after the last record handled
        self._paused = False
        self.joined = False
        self.consumer = AIOKafkaConsumer(
            group_id=settings.group_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_poll_records=MAX_RECORDS_PER_FETCH,
            rebalance_timeout_ms=REBALANCE_TIMEOUT_MS,
            **settings.client_kwargs(),
        )

    async def start(self) -> None:
        await self.consumer.start()
        self.consumer.subscribe(list(self.topics), listener=_Listener(self))

    async def stop(self) -> None:
        await self.consumer.stop()

    # ---------------------------------------------------------------- fetching

    async def fetch_loop(self, stopping: asyncio.Event) -> None:
        """Fetch until `stopping` is set. Never blocks on a slow destination: when too much is
        pending it pauses the partitions and keeps polling (heartbeats and rebalances go on).

        A stop request ends the loop at once, even in the middle of a fetch: aiokafka's
        `getmany` ignores its timeout while the group rebalances (it waits for the new
        assignment, as long as a slow join takes), and shutdown must not wait for that (found
        by tests/faults: SIGTERM during a join took 17 s against a budget of 10). A cancelled
        `getmany` returns no record, so none is lost; its partitions are read again from the
        commit.
        """
        stop = asyncio.ensure_future(stopping.wait())
        try:
            while not stop.done():
                fetch = asyncio.ensure_future(
                    self.consumer.getmany(
                        timeout_ms=FETCH_TIMEOUT_MS, max_records=MAX_RECORDS_PER_FETCH
                    )
                )
                await asyncio.wait((fetch, stop), return_when=asyncio.FIRST_COMPLETED)
                if not fetch.done():
                    fetch.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await fetch
                    return
                for tp, records in fetch.result().items():
                    if not records:
                        continue
                    if self._paused:
                        # A bound was reached by an earlier batch of this fetch: leave this
                        # one in Kafka (read again on resuming), so a bound is passed by one
                        # partition's batch at most, not by a whole fetch.
                        self.consumer.seek(tp, records[0].offset)
                        continue
                    try:
                        await self._handle(tp.topic, tp.partition, records)
                    except (KafkaError, ReadAgain) as exc:
                        log.warning(
                            "batch_read_again",
                            topic=tp.topic,
                            partition=tp.partition,
                            error=type(exc).__name__,
                        )
                        self.consumer.seek(tp, records[0].offset)
                        continue
                    self._fetched[tp] = records[-1].offset + 1
                    obs.events_consumed.labels(topic=tp.topic, partition=str(tp.partition)).inc(
                        len(records)
                    )
                    self._apply_backpressure()
                self._apply_backpressure()  # also when nothing came: resume
        finally:
            stop.cancel()

    def _apply_backpressure(self) -> None:
        """Pause every assigned partition, or resume them, as `Backpressure` decides from
        what is pending now. Called after each partition's batch, so a bound is passed by at
        most one batch (the rest of the fetch stays in Kafka: `fetch_loop`)."""
        pending = self._outstanding()
        pending_bytes = self._outstanding_bytes()
        if not self._paused:
            bound = self._backpressure.reached(pending, pending_bytes)
            if bound is None:
                return
            assigned = self.consumer.assignment()
            if not assigned:
                return
            self.consumer.pause(*assigned)
            self._paused = True
            obs.paused_partitions.set(len(assigned))
            log.info(
                "intake_paused",
                pending=pending,
                limit=self._backpressure.max_pending,
                pending_bytes=pending_bytes,
                limit_bytes=self._backpressure.max_pending_bytes,
                bound=bound,
            )
        elif self._backpressure.relieved(pending, pending_bytes):
            # Pausing made aiokafka drop the records it had fetched but not handed out, in
            # reference cycles (a record iterator and its generator) that hold the whole fetch
            # response (up to one fetch's worth per partition). Only the cyclic collector
            # frees them, and the service runs it rarely (app.GC_THRESHOLDS): without this, the
            # tests/faults backpressure scenario grew by 130 MiB instead of 50. Once per pause.
            gc.collect()
            self.consumer.resume(*self.consumer.paused())
            self._paused = False
            obs.paused_partitions.set(0)
            log.info("intake_resumed", pending=pending, pending_bytes=pending_bytes)

    # ---------------------------------------------------------------- committing

    async def commit(self, partitions: Iterable[TopicPartition] | None = None) -> None:
        """Commit the durable offset of each (given or assigned) partition that moved on."""
        if partitions is None:
            partitions = self.consumer.assignment()
        offsets: dict[TopicPartition, int] = {}
        for tp in partitions:
            offset = self._committable(tp.topic, tp.partition)
            if offset is not None and offset > self._committed.get(tp, -1):
                offsets[tp] = offset
        if not offsets:
            return
        await self.consumer.commit(offsets)
        for tp, offset in offsets.items():
            self._committed[tp] = offset
            obs.committed_offset.labels(topic=tp.topic, partition=str(tp.partition)).set(offset)

    async def commit_loop(self, interval_s: float = 1.0) -> None:
        """Commit periodically; a failed commit is retried at the next tick (nothing is lost by
        committing late, only re-read)."""
        while True:
            await asyncio.sleep(interval_s)
            try:
                await self.commit()
            except KafkaError as exc:
                log.warning("commit_failed", error=type(exc).__name__)
            self._export_lag()

    def _export_lag(self) -> None:
        for tp in self.consumer.assignment():
            high = self.consumer.highwater(tp)
            if high is None:
                continue
            done = self._committable(tp.topic, tp.partition)
            if done is None:
                done = self._committed.get(tp, high)
            obs.consumer_lag.labels(topic=tp.topic, partition=str(tp.partition)).set(
                max(0, high - done)
            )

    def committed(self, partition: int, topic: str | None = None) -> int | None:
        return self._committed.get(TopicPartition(topic or self.topic, partition))

    def _by_topic(self, tps: Iterable[TopicPartition]) -> Partitions:
        partitions: Partitions = {topic: set() for topic in self.topics}
        for tp in tps:
            if tp.topic in partitions:
                partitions[tp.topic].add(tp.partition)
        return partitions

    async def _revoked(self, revoked: set[TopicPartition]) -> None:
        obs.assigned_partitions.set(0)  # a rebalance revokes everything; `_assigned` follows
        ours = {tp for tp in revoked if tp.topic in self.topics}
        if ours:
            await self._on_revoked(self._by_topic(ours))
            try:
                await self.commit(ours)
            except (
                KafkaError
            ) as exc:  # the group moved on: the new owner re-reads from the last commit
                log.warning("revocation_commit_failed", error=type(exc).__name__)
            for tp in ours:
                self._committed.pop(tp, None)
                obs.forget_partition(tp.topic, tp.partition)
        if self._paused:
            obs.paused_partitions.set(0)
            self._paused = False

    async def _assigned(self, assigned: set[TopicPartition]) -> None:
        self.joined = True
        ours = {tp for tp in assigned if tp.topic in self.topics}
        for tp in ours:
            # Start from what the group committed: everything before it is durable already.
            with contextlib.suppress(KafkaError):
                committed = await self.consumer.committed(tp)
                if committed is not None:
                    self._committed[tp] = committed
        await self._on_assigned(self._by_topic(ours))
        for tp, position in list(self._fetched.items()):
            if tp not in ours:
                del self._fetched[tp]
                continue
            committed = self._committed.get(tp)
            if self._committable(tp.topic, tp.partition) is not None and (
                committed is None or committed < position
            ):
                # A partition we keep across the rebalance and still track: go on from where
                # we were. aiokafka would restart it from the last commit, which is behind
                # when the revocation could not flush everything in time (Campaign Monitor
                # down): those records are still held here, and reading them again would
                # track their offsets twice (found by tests/faults: the service crashed).
                # (A commit beyond our position means another member moved on meanwhile:
                # then aiokafka's restart from it is right.)
                self.consumer.seek(tp, position)
        inputs = sorted(tp.partition for tp in ours if tp.topic == self.topic)
        obs.assigned_partitions.set(len(inputs))
        internal = sorted(tp.partition for tp in ours if tp.topic != self.topic)
        log.info("partitions_assigned", partitions=inputs, internal_partitions=internal)


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]  # aiokafka is untyped
    def __init__(self, source: Source) -> None:
        self._source = source

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        await self._source._revoked(revoked)

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        await self._source._assigned(assigned)
