"""Flushers: turn a destination's buffer into Campaign Monitor calls and report what is durable.

One `DestinationFlusher` per destination runs as a long-lived task. It takes batches from its
`DestinationBuffer` (which guarantees that one address is never in two batches at once, so
changes of one address are never reordered), sends them through the `ApiChannel` of its API key
(one client and one AIMD rate limiter per key, shared by every destination using that key), and
hands the positions of completed entries back to the offset tracker through `release`.

Ordering of one batch, written down because it is the "nothing lost" guarantee:
  1. take a batch from the buffer (its keys are now in flight);
  2. send adds (import, ≤ 1000 rows) and removals (one call each), retrying retriable errors
     without a time limit;
  3. dead-letter rows Campaign Monitor rejected, and wait for the broker's acknowledgement;
  4. only then complete the entries in the buffer and release their positions, which lets the
     committer move the partition's committed offset past them.
A crash anywhere before 4 leaves the offsets uncommitted, so the changes are read again.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import random
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Final, TypeVar, cast

import structlog

from consumer import observability as obs
from consumer.buffer import Batch, DestinationBuffer, Entry, Position, partition_offset
from consumer.campaign_monitor.client import (
    CampaignMonitorClient,
    CustomField,
    DestinationFatal,
    RateLimited,
    RecordRejected,
    RequestInvalid,
    SubscriberRow,
    TransientError,
)
from consumer.deadletter import DeadLetter, DeadLetterQueue
from consumer.events import MembershipChange, ProfileValue, decode
from consumer.ratelimit import AimdRateLimiter, RateLimitInfo
from consumer.settings import Destination

log = structlog.get_logger("cmsync.flusher")

T = TypeVar("T")

#: Exponential backoff for transient errors: base, cap (seconds). Full jitter.
BACKOFF_BASE_S: Final = 0.5
BACKOFF_CAP_S: Final = 30.0
#: A fatally failing destination (bad key, bad list) is retried this often, with one log line each.
STALL_RETRY_S: Final = 60.0
#: Removals per batch, and removal batches of one destination in flight at once (all of
#: them while draining). Few: a removal taken into flight can no longer be cancelled by a
#: re-entry, and when the key's rate is the bottleneck a taken removal may wait long for its
#: slot. Kept in the buffer instead, an exit and its re-entry coalesce into one import row.
REMOVAL_BATCH_SIZE: Final = 25
REMOVAL_BATCHES_IN_FLIGHT: Final = 1
#: Calls of one destination under way at once, retries and their backoff included: with
#: imports and removals sent independently, this keeps an outage from multiplying the retries.
CALLS_IN_FLIGHT: Final = 4
#: Place in the rate limiter's line (lower first): an import carries up to 1000 changes.
IMPORT_PRIORITY: Final = 0
REMOVAL_PRIORITY: Final = 1
#: Page size of the member listings read for the consent policy (the API's maximum).
LISTING_PAGE_SIZE: Final = 1000


#: What a buffer entry keeps of its event, as the change's payload: the record's original value
#: (to rebuild the row at flush time, which keeps memory per pending change small, and for the
#: dead-letter topic), and its key only when that is not the profile's id encoded in UTF-8, as
#: the contract has it: then the payload is the value alone, and the key is read back from it
#: when a dead letter needs it. Otherwise a (key, value) tuple. Bytes and a tuple of bytes are
#: objects the cyclic garbage collector does not track: hundreds of thousands of them sit in
#: the buffers, and every tracked object is traversed again at each full collection.
Payload = bytes | tuple[bytes | None, bytes]


def payload_of(key: bytes | None, value: bytes, profile_id: object) -> Payload:
    """The payload to keep for a record whose event has this profile id."""
    if key is not None and profile_id.__class__ is str and key == profile_id.encode():
        return value
    return (key, value)


def _payload(entry: Entry) -> Payload:
    payload = entry.change.payload
    assert isinstance(payload, bytes | tuple)
    return cast(Payload, payload)


def _value(entry: Entry) -> bytes:
    payload = _payload(entry)
    return payload if isinstance(payload, bytes) else payload[1]


def _key(entry: Entry) -> bytes | None:
    payload = _payload(entry)
    if isinstance(payload, tuple):
        return payload[0]
    event = decode(payload)  # decoded once already: valid
    assert isinstance(event, MembershipChange)
    profile_id = event.profile["id"]
    assert isinstance(profile_id, str)
    return profile_id.encode()


class ApiChannel:
    """One API key: its client and its rate limiter. Every request goes through `call`."""

    def __init__(
        self,
        key_name: str,
        client: CampaignMonitorClient,
        limiter: AimdRateLimiter,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.key_name = key_name  # the env var's NAME: safe as a metric label
        self.client = client
        self.limiter = limiter
        self._clock = clock
        obs.permitted_rate.labels(api_key=key_name).set(limiter.rate)

    def observe(
        self, endpoint: str, status: int, info: RateLimitInfo | None, seconds: float
    ) -> None:
        """Observer of every response of this key's client: feeds the limiter and the metrics."""
        now = self._clock()
        if status == 429:
            # One burst of 429s to requests sent together counts as one decrease.
            self.limiter.on_throttled(now, info, sent_at=now - seconds)
            obs.api_throttled.labels(api_key=self.key_name).inc()
        elif 0 < status < 500:
            self.limiter.on_success(now, info)
        obs.permitted_rate.labels(api_key=self.key_name).set(self.limiter.rate)
        obs.api_requests.labels(endpoint=endpoint, status=str(status)).inc()
        obs.api_latency.labels(endpoint=endpoint).observe(seconds)


@dataclass
class DestinationFlusher:
    destination: Destination
    buffer: DestinationBuffer
    channel: ApiChannel
    dlq: DeadLetterQueue
    release: Callable[[Iterable[Position]], None]
    source_topic: str
    consent_refresh_s: float
    clock: Callable[[], float] = time.monotonic
    wall_clock: Callable[[], float] = time.time
    max_batches_in_flight: int = 4
    #: Set when new changes were offered or a drain was requested: wakes the loop early.
    wakeup: asyncio.Event = field(default_factory=asyncio.Event)
    draining: bool = False
    stalled_reason: str | None = None
    _protected: frozenset[str] = frozenset()
    _protected_at: float | None = None
    _last_stall_log: float = float("-inf")
    _rng: random.Random = field(default_factory=random.Random)
    _calls: asyncio.Semaphore = field(default_factory=lambda: asyncio.Semaphore(CALLS_IN_FLIGHT))

    # ---------------------------------------------------------------- loop

    async def run(self) -> None:
        """Flush forever: take due batches, keep up to `max_batches_in_flight` imports and
        `REMOVAL_BATCHES_IN_FLIGHT` removal batches going (`max_batches_in_flight` while
        draining). The two kinds do not wait for each other: slow single removals must not
        hold back an import that carries a thousand changes."""
        name = self.destination.name
        structlog.contextvars.bind_contextvars(destination=name)
        obs.destination_up.labels(destination=name).set(1)
        going = [0, 0]  # in flight: [removal batches, imports]
        limit = self.max_batches_in_flight

        def finished(kind: int) -> Callable[[asyncio.Task[None]], None]:
            def callback(_task: asyncio.Task[None]) -> None:
                going[kind] -= 1
                self.wakeup.set()

            return callback

        async with asyncio.TaskGroup() as tasks:
            while True:
                now = self.clock()
                obs.pending_changes.labels(destination=name).set(
                    self.buffer.pending() + self.buffer.in_flight()
                )
                adds = going[1] < limit
                removals = going[0] < (limit if self.draining else REMOVAL_BATCHES_IN_FLIGHT)
                batch = None
                if adds or removals:
                    batch = self.buffer.take(now, force=self.draining, adds=adds, removals=removals)
                if batch is None:
                    delay = None
                    if adds or removals:
                        delay = self.buffer.next_due(now, adds=adds, removals=removals)
                    self.wakeup.clear()
                    timeout = 1.0 if delay is None else min(max(delay, 0.01), 1.0)
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self.wakeup.wait(), timeout)
                    continue
                if batch.late:  # a newer change was applied meanwhile: nothing to send for these
                    obs.events_skipped.labels(reason="late").inc(len(batch.late))
                    self.release(batch.released())
                if batch.adds:
                    going[1] += 1
                    task = tasks.create_task(self._flush(Batch(batch.adds, [])))
                    task.add_done_callback(finished(1))
                if batch.removals:
                    going[0] += 1
                    task = tasks.create_task(self._flush(Batch([], batch.removals)))
                    task.add_done_callback(finished(0))

    def drain(self) -> None:
        """From now on send everything buffered without waiting for the flush interval."""
        self.draining = True
        self.wakeup.set()

    def drained(self) -> bool:
        return self.buffer.drained()

    # ---------------------------------------------------------------- one batch

    async def _flush(self, batch: Batch) -> None:
        started = self.clock()
        added = removed = rejected = 0
        outcome = "ok"
        try:
            if batch.adds:
                a, r = await self._send_adds(batch.adds)
                added, rejected = added + a, rejected + r
            if batch.removals:
                rm, r = await self._send_removals(batch.removals)
                removed, rejected = removed + rm, rejected + r
        except BaseException:
            outcome = "cancelled"
            raise
        finally:
            seconds = self.clock() - started
            name = self.destination.name
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

    def _complete(self, entries: Sequence[Entry], *, applied: bool) -> None:
        if not entries:
            return
        if applied:
            now_ms = self.wall_clock() * 1000.0
            fresh = obs.freshness.labels(destination=self.destination.name)
            for entry in entries:
                fresh.observe(max(0.0, (now_ms - entry.change.occurred_at_ms) / 1000.0))
        self.release(self.buffer.complete(entries, applied=applied))

    # adds ---------------------------------------------------------------------------------

    async def _send_adds(self, entries: list[Entry]) -> tuple[int, int]:
        dest = self.destination
        await self._refresh_consent_if_needed()
        to_send: list[Entry] = []
        kept: list[Entry] = []  # addresses whose consent we must not override: nothing to send
        for entry in entries:
            if dest.resubscribe == "deleted-only" and entry.change.key in self._protected:
                kept.append(entry)
            else:
                to_send.append(entry)
        if kept:
            obs.events_skipped.labels(reason="consent").inc(len(kept))
            self._complete(kept, applied=True)
        if not to_send:
            return 0, 0
        rows: list[SubscriberRow] = []
        by_email: dict[str, Entry] = {}
        undecodable: list[Entry] = []
        for entry in to_send:
            row = self._row(entry)
            if row is None:
                undecodable.append(entry)
                continue
            rows.append(row)
            by_email[row.email] = entry
        if undecodable:  # cannot happen for bytes that decoded once; kept safe rather than sorry
            await self._dead_letter(undecodable, "internal", "event no longer decodes", None)
        if not rows:
            return 0, len(undecodable)
        resubscribe = dest.resubscribe != "never"
        try:
            result = await self._call(
                lambda: self.channel.client.import_subscribers(
                    dest.list_id, rows, resubscribe=resubscribe
                ),
                priority=IMPORT_PRIORITY,
            )
        except (RecordRejected, RequestInvalid) as exc:
            # The whole import was refused for a reason retrying cannot fix: keep the records.
            bad = list(by_email.values())
            await self._dead_letter(bad, "cm_rejected", "import refused", exc.code)
            return 0, len(bad) + len(undecodable)
        failed: dict[int, list[Entry]] = {}
        for failure in result.failures:
            rejected_entry = by_email.pop(failure.email.strip().lower(), None)
            if rejected_entry is not None:
                failed.setdefault(failure.code, []).append(rejected_entry)
        for code, bad in failed.items():
            await self._dead_letter(bad, "cm_rejected", f"import row rejected (code {code})", code)
        applied = list(by_email.values())
        self._complete(applied, applied=True)
        obs.applied_changes.labels(destination=dest.name, kind="add").inc(len(applied))
        return len(applied), sum(map(len, failed.values())) + len(undecodable)

    def _row(self, entry: Entry) -> SubscriberRow | None:
        event = decode(_value(entry))
        if not isinstance(event, MembershipChange):
            return None
        return build_row(self.destination, entry.change.key, event.profile)

    # removals -----------------------------------------------------------------------------

    async def _send_removals(self, entries: list[Entry]) -> tuple[int, int]:
        dest = self.destination
        if dest.resubscribe == "deleted-only":
            await self._refresh_consent_if_needed()
        removed = rejected = 0

        async def remove(entry: Entry) -> None:
            nonlocal removed, rejected
            address = entry.change.key
            if dest.resubscribe == "deleted-only" and address in self._protected:
                # Already inactive by the person's own choice; deleting would turn an
                # Unsubscribed address into a Deleted one that a re-entry could reactivate.
                self._complete([entry], applied=True)
                return
            try:
                if dest.removal == "unsubscribe":
                    await self._call(lambda: self.channel.client.unsubscribe(dest.list_id, address))
                else:
                    await self._call(lambda: self.channel.client.delete(dest.list_id, address))
            except (RecordRejected, RequestInvalid) as exc:
                if exc.code in STATE_CONFLICT_CODES:  # already in an inactive state: done
                    self._complete([entry], applied=True)
                    removed += 1
                    return
                await self._dead_letter([entry], "cm_rejected", "removal rejected", exc.code)
                rejected += 1
                return
            self._complete([entry], applied=True)
            removed += 1

        # All at once: `_call` lets CALLS_IN_FLIGHT of them run, the limiter paces them.
        async with asyncio.TaskGroup() as tasks:
            for entry in entries:
                tasks.create_task(remove(entry))
        obs.applied_changes.labels(destination=dest.name, kind="remove").inc(removed)
        return removed, rejected

    # consent --------------------------------------------------------------------------------

    async def _refresh_consent_if_needed(self) -> None:
        """Under `deleted-only`, know the list's Unsubscribed and Bounced addresses.

        Read in full from the paged listings at the first flush, then every
        `consent_refresh_s`. Known limit: an address that unsubscribes itself after the last
        refresh and re-enters before the next one is resubscribed.
        """
        if self.destination.resubscribe != "deleted-only":
            return
        now = self.clock()
        if self._protected_at is not None and now - self._protected_at < self.consent_refresh_s:
            return
        client, list_id = self.channel.client, self.destination.list_id

        async def read_all() -> frozenset[str]:
            found: set[str] = set()
            for state in ("unsubscribed", "bounced"):
                members = aiter(client.members(list_id, state, page_size=LISTING_PAGE_SIZE))
                for n in itertools.count():
                    if n % LISTING_PAGE_SIZE == 0:  # the next member may need a page request
                        await self.channel.limiter.acquire(self.clock, priority=IMPORT_PRIORITY)
                    try:
                        member = await anext(members)
                    except StopAsyncIteration:
                        break
                    found.add(str(member["EmailAddress"]).strip().lower())
            return frozenset(found)

        self._protected = await self._call(read_all, paced=False)
        self._protected_at = now

    # requests -------------------------------------------------------------------------------

    async def _call(
        self,
        request: Callable[[], Awaitable[T]],
        *,
        paced: bool = True,
        priority: int = REMOVAL_PRIORITY,
    ) -> T:
        """One logical request, retried until it succeeds or fails for a reason retrying
        cannot fix. RateLimited and TransientError retry (the limiter already slowed down on
        the 429); DestinationFatal stalls the destination and retries once a minute;
        RecordRejected / RequestInvalid go back to the caller."""
        async with self._calls:
            return await self._attempt(request, paced=paced, priority=priority)

    async def _attempt(
        self, request: Callable[[], Awaitable[T]], *, paced: bool, priority: int
    ) -> T:
        attempt = 0
        name = self.destination.name
        while True:
            if paced:
                await self.channel.limiter.acquire(self.clock, priority=priority)
            try:
                result = await request()
            except RateLimited:
                obs.retries.labels(destination=name, reason="rate_limited").inc()
                attempt += 1
                if not paced:
                    await self.channel.limiter.acquire(self.clock, priority=priority)
                continue
            except TransientError as exc:
                obs.retries.labels(destination=name, reason="transient").inc()
                delay = self._rng.uniform(0, min(BACKOFF_CAP_S, BACKOFF_BASE_S * 2**attempt))
                attempt += 1
                log.warning(
                    "request_retry", status=exc.status, attempt=attempt, delay_s=round(delay, 3)
                )
                await asyncio.sleep(delay)
                continue
            except DestinationFatal as exc:
                self._stall(exc)
                await asyncio.sleep(STALL_RETRY_S)
                continue
            if self.stalled_reason is not None:
                self._unstall()
            return result

    def _stall(self, exc: DestinationFatal) -> None:
        name = self.destination.name
        reason = f"Campaign Monitor refused the destination (HTTP {exc.status}, code {exc.code})"
        self.stalled_reason = reason
        obs.destination_up.labels(destination=name).set(0)
        now = self.clock()
        if now - self._last_stall_log >= STALL_RETRY_S - 1:
            self._last_stall_log = now
            log.error(
                "destination_stalled",
                reason=reason,
                hint="check the API key and ListID of this destination; its offsets stay "
                "uncommitted until it recovers",
                retry_in_s=STALL_RETRY_S,
            )

    def _unstall(self) -> None:
        self.stalled_reason = None
        obs.destination_up.labels(destination=self.destination.name).set(1)
        log.info("destination_recovered")

    async def _dead_letter(
        self, entries: Sequence[Entry], error: str, detail: str, cm_code: int | None
    ) -> None:
        for entry in entries:
            partition, offset = partition_offset(entry.change.position)
            await self.dlq.send(
                DeadLetter(
                    key=_key(entry),
                    value=_value(entry),
                    error=error,
                    detail=detail,
                    source=f"{self.source_topic}/{partition}/{offset}",
                    destination=self.destination.name,
                    cm_code=cm_code,
                )
            )
        self._complete(entries, applied=False)


#: Codes that mean "the subscriber is already in an inactive state" (suppressed, deleted,
#: unsubscribed, bounced, unconfirmed): for a removal that is the wanted outcome.
STATE_CONFLICT_CODES: Final = frozenset({204, 205, 206, 207, 208})


def build_row(
    destination: Destination, address: str, profile: dict[str, ProfileValue]
) -> SubscriberRow:
    """Map a profile to an import row: name and custom fields per the destination's mapping.

    A profile field that is absent leaves the Campaign Monitor field as it is; `null` (or an
    empty multi-select) clears it; an array of strings is a multi-select (the key repeats).
    """
    name_value = profile.get(destination.name_field) if destination.name_field else None
    fields: list[CustomField] = []
    for cm_key, profile_field in destination.custom_fields:
        if profile_field not in profile:
            continue
        value = profile[profile_field]
        if value is None or value == []:
            fields.append(CustomField(cm_key, "", clear=True))
        elif isinstance(value, list):
            fields.extend(CustomField(cm_key, str(item)) for item in value)
        elif isinstance(value, bool):
            fields.append(CustomField(cm_key, "true" if value else "false"))
        else:
            fields.append(CustomField(cm_key, str(value)))
    return SubscriberRow(
        email=address,
        name=name_value if isinstance(name_value, str) else None,
        custom_fields=tuple(fields),
        consent_to_track=destination.consent_to_track,
    )
