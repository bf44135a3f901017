"""`cmsync reconcile`: compare each destination's list with the membership the service holds,
print the drift, and hand the repairs to the running service.

Why it works this way:

- **The expected membership** is stage 2's state, read from the addresses changelog (compacted)
  up to its end, into temporary stores on disk (one per partition, deleted on exit): the
  command runs as a separate process (a Kubernetes Job) without the service's disks, and its
  memory does not grow with the lists (RocksDB's caches), apart from one 64-bit hash per
  Active member while a list is compared (about 75 bytes a person).
- **The list** is read through an `ApiGateway` per API key, as the service reads it: the same
  rate limiter policy at ``CMSYNC_RATE_LIMIT_RPS`` (429s and ``X-RateLimit-*`` honoured), one
  slot per page, at listing priority: the Active members with their custom fields, the Deleted
  ones, and what the consent bookkeeping reads (Unsubscribed, Bounced, the client's suppression
  list with a connection's ``client_id``: `ListConsent.read`).
- **Repairs are handed to the service**, which stays the only writer of every list: a repair
  is a record of the claims topic keyed like the claims of its (list, address)
  (`consumer.membership.codec.encode_repair`), so the one owner of that address takes it in
  order with the address's live changes, and re-applies what is desired *then*
  (`AddressTable.repair`). It carries no value, so it never overrides a newer change: a change
  taken before it decides what the repair re-applies (nothing, if the address left), one taken
  after it gets a higher revision. Writing to Campaign Monitor from here instead would need a
  conditional write the API does not have.

Per destination, each address falls in one class (the README's consent table holds):

- **in sync**: held by a member, Active, with the name and custom field values the sync would
  write;
- **stale**: held, Active, other values: repaired (reassert);
- **missing**: held, not on the list; or Deleted or Unsubscribed by the sync itself under
  ``resubscribe = "deleted-only"``; or in any inactive state under ``"always"``: repaired
  (reassert);
- **protected**: held, but Unsubscribed, Bounced or suppressed by the person, or Deleted by
  hand (``never``, ``deleted-only``): never touched (an import with ``Resubscribe: false``
  would leave it so anyway);
- **extra**: Active, held by no member (added by hand): removed only with
  ``extras = "remove"``.

The service applies a reassert as it applies a re-entry (same consent checks: an import with
``Resubscribe: false``, except for what the sync removed itself), and an extra as an exit (no
opted-out address is deleted).

Running beside the service is the normal case. A change the service has not taken into stage 2
yet (the changelog lags the claims by a batch), or one it has not written to the list yet (the
flush interval), may show as drift: its repair is a harmless re-apply. A list that changes
while it is read may show a member twice or not at all (paging by page number): the same.

Output: a summary on stdout, per destination the counts and the repairs sent, and the time
taken, without personal data; log lines carry counts only. ``--report PATH`` writes the
per-address detail (JSON lines: destination, address, kind), the one place addresses go,
because the operator asked. ``--dry-run`` writes nothing anywhere: no request but reads to
Campaign Monitor, no record to Kafka.

Exit codes: 0 the drift was repaired (handed to the service, acknowledged) or only reported
(``--dry-run``); 2 usage or configuration error (an unknown ``--destination``); 1 anything
else, e.g. a destination whose list could not be read (named, with the reason).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Final, Literal

import aiohttp
import orjson
import structlog
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaError

from consumer import observability as obs
from consumer.campaign_monitor.client import MAX_PAGE_SIZE, SubscriberRow
from consumer.cli import parse_args
from consumer.consent import ConsentBook, ConsentUnknownError, ListConsent, OptOuts
from consumer.fieldtypes import FieldType, Unfit, key_of
from consumer.gateway import ApiGateway, gateways_for
from consumer.listsettings import read_list_check
from consumer.membership import changelog
from consumer.membership.addresses import AddressTable
from consumer.membership.changelog import InternalTopics
from consumer.membership.codec import address_key, encode_drift_found, encode_repair
from consumer.membership.model import AddressState, DriftFound, Repair, RepairKind
from consumer.membership.normalise import normalise_address
from consumer.membership.stages import claim_partition
from consumer.ratelimit import RateLimitInfo
from consumer.rows import build_row
from consumer.settings import ConfigError, Destination, Settings, load_settings
from consumer.tuning import RECONCILE_READ_AHEAD_PAGES, RECONCILE_STALL_S

__all__ = [
    "DestinationDrift",
    "ExpectedState",
    "Outcome",
    "cli_main",
    "is_stale",
    "left_alone",
    "reconcile",
    "send_repairs",
]

log = structlog.get_logger("cmsync.reconcile")

#: The classes of the report (`--report`), in the order the summary shows them.
Kind = Literal["missing", "extra", "stale", "protected"]
KINDS: Final[tuple[Kind, ...]] = ("missing", "extra", "stale", "protected")
SKIPPED: Final = 'sends nothing (its connection lacks personal_data = "acknowledged")'
#: Rows compared between two turns of the event loop: comparing a page of 1,000 takes ~15 ms,
#: long enough to make the listing's next request miss its rate-limit slot.
YIELD_EVERY_ROWS: Final = 100
#: How often the watchdog looks at a destination's listing (stall, progress).
WATCH_EVERY_S: Final = 0.5


class ReconcileError(Exception):
    """The reconcile cannot go on (exit 1); the message names what, without personal data."""


@dataclass(slots=True)
class DestinationDrift:
    """What one destination's list showed against the state (counts only, and the repairs)."""

    name: str
    expected: int = 0  # addresses a member holds (should be Active)
    active: int = 0  # Active in Campaign Monitor
    counts: dict[Kind, int] = field(default_factory=lambda: dict.fromkeys(KINDS, 0))
    repairs: list[Repair] = field(default_factory=list, repr=False)
    repairs_sent: int = 0
    failed: str | None = None  # why the list could not be reconciled (no personal data)


@dataclass(slots=True)
class Outcome:
    drifts: list[DestinationDrift]
    seconds: float
    dry_run: bool
    #: destinations left out: they send nothing (no personal data acknowledgement), so the
    #: service would apply no repair of theirs
    skipped: list[str] = field(default_factory=list)

    @property
    def failed(self) -> list[DestinationDrift]:
        return [d for d in self.drifts if d.failed is not None]


# ----------------------------------------------------------------------------- the state


class ExpectedState:
    """Stage 2's state as the addresses changelog holds it, restored into temporary stores:
    per (list, address), who holds it and whether the sync removed it. Partitioned like the
    claims (`claim_partition`), so one lookup reads one store."""

    def __init__(self, tables: Sequence[AddressTable]) -> None:
        self._tables = tables

    @classmethod
    @contextlib.asynccontextmanager
    async def restored(
        cls, kafka: Mapping[str, Any], topics: InternalTopics
    ) -> AsyncIterator[ExpectedState]:
        """Read the addresses changelog to its end into stores under a temporary directory
        (removed on exit). `ReconcileError` when the topic does not exist."""
        consumer = AIOKafkaConsumer(
            group_id=None, enable_auto_commit=False, auto_offset_reset="earliest", **kafka
        )
        await consumer.start()
        try:
            with tempfile.TemporaryDirectory(prefix="cmsync-reconcile-") as tmp:
                topic = topics.addresses_changelog
                await consumer.topics()  # fetches the cluster's metadata
                partitions = consumer.partitions_for_topic(topic)
                if not partitions:
                    raise ReconcileError(
                        f"the state topic {topic} does not exist: is CMSYNC_KAFKA_GROUP_ID the "
                        "service's, and has `cmsync run` started with it?"
                    )
                paths = {TopicPartition(topic, p): Path(tmp) / str(p) for p in sorted(partitions)}
                stores = await changelog.restore_all(consumer, paths)
                try:
                    yield cls([AddressTable(stores[tp]) for tp in sorted(stores)])
                finally:
                    for store in stores.values():  # before their directory goes
                        store.close()
        finally:
            await consumer.stop()

    def state(self, list_id: str, address: str) -> AddressState | None:
        key = address_key(list_id, address)
        return self._tables[claim_partition(key, len(self._tables))].state(list_id, address)

    def held(self, list_id: str) -> Iterable[tuple[str, AddressState]]:
        """(address, state) of every address of the list some member holds."""
        for table in self._tables:
            for address, state in table.states(list_id):
                if state.newest() is not None:
                    yield address, state


# ----------------------------------------------------------------------------- one list


def _shown(member: Mapping[str, Any]) -> dict[str, list[str]]:
    """A listed member's custom field values by `key_of` their key, each sorted."""
    shown: dict[str, list[str]] = {}
    for item in member.get("CustomFields") or ():
        if isinstance(item, dict) and isinstance(item.get("Key"), str):
            shown.setdefault(key_of(item["Key"]), []).append(str(item.get("Value", "")))
    return {key: sorted(values) for key, values in shown.items()}


def _same(value: str, shown: str, field_type: FieldType | None) -> bool:
    """Whether Campaign Monitor shows ``value`` (as the sync sends it) as ``shown``: dates
    compared by their digits (a listing may use another separator), multi-select options
    without regard to letter case, numbers by value."""
    if value == shown:
        return True
    kind = None if field_type is None else field_type.data_type
    if kind == "Date":
        return [c for c in value if c.isdigit()] == [c for c in shown if c.isdigit()]
    if kind in ("MultiSelectOne", "MultiSelectMany"):
        return value.casefold() == shown.casefold()
    if kind == "Number":
        with contextlib.suppress(ValueError):
            return float(value) == float(shown)
    return False


def is_stale(
    row: SubscriberRow, member: Mapping[str, Any], types: Mapping[str, FieldType] | None
) -> bool:
    """Whether a listed Active member differs from the import row the sync would send for it
    (only what the row sets: an absent profile field leaves the list's value alone)."""
    if row.name is not None and row.name != member.get("Name"):
        return True
    wanted: dict[str, list[str]] = {}
    for custom in row.custom_fields:
        values = wanted.setdefault(key_of(custom.key), [])
        if not custom.clear:
            values.append(custom.value)
    shown = _shown(member)
    for key, values in wanted.items():
        now = shown.get(key, [])
        field_type = None if types is None else types.get(key)
        if len(values) != len(now) or not all(
            _same(v, s, field_type) for v, s in zip(sorted(values), now, strict=True)
        ):
            return True
    return False


def left_alone(
    dest: Destination, address: str, state: AddressState, deleted: bool, opted: OptOuts
) -> bool:
    """Whether a held address that the list does not show Active stays as it is (protected):
    what the flusher does with a re-entry (README, the consent table). ``deleted``: the list
    shows it Deleted; ``opted``: the list's and the client's opt-outs."""
    inactive = deleted or address in opted.unsubscribed or opted.protects(address)
    if not inactive or dest.resubscribe == "always":
        return False
    if dest.resubscribe == "never" or not state.removed_by_sync:
        return True  # Resubscribe: false leaves it inactive (Deleted by hand included)
    # deleted-only, removed by the sync: back, unless the person opted out since
    return opted.protects(address, unsubscribed_by_sync=dest.removal == "unsubscribe")


class _Watch:
    """When Campaign Monitor last answered one API key's requests with success (any 2xx to
    4xx but a 429), for the watchdog (`_guarded`): the key's client observer, wrapped."""

    def __init__(self, gateway: ApiGateway, clock: Callable[[], float]) -> None:
        self._clock = clock
        self.at = clock()
        observe = gateway.client.observer

        def observer(
            endpoint: str,
            status: int,
            info: RateLimitInfo | None,
            seconds: float,
            address_throttled: bool,
        ) -> None:
            if 0 < status < 500 and status != 429:
                self.at = self._clock()
            if observe is not None:
                observe(endpoint, status, info, seconds, address_throttled)

        gateway.client.observer = observer


Row = dict[str, Any]


async def _read_ahead(rows: AsyncIterator[Row], pages: int) -> AsyncIterator[Row]:
    """``rows``, read by a task of their own up to ``pages`` pages ahead of the caller: the
    listing goes on while the caller waits (for the state's restore). The listing's error is
    raised to the caller where it happened."""
    queue: asyncio.Queue[list[Row] | Exception | None] = asyncio.Queue(maxsize=pages)

    async def pull() -> None:
        try:
            page: list[Row] = []
            async for row in rows:
                page.append(row)
                if len(page) == MAX_PAGE_SIZE:
                    await queue.put(page)
                    page = []
            await queue.put(page)
            await queue.put(None)
        except Exception as exc:  # handed over, raised by the reader
            await queue.put(exc)

    reader = asyncio.create_task(pull())
    try:
        while (item := await queue.get()) is not None:
            if isinstance(item, Exception):
                raise item
            for n, row in enumerate(item, 1):
                yield row
                if not n % YIELD_EVERY_ROWS:  # let the listing's next slot go out on time
                    await asyncio.sleep(0)
    finally:
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reader


async def _compare(
    dest: Destination,
    gateway: ApiGateway,
    consent: ListConsent,
    restored: asyncio.Future[ExpectedState],
    report: Callable[[str, str, Kind], None],
    clock: Callable[[], float],
) -> DestinationDrift:
    """Read one destination's list and classify every address (module docstring). The list's
    settings, opt-outs, Deleted members and first pages of Active ones are read while the
    state is being ``restored``."""
    drift = DestinationDrift(dest.name)
    check = await read_list_check(gateway, dest)
    if check.held_reason is not None:
        raise ReconcileError(f"the service holds this destination: {check.held_reason}")
    types = check.types
    read_from = clock()
    try:
        await consent.read()
    except ConsentUnknownError as exc:
        raise ReconcileError(str(exc)) from exc
    deleted = {
        hash(normalise_address(str(row.get("EmailAddress", ""))))
        async for row in gateway.members(dest.list_id, "deleted", destination=dest.name)
    }
    counts = drift.counts

    def found(address: str, kind: Kind, repair: RepairKind | None) -> None:
        counts[kind] += 1
        report(dest.name, address, kind)
        if repair is not None:
            drift.repairs.append(Repair(dest.list_id, address, repair))

    listing = gateway.members(dest.list_id, "active", destination=dest.name)
    members = _read_ahead(listing, RECONCILE_READ_AHEAD_PAGES)
    expected = await asyncio.shield(restored)  # shared: one list's failure must not cancel it
    active: set[int] = set()
    async for member in members:
        address = normalise_address(str(member.get("EmailAddress", "")))
        active.add(hash(address))
        state = expected.state(dest.list_id, address)
        newest = None if state is None else state.newest()
        if newest is None:
            found(address, "extra", "extra" if dest.extras == "remove" else None)
            continue
        row = build_row(dest, address, newest[1].fields, types)
        if not isinstance(row, Unfit) and is_stale(row, member, types):
            found(address, "stale", "reassert")
    drift.active = len(active)

    absent: list[tuple[str, AddressState]] = []
    for address, state in expected.held(dest.list_id):
        drift.expected += 1
        if hash(address) not in active:
            absent.append((address, state))
    opted = await consent.opted_out([a for a, _ in absent], since=read_from, activating=True)
    for address, state in absent:
        if left_alone(dest, address, state, hash(address) in deleted, opted):
            found(address, "protected", None)
        else:
            found(address, "missing", "reassert")
    return drift


async def _guarded(
    work: asyncio.Task[DestinationDrift],
    gateway: ApiGateway,
    name: str,
    watch: _Watch,
    restoring: asyncio.Future[ExpectedState],
    stall_s: float,
    clock: Callable[[], float],
) -> DestinationDrift:
    """``work``'s result, or a failed drift when Campaign Monitor refuses the destination (the
    gateway stalls it) or nothing progressed for ``stall_s``: the gateway retries forever,
    as the service must, but a job has to end. While the state is ``restoring`` the listing
    may wait for it (read ahead, then paused): that is no stall."""
    while True:
        done, _ = await asyncio.wait({work}, timeout=WATCH_EVERY_S)
        if done:
            try:
                return work.result()
            except ReconcileError as exc:
                return DestinationDrift(name, failed=str(exc))
        if not restoring.done():
            watch.at = clock()
        reason = gateway.stalled_reason(name)
        if reason is None and clock() - watch.at > stall_s:
            reason = f"Campaign Monitor made no progress for {stall_s:.0f} s (retried meanwhile)"
        if reason is not None:
            work.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await work
            return DestinationDrift(name, failed=reason)


# ----------------------------------------------------------------------------- repairs


async def send_repairs(
    kafka: Mapping[str, Any],
    topics: InternalTopics,
    repairs: Sequence[Repair],
    found: Sequence[DriftFound] = (),
) -> None:
    """Write the repairs to the claims topic, each to its key's claims partition, then what
    was found per list (`DriftFound`, for the `cmsync_drift_found` gauges of the service), and
    wait until the broker acknowledged all of them (acks=all)."""
    producer = AIOKafkaProducer(acks="all", **kafka)
    await producer.start()
    try:
        partitions = sorted(await producer.partitions_for(topics.claims))
        by_partition: dict[int, list[tuple[bytes, bytes | None]]] = {}
        records = [*map(encode_repair, repairs), *map(encode_drift_found, found)]
        for key, value in records:
            partition = partitions[claim_partition(key, len(partitions))]
            by_partition.setdefault(partition, []).append((key, value))
        await asyncio.gather(
            *(
                changelog.send_batched(producer, topics.claims, partition, records)
                for partition, records in by_partition.items()
            )
        )
    finally:
        await producer.stop()


# ----------------------------------------------------------------------------- the command


async def reconcile(
    settings: Settings,
    *,
    names: Sequence[str] = (),
    dry_run: bool = False,
    report: IO[bytes] | None = None,
    stall_s: float = RECONCILE_STALL_S,
    clock: Callable[[], float] = time.monotonic,
) -> Outcome:
    """Reconcile the destinations named (all when empty; unknown names are the caller's to
    refuse): read, classify, and unless ``dry_run`` send the repairs of those that were read.
    ``report`` receives the per-address detail as JSON lines."""
    started = clock()
    named = [d for d in settings.destinations if not names or d.name in names]
    chosen = [d for d in named if d.sends]
    skipped = [d.name for d in named if not d.sends]
    if skipped:
        log.warning("reconcile_skipped", destinations=skipped, reason=SKIPPED)
    kafka = settings.kafka.client_kwargs()
    topics = InternalTopics.of_group(settings.kafka.group_id)

    def write_report(destination: str, address: str, kind: Kind) -> None:
        if report is not None:
            line = {"destination": destination, "address": address, "kind": kind}
            report.write(orjson.dumps(line) + b"\n")

    async with contextlib.AsyncExitStack() as stack:
        session = await stack.enter_async_context(aiohttp.ClientSession())
        session._retry_connection = False  # as in the service: no retry behind the limiter
        gateways = gateways_for(
            chosen,
            base_url=settings.cm_base_url,
            rate_limit_rps=settings.rate_limit_rps,
            session=session,
        )
        book = ConsentBook(gateways, refresh_s=float("inf"))

        watches = {id(g): _Watch(g, clock) for g in gateways.values()}

        # The restore goes on while the lists are read (its stores close with the stack).
        restoring = asyncio.create_task(
            stack.enter_async_context(ExpectedState.restored(kafka, topics))
        )

        async def one(dest: Destination) -> DestinationDrift:
            gateway = gateways[dest.name]
            consent = book.for_destination(dest)
            work = asyncio.create_task(
                _compare(dest, gateway, consent, restoring, write_report, clock)
            )
            watch = watches[id(gateway)]
            return await _guarded(work, gateway, dest.name, watch, restoring, stall_s, clock)

        try:
            drifts = list(await asyncio.gather(*(one(d) for d in chosen)))
            await restoring  # a failed restore fails the command, not one destination
        finally:
            if not restoring.done():
                restoring.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await restoring
    for drift in drifts:
        if drift.failed is not None:
            log.error("reconcile_failed", destination=drift.name, reason=drift.failed)
            continue
        log.info(
            "reconcile_destination",
            destination=drift.name,
            expected=drift.expected,
            active=drift.active,
            **drift.counts,
            repairs=len(drift.repairs),
            dry_run=dry_run,
        )
    read = [d for d in drifts if d.failed is None]
    repairs = [r for d in read for r in d.repairs]
    if read and not dry_run:
        lists = {d.name: d.list_id for d in chosen}
        found = [DriftFound(lists[d.name], {str(k): n for k, n in d.counts.items()}) for d in read]
        await send_repairs(kafka, topics, repairs, found)
        for drift in drifts:
            drift.repairs_sent = len(drift.repairs) if drift.failed is None else 0
    return Outcome(drifts, clock() - started, dry_run, skipped)


def render(outcome: Outcome) -> str:
    """The summary (stdout): counts per destination, no personal data."""
    header = ("destination", "expected", "active", *KINDS, "repairs sent")
    rows = [header]
    for d in outcome.drifts:
        if d.failed is None:
            counts = [str(d.counts[k]) for k in KINDS]
            rows.append((d.name, str(d.expected), str(d.active), *counts, str(d.repairs_sent)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = [
        "  ".join(
            cell.ljust(w) if i == 0 else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        )
        for row in rows
    ]
    what = "dry run, nothing repaired" if outcome.dry_run else "repairs handed to the service"
    lines.insert(
        0,
        f"cmsync reconcile: {len(outcome.drifts)} destination(s) in "
        f"{outcome.seconds:.1f} s ({what})",
    )
    lines += [f"skipped {name}: {SKIPPED}" for name in outcome.skipped]
    lines += [f"FAILED {d.name}: {d.failed}" for d in outcome.failed]
    return "\n".join(lines)


def _private(path: str) -> IO[bytes]:
    """The report file, created readable by its owner only (it holds email addresses)."""
    return os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cmsync reconcile",
        description="Compare every destination's list in Campaign Monitor with the segment\n"
        "membership the service holds (its state topics), print the drift per destination\n"
        "(missing, extra, stale fields, protected by consent) without personal data, and\n"
        "hand the repairs to the running service: missing and stale addresses are applied\n"
        'again; extras (active, held by no member) are removed only where extras = "remove".\n'
        "Protected addresses (opted out, or deleted by hand) are never touched unless the\n"
        'destination says resubscribe = "always". Same settings as `cmsync run`.\n\n'
        "Exit 0 when the drift was repaired (or reported, with --dry-run), 2 on a usage or\n"
        "configuration error, 1 otherwise (e.g. a list could not be read: named on stderr).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="report only: no write to Campaign Monitor, no record to Kafka",
    )
    parser.add_argument(
        "--destination",
        metavar="NAME",
        action="append",
        default=[],
        help="reconcile this destination only (repeatable; default: all)",
    )
    parser.add_argument(
        "--report",
        metavar="PATH",
        help="write the per-address detail to PATH (JSON lines: destination, address, kind); "
        "it holds email addresses",
    )
    return parser


def cli_main(argv: list[str]) -> int:
    """`cmsync reconcile` (exit codes: module docstring)."""
    args = parse_args(_parser(), argv)
    if isinstance(args, int):
        return args
    try:
        settings = load_settings(os.environ)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    known = {d.name for d in settings.destinations}
    unknown = [n for n in args.destination if n not in known]
    if unknown:
        print(
            f"cmsync reconcile: unknown destination(s) {', '.join(unknown)}; the destinations "
            f"file names {', '.join(sorted(known))}",
            file=sys.stderr,
        )
        return 2
    obs.configure_logging(settings.log_level, settings.log_format)  # type: ignore[arg-type]
    try:
        with contextlib.ExitStack() as files:
            report = None if args.report is None else files.enter_context(_private(args.report))
            outcome = asyncio.run(
                reconcile(settings, names=args.destination, dry_run=args.dry_run, report=report)
            )
    except (ReconcileError, KafkaError, OSError) as exc:
        log.error("reconcile_failed", error=type(exc).__name__)
        print(f"cmsync reconcile: {exc}", file=sys.stderr)
        return 1
    print(render(outcome))
    for drift in outcome.failed:
        print(f"cmsync reconcile: {drift.name}: {drift.failed}", file=sys.stderr)
    return 1 if outcome.failed else 0
