"""Stage 1: the deciding change of every (segment, profile), and the claims it makes.

Invariants (they carry guarantee 2 for one member):

* The stored state of a (segment, profile) is its change with the highest version
  ``(occurred_at_ms, offset)`` seen so far. A change whose version is not higher is ignored
  (``Verdict.accepted`` False, nothing stored, nothing emitted): late events, and records read
  again after a restart or a rebalance. Because the state is durable (store + changelog), this
  holds across restarts.
* Claims are emitted with the version of the change that made them, and only for accepted
  changes, so the claims of one member carry strictly increasing versions in the order stage 1
  makes them. Stage 2 does not rely on that order (replays break it), only on the versions.
* On every accepted change, for every list the segment feeds:
  - if the member was in with address ``a`` and is now out, or in with another address: a
    release of ``a``;
  - if the member is now in: a hold of its address with its fields, even when nothing but the
    version changed. Stage 2 then knows each holder at its deciding version, which is what
    makes "the newest holder's fields" mean the same thing whatever order claims arrive in.
* Members of every segment are kept, fed to a list or not: `backfill` makes the holds that fill
  a list added later, a page at a time (`backfill_page`), with its progress stored beside the
  members (`backfill_key`): it reaches the changelog in the same checkpoint as the page's
  claims, so a restart resumes after the last page checkpointed, and a page sent twice is
  idempotent in stage 2 (same members, same versions).

The segment → lists mapping (``lists_of``) is configuration: a table serves one mapping. When
the mapping changes, the caller makes a new table over the same store, backfills the lists a
segment gained (`backfill_page` until done) and forgets the progress of pairs no longer
configured (`forget_backfill`), so that a pair configured again is filled again.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence

from consumer.membership.codec import (
    BACKFILL_PREFIX,
    backfill_key,
    claim_value,
    decode_backfill,
    decode_member,
    decode_member_row,
    encode_backfill,
    encode_member_row,
    list_prefix,
    member_key,
    segment_prefix,
    split_key,
)
from consumer.membership.model import Claim, Fields, MemberState, ProfileChange, Verdict
from consumer.membership.normalise import normalise_address
from consumer.membership.store import Store

__all__ = ["MemberTable"]


class MemberTable:
    """Stage 1 over one store (one input partition's state, in the service)."""

    __slots__ = ("_fields_of", "_keyed", "_lists_of", "_partition", "_store")

    def __init__(
        self,
        store: Store,
        lists_of: Mapping[str, Sequence[str]],
        partition: int = 0,
        fields_of: Mapping[str, Collection[str]] | None = None,
    ) -> None:
        """``partition``: the input partition the store belongs to (claims carry it).
        ``fields_of``: per list, the profile fields it is written with; a list's claims carry
        only those (so a change of a field only another list maps changes nothing in it). A
        list not named there gets every field the state keeps."""
        self._store = store
        self._partition = partition
        self._fields_of = {k: frozenset(v) for k, v in (fields_of or {}).items()}
        # dict.fromkeys: a list named twice for one segment is still one list.
        self._lists_of = {
            segment: tuple(dict.fromkeys(lists)) for segment, lists in lists_of.items()
        }
        # For `apply_encoded`: per segment, each list's key prefix and the fields it takes.
        self._keyed = {
            segment: tuple(
                (list_prefix(list_id), self._fields_of.get(list_id)) for list_id in lists
            )
            for segment, lists in self._lists_of.items()
        }

    def apply(self, change: ProfileChange) -> Verdict:
        """Decide ``change`` against the stored state; store it and return its claims if newer.

        Raises ``ValueError`` for an entry without an address (the caller dead-letters it
        before; an entry the state cannot place would otherwise be lost silently).
        """
        decided = self._decide(change)
        if decided is None:
            return Verdict(False, [])
        held, address, fields = decided
        if address is None:
            new = MemberState(False, change.version)
        else:
            new = MemberState(True, change.version, address, dict(fields))
        return Verdict(True, self._claims(change.segment_id, change.profile_id, held, new))

    def apply_encoded(self, change: ProfileChange, out: list[tuple[bytes, bytes]]) -> bool:
        """`apply`, with the claims appended to ``out`` as the repartition topic carries them
        (`codec.encode_claim`'s records, in the order `apply` makes them) instead of returned
        as `Claim` objects; whether the change was accepted."""
        decided = self._decide(change)
        if decided is None:
            return False
        held, address, fields = decided
        keyed = self._keyed.get(change.segment_id, ())
        segment, profile, partition = change.segment_id, change.profile_id, self._partition
        occurred_at_ms, offset = change.occurred_at_ms, change.offset
        if held is not None and held != address:
            value = claim_value(segment, profile, occurred_at_ms, offset, False, {}, partition)
            suffix = held.encode()
            out += [(prefix + suffix, value) for prefix, _ in keyed]
        if address is not None:
            suffix = address.encode()
            everything = None
            for prefix, wanted in keyed:
                if wanted is None:
                    if everything is None:
                        everything = claim_value(
                            segment, profile, occurred_at_ms, offset, True, fields, partition
                        )
                    value = everything
                else:
                    taken = {k: v for k, v in fields.items() if k in wanted}
                    value = claim_value(
                        segment, profile, occurred_at_ms, offset, True, taken, partition
                    )
                out.append((prefix + suffix, value))
        return True

    def _decide(self, change: ProfileChange) -> tuple[str | None, str | None, Fields] | None:
        """Store ``change`` if it is newer than the stored state: (the address the member held
        before, if it was in; its address now, normalised, None if it is out; its fields now),
        or None if it is not newer (nothing stored)."""
        key = member_key(change.segment_id, change.profile_id)
        raw = self._store.get(key)
        held = None
        occurred_at_ms, offset = change.occurred_at_ms, change.offset
        if raw is not None:
            old = decode_member_row(raw)
            if (occurred_at_ms, offset) <= (old.occurred_at_ms, old.offset):
                return None
            if old.in_segment:
                held = old.address
        if change.entered:
            if not change.address:
                raise ValueError("an entered change needs an address")
            address = normalise_address(change.address)
            fields = change.fields
            self._store.put(key, encode_member_row(True, occurred_at_ms, offset, address, fields))
            return held, address, fields
        self._store.put(key, encode_member_row(False, occurred_at_ms, offset, None, {}))
        return held, None, {}

    def _claims(
        self, segment_id: str, profile_id: str, held: str | None, new: MemberState
    ) -> list[Claim]:
        """The claims of an accepted change: ``held`` is the address the member held before
        (None if it was out), ``new`` its state now."""
        lists = self._lists_of.get(segment_id, ())
        member = (segment_id, profile_id)
        claims: list[Claim] = []
        p = self._partition
        if held is not None and held != new.address:
            claims.extend(
                Claim(list_id, held, member, new.version, False, {}, p) for list_id in lists
            )
        if new.address is not None:
            claims.extend(
                Claim(list_id, new.address, member, new.version, True, self._of(list_id, new), p)
                for list_id in lists
            )
        return claims

    def _of(self, list_id: str, state: MemberState) -> Fields:
        wanted = self._fields_of.get(list_id)
        if wanted is None:
            return state.fields
        return {k: v for k, v in state.fields.items() if k in wanted}

    def member(self, segment_id: str, profile_id: str) -> MemberState | None:
        """The stored state of one (segment, profile), or None if no change was accepted."""
        raw = self._store.get(member_key(segment_id, profile_id))
        return None if raw is None else decode_member(raw)

    def members(self, segment_id: str) -> Iterator[tuple[str, MemberState]]:
        """``(profile_id, state)`` of every profile currently in ``segment_id``, in key order."""
        for key, raw in self._store.scan(segment_prefix(segment_id)):
            state = decode_member(raw)
            if state.in_segment:
                yield split_key(key)[1], state

    def backfill(self, segment_id: str, list_id: str) -> Iterator[Claim]:
        """The holds that fill ``list_id`` with ``segment_id``'s current members.

        Idempotent with the claims stage 1 makes meanwhile: each carries its member's deciding
        version, so stage 2 keeps the newest per member whatever the order.
        """
        for key, raw in self._store.scan(segment_prefix(segment_id)):
            hold = self._hold(list_id, key, raw)
            if hold is not None:
                yield hold

    def _hold(self, list_id: str, key: bytes, raw: bytes) -> Claim | None:
        """The hold of ``list_id`` by the member stored at ``key``, if it is in its segment."""
        state = decode_member(raw)
        if not state.in_segment:
            return None
        assert state.address is not None  # in_segment implies an address
        member = split_key(key)
        fields = self._of(list_id, state)
        return Claim(list_id, state.address, member, state.version, True, fields, self._partition)

    def backfill_page(self, segment_id: str, list_id: str, limit: int) -> tuple[list[Claim], bool]:
        """The next page of `backfill`: the holds of at most ``limit`` members after the stored
        progress, the progress advanced (a pending write, checkpointed with the claims). True
        once every member was sent (then the pair counts as fed, `backfilled`)."""
        key = backfill_key(segment_id, list_id)
        raw = self._store.get(key)
        done, after = (False, None) if raw is None else decode_backfill(raw)
        if done:
            return [], True
        prefix = segment_prefix(segment_id)
        start = prefix if after is None else after + b"\x00"  # the first key above ``after``
        claims: list[Claim] = []
        seen = 0
        for member, value in self._store.scan(prefix, start):
            seen += 1
            after = member
            hold = self._hold(list_id, member, value)
            if hold is not None:
                claims.append(hold)
            if seen == limit:
                break
        done = seen < limit
        self._store.put(key, encode_backfill(done, after))
        return claims, done

    def backfilled(self, segment_id: str, list_id: str) -> bool:
        """Whether ``list_id`` was filled from ``segment_id``'s members (stage 1 has fed it
        every change since)."""
        raw = self._store.get(backfill_key(segment_id, list_id))
        return raw is not None and decode_backfill(raw)[0]

    def backfills(self) -> Iterator[tuple[str, str]]:
        """Every (segment, list) with a backfill recorded, done or under way."""
        for key, _ in self._store.scan(BACKFILL_PREFIX):
            yield split_key(key[len(BACKFILL_PREFIX) :])

    def forget_backfill(self, pairs: Iterable[tuple[str, str]]) -> None:
        """Drop the backfill records of these (segment, list) pairs (no longer configured), so
        that a pair configured again is filled again."""
        for segment_id, list_id in pairs:
            key = backfill_key(segment_id, list_id)
            if self._store.get(key) is not None:
                self._store.put(key, None)
