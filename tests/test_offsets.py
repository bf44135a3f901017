"""OffsetTracker: unit tests and a model-checked state machine."""

from __future__ import annotations

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from consumer import offsets as offsets_module
from consumer.offsets import OffsetTracker


def test_nothing_seen_is_none() -> None:
    tracker = OffsetTracker()
    assert tracker.committable(0) is None
    assert tracker.outstanding() == 0
    assert tracker.outstanding_in(0) == 0
    assert tracker.partitions() == []


def test_offset_without_holds_is_durable_at_once() -> None:
    tracker = OffsetTracker()
    tracker.track(3, 41, 0)
    assert tracker.committable(3) == 42
    assert tracker.partitions() == [3]


def test_committable_is_smallest_pending_whatever_the_release_order() -> None:
    tracker = OffsetTracker()
    for offset in (10, 11, 12, 15):  # gaps are fine (compaction, transaction markers)
        tracker.track(0, offset, 1)
    assert tracker.committable(0) == 10
    tracker.release(0, 12)
    tracker.release(0, 11)
    assert tracker.committable(0) == 10
    tracker.release(0, 10)
    assert tracker.committable(0) == 15
    tracker.release(0, 15)
    assert tracker.committable(0) == 16
    assert tracker.outstanding() == 0


def test_every_hold_must_be_released() -> None:
    tracker = OffsetTracker()
    tracker.track(0, 5, 2)
    tracker.hold(0, 5)
    assert tracker.outstanding() == 3
    tracker.release(0, 5)
    tracker.release(0, 5)
    assert tracker.committable(0) == 5
    tracker.release(0, 5)
    assert tracker.committable(0) == 6


def test_release_of_unknown_partition_or_offset_is_ignored() -> None:
    tracker = OffsetTracker()
    tracker.release(7, 1)
    tracker.track(0, 5, 1)
    tracker.release(0, 4)
    tracker.release(0, 6)
    assert tracker.committable(0) == 5
    assert tracker.outstanding() == 1
    tracker.release(0, 5)
    tracker.release(0, 5)  # already durable: ignored, nothing goes negative
    assert tracker.outstanding() == 0
    assert tracker.outstanding_in(0) == 0


def test_offsets_must_increase_per_partition() -> None:
    tracker = OffsetTracker()
    tracker.track(0, 5, 1)
    tracker.track(1, 2, 1)  # other partitions are independent
    with pytest.raises(ValueError, match="increase"):
        tracker.track(0, 5, 0)
    with pytest.raises(ValueError, match="increase"):
        tracker.track(0, 4, 1)
    with pytest.raises(ValueError, match="holds"):
        tracker.track(0, 6, -1)
    assert tracker.committable(0) == 5


def test_hold_needs_a_pending_offset() -> None:
    tracker = OffsetTracker()
    tracker.hold(9, 1)  # unknown (revoked) partition: ignored
    assert tracker.outstanding() == 0
    tracker.track(0, 1, 0)
    with pytest.raises(ValueError, match="not pending"):
        tracker.hold(0, 1)  # durable already: may have been committed
    with pytest.raises(ValueError, match="not pending"):
        tracker.hold(0, 2)  # never tracked
    assert tracker.committable(0) == 2


def test_forget_drops_partition_state_and_its_holds() -> None:
    tracker = OffsetTracker()
    tracker.track(0, 1, 2)
    tracker.track(1, 1, 3)
    assert tracker.outstanding() == 5
    assert tracker.outstanding_in(1) == 3
    tracker.forget(1)
    tracker.forget(8)  # unknown: fine
    assert tracker.outstanding() == 2
    assert tracker.partitions() == [0]
    assert tracker.committable(1) is None
    tracker.release(1, 1)  # a hold that was out during the revocation
    assert tracker.outstanding() == 2
    tracker.track(1, 0, 0)  # re-assigned later: starts afresh, even below the old offsets
    assert tracker.committable(1) == 1


def test_released_front_does_not_accumulate() -> None:
    tracker = OffsetTracker()
    for offset in range(10_000):
        tracker.track(0, offset, 1)
        tracker.release(0, offset)
    # Dropped as the front is released, even if nobody asks for the committable offset: the
    # pending arrays do not grow with offsets that are durable already.
    assert len(tracker._parts[0].offsets) == 0
    assert tracker.committable(0) == 10_000


def test_a_long_pending_run_is_compacted_and_found_across_gaps() -> None:
    tracker = OffsetTracker()
    tracker.track(0, 0, 1)  # held for the whole test: everything after it stays in the arrays
    offsets = [o for o in range(1, 40_000) if o % 997]  # gaps, as compaction leaves them
    for offset in offsets:
        tracker.track(0, offset, 2)
    *released, kept = offsets
    for offset in released[::2]:
        tracker.release(0, offset)
        tracker.release(0, offset)
    tracker.release(0, 0)
    assert tracker.committable(0) == offsets[1]
    for offset in released[1::2]:
        tracker.release(0, offset)
        tracker.release(0, offset)
    # One offset is pending at the end: the durable front was cut off, not kept (at most
    # _COMPACT_AFTER durable offsets wait before the arrays are compacted).
    assert len(tracker._parts[0].offsets) <= offsets_module._COMPACT_AFTER + 1
    assert tracker.committable(0) == kept
    assert tracker.outstanding() == 2
    tracker.release(0, 998)  # not pending any more: ignored
    assert tracker.outstanding() == 2
    with pytest.raises(ValueError, match="not pending"):
        tracker.hold(0, 997)  # a gap: never tracked
    tracker.hold(0, kept)
    assert tracker.outstanding_in(0) == 3


class TrackerMachine(RuleBasedStateMachine):
    """Random track/hold/release/forget against a brute-force model."""

    def __init__(self) -> None:
        super().__init__()
        self.tracker = OffsetTracker()
        self.holds: dict[int, dict[int, int]] = {}  # partition -> offset -> unreleased holds
        self.last: dict[int, int] = {}

    @rule(partition=st.integers(0, 2), gap=st.integers(1, 3), holds=st.integers(0, 3))
    def track(self, partition: int, gap: int, holds: int) -> None:
        offset = self.last.get(partition, -1) + gap
        self.tracker.track(partition, offset, holds)
        self.last[partition] = offset
        self.holds.setdefault(partition, {})[offset] = holds

    def _pending(self) -> list[tuple[int, int]]:
        return sorted((p, o) for p, offs in self.holds.items() for o, h in offs.items() if h)

    @precondition(lambda self: self._pending())
    @rule(data=st.data())
    def hold(self, data: st.DataObject) -> None:
        partition, offset = data.draw(st.sampled_from(self._pending()))
        self.tracker.hold(partition, offset)
        self.holds[partition][offset] += 1

    @precondition(lambda self: self._pending())
    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        partition, offset = data.draw(st.sampled_from(self._pending()))
        self.tracker.release(partition, offset)
        self.holds[partition][offset] -= 1

    @rule(partition=st.integers(0, 3), offset=st.integers(-1, 40))
    def release_stray(self, partition: int, offset: int) -> None:
        if self.holds.get(partition, {}).get(offset):
            return  # a real hold: covered by `release`
        self.tracker.release(partition, offset)

    @rule(partition=st.integers(0, 2))
    def forget(self, partition: int) -> None:
        self.tracker.forget(partition)
        self.holds.pop(partition, None)
        self.last.pop(partition, None)

    @invariant()
    def matches_model(self) -> None:
        for partition in range(4):
            offsets = self.holds.get(partition)
            if offsets is None:
                assert self.tracker.committable(partition) is None
                continue
            pending = [o for o, h in offsets.items() if h]
            expected = min(pending) if pending else self.last[partition] + 1
            committable = self.tracker.committable(partition)
            assert committable == expected
            assert all(committable <= o for o in pending)  # never passes an unreleased offset
            assert self.tracker.outstanding_in(partition) == sum(offsets.values())
        assert self.tracker.outstanding() == sum(sum(o.values()) for o in self.holds.values())
        assert sorted(self.tracker.partitions()) == sorted(self.holds)


TestTrackerMachine = TrackerMachine.TestCase
TestTrackerMachine.settings = settings(max_examples=100, stateful_step_count=40, deadline=None)
