"""Shared machinery of the fault suite.

`FaultRig` is one sync under test, built on the rig (`consumer.devtools.rig.SyncRig`): the
Campaign Monitor simulator served in the test process (so its state survives restarts of the
service), one topic, dead-letter topic and consumer group on a real broker, and any number of
service processes (`python -m consumer run` with a CMSYNC_* environment, the rig's
`ServiceProcess`) started, killed and restarted by the test. It remembers every record it
produced with the partition and offset the broker acknowledged (the bundled broker's
ListOffsets answers are not reliable), so that a scenario can compute the expected lists from
the produced events alone. `FaultRig.wait_all_committed` waits until everything produced is
through (input and claims offsets committed to their ends, nothing pending): then every list
must equal its expected state.

The checks (each returns a list of problems, empty when all is well; no address is printed):
- `list_problems`: a destination's list against `consumer.devtools.synthetic.expected_state`;
- `out_of_order_writes`: per address, applied versions never go back in event time, except for
  documented replays after a crash;
- `repeated_writes`: writes the simulator applied more than once (figures, not a check).

Each scenario states its figures with `note()`: printed (see them with `pytest -s`) and, when
CMSYNC_FAULTS_REPORT names a file, appended to it.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import random
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import psutil
from aiokafka import TopicPartition

from consumer.devtools import rig
from consumer.devtools.rig import (
    Metrics,
    ServiceProcess,
    SyncRig,
    compare,
    field_values,
    headers_of,
)
from consumer.devtools.simulator import AppliedWrite, Simulator, SimulatorConfig
from consumer.devtools.synthetic import (
    Expected,
    Produced,
    SegmentSpec,
    StreamGenerator,
    event_bytes,
    expected_state,
)
from consumer.events import parse_email
from consumer.membership.changelog import InternalTopics

__all__ = [
    "API_KEY",
    "DESTS",
    "SEGMENTS",
    "VERSION",
    "Dest",
    "FaultRig",
    "Metrics",
    "Repeats",
    "Replay",
    "Sent",
    "ServiceProcess",
    "change",
    "dead_letter_source",
    "expected_dead_letters",
    "headers_of",
    "list_problems",
    "note",
    "out_of_order_writes",
    "peak_per_window",
    "repeated_writes",
    "rng_for",
    "sample_rss",
    "scaled",
    "stream",
    "unpaced_requests",
    "version_of",
]

REPO = Path(__file__).resolve().parents[2]
CHAOS = os.environ.get("CMSYNC_CHAOS") == "1"
API_KEY = "fault-key-0001"
VERSION = "Version"  # custom field carrying the occurred_at (epoch ms) of the applied change


def scaled(normal: int, chaos: int) -> int:
    """A size for `make test`, or the larger one under CMSYNC_CHAOS=1 (`make chaos`)."""
    return chaos if CHAOS else normal


def note(text: str) -> None:
    """A figure for the report: printed (visible with `pytest -s`) and kept in a file."""
    line = f"[faults] {text}"
    print(line, flush=True)
    path = os.environ.get("CMSYNC_FAULTS_REPORT")
    if path:
        with open(path, "a", encoding="utf-8") as report:
            report.write(line + "\n")


# ------------------------------------------------------------------------------- destinations


@dataclass
class Dest(rig.Dest):
    """A destination with the fault suite's defaults: a Version field that shows which change
    was applied to each member, and ConsentToTrack left Unchanged."""

    custom_fields: Mapping[str, str] = field(
        default_factory=lambda: {"City": "city", VERSION: "version"}
    )
    consent_to_track: str = "Unchanged"


#: Two lists fed by one segment (one deleting, one unsubscribing), one list of another segment,
#: and a segment no list takes.
DESTS = (
    Dest(
        "news",
        "seg-a",
        custom_fields={
            "City": "city",
            "Tier": "tier",
            "Interests": "interests",
            VERSION: "version",
        },
    ),
    Dest("offers", "seg-a", removal="unsubscribe", resubscribe="always"),
    Dest("club", "seg-b"),
)
SEGMENTS = (
    SegmentSpec("seg-a", share=0.6, max_changes=5),
    SegmentSpec("seg-b", share=0.4, max_changes=4),
    SegmentSpec("seg-x", share=0.1, max_changes=2),  # no destination
)


def stream(
    profiles: int,
    *,
    seed: int,
    ordered: bool = True,
    invalid_rate: float = 0.0,
    duplicate_rate: float = 0.03,
    segments: Sequence[SegmentSpec] = SEGMENTS,
) -> list[Produced]:
    """A synthetic stream whose profiles carry `version` = occurred_at (see `StreamGenerator`).

    `ordered` (the default) delivers each (profile, segment)'s changes in event-time order: the
    stream `out_of_order_writes` needs (its Version check reads the order of the writes);
    `ordered=False` adds late events, which the membership state ignores durably.
    """
    gen = StreamGenerator(
        seed=seed,
        profiles=profiles,
        segments=segments,
        duplicate_rate=duplicate_rate,
        late_rate=0.0 if ordered else 0.03,
        invalid_rate=invalid_rate,
        ordered=ordered,
        version_field="version",
        start_ms=1_764_417_600_000,  # fixed: the stream depends on the seed only
    )
    return gen.generate()


def change(
    email: str,
    entered: bool = True,
    *,
    at_ms: int,
    segment: str = "seg-a",
    city: str | None = "London",
    extra: Mapping[str, object] | None = None,
) -> Produced:
    """One hand-made membership event (its profile carries `version` = `at_ms`)."""
    profile: dict[str, object] = {
        "id": f"p-{email}",
        "email": email,
        "full_name": f"Person {email.split('@')[0]}",
        "city": city,
        "version": at_ms,
        **(extra or {}),
    }
    value = event_bytes(
        event_id=str(uuid.uuid4()),
        segment_id=segment,
        entered=entered,
        occurred_at_ms=at_ms,
        profile=profile,
    )
    return Produced(
        key=f"p-{email}".encode(),
        value=value,
        segment_id=segment,
        email=parse_email(email),
        entered=entered,
        occurred_at_ms=at_ms,
        profile=profile,
    )


# ------------------------------------------------------------------------------- the rig


@dataclass
class Sent:
    """One produced record and where the broker put it."""

    record: Produced
    partition: int
    offset: int


class FaultRig(SyncRig):
    """See the module docstring. Use as `async with FaultRig(...) as rig:`."""

    defaults: ClassVar[Mapping[str, str]] = {
        "CMSYNC_FLUSH_INTERVAL_S": "0.3",
        "CMSYNC_SHUTDOWN_BUDGET_S": "10",
        "CMSYNC_HTTP_PORT": "0",  # each process gets a free port
        "CMSYNC_RATE_LIMIT_RPS": "200",
        "CMSYNC_CONSENT_REFRESH_S": "5",
        "CMSYNC_LOG_LEVEL": "info",
        "CMSYNC_LOG_FORMAT": "json",
    }

    def __init__(
        self,
        bootstrap: str,
        tmp: Path,
        *,
        dests: Sequence[Dest] = DESTS,
        partitions: int = 3,
        sim_config: SimulatorConfig | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        config = sim_config or SimulatorConfig(api_keys=(API_KEY,))
        config.apply_log = True
        super().__init__(
            bootstrap,
            tmp,
            dests,
            api_key=API_KEY,
            partitions=partitions,
            sim_config=config,
            env=env,
            prefix="faults",
            cwd=REPO,
        )
        self.sent: list[Sent] = []

    async def __aenter__(self) -> FaultRig:
        await super().__aenter__()
        return self

    # services ------------------------------------------------------------------------------
    async def wait_assigned(self, proc: ServiceProcess, within_s: float = 60.0) -> set[int]:
        """Until the process logged a partition assignment (the group join is slow on the
        bundled broker: ~5 s, ~18 s when a killed member must time out first)."""
        await self.wait_for(
            lambda: proc.assigned() is not None, within_s, f"{proc.name} joined", [proc]
        )
        found = proc.assigned()
        assert found is not None
        return found

    # kafka ---------------------------------------------------------------------------------
    async def produce(
        self,
        records: Sequence[Produced],
        raw: Mapping[int, tuple[bytes | None, bytes | None]] | None = None,
    ) -> list[Sent]:
        """Produce in order; remember each record's partition and offset from the acks.
        `raw` maps `id(record)` to the key and value to send instead (None: no key, or a
        tombstone)."""
        pairs = [raw.get(id(r), (r.key, r.value)) if raw else (r.key, r.value) for r in records]
        placed = await self.produce_pairs(pairs)
        sent = [
            Sent(record, partition, offset)
            for record, (partition, offset) in zip(records, placed, strict=True)
        ]
        self.sent.extend(sent)
        return sent

    async def produce_paced(
        self, records: Sequence[Produced], *, over_s: float, chunks: int = 20
    ) -> None:
        """Produce `records` in `chunks` parts spread over about `over_s` seconds."""
        size = max(1, -(-len(records) // chunks))
        for start in range(0, len(records), size):
            await self.produce(records[start : start + size])
            await asyncio.sleep(over_s / chunks)

    async def committed(self) -> dict[int, int]:
        """The group's committed offsets as the broker holds them (0: none)."""
        return {p: offset or 0 for p, offset in (await self.committed_offsets()).items()}

    async def wait_all_committed(
        self, within_s: float, watch: Iterable[ServiceProcess] = ()
    ) -> dict[int, int]:
        """Until everything produced is through: the committed offsets reach the end of
        everything produced, the group's offsets of the state's claims topic reach its end,
        and every watched process has joined (and so restored and fed the buffers what the
        state owes) and holds no pending change (`cmsync_pending_changes`). Then every
        list reflects every record produced (or the records are dead-lettered)."""
        ends = dict(self.ends)
        watch = list(watch)
        last: dict[int, int] = {}
        claims: dict[int, tuple[int, int]] = {}  # partition -> (committed, end)
        pending: list[float] = []

        async def done() -> bool:
            last.update(await self.committed())
            if not all(last.get(p, 0) >= end for p, end in ends.items()):
                return False
            claims.update(await self.claims_progress())
            if not all(committed >= end for committed, end in claims.values()):
                return False
            pending[:] = []
            for proc in watch:
                if proc.alive():
                    if proc.assigned() is None:  # not joined yet: its owed states not restored
                        return False
                    try:
                        pending.append((await proc.metrics()).value("cmsync_pending_changes"))
                    except Exception:  # not serving yet (starting): not through
                        return False
            return not any(pending)

        try:
            await self.wait_for(done, within_s, "every produced record through", watch)
        except (TimeoutError, rig.ServiceExitedError) as exc:
            raise AssertionError(
                f"{exc}\nends {ends}, committed {last}, claims (committed, end) {claims}, "
                f"pending {pending}"
            ) from None
        return last

    async def claims_progress(self) -> dict[int, tuple[int, int]]:
        """Per partition of the state's claims topic: (the group's committed offset, the
        end)."""
        consumer = await self._offsets_consumer()
        topic = InternalTopics.of_group(self.group).claims
        tps = [TopicPartition(topic, p) for p in range(self.partitions)]
        ends = await consumer.end_offsets(tps)
        return {tp.partition: ((await consumer.committed(tp)) or 0, ends[tp]) for tp in tps}

    async def dead_letters(
        self, sources: Iterable[tuple[int, int]], within_s: float = 20.0
    ) -> list[Any]:
        """Every record of the dead-letter topic; waits until one for each (partition, offset)
        in `sources` is there (replays after a crash may have written some twice)."""
        wanted = set(sources)
        return await self.read_dead_letters(
            lambda out: not wanted - {dead_letter_source(r) for r in out},
            within_s,
            poll_ms=300,
            settle_ms=500,
        )

    # lists ---------------------------------------------------------------------------------
    def records(self) -> list[Produced]:
        return [s.record for s in self.sent]

    def list_problems(self) -> dict[str, list[str]]:
        """Per destination, the differences between its list and the expected state (only
        destinations with problems)."""
        out = {}
        records = self.records()
        for dest in self.dests:
            problems = list_problems(
                expected_state(records, dest.segment_id), self.members(dest.name), dest
            )
            if problems:
                out[dest.name] = problems
        return out


# ------------------------------------------------------------------------------- checks


def expected_dead_letters(sent: Iterable[Sent], dests: Sequence[rig.Dest]) -> set[tuple[int, int]]:
    """(partition, offset) of the produced records the service must dead-letter: undecodable
    ones, and valid ones without a usable address for a list their segment feeds (a valid
    event of a segment no list takes concerns no destination: it is skipped, not refused)."""
    routed = {d.segment_id for d in dests}
    return {
        (s.partition, s.offset)
        for s in sent
        if s.record.invalid is not None
        and (
            s.record.invalid not in ("missing_email", "invalid_email")
            or s.record.segment_id in routed
        )
    }


def dead_letter_source(record: Any) -> tuple[int, int]:
    """(partition, offset) of the original record, from the `cmsync-source` header."""
    _, partition, offset = headers_of(record)["cmsync-source"].rsplit("/", 2)
    return int(partition), int(offset)


def list_problems(
    expected: Expected, members: Mapping[str, Mapping[str, Any]], dest: rig.Dest
) -> list[str]:
    """Differences between a list and its expected state, counted by kind (no addresses)."""
    return compare(expected, members, dest.custom_fields)


def version_of(member: Mapping[str, Any] | None) -> int | None:
    if member is None:
        return None
    values = field_values(member, VERSION)
    return int(values[0]) if values else None


@dataclass
class Replay:
    """A window in which replays are legitimate: after a SIGKILL at simulator time `after`,
    records of `partitions` at or above `committed` are read again by the next owner."""

    after: float
    partitions: set[int]
    committed: dict[int, int]


def out_of_order_writes(
    writes: Sequence[AppliedWrite],
    sent: Sequence[Sent],
    dests: Sequence[rig.Dest],
    list_ids: Mapping[str, str],
    replays: Sequence[Replay] = (),
) -> list[str]:
    """Per (list, address), writes that went back in event time.

    An import row carries the change's Version (its occurred_at): for one address the Versions
    applied must never decrease. A removal must be newer than the add it undoes: the stream must
    hold an exit of that address newer than the Version last applied. The exception is the
    documented replay after a crash (docs/architecture.md, known limits): after a SIGKILL the new
    owner of the dead process's partitions re-reads them from the committed offset and repeats, in
    their original order, changes the dead process had applied; a write is excused when it happened
    after such a kill and the stream holds a record of that address, at or above the commit, that
    explains it.
    """
    segment_of = {list_ids[d.name]: d.segment_id for d in dests}
    by_change: dict[tuple[str, str], list[Sent]] = defaultdict(list)
    for s in sent:
        r = s.record
        if r.invalid is None and r.email is not None and r.segment_id:
            by_change[(r.segment_id, r.email)].append(s)

    def has_occurred_at(ms: int, record: Produced) -> bool:
        return record.occurred_at_ms == ms

    def replayed(at: float, segment: str, email: str, match: Callable[[Produced], bool]) -> bool:
        for replay in replays:
            if at < replay.after:
                continue
            for s in by_change[(segment, email)]:
                if (
                    s.partition in replay.partitions
                    and s.offset >= replay.committed.get(s.partition, 0)
                    and match(s.record)
                ):
                    return True
        return False

    problems: Counter[str] = Counter()
    latest: dict[tuple[str, str], int] = {}
    for w in writes:
        if not w.applied or w.list_id not in segment_of:
            continue
        segment = segment_of[w.list_id]
        key = (w.list_id, w.email)
        current = latest.get(key)
        if w.endpoint in ("import", "add"):
            version = int(dict(w.fields)[VERSION])
            if (
                current is not None
                and version < current
                and not replayed(
                    w.at, segment, w.email, functools.partial(has_occurred_at, version)
                )
            ):
                problems["an add older than one applied before"] += 1
            latest[key] = version if current is None else max(current, version)
        elif current is not None:
            newer_exit = [
                s.record.occurred_at_ms
                for s in by_change[(segment, w.email)]
                if not s.record.entered and s.record.occurred_at_ms > current
            ]
            if not newer_exit and not replayed(w.at, segment, w.email, lambda r: not r.entered):
                problems["a removal older than the add it undid"] += 1
    return [f"{n} × {what}" for what, n in problems.items()]


@dataclass
class Repeats:
    rows: int = 0  # import rows carrying a (list, address, Version) applied before
    removals: int = 0  # removal calls beyond one per distinct exit event of the address
    total_rows: int = 0
    total_removals: int = 0

    def __str__(self) -> str:
        return (
            f"{self.rows} of {self.total_rows} import rows and {self.removals} of "
            f"{self.total_removals} removal calls were repeats"
        )


def repeated_writes(
    writes: Iterable[AppliedWrite],
    sent: Iterable[Sent],
    dests: Sequence[rig.Dest],
    list_ids: Mapping[str, str],
) -> Repeats:
    """Writes beyond the first application of the same change, from the simulator's log.

    An import row is a repeat when its (list, address, Version) was applied before. A removal
    call carries no version: calls for an address beyond the number of distinct exit events of
    that address count as repeats (a lower bound; without faults the service sends at most one
    removal per exit event, fewer when it coalesces).
    """
    out = Repeats()
    segment_of = {list_ids[d.name]: d.segment_id for d in dests}
    exits: dict[tuple[str, str], set[int]] = defaultdict(set)
    for s in sent:
        r = s.record
        if r.invalid is None and r.email is not None and r.segment_id and not r.entered:
            exits[(r.segment_id, r.email)].add(r.occurred_at_ms)
    rows_seen: set[tuple[str, str, str | None]] = set()
    calls: Counter[tuple[str, str]] = Counter()
    for w in writes:
        if w.endpoint in ("import", "add"):
            out.total_rows += 1
            row = (w.list_id, w.email, dict(w.fields).get(VERSION))
            if row in rows_seen:
                out.rows += 1
            rows_seen.add(row)
        else:
            out.total_removals += 1
            calls[(w.list_id, w.email)] += 1
    for (list_id, email), n in calls.items():
        distinct = len(exits[(segment_of.get(list_id, ""), email)])
        out.removals += max(0, n - distinct)
    return out


async def unpaced_requests(sim: Simulator, proc: ServiceProcess, since: float = 0.0) -> float:
    """API requests the simulator received beyond those the service's client sent and
    observed (`cmsync_api_requests_total`; every one of those took a limiter slot, except the
    paged consent listings, which take one per page). `since`: the service's count when the
    simulator's counters were last reset. Call when no request is in flight."""
    seen = (await proc.metrics()).value("cmsync_api_requests_total") - since
    received = sum(sum(by_status.values()) for by_status in sim.request_counts().values())
    return received - seen


def peak_per_window(times: Sequence[float], window_s: float = 1.0) -> int:
    """Most requests in any half-open window [t, t + window_s) (sliding over arrivals)."""
    ordered = sorted(times)
    best = 0
    start = 0
    for end, t in enumerate(ordered):
        while ordered[start] <= t - window_s:
            start += 1
        best = max(best, end - start + 1)
    return best


async def sample_rss(proc: ServiceProcess, into: list[int], every_s: float = 0.1) -> None:
    """Append the process's resident size every `every_s` until it exits or the task is
    cancelled."""
    while proc.alive():
        with contextlib.suppress(psutil.Error):
            into.append(proc.rss())
        await asyncio.sleep(every_s)


def rng_for(name: str) -> random.Random:
    """A seeded RNG per scenario: kill moments and fault mixes are reproducible."""
    return random.Random(f"{name}-{os.environ.get('CMSYNC_FAULTS_SEED', '1')}")
