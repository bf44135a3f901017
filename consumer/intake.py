"""The intake: each fetched batch decoded, routed to its destinations' buffers, and held.

`Intake.handle(partition, records)` is the hot path (bench/intake.py measures it): the source
calls it for every fetched batch, and benchmarks and tests call it directly. It owns what
happens between the Kafka record and the buffers:

  decode + validate (`consumer.events`) → route (segment → destinations) → one `Change` per
  destination, offered to its `DestinationBuffer` → holds in the `OffsetTracker` → dead letters.

Holds (guarantee 1, "nothing lost"): every record is tracked, in offset order, with one hold
per destination its change concerns (none when no destination takes its segment: committable
at once). Each hold is released exactly once: when the destination's buffer entry that carries
it completes (the flushers call `release`), at once when the buffer finds the change late, or
when the record's dead letter is acknowledged (an invalid record holds one hold for its letter;
an address that is missing or invalid for one destination keeps that destination's hold until
its letter is acknowledged).

Who calls what: the service calls `set_routes` once it has wired the buffers and flushers (a
configuration reload will call it again), gives `release` to the flushers, calls `forget` for
partitions it no longer owns and `wait_until` to drain, and `close` at shutdown.

Waiting is a future handed out, not a polling loop: `wait_until(condition)` checks its
condition again each time holds are released or forgotten, a batch was handled, or a dead
letter is done (bound the wait with ``asyncio.timeout``). Hazard: a condition must only become
true at one of those moments. "Every flusher's buffer is empty" qualifies, because a buffer
only empties when its entries complete (or turn out late) and the flusher then releases their
holds.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from aiokafka import ConsumerRecord

from consumer import observability as obs
from consumer.buffer import (
    Change,
    DestinationBuffer,
    Offered,
    Position,
    partition_offset,
    position,
)
from consumer.deadletter import DeadLetter
from consumer.events import Invalid, decode_fields, parse_email
from consumer.offsets import OffsetTracker
from consumer.rows import payload_of
from consumer.settings import Destination

__all__ = ["Intake", "Route", "Wakeable"]


class Wakeable(Protocol):
    """What the intake needs of a flusher (`consumer.flusher.DestinationFlusher`)."""

    def wake(self) -> None:
        """Changes are ready now: look at the buffer without waiting for the flush interval."""


@dataclass(frozen=True, slots=True)
class Route:
    """One destination of a segment: its buffer, and its flusher, woken when a full import is
    ready (it would otherwise sleep until the flush interval)."""

    destination: Destination
    buffer: DestinationBuffer
    flusher: Wakeable


#: Per segment, what `handle` does for each of its destinations: (address field, the buffer's
#: `offer`, destination name). Built once per `set_routes`, not per batch.
_Target = tuple[str, Callable[[Change, float], tuple[Offered, list[Position]]], str]


class Intake:
    """decode → route → buffer → holds → dead letters (see the module docstring).

    ``send_dead_letter`` must return only once the letter is durable (the broker acknowledged
    it): its record's hold is released then. ``clock`` (monotonic) stamps buffered changes.
    """

    def __init__(
        self,
        *,
        topic: str,
        tracker: OffsetTracker,
        send_dead_letter: Callable[[DeadLetter], Awaitable[None]],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._topic = topic
        self._tracker = tracker
        self._send_dead_letter = send_dead_letter
        self._clock = clock
        self._routes: tuple[Route, ...] = ()
        self._plan: dict[str, tuple[_Target, ...]] = {}
        self._letters: set[asyncio.Task[None]] = set()
        self._waiters: list[tuple[Callable[[], bool], asyncio.Future[None]]] = []

    @property
    def tracker(self) -> OffsetTracker:
        """The offset tracker holding every record's holds (read it; `handle` and `release`
        are what change it)."""
        return self._tracker

    @property
    def routes(self) -> tuple[Route, ...]:
        return self._routes

    def set_routes(self, routes: Iterable[Route]) -> None:
        """Route each segment's changes to these destinations, in the order given.

        Takes effect from the next batch. Buffers that are left out keep what they hold:
        draining them (and releasing their holds) stays their flusher's job.
        """
        self._routes = tuple(routes)
        plan: dict[str, list[_Target]] = {}
        for route in self._routes:
            dest = route.destination
            plan.setdefault(dest.segment_id, []).append(
                (dest.email_field, route.buffer.offer, dest.name)
            )
        self._plan = {segment: tuple(targets) for segment, targets in plan.items()}

    # ---------------------------------------------------------------- the hot path

    def handle(self, partition: int, records: Sequence[ConsumerRecord[Any, Any]]) -> None:
        """Decode, validate, route and buffer one fetched batch of one partition.

        ``records`` must come in increasing offset order, each offset once per partition
        (since the partition was last forgotten): the tracker raises ``ValueError`` otherwise.

        Per record: one `decode_fields`, one `tracker.track`, one `parse_email` per distinct
        address field of its destinations, one `Change` and one `offer` per destination.
        Metrics are counted here and added once per batch: a labelled `inc` costs more than
        decoding an event. Nothing in here awaits, so waking a flusher at the end of the batch
        is as prompt as waking it when its import filled up.
        """
        now = self._clock()
        tracker = self._tracker
        track, release = tracker.track, tracker.release
        plan = self._plan
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
            track(partition, offset, len(targets))
            pos = position(partition, offset)
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
                outcome, done = offer(
                    Change(address, entered, occurred_at_ms, pos, id_hash, payload, pos), now
                )
                if outcome is not new:
                    if outcome is late_outcome:
                        late += 1
                        for held in done:
                            release(*partition_offset(held))
                    elif outcome is duplicate_outcome:
                        duplicate += 1
                    else:
                        coalesced[name] = coalesced.get(name, 0) + 1
        for route in self._routes:
            if route.buffer.full_import_ready():
                route.flusher.wake()
        if self._waiters:
            self._notify()
        obs.events_decoded.labels(topic=self._topic).inc(len(records) - invalid)
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

    # ---------------------------------------------------------------- holds

    def release(self, positions: Iterable[Position]) -> None:
        """Release one hold per position (the flushers' callback, once entries complete)."""
        release = self._tracker.release
        for held in positions:
            release(*partition_offset(held))
        if self._waiters:
            self._notify()

    def forget(self, partitions: Iterable[int]) -> None:
        """Drop the holds of partitions this process no longer owns; later releases of them
        are ignored (see `OffsetTracker.forget`)."""
        for partition in partitions:
            self._tracker.forget(partition)
        if self._waiters:
            self._notify()

    async def wait_until(self, condition: Callable[[], bool]) -> None:
        """Return once ``condition()`` is true. It is checked now, and then again each time
        holds are released or forgotten, a batch was handled or a dead letter is done (see the
        module docstring). Bound the wait with ``asyncio.timeout``."""
        if condition():
            return
        waiter = (condition, asyncio.get_running_loop().create_future())
        self._waiters.append(waiter)
        try:
            await waiter[1]
        finally:
            self._waiters.remove(waiter)

    def _notify(self) -> None:
        for condition, done in self._waiters:
            if not done.done() and condition():
                done.set_result(None)

    # ---------------------------------------------------------------- dead letters

    def letters_in_flight(self) -> int:
        """Dead letters sent and not acknowledged yet."""
        return len(self._letters)

    def close(self) -> None:
        """Cancel the dead letters still in flight (shutdown): their holds stay, so their
        offsets are not committed and the records are read again."""
        for task in list(self._letters):
            task.cancel()

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
        task = asyncio.get_running_loop().create_task(
            self._send_letter(letter, partition, record.offset)
        )
        self._letters.add(task)
        # Also here: a task cancelled before it started never runs `_send_letter`'s finally.
        task.add_done_callback(self._letters.discard)

    async def _send_letter(self, letter: DeadLetter, partition: int, offset: int) -> None:
        try:
            await self._send_dead_letter(letter)
            self._tracker.release(partition, offset)
        finally:
            # Here rather than in a done callback, so that a waiter on
            # `letters_in_flight() == 0` sees the count it waits for.
            task = asyncio.current_task()
            if task is not None:
                self._letters.discard(task)
            if self._waiters:
                self._notify()
