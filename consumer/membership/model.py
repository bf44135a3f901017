"""The values the two stages keep and exchange (plain data; the rules live in the tables).

Personal data (addresses, profile fields) is kept out of every ``repr``: these objects may reach
a log line through an exception or a debugger.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Literal, NamedTuple

__all__ = [
    "AddressState",
    "Applied",
    "Claim",
    "Desired",
    "DriftFound",
    "FieldValue",
    "Fields",
    "Filled",
    "Holding",
    "Member",
    "MemberState",
    "Origin",
    "ProfileChange",
    "Repair",
    "RepairKind",
    "Verdict",
    "Version",
]

#: What decides between two changes of one (segment, profile): ``(occurred_at_ms, offset)``.
#: The later event time wins; on a tie the later offset (a profile's changes share one input
#: partition, keyed by profile, so its offsets are comparable).
Version = tuple[int, int]
#: Who holds an address: ``(segment_id, profile_id)``. One profile in two segments feeding one
#: list is two members, so leaving one segment keeps the address while it is in the other.
Member = tuple[str, str]
#: A profile field's value, as the event schema allows it (see ``consumer.events.ProfileValue``).
FieldValue = str | int | float | bool | None | list[str]
#: The profile fields a list is written with (profile field name → value). The caller decides
#: which fields those are (the ones the segment's destinations map); the state only keeps them.
Fields = dict[str, FieldValue]


@dataclass(frozen=True, slots=True)
class ProfileChange:
    """One decoded input event, as stage 1 takes it.

    ``address`` is required when ``entered`` (the caller dead-letters an entry without a usable
    address); stage 1 normalises it. On an exit it is not used: the member releases the address
    it held, whatever the exit says.
    """

    segment_id: str
    profile_id: str
    entered: bool
    occurred_at_ms: int
    offset: int
    address: str | None = field(default=None, repr=False)
    fields: Fields = field(default_factory=dict, repr=False)

    @property
    def version(self) -> Version:
        return (self.occurred_at_ms, self.offset)


@dataclass(frozen=True, slots=True)
class MemberState:
    """Stage 1's state of one (segment, profile): its deciding change.

    ``address`` is None and ``fields`` empty exactly when the profile is out. An out state is
    kept (not deleted): it is what makes a late entry older than the exit be ignored.
    """

    in_segment: bool
    version: Version
    address: str | None = field(default=None, repr=False)
    fields: Fields = field(default_factory=dict, repr=False)


@dataclass(frozen=True, slots=True)
class Claim:
    """Stage 1 → stage 2, keyed by (list_id, address): ``member`` holds the address (with
    ``fields``) or releases it, as of ``version`` (the member's deciding change).

    Per (list, address, member) the claim with the highest version is the truth; claims may be
    delivered in any order and any number of times.
    """

    list_id: str
    address: str = field(repr=False)
    member: Member
    version: Version
    holds: bool
    fields: Fields = field(default_factory=dict, repr=False)
    #: the input partition of the member's change (with ``version``'s offset: where it is)
    partition: int = 0


#: What a repair asks of stage 2 (`cmsync reconcile`): ``reassert`` the desired state of an
#: address the list shows wrongly (missing, or stale fields), or remove an ``extra`` address that
#: is active in the list although no member holds it.
RepairKind = Literal["reassert", "extra"]


@dataclass(frozen=True, slots=True)
class Repair:
    """`cmsync reconcile` → stage 2, keyed like a claim: re-apply what is desired *now* for
    (list_id, address). It carries no value to write, so it can never override a change newer
    than the reconcile's reading: stage 2 takes it in order with the claims of that key, and
    decides from the state as it is then (`AddressTable.repair`)."""

    list_id: str
    address: str = field(repr=False)
    kind: RepairKind


class DriftFound(NamedTuple):
    """`cmsync reconcile` → the service, once per destination it repaired: how many addresses
    of ``list_id``'s list it found in each class (missing, extra, stale, protected), counts
    only. Keyed by the list, so one owner exports it (`cmsync_drift_found`)."""

    list_id: str
    counts: dict[str, int]


class Verdict(NamedTuple):
    """What stage 1 made of a change: ``accepted`` False means it was not newer than the
    deciding change (late, or read again) and changed nothing; ``claims`` go to stage 2."""

    accepted: bool
    claims: list[Claim]


class Filled(NamedTuple):
    """Stage 1 → every stage 2 partition: the backfill of ``list_id`` from ``segment_id``'s
    members of input partition ``partition`` (of ``partitions``) is complete, every hold of it
    sent before this record. Once a list has it from every partition of every segment feeding
    it, stage 2 knows who holds none of its addresses any more (`AddressTable.filled`)."""

    list_id: str
    segment_id: str
    partition: int
    partitions: int


@dataclass(frozen=True, slots=True)
class Holding:
    """Stage 2's record of one member at one (list, address): its latest claim."""

    version: Version
    holds: bool
    fields: Fields = field(default_factory=dict, repr=False)
    partition: int = 0  # the input partition of the claim (see `Claim.partition`)


class Origin(NamedTuple):
    """Where the change behind a desired state is in the input: the profile (the record's
    key), its partition and offset. A dead letter refers to it."""

    profile_id: str
    partition: int
    offset: int


class Applied(enum.IntEnum):
    """What the sync last did to an address in its list (the flusher reports it)."""

    NOTHING = 0  # never written by the sync
    ACTIVE = 1  # added or updated, with the fields whose fingerprint is kept
    REMOVED = 2  # deleted or unsubscribed by the sync ("the sync's own removals", issue 13)
    KEPT = 3  # the sync left the address as it was (consent, or already inactive)
    #: a write was sent and its outcome is not known yet: if the process dies now, the list
    #: may show it or not, so the state owes it again (the write is idempotent)
    SENDING = 4
    REJECTED = 5  # Campaign Monitor refused the write (dead-lettered): not retried as is


@dataclass(slots=True)
class AddressState:
    """Stage 2's state of one (list, address).

    ``holders``: every member's latest claim, releases included (a release must outlive the
    hold it beats, or a hold delivered late would bring the member back). ``revision`` grows by
    one each time the desired state changes. ``applied``/``applied_fingerprint``: what the sync
    last did (the fingerprint of the fields written, when ACTIVE). ``removed_by_sync``: the
    sync's own write took the address out of the list, and nothing since has made it the
    person's to decide (see `AddressTable.record_applied`).
    """

    holders: dict[Member, Holding] = field(default_factory=dict, repr=False)
    revision: int = 0
    applied: Applied = Applied.NOTHING
    applied_fingerprint: bytes = b""
    removed_by_sync: bool = False

    def newest(self) -> tuple[Member, Holding] | None:
        """The holding member with the highest ``(version, member)``, or None if nobody holds.

        Its fields are the ones written: the most recent word on the person. The member breaks
        ties so that the choice does not depend on the order claims arrived in.
        """
        best: tuple[Version, Member] | None = None
        chosen: tuple[Member, Holding] | None = None
        for member, holding in self.holders.items():
            if holding.holds and (best is None or (holding.version, member) > best):
                best, chosen = (holding.version, member), (member, holding)
        return chosen


@dataclass(frozen=True, slots=True)
class Desired:
    """What a list should hold for one address: active with ``fields``, or not active.

    ``revision`` increases strictly per (list, address) with every change of the desired state,
    so the newest desired state is the one with the highest revision, whatever the event times
    of the claims behind it (a late claim may legitimately change it).
    """

    list_id: str
    address: str = field(repr=False)
    active: bool
    fields: Fields = field(repr=False)
    revision: int
    #: the newest holder's change (None when not active): what a dead letter refers to. Not
    #: part of the desired state (a newer change with the same fields keeps the revision).
    origin: Origin | None = field(default=None, compare=False)
