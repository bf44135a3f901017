"""The Campaign Monitor simulator over real HTTP (aiohttp client), with a fake clock."""

from __future__ import annotations

import asyncio
import base64
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest

from consumer.devtools.simulator import (
    AddressThrottle,
    CustomFieldSpec,
    FaultConfig,
    Simulator,
    SimulatorConfig,
    cli_main,
    serve,
)
from tests.simulator_fixtures import FakeClock

KEY = "key-one"
OTHER = "key-two"
TOKEN = "token-one"


def basic(key: str) -> str:
    return "Basic " + base64.b64encode(f"{key}:x".encode()).decode()


@dataclass
class Reply:
    status: int
    body: Any
    headers: Mapping[str, str]


@dataclass
class Api:
    sim: Simulator
    base: str  # …/api/v3.3
    root: str  # scheme://host:port
    session: aiohttp.ClientSession
    clock: FakeClock
    list_id: str
    sleeps: list[float]

    async def call(
        self,
        method: str,
        path: str,
        *,
        json: object = None,
        params: Mapping[str, str] | None = None,
        auth: str | None = None,
        key: str = KEY,
    ) -> Reply:
        headers = {"Authorization": auth if auth is not None else basic(key)}
        if auth == "":
            headers = {}
        url = (self.root if path.startswith("/_sim/") else self.base) + path
        async with self.session.request(
            method, url, json=json, params=params, headers=headers
        ) as resp:
            raw = await resp.read()
            body = None
            if raw:
                assert resp.content_type == "application/json"
                body = await resp.json()
            return Reply(resp.status, body, resp.headers)

    async def add(self, email: str, **extra: Any) -> Reply:
        body = {"EmailAddress": email, "Name": "", "ConsentToTrack": "Unchanged", **extra}
        return await self.call("POST", f"/subscribers/{self.list_id}.json", json=body)

    async def import_(
        self, rows: list[dict[str, Any]], resubscribe: bool = True, **kw: Any
    ) -> Reply:
        body = {"Subscribers": rows, "Resubscribe": resubscribe, **kw}
        return await self.call("POST", f"/subscribers/{self.list_id}/import.json", json=body)

    async def get(self, email: str, list_id: str | None = None, **params: str) -> Reply:
        return await self.call(
            "GET",
            f"/subscribers/{list_id or self.list_id}.json",
            params={"email": email, **params},
        )

    async def unsubscribe(self, email: str, list_id: str | None = None) -> Reply:
        return await self.call(
            "POST",
            f"/subscribers/{list_id or self.list_id}/unsubscribe.json",
            json={"EmailAddress": email},
        )

    async def delete(self, email: str) -> Reply:
        return await self.call(
            "DELETE", f"/subscribers/{self.list_id}.json", params={"email": email}
        )

    async def members(self, state: str, **params: str) -> Reply:
        return await self.call("GET", f"/lists/{self.list_id}/{state}.json", params=params)

    async def stats(self) -> dict[str, Any]:
        reply = await self.call("GET", f"/lists/{self.list_id}/stats.json")
        assert reply.status == 200
        result: dict[str, Any] = reply.body
        return result


@asynccontextmanager
async def running(
    config: SimulatorConfig | None = None, *, wall: FakeClock | None = None, **list_kw: Any
) -> AsyncIterator[Api]:
    """The simulator served over HTTP; `wall` replaces the wall clock (dates shown)."""
    clock = FakeClock()
    sleeps: list[float] = []

    async def fake_sleep(seconds: float) -> None:
        sleeps.append(seconds)

    sim = Simulator(
        config or SimulatorConfig(api_keys=(KEY, OTHER), oauth_tokens=(TOKEN,)),
        clock=clock,
        wall_clock=wall if wall is not None else time.time,
        sleep=fake_sleep,
    )
    list_id = sim.add_list(**list_kw)
    async with serve(sim) as base, aiohttp.ClientSession() as session:
        root = base.removesuffix("/api/v3.3")
        yield Api(sim, base, root, session, clock, list_id, sleeps)


def row(email: str, **extra: Any) -> dict[str, Any]:
    return {"EmailAddress": email, "Name": extra.pop("Name", "N"), **extra}


def fields_of(api: Api, email: str, list_id: str | None = None) -> list[tuple[str, str]]:
    sub = api.sim.list_state(list_id or api.list_id)[email.lower()]
    return [(f["Key"], f["Value"]) for f in sub["CustomFields"]]


def state_of(api: Api, email: str, list_id: str | None = None) -> str | None:
    sub = api.sim.list_state(list_id or api.list_id).get(email.lower())
    return None if sub is None else str(sub["State"])


# auth and lists -------------------------------------------------------------------------------
async def test_authentication() -> None:
    async with running() as api:
        details = f"/lists/{api.list_id}.json"
        missing = await api.call("GET", details, auth="")
        assert (missing.status, missing.body["Code"]) == (401, 50)
        bad = await api.call("GET", details, key="nope")
        assert (bad.status, bad.body) == (401, {"Code": 100, "Message": "Invalid API Key"})
        garbage = await api.call("GET", details, auth="Basic !!!")
        assert (garbage.status, garbage.body["Code"]) == (401, 50)
        ok = await api.call("GET", details, auth=f"Bearer {TOKEN}")
        assert ok.status == 200
        assert ok.body["ListID"] == api.list_id
        bad_token = await api.call("GET", details, auth="Bearer other")
        assert (bad_token.status, bad_token.body["Code"]) == (401, 120)


async def test_a_key_sees_only_its_own_lists() -> None:
    async with running() as api:
        other_list = api.sim.add_list(api_key=OTHER)
        mine = await api.call("GET", f"/lists/{api.list_id}.json")
        assert mine.status == 200
        assert mine.body["UnsubscribeSetting"] == "AllClientLists"
        theirs = await api.call("GET", f"/lists/{other_list}.json")
        assert (theirs.status, theirs.body) == (400, {"Code": 101, "Message": "Invalid ListID"})
        unknown = await api.call("GET", f"/lists/{'f' * 32}/stats.json")
        assert (unknown.status, unknown.body["Code"]) == (400, 101)
        assert (await api.call("GET", f"/lists/{other_list}.json", key=OTHER)).status == 200


async def test_invalid_list_status_is_configurable() -> None:
    async with running(SimulatorConfig(api_keys=(KEY,), invalid_list_status=401)) as api:
        reply = await api.call("GET", f"/subscribers/{'0' * 32}.json", params={"email": "a@b.co"})
        assert (reply.status, reply.body["Code"]) == (401, 101)


async def test_unknown_paths_and_methods_answer_json() -> None:
    async with running() as api:
        for method, path in [
            ("GET", "/clients.json"),
            ("PUT", f"/subscribers/{api.list_id}.json"),
            ("GET", f"/lists/{api.list_id}/stats.xml"),
        ]:
            reply = await api.call(method, path)
            assert reply.status == 404
            assert reply.body["Code"] == 404
        async with api.session.get(api.root + "/elsewhere") as resp:
            assert resp.status == 404
            assert (await resp.json())["Code"] == 404


# add, get, unsubscribe, delete --------------------------------------------------------------
async def test_add_get_and_case_insensitive_matching() -> None:
    async with running() as api:
        added = await api.add(
            "Ada.Lovelace+cm@Example.com",
            Name="Ada",
            ConsentToTrack="yes",
            CustomFields=[{"Key": "City", "Value": "London"}],
        )
        assert (added.status, added.body) == (201, "Ada.Lovelace+cm@Example.com")
        got = await api.get("ada.lovelace+CM@example.COM", includetrackingpreference="true")
        assert got.status == 200
        assert got.body["EmailAddress"] == "Ada.Lovelace+cm@Example.com"
        assert got.body["State"] == "Active"
        assert got.body["ConsentToTrack"] == "Yes"
        assert got.body["CustomFields"] == [{"Key": "City", "Value": "London"}]
        plain = await api.get("ada.lovelace+cm@example.com", includetrackingpreference="False")
        assert "ConsentToTrack" not in plain.body
        again = await api.import_([row("ADA.LOVELACE+CM@EXAMPLE.COM")])
        assert again.body["TotalExistingSubscribers"] == 1
        assert len(api.sim.list_state(api.list_id)) == 1


async def test_add_validation_codes() -> None:
    async with running() as api:
        path = f"/subscribers/{api.list_id}.json"
        no_consent = await api.call("POST", path, json={"EmailAddress": "a@example.com"})
        assert (no_consent.status, no_consent.body["Code"]) == (400, 214)
        bad_consent = await api.add("a@example.com", ConsentToTrack="maybe")
        assert (bad_consent.status, bad_consent.body["Code"]) == (400, 215)
        bad_email = await api.add("a@example")
        assert bad_email.body == {"Code": 1, "Message": "Invalid Email Address"}
        too_long = await api.add("a@example.com", CustomFields=[{"Key": "K", "Value": "x" * 251}])
        assert (too_long.status, too_long.body["Code"]) == (400, 216)
        not_json = await api.session.post(
            api.base + path, data=b"{nope", headers={"Authorization": basic(KEY)}
        )
        assert not_json.status == 400
        assert (await not_json.json())["Code"] == 400
        not_json.release()
        assert api.sim.list_state(api.list_id) == {}


async def test_unknown_address_is_code_203_everywhere() -> None:
    async with running() as api:
        for reply in (
            await api.get("ghost@example.com"),
            await api.unsubscribe("ghost@example.com"),
            await api.delete("ghost@example.com"),
        ):
            assert reply.status == 400
            assert reply.body == {
                "Code": 203,
                "Message": "Subscriber not in list or has already been removed.",
            }
        await api.add("gone@example.com")
        assert (await api.delete("gone@example.com")).status == 200
        assert (await api.delete("gone@example.com")).body["Code"] == 203
        assert (await api.unsubscribe("gone@example.com")).body["Code"] == 203
        assert (await api.get("gone@example.com")).body["State"] == "Deleted"


async def test_unsubscribe_and_delete_reply_200_with_empty_body() -> None:
    async with running() as api:
        await api.import_([row("a@example.com"), row("b@example.com")])
        unsub = await api.unsubscribe("A@example.com")
        assert (unsub.status, unsub.body) == (200, None)
        deleted = await api.delete("b@example.com")
        assert (deleted.status, deleted.body) == (200, None)
        assert state_of(api, "a@example.com") == "Unsubscribed"
        assert state_of(api, "b@example.com") == "Deleted"


# import ---------------------------------------------------------------------------------------
async def test_import_limits() -> None:
    async with running() as api:
        over = await api.import_([row(f"u{i}@example.com") for i in range(1001)])
        assert (over.status, over.body["Code"]) == (400, 209)
        empty = await api.import_([])
        assert (empty.status, empty.body["Code"]) == (400, 212)
        exactly = await api.import_([row(f"u{i}@example.com") for i in range(1000)])
        assert exactly.status == 201
        assert exactly.body["TotalNewSubscribers"] == 1000


async def test_import_partial_failure_is_400_code_210_with_result_data() -> None:
    async with running() as api:
        await api.import_([row("b@example.com")])
        reply = await api.import_(
            [
                row("bad@example"),
                row("b@example.com"),
                row("c@example.com"),
                row("C@example.com", Name="C again"),
                row("long@example.com", CustomFields=[{"Key": "K", "Value": "y" * 251}]),
            ],
            QueueSubscriptionBasedAutoResponders=True,
        )
        assert reply.status == 400
        assert reply.body["Code"] == 210
        assert reply.body["Message"] == "Subscriber Import had some failures"
        data = reply.body["ResultData"]
        assert data["FailureDetails"] == [
            {"EmailAddress": "bad@example", "Code": 1, "Message": "Invalid Email Address"},
            {
                "EmailAddress": "long@example.com",
                "Code": 216,
                "Message": "Custom field value exceeds 250 characters",
            },
        ]
        assert data["TotalUniqueEmailsSubmitted"] == 4
        assert data["TotalExistingSubscribers"] == 1
        assert data["TotalNewSubscribers"] == 1
        assert data["DuplicateEmailsInSubmission"] == ["C@example.com"]
        assert api.sim.list_state(api.list_id)["c@example.com"]["Name"] == "C again"
        assert "long@example.com" not in api.sim.list_state(api.list_id)


async def test_exactly_250_characters_is_accepted() -> None:
    async with running() as api:
        reply = await api.import_(
            [row("a@example.com", CustomFields=[{"Key": "K", "Value": "z" * 250}])],
            QueueSubscriptionBasedAutoresponders=False,
        )
        assert reply.status == 201
        assert reply.body["FailureDetails"] == []
        assert fields_of(api, "a@example.com") == [("K", "z" * 250)]


async def test_custom_fields_merge_clear_and_multi_select() -> None:
    async with running() as api:
        await api.import_(
            [
                row(
                    "a@example.com",
                    CustomFields=[
                        {"Key": "City", "Value": "London"},
                        {"Key": "[Tier]", "Value": "gold"},
                        {"Key": "Tags", "Value": "x"},
                        {"Key": "Tags", "Value": "y"},
                    ],
                )
            ]
        )
        assert fields_of(api, "a@example.com") == [
            ("City", "London"),
            ("Tier", "gold"),
            ("Tags", "x"),
            ("Tags", "y"),
        ]
        await api.import_(
            [
                row(
                    "a@example.com",
                    CustomFields=[
                        {"Key": "Tier", "Value": "", "Clear": True},
                        {"Key": "City", "Value": ""},  # empty without Clear: unchanged
                        {"Key": "Tags", "Value": "z"},
                        {"Key": "Age", "Value": 42},
                    ],
                )
            ]
        )
        assert fields_of(api, "a@example.com") == [("City", "London"), ("Tags", "z"), ("Age", "42")]
        await api.add("a@example.com", CustomFields=[])  # no fields: all kept
        assert fields_of(api, "a@example.com") == [("City", "London"), ("Tags", "z"), ("Age", "42")]


# states, resubscribe, suppression -----------------------------------------------------------
async def test_listings_and_stats_follow_every_state() -> None:
    async with running() as api:
        emails = ["act@example.com", "uns@example.com", "bou@example.com", "del@example.com"]
        await api.import_([row(e) for e in emails])
        await api.unsubscribe("uns@example.com")
        await api.delete("del@example.com")
        api.sim.force_state(api.list_id, "bou@example.com", "Bounced")
        api.sim.force_state(api.list_id, "unc@example.com", "Unconfirmed", name="U")
        for state, email in [
            ("active", "act@example.com"),
            ("unsubscribed", "uns@example.com"),
            ("bounced", "bou@example.com"),
            ("deleted", "del@example.com"),
            ("unconfirmed", "unc@example.com"),
        ]:
            page = await api.members(state)
            assert page.status == 200
            assert [r["EmailAddress"] for r in page.body["Results"]] == [email]
            assert page.body["Results"][0]["State"] == state.capitalize()
        stats = await api.stats()
        assert stats["TotalActiveSubscribers"] == 1
        assert stats["TotalUnsubscribes"] == 1
        assert stats["TotalBounces"] == 1
        assert stats["TotalDeleted"] == 1
        assert stats["BouncesThisYear"] == 0


async def test_paging_parameters() -> None:
    async with running() as api:
        await api.import_([row(f"m{i:02d}@example.com", Name=f"{99 - i:02d}") for i in range(23)])
        for bad, code in [({"pagesize": "9"}, 801), ({"pagesize": "1001"}, 801)]:
            reply = await api.members("active", **bad)
            assert (reply.status, reply.body["Code"]) == (400, code)
        for bad, code in [
            ({"page": "0"}, 800),
            ({"orderfield": "colour"}, 802),
            ({"orderdirection": "up"}, 803),
            ({"date": "yesterday"}, 804),
        ]:
            reply = await api.members("active", **bad)
            assert (reply.status, reply.body["Code"]) == (400, code)
        last = await api.members("active", page="3", pagesize="10")
        assert last.body["RecordsOnThisPage"] == 3
        assert last.body["NumberOfPages"] == 3
        assert last.body["TotalNumberOfRecords"] == 23
        beyond = await api.members("active", page="9", pagesize="10")
        assert beyond.body["Results"] == []
        by_name = await api.members("active", orderfield="name", orderdirection="desc")
        assert by_name.body["ResultsOrderedBy"] == "name"
        assert by_name.body["OrderDirection"] == "desc"
        names = [r["Name"] for r in by_name.body["Results"]]
        assert names == sorted(names, reverse=True)
        future = await api.members("active", date="2999-01-01")
        assert future.body["TotalNumberOfRecords"] == 0
        past = await api.members("active", date="2000-01-01")
        assert past.body["TotalNumberOfRecords"] == 23


async def test_resubscribe_true_reactivates_false_leaves_inactive() -> None:
    async with running(unsubscribe_setting="OnlyThisList") as api:
        emails = ["u@example.com", "d@example.com", "b@example.com"]
        await api.import_([row(e) for e in emails])
        await api.unsubscribe("u@example.com")
        await api.delete("d@example.com")
        api.sim.force_state(api.list_id, "b@example.com", "Bounced")

        refused = await api.import_([row(e, Name="new name") for e in emails], resubscribe=False)
        assert refused.status == 201
        assert refused.body["TotalExistingSubscribers"] == 3
        assert refused.body["FailureDetails"] == []
        assert [state_of(api, e) for e in emails] == ["Unsubscribed", "Deleted", "Bounced"]
        assert api.sim.list_state(api.list_id)["u@example.com"]["Name"] == "N"
        single = await api.add("u@example.com", Resubscribe=False)
        assert single.status == 201
        assert state_of(api, "u@example.com") == "Unsubscribed"

        revived = await api.import_([row(e) for e in emails], resubscribe=True)
        assert revived.body["TotalExistingSubscribers"] == 3
        assert [state_of(api, e) for e in emails] == ["Active"] * 3


async def test_resubscribe_false_reported_as_failures_when_configured() -> None:
    config = SimulatorConfig(api_keys=(KEY,), resubscribe_false_reports="failure")
    async with running(config) as api:
        emails = ["u@example.com", "d@example.com", "b@example.com", "ok@example.com"]
        await api.import_([row(e) for e in emails])
        await api.unsubscribe("u@example.com")
        await api.delete("d@example.com")
        api.sim.force_state(api.list_id, "b@example.com", "Bounced")
        api.sim.force_state(api.list_id, "s@example.com", "Deleted", suppress=True)
        other = api.sim.add_list()
        api.sim.force_state(other, "sup@example.com", "Unsubscribed")  # suppressed client-wide

        reply = await api.import_([row(e) for e in [*emails, "sup@example.com"]], resubscribe=False)
        assert reply.status == 400
        data = reply.body["ResultData"]
        assert {(f["EmailAddress"], f["Code"]) for f in data["FailureDetails"]} == {
            ("u@example.com", 206),
            ("d@example.com", 205),
            ("b@example.com", 207),
            ("sup@example.com", 204),
        }
        assert data["TotalExistingSubscribers"] == 1
        assert data["TotalNewSubscribers"] == 0
        assert state_of(api, "sup@example.com") is None
        single = await api.add("b@example.com", Resubscribe=False)
        assert (single.status, single.body["Code"]) == (400, 207)


async def test_suppression_list_on_all_client_lists() -> None:
    async with running() as api:
        only = api.sim.add_list(unsubscribe_setting="OnlyThisList")
        second = api.sim.add_list()
        await api.import_([row("a@example.com"), row("b@example.com")])
        for list_id in (only, second):
            path = f"/subscribers/{list_id}/import.json"
            rows = [row("a@example.com"), row("b@example.com")]
            reply = await api.call("POST", path, json={"Subscribers": rows, "Resubscribe": True})
            assert reply.status == 201

        await api.unsubscribe("a@example.com")  # AllClientLists: suppressed, client-wide
        assert api.sim.suppressed(KEY) == {"a@example.com"}
        assert state_of(api, "a@example.com", second) == "Unsubscribed"
        assert state_of(api, "a@example.com", only) == "Unsubscribed"
        await api.unsubscribe("b@example.com", list_id=only)  # OnlyThisList: not suppressed
        assert api.sim.suppressed(KEY) == {"a@example.com"}
        assert state_of(api, "b@example.com") == "Active"
        assert api.sim.suppressed(OTHER) == set()

        third = api.sim.add_list()
        path = f"/subscribers/{third}/import.json"
        rows = [row("A@example.com"), row("c@example.com")]
        refused = await api.call("POST", path, json={"Subscribers": rows, "Resubscribe": False})
        assert refused.body["TotalExistingSubscribers"] == 1  # "existing" reporting (default)
        assert refused.body["TotalNewSubscribers"] == 1
        assert state_of(api, "a@example.com", third) is None
        allowed = await api.call("POST", path, json={"Subscribers": rows, "Resubscribe": True})
        assert allowed.body["TotalNewSubscribers"] == 1
        assert state_of(api, "a@example.com", third) == "Active"

        await api.delete("b@example.com")  # delete does not suppress
        assert "b@example.com" not in api.sim.suppressed(KEY)


# consent: date-filtered listings, suppression list, custom fields ----------------------------
#: 2030-01-02 03:04:00 UTC
T0 = 1893553440


def emails_of(reply: Reply) -> list[str]:
    return [r["EmailAddress"] for r in reply.body["Results"]]


async def test_each_state_change_stamps_the_date_a_date_filter_reads() -> None:
    wall = FakeClock(T0)
    async with running(wall=wall, unsubscribe_setting="OnlyThisList") as api:
        await api.import_([row(f"{n}@example.com") for n in ("a", "b", "c", "d")])
        wall.advance(60)  # 03:05
        await api.unsubscribe("b@example.com")
        wall.advance(60)  # 03:06
        api.sim.force_state(api.list_id, "d@example.com", "Unsubscribed")
        wall.advance(86_400)  # the next day, 03:06
        await api.unsubscribe("a@example.com")
        api.sim.force_state(api.list_id, "c@example.com", "Bounced")

        every = await api.members("unsubscribed", orderfield="date")
        assert emails_of(every) == ["b@example.com", "d@example.com", "a@example.com"]
        assert every.body["Results"][0]["Date"] == "2030-01-02 03:05:00"
        newest_first = await api.members("unsubscribed", orderfield="date", orderdirection="desc")
        assert emails_of(newest_first) == ["a@example.com", "d@example.com", "b@example.com"]
        since_minute = await api.members("unsubscribed", date="2030-01-02 03:06", orderfield="date")
        assert emails_of(since_minute) == ["d@example.com", "a@example.com"]
        assert since_minute.body["TotalNumberOfRecords"] == 2
        since_day = await api.members(
            "unsubscribed", date="2030-01-03", orderfield="date", orderdirection="desc"
        )
        assert emails_of(since_day) == ["a@example.com"]
        bounced = await api.members("bounced", date="2030-01-03 03:06")
        assert emails_of(bounced) == ["c@example.com"]
        assert (await api.members("bounced", date="2030-01-03 03:07")).body["Results"] == []

        wall.advance(60)
        await api.import_([row("b@example.com")], resubscribe=True)  # Active again: new Date
        active = await api.members("active", date="2030-01-03 03:07")
        assert emails_of(active) == ["b@example.com"]


async def test_suppression_list_pages_in_both_orders_with_dates_and_reasons() -> None:
    wall = FakeClock(T0)
    async with running(wall=wall) as api:
        await api.import_([row("Zed@example.com"), row("amy@example.com")])
        await api.unsubscribe("Zed@example.com")  # AllClientLists: suppressed, dated now
        wall.advance(3600)
        api.sim.force_state(api.list_id, "bob@example.com", "Bounced", suppress=True)
        wall.advance(3600)
        api.sim.suppress("cat@example.com")
        wall.advance(3600)
        api.sim.force_state(api.list_id, "Zed@example.com", "Unsubscribed", suppress=True)

        client_id = api.sim.client_id(KEY)
        path = f"/clients/{client_id}/suppressionlist.json"
        by_email = await api.call("GET", path)
        assert by_email.status == 200
        assert by_email.body["Results"] == [
            {
                "SuppressionReason": "Bounced",
                "EmailAddress": "bob@example.com",
                "Date": "2030-01-02 04:04:00",
                "State": "Suppressed",
            },
            {
                "SuppressionReason": "Suppressed",
                "EmailAddress": "cat@example.com",
                "Date": "2030-01-02 05:04:00",
                "State": "Suppressed",
            },
            {
                "SuppressionReason": "Unsubscribed",
                "EmailAddress": "Zed@example.com",  # as first seen; the first date stays
                "Date": "2030-01-02 03:04:00",
                "State": "Suppressed",
            },
        ]
        assert by_email.body["ResultsOrderedBy"] == "email"
        by_date = await api.call(
            "GET", path, params={"orderfield": "date", "orderdirection": "desc"}
        )
        assert emails_of(by_date) == ["cat@example.com", "bob@example.com", "Zed@example.com"]
        assert (by_date.body["ResultsOrderedBy"], by_date.body["OrderDirection"]) == (
            "date",
            "desc",
        )

        for n in range(20):
            api.sim.suppress(f"m{n:02d}@example.com")
        second = await api.call("GET", path, params={"page": "2", "pagesize": "10"})
        assert second.body["PageNumber"] == 2
        assert second.body["RecordsOnThisPage"] == 10
        assert second.body["TotalNumberOfRecords"] == 23
        assert second.body["NumberOfPages"] == 3
        assert emails_of(second)[0] == "m08@example.com"  # after bob, cat, m00..m07

        for bad, code in [({"orderfield": "name"}, 802), ({"pagesize": "5"}, 801)]:
            reply = await api.call("GET", path, params=bad)
            assert (reply.status, reply.body["Code"]) == (400, code)
        theirs = await api.call("GET", f"/clients/{api.sim.client_id(OTHER)}/suppressionlist.json")
        assert (theirs.status, theirs.body) == (400, {"Code": 102, "Message": "Invalid ClientID"})
        other_key = await api.call("GET", path, key=OTHER)
        assert other_key.body["Code"] == 102
        assert api.sim.suppressed(OTHER) == set()


async def test_client_ids_are_configurable_and_stable() -> None:
    config = SimulatorConfig(api_keys=(KEY, OTHER), invalid_list_status=401)
    async with running(config) as api:
        derived = api.sim.client_id(KEY)
        assert len(derived) == 32
        assert Simulator(SimulatorConfig(api_keys=(KEY,))).client_id() == derived
        chosen = "c" * 32
        api.sim.add_list(api_key=OTHER, client_id=chosen)
        assert api.sim.client_id(OTHER) == chosen
        with pytest.raises(ValueError, match="another client ID"):
            api.sim.add_list(api_key=OTHER, client_id="d" * 32)
        with pytest.raises(ValueError, match="another API key"):
            api.sim.add_list(api_key="third", client_id=chosen)
        wrong = await api.call("GET", f"/clients/{'e' * 32}/suppressionlist.json")
        assert (wrong.status, wrong.body["Code"]) == (401, 102)
        admin = await api.call("GET", f"/_sim/lists/{api.list_id}")
        assert admin.body["ClientID"] == derived


async def test_custom_fields_are_listed_and_created() -> None:
    fields = [
        CustomFieldSpec("city"),
        CustomFieldSpec("age", "Number", visible_in_preference_center=False),
        CustomFieldSpec("tier", "MultiSelectOne", ("gold", "silver")),
    ]
    async with running(custom_fields=fields) as api:
        path = f"/lists/{api.list_id}/customfields.json"
        listed = await api.call("GET", path)
        assert listed.status == 200
        assert listed.body[1] == {
            "FieldName": "age",
            "Key": "[age]",
            "DataType": "Number",
            "FieldOptions": [],
            "VisibleInPreferenceCenter": False,
        }
        assert listed.body[2]["FieldOptions"] == ["gold", "silver"]

        body = {
            "FieldName": "joined on",
            "DataType": "Date",
            "Options": [],
            "VisibleInPreferenceCenter": True,
        }
        created = await api.call("POST", path, json=body)
        assert (created.status, created.body) == (201, "[joinedon]")
        again = await api.call("POST", path, json=body)
        assert (again.status, again.body["Code"]) == (400, 255)
        for bad, code in [
            ({"FieldName": "x", "DataType": "Colour"}, 251),
            ({"FieldName": "x", "DataType": "MultiSelectMany", "Options": []}, 251),
            ({"FieldName": " ", "DataType": "Text"}, 250),
        ]:
            reply = await api.call("POST", path, json=bad)
            assert (reply.status, reply.body["Code"]) == (400, code)
        keys = [f["Key"] for f in (await api.call("GET", path)).body]
        assert keys == ["[city]", "[age]", "[tier]", "[joinedon]"]
        undeclared = api.sim.add_list()
        assert (await api.call("GET", f"/lists/{undeclared}/customfields.json")).body == []


async def test_a_list_with_declared_fields_ignores_unknown_keys_and_unfit_values() -> None:
    fields = [
        CustomFieldSpec("city"),
        CustomFieldSpec("age", "Number"),
        CustomFieldSpec("born", "Date"),
        CustomFieldSpec("tier", "MultiSelectOne", ("gold", "silver")),
        CustomFieldSpec("tags", "MultiSelectMany", ("a", "b")),
    ]
    async with running(custom_fields=fields) as api:
        good = [
            {"Key": "[city]", "Value": "Paris"},
            {"Key": "age", "Value": "42.5"},
            {"Key": "born", "Value": "1990/02/28"},
            {"Key": "tier", "Value": "silver"},
            {"Key": "tier", "Value": "gold"},
            {"Key": "tags", "Value": "a"},
            {"Key": "tags", "Value": "b"},
            {"Key": "shoe", "Value": "44"},
        ]
        reply = await api.import_([row("ada@example.com", CustomFields=good)])
        assert reply.status == 201  # an unknown key is no error
        assert fields_of(api, "ada@example.com") == [
            ("city", "Paris"),
            ("age", "42.5"),
            ("born", "1990/02/28"),
            ("tier", "gold"),
            ("tags", "a"),
            ("tags", "b"),
        ]
        unfit = [
            {"Key": "age", "Value": "forty"},
            {"Key": "born", "Value": "2090/01/01"},
            {"Key": "tier", "Value": "bronze"},
            {"Key": "tags", "Value": "c"},
        ]
        reply = await api.import_([row("ada@example.com", CustomFields=unfit)])
        assert reply.status == 201
        assert reply.body["FailureDetails"] == []
        assert fields_of(api, "ada@example.com")[1:4] == [
            ("age", "42.5"),
            ("born", "1990/02/28"),
            ("tier", "gold"),
        ]
        cleared = await api.import_(
            [row("ada@example.com", CustomFields=[{"Key": "age", "Value": "", "Clear": True}])]
        )
        assert cleared.status == 201
        assert "age" not in dict(fields_of(api, "ada@example.com"))


async def test_list_details_carry_the_settings() -> None:
    async with running(unsubscribe_setting="OnlyThisList", confirmed_opt_in=True) as api:
        details = await api.call("GET", f"/lists/{api.list_id}.json")
        assert details.body["UnsubscribeSetting"] == "OnlyThisList"
        assert details.body["ConfirmedOptIn"] is True


# rate limiting and the address throttle -----------------------------------------------------
async def test_rate_limit_headers_and_429() -> None:
    config = SimulatorConfig(api_keys=(KEY, OTHER), rate_limit_rps=2.0, rate_burst=2.0)
    async with running(config) as api:
        path = f"/lists/{api.list_id}/stats.json"
        first = await api.call("GET", path)
        assert first.status == 200
        assert first.headers["X-RateLimit-Limit"] == "2"
        assert first.headers["X-RateLimit-Remaining"] == "1"
        assert first.headers["X-RateLimit-Reset"] == "1"
        second = await api.call("GET", path)
        assert second.headers["X-RateLimit-Remaining"] == "0"
        third = await api.call("GET", path)
        assert (third.status, third.body) == (429, {"Code": 429, "Message": "Rate limit exceeded"})
        assert third.headers["X-RateLimit-Remaining"] == "0"
        assert third.headers["X-RateLimit-Reset"] == "1"
        assert "Retry-After" not in third.headers
        other = await api.call("GET", f"/lists/{api.sim.add_list(api_key=OTHER)}.json", key=OTHER)
        assert other.status == 200  # buckets are per API key
        api.clock.advance(0.5)
        fourth = await api.call("GET", path)
        assert fourth.status == 200
        api.clock.advance(10)
        full = await api.call("GET", path)
        assert full.headers["X-RateLimit-Remaining"] == "1"
        errors = await api.get("ghost@example.com")
        assert errors.status == 400
        assert "X-RateLimit-Limit" in errors.headers
        unauthenticated = await api.call("GET", path, key="nope")
        assert "X-RateLimit-Limit" not in unauthenticated.headers
        assert api.sim.request_counts()["list_stats"] == {"200": 4, "429": 1, "401": 1}


async def test_rate_headers_can_be_switched_off() -> None:
    config = SimulatorConfig(api_keys=(KEY,), rate_limit_rps=1.0, rate_headers=False)
    async with running(config) as api:
        path = f"/lists/{api.list_id}.json"
        assert "X-RateLimit-Limit" not in (await api.call("GET", path)).headers
        limited = await api.call("GET", path)
        assert limited.status == 429
        assert "X-RateLimit-Limit" not in limited.headers
        api.clock.advance(1.0)
        assert (await api.call("GET", path)).status == 200


async def test_per_address_throttle() -> None:
    config = SimulatorConfig(api_keys=(KEY,), per_address_throttle=AddressThrottle(2, 10.0))
    async with running(config) as api:
        assert (await api.add("hot@example.com")).status == 201
        assert (await api.import_([row("HOT@example.com")])).status == 201
        throttled = await api.add("hot@example.com", Name="third")
        assert throttled.status == 429
        assert throttled.body == {
            "Code": 429,
            "Message": "Subscriber was added too many times too quickly, try again later.",
        }
        assert "X-RateLimit-Limit" not in throttled.headers
        batch = await api.import_([row("cold@example.com"), row("hot@example.com")])
        assert batch.status == 429
        assert state_of(api, "cold@example.com") is None  # a throttled import applies nothing
        assert (await api.unsubscribe("hot@example.com")).status == 429
        assert (await api.add("cold@example.com")).status == 201
        api.clock.advance(10.5)
        assert (await api.unsubscribe("hot@example.com")).status == 200
        assert api.sim.list_state(api.list_id)["hot@example.com"]["Name"] == "N"  # not "third"


# faults ---------------------------------------------------------------------------------------
async def test_each_fault_kind() -> None:
    async with running() as api:
        path = f"/lists/{api.list_id}.json"
        api.sim.set_faults(FaultConfig(p_500=1.0))
        reply = await api.call("GET", path)
        assert (reply.status, reply.body["Code"]) == (500, 500)
        api.sim.set_faults(FaultConfig(p_503=1.0))
        reply = await api.call("GET", path)
        assert (reply.status, reply.body["Code"]) == (503, 503)
        api.sim.set_faults(FaultConfig(p_drop=1.0))
        with pytest.raises(aiohttp.ServerDisconnectedError):
            # POST: aiohttp's client retries an idempotent request (GET, DELETE) once after a
            # disconnect, which would count two drops here.
            await api.add("dropped@example.com")
        assert state_of(api, "dropped@example.com") is None
        api.sim.set_faults(FaultConfig(latency_s=0.25, p_latency=1.0))
        assert (await api.call("GET", path)).status == 200
        assert api.sleeps == [0.25]
        api.sim.set_faults(FaultConfig())
        assert (await api.call("GET", path)).status == 200
        assert api.sim.request_counts()["list_details"] == {"500": 1, "503": 1, "200": 2}
        assert api.sim.request_counts()["add"] == {"dropped": 1}


async def test_faults_are_reproducible_from_the_seed() -> None:
    async def statuses(seed: int) -> list[int]:
        faults = FaultConfig(p_500=0.2, p_503=0.3)
        config = SimulatorConfig(api_keys=(KEY,), seed=seed, faults=faults)
        async with running(config) as api:
            return [(await api.call("GET", f"/lists/{api.list_id}.json")).status for _ in range(30)]

    first = await statuses(7)
    assert first == await statuses(7)
    assert {500, 503, 200} <= set(first)
    assert first != await statuses(8)


async def test_script_then_normal() -> None:
    config = SimulatorConfig(api_keys=(KEY,), faults=FaultConfig(script=[503, 429, 200, 0]))
    async with running(config) as api:
        path = f"/lists/{api.list_id}.json"
        first = await api.call("GET", path)
        assert (first.status, first.body["Code"]) == (503, 503)
        second = await api.call("GET", path)
        assert second.body == {"Code": 429, "Message": "Rate limit exceeded"}
        assert (await api.call("GET", path)).status == 200
        with pytest.raises(aiohttp.ServerDisconnectedError):
            await api.add("a@example.com")  # POST: not retried by the client (see above)
        assert (await api.add("a@example.com")).status == 201
        assert api.sim.faults.script == []


async def test_outage_through_the_admin_api_spares_admin_paths() -> None:
    async with running() as api:
        path = f"/lists/{api.list_id}.json"
        on = await api.call("POST", "/_sim/faults", json={"outage": True})
        assert on.body["outage"] is True
        for _ in range(3):
            reply = await api.call("GET", path)
            assert (reply.status, reply.body["Code"]) == (503, 503)
        assert (await api.call("GET", "/_sim/stats")).status == 200
        assert (await api.call("GET", f"/_sim/lists/{api.list_id}")).status == 200
        await api.call("POST", "/_sim/faults", json={"outage": False})
        assert (await api.call("GET", path)).status == 200


# admin API --------------------------------------------------------------------------------------
async def test_admin_api() -> None:
    async with running() as api:
        created = await api.call(
            "POST",
            "/_sim/lists",
            json={"title": "Admin", "unsubscribe_setting": "OnlyThisList", "api_key": OTHER},
        )
        assert created.status == 201
        new_id = created.body["ListID"]
        assert len(new_id) == 32
        fixed = await api.call("POST", "/_sim/lists", json={"list_id": "a" * 32})
        assert fixed.body == {"ListID": "a" * 32}
        duplicate = await api.call("POST", "/_sim/lists", json={"list_id": "a" * 32})
        assert (duplicate.status, duplicate.body["Code"]) == (400, 400)
        bad = await api.call("POST", "/_sim/lists", json={"unsubscribe_setting": "Never"})
        assert bad.status == 400

        add = await api.call(
            "POST",
            f"/subscribers/{new_id}.json",
            key=OTHER,
            json={"EmailAddress": "x@example.com", "Name": "X", "ConsentToTrack": "No"},
        )
        assert add.status == 201
        forced = await api.call(
            "POST",
            f"/_sim/lists/{new_id}/state",
            json={"email": "X@example.com", "state": "Bounced"},
        )
        assert forced.body["State"] == "Bounced"
        bad_state = await api.call(
            "POST", f"/_sim/lists/{new_id}/state", json={"email": "x@example.com", "state": "Gone"}
        )
        assert bad_state.status == 400

        full = await api.call("GET", f"/_sim/lists/{new_id}")
        assert full.body["Title"] == "Admin"
        assert full.body["UnsubscribeSetting"] == "OnlyThisList"
        assert full.body["Subscribers"]["x@example.com"]["Name"] == "X"
        assert full.body["Subscribers"]["x@example.com"]["State"] == "Bounced"
        assert full.body["Subscribers"]["x@example.com"]["ConsentToTrack"] == "No"
        assert full.body["Stats"]["TotalBounces"] == 1
        assert (await api.call("GET", f"/_sim/lists/{'b' * 32}")).status == 404
        listed = await api.call("GET", "/_sim/lists")
        assert {entry["ListID"] for entry in listed.body["Lists"]} == {
            api.list_id,
            new_id,
            "a" * 32,
        }

        faults = await api.call("POST", "/_sim/faults", json={"p_503": 0.5, "script": [500]})
        assert faults.body["p_503"] == 0.5
        assert faults.body["script"] == [500]
        partial = await api.call("POST", "/_sim/faults", json={"p_500": 0.1, "seed": 3})
        assert (partial.body["p_503"], partial.body["p_500"]) == (0.5, 0.1)
        invalid = await api.call("POST", "/_sim/faults", json={"p_500": 2})
        assert (invalid.status, invalid.body["Code"]) == (400, 400)
        unknown = await api.call("POST", "/_sim/faults", json={"p_teapot": 1})
        assert unknown.status == 400
        await api.call("POST", "/_sim/faults", json={"p_503": 0, "p_500": 0, "script": []})

        stats = await api.call("GET", "/_sim/stats")
        assert stats.body["requests"]["add"] == {"201": 1}
        assert len(stats.body["timestamps"][OTHER]) == 1
        assert stats.body["timestamps"][OTHER][0] == api.clock.now
        assert (await api.call("POST", "/_sim/reset-stats")).status == 200
        assert (await api.call("GET", "/_sim/stats")).body["requests"] == {}
        assert (await api.call("GET", "/_sim/nothing")).status == 404


async def test_request_timestamps_are_bounded_and_per_key() -> None:
    config = SimulatorConfig(api_keys=(KEY, OTHER), timestamps_kept=5)
    async with running(config) as api:
        for _ in range(8):
            api.clock.advance(0.1)
            await api.call("GET", f"/lists/{api.list_id}.json")
        await api.call("GET", f"/lists/{api.list_id}.json", key="bad")
        times = api.sim.request_times(KEY)
        assert len(times) == 5
        assert times == sorted(times)
        assert times[-1] == api.clock.now
        assert api.sim.request_times(OTHER) == []


# command line ---------------------------------------------------------------------------------
def test_cli_help_names_the_uncertain_settings(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "UNCERTAIN" in out
    assert "--resubscribe-false-reports" in out
    assert "existing" in out
    assert "--invalid-list-status" in out
    assert "--custom-field" in out
    assert "CLIENTID" in out
    assert "Code 102" in out


def test_cli_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["--invalid-list-status", "404"]) == 2
    assert cli_main(["--list", "not-a-list-id"]) == 2
    assert cli_main(["--list", "0" * 32 + ":test-key:not-a-client-id"]) == 2
    assert cli_main(["--custom-field", "tier:MultiSelectOne"]) == 2  # options needed
    assert cli_main(["--custom-field", "x:Colour"]) == 2
    assert cli_main(["--address-throttle", "three"]) == 2
    assert cli_main(["--p-500", "0.8", "--p-503", "0.8"]) == 2
    assert "error" in capsys.readouterr().err


def test_cli_serves_until_sigterm() -> None:
    list_id = "0123456789abcdef0123456789abcdef"
    proc = subprocess.Popen(  # noqa: S603  # fixed argv: this interpreter, this package
        [sys.executable, "-m", "consumer", "simulator", "--api-key", "k1", "--list", list_id],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONWARNINGS": "error"},
    )
    try:
        assert proc.stdout is not None
        base_url = proc.stdout.readline().strip()
        assert base_url.startswith("http://127.0.0.1:")
        assert base_url.endswith("/api/v3.3")

        async def fetch() -> int:
            async with (
                aiohttp.ClientSession() as session,
                session.get(
                    f"{base_url}/lists/{list_id}.json", headers={"Authorization": basic("k1")}
                ) as resp,
            ):
                return resp.status

        assert asyncio.run(fetch()) == 200
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()
