"""Synthetic membership streams and the independent model of what the lists must end up as.

Used by the demo, the integration tests, the fault suite and the benchmarks. The expected state
is computed from the generated events alone — never from anything the service did — so that a
comparison with the lists can catch the service's mistakes.
"""

from __future__ import annotations

import random
import string
import uuid
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Final

import orjson


@dataclass(frozen=True, slots=True)
class Produced:
    """One record as produced: the Kafka key and value, and what it means (None if invalid)."""

    key: bytes
    value: bytes
    segment_id: str | None
    email: str | None  # normalised address, None when missing/invalid
    entered: bool
    occurred_at_ms: int
    profile: dict[str, object]
    invalid: str | None = None  # the reason, for records built to be dead-lettered


@dataclass(frozen=True, slots=True)
class SegmentSpec:
    segment_id: str
    share: float  # fraction of profiles that ever touch this segment
    max_changes: int  # changes per (profile, segment): 1..max
    exits: bool = True  # False: only "entered" events (profile updates)


def _iso(ms: int) -> str:
    dt = datetime.fromtimestamp(ms / 1000, tz=UTC)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{ms % 1000:03d}Z"


def event_bytes(
    *,
    event_id: str,
    segment_id: str,
    entered: bool,
    occurred_at_ms: int,
    profile: dict[str, object],
    cloudevents: bool = False,
) -> bytes:
    change = "entered" if entered else "exited"
    if cloudevents:
        return orjson.dumps(
            {
                "specversion": "1.0",
                "type": "segment.membership.changed",
                "source": "cdp://segments",
                "id": event_id,
                "time": _iso(occurred_at_ms),
                "datacontenttype": "application/json",
                "data": {"segment_id": segment_id, "change": change, "profile": profile},
            }
        )
    return orjson.dumps(
        {
            "event_id": event_id,
            "segment_id": segment_id,
            "change": change,
            "occurred_at": _iso(occurred_at_ms),
            "profile": profile,
        }
    )


CITIES = ("London", "Paris", "Berlin", "Lisbon", "Oslo", "Rome", "Vienna", "Dublin")
TIERS = ("gold", "silver", "bronze")
INTERESTS = ("shoes", "books", "travel", "music", "garden")


@dataclass
class StreamGenerator:
    """A realistic stream: profiles entering and exiting segments over time, with profile
    updates, re-entries, duplicates (the same event sent twice), late events (an older change
    delivered after a newer one), CloudEvents-formatted events and a few invalid records.

    ``ordered=True`` delivers the changes of each (profile, segment) in event-time order: no late
    events, and a duplicate comes before the next change of its profile and segment (the stream
    of scenarios that want no late events at all). ``version_field`` names a profile field set
    to the change's ``occurred_at`` in epoch ms, so that a list mapping it to a custom field shows
    which change was applied last.

    Opt-in (off by default, so that a stream asked for without them is the same, draw for draw;
    they draw from a random generator of their own, seeded from ``seed``):

    - ``address_change_rate``: the fraction of profiles that move to a new address once, at a
      random moment. Every change after it carries the new address, and each segment the profile
      is in at that moment gets an update (an entry) with the new address: the old address must
      leave the list unless another member holds it.
    - ``household_rate``: the fraction of profiles that share the address of an earlier profile
      (a household; the address spelt with other capitals and blanks half of the time). Profiles
      of a household never move, so an address a household holds only leaves for good: whether
      an address that left and came back is reactivated under ``resubscribe = "never"`` would
      depend on how the service interleaves partitions.
    - ``straggler_rate``: the fraction of superseded changes (not the last of their profile and
      segment) delivered only after every other record: late events at the very end of the
      stream (in the demo, after the restart). None with ``ordered``.
    """

    seed: int = 7
    profiles: int = 25_000
    segments: Sequence[SegmentSpec] = ()
    duplicate_rate: float = 0.02
    late_rate: float = 0.02
    invalid_rate: float = 0.003
    cloudevents_rate: float = 0.1
    ordered: bool = False
    version_field: str | None = None
    start_ms: int = field(
        default_factory=lambda: int((datetime.now(UTC) - timedelta(hours=2)).timestamp() * 1000)
    )
    address_change_rate: float = 0.0
    household_rate: float = 0.0
    straggler_rate: float = 0.0

    def generate(self) -> list[Produced]:
        rng = random.Random(self.seed)
        extra = random.Random(f"cmsync-synthetic-extras-{self.seed}")  # the opt-in features

        def chance(rate: float) -> bool:
            return rate > 0 and extra.random() < rate

        heads = self._households(extra)
        in_household = set(heads) | set(heads.values())
        timeline: list[tuple[int, int, Produced]] = []  # (emit time, tiebreak, record)
        tail: list[Produced] = []  # stragglers: delivered after everything else
        written: list[str] = []  # per profile, its first address as written in its events
        for i in range(self.profiles):
            pid = f"cust-{i}"
            email = f"user{i}@example.com"
            if rng.random() < 0.05:  # addresses are matched case-insensitively, spaces trimmed
                email = f" User{i}@Example.COM"
            head = heads.get(i)
            if head is not None:  # a household: the first member's address, maybe spelt otherwise
                email = written[head] if extra.random() < 0.5 else f"{written[head].upper()} "
            written.append(email)
            moved_at: int | None = None
            new_email = email
            if i not in in_household and chance(self.address_change_rate):
                moved_at = self.start_ms + extra.randrange(600_000, 5_400_000)
                new_email = (
                    f"user{i}.moved@example.net"
                    if email == email.lower()
                    else f" User{i}.Moved@Example.NET"
                )
            for spec in self.segments:
                if rng.random() >= spec.share:
                    continue
                t = self.start_ms + rng.randrange(0, 3_600_000)
                entered = True
                changes = rng.randint(1, spec.max_changes)
                move = moved_at  # the move, until this segment has seen it
                was_in = False  # the profile's state in this segment before the next change
                last = t
                for k in range(changes):
                    if move is not None and move <= t:
                        if was_in and move < t:  # moved while in: an update with the new address
                            timeline.append(self._update(extra, i, spec, new_email, move))
                        move = None
                    profile: dict[str, object] = {
                        "id": pid,
                        "email": new_email if moved_at is not None and t >= moved_at else email,
                        "full_name": f"Customer {i}",
                        "city": rng.choice(CITIES) if rng.random() > 0.05 else None,
                        "tier": rng.choice(TIERS),
                        "interests": rng.sample(INTERESTS, rng.randint(0, 2)),
                        "lifetime_value": round(rng.uniform(0, 5000), 2),
                    }
                    occurred = t
                    record = self._record(rng, spec, profile, entered, occurred)
                    emit = occurred
                    if rng.random() < self.late_rate and not self.ordered:
                        emit += rng.randrange(60_000, 900_000)  # delivered late
                    tiebreak = rng.getrandbits(32)
                    superseded = k < changes - 1
                    if superseded and not self.ordered and chance(self.straggler_rate):
                        tail.append(record)  # delivered after everything: a late event
                    else:
                        timeline.append((emit, tiebreak, record))
                    duplicate: tuple[int, int] | None = None
                    if rng.random() < self.duplicate_rate:
                        duplicate = (emit + rng.randrange(1, 600_000), rng.getrandbits(32))
                    was_in, last = entered, occurred
                    t += rng.randrange(1_000, 1_200_000)
                    if duplicate is not None:
                        at, tiebreak = duplicate
                        if self.ordered:  # before the next change of this profile and segment
                            at = min(at, t - 1)
                            if move is not None and was_in:  # and before the move's update
                                at = min(at, move - 1)
                        timeline.append((at, tiebreak, record))
                    if spec.exits:
                        entered = not entered if rng.random() < 0.8 else entered
                if move is not None and was_in and move > last:  # moved after its last change
                    timeline.append(self._update(extra, i, spec, new_email, move))
        timeline.sort(key=lambda item: (item[0], item[1]))
        records = [record for _, _, record in timeline]
        extra.shuffle(tail)
        return self._with_invalid(records + tail, rng)

    def _households(self, extra: random.Random) -> dict[int, int]:
        """Profile -> the first profile of its household (for the profiles that share an
        earlier profile's address)."""
        heads: dict[int, int] = {}
        if self.household_rate <= 0:
            return heads
        for i in range(1, self.profiles):
            if extra.random() < self.household_rate:
                j = extra.randrange(max(0, i - 50), i)
                heads[i] = heads.get(j, j)
        return heads

    def _update(
        self, extra: random.Random, i: int, spec: SegmentSpec, email: str, at: int
    ) -> tuple[int, int, Produced]:
        """An entry of profile `i` (already in `spec`'s segment) at `at` with address `email`:
        the update that moves it to its new address, delivered on time."""
        profile: dict[str, object] = {
            "id": f"cust-{i}",
            "email": email,
            "full_name": f"Customer {i}",
            "city": extra.choice(CITIES),
            "tier": extra.choice(TIERS),
            "interests": extra.sample(INTERESTS, extra.randint(0, 2)),
            "lifetime_value": round(extra.uniform(0, 5000), 2),
        }
        record = self._record(extra, spec, profile, True, at)  # draws before the tiebreak
        return at, extra.getrandbits(32), record

    def _record(
        self,
        rng: random.Random,
        spec: SegmentSpec,
        profile: dict[str, object],
        entered: bool,
        at: int,
    ) -> Produced:
        """The record of one change of `profile` (its version field set to `at`), with an
        event id and the CloudEvents form drawn from `rng`."""
        if self.version_field is not None:
            profile[self.version_field] = at
        value = event_bytes(
            event_id=str(uuid.UUID(int=rng.getrandbits(128))),
            segment_id=spec.segment_id,
            entered=entered,
            occurred_at_ms=at,
            profile=profile,
            cloudevents=rng.random() < self.cloudevents_rate,
        )
        return Produced(
            key=str(profile["id"]).encode(),
            value=value,
            segment_id=spec.segment_id,
            email=normalise_address(str(profile["email"])),
            entered=entered,
            occurred_at_ms=at,
            profile=profile,
        )

    def _with_invalid(self, records: list[Produced], rng: random.Random) -> list[Produced]:
        n_invalid = int(len(records) * self.invalid_rate)
        segment_ids = [s.segment_id for s in self.segments] or ["unknown"]
        out = list(records)
        for n in range(n_invalid):
            kind = n % 5
            seg = segment_ids[n % len(segment_ids)]
            ms = self.start_ms + rng.randrange(0, 3_600_000)
            profile: dict[str, object] = {"id": f"bad-{n}", "email": f"bad{n}@example.com"}
            if kind == 3:
                del profile["email"]
            elif kind == 4:
                profile["email"] = "not-an-address"
            if kind == 0:
                value, reason = bytes(rng.getrandbits(8) for _ in range(40)), "invalid_json"
            elif kind == 2:
                value = orjson.dumps({"event_id": f"bad-{n}", "segment_id": seg, "change": "maybe"})
                reason = "schema"
            else:  # a well-formed event: cut in half (1), without (3) or with a bad address (4)
                full = event_bytes(
                    event_id=f"bad-{n}",
                    segment_id=seg,
                    entered=True,
                    occurred_at_ms=ms,
                    profile=profile,
                )
                value, reason = {
                    1: (full[: len(full) // 2], "invalid_json"),
                    3: (full, "missing_email"),
                    4: (full, "invalid_email"),
                }[kind]
            bad = Produced(
                key=f"bad-{n}".encode(),
                value=value,
                segment_id=seg,
                email=None,
                entered=True,
                occurred_at_ms=ms,
                profile=profile,
                invalid=reason,
            )
            out.insert(rng.randrange(0, len(out) + 1), bad)
        return out


# ------------------------------------------------------------------------------- the model
#
# Guarantee 2 of docs/contract (lists equal segments), written again from the contract's words
# and nothing of the service's code: each (segment, profile) is decided by its change with the
# highest (occurred_at, offset); an address is in a list while a member of one of the list's
# segments holds it; the fields written are those of the holder with the highest
# (occurred_at, offset, segment, profile).

_ASCII_LOWER: Final = str.maketrans(string.ascii_uppercase, string.ascii_lowercase)

#: Who holds an address: (segment_id, profile_id).
Member = tuple[str, str]
#: What decides between two changes of one member: (occurred_at_ms, offset). A profile's
#: records share one partition (keyed by profile id), so their offsets follow production order.
Version = tuple[int, int]


def normalise_address(address: str) -> str:
    """An address as the contract compares them: trimmed, ASCII letters lower-cased, every other
    character kept (no Unicode case folding)."""
    return address.strip().translate(_ASCII_LOWER)


def profile_id_of(record: Produced) -> str:
    """The record's profile id (the schema's ``profile.id``; the Kafka key if it has none)."""
    pid = record.profile.get("id")
    return pid if isinstance(pid, str) else record.key.decode("utf-8", "replace")


@dataclass(frozen=True, slots=True)
class Decision:
    """A member's deciding change: the accepted record with the highest version."""

    version: Version
    entered: bool
    address: str | None  # the address it holds (None when out)
    record: Produced
    index: int  # where it was delivered in the stream


def _written(profile: Mapping[str, object], fields: Collection[str] | None) -> dict[str, object]:
    if fields is None:
        return dict(profile)
    return {f: profile[f] for f in fields if f in profile}


class Membership:
    """The model's state: records replayed in delivery order, one member per (segment,
    profile). Only records of `segment_ids` count (all segments when None).

    A record concerns no member when it is invalid, of another segment, or an entry without a
    usable address (dead-lettered); an exit needs no address (the member releases the one it
    held). A record whose version is not above its member's decision is ignored (late).

    `last_change` remembers, per address, the index of the record that last changed what a
    list of these segments should show for it: active or not, and the newest holder's
    `written_fields` (every profile field when None).
    """

    def __init__(
        self,
        segment_ids: Iterable[str] | None = None,
        *,
        written_fields: Collection[str] | None = None,
    ) -> None:
        self.segment_ids = None if segment_ids is None else frozenset(segment_ids)
        self.written_fields = written_fields
        self.decisions: dict[Member, Decision] = {}
        self._holding: dict[str, dict[Member, Decision]] = {}  # address -> its holders
        self._shown: dict[str, dict[str, object]] = {}  # held address -> its written fields
        self.last_change: dict[str, int] = {}
        self.named_by: dict[str, set[str]] = {}  # address -> profiles whose records name it
        self.late: list[int] = []  # indexes of the records ignored as older than the decision
        self.beaten_by: list[int] = []  # per late record, the index of the decision it lost to
        self.address_changes: list[int] = []  # indexes of entries that moved a member in

    def apply(self, index: int, record: Produced, offset: int | None = None) -> bool | None:
        """Take the record delivered `index`-th, at `offset` (default: `index`). True if it
        decides its member now, False if it was ignored (late), None if it concerns no member."""
        if record.invalid or record.segment_id is None:
            return None
        if self.segment_ids is not None and record.segment_id not in self.segment_ids:
            return None
        if record.entered and record.email is None:
            return None
        pid = profile_id_of(record)
        address = None if record.email is None else normalise_address(record.email)
        if address is not None:
            self.named_by.setdefault(address, set()).add(pid)
        member = (record.segment_id, pid)
        version = (record.occurred_at_ms, index if offset is None else offset)
        current = self.decisions.get(member)
        if current is not None and version <= current.version:
            self.late.append(index)
            self.beaten_by.append(current.index)
            return False
        held = address if record.entered else None
        touched: list[str] = []
        if current is not None and current.address is not None:
            if current.entered and held is not None and current.address != held:
                self.address_changes.append(index)
            holders = self._holding[current.address]
            del holders[member]
            if not holders:
                del self._holding[current.address]
            touched.append(current.address)
        decision = Decision(version, record.entered, held, record, index)
        self.decisions[member] = decision
        if held is not None:
            self._holding.setdefault(held, {})[member] = decision
            if held not in touched:
                touched.append(held)
        for changed in touched:
            newest = self.newest(changed)
            if newest is None:
                if self._shown.pop(changed, None) is not None:
                    self.last_change[changed] = index
                continue
            shown = _written(newest.record.profile, self.written_fields)
            if self._shown.get(changed) != shown:
                self._shown[changed] = shown
                self.last_change[changed] = index
        return True

    def newest(self, address: str) -> Decision | None:
        """The decision of the newest member holding `address`: the highest (version,
        member); None when nobody holds it."""
        holders = self._holding.get(address)
        if not holders:
            return None
        member = max(holders, key=lambda m: (holders[m].version, m))
        return holders[member]

    def holders(self) -> dict[str, dict[Member, Decision]]:
        """Per held address, the members holding it."""
        return {address: dict(holders) for address, holders in self._holding.items()}

    def held(self) -> dict[str, Decision]:
        """Per held address, the decision of its newest holder."""
        out: dict[str, Decision] = {}
        for address in self._holding:
            newest = self.newest(address)
            assert newest is not None
            out[address] = newest
        return out

    def seen(self) -> frozenset[str]:
        """Every address a counted record named."""
        return frozenset(self.named_by)


def _segment_set(segment_ids: str | Iterable[str]) -> frozenset[str]:
    return frozenset((segment_ids,) if isinstance(segment_ids, str) else segment_ids)


def replay(
    records: Sequence[Produced],
    segment_ids: str | Iterable[str] | None = None,
    *,
    offsets: Sequence[int] | None = None,
) -> Membership:
    """The model's state after `records` (delivered in this order; `offsets`: each record's
    Kafka offset, default its index) for `segment_ids` (all segments when None)."""
    if offsets is not None and len(offsets) != len(records):
        raise ValueError("offsets must give one offset per record")
    model = Membership(None if segment_ids is None else _segment_set(segment_ids))
    for index, record in enumerate(records):
        model.apply(index, record, None if offsets is None else offsets[index])
    return model


@dataclass(frozen=True, slots=True)
class Expected:
    """What one list must hold: the active addresses with the profile of their newest holder's
    deciding change, and the addresses that must not be active."""

    active: dict[str, dict[str, object]]  # address -> profile whose fields the list shows
    inactive: frozenset[str]


def expected_list(
    records: Sequence[Produced],
    segment_ids: str | Iterable[str],
    *,
    offsets: Sequence[int] | None = None,
    self_unsubscribed: Iterable[str] = (),
    unsubscribed_at: int = 0,
    resubscribe: str = "deleted-only",
    written_fields: Collection[str] | None = None,
) -> Expected:
    """The list a destination fed by `segment_ids` (one or several: the union) must end as,
    computed from the produced `records` alone (in delivery order; `offsets` as in `replay`).

    Active: every address some member of those segments holds, with the profile of its newest
    holder; inactive: every other address the records of those segments name (old addresses,
    exits, entries never applied).

    `self_unsubscribed` are addresses the people unsubscribed themselves in Campaign Monitor
    once the records before index `unsubscribed_at` were synced. Under `never` and
    `deleted-only` they stay inactive whatever the stream says. Under `always` one is active
    again if it is held at the end and the sync wrote it after that moment: a record delivered
    then changed what the list should show for it (active or not, or its newest holder's
    `written_fields`, default every profile field). The service writes an address only when
    that changes: a re-entry with the same fields writes nothing.
    """
    if offsets is not None and len(offsets) != len(records):
        raise ValueError("offsets must give one offset per record")
    unsubscribed = {normalise_address(a) for a in self_unsubscribed}
    model = Membership(_segment_set(segment_ids), written_fields=written_fields)
    for index, record in enumerate(records):
        model.apply(index, record, None if offsets is None else offsets[index])
    held = model.held()
    active: dict[str, dict[str, object]] = {}
    for address, decision in held.items():
        if address in unsubscribed and (
            resubscribe != "always" or model.last_change.get(address, -1) < unsubscribed_at
        ):
            continue
        active[address] = decision.record.profile
    return Expected(active=active, inactive=(model.seen() | set(held)) - frozenset(active))


def expected_state(
    records: Sequence[Produced],
    segment_id: str | Iterable[str],
    *,
    self_unsubscribed: Iterable[str] = (),
    unsubscribed_at: int = 0,
    resubscribe: str = "deleted-only",
    offsets: Sequence[int] | None = None,
    written_fields: Collection[str] | None = None,
) -> Expected:
    """The list a destination fed by `segment_id` must end as: `expected_list`."""
    return expected_list(
        records,
        segment_id,
        offsets=offsets,
        self_unsubscribed=self_unsubscribed,
        unsubscribed_at=unsubscribed_at,
        resubscribe=resubscribe,
        written_fields=written_fields,
    )


def fewest_requests(
    records: Sequence[Produced],
    segment_id: str | Iterable[str],
    *,
    offsets: Sequence[int] | None = None,
) -> tuple[int, int]:
    """(imports, removals): the fewest requests that reach the final state of one list (one
    import per 1000 active addresses, one removal per address that must not be active)."""
    expected = expected_list(records, segment_id, offsets=offsets)
    return -(-len(expected.active) // 1000), len(expected.inactive)


@dataclass(frozen=True, slots=True)
class StreamFacts:
    """What a stream holds of guarantee 2's hard cases, for a summary."""

    address_changes: int  # entries that moved a member, while in, to another address
    shared_addresses: int  # addresses named by the records of several profiles
    late: int  # records ignored as older than their member's decision
    late_across: int  # of those, delivered at or after index `after`, beaten by one before it


def stream_facts(
    records: Sequence[Produced],
    segment_ids: Iterable[str] | None = None,
    *,
    after: int = 0,
    offsets: Sequence[int] | None = None,
) -> StreamFacts:
    """`StreamFacts` of `records` for `segment_ids` (all segments when None)."""
    model = replay(records, None if segment_ids is None else tuple(segment_ids), offsets=offsets)
    return StreamFacts(
        address_changes=len(model.address_changes),
        shared_addresses=sum(1 for pids in model.named_by.values() if len(pids) > 1),
        late=len(model.late),
        late_across=sum(
            1
            for index, beaten_by in zip(model.late, model.beaten_by, strict=True)
            if index >= after > beaten_by
        ),
    )
