"""The gateway to Campaign Monitor: one per API key, the only way the service sends a request.

Every HTTP request of the service goes through an `ApiGateway`, listings included (one
rate-limit slot per page request), and there

* takes its slot from the key's `AimdRateLimiter` (imports and listings before removals in
  the limiter's line: an import carries up to 1000 changes);
* is retried when retrying can fix it: `RateLimited` at once (the limiter, told of the 429 by
  the client's observer, already slowed down), `TransientError` after a full-jitter
  exponential backoff (`consumer.retry`), both without a time limit;
* stalls the destination that made it on `DestinationFatal` (bad key, unknown list): the
  destination reports `stalled_reason`, `cmsync_destination_up` drops to 0, one log line per
  retry every `STALL_RETRY_S`; the first success afterwards clears the stall;
* counts against a limit of calls in flight per destination (`CALLS_IN_FLIGHT`, retries and
  their waits included), so an outage cannot multiply one destination's retries;
* feeds the limiter and the call metrics from the client's observer (every response, errors
  included).
`RecordRejected`, `RequestInvalid` and `AddressThrottled` (a 429 about one subscriber written
too often, which does not slow the key) go back to the caller, whose record it is.

One gateway per API key *value* (`gateways_for`): destinations whose variables hold the same
key share one client and one limiter, so the key's ceiling holds however many variables name
it. Metrics label the key by the first such variable's *name*, never by the key.

Listings (`members`, `suppressed`) are read one `call` per page, so a 429, a 5xx or a
truncated page (the client's `TransientError`) repeats that page only: paging resumes where it
stopped, and a listing is never returned short.

Callers: the flushers (`import_subscribers`, `remove`, `stalled_reason`), the consent
bookkeeping (`members`, `suppressed`), the checks of list settings (`list_details`,
`custom_fields`), and anything later that needs the API (`call`).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

import aiohttp
import structlog

from consumer import observability as obs
from consumer.campaign_monitor.client import (
    MAX_PAGE_SIZE,
    ApiKey,
    CampaignMonitorClient,
    DestinationFatal,
    ImportResult,
    MembersPage,
    MemberState,
    OrderField,
    RateLimited,
    SubscriberRow,
    TransientError,
)
from consumer.ratelimit import AimdRateLimiter, RateLimitInfo
from consumer.retry import Backoff
from consumer.settings import Destination
from consumer.tuning import (
    API_BACKOFF_BASE_S,
    API_BACKOFF_CAP_S,
    CALLS_IN_FLIGHT,
    IMPORT_PRIORITY,
    LISTING_PRIORITY,
    REMOVAL_PRIORITY,
    STALL_LOG_SLACK_S,
    STALL_RETRY_S,
)

__all__ = [
    "IMPORT_PRIORITY",
    "LISTING_PRIORITY",
    "REMOVAL_PRIORITY",
    "ApiGateway",
    "RemovalMode",
    "gateways_for",
]

log = structlog.get_logger("cmsync.gateway")

T = TypeVar("T")


RemovalMode = Literal["delete", "unsubscribe"]
Request = Callable[[CampaignMonitorClient], Awaitable[T]]


@dataclass(slots=True)
class _Line:
    """One destination's share of a gateway: its calls in flight and its stall."""

    calls: asyncio.Semaphore
    stalled_reason: str | None = None
    last_stall_log: float = field(default=-math.inf)


class ApiGateway:
    """One API key: its client and its rate limiter; every request of the key goes through
    `call` (the other request methods are `call` with the priority their kind has).

    Construct through `gateways_for` in the service; the constructor takes over the client's
    observer. ``backoff`` and ``stall_retry_s`` exist for tests.
    """

    def __init__(
        self,
        key_name: str,
        client: CampaignMonitorClient,
        limiter: AimdRateLimiter,
        *,
        clock: Callable[[], float] = time.monotonic,
        backoff: Backoff | None = None,
        stall_retry_s: float = STALL_RETRY_S,
        calls_in_flight: int = CALLS_IN_FLIGHT,
    ) -> None:
        self.key_name = key_name  # the env var's NAME: safe as a metric label
        self.client = client
        self.limiter = limiter
        self._clock = clock
        self._backoff = backoff or Backoff(API_BACKOFF_BASE_S, API_BACKOFF_CAP_S)
        self._stall_retry_s = stall_retry_s
        self._calls_in_flight = calls_in_flight
        self._lines: dict[str, _Line] = {}
        client.observer = self._observe
        obs.permitted_rate.labels(api_key=key_name).set(limiter.rate)

    # ---------------------------------------------------------------- requests

    async def call(
        self, request: Request[T], *, destination: str, priority: int = REMOVAL_PRIORITY
    ) -> T:
        """One logical request for ``destination``, retried until it succeeds or fails for a
        reason retrying cannot fix (`RecordRejected`, `RequestInvalid`: raised to the caller).

        ``request(client)`` must send exactly one HTTP request per await (it is awaited once
        per attempt, each after taking one rate-limit slot). Waits while the destination has
        `CALLS_IN_FLIGHT` calls under way. Cancellation propagates at once.
        """
        line = self._line(destination)
        async with line.calls:
            attempt = 0
            while True:
                await self.limiter.acquire(self._clock, priority=priority)
                try:
                    result = await request(self.client)
                except RateLimited:
                    obs.retries.labels(destination=destination, reason="rate_limited").inc()
                    attempt += 1
                    continue
                except TransientError as exc:
                    obs.retries.labels(destination=destination, reason="transient").inc()
                    delay = self._backoff.delay(attempt)
                    attempt += 1
                    log.warning(
                        "request_retry",
                        destination=destination,
                        endpoint=exc.endpoint,
                        status=exc.status,
                        attempt=attempt,
                        delay_s=round(delay, 3),
                    )
                    await asyncio.sleep(delay)
                    continue
                except DestinationFatal as exc:
                    self._stall(line, destination, exc)
                    await asyncio.sleep(self._stall_retry_s)
                    continue
                if line.stalled_reason is not None:
                    self._unstall(line, destination)
                return result

    async def import_subscribers(
        self,
        list_id: str,
        rows: Sequence[SubscriberRow],
        *,
        resubscribe: bool,
        destination: str,
        priority: int = IMPORT_PRIORITY,
    ) -> ImportResult:
        """Bulk import (≤ 1000 rows) for the flusher: `CampaignMonitorClient.import_subscribers`
        at import priority (or the backfill's, lower)."""
        return await self.call(
            lambda client: client.import_subscribers(list_id, rows, resubscribe=resubscribe),
            destination=destination,
            priority=priority,
        )

    async def remove(
        self, list_id: str, address: str, *, how: RemovalMode, destination: str
    ) -> bool:
        """Delete or unsubscribe one address for the flusher. False: it was not in the list
        (Code 203), which is done too. Codes 204–208 (already inactive) raise `RecordRejected`;
        the caller decides what they mean."""
        if how == "unsubscribe":
            return await self.call(
                lambda client: client.unsubscribe(list_id, address), destination=destination
            )
        return await self.call(
            lambda client: client.delete(list_id, address), destination=destination
        )

    async def members(
        self,
        list_id: str,
        state: MemberState,
        *,
        destination: str,
        since: str | None = None,
        order_field: OrderField = "email",
        descending: bool = False,
        page_size: int = MAX_PAGE_SIZE,
    ) -> AsyncIterator[dict[str, Any]]:
        """Every member of the list in ``state`` (with ``since``: whose state changed on or
        after it, see `CampaignMonitorClient.members_page`), read page by page at listing
        priority: each page is one `call` (one rate-limit slot, retried on its own, a truncated
        page included). Same paging hazard as `CampaignMonitorClient.members`. A bad
        ``page_size`` or ``since`` raises `RequestInvalid` before any request. Caller: the
        consent bookkeeping."""

        def page_request(page: int) -> Request[MembersPage]:
            return lambda client: client.members_page(
                list_id,
                state,
                page,
                page_size=page_size,
                since=since,
                order_field=order_field,
                descending=descending,
            )

        async for member in self._pages(page_request, destination):
            yield member

    async def suppressed(
        self,
        client_id: str,
        *,
        destination: str,
        order_field: OrderField = "email",
        descending: bool = False,
        page_size: int = MAX_PAGE_SIZE,
    ) -> AsyncIterator[dict[str, Any]]:
        """Every row of the client's suppression list (``{SuppressionReason, EmailAddress,
        Date, State}``), read like `members`. A client ID the key does not reach stalls
        ``destination`` (Code 102, `DestinationFatal`) until it does. Caller: the consent
        bookkeeping of destinations with a client ID."""

        def page_request(page: int) -> Request[MembersPage]:
            return lambda client: client.suppression_page(
                client_id,
                page,
                page_size=page_size,
                order_field=order_field,
                descending=descending,
            )

        async for row in self._pages(page_request, destination):
            yield row

    async def custom_fields(self, list_id: str, *, destination: str) -> list[dict[str, Any]]:
        """The list's custom fields (`CampaignMonitorClient.custom_fields`): one `call` at
        listing priority. Caller: the checks of list settings at start."""
        return await self.call(
            lambda client: client.custom_fields(list_id),
            destination=destination,
            priority=LISTING_PRIORITY,
        )

    async def list_details(self, list_id: str, *, destination: str) -> dict[str, Any]:
        """The list's details (``UnsubscribeSetting``, ``ConfirmedOptIn``, …): one `call` at
        listing priority. Caller: the checks of list settings at start."""
        return await self.call(
            lambda client: client.list_details(list_id),
            destination=destination,
            priority=LISTING_PRIORITY,
        )

    async def _pages(
        self, page_request: Callable[[int], Request[MembersPage]], destination: str
    ) -> AsyncIterator[dict[str, Any]]:
        """The rows of a paged listing, one `call` per page: a page that fails is asked again
        (same page number) by `call`, so paging resumes where it stopped."""
        page = 1
        while True:
            found = await self.call(
                page_request(page), destination=destination, priority=LISTING_PRIORITY
            )
            for row in found.members:
                yield row
            if found.last:
                return
            page += 1

    # ---------------------------------------------------------------- stall

    def stalled_reason(self, destination: str) -> str | None:
        """Why Campaign Monitor refuses ``destination`` (no personal data), or None."""
        line = self._lines.get(destination)
        return None if line is None else line.stalled_reason

    def _line(self, destination: str) -> _Line:
        line = self._lines.get(destination)
        if line is None:
            line = self._lines[destination] = _Line(asyncio.Semaphore(self._calls_in_flight))
        return line

    def _stall(self, line: _Line, destination: str, exc: DestinationFatal) -> None:
        reason = f"Campaign Monitor refused the destination (HTTP {exc.status}, code {exc.code})"
        line.stalled_reason = reason
        obs.destination_up.labels(destination=destination).set(0)
        now = self._clock()
        if now - line.last_stall_log >= self._stall_retry_s - STALL_LOG_SLACK_S:
            line.last_stall_log = now
            log.error(
                "destination_stalled",
                destination=destination,
                reason=reason,
                hint="check the API key and ListID of this destination; its offsets stay "
                "uncommitted until it recovers",
                retry_in_s=self._stall_retry_s,
            )

    def _unstall(self, line: _Line, destination: str) -> None:
        line.stalled_reason = None
        line.last_stall_log = -math.inf
        obs.destination_up.labels(destination=destination).set(1)
        log.info("destination_recovered", destination=destination)

    # ---------------------------------------------------------------- responses

    def _observe(
        self,
        endpoint: str,
        status: int,
        info: RateLimitInfo | None,
        seconds: float,
        address_throttled: bool,
    ) -> None:
        """The client's observer (every response): feeds the limiter and the metrics. A 429
        about one address (`AddressThrottled`) is not the key's: it does not slow the key."""
        now = self._clock()
        if address_throttled:
            obs.address_throttled.labels(api_key=self.key_name).inc()
        elif status == 429:
            # One burst of 429s to requests sent together counts as one decrease.
            self.limiter.on_throttled(now, info, sent_at=now - seconds)
            obs.api_throttled.labels(api_key=self.key_name).inc()
        elif 0 < status < 500:
            self.limiter.on_success(now, info)
        obs.permitted_rate.labels(api_key=self.key_name).set(self.limiter.rate)
        obs.api_requests.labels(endpoint=endpoint, status=str(status)).inc()
        obs.api_latency.labels(endpoint=endpoint).observe(seconds)


def gateways_for(
    destinations: Iterable[Destination],
    *,
    base_url: str,
    rate_limit_rps: float,
    session: aiohttp.ClientSession | None,
    clock: Callable[[], float] = time.monotonic,
    by_key: dict[str, ApiGateway] | None = None,
) -> Mapping[str, ApiGateway]:
    """The gateway of each destination, by destination name: one per API key value, named
    (in metrics) after the first variable holding it. Caller: the service, at start and on a
    reload, with its ``by_key`` (the gateways made so far, by key value: reused, and the new
    ones added), so that one key keeps one rate limiter for the whole run.

    ``session`` is shared by every client and stays the caller's to close.
    """
    by_key = {} if by_key is None else by_key
    by_destination: dict[str, ApiGateway] = {}
    for dest in destinations:
        key = dest.api_key.reveal()
        gateway = by_key.get(key)
        if gateway is None:
            client = CampaignMonitorClient(base_url, ApiKey(key), session=session)
            limiter = AimdRateLimiter(rate_limit_rps)
            gateway = by_key[key] = ApiGateway(dest.api_key_env, client, limiter, clock=clock)
        by_destination[dest.name] = gateway
    return by_destination
