"""Stage 2: who holds each (list, address), and what the list should show for it.

Invariants (they carry guarantee 2 across profiles, segments and partitions):

* Per (list, address, member) the claim with the highest version is kept; a claim whose version
  is not higher than the kept one is ignored. So any delivery order, duplicates and replays of
  one set of claims end in the same state (the claims of a member at one address commute).
  Releases are kept as records: dropping one would let an older hold, delivered late, bring its
  member back.
* The desired state of (list, address) is a function of the holders alone: active iff some
  member holds it; its fields are those of the holder with the highest ``(version, member)``.
  Hence one list fed by two segments holds the union, a shared address stays while any member
  holds it, and an address a member moved away from leaves unless someone else holds it.
* `apply` returns a `Desired` only when the desired state changed (activity, or the fields
  while active), with a revision one above the previous: the revisions of one key increase
  strictly, whatever the event times behind them.
* A repair (`cmsync reconcile`) carries no value: `repair` re-offers what is desired when it is
  taken, with the next revision, so it can never undo a newer claim (that claim either came
  first and decided what is desired, or comes later with a higher revision still).
* What the sync last did is recorded by `record_applied`; `owed` lists the keys whose desired
  state is not what was applied, or whose last write's outcome is unknown (SENDING: the
  process died with it in flight), to feed the buffer again after a restore.
* The store fits the configured routes (which segments feed which list, `refit`): a list
  that lost a segment loses that segment's holders, so its desired states become the union
  of the segments that feed it now; a list no longer configured loses every holder (what
  was applied, and what the sync removed itself, is kept: it may be configured again).
* A list configured anew is filled by backfills (stage 1). Until every partition of every
  segment feeding it reported its backfill complete (`filled`), an address no member holds
  may still be held by a hold on its way, so it is not owed yet; once complete, the
  addresses the sync made active that no member holds any more are owed (removed).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

from consumer.membership.codec import (
    META_PREFIX,
    AddressRows,
    HoldingRow,
    address_key,
    decode_address,
    decode_address_rows,
    decode_claim_row,
    decode_fill,
    decode_routes,
    encode_address,
    encode_address_rows,
    encode_fill,
    encode_routes,
    fill_key,
    fingerprint,
    list_prefix,
    routes_key,
    split_key,
)
from consumer.membership.model import (
    AddressState,
    Applied,
    Claim,
    Desired,
    Fields,
    Filled,
    Holding,
    Member,
    Origin,
    RepairKind,
)
from consumer.membership.store import Store

__all__ = ["AddressTable"]


def _wanted(state: AddressState) -> tuple[bool, Fields, Member | None, Holding | None]:
    """(active, fields) of the desired state, and the newest holder they come from."""
    newest = state.newest()
    if newest is None:
        return False, {}, None, None
    member, holding = newest
    return True, holding.fields, member, holding


def _desired(
    list_id: str,
    address: str,
    state: AddressState,
    wanted: tuple[bool, Fields, Member | None, Holding | None] | None = None,
) -> Desired:
    active, fields, member, holding = wanted or _wanted(state)
    origin = None
    if member is not None and holding is not None:
        origin = Origin(member[1], holding.partition, holding.version[1])
    return Desired(list_id, address, active, fields, state.revision, origin)


def _owes(state: AddressState) -> bool:
    if state.applied is Applied.SENDING:
        return True
    if state.applied is Applied.REJECTED:
        return False  # until the desired state changes (a new revision is offered anyway)
    active, fields, _, _ = _wanted(state)
    if active:
        return state.applied is not Applied.ACTIVE or state.applied_fingerprint != fingerprint(
            fields
        )
    return state.applied is Applied.ACTIVE


def _newest_row(rows: list[HoldingRow]) -> HoldingRow | None:
    """`AddressState.newest` over rows: the holding row with the highest ``(occurred_at_ms,
    offset, segment, profile)``, i.e. ``(version, member)``."""
    best = None
    for row in rows:
        if row.holds and (
            best is None
            or (row.occurred_at_ms, row.offset, row.segment, row.profile)
            > (best.occurred_at_ms, best.offset, best.segment, best.profile)
        ):
            best = row
    return best


class AddressTable:
    """Stage 2 over one store (one repartition partition's state, in the service)."""

    __slots__ = ("_routes", "_store")

    def __init__(self, store: Store) -> None:
        self._store = store
        #: the routes of the last `refit` (None before: every list counts as filled)
        self._routes: Mapping[str, frozenset[str]] | None = None

    def _load(self, key: bytes) -> AddressState:
        raw = self._store.get(key)
        return AddressState() if raw is None else decode_address(raw)

    def apply(self, claim: Claim) -> Desired | None:
        """Take one claim; the new desired state if it changed, else None."""
        segment, profile = claim.member
        occurred_at_ms, offset = claim.version
        row = HoldingRow(
            segment,
            profile,
            occurred_at_ms,
            offset,
            claim.holds,
            (dict(claim.fields) or None) if claim.holds else None,
            claim.partition,
        )
        return self._apply(address_key(claim.list_id, claim.address), row)

    def apply_encoded(self, key: bytes, value: bytes) -> tuple[Desired | None, int]:
        """`apply` of a claim as the repartition topic carries it (`codec.encode_claim`), without
        building the `Claim`: (the new desired state or None, the claim's ``occurred_at_ms``)."""
        row = decode_claim_row(value)
        return self._apply(key, row), row.occurred_at_ms

    def _apply(self, key: bytes, row: HoldingRow) -> Desired | None:
        """The rules of `apply` on the encoded state: the member's row replaced by ``row`` if
        ``row`` is newer (the rows stay sorted by member, as `encode_address` writes them)."""
        raw = self._store.get(key)
        if raw is None:
            state = AddressRows(0, Applied.NOTHING, b"", [row])
            before = None
        else:
            state = decode_address_rows(raw)
            rows = state.holders
            before = _newest_row(rows)
            segment, profile = row.segment, row.profile
            for i, kept in enumerate(rows):
                if kept.segment == segment and kept.profile == profile:
                    if (row.occurred_at_ms, row.offset) <= (kept.occurred_at_ms, kept.offset):
                        return None  # older than, or the same as, what this member said last
                    rows[i] = row
                    break
            else:
                i = len(rows)
                while i and (rows[i - 1].segment, rows[i - 1].profile) > (segment, profile):
                    i -= 1
                rows.insert(i, row)
        after = _newest_row(state.holders) if before is not None or row.holds else None
        if before is None:
            changed = after is not None
        else:
            changed = after is None or (after.fields or None) != (before.fields or None)
        if not changed:
            self._store.put(key, encode_address_rows(state))
            return None
        list_id, address = split_key(key)  # before the write: a malformed key changes nothing
        state.revision += 1
        self._store.put(key, encode_address_rows(state))
        if after is None:
            return Desired(list_id, address, False, {}, state.revision, None)
        origin = Origin(after.profile, after.partition, after.offset)
        return Desired(list_id, address, True, after.fields or {}, state.revision, origin)

    def repair(self, list_id: str, address: str, kind: RepairKind) -> Desired | None:
        """Take a repair of `cmsync reconcile`: the desired state to offer again, or None when
        there is nothing to repair any more (a change newer than the reconcile's reading
        decided otherwise).

        ``reassert`` (the list lacks the address or shows other fields): if the address is
        desired active now, it gets the next revision and what was applied becomes unknown
        (NOTHING), so it is owed, also to the next owner after a crash. ``extra`` (the list
        shows it active, no member holds it): if nobody holds it now, the next revision, not
        active, and the list is recorded as showing it (ACTIVE, fields unknown), so the
        removal is owed; the flusher removes it with its consent checks. Not while the list is
        being backfilled (`complete`): its holder may be a hold still on its way."""
        key = address_key(list_id, address)
        state = self._load(key)
        wanted = _wanted(state)
        if wanted[0] != (kind == "reassert"):
            return None
        if kind == "extra" and not self.complete(list_id):
            return None
        state.revision += 1
        if kind == "reassert":
            state.applied = Applied.NOTHING
        else:
            state.applied = Applied.ACTIVE
            state.removed_by_sync = False  # active in the list: not the sync's removal now
        state.applied_fingerprint = b""
        self._store.put(key, encode_address(state))
        return _desired(list_id, address, state, wanted)

    def state(self, list_id: str, address: str) -> AddressState | None:
        """The stored state of one (list, address), or None."""
        raw = self._store.get(address_key(list_id, address))
        return None if raw is None else decode_address(raw)

    def desired(self, list_id: str, address: str) -> Desired:
        """The current desired state of one (list, address) (not active if unknown)."""
        return _desired(list_id, address, self._load(address_key(list_id, address)))

    def record_applied(self, desired: Desired, outcome: Applied) -> None:
        """The sync wrote ``desired`` to its list with ``outcome`` (ACTIVE for an add or an
        update, REMOVED for its own delete or unsubscribe, KEPT when it left the address as it
        was, REJECTED when Campaign Monitor refused it), or is about to (SENDING: until the
        outcome is recorded, the state owes the write, since the list may or may not show it).

        Call in the order the writes completed (the buffer never has two in flight for one
        address). ``desired`` may be older than the current revision: what matters is what the
        list now shows, and `owed` then still lists the key.

        ``removed_by_sync`` (issue 13: with ``resubscribe = "deleted-only"`` exactly those come
        back on re-entry) is set by REMOVED, and already by the SENDING of a removal (if the
        process dies with it in flight, the list may show it done: the sync's own), cleared
        by ACTIVE (back in the list) and KEPT (inactive by someone else's doing: the person's
        to decide from now on), and left as it is by a REJECTED write.
        """
        if outcome is Applied.NOTHING:
            raise ValueError("record_applied needs what was done, not NOTHING")
        key = address_key(desired.list_id, desired.address)
        state = self._load(key)
        if outcome is Applied.REMOVED or (outcome is Applied.SENDING and not desired.active):
            state.removed_by_sync = True
        elif outcome is Applied.ACTIVE or outcome is Applied.KEPT:
            state.removed_by_sync = False
        state.applied = outcome
        state.applied_fingerprint = (
            fingerprint(desired.fields) if outcome is Applied.ACTIVE else b""
        )
        self._store.put(key, encode_address(state))

    def addresses(self, list_id: str) -> Iterator[Desired]:
        """The desired state of every address of ``list_id`` this store knows, in key order."""
        for key, raw in self._store.scan(list_prefix(list_id)):
            yield _desired(list_id, split_key(key)[1], decode_address(raw))

    def states(self, list_id: str) -> Iterator[tuple[str, AddressState]]:
        """(address, stored state) of every address of ``list_id`` this store knows, in key
        order (`cmsync reconcile`: who should be in the list, and who the sync removed)."""
        for key, raw in self._store.scan(list_prefix(list_id)):
            yield split_key(key)[1], decode_address(raw)

    def owed(self, list_id: str) -> Iterator[Desired]:
        """The desired states of ``list_id`` that differ from what the sync last applied
        (before the list is filled, not those of addresses nobody holds: see the module
        docstring)."""
        complete = self.complete(list_id)
        for key, raw in self._store.scan(list_prefix(list_id)):
            state = decode_address(raw)
            if _owes(state) and (complete or state.newest() is not None):
                yield _desired(list_id, split_key(key)[1], state)

    def complete(self, list_id: str) -> bool:
        """Whether every backfill feeding ``list_id`` reported complete (`filled`)."""
        segments = None if self._routes is None else self._routes.get(list_id)
        if segments is None:
            return True
        raw = self._store.get(fill_key(list_id))
        if raw is None:
            return False
        partitions, done = decode_fill(raw)
        return all((s, p) in done for s in segments for p in range(partitions))

    def filled(self, record: Filled) -> list[Desired]:
        """A backfill of the list completed for one segment's input partition. When that
        completes the list, the desired states it owes for addresses nobody holds (removals
        of what the sync made active, held by nobody since the list was configured again)."""
        list_id = record.list_id
        was = self.complete(list_id)
        key = fill_key(list_id)
        raw = self._store.get(key)
        partitions, done = (record.partitions, set()) if raw is None else decode_fill(raw)
        if partitions != record.partitions:  # the topic was re-created: start again
            partitions, done = record.partitions, set()
        if (record.segment_id, record.partition) in done:
            return []
        done.add((record.segment_id, record.partition))
        self._store.put(key, encode_fill(partitions, done))
        if was or not self.complete(list_id):
            return []
        return [
            _desired(list_id, split_key(k)[1], state)
            for k, raw_state in self._store.scan(list_prefix(list_id))
            if (state := decode_address(raw_state)).newest() is None and _owes(state)
        ]

    def lists(self) -> Iterator[str]:
        """Every list this store holds addresses of, in key order (one seek per list)."""
        start = b""
        while True:
            first = next(self._store.scan(b"", start), None)
            if first is None or first[0].startswith(META_PREFIX):
                return
            list_id = split_key(first[0])[0]
            yield list_id
            start = list_prefix(list_id) + b"\xff"  # above every address (UTF-8 has no 0xff)

    def refit(self, routes: Mapping[str, frozenset[str]]) -> list[Desired]:
        """Fit the store to ``routes`` (per configured list, the segments feeding it): drop the
        holders of segments that no longer feed their list (all of them for a list no longer
        configured).
        Returns the desired states that changed (of lists still configured: the buffers take
        them). A list is read only when its segments changed since the last fit, or when it
        was not known then (a store written before this existed; claims of a list written by
        a process that had not reloaded yet). A list configured anew counts as not filled
        until its backfills report complete (`filled`)."""
        raw = self._store.get(routes_key())
        known = {} if raw is None else decode_routes(raw)
        fitted: dict[str, frozenset[str] | None] = dict.fromkeys(self.lists())
        fitted.update(known)
        changed: list[Desired] = []
        for list_id, segments in fitted.items():
            wanted = routes.get(list_id)
            if wanted is None:  # no longer configured: nobody holds, nothing to fill
                self._drop_holders(list_id, frozenset())
                self._store.put(fill_key(list_id), None)
            elif segments != wanted:
                changed += self._drop_holders(list_id, wanted)
        for list_id in routes:
            if list_id not in known:  # configured anew: filled from now on
                self._store.put(fill_key(list_id), None)
        if known != routes:
            self._store.put(routes_key(), encode_routes(dict(routes)))
        self._routes = dict(routes)
        return changed

    def _drop_holders(self, list_id: str, segments: frozenset[str]) -> list[Desired]:
        rows = list(self._store.scan(list_prefix(list_id)))
        changed: list[Desired] = []
        for key, raw in rows:
            state = decode_address(raw)
            gone = [member for member in state.holders if member[0] not in segments]
            if not gone:
                continue
            before = _wanted(state)[:2]
            for member in gone:
                del state.holders[member]
            after = _wanted(state)
            if after[:2] != before:
                state.revision += 1
                changed.append(_desired(list_id, split_key(key)[1], state, after))
            self._store.put(key, encode_address(state))
        return changed
