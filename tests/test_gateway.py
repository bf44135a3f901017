"""The gateway to Campaign Monitor against the simulator over real HTTP: every request takes a
rate-limit slot (listing pages one each), retries, the stall of one destination, and one
gateway per API key value."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator

import aiohttp
import orjson
import pytest
from aiohttp import web
from aiohttp.typedefs import Handler

from consumer import observability as obs
from consumer.campaign_monitor.client import (
    AddressThrottled,
    ApiKey,
    CampaignMonitorClient,
    RecordRejected,
    SubscriberRow,
)
from consumer.devtools.rig import load_destinations
from consumer.devtools.simulator import (
    AddressThrottle,
    CustomFieldSpec,
    FaultConfig,
    Served,
    Simulator,
    SimulatorConfig,
    serve,
)
from consumer.gateway import ApiGateway, gateways_for
from consumer.ratelimit import AimdRateLimiter
from consumer.retry import Backoff
from consumer.settings import Destination
from tests.simulator_fixtures import FakeClock

KEY = "k3y-for-gateway-tests"
OTHER_KEY = "another-k3y"
#: High enough that pacing never slows a test; the fake clock makes slots countable instead.
RPS = 1000.0
LIST_ID = "0123456789abcdef0123456789abcdef"

DESTINATIONS_TOML = f"""
[[destination]]
name = "news"
segment_id = "seg"
list_id = "{LIST_ID}"
email_field = "email"

[[destination]]
name = "vip"
segment_id = "seg"
list_id = "fedcba9876543210fedcba9876543210"
api_key_env = "SAME_KEY_OTHER_VARIABLE"
email_field = "email"

[[destination]]
name = "partner"
segment_id = "seg"
list_id = "00000000000000000000000000000001"
api_key_env = "PARTNER_KEY"
email_field = "email"
"""


@pytest.fixture
def destinations() -> dict[str, Destination]:
    """Three destinations as the service reads them: two variables hold the same key."""
    found = load_destinations(
        DESTINATIONS_TOML, KEY, SAME_KEY_OTHER_VARIABLE=KEY, PARTNER_KEY=OTHER_KEY
    )
    return {d.name: d for d in found}


@pytest.fixture
def sim() -> Simulator:
    sim = Simulator(SimulatorConfig(api_keys=(KEY, OTHER_KEY)))
    sim.add_list(LIST_ID)
    return sim


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def gateway(sim: Simulator, clock: FakeClock) -> AsyncIterator[ApiGateway]:
    """The gateway of KEY, with a fake clock (so slots can be counted: see `slots`) and short
    waits for backoff and stalls."""
    async with serve(sim) as base_url, aiohttp.ClientSession() as session:
        client = CampaignMonitorClient(base_url, ApiKey(KEY), session=session)
        yield ApiGateway(
            "CMSYNC_CM_API_KEY",
            client,
            AimdRateLimiter(RPS),
            clock=clock,
            backoff=Backoff(0.001, 0.01),
            stall_retry_s=0.02,
        )


@dataclasses.dataclass
class Pages:
    """What a listing read looked like on the wire: the query of each page request (in
    order), and a one-shot change to the envelope of a chosen page (a truncated page)."""

    queries: list[dict[str, str]] = dataclasses.field(default_factory=list)
    doctor_page: str = ""
    doctored: bool = False

    @property
    def numbers(self) -> list[int]:
        return [int(q["page"]) for q in self.queries]

    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if "page" in request.query:
            self.queries.append(dict(request.query))
        response = await handler(request)
        if (
            self.doctored
            or request.query.get("page") != self.doctor_page
            or response.status != 200
            or not isinstance(response, web.Response)
            or response.body is None
        ):
            return response
        self.doctored = True
        envelope = orjson.loads(bytes(response.body))  # type: ignore[arg-type]
        envelope["Results"].pop()  # RecordsOnThisPage now says one more than there is
        return web.json_response(envelope)


@pytest.fixture
def pages() -> Pages:
    return Pages()


@pytest.fixture
async def listing_gateway(
    sim: Simulator, clock: FakeClock, pages: Pages
) -> AsyncIterator[ApiGateway]:
    """Like `gateway`, with `pages` watching (and possibly truncating) listing pages."""

    async def watch(request: web.Request, handler: Handler) -> web.StreamResponse:
        return await pages.middleware(request, handler)

    app = sim.app()
    app.middlewares.append(web.middleware(watch))
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        base_url = f"http://127.0.0.1:{runner.addresses[0][1]}/api/v3.3"
        async with aiohttp.ClientSession() as session:
            client = CampaignMonitorClient(base_url, ApiKey(KEY), session=session)
            yield ApiGateway(
                "CMSYNC_CM_API_KEY",
                client,
                AimdRateLimiter(RPS),
                clock=clock,
                backoff=Backoff(0.001, 0.01),
                stall_retry_s=0.02,
            )
    finally:
        await runner.cleanup()


def slots(gateway: ApiGateway, clock: FakeClock) -> int:
    """Rate-limit slots taken so far. The fake clock never moves, so each slot pushes the next
    free one a further interval ahead of `now`."""
    return round(gateway.limiter.next_slot_in(clock()) * gateway.limiter.rate)


def requests(sim: Simulator, endpoint: str) -> int:
    return sum(sim.request_counts().get(endpoint, {}).values())


def metric(name: str, **labels: str) -> float:
    return obs.REGISTRY.get_sample_value(name, labels) or 0.0


async def test_each_listing_page_takes_one_slot(
    gateway: ApiGateway, sim: Simulator, clock: FakeClock
) -> None:
    for n in range(25):
        sim.force_state(LIST_ID, f"Person{n:02}@example.com", "Unsubscribed", suppress=False)
    members = [
        m["EmailAddress"]
        async for m in gateway.members(LIST_ID, "unsubscribed", destination="news", page_size=10)
    ]
    assert len(members) == 25
    assert requests(sim, "members") == 3  # pages of 10, 10 and 5
    assert slots(gateway, clock) == 3


@pytest.mark.parametrize("fault", [429, 503, 0])
async def test_a_fault_in_the_middle_of_a_listing_resumes_at_the_same_page(
    listing_gateway: ApiGateway, sim: Simulator, pages: Pages, clock: FakeClock, fault: int
) -> None:
    for n in range(25):
        sim.force_state(LIST_ID, f"person{n:02}@example.com", "Unsubscribed", suppress=False)
    served: list[Served] = []
    stop = sim.observe(served.append)
    sim.set_faults(FaultConfig(script=[200, fault]))  # page 1 answers, page 2 fails once
    members = [
        m["EmailAddress"]
        async for m in listing_gateway.members(
            LIST_ID, "unsubscribed", destination="news", page_size=10
        )
    ]
    stop()
    assert members == [f"person{n:02}@example.com" for n in range(25)]  # each once, in order
    assert pages.numbers == [1, 2, 2, 3]  # not restarted from page 1
    assert [s.status for s in served] == [200, None if fault == 0 else fault, 200, 200]
    # One slot per attempt. Not countable after a 429 (it halves the rate `slots` divides
    # by); a dropped connection is sent again by aiohttp itself inside the same attempt (an
    # idempotent request on a reused connection), so it costs no slot of its own.
    if fault == 503:
        assert slots(listing_gateway, clock) == 4
    elif fault == 0:
        assert slots(listing_gateway, clock) == 3


async def test_a_truncated_page_is_read_again(
    listing_gateway: ApiGateway, sim: Simulator, pages: Pages
) -> None:
    before = metric("cmsync_retries_total", destination="news", reason="transient")
    for n in range(25):
        sim.force_state(LIST_ID, f"person{n:02}@example.com", "Bounced")
    pages.doctor_page = "2"
    members = [
        m["EmailAddress"]
        async for m in listing_gateway.members(LIST_ID, "bounced", destination="news", page_size=10)
    ]
    assert members == [f"person{n:02}@example.com" for n in range(25)]
    assert pages.doctored
    assert pages.numbers == [1, 2, 2, 3]
    after = metric("cmsync_retries_total", destination="news", reason="transient")
    assert after - before == 1


async def test_a_dated_listing_sends_the_date_filter_and_order(
    listing_gateway: ApiGateway, sim: Simulator, pages: Pages
) -> None:
    sim.force_state(LIST_ID, "recent@example.com", "Unsubscribed", suppress=False)
    found = [
        m["EmailAddress"]
        async for m in listing_gateway.members(
            LIST_ID,
            "unsubscribed",
            destination="news",
            since="2000-01-01 00:00",
            order_field="date",
            descending=True,
        )
    ]
    none = [
        m
        async for m in listing_gateway.members(
            LIST_ID, "unsubscribed", destination="news", since="2999-01-01"
        )
    ]
    assert found == ["recent@example.com"]
    assert none == []
    assert pages.queries == [
        {
            "page": "1",
            "pagesize": "1000",
            "orderfield": "date",
            "orderdirection": "desc",
            "date": "2000-01-01 00:00",
        },
        {
            "page": "1",
            "pagesize": "1000",
            "orderfield": "email",
            "orderdirection": "asc",
            "date": "2999-01-01",
        },
    ]


async def test_the_suppression_list_is_read_page_by_page_and_resumes(
    listing_gateway: ApiGateway, sim: Simulator, pages: Pages, clock: FakeClock
) -> None:
    for n in range(15):
        sim.suppress(f"gone{n:02}@example.com", api_key=KEY)
    sim.set_faults(FaultConfig(script=[200, 503]))
    rows = [
        r
        async for r in listing_gateway.suppressed(
            sim.client_id(KEY), destination="news", page_size=10, order_field="date"
        )
    ]
    assert [r["EmailAddress"] for r in rows] == [f"gone{n:02}@example.com" for n in range(15)]
    assert {r["State"] for r in rows} == {"Suppressed"}
    assert pages.numbers == [1, 2, 2]
    assert pages.queries[0]["orderfield"] == "date"
    assert requests(sim, "suppression_list") == 3
    assert slots(listing_gateway, clock) == 3


async def test_a_client_id_of_another_key_stalls_the_destination(
    gateway: ApiGateway, sim: Simulator
) -> None:
    other = sim.client_id(OTHER_KEY)

    async def read() -> list[dict[str, object]]:
        return [r async for r in gateway.suppressed(other, destination="news")]

    task = asyncio.create_task(read())
    reason = await asyncio.wait_for(stall_of(gateway, "news"), 10)
    assert "code 102" in reason
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_list_settings_are_one_call_each(
    gateway: ApiGateway, sim: Simulator, clock: FakeClock
) -> None:
    fields_list = sim.add_list(
        unsubscribe_setting="OnlyThisList",
        confirmed_opt_in=True,
        custom_fields=[CustomFieldSpec("age", "Number")],
    )
    sim.set_faults(FaultConfig(script=[503]))
    details = await gateway.list_details(fields_list, destination="news")
    fields = await gateway.custom_fields(fields_list, destination="news")
    assert (details["UnsubscribeSetting"], details["ConfirmedOptIn"]) == ("OnlyThisList", True)
    assert fields == [
        {
            "FieldName": "age",
            "Key": "[age]",
            "DataType": "Number",
            "FieldOptions": [],
            "VisibleInPreferenceCenter": True,
        }
    ]
    assert requests(sim, "list_details") == 2  # the 503, then the answer
    assert requests(sim, "custom_fields") == 1
    assert slots(gateway, clock) == 3


async def test_transient_errors_are_retried_until_the_request_succeeds(
    gateway: ApiGateway, sim: Simulator, clock: FakeClock
) -> None:
    before = metric("cmsync_retries_total", destination="news", reason="transient")
    sim.set_faults(FaultConfig(script=[503, 0, 500]))  # two errors and a dropped connection
    result = await gateway.import_subscribers(
        LIST_ID, [SubscriberRow("ada@example.com")], resubscribe=True, destination="news"
    )
    assert result.failures == ()
    assert "ada@example.com" in sim.list_state(LIST_ID)
    assert requests(sim, "import") == 4
    assert slots(gateway, clock) == 4  # every attempt took its own slot
    after = metric("cmsync_retries_total", destination="news", reason="transient")
    assert after - before == 3


async def test_a_429_is_retried_at_once_and_slows_the_limiter(
    gateway: ApiGateway, sim: Simulator
) -> None:
    before = metric("cmsync_retries_total", destination="news", reason="rate_limited")
    sim.force_state(LIST_ID, "someone@example.com", "Active")
    sim.set_faults(FaultConfig(script=[429]))
    assert await gateway.remove(LIST_ID, "someone@example.com", how="delete", destination="news")
    assert sim.list_state(LIST_ID)["someone@example.com"]["State"] == "Deleted"
    assert gateway.limiter.rate == RPS / 2  # the observer told the limiter
    assert requests(sim, "delete") == 2
    after = metric("cmsync_retries_total", destination="news", reason="rate_limited")
    assert after - before == 1


async def test_a_removal_of_an_address_not_in_the_list_is_done_and_a_refusal_is_raised(
    gateway: ApiGateway, sim: Simulator
) -> None:
    # Code 203 is an answer (False), not an error; an invalid address is the record's fault.
    assert not await gateway.remove(
        LIST_ID, "absent@example.com", how="unsubscribe", destination="news"
    )
    with pytest.raises(RecordRejected) as refused:
        await gateway.remove(LIST_ID, "not-an-address", how="delete", destination="news")
    assert refused.value.code == 1
    assert requests(sim, "delete") == 1  # not retried


async def stall_of(gateway: ApiGateway, destination: str) -> str:
    # The gateway offers no event to await for a stall (nothing in the service needs one).
    while (reason := gateway.stalled_reason(destination)) is None:  # noqa: ASYNC110
        await asyncio.sleep(0.01)
    return reason


async def test_a_refused_destination_stalls_alone_and_recovers(
    gateway: ApiGateway, sim: Simulator, destinations: dict[str, Destination]
) -> None:
    missing = destinations["vip"].list_id  # no such list yet: Code 101, DestinationFatal
    call = asyncio.create_task(
        gateway.import_subscribers(
            missing, [SubscriberRow("ada@example.com")], resubscribe=True, destination="vip"
        )
    )
    reason = await asyncio.wait_for(stall_of(gateway, "vip"), 10)
    assert "code 101" in reason
    assert metric("cmsync_destination_up", destination="vip") == 0.0
    assert gateway.stalled_reason("news") is None  # the other destination of the key goes on
    await gateway.remove(LIST_ID, "x@example.com", how="delete", destination="news")

    sim.add_list(missing)
    await asyncio.wait_for(call, 10)
    assert gateway.stalled_reason("vip") is None
    assert metric("cmsync_destination_up", destination="vip") == 1.0
    assert "ada@example.com" in sim.list_state(missing)


async def test_one_gateway_per_key_value_named_after_its_first_variable(
    destinations: dict[str, Destination],
) -> None:
    async with aiohttp.ClientSession() as session:
        gateways = gateways_for(
            destinations.values(),
            base_url="http://127.0.0.1:9/api/v3.3",
            rate_limit_rps=10,
            session=session,
        )
    assert gateways["news"] is gateways["vip"]  # two variables, one key: one limiter
    assert gateways["news"].key_name == "CMSYNC_CM_API_KEY"  # the first variable's name
    assert gateways["partner"] is not gateways["news"]
    assert gateways["partner"].key_name == "PARTNER_KEY"
    assert gateways["news"].limiter is not gateways["partner"].limiter
    renamed = dataclasses.replace(destinations["news"], name="late", api_key_env="THIRD")
    again = gateways_for(
        [renamed, destinations["news"]],
        base_url="http://127.0.0.1:9/api/v3.3",
        rate_limit_rps=10,
        session=None,
    )
    assert again["late"].key_name == "THIRD"  # first in the file, whatever its name
    assert again["late"] is again["news"]


async def test_calls_of_two_variables_with_one_key_share_the_slots(
    sim: Simulator, destinations: dict[str, Destination], clock: FakeClock
) -> None:
    sim.add_list(destinations["vip"].list_id)
    async with serve(sim) as base_url, aiohttp.ClientSession() as session:
        gateways = gateways_for(
            destinations.values(),
            base_url=base_url,
            rate_limit_rps=RPS,
            session=session,
            clock=clock,
        )
        for name in ("news", "vip", "news"):
            dest = destinations[name]
            await gateways[name].remove(
                dest.list_id, "x@example.com", how="delete", destination=name
            )
        assert slots(gateways["vip"], clock) == 3
        assert slots(gateways["partner"], clock) == 0


async def test_a_429_about_one_address_does_not_slow_the_key() -> None:
    """ "Added too many times too quickly" goes back to the caller (who holds that address
    back) instead of being retried, and the key's permitted rate stays where it was."""
    sim = Simulator(SimulatorConfig(api_keys=(KEY,), per_address_throttle=AddressThrottle(1, 60)))
    sim.add_list(LIST_ID)
    async with serve(sim) as base_url, aiohttp.ClientSession() as session:
        client = CampaignMonitorClient(base_url, ApiKey(KEY), session=session)
        gateway = ApiGateway("CMSYNC_CM_API_KEY", client, AimdRateLimiter(10))
        before = metric("cmsync_address_throttled_total", api_key="CMSYNC_CM_API_KEY")
        row = [SubscriberRow("flap@example.com")]
        await gateway.import_subscribers(LIST_ID, row, resubscribe=False, destination="news")
        with pytest.raises(AddressThrottled):
            await gateway.import_subscribers(LIST_ID, row, resubscribe=False, destination="news")
        assert gateway.limiter.rate == 10  # a key-wide 429 would have halved it
        assert requests(sim, "import") == 2  # not retried by the gateway
        after = metric("cmsync_address_throttled_total", api_key="CMSYNC_CM_API_KEY")
        assert after - before == 1
