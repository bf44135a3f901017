"""Membership state (consumer.membership): unit tests per semantic, and a state machine checked
against a brute-force model of who is in which segment with which address."""

from __future__ import annotations

import itertools
import random
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from consumer.membership import (
    AddressState,
    AddressTable,
    Applied,
    Claim,
    Desired,
    DictStore,
    Fields,
    Holding,
    MemberState,
    MemberTable,
    ProfileChange,
    Repair,
    StateFormatError,
    Verdict,
    normalise_address,
)
from consumer.membership.codec import (
    address_key,
    decode_address,
    decode_address_rows,
    decode_claim,
    decode_claim_row,
    decode_claims_record,
    decode_member,
    encode_address,
    encode_address_rows,
    encode_claim,
    encode_filled,
    encode_member,
    encode_repair,
    is_claim_value,
    member_key,
    segment_prefix,
    split_key,
)
from consumer.membership.model import Filled

VIP, NEWS = "vip", "news"  # segments
LIST_A, LIST_B = "list-a", "list-b"


class Pipeline:
    """Stage 1 and stage 2 over in-memory stores, claims delivered at once and in order,
    offsets handed out in arrival order (as one input partition would)."""

    def __init__(self, lists_of: dict[str, tuple[str, ...]] | None = None) -> None:
        self.lists_of = lists_of if lists_of is not None else {VIP: (LIST_A,)}
        self.member_store = DictStore()
        self.address_store = DictStore()
        self.offsets = itertools.count()
        self.restart()

    def restart(self) -> None:
        """New tables over copies of the stores' bytes: a restore from the changelogs."""
        self.member_store = DictStore(dict(self.member_store.data))
        self.address_store = DictStore(dict(self.address_store.data))
        self.members = MemberTable(self.member_store, self.lists_of)
        self.addresses = AddressTable(self.address_store)

    def claims(
        self,
        segment: str,
        profile: str,
        entered: bool,
        at: int,
        address: str | None = None,
        fields: Fields | None = None,
    ) -> Verdict:
        change = ProfileChange(
            segment, profile, entered, at, next(self.offsets), address, fields or {}
        )
        return self.members.apply(change)

    def change(self, *args: Any) -> list[Desired]:
        """Apply one input change (the arguments of `claims`) through both stages; the desired
        states it produced."""
        return self.deliver(self.claims(*args).claims)

    def deliver(self, claims: list[Claim]) -> list[Desired]:
        out = [self.addresses.apply(claim) for claim in claims]
        return [desired for desired in out if desired is not None]

    def active(self, list_id: str) -> dict[str, Fields]:
        return {d.address: d.fields for d in self.addresses.addresses(list_id) if d.active}


@settings(max_examples=200, deadline=None)
@given(
    st.sampled_from(({"L1": ("city",), "L2": ("city", "name")}, {"L1": ("city",)})),
    st.lists(
        st.tuples(
            st.sampled_from(("s1", "s2")),
            st.sampled_from(("p1", "p2")),
            st.booleans(),
            st.integers(0, 3),
            st.sampled_from(("a@x.io", "B@x.io", " b@X.io")),
            st.dictionaries(st.sampled_from(("city", "name", "tier")), st.sampled_from(("x", 1))),
        ),
        max_size=12,
    ),
)
def test_encoded_claims_are_the_claims_encoded(
    fields_of: dict[str, tuple[str, ...]],
    changes: list[tuple[str, str, bool, int, str, Fields]],
) -> None:
    """`MemberTable.apply_encoded` (the service's path) stores the same state and makes the
    same claim records as `apply` followed by `encode_claim` (a list without ``fields_of``
    takes every field)."""
    lists_of = {"s1": ("L1", "L2"), "s2": ("L2",)}
    one, two = DictStore(), DictStore()
    by_objects = MemberTable(one, lists_of, 3, fields_of)
    encoded = MemberTable(two, lists_of, 3, fields_of)
    for offset, (segment, profile, entered, at, address, fields) in enumerate(changes):
        change = ProfileChange(segment, profile, entered, at, offset, address, fields)
        verdict = by_objects.apply(change)
        records: list[tuple[bytes, bytes]] = []
        assert encoded.apply_encoded(change, records) == verdict.accepted
        assert records == [encode_claim(claim) for claim in verdict.claims]
        assert one.data == two.data


# -- normalisation ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "normalised"),
    [
        ("  Ada@Example.COM\t", "ada@example.com"),
        ("\u212aate@example.com", "\u212aate@example.com"),  # KELVIN SIGN is not an ASCII K
        ("\u0130nci@example.com", "\u0130nci@example.com"),  # nor is capital I with dot
        ("ÉLODIE@Example.com", "Élodie@example.com"),  # only ASCII letters are lowered
        ("kate@example.com", "kate@example.com"),
    ],
)
def test_normalise_lowers_ascii_letters_only(raw: str, normalised: str) -> None:
    assert normalise_address(raw) == normalised
    assert normalise_address(normalised) == normalised  # idempotent


def test_exit_of_kelvin_sign_address_does_not_remove_kate() -> None:
    p = Pipeline()
    p.change(VIP, "kate", True, 1, "kate@example.com")
    p.change(VIP, "kelvin", True, 1, "\u212aate@example.com")
    p.change(VIP, "kelvin", False, 2)
    assert p.active(LIST_A) == {"kate@example.com": {}}


# -- stage 1: deciding changes ----------------------------------------------------------------


def test_address_change_releases_the_old_address() -> None:
    p = Pipeline()
    p.change(VIP, "ada", True, 1, "old@x.io")
    out = p.change(VIP, "ada", True, 2, "New@X.io")
    assert [(d.address, d.active) for d in out] == [("old@x.io", False), ("new@x.io", True)]
    assert p.active(LIST_A) == {"new@x.io": {}}


def test_address_change_keeps_the_old_address_another_member_holds() -> None:
    p = Pipeline()
    p.change(VIP, "ada", True, 1, "home@x.io")
    p.change(VIP, "bob", True, 1, "home@x.io")
    p.change(VIP, "ada", True, 2, "ada@x.io")
    assert set(p.active(LIST_A)) == {"home@x.io", "ada@x.io"}


def test_shared_address_stays_while_any_member_is_in() -> None:
    p = Pipeline()
    p.change(VIP, "ada", True, 1, "home@x.io")
    p.change(VIP, "bob", True, 2, "HOME@x.io")
    assert p.change(VIP, "ada", False, 3) == []  # bob still holds it: no change to the list
    assert set(p.active(LIST_A)) == {"home@x.io"}
    [out] = p.change(VIP, "bob", False, 4)
    assert (out.address, out.active) == ("home@x.io", False)
    assert p.active(LIST_A) == {}


def test_late_change_is_ignored_and_emits_nothing() -> None:
    p = Pipeline()
    p.change(VIP, "ada", True, 5, "ada@x.io")
    assert p.claims(VIP, "ada", False, 3) == Verdict(False, [])
    assert p.claims(VIP, "ada", True, 4, "other@x.io") == Verdict(False, [])
    assert p.members.member(VIP, "ada") == MemberState(True, (5, 0), "ada@x.io", {})
    assert p.active(LIST_A) == {"ada@x.io": {}}


def test_late_change_is_ignored_after_a_restart() -> None:
    p = Pipeline()
    p.change(VIP, "ada", True, 1, "ada@x.io")
    p.change(VIP, "ada", False, 5)
    p.restart()
    assert p.claims(VIP, "ada", True, 3, "ada@x.io") == Verdict(False, [])
    assert p.active(LIST_A) == {}


def test_exit_of_an_unknown_profile_is_kept_so_an_older_entry_stays_out() -> None:
    p = Pipeline()
    assert p.claims(VIP, "ada", False, 5) == Verdict(True, [])
    assert p.claims(VIP, "ada", True, 4, "ada@x.io") == Verdict(False, [])
    assert p.active(LIST_A) == {}


def test_ties_in_event_time_go_to_the_later_offset() -> None:
    p = Pipeline()
    p.change(VIP, "ada", True, 7, "ada@x.io")  # offset 0
    p.change(VIP, "ada", False, 7)  # offset 1: same time, later offset wins
    assert p.active(LIST_A) == {}
    replay = ProfileChange(VIP, "ada", True, 7, 0, "ada@x.io")  # offset 0 read again
    assert p.members.apply(replay) == Verdict(False, [])


def test_entry_without_address_is_refused() -> None:
    p = Pipeline()
    with pytest.raises(ValueError, match="address"):
        p.claims(VIP, "ada", True, 1, None)
    assert p.members.member(VIP, "ada") is None


def test_repeated_entry_reclaims_at_its_version_but_changes_no_list() -> None:
    p = Pipeline()
    p.change(VIP, "ada", True, 1, "ada@x.io", {"city": "Oslo"})
    verdict = p.claims(VIP, "ada", True, 2, "ada@x.io", {"city": "Oslo"})
    assert [(c.holds, c.version) for c in verdict.claims] == [(True, (2, 1))]
    assert p.deliver(verdict.claims) == []


def test_field_change_updates_the_list() -> None:
    p = Pipeline()
    p.change(VIP, "ada", True, 1, "ada@x.io", {"city": "Oslo"})
    [out] = p.change(VIP, "ada", True, 2, "ada@x.io", {"city": "Rome"})
    assert (out.active, out.fields, out.revision) == (True, {"city": "Rome"}, 2)


def test_fields_written_are_the_newest_holders() -> None:
    p = Pipeline()
    p.change(VIP, "ada", True, 5, "home@x.io", {"name": "Ada"})
    p.change(VIP, "bob", True, 3, "home@x.io", {"name": "Bob"})  # older: Ada's stay
    assert p.active(LIST_A) == {"home@x.io": {"name": "Ada"}}
    p.change(VIP, "ada", False, 6)
    assert p.active(LIST_A) == {"home@x.io": {"name": "Bob"}}


def test_newest_holder_is_judged_by_deciding_versions() -> None:
    """A repeated entry with unchanged fields still makes its member the newest holder."""
    p = Pipeline()
    p.change(VIP, "ada", True, 1, "home@x.io", {"name": "Ada"})
    p.change(VIP, "bob", True, 2, "home@x.io", {"name": "Bob"})
    p.change(VIP, "ada", True, 3, "home@x.io", {"name": "Ada"})
    assert p.active(LIST_A) == {"home@x.io": {"name": "Ada"}}


def test_two_segments_feeding_one_list_give_the_union() -> None:
    p = Pipeline({VIP: (LIST_A,), NEWS: (LIST_A, LIST_B)})
    p.change(VIP, "ada", True, 1, "ada@x.io")
    p.change(NEWS, "bob", True, 1, "bob@x.io")
    p.change(NEWS, "ada", True, 1, "ada@x.io")  # Ada is in both segments
    assert set(p.active(LIST_A)) == {"ada@x.io", "bob@x.io"}
    assert set(p.active(LIST_B)) == {"ada@x.io", "bob@x.io"}
    p.change(NEWS, "ada", False, 2)  # still in VIP, which feeds list A
    assert set(p.active(LIST_A)) == {"ada@x.io", "bob@x.io"}
    assert set(p.active(LIST_B)) == {"bob@x.io"}


def test_members_and_backfill_of_a_list_added_later() -> None:
    p = Pipeline({VIP: ()})  # the segment feeds nothing yet, its members are kept anyway
    p.change(VIP, "ada", True, 1, "ada@x.io", {"city": "Oslo"})
    p.change(VIP, "bob", True, 1, "bob@x.io")
    p.change(VIP, "bob", False, 2)
    assert p.active(LIST_A) == {}
    assert [profile for profile, _ in p.members.members(VIP)] == ["ada"]
    p.lists_of = {VIP: (LIST_A,)}
    p.restart()
    p.deliver(list(p.members.backfill(VIP, LIST_A)))
    assert p.active(LIST_A) == {"ada@x.io": {"city": "Oslo"}}


# -- stage 2: order, duplicates, applied ----------------------------------------------------


def _history() -> list[Claim]:
    """Claims of a busy little history: moves, shared addresses, exits and re-entries."""
    p = Pipeline({VIP: (LIST_A,), NEWS: (LIST_A,)})
    steps: list[tuple[str, str, bool, int, str | None]] = [
        (VIP, "ada", True, 1, "home@x.io"),
        (VIP, "bob", True, 2, "home@x.io"),
        (VIP, "ada", True, 3, "ada@x.io"),
        (NEWS, "ada", True, 3, "ada@x.io"),
        (VIP, "bob", False, 4, None),
        (VIP, "ada", True, 5, "home@x.io"),
        (NEWS, "ada", False, 6, None),
        (VIP, "bob", True, 7, "bob@x.io"),
    ]
    claims: list[Claim] = []
    for segment, profile, entered, at, address in steps:
        claims += p.claims(segment, profile, entered, at, address, {"at": at}).claims
    return claims


def _final(claims: list[Claim]) -> dict[str, Fields]:
    p = Pipeline()
    p.deliver(claims)
    return p.active(LIST_A)


def test_reordered_claims_converge_to_the_same_list() -> None:
    claims = _history()
    expected = _final(claims)
    assert expected == {"home@x.io": {"at": 5}, "bob@x.io": {"at": 7}}
    rng = random.Random(11)
    for _ in range(200):
        shuffled = claims[:]
        rng.shuffle(shuffled)
        assert _final(shuffled) == expected


def test_replayed_claims_are_idempotent() -> None:
    p = Pipeline()
    claims = _history()
    p.deliver(claims)
    before = dict(p.address_store.data)
    assert p.deliver(claims) == []  # every claim again: nothing changes, nothing is emitted
    assert p.deliver(claims[::-1]) == []
    assert p.address_store.data == before


def test_release_delivered_before_its_hold_emits_nothing() -> None:
    p = Pipeline()
    hold = Claim(LIST_A, "ada@x.io", (VIP, "ada"), (1, 0), True)
    release = Claim(LIST_A, "ada@x.io", (VIP, "ada"), (2, 1), False)
    assert p.addresses.apply(release) is None
    assert p.addresses.apply(hold) is None  # older than the release: the member stays out
    assert p.active(LIST_A) == {}


def test_owed_follows_what_was_applied() -> None:
    p = Pipeline()
    [added] = p.change(VIP, "ada", True, 1, "ada@x.io", {"city": "Oslo"})
    assert list(p.addresses.owed(LIST_A)) == [added]
    p.addresses.record_applied(added, Applied.ACTIVE)
    assert list(p.addresses.owed(LIST_A)) == []
    [updated] = p.change(VIP, "ada", True, 2, "ada@x.io", {"city": "Rome"})
    assert list(p.addresses.owed(LIST_A)) == [updated]
    p.addresses.record_applied(added, Applied.ACTIVE)  # an older write completing: still owed
    assert list(p.addresses.owed(LIST_A)) == [updated]
    p.addresses.record_applied(updated, Applied.ACTIVE)
    [removed] = p.change(VIP, "ada", False, 3)
    assert list(p.addresses.owed(LIST_A)) == [removed]
    p.addresses.record_applied(removed, Applied.REMOVED)
    state = p.addresses.state(LIST_A, "ada@x.io")
    assert state is not None
    assert state.removed_by_sync
    assert list(p.addresses.owed(LIST_A)) == []
    with pytest.raises(ValueError, match="NOTHING"):
        p.addresses.record_applied(removed, Applied.NOTHING)


def test_consent_kept_address_is_not_owed_nor_removed_by_the_sync() -> None:
    p = Pipeline()
    [added] = p.change(VIP, "ada", True, 1, "ada@x.io")
    p.addresses.record_applied(added, Applied.ACTIVE)
    [removed] = p.change(VIP, "ada", False, 2)
    p.addresses.record_applied(removed, Applied.KEPT)
    state = p.addresses.state(LIST_A, "ada@x.io")
    assert state is not None
    assert not state.removed_by_sync
    assert list(p.addresses.owed(LIST_A)) == []


def test_removed_by_sync_survives_what_does_not_change_who_removed_it() -> None:
    """The flag deleted-only relies on: set by the sync's removal (already while it is under
    way: a crash then leaves the list maybe changed by the sync), kept through a re-entry's
    SENDING and a REJECTED write, cleared once the address is back (ACTIVE) or left to the
    person (KEPT); and it is durable (encoded)."""
    p = Pipeline()

    def flag() -> bool:
        state = p.addresses.state(LIST_A, "ada@x.io")
        assert state is not None
        return decode_address(encode_address(state) or b"").removed_by_sync

    [added] = p.change(VIP, "ada", True, 1, "ada@x.io")
    p.addresses.record_applied(added, Applied.SENDING)
    assert not flag()  # an add under way is nobody's removal
    p.addresses.record_applied(added, Applied.ACTIVE)
    [removed] = p.change(VIP, "ada", False, 2)
    p.addresses.record_applied(removed, Applied.SENDING)
    assert flag()  # the process may die now: the list may show the sync's removal
    p.addresses.record_applied(removed, Applied.REMOVED)
    [back] = p.change(VIP, "ada", True, 3, "ada@x.io")
    p.addresses.record_applied(back, Applied.SENDING)
    assert flag()  # the re-entry is under way: still the sync's removal if it dies now
    p.addresses.record_applied(back, Applied.REJECTED)
    assert flag()
    p.addresses.record_applied(back, Applied.KEPT)  # opted out since: the person's now
    assert not flag()
    p.addresses.record_applied(removed, Applied.REMOVED)
    p.addresses.record_applied(back, Applied.ACTIVE)
    assert not flag()


def test_reassert_offers_the_desired_state_again_as_owed_with_the_next_revision() -> None:
    p = Pipeline()
    [added] = p.change(VIP, "ada", True, 1, "ada@x.io", {"city": "Oslo"})
    p.addresses.record_applied(added, Applied.ACTIVE)
    assert list(p.addresses.owed(LIST_A)) == []
    repaired = p.addresses.repair(LIST_A, "ada@x.io", "reassert")
    assert repaired is not None
    assert (repaired.active, repaired.fields) == (True, {"city": "Oslo"})
    assert repaired.revision == added.revision + 1
    assert list(p.addresses.owed(LIST_A)) == [repaired]  # also for the next owner
    p.restart()
    assert list(p.addresses.owed(LIST_A)) == [repaired]
    p.addresses.record_applied(repaired, Applied.ACTIVE)
    assert list(p.addresses.owed(LIST_A)) == []


def test_reassert_keeps_the_syncs_own_removal_so_deleted_only_brings_it_back() -> None:
    p = Pipeline()
    [added] = p.change(VIP, "ada", True, 1, "ada@x.io")
    [removed] = p.change(VIP, "ada", False, 2)
    p.addresses.record_applied(removed, Applied.REMOVED)
    [back] = p.change(VIP, "ada", True, 3, "ada@x.io")
    assert p.addresses.repair(LIST_A, "ada@x.io", "reassert") is not None
    state = p.addresses.state(LIST_A, "ada@x.io")
    assert state is not None
    assert state.removed_by_sync
    assert added.revision < back.revision


def test_extra_is_removed_only_while_nobody_holds_it() -> None:
    p = Pipeline()
    [added] = p.change(VIP, "ada", True, 1, "ada@x.io")
    assert p.addresses.repair(LIST_A, "ada@x.io", "extra") is None  # held: not an extra
    assert p.addresses.repair(LIST_A, "hand@x.io", "reassert") is None  # nobody wants it
    extra = p.addresses.repair(LIST_A, "hand@x.io", "extra")  # never seen by the sync
    assert extra is not None
    assert (extra.active, extra.revision) == (False, 1)
    assert [d.address for d in p.addresses.owed(LIST_A)] == ["ada@x.io", "hand@x.io"]
    p.addresses.record_applied(extra, Applied.REMOVED)
    assert [d.address for d in p.addresses.owed(LIST_A)] == ["ada@x.io"]
    assert added.active


def test_an_extra_waits_for_the_backfill_of_its_list() -> None:
    """A list configured anew is filled by backfills: until they are complete, an address
    nobody holds may be held by a hold on its way, so a repair does not remove it."""
    table = AddressTable(DictStore())
    table.refit({LIST_A: frozenset({VIP})})
    assert not table.complete(LIST_A)
    assert table.repair(LIST_A, "hand@x.io", "extra") is None
    table.filled(Filled(LIST_A, VIP, 0, 1))
    assert table.complete(LIST_A)
    removal = table.repair(LIST_A, "hand@x.io", "extra")
    assert removal is not None
    assert not removal.active


@pytest.mark.parametrize("kind", ["reassert", "extra"])
def test_a_repair_racing_a_newer_claim_never_undoes_it(kind: str) -> None:
    """The reconcile read the list and the state; then a change came. Whichever of the change's
    claim and the repair stage 2 takes first, the list ends as the change says."""
    entered = kind == "reassert"  # what the reconcile saw: held (reassert) or not (extra)
    for repair_first in (True, False):
        p = Pipeline()
        if entered:
            p.change(VIP, "ada", True, 1, "ada@x.io")
        newer = p.claims(VIP, "ada", not entered, 2, "ada@x.io").claims
        if repair_first:
            repaired = p.addresses.repair(LIST_A, "ada@x.io", kind)  # type: ignore[arg-type]
            assert repaired is not None
            [after] = p.deliver(newer)
            assert after.revision > repaired.revision  # the buffer keeps the newer one
        else:
            p.deliver(newer)
            assert p.addresses.repair(LIST_A, "ada@x.io", kind) is None  # type: ignore[arg-type]
        assert p.addresses.desired(LIST_A, "ada@x.io").active is not entered


def test_an_address_state_written_before_removed_by_sync_existed_reads_as_not_removed() -> None:
    state = AddressState(revision=3, applied=Applied.REMOVED, removed_by_sync=True)
    raw = encode_address(state)
    assert raw is not None
    body = msgspec.msgpack.decode(raw[1:])
    old = raw[:1] + msgspec.msgpack.encode(body[:4])  # the four elements of the earlier format
    assert decode_address(old) == AddressState(revision=3, applied=Applied.REMOVED)
    assert decode_address(raw) == state


# -- codec -------------------------------------------------------------------------------------

_text = st.text(min_size=0, max_size=12)
_fields = st.dictionaries(
    st.text(max_size=6),
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | _text | st.lists(_text),
    max_size=4,
)
_versions = st.tuples(st.integers(-(2**62), 2**62), st.integers(0, 2**63 - 1))


@given(_text, _text, st.booleans(), _versions, _text, _fields)
def test_member_state_round_trips(
    segment: str,
    profile: str,
    in_segment: bool,
    version: tuple[int, int],
    address: str,
    fields: Fields,
) -> None:
    state = (
        MemberState(True, version, address, fields) if in_segment else MemberState(False, version)
    )
    assert decode_member(encode_member(state)) == state
    assert split_key(member_key(segment, profile)) == (segment, profile)


@given(
    st.dictionaries(
        st.tuples(_text, _text), st.tuples(_versions, st.booleans(), _fields), max_size=4
    ),
    st.integers(0, 2**40),
    st.sampled_from(list(Applied)),
)
def test_address_state_round_trips(
    rows: dict[tuple[str, str], tuple[tuple[int, int], bool, Fields]],
    revision: int,
    applied: Applied,
) -> None:
    holders = {m: Holding(v, holds, f if holds else {}) for m, (v, holds, f) in rows.items()}
    state = AddressState(holders, revision, applied, b"\x01" * 8 if applied else b"")
    raw = encode_address(state)
    if raw is None:
        assert (holders, revision, applied) == ({}, 0, Applied.NOTHING)
    else:
        assert decode_address(raw) == state


@given(_text, _text, _text, _text, _versions, st.booleans(), _fields)
def test_claim_round_trips(
    list_id: str,
    address: str,
    segment: str,
    profile: str,
    version: tuple[int, int],
    holds: bool,
    fields: Fields,
) -> None:
    claim = Claim(list_id, address, (segment, profile), version, holds, fields)
    assert decode_claim(*encode_claim(claim)) == claim


@pytest.mark.parametrize("kind", ["reassert", "extra"])
def test_repairs_and_claims_share_the_claims_topic_without_confusion(kind: str) -> None:
    claim = Claim("repair", "ada@x.io", ("repair", "extra"), (1, 2), True, {"repair": 1}, 3)
    assert decode_claims_record(*encode_claim(claim)) == claim
    repair = Repair(LIST_A, "ada@x.io", kind)  # type: ignore[arg-type]
    key, value = encode_repair(repair)
    assert key == address_key(LIST_A, "ada@x.io")  # same key: same partition, same order
    assert decode_claims_record(key, value) == repair
    with pytest.raises(StateFormatError, match="claim: malformed"):
        decode_claim(key, value)  # what a release without repairs makes of one: refused
    with pytest.raises(StateFormatError, match="unknown repair"):
        decode_claims_record(key, value[:1] + msgspec.msgpack.encode({"repair": "drop"}))


def test_the_service_takes_claims_and_only_claims_the_typed_way() -> None:
    """`is_claim_value` (what `handle_claims` sends to `apply_encoded`) holds for every claim,
    and for neither a `Filled` nor a repair (those go to `decode_claims_record`)."""
    cases: list[tuple[bool, Fields]] = [(True, {"city": "Oslo"}), (True, {}), (False, {})]
    for holds, fields in cases:
        claim = Claim(LIST_A, "ada@x.io", (VIP, "p1"), (1, 2), holds, fields, 3)
        value = encode_claim(claim)[1]
        assert is_claim_value(value)
        row = decode_claim_row(value)
        assert (row.segment, row.profile, row.occurred_at_ms, row.holds) == (VIP, "p1", 1, holds)
    assert not is_claim_value(encode_filled(Filled(LIST_A, VIP, 0, 1))[1])
    assert not is_claim_value(encode_repair(Repair(LIST_A, "ada@x.io", "extra"))[1])


def test_equal_states_encode_to_equal_bytes_whatever_the_insertion_order() -> None:
    one = AddressState(
        {("s", "a"): Holding((1, 0), True, {"x": 1, "y": 2}), ("s", "b"): Holding((2, 0), False)}
    )
    two = AddressState(
        {("s", "b"): Holding((2, 0), False), ("s", "a"): Holding((1, 0), True, {"y": 2, "x": 1})}
    )
    assert encode_address(one) == encode_address(two)


def test_unknown_format_version_and_damage_are_refused() -> None:
    raw = encode_member(MemberState(False, (1, 2)))
    with pytest.raises(StateFormatError, match="format version 2"):
        decode_member(b"\x02" + raw[1:])
    with pytest.raises(StateFormatError, match="malformed"):
        decode_member(raw[:-1])
    with pytest.raises(StateFormatError, match="malformed"):
        decode_address(raw)  # a member state is not an address state
    with pytest.raises(StateFormatError):
        split_key(b"\x00\x09ab")


def test_empty_address_state_is_a_tombstone() -> None:
    assert encode_address(AddressState()) is None


def test_keys_of_one_segment_are_one_prefix_scan() -> None:
    store = DictStore()
    for segment, profile in [("vip", "b"), ("vip2", "a"), ("vip", "a"), ("vi", "pz")]:
        store.put(member_key(segment, profile), encode_member(MemberState(False, (0, 0))))
    assert [split_key(k) for k, _ in store.scan(segment_prefix("vip"))] == [
        ("vip", "a"),
        ("vip", "b"),
    ]
    assert address_key("l", "a") != address_key("la", "")  # the length prefix disambiguates


# -- the model-checked state machine --------------------------------------------------------

SEGMENTS = ("s1", "s2", "s3")
# s1 and s2 both feed L1 (a union), s2 also feeds L2; s3 feeds nothing until `attach_s3`.
LISTS_OF: dict[str, tuple[str, ...]] = {"s1": ("L1",), "s2": ("L1", "L2"), "s3": ()}
PROFILES = ("p1", "p2", "p3")
# Case variants of one address, and KELVIN SIGN next to ASCII k: another address.
ADDRESSES = ("a@x.io", " A@X.io", "b@x.io", "k@x.io", "K@x.io", "\u212a@x.io")
CITIES = ("Oslo", "Rome")


def model_normalise(address: str) -> str:
    """The contract's normalisation written out independently of the code under test."""
    return "".join(chr(ord(c) + 32) if "A" <= c <= "Z" else c for c in address.strip())


class MembershipMachine(RuleBasedStateMachine):
    """Any interleaving of input changes (late, tied and repeated ones included), restarts,
    stage-2 claims delivered in any order and re-delivered, a list attached later, and
    applied writes.

    The model keeps every input change; a member's state is its change with the highest
    (occurred_at, offset). Checked after every step: for every (list, address) with no claim in
    flight, stage 2's desired state equals the model's (active iff a member of a segment
    feeding the list is in with that address; the fields of the newest such member); the
    desired states emitted, taken in revision order, always equal the stored ones; `owed` is
    exactly where the stored desired state differs from what was applied.
    """

    def __init__(self) -> None:
        super().__init__()
        self.lists_of = dict(LISTS_OF)
        self.member_store = DictStore()
        self.address_store = DictStore()
        self._open_tables()
        self.offsets = itertools.count()
        self.inputs: list[ProfileChange] = []
        self.in_flight: list[Claim] = []
        self.delivered: list[Claim] = []
        self.seen: dict[tuple[str, str], Desired] = {}  # emitted, the latest per key
        #: what the list shows per key: (active, fields), fields None when not known
        self.applied: dict[tuple[str, str], tuple[bool, Fields | None]] = {}
        self.applications = 0

    def _open_tables(self) -> None:
        self.members = MemberTable(self.member_store, self.lists_of)
        self.addresses = AddressTable(self.address_store)

    # -- the model

    def model_lists(self) -> dict[str, dict[str, Fields]]:
        latest: dict[tuple[str, str], ProfileChange] = {}
        for change in self.inputs:
            key = (change.segment_id, change.profile_id)
            if key not in latest or change.version > latest[key].version:
                latest[key] = change
        newest: dict[tuple[str, str], tuple[tuple[int, int], tuple[str, str], Fields]] = {}
        for (segment, profile), change in latest.items():
            if not change.entered:
                continue
            assert change.address is not None
            address = model_normalise(change.address)
            for list_id in self.lists_of[segment]:
                candidate = (change.version, (segment, profile), change.fields)
                best = newest.get((list_id, address))
                if best is None or candidate[:2] > best[:2]:
                    newest[(list_id, address)] = candidate
        lists: dict[str, dict[str, Fields]] = {"L1": {}, "L2": {}, "L3": {}}
        for (list_id, address), (_, _, fields) in newest.items():
            lists[list_id][address] = fields
        return lists

    # -- rules

    @rule(
        segment=st.sampled_from(SEGMENTS),
        profile=st.sampled_from(PROFILES),
        entered=st.booleans(),
        at=st.integers(0, 4),
        address=st.sampled_from(ADDRESSES),
        city=st.sampled_from(CITIES),
    )
    def change(
        self, segment: str, profile: str, entered: bool, at: int, address: str, city: str
    ) -> None:
        change = ProfileChange(
            segment, profile, entered, at, next(self.offsets), address, {"city": city}
        )
        newest = max(
            (c.version for c in self.inputs if (c.segment_id, c.profile_id) == (segment, profile)),
            default=None,
        )
        # Both ways, alternately: claims as objects, and encoded as stage 1 sends them.
        if change.offset % 2:
            verdict = self.members.apply(change)
        else:
            records: list[tuple[bytes, bytes]] = []
            accepted = self.members.apply_encoded(change, records)
            verdict = Verdict(accepted, [decode_claim(key, value) for key, value in records])
        assert verdict.accepted == (newest is None or change.version > newest)
        assert verdict.accepted or not verdict.claims
        self.inputs.append(change)
        self.in_flight += verdict.claims

    @precondition(lambda self: any(c.entered for c in self.inputs))
    @rule(data=st.data(), at=st.integers(0, 4))
    def enter_again(self, data: st.DataObject, at: int) -> None:
        """An entry repeated with the same address and fields (a profile update that touches
        nothing the lists show), at any time: later, tied or late."""
        entry = data.draw(st.sampled_from([c for c in self.inputs if c.entered]))
        self.change(
            entry.segment_id,
            entry.profile_id,
            True,
            at,
            entry.address or "",
            str(entry.fields["city"]),
        )

    @precondition(lambda self: self.inputs)
    @rule(data=st.data())
    def input_read_again(self, data: st.DataObject) -> None:
        """A record read again (restart, rebalance): same offset, so never newer."""
        change = data.draw(st.sampled_from(self.inputs))
        assert self.members.apply(change) == Verdict(False, [])

    @precondition(lambda self: self.in_flight)
    @rule(data=st.data())
    def deliver(self, data: st.DataObject) -> None:
        """One claim in flight, any of them: stage-2 input in any order."""
        claim = self.in_flight.pop(data.draw(st.integers(0, len(self.in_flight) - 1)))
        self._apply(claim)
        self.delivered.append(claim)

    @precondition(lambda self: self.delivered)
    @rule(data=st.data())
    def deliver_again(self, data: st.DataObject) -> None:
        """A claim delivered before, delivered again (at-least-once repartition writes)."""
        self._apply(data.draw(st.sampled_from(self.delivered)))

    @rule()
    def deliver_all(self) -> None:
        while self.in_flight:
            claim = self.in_flight.pop(0)
            self._apply(claim)
            self.delivered.append(claim)

    @rule()
    def restart(self) -> None:
        """Both stores rebuilt from their bytes (a changelog restore), new tables over them."""
        self.member_store = DictStore(dict(self.member_store.data))
        self.address_store = DictStore(dict(self.address_store.data))
        self._open_tables()

    @precondition(lambda self: not self.lists_of["s3"])
    @rule()
    def attach_s3(self) -> None:
        """A destination added later: s3 now feeds L3, filled from stage 1's members."""
        self.lists_of["s3"] = ("L3",)
        self._open_tables()
        self.in_flight += list(self.members.backfill("s3", "L3"))

    @precondition(lambda self: self.seen)
    @rule(data=st.data())
    def write(self, data: st.DataObject) -> None:
        """The flusher applies the latest desired state of one key."""
        key = data.draw(st.sampled_from(sorted(self.seen)))
        desired = self.seen[key]
        self.addresses.record_applied(
            desired, Applied.ACTIVE if desired.active else Applied.REMOVED
        )
        self.applied[key] = (desired.active, desired.fields)

    @rule(
        list_id=st.sampled_from(("L1", "L2", "L3")),
        address=st.sampled_from(ADDRESSES),
        kind=st.sampled_from(("reassert", "extra")),
    )
    def repair(self, list_id: str, address: str, kind: str) -> None:
        """A repair of `cmsync reconcile`, taken whenever: it re-offers what is desired now
        (reassert: only if active; extra: only if not), never changing it, and leaves it owed."""
        key = (list_id, model_normalise(address))
        before = self.addresses.desired(*key)
        repaired = self.addresses.repair(*key, kind)  # type: ignore[arg-type]
        if before.active != (kind == "reassert"):
            assert repaired is None
            return
        assert repaired is not None
        assert (repaired.active, repaired.fields) == (before.active, before.fields)
        assert repaired.revision == before.revision + 1
        self.seen[key] = repaired
        if kind == "reassert":
            self.applied.pop(key, None)  # unknown: owed
        else:
            self.applied[key] = (True, None)  # active in the list, fields not known

    def _apply(self, claim: Claim) -> None:
        # Both ways in, alternately: the claim as stage 1 makes it, and as the repartition
        # topic carries it (the service's path).
        self.applications += 1
        if self.applications % 2:
            desired = self.addresses.apply(claim)
        else:
            desired, occurred_at_ms = self.addresses.apply_encoded(*encode_claim(claim))
            assert occurred_at_ms == claim.version[0]
        if desired is None:
            return
        # the origin (not part of the equality of desired states) is the newest holder's
        assert desired.origin == self.addresses.desired(desired.list_id, desired.address).origin
        key = (desired.list_id, desired.address)
        previous = self.seen.get(key)
        if previous is None:
            assert desired.active  # a key starts not active: the first change is to active
        else:
            assert desired.revision == previous.revision + 1
            assert (desired.active, desired.fields) != (previous.active, previous.fields)
        self.seen[key] = desired

    # -- invariants

    def _keys(self) -> list[tuple[str, str]]:
        addresses = sorted({model_normalise(a) for a in ADDRESSES})
        return [(list_id, a) for list_id in ("L1", "L2", "L3") for a in addresses]

    @invariant()
    def lists_equal_segments_where_nothing_is_in_flight(self) -> None:
        in_flight = {(c.list_id, c.address) for c in self.in_flight}
        model = self.model_lists()
        for list_id, address in self._keys():
            if (list_id, address) in in_flight:
                continue
            desired = self.addresses.desired(list_id, address)
            expected = model[list_id].get(address)
            assert desired.active == (expected is not None), (list_id, address)
            if expected is not None:
                assert desired.fields == expected

    @invariant()
    def stored_values_are_in_the_one_format(self) -> None:
        """Stage 2's fast path writes the bytes `encode_address` writes for the same state."""
        for raw in self.address_store.data.values():
            assert encode_address(decode_address(raw)) == raw
            assert encode_address_rows(decode_address_rows(raw)) == raw

    @invariant()
    def emitted_states_are_the_stored_ones(self) -> None:
        for list_id, address in self._keys():
            stored = self.addresses.desired(list_id, address)
            emitted = self.seen.get((list_id, address))
            if emitted is None:
                assert not stored.active
                assert stored.revision == 0
            else:
                assert emitted == stored

    @invariant()
    def owed_is_what_differs_from_what_was_applied(self) -> None:
        for list_id in ("L1", "L2", "L3"):
            owed = {d.address for d in self.addresses.owed(list_id)}
            expected = set()
            for (key_list, address), desired in self.seen.items():
                if key_list != list_id:
                    continue
                applied_view = self.applied.get((key_list, address), (False, {}))
                if applied_view != (desired.active, desired.fields):
                    expected.add(address)
            assert owed == expected


TestMembershipMachine = MembershipMachine.TestCase
TestMembershipMachine.settings = settings(max_examples=200, stateful_step_count=50, deadline=None)
