"""The Campaign Monitor simulator's state model: plain Python, no I/O, no clock.

Everything the simulator's HTTP handlers do to lists and subscribers happens here, so that
property tests can drive the model directly and over HTTP and compare. Time is passed in:
`now` is wall-clock epoch seconds (an int; it only feeds the dates shown to clients), and the
token bucket takes monotonic seconds.

Hazards and choices (see also the simulator module's docstring):
- Subscribers are keyed by the lower-cased address; the address keeps the casing it was first
  added with.
- A subscriber is one slots object with a flat tuple of custom fields
  ``(key1, value1, key2, value2, …)``; field keys are interned. About 250 bytes per subscriber.
- Paged listings sort a snapshot of one state; the snapshot is cached until a subscriber enters,
  leaves or changes within that state, so paging a million members is cheap.
- Errors are raised as `ApiError(status, code, message)`; the HTTP layer turns them into the
  JSON body every 4xx carries.
- Each owner (API key) is one client with a client ID and a suppression list that keeps, per
  address, when and why it was suppressed (the first time: suppressing again changes nothing).
- A list's custom fields are either undeclared (``declared`` False: any key is accepted and
  stored, as the simulator always did, fields created later notwithstanding) or declared when
  the list was made: then a key the list lacks, and a value the field's type cannot hold, are
  ignored, not stored (what integrators report of the real API).
"""

from __future__ import annotations

import calendar
import functools
import hashlib
import math
import re
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Literal

ACTIVE: Final = 0
UNCONFIRMED: Final = 1
UNSUBSCRIBED: Final = 2
BOUNCED: Final = 3
DELETED: Final = 4
STATE_NAMES: Final = ("Active", "Unconfirmed", "Unsubscribed", "Bounced", "Deleted")
STATE_BY_NAME: Final = {name.lower(): i for i, name in enumerate(STATE_NAMES)}
INACTIVE: Final = frozenset((UNSUBSCRIBED, BOUNCED, DELETED))

UnsubscribeSetting = Literal["AllClientLists", "OnlyThisList"]
ResubscribeFalseReports = Literal["existing", "failure"]
UNSUBSCRIBE_SETTINGS: Final = ("AllClientLists", "OnlyThisList")
FIELD_TYPES: Final = (
    "Text",
    "Number",
    "Date",
    "MultiSelectOne",
    "MultiSelectMany",
    "Country",
    "USState",
)
SUPPRESSION_REASONS: Final = {UNSUBSCRIBED: "Unsubscribed", BOUNCED: "Bounced"}
MANUAL_SUPPRESSION: Final = "Suppressed"

MAX_IMPORT_ROWS: Final = 1000
MAX_FIELD_CHARS: Final = 250
MIN_PAGE_SIZE: Final = 10
MAX_PAGE_SIZE: Final = 1000

# Codes the API documents or that the official clients and their users have recorded.
CODE_INVALID_EMAIL: Final = 1
CODE_BAD_LIST: Final = 101
CODE_BAD_CLIENT: Final = 102
CODE_NOT_IN_LIST: Final = 203
CODE_SUPPRESSED: Final = 204  # v2 API "In Suppression List"
CODE_IS_DELETED: Final = 205  # v2 API "Is Deleted"
CODE_IS_UNSUBSCRIBED: Final = 206  # v2 API "Is Unsubscribed"
CODE_IS_BOUNCED: Final = 207  # v2 API "Is Bounced"
CODE_TOO_MANY_ROWS: Final = 209
CODE_IMPORT_FAILURES: Final = 210
CODE_NO_ROWS: Final = 212
CODE_CONSENT_MISSING: Final = 214
CODE_CONSENT_INVALID: Final = 215
CODE_PAGE_SIZE: Final = 801
# Codes the simulator chose because no source documents one (documented in --help).
CODE_FIELD_TOO_LONG: Final = 216
CODE_BAD_REQUEST: Final = 400
CODE_PAGE_NUMBER: Final = 800
CODE_ORDER_FIELD: Final = 802
CODE_ORDER_DIRECTION: Final = 803
CODE_DATE: Final = 804
CODE_FIELD_NAME: Final = 250
CODE_FIELD_TYPE: Final = 251
CODE_FIELD_EXISTS: Final = 255

MSG_INVALID_EMAIL: Final = "Invalid Email Address"
MSG_NOT_IN_LIST: Final = "Subscriber not in list or has already been removed."
MSG_FIELD_TOO_LONG: Final = f"Custom field value exceeds {MAX_FIELD_CHARS} characters"
_REFUSED: Final = {
    DELETED: (CODE_IS_DELETED, "Is Deleted"),
    UNSUBSCRIBED: (CODE_IS_UNSUBSCRIBED, "Is Unsubscribed"),
    BOUNCED: (CODE_IS_BOUNCED, "Is Bounced"),
}
_SUPPRESSED: Final = (CODE_SUPPRESSED, "In Suppression List")

_EMAIL_RE: Final = re.compile(
    r"[^@\s\"(),:;<>\[\]\\]+@(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z]{2,63}"
)
_CONSENT: Final[dict[str, str | None]] = {"yes": "Yes", "no": "No", "unchanged": None}
_LIST_ID_RE: Final = re.compile(r"[0-9a-f]{32}")
_ORDER_FIELDS: Final = ("email", "name", "date")
SUPPRESSION_ORDER_FIELDS: Final = ("email", "date")
_NUMBER_RE: Final = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)")
_DATE_VALUE_RE: Final = re.compile(r"(\d{4})/(\d{2})/(\d{2})")
_MIN_DATE_VALUE: Final = (1900, 1, 1)
_MAX_DATE_VALUE: Final = (2076, 6, 6)
_NO_FIELDS: tuple[str, ...] = ()


class ApiError(Exception):
    """A request the API answers with ``status`` and body ``{"Code": code, "Message": message}``."""

    def __init__(self, status: int, code: int, message: str) -> None:
        super().__init__(status, code, message)
        self.status = status
        self.code = code
        self.message = message

    def body(self) -> dict[str, Any]:
        return {"Code": self.code, "Message": self.message}


def is_valid_email(email: str) -> bool:
    """A plausible address: local@label.label.tld, no spaces, no empty dot-atoms."""
    return (
        len(email) <= 254
        and _EMAIL_RE.fullmatch(email) is not None
        and ".." not in email
        and not email.startswith(".")
        and ".@" not in email
    )


def is_list_id(value: str) -> bool:
    return _LIST_ID_RE.fullmatch(value) is not None


def default_client_id(owner: str) -> str:
    """The client ID of an owner (API key) that was given none: derived from the key, so the
    same key always names the same client (32 lower-case hex, like a ListID)."""
    return hashlib.md5(owner.encode(), usedforsecurity=False).hexdigest()


def field_key(field_name: str) -> str:
    """The key Campaign Monitor gives a new custom field, without its brackets: the name with
    white space removed ("subscription date" -> "subscriptiondate", as the official clients'
    fixtures show; whether the real API also lower-cases is unknown, the simulator does not)."""
    return "".join(field_name.split())


@dataclass(frozen=True, slots=True)
class FieldDef:
    """One custom field of a list: `key` is stored without brackets, shown as ``[key]``."""

    name: str
    key: str
    data_type: str
    options: tuple[str, ...] = ()
    visible: bool = True

    def to_json(self) -> dict[str, Any]:
        return {
            "FieldName": self.name,
            "Key": f"[{self.key}]",
            "DataType": self.data_type,
            "FieldOptions": list(self.options),
            "VisibleInPreferenceCenter": self.visible,
        }

    def accepts(self, value: str) -> bool:
        """Whether a (non-empty) value fits the field's type: Number a decimal number, Date
        YYYY/MM/DD between 1900/01/01 and 2076/06/06, a multi-select value one of the options;
        Text, Country and USState take any text."""
        if self.data_type == "Number":
            return _NUMBER_RE.fullmatch(value.strip()) is not None
        if self.data_type == "Date":
            m = _DATE_VALUE_RE.fullmatch(value.strip())
            if m is None:
                return False
            ymd = (int(m[1]), int(m[2]), int(m[3]))
            try:
                time.strptime(value.strip(), "%Y/%m/%d")
            except ValueError:
                return False
            return _MIN_DATE_VALUE <= ymd <= _MAX_DATE_VALUE
        if self.data_type in ("MultiSelectOne", "MultiSelectMany"):
            return value in self.options
        return True


def make_field(
    name: str, data_type: str, options: Sequence[str] = (), *, visible: bool = True
) -> FieldDef:
    """A validated field definition; raises ApiError 400 (Code 250 bad name, 251 bad type)."""
    key = field_key(name) if isinstance(name, str) else ""
    if not key or len(name) > 100 or "[" in key or "]" in key:
        raise ApiError(400, CODE_FIELD_NAME, "Invalid field name")
    if data_type not in FIELD_TYPES:
        raise ApiError(400, CODE_FIELD_TYPE, "Invalid field data type")
    if data_type.startswith("MultiSelect"):
        if not options or not all(isinstance(o, str) and o for o in options):
            raise ApiError(400, CODE_FIELD_TYPE, "A multi-select field needs options")
        kept = tuple(dict.fromkeys(options))
    else:
        kept = ()
    return FieldDef(name, key, data_type, kept, visible)


def parse_bool(value: object) -> bool:
    """JSON true, or the strings the official clients put in query strings ("True", "true")."""
    if isinstance(value, str):
        return value.strip().lower() == "true"
    return value is True


@functools.lru_cache(maxsize=4096)
def format_date(ts: int) -> str:
    """Campaign Monitor's date format (account time zone; the simulator uses UTC)."""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(ts))


@dataclass(slots=True)
class Subscriber:
    email: str  # as first submitted
    name: str
    state: int
    fields: tuple[str, ...]  # flat: key, value, key, value…; a repeated key is multi-select
    consent: str  # "Yes", "No" or "" (never stated: the API shows an empty string)
    joined: int  # epoch seconds
    changed: int  # epoch seconds of the last state change ("Date", "StateChangedDate")

    def custom_fields(self) -> list[dict[str, str]]:
        f = self.fields
        return [{"Key": f[i], "Value": f[i + 1]} for i in range(0, len(f), 2)]

    def to_json(self, *, include_consent: bool = False) -> dict[str, Any]:
        """The subscriber object of `GET /subscribers/{id}.json` and the paged listings."""
        changed = format_date(self.changed)
        out: dict[str, Any] = {
            "EmailAddress": self.email,
            "Name": self.name,
            "Date": changed,
            "StateChangedDate": changed,
            "ListJoinedDate": format_date(self.joined),
            "State": STATE_NAMES[self.state],
            "CustomFields": self.custom_fields(),
            "ReadsEmailWith": "",
        }
        if include_consent:
            out["ConsentToTrack"] = self.consent
        return out


@dataclass(slots=True)
class SimList:
    list_id: str
    title: str
    unsubscribe_setting: UnsubscribeSetting
    owner: str  # the API key (account) the list belongs to
    confirmed_opt_in: bool = False
    subscribers: dict[str, Subscriber] = field(default_factory=dict)
    counts: list[int] = field(default_factory=lambda: [0] * 5)
    versions: list[int] = field(default_factory=lambda: [0] * 5)
    views: dict[tuple[int, str, bool, int], tuple[int, list[str]]] = field(default_factory=dict)
    field_order: dict[str, int] = field(default_factory=dict)  # custom field key -> position
    fields: dict[str, FieldDef] = field(default_factory=dict)  # declared fields, by key
    declared: bool = False  # False: any key is accepted and stored (the fields notwithstanding)

    def custom_fields(self) -> list[dict[str, Any]]:
        """The answer of `GET /lists/{id}/customfields.json` (the fields, in creation order)."""
        return [f.to_json() for f in self.fields.values()]

    def add_field(self, definition: FieldDef) -> str:
        """Create a field (`POST /lists/{id}/customfields.json`); returns ``[key]``. A key the
        list has already is Code 255."""
        if definition.key in self.fields:
            raise ApiError(400, CODE_FIELD_EXISTS, "Field key already exists")
        self.fields[definition.key] = definition
        if definition.key not in self.field_order:
            self.field_order[definition.key] = len(self.field_order)
        return f"[{definition.key}]"

    def keep_fields(self, incoming: object) -> object:
        """On a list with declared fields, the submitted items whose key the list has and whose
        value the field can hold (clears always pass); on an undeclared list, all of them."""
        declared = self.fields
        if not self.declared or not isinstance(incoming, list):
            return incoming
        kept: list[object] = []
        for item in incoming:
            if not isinstance(item, dict):
                continue
            raw_key = item.get("Key")
            if not isinstance(raw_key, str):
                continue
            definition = declared.get(_intern_key(raw_key))
            if definition is None:
                continue
            value = item.get("Value")
            if parse_bool(item.get("Clear")) or value is None or value == "":
                kept.append(item)
                continue
            text = value if isinstance(value, str) else _scalar_text(value)
            if definition.accepts(text):
                kept.append(item)
        if kept:
            for d in declared.values():
                if d.data_type == "MultiSelectOne":
                    kept = _last_only(kept, d.key)
        return kept

    def details(self) -> dict[str, Any]:
        return {
            "ListID": self.list_id,
            "Title": self.title,
            "UnsubscribePage": "",
            "UnsubscribeSetting": self.unsubscribe_setting,
            "ConfirmedOptIn": self.confirmed_opt_in,
            "ConfirmationSuccessPage": "",
        }

    def stats(self) -> dict[str, int]:
        c = self.counts
        out = {
            "TotalActiveSubscribers": c[ACTIVE],
            "NewActiveSubscribersToday": 0,
            "NewActiveSubscribersYesterday": 0,
            "NewActiveSubscribersThisWeek": 0,
            "NewActiveSubscribersThisMonth": 0,
            "NewActiveSubscribersThisYear": 0,
            "TotalUnsubscribes": c[UNSUBSCRIBED],
            "UnsubscribesToday": 0,
            "UnsubscribesYesterday": 0,
            "UnsubscribesThisWeek": 0,
            "UnsubscribesThisMonth": 0,
            "UnsubscribesThisYear": 0,
            "TotalDeleted": c[DELETED],
            "DeletedToday": 0,
            "DeletedYesterday": 0,
            "DeletedThisWeek": 0,
            "DeletedThisMonth": 0,
            "DeletedThisYear": 0,
            "TotalBounces": c[BOUNCED],
            "BouncesToday": 0,
            "BouncesYesterday": 0,
            "BouncesThisWeek": 0,
            "BouncesThisMonth": 0,
            "BouncesThisYear": 0,
        }
        return out


def _last_only(items: list[object], key: str) -> list[object]:
    """A MultiSelectOne field keeps one value: the last one submitted for its key."""
    same = [
        i
        for i, item in enumerate(items)
        if isinstance(item, dict)
        and isinstance(item.get("Key"), str)
        and _intern_key(item["Key"]) == key
    ]
    if len(same) < 2:
        return items
    drop = set(same[:-1])
    return [item for i, item in enumerate(items) if i not in drop]


@dataclass(slots=True)
class Suppressed:
    """One address on a client's suppression list: as first submitted, when, why."""

    email: str
    date: int  # epoch seconds
    reason: str  # "Unsubscribed", "Bounced" or "Suppressed"

    def to_json(self) -> dict[str, Any]:
        return {
            "SuppressionReason": self.reason,
            "EmailAddress": self.email,
            "Date": format_date(self.date),
            "State": "Suppressed",
        }


@dataclass(slots=True)
class Client:
    """One owner (API key) as a Campaign Monitor client: its ID and its suppression list."""

    client_id: str
    suppression: dict[str, Suppressed] = field(default_factory=dict)  # lower-cased address
    version: int = 0
    views: dict[tuple[str, bool], tuple[int, list[str]]] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ImportFailureRow:
    email: str
    code: int
    message: str


@dataclass(slots=True)
class ImportOutcome:
    """What an import did. Every unique address (lower-cased) is exactly one of new, existing or
    failed; failed means no row for it was applied (its rows are in `failures`)."""

    unique: int = 0
    existing: int = 0
    new: int = 0
    failed: int = 0
    duplicates: list[str] = field(default_factory=list)
    failures: list[ImportFailureRow] = field(default_factory=list)

    def result(self) -> dict[str, Any]:
        return {
            "FailureDetails": [
                {"EmailAddress": f.email, "Code": f.code, "Message": f.message}
                for f in self.failures
            ],
            "TotalUniqueEmailsSubmitted": self.unique,
            "TotalExistingSubscribers": self.existing,
            "TotalNewSubscribers": self.new,
            "DuplicateEmailsInSubmission": self.duplicates,
        }


@dataclass(frozen=True, slots=True)
class PageRequest:
    page: int = 1
    page_size: int = 1000
    order_field: str = "email"  # email | name | date
    descending: bool = False
    since: int = 0  # epoch seconds; members whose Date is on/after it (0: all)


def parse_page_request(
    query: Mapping[str, str], order_fields: Sequence[str] = _ORDER_FIELDS
) -> PageRequest:
    """Validate the query of a paged listing; raise ApiError 400 on a bad value. The ``date``
    filter takes ``YYYY-MM-DD``, ``YYYY-MM-DD HH:MM`` or ``YYYY-MM-DD HH:MM:SS``."""
    try:
        page = int(query.get("page") or 1)
    except ValueError:
        page = 0
    if page < 1:
        raise ApiError(400, CODE_PAGE_NUMBER, "Invalid page number")
    try:
        size = int(query.get("pagesize") or 1000)
    except ValueError:
        size = 0
    if not MIN_PAGE_SIZE <= size <= MAX_PAGE_SIZE:
        raise ApiError(400, CODE_PAGE_SIZE, "Invalid page size; must be between 10 and 1000")
    order = (query.get("orderfield") or "email").lower()
    if order not in order_fields:
        raise ApiError(
            400, CODE_ORDER_FIELD, "Invalid order field; use " + " or ".join(order_fields)
        )
    direction = (query.get("orderdirection") or "asc").lower()
    if direction not in ("asc", "desc"):
        raise ApiError(400, CODE_ORDER_DIRECTION, "Invalid order direction; use asc or desc")
    since = 0
    date = (query.get("date") or "").strip()
    if date:
        since = _parse_date(date)
    return PageRequest(page, size, order, direction == "desc", since)


def _parse_date(text: str) -> int:
    for fmt in ("%Y-%m-%d", "%Y-%m-%d %H:%M", "%Y-%m-%d %H:%M:%S"):
        try:
            parsed = time.strptime(text, fmt)
        except ValueError:
            continue
        return calendar.timegm(parsed)
    raise ApiError(400, CODE_DATE, "Invalid date; use YYYY-MM-DD")


class TokenBucket:
    """Rate limit of one API key: `rate` tokens per second, at most `capacity` banked."""

    __slots__ = ("capacity", "rate", "tokens", "updated")

    def __init__(self, rate: float, capacity: float, now: float) -> None:
        if rate <= 0 or capacity < 1:
            raise ValueError("rate must be > 0 and capacity >= 1")
        self.rate = rate
        self.capacity = capacity
        self.tokens = capacity
        self.updated = now

    def take(self, now: float) -> bool:
        """Spend one token if there is one."""
        elapsed = now - self.updated
        if elapsed > 0:
            self.tokens = min(self.capacity, self.tokens + elapsed * self.rate)
            self.updated = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False

    def remaining(self) -> int:
        return int(self.tokens)

    def reset_s(self) -> int:
        """Whole seconds (rounded up) until the bucket is full again."""
        return math.ceil(max(0.0, self.capacity - self.tokens) / self.rate - 1e-9)


class SimState:
    """All lists, subscribers and suppression lists of one simulator."""

    def __init__(
        self,
        *,
        resubscribe_false_reports: ResubscribeFalseReports = "existing",
        invalid_list_status: int = 400,
    ) -> None:
        if resubscribe_false_reports not in ("existing", "failure"):
            raise ValueError("resubscribe_false_reports must be 'existing' or 'failure'")
        if invalid_list_status not in (400, 401):
            raise ValueError("invalid_list_status must be 400 or 401")
        self.resubscribe_false_reports: ResubscribeFalseReports = resubscribe_false_reports
        self.invalid_list_status = invalid_list_status
        self.lists: dict[str, SimList] = {}
        self.clients: dict[str, Client] = {}  # API key -> its client

    # clients ---------------------------------------------------------------------------------
    def client(self, owner: str, client_id: str | None = None) -> Client:
        """The owner's client, made on first use with `client_id` (default: derived from the
        key). A different `client_id` for an owner that has one is a ValueError."""
        found = self.clients.get(owner)
        if found is None:
            cid = client_id if client_id is not None else default_client_id(owner)
            if not is_list_id(cid):
                raise ValueError("a client ID is 32 lower-case hex characters")
            if any(c.client_id == cid for c in self.clients.values()):
                raise ValueError("that client ID belongs to another API key")
            found = self.clients[owner] = Client(cid)
        elif client_id is not None and client_id != found.client_id:
            raise ValueError("that API key has another client ID already")
        return found

    def get_client(self, owner: str, client_id: str) -> Client:
        """The owner's client if `client_id` is its ID; else Code 102 (with the status of Code
        101: ``invalid_list_status``)."""
        found = self.client(owner)
        if found.client_id != client_id:
            raise ApiError(self.invalid_list_status, CODE_BAD_CLIENT, "Invalid ClientID")
        return found

    def suppress(self, owner: str, email: str, *, now: int, reason: str) -> None:
        """Put an address on the owner's suppression list; one already there keeps its date
        and reason."""
        key = email.lower()
        client = self.client(owner)
        if key not in client.suppression:
            client.suppression[key] = Suppressed(email, now, reason)
            client.version += 1

    def suppressed(self, owner: str) -> set[str]:
        """The owner's suppression list (lower-cased addresses)."""
        client = self.clients.get(owner)
        return set(client.suppression) if client is not None else set()

    def suppression_page(self, client: Client, req: PageRequest) -> dict[str, Any]:
        """The paged envelope of `GET /clients/{id}/suppressionlist.json` (order: email or
        date, then email)."""
        view_key = (req.order_field, req.descending)
        cached = client.views.get(view_key)
        if cached is not None and cached[0] == client.version:
            keys = cached[1]
        else:
            sup = client.suppression
            keys = list(sup)
            if req.order_field == "date":
                keys.sort(key=lambda k: (sup[k].date, k), reverse=req.descending)
            else:
                keys.sort(reverse=req.descending)
            client.views[view_key] = (client.version, keys)
        start = (req.page - 1) * req.page_size
        results = [client.suppression[k].to_json() for k in keys[start : start + req.page_size]]
        return _envelope(results, req, len(keys))

    # lists -----------------------------------------------------------------------------------
    def add_list(
        self,
        list_id: str,
        *,
        title: str,
        unsubscribe_setting: str,
        owner: str,
        confirmed_opt_in: bool = False,
        custom_fields: Sequence[FieldDef] | None = None,
        client_id: str | None = None,
    ) -> SimList:
        """A new list of `owner`, whose client gets `client_id` (see `client`). With
        `custom_fields` (even empty) the list's fields are declared (see the module docstring).
        Raises ValueError on a bad argument."""
        if not is_list_id(list_id):
            raise ValueError("a ListID is 32 lower-case hex characters")
        if list_id in self.lists:
            raise ValueError("that ListID exists already")
        if unsubscribe_setting not in UNSUBSCRIBE_SETTINGS:
            raise ValueError("unsubscribe_setting must be AllClientLists or OnlyThisList")
        setting: UnsubscribeSetting = (
            "AllClientLists" if unsubscribe_setting == "AllClientLists" else "OnlyThisList"
        )
        if custom_fields is not None and len({f.key for f in custom_fields}) < len(custom_fields):
            raise ValueError("two custom fields have the same key")
        self.client(owner, client_id)
        lst = SimList(list_id, title, setting, owner, confirmed_opt_in)
        if custom_fields is not None:
            lst.declared = True
            for definition in custom_fields:
                lst.add_field(definition)
        self.lists[list_id] = lst
        return lst

    def get_list(self, owner: str, list_id: str) -> SimList:
        """The list, if it exists and belongs to `owner`; else the API's Code 101."""
        lst = self.lists.get(list_id)
        if lst is None or lst.owner != owner:
            raise ApiError(self.invalid_list_status, CODE_BAD_LIST, "Invalid ListID")
        return lst

    def is_suppressed(self, owner: str, key: str) -> bool:
        client = self.clients.get(owner)
        return client is not None and key in client.suppression

    # writes ----------------------------------------------------------------------------------
    def import_subscribers(
        self, lst: SimList, rows: object, *, resubscribe: bool, now: int
    ) -> ImportOutcome:
        """`POST /subscribers/{id}/import.json`: upsert each row in order (a later duplicate
        merges over an earlier one). Raises ApiError for 209/212/malformed bodies."""
        if rows is None:
            rows = []
        if not isinstance(rows, list):
            raise ApiError(400, CODE_BAD_REQUEST, "Subscribers must be an array")
        if not rows:
            raise ApiError(400, CODE_NO_ROWS, "No subscribers provided")
        if len(rows) > MAX_IMPORT_ROWS:
            raise ApiError(400, CODE_TOO_MANY_ROWS, "Too many subscribers; the limit is 1000")
        out = ImportOutcome()
        seen: dict[str, int] = {}  # key -> 0 failed, 1 new, 2 existing
        dup_seen: set[str] = set()
        failures = out.failures
        for row in rows:
            email: object = row.get("EmailAddress") if isinstance(row, dict) else None
            if not isinstance(email, str) or not is_valid_email(email):
                shown = email if isinstance(email, str) else ""
                failures.append(ImportFailureRow(shown, CODE_INVALID_EMAIL, MSG_INVALID_EMAIL))
                key = shown.lower()
                if key in seen:
                    if key not in dup_seen:
                        dup_seen.add(key)
                        out.duplicates.append(shown)
                else:
                    seen[key] = 0
                continue
            assert isinstance(row, dict)
            key = email.lower()
            if key == email:
                key = email  # one string object for key and address (most are lower-case)
            previous = seen.get(key)
            if previous is not None and key not in dup_seen:
                dup_seen.add(key)
                out.duplicates.append(email)
            result = self._upsert(lst, key, email, row, resubscribe, now, single=False)
            if result is None:
                outcome = 2  # refused, reported as existing (resubscribe_false_reports)
            elif isinstance(result, tuple):
                failures.append(ImportFailureRow(email, result[0], result[1]))
                outcome = 0
            else:
                outcome = result
            if previous is None or previous == 0:
                seen[key] = outcome
        for outcome in seen.values():
            if outcome == 1:
                out.new += 1
            elif outcome == 2:
                out.existing += 1
            else:
                out.failed += 1
        out.unique = len(seen)
        return out

    def add_subscriber(self, lst: SimList, body: object, *, now: int) -> str:
        """`POST /subscribers/{id}.json`; returns the address as submitted (the 201 body)."""
        if not isinstance(body, dict):
            raise ApiError(400, CODE_BAD_REQUEST, "Failed to deserialize your request")
        email = body.get("EmailAddress")
        if not isinstance(email, str) or not is_valid_email(email):
            raise ApiError(400, CODE_INVALID_EMAIL, MSG_INVALID_EMAIL)
        if "ConsentToTrack" not in body or body["ConsentToTrack"] in (None, ""):
            raise ApiError(400, CODE_CONSENT_MISSING, "Please provide a consent to track value.")
        key = email.lower()
        resubscribe = parse_bool(body.get("Resubscribe"))
        key = email if key == email else key
        result = self._upsert(lst, key, email, body, resubscribe, now, single=True)
        if isinstance(result, tuple):
            raise ApiError(400, result[0], result[1])
        return email

    def _upsert(
        self,
        lst: SimList,
        key: str,
        email: str,
        row: dict[str, Any],
        resubscribe: bool,
        now: int,
        *,
        single: bool,
    ) -> int | tuple[int, str] | None:
        """Apply one row. Returns 1 (new), 2 (existing), None (refused because Resubscribe is
        false and the address is inactive or suppressed, in "existing" reporting mode) or a
        failure (code, message)."""
        consent_raw = row.get("ConsentToTrack")
        consent: str | None = None
        if consent_raw is not None:
            if not isinstance(consent_raw, str) or consent_raw.lower() not in _CONSENT:
                return (CODE_CONSENT_INVALID, "Invalid consent to track value")
            consent = _CONSENT[consent_raw.lower()]
        sub = lst.subscribers.get(key)
        fields_in = lst.keep_fields(row.get("CustomFields"))
        old_fields = sub.fields if sub is not None else _NO_FIELDS
        if fields_in:
            merged = merge_fields(old_fields, fields_in, lst.field_order)
            if merged is None:
                return (CODE_FIELD_TOO_LONG, MSG_FIELD_TOO_LONG)
        else:
            merged = old_fields
        state_now = sub.state if sub is not None else -1
        inactive = state_now in INACTIVE
        if not resubscribe and (inactive or (state_now < 0 and self.is_suppressed(lst.owner, key))):
            if self.resubscribe_false_reports == "existing":
                return None
            return _REFUSED[state_now] if inactive else _SUPPRESSED
        name = row.get("Name")
        if sub is None:
            state = UNCONFIRMED if single and lst.confirmed_opt_in else ACTIVE
            sub = Subscriber(
                email,
                name if isinstance(name, str) else "",
                state,
                merged,
                consent or "",
                now,
                now,
            )
            lst.subscribers[key] = sub
            lst.counts[state] += 1
            lst.versions[state] += 1
            return 1
        lst.versions[state_now] += 1
        if isinstance(name, str):
            sub.name = name
        sub.fields = merged
        if consent is not None:
            sub.consent = consent
        if state_now != ACTIVE and not (
            state_now == UNCONFIRMED and single and lst.confirmed_opt_in
        ):
            self._move(lst, sub, ACTIVE, now)
        return 2

    def _move(self, lst: SimList, sub: Subscriber, state: int, now: int) -> None:
        old = sub.state
        if old == state:
            return
        lst.counts[old] -= 1
        lst.counts[state] += 1
        lst.versions[old] += 1
        lst.versions[state] += 1
        sub.state = state
        sub.changed = now

    def unsubscribe(self, lst: SimList, email: str, *, now: int) -> None:
        """`POST /subscribers/{id}/unsubscribe.json`. On an AllClientLists list the address
        goes on the client's suppression list and is unsubscribed from all the client's lists."""
        key = _checked_key(email)
        sub = lst.subscribers.get(key)
        if sub is None or sub.state not in (ACTIVE, UNCONFIRMED):
            raise ApiError(400, CODE_NOT_IN_LIST, MSG_NOT_IN_LIST)
        self._unsubscribe(lst, key, now, suppress=lst.unsubscribe_setting == "AllClientLists")

    def _unsubscribe(self, lst: SimList, key: str, now: int, *, suppress: bool) -> None:
        sub = lst.subscribers.get(key)
        if sub is not None:
            self._move(lst, sub, UNSUBSCRIBED, now)
        if not suppress:
            return
        email = sub.email if sub is not None else key
        self.suppress(lst.owner, email, now=now, reason="Unsubscribed")
        for other in self.lists.values():
            if other is lst or other.owner != lst.owner:
                continue
            theirs = other.subscribers.get(key)
            if theirs is not None and theirs.state in (ACTIVE, UNCONFIRMED):
                self._move(other, theirs, UNSUBSCRIBED, now)

    def delete(self, lst: SimList, email: str, *, now: int) -> None:
        """`DELETE /subscribers/{id}.json?email=`: state Deleted; the address is not suppressed."""
        key = _checked_key(email)
        sub = lst.subscribers.get(key)
        if sub is None or sub.state == DELETED:
            raise ApiError(400, CODE_NOT_IN_LIST, MSG_NOT_IN_LIST)
        self._move(lst, sub, DELETED, now)

    def set_state(
        self,
        lst: SimList,
        email: str,
        state_name: str,
        *,
        now: int,
        name: str | None = None,
        suppress: bool | None = None,
    ) -> Subscriber:
        """Test/demo hook: force an address into a state, creating it if needed.
        `state_name` "Unsubscribed" behaves like the subscriber's own unsubscribe (suppression
        on AllClientLists lists) unless `suppress` says otherwise; `suppress=True` puts the
        address on the client's suppression list whatever the state (reason "Unsubscribed" or
        "Bounced" after the state, else "Suppressed"), dated `now`. A change of state stamps
        the subscriber's ``Date`` with `now` (what a ``date=`` listing filters on)."""
        state = STATE_BY_NAME.get(state_name.lower())
        if state is None:
            raise ValueError("unknown state")
        if not is_valid_email(email):
            raise ValueError("invalid email address")
        key = email.lower()
        sub = lst.subscribers.get(key)
        if sub is None:
            sub = Subscriber(email, name or "", state, _NO_FIELDS, "", now, now)
            lst.subscribers[key] = sub
            lst.counts[state] += 1
            lst.versions[state] += 1
        else:
            lst.versions[sub.state] += 1
            if name is not None:
                sub.name = name
            self._move(lst, sub, state, now)
        if state == UNSUBSCRIBED and suppress is None:
            suppress = lst.unsubscribe_setting == "AllClientLists"
            if suppress:
                self._unsubscribe(lst, key, now, suppress=True)
        elif suppress:
            reason = SUPPRESSION_REASONS.get(state, MANUAL_SUPPRESSION)
            self.suppress(lst.owner, sub.email, now=now, reason=reason)
        return sub

    def forget(self, lst: SimList, email: str) -> None:
        """Test hook: take an address off the list without a trace, in no state at all (as if
        the row had never been there: a list restored from an older export)."""
        sub = lst.subscribers.pop(email.lower(), None)
        if sub is not None:
            lst.counts[sub.state] -= 1
            lst.versions[sub.state] += 1

    # reads -----------------------------------------------------------------------------------
    def get(self, lst: SimList, email: str) -> Subscriber:
        sub = lst.subscribers.get(_checked_key(email))
        if sub is None:
            raise ApiError(400, CODE_NOT_IN_LIST, MSG_NOT_IN_LIST)
        return sub

    def members(self, lst: SimList, state: int, req: PageRequest) -> list[str]:
        """Keys of all members of `state` in the requested order (cached until that state
        changes). Subscribers are never removed from a list, so the keys stay valid."""
        view_key = (state, req.order_field, req.descending, req.since)
        version = lst.versions[state]
        cached = lst.views.get(view_key)
        if cached is not None and cached[0] == version:
            return cached[1]
        since = req.since
        subs = lst.subscribers
        # Plain strings, not (key, subscriber) tuples: the garbage collector does not track
        # strings, which makes a snapshot of a million members several times cheaper.
        if since:
            keys = [k for k, s in subs.items() if s.state == state and s.changed >= since]
        else:
            keys = [k for k, s in subs.items() if s.state == state]
        if req.order_field == "email":
            keys.sort(reverse=req.descending)
        elif req.order_field == "name":
            keys.sort(key=lambda k: (subs[k].name.lower(), k), reverse=req.descending)
        else:
            keys.sort(key=lambda k: (subs[k].changed, k), reverse=req.descending)
        if len(lst.views) >= 16:
            lst.views.clear()
        lst.views[view_key] = (version, keys)
        return keys

    def page(
        self, lst: SimList, state: int, req: PageRequest, *, include_consent: bool = False
    ) -> dict[str, Any]:
        """The paged envelope of `GET /lists/{id}/{state}.json`."""
        keys = self.members(lst, state, req)
        total = len(keys)
        start = (req.page - 1) * req.page_size
        subs = lst.subscribers
        results = [
            subs[k].to_json(include_consent=include_consent)
            for k in keys[start : start + req.page_size]
        ]
        return _envelope(results, req, total)

    def snapshot(self, lst: SimList) -> dict[str, dict[str, Any]]:
        """Every subscriber of a list, keyed by lower-cased address (for tests and /_sim/)."""
        return {
            key: {
                "EmailAddress": s.email,
                "Name": s.name,
                "State": STATE_NAMES[s.state],
                "CustomFields": s.custom_fields(),
                "ConsentToTrack": s.consent,
                "ListJoinedDate": format_date(s.joined),
                "StateChangedDate": format_date(s.changed),
            }
            for key, s in lst.subscribers.items()
        }


def _envelope(results: list[dict[str, Any]], req: PageRequest, total: int) -> dict[str, Any]:
    return {
        "Results": results,
        "ResultsOrderedBy": req.order_field,
        "OrderDirection": "desc" if req.descending else "asc",
        "PageNumber": req.page,
        "PageSize": req.page_size,
        "RecordsOnThisPage": len(results),
        "TotalNumberOfRecords": total,
        "NumberOfPages": -(-total // req.page_size),
    }


def _checked_key(email: object) -> str:
    if not isinstance(email, str) or not is_valid_email(email):
        raise ApiError(400, CODE_INVALID_EMAIL, MSG_INVALID_EMAIL)
    return email.lower()


_interned: dict[str, str] = {}
_shared_values: dict[str, str] = {}


def _intern_key(key: str) -> str:
    if len(key) > 2 and key[0] == "[" and key[-1] == "]":
        key = key[1:-1]
    found = _interned.get(key)
    if found is not None:
        return found
    if len(_interned) < 10_000:
        key = sys.intern(key)
        _interned[key] = key
    return key


def merge_fields(
    current: tuple[str, ...], incoming: object, order: dict[str, int]
) -> tuple[str, ...] | None:
    """Merge submitted custom fields into a subscriber's (flat) fields.

    Fields not mentioned keep their values; a mentioned key gets exactly the submitted values
    (several items with one key set a multi-select field); ``Clear: true`` clears a key; an
    empty value without Clear changes nothing. Returns None when a value is over 250 characters
    (the row is rejected whole). Keys may be written ``[Key]``; non-dict items are ignored.

    The result lists keys in `order` (the list's field order: the order in which the list first
    saw each key, standing in for its custom field definitions), so the outcome does not depend
    on the history of updates; multi-select values keep their submitted order.
    """
    if not isinstance(incoming, list):
        return current
    updates: dict[str, list[str]] = {}
    for item in incoming:
        if not isinstance(item, dict):
            continue
        raw_key = item.get("Key")
        if not isinstance(raw_key, str) or not raw_key:
            continue
        key = _intern_key(raw_key)
        if parse_bool(item.get("Clear")):
            updates[key] = []
            continue
        value = item.get("Value")
        if value is None or value == "":
            continue
        text = value if isinstance(value, str) else _scalar_text(value)
        if len(text) > MAX_FIELD_CHARS:
            return None
        if len(text) <= 64:  # share repeated short values (cities, tiers) between subscribers
            text = _shared_values.setdefault(text, text) if len(_shared_values) < 100_000 else text
        values = updates.get(key)
        if values is None:
            updates[key] = [text]
        else:
            values.append(text)
    if not updates:
        return current
    merged: dict[str, list[str]] = {}
    for i in range(0, len(current), 2):
        key = current[i]
        if key not in updates:
            merged.setdefault(key, []).append(current[i + 1])
    for key, values in updates.items():
        if key not in order:
            order[key] = len(order)
        if values:
            merged[key] = values
    out: list[str] = []
    for key in sorted(merged, key=lambda k: order.get(k, len(order))):
        for v in merged[key]:
            out += (key, v)
    return tuple(out)


def _scalar_text(value: object) -> str:
    if value is True:
        return "true"
    if value is False:
        return "false"
    return str(value)


def fields_from_pairs(pairs: Iterable[Sequence[str]]) -> tuple[str, ...]:
    """Flatten (key, value) pairs into the stored representation (for tests)."""
    return tuple(x for pair in pairs for x in (pair[0], pair[1]))
