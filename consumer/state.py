"""The membership state in the running service: the two stages' partitions, fed by the source
and feeding the destination buffers (guarantee 2, "lists equal segments").

    input ──► `handle_input` (stage 1) ──► claims topic ──► `handle_claims` (stage 2) ──► buffers
    (key: profile)                         (key: list+address)                (key: address)

Who calls what: the source calls `handle_input` / `handle_claims` for every fetched batch
(awaiting each: a batch is checkpointed before the next of its partition is handled), and
`committable` for the offsets it may commit; the service calls `assign` / `revoke` from the
rebalance listener, `record_applied` from the flushers (through their ``on_applied``),
`release` with the positions the buffers hand back, and runs `checkpoint_loop`.

Offsets (guarantee 1). An input offset becomes committable once stage 1's checkpoint covering
it is acknowledged (claims, then the members changelog: `consumer.membership.stages`), or, for
an invalid record, once its dead letter is. A claims offset becomes committable once stage 2's
checkpoint covering it is acknowledged: from then on the desired state is recorded in the
addresses changelog, and whoever owns the partition next feeds what is owed to its buffers
again (`assign`), so nothing waits on Campaign Monitor to be committed. What the sync applied
is recorded (`record_applied`) and checkpointed by `checkpoint_loop` or the next batch.

One writer per address. Every (list, address) has one claims partition, and one process owns
it. On revocation the owner flushes what it buffers for the partition, waits for the requests
in flight (within REVOKE_BUDGET_S), drops what is still only buffered (the next owner sends
it: it is owed in the state), checkpoints and closes the store. Only then does the rebalance
go on, so the next owner starts after the old one's last write.

Per partition one lock orders the table's mutations and its checkpoint: the store's pending
writes must be exactly what the checkpoint sends (`PartitionStore`).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import structlog
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.errors import KafkaError

from consumer import observability as obs
from consumer.buffer import Change, DestinationBuffer, Entry, Offered, Position, partition_offset
from consumer.buffer import position as position_of
from consumer.events import Invalid, decode_fields, parse_email
from consumer.flusher import Original
from consumer.intake import Intake
from consumer.membership import changelog
from consumer.membership.changelog import InternalTopics
from consumer.membership.codec import decode_claims_record, is_claim_value
from consumer.membership.model import (
    Applied,
    Desired,
    DriftFound,
    Filled,
    ProfileChange,
    Repair,
)
from consumer.membership.stages import Durable, StageOne, StageTwo
from consumer.rows import Wanted, payload_bytes, view_of, wanted
from consumer.settings import Destination
from consumer.source import ReadAgain
from consumer.tuning import BACKFILL_AHEAD, BACKFILL_PAGE, BACKFILL_RETRY_S

__all__ = ["MembershipState", "Target"]

log = structlog.get_logger("cmsync.state")

#: The profile field the address of a segment no destination names is read from (kept for a
#: destination added later, `CMSYNC_STATE_KEEP=everything`): the contract's example field.
UNCONFIGURED_EMAIL_FIELD: Final = "email"

#: How long reading one record back may take before a dead letter goes without it.
READ_BACK_TIMEOUT_MS: Final = 5000


@dataclass(frozen=True, slots=True)
class Target:
    """Where one list's desired states go: its destination's buffer and a way to wake its
    flusher (a full import is ready)."""

    destination: Destination
    buffer: DestinationBuffer
    wake: Callable[[], None]


class RecordReader:
    """Reads single records of one topic back by position (for dead letters, which are rare),
    one at a time, with a consumer of its own (no group)."""

    def __init__(self, topic: str, consumer: AIOKafkaConsumer) -> None:
        self._topic = topic
        self._consumer = consumer
        self._lock = asyncio.Lock()

    async def read(self, partition: int, offset: int) -> ConsumerRecord[Any, Any] | None:
        """The record at ``offset``, or None if the partition no longer has it."""
        tp = TopicPartition(self._topic, partition)
        async with self._lock:
            self._consumer.assign([tp])
            self._consumer.seek(tp, offset)
            try:
                batches = await self._consumer.getmany(
                    tp, timeout_ms=READ_BACK_TIMEOUT_MS, max_records=1
                )
            except KafkaError:  # out of range (deleted by retention), or unreachable
                return None
            finally:
                self._consumer.unsubscribe()
        records = batches.get(tp, [])
        return records[0] if records and records[0].offset == offset else None


@dataclass(frozen=True, slots=True)
class Routing:
    """What the destinations file says to the membership state: which lists each segment
    feeds, with which profile fields. Every configured destination counts, those that send
    nothing included (their lists stay owed in the state)."""

    lists_of: dict[str, list[str]]  # segment -> lists it feeds
    email_field: dict[str, str]  # segment -> profile field of the address (one: check-config)
    fields_of: dict[str, tuple[str, ...]]  # segment -> profile fields its lists map
    names_of: dict[str, str]  # segment -> its destinations' names, for dead letters
    fields_of_list: dict[str, list[str]]  # list -> profile fields it maps
    name_of_list: dict[str, str]  # list -> its destination's name (one per list: check-config)

    @classmethod
    def of(cls, destinations: Iterable[Destination]) -> Routing:
        lists_of: dict[str, list[str]] = {}
        email_field: dict[str, str] = {}
        fields_of: dict[str, dict[str, None]] = {}
        names_of: dict[str, str] = {}
        fields_of_list: dict[str, list[str]] = {}
        name_of_list: dict[str, str] = {}
        for dest in destinations:
            mapped = [f for _, f in dest.custom_fields]
            if dest.name_field:
                mapped.append(dest.name_field)
            fields_of_list[dest.list_id] = mapped
            name_of_list[dest.list_id] = dest.name
            for segment in dest.segment_ids:
                lists_of.setdefault(segment, []).append(dest.list_id)
                email_field[segment] = dest.email_field
                fields_of.setdefault(segment, {}).update(dict.fromkeys(mapped))
                names = names_of.get(segment)
                names_of[segment] = dest.name if names is None else f"{names},{dest.name}"
        return cls(
            lists_of,
            email_field,
            {segment: tuple(f) for segment, f in fields_of.items()},
            names_of,
            fields_of_list,
            name_of_list,
        )

    @property
    def pairs(self) -> set[tuple[str, str]]:
        """Every (segment, list) fed."""
        return {(s, list_id) for s, lists in self.lists_of.items() for list_id in lists}

    @property
    def routes(self) -> dict[str, frozenset[str]]:
        """Per list, the segments feeding it."""
        routes: dict[str, set[str]] = {}
        for segment, list_id in self.pairs:
            routes.setdefault(list_id, set()).add(segment)
        return {list_id: frozenset(segments) for list_id, segments in routes.items()}


@dataclass(slots=True)
class _Room:
    """One stage's state of one partition, and the lock of its mutations and checkpoints."""

    stage: StageOne | StageTwo
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    #: stage 2: what the flushers reported, recorded at the next checkpoint
    applied: list[tuple[Desired, Applied]] = field(default_factory=list)


class MembershipState:
    """The stages' partitions of this process (see the module docstring)."""

    def __init__(
        self,
        *,
        destinations: Sequence[Destination],
        topics: InternalTopics,
        state_dir: Path,
        producer: AIOKafkaProducer,
        restorer: AIOKafkaConsumer,
        reader: AIOKafkaConsumer,
        input_topic: str,
        intake: Intake,
        keep: str = "everything",
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        """``keep``: ``CMSYNC_STATE_KEEP`` (``everything``: every segment on the topic with
        every profile field, so that a destination added later is filled exactly;
        ``configured``: only what the destinations name)."""
        self.topics = topics
        self._keep_all = keep == "everything"
        self._dir = state_dir
        self._producer = producer
        self._restorer = restorer
        self._restoring = asyncio.Lock()
        self._input_topic = input_topic
        self._reader = RecordReader(input_topic, reader)
        self._intake = intake  # dead letters, and the input offsets' holds (its tracker)
        self._clock = clock
        self._wall_clock = wall_clock
        self._targets: dict[str, Target] = {}
        self._routing = Routing.of(destinations)
        self._members: dict[int, _Room] = {}
        self._addresses: dict[int, _Room] = {}
        self._claims_done: dict[int, int] = {}  # claims partition -> offset after the last
        self._claims_written: dict[int, int] = {}  # claims partition -> after the last we wrote
        self._in_buffers: dict[int, int] = {}  # claims partition -> positions held in buffers
        # (input partition, segment, list) -> its backfill under way
        self._backfills: dict[tuple[int, str, str], asyncio.Task[None]] = {}
        self.restoring = False

    def set_targets(self, targets: Iterable[Target]) -> None:
        """The buffers the desired states go to, by list."""
        self._targets = {t.destination.list_id: t for t in targets}

    # ---------------------------------------------------------------- stage 1

    async def handle_input(
        self, partition: int, records: Sequence[ConsumerRecord[Any, Any]]
    ) -> None:
        """Decide one fetched batch of an input partition and checkpoint it; then its offsets
        are committable (invalid records' once their dead letters are acknowledged).

        Raises `KafkaError` when the checkpoint failed, `ReadAgain` when the partition is not
        (or no longer) restored here: nothing of the batch was kept, and the caller reads it
        again from its first offset."""
        if not records:
            return
        room = await self._room(self._members, partition)
        stage = room.stage
        assert isinstance(stage, StageOne)
        letters: list[tuple[ConsumerRecord[Any, Any], str, str, str | None]] = []
        undecodable = late = skipped = 0
        invalid_reasons: dict[str, int] = {}
        routing = self._routing
        email_field, fields_of = routing.email_field, routing.fields_of
        keep_all = self._keep_all
        async with room.lock:
            for record in records:
                event = decode_fields(record.value or b"")
                if isinstance(event, Invalid):
                    undecodable += 1
                    letters.append((record, event.code, event.detail, None))
                    invalid_reasons[event.code] = invalid_reasons.get(event.code, 0) + 1
                    continue
                _, segment_id, entered, occurred_at_ms, profile = event
                field_name = email_field.get(segment_id)
                if field_name is None:  # no list takes this segment (yet)
                    skipped += 1
                    if not keep_all:
                        continue
                    field_name = UNCONFIGURED_EMAIL_FIELD
                address = None
                if entered:
                    raw = profile.get(field_name)
                    address = parse_email(raw)
                    if address is None:
                        if segment_id not in email_field:
                            continue  # kept only with an address; no list to tell about it
                        code = "missing_email" if raw is None else "invalid_email"
                        detail = f"profile field {field_name!r} is missing or not an email address"
                        letters.append((record, code, detail, routing.names_of[segment_id]))
                        invalid_reasons[code] = invalid_reasons.get(code, 0) + 1
                        continue
                profile_id = profile["id"]
                assert isinstance(profile_id, str)  # the schema says so
                if keep_all:
                    mapped = dict(profile)
                    del mapped["id"]
                else:
                    mapped = {f: profile[f] for f in fields_of[segment_id] if f in profile}
                change = ProfileChange(
                    segment_id, profile_id, entered, occurred_at_ms, record.offset, address, mapped
                )
                if not stage.apply(change).accepted:
                    late += 1
            written = await self._checkpoint_one(stage)
        self._note_written(written)
        # Tracked only now: a failed checkpoint above leaves nothing behind to read again.
        track = self._intake.tracker.track
        lettered = {letter[0].offset for letter in letters}
        for record in records:
            track(partition, record.offset, 1 if record.offset in lettered else 0)
        for record, code, detail, destination in letters:
            self._intake.dead_letter(record, partition, code, detail, destination)
        obs.events_decoded.labels(topic=records[0].topic).inc(len(records) - undecodable)
        for reason, n in invalid_reasons.items():
            obs.events_invalid.labels(reason=reason).inc(n)
        if skipped:
            obs.events_skipped.labels(reason="no_destination").inc(skipped)
        if late:
            obs.events_skipped.labels(reason="late").inc(late)

    async def _checkpoint_one(self, stage: StageOne) -> dict[int, int]:
        try:
            return await stage.checkpoint()
        except KafkaError:
            obs.state_checkpoint_failures.labels(store="members").inc()
            raise

    def _note_written(self, written: dict[int, int]) -> None:
        """Claims partitions written to, up to which offset (see `claims_unread`)."""
        claims_written = self._claims_written
        for q, last in written.items():
            claims_written[q] = max(claims_written.get(q, 0), last + 1)

    # ---------------------------------------------------------------- backfill

    def _start_backfills(self, partition: int) -> None:
        """Start filling, from this input partition's members, every configured list that
        its segment has not fed yet (a destination added later, or the state of an older
        release)."""
        room = self._members.get(partition)
        if room is None:
            return
        stage = room.stage
        assert isinstance(stage, StageOne)
        for segment_id, list_id in sorted(self._routing.pairs):
            key = (partition, segment_id, list_id)
            if key in self._backfills or stage.table.backfilled(segment_id, list_id):
                continue
            task = asyncio.create_task(
                self._backfill(partition, room, segment_id, list_id),
                name=f"backfill:{partition}:{self._routing.name_of_list[list_id]}",
            )
            self._backfills[key] = task
            task.add_done_callback(functools.partial(self._backfill_done, key))

    def _backfill_done(self, key: tuple[int, str, str], task: asyncio.Task[None]) -> None:
        if self._backfills.get(key) is task:
            del self._backfills[key]
        if not task.cancelled() and task.exception() is not None:
            log.error("backfill_failed", partition=key[0], error=type(task.exception()).__name__)

    def backfills(self) -> int:
        """Backfills under way in this process (tests and benchmarks wait for 0)."""
        return len(self._backfills)

    async def backfills_done(self) -> None:
        """Wait until the backfills under way now have ended (tests, benchmarks)."""
        await asyncio.gather(*self._backfills.values(), return_exceptions=True)

    def backfilling(self, list_id: str) -> bool:
        """Whether this process is filling ``list_id`` (its imports then go at the rate
        limiter's backfill priority)."""
        return any(key[2] == list_id for key in self._backfills)

    def _may_backfill(self, list_id: str) -> bool:
        """Room for the next page: the list's changes waiting here (claims this process wrote
        and has not taken yet, and its buffer) are fewer than `BACKFILL_AHEAD`."""
        target = self._targets.get(list_id)
        waiting = 0 if target is None else target.buffer.pending()
        return self.claims_unread() + waiting < BACKFILL_AHEAD

    async def _backfill(self, partition: int, room: _Room, segment_id: str, list_id: str) -> None:
        """Send the holds of this partition's members of ``segment_id`` to ``list_id``, a page
        per checkpoint (progress goes with the page: a restart resumes after the last page),
        paced by `_may_backfill`; ends when the pair is done, no longer configured, or the
        partition is no longer this process's."""
        name = self._routing.name_of_list[list_id]
        started = time.monotonic()
        sent = 0
        running = obs.backfills_running.labels(destination=name)
        running.inc()
        log.info("backfill_started", destination=name, partition=partition)
        try:
            while True:
                await self._intake.wait_until(functools.partial(self._may_backfill, list_id))
                async with room.lock:
                    if self._members.get(partition) is not room:
                        return
                    if (segment_id, list_id) not in self._routing.pairs:
                        return
                    stage = room.stage
                    assert isinstance(stage, StageOne)
                    holds, done = stage.backfill(segment_id, list_id, BACKFILL_PAGE)
                    try:
                        written = await self._checkpoint_one(stage)
                    except KafkaError:
                        written = None
                if written is None:  # nothing was kept: the same page again, later
                    await asyncio.sleep(BACKFILL_RETRY_S)
                    continue
                self._note_written(written)
                sent += holds
                obs.backfill_members.labels(destination=name).inc(holds)
                if done:
                    log.info(
                        "backfill_done",
                        destination=name,
                        partition=partition,
                        members=sent,
                        seconds=round(time.monotonic() - started, 3),
                    )
                    return
        finally:
            running.dec()

    async def stop_backfills(self, partitions: Iterable[int] | None = None) -> None:
        """Stop the backfills of these input partitions (or all: at shutdown); they resume
        from their progress wherever the partition is restored next."""
        chosen = None if partitions is None else set(partitions)
        stopped = [
            task for key, task in self._backfills.items() if chosen is None or key[0] in chosen
        ]
        for task in stopped:
            task.cancel()
        await asyncio.gather(*stopped, return_exceptions=True)

    # ---------------------------------------------------------------- configuration

    async def reconfigure(self, destinations: Sequence[Destination]) -> None:
        """Take a new destinations file without a restart or a rebalance: stage 1 feeds the
        new routes from now on and forgets the progress of pairs no longer configured, stage
        2 fits its stores to them (`AddressTable.refit`: a list that lost a segment loses that
        segment's holders, and the changes go to the buffers; a list gone loses every holder
        and keeps what was applied), and the lists a segment gained are backfilled. Call after
        `set_targets` for the new destinations."""
        routing = self._routing = Routing.of(destinations)
        pairs = routing.pairs
        for partition, room in list(self._members.items()):
            async with room.lock:
                if self._members.get(partition) is not room:
                    continue  # revoked meanwhile: its store is closed
                stage = room.stage
                assert isinstance(stage, StageOne)
                stage.reconfigure(routing.lists_of, routing.fields_of_list)
                stage.table.forget_backfill(
                    [pair for pair in stage.table.backfills() if pair not in pairs]
                )
                with contextlib.suppress(KafkaError):  # forgotten again at the next chance
                    self._note_written(await self._checkpoint_one(stage))
            self._start_backfills(partition)
        now_ms = int(self._wall_clock() * 1000)
        for q, room in list(self._addresses.items()):
            async with room.lock:
                if self._addresses.get(q) is not room:
                    continue  # revoked meanwhile: its store is closed
                stage_two = room.stage
                assert isinstance(stage_two, StageTwo)
                changed = stage_two.refit(routing.routes)
                try:
                    await self._checkpoint_two(room)
                except KafkaError:  # dropped: fitted again at the next reload or assignment
                    continue
            self._in_buffers.setdefault(q, 0)
            self._offer(q, ((d, now_ms, 0) for d in changed))

    # ---------------------------------------------------------------- stage 2

    async def handle_claims(
        self, partition: int, records: Sequence[ConsumerRecord[Any, Any]]
    ) -> None:
        """Take one fetched batch of a claims partition, checkpoint it, and offer the desired
        states it changed to their buffers; then its offsets are committable.

        Raises as `handle_input` does (the caller reads the batch again)."""
        if not records:
            return
        room = await self._room(self._addresses, partition)
        stage = room.stage
        assert isinstance(stage, StageTwo)
        changed: list[tuple[Desired, int, int]] = []
        repairs: list[Repair] = []
        apply = stage.apply_encoded
        async with room.lock:
            for record in records:
                value = record.value or b""  # a tombstone is refused below, as damaged
                if is_claim_value(value):
                    desired, occurred_at_ms = apply(record.key, value)
                else:
                    other = decode_claims_record(record.key, value)
                    if isinstance(other, Filled):
                        now_ms = int(self._wall_clock() * 1000)
                        changed += ((d, now_ms, record.offset) for d in stage.filled(other))
                        continue
                    if isinstance(other, DriftFound):
                        self._note_drift(other, record.timestamp)
                        continue
                    if not isinstance(other, Repair):  # a claim: stage 1 writes none this way
                        desired = stage.apply(other)
                        occurred_at_ms = other.version[0]
                    else:  # cmsync reconcile: offer what is desired now
                        repairs.append(other)
                        desired = stage.table.repair(other.list_id, other.address, other.kind)
                        occurred_at_ms = record.timestamp  # when the reconcile asked
                if desired is not None:
                    changed.append((desired, occurred_at_ms, record.offset))
            await self._checkpoint_two(room)
        self._claims_done[partition] = records[-1].offset + 1
        self._offer(partition, changed)
        if self._backfills:  # their pacing counts the claims not taken yet
            self._intake.notify()
        self._count_repairs(repairs)

    def _note_drift(self, found: DriftFound, at_ms: int) -> None:
        """A reconcile's findings for one list (it sent them after its repairs)."""
        target = self._targets.get(found.list_id)
        if target is None:
            return
        name = target.destination.name
        for kind, count in found.counts.items():
            obs.drift_found.labels(destination=name, kind=kind).set(count)
        obs.reconcile_time.labels(destination=name).set(at_ms / 1000)

    def _count_repairs(self, repairs: Iterable[Repair]) -> None:
        for repair in repairs:
            target = self._targets.get(repair.list_id)
            if target is not None:
                name = target.destination.name
                obs.drift_repairs.labels(destination=name, kind=repair.kind).inc()

    def _offer(self, partition: int, changed: Iterable[tuple[Desired, int, int]]) -> None:
        now = self._clock()
        targets = self._targets
        held = 0
        touched: dict[str, Target] = {}
        late = 0
        for desired, occurred_at_ms, offset in changed:
            list_id = desired.list_id
            target = targets.get(list_id)
            if target is None:  # a list no destination writes any more
                continue
            revision = desired.revision
            outcome, done = target.buffer.offer(
                Change(
                    desired.address,
                    desired.active,
                    revision,  # the buffer orders by it: revisions grow per (list, address)
                    revision,
                    revision,
                    Wanted(desired, occurred_at_ms),
                    position_of(partition, offset),
                    payload_bytes(desired),
                ),
                now,
            )
            held += 1 - len(done)
            if outcome is Offered.LATE:
                late += 1
            touched[list_id] = target
        self._in_buffers[partition] = self._in_buffers.get(partition, 0) + held
        # Asked once per list after the batch: the flushers run only after it anyway.
        for target in touched.values():
            if target.buffer.full_import_ready():
                target.wake()
        if late:
            obs.events_skipped.labels(reason="late").inc(late)

    def release(self, positions: Iterable[Position]) -> None:
        """The buffers let go of these positions (entries completed, dropped or late)."""
        in_buffers = self._in_buffers
        for held in positions:
            partition = partition_offset(held)[0]
            if partition in in_buffers:
                in_buffers[partition] -= 1
        self._intake.notify()

    def record_applied(self, entries: Sequence[Entry], outcome: Applied) -> None:
        """What the flushers did (their ``on_applied``): recorded at the next checkpoint of the
        entries' partitions. Entries of a partition this process gave up are ignored (the new
        owner applies the state again if it is still owed: the same write, twice)."""
        for entry in entries:
            payload = entry.change.payload
            if not isinstance(payload, Wanted):
                continue
            room = self._addresses.get(partition_offset(entry.change.position)[0])
            if room is not None:
                room.applied.append((payload.desired, outcome))

    async def mark_sending(self, entries: Sequence[Entry]) -> list[Entry] | None:
        """Record durably, before a batch is sent, that its writes are under way (the flushers'
        ``before_send``): a process that dies with them in flight leaves them owed, so the
        next owner sends them again instead of trusting what was last recorded. Returns the
        entries to send: not those of partitions this process gave up (their next owner sends
        them); None when a checkpoint failed (nothing is sent now)."""
        by_room: dict[int, list[Desired]] = {}
        allowed: list[Entry] = []
        for entry in entries:
            payload = entry.change.payload
            partition = partition_offset(entry.change.position)[0]
            if isinstance(payload, Wanted) and partition in self._addresses:
                by_room.setdefault(partition, []).append(payload.desired)
                allowed.append(entry)
        for partition, desired in by_room.items():
            room = self._addresses.get(partition)
            if room is None:  # given up while an earlier room checkpointed
                return None
            async with room.lock:
                room.applied += [(d, Applied.SENDING) for d in desired]
                try:
                    await self._checkpoint_two(room)
                except KafkaError:
                    return None
        return allowed

    def removed_by_sync(self, entry: Entry) -> bool:
        """Whether the sync's own write took the entry's address out of its list (the flushers'
        ``removed_by_sync``; asked after `mark_sending`, which recorded every earlier outcome).
        False for a partition this process gave up: nothing is sent for it here."""
        payload = entry.change.payload
        room = self._addresses.get(partition_offset(entry.change.position)[0])
        if not isinstance(payload, Wanted) or room is None:
            return False
        stage = room.stage
        assert isinstance(stage, StageTwo)
        found = stage.table.state(payload.desired.list_id, payload.desired.address)
        return found is not None and found.removed_by_sync

    async def _checkpoint_two(self, room: _Room) -> None:
        """Record what was applied, then checkpoint (the room's lock held)."""
        stage = room.stage
        assert isinstance(stage, StageTwo)
        applied, room.applied = room.applied, []
        for desired, outcome in applied:
            stage.record_applied(desired, outcome)
        try:
            await stage.checkpoint()
        except KafkaError:
            obs.state_checkpoint_failures.labels(store="addresses").inc()
            raise

    async def checkpoint_loop(self, interval_s: float) -> None:
        """Checkpoint what the flushers applied, every ``interval_s`` (a failure is retried
        at the next tick: the records are only the sync's own history)."""
        while True:
            await asyncio.sleep(interval_s)
            await self.checkpoint_applied()

    async def checkpoint_applied(self) -> None:
        for room in list(self._addresses.values()):
            if room.applied:
                async with room.lock:
                    with contextlib.suppress(KafkaError):
                        await self._checkpoint_two(room)

    async def original(self, entry: Entry) -> Original:
        """A dead letter's key, value and source for an entry (the flushers' ``original``):
        the input record of the change behind its desired state, read back from the input
        topic; if the topic no longer has it (retention), the state's view of it (the list,
        the revision and the profile as the state keeps it)."""
        origin = wanted(entry).desired.origin
        record = None
        if origin is not None:  # None for a removal: no member holds the address
            record = await self._reader.read(origin.partition, origin.offset)
        if record is None:
            return view_of(entry, self._input_topic)
        return (
            record.key,
            record.value or b"",
            f"{self._input_topic}/{record.partition}/{record.offset}",
        )

    # ---------------------------------------------------------------- offsets

    def committable(self, topic: str, partition: int) -> int | None:
        if topic == self.topics.claims:
            return self._claims_done.get(partition)
        return self._intake.tracker.committable(partition)

    def claims_unread(self) -> int:
        """Claims this process wrote that it has not taken into stage 2 yet (those of its own
        claims partitions; for the ones other processes own, see their own count)."""
        done = self._claims_done
        return sum(
            max(0, end - done.get(q, 0))
            for q, end in self._claims_written.items()
            if q in self._addresses
        )

    def in_buffers(self, partitions: Iterable[int] | None = None) -> int:
        """Positions of these claims partitions (or all) still held in buffers."""
        if partitions is None:
            return sum(self._in_buffers.values())
        return sum(self._in_buffers.get(p, 0) for p in partitions)

    # ---------------------------------------------------------------- rebalance

    async def assign(self, inputs: Iterable[int], claims: Iterable[int]) -> None:
        """Restore the stores of newly assigned partitions from their changelogs (all at once),
        then feed the desired states owed by the claims partitions to the buffers."""
        claims = list(claims)
        for q in [q for q in self._claims_done if q not in claims]:
            del self._claims_done[q]  # no longer ours (see `revoke_claims`)
        members, addresses = self.topics.members_changelog, self.topics.addresses_changelog
        paths = {
            TopicPartition(members, p): self._dir / "members" / str(p)
            for p in inputs
            if p not in self._members
        }
        paths.update(
            {
                TopicPartition(addresses, q): self._dir / "addresses" / str(q)
                for q in claims
                if q not in self._addresses
            }
        )
        if not paths:
            return
        remaining, restored = obs.state_restore_remaining, obs.state_restored_records
        read = 0

        def progress(done: int, left: int | None) -> None:
            nonlocal read
            restored.inc(done - read)
            read = done
            remaining.set(done if left is None else left)

        self.restoring = True
        started = time.monotonic()
        try:
            async with self._restoring:
                stores = await changelog.restore_all(self._restorer, paths, progress=progress)
                now_ms = int(self._wall_clock() * 1000)
                for tp, store in stores.items():
                    durable = Durable(tp.partition, store, self._producer, tp.topic)
                    routing = self._routing
                    if tp.topic == members:
                        stage_one = StageOne(
                            durable, routing.lists_of, self.topics.claims, routing.fields_of_list
                        )
                        stage_one.table.forget_backfill(
                            [p for p in stage_one.table.backfills() if p not in routing.pairs]
                        )
                        with contextlib.suppress(KafkaError):  # again next time
                            await self._checkpoint_one(stage_one)
                        self._members[tp.partition] = _Room(stage_one)
                        continue
                    stage_two = StageTwo(durable)
                    stage_two.refit(routing.routes)
                    with contextlib.suppress(KafkaError):  # fitted again next time
                        await stage_two.checkpoint()
                    self._addresses[tp.partition] = _Room(stage_two)
                    self._in_buffers.setdefault(tp.partition, 0)
                    self._offer(
                        tp.partition, ((d, now_ms, 0) for d in stage_two.owed(self._targets))
                    )
        finally:
            self.restoring = False
            remaining.set(0)
        log.info(
            "state_restored",
            partitions=len(paths),
            records=read,
            seconds=round(time.monotonic() - started, 3),
        )
        for tp in paths:
            if tp.topic == members:
                self._start_backfills(tp.partition)

    async def _room(self, rooms: dict[int, _Room], partition: int) -> _Room:
        """The room of a partition, once its restore is done; `ReadAgain` if it is not ours
        (records fetched while a rebalance took it away)."""
        room = rooms.get(partition)
        if room is None:
            async with self._restoring:  # records may arrive before the restore ends
                room = rooms.get(partition)
        if room is None:
            raise ReadAgain(f"partition {partition} is not restored here")
        return room

    async def revoke_inputs(self, partitions: Iterable[int]) -> None:
        """Stop their backfills and close the stage 1 stores of revoked input partitions
        (nothing is pending: every batch and backfill page is checkpointed before the next)."""
        partitions = list(partitions)
        await self.stop_backfills(partitions)
        for p in partitions:
            room = self._members.pop(p, None)
            if room is not None:
                async with room.lock:
                    room.stage.state.store.close()

    async def revoke_claims(self, partitions: Iterable[int]) -> None:
        """Give up claims partitions: drop what the buffers still hold of them that is not in
        flight (the next owner feeds it again from the state), record what was applied,
        checkpoint, close. Call once the flushers had their chance to send it and the requests
        in flight are done."""
        partitions = set(partitions)

        def doomed(entry: Entry) -> bool:
            return partition_offset(entry.change.position)[0] in partitions

        for target in self._targets.values():
            self.release(target.buffer.discard(doomed))
        for q in partitions:
            room = self._addresses.pop(q, None)
            # `_claims_done` stays until the next assignment: the source commits the revoked
            # partitions after this, from `committable`.
            self._in_buffers.pop(q, None)
            if room is None:
                continue
            async with room.lock:
                try:
                    await self._checkpoint_two(room)
                except KafkaError as exc:  # the next owner applies what is owed once more
                    log.warning("revocation_checkpoint_failed", error=type(exc).__name__)
                room.stage.state.store.close()

    async def close(self) -> None:
        """Shutdown: checkpoint what was applied, close every store."""
        await self.revoke_inputs(list(self._members))
        await self.revoke_claims(list(self._addresses))
