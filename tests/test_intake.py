"""Intake: the input's holds and dead letters, through its public API.

A real offset tracker; the only fake is the dead-letter sink (a letter is "durable" when the
test says so). What stage 1 does with it is tested in tests/test_state.py.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from aiokafka import ConsumerRecord

from consumer.deadletter import DeadLetter
from consumer.intake import Intake
from consumer.offsets import OffsetTracker

TOPIC = "members"


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


@pytest.fixture
def letters() -> Letters:
    return Letters()


@pytest.fixture
def intake(letters: Letters) -> Intake:
    return Intake(tracker=OffsetTracker(), send_dead_letter=letters.send)


async def test_a_record_is_held_until_its_dead_letter_is_durable(
    intake: Intake, letters: Letters
) -> None:
    tracker = intake.tracker
    tracker.track(1, 4, 1)
    tracker.track(1, 5, 0)  # a record that needs no letter is committable behind it
    intake.dead_letter(record(4, b"{not json", partition=1), 1, "invalid_json", "not JSON", None)
    await asyncio.sleep(0)  # the letter's task starts
    assert [(x.error, x.source, x.destination, x.value) for x in letters.sent] == [
        ("invalid_json", f"{TOPIC}/1/4", None, b"{not json")
    ]
    assert intake.letters_in_flight() == 1
    assert tracker.committable(1) == 4
    letters.acknowledge()
    await intake.wait_until(lambda: intake.letters_in_flight() == 0)
    assert tracker.committable(1) == 6


async def test_wait_until_wakes_when_a_partition_is_forgotten(intake: Intake) -> None:
    intake.tracker.track(2, 0, 1)
    waiting = asyncio.create_task(intake.wait_until(lambda: intake.tracker.outstanding() == 0))
    await asyncio.sleep(0)
    assert not waiting.done()
    intake.forget([2])
    await waiting
    assert intake.tracker.partitions() == []


async def test_wait_until_wakes_on_notify(intake: Intake) -> None:
    ready = False
    waiting = asyncio.create_task(intake.wait_until(lambda: ready))
    await asyncio.sleep(0)
    intake.notify()
    await asyncio.sleep(0)
    assert not waiting.done()  # checked, still false
    ready = True
    intake.notify()
    await waiting


async def test_wait_until_is_bounded_by_the_callers_timeout(
    intake: Intake, letters: Letters
) -> None:
    intake.tracker.track(0, 0, 1)
    intake.dead_letter(record(0, b"[]"), 0, "schema", "not an event", None)
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0):
            await intake.wait_until(lambda: intake.tracker.outstanding() == 0)
    # the abandoned waiter is gone: the acknowledgement later does not touch it
    letters.acknowledge()
    await intake.wait_until(lambda: intake.letters_in_flight() == 0)
    assert intake.tracker.committable(0) == 1


async def test_close_cancels_dead_letters_and_keeps_their_holds(intake: Intake) -> None:
    intake.tracker.track(0, 0, 1)
    intake.dead_letter(record(0, b"[]"), 0, "schema", "not an event", None)
    await asyncio.sleep(0)
    assert intake.letters_in_flight() == 1
    intake.close()
    await intake.wait_until(lambda: intake.letters_in_flight() == 0)
    assert intake.tracker.committable(0) == 0  # not durable: read again after a restart


async def test_letter_bytes_follow_the_letters_back_to_zero(
    intake: Intake, letters: Letters
) -> None:
    from sys import getsizeof

    from consumer.intake import LETTER_BYTES

    for offset in (1, 2):
        intake.tracker.track(0, offset, 1)
    big = record(1, b"x" * 60_000)
    intake.dead_letter(big, 0, "schema", "too big", None)
    intake.dead_letter(record(2, None), 0, "empty", "empty", None)
    expected = 2 * LETTER_BYTES + 2 * getsizeof(b"p0") + getsizeof(big.value) + getsizeof(None)
    assert intake.letter_bytes() == expected
    letters.acknowledge()
    await intake.wait_until(lambda: intake.letters_in_flight() == 0)
    assert intake.letter_bytes() == 0
    # Cancelled before it ever ran (shutdown): counted out all the same.
    intake.tracker.track(0, 3, 1)
    intake.dead_letter(record(3, b"{"), 0, "invalid_json", "not JSON", None)
    intake.close()
    for _ in range(3):  # the task's cancellation, then its done callbacks
        await asyncio.sleep(0)
    assert intake.letters_in_flight() == 0
    assert intake.letter_bytes() == 0


async def test_letter_bytes_match_tracemalloc(intake: Intake) -> None:
    """LETTER_BYTES is what a waiting letter takes beside its record's key and value."""
    import gc
    import tracemalloc

    from consumer.intake import LETTER_BYTES

    n = 2000
    records = [record(1_000_000 + i, b"x" * 1000) for i in range(n)]
    for r in records:
        intake.tracker.track(0, r.offset, 1)
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for r in records:
            intake.dead_letter(r, 0, "invalid_json", "not JSON", None)
        await asyncio.sleep(0)  # every letter's task started and waits in the sink
        gc.collect()
        measured = (tracemalloc.get_traced_memory()[0] - before) / n
    finally:
        tracemalloc.stop()
        intake.close()
    assert 0.9 * LETTER_BYTES <= measured <= 1.05 * LETTER_BYTES, measured
