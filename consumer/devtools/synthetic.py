"""Synthetic membership streams and the independent model of what the lists must end up as.

Used by the demo, the integration tests, the fault suite and the benchmarks. The expected state
is computed from the generated events alone — never from anything the service did — so that a
comparison with the lists can catch the service's mistakes.
"""

from __future__ import annotations

import random
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import orjson

from consumer.events import parse_email


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
    events, and a duplicate comes before the next change of its profile and segment. That is the
    stream for which the lists stay exact across restarts and rebalances (the applied-time
    memory does not survive them, so a late change read afterwards would be applied: see the
    docs/architecture.md, known limits). ``version_field`` names a profile field set to the change's
    ``occurred_at`` in epoch ms, so that a list mapping it to a custom field shows which change
    was applied last.
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

    def generate(self) -> list[Produced]:
        rng = random.Random(self.seed)
        timeline: list[tuple[int, int, Produced]] = []  # (emit time, tiebreak, record)
        for i in range(self.profiles):
            pid = f"cust-{i}"
            email = f"user{i}@example.com"
            if rng.random() < 0.05:  # addresses are matched case-insensitively, spaces trimmed
                email = f" User{i}@Example.COM"
            for spec in self.segments:
                if rng.random() >= spec.share:
                    continue
                t = self.start_ms + rng.randrange(0, 3_600_000)
                entered = True
                for _ in range(rng.randint(1, spec.max_changes)):
                    profile: dict[str, object] = {
                        "id": pid,
                        "email": email,
                        "full_name": f"Customer {i}",
                        "city": rng.choice(CITIES) if rng.random() > 0.05 else None,
                        "tier": rng.choice(TIERS),
                        "interests": rng.sample(INTERESTS, rng.randint(0, 2)),
                        "lifetime_value": round(rng.uniform(0, 5000), 2),
                    }
                    occurred = t
                    if self.version_field is not None:
                        profile[self.version_field] = occurred
                    value = event_bytes(
                        event_id=str(uuid.UUID(int=rng.getrandbits(128))),
                        segment_id=spec.segment_id,
                        entered=entered,
                        occurred_at_ms=occurred,
                        profile=profile,
                        cloudevents=rng.random() < self.cloudevents_rate,
                    )
                    record = Produced(
                        key=pid.encode(),
                        value=value,
                        segment_id=spec.segment_id,
                        email=parse_email(email),
                        entered=entered,
                        occurred_at_ms=occurred,
                        profile=profile,
                    )
                    emit = occurred
                    if rng.random() < self.late_rate and not self.ordered:
                        emit += rng.randrange(60_000, 900_000)  # delivered late
                    timeline.append((emit, rng.getrandbits(32), record))
                    duplicate: tuple[int, int] | None = None
                    if rng.random() < self.duplicate_rate:
                        duplicate = (emit + rng.randrange(1, 600_000), rng.getrandbits(32))
                    t += rng.randrange(1_000, 1_200_000)
                    if duplicate is not None:
                        at, tiebreak = duplicate
                        if self.ordered:  # before the next change of this profile and segment
                            at = min(at, t - 1)
                        timeline.append((at, tiebreak, record))
                    if spec.exits:
                        entered = not entered if rng.random() < 0.8 else entered
        timeline.sort(key=lambda item: (item[0], item[1]))
        records = [record for _, _, record in timeline]
        return self._with_invalid(records, rng)

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


@dataclass(frozen=True, slots=True)
class Expected:
    """What one list must hold: the active addresses with their latest profile, and the
    addresses that must not be active."""

    active: dict[str, dict[str, object]]  # address -> profile of its latest (entered) change
    inactive: frozenset[str]


def latest_changes(records: Iterable[Produced], segment_id: str) -> dict[str, tuple[int, Produced]]:
    """Per address, the change with the latest occurred_at (ties: the later record), with the
    index of the record's first delivery in `records`."""
    latest: dict[str, tuple[int, Produced]] = {}
    for index, record in enumerate(records):
        if record.invalid or record.segment_id != segment_id or record.email is None:
            continue
        current = latest.get(record.email)
        if (
            current is None
            or record.occurred_at_ms > current[1].occurred_at_ms
            or (record.occurred_at_ms == current[1].occurred_at_ms and record is not current[1])
        ):
            latest[record.email] = (index, record)
    return latest


def expected_state(
    records: Sequence[Produced],
    segment_id: str,
    *,
    self_unsubscribed: Iterable[str] = (),
    unsubscribed_at: int = 0,
    resubscribe: str = "deleted-only",
) -> Expected:
    """The list a destination fed by `segment_id` must end as.

    `self_unsubscribed` are addresses the people unsubscribed themselves in Campaign Monitor
    once the records before index `unsubscribed_at` were synced. Under `never` and
    `deleted-only` they stay inactive whatever the stream says; under `always` they are active
    again only if their latest change is an entry delivered after that moment.
    """
    latest = latest_changes(records, segment_id)
    unsubscribed = set(self_unsubscribed)
    active: dict[str, dict[str, object]] = {}
    for address, (index, record) in latest.items():
        if not record.entered:
            continue
        if address in unsubscribed and (resubscribe != "always" or index < unsubscribed_at):
            continue
        active[address] = record.profile
    return Expected(active=active, inactive=frozenset(latest) - frozenset(active))


def fewest_requests(records: Sequence[Produced], segment_id: str) -> tuple[int, int]:
    """(imports, removals): the fewest requests that reach the final state of one list."""
    latest = latest_changes(records, segment_id)
    adds = sum(1 for _, r in latest.values() if r.entered)
    removals = len(latest) - adds
    return -(-adds // 1000), removals
