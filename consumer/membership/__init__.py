"""Membership state: what the service must know for every list to equal its segment(s).

Pure (no I/O, no clock, no asyncio): stores are injected (`Store`), time is only event time.
Guarantee 2 of the contract rests on this package (the service feeds it: ``consumer.state``).
The durable side lives beside the pure one: `durable` (one partition's store on disk),
`changelog` (internal topics, changelog writes, restore) and `stages` (the two stages'
checkpoints); this module imports none of them.

Two stages, as Kafka Streams or quix-streams would build them::

    input ──► stage 1 `MemberTable` ──► claims ──► stage 2 `AddressTable` ──► desired states
    (key: profile)  per (segment, profile)  (key: list+address)  per (list, address)

* **Stage 1** (`members`) keeps, per (segment, profile), the deciding change: in or out, its
  version ``(occurred_at_ms, offset)`` (ties go to the later offset), the normalised address and
  the mapped fields. A change that is not newer than the deciding one is ignored (late, or read
  again). An accepted change emits `Claim`s keyed by (list, address): a release of the old
  address when the address changed or the profile left, a hold of the current address with its
  fields whenever the profile is in. Every segment's members are kept, mapped to a list or not,
  so a list added later is filled from them (`MemberTable.backfill_page`), ending with a
  `Filled` record to every stage 2 partition.
* **Stage 2** (`addresses`) keeps, per (list, address), each member's latest claim (last writer
  per member by version wins, so claims may arrive in any order, twice, or from several
  partitions), the revision of the desired state, and what was last applied (including whether
  the sync itself removed the address). It emits a `Desired` state (active with the newest
  holder's fields, or not active) only when that changed; that is what the coalescing buffer
  takes. A store is fitted to the configured routes (`AddressTable.refit`: the holders of a
  segment a list gave up are dropped), and a list configured anew owes the removal of
  addresses nobody holds only once its backfills are complete (`AddressTable.filled`).

Every state is bytes on the way to the store and the changelog (`codec`): keys that sort by
segment or list (prefix scans), values that start with a format version byte.
"""

from __future__ import annotations

from consumer.membership.addresses import AddressTable
from consumer.membership.codec import FORMAT_VERSION, StateFormatError
from consumer.membership.members import MemberTable
from consumer.membership.model import (
    AddressState,
    Applied,
    Claim,
    Desired,
    Fields,
    FieldValue,
    Holding,
    Member,
    MemberState,
    ProfileChange,
    Repair,
    RepairKind,
    Verdict,
    Version,
)
from consumer.membership.normalise import normalise_address
from consumer.membership.store import DictStore, Store

__all__ = [
    "FORMAT_VERSION",
    "AddressState",
    "AddressTable",
    "Applied",
    "Claim",
    "Desired",
    "DictStore",
    "FieldValue",
    "Fields",
    "Holding",
    "Member",
    "MemberState",
    "MemberTable",
    "ProfileChange",
    "Repair",
    "RepairKind",
    "StateFormatError",
    "Store",
    "Verdict",
    "Version",
    "normalise_address",
]
