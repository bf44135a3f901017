"""Consent: which addresses the person (or Campaign Monitor) made inactive, as of moments ago.

Guarantee 3 of the contract: an address that is Unsubscribed, Bounced or suppressed is never
made active again and never deleted (deleting would erase the evidence of the opt-out), unless
the destination says ``resubscribe = "always"``, however recently before the write the person
opted out. The flusher asks `ListConsent.opted_out` right before the writes that could break
that (see `consumer.flusher`: deletes and unsubscribes, and imports sent with
``Resubscribe: true``); every other write is safe without asking, because an import sent with
``Resubscribe: false`` leaves an inactive address inactive.

How the knowledge is kept fresh, per list (and per client for the suppression list):

* a **full read** of the list's Unsubscribed and Bounced listings (and of the client's
  suppression list, when the destination's connection names the client) when the flusher
  starts, and again every ``refresh_s`` (it forgets people who came back by their own choice);
* an **incremental read** right before the writes that need it: the same listings with the
  ``date`` filter, from the newest date seen less `INCREMENTAL_MARGIN_S` (the filter has minute
  precision, and the dates are in the account's time zone, so the service compares the
  server's dates with each other, never with its own clock), newest first, until a page brings
  no address not known yet: one page per state as a rule. One
  read serves every write that waits while it runs (one read at a time per list), and a read
  younger than `FRESH_S` serves the writes that come after it.

Why listings and not a read per address: a removal is one request; reading the address first
doubles that, while the incremental reads cost two or three requests per `FRESH_S` for every
removal and re-entry of the list in that time. (Measured in ``tests/test_consent.py``:
``test_request_cost``.) Until the first full read of a list is done, a few addresses at a time
are asked one by one (`PER_ADDRESS_LIMIT`), so removals keep flowing while a long listing is
read; the suppression list is not part of that answer, so a re-entry waits for it.

Fail closed: a read that fails for a reason retrying cannot fix (the gateway retries the rest,
page by page, resuming where it stopped) raises `ConsentUnknownError`; the flusher holds the writes
that needed it and tries again later (``cmsync_consent_unknown_total``, one log line).

What remains open, and is said in the README: the window between the read and the write (one
request, plus the rate limiter's wait of that write) is not covered; a person who re-subscribes
by their own choice stays protected until the next full read.
"""

from __future__ import annotations

import asyncio
import datetime
import time
from collections.abc import AsyncIterator, Callable, Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final

import structlog

from consumer import observability as obs
from consumer.campaign_monitor.client import (
    MAX_PAGE_SIZE,
    CampaignMonitorClient,
    MemberState,
    RecordRejected,
    RequestInvalid,
)
from consumer.gateway import ApiGateway
from consumer.membership.normalise import normalise_address
from consumer.settings import Destination
from consumer.tuning import (
    CONSENT_FRESH_S,
    CONSENT_INCREMENTAL_MARGIN_S,
    CONSENT_PER_ADDRESS_LIMIT,
    LISTING_PRIORITY,
)

__all__ = ["ConsentBook", "ConsentUnknownError", "ListConsent", "OptOuts"]

log = structlog.get_logger("cmsync.consent")

FRESH_S: Final = CONSENT_FRESH_S
INCREMENTAL_MARGIN_S: Final = CONSENT_INCREMENTAL_MARGIN_S
PER_ADDRESS_LIMIT: Final = CONSENT_PER_ADDRESS_LIMIT
#: After a failed first read, the next try (meanwhile the writes that need it are held).
WARM_RETRY_S: Final = 30.0

#: Campaign Monitor's date format in listings ("2026-11-29 10:28:00").
_DATE_FORMAT: Final = "%Y-%m-%d %H:%M:%S"


class ConsentUnknownError(Exception):
    """The service cannot tell now whether addresses opted out: hold the writes that need it.
    The message carries no personal data."""


@dataclass(frozen=True, slots=True)
class OptOuts:
    """Of the addresses asked about: which the person (or Campaign Monitor) made inactive.

    ``unsubscribed`` may hold the sync's own unsubscribes (``removal = "unsubscribe"``): the
    caller, which knows what the sync removed, tells them apart (`protects`)."""

    unsubscribed: frozenset[str] = frozenset()
    bounced: frozenset[str] = frozenset()
    suppressed: frozenset[str] = frozenset()

    def protects(self, address: str, *, unsubscribed_by_sync: bool = False) -> bool:
        """Whether ``address`` must be neither reactivated nor deleted."""
        if address in self.bounced or address in self.suppressed:
            return True
        return address in self.unsubscribed and not unsubscribed_by_sync


def _parse_date(value: object) -> datetime.datetime | None:
    if not isinstance(value, str):
        return None
    try:
        return datetime.datetime.strptime(value[:19], _DATE_FORMAT)
    except ValueError:
        return None


class _Known:
    """The addresses one listing holds (a list's Unsubscribed or Bounced members, a client's
    suppression list), as hashes of the normalised address: 8 bytes of key per person instead
    of the address (a collision protects an address that did not opt out: the safe side, and
    about one in 10^19 per pair)."""

    def __init__(
        self,
        what: str,
        destination: str,
        full: Callable[[], AsyncIterator[dict[str, Any]]],
        since: Callable[[str], AsyncIterator[dict[str, Any]]],
        clock: Callable[[], float],
        refresh_s: float,
    ) -> None:
        self.what = what  # "unsubscribed", "bounced", "suppressed": a metric label
        self._destination = destination
        self._full = full
        self._since = since
        self._clock = clock
        self._refresh_s = refresh_s
        self._hashes: set[int] = set()
        self._newest: datetime.datetime | None = None  # the newest row date seen
        self._full_at: float | None = None  # when the last full read started
        self.fresh_at: float | None = None  # when the last completed read started
        self._lock = asyncio.Lock()

    @property
    def ready(self) -> bool:
        """A full read has completed."""
        return self._full_at is not None

    def __contains__(self, address: str) -> bool:
        return hash(address) in self._hashes

    def __len__(self) -> int:
        return len(self._hashes)

    def forget(self, addresses: Iterable[str]) -> None:
        """These addresses are active again by the sync's own write."""
        self._hashes.difference_update(hash(a) for a in addresses)

    async def refresh(self, since: float) -> None:
        """Make sure a read that started at or after ``since`` (the clock's time) completed:
        wait for the one under way, or read (in full when due, else incrementally)."""
        async with self._lock:
            if self.fresh_at is not None and self.fresh_at >= since:
                return
            started = self._clock()
            full = self._full_at is None or started - self._full_at >= self._refresh_s
            try:
                if full:
                    await self._read_full()
                    self._full_at = started
                else:
                    await self._read_since()
            except (RecordRejected, RequestInvalid) as exc:
                obs.consent_reads.labels(
                    destination=self._destination, listing=self.what, outcome="failed"
                ).inc()
                raise ConsentUnknownError(
                    f"the {self.what} listing could not be read (code {exc.code})"
                ) from exc
            obs.consent_reads.labels(
                destination=self._destination,
                listing=self.what,
                outcome="full" if full else "incremental",
            ).inc()
            self.fresh_at = started

    async def _read_full(self) -> None:
        hashes: set[int] = set()
        newest: datetime.datetime | None = None
        async for row in self._full():
            hashes.add(hash(normalise_address(str(row.get("EmailAddress", "")))))
            date = _parse_date(row.get("Date"))
            if date is not None and (newest is None or date > newest):
                newest = date
        self._hashes, self._newest = hashes, newest

    async def _read_since(self) -> None:
        """The rows dated from the newest seen less the margin, newest first, until a whole
        page brings no address not known yet: new opt-outs are at the top, so a read costs
        one page (two when a page's worth opted out) however many rows share the window."""
        if self._newest is None:
            # Nobody in this state yet: from yesterday, whatever the account's time zone.
            now = datetime.datetime.now(datetime.UTC).replace(tzinfo=None)  # as the rows' dates
            start = now - datetime.timedelta(days=1)
            since = start.strftime("%Y-%m-%d")
        else:
            start = self._newest - datetime.timedelta(seconds=INCREMENTAL_MARGIN_S)
            since = start.strftime("%Y-%m-%d %H:%M")
        hashes = self._hashes
        in_page = new_in_page = 0
        async for row in self._since(since):
            date = _parse_date(row.get("Date"))
            if date is not None:
                if date < start:  # a listing without a date filter (suppression): done
                    break
                if self._newest is None or date > self._newest:
                    self._newest = date
            hashed = hash(normalise_address(str(row.get("EmailAddress", ""))))
            if hashed not in hashes:
                hashes.add(hashed)
                new_in_page += 1
            in_page += 1
            if in_page == MAX_PAGE_SIZE:  # the next row would fetch the next page
                if not new_in_page:
                    break
                in_page = new_in_page = 0


class ConsentBook:
    """The consent knowledge of the service: one `ListConsent` per destination, one
    suppression listing per client ID, shared by the destinations of that client."""

    def __init__(
        self,
        gateways: Mapping[str, ApiGateway],
        *,
        refresh_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._gateways = gateways  # by destination name
        self._refresh_s = refresh_s
        self._clock = clock
        self._suppression: dict[str, _Known] = {}

    def for_destination(self, destination: Destination) -> ListConsent:
        gateway = self._gateways[destination.name]
        suppression = None
        client_id = destination.client_id
        if client_id:
            suppression = self._suppression.get(client_id)
            if suppression is None:
                name = destination.name

                def full() -> AsyncIterator[dict[str, Any]]:
                    return gateway.suppressed(client_id, destination=name)

                def since(_since: str) -> AsyncIterator[dict[str, Any]]:
                    # No date filter on this listing: newest first, until older than the mark.
                    return gateway.suppressed(
                        client_id, destination=name, order_field="date", descending=True
                    )

                suppression = self._suppression[client_id] = _Known(
                    "suppressed", name, full, since, self._clock, self._refresh_s
                )
        return ListConsent(
            destination, gateway, suppression, refresh_s=self._refresh_s, clock=self._clock
        )


class ListConsent:
    """What one destination's flusher asks before a write that could override an opt-out."""

    def __init__(
        self,
        destination: Destination,
        gateway: ApiGateway,
        suppression: _Known | None = None,
        *,
        refresh_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.destination = destination
        self._gateway = gateway
        self._clock = clock
        name, list_id = destination.name, destination.list_id

        def known(state: MemberState) -> _Known:
            def full() -> AsyncIterator[dict[str, Any]]:
                return gateway.members(list_id, state, destination=name)

            def since(since: str) -> AsyncIterator[dict[str, Any]]:
                return gateway.members(
                    list_id,
                    state,
                    destination=name,
                    since=since,
                    order_field="date",
                    descending=True,
                )

            return _Known(state, name, full, since, clock, refresh_s)

        self._states = (known("unsubscribed"), known("bounced"))
        self._suppression = suppression

    async def warm(self) -> None:
        """The first full reads (the flusher runs this as it starts), so that they are done,
        or under way, by the time a write needs them; tried again while they fail."""
        while True:
            try:
                await self.read()
                return
            except ConsentUnknownError as exc:
                log.warning(
                    "consent_read_failed", destination=self.destination.name, reason=str(exc)
                )
                await asyncio.sleep(WARM_RETRY_S)

    async def read(self) -> None:
        """Read every listing now (in full the first time, the suppression list included);
        `ConsentUnknownError` when one cannot be read. After it, `opted_out` with a ``since``
        taken before the call answers from what was read (`cmsync reconcile`)."""
        await self._refresh_all(self._clock(), suppression=True)

    async def opted_out(
        self, addresses: Collection[str], *, since: float, activating: bool
    ) -> OptOuts:
        """Of ``addresses`` (normalised), those opted out as of a read that started at or
        after ``since`` (this object's clock). ``activating``: the write would make them
        active (the client's suppression list counts, and is waited for); otherwise it would
        delete or unsubscribe them (the list's own states are what a delete would erase).

        Raises `ConsentUnknownError` when that cannot be known now."""
        if not addresses:
            return OptOuts()
        suppression = self._suppression
        if not all(k.ready for k in self._states) and len(addresses) <= PER_ADDRESS_LIMIT:
            found = await self._ask_each(addresses)
            if suppression is not None and (activating or suppression.ready):
                await suppression.refresh(since)
                found = OptOuts(
                    found.unsubscribed,
                    found.bounced,
                    frozenset(a for a in addresses if a in suppression),
                )
            return found
        await self._refresh_all(
            since, suppression=suppression is not None and (activating or suppression.ready)
        )
        unsubscribed, bounced = self._states
        return OptOuts(
            frozenset(a for a in addresses if a in unsubscribed),
            frozenset(a for a in addresses if a in bounced),
            frozenset()
            if suppression is None or not suppression.ready
            else frozenset(a for a in addresses if a in suppression),
        )

    async def _refresh_all(self, since: float, *, suppression: bool) -> None:
        reads = [k.refresh(since) for k in self._states]
        if suppression and self._suppression is not None:
            reads.append(self._suppression.refresh(since))
        try:
            async with asyncio.TaskGroup() as group:
                for read in reads:
                    group.create_task(read)
        except* ConsentUnknownError as failed:
            first = failed.exceptions[0]
            raise ConsentUnknownError(str(first)) from first

    async def _ask_each(self, addresses: Collection[str]) -> OptOuts:
        """One GET per address (while the first full read is under way)."""
        dest = self.destination
        states: dict[str, str] = {}

        async def ask(address: str) -> None:
            async def request(client: CampaignMonitorClient) -> dict[str, Any] | None:
                return await client.get_subscriber(dest.list_id, address)

            try:
                found = await self._gateway.call(
                    request, destination=dest.name, priority=LISTING_PRIORITY
                )
            except (RecordRejected, RequestInvalid) as exc:
                raise ConsentUnknownError(
                    f"a subscriber could not be read (code {exc.code})"
                ) from exc
            if found is not None:
                states[address] = str(found.get("State", "")).lower()

        try:
            async with asyncio.TaskGroup() as group:
                for address in addresses:
                    group.create_task(ask(address))
        except* ConsentUnknownError as failed:
            first = failed.exceptions[0]
            raise ConsentUnknownError(str(first)) from first
        obs.consent_reads.labels(
            destination=dest.name, listing="subscriber", outcome="per_address"
        ).inc(len(addresses))
        return OptOuts(
            frozenset(a for a, s in states.items() if s == "unsubscribed"),
            frozenset(a for a, s in states.items() if s == "bounced"),
            frozenset(a for a, s in states.items() if s == "suppressed"),
        )

    def reactivated(self, addresses: Iterable[str]) -> None:
        """The sync made these addresses active again (an import with ``Resubscribe: true``
        succeeded): they are no longer the list's Unsubscribed or Bounced members. Without
        this, the sync's own unsubscribe, undone by a re-entry, would protect the address
        until the next full read, and the next exit would leave it active."""
        addresses = list(addresses)
        for known in self._states:
            known.forget(addresses)

    def sizes(self) -> dict[str, int]:
        """How many addresses each listing holds (for tests and status)."""
        sizes = {k.what: len(k) for k in self._states}
        if self._suppression is not None:
            sizes["suppressed"] = len(self._suppression)
        return sizes
