"""The client's HTTP transport: credentials, one aiohttp session, one request turned into a
decoded body or a classified error (`consumer.campaign_monitor.errors`).

* One `aiohttp.ClientSession` carries every request (keep-alive connection reuse, gzip). It is
  created on first use unless one is given; a given session is never closed here.
* Transport failures (timeouts, dropped connections, truncated bodies) are `TransientError`
  with status 0. Their exceptions are not chained (``from None``) because aiohttp puts the
  request URL, which carries ``?email=…``, into some of their messages.
* Every response (errors included) is reported to the optional observer as
  ``(endpoint, status, RateLimitInfo | None, elapsed_s)``; status 0 means no complete response.
  The observer is called inline and must not raise.
"""

from __future__ import annotations

import base64
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypedDict

import aiohttp
import orjson

from consumer import __version__
from consumer.campaign_monitor.errors import (
    DestinationFatal,
    TransientError,
    classify,
    code_of,
    is_address_throttle,
)
from consumer.ratelimit import RateLimitInfo
from consumer.tuning import CONNECTION_LIMIT

__all__ = [
    "ApiKey",
    "Credentials",
    "OAuthToken",
    "Response",
    "ResponseObserver",
    "Transport",
    "TransportOptions",
    "unusable",
]

ResponseObserver = Callable[[str, int, RateLimitInfo | None, float, bool], None]
"""(endpoint, HTTP status or 0 when no response, rate-limit headers, elapsed seconds,
address_throttled: a 429 about one subscriber written too often (`AddressThrottled`), which
says nothing about the key's rate)."""


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


@dataclass(frozen=True, slots=True)
class Response:
    """A response `Transport.request` returns: success, or an error the caller accepted."""

    status: int
    code: int | None  # set only when the response was an accepted error (see `accept_codes`)
    payload: Any
    rate_limit: RateLimitInfo | None


class TransportOptions(TypedDict, total=False):
    """`Transport`'s keyword arguments, which `CampaignMonitorClient` passes on."""

    session: aiohttp.ClientSession | None
    timeout_s: float
    connect_timeout_s: float
    observer: ResponseObserver | None


def unusable(
    endpoint: str, response: Response, what: str = "unexpected response body"
) -> TransientError:
    """A successful answer the client cannot use (a body of the wrong shape, a truncated
    listing page): retried like a server error. No personal data in the message."""
    return TransientError(
        f"Campaign Monitor {endpoint}: HTTP {response.status}: {what}",
        status=response.status,
        code=None,
        endpoint=endpoint,
        rate_limit=response.rate_limit,
    )


class Transport:
    """One base URL and credentials, one session: `request` sends, decodes and classifies.

    ``timeout_s`` bounds a whole request (imports of 1000 rows can take long),
    ``connect_timeout_s`` the TCP/TLS connect.
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
        self.base = base_url.rstrip("/")
        self.credentials = credentials
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

    def secret(self) -> str:
        """The credentials' secret: only to strip it from messages."""
        return self.credentials._secret()

    async def close(self) -> None:
        """Close the session if this client created it; a given session stays open."""
        if self._owns_session and self._session is not None:
            await self._session.close()
            self._session = None

    def session(self) -> aiohttp.ClientSession:
        """The session, created on first use (and again after `close`, when it is ours)."""
        if self._session is None or (self._owns_session and self._session.closed):
            connector = aiohttp.TCPConnector(limit=CONNECTION_LIMIT, ttl_dns_cache=300)
            self._session = aiohttp.ClientSession(connector=connector, timeout=self._timeout)
            self._owns_session = True
        return self._session

    def expect_object(self, endpoint: str, response: Response) -> dict[str, Any]:
        if isinstance(response.payload, dict):
            return response.payload
        raise unusable(endpoint, response)

    def _observe(
        self,
        endpoint: str,
        status: int,
        info: RateLimitInfo | None,
        started: float,
        address_throttled: bool = False,
    ) -> None:
        if self.observer is not None:
            self.observer(endpoint, status, info, time.monotonic() - started, address_throttled)

    async def request(
        self,
        endpoint: str,
        method: str,
        path: str,
        *,
        params: Mapping[str, str] | None = None,
        body: object = None,
        accept_codes: frozenset[int] = frozenset(),
    ) -> Response:
        """Send one request; return the decoded body or raise the classified error.

        An error response whose Campaign Monitor code is in ``accept_codes`` is returned (with
        ``code`` set) instead of raised.
        """
        headers = {
            "Authorization": self.credentials.authorization(),
            "Accept": "application/json",
            "Accept-Encoding": "gzip, deflate",
            "User-Agent": f"cmsync/{__version__}",
        }
        data: bytes | None = None
        if body is not None:
            data = orjson.dumps(body)
            headers["Content-Type"] = "application/json; charset=utf-8"
        session = self.session()
        info: RateLimitInfo | None = None
        started = time.monotonic()
        try:
            async with session.request(
                method,
                self.base + path,
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
        payload: Any = None
        decoded = True
        if raw:
            try:
                payload = orjson.loads(raw)
            except orjson.JSONDecodeError:
                decoded = False
        message = payload.get("Message") if isinstance(payload, dict) else None
        if not isinstance(message, str):
            message = None
        self._observe(endpoint, status, info, started, is_address_throttle(status, info, message))
        if 200 <= status < 300:
            if not decoded:
                raise TransientError(
                    f"Campaign Monitor {endpoint}: HTTP {status}: response body is not JSON",
                    status=status,
                    code=None,
                    endpoint=endpoint,
                    rate_limit=info,
                )
            return Response(status, None, payload, info)
        code = code_of(payload)
        if code is not None and code in accept_codes and 400 <= status < 500:
            return Response(status, code, payload, info)
        raise classify(endpoint, status, code, message, info, self.secret())
