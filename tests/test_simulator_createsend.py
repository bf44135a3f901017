"""Fidelity: the official `createsend` client (9.1.4) drives the simulator over real HTTPS.

The client is used as shipped: its `VerifiedHTTPSConnection`, its request building, its
response handling and exceptions. Two things are pointed elsewhere: `CreateSend.base_uri` (the
simulator's URL) and the CA bundle it loads from next to `createsend/utils.py` (a trustme CA,
found by moving that module's `__file__` into a temporary folder that holds `cacert.pem`).
"""

from __future__ import annotations

import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import createsend
import createsend.createsend
import createsend.utils
import pytest
import trustme
from createsend import (
    BadRequest,
    Client,
    ClientError,
    List,
    ServerError,
    Subscriber,
    Unauthorized,
)

from consumer.devtools.simulator import CustomFieldSpec, FaultConfig, Simulator, SimulatorConfig
from tests.simulator_fixtures import FakeClock, SimulatorThread

API_KEY = "cs-test-key"
TOKEN = "ASP95S4aR+9KsgfHB0dapTYxNA=="
AUTH = {"api_key": API_KEY}
#: 2030-01-02 03:04:00 UTC: the simulator's wall clock starts here (dates shown to clients).
T0 = 1893553440


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def wall() -> FakeClock:
    return FakeClock(T0)


@pytest.fixture
def sim(wall: FakeClock) -> Simulator:
    return Simulator(
        SimulatorConfig(api_keys=(API_KEY, "other-key"), oauth_tokens=(TOKEN,)), wall_clock=wall
    )


@pytest.fixture
def list_id(sim: Simulator) -> str:
    return sim.add_list(title="Fidelity list")


@pytest.fixture
def cs(
    sim: Simulator, ca: trustme.CA, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Simulator]:
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost").configure_cert(server_ctx)
    ca.cert_pem.write_to_path(str(tmp_path / "cacert.pem"))
    monkeypatch.setattr(createsend.utils, "__file__", str(tmp_path / "utils.py"))
    with SimulatorThread(sim, ssl_context=server_ctx) as base_url:
        url = base_url.replace("127.0.0.1", "localhost")
        monkeypatch.setattr(createsend.createsend.CreateSend, "base_uri", url)
        yield sim


def _rows(*emails: str) -> list[dict[str, Any]]:
    return [{"EmailAddress": e, "Name": f"Name {i}"} for i, e in enumerate(emails)]


def test_add_then_get_returns_the_fixture_shape(cs: Simulator, list_id: str) -> None:
    fields = [
        {"Key": "website", "Value": "http://example.com"},
        {"Key": "colours", "Value": "red"},
        {"Key": "colours", "Value": "blue"},
    ]
    email = Subscriber(AUTH).add(list_id, "Ada@Example.com", "Ada", fields, True, "Yes")
    assert email == "Ada@Example.com"

    sub = Subscriber(AUTH).get(list_id, "ada@example.com", include_tracking_preference=True)
    assert sub.EmailAddress == "Ada@Example.com"
    assert sub.Name == "Ada"
    assert sub.State == "Active"
    assert sub.ConsentToTrack == "Yes"
    assert sub.ReadsEmailWith == ""
    assert [(f.Key, f.Value) for f in sub.CustomFields] == [
        ("website", "http://example.com"),
        ("colours", "red"),
        ("colours", "blue"),
    ]
    for date in (sub.Date, sub.ListJoinedDate, sub.StateChangedDate):
        assert len(date) == 19
        assert date[4] == "-"
        assert date[13] == ":"

    plain = Subscriber(AUTH).get(list_id, "ada@example.com")
    assert not hasattr(plain, "ConsentToTrack")


def test_add_rejects_an_invalid_address_with_code_1(cs: Simulator, list_id: str) -> None:
    with pytest.raises(BadRequest) as err:
        Subscriber(AUTH).add(list_id, "not-an-address", "X", [], True, "Unchanged")
    assert err.value.data.Code == 1


def test_import_full_success(cs: Simulator, list_id: str) -> None:
    rows = _rows("example+1@example.com", "example+2@example.com", "example+3@example.com")
    result = Subscriber(AUTH).import_subscribers(list_id, rows, True)
    assert result.FailureDetails == []
    assert result.TotalUniqueEmailsSubmitted == 3
    assert result.TotalExistingSubscribers == 0
    assert result.TotalNewSubscribers == 3
    assert result.DuplicateEmailsInSubmission == []
    assert len(cs.list_state(list_id)) == 3


def test_import_partial_success_is_returned_as_a_result(cs: Simulator, list_id: str) -> None:
    Subscriber(AUTH).import_subscribers(
        list_id, _rows("example+2@example.com", "example+3@example.com"), True
    )
    rows = _rows("example+1@example", "example+2@example.com", "example+3@example.com")
    result = Subscriber(AUTH).import_subscribers(list_id, rows, True)
    assert len(result.FailureDetails) == 1
    assert result.FailureDetails[0].EmailAddress == "example+1@example"
    assert result.FailureDetails[0].Code == 1
    assert result.FailureDetails[0].Message == "Invalid Email Address"
    assert result.TotalUniqueEmailsSubmitted == 3
    assert result.TotalExistingSubscribers == 2
    assert result.TotalNewSubscribers == 0
    assert result.DuplicateEmailsInSubmission == []


def test_import_of_an_empty_batch_raises_bad_request_212(cs: Simulator, list_id: str) -> None:
    with pytest.raises(BadRequest) as err:
        Subscriber(AUTH).import_subscribers(list_id, [], True)
    assert err.value.data.Code == 212


def test_unsubscribe_and_delete_change_the_state(cs: Simulator, list_id: str) -> None:
    Subscriber(AUTH).import_subscribers(list_id, _rows("a@example.com", "b@example.com"), True)
    assert Subscriber(AUTH, list_id, "A@example.com").unsubscribe() is None
    assert Subscriber(AUTH, list_id, "b@example.com").delete() is None
    assert Subscriber(AUTH).get(list_id, "a@example.com").State == "Unsubscribed"
    assert Subscriber(AUTH).get(list_id, "b@example.com").State == "Deleted"


def test_unknown_address_raises_bad_request_203(cs: Simulator, list_id: str) -> None:
    with pytest.raises(BadRequest) as err:
        Subscriber(AUTH).get(list_id, "nobody@example.com")
    assert type(err.value) is BadRequest
    assert err.value.data.Code == 203
    assert err.value.data.Message == "Subscriber not in list or has already been removed."
    with pytest.raises(BadRequest) as err:
        Subscriber(AUTH, list_id, "nobody@example.com").unsubscribe()
    assert err.value.data.Code == 203
    with pytest.raises(BadRequest) as err:
        Subscriber(AUTH, list_id, "nobody@example.com").delete()
    assert err.value.data.Code == 203


def test_list_details_and_stats(cs: Simulator, list_id: str) -> None:
    Subscriber(AUTH).import_subscribers(
        list_id, _rows("a@example.com", "b@example.com", "c@example.com", "d@example.com"), True
    )
    Subscriber(AUTH, list_id, "a@example.com").unsubscribe()
    Subscriber(AUTH, list_id, "b@example.com").delete()
    cs.force_state(list_id, "c@example.com", "Bounced")

    details = List(AUTH, list_id).details()
    assert details.ListID == list_id
    assert details.Title == "Fidelity list"
    assert details.UnsubscribeSetting == "AllClientLists"
    assert details.ConfirmedOptIn is False

    stats = List(AUTH, list_id).stats()
    assert stats.TotalActiveSubscribers == 1
    assert stats.TotalUnsubscribes == 1
    assert stats.TotalDeleted == 1
    assert stats.TotalBounces == 1
    assert stats.NewActiveSubscribersToday == 0


def test_paged_active_members(cs: Simulator, list_id: str) -> None:
    emails = [f"member{i:02d}@example.com" for i in range(25)]
    Subscriber(AUTH).import_subscribers(list_id, _rows(*emails), True)
    Subscriber(AUTH, list_id, "member03@example.com").unsubscribe()

    seen: list[str] = []
    page = 1
    while True:
        result = List(AUTH, list_id).active(page=page, page_size=10)
        assert result.ResultsOrderedBy == "email"
        assert result.OrderDirection == "asc"
        assert result.PageNumber == page
        assert result.PageSize == 10
        assert result.TotalNumberOfRecords == 24
        assert result.NumberOfPages == 3
        assert result.RecordsOnThisPage == len(result.Results)
        assert all(r.State == "Active" for r in result.Results)
        seen += [r.EmailAddress for r in result.Results]
        if page >= result.NumberOfPages:
            break
        page += 1
    assert seen == sorted(set(emails) - {"member03@example.com"})

    unsubscribed = List(AUTH, list_id).unsubscribed()
    assert [r.EmailAddress for r in unsubscribed.Results] == ["member03@example.com"]

    with pytest.raises(BadRequest) as err:
        List(AUTH, list_id).active(page_size=5)
    assert err.value.data.Code == 801


def test_authentication_errors(cs: Simulator, list_id: str) -> None:
    with pytest.raises(Unauthorized) as err:
        List({"api_key": "wrong"}, list_id).details()
    assert err.value.data.Code == 100
    token = {"access_token": TOKEN, "refresh_token": "r"}
    assert List(token, list_id).details().ListID == list_id
    with pytest.raises(Unauthorized) as err:
        List({"access_token": "bogus", "refresh_token": "r"}, list_id).details()
    assert err.value.data.Code == 120
    with pytest.raises(BadRequest) as err:
        List({"api_key": "other-key"}, list_id).details()
    assert err.value.data.Code == 101


def test_rate_limit_and_server_errors_carry_json_bodies(cs: Simulator, list_id: str) -> None:
    cs.set_faults(FaultConfig(script=[429, 503, 500]))
    with pytest.raises(ClientError, match="Code: 429 Rate limit exceeded"):
        List(AUTH, list_id).stats()
    with pytest.raises(ServerError, match="Code: 503"):
        List(AUTH, list_id).stats()
    with pytest.raises(ServerError, match="Code: 500"):
        List(AUTH, list_id).stats()
    assert List(AUTH, list_id).stats().TotalActiveSubscribers == 0


# consent, list settings and reconciliation ---------------------------------------------------


def test_suppression_list_pages_in_both_orders(cs: Simulator, wall: FakeClock) -> None:
    list_id = cs.add_list(title="All client lists")
    Subscriber(AUTH).import_subscribers(list_id, _rows("u@example.com"), True)
    Subscriber(AUTH, list_id, "u@example.com").unsubscribe()  # AllClientLists: suppressed
    for n in range(11):
        wall.advance(60)
        cs.force_state(list_id, f"b{n:02d}@example.com", "Bounced", suppress=True)
    client = Client(AUTH, cs.client_id(API_KEY))

    first = client.suppressionlist(page=1, page_size=10)
    assert first.ResultsOrderedBy == "email"
    assert first.OrderDirection == "asc"
    assert (first.PageNumber, first.PageSize, first.RecordsOnThisPage) == (1, 10, 10)
    assert (first.TotalNumberOfRecords, first.NumberOfPages) == (12, 2)
    row = first.Results[0]
    assert (row.EmailAddress, row.SuppressionReason, row.State) == (
        "b00@example.com",
        "Bounced",
        "Suppressed",
    )
    assert row.Date == "2030-01-02 03:05:00"
    second = client.suppressionlist(page=2, page_size=10)
    assert [r.EmailAddress for r in second.Results] == ["b10@example.com", "u@example.com"]
    assert second.Results[1].SuppressionReason == "Unsubscribed"

    newest = client.suppressionlist(order_field="date", order_direction="desc")
    assert newest.ResultsOrderedBy == "date"
    assert newest.OrderDirection == "desc"
    emails = [r.EmailAddress for r in newest.Results]
    assert emails == [f"b{n:02d}@example.com" for n in reversed(range(11))] + ["u@example.com"]
    oldest = client.suppressionlist(order_field="date", order_direction="asc")
    assert [r.EmailAddress for r in oldest.Results] == list(reversed(emails))

    with pytest.raises(BadRequest) as err:
        Client({"api_key": "other-key"}, cs.client_id(API_KEY)).suppressionlist()
    assert err.value.data.Code == 102


def test_custom_fields_get_and_create(cs: Simulator) -> None:
    list_id = cs.add_list(
        custom_fields=[
            CustomFieldSpec("website"),
            CustomFieldSpec("newsletterformat", "MultiSelectOne", ("HTML", "Text")),
        ]
    )
    key = List(AUTH, list_id).create_custom_field("new date field", "Date")
    assert key == "[newdatefield]"
    tier = List(AUTH, list_id).create_custom_field(
        "tier", "MultiSelectMany", ["gold", "silver"], visible_in_preference_center=False
    )
    assert tier == "[tier]"

    fields = List(AUTH, list_id).custom_fields()
    assert [(f.FieldName, f.Key, f.DataType) for f in fields] == [
        ("website", "[website]", "Text"),
        ("newsletterformat", "[newsletterformat]", "MultiSelectOne"),
        ("new date field", "[newdatefield]", "Date"),
        ("tier", "[tier]", "MultiSelectMany"),
    ]
    assert fields[1].FieldOptions == ["HTML", "Text"]
    assert fields[0].FieldOptions == []
    assert fields[0].VisibleInPreferenceCenter is True
    assert fields[3].VisibleInPreferenceCenter is False

    with pytest.raises(BadRequest) as err:
        List(AUTH, list_id).create_custom_field("website", "Text")
    assert err.value.data.Code == 255
    with pytest.raises(BadRequest) as err:
        List(AUTH, list_id).create_custom_field("colour", "Colour")
    assert err.value.data.Code == 251


def test_list_details_carry_the_unsubscribe_setting_and_confirmed_opt_in(cs: Simulator) -> None:
    list_id = cs.add_list(unsubscribe_setting="OnlyThisList", confirmed_opt_in=True)
    details = List(AUTH, list_id).details()
    assert details.UnsubscribeSetting == "OnlyThisList"
    assert details.ConfirmedOptIn is True


def test_unsubscribed_and_bounced_since_a_date(cs: Simulator, wall: FakeClock) -> None:
    list_id = cs.add_list(unsubscribe_setting="OnlyThisList")
    emails = [f"m{n}@example.com" for n in range(6)]
    Subscriber(AUTH).import_subscribers(list_id, _rows(*emails), True)
    wall.advance(60)  # 03:05
    Subscriber(AUTH, list_id, "m0@example.com").unsubscribe()
    cs.force_state(list_id, "m1@example.com", "Bounced")
    wall.advance(60)  # 03:06
    Subscriber(AUTH, list_id, "m2@example.com").unsubscribe()
    wall.advance(86_400)  # 2030-01-03 03:06
    Subscriber(AUTH, list_id, "m3@example.com").unsubscribe()
    cs.force_state(list_id, "m4@example.com", "Bounced")

    lst = List(AUTH, list_id)
    since = lst.unsubscribed(date="2030-01-02 03:06", order_field="date")
    assert [r.EmailAddress for r in since.Results] == ["m2@example.com", "m3@example.com"]
    assert since.ResultsOrderedBy == "date"
    assert since.TotalNumberOfRecords == 2
    assert since.Results[0].Date == "2030-01-02 03:06:00"
    assert since.Results[0].State == "Unsubscribed"
    desc = lst.unsubscribed(date="2030-01-02", order_field="date", order_direction="desc")
    assert [r.EmailAddress for r in desc.Results] == [
        "m3@example.com",
        "m2@example.com",
        "m0@example.com",
    ]
    paged = lst.unsubscribed(date="2030-01-02", page=2, page_size=10, order_field="date")
    assert (paged.PageNumber, paged.RecordsOnThisPage, paged.NumberOfPages) == (2, 0, 1)
    bounced = lst.bounced(date="2030-01-03", order_field="date")
    assert [r.EmailAddress for r in bounced.Results] == ["m4@example.com"]
    assert lst.bounced(date="2030-01-03 03:07").Results == []
    assert lst.bounced(date="2030-01-02 03:05").TotalNumberOfRecords == 2
