"""The independent model the demo and the fault suite verify against, and the comparison.

If these were wrong, a broken sync could pass the demo: so they are tested on their own.
"""

from __future__ import annotations

from consumer.devtools.rig import DEMO_DESTINATIONS, compare, destinations_toml
from consumer.devtools.rig import DEMO_SEGMENTS as SEGMENTS
from consumer.devtools.synthetic import (
    Produced,
    StreamGenerator,
    expected_list,
    expected_state,
    fewest_requests,
    normalise_address,
    replay,
    stream_facts,
)
from consumer.events import MembershipChange, decode


def rec(email: str, entered: bool, at: int, seg: str = "s", city: str = "Oslo") -> Produced:
    profile: dict[str, object] = {
        "id": email,
        "email": email,
        "full_name": "N",
        "city": city,
        "tier": "gold",
        "interests": [],
    }
    return Produced(b"k", b"v", seg, email, entered, at, profile)


def test_latest_change_in_event_time_wins_not_the_last_delivered() -> None:
    records = [
        rec("a@x.io", True, 10),
        rec("a@x.io", False, 5),
        rec("b@x.io", False, 1),
        rec("b@x.io", True, 2),
        rec("c@x.io", True, 1, seg="other"),
    ]
    expected = expected_state(records, "s")
    assert set(expected.active) == {"a@x.io", "b@x.io"}
    assert expected.inactive == frozenset()
    assert fewest_requests(records, "s") == (1, 0)


def test_self_unsubscribed_stay_out_unless_always_and_reentered_after() -> None:
    records = [rec("a@x.io", True, 1), rec("b@x.io", True, 1), rec("a@x.io", True, 9, city="Rome")]
    split = 2  # a's second entry (new fields: written) is delivered after they unsubscribed
    for policy, active in (("deleted-only", set()), ("never", set()), ("always", {"a@x.io"})):
        got = expected_state(
            records,
            "s",
            self_unsubscribed={"a@x.io", "b@x.io"},
            unsubscribed_at=split,
            resubscribe=policy,
        )
        assert set(got.active) == active, policy
        assert got.inactive == {"a@x.io", "b@x.io"} - active


def member(email: str, state: str = "Active", city: str = "Oslo") -> dict[str, object]:
    return {
        "EmailAddress": email,
        "Name": "N",
        "State": state,
        "CustomFields": [{"Key": "City", "Value": city}, {"Key": "Tier", "Value": "gold"}],
    }


def test_compare_finds_every_kind_of_difference() -> None:
    expected = expected_state([rec("a@x.io", True, 1), rec("b@x.io", False, 1)], "s")
    good = {"a@x.io": member("a@x.io"), "b@x.io": member("b@x.io", "Deleted")}
    assert compare(expected, good) == []
    assert compare(expected, {"b@x.io": member("b@x.io", "Deleted")}) == ["1 missing or inactive"]
    assert compare(expected, {**good, "b@x.io": member("b@x.io")}) == ["1 active but should not be"]
    assert compare(expected, {**good, "z@x.io": member("z@x.io")}) == [
        "1 active but never in the segment"
    ]
    assert compare(expected, {**good, "a@x.io": member("a@x.io", city="Rome")}) == ["1 wrong City"]


def test_generated_stream_decodes_and_has_what_the_demo_promises() -> None:
    records = StreamGenerator(seed=3, profiles=1500, segments=SEGMENTS).generate()
    invalid = [r for r in records if r.invalid]
    valid = [r for r in records if not r.invalid]
    assert {r.invalid for r in invalid} >= {
        "invalid_json",
        "schema",
        "missing_email",
        "invalid_email",
    }
    assert all(isinstance(decode(r.value), MembershipChange) for r in valid)
    assert len({id(r) for r in valid}) < len(valid)  # duplicates: the same record delivered twice
    late = sum(
        1
        for i, r in enumerate(valid)
        if any(
            o.email == r.email
            and o.segment_id == r.segment_id
            and o.occurred_at_ms > r.occurred_at_ms
            for o in valid[max(0, i - 200) : i]
        )
    )
    assert late > 0  # some older changes are delivered after newer ones
    assert any(not r.entered for r in valid)


# ------------------------------------------------------------------------------- the model


def ch(
    pid: str, email: str, entered: bool, at: int, seg: str = "s", city: str = "Oslo"
) -> Produced:
    """One change of profile `pid` (its Kafka key) with address `email`."""
    profile: dict[str, object] = {
        "id": pid,
        "email": email,
        "full_name": f"Name {pid}",
        "city": city,
        "tier": "gold",
        "interests": [],
    }
    return Produced(pid.encode(), b"v", seg, normalise_address(email), entered, at, profile)


def test_an_address_change_removes_the_old_address() -> None:
    records = [ch("p1", "old@x.io", True, 1), ch("p1", "new@x.io", True, 2, city="Rome")]
    expected = expected_list(records, "s")
    assert set(expected.active) == {"new@x.io"}
    assert expected.active["new@x.io"]["city"] == "Rome"
    assert expected.inactive == {"old@x.io"}
    assert stream_facts(records).address_changes == 1
    # ... unless another member still holds it.
    kept = expected_list([*records, ch("p2", "OLD@x.io ", True, 1)], "s")
    assert set(kept.active) == {"old@x.io", "new@x.io"}


def test_a_shared_address_stays_until_its_last_holder_leaves() -> None:
    ann = ch("ann", "home@x.io", True, 1, city="Oslo")
    bob = ch("bob", " Home@X.io", True, 2, city="Rome")
    both = expected_list([ann, bob], "s")
    assert set(both.active) == {"home@x.io"}
    assert both.active["home@x.io"]["city"] == "Rome"  # the newest holder's fields
    bob_left = expected_list([ann, bob, ch("bob", "home@x.io", False, 3)], "s")
    assert bob_left.active["home@x.io"]["city"] == "Oslo"  # ann still holds it
    all_left = [ann, bob, ch("bob", "home@x.io", False, 3), ch("ann", "home@x.io", False, 4)]
    gone = expected_list(all_left, "s")
    assert gone.active == {}
    assert gone.inactive == {"home@x.io"}
    assert stream_facts(all_left).shared_addresses == 1


def test_a_late_event_is_ignored_also_across_a_split() -> None:
    records = [
        ch("p1", "a@x.io", True, 10),
        ch("p2", "b@x.io", False, 10),
        ch("p1", "a@x.io", False, 5),  # older than the entry already delivered
        ch("p2", "b@x.io", True, 5),
    ]
    expected = expected_list(records, "s")
    assert set(expected.active) == {"a@x.io"}
    assert expected.inactive == {"b@x.io"}
    facts = stream_facts(records, after=2)
    assert (facts.late, facts.late_across) == (2, 2)
    assert replay(records).late == [2, 3]


def test_a_list_fed_by_two_segments_holds_their_union() -> None:
    records = [
        ch("p1", "both@x.io", True, 1, seg="a"),
        ch("p1", "both@x.io", True, 1, seg="b"),
        ch("p2", "only-b@x.io", True, 1, seg="b"),
        ch("p3", "other@x.io", True, 1, seg="c"),
        ch("p1", "both@x.io", False, 5, seg="a"),
    ]
    union = expected_list(records, ("a", "b"))
    assert set(union.active) == {"both@x.io", "only-b@x.io"}  # p1 is still in b
    assert expected_list(records, "a").active == {}
    out_of_b = expected_list([*records, ch("p1", "both@x.io", False, 6, seg="b")], ("a", "b"))
    assert set(out_of_b.active) == {"only-b@x.io"}
    assert out_of_b.inactive == {"both@x.io"}
    assert fewest_requests(records, ("a", "b")) == (1, 0)


def test_a_tie_on_occurred_at_goes_to_the_later_record() -> None:
    entry, exit_ = ch("p1", "a@x.io", True, 5), ch("p1", "a@x.io", False, 5)
    assert expected_list([entry, exit_], "s").active == {}
    assert set(expected_list([exit_, entry], "s").active) == {"a@x.io"}
    # With the broker's offsets: the higher offset wins, whatever the delivery order says.
    assert expected_list([exit_, entry], "s", offsets=[9, 3]).active == {}
    # Between holders of one address: the higher (occurred_at, offset), then (segment, profile).
    ann, bob = ch("ann", "h@x.io", True, 5, city="Oslo"), ch("bob", "h@x.io", True, 5, city="Rome")
    assert expected_list([bob, ann], "s").active["h@x.io"]["city"] == "Oslo"
    assert expected_list([bob, ann], "s", offsets=[1, 1]).active["h@x.io"]["city"] == "Rome"


def test_addresses_are_folded_in_ascii_only() -> None:
    assert normalise_address("  Ada@Example.COM ") == "ada@example.com"
    assert normalise_address("\u212aate@x.io") != "kate@x.io"  # KELVIN SIGN stays itself
    records = [ch("kate", "kate@x.io", True, 1), ch("kelvin", "\u212aate@x.io", False, 2)]
    assert set(expected_list(records, "s").active) == {"kate@x.io"}


def test_always_resubscribes_only_what_the_sync_writes_again() -> None:
    records = [
        ch("p1", "a@x.io", True, 1),
        ch("p2", "b@x.io", True, 1),
        ch("p3", "c@x.io", True, 1),
    ]
    later = [
        ch("p1", "a@x.io", True, 5, city="Oslo"),  # the same written fields: nothing to write
        ch("p2", "b@x.io", True, 5, city="Rome"),  # new fields: written (and resubscribed)
        ch("p3", "c@x.io", False, 5),  # out, then in again as before: written twice
        ch("p3", "c@x.io", True, 6),
    ]
    got = expected_list(
        records + later,
        "s",
        self_unsubscribed={"a@x.io", "b@x.io", "c@x.io"},
        unsubscribed_at=len(records),
        resubscribe="always",
        written_fields=("full_name", "city"),
    )
    assert set(got.active) == {"b@x.io", "c@x.io"}
    assert got.inactive == {"a@x.io"}


def test_the_opt_in_stream_has_the_hard_cases_and_the_default_has_none() -> None:
    def opt_in(**settings: bool) -> StreamGenerator:
        return StreamGenerator(
            seed=3,
            profiles=1500,
            segments=SEGMENTS,
            address_change_rate=0.1,
            household_rate=0.1,
            straggler_rate=0.05,
            ordered=settings.get("ordered", False),
            late_rate=0.0 if settings.get("ordered") else 0.02,
        )

    records = opt_in().generate()
    valid = [r for r in records if not r.invalid]
    assert all(isinstance(decode(r.value), MembershipChange) for r in valid)
    facts = stream_facts(records, after=int(len(records) * 0.9))
    assert facts.address_changes > 20
    assert facts.shared_addresses > 20
    assert facts.late_across > 10  # the stragglers come last: after any restart at 90 %
    plain = StreamGenerator(seed=3, profiles=1500, segments=SEGMENTS).generate()
    plain_facts = stream_facts(plain)
    assert (plain_facts.address_changes, plain_facts.shared_addresses) == (0, 0)
    ordered = opt_in(ordered=True).generate()
    assert stream_facts(ordered).late == 0
    assert stream_facts(ordered).address_changes > 20


def test_the_demo_has_a_list_fed_by_two_segments() -> None:
    union = [d for d in DEMO_DESTINATIONS if d.more_segments]
    assert len(union) == 1
    text = destinations_toml(union, {union[0].name: "0" * 32})
    assert f'segment_ids = ["{union[0].segment_id}", "{union[0].more_segments[0]}"]' in text
    routed = {s for d in DEMO_DESTINATIONS for s in (d.segment_id, *d.more_segments)}
    assert {s.segment_id for s in SEGMENTS} - routed  # one segment still has no list
