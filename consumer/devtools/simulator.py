"""A local Campaign Monitor (createsend API v3.3) for tests, the demo and the benchmarks.

An aiohttp server speaking the part of the API that cmsync uses (see
/work/shared/campaign-monitor-api.md): add, import, unsubscribe, delete and get subscribers, list
details, list stats, the paged member listings (also filtered by ``date=``), a list's custom
fields (read and create) and a client's suppression list, under ``/api/v3.3/…json``, with Basic
(API key) and Bearer (OAuth token) auth, per-key rate limiting with ``X-RateLimit-*`` headers, an
optional per-address write throttle, seeded fault injection and an admin API under ``/_sim/``.

The HTTP handlers are thin; lists and subscribers live in the plain-Python model of
`consumer.devtools._simstate`, which property tests drive directly.

Watching it from the same process (tests, benchmarks): `Simulator.observe(callback)` hands the
callback a `Served` for every API request answered (endpoint, list, addresses, status, times);
`Simulator.in_flight` counts the API requests being handled right now, per endpoint;
`SimulatorConfig.apply_log` keeps the accepted writes in order (`applied_writes`).

Where the real API's behaviour is not documented, the simulator either makes it a setting or
picks a code and says so here (and in ``cmsync simulator --help``):

- ``resubscribe_false_reports`` ("existing" | "failure", default "existing"): how an import
  reports a row it refused because ``Resubscribe`` is false and the address is Unsubscribed,
  Deleted, Bounced or suppressed. "existing": counted in TotalExistingSubscribers, no failure.
  "failure": a FailureDetails row with the v2 API's codes 204 In Suppression List, 205 Is
  Deleted, 206 Is Unsubscribed, 207 Is Bounced. A single add answers 201 ("existing") or 400
  with the same code ("failure"). A refused row changes nothing.
- ``invalid_list_status`` (400 | 401, default 400): the HTTP status of Code 101 (unknown ListID,
  or a list of another API key), and of Code 102 "Invalid ClientID" (an unknown client ID, or
  that of another API key) on the suppression list.
- Each API key is one client. Its client ID is given with ``add_list(client_id=…)`` (or
  ``--list LISTID:KEY:CLIENTID``), else derived from the key (`model.default_client_id`, MD5 of
  the key in hex); `Simulator.client_id` tells it.
- Suppression list rows: ``SuppressionReason`` "Unsubscribed" (an unsubscribe on an
  AllClientLists list, or a forced Unsubscribed state with ``suppress``), "Bounced" (a forced
  Bounced state with ``suppress``) or "Suppressed" (suppressed in any other state, or through
  `Simulator.suppress`); ``Date`` is when the address was first suppressed; ``EmailAddress`` as
  first seen. ``orderfield`` is email or date (ties by address); name → Code 802.
- Custom fields: a new field's key is its name without white space, in brackets (case kept;
  the official clients' fixtures show "new date field" → "[newdatefield]"). Creating a field
  whose key exists: 400 Code 255; an empty or bracketed name: 250; an unknown DataType, or a
  multi-select field without options: 251. A list made with declared fields (``custom_fields``
  of `add_list`, ``--custom-field``) ignores, without an error, values for keys it lacks and
  values its field cannot hold (Number: a decimal number; Date: YYYY/MM/DD within 1900/01/01 ..
  2076/06/06; multi-select: one of the options, MultiSelectOne keeps the last); a list made
  without declarations accepts and stores any key (the simulator's behaviour before fields
  were modelled, which the tests and benchmarks rely on).
- ``Date`` of a subscriber (also ``StateChangedDate``) is the time of its last state change (or
  of its creation); ``date=`` keeps the rows whose Date is on or after it, given as
  ``YYYY-MM-DD``, ``YYYY-MM-DD HH:MM`` or ``YYYY-MM-DD HH:MM:SS`` (UTC).
- Custom field value over 250 characters: per-row failure Code 216 (a single add: 400 Code 216).
  No source documents a code; the real API may also truncate silently.
- Missing ``ConsentToTrack`` on a single add: 400 Code 214; a value other than Yes/No/Unchanged:
  Code 215 (per row on import). A missing ConsentToTrack on an import row means Unchanged.
- Listing parameters: page < 1 → 400 Code 800; pagesize outside 10–1000 → 801 (documented);
  orderfield not email|name|date → 802; orderdirection not asc|desc → 803; a bad ``date`` → 804.
- Malformed JSON or a body of the wrong shape: 400 Code 400. No credentials: 401 Code 50; bad
  API key 401 Code 100; unknown OAuth token 401 Code 120.
- Unsubscribe of an address that is not Active/Unconfirmed, delete of one that is absent or
  already Deleted, and get of an absent one: 400 Code 203.
- Duplicate addresses in one import: every row is applied in order (later rows merge over
  earlier ones); the address is listed once in DuplicateEmailsInSubmission and counted once.
- ``X-RateLimit-Limit`` is the bucket size (burst), ``-Remaining`` the whole tokens left,
  ``-Reset`` whole seconds (rounded up) until the bucket is full again. Headers go on every
  authenticated API response while a rate limit is configured and headers are on; the
  per-address throttle's 429 and injected faults carry none.
- An OAuth token acts for the first configured API key (same lists, same rate bucket).
- Unsubscribing on an AllClientLists list puts the address on the client's (API key's)
  suppression list and unsubscribes it from the client's other lists where it is Active or
  Unconfirmed. ``Resubscribe: true`` makes a suppressed address Active in the list but leaves
  it on the suppression list (what Campaign Monitor describes for organic resubscribes).
- A single add to a ConfirmedOptIn list creates an Unconfirmed subscriber; imports make
  subscribers Active. Custom field keys may be written ``[Key]``.
- The per-address throttle counts each accepted write of an address (add, import row,
  unsubscribe, delete) per list; a throttled import applies none of its rows.

Faults apply to ``/api/`` paths only, in this order: outage (503), the scripted sequence (one
status per request; 200 = behave normally, 0 = drop the connection), then random latency,
drops, 500s and 503s from ``random.Random(seed)``. Faults come before auth and rate limiting
and spend no rate tokens. Every 4xx/5xx carries ``{"Code": N, "Message": "…"}``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import random
import signal
import ssl
import sys
import time
import uuid
from collections import Counter, deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager, contextmanager, suppress
from dataclasses import asdict, dataclass, field, fields, replace
from types import MappingProxyType
from typing import Any, Final, Literal

import orjson
from aiohttp import web

from consumer.cli import parse_args
from consumer.devtools import _simstate as model
from consumer.devtools._simstate import ApiError, SimList, SimState, TokenBucket

__all__ = [
    "AddressThrottle",
    "AppliedWrite",
    "CustomFieldSpec",
    "FaultConfig",
    "Observer",
    "Served",
    "Simulator",
    "SimulatorConfig",
    "cli_main",
    "serve",
]

API_PREFIX: Final = "/api/v3.3/"
ENDPOINTS: Final = (
    "import",
    "add",
    "unsubscribe",
    "delete",
    "get",
    "list_details",
    "list_stats",
    "members",
    "custom_fields",
    "create_custom_field",
    "suppression_list",
    "unknown",
)
#: Endpoints whose path names a client (``/clients/{clientid}/…``), not a list.
CLIENT_ENDPOINTS: Final = frozenset({"suppression_list"})
_DROP: Final = 0
_STATE_PATHS: Final = {
    "active": model.ACTIVE,
    "unconfirmed": model.UNCONFIRMED,
    "unsubscribed": model.UNSUBSCRIBED,
    "bounced": model.BOUNCED,
    "deleted": model.DELETED,
}
_FAULT_MESSAGES: Final = {
    429: "Rate limit exceeded",
    500: "Internal server error",
    502: "Bad gateway",
    503: "Service unavailable",
    504: "Gateway timeout",
}
RATE_LIMITED_BODY: Final = b'{"Code":429,"Message":"Rate limit exceeded"}'
THROTTLED_BODY: Final = (
    b'{"Code":429,"Message":"Subscriber was added too many times too quickly, try again later."}'
)
_JSON: Final = "application/json"


@dataclass
class FaultConfig:
    """Injected faults. Probabilities are per API request; `script` is consumed one status per
    request (200 = behave normally, 0 = drop the connection); `outage` answers 503 to all."""

    p_500: float = 0.0
    p_503: float = 0.0
    p_drop: float = 0.0
    latency_s: float = 0.0
    p_latency: float = 0.0
    script: list[int] = field(default_factory=list)
    outage: bool = False

    def validate(self) -> None:
        for name in ("p_500", "p_503", "p_drop", "p_latency"):
            p = getattr(self, name)
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"{name} must be between 0 and 1")
        if self.p_500 + self.p_503 + self.p_drop > 1.0:
            raise ValueError("p_500 + p_503 + p_drop must not exceed 1")
        if self.latency_s < 0:
            raise ValueError("latency_s must be >= 0")
        for status in self.script:
            if status != _DROP and not 100 <= status <= 599:
                raise ValueError("script entries are HTTP statuses (or 0 for a dropped connection)")

    def updated(self, changes: Mapping[str, object]) -> FaultConfig:
        """A copy with `changes` applied (partial update from JSON); raises ValueError."""
        known = {f.name: f for f in fields(self)}
        kwargs: dict[str, Any] = {}
        for name, value in changes.items():
            if name not in known:
                raise ValueError(f"unknown fault setting {name!r}")
            if name == "script":
                if not isinstance(value, list) or not all(
                    isinstance(v, int) and not isinstance(v, bool) for v in value
                ):
                    raise ValueError("script must be a list of integers")
                kwargs[name] = list(value)
            elif name == "outage":
                if not isinstance(value, bool):
                    raise ValueError("outage must be true or false")
                kwargs[name] = value
            else:
                if isinstance(value, bool) or not isinstance(value, int | float):
                    raise ValueError(f"{name} must be a number")
                kwargs[name] = float(value)
        new = replace(self, **kwargs)
        new.validate()
        return new


@dataclass(frozen=True)
class AddressThrottle:
    """The same address (per list) written more than `max_writes` times within `window_s`
    seconds gets a header-less 429. Only accepted writes count."""

    max_writes: int
    window_s: float

    @classmethod
    def parse(cls, text: str) -> AddressThrottle:
        """``"N/W"``, e.g. ``"3/10"``: more than 3 writes within 10 s are refused."""
        n, sep, w = text.partition("/")
        if not sep:
            raise ValueError("expected N/W, e.g. 3/10")
        throttle = cls(int(n), float(w))
        if throttle.max_writes < 1 or throttle.window_s <= 0:
            raise ValueError("N must be >= 1 and W > 0")
        return throttle


@dataclass(frozen=True)
class CustomFieldSpec:
    """A custom field to declare on a new list (`Simulator.add_list`, ``--custom-field``)."""

    name: str
    data_type: str = "Text"  # Text | Number | Date | MultiSelectOne | MultiSelectMany | …
    options: tuple[str, ...] = ()
    visible_in_preference_center: bool = True

    @classmethod
    def parse(cls, text: str) -> CustomFieldSpec:
        """``NAME[:TYPE[:OPT1|OPT2…]]``, e.g. ``city``, ``age:Number``,
        ``tier:MultiSelectOne:gold|silver``."""
        name, _, rest = text.partition(":")
        data_type, _, options = rest.partition(":")
        return cls(name, data_type or "Text", tuple(o for o in options.split("|") if o))

    def definition(self) -> model.FieldDef:
        """The model's field; raises ValueError on a bad name, type or options."""
        try:
            return model.make_field(
                self.name,
                self.data_type,
                self.options,
                visible=self.visible_in_preference_center,
            )
        except ApiError as exc:
            raise ValueError(f"custom field {self.name!r}: {exc.message}") from None


@dataclass
class SimulatorConfig:
    api_keys: tuple[str, ...] = ("test-key",)
    oauth_tokens: tuple[str, ...] = ()
    rate_limit_rps: float | None = None  # None: no rate limit (and no rate headers)
    rate_burst: float | None = None  # bucket size; None: one second's worth, at least 1
    rate_headers: bool = True
    per_address_throttle: AddressThrottle | None = None
    seed: int = 0
    faults: FaultConfig = field(default_factory=FaultConfig)
    # uncertain API behaviour (see the module docstring)
    resubscribe_false_reports: model.ResubscribeFalseReports = "existing"
    invalid_list_status: Literal[400, 401] = 400
    timestamps_kept: int = 100_000  # request timestamps kept per API key for /_sim/stats
    apply_log: bool = False  # keep an in-process log of accepted writes (`applied_writes`)


@dataclass(frozen=True, slots=True)
class AppliedWrite:
    """One write the simulator accepted, in the order it was applied (opt-in test hook:
    `SimulatorConfig.apply_log`). Fault tests use it to check the order of applied changes
    per address and to count writes repeated after a restart."""

    at: float  # the simulator's clock (monotonic seconds)
    endpoint: str  # "import" | "add" | "unsubscribe" | "delete"
    list_id: str
    email: str  # lower-cased
    fields: tuple[tuple[str, str], ...]  # the row's custom fields as sent; () for removals
    applied: bool = True  # False: a removal answered Code 203 (not in the list any more)


@dataclass(frozen=True, slots=True)
class Served:
    """One API request the simulator answered, as `Simulator.observe` callbacks receive it.

    `addresses` are the lower-cased addresses the request names (import rows, the body of an
    add or unsubscribe, the ``email`` of a delete or get), also when the write was refused
    (Code 203, the per-address throttle); () for listings, and when the request never reached
    the list (`handled` False: answered by an injected fault, a credentials error, the rate
    limit, or an unknown list or path). Times are taken when the answer was ready: `at` on the
    simulator's `clock` (monotonic seconds), `wall` on its `wall_clock` (epoch seconds);
    `arrived` is the clock when the request came in."""

    method: str
    endpoint: str  # one of ENDPOINTS
    list_id: str  # "" when the path names no list; the client ID for CLIENT_ENDPOINTS
    addresses: tuple[str, ...]
    status: int | None  # None: the connection was dropped (an injected fault)
    handled: bool
    arrived: float
    at: float
    wall: float


#: A callback of `Simulator.observe`. It runs inside the request handler, on the event loop
#: serving the simulator: it must be quick and must not raise (an exception would turn the
#: answer into a 500).
Observer = Callable[[Served], None]


@dataclass(slots=True)
class _Exchange:
    """What `_serve` learned about one request, for the observers."""

    addresses: list[str] | None  # None: nobody observes, do not collect
    handled: bool = False
    dropped: bool = False


class Simulator:
    """The simulated service: state, limits, faults and the aiohttp application.

    `clock` (monotonic seconds) drives the rate limiter, the address throttle and the request
    timestamps; `wall_clock` (epoch seconds) only feeds the dates shown to clients; `sleep`
    serves injected latency. All are injectable so tests need no sleeping.
    """

    def __init__(
        self,
        config: SimulatorConfig | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
    ) -> None:
        self.config = config = config if config is not None else SimulatorConfig()
        if not config.api_keys and not config.oauth_tokens:
            raise ValueError("configure at least one API key or OAuth token")
        if config.rate_limit_rps is not None and config.rate_limit_rps <= 0:
            raise ValueError("rate_limit_rps must be > 0")
        self.state = SimState(
            resubscribe_false_reports=config.resubscribe_false_reports,
            invalid_list_status=config.invalid_list_status,
        )
        self._clock = clock
        self._wall_clock = wall_clock
        self._sleep = sleep
        self._api_keys = frozenset(config.api_keys)
        self._tokens = frozenset(config.oauth_tokens)
        self._default_owner = config.api_keys[0] if config.api_keys else config.oauth_tokens[0]
        self._auth_cache: dict[str, str | ApiError] = {}
        self._rng = random.Random(config.seed)
        self._faults = FaultConfig()
        self._script: deque[int] = deque()
        self.set_faults(config.faults)
        self._rate: float | None = config.rate_limit_rps
        self._burst = (
            max(1.0, config.rate_burst)
            if config.rate_burst is not None
            else max(1.0, self._rate or 1.0)
        )
        self._buckets: dict[str, TokenBucket] = {}
        self._throttle = config.per_address_throttle
        self._writes: dict[str, dict[str, tuple[float, ...]]] = {}
        self._writes_swept = 0.0
        self._counts: dict[str, dict[str, int]] = {}
        self._times: dict[str, deque[float]] = {}
        self._applied: list[AppliedWrite] | None = [] if config.apply_log else None
        self._observers: list[Observer] = []
        self._in_flight: Counter[str] = Counter()

    # configuration and in-process access ------------------------------------------------------
    def add_list(
        self,
        list_id: str | None = None,
        *,
        title: str = "Simulated list",
        unsubscribe_setting: model.UnsubscribeSetting = "AllClientLists",
        api_key: str | None = None,
        confirmed_opt_in: bool = False,
        custom_fields: Sequence[CustomFieldSpec] | None = None,
        client_id: str | None = None,
    ) -> str:
        """Create a list owned by `api_key` (default: the first API key); returns its ListID.

        `client_id` sets the key's client ID (only where the key has none yet, or the same; by
        default one is derived from the key). `custom_fields` declares the list's fields: values
        for other keys, or that a field cannot hold, are then ignored; None (the default)
        accepts and stores any key. Raises ValueError on a bad argument."""
        owner = api_key if api_key is not None else self._default_owner
        lst = self.state.add_list(
            list_id if list_id is not None else uuid.uuid4().hex,
            title=title,
            unsubscribe_setting=unsubscribe_setting,
            owner=owner,
            confirmed_opt_in=confirmed_opt_in,
            custom_fields=(
                None if custom_fields is None else [spec.definition() for spec in custom_fields]
            ),
            client_id=client_id,
        )
        return lst.list_id

    def client_id(self, api_key: str | None = None) -> str:
        """The client ID of `api_key` (default: the first API key)."""
        return self.state.client(api_key or self._default_owner).client_id

    def add_custom_field(self, list_id: str, spec: CustomFieldSpec) -> str:
        """Create a field on an existing list, as `POST /lists/{id}/customfields.json` does
        (a list made without declared fields still accepts any key); returns ``[key]``.
        Raises ValueError on a bad spec or a key the list has."""
        try:
            return self._list(list_id).add_field(spec.definition())
        except ApiError as exc:
            raise ValueError(f"custom field {spec.name!r}: {exc.message}") from None

    def custom_fields(self, list_id: str) -> list[dict[str, Any]]:
        """The list's custom fields, as `GET /lists/{id}/customfields.json` answers."""
        return self._list(list_id).custom_fields()

    def list_state(self, list_id: str) -> dict[str, dict[str, Any]]:
        """Subscribers of a list: {email_lower: {"EmailAddress", "Name", "State",
        "CustomFields", "ConsentToTrack", "ListJoinedDate", "StateChangedDate"}}."""
        return self.state.snapshot(self._list(list_id))

    def suppressed(self, api_key: str | None = None) -> set[str]:
        """The client's suppression list (lower-cased addresses)."""
        return self.state.suppressed(api_key or self._default_owner)

    def suppress(
        self, email: str, *, api_key: str | None = None, reason: str = "Suppressed"
    ) -> None:
        """Put an address on the client's suppression list now (as an administrator would),
        whether or not it is on any list; an address already there keeps its date."""
        if not model.is_valid_email(email):
            raise ValueError("invalid email address")
        self.state.suppress(api_key or self._default_owner, email, now=self._now(), reason=reason)

    def force_state(
        self,
        list_id: str,
        email: str,
        state: str,
        *,
        name: str | None = None,
        suppress: bool | None = None,
    ) -> None:
        """Force an address into a state (e.g. "Bounced", or "Unsubscribed" as if the
        subscriber had used the unsubscribe link); see `SimState.set_state`."""
        self.state.set_state(
            self._list(list_id), email, state, now=self._now(), name=name, suppress=suppress
        )

    def forget(self, list_id: str, email: str) -> None:
        """Take an address off a list without a trace (`SimState.forget`): drift a reconcile
        finds missing."""
        self.state.forget(self._list(list_id), email)

    def request_counts(self) -> dict[str, dict[str, int]]:
        """endpoint -> str(status) (or "dropped") -> requests."""
        return {endpoint: dict(by_status) for endpoint, by_status in self._counts.items()}

    def request_times(self, api_key: str | None = None) -> list[float]:
        """Monotonic arrival times of the last requests that carried valid credentials."""
        return list(self._times.get(api_key or self._default_owner, ()))

    def applied_writes(self) -> list[AppliedWrite]:
        """The accepted writes so far, oldest first (empty unless `config.apply_log`)."""
        return list(self._applied or ())

    def observe(self, observer: Observer) -> Callable[[], None]:
        """Call `observer` with a `Served` for every API request answered from now on (admin
        requests under /_sim/ are not observed); returns the function that stops it. While
        anything observes, the addresses each request names are collected (a cost per
        import row)."""
        self._observers.append(observer)

        def stop() -> None:
            if observer in self._observers:
                self._observers.remove(observer)

        return stop

    @property
    def in_flight(self) -> Mapping[str, int]:
        """API requests being handled right now, per endpoint (0 for an endpoint not seen),
        from arrival to answer, injected latency included: a test can act while, say, an
        import is in flight. A read-only live view."""
        return MappingProxyType(self._in_flight)

    def reset_stats(self) -> None:
        self._counts.clear()
        self._times.clear()
        if self._applied is not None:
            self._applied.clear()

    @property
    def faults(self) -> FaultConfig:
        """The current fault settings (a copy; `script` is what remains of the script)."""
        return replace(self._faults, script=list(self._script))

    def set_faults(self, faults: FaultConfig) -> None:
        faults.validate()
        self._faults = replace(faults, script=[])
        self._script = deque(faults.script)

    def update_faults(self, changes: Mapping[str, object]) -> FaultConfig:
        """Partial update (the admin API's POST /_sim/faults); "seed" reseeds the generator."""
        changes = dict(changes)
        seed = changes.pop("seed", None)
        if seed is not None:
            if not isinstance(seed, int) or isinstance(seed, bool):
                raise ValueError("seed must be an integer")
            self._rng = random.Random(seed)
        self.set_faults(self.faults.updated(changes))
        return self.faults

    def _list(self, list_id: str) -> SimList:
        lst = self.state.lists.get(list_id)
        if lst is None:
            raise KeyError(list_id)
        return lst

    def _now(self) -> int:
        return int(self._wall_clock())

    # the application --------------------------------------------------------------------------
    def app(self) -> web.Application:
        app = web.Application(client_max_size=32 * 1024 * 1024)
        app.router.add_route("*", "/api/v3.3/{tail:.*}", self._api)
        app.router.add_route("*", "/_sim/{tail:.*}", self._admin)
        app.router.add_route("*", "/{tail:.*}", _not_found)
        return app

    def _count(self, endpoint: str, status: str) -> None:
        by_status = self._counts.get(endpoint)
        if by_status is None:
            by_status = self._counts[endpoint] = {}
        by_status[status] = by_status.get(status, 0) + 1

    def _authenticate(self, header: str | None) -> str | ApiError:
        if not header:
            return ApiError(401, 50, "Must supply a valid HTTP Basic Authorization header")
        found = self._auth_cache.get(header)
        if found is not None:
            return found
        result: str | ApiError
        scheme, _, credentials = header.partition(" ")
        scheme = scheme.lower()
        credentials = credentials.strip()
        if scheme == "basic":
            try:
                user = base64.b64decode(credentials, validate=True).decode().partition(":")[0]
            except (binascii.Error, UnicodeDecodeError):
                user = None
            if user is None:
                result = ApiError(401, 50, "Must supply a valid HTTP Basic Authorization header")
            elif user in self._api_keys:
                result = user
            else:
                result = ApiError(401, 100, "Invalid API Key")
        elif scheme == "bearer":
            if credentials in self._tokens:
                result = self._default_owner
            else:
                result = ApiError(401, 120, "Invalid OAuth Token")
        else:
            result = ApiError(401, 50, "Must supply a valid HTTP Basic Authorization header")
        if len(self._auth_cache) > 1024:
            self._auth_cache.clear()
        self._auth_cache[header] = result
        return result

    async def _fault(self) -> int | None:
        """The status to answer instead of handling the request (0 = drop), or None."""
        faults = self._faults
        if faults.outage:
            return 503
        if self._script:
            scripted = self._script.popleft()
            return None if scripted == 200 else scripted
        rng = self._rng
        if faults.p_latency > 0 and faults.latency_s > 0 and rng.random() < faults.p_latency:
            await self._sleep(faults.latency_s)
        if faults.p_drop or faults.p_500 or faults.p_503:
            r = rng.random()
            if r < faults.p_drop:
                return _DROP
            r -= faults.p_drop
            if r < faults.p_500:
                return 500
            if r - faults.p_500 < faults.p_503:
                return 503
        return None

    def _rate_headers(self, bucket: TokenBucket) -> dict[str, str]:
        return {
            "X-RateLimit-Limit": str(int(bucket.capacity)),
            "X-RateLimit-Remaining": str(bucket.remaining()),
            "X-RateLimit-Reset": str(bucket.reset_s()),
        }

    async def _api(self, request: web.Request) -> web.StreamResponse:
        endpoint, list_id, state = _route(request.method, request.match_info["tail"])
        now = self._clock()
        exchange = _Exchange([] if self._observers else None)
        self._in_flight[endpoint] += 1
        try:
            response = await self._serve(request, endpoint, list_id, state, now, exchange)
        finally:
            self._in_flight[endpoint] -= 1
        if self._observers:
            served = Served(
                method=request.method,
                endpoint=endpoint,
                list_id=list_id,
                addresses=tuple(exchange.addresses or ()),
                status=None if exchange.dropped else response.status,
                handled=exchange.handled,
                arrived=now,
                at=self._clock(),
                wall=self._wall_clock(),
            )
            for observer in list(self._observers):
                observer(served)
        return response

    async def _serve(
        self,
        request: web.Request,
        endpoint: str,
        list_id: str,
        state: int,
        now: float,
        exchange: _Exchange,
    ) -> web.StreamResponse:
        principal = self._authenticate(request.headers.get("Authorization"))
        if isinstance(principal, str):
            times = self._times.get(principal)
            if times is None:
                times = self._times[principal] = deque(maxlen=self.config.timestamps_kept)
            times.append(now)

        fault = await self._fault()
        if fault is not None:
            if fault == _DROP:
                exchange.dropped = True
                self._count(endpoint, "dropped")
                if request.transport is not None:
                    request.transport.abort()
                return web.Response()
            message = _FAULT_MESSAGES.get(fault, "Simulated fault")
            return self._reply(endpoint, fault, {"Code": fault, "Message": message})

        if isinstance(principal, ApiError):
            return self._reply(endpoint, principal.status, principal.body())

        headers: dict[str, str] | None = None
        if self._rate is not None:
            bucket = self._buckets.get(principal)
            if bucket is None:
                bucket = self._buckets[principal] = TokenBucket(self._rate, self._burst, now)
            allowed = bucket.take(now)
            if self.config.rate_headers:
                headers = self._rate_headers(bucket)
            if not allowed:
                self._count(endpoint, "429")
                return web.Response(
                    body=RATE_LIMITED_BODY, status=429, content_type=_JSON, headers=headers
                )

        status: int
        body: bytes | None
        try:
            if endpoint == "unknown":
                raise ApiError(404, 404, "Resource not found")
            if endpoint in CLIENT_ENDPOINTS:
                client = self.state.get_client(principal, list_id)
                exchange.handled = True
                status, body = 200, self._handle_client(endpoint, request, client)
            else:
                lst = self.state.get_list(principal, list_id)
                exchange.handled = True
                status, body = await self._handle(
                    endpoint, request, lst, state, now, exchange.addresses
                )
        except ApiError as exc:
            return self._reply(endpoint, exc.status, exc.body(), headers)
        except _ThrottledError:
            self._count(endpoint, "429")
            return web.Response(body=THROTTLED_BODY, status=429, content_type=_JSON)
        self._count(endpoint, str(status))
        if body is None:
            return web.Response(status=status, headers=headers)
        return web.Response(body=body, status=status, content_type=_JSON, headers=headers)

    def _reply(
        self,
        endpoint: str,
        status: int,
        body: object,
        headers: Mapping[str, str] | None = None,
    ) -> web.Response:
        self._count(endpoint, str(status))
        return web.Response(
            body=orjson.dumps(body), status=status, content_type=_JSON, headers=headers
        )

    async def _handle(
        self,
        endpoint: str,
        request: web.Request,
        lst: SimList,
        state: int,
        now: float,
        seen: list[str] | None,
    ) -> tuple[int, bytes | None]:
        """Serve one request on `lst`; when `seen` is a list, the addresses the request names
        are appended to it before anything can refuse the request."""
        st = self.state
        query = request.query
        if endpoint == "import":
            body = await _json_body(request)
            if not isinstance(body, dict):
                raise ApiError(400, model.CODE_BAD_REQUEST, "Failed to deserialize your request")
            rows = body.get("Subscribers")
            if seen is not None and isinstance(rows, list):
                seen.extend(
                    row["EmailAddress"].strip().lower()
                    for row in rows
                    if isinstance(row, dict) and isinstance(row.get("EmailAddress"), str)
                )
            keys = _row_keys(rows) if self._throttle is not None else ()
            self._check_throttle(lst.list_id, keys, now)
            outcome = st.import_subscribers(
                lst, rows, resubscribe=model.parse_bool(body.get("Resubscribe")), now=self._now()
            )
            self._record_writes(lst.list_id, keys, now)
            if self._applied is not None:
                self._log_import(lst.list_id, rows, outcome)
            result = outcome.result()
            if outcome.failures:
                return 400, orjson.dumps(
                    {
                        "Code": model.CODE_IMPORT_FAILURES,
                        "Message": "Subscriber Import had some failures",
                        "ResultData": result,
                    }
                )
            return 201, orjson.dumps(result)
        if endpoint == "add":
            body = await _json_body(request)
            _, keys = self._addressed(body, seen)
            self._check_throttle(lst.list_id, keys, now)
            added = st.add_subscriber(lst, body, now=self._now())
            self._record_writes(lst.list_id, keys, now)
            if self._applied is not None:
                self._log_rows("add", lst.list_id, [body], frozenset())
            return 201, orjson.dumps(added)
        if endpoint == "unsubscribe":
            body = await _json_body(request)
            address, keys = self._addressed(body, seen)
            self._check_throttle(lst.list_id, keys, now)
            with self._log_removal("unsubscribe", lst.list_id, address):
                st.unsubscribe(lst, address, now=self._now())
            self._record_writes(lst.list_id, keys, now)
            return 200, None
        if endpoint == "delete":
            email = query.get("email", "")
            if seen is not None:
                seen.append(email.strip().lower())
            keys = (email.lower(),) if self._throttle else ()
            self._check_throttle(lst.list_id, keys, now)
            with self._log_removal("delete", lst.list_id, email):
                st.delete(lst, email, now=self._now())
            self._record_writes(lst.list_id, keys, now)
            return 200, None
        include_consent = model.parse_bool(query.get("includetrackingpreference"))
        if endpoint == "get":
            if seen is not None:
                seen.append(query.get("email", "").strip().lower())
            sub = st.get(lst, query.get("email", ""))
            return 200, orjson.dumps(sub.to_json(include_consent=include_consent))
        if endpoint == "list_details":
            return 200, orjson.dumps(lst.details())
        if endpoint == "list_stats":
            return 200, orjson.dumps(lst.stats())
        if endpoint == "custom_fields":
            return 200, orjson.dumps(lst.custom_fields())
        if endpoint == "create_custom_field":
            return 201, orjson.dumps(lst.add_field(_field_from_body(await _json_body(request))))
        page_request = model.parse_page_request(query)
        return 200, orjson.dumps(st.page(lst, state, page_request, include_consent=include_consent))

    def _handle_client(self, endpoint: str, request: web.Request, client: model.Client) -> bytes:
        """Serve one request on a client (today only its suppression list)."""
        assert endpoint == "suppression_list"
        req = model.parse_page_request(request.query, model.SUPPRESSION_ORDER_FIELDS)
        return orjson.dumps(self.state.suppression_page(client, req))

    def _addressed(self, body: object, seen: list[str] | None) -> tuple[str, tuple[str, ...]]:
        """The ``EmailAddress`` of a single-subscriber body ("" when absent), and its throttle
        keys; notes it in `seen` (see `_handle`)."""
        email = body.get("EmailAddress") if isinstance(body, dict) else None
        if not isinstance(email, str):
            return "", ()
        if seen is not None:
            seen.append(email.strip().lower())
        return email, (email.lower(),) if self._throttle else ()

    # apply log (opt-in) -----------------------------------------------------------------------
    def _log_import(self, list_id: str, rows: object, outcome: model.ImportOutcome) -> None:
        failed = frozenset(f.email.lower() for f in outcome.failures)
        self._log_rows("import", list_id, rows if isinstance(rows, list) else [], failed)

    def _log_rows(
        self,
        endpoint: str,
        list_id: str,
        rows: Sequence[object],
        failed: frozenset[str],
    ) -> None:
        assert self._applied is not None
        now = self._clock()
        for row in rows:
            if not isinstance(row, dict) or not isinstance(row.get("EmailAddress"), str):
                continue
            email = row["EmailAddress"].lower()
            if email in failed:
                continue
            raw = row.get("CustomFields")
            fields = tuple(
                (str(f.get("Key")), str(f.get("Value", "")))
                for f in (raw if isinstance(raw, list) else [])
                if isinstance(f, dict)
            )
            self._applied.append(AppliedWrite(now, endpoint, list_id, email, fields))

    @contextmanager
    def _log_removal(self, endpoint: str, list_id: str, email: str) -> Iterator[None]:
        if self._applied is None:
            yield
            return
        now = self._clock()
        try:
            yield
        except ApiError as exc:
            if exc.code == model.CODE_NOT_IN_LIST:
                self._applied.append(AppliedWrite(now, endpoint, list_id, email.lower(), (), False))
            raise
        self._applied.append(AppliedWrite(now, endpoint, list_id, email.lower(), ()))

    # per-address throttle ---------------------------------------------------------------------
    def _check_throttle(self, list_id: str, keys: Sequence[str], now: float) -> None:
        throttle = self._throttle
        if throttle is None or not keys:
            return
        book = self._writes.get(list_id)
        if book is None:
            return
        horizon = now - throttle.window_s
        for key in keys:
            times = book.get(key)
            if times is not None and sum(1 for t in times if t > horizon) >= throttle.max_writes:
                raise _ThrottledError

    def _record_writes(self, list_id: str, keys: Sequence[str], now: float) -> None:
        throttle = self._throttle
        if throttle is None or not keys:
            return
        book = self._writes.setdefault(list_id, {})
        horizon = now - throttle.window_s
        keep = throttle.max_writes
        for key in keys:
            times = book.get(key, ())
            book[key] = (*(t for t in times[-keep:] if t > horizon), now)
        if now - self._writes_swept > throttle.window_s and len(book) > 10_000:
            self._writes_swept = now
            for k in [k for k, times in book.items() if times[-1] <= horizon]:
                del book[k]

    # admin API --------------------------------------------------------------------------------
    async def _admin(self, request: web.Request) -> web.Response:
        parts = [p for p in request.match_info["tail"].split("/") if p]
        method = request.method
        try:
            if parts == ["lists"] and method == "GET":
                lists = [
                    {**lst.details(), "Stats": lst.stats()} for lst in self.state.lists.values()
                ]
                return _admin_json(200, {"Lists": lists})
            if parts == ["lists"] and method == "POST":
                body = await _admin_body(request)
                list_id = self.add_list(
                    _opt_str(body, "list_id"),
                    title=_opt_str(body, "title") or "Simulated list",
                    unsubscribe_setting=_setting(body.get("unsubscribe_setting")),
                    api_key=_opt_str(body, "api_key"),
                    confirmed_opt_in=body.get("confirmed_opt_in") is True,
                    custom_fields=_field_specs(body.get("custom_fields")),
                    client_id=_opt_str(body, "client_id"),
                )
                return _admin_json(201, {"ListID": list_id})
            if len(parts) == 2 and parts[0] == "lists" and method == "GET":
                lst = self.state.lists.get(parts[1])
                if lst is None:
                    return _admin_json(404, {"Code": 404, "Message": "No such list"})
                return _admin_json(
                    200,
                    {
                        **lst.details(),
                        "Stats": lst.stats(),
                        "Subscribers": self.state.snapshot(lst),
                        "ClientID": self.state.client(lst.owner).client_id,
                        "CustomFields": lst.custom_fields(),
                        "SuppressionList": sorted(self.state.suppressed(lst.owner)),
                    },
                )
            if len(parts) == 3 and parts[0] == "lists" and parts[2] == "state":
                if method != "POST":
                    return _method_not_allowed()
                if parts[1] not in self.state.lists:
                    return _admin_json(404, {"Code": 404, "Message": "No such list"})
                body = await _admin_body(request)
                email, state = body.get("email"), body.get("state")
                if not isinstance(email, str) or not isinstance(state, str):
                    raise ValueError("email and state are required strings")
                suppress = body.get("suppress")
                self.force_state(
                    parts[1],
                    email,
                    state,
                    name=_opt_str(body, "name"),
                    suppress=suppress if isinstance(suppress, bool) else None,
                )
                return _admin_json(200, self.list_state(parts[1]).get(email.lower()))
            if parts == ["suppression"] and method == "POST":
                body = await _admin_body(request)
                email = body.get("email")
                if not isinstance(email, str):
                    raise ValueError("email is a required string")
                api_key = _opt_str(body, "api_key")
                self.suppress(
                    email, api_key=api_key, reason=_opt_str(body, "reason") or "Suppressed"
                )
                return _admin_json(200, {"SuppressionList": sorted(self.suppressed(api_key))})
            if parts == ["faults"]:
                if method == "GET":
                    return _admin_json(200, asdict(self.faults))
                if method == "POST":
                    return _admin_json(200, asdict(self.update_faults(await _admin_body(request))))
                return _method_not_allowed()
            if parts == ["stats"] and method == "GET":
                return _admin_json(
                    200,
                    {
                        "requests": self.request_counts(),
                        "timestamps": {key: list(t) for key, t in self._times.items()},
                        "now": self._clock(),
                    },
                )
            if parts == ["reset-stats"] and method == "POST":
                self.reset_stats()
                return _admin_json(200, {})
        except ValueError as exc:
            return _admin_json(400, {"Code": 400, "Message": str(exc)})
        return _admin_json(404, {"Code": 404, "Message": "Unknown admin resource"})


class _ThrottledError(Exception):
    """The per-address throttle refused a write."""


def _route(method: str, tail: str) -> tuple[str, str, int]:
    """(endpoint name, list id (a client ID for `CLIENT_ENDPOINTS`), member state) of an API
    path below /api/v3.3/."""
    if not tail.endswith(".json"):
        return "unknown", "", 0
    parts = tail[:-5].split("/")
    if len(parts) == 2:
        kind, list_id = parts
        if kind == "subscribers":
            endpoint = {"POST": "add", "GET": "get", "DELETE": "delete"}.get(method, "unknown")
            return endpoint, list_id, 0
        if kind == "lists" and method == "GET":
            return "list_details", list_id, 0
    elif len(parts) == 3:
        kind, list_id, action = parts
        if kind == "subscribers" and method == "POST":
            if action == "import":
                return "import", list_id, 0
            if action == "unsubscribe":
                return "unsubscribe", list_id, 0
        elif kind == "lists" and method == "GET":
            if action == "stats":
                return "list_stats", list_id, 0
            if action == "customfields":
                return "custom_fields", list_id, 0
            state = _STATE_PATHS.get(action)
            if state is not None:
                return "members", list_id, state
        elif kind == "lists" and method == "POST" and action == "customfields":
            return "create_custom_field", list_id, 0
        elif kind == "clients" and method == "GET" and action == "suppressionlist":
            return "suppression_list", list_id, 0
    return "unknown", "", 0


def _field_from_body(body: object) -> model.FieldDef:
    """The field a `POST /lists/{id}/customfields.json` body asks for (ApiError 400 if bad)."""
    if not isinstance(body, dict):
        raise ApiError(400, model.CODE_BAD_REQUEST, "Failed to deserialize your request")
    name, data_type = body.get("FieldName"), body.get("DataType")
    options = body.get("Options")
    if not isinstance(name, str):
        raise ApiError(400, model.CODE_FIELD_NAME, "Invalid field name")
    if not isinstance(data_type, str):
        raise ApiError(400, model.CODE_FIELD_TYPE, "Invalid field data type")
    if options is None:
        options = []
    if not isinstance(options, list) or not all(isinstance(o, str) for o in options):
        raise ApiError(400, model.CODE_FIELD_TYPE, "Options must be a list of strings")
    visible = body.get("VisibleInPreferenceCenter")
    return model.make_field(
        name, data_type, options, visible=True if visible is None else model.parse_bool(visible)
    )


def _row_keys(rows: object) -> tuple[str, ...]:
    if not isinstance(rows, list):
        return ()
    keys = {
        row["EmailAddress"].lower()
        for row in rows
        if isinstance(row, dict) and isinstance(row.get("EmailAddress"), str)
    }
    return tuple(keys)


async def _json_body(request: web.Request) -> object:
    raw = await request.read()
    try:
        return orjson.loads(raw) if raw else None
    except orjson.JSONDecodeError:
        raise ApiError(
            400,
            model.CODE_BAD_REQUEST,
            "Failed to deserialize your request. Please check the documentation and try again.",
        ) from None


async def _admin_body(request: web.Request) -> dict[str, Any]:
    raw = await request.read()
    try:
        body = orjson.loads(raw) if raw else {}
    except orjson.JSONDecodeError:
        raise ValueError("body must be JSON") from None
    if not isinstance(body, dict):
        raise ValueError("body must be a JSON object")
    return body


def _opt_str(body: Mapping[str, object], name: str) -> str | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValueError(f"{name} must be a string")
    return value


def _field_specs(value: object) -> list[CustomFieldSpec] | None:
    """The admin API's ``custom_fields``: [{"name", "data_type"?, "options"?}, …] or absent."""
    if value is None:
        return None
    if not isinstance(value, list):
        raise ValueError("custom_fields must be a list")
    specs = []
    for item in value:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise ValueError("each custom field needs a name")
        options = item.get("options") or []
        if not isinstance(options, list) or not all(isinstance(o, str) for o in options):
            raise ValueError("custom field options must be a list of strings")
        specs.append(
            CustomFieldSpec(item["name"], _opt_str(item, "data_type") or "Text", tuple(options))
        )
    return specs


def _setting(value: object) -> model.UnsubscribeSetting:
    if value is None or value == "AllClientLists":
        return "AllClientLists"
    if value == "OnlyThisList":
        return "OnlyThisList"
    raise ValueError("unsubscribe_setting must be AllClientLists or OnlyThisList")


def _admin_json(status: int, body: object) -> web.Response:
    return web.Response(body=orjson.dumps(body), status=status, content_type=_JSON)


def _method_not_allowed() -> web.Response:
    return _admin_json(405, {"Code": 405, "Message": "Method not allowed"})


async def _not_found(request: web.Request) -> web.Response:
    return _admin_json(404, {"Code": 404, "Message": "Not found; the API lives under /api/v3.3/"})


@asynccontextmanager
async def serve(
    sim: Simulator,
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    ssl_context: ssl.SSLContext | None = None,
) -> AsyncIterator[str]:
    """Serve `sim` until the block exits; yields the base URL (``…/api/v3.3``). Port 0 picks a
    free port. Access logs are off: query strings carry email addresses."""
    runner = web.AppRunner(sim.app(), access_log=None, handle_signals=False)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port, ssl_context=ssl_context)
        await site.start()
        bound = runner.addresses[0][1]
        scheme = "https" if ssl_context is not None else "http"
        shown = f"[{host}]" if ":" in host else host
        yield f"{scheme}://{shown}:{bound}/api/v3.3"
    finally:
        await runner.cleanup()


# command line ---------------------------------------------------------------------------------
_HELP_EPILOG = """\
settings that model UNCERTAIN behaviour of the real API (and their defaults):
  --resubscribe-false-reports  how an import reports a row refused because Resubscribe is
                               false and the address is Unsubscribed/Deleted/Bounced/suppressed:
                               "existing" (DEFAULT: counted in TotalExistingSubscribers) or
                               "failure" (FailureDetails row, Code 204 suppressed, 205 deleted,
                               206 unsubscribed, 207 bounced; a single add answers 400 with it)
  --invalid-list-status        HTTP status of Code 101 (unknown ListID): 400 (DEFAULT) or 401;
                               also of Code 102 (a client ID not of the request's API key)
  --rate-limit-rps/--rate-burst  no limit is published for subscriber endpoints; the bucket
                               and its X-RateLimit-* headers are a model (DEFAULT: no limit)
  --address-throttle N/W       the observed "added too many times too quickly" 429
                               (DEFAULT: off)
  --custom-field               a value for a key the list lacks, or that the field cannot hold,
                               is ignored without an error (lists without --custom-field
                               accept and store any key)
codes the simulator chose where no source documents one:
  216 custom field value over 250 characters (per row); 214 ConsentToTrack missing on a
  single add, 215 invalid; 800 bad page, 802 bad orderfield, 803 bad orderdirection,
  804 bad date; 400 malformed body; 50 no credentials; 250 bad field name, 251 bad field
  type or options, 255 field key exists.
other choices: a client ID defaults to the MD5 (hex) of its API key; a new field's key is its
  name without white space, in brackets; suppression rows are dated when first suppressed.
admin API (no auth): GET/POST /_sim/lists, GET /_sim/lists/ID, POST /_sim/lists/ID/state,
  POST /_sim/suppression, GET/POST /_sim/faults, GET /_sim/stats, POST /_sim/reset-stats
"""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="cmsync simulator",
        description="Run the Campaign Monitor API simulator (v3.3 subset) until SIGINT/SIGTERM; "
        "prints the base URL on start.",
        epilog=_HELP_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=0, help="port; 0 picks a free one (default 0)")
    p.add_argument(
        "--api-key",
        action="append",
        dest="api_keys",
        metavar="KEY",
        help="an accepted API key (repeatable; default: test-key)",
    )
    p.add_argument(
        "--oauth-token",
        action="append",
        dest="oauth_tokens",
        metavar="TOKEN",
        default=[],
        help="an accepted OAuth bearer token, acting for the first API key (repeatable)",
    )
    p.add_argument(
        "--list",
        action="append",
        dest="lists",
        metavar="LISTID[:KEY[:CLIENTID]]",
        default=[],
        help="create a list (32 hex chars) owned by KEY (default: first API key), whose client "
        "ID (32 hex chars) is CLIENTID (default: derived from the key); repeatable; without "
        "any, one list with a random ID is created",
    )
    p.add_argument(
        "--custom-field",
        action="append",
        dest="custom_fields",
        metavar="NAME[:TYPE[:OPT|OPT…]]",
        default=None,
        help="declare a custom field on the lists created (repeatable); TYPE is Text "
        "(default), Number, Date, MultiSelectOne, MultiSelectMany, Country or USState; "
        "multi-select fields need options, e.g. tier:MultiSelectOne:gold|silver",
    )
    p.add_argument(
        "--confirmed-opt-in",
        action="store_true",
        help="create the lists with ConfirmedOptIn true (single adds make Unconfirmed members)",
    )
    p.add_argument(
        "--only-this-list",
        action="store_true",
        help="create the --list lists with UnsubscribeSetting OnlyThisList "
        "(default AllClientLists)",
    )
    p.add_argument("--rate-limit-rps", type=float, default=None, help="per-key token rate")
    p.add_argument("--rate-burst", type=float, default=None, help="bucket size (default: 1 s)")
    p.add_argument("--no-rate-headers", action="store_true", help="omit X-RateLimit-* headers")
    p.add_argument(
        "--address-throttle",
        metavar="N/W",
        default=None,
        help="refuse (header-less 429) an address written more than N times within W seconds",
    )
    p.add_argument("--seed", type=int, default=0, help="fault generator seed (default 0)")
    p.add_argument("--p-500", type=float, default=0.0, help="probability of a 500")
    p.add_argument("--p-503", type=float, default=0.0, help="probability of a 503")
    p.add_argument("--p-drop", type=float, default=0.0, help="probability of a dropped connection")
    p.add_argument("--latency-s", type=float, default=0.0, help="added latency, seconds")
    p.add_argument("--p-latency", type=float, default=0.0, help="probability of added latency")
    p.add_argument(
        "--script",
        default="",
        metavar="S1,S2,…",
        help="statuses for the next requests, e.g. 503,429,200 (200 normal, 0 drop)",
    )
    p.add_argument(
        "--resubscribe-false-reports",
        choices=("existing", "failure"),
        default="existing",
        help="UNCERTAIN: see below (default existing)",
    )
    p.add_argument(
        "--invalid-list-status",
        type=int,
        choices=(400, 401),
        default=400,
        help="UNCERTAIN: status of Code 101 (default 400)",
    )
    return p


def _config_from_args(
    ns: argparse.Namespace,
) -> tuple[SimulatorConfig, list[tuple[str, str, str | None]]]:
    api_keys = tuple(ns.api_keys or ["test-key"])
    script = [int(s) for s in ns.script.split(",") if s.strip()]
    faults = FaultConfig(
        p_500=ns.p_500,
        p_503=ns.p_503,
        p_drop=ns.p_drop,
        latency_s=ns.latency_s,
        p_latency=ns.p_latency,
        script=script,
    )
    faults.validate()
    config = SimulatorConfig(
        api_keys=api_keys,
        oauth_tokens=tuple(ns.oauth_tokens),
        rate_limit_rps=ns.rate_limit_rps,
        rate_burst=ns.rate_burst,
        rate_headers=not ns.no_rate_headers,
        per_address_throttle=(
            AddressThrottle.parse(ns.address_throttle) if ns.address_throttle else None
        ),
        seed=ns.seed,
        faults=faults,
        resubscribe_false_reports=ns.resubscribe_false_reports,
        invalid_list_status=ns.invalid_list_status,
    )
    lists: list[tuple[str, str, str | None]] = []
    for spec in ns.lists:
        list_id, _, rest = spec.partition(":")
        key, _, client_id = rest.partition(":")
        if not model.is_list_id(list_id):
            raise ValueError("a ListID is 32 lower-case hex characters")
        if key and key not in api_keys:
            raise ValueError("--list names a key that is not among --api-key")
        if client_id and not model.is_list_id(client_id):
            raise ValueError("a client ID is 32 lower-case hex characters")
        lists.append((list_id, key or api_keys[0], client_id or None))
    return config, lists


def cli_main(argv: list[str]) -> int:
    ns = parse_args(_parser(), argv)
    if isinstance(ns, int):
        return ns
    try:
        config, lists = _config_from_args(ns)
        sim = Simulator(config)
        setting: model.UnsubscribeSetting = (
            "OnlyThisList" if ns.only_this_list else "AllClientLists"
        )
        custom_fields = (
            None
            if ns.custom_fields is None
            else [CustomFieldSpec.parse(spec) for spec in ns.custom_fields]
        )
        for list_id, key, client_id in lists or [(uuid.uuid4().hex, config.api_keys[0], None)]:
            sim.add_list(
                list_id,
                api_key=key,
                unsubscribe_setting=setting,
                confirmed_opt_in=ns.confirmed_opt_in,
                custom_fields=custom_fields,
                client_id=client_id,
            )
    except ValueError as exc:
        print(f"cmsync simulator: error: {exc}", file=sys.stderr)
        return 2
    try:
        asyncio.run(_run(sim, ns.host, ns.port))
    except OSError as exc:
        print(f"cmsync simulator: error: {exc.strerror or exc}", file=sys.stderr)
        return 1
    return 0


async def _run(sim: Simulator, host: str, port: int) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    async with serve(sim, host, port) as base_url:
        print(base_url, flush=True)
        for list_id in sim.state.lists:
            print(f"list {list_id}", flush=True)
        for client in sim.state.clients.values():
            print(f"client {client.client_id}", flush=True)
        await stop.wait()
