"""The flusher's loop and its batches, against a fake gateway, a fake dead-letter sink and a
fake clock: what is sent, what is dead-lettered, what is released, and when.

The real gateway is tested against the simulator (tests/test_gateway.py); the whole path
through the broker in tests/test_sync.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator, Callable, Collection, Iterable, Sequence
from typing import Any

import orjson
import pytest

from consumer import observability as obs
from consumer.buffer import (
    AppliedMemory,
    Change,
    DestinationBuffer,
    Entry,
    Position,
    partition_offset,
)
from consumer.campaign_monitor.client import (
    AddressThrottled,
    ImportFailure,
    ImportResult,
    RecordRejected,
    SubscriberRow,
)
from consumer.consent import ConsentUnknownError, OptOuts
from consumer.deadletter import DeadLetter
from consumer.destinations import Resubscribe
from consumer.devtools.rig import load_destinations
from consumer.fieldtypes import field_types
from consumer.flusher import DestinationFlusher
from consumer.gateway import RemovalMode
from consumer.listsettings import ListCheck
from consumer.membership.model import Applied, Desired, Origin
from consumer.rows import Wanted
from consumer.settings import Destination
from consumer.tuning import BACKFILL_PRIORITY, IMPORT_PRIORITY
from tests.simulator_fixtures import FakeClock

TOPIC = "membership"
LIST_ID = "0123456789abcdef0123456789abcdef"
FLUSH_INTERVAL_S = 5.0
HOLD_S = 0.2  # how long an address written too often is held back (real time)
DESTINATIONS_TOML = f"""
[[destination]]
name = "news"
segment_id = "seg"
list_id = "{LIST_ID}"
email_field = "email"
name_field = "full_name"
resubscribe = "deleted-only"

[destination.custom_fields]
City = "city"
"""


@pytest.fixture
def destination() -> Destination:
    """A destination as the service reads it (through the public settings loader)."""
    return load_destinations(DESTINATIONS_TOML, "test-key")[0]


class FakeGateway:
    """Records calls; answers from what the test put in. `stall()` makes calls wait, reporting
    a stall, until `recover()` (what the real gateway does while Campaign Monitor refuses)."""

    def __init__(self) -> None:
        self.imports: list[tuple[list[SubscriberRow], bool]] = []
        self.priorities: list[int] = []
        self.removals: list[tuple[RemovalMode, str]] = []
        self.import_failures: dict[str, int] = {}  # address -> Campaign Monitor code
        self.removal_answers: dict[str, int] = {}  # address -> 203 (not in list) or error code
        self.flapping: set[str] = set()  # addresses answered "added too many times too quickly"
        self.throttled_imports: list[list[str]] = []
        self._stalled: str | None = None
        self._recovered = asyncio.Event()
        self._recovered.set()

    def stall(self, reason: str) -> None:
        self._stalled = reason
        self._recovered.clear()

    def recover(self) -> None:
        self._stalled = None
        self._recovered.set()

    async def import_subscribers(
        self,
        list_id: str,
        rows: Sequence[SubscriberRow],
        *,
        resubscribe: bool,
        destination: str,
        priority: int = IMPORT_PRIORITY,
    ) -> ImportResult:
        await self._recovered.wait()
        self.priorities.append(priority)
        if any(row.email in self.flapping for row in rows):
            self.throttled_imports.append([row.email for row in rows])
            raise AddressThrottled("too many times", status=429, code=429, endpoint="import")
        self.imports.append((list(rows), resubscribe))
        failures = tuple(
            ImportFailure(row.email, self.import_failures[row.email], "refused")
            for row in rows
            if row.email in self.import_failures
        )
        return ImportResult(len(rows), 0, len(rows) - len(failures), (), failures)

    async def remove(
        self, list_id: str, address: str, *, how: RemovalMode, destination: str
    ) -> bool:
        await self._recovered.wait()
        if address in self.flapping:
            raise AddressThrottled("too many times", status=429, code=429, endpoint=how)
        self.removals.append((how, address))
        code = self.removal_answers.get(address)
        if code == 203:
            return False  # the client's answer for "not in list"
        if code is not None:
            raise RecordRejected("refused", status=400, code=code, endpoint=how)
        return True

    def stalled_reason(self, destination: str) -> str | None:
        return self._stalled


class FakeConsent:
    """Scripted answers of who opted out; records each question (addresses, activating).
    ``unknown`` makes the next questions fail as an unreadable listing would."""

    def __init__(self) -> None:
        self.opted = OptOuts()
        self.asked: list[tuple[list[str], bool]] = []
        self.unknown = 0  # how many questions fail from now on
        self.warmed = 0
        self.reactivated_addresses: list[str] = []

    async def opted_out(
        self, addresses: Collection[str], *, since: float, activating: bool
    ) -> OptOuts:
        self.asked.append((sorted(addresses), activating))
        if self.unknown:
            self.unknown -= 1
            raise ConsentUnknownError("the unsubscribed listing could not be read (code 500)")
        return self.opted

    async def warm(self) -> None:
        self.warmed += 1

    def reactivated(self, addresses: Iterable[str]) -> None:
        self.reactivated_addresses.extend(addresses)


class FakeSink:
    def __init__(self) -> None:
        self.letters: list[DeadLetter] = []

    async def send(self, letter: DeadLetter) -> None:
        self.letters.append(letter)


class Rig:
    """One flusher over a real buffer, with fakes around it; positions are offsets of
    partition 0 and `released` collects what the flusher hands back."""

    def __init__(self, destination: Destination) -> None:
        self.destination = destination
        self.clock = FakeClock()
        self.gateway = FakeGateway()
        self.consent = FakeConsent()
        self.removed_by_sync: set[str] = set()  # addresses the state says the sync removed
        self.outcomes: dict[str, Applied] = {}
        self.sink = FakeSink()
        self.released: list[Position] = []
        self.buffer = DestinationBuffer(
            destination.name,
            AppliedMemory(1000),
            flush_interval_s=FLUSH_INTERVAL_S,
            max_removals=25,
        )
        self.flusher = DestinationFlusher(
            destination=destination,
            buffer=self.buffer,
            gateway=self.gateway,
            consent=self.consent,
            dead_letters=self.sink,
            release=self.release,
            source_topic=TOPIC,
            on_applied=self.applied,
            removed_by_sync=lambda entry: entry.change.key in self.removed_by_sync,
            clock=self.clock,
            address_hold_s=HOLD_S,
        )
        self._offset = 0
        self._changed = asyncio.Event()

    def applied(self, entries: Sequence[Entry], outcome: Applied) -> None:
        for entry in entries:
            self.outcomes[entry.change.key] = outcome

    def release(self, positions: Iterable[Position]) -> None:
        self.released.extend(positions)
        self._changed.set()

    def offer(self, address: str, *, entered: bool = True, **profile: Any) -> Position:
        """Buffer one desired state (as the membership state would) and return its position."""
        offset, self._offset = self._offset, self._offset + 1
        position: Position = offset << 32  # partition 0
        revision = offset + 1
        desired = Desired(
            LIST_ID,
            address.lower(),
            entered,
            dict(profile) if entered else {},
            revision,
            Origin(f"p{offset}", 0, offset) if entered else None,
        )
        at_ms = 1_700_000_000_000 + offset
        change = Change(
            desired.address, entered, revision, revision, revision, Wanted(desired, at_ms), position
        )
        self.buffer.offer(change, self.clock())
        self.flusher.wake()
        return position

    async def until(self, condition: Callable[[], bool], what: str) -> None:
        """Wait until `condition()` holds; the bound only keeps a broken flusher from hanging
        the suite (nothing here is timed)."""

        async def wait() -> None:
            while not condition():
                self._changed.clear()
                # Woken by a release; the short timeout covers conditions on other state.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), 0.05)

        try:
            await asyncio.wait_for(wait(), 10)
        except TimeoutError:
            pytest.fail(f"never happened: {what}")

    def due(self) -> None:
        """Let the flush interval pass."""
        self.clock.advance(FLUSH_INTERVAL_S)
        self.flusher.wake()


@pytest.fixture
async def rig(destination: Destination) -> AsyncIterator[Rig]:
    rig = Rig(destination)
    task = asyncio.create_task(rig.flusher.run())
    try:
        yield rig
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


def metric(name: str, **labels: str) -> float:
    return obs.REGISTRY.get_sample_value(name, labels) or 0.0


def ordered(positions: Iterable[Position]) -> list[Position]:
    return sorted(positions)


async def test_import_with_a_rejected_row_dead_letters_it_and_releases_every_change(
    rig: Rig,
) -> None:
    applied_before = metric("cmsync_changes_applied_total", destination="news", kind="add")
    good = rig.offer("Ada@example.com", full_name="Ada", city="London")
    bad = rig.offer("bad@example.com", full_name="Bad")
    other = rig.offer("grace@example.com", city=None)
    rig.gateway.import_failures["bad@example.com"] = 1
    rig.due()
    await rig.until(lambda: len(rig.released) == 3, "all three positions released")

    assert ordered(rig.released) == [good, bad, other]
    [(rows, resubscribe)] = rig.gateway.imports
    assert resubscribe is False  # deleted-only: only what the sync removed comes back
    by_email = {row.email: row for row in rows}
    assert set(by_email) == {"ada@example.com", "bad@example.com", "grace@example.com"}
    assert by_email["ada@example.com"].name == "Ada"
    assert [(f.key, f.value) for f in by_email["ada@example.com"].custom_fields] == [
        ("City", "London")
    ]
    assert by_email["grace@example.com"].custom_fields[0].clear  # null clears the field
    [letter] = rig.sink.letters
    partition, offset = partition_offset(bad)
    assert (letter.error, letter.cm_code, letter.destination) == ("cm_rejected", 1, "news")
    assert letter.source == f"{TOPIC}/{partition}/{offset}"
    assert letter.key == b"p1"  # the key, read back from the value (it was the profile id)
    assert orjson.loads(letter.value or b"")["profile"]["email"] == "bad@example.com"
    assert "bad@example.com" not in letter.detail  # no personal data in the detail
    applied_after = metric("cmsync_changes_applied_total", destination="news", kind="add")
    assert applied_after - applied_before == 2
    assert rig.flusher.drained()


async def test_removals_answered_not_in_list_or_already_inactive_count_as_done(
    rig: Rig,
) -> None:
    before = metric("cmsync_changes_applied_total", destination="news", kind="remove")
    positions = [
        rig.offer("gone@example.com", entered=False),
        rig.offer("absent@example.com", entered=False),
        rig.offer("unsubscribed@example.com", entered=False),
        rig.offer("bounced@example.com", entered=False),
        rig.offer("refused@example.com", entered=False),
    ]
    rig.gateway.removal_answers.update(
        {
            "absent@example.com": 203,  # not in the list
            "unsubscribed@example.com": 206,  # already unsubscribed
            "bounced@example.com": 207,  # already bounced
            "refused@example.com": 1,  # invalid address: the record is dead-lettered
        }
    )
    rig.due()
    await rig.until(lambda: len(rig.released) == 5, "all five positions released")

    assert ordered(rig.released) == positions
    assert sorted(address for _, address in rig.gateway.removals) == sorted(
        ["gone@example.com", "absent@example.com", "unsubscribed@example.com",
         "bounced@example.com", "refused@example.com"]
    )  # fmt: skip
    assert {how for how, _ in rig.gateway.removals} == {"delete"}
    [letter] = rig.sink.letters
    assert (letter.error, letter.cm_code) == ("cm_rejected", 1)
    after = metric("cmsync_changes_applied_total", destination="news", kind="remove")
    assert after - before == 4


async def test_deleted_only_reactivates_exactly_what_the_sync_removed(rig: Rig) -> None:
    """Rows the sync never removed go with Resubscribe: false (an inactive address stays
    inactive: no question needed); the sync's own removals come back with Resubscribe: true,
    unless the person opted out since (asked right before, activating)."""
    rig.removed_by_sync = {"back@example.com", "left-since@example.com"}
    rig.consent.opted = OptOuts(unsubscribed=frozenset({"left-since@example.com"}))
    skipped_before = metric("cmsync_events_skipped_total", reason="consent")
    for address in ("new@example.com", "back@example.com", "left-since@example.com"):
        rig.offer(address)
    rig.due()
    await rig.until(lambda: len(rig.released) == 3, "all three positions released")

    assert sorted((resub, [r.email for r in rows]) for rows, resub in rig.gateway.imports) == [
        (False, ["new@example.com"]),
        (True, ["back@example.com"]),
    ]
    assert rig.consent.asked == [(["back@example.com", "left-since@example.com"], True)]
    assert rig.consent.reactivated_addresses == ["back@example.com"]
    assert rig.outcomes == {
        "new@example.com": Applied.ACTIVE,
        "back@example.com": Applied.ACTIVE,
        "left-since@example.com": Applied.KEPT,
    }
    assert metric("cmsync_events_skipped_total", reason="consent") - skipped_before == 1


async def test_the_syncs_own_unsubscribe_is_not_mistaken_for_the_persons(
    destination: Destination,
) -> None:
    """removal = "unsubscribe": the list shows the sync's own removal as Unsubscribed; the
    state knows it was the sync's, so a re-entry brings the address back. A bounce since is
    the person's (Campaign Monitor's) and protects."""
    rig = Rig(dataclasses.replace(destination, removal="unsubscribe"))
    rig.removed_by_sync = {"ours@example.com", "bounced@example.com"}
    rig.consent.opted = OptOuts(
        unsubscribed=frozenset({"ours@example.com"}), bounced=frozenset({"bounced@example.com"})
    )
    task = asyncio.create_task(rig.flusher.run())
    try:
        rig.offer("ours@example.com")
        rig.offer("bounced@example.com")
        rig.due()
        await rig.until(lambda: len(rig.released) == 2, "both released")
    finally:
        task.cancel()
    [(rows, resubscribe)] = rig.gateway.imports
    assert ([row.email for row in rows], resubscribe) == (["ours@example.com"], True)
    assert rig.outcomes["bounced@example.com"] is Applied.KEPT


async def test_removals_leave_opted_out_addresses_as_they_are(rig: Rig) -> None:
    rig.consent.opted = OptOuts(
        unsubscribed=frozenset({"left@example.com"}), bounced=frozenset({"gone@example.com"})
    )
    for address in ("left@example.com", "gone@example.com", "member@example.com"):
        rig.offer(address, entered=False)
    rig.due()
    await rig.until(lambda: len(rig.released) == 3, "all three released")

    assert rig.gateway.removals == [("delete", "member@example.com")]
    assert rig.consent.asked == [
        (["gone@example.com", "left@example.com", "member@example.com"], False)
    ]
    assert rig.outcomes == {
        "left@example.com": Applied.KEPT,
        "gone@example.com": Applied.KEPT,
        "member@example.com": Applied.REMOVED,
    }


async def test_writes_that_need_consent_wait_while_it_cannot_be_known(rig: Rig) -> None:
    """Fail closed: a failed read holds the removal (and the re-entry) unsent, positions
    held; plain adds, which need no answer, go on; the held writes go once a read works."""
    rig.removed_by_sync = {"back@example.com"}
    rig.consent.unknown = 2
    before = metric("cmsync_consent_unknown_total", destination="news")
    gone = rig.offer("gone@example.com", entered=False)
    back = rig.offer("back@example.com")
    new = rig.offer("new@example.com")
    rig.due()
    await rig.until(lambda: new in rig.released, "the plain add applied")
    await rig.until(lambda: rig.consent.unknown == 0, "both questions failed")
    assert gone not in rig.released
    assert back not in rig.released
    assert rig.gateway.removals == []
    assert metric("cmsync_consent_unknown_total", destination="news") - before == 2

    rig.due()
    await rig.until(lambda: len(rig.released) == 3, "the held writes applied")
    assert rig.gateway.removals == [("delete", "gone@example.com")]
    assert (["back@example.com"], True) in [
        ([r.email for r in rows], resub) for rows, resub in rig.gateway.imports
    ]


@pytest.mark.parametrize("policy", ["always", "never"])
async def test_always_and_never_ask_nothing_before_an_import(
    destination: Destination, policy: Resubscribe
) -> None:
    rig = Rig(dataclasses.replace(destination, resubscribe=policy))
    rig.removed_by_sync = {"left@example.com"}
    task = asyncio.create_task(rig.flusher.run())
    try:
        rig.offer("left@example.com")
        rig.offer("gone@example.com", entered=False)
        rig.due()
        await rig.until(lambda: len(rig.released) == 2, "both released")
    finally:
        task.cancel()
    [(rows, resubscribe)] = rig.gateway.imports
    assert [row.email for row in rows] == ["left@example.com"]
    assert resubscribe is (policy == "always")
    # "always" overrides opt-outs by definition: it never asks, not even before a delete.
    expected = [] if policy == "always" else [(["gone@example.com"], False)]
    assert rig.consent.asked == expected
    assert rig.consent.warmed == (0 if policy == "always" else 1)


async def test_an_address_written_too_often_is_split_out_and_held_back(rig: Rig) -> None:
    """A per-address 429 does not say which row: the import is halved down to that row, which
    is held back a while; the other rows are applied at once. Its removal is held back too."""
    rig.gateway.flapping = {"flap@example.com", "gone@example.com"}
    positions = {a: rig.offer(a) for a in [f"p{n}@example.com" for n in range(7)]}
    flap = rig.offer("flap@example.com")
    gone = rig.offer("gone@example.com", entered=False)
    rig.due()
    await rig.until(lambda: set(positions.values()) <= set(rig.released), "the others applied")
    assert flap not in rig.released
    assert gone not in rig.released
    assert sorted(len(rows) for rows in rig.gateway.throttled_imports) == [1, 2, 4, 8]
    assert sum(len(rows) for rows, _ in rig.gateway.imports) == 7
    assert metric("cmsync_addresses_held_back_total", destination="news") >= 2

    rig.gateway.flapping = set()  # Campaign Monitor lets the address be written again
    await rig.until(lambda: flap in rig.released, "the held-back add applied")
    rig.due()
    await rig.until(lambda: gone in rig.released, "the held-back removal applied")
    assert ("delete", "gone@example.com") in rig.gateway.removals


async def test_drain_sends_at_once_and_end_drain_restores_the_flush_interval(rig: Rig) -> None:
    first = rig.offer("ada@example.com")
    removal = rig.offer("grace@example.com", entered=False)
    rig.flusher.drain()  # the clock does not move: nothing is due by the flush interval
    await rig.until(lambda: len(rig.released) == 2, "drained without waiting")
    assert ordered(rig.released) == [first, removal]
    assert rig.flusher.drained()

    rig.flusher.end_drain()
    later = rig.offer("linus@example.com")
    await asyncio.sleep(0.1)  # room for a (wrong) flush; passing late would not hide a bug
    assert later not in rig.released
    assert len(rig.gateway.imports) == 1
    rig.due()
    await rig.until(lambda: later in rig.released, "sent once the interval passed")
    assert len(rig.gateway.imports) == 2


async def test_imports_of_a_list_being_backfilled_go_at_the_backfill_priority(rig: Rig) -> None:
    first = rig.offer("ada@example.com")
    rig.due()
    await rig.until(lambda: first in rig.released, "a live import")
    filling = True
    rig.flusher.backfilling = lambda: filling
    second = rig.offer("grace@example.com")
    rig.due()
    await rig.until(lambda: second in rig.released, "an import while backfilling")
    filling = False
    third = rig.offer("linus@example.com")
    rig.due()
    await rig.until(lambda: third in rig.released, "a live import again")
    assert rig.gateway.priorities == [IMPORT_PRIORITY, BACKFILL_PRIORITY, IMPORT_PRIORITY]
    assert BACKFILL_PRIORITY > IMPORT_PRIORITY  # later in the rate limiter's line


def stalled(rig: Rig) -> str | None:
    """Read afresh each time (a property mypy would otherwise narrow across awaits)."""
    return rig.flusher.stalled_reason


async def test_a_stalled_destination_is_reported_and_holds_its_positions(rig: Rig) -> None:
    rig.gateway.stall("Campaign Monitor refused the destination (HTTP 401, code 100)")
    position = rig.offer("ada@example.com")
    rig.due()
    assert stalled(rig) == "Campaign Monitor refused the destination (HTTP 401, code 100)"
    await rig.until(lambda: rig.buffer.in_flight() == 1, "the batch taken into flight")
    assert rig.released == []  # nothing durable while the destination is refused
    assert not rig.flusher.drained()

    rig.gateway.recover()
    await rig.until(lambda: rig.released == [position], "released after recovery")
    assert stalled(rig) is None
    assert rig.flusher.drained()


# ---------------------------------------------------------------- the list's settings


async def test_a_destination_held_by_its_lists_settings_sends_nothing(
    destination: Destination,
) -> None:
    """Read once before the first write: a held destination takes no batch, says why, and
    drops cmsync_destination_up to 0; the changes stay buffered (owed)."""
    rig = Rig(destination)
    reads = 0

    async def held() -> ListCheck:
        nonlocal reads
        reads += 1
        return ListCheck(problems=('list has no custom field "City"', "and another reason"))

    rig.flusher = DestinationFlusher(
        destination=destination,
        buffer=rig.buffer,
        gateway=rig.gateway,
        consent=rig.consent,
        dead_letters=rig.sink,
        release=rig.release,
        source_topic=TOPIC,
        list_settings=held,
        clock=rig.clock,
    )
    task = asyncio.create_task(rig.flusher.run())
    try:
        rig.offer("ada@example.com")
        rig.offer("gone@example.com", entered=False)
        rig.due()
        await rig.until(lambda: stalled(rig) is not None, "held")
        rig.flusher.drain()
        await asyncio.sleep(0.1)  # room for a (wrong) flush
        assert stalled(rig) == 'list has no custom field "City"; and another reason'
        assert metric("cmsync_destination_up", destination="news") == 0
        assert rig.gateway.imports == []
        assert rig.gateway.removals == []
        assert rig.consent.warmed == 0  # not even a read for a held destination
        assert rig.released == []
        assert reads == 1
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def test_values_are_coerced_and_an_unfit_one_is_dead_lettered(
    destination: Destination,
) -> None:
    types = field_types(
        [
            {"Key": "[city]", "DataType": "Text"},  # mapped as "City": the list's spelling goes
            {"Key": "[Age]", "DataType": "Number"},
        ]
    )
    dest = dataclasses.replace(destination, custom_fields=(("City", "city"), ("Age", "age")))
    rig = Rig(dest)

    async def typed() -> ListCheck:
        return ListCheck(types=types)

    rig.flusher = DestinationFlusher(
        destination=dest,
        buffer=rig.buffer,
        gateway=rig.gateway,
        consent=rig.consent,
        dead_letters=rig.sink,
        release=rig.release,
        source_topic=TOPIC,
        on_applied=rig.applied,
        list_settings=typed,
        clock=rig.clock,
    )
    task = asyncio.create_task(rig.flusher.run())
    try:
        rig.offer("ada@example.com", city="London", age=" 1e2 ")
        unfit = rig.offer("bob@example.com", city="Paris", age="forty-two")
        rig.due()
        await rig.until(lambda: len(rig.released) == 2, "both released")
    finally:
        task.cancel()
    [(rows, _)] = rig.gateway.imports
    [row] = rows
    assert row.email == "ada@example.com"
    assert [(f.key, f.value) for f in row.custom_fields] == [("city", "London"), ("Age", "100")]
    [letter] = rig.sink.letters
    assert (letter.error, letter.cm_code, letter.destination) == ("field_type", None, "news")
    assert letter.detail.startswith('Number field "Age" takes a finite decimal number')
    assert "forty" not in letter.detail  # the reason names the key and type, never the value
    assert letter.source == f"{TOPIC}/0/{partition_offset(unfit)[1]}"
    assert rig.outcomes == {"ada@example.com": Applied.ACTIVE, "bob@example.com": Applied.REJECTED}
