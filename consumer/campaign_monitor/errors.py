"""Campaign Monitor errors: what a request that did not succeed means for its caller, and how an
error response becomes one (`classify`).

Privacy: messages never contain an email address, a name, the API key or token. They are built
from the endpoint name, the HTTP status, the Campaign Monitor code and a fixed description; an
unknown code adds Campaign Monitor's own message with anything that looks like an address
removed (`redact`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Final

from consumer.ratelimit import RateLimitInfo

__all__ = [
    "ADDRESS_THROTTLE_MESSAGE",
    "CODE_IMPORT_PARTIAL",
    "CODE_INVALID_EMAIL",
    "CODE_NOT_IN_LIST",
    "DESCRIPTIONS",
    "AddressThrottled",
    "CampaignMonitorError",
    "DestinationFatal",
    "RateLimited",
    "RecordRejected",
    "RequestInvalid",
    "TransientError",
    "classify",
    "code_of",
    "is_address_throttle",
    "parse_int",
    "redact",
]


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

    @property
    def retry_after_s(self) -> float | None:
        return self.rate_limit.reset_s if self.rate_limit else None


class AddressThrottled(CampaignMonitorError):  # noqa: N818 - a decision, like RateLimited
    """A 429 about one subscriber written too often ("added too many times too quickly", no
    rate headers): slow that address down, not the API key. Not retried by the gateway; the
    caller, which knows the addresses, holds them back."""


#: What Campaign Monitor says when one address, not the key, was written too often.
ADDRESS_THROTTLE_MESSAGE: Final = "too many times"


def is_address_throttle(status: int, rate_limit: RateLimitInfo | None, message: str | None) -> bool:
    """A 429 without rate headers whose message names the subscriber's repeated writes."""
    return (
        status == 429
        and rate_limit is None
        and message is not None
        and ADDRESS_THROTTLE_MESSAGE in message.lower()
    )


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

DESCRIPTIONS: Final[Mapping[int, str]] = {
    1: "invalid email address",
    100: "invalid API key",
    101: "invalid ListID",
    102: "invalid ClientID",
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
_FATAL_CODES: Final = frozenset({100, 101, 102, 120, 121, 122})
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


def redact(text: str, secret: str) -> str:
    """A message from the server, fit for logs: no secret, no address, no quoted value."""
    if secret:
        text = text.replace(secret, "***")
    text = _QUOTED.sub("<redacted>", text)
    text = _ADDRESS_LIKE.sub("<redacted>", text)
    return text[:_MAX_FOREIGN_MESSAGE]


def classify(
    endpoint: str,
    status: int,
    code: int | None,
    cm_message: str | None,
    rate_limit: RateLimitInfo | None,
    secret: str,
) -> CampaignMonitorError:
    """Map an unsuccessful HTTP response to the error type that carries the decision."""
    cls: type[CampaignMonitorError]
    if is_address_throttle(status, rate_limit, cm_message):
        cls = AddressThrottled
    elif status == 429 or code == 429:
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
    if code is not None and code in DESCRIPTIONS:
        description = DESCRIPTIONS[code]
    elif code is not None and cm_message:
        description = redact(cm_message, secret)
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


def parse_int(value: object) -> int | None:
    """A JSON integer, or a string of one; None for anything else (booleans included)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        try:
            return int(value)
        except ValueError:
            return None
    return None


def code_of(payload: object) -> int | None:
    """The ``Code`` of an error body, if it has one."""
    return parse_int(payload.get("Code")) if isinstance(payload, dict) else None
