"""Intake: decode → route → buffer → holds → dead letters, through its public API.

Real buffers, a real offset tracker, real settings; the only fakes are the pure core's seams:
the clock, the dead-letter sink (a letter is "durable" when the test says so) and the flusher
(only its `wake` is seen by the intake).
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiokafka import ConsumerRecord

from consumer.buffer import AppliedMemory, DestinationBuffer, Entry, position
from consumer.deadletter import DeadLetter
from consumer.intake import Intake, Route
from consumer.offsets import OffsetTracker
from consumer.settings import Destination, load_settings

TOPIC = "members"
T0 = 1_700_000_000_000


def destinations(tmp_path: Path, *tables: tuple[str, str, str]) -> list[Destination]:
    """Destinations (name, segment, email field) as `load_settings` reads them from a file."""
    text = "".join(
        f'[[destination]]\nname = "{name}"\nsegment_id = "{segment}"\n'
        f'list_id = "{n:032x}"\nemail_field = "{field}"\n\n'
        for n, (name, segment, field) in enumerate(tables)
    )
    path = tmp_path / "destinations.toml"
    path.write_text(text)
    settings = load_settings(
        {
            "CMSYNC_KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:9",
            "CMSYNC_CM_API_KEY": "test-key",
            "CMSYNC_DESTINATIONS_FILE": str(path),
        }
    )
    return list(settings.destinations)


def event(
    email: object, *, segment: str = "seg", entered: bool = True, at_ms: int = T0, n: int = 0
) -> bytes:
    """A native v1 event of profile ``p{n}``, with ``email`` (left out when None)."""
    profile: dict[str, Any] = {"id": f"p{n}", "work_email": "work@example.com"}
    if email is not None:
        profile["email"] = email
    occurred_at = datetime.fromtimestamp(at_ms / 1000, UTC).isoformat(timespec="milliseconds")
    return orjson.dumps(
        {
            "event_id": f"ev-{n}-{at_ms}",
            "segment_id": segment,
            "change": "entered" if entered else "exited",
            "occurred_at": occurred_at.replace("+00:00", "Z"),
            "profile": profile,
        }
    )


def record(offset: int, value: bytes | None, *, partition: int = 0) -> ConsumerRecord[Any, Any]:
    return ConsumerRecord(
        topic=TOPIC,
        partition=partition,
        offset=offset,
        timestamp=0,
        timestamp_type=0,
        key=b"p0",
        value=value,
        checksum=None,
        serialized_key_size=2,
        serialized_value_size=len(value or b""),
        headers=[],
    )


class Flusher:
    """Counts wake-ups (all the intake does with a flusher)."""

    def __init__(self) -> None:
        self.woken = 0

    def wake(self) -> None:
        self.woken += 1


class Letters:
    """The dead-letter sink: each letter is durable once `acknowledge` lets it through."""

    def __init__(self) -> None:
        self.sent: list[DeadLetter] = []
        self.gate = asyncio.Event()

    async def send(self, letter: DeadLetter) -> None:
        self.sent.append(letter)
        await self.gate.wait()

    def acknowledge(self) -> None:
        self.gate.set()


class Pipeline:
    """An intake with real buffers (one per destination) and a fake flusher each."""

    def __init__(
        self, dests: list[Destination], *, max_adds: int = 1000, memory: int = 100
    ) -> None:
        self.tracker = OffsetTracker()
        self.letters = Letters()
        self.applied = AppliedMemory(memory)
        self.now = 0.0
        self.intake = Intake(
            topic=TOPIC,
            tracker=self.tracker,
            send_dead_letter=self.letters.send,
            clock=lambda: self.now,
        )
        self.buffers = {
            d.name: DestinationBuffer(d.name, self.applied, flush_interval_s=5, max_adds=max_adds)
            for d in dests
        }
        self.flushers = {d.name: Flusher() for d in dests}
        self.intake.set_routes(Route(d, self.buffers[d.name], self.flushers[d.name]) for d in dests)

    def take_all(self, name: str) -> list[Entry]:
        batch = self.buffers[name].take(self.now, force=True)
        assert batch is not None
        return [*batch.adds, *batch.removals]

    def complete(self, name: str, entries: list[Entry]) -> None:
        """What a flusher does once Campaign Monitor applied the entries."""
        self.intake.release(self.buffers[name].complete(entries, applied=True))


@pytest.fixture
def two_lists(tmp_path: Path) -> list[Destination]:
    return destinations(tmp_path, ("news", "seg", "email"), ("offers", "seg", "email"))


async def test_a_change_is_held_once_per_destination_until_each_applies_it(
    two_lists: list[Destination],
) -> None:
    p = Pipeline(two_lists)
    p.intake.handle(0, [record(0, event("Ada@Example.com"))])
    assert p.tracker.outstanding_in(0) == 2
    assert p.tracker.committable(0) == 0
    news = p.take_all("news")
    assert [e.change.key for e in news] == ["ada@example.com"]  # normalised
    assert news[0].change.position == position(0, 0)
    p.complete("news", news)
    assert p.tracker.committable(0) == 0  # "offers" still holds it
    p.complete("offers", p.take_all("offers"))
    assert p.tracker.committable(0) == 1


async def test_a_segment_without_destination_is_committable_at_once(
    two_lists: list[Destination],
) -> None:
    p = Pipeline(two_lists)
    p.intake.handle(3, [record(7, event("a@example.com", segment="elsewhere"))])
    assert p.tracker.committable(3) == 8
    assert all(b.pending() == 0 for b in p.buffers.values())


async def test_an_invalid_record_is_held_until_its_dead_letter_is_durable(
    two_lists: list[Destination],
) -> None:
    p = Pipeline(two_lists)
    p.intake.handle(1, [record(4, b"{not json"), record(5, None)])
    assert p.tracker.committable(1) == 4
    await asyncio.sleep(0)  # the letters' tasks start
    assert [(x.error, x.source, x.destination) for x in p.letters.sent] == [
        ("invalid_json", f"{TOPIC}/1/4", None),
        ("empty", f"{TOPIC}/1/5", None),
    ]
    assert p.intake.letters_in_flight() == 2
    p.letters.acknowledge()
    await p.intake.wait_until(lambda: p.intake.letters_in_flight() == 0)
    assert p.tracker.committable(1) == 6


async def test_an_unusable_address_dead_letters_for_its_destination_only(
    tmp_path: Path,
) -> None:
    dests = destinations(tmp_path, ("news", "seg", "email"), ("work", "seg", "work_email"))
    p = Pipeline(dests)
    p.intake.handle(0, [record(0, event(None, n=1)), record(1, event("not an address", n=2))])
    await asyncio.sleep(0)
    assert [(x.error, x.destination, x.source) for x in p.letters.sent] == [
        ("missing_email", "news", f"{TOPIC}/0/0"),
        ("invalid_email", "news", f"{TOPIC}/0/1"),
    ]
    assert "not an address" not in " ".join(x.detail for x in p.letters.sent)
    assert p.buffers["work"].pending() == 1  # both records carry the same work address
    assert p.buffers["news"].pending() == 0
    p.letters.acknowledge()
    await p.intake.wait_until(lambda: p.intake.letters_in_flight() == 0)
    assert p.tracker.committable(0) == 0  # "work" still holds both
    p.complete("work", p.take_all("work"))
    assert p.tracker.committable(0) == 2


async def test_a_late_change_releases_its_hold_at_once(two_lists: list[Destination]) -> None:
    p = Pipeline(two_lists[:1])
    p.applied.remember("news", "a@example.com", T0 + 1, True)
    p.intake.handle(0, [record(0, event("a@example.com", entered=False, at_ms=T0))])
    assert p.buffers["news"].pending() == 0
    assert p.tracker.committable(0) == 1


async def test_equal_times_go_to_the_later_offset(two_lists: list[Destination]) -> None:
    p = Pipeline(two_lists[:1])
    p.intake.handle(
        0,
        [
            record(0, event("a@example.com", entered=True, n=1)),
            record(1, event("a@example.com", entered=False, n=2)),
        ],
    )
    (entry,) = p.take_all("news")
    assert entry.change.entered is False
    assert sorted(entry.holds) == [position(0, 0), position(0, 1)]


async def test_a_full_import_wakes_its_flusher_once_per_batch(
    two_lists: list[Destination],
) -> None:
    p = Pipeline(two_lists[:1], max_adds=2)
    p.intake.handle(0, [record(0, event("a@example.com", n=0))])
    assert p.flushers["news"].woken == 0  # a partial import waits for the interval
    p.intake.handle(
        0,
        [record(1, event("b@example.com", n=1)), record(2, event("c@example.com", n=2))],
    )
    assert p.flushers["news"].woken == 1


async def test_set_routes_takes_effect_from_the_next_batch(two_lists: list[Destination]) -> None:
    p = Pipeline(two_lists)
    p.intake.set_routes(())
    p.intake.handle(0, [record(0, event("a@example.com"))])
    assert p.tracker.committable(0) == 1
    assert p.intake.routes == ()
    assert all(b.pending() == 0 for b in p.buffers.values())


async def test_offsets_must_increase_per_partition(two_lists: list[Destination]) -> None:
    p = Pipeline(two_lists)
    p.intake.handle(0, [record(5, event("a@example.com"))])
    with pytest.raises(ValueError, match="offsets must increase"):
        p.intake.handle(0, [record(5, event("a@example.com"))])


async def test_wait_until_wakes_on_the_release_that_makes_it_true(
    two_lists: list[Destination],
) -> None:
    p = Pipeline(two_lists)
    p.intake.handle(0, [record(0, event("a@example.com"))])
    p.intake.handle(1, [record(0, event("b@example.com"))])
    waiting = asyncio.create_task(p.intake.wait_until(lambda: p.tracker.outstanding_in(0) == 0))
    news = p.take_all("news")
    offers = p.take_all("offers")
    p.complete("news", [e for e in news if e.change.key == "a@example.com"])
    await asyncio.sleep(0)
    assert not waiting.done()  # "offers" still holds partition 0
    p.complete("offers", [e for e in offers if e.change.key == "a@example.com"])
    await waiting
    assert p.tracker.outstanding_in(1) == 2  # partition 1 was not waited for


async def test_wait_until_wakes_when_a_partition_is_forgotten(
    two_lists: list[Destination],
) -> None:
    p = Pipeline(two_lists)
    p.intake.handle(2, [record(0, event("a@example.com"))])
    waiting = asyncio.create_task(p.intake.wait_until(lambda: p.tracker.outstanding() == 0))
    await asyncio.sleep(0)
    assert not waiting.done()
    p.intake.forget([2])
    await waiting
    assert p.tracker.partitions() == []


async def test_wait_until_is_bounded_by_the_callers_timeout(
    two_lists: list[Destination],
) -> None:
    p = Pipeline(two_lists)
    p.intake.handle(0, [record(0, event("a@example.com"))])
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0):
            await p.intake.wait_until(lambda: p.tracker.outstanding() == 0)
    # the abandoned waiter is gone: a later release does not touch it
    p.complete("news", p.take_all("news"))
    p.complete("offers", p.take_all("offers"))
    assert p.tracker.committable(0) == 1


async def test_close_cancels_dead_letters_and_keeps_their_holds(
    two_lists: list[Destination],
) -> None:
    p = Pipeline(two_lists)
    p.intake.handle(0, [record(0, b"[]")])
    await asyncio.sleep(0)
    assert p.intake.letters_in_flight() == 1
    p.intake.close()
    await p.intake.wait_until(lambda: p.intake.letters_in_flight() == 0)
    assert p.tracker.committable(0) == 0  # not durable: read again after a restart
