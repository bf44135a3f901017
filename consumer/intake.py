"""The input's holds and dead letters: what keeps an input offset from being committed.

Stage 1 of the membership state (`consumer.state`) decides every record of a fetched batch and
checkpoints it; only then does it `track` the records here, with one hold for a record that
must be dead-lettered (invalid, or without a usable address) and none otherwise (committable at
once: the state owes what it decided). `dead_letter` sends the letter and releases the hold
once the broker acknowledged it (guarantee 1, "nothing lost").

Who calls what: stage 1 tracks (through `tracker`) and calls `dead_letter`; the service calls
`forget` for partitions it no longer owns, `wait_until` to drain, `notify` when something a
waiter may wait on changed elsewhere (the buffers let go of desired states), and `close` at
shutdown.

Waiting is a future handed out, not a polling loop: `wait_until(condition)` checks its
condition again each time holds are released or forgotten, a dead letter is done, or `notify`
is called (bound the wait with ``asyncio.timeout``). Hazard: a condition must only become true
at one of those moments.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable
from sys import getsizeof
from typing import Any, Final

from aiokafka import ConsumerRecord

from consumer.deadletter import DeadLetter
from consumer.offsets import OffsetTracker

__all__ = ["LETTER_BYTES", "Intake"]

#: What a dead letter waiting for the broker takes beside its record's key and value: the
#: task, its coroutine frames, the `DeadLetter`, its source string. Measured with
#: tracemalloc (tests/test_intake.py, ``test_letter_bytes_match_tracemalloc``: 1,780 bytes on
#: CPython 3.11 with a sink that waits), not guessed. The dead-letter producer also copies a
#: letter into its batch while sending it; that is one batch per partition, bounded by the
#: producer, not per waiting letter.
LETTER_BYTES: Final = 1792


class Intake:
    """The input's holds and dead letters (see the module docstring).

    ``send_dead_letter`` must return only once the letter is durable (the broker acknowledged
    it): its record's hold is released then.
    """

    def __init__(
        self,
        *,
        tracker: OffsetTracker,
        send_dead_letter: Callable[[DeadLetter], Awaitable[None]],
    ) -> None:
        self._tracker = tracker
        self._send_dead_letter = send_dead_letter
        self._letters: dict[asyncio.Task[None], int] = {}  # letter in flight -> its bytes
        self._letter_bytes = 0
        self._waiters: list[tuple[Callable[[], bool], asyncio.Future[None]]] = []

    @property
    def tracker(self) -> OffsetTracker:
        """The offset tracker holding the input records' holds (stage 1 tracks records in it;
        dead letters and `forget` release them)."""
        return self._tracker

    # ---------------------------------------------------------------- holds

    def forget(self, partitions: Iterable[int]) -> None:
        """Drop the holds of partitions this process no longer owns; later releases of them
        are ignored (see `OffsetTracker.forget`)."""
        for partition in partitions:
            self._tracker.forget(partition)
        if self._waiters:
            self._notify()

    async def wait_until(self, condition: Callable[[], bool]) -> None:
        """Return once ``condition()`` is true. It is checked now, and then again each time
        holds are forgotten, a dead letter is done or `notify` is called (see the module
        docstring). Bound the wait with ``asyncio.timeout``."""
        if condition():
            return
        waiter = (condition, asyncio.get_running_loop().create_future())
        self._waiters.append(waiter)
        try:
            await waiter[1]
        finally:
            self._waiters.remove(waiter)

    def notify(self) -> None:
        """Check the waiters' conditions now (something they wait on changed elsewhere)."""
        if self._waiters:
            self._notify()

    def _notify(self) -> None:
        for condition, done in self._waiters:
            if not done.done() and condition():
                done.set_result(None)

    # ---------------------------------------------------------------- dead letters

    def letters_in_flight(self) -> int:
        """Dead letters sent and not acknowledged yet."""
        return len(self._letters)

    def letter_bytes(self) -> int:
        """Estimated bytes of the dead letters sent and not acknowledged yet (they keep their
        record's key and value): counted by backpressure with the buffers' bytes, so records
        waiting for a broker that does not take their letters are bounded by
        CMSYNC_MAX_PENDING_BYTES as well as by CMSYNC_MAX_PENDING."""
        return self._letter_bytes

    def close(self) -> None:
        """Cancel the dead letters still in flight (shutdown): their holds stay, so their
        offsets are not committed and the records are read again."""
        for task in list(self._letters):
            task.cancel()

    def dead_letter(
        self,
        record: ConsumerRecord[Any, Any],
        partition: int,
        code: str,
        detail: str,
        destination: str | None,
    ) -> None:
        """Send the record's dead letter; its hold (tracked by the caller) is released once
        the broker acknowledged it."""
        letter = DeadLetter(
            key=record.key,
            value=record.value,
            error=code,
            detail=detail,
            source=f"{record.topic}/{partition}/{record.offset}",
            destination=destination,
        )
        size = LETTER_BYTES + getsizeof(letter.key) + getsizeof(letter.value)
        self._letter_bytes += size
        task = asyncio.get_running_loop().create_task(
            self._send_letter(letter, partition, record.offset)
        )
        self._letters[task] = size
        # Also here: a task cancelled before it started never runs `_send_letter`'s finally.
        task.add_done_callback(self._letter_done)

    def _letter_done(self, task: asyncio.Task[None]) -> None:
        """A letter is no longer in flight: forget it and its bytes (once)."""
        self._letter_bytes -= self._letters.pop(task, 0)

    async def _send_letter(self, letter: DeadLetter, partition: int, offset: int) -> None:
        try:
            await self._send_dead_letter(letter)
            self._tracker.release(partition, offset)
        finally:
            # Here rather than in a done callback, so that a waiter on
            # `letters_in_flight() == 0` sees the count it waits for.
            task = asyncio.current_task()
            if task is not None:
                self._letter_done(task)
            if self._waiters:
                self._notify()
