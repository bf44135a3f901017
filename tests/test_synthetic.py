"""The independent model the demo and the fault suite verify against, and the comparison.

If these were wrong, a broken sync could pass the demo: so they are tested on their own.
"""

from __future__ import annotations

from consumer.devtools.rig import DEMO_SEGMENTS as SEGMENTS
from consumer.devtools.rig import compare
from consumer.devtools.synthetic import Produced, StreamGenerator, expected_state, fewest_requests
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
    records = [rec("a@x.io", True, 1), rec("b@x.io", True, 1), rec("a@x.io", True, 9)]
    split = 2  # a's second entry is delivered after the people unsubscribed
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
