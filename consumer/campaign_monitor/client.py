"""Async Campaign Monitor API v3.3 client: the list-membership endpoints, typed results and errors.

Contracts and hazards:

* One `aiohttp.ClientSession` carries every request (keep-alive connection reuse, gzip). The
  client creates it on first use unless one is given; a given session is never closed here.
* Errors carry the caller's decision (see `CampaignMonitorError` and its subclasses); transport
  failures (timeouts, dropped connections, truncated bodies) are `TransientError` with status 0.
  Nothing else escapes from a request except programming errors.
* Privacy: exception messages never contain an email address, a name, the API key or token.
  They are built from the endpoint name, the HTTP status, the Campaign Monitor code and a fixed
  description; an unknown code adds Campaign Monitor's own message with anything that looks like
  an address removed. Transport exceptions are not chained (``from None``) because aiohttp puts
  the request URL, which carries ``?email=…``, into some of their messages.
* Every response (errors included) is reported to the optional observer as
  ``(endpoint, status, RateLimitInfo | None, elapsed_s)``; status 0 means no complete response.
  The observer is called inline and must not raise.
"""

from __future__ import annotations

import base64
import re
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Final, Literal, Self
from urllib.parse import quote

import aiohttp
import orjson

from consumer import __version__
from consumer.ratelimit import RateLimitInfo
from consumer.tuning import CONNECTION_LIMIT

__all__ = [
    "MAX_IMPORT_ROWS",
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
ResponseObserver = Callable[[str, int, RateLimitInfo | None, float], None]
"""(endpoint, HTTP status or 0 when no response, rate-limit headers, elapsed seconds)."""

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
    """One page of a member listing; ``last`` is True when no page follows it."""

    members: tuple[dict[str, Any], ...]
    last: bool


class Credentials(ABC):
    """How requests authenticate: `ApiKey` or `OAuthToken`. ``repr``/``str`` mask the secret."""

    __slots__ = ()

    @abstractmethod
    def authorization(self) -> str:
        """Value of the ``Authorization`` header."""

    @abstractmethod
    def _secret(self) -> str:
        """The secret itself, so that messages can be scrubbed of it."""


@dataclass(frozen=True, slots=True, repr=False)
class ApiKey(Credentials):
    """HTTP Basic with the key as user name and ``x`` as password."""

    key: str

    def authorization(self) -> str:
        token = base64.b64encode(f"{self.key}:x".encode()).decode("ascii")
        return f"Basic {token}"

    def _secret(self) -> str:
        return self.key

    def __repr__(self) -> str:
        return "ApiKey(key='***')"

    __str__ = __repr__


@dataclass(frozen=True, slots=True, repr=False)
class OAuthToken(Credentials):
    """OAuth access token sent as ``Authorization: Bearer TOKEN``."""

    token: str

    def authorization(self) -> str:
        return f"Bearer {self.token}"

    def _secret(self) -> str:
        return self.token

    def __repr__(self) -> str:
        return "OAuthToken(token='***')"

    __str__ = __repr__


# ---------------------------------------------------------------------------------------------
# Errors


class CampaignMonitorError(Exception):
    """A request that did not succeed. The subclass is the caller's decision.

    ``status`` is the HTTP status (0: no complete response, or refused before sending),
    ``code`` the Campaign Monitor ``Code`` when the body had one, ``endpoint`` the endpoint name
    used in metrics, ``rate_limit`` the response's ``X-RateLimit-*`` headers when present.
    """

    def __init__(
        self,
        message: str,
        *,
        status: int,
        code: int | None,
        endpoint: str,
        rate_limit: RateLimitInfo | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.endpoint = endpoint
        self.rate_limit = rate_limit


class RateLimited(CampaignMonitorError):  # noqa: N818 - name fixed by the team's interface sheet
    """HTTP 429: back off, slow down, retry. ``retry_after_s`` is ``X-RateLimit-Reset`` or None."""

    def __init__(
        self,
        message: str,
        *,
        status: int,
        code: int | None,
        endpoint: str,
        rate_limit: RateLimitInfo | None = None,
    ) -> None:
        super().__init__(
            message, status=status, code=code, endpoint=endpoint, rate_limit=rate_limit
        )
        self.retry_after_s: float | None = rate_limit.reset_s if rate_limit else None


class TransientError(CampaignMonitorError):
    """5xx, timeout, dropped connection, truncated or unreadable response: retry with backoff."""


class DestinationFatal(CampaignMonitorError):  # noqa: N818 - name fixed by the team's interface sheet
    """Bad API key or token, unknown list, unknown endpoint: stop sending to this destination."""


class RecordRejected(CampaignMonitorError):  # noqa: N818 - name fixed by the team's interface sheet
    """The record itself was refused (invalid address, state conflict): dead-letter it, go on."""


class RequestInvalid(CampaignMonitorError):  # noqa: N818 - name fixed by the team's interface sheet
    """The request was malformed (batch size, page size, other 4xx): a bug in the caller."""


CODE_INVALID_EMAIL: Final = 1
CODE_NOT_IN_LIST: Final = 203
CODE_IMPORT_PARTIAL: Final = 210

_DESCRIPTIONS: Final[Mapping[int, str]] = {
    1: "invalid email address",
    100: "invalid API key",
    101: "invalid ListID",
    120: "invalid OAuth token",
    121: "expired OAuth token",
    122: "revoked OAuth token",
    203: "subscriber not in list or already removed",
    204: "address is in the suppression list",
    205: "address is deleted",
    206: "address is unsubscribed",
    207: "address is bounced",
    208: "address is unconfirmed",
    209: "too many subscribers in one import (max 1000)",
    210: "import had some failures",
    212: "no subscribers in import",
    216: "custom field value too long",
    429: "rate limit exceeded",
    801: "invalid page size",
}
_FATAL_CODES: Final = frozenset({100, 101, 120, 121, 122})
# 216 (custom field value over 250 characters) is the simulator's choice: no source documents the
# real API's code for it, and a value that is too long is a property of the record either way.
_RECORD_CODES: Final = frozenset({1, 203, 204, 205, 206, 207, 208, 216})
_STATUS_DESCRIPTIONS: Final[Mapping[int, str]] = {
    400: "bad request",
    401: "unauthorized",
    403: "forbidden",
    404: "not found (check the base URL)",
    408: "request timeout",
    429: "too many requests",
}

# Anything containing "@" is treated as a possible address, anything quoted as an echoed value
# (a name, a custom field value): over-redacting a message is harmless, leaking is not.
_ADDRESS_LIKE = re.compile(r"\S*@\S*")
_QUOTED = re.compile(r"\"[^\"]*\"|'[^']*'")
_MAX_FOREIGN_MESSAGE = 200


def _redact(text: str, secret: str) -> str:
    """A message from the server, fit for logs: no secret, no address, no quoted value."""
    if secret:
        text = text.replace(secret, "***")
    text = _QUOTED.sub("<redacted>", text)
    text = _ADDRESS_LIKE.sub("<redacted>", text)
    return text[:_MAX_FOREIGN_MESSAGE]


def _classify(
    endpoint: str,
    status: int,
    code: int | None,
    cm_message: str | None,
    rate_limit: RateLimitInfo | None,
    secret: str,
) -> CampaignMonitorError:
    """Map an unsuccessful HTTP response to the error type that carries the decision."""
    cls: type[CampaignMonitorError]
    if status == 429 or code == 429:
        cls = RateLimited
    elif status >= 500 or status == 408:
        cls = TransientError
    elif status in (401, 403, 404) or code in _FATAL_CODES:
        cls = DestinationFatal
    elif code in _RECORD_CODES:
        cls = RecordRejected
    elif 400 <= status < 500:
        cls = RequestInvalid
    else:  # 1xx/3xx reaching us: a proxy or redirect loop misbehaving, try again later
        cls = TransientError
    if code is not None and code in _DESCRIPTIONS:
        description = _DESCRIPTIONS[code]
    elif code is not None and cm_message:
        description = _redact(cm_message, secret)
    else:
        description = _STATUS_DESCRIPTIONS.get(status, "unexpected response")
    text = f"Campaign Monitor {endpoint}: HTTP {status}"
    if code is not None:
        text += f", code {code}"
    return cls(
        f"{text}: {description}",
        status=status,
        code=code,
        endpoint=endpoint,
        rate_limit=rate_limit,
    )


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
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        try:
            return int(value)
        except ValueError:
            return 0
    return 0


def _code_of(payload: object) -> int | None:
    if not isinstance(payload, dict):
        return None
    raw = payload.get("Code")
    if isinstance(raw, bool):
        return None
    if isinstance(raw, int):
        return raw
    if isinstance(raw, str):
        try:
            return int(raw)
        except ValueError:
            return None
    return None


def _parse_import_result(data: Mapping[str, Any], secret: str) -> ImportResult:
    failures_raw = data.get("FailureDetails") or []
    duplicates_raw = data.get("DuplicateEmailsInSubmission") or []
    failures = tuple(
        ImportFailure(
            email=str(item.get("EmailAddress", "")),
            code=_int(item.get("Code")),
            message=_redact(str(item.get("Message", "")), secret),
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


@dataclass(frozen=True, slots=True)
class _Response:
    status: int
    code: int | None  # set only when the response was an accepted error (see `accept_codes`)
    payload: Any
    rate_limit: RateLimitInfo | None


# ---------------------------------------------------------------------------------------------
# Client


class CampaignMonitorClient:
    """Async client for the list-membership part of the Campaign Monitor API.

    Safe to share between tasks of one event loop. ``timeout_s`` bounds a whole request (imports
    of 1000 rows can take long), ``connect_timeout_s`` the TCP/TLS connect.
    """

    def __init__(
        self,
        base_url: str,
        credentials: Credentials,
        *,
        session: aiohttp.ClientSession | None = None,
        timeout_s: float = 60.0,
        connect_timeout_s: float = 10.0,
        observer: ResponseObserver | None = None,
    ) -> None:
        if timeout_s <= 0 or connect_timeout_s <= 0:
            raise ValueError("timeouts must be positive")
        self._base = base_url.rstrip("/")
        self._credentials = credentials
        self._session = session
        self._owns_session = session is None
        # sock_connect rather than connect: aiohttp's `connect` also counts the wait for a free
        # pooled connection, which is not a sign of a dead server.
        self._timeout = aiohttp.ClientTimeout(
            total=timeout_s, sock_connect=min(connect_timeout_s, timeout_s)
        )
        self.observer = observer
        """Called with every response; may be set after construction (e.g. to wire metrics)."""
        self.last_rate_limit: RateLimitInfo | None = None
        """``X-RateLimit-*`` headers of the most recent response (None if it had none)."""

    def __repr__(self) -> str:
        return f"CampaignMonitorClient({self._base!r}, {self._credentials!r})"

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
        if self._owns_session and self._session is not None:
            await self._session.close()
            self._session = None

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None or (self._owns_session and self._session.closed):
            connector = aiohttp.TCPConnector(limit=CONNECTION_LIMIT, ttl_dns_cache=300)
            self._session = aiohttp.ClientSession(connector=connector, timeout=self._timeout)
            self._owns_session = True
        return self._session

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
                "Campaign Monitor import: refused before sending, code 212: " + _DESCRIPTIONS[212],
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
        response = await self._request(
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
        return _parse_import_result(data, self._credentials._secret())

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
        await self._request("add", "POST", f"/subscribers/{_seg(list_id)}.json", body=body)

    async def unsubscribe(self, list_id: str, email: str) -> bool:
        """Unsubscribe one address. False when it was not in the list (Code 203): already done."""
        response = await self._request(
            "unsubscribe",
            "POST",
            f"/subscribers/{_seg(list_id)}/unsubscribe.json",
            body={"EmailAddress": email},
            accept_codes=frozenset({CODE_NOT_IN_LIST}),
        )
        return response.code is None

    async def delete(self, list_id: str, email: str) -> bool:
        """Delete one address. False when it was not in the list (Code 203): already done."""
        response = await self._request(
            "delete",
            "DELETE",
            f"/subscribers/{_seg(list_id)}.json",
            params={"email": email},
            accept_codes=frozenset({CODE_NOT_IN_LIST}),
        )
        return response.code is None

    async def get_subscriber(self, list_id: str, email: str) -> dict[str, Any] | None:
        """The subscriber object (with ``ConsentToTrack``), or None when not in the list."""
        response = await self._request(
            "get",
            "GET",
            f"/subscribers/{_seg(list_id)}.json",
            params={"email": email, "includetrackingpreference": "true"},
            accept_codes=frozenset({CODE_NOT_IN_LIST}),
        )
        if response.code is not None:
            return None
        return self._expect_object("get", response)

    async def list_details(self, list_id: str) -> dict[str, Any]:
        response = await self._request("list_details", "GET", f"/lists/{_seg(list_id)}.json")
        return self._expect_object("list_details", response)

    async def list_stats(self, list_id: str) -> dict[str, Any]:
        response = await self._request("list_stats", "GET", f"/lists/{_seg(list_id)}/stats.json")
        return self._expect_object("list_stats", response)

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
        _check_page_size(page_size)
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
        self, list_id: str, state: MemberState, page: int, *, page_size: int = MAX_PAGE_SIZE
    ) -> MembersPage:
        """Page ``page`` (from 1) of the members in ``state``, ordered by address: exactly one
        request. ``last`` tells whether a further page exists (from ``NumberOfPages``, or a
        short page when the server gives no count). Same hazard and page-size check as
        `members`."""
        _check_page_size(page_size)
        response = await self._request(
            "members",
            "GET",
            f"/lists/{_seg(list_id)}/{state}.json",
            params={
                "page": str(page),
                "pagesize": str(page_size),
                "orderfield": "email",
                "orderdirection": "asc",
            },
        )
        envelope = self._expect_object("members", response)
        results = envelope.get("Results")
        if not isinstance(results, list):
            results = []
        pages = envelope.get("NumberOfPages")
        last = (
            not results
            or (isinstance(pages, int) and page >= pages)
            or (not isinstance(pages, int) and len(results) < page_size)
        )
        members = tuple(member for member in results if isinstance(member, dict))
        return MembersPage(members, last)

    # -- transport ------------------------------------------------------------------------------

    def _expect_object(self, endpoint: str, response: _Response) -> dict[str, Any]:
        if isinstance(response.payload, dict):
            return response.payload
        raise TransientError(
            f"Campaign Monitor {endpoint}: HTTP {response.status}: unexpected response body",
            status=response.status,
            code=None,
            endpoint=endpoint,
            rate_limit=response.rate_limit,
        )

    def _observe(
        self, endpoint: str, status: int, info: RateLimitInfo | None, started: float
    ) -> None:
        if self.observer is not None:
            self.observer(endpoint, status, info, time.monotonic() - started)

    async def _request(
        self,
        endpoint: str,
        method: str,
        path: str,
        *,
        params: Mapping[str, str] | None = None,
        body: object = None,
        accept_codes: frozenset[int] = frozenset(),
    ) -> _Response:
        """Send one request; return the decoded body or raise the classified error.

        An error response whose Campaign Monitor code is in ``accept_codes`` is returned (with
        ``code`` set) instead of raised.
        """
        headers = {
            "Authorization": self._credentials.authorization(),
            "Accept": "application/json",
            "Accept-Encoding": "gzip, deflate",
            "User-Agent": f"cmsync/{__version__}",
        }
        data: bytes | None = None
        if body is not None:
            data = orjson.dumps(body)
            headers["Content-Type"] = "application/json; charset=utf-8"
        session = self._get_session()
        info: RateLimitInfo | None = None
        started = time.monotonic()
        try:
            async with session.request(
                method,
                self._base + path,
                params=params,
                data=data,
                headers=headers,
                timeout=self._timeout,
            ) as resp:
                status = resp.status
                info = RateLimitInfo.from_headers(resp.headers)
                raw = await resp.read()
        except (aiohttp.ClientError, TimeoutError) as exc:
            self._observe(endpoint, 0, info, started)
            # A base URL aiohttp cannot use will not get better by retrying.
            cls = DestinationFatal if isinstance(exc, aiohttp.InvalidURL) else TransientError
            # Not chained: some aiohttp messages contain the URL, and with it ``?email=…``.
            raise cls(
                f"Campaign Monitor {endpoint}: no response ({type(exc).__name__})",
                status=0,
                code=None,
                endpoint=endpoint,
                rate_limit=info,
            ) from None
        self.last_rate_limit = info
        self._observe(endpoint, status, info, started)

        payload: Any = None
        decoded = True
        if raw:
            try:
                payload = orjson.loads(raw)
            except orjson.JSONDecodeError:
                decoded = False
        if 200 <= status < 300:
            if not decoded:
                raise TransientError(
                    f"Campaign Monitor {endpoint}: HTTP {status}: response body is not JSON",
                    status=status,
                    code=None,
                    endpoint=endpoint,
                    rate_limit=info,
                )
            return _Response(status, None, payload, info)
        code = _code_of(payload)
        if code is not None and code in accept_codes and 400 <= status < 500:
            return _Response(status, code, payload, info)
        message = payload.get("Message") if isinstance(payload, dict) else None
        raise _classify(
            endpoint,
            status,
            code,
            message if isinstance(message, str) else None,
            info,
            self._credentials._secret(),
        )


def _check_page_size(page_size: int) -> None:
    if not MIN_PAGE_SIZE <= page_size <= MAX_PAGE_SIZE:
        raise RequestInvalid(
            f"Campaign Monitor members: refused before sending, code 801: page size must be"
            f" {MIN_PAGE_SIZE}..{MAX_PAGE_SIZE}",
            status=0,
            code=801,
            endpoint="members",
        )


def _seg(value: str) -> str:
    """One URL path segment: list ids are hex, but never let a value add path components."""
    return quote(value, safe="")
