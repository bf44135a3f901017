"""What `cmsync reconcile` calls drift, decided without I/O: which held addresses that the list
does not show Active are protected (the README's consent table), and what counts as stale."""

from __future__ import annotations

import pytest

from consumer.campaign_monitor.client import CustomField, SubscriberRow
from consumer.consent import OptOuts
from consumer.devtools.rig import load_destinations
from consumer.fieldtypes import FieldType
from consumer.membership.model import AddressState, Holding
from consumer.reconcile import is_stale, left_alone
from consumer.settings import Destination

ADA = "ada@example.com"
LIST = "0123456789abcdef0123456789abcdef"


def destination(resubscribe: str, removal: str = "delete") -> Destination:
    toml = (
        f'[[destination]]\nname = "news"\nsegment_id = "s"\nlist_id = "{LIST}"\n'
        f'email_field = "email"\nresubscribe = "{resubscribe}"\nremoval = "{removal}"\n'
    )
    return load_destinations(toml, "key")[0]


def held(removed_by_sync: bool) -> AddressState:
    return AddressState({("s", "p"): Holding((1, 1), True)}, 1, removed_by_sync=removed_by_sync)


#: (what the list shows, removed by the sync) -> protected under never / deleted-only / always
CASES = [
    ("absent", False, (False, False, False)),
    ("Deleted", False, (True, True, False)),  # deleted by hand: footnote 2
    ("Deleted", True, (True, False, False)),  # the sync's own delete comes back
    ("Unsubscribed", False, (True, True, False)),
    ("Bounced", True, (True, True, False)),  # bounced since: theirs now
    ("suppressed", True, (True, True, False)),
]


@pytest.mark.parametrize(("shows", "by_sync", "protected"), CASES)
def test_protected_follows_the_consent_table(
    shows: str, by_sync: bool, protected: tuple[bool, bool, bool]
) -> None:
    opted = OptOuts(
        unsubscribed=frozenset({ADA}) if shows == "Unsubscribed" else frozenset(),
        bounced=frozenset({ADA}) if shows == "Bounced" else frozenset(),
        suppressed=frozenset({ADA}) if shows == "suppressed" else frozenset(),
    )
    found = tuple(
        left_alone(destination(policy), ADA, held(by_sync), shows == "Deleted", opted)
        for policy in ("never", "deleted-only", "always")
    )
    assert found == protected


def test_the_syncs_own_unsubscribe_comes_back_under_deleted_only() -> None:
    opted = OptOuts(unsubscribed=frozenset({ADA}))
    dest = destination("deleted-only", removal="unsubscribe")
    assert not left_alone(dest, ADA, held(True), False, opted)
    assert left_alone(dest, ADA, held(False), False, opted)


TYPES = {
    "city": FieldType("City", "Text"),
    "born": FieldType("Born", "Date"),
    "tier": FieldType("Tier", "MultiSelectOne", ("Gold", "Silver")),
    "score": FieldType("Score", "Number"),
}


def member(name: str = "Ada", **fields: str | list[str]) -> dict[str, object]:
    rows = []
    for key, value in fields.items():
        for v in value if isinstance(value, list) else [value]:
            rows.append({"Key": f"[{key}]", "Value": v})
    return {"EmailAddress": ADA, "Name": name, "CustomFields": rows}


def row(name: str | None = "Ada", *fields: CustomField) -> SubscriberRow:
    return SubscriberRow(ADA, name, tuple(fields))


def test_a_member_as_the_sync_writes_it_is_not_stale() -> None:
    shown = member(City="Oslo", Born="1815-12-10", Tier="gold", Score="1.50")
    wanted = row(
        "Ada",
        CustomField("City", "Oslo"),
        CustomField("Born", "1815/12/10"),
        CustomField("Tier", "Gold"),
        CustomField("Score", "1.5"),
    )
    assert not is_stale(wanted, shown, TYPES)
    assert not is_stale(row(None), member("Someone else"), TYPES)  # the name is not written


@pytest.mark.parametrize(
    ("wanted", "shown"),
    [
        (row("Ada Lovelace"), member("Ada")),
        (row("Ada", CustomField("City", "Oslo")), member(City="Rome")),
        (row("Ada", CustomField("City", "", clear=True)), member(City="Rome")),
        (row("Ada", CustomField("City", "Oslo")), member()),
        (row("Ada", CustomField("Tier", "Gold")), member(Tier=["Gold", "Silver"])),
        (row("Ada", CustomField("Score", "2")), member(Score="1.5")),
    ],
)
def test_other_values_are_stale(wanted: SubscriberRow, shown: dict[str, object]) -> None:
    assert is_stale(wanted, shown, TYPES)
