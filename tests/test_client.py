"""The Campaign Monitor client against the simulator over real HTTP.

Where the simulator cannot produce a situation (gzip responses, non-JSON error bodies from a
proxy, a server echoing addresses in messages), the simulator's own application is served with
a small test middleware in front of it; the simulator itself is unchanged.
"""

from __future__ import annotations

import base64
import socket
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from aiohttp.typedefs import Middleware
from aiohttp.web import ContentCoding

from consumer.campaign_monitor.client import (
    AddressThrottled,
    ApiKey,
    CampaignMonitorClient,
    CampaignMonitorError,
    Credentials,
    CustomField,
    DestinationFatal,
    ImportFailure,
    OAuthToken,
    RateLimited,
    RecordRejected,
    RequestInvalid,
    SubscriberRow,
    TransientError,
)
from consumer.campaign_monitor.errors import classify
from consumer.devtools.simulator import (
    AddressThrottle,
    CustomFieldSpec,
    FaultConfig,
    Simulator,
    SimulatorConfig,
    serve,
)
from consumer.ratelimit import RateLimitInfo
from tests.simulator_fixtures import FakeClock

KEY = "k3y-5ecr3t-0123456789"
TOKEN = "t0ken-5ecr3t-abcdef"
EMAIL = "ada.lovelace+vip@example.com"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass
class Observed:
    """What the client's observer saw: (endpoint, status, rate info, seconds) per response, and
    which responses were a 429 about one address."""

    calls: list[tuple[str, int, RateLimitInfo | None, float]] = field(default_factory=list)
    address_throttled: list[bool] = field(default_factory=list)

    def __call__(
        self,
        endpoint: str,
        status: int,
        info: RateLimitInfo | None,
        seconds: float,
        address_throttled: bool,
    ) -> None:
        self.calls.append((endpoint, status, info, seconds))
        self.address_throttled.append(address_throttled)

    def statuses(self) -> list[tuple[str, int]]:
        return [(endpoint, status) for endpoint, status, _, _ in self.calls]


def sent(sim: Simulator) -> int:
    """Requests the simulator received, over all endpoints and outcomes."""
    return sum(sum(by_status.values()) for by_status in sim.request_counts().values())


@asynccontextmanager
async def serve_app(app: web.Application) -> AsyncIterator[str]:
    """Like `serve`, for the simulator's application with a test middleware added."""
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        yield f"http://127.0.0.1:{runner.addresses[0][1]}/api/v3.3"
    finally:
        await runner.cleanup()


@asynccontextmanager
async def connect(
    sim: Simulator,
    credentials: Credentials | None = None,
    *,
    middleware: Middleware | None = None,
    **kwargs: Any,
) -> AsyncIterator[tuple[CampaignMonitorClient, Observed]]:
    """A client (with a recording observer) talking to `sim` over HTTP."""
    observed = Observed()
    if middleware is None:
        server = serve(sim)
    else:
        app = sim.app()
        app.middlewares.append(web.middleware(middleware))
        server = serve_app(app)
    async with (
        server as base_url,
        CampaignMonitorClient(
            base_url, credentials or ApiKey(KEY), observer=observed, **kwargs
        ) as client,
    ):
        yield client, observed


def make_sim(**config: Any) -> Simulator:
    config.setdefault("api_keys", (KEY,))
    config.setdefault("oauth_tokens", (TOKEN,))
    return Simulator(SimulatorConfig(**config))


@pytest.fixture
def sim() -> Simulator:
    return make_sim()


@pytest.fixture
def list_id(sim: Simulator) -> str:
    return sim.add_list()


def assert_private(exc: BaseException, *secrets: str) -> None:
    """Neither the message, the repr nor any exception a traceback would print with it (causes,
    unsuppressed contexts) shows any of `secrets`. Source lines are left out: they are ours."""
    shown = [repr(exc)]
    current: BaseException | None = exc
    while current is not None:
        shown += [str(current), *traceback.format_exception_only(current)]
        current = current.__cause__ or (
            None if current.__suppress_context__ else current.__context__
        )
    for secret in secrets:
        for text in shown:
            assert secret not in text


# ---------------------------------------------------------------------------------------------
# Credentials and classification (no HTTP)


def test_credentials_make_the_auth_headers_and_mask_the_secret() -> None:
    key, token = ApiKey(KEY), OAuthToken(TOKEN)
    assert key.authorization() == "Basic " + base64.b64encode(f"{KEY}:x".encode()).decode()
    assert token.authorization() == f"Bearer {TOKEN}"
    client = CampaignMonitorClient("http://cm.invalid/api/v3.3", key)
    for text in (repr(key), str(key), repr(token), str(token), repr(client), f"{[key, token]}"):
        assert KEY not in text
        assert TOKEN not in text
        assert "***" in text


@pytest.mark.parametrize(
    ("status", "code", "expected"),
    [
        (400, 1, RecordRejected),
        (400, 204, RecordRejected),
        (400, 205, RecordRejected),
        (400, 206, RecordRejected),
        (400, 207, RecordRejected),
        (400, 208, RecordRejected),
        (400, 216, RecordRejected),
        (400, 209, RequestInvalid),
        (400, 212, RequestInvalid),
        (400, 801, RequestInvalid),
        (400, 400, RequestInvalid),
        (400, None, RequestInvalid),
        (409, None, RequestInvalid),
        (401, 100, DestinationFatal),
        (401, 50, DestinationFatal),
        (401, None, DestinationFatal),
        (400, 101, DestinationFatal),
        (401, 101, DestinationFatal),
        (401, 120, DestinationFatal),
        (401, 121, DestinationFatal),
        (401, 122, DestinationFatal),
        (404, None, DestinationFatal),
        (429, 429, RateLimited),
        (429, None, RateLimited),
        (500, 500, TransientError),
        (502, None, TransientError),
        (503, 503, TransientError),
        (408, None, TransientError),
    ],
)
def test_errors_are_classified_by_status_and_code(
    status: int, code: int | None, expected: type[CampaignMonitorError]
) -> None:
    exc = classify("add", status, code, "whatever", None, KEY)
    assert type(exc) is expected
    assert (exc.status, exc.code, exc.endpoint) == (status, code, "add")


def test_unknown_code_message_is_included_only_redacted() -> None:
    message = (
        f"Custom thing failed for {EMAIL} (<{EMAIL.upper()}>) using key {KEY};"
        " value 'Ada Lovelace' of \"Full Name\" invalid"
    )
    exc = classify("add", 400, 999, message, None, KEY)
    assert isinstance(exc, RequestInvalid)
    assert "Custom thing failed for" in str(exc)
    assert "invalid" in str(exc)
    assert_private(exc, EMAIL, EMAIL.upper(), KEY, "ada.lovelace", "Ada Lovelace", "Full Name")


# ---------------------------------------------------------------------------------------------
# Import


async def test_import_adds_then_updates_and_clears_fields(sim: Simulator, list_id: str) -> None:
    rows = [
        SubscriberRow(
            EMAIL,
            "Ada Lovelace",
            (CustomField("City", "London"), CustomField("Tier", "gold")),
            consent_to_track="Yes",
        ),
        SubscriberRow("grace@example.com", "Grace Hopper"),
        SubscriberRow("alan@example.com"),
    ]
    async with connect(sim) as (client, observed):
        first = await client.import_subscribers(list_id, rows, resubscribe=True)
        assert (first.total_unique, first.total_new, first.total_existing) == (3, 3, 0)
        assert first.failures == ()
        assert first.duplicates == ()
        update = SubscriberRow(
            EMAIL, None, (CustomField("City", "Paris"), CustomField("Tier", "", clear=True))
        )
        second = await client.import_subscribers(list_id, [update], resubscribe=True)
        assert (second.total_unique, second.total_new, second.total_existing) == (1, 0, 1)
    state = sim.list_state(list_id)
    assert set(state) == {EMAIL, "grace@example.com", "alan@example.com"}
    ada = state[EMAIL]
    assert ada["State"] == "Active"
    assert ada["Name"] == "Ada Lovelace"  # name=None left the stored name alone
    assert ada["CustomFields"] == [{"Key": "City", "Value": "Paris"}]
    assert ada["ConsentToTrack"] == "Yes"
    assert observed.statuses() == [("import", 201), ("import", 201)]


async def test_import_partial_failure_code_210_is_a_result(sim: Simulator, list_id: str) -> None:
    rows = [
        SubscriberRow(EMAIL),
        SubscriberRow("not-an-address"),
        SubscriberRow("grace@example.com", custom_fields=(CustomField("Bio", "x" * 251),)),
        SubscriberRow(EMAIL.upper(), "Ada"),
    ]
    async with connect(sim) as (client, observed):
        result = await client.import_subscribers(list_id, rows, resubscribe=True)
    assert {(f.email, f.code) for f in result.failures} == {
        ("not-an-address", 1),
        ("grace@example.com", 216),
    }
    assert all(isinstance(f, ImportFailure) and f.message for f in result.failures)
    assert [d.lower() for d in result.duplicates] == [EMAIL]
    assert result.total_new == 1
    assert set(sim.list_state(list_id)) == {EMAIL}
    assert observed.statuses() == [("import", 400)]


async def test_import_refuses_oversized_and_empty_batches_before_sending(
    sim: Simulator, list_id: str
) -> None:
    rows = [SubscriberRow(f"user{i}@example.com") for i in range(1001)]
    async with connect(sim) as (client, observed):
        with pytest.raises(RequestInvalid) as too_many:
            await client.import_subscribers(list_id, rows, resubscribe=True)
        with pytest.raises(RequestInvalid) as empty:
            await client.import_subscribers(list_id, [], resubscribe=True)
        exactly_1000 = await client.import_subscribers(list_id, rows[:1000], resubscribe=True)
    assert (too_many.value.code, too_many.value.status, too_many.value.endpoint) == (
        209,
        0,
        "import",
    )
    assert (empty.value.code, empty.value.status) == (212, 0)
    assert exactly_1000.total_new == 1000
    assert sim.request_counts() == {"import": {"201": 1}}  # only the valid batch was sent
    assert observed.statuses() == [("import", 201)]


@pytest.mark.parametrize("reports", ["existing", "failure"])
async def test_import_honours_resubscribe(reports: str) -> None:
    sim = make_sim(resubscribe_false_reports=reports)
    list_id = sim.add_list(unsubscribe_setting="OnlyThisList")
    async with connect(sim) as (client, _):
        await client.add_subscriber(list_id, SubscriberRow(EMAIL), resubscribe=True)
        assert await client.unsubscribe(list_id, EMAIL)
        refused = await client.import_subscribers(
            list_id, [SubscriberRow(EMAIL)], resubscribe=False
        )
        assert sim.list_state(list_id)[EMAIL]["State"] == "Unsubscribed"
        if reports == "failure":
            assert [(f.email, f.code) for f in refused.failures] == [(EMAIL, 206)]
        else:
            assert (refused.failures, refused.total_existing) == ((), 1)
        await client.import_subscribers(list_id, [SubscriberRow(EMAIL)], resubscribe=True)
    assert sim.list_state(list_id)[EMAIL]["State"] == "Active"


async def test_request_encoding_on_the_wire(sim: Simulator, list_id: str) -> None:
    """Methods, paths, query strings, bodies, flags and headers as the API documents them."""
    captured: list[tuple[str, str, dict[str, str], Any]] = []

    async def capture(request: web.Request, handler: Handler) -> web.StreamResponse:
        raw = await request.read()
        line = f"{request.method} {request.raw_path}"
        captured.append(
            (line, request.query_string, dict(request.headers), raw and orjson.loads(raw))
        )
        return await handler(request)

    rows = [
        SubscriberRow(
            EMAIL,
            "Ada",
            (CustomField("City", "London"), CustomField("Tier", "gold", clear=True)),
            "No",
        ),
        SubscriberRow("grace@example.com"),
    ]
    async with connect(sim, middleware=capture) as (client, _):
        await client.import_subscribers(list_id, rows, resubscribe=False, queue_autoresponders=True)
        await client.add_subscriber(list_id, SubscriberRow("grace@example.com"), resubscribe=True)
        await client.unsubscribe(list_id, "grace@example.com")
        await client.delete(list_id, EMAIL)
        await client.get_subscriber(list_id, EMAIL)
        await client.list_details(list_id)
        await client.list_stats(list_id)
        [m async for m in client.members(list_id, "deleted", page_size=10)]
    base = "/api/v3.3"
    quoted = "email=ada.lovelace%2Bvip@example.com"  # "+" is sent encoded, not as a space
    assert [(line, query) for line, query, _, _ in captured] == [
        (f"POST {base}/subscribers/{list_id}/import.json", ""),
        (f"POST {base}/subscribers/{list_id}.json", ""),
        (f"POST {base}/subscribers/{list_id}/unsubscribe.json", ""),
        (f"DELETE {base}/subscribers/{list_id}.json?{quoted}", quoted),
        (
            f"GET {base}/subscribers/{list_id}.json?{quoted}&includetrackingpreference=true",
            f"{quoted}&includetrackingpreference=true",
        ),
        (f"GET {base}/lists/{list_id}.json", ""),
        (f"GET {base}/lists/{list_id}/stats.json", ""),
        (
            f"GET {base}/lists/{list_id}/deleted.json?page=1&pagesize=10&orderfield=email"
            "&orderdirection=asc",
            "page=1&pagesize=10&orderfield=email&orderdirection=asc",
        ),
    ]
    for line, _, headers, _ in captured:
        assert headers["Authorization"] == ApiKey(KEY).authorization(), line
        assert "gzip" in headers["Accept-Encoding"], line
    assert captured[1][3] == {
        "EmailAddress": "grace@example.com",
        "CustomFields": [],
        "ConsentToTrack": "Unchanged",
        "Resubscribe": True,
        "RestartSubscriptionBasedAutoresponders": False,
    }
    assert captured[2][3] == {"EmailAddress": "grace@example.com"}
    _, _, headers, body = captured[0]
    assert headers["Content-Type"] == "application/json; charset=utf-8"
    assert "gzip" in headers["Accept-Encoding"]
    assert headers["Authorization"] == ApiKey(KEY).authorization()
    assert body == {
        "Subscribers": [
            {
                "EmailAddress": EMAIL,
                "Name": "Ada",
                "CustomFields": [
                    {"Key": "City", "Value": "London"},
                    {"Key": "Tier", "Value": "", "Clear": True},
                ],
                "ConsentToTrack": "No",
            },
            {
                "EmailAddress": "grace@example.com",
                "CustomFields": [],
                "ConsentToTrack": "Unchanged",
            },
        ],
        "Resubscribe": False,
        "QueueSubscriptionBasedAutoresponders": True,
        "RestartSubscriptionBasedAutoresponders": False,
    }


# ---------------------------------------------------------------------------------------------
# Single-subscriber endpoints


async def test_add_and_get_subscriber(sim: Simulator, list_id: str) -> None:
    async with connect(sim) as (client, observed):
        assert await client.get_subscriber(list_id, EMAIL) is None
        row = SubscriberRow(EMAIL, "Ada", (CustomField("City", "London"),), "Yes")
        await client.add_subscriber(list_id, row, resubscribe=True)
        got = await client.get_subscriber(list_id, EMAIL)
    assert got is not None
    assert (got["EmailAddress"], got["Name"], got["State"]) == (EMAIL, "Ada", "Active")
    assert got["CustomFields"] == [{"Key": "City", "Value": "London"}]
    assert got["ConsentToTrack"] == "Yes"  # includetrackingpreference=true was sent
    assert observed.statuses() == [("get", 400), ("add", 201), ("get", 200)]


async def test_add_rejections_are_record_errors() -> None:
    sim = make_sim(resubscribe_false_reports="failure")
    list_id = sim.add_list(unsubscribe_setting="OnlyThisList")
    async with connect(sim) as (client, _):
        await client.add_subscriber(list_id, SubscriberRow(EMAIL), resubscribe=True)
        assert await client.unsubscribe(list_id, EMAIL)
        with pytest.raises(RecordRejected) as invalid:
            await client.add_subscriber(list_id, SubscriberRow("ada@@example"), resubscribe=True)
        with pytest.raises(RecordRejected) as unsubscribed:
            await client.add_subscriber(list_id, SubscriberRow(EMAIL), resubscribe=False)
    assert (invalid.value.status, invalid.value.code, invalid.value.endpoint) == (400, 1, "add")
    assert (unsubscribed.value.code, unsubscribed.value.endpoint) == (206, "add")
    assert_private(invalid.value, "ada@@example", KEY)
    assert_private(unsubscribed.value, EMAIL, KEY)


async def test_unsubscribe_reports_whether_it_removed(sim: Simulator, list_id: str) -> None:
    async with connect(sim) as (client, observed):
        await client.add_subscriber(list_id, SubscriberRow(EMAIL), resubscribe=True)
        assert await client.unsubscribe(list_id, EMAIL) is True
        assert sim.list_state(list_id)[EMAIL]["State"] == "Unsubscribed"
        assert await client.unsubscribe(list_id, EMAIL) is False  # Code 203: already done
        assert await client.unsubscribe(list_id, "nobody@example.com") is False
    assert observed.statuses()[1:] == [
        ("unsubscribe", 200),
        ("unsubscribe", 400),
        ("unsubscribe", 400),
    ]


async def test_delete_reports_whether_it_removed(sim: Simulator, list_id: str) -> None:
    async with connect(sim) as (client, _):
        await client.add_subscriber(list_id, SubscriberRow(EMAIL), resubscribe=True)
        assert await client.delete(list_id, EMAIL) is True  # "+" survives the query string
        assert sim.list_state(list_id)[EMAIL]["State"] == "Deleted"
        assert await client.delete(list_id, EMAIL) is False
        assert await client.delete(list_id, "nobody@example.com") is False
        # a deleted subscriber is still found, in state Deleted
        got = await client.get_subscriber(list_id, EMAIL)
    assert got is not None
    assert got["State"] == "Deleted"


async def test_list_details_and_stats(sim: Simulator) -> None:
    list_id = sim.add_list(title="VIP", unsubscribe_setting="OnlyThisList")
    async with connect(sim) as (client, observed):
        await client.import_subscribers(
            list_id, [SubscriberRow(EMAIL), SubscriberRow("grace@example.com")], resubscribe=True
        )
        await client.unsubscribe(list_id, "grace@example.com")
        details = await client.list_details(list_id)
        stats = await client.list_stats(list_id)
    assert details["ListID"] == list_id
    assert details["Title"] == "VIP"
    assert details["UnsubscribeSetting"] == "OnlyThisList"
    assert (stats["TotalActiveSubscribers"], stats["TotalUnsubscribes"]) == (1, 1)
    assert observed.statuses()[-2:] == [("list_details", 200), ("list_stats", 200)]


async def test_members_walks_every_page_lazily_in_address_order(sim: Simulator) -> None:
    list_id = sim.add_list()
    active = [f"user{i:02d}@example.com" for i in range(25)]
    async with connect(sim) as (client, observed):
        await client.import_subscribers(
            list_id, [SubscriberRow(a) for a in reversed(active)], resubscribe=True
        )
        for address in ("user07@example.com", "user03@example.com"):
            assert await client.unsubscribe(list_id, address)
        sim.reset_stats()

        members = client.members(list_id, "active", page_size=10)
        first = await anext(members)
        assert sim.request_counts() == {"members": {"200": 1}}  # one page so far
        rest = [m async for m in members]
        unsubscribed = [m["EmailAddress"] async for m in client.members(list_id, "unsubscribed")]
        empty = [m async for m in client.members(list_id, "bounced")]
    got = [first["EmailAddress"], *(m["EmailAddress"] for m in rest)]
    expected = sorted(set(active) - {"user03@example.com", "user07@example.com"})
    assert got == expected  # 23 members over 3 pages, each once, in order
    assert unsubscribed == ["user03@example.com", "user07@example.com"]
    assert empty == []
    assert sim.request_counts() == {"members": {"200": 5}}  # 3 + 1 + 1
    assert [s for s in observed.statuses() if s[0] == "members"] == [("members", 200)] * 5


async def test_members_refuses_a_bad_page_size_before_sending(sim: Simulator, list_id: str) -> None:
    async with connect(sim) as (client, _):
        for size in (9, 1001):
            with pytest.raises(RequestInvalid) as caught:
                client.members(list_id, "active", page_size=size)
            assert (caught.value.code, caught.value.status) == (801, 0)
    assert sent(sim) == 0


# ---------------------------------------------------------------------------------------------
# Consent and list settings: dated listings, the suppression list, custom fields

#: 2030-01-02 03:04:00 UTC
T0 = 1893553440


def dated_sim() -> tuple[Simulator, FakeClock]:
    wall = FakeClock(T0)
    return Simulator(SimulatorConfig(api_keys=(KEY, "other-key")), wall_clock=wall), wall


async def test_members_page_sends_the_date_filter_and_the_order() -> None:
    sim, wall = dated_sim()
    list_id = sim.add_list(unsubscribe_setting="OnlyThisList")
    queries: list[str] = []

    async def capture(request: web.Request, handler: Handler) -> web.StreamResponse:
        queries.append(request.raw_path.partition("?")[2])
        return await handler(request)

    for n in range(3):
        sim.force_state(list_id, f"old{n}@example.com", "Unsubscribed")
    wall.advance(120)  # 03:06
    for n in range(3):
        wall.advance(1)
        sim.force_state(list_id, f"new{n}@example.com", "Unsubscribed")
    async with connect(sim, middleware=capture) as (client, _):
        recent = await client.members_page(
            list_id, "unsubscribed", 1, since="2030-01-02 03:06", order_field="date"
        )
        newest = await client.members_page(
            list_id,
            "unsubscribed",
            1,
            page_size=10,
            since="2030-01-02",
            order_field="date",
            descending=True,
        )
        for bad in ("2030-01-02T03:06", "02/01/2030", "2030-01-02 03:06:00"):
            with pytest.raises(RequestInvalid) as caught:
                await client.members_page(list_id, "unsubscribed", 1, since=bad)
            assert caught.value.status == 0
    assert [m["EmailAddress"] for m in recent.members] == [f"new{n}@example.com" for n in range(3)]
    assert recent.last
    assert [m["EmailAddress"] for m in newest.members][:2] == [
        "new2@example.com",
        "new1@example.com",
    ]
    assert len(newest.members) == 6
    assert queries == [  # the space as "+", as createsend sends it too
        "page=1&pagesize=1000&orderfield=date&orderdirection=asc&date=2030-01-02+03:06",
        "page=1&pagesize=10&orderfield=date&orderdirection=desc&date=2030-01-02",
    ]


async def test_suppression_page_reads_the_client_list_in_either_order() -> None:
    sim, wall = dated_sim()
    list_id = sim.add_list()
    for n in range(12):
        wall.advance(60)
        sim.force_state(list_id, f"s{n:02d}@example.com", "Unsubscribed")  # AllClientLists
    client_id = sim.client_id(KEY)
    async with connect(sim) as (client, observed):
        first = await client.suppression_page(client_id, 1, page_size=10)
        second = await client.suppression_page(client_id, 2, page_size=10)
        newest = await client.suppression_page(client_id, 1, order_field="date", descending=True)
        with pytest.raises(DestinationFatal) as caught:
            await client.suppression_page(sim.client_id("other-key"), 1)
        with pytest.raises(RequestInvalid):
            await client.suppression_page(client_id, 1, page_size=5)
    assert [r["EmailAddress"] for r in first.members] == [
        f"s{n:02d}@example.com" for n in range(10)
    ]
    assert not first.last
    assert [r["EmailAddress"] for r in second.members] == ["s10@example.com", "s11@example.com"]
    assert second.last
    assert first.members[0] == {
        "SuppressionReason": "Unsubscribed",
        "EmailAddress": "s00@example.com",
        "Date": "2030-01-02 03:05:00",
        "State": "Suppressed",
    }
    assert newest.members[0]["EmailAddress"] == "s11@example.com"
    assert (caught.value.status, caught.value.code) == (400, 102)
    assert observed.statuses()[-1] == ("suppression_list", 400)  # the bad page size never left


async def test_custom_fields_are_read_and_created(sim: Simulator) -> None:
    list_id = sim.add_list(custom_fields=[CustomFieldSpec("city")])
    async with connect(sim) as (client, observed):
        key = await client.create_custom_field(list_id, "joined on", "Date")
        tier = await client.create_custom_field(list_id, "tier", "MultiSelectOne", ("a", "b"))
        fields = await client.custom_fields(list_id)
        with pytest.raises(RequestInvalid) as caught:
            await client.create_custom_field(list_id, "city", "Text")
    assert (key, tier) == ("[joinedon]", "[tier]")
    assert [(f["Key"], f["DataType"], f["FieldOptions"]) for f in fields] == [
        ("[city]", "Text", []),
        ("[joinedon]", "Date", []),
        ("[tier]", "MultiSelectOne", ["a", "b"]),
    ]
    assert caught.value.code == 255
    assert [e for e, _ in observed.statuses()] == [
        "create_custom_field",
        "create_custom_field",
        "custom_fields",
        "create_custom_field",
    ]


def _doctor(change: Callable[[dict[str, Any]], None]) -> Middleware:
    """A middleware that applies `change` to the first listing envelope of page 2."""
    done: list[bool] = []

    async def doctor(request: web.Request, handler: Handler) -> web.StreamResponse:
        response = await handler(request)
        if done or request.query.get("page") != "2" or not isinstance(response, web.Response):
            return response
        assert response.body is not None
        envelope = orjson.loads(bytes(response.body))  # type: ignore[arg-type]
        change(envelope)
        done.append(True)
        return web.json_response(envelope)

    return doctor


def _drop_last_row(envelope: dict[str, Any]) -> None:
    envelope["Results"].pop()


def _shift_page_number(envelope: dict[str, Any]) -> None:
    envelope["PageNumber"] = 3


def _short_middle_page(envelope: dict[str, Any]) -> None:
    envelope["Results"].pop()
    envelope["RecordsOnThisPage"] -= 1


@pytest.mark.parametrize("change", [_drop_last_row, _shift_page_number, _short_middle_page])
async def test_an_inconsistent_page_is_a_truncated_listing_page(
    change: Callable[[dict[str, Any]], None],
) -> None:
    sim, _ = dated_sim()
    list_id = sim.add_list()
    for n in range(25):
        sim.force_state(list_id, f"Person.{n:02d}@example.com", "Unsubscribed")
    client_id = sim.client_id(KEY)
    async with connect(sim, middleware=_doctor(change)) as (client, _):
        with pytest.raises(TransientError) as caught:
            await client.members_page(list_id, "unsubscribed", 2, page_size=10)
        again = await client.members_page(list_id, "unsubscribed", 2, page_size=10)
        assert len(again.members) == 10
        assert not again.last
    assert "truncated listing page" in str(caught.value)
    assert (caught.value.status, caught.value.endpoint) == (200, "members")
    assert_private(caught.value, "person.", "Person.", KEY)
    async with connect(sim, middleware=_doctor(change)) as (client, _):
        with pytest.raises(TransientError, match="suppression_list: HTTP 200: truncated"):
            await client.suppression_page(client_id, 2, page_size=10)


async def test_the_last_page_may_be_short(sim: Simulator) -> None:
    list_id = sim.add_list()
    for n in range(25):
        sim.force_state(list_id, f"p{n:02d}@example.com", "Bounced")
    async with connect(sim) as (client, _):
        last = await client.members_page(list_id, "bounced", 3, page_size=10)
        beyond = await client.members_page(list_id, "bounced", 4, page_size=10)
    assert (len(last.members), last.last) == (5, True)
    assert (beyond.members, beyond.last) == ((), True)


# ---------------------------------------------------------------------------------------------
# Authentication and destination errors


async def test_bad_api_key_is_fatal(sim: Simulator, list_id: str) -> None:
    wrong = "wr0ng-key-987654321"
    async with connect(sim, ApiKey(wrong)) as (client, observed):
        with pytest.raises(DestinationFatal) as caught:
            await client.import_subscribers(list_id, [SubscriberRow(EMAIL)], resubscribe=True)
    assert (caught.value.status, caught.value.code, caught.value.endpoint) == (401, 100, "import")
    assert_private(caught.value, wrong, EMAIL)
    assert observed.statuses() == [("import", 401)]


@pytest.mark.parametrize("status", [400, 401])
async def test_unknown_list_is_fatal(status: int) -> None:
    sim = make_sim(invalid_list_status=status)
    other = sim.add_list(api_key=KEY)
    async with connect(sim) as (client, _):
        with pytest.raises(DestinationFatal) as caught:
            await client.unsubscribe("0" * 32, EMAIL)
        with pytest.raises(DestinationFatal) as stats:
            await client.list_stats("0" * 32)
        assert (await client.list_details(other))["ListID"] == other
    assert (caught.value.status, caught.value.code) == (status, 101)
    assert stats.value.code == 101
    assert_private(caught.value, EMAIL, KEY)


async def test_oauth_bearer_token(sim: Simulator, list_id: str) -> None:
    async with connect(sim, OAuthToken(TOKEN)) as (client, _):
        result = await client.import_subscribers(list_id, [SubscriberRow(EMAIL)], resubscribe=True)
        assert result.total_new == 1
        assert (await client.list_details(list_id))["ListID"] == list_id
    revoked = "t0ken-n0t-valid"
    async with connect(sim, OAuthToken(revoked)) as (client, _):
        with pytest.raises(DestinationFatal) as caught:
            await client.list_details(list_id)
    assert (caught.value.status, caught.value.code) == (401, 120)
    assert_private(caught.value, revoked, TOKEN)


async def test_wrong_base_url_is_fatal(sim: Simulator, list_id: str) -> None:
    async with (
        serve(sim) as base_url,
        CampaignMonitorClient(base_url + "/v9", ApiKey(KEY)) as client,
    ):
        with pytest.raises(DestinationFatal) as caught:
            await client.list_details(list_id)
    assert caught.value.status == 404


@pytest.mark.parametrize("base_url", ["http:///api/v3.3", "api.createsend.com/api/v3.3"])
async def test_unusable_base_url_is_fatal(base_url: str) -> None:
    observed = Observed()
    async with CampaignMonitorClient(base_url, ApiKey(KEY), observer=observed) as client:
        with pytest.raises(DestinationFatal) as caught:
            await client.delete("0" * 32, EMAIL)
    assert (caught.value.status, caught.value.code) == (0, None)
    assert observed.statuses() == [("delete", 0)]
    assert_private(caught.value, EMAIL, KEY)


# ---------------------------------------------------------------------------------------------
# Rate limiting


async def test_rate_limited_with_headers_gives_retry_after() -> None:
    sim = Simulator(
        SimulatorConfig(api_keys=(KEY,), rate_limit_rps=0.5, rate_burst=1),
        clock=lambda: 1000.0,  # frozen: the bucket never refills
    )
    list_id = sim.add_list()
    async with connect(sim) as (client, observed):
        await client.list_details(list_id)
        after_success = client.last_rate_limit
        with pytest.raises(RateLimited) as caught:
            await client.add_subscriber(list_id, SubscriberRow(EMAIL), resubscribe=True)
    assert after_success == RateLimitInfo(limit=1, remaining=0, reset_s=2.0)
    exc = caught.value
    assert (exc.status, exc.code, exc.endpoint) == (429, 429, "add")
    assert exc.retry_after_s == 2.0
    assert exc.rate_limit == RateLimitInfo(limit=1, remaining=0, reset_s=2.0)
    assert client.last_rate_limit == exc.rate_limit
    assert [(e, s, i) for e, s, i, _ in observed.calls] == [
        ("list_details", 200, after_success),
        ("add", 429, exc.rate_limit),
    ]
    assert_private(exc, EMAIL, KEY)


async def test_rate_limited_without_headers_has_no_retry_after() -> None:
    sim = Simulator(
        SimulatorConfig(api_keys=(KEY,), rate_limit_rps=1, rate_headers=False),
        clock=lambda: 1000.0,
    )
    list_id = sim.add_list()
    async with connect(sim) as (client, observed):
        await client.list_details(list_id)
        with pytest.raises(RateLimited) as caught:
            await client.list_details(list_id)
    assert caught.value.retry_after_s is None
    assert caught.value.rate_limit is None
    assert client.last_rate_limit is None
    assert observed.statuses() == [("list_details", 200), ("list_details", 429)]


async def test_per_address_throttle_is_told_apart_from_the_keys_rate_limit() -> None:
    """ "Added too many times too quickly" (no rate headers) is about the address, not the key:
    `AddressThrottled`, and the observer is told so; a 429 with rate headers stays
    `RateLimited`."""
    sim = Simulator(
        SimulatorConfig(api_keys=(KEY,), per_address_throttle=AddressThrottle(1, 60.0)),
        clock=lambda: 1000.0,
    )
    list_id = sim.add_list()
    async with connect(sim) as (client, observed):
        await client.add_subscriber(list_id, SubscriberRow(EMAIL), resubscribe=True)
        with pytest.raises(AddressThrottled) as caught:
            await client.import_subscribers(list_id, [SubscriberRow(EMAIL)], resubscribe=True)
    assert not isinstance(caught.value, RateLimited)
    assert (caught.value.status, caught.value.rate_limit) == (429, None)
    assert observed.address_throttled == [False, True]
    assert_private(caught.value, EMAIL)


# ---------------------------------------------------------------------------------------------
# Transient failures


@pytest.mark.parametrize("status", [500, 502, 503, 504])
async def test_server_errors_are_transient(sim: Simulator, list_id: str, status: int) -> None:
    sim.set_faults(FaultConfig(script=[status]))
    async with connect(sim) as (client, observed):
        with pytest.raises(TransientError) as caught:
            await client.delete(list_id, EMAIL)
        assert await client.delete(list_id, EMAIL) is False  # the next request is served again
    assert (caught.value.status, caught.value.code, caught.value.endpoint) == (
        status,
        status,
        "delete",
    )
    assert observed.statuses() == [("delete", status), ("delete", 400)]
    assert_private(caught.value, EMAIL, KEY)


async def test_outage_is_transient(sim: Simulator, list_id: str) -> None:
    async with connect(sim) as (client, _):
        sim.set_faults(FaultConfig(outage=True))
        with pytest.raises(TransientError) as caught:
            await client.list_stats(list_id)
    assert caught.value.status == 503


async def test_dropped_connection_is_transient_with_status_0(sim: Simulator, list_id: str) -> None:
    sim.set_faults(FaultConfig(script=[0]))
    async with connect(sim) as (client, observed):
        with pytest.raises(TransientError) as caught:
            await client.add_subscriber(list_id, SubscriberRow(EMAIL), resubscribe=True)
        await client.add_subscriber(list_id, SubscriberRow(EMAIL), resubscribe=True)  # recovers
    assert (caught.value.status, caught.value.code, caught.value.endpoint) == (0, None, "add")
    assert caught.value.__cause__ is None
    assert sim.request_counts()["add"] == {"dropped": 1, "201": 1}
    assert observed.statuses() == [("add", 0), ("add", 201)]
    assert_private(caught.value, EMAIL, KEY)


async def test_idempotent_requests_survive_one_drop_but_not_two(
    sim: Simulator, list_id: str
) -> None:
    """aiohttp resends an idempotent request (GET, DELETE) once when the connection drops."""
    sim.set_faults(FaultConfig(script=[0, 200, 0, 0]))
    async with connect(sim) as (client, observed):
        assert await client.delete(list_id, EMAIL) is False
        with pytest.raises(TransientError) as caught:
            await client.get_subscriber(list_id, EMAIL)
    assert sim.request_counts() == {"delete": {"dropped": 1, "400": 1}, "get": {"dropped": 2}}
    assert observed.statuses() == [("delete", 400), ("get", 0)]
    assert (caught.value.status, caught.value.endpoint) == (0, "get")
    assert_private(caught.value, EMAIL, KEY)


async def test_timeout_is_transient_with_status_0(sim: Simulator, list_id: str) -> None:
    sim.set_faults(FaultConfig(latency_s=0.5, p_latency=1.0))
    async with connect(sim, timeout_s=0.1) as (client, observed):
        with pytest.raises(TransientError) as caught:
            await client.delete(list_id, EMAIL)
    assert (caught.value.status, caught.value.endpoint) == (0, "delete")
    assert "Timeout" in str(caught.value)
    assert observed.statuses() == [("delete", 0)]
    assert_private(caught.value, EMAIL, KEY)


async def test_connection_refused_is_transient() -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    observed = Observed()
    async with CampaignMonitorClient(f"http://127.0.0.1:{port}/api/v3.3", ApiKey(KEY)) as client:
        client.observer = observed  # wired after construction, as the app does
        with pytest.raises(TransientError) as caught:
            await client.unsubscribe("0" * 32, EMAIL)
    assert caught.value.status == 0
    assert observed.statuses() == [("unsubscribe", 0)]


# ---------------------------------------------------------------------------------------------
# Hostile or unusual responses (a proxy in front, or a server echoing personal data)


def html_errors(request: web.Request, response: web.StreamResponse) -> web.StreamResponse:
    """What a load balancer or proxy answers: the same status, an HTML body."""
    if response.status >= 400:
        return web.Response(
            status=response.status, text="<html>oops</html>", content_type="text/html"
        )
    return response


@pytest.mark.parametrize(
    ("faults", "credentials", "expected", "status"),
    [
        (FaultConfig(script=[503]), ApiKey(KEY), TransientError, 503),
        (FaultConfig(script=[429]), ApiKey(KEY), RateLimited, 429),
        (FaultConfig(), ApiKey("wrong"), DestinationFatal, 401),
        (FaultConfig(), ApiKey(KEY), RequestInvalid, 400),  # 400 Code 1 without its body
    ],
)
async def test_non_json_error_bodies_are_classified_by_status(
    sim: Simulator,
    list_id: str,
    faults: FaultConfig,
    credentials: Credentials,
    expected: type[CampaignMonitorError],
    status: int,
) -> None:
    async def proxy(request: web.Request, handler: Handler) -> web.StreamResponse:
        return html_errors(request, await handler(request))

    sim.set_faults(faults)
    async with connect(sim, credentials, middleware=proxy) as (client, observed):
        with pytest.raises(expected) as caught:
            await client.add_subscriber(list_id, SubscriberRow("bad address"), resubscribe=True)
    assert (caught.value.status, caught.value.code) == (status, None)
    assert observed.statuses() == [("add", status)]


async def test_non_json_success_body_is_transient(sim: Simulator, list_id: str) -> None:
    async def proxy(request: web.Request, handler: Handler) -> web.StreamResponse:
        await handler(request)
        return web.Response(status=200, text="<html>captive portal</html>")

    async with connect(sim, middleware=proxy) as (client, _):
        with pytest.raises(TransientError) as caught:
            await client.list_details(list_id)
    assert (caught.value.status, caught.value.code) == (200, None)


async def test_messages_echoing_addresses_are_redacted(sim: Simulator, list_id: str) -> None:
    async def echo(request: web.Request, handler: Handler) -> web.StreamResponse:
        await handler(request)
        if request.path.endswith("/import.json"):
            body = {
                "Code": 210,
                "Message": "Subscriber Import had some failures",
                "ResultData": {
                    "TotalUniqueEmailsSubmitted": 1,
                    "TotalExistingSubscribers": 0,
                    "TotalNewSubscribers": 0,
                    "DuplicateEmailsInSubmission": [],
                    "FailureDetails": [
                        {"EmailAddress": EMAIL, "Code": 299, "Message": f"{EMAIL} is odd"}
                    ],
                },
            }
            return web.json_response(body, status=400)
        message = f"Cannot process {request.query.get('email')} for key {KEY}"
        return web.json_response({"Code": 299, "Message": message}, status=400)

    async with connect(sim, middleware=echo) as (client, _):
        result = await client.import_subscribers(list_id, [SubscriberRow(EMAIL)], resubscribe=True)
        with pytest.raises(RequestInvalid) as caught:
            await client.get_subscriber(list_id, EMAIL)
    assert result.failures == (ImportFailure(EMAIL, 299, "<redacted> is odd"),)
    assert caught.value.code == 299
    assert "Cannot process" in str(caught.value)
    assert_private(caught.value, EMAIL, KEY)


# ---------------------------------------------------------------------------------------------
# Transport: gzip, connection reuse, session ownership, observer


async def test_gzip_responses_and_connection_reuse_on_a_given_session(
    sim: Simulator, list_id: str
) -> None:
    async def compress(request: web.Request, handler: Handler) -> web.StreamResponse:
        response = await handler(request)
        if isinstance(response, web.Response):
            response.enable_compression(ContentCoding.gzip)
        return response

    encodings: list[str | None] = []
    connections: list[object] = []

    async def on_request_end(
        session: aiohttp.ClientSession, ctx: SimpleNamespace, params: aiohttp.TraceRequestEndParams
    ) -> None:
        encodings.append(params.response.headers.get("Content-Encoding"))

    async def on_connection_create_end(
        session: aiohttp.ClientSession,
        ctx: SimpleNamespace,
        params: aiohttp.TraceConnectionCreateEndParams,
    ) -> None:
        connections.append(params)

    trace = aiohttp.TraceConfig()
    trace.on_request_end.append(on_request_end)
    trace.on_connection_create_end.append(on_connection_create_end)
    rows = [SubscriberRow(f"user{i:03d}@example.com", f"User {i}") for i in range(200)]
    app = sim.app()
    app.middlewares.append(web.middleware(compress))
    async with serve_app(app) as base_url, aiohttp.ClientSession(trace_configs=[trace]) as session:
        async with CampaignMonitorClient(base_url, ApiKey(KEY), session=session) as client:
            result = await client.import_subscribers(list_id, rows, resubscribe=True)
            names = [m["Name"] async for m in client.members(list_id, "active", page_size=50)]
            stats = await client.list_stats(list_id)
        assert not session.closed  # a given session belongs to the caller
    assert result.total_new == 200
    assert names == [f"User {i}" for i in range(200)]
    assert stats["TotalActiveSubscribers"] == 200
    assert encodings == ["gzip"] * 6
    assert len(connections) == 1  # keep-alive: one connection for all six requests


async def test_owned_session_is_closed(sim: Simulator, list_id: str) -> None:
    async with serve(sim) as base_url:
        client = CampaignMonitorClient(base_url, ApiKey(KEY))
        await client.list_details(list_id)
        session = client._transport.session()
        await client.close()
        assert session.closed
        await client.close()  # idempotent


async def test_observer_sees_every_response(sim: Simulator, list_id: str) -> None:
    sim.set_faults(FaultConfig(script=[200, 200, 503, 0, 200]))
    async with connect(sim) as (client, observed):
        await client.add_subscriber(list_id, SubscriberRow(EMAIL), resubscribe=True)
        assert await client.get_subscriber(list_id, "nobody@example.com") is None
        with pytest.raises(TransientError):
            await client.list_stats(list_id)
        with pytest.raises(TransientError):
            await client.unsubscribe(list_id, EMAIL)
        with pytest.raises(RecordRejected):
            await client.add_subscriber(list_id, SubscriberRow("nope"), resubscribe=True)
        await anext(client.members(list_id, "active"))
    assert observed.statuses() == [
        ("add", 201),
        ("get", 400),
        ("list_stats", 503),
        ("unsubscribe", 0),
        ("add", 400),
        ("members", 200),
    ]
    assert all(seconds >= 0 for *_, seconds in observed.calls)
