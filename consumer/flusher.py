"""Flushers: turn a destination's buffer into Campaign Monitor calls and report what is durable.

One `DestinationFlusher` per destination runs as a long-lived task (`run`). It takes batches
from its `DestinationBuffer` (which guarantees that one address is never in two batches at
once, so changes of one address are never reordered), sends them through its `Gateway` (the
`ApiGateway` of its API key, which paces, retries and stalls), and hands the positions of
completed entries back to the offset tracker through `release`.

Ordering of one batch, written down because it is the "nothing lost" guarantee:
  1. take a batch from the buffer (its keys are now in flight);
  2. send adds (import, ≤ 1000 rows) and removals (one call each), retrying retriable errors
     without a time limit;
  3. dead-letter rows Campaign Monitor rejected, and wait for the broker's acknowledgement;
  4. only then complete the entries in the buffer and release their positions, which lets the
     committer move the partition's committed offset past them.
A crash anywhere before 4 leaves the offsets uncommitted, so the changes are read again.

Before its first batch, `run` reads the list's settings once (``list_settings``,
`consumer.listsettings`): a destination whose list it must not write to is held (it sends
nothing until the process restarts, `stalled_reason` says why), and the import rows' custom
field values are coerced to the list's field types; a value that cannot be is dead-lettered
(``field_type``) instead of being sent.

The service calls `run` (as a task), `wake` (new changes are ready), `drain` / `end_drain`
(send everything now, e.g. on revocation and shutdown / back to the flush policy),
`drained` and `stalled_reason` (health). Everything else is the flusher's own.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Collection, Iterable, Mapping, Sequence
from typing import Final, Protocol

import structlog

from consumer import observability as obs
from consumer.buffer import Batch, DestinationBuffer, Entry, Position
from consumer.campaign_monitor.client import (
    AddressThrottled,
    ImportResult,
    RecordRejected,
    RequestInvalid,
    SubscriberRow,
)
from consumer.consent import FRESH_S, ConsentUnknownError, OptOuts
from consumer.deadletter import DeadLetter
from consumer.fieldtypes import FieldType, Unfit
from consumer.gateway import RemovalMode
from consumer.listsettings import ListCheck
from consumer.membership.model import Applied
from consumer.membership.normalise import normalise_address
from consumer.rows import event_time_ms, row_of, view_of
from consumer.settings import Destination
from consumer.tuning import (
    ADDRESS_HOLD_S,
    BACKFILL_PRIORITY,
    BATCHES_IN_FLIGHT,
    IDLE_WAIT_S,
    IMPORT_PRIORITY,
    MIN_WAIT_S,
    REMOVAL_BATCH_SIZE,
    REMOVAL_BATCHES_IN_FLIGHT,
    SEND_RETRY_S,
)

__all__ = [
    "REMOVAL_BATCH_SIZE",
    "ConsentCheck",
    "DeadLetterSink",
    "DestinationFlusher",
    "Gateway",
    "Original",
]

log = structlog.get_logger("cmsync.flusher")

#: What a dead letter carries of the change it refers to: (key, value, "topic/partition/offset").
Original = tuple[bytes | None, bytes, str]

#: Codes that mean "the subscriber is already in an inactive state" (suppressed, deleted,
#: unsubscribed, bounced, unconfirmed): for a removal that is the wanted outcome.
STATE_CONFLICT_CODES: Final = frozenset({204, 205, 206, 207, 208})


class Gateway(Protocol):
    """What a flusher needs of Campaign Monitor (`consumer.gateway.ApiGateway`): calls that
    return once done, retried inside (they raise only `RecordRejected` / `RequestInvalid`, and
    `AddressThrottled` when one address was written too often)."""

    async def import_subscribers(
        self,
        list_id: str,
        rows: Sequence[SubscriberRow],
        *,
        resubscribe: bool,
        destination: str,
        priority: int = IMPORT_PRIORITY,
    ) -> ImportResult: ...

    async def remove(
        self, list_id: str, address: str, *, how: RemovalMode, destination: str
    ) -> bool: ...

    def stalled_reason(self, destination: str) -> str | None: ...


class DeadLetterSink(Protocol):
    """Where rejected records go (`consumer.deadletter.DeadLetterQueue`): `send` returns once
    the letter is durable."""

    async def send(self, letter: DeadLetter) -> None: ...


class ConsentCheck(Protocol):
    """The consent knowledge of the destination's list (`consumer.consent.ListConsent`)."""

    async def opted_out(
        self, addresses: Collection[str], *, since: float, activating: bool
    ) -> OptOuts: ...

    async def warm(self) -> None: ...

    def reactivated(self, addresses: Iterable[str]) -> None: ...


class DestinationFlusher:
    """The flush loop of one destination (see the module docstring for who calls what).

    ``on_applied(entries, outcome)`` learns what each completed entry did to the list (the
    membership state records it), before their positions are released; dead-lettered entries
    are reported as REJECTED. ``original(entry)`` gives a dead letter its key, value and source
    (default: the state's view of it, `rows.view_of`, its source in ``source_topic``, the
    input). ``before_send(entries)`` is
    awaited before a batch is sent (the membership state records durably that the writes are
    under way) and says which entries to send (the others are dropped: no longer this
    process's to write); None sends nothing now: the batch goes back to the buffer and is
    taken again after a pause. ``removed_by_sync(entry)`` (asked after ``before_send``) tells
    whether the sync's own write took the entry's address out of the list (the membership
    state keeps it durably): under ``resubscribe = "deleted-only"`` exactly those come back
    with ``Resubscribe: true``. ``list_settings()`` reads and judges the list's settings
    when `run` starts (None: nothing is read, values go as they are). ``clock`` (monotonic) drives
    the flush policy; ``wall_clock`` measures freshness against the events' ``occurred_at``.
    Both are injectable for tests.
    """

    def __init__(
        self,
        *,
        destination: Destination,
        buffer: DestinationBuffer,
        gateway: Gateway,
        consent: ConsentCheck,
        dead_letters: DeadLetterSink,
        release: Callable[[Iterable[Position]], None],
        source_topic: str,
        on_applied: Callable[[Sequence[Entry], Applied], None] | None = None,
        original: Callable[[Entry], Awaitable[Original]] | None = None,
        before_send: Callable[[Sequence[Entry]], Awaitable[Sequence[Entry] | None]] | None = None,
        removed_by_sync: Callable[[Entry], bool] | None = None,
        list_settings: Callable[[], Awaitable[ListCheck]] | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        address_hold_s: float = ADDRESS_HOLD_S,
    ) -> None:
        self._destination = destination
        self._address_hold_s = address_hold_s
        self._buffer = buffer
        self._gateway = gateway
        self._consent = consent
        self._dead_letters = dead_letters
        self._release = release
        self._source_topic = source_topic
        self._on_applied = on_applied
        self._original = original or self._record_original
        self._before_send = before_send
        self._removed_by_sync = removed_by_sync
        self._list_settings = list_settings
        self._held: str | None = None  # why the list's settings forbid writing to it
        self._recheck = True  # read and judge the list's settings before the next batch
        self._types: Mapping[str, FieldType] | None = None
        self._clock = clock
        self._wall_clock = wall_clock
        self._wakeup = asyncio.Event()
        self._draining = False
        self._holds: set[asyncio.TimerHandle] = set()  # see `_hold_back`
        #: whether the list is being backfilled here (its imports then wait behind the live
        #: changes of other lists: `BACKFILL_PRIORITY`); set by the service
        self.backfilling: Callable[[], bool] = lambda: False

    # ---------------------------------------------------------------- the service's surface

    @property
    def destination(self) -> Destination:
        return self._destination

    @property
    def stalled_reason(self) -> str | None:
        """Why this destination sends nothing right now (its list's settings hold it, or
        Campaign Monitor refuses it), or None (health, metrics, the drains)."""
        return self._held or self._gateway.stalled_reason(self._destination.name)

    def wake(self) -> None:
        """New changes may be ready (e.g. an import filled up): look at the buffer now."""
        self._wakeup.set()

    def drain(self) -> None:
        """From now on send everything buffered without waiting for the flush interval."""
        self._draining = True
        self._wakeup.set()

    def end_drain(self) -> None:
        """Back to the flush policy (after a rebalance's drain)."""
        self._draining = False

    def drained(self) -> bool:
        """Nothing buffered and nothing in flight."""
        return self._buffer.drained()

    async def run(self) -> None:
        """Flush until cancelled: take due batches, keep up to `BATCHES_IN_FLIGHT` imports and
        `REMOVAL_BATCHES_IN_FLIGHT` removal batches going (`BATCHES_IN_FLIGHT` while
        draining). The two kinds do not wait for each other: slow single removals must not
        hold back an import that carries a thousand changes."""
        name = self._destination.name
        structlog.contextvars.bind_contextvars(destination=name)
        obs.destination_up.labels(destination=name).set(1)
        buffer = self._buffer
        # Read at scrape time: exact whenever it is read (tests and operators wait for 0).
        obs.pending_changes.labels(destination=name).set_function(
            lambda: buffer.pending() + buffer.in_flight()
        )
        going = [0, 0]  # in flight: [removal batches, imports]

        def finished(kind: int) -> Callable[[asyncio.Task[None]], None]:
            def callback(_task: asyncio.Task[None]) -> None:
                going[kind] -= 1
                self._wakeup.set()

            return callback

        try:
            await self._loop(buffer, going, finished)
        finally:
            for handle in self._holds:  # the state owes what they hold: sent after a restart
                handle.cancel()

    async def _loop(
        self,
        buffer: DestinationBuffer,
        going: list[int],
        finished: Callable[[int], Callable[[asyncio.Task[None]], None]],
    ) -> None:
        async with asyncio.TaskGroup() as tasks:
            warming = False
            while True:
                if self._recheck:
                    self._recheck = False
                    if not await self._check_list():
                        # held: nothing is sent until a reload changes the destination or
                        # asks again (SIGHUP), or the process restarts
                        while not self._recheck:
                            self._wakeup.clear()
                            await self._wakeup.wait()
                        continue
                if not warming and self._destination.resubscribe != "always":
                    warming = True  # the only policy that never asks
                    tasks.create_task(self._consent.warm())
                now = self._clock()
                adds = going[1] < BATCHES_IN_FLIGHT
                removal_room = BATCHES_IN_FLIGHT if self._draining else REMOVAL_BATCHES_IN_FLIGHT
                removals = going[0] < removal_room
                batch = None
                if adds or removals:
                    batch = buffer.take(now, force=self._draining, adds=adds, removals=removals)
                if batch is None:
                    delay = None
                    if adds or removals:
                        delay = buffer.next_due(now, adds=adds, removals=removals)
                    self._wakeup.clear()
                    timeout = IDLE_WAIT_S if delay is None else max(delay, MIN_WAIT_S)
                    # asyncio.timeout, not wait_for: on Python 3.11 wait_for swallows a
                    # cancellation that arrives as the event is set (found by tests/faults:
                    # a flusher cancelled at shutdown went on waiting, and the process hung).
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(min(timeout, IDLE_WAIT_S)):
                            await self._wakeup.wait()
                    continue
                if batch.late:  # a newer change was applied meanwhile: nothing to send for these
                    obs.events_skipped.labels(reason="late").inc(len(batch.late))
                    self._release(batch.released())
                if batch.adds:
                    going[1] += 1
                    task = tasks.create_task(self._flush(Batch(batch.adds, [])))
                    task.add_done_callback(finished(1))
                if batch.removals:
                    going[0] += 1
                    task = tasks.create_task(self._flush(Batch([], batch.removals)))
                    task.add_done_callback(finished(0))

    async def _check_list(self) -> bool:
        """Read and judge the list's settings (before the first write, and again after a
        reload): log the warnings, keep the field types; False (logged once,
        `cmsync_destination_up` 0) when the destination is held."""
        name = self._destination.name
        if self._list_settings is None:
            return True
        check = await self._list_settings()
        for warning in check.warnings:
            log.warning("list_settings_warning", destination=name, warning=warning)
        self._types = check.types
        held = check.held_reason
        if held is None:
            if self._held is not None:
                log.info("destination_released", destination=name)
                obs.destination_up.labels(destination=name).set(1)
            self._held = None
            return True
        self._held = held
        obs.destination_up.labels(destination=name).set(0)
        log.error(
            "destination_held",
            destination=name,
            reason=held,
            hint="change the list, then send SIGHUP to the process (or restart it); or change "
            "the destinations file; the list's changes stay owed in the membership state "
            "meanwhile",
        )
        return False

    def reconfigure(
        self,
        destination: Destination,
        *,
        gateway: Gateway,
        consent: ConsentCheck,
        list_settings: Callable[[], Awaitable[ListCheck]] | None,
    ) -> None:
        """The destination changed in the destinations file (same name, same list): the next
        batches go with the new settings, its list's settings are read and judged again.
        Requests under way finish as they were sent."""
        self._destination = destination
        self._gateway = gateway
        self._consent = consent
        self._list_settings = list_settings
        self.recheck()

    def recheck(self) -> None:
        """Read and judge the list's settings again before the next batch (a held destination
        whose list was fixed goes on: SIGHUP)."""
        self._recheck = True
        self._wakeup.set()

    # ---------------------------------------------------------------- one batch

    async def _flush(self, batch: Batch) -> None:
        if self._before_send is not None:
            entries = [*batch.adds, *batch.removals]
            allowed = await self._before_send(entries)
            if allowed is None:
                self._buffer.requeue(entries)
                await asyncio.sleep(SEND_RETRY_S)
                return
            if len(allowed) < len(entries):
                keep = {id(e) for e in allowed}
                self._release(
                    self._buffer.complete([e for e in entries if id(e) not in keep], applied=False)
                )
                batch = Batch(
                    [e for e in batch.adds if id(e) in keep],
                    [e for e in batch.removals if id(e) in keep],
                )
        started = self._clock()
        added = removed = rejected = 0
        outcome = "ok"
        try:
            if batch.adds:
                added, rejected = await self._send_adds(batch.adds)
            if batch.removals:
                removed, refused = await self._send_removals(batch.removals)
                rejected += refused
        except BaseException:
            outcome = "cancelled"
            raise
        finally:
            seconds = self._clock() - started
            name = self._destination.name
            obs.flushes.labels(destination=name, outcome=outcome).inc()
            obs.flush_duration.labels(destination=name).observe(seconds)
            log.info(
                "flush",
                adds=len(batch.adds),
                removals=len(batch.removals),
                applied_adds=added,
                applied_removals=removed,
                rejected=rejected,
                duration_s=round(seconds, 4),
                outcome=outcome,
            )

    async def _send_adds(self, entries: list[Entry]) -> tuple[int, int]:
        """Import the adds; returns (applied, dead-lettered).

        Consent (guarantee 3, the table in the README): an import sent with
        ``Resubscribe: false`` leaves an inactive address inactive, so it needs no knowledge of
        who opted out. Only rows sent with ``Resubscribe: true`` do: every row under
        ``always`` (that policy overrides opt-outs by definition), and under
        ``deleted-only`` the addresses the sync itself removed, asked about right before."""
        dest = self._destination
        if dest.resubscribe != "deleted-only":
            return await self._import(entries, resubscribe=dest.resubscribe == "always")
        back: list[Entry] = []
        plain: list[Entry] = []
        removed_by_sync = self._removed_by_sync
        for entry in entries:
            (back if removed_by_sync is not None and removed_by_sync(entry) else plain).append(
                entry
            )
        applied, rejected = await self._import(plain, resubscribe=False) if plain else (0, 0)
        if back:
            opted = await self._opted_out(back, activating=True)
            if opted is not None:
                ours = dest.removal == "unsubscribe"  # its Unsubscribed state is the sync's own
                kept = [e for e in back if opted.protects(e.change.key, unsubscribed_by_sync=ours)]
                if kept:  # opted out after the sync removed them: theirs to decide now
                    obs.events_skipped.labels(reason="consent").inc(len(kept))
                    self._complete(kept, applied=True, outcome=Applied.KEPT)
                keep = {id(e) for e in kept}
                again = [e for e in back if id(e) not in keep]
                if again:
                    more, refused = await self._import(again, resubscribe=True)
                    applied, rejected = applied + more, rejected + refused
        return applied, rejected

    async def _opted_out(self, entries: list[Entry], *, activating: bool) -> OptOuts | None:
        """Who of ``entries`` opted out, as of moments ago; None when that cannot be known now:
        the entries go back to the buffer unwritten (fail closed) and are taken again later."""
        try:
            return await self._consent.opted_out(
                [e.change.key for e in entries],
                since=self._clock() - FRESH_S,
                activating=activating,
            )
        except ConsentUnknownError as exc:
            name = self._destination.name
            obs.consent_unknown.labels(destination=name).inc(len(entries))
            log.warning("consent_unknown", destination=name, held=len(entries), reason=str(exc))
            self._buffer.requeue(entries)
            await asyncio.sleep(SEND_RETRY_S)
            return None

    async def _import(self, entries: list[Entry], *, resubscribe: bool) -> tuple[int, int]:
        """One import call; returns (applied, dead-lettered). An entry with a value its field
        cannot hold is dead-lettered (``field_type``) instead of being sent.

        A 429 about one address written too often (`AddressThrottled`) does not say which
        row it was: the import is split in halves and each sent on its own, down to the row,
        which is held back (`_hold_back`); the other rows go on. One flapping address among
        n rows costs about 2·log2(n) more requests, and nobody else waits for it."""
        dest = self._destination
        rows: list[SubscriberRow] = []
        by_email: dict[str, Entry] = {}
        unfit: dict[str, list[Entry]] = {}  # reason -> entries
        for entry in entries:
            row = row_of(dest, entry, self._types)
            if isinstance(row, Unfit):
                unfit.setdefault(row.reason, []).append(entry)
                continue
            rows.append(row)
            by_email[row.email] = entry
        for reason, bad in unfit.items():
            await self._dead_letter(bad, "field_type", reason, None)
        dead = sum(map(len, unfit.values()))
        if not rows:
            return 0, dead
        try:
            result = await self._gateway.import_subscribers(
                dest.list_id,
                rows,
                resubscribe=resubscribe,
                destination=dest.name,
                priority=BACKFILL_PRIORITY if self.backfilling() else IMPORT_PRIORITY,
            )
        except AddressThrottled:
            fit = list(by_email.values())  # the unfit ones are dead-lettered already
            if len(fit) == 1:
                self._hold_back(fit)
                return 0, dead
            half = len(fit) // 2
            first = await self._import(fit[:half], resubscribe=resubscribe)
            second = await self._import(fit[half:], resubscribe=resubscribe)
            return first[0] + second[0], dead + first[1] + second[1]
        except (RecordRejected, RequestInvalid) as exc:
            # The whole import was refused for a reason retrying cannot fix: keep the records.
            bad = list(by_email.values())
            await self._dead_letter(bad, "cm_rejected", "import refused", exc.code)
            return 0, dead + len(bad)
        failed: dict[int, list[Entry]] = {}
        for failure in result.failures:
            rejected_entry = by_email.pop(normalise_address(failure.email), None)
            if rejected_entry is not None:
                failed.setdefault(failure.code, []).append(rejected_entry)
        for code, bad in failed.items():
            await self._dead_letter(bad, "cm_rejected", f"import row rejected (code {code})", code)
        applied = list(by_email.values())
        if resubscribe:
            self._consent.reactivated(entry.change.key for entry in applied)
        self._complete(applied, applied=True, outcome=Applied.ACTIVE)
        obs.applied_changes.labels(destination=dest.name, kind="add").inc(len(applied))
        return len(applied), dead + sum(map(len, failed.values()))

    async def _send_removals(self, entries: list[Entry]) -> tuple[int, int]:
        """Remove the addresses, all calls at once (the gateway lets a few run, the limiter
        paces them); returns (applied, dead-lettered).

        Right before, unless ``resubscribe = "always"``: who of them opted out. Those are left
        as they are (KEPT): deleting an Unsubscribed address would erase the evidence of the
        opt-out, and unsubscribing it would make the sync's own removal of what the person
        did (so a re-entry would undo it)."""
        dest = self._destination
        opted = OptOuts()
        if dest.resubscribe != "always":
            known = await self._opted_out(entries, activating=False)
            if known is None:
                return 0, 0
            opted = known
        removed = rejected = 0

        async def remove(entry: Entry) -> None:
            nonlocal removed, rejected
            address = entry.change.key
            if opted.protects(address):
                obs.events_skipped.labels(reason="consent").inc()
                self._complete([entry], applied=True, outcome=Applied.KEPT)
                return
            try:
                await self._gateway.remove(
                    dest.list_id, address, how=dest.removal, destination=dest.name
                )
            except AddressThrottled:
                self._hold_back([entry])
                return
            except (RecordRejected, RequestInvalid) as exc:
                if exc.code not in STATE_CONFLICT_CODES:
                    await self._dead_letter([entry], "cm_rejected", "removal rejected", exc.code)
                    rejected += 1
                    return
                # Already in an inactive state, which is what a removal wants: done, but by
                # whoever made it inactive (the person, Campaign Monitor), not by the sync.
                self._complete([entry], applied=True, outcome=Applied.KEPT)
            else:
                self._complete([entry], applied=True, outcome=Applied.REMOVED)
            removed += 1

        async with asyncio.TaskGroup() as tasks:
            for entry in entries:
                tasks.create_task(remove(entry))
        obs.applied_changes.labels(destination=dest.name, kind="remove").inc(removed)
        return removed, rejected

    # ---------------------------------------------------------------- completion

    def _hold_back(self, entries: Sequence[Entry]) -> None:
        """Campaign Monitor refused these addresses for being written too often: give them
        back to the buffer after ``address_hold_s`` (`ADDRESS_HOLD_S`). They stay in flight
        until then, so a newer change of the address waits behind them and their positions
        stay held."""
        obs.addresses_held_back.labels(destination=self._destination.name).inc(len(entries))

        def requeue() -> None:
            self._holds.discard(handle)
            self._buffer.requeue(entries)
            self._wakeup.set()

        handle = asyncio.get_running_loop().call_later(self._address_hold_s, requeue)
        self._holds.add(handle)

    def _complete(
        self, entries: Sequence[Entry], *, applied: bool, outcome: Applied = Applied.NOTHING
    ) -> None:
        if not entries:
            return
        if applied:
            now_ms = self._wall_clock() * 1000.0
            fresh = obs.freshness.labels(destination=self._destination.name)
            for entry in entries:
                fresh.observe(max(0.0, (now_ms - event_time_ms(entry)) / 1000.0))
            if self._on_applied is not None:
                self._on_applied(entries, outcome)
        self._release(self._buffer.complete(entries, applied=applied))

    async def _dead_letter(
        self, entries: Sequence[Entry], error: str, detail: str, cm_code: int | None
    ) -> None:
        """Dead-letter the entries (each acknowledged), then complete them as not applied."""
        for entry in entries:
            key, value, source = await self._original(entry)
            await self._dead_letters.send(
                DeadLetter(
                    key=key,
                    value=value,
                    error=error,
                    detail=detail,
                    source=source,
                    destination=self._destination.name,
                    cm_code=cm_code,
                )
            )
        if self._on_applied is not None:
            self._on_applied(entries, Applied.REJECTED)
        self._complete(entries, applied=False)

    async def _record_original(self, entry: Entry) -> Original:
        return view_of(entry, self._source_topic)
