"""Async Campaign Monitor API v3.3 client: the list-membership endpoints, the reads that consent
and list settings need (dated member listings, the client's suppression list, custom fields,
list details), typed results and errors.

Contracts and hazards:

* Requests go through `consumer.campaign_monitor.transport` (one aiohttp session, keep-alive,
  gzip; every response reported to the optional observer); errors are defined in
  `consumer.campaign_monitor.errors`, and re-exported here.
* Errors carry the caller's decision (see `CampaignMonitorError` and its subclasses); transport
  failures (timeouts, dropped connections, truncated bodies) are `TransientError` with status 0.
  Nothing else escapes from a request except programming errors.
* Privacy: exception messages never contain an email address, a name, the API key or token.
  They are built from the endpoint name, the HTTP status, the Campaign Monitor code and a fixed
  description; an unknown code adds Campaign Monitor's own message with anything that looks like
  an address removed. Transport exceptions are not chained (``from None``) because aiohttp puts
  the request URL, which carries ``?email=…``, into some of their messages.
* Paged listings fail closed: a page that contradicts itself or the request (see
  `members_page`) is a `TransientError` ("truncated listing page"), never a short answer that
  would read as "nobody else opted out". Retrying the same page is the remedy.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Final, Literal, Self, Unpack
from urllib.parse import quote

from consumer.campaign_monitor.errors import (
    CODE_IMPORT_PARTIAL,
    CODE_INVALID_EMAIL,
    CODE_NOT_IN_LIST,
    DESCRIPTIONS,
    AddressThrottled,
    CampaignMonitorError,
    DestinationFatal,
    RateLimited,
    RecordRejected,
    RequestInvalid,
    TransientError,
    parse_int,
    redact,
)
from consumer.campaign_monitor.transport import (
    ApiKey,
    Credentials,
    OAuthToken,
    ResponseObserver,
    Transport,
    TransportOptions,
    unusable,
)
from consumer.ratelimit import RateLimitInfo

__all__ = [
    "CODE_IMPORT_PARTIAL",
    "CODE_INVALID_EMAIL",
    "CODE_NOT_IN_LIST",
    "MAX_IMPORT_ROWS",
    "AddressThrottled",
    "ApiKey",
    "CampaignMonitorClient",
    "CampaignMonitorError",
    "Credentials",
    "CustomField",
    "DestinationFatal",
    "ImportFailure",
    "ImportResult",
    "MemberState",
    "MembersPage",
    "OAuthToken",
    "OrderField",
    "RateLimited",
    "RecordRejected",
    "RequestInvalid",
    "ResponseObserver",
    "SubscriberRow",
    "TransientError",
]

MAX_IMPORT_ROWS: Final = 1000
MIN_PAGE_SIZE: Final = 10
MAX_PAGE_SIZE: Final = 1000

MemberState = Literal["active", "unsubscribed", "bounced", "deleted", "unconfirmed"]
OrderField = Literal["email", "date"]

#: The ``date`` filter of a member listing: ``YYYY-MM-DD`` or ``YYYY-MM-DD HH:MM`` (the
#: account's time zone on the real service).
_SINCE_RE: Final = re.compile(r"\d{4}-\d{2}-\d{2}(?: \d{2}:\d{2})?")

# ---------------------------------------------------------------------------------------------
# Data


@dataclass(frozen=True, slots=True)
class CustomField:
    """One custom field value; ``clear=True`` empties the field (``Value`` is then sent empty)."""

    key: str
    value: str
    clear: bool = False


@dataclass(frozen=True, slots=True)
class SubscriberRow:
    """One subscriber to add or update. ``name=None`` leaves the stored name as it is."""

    email: str
    name: str | None = None
    custom_fields: tuple[CustomField, ...] = ()
    consent_to_track: str = "Unchanged"


@dataclass(frozen=True, slots=True)
class ImportFailure:
    """A row Campaign Monitor refused. ``message`` has anything address-like redacted."""

    email: str
    code: int
    message: str


@dataclass(frozen=True, slots=True)
class ImportResult:
    total_unique: int
    total_existing: int
    total_new: int
    duplicates: tuple[str, ...]
    failures: tuple[ImportFailure, ...]


@dataclass(frozen=True, slots=True)
class MembersPage:
    """One page of a member listing (or of the suppression list); ``last`` is True when no
    page follows it."""

    members: tuple[dict[str, Any], ...]
    last: bool


# ---------------------------------------------------------------------------------------------
# Encoding and decoding


def _encode_row(row: SubscriberRow) -> dict[str, Any]:
    body: dict[str, Any] = {"EmailAddress": row.email}
    if row.name is not None:
        body["Name"] = row.name
    body["CustomFields"] = [
        {"Key": f.key, "Value": "", "Clear": True} if f.clear else {"Key": f.key, "Value": f.value}
        for f in row.custom_fields
    ]
    body["ConsentToTrack"] = row.consent_to_track
    return body


def _int(value: object) -> int:
    if isinstance(value, bool):
        return int(value)
    parsed = parse_int(value)
    return 0 if parsed is None else parsed


def _parse_import_result(data: Mapping[str, Any], secret: str) -> ImportResult:
    failures_raw = data.get("FailureDetails") or []
    duplicates_raw = data.get("DuplicateEmailsInSubmission") or []
    failures = tuple(
        ImportFailure(
            email=str(item.get("EmailAddress", "")),
            code=_int(item.get("Code")),
            message=redact(str(item.get("Message", "")), secret),
        )
        for item in failures_raw
        if isinstance(item, dict)
    )
    return ImportResult(
        total_unique=_int(data.get("TotalUniqueEmailsSubmitted")),
        total_existing=_int(data.get("TotalExistingSubscribers")),
        total_new=_int(data.get("TotalNewSubscribers")),
        duplicates=tuple(str(d) for d in duplicates_raw),
        failures=failures,
    )


class CampaignMonitorClient:
    """Async client for the list-membership part of the Campaign Monitor API: one method per
    endpoint, over a `Transport` (session, request, errors).

    Safe to share between tasks of one event loop. ``options`` go to the `Transport` (a session
    to use, timeouts, the observer).
    """

    def __init__(
        self, base_url: str, credentials: Credentials, **options: Unpack[TransportOptions]
    ) -> None:
        self._transport = Transport(base_url, credentials, **options)

    def __repr__(self) -> str:
        return f"CampaignMonitorClient({self._transport.base!r}, {self._transport.credentials!r})"

    @property
    def observer(self) -> ResponseObserver | None:
        """Called with every response; may be set after construction (e.g. to wire metrics)."""
        return self._transport.observer

    @observer.setter
    def observer(self, observer: ResponseObserver | None) -> None:
        self._transport.observer = observer

    @property
    def last_rate_limit(self) -> RateLimitInfo | None:
        """``X-RateLimit-*`` headers of the most recent response (None if it had none)."""
        return self._transport.last_rate_limit

    # -- lifecycle ------------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the session if this client created it; a given session stays open."""
        await self._transport.close()

    # -- endpoints ------------------------------------------------------------------------------

    async def import_subscribers(
        self,
        list_id: str,
        subscribers: Sequence[SubscriberRow],
        *,
        resubscribe: bool,
        queue_autoresponders: bool = False,
        restart_autoresponders: bool = False,
    ) -> ImportResult:
        """Bulk add or update up to 1000 subscribers.

        A partial success (HTTP 400, Code 210) is a result whose ``failures`` name the refused
        rows. An empty batch or one over 1000 rows raises `RequestInvalid` (status 0, code 212 or
        209) before anything is sent.
        """
        if not subscribers:
            raise RequestInvalid(
                "Campaign Monitor import: refused before sending, code 212: " + DESCRIPTIONS[212],
                status=0,
                code=212,
                endpoint="import",
            )
        if len(subscribers) > MAX_IMPORT_ROWS:
            raise RequestInvalid(
                f"Campaign Monitor import: refused before sending, code 209: {len(subscribers)}"
                f" rows, at most {MAX_IMPORT_ROWS} allowed",
                status=0,
                code=209,
                endpoint="import",
            )
        body = {
            "Subscribers": [_encode_row(row) for row in subscribers],
            "Resubscribe": resubscribe,
            "QueueSubscriptionBasedAutoresponders": queue_autoresponders,
            "RestartSubscriptionBasedAutoresponders": restart_autoresponders,
        }
        response = await self._transport.request(
            "import",
            "POST",
            f"/subscribers/{_seg(list_id)}/import.json",
            body=body,
            accept_codes=frozenset({CODE_IMPORT_PARTIAL}),
        )
        data = response.payload
        if response.code == CODE_IMPORT_PARTIAL:
            data = data.get("ResultData") if isinstance(data, dict) else None
        if not isinstance(data, dict):
            # Rows may have been applied but we cannot tell which: an upsert is safe to repeat.
            raise TransientError(
                f"Campaign Monitor import: HTTP {response.status}: import result missing",
                status=response.status,
                code=response.code,
                endpoint="import",
                rate_limit=response.rate_limit,
            )
        return _parse_import_result(data, self._transport.secret())

    async def add_subscriber(
        self,
        list_id: str,
        row: SubscriberRow,
        *,
        resubscribe: bool,
        restart_autoresponders: bool = False,
    ) -> None:
        """Add or update one subscriber."""
        body = _encode_row(row)
        body["Resubscribe"] = resubscribe
        body["RestartSubscriptionBasedAutoresponders"] = restart_autoresponders
        await self._transport.request(
            "add", "POST", f"/subscribers/{_seg(list_id)}.json", body=body
        )

    async def unsubscribe(self, list_id: str, email: str) -> bool:
        """Unsubscribe one address. False when it was not in the list (Code 203): already done."""
        response = await self._transport.request(
            "unsubscribe",
            "POST",
            f"/subscribers/{_seg(list_id)}/unsubscribe.json",
            body={"EmailAddress": email},
            accept_codes=frozenset({CODE_NOT_IN_LIST}),
        )
        return response.code is None

    async def delete(self, list_id: str, email: str) -> bool:
        """Delete one address. False when it was not in the list (Code 203): already done."""
        response = await self._transport.request(
            "delete",
            "DELETE",
            f"/subscribers/{_seg(list_id)}.json",
            params={"email": email},
            accept_codes=frozenset({CODE_NOT_IN_LIST}),
        )
        return response.code is None

    async def get_subscriber(self, list_id: str, email: str) -> dict[str, Any] | None:
        """The subscriber object (with ``ConsentToTrack``), or None when not in the list."""
        response = await self._transport.request(
            "get",
            "GET",
            f"/subscribers/{_seg(list_id)}.json",
            params={"email": email, "includetrackingpreference": "true"},
            accept_codes=frozenset({CODE_NOT_IN_LIST}),
        )
        if response.code is not None:
            return None
        return self._transport.expect_object("get", response)

    async def list_details(self, list_id: str) -> dict[str, Any]:
        response = await self._transport.request(
            "list_details", "GET", f"/lists/{_seg(list_id)}.json"
        )
        return self._transport.expect_object("list_details", response)

    async def list_stats(self, list_id: str) -> dict[str, Any]:
        response = await self._transport.request(
            "list_stats", "GET", f"/lists/{_seg(list_id)}/stats.json"
        )
        return self._transport.expect_object("list_stats", response)

    def members(
        self, list_id: str, state: MemberState, *, page_size: int = MAX_PAGE_SIZE
    ) -> AsyncIterator[dict[str, Any]]:
        """Every member of the list in ``state``, ordered by address; pages are fetched lazily.

        Hazard: paging is by page number, so a list that changes while it is read can shift a
        member across a page boundary (read twice or missed). Callers refresh periodically.
        ``page_size`` outside 10..1000 raises `RequestInvalid` (code 801) here, before any request.
        Rate-limited callers read page by page with `members_page` instead (the service's
        gateway does: one rate-limit slot per page request).
        """
        _check_page_size(page_size, "members")
        return self._members(list_id, state, page_size)

    async def _members(
        self, list_id: str, state: MemberState, page_size: int
    ) -> AsyncIterator[dict[str, Any]]:
        page = 1
        while True:
            found = await self.members_page(list_id, state, page, page_size=page_size)
            for member in found.members:
                yield member
            if found.last:
                return
            page += 1

    async def members_page(
        self,
        list_id: str,
        state: MemberState,
        page: int,
        *,
        page_size: int = MAX_PAGE_SIZE,
        since: str | None = None,
        order_field: OrderField = "email",
        descending: bool = False,
    ) -> MembersPage:
        """Page ``page`` (from 1) of the members in ``state``: exactly one request.

        ``since`` (``YYYY-MM-DD`` or ``YYYY-MM-DD HH:MM``) is sent as the ``date`` filter: only
        members whose state changed on or after it. ``order_field`` and ``descending`` set the
        order (by address or by that date). ``last`` tells whether a further page exists (from
        ``NumberOfPages``, or a short page when the server gives no count).

        Raises `TransientError` ("truncated listing page") when the page is inconsistent:
        ``RecordsOnThisPage`` differs from the rows received, ``PageNumber`` from ``page``, or a
        page that is not the last holds fewer than ``page_size`` rows; the caller retries the
        same page. A bad ``page_size`` (outside 10..1000) or ``since`` raises `RequestInvalid`
        (status 0) before any request. Same paging hazard as `members`.
        """
        _check_page_size(page_size, "members")
        params = _page_params(page, page_size, order_field, descending)
        if since is not None:
            if _SINCE_RE.fullmatch(since) is None:
                raise RequestInvalid(
                    "Campaign Monitor members: refused before sending: the date filter must be"
                    " YYYY-MM-DD or YYYY-MM-DD HH:MM",
                    status=0,
                    code=None,
                    endpoint="members",
                )
            params["date"] = since
        return await self._page(
            "members", f"/lists/{_seg(list_id)}/{state}.json", params, page, page_size
        )

    async def suppression_page(
        self,
        client_id: str,
        page: int,
        *,
        page_size: int = MAX_PAGE_SIZE,
        order_field: OrderField = "email",
        descending: bool = False,
    ) -> MembersPage:
        """Page ``page`` (from 1) of the client's suppression list: exactly one request. Rows
        are ``{SuppressionReason, EmailAddress, Date, State: "Suppressed"}``. An unknown client
        ID (or one the credentials do not reach) is `DestinationFatal` (Code 102). Same checks
        and errors as `members_page`."""
        _check_page_size(page_size, "suppression_list")
        return await self._page(
            "suppression_list",
            f"/clients/{_seg(client_id)}/suppressionlist.json",
            _page_params(page, page_size, order_field, descending),
            page,
            page_size,
        )

    async def custom_fields(self, list_id: str) -> list[dict[str, Any]]:
        """The list's custom fields: ``[{FieldName, Key: "[key]", DataType, FieldOptions,
        VisibleInPreferenceCenter}]`` as Campaign Monitor gives them."""
        response = await self._transport.request(
            "custom_fields", "GET", f"/lists/{_seg(list_id)}/customfields.json"
        )
        payload = response.payload
        if not isinstance(payload, list) or not all(isinstance(f, dict) for f in payload):
            raise unusable("custom_fields", response)
        return payload

    async def create_custom_field(
        self, list_id: str, field_name: str, data_type: str, options: Sequence[str] = ()
    ) -> str:
        """Create a custom field (visible in the preference center); returns its key, with
        brackets (``"[fieldname]"``). ``data_type``: Text, Number, Date, MultiSelectOne,
        MultiSelectMany, Country or USState; ``options`` for the multi-select types.

        Not idempotent: when the answer is lost the field may exist, and creating it again is
        refused (`RequestInvalid`); read `custom_fields` before retrying."""
        response = await self._transport.request(
            "create_custom_field",
            "POST",
            f"/lists/{_seg(list_id)}/customfields.json",
            body={
                "FieldName": field_name,
                "DataType": data_type,
                "Options": list(options),
                "VisibleInPreferenceCenter": True,
            },
        )
        if not isinstance(response.payload, str):
            raise unusable("create_custom_field", response)
        return response.payload

    async def _page(
        self, endpoint: str, path: str, params: dict[str, str], page: int, page_size: int
    ) -> MembersPage:
        """One page of a paged envelope, checked (see `members_page`). Counts the server
        leaves out are not checked."""
        response = await self._transport.request(endpoint, "GET", path, params=params)
        envelope = self._transport.expect_object(endpoint, response)
        results = envelope.get("Results")
        if not isinstance(results, list):
            results = []
        records = parse_int(envelope.get("RecordsOnThisPage"))
        number = parse_int(envelope.get("PageNumber"))
        pages = parse_int(envelope.get("NumberOfPages"))
        if (
            (records is not None and records != len(results))
            or (number is not None and number != page)
            or (pages is not None and page < pages and len(results) < page_size)
        ):
            raise unusable(endpoint, response, "truncated listing page")
        last = (
            not results
            or (pages is not None and page >= pages)
            or (pages is None and len(results) < page_size)
        )
        members = tuple(member for member in results if isinstance(member, dict))
        return MembersPage(members, last)


def _page_params(
    page: int, page_size: int, order_field: OrderField, descending: bool
) -> dict[str, str]:
    return {
        "page": str(page),
        "pagesize": str(page_size),
        "orderfield": order_field,
        "orderdirection": "desc" if descending else "asc",
    }


def _check_page_size(page_size: int, endpoint: str) -> None:
    if not MIN_PAGE_SIZE <= page_size <= MAX_PAGE_SIZE:
        raise RequestInvalid(
            f"Campaign Monitor {endpoint}: refused before sending, code 801: page size must be"
            f" {MIN_PAGE_SIZE}..{MAX_PAGE_SIZE}",
            status=0,
            code=801,
            endpoint=endpoint,
        )


def _seg(value: str) -> str:
    """One URL path segment: list ids are hex, but never let a value add path components."""
    return quote(value, safe="")
