"""Destination lifecycle in the membership state (issue 12), pure: backfill pages and their
progress, fitting stage 2 to new routes, and a list's fill completing.

The state machine at the end reconfigures, backfills page by page, restarts and applies live
changes in any interleaving, and checks each configured list (as a fake Campaign Monitor list
that takes every desired state offered) against a brute-force model: once no backfill is
under way, every configured list holds exactly the addresses of its segments' members.
"""

from __future__ import annotations

import itertools

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from consumer.membership import AddressTable, Applied, Claim, Desired, DictStore, MemberTable
from consumer.membership.codec import backfill_key, decode_claims_record, encode_filled
from consumer.membership.model import Filled, ProfileChange

SEGMENTS = ("s1", "s2", "s3")
LISTS = ("L1", "L2")


def change(
    table: MemberTable, segment: str, profile: str, at: int, address: str | None
) -> list[Claim]:
    entered = address is not None
    return table.apply(ProfileChange(segment, profile, entered, at, at, address, {})).claims


def test_backfill_pages_resume_after_their_progress_and_end_done() -> None:
    store = DictStore()
    table = MemberTable(store, {"s1": ()})
    for i in range(7):
        change(table, "s1", f"p{i}", 1, f"p{i}@x.io")
    change(table, "s1", "p3", 2, None)  # left: no hold
    change(table, "s2", "q", 1, "q@x.io")  # another segment: not in this backfill

    table = MemberTable(store, {"s1": ("L",)})
    first, done = table.backfill_page("s1", "L", 3)
    assert [c.member[1] for c in first] == ["p0", "p1", "p2"]
    assert not done
    assert not table.backfilled("s1", "L")
    # a restart: the progress is in the store (and so in the changelog) with the page
    table = MemberTable(DictStore(dict(store.data)), {"s1": ("L",)})
    second, done = table.backfill_page("s1", "L", 3)
    assert [c.member[1] for c in second] == ["p4", "p5"]
    assert not done
    third, done = table.backfill_page("s1", "L", 3)
    assert [c.member[1] for c in third] == ["p6"]
    assert done
    assert table.backfill_page("s1", "L", 3) == ([], True)
    assert table.backfilled("s1", "L")
    assert all(c.holds and c.list_id == "L" for c in first + second + third)
    assert list(table.backfills()) == [("s1", "L")]
    assert next(iter(table.members("s1")))[0] == "p0"  # progress records are no members

    table.forget_backfill([("s1", "L")])
    assert not table.backfilled("s1", "L")
    assert table._store.get(backfill_key("s1", "L")) is None


def test_a_backfill_sent_twice_changes_nothing_in_stage_2() -> None:
    members, addresses = MemberTable(DictStore(), {"s1": ("L",)}), AddressTable(DictStore())
    for claim in change(members, "s1", "ada", 1, "ada@x.io"):
        addresses.apply(claim)
    holds, _ = members.backfill_page("s1", "L", 10)
    assert [addresses.apply(claim) for claim in holds] == [None]


def test_filled_records_round_trip_and_are_told_from_claims() -> None:
    record = Filled("L", "s1", 2, 12)
    assert decode_claims_record(*encode_filled(record)) == record


def test_refit_drops_the_holders_of_a_segment_a_list_no_longer_takes() -> None:
    members = MemberTable(DictStore(), {"s1": ("L",), "s2": ("L",)})
    addresses = AddressTable(DictStore())
    addresses.refit({"L": frozenset({"s1", "s2"})})
    for claim in [
        *change(members, "s1", "ada", 1, "ada@x.io"),
        *change(members, "s2", "bob", 1, "bob@x.io"),
        *change(members, "s2", "ada", 1, "ada@x.io"),  # ada is in both
    ]:
        addresses.apply(claim)
    changed = addresses.refit({"L": frozenset({"s1"})})
    assert [(d.address, d.active) for d in changed] == [("bob@x.io", False)]
    assert {d.address for d in addresses.addresses("L") if d.active} == {"ada@x.io"}
    assert addresses.refit({"L": frozenset({"s1"})}) == []  # fitted: nothing read again


def test_a_list_configured_again_owes_removals_only_once_it_is_filled() -> None:
    """Removed while Ada left, added back: Ada's address is no one's, but it is owed only
    once every backfill of the list reported complete (until then a hold may be on its way)."""
    members, addresses = MemberTable(DictStore(), {"s1": ("L",)}), AddressTable(DictStore())
    addresses.refit({"L": frozenset({"s1"})})
    for claim in change(members, "s1", "ada", 1, "ada@x.io"):
        desired = addresses.apply(claim)
        assert desired is not None
        addresses.record_applied(desired, Applied.ACTIVE)
    addresses.refit({})  # removed: nobody holds any more, the applied state stays
    change(MemberTable(members._store, {}), "s1", "ada", 2, None)  # left meanwhile: no claim
    addresses.refit({"L": frozenset({"s1"})})  # configured again
    assert list(addresses.owed("L")) == []
    assert addresses.filled(Filled("L", "s1", 0, 2)) == []  # one of two partitions
    assert list(addresses.owed("L")) == []
    swept = addresses.filled(Filled("L", "s1", 1, 2))
    assert [(d.address, d.active) for d in swept] == [("ada@x.io", False)]
    assert addresses.filled(Filled("L", "s1", 1, 2)) == []  # told twice: once
    assert [d.address for d in addresses.owed("L")] == ["ada@x.io"]


class Lifecycle(RuleBasedStateMachine):
    """One input partition, one claims partition; Campaign Monitor as a set per list that
    takes every desired state offered for a configured list, in order."""

    def __init__(self) -> None:
        super().__init__()
        self.member_store = DictStore()
        self.address_store = DictStore()
        self.routes: dict[str, frozenset[str]] = {"L1": frozenset({"s1"})}
        self.clock = itertools.count(1)
        self.model: dict[tuple[str, str], str | None] = {}  # member -> address while in
        self.lists: dict[str, set[str]] = {name: set() for name in LISTS}
        self.pending: list[tuple[str, str]] = []  # backfills under way: (segment, list)
        self.open_tables()

    # -- the service's moves ------------------------------------------------------------------
    def lists_of(self) -> dict[str, tuple[str, ...]]:
        out: dict[str, list[str]] = {}
        for list_id, segments in sorted(self.routes.items()):
            for segment in sorted(segments):
                out.setdefault(segment, []).append(list_id)
        return {segment: tuple(lists) for segment, lists in out.items()}

    def open_tables(self) -> None:
        """New tables over the stores (a restart or a reload): fit, forget, backfill."""
        self.members = MemberTable(self.member_store, self.lists_of())
        self.addresses = AddressTable(self.address_store)
        pairs = {(s, list_id) for list_id, segs in self.routes.items() for s in segs}
        self.members.forget_backfill([p for p in self.members.backfills() if p not in pairs])
        self.offer(self.addresses.refit(self.routes))
        self.pending = sorted(p for p in pairs if not self.members.backfilled(*p))

    def offer(self, desired: list[Desired]) -> None:
        for d in desired:
            if d.list_id not in self.routes:
                continue  # no destination: nothing is written
            if d.active:
                self.lists[d.list_id].add(d.address)
            else:
                self.lists[d.list_id].discard(d.address)
            outcome = Applied.ACTIVE if d.active else Applied.REMOVED
            self.addresses.record_applied(d, outcome)

    def deliver(self, claims: list[Claim]) -> None:
        for claim in claims:
            desired = self.addresses.apply(claim)
            if desired is not None:
                self.offer([desired])

    # -- rules --------------------------------------------------------------------------------
    @rule(
        segment=st.sampled_from(SEGMENTS),
        profile=st.sampled_from(("ann", "bob", "cy")),
        address=st.one_of(st.none(), st.sampled_from(("a@x.io", "b@x.io", "home@x.io"))),
    )
    def live_change(self, segment: str, profile: str, address: str | None) -> None:
        self.deliver(change(self.members, segment, profile, next(self.clock), address))
        self.model[(segment, profile)] = address

    @rule(
        routes=st.dictionaries(
            st.sampled_from(LISTS),
            st.frozensets(st.sampled_from(SEGMENTS), min_size=1),
            min_size=1,
        )
    )
    def reconfigure(self, routes: dict[str, frozenset[str]]) -> None:
        self.routes = routes
        self.open_tables()

    @rule()
    def restart(self) -> None:
        self.member_store = DictStore(dict(self.member_store.data))
        self.address_store = DictStore(dict(self.address_store.data))
        self.open_tables()
        for list_id in self.routes:
            self.offer(list(self.addresses.owed(list_id)))

    @precondition(lambda self: self.pending)
    @rule(page=st.integers(1, 3))
    def backfill_page(self, page: int) -> None:
        segment, list_id = self.pending[0]
        claims, done = self.members.backfill_page(segment, list_id, page)
        self.deliver(claims)
        if done:
            self.pending.pop(0)
            self.offer(self.addresses.filled(Filled(list_id, segment, 0, 1)))

    # -- what must hold -----------------------------------------------------------------------
    @invariant()
    def lists_equal_their_segments_once_filled(self) -> None:
        if self.pending:
            return
        for list_id, segments in self.routes.items():
            expected = {
                address
                for (segment, _), address in self.model.items()
                if segment in segments and address is not None
            }
            assert self.lists[list_id] == expected, list_id


TestLifecycle = Lifecycle.TestCase
TestLifecycle.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
