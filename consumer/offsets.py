"""Per-partition tracker of pending Kafka offsets (pure: no I/O, no clock).

Guarantee 1 of the contract ("nothing lost") rests on this module. An event at offset ``o`` is
*pending* while it has unreleased holds: one hold per destination buffer entry that carries it
(or per dead-letter write, or whatever else must become durable first). The offset that may be
committed for a partition is

* the smallest offset that is still pending, or
* the highest offset seen + 1 when nothing is pending,

so a commit never moves past an event that is not durable yet, whatever order the holds are
released in (buffers flush in their own order; one partition feeds many destinations).

Compact, because a partition can have hundreds of thousands of offsets pending (up to
``CMSYNC_MAX_PENDING``): per partition, two parallel arrays hold every offset tracked since the
oldest pending one, in increasing order, and its unreleased holds (0 once durable): 12 bytes an
offset, no Python object per offset. Offsets that became durable are dropped from the front
lazily, so each offset is appended and dropped once. An offset is found by its distance from the
front, which is exact while the offsets run without gaps (every record is tracked, so only
compaction and transaction markers make gaps); otherwise by binary search. ``track``,
``outstanding`` and ``committable`` are O(1) amortised, ``release`` O(1) without gaps.
"""

from __future__ import annotations

from array import array
from bisect import bisect_left
from typing import Final

__all__ = ["OffsetTracker"]

#: Durable offsets kept at the front before the arrays are compacted (and at least half).
_COMPACT_AFTER: Final = 4096


class _Partition:
    __slots__ = ("counts", "head", "last", "offsets", "outstanding")

    def __init__(self) -> None:
        # offsets[i] (increasing) has counts[i] unreleased holds; entries before `head` are
        # durable and wait to be cut off. Empty when nothing is pending.
        self.offsets = array("q")
        self.counts = array("i")
        self.head = 0
        self.last = -1  # highest offset tracked
        self.outstanding = 0  # sum of self.counts

    def index(self, offset: int) -> int:
        """Where ``offset`` is in ``offsets`` (from ``head`` on), or -1."""
        offsets, head = self.offsets, self.head
        if head == len(offsets) or offset < offsets[head] or offset > self.last:
            return -1
        i = head + offset - offsets[head]  # exact when there is no gap before it
        if i < len(offsets) and offsets[i] == offset:
            return i
        i = bisect_left(offsets, offset, head)
        return i if i < len(offsets) and offsets[i] == offset else -1

    def drop_durable_front(self) -> None:
        offsets, counts = self.offsets, self.counts
        head, end = self.head, len(offsets)
        while head < end and not counts[head]:
            head += 1
        if head == end:  # nothing pending: start afresh
            del offsets[:], counts[:]
            head = 0
        elif head > _COMPACT_AFTER and head * 2 > end:
            del offsets[:head], counts[:head]
            head = 0
        self.head = head


class OffsetTracker:
    """Per-partition pending offsets. An offset is durable when all its holds are released.

    Contract:

    * ``track`` registers offsets in strictly increasing order per partition (Kafka hands them
      out that way); a non-increasing offset is a bug in the caller and raises ``ValueError``.
      Gaps are fine (compaction, transaction markers).
    * ``committable(p)`` never passes an offset with unreleased holds: it is the smallest
      pending offset, or the highest tracked offset + 1 when nothing is pending, or ``None``
      when nothing was tracked for ``p`` (since the last ``forget``).
    * ``release`` of an unknown partition or of an offset that is not pending is ignored: the
      partition may have been revoked (``forget``) while the hold was out. The flip side is
      that the caller must release each hold exactly once; a double release could release
      another holder's hold on the same offset and commit it early.
    * ``outstanding()`` (the backpressure signal) is O(1): a running count of unreleased holds.
    """

    __slots__ = ("_outstanding", "_parts")

    def __init__(self) -> None:
        self._parts: dict[int, _Partition] = {}
        self._outstanding = 0

    def track(self, partition: int, offset: int, holds: int) -> None:
        """Register ``offset`` of ``partition`` with ``holds`` unreleased holds (may be 0).

        Raises ``ValueError`` when ``offset`` is not above the highest offset tracked for the
        partition, or when ``holds`` is negative.
        """
        if holds < 0:
            raise ValueError(f"holds must be >= 0, got {holds}")
        part = self._parts.get(partition)
        if part is None:
            part = self._parts[partition] = _Partition()
        elif offset <= part.last:
            raise ValueError(
                f"offsets must increase per partition: partition {partition} got {offset} "
                f"after {part.last}"
            )
        part.last = offset
        if holds or part.head < len(part.offsets):  # kept while anything is pending: no gaps
            part.offsets.append(offset)
            part.counts.append(holds)
            part.outstanding += holds
            self._outstanding += holds

    def hold(self, partition: int, offset: int) -> None:
        """Add one hold to ``offset``, which must be tracked and still pending.

        Ignored for an unknown partition (revoked meanwhile, like ``release``). Raises
        ``ValueError`` for an offset of a known partition that is not pending: it may already
        have been committed, and holding it again could not un-commit it.
        """
        part = self._parts.get(partition)
        if part is None:
            return
        i = part.index(offset)
        if i < 0 or not part.counts[i]:
            raise ValueError(f"offset {offset} of partition {partition} is not pending")
        part.counts[i] += 1
        part.outstanding += 1
        self._outstanding += 1

    def release(self, partition: int, offset: int) -> None:
        """Release one hold of ``offset``; unknown partition or non-pending offset: ignored."""
        part = self._parts.get(partition)
        if part is None:
            return
        i = part.index(offset)
        if i < 0:
            return
        counts = part.counts
        count = counts[i]
        if not count:
            return
        counts[i] = count - 1
        part.outstanding -= 1
        self._outstanding -= 1
        if count == 1 and i == part.head:
            part.drop_durable_front()

    def committable(self, partition: int) -> int | None:
        """Offset to commit for ``partition`` (Kafka's "next offset to read" convention).

        The smallest pending offset, else the highest tracked offset + 1; ``None`` if nothing
        was tracked for the partition.
        """
        part = self._parts.get(partition)
        if part is None:
            return None
        part.drop_durable_front()
        return part.offsets[part.head] if part.head < len(part.offsets) else part.last + 1

    def outstanding(self) -> int:
        """Total unreleased holds over all partitions (O(1))."""
        return self._outstanding

    def outstanding_in(self, partition: int) -> int:
        """Unreleased holds of one partition (0 when unknown)."""
        part = self._parts.get(partition)
        return 0 if part is None else part.outstanding

    def forget(self, partition: int) -> None:
        """Partition revoked: drop its state; later releases for it are ignored."""
        part = self._parts.pop(partition, None)
        if part is not None:
            self._outstanding -= part.outstanding

    def partitions(self) -> list[int]:
        """Partitions with state (tracked since their last ``forget``)."""
        return list(self._parts)
