"""Per-destination coalescing buffer and flush policy (pure: no I/O, time passed in as ``now``).

Guarantee 2 of the contract ("net effect, in event time") lives here.

Coalescing, per (destination, normalised address) = per key of one ``DestinationBuffer``:

* Only the latest change is kept: a later ``occurred_at_ms`` wins; on equal ``occurred_at_ms``
  the later ``seq`` (arrival order, i.e. the later offset) wins (``REPLACED``). An older change
  is absorbed (``MERGED_OLDER``); a redelivery of the buffered change (same ``event_id`` and,
  as a redelivery has, same ``occurred_at_ms``) is a ``DUPLICATE``. Either way its position
  joins the entry's ``holds``: every position merged into an entry stays pending until that
  entry completes, so an offset is never committed before the change that superseded it is
  durable. Enter-then-exit in one window is thus one removal, exit-then-enter one add, a
  duplicate counts once.
* ``LATE``: a change for a key with nothing buffered or in flight that is older than the change
  last applied for it (``AppliedMemory``), or has the same ``occurred_at_ms`` and the same
  direction (a replayed repeat), is not buffered; its position is handed back for immediate
  release. Entries are checked again at ``take``: something newer may have been applied while
  they waited behind an in-flight entry. (A late change for a key that *is* buffered is simply
  older than the buffered one: ``MERGED_OLDER``.)
* A key that is in flight (taken, not completed) is never taken again before it completes, so
  requests per address are never concurrent nor reordered. A newer change offered for it waits
  as a new entry (taken after completion); an older one or a duplicate joins the in-flight
  entry's holds (it is superseded whatever the outcome of the flight).

Flush policy (what keeps requests few without letting a change wait longer than the interval):

* Adds travel in import requests of up to ``max_adds`` rows, so an import is sent when a full
  batch is ready, or when the oldest ready add has waited ``flush_interval_s``; it then carries
  up to ``max_adds`` ready adds, oldest first, young ones included (they ride on a request that
  is being sent anyway). A partial import is never sent early.
* Removals are one request each, so sending one early saves nothing and forfeits coalescing
  (exit-then-enter is one add, not a removal plus an add). A removal is taken only once it has
  waited ``flush_interval_s``; up to ``max_removals`` per batch, oldest first.
* ``force=True`` (shutdown, revocation) takes everything ready, up to both caps, whatever its age.

"Ready" means buffered and not blocked behind an in-flight entry of the same key. ``first_seen``
is the time the key entered the buffer and survives replacements, so a key whose change keeps
being replaced still goes out within the interval (no starvation).

Memory (guarantee 4, CMSYNC_MAX_PENDING_BYTES): ``pending_bytes`` estimates what the buffered
and in-flight entries take, kept incrementally (added on offer and merge, subtracted on
complete, late drop and discard; never recomputed by a scan). An entry weighs `ENTRY_BYTES`
(the buffer's own objects), plus its change's ``size`` (the key and payload, as the caller
estimates them), plus `HOLD_BYTES` for each position merged into it beyond the first.

Cost: ``offer`` is O(1): a dict lookup and a list append when merging; a new entry also pushes
one heap item, and so does the first change of kind of an entry (an entry has at most one item
per heap). Per kind (adds, removals) a heap ordered by ``first_seen`` finds the oldest ready
entry; items of entries that were taken or changed kind are discarded lazily when they reach the
top, so ``due``/``next_due`` are O(1) amortised and ``take`` is O(k log n).
"""

from __future__ import annotations

import enum
import itertools
import math
from array import array
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from heapq import heappop, heappush
from typing import Final

__all__ = [
    "ENTRY_BYTES",
    "HOLD_BYTES",
    "AppliedMemory",
    "Batch",
    "Change",
    "DestinationBuffer",
    "Entry",
    "Offered",
    "Position",
    "partition_offset",
    "position",
]

#: Where a change came from, packed into one int: ``offset << 32 | partition`` (Kafka's
#: partition numbers are 32-bit). One int per pending change instead of a tuple and its offset:
#: 56 bytes fewer. The buffer only keeps and hands back positions; `position` and
#: `partition_offset` pack and unpack them.
Position = int
_PARTITION_BITS: Final = 32
_PARTITION_MASK: Final = (1 << _PARTITION_BITS) - 1


def position(partition: int, offset: int) -> Position:
    """The position of ``offset`` in ``partition``."""
    return offset << _PARTITION_BITS | partition


def partition_offset(position: Position) -> tuple[int, int]:
    """(partition, offset) of a position."""
    return position & _PARTITION_MASK, position >> _PARTITION_BITS


#: What the buffer's own objects take per entry, beyond the change's ``size``: the `Entry`, the
#: `Change`, its position, the entry's slot in ``_buffered`` (or ``_in_flight``) and its heap
#: item (with the dict's and the heap's growth, amortised). Measured with tracemalloc
#: (tests/test_buffer.py, ``test_entry_bytes_match_tracemalloc``: 417 bytes on CPython 3.11),
#: not guessed.
ENTRY_BYTES: Final = 352
#: A position merged into an entry beyond its first: the first one costs 104 bytes (the list
#: of two that replaces the lone int, and the int), later ones about 45 (a slot and the int,
#: with the list's growth). Counted at the first one's cost: an estimate on the high side.
HOLD_BYTES: Final = 104


@dataclass(slots=True)
class Change:
    """One destination's view of one event. ``key`` and ``payload`` stay out of ``repr``:
    they carry the address and profile (no personal data in logs)."""

    key: str = field(repr=False)  # normalised address (the coalescing key)
    entered: bool
    occurred_at_ms: int
    # Order of arrival: on equal occurred_at_ms the higher seq wins. The service passes the
    # position (offset-major), so ties go to the later offset, as the contract says, and a
    # record read again after a rebalance keeps its place.
    seq: int
    # The event's id, only ever compared for equality (duplicates). The service keeps
    # hash(event_id): an int of 32 bytes instead of a UUID string of 85, for every pending
    # change. Two events of one address with the same occurred_at and colliding 64-bit hashes
    # would count as one duplicate: about 1 in 10^19.
    event_id: str | int
    payload: object = field(repr=False)  # what the flusher sends (opaque to the buffer)
    position: Position
    #: Bytes the key and the payload take in memory, estimated by whoever makes the change
    #: (`consumer.rows.payload_bytes`); the buffer only adds it up (`pending_bytes`).
    size: int = 0


class Entry:
    """The buffered state of one key: its latest change and every position merged into it.

    ``change``: the latest change; ``holds``: every position merged into this entry, released
    when it completes (read it, do not modify it); ``first_seen``: ``now`` when the key entered
    the buffer (age for the flush policy).

    Kept small for the cyclic garbage collector, which traverses every container a buffer keeps
    alive again and again as the heap turns over (at intake speed that was half of the time
    spent per event, see ``bench/intake.py``): the one position of an entry that has one (the
    common case) is kept as that tuple, which the collector stops tracking, and a list is made
    only when a second position merges in; the heaps refer to entries by key, not by reference.
    """

    __slots__ = ("_holds", "_tick0", "_tick1", "change", "first_seen")

    def __init__(self, change: Change, holds: list[Position] | Position, first_seen: float) -> None:
        self.change = change
        self._holds: list[Position] | Position = (
            holds if not isinstance(holds, list) else holds[0] if len(holds) == 1 else list(holds)
        )
        self.first_seen = first_seen
        # Bookkeeping of DestinationBuffer, per kind ([0] removals, [1] adds): the tick of this
        # entry's item in that kind's heap, 0 when it has none. Not part of the interface.
        self._tick0 = 0
        self._tick1 = 0

    @property
    def holds(self) -> list[Position]:
        holds = self._holds
        return holds if isinstance(holds, list) else [holds]

    def _weight(self) -> int:
        """What this entry counts for in ``DestinationBuffer.pending_bytes``."""
        holds = self._holds
        extra = len(holds) - 1 if isinstance(holds, list) else 0
        return ENTRY_BYTES + self.change.size + HOLD_BYTES * extra

    def _hold(self, position: Position) -> None:
        holds = self._holds
        if not isinstance(holds, list):
            self._holds = [holds, position]
        else:
            holds.append(position)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Entry):
            return NotImplemented
        return (self.change, self.holds, self.first_seen) == (
            other.change,
            other.holds,
            other.first_seen,
        )

    __hash__ = None  # type: ignore[assignment]  # mutable, compared by value: unhashable

    def __repr__(self) -> str:
        return (
            f"Entry(change={self.change!r}, holds={self.holds!r}, first_seen={self.first_seen!r})"
        )


class AppliedMemory:
    """Bounded memory: (destination, key) -> (occurred_at_ms, entered) of the last applied change.

    Compact: an entry is keyed by Python's 64-bit ``hash((destination, key))`` (no strings are
    kept; every hash value, 0 included, is a key like any other) and its value is one int,
    ``occurred_at_ms * 2 + entered``, stored in 64 bits: ``|occurred_at_ms| < 2**62`` (RFC 3339
    years 0001–9999 are within ±2.6e14; a larger value raises ``OverflowError`` and is not
    remembered). The hash of str is salted per process, which is fine because the memory does not
    survive a restart anyway. Collision caveat: for one destination the tuple hash collides
    exactly when the SipHash of the two addresses does, probability 2^-64 ≈ 5e-20 per pair,
    ≈ 5e-14 per lookup against a full memory of 1,000,000 entries. A collision could make a
    change for one address look late because of another address's newer change, i.e. wrongly
    drop it.

    ``remember`` never moves an entry back in event time (an older ``occurred_at_ms`` keeps the
    newer one; an equal one takes the new direction). Capacity 0 disables the memory (nothing
    is remembered, so nothing is late).

    Eviction is CLOCK (second chance), i.e. approximately least recently used, not exactly.
    The entries form a ring, in the order they were first remembered, and each has a reference
    bit, set when the entry is touched: a ``get`` hit or a ``remember`` of a remembered pair. A
    new entry starts with its bit clear. While the memory is full, a new pair replaces the
    entry under the hand if its bit is clear; otherwise the hand clears the bit (the entry's
    second chance) and moves on to the next, round the ring as far as needed (if every bit is
    set, it comes back to where it started). The new entry takes the replaced one's place in
    the ring and the hand stops just after it, so it is the last entry the hand reaches. Hence:
    an entry touched since the hand last passed it survives the hand's next pass; untouched
    entries leave in ring order, so without touches eviction is first in, first out; and
    unlike LRU a touch does not move an entry, it only earns it one more turn of the hand.

    Layout: flat arrays, no Python object per entry (nothing for the garbage collector to
    traverse), all allocated up front, so the size does not grow with use and no rehash ever
    stalls the event loop.

    * The ring: ``_keys`` and ``_vals`` (``array('q')``) and ``_ref`` (``bytearray``), one slot
      per entry, ``capacity`` slots, filled in order until the memory is full; ``_hand``.
    * ``_index``: open addressing with linear probing from ``hashed & _mask``, hash -> ring
      slot, -1 where empty; a power of two of 4-byte slots, at least 2 * capacity (load
      <= 0.5: at most 1.5 probes on average for a hit, 2.5 for a miss). An evicted entry
      leaves the index by backward-shift deletion (no tombstones), so probe lengths depend
      only on the load, however long the process runs.

    Size: 17 bytes per entry for the ring plus 8 to 16 for the index: 24 MiB at 1,000,000.
    Cost: ``get`` O(1) expected; ``remember`` O(1) amortised: the hand searches with
    ``bytearray.find`` and clears bits by slice assignment, in C, and each bit it clears was
    set by one touch.
    """

    __slots__ = ("_capacity", "_hand", "_index", "_keys", "_len", "_mask", "_ref", "_vals")

    def __init__(self, capacity: int) -> None:
        if capacity < 0:
            raise ValueError("capacity must be >= 0")
        self._capacity = capacity
        size = 8
        while size < 2 * capacity:  # load <= 0.5
            size *= 2
        self._mask = size - 1
        # Array repetition allocates in C, without a temporary of the full size.
        self._index = array("i" if capacity < 2**31 else "q", [-1]) * size
        self._keys = array("q", [0]) * capacity
        self._vals = array("q", [0]) * capacity
        self._ref = bytearray(capacity)
        self._len = 0  # ring slots in use: [0, _len)
        self._hand = 0

    @property
    def capacity(self) -> int:
        return self._capacity

    def get(self, destination: str, key: str) -> tuple[int, bool] | None:
        """(occurred_at_ms, entered) last applied for the pair, or None if not remembered."""
        packed = self._get_packed(hash((destination, key)))
        return None if packed is None else (packed >> 1, bool(packed & 1))

    def remember(self, destination: str, key: str, occurred_at_ms: int, entered: bool) -> None:
        """Record an applied change (no-op when disabled; never regresses in event time)."""
        self._remember_packed(hash((destination, key)), occurred_at_ms * 2 + entered)

    def is_late(self, destination: str, key: str, occurred_at_ms: int, entered: bool) -> bool:
        """True when the change last applied for the pair makes this one late: it is newer,
        or it has the same ``occurred_at_ms`` and the same direction (a replayed repeat).
        A hit touches the entry, as ``get`` does. Always False when disabled.

        On the intake's hot path (``DestinationBuffer.offer``): one hash, one probe.
        """
        packed = self._get_packed(hash((destination, key)))
        if packed is None:
            return False
        applied_at = packed >> 1
        return occurred_at_ms < applied_at or (
            occurred_at_ms == applied_at and entered == (packed & 1)
        )

    def __len__(self) -> int:
        return self._len

    def _probe(self, hashed: int) -> int:
        """The index position of ``hashed``'s entry, or of the hole that ends its probe run."""
        index = self._index
        keys = self._keys
        mask = self._mask
        i = hashed & mask
        while True:
            slot = index[i]
            if slot < 0 or keys[slot] == hashed:
                return i
            i = (i + 1) & mask

    def _get_packed(self, hashed: int) -> int | None:
        """The packed value remembered for ``hashed`` (touching it), or None."""
        slot = self._index[self._probe(hashed)]
        if slot < 0:
            return None
        self._ref[slot] = 1
        return self._vals[slot]

    def _remember_packed(self, hashed: int, packed: int) -> None:
        """``remember``, given ``hash((destination, key))`` and the packed value."""
        if not self._capacity:
            return
        index = self._index
        keys = self._keys
        mask = self._mask
        i = self._probe(hashed)
        slot = index[i]
        if slot >= 0:
            if (self._vals[slot] >> 1) <= (packed >> 1):
                self._vals[slot] = packed
            self._ref[slot] = 1
            return
        # A new pair, and index[i] ends its probe sequence. `_vals` first: if `packed` does
        # not fit in 64 bits, this raises before the pair is half-remembered.
        slot = self._len
        if slot < self._capacity:
            self._vals[slot] = packed
            self._len = slot + 1
        else:
            # CLOCK: the hand moves to the first slot from it whose bit is clear, clearing
            # the bits it passes.
            ref = self._ref
            hand = self._hand
            slot = ref.find(0, hand)
            if slot < 0:  # every bit from the hand to the end is set: clear them, wrap round
                ref[hand:] = bytes(len(ref) - hand)
                hand = 0
                slot = ref.find(0)  # found: at the old hand at the latest
            if slot > hand:
                ref[hand:slot] = bytes(slot - hand)
            self._vals[slot] = packed
            self._unindex(slot)  # may shift index entries into the probe sequence: probe again
            i = hashed & mask
            while index[i] >= 0:
                i = (i + 1) & mask
            self._hand = slot + 1 if slot + 1 < self._capacity else 0
        keys[slot] = hashed
        self._ref[slot] = 0
        index[i] = slot

    def _unindex(self, slot: int) -> None:
        """Remove ring ``slot``'s entry from the index, by backward-shift deletion: each later
        entry of the probe run that may move into the hole does, leaving a hole behind it."""
        index = self._index
        keys = self._keys
        mask = self._mask
        hole = keys[slot] & mask
        while index[hole] != slot:
            hole = (hole + 1) & mask
        j = hole
        while True:
            j = (j + 1) & mask
            moved = index[j]
            if moved < 0:
                break
            # It may fill the hole if the hole lies between its home and j (cyclically).
            if (j - (keys[moved] & mask)) & mask >= (j - hole) & mask:
                index[hole] = moved
                hole = j
        index[hole] = -1


class Offered(enum.Enum):
    """What ``DestinationBuffer.offer`` did with a change (values double as metric labels)."""

    NEW = "new"  # a new entry (possibly waiting behind an in-flight one of the same key)
    REPLACED = "replaced"  # newer than the buffered change: replaced it
    MERGED_OLDER = "merged_older"  # older than the buffered (or in-flight) change: absorbed
    DUPLICATE = "duplicate"  # same event_id as the buffered (or in-flight) change
    LATE = "late"  # not newer than what was last applied: dropped, release its position now


# Enum member lookups cost ~4x a global's; offer() is on the hot path.
_NEW, _REPLACED, _MERGED_OLDER = Offered.NEW, Offered.REPLACED, Offered.MERGED_OLDER
_DUPLICATE, _LATE = Offered.DUPLICATE, Offered.LATE


@dataclass(frozen=True, slots=True)
class Batch:
    """What one ``take`` hands to the flusher.

    ``adds`` and ``removals`` are now in flight and must each be completed (``complete``) or
    given back (``requeue``). ``late`` entries were dropped at take time because a newer change
    was applied meanwhile: they are no longer buffered, release their holds (``released()``)
    and send nothing for them. Either list may be empty (a batch can consist of late drops
    only; never send an empty import).
    """

    adds: list[Entry]  # <= max_adds, oldest first
    removals: list[Entry]  # <= max_removals, oldest first
    late: list[Entry] = field(default_factory=list)

    def released(self) -> list[Position]:
        """Positions of the ``late`` entries, to release right away."""
        return [position for entry in self.late for position in entry.holds]


class DestinationBuffer:
    """Coalescing buffer of one destination; see the module docstring for the semantics.

    ``now`` values passed in must not decrease (a monotonic clock).
    """

    __slots__ = (
        "_applied",
        "_buffered",
        "_bytes",
        "_destination",
        "_flush_interval_s",
        "_heaps",
        "_in_flight",
        "_max_adds",
        "_max_removals",
        "_ready",
        "_remember",
        "_tick",
    )

    def __init__(
        self,
        destination: str,
        applied: AppliedMemory,
        *,
        flush_interval_s: float,
        max_adds: int = 1000,
        max_removals: int = 100,
    ) -> None:
        if not flush_interval_s >= 0:
            raise ValueError("flush_interval_s must be >= 0")
        if max_adds < 1 or max_removals < 1:
            raise ValueError("max_adds and max_removals must be >= 1")
        self._destination = destination
        self._applied = applied
        self._remember = applied.capacity > 0
        self._flush_interval_s = float(flush_interval_s)
        self._max_adds = max_adds
        self._max_removals = max_removals
        # key -> entry, buffered (not in flight). The entry of a key that is also in flight is
        # "blocked": it is in no heap and not counted as ready until the flight completes.
        self._buffered: dict[str, Entry] = {}
        self._in_flight: dict[str, Entry] = {}
        # Index by `entered`: [0] removals, [1] adds. Items (first_seen, tick, key), valid while
        # the key's buffered entry is of that kind and carries that tick (see _top); stale items
        # are discarded when they reach the top.
        self._heaps: tuple[list[tuple[float, int, str]], list[tuple[float, int, str]]] = ([], [])
        self._ready = [0, 0]  # ready entries per kind, same indexing
        self._tick = itertools.count(1)
        self._bytes = 0  # sum of the buffered and in-flight entries' `_weight`

    @property
    def destination(self) -> str:
        return self._destination

    @property
    def flush_interval_s(self) -> float:
        return self._flush_interval_s

    @property
    def max_adds(self) -> int:
        return self._max_adds

    @property
    def max_removals(self) -> int:
        return self._max_removals

    def offer(self, change: Change, now: float) -> tuple[Offered, list[Position]]:
        """Buffer a change; returns what happened and the positions to release right away
        (only for ``LATE``: the change's own position). Every other outcome keeps the position
        among the holds of an entry, released by ``complete`` (or by a late drop at take).

        Order of the checks: the buffered entry of the key, else its in-flight entry, else
        ``AppliedMemory``. A change that is compared with a buffered or in-flight entry is not
        compared with the memory at offer (that entry is newer than the memory, or is checked
        at take), which also keeps the hot path free of a second lookup.
        """
        key = change.key
        entry = self._buffered.get(key)
        if entry is not None:
            entry._hold(change.position)
            self._bytes += HOLD_BYTES
            current = entry.change
            # A duplicate (redelivery) carries the same occurred_at: compare times first, so
            # the common case does not touch the event ids (fewer cache misses).
            at = change.occurred_at_ms
            current_at = current.occurred_at_ms
            if at <= current_at:
                if at < current_at:
                    return _MERGED_OLDER, []
                if change.event_id == current.event_id:
                    return _DUPLICATE, []
                if change.seq <= current.seq:
                    return _MERGED_OLDER, []
            entry.change = change
            self._bytes += change.size - current.size
            if change.entered != current.entered and key not in self._in_flight:
                # A ready entry changes kind. Its item in the old kind's heap goes stale (it is
                # discarded lazily, or becomes valid again if the entry flips back); it needs
                # an item in the new kind's heap, with its original first_seen, unless one
                # from an earlier flip is still there: a key that keeps toggling allocates
                # nothing after its first flip.
                ready = self._ready
                ready[current.entered] -= 1
                ready[change.entered] += 1
                if not (entry._tick1 if change.entered else entry._tick0):
                    self._push(entry, change.entered, entry.first_seen, key)
            return _REPLACED, []
        flying = self._in_flight.get(key)
        if flying is not None:
            current = flying.change
            at = change.occurred_at_ms
            current_at = current.occurred_at_ms
            if at <= current_at:
                if at == current_at and change.event_id == current.event_id:
                    flying._hold(change.position)
                    self._bytes += HOLD_BYTES
                    return _DUPLICATE, []
                if at < current_at or change.seq <= current.seq:
                    flying._hold(change.position)
                    self._bytes += HOLD_BYTES
                    return _MERGED_OLDER, []
            # Newer than the flight: waits as a new entry, checked against the memory at take.
            self._buffered[key] = Entry(change, change.position, now)
            self._bytes += ENTRY_BYTES + change.size
            return _NEW, []
        if self._remember and self._applied.is_late(
            self._destination, key, change.occurred_at_ms, change.entered
        ):
            return _LATE, [change.position]
        entry = Entry(change, change.position, now)
        self._buffered[key] = entry
        self._bytes += ENTRY_BYTES + change.size
        self._ready[change.entered] += 1
        self._push(entry, change.entered, now, key)  # a new entry has no heap item yet
        return _NEW, []

    def pending(self) -> int:
        """Entries buffered, not in flight (including those waiting behind an in-flight key)."""
        return len(self._buffered)

    def in_flight(self) -> int:
        """Entries taken and not completed yet."""
        return len(self._in_flight)

    def pending_bytes(self) -> int:
        """Estimated bytes of the entries buffered and in flight (see the module docstring):
        0 exactly when the buffer is drained."""
        return self._bytes

    def ready_counts(self) -> tuple[int, int]:
        """(adds, removals) buffered and ready to be taken (not blocked by an in-flight key)."""
        return self._ready[1], self._ready[0]

    def full_import_ready(self) -> bool:
        """A full import (``max_adds`` ready adds) waits: it is due now, whatever its age, so
        whoever offers changes should wake the flusher instead of letting it sleep until the
        flush interval."""
        return self._ready[1] >= self._max_adds

    def due(self, now: float) -> bool:
        """True when ``take(now)`` would take something: a full import of ready adds, or an
        add or a removal that has waited ``flush_interval_s``."""
        return self._adds_due(now) or self._aged(self._top(False), now)

    def next_due(self, now: float, *, adds: bool = True, removals: bool = True) -> float | None:
        """Seconds until ``due`` (0.0 if due now); None when nothing is ready (empty, or every
        buffered key is in flight: ask again after ``complete``). ``adds``/``removals`` as for
        ``take``: only the kinds asked about count."""
        if adds and self.full_import_ready():
            return 0.0
        deadline = math.inf
        for kind in (True,) * adds + (False,) * removals:
            entry = self._top(kind)
            if entry is not None:
                deadline = min(deadline, entry.first_seen + self._flush_interval_s)
        if deadline == math.inf:
            return None
        return max(0.0, deadline - now)

    def take(
        self, now: float, *, force: bool = False, adds: bool = True, removals: bool = True
    ) -> Batch | None:
        """If due (or ``force``): move up to ``max_adds`` adds and ``max_removals`` removals into
        flight (see the flush policy), dropping entries that became late. None if nothing was
        taken. Keys in flight are never taken (their newer entries wait). ``adds=False`` or
        ``removals=False`` leaves that kind alone (a caller with no room for it in flight)."""
        adds_due = adds and (force or self._adds_due(now))
        removals_due = removals and (force or self._aged(self._top(False), now))
        if not (adds_due or removals_due):
            return None
        taken_adds: list[Entry] = []
        taken_removals: list[Entry] = []
        late: list[Entry] = []
        if adds_due:
            self._take_kind(True, self._max_adds, math.inf, taken_adds, late)
        if removals_due:
            until = math.inf if force else now
            self._take_kind(False, self._max_removals, until, taken_removals, late)
        if not (taken_adds or taken_removals or late):
            return None
        return Batch(taken_adds, taken_removals, late)

    def complete(self, entries: Iterable[Entry], *, applied: bool) -> list[Position]:
        """In-flight entries are done; returns every position they hold, to release.

        ``applied=True`` records them in ``AppliedMemory``. Entries that are not in flight
        (completed already, requeued, late drops) are ignored, so a position is never released
        twice. A newer entry waiting behind a completed key becomes ready.
        """
        released: list[Position] = []
        in_flight = self._in_flight
        for entry in entries:
            change = entry.change
            key = change.key
            if in_flight.get(key) is not entry:
                continue
            del in_flight[key]
            self._bytes -= entry._weight()
            if applied:
                self._applied.remember(
                    self._destination, key, change.occurred_at_ms, change.entered
                )
            released.extend(entry.holds)
            waiting = self._buffered.get(key)
            if waiting is not None:
                self._make_ready(waiting)
        return released

    def requeue(self, entries: Iterable[Entry]) -> None:
        """Give in-flight entries back unapplied (e.g. the destination is stalled); they become
        ready again with their original ``first_seen``. If a newer change for the key arrived
        meanwhile, it absorbs the requeued entry's holds. Entries not in flight are ignored."""
        in_flight = self._in_flight
        for entry in entries:
            key = entry.change.key
            if in_flight.get(key) is not entry:
                continue
            del in_flight[key]
            waiting = self._buffered.get(key)
            if waiting is None:
                self._buffered[key] = entry
                self._make_ready(entry)
            else:  # newer by construction (it was not merged into the in-flight entry)
                self._bytes -= entry._weight()
                for position in entry.holds:
                    waiting._hold(position)
                    self._bytes += HOLD_BYTES
                waiting.first_seen = min(waiting.first_seen, entry.first_seen)
                self._make_ready(waiting)

    def discard(self, doomed: Callable[[Entry], bool]) -> list[Position]:
        """Drop the buffered entries (not those in flight) for which ``doomed(entry)`` is true;
        returns the positions they held. For a partition handed to another owner: what was
        only buffered here is the new owner's to send (it is owed in the durable state)."""
        released: list[Position] = []
        buffered, in_flight, ready = self._buffered, self._in_flight, self._ready
        for key, entry in list(buffered.items()):
            if doomed(entry):
                del buffered[key]
                self._bytes -= entry._weight()
                if key not in in_flight:  # a blocked entry was not counted as ready
                    ready[entry.change.entered] -= 1
                released.extend(entry.holds)
        return released  # their heap items are stale now and discarded by `_top`

    def abandon(self) -> list[Position]:
        """Drop everything, in flight included (the destination was removed: nothing more is
        written to its list, and its flusher was stopped); returns every position held."""
        released = self.discard(lambda _: True)
        for entry in self._in_flight.values():
            released.extend(entry.holds)
        self._in_flight.clear()
        self._bytes = 0
        return released

    def drained(self) -> bool:
        """Nothing buffered, nothing in flight."""
        return not self._buffered and not self._in_flight

    # -- internals ------------------------------------------------------------------------

    def _make_ready(self, entry: Entry) -> None:
        """Count a (newly) ready entry and make sure its kind's heap has an item for it."""
        kind = entry.change.entered
        self._ready[kind] += 1
        if not (entry._tick1 if kind else entry._tick0):
            self._push(entry, kind, entry.first_seen, entry.change.key)

    def _push(self, entry: Entry, kind: bool, first_seen: float, key: str) -> None:
        """Give ``entry`` (of ``kind``, ``first_seen`` and ``key``: passed in, not read from it,
        because ``offer`` has them at hand on the hot path) a new item in its kind's heap."""
        tick = next(self._tick)
        if kind:
            entry._tick1 = tick
        else:
            entry._tick0 = tick
        heappush(self._heaps[kind], (first_seen, tick, key))

    def _top(self, kind: bool) -> Entry | None:
        """Oldest ready entry of a kind; discards stale heap items on the way.

        An item is valid while the buffered entry of its key carries the item's tick for the
        heap's kind and is of that kind. Ticks are unique and an entry loses its ticks when it
        is taken, so items of entries that were taken, completed or replaced never match; an
        entry that changed kind keeps its tick (its item becomes valid again if it changes
        back) until the item reaches the top. Blocked entries have no ticks. Every ready entry
        has a valid item in its kind's heap.
        """
        heap = self._heaps[kind]
        buffered = self._buffered
        while heap:
            _, tick, key = heap[0]
            entry = buffered.get(key)
            if entry is not None and (entry._tick1 if kind else entry._tick0) == tick:
                if entry.change.entered == kind:
                    return entry
                if kind:  # the entry changed kind: this item is gone, and so is its tick
                    entry._tick1 = 0
                else:
                    entry._tick0 = 0
            heappop(heap)
        return None

    def _aged(self, entry: Entry | None, now: float) -> bool:
        return entry is not None and entry.first_seen + self._flush_interval_s <= now

    def _adds_due(self, now: float) -> bool:
        return self.full_import_ready() or self._aged(self._top(True), now)

    def _take_kind(
        self, kind: bool, limit: int, until: float, out: list[Entry], late: list[Entry]
    ) -> None:
        """Move up to ``limit`` ready entries of ``kind``, oldest first, whose deadline
        (``first_seen + flush_interval_s``) is <= ``until``, into flight; late ones to ``late``."""
        heap = self._heaps[kind]
        buffered = self._buffered
        in_flight = self._in_flight
        applied, remember, destination = self._applied, self._remember, self._destination
        interval = self._flush_interval_s
        while len(out) < limit:
            entry = self._top(kind)
            if entry is None or entry.first_seen + interval > until:
                return
            heappop(heap)
            entry._tick0 = entry._tick1 = 0  # an item left in the other heap is stale now
            change = entry.change
            key = change.key
            del buffered[key]
            self._ready[kind] -= 1
            if remember and applied.is_late(destination, key, change.occurred_at_ms, kind):
                self._bytes -= entry._weight()
                late.append(entry)
                continue
            in_flight[key] = entry
            out.append(entry)
