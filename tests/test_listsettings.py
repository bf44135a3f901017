"""List settings: what they mean for a destination (pure), what the service does with them
against the simulator over real HTTP (holds, warnings, coerced values), and
`cmsync check-config --online`."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import structlog

from consumer import observability as obs
from consumer.campaign_monitor.client import RequestInvalid
from consumer.checkconfig import cli_main
from consumer.destinations import Destination
from consumer.devtools.rig import load_destinations
from consumer.devtools.simulator import CustomFieldSpec, Simulator, SimulatorConfig
from consumer.fieldtypes import FieldType, Unfit, field_types
from consumer.listsettings import ListCheck, check_list, read_list_check
from consumer.rows import build_row
from tests.harness import Dest, SyncHarness, event, headers_of, running
from tests.simulator_fixtures import SimulatorThread

LIST_ID = "0123456789abcdef0123456789abcdef"
KEY = "list-settings-key-5e4d3c2b1a"


def destination(extra: str = "", fields: str = 'City = "city"\n') -> Destination:
    toml = f"""[[destination]]
name = "news"
segment_id = "seg"
list_id = "{LIST_ID}"
email_field = "email"
{extra}
[destination.custom_fields]
{fields}"""
    return load_destinations(toml, KEY)[0]


def details(setting: str = "OnlyThisList", *, confirmed: bool = False) -> dict[str, Any]:
    return {"ListID": LIST_ID, "UnsubscribeSetting": setting, "ConfirmedOptIn": confirmed}


CITY = [{"Key": "[City]", "DataType": "Text", "FieldName": "City"}]

# ------------------------------------------------------------------------ check_list (pure)


def test_unsubscribe_on_an_all_client_lists_list_is_held_unless_accepted() -> None:
    unsubscribing = destination('removal = "unsubscribe"\n')
    held = check_list(unsubscribing, details("AllClientLists"), CITY)
    assert held.held_reason == (
        f'list {LIST_ID} has UnsubscribeSetting AllClientLists, so removal = "unsubscribe" '
        "would unsubscribe each removed member from every list of the client; use removal = "
        '"delete", or set unsubscribe_all_client_lists = true to accept that'
    )
    assert held.unsubscribe_setting == "AllClientLists"
    accepted = destination('removal = "unsubscribe"\nunsubscribe_all_client_lists = true\n')
    assert check_list(accepted, details("AllClientLists"), CITY).held_reason is None
    assert check_list(unsubscribing, details("OnlyThisList"), CITY).held_reason is None
    deleting = destination()  # a delete touches this list only
    assert check_list(deleting, details("AllClientLists"), CITY).held_reason is None


def test_confirmed_opt_in_is_a_warning() -> None:
    check = check_list(destination(), details(confirmed=True), CITY)
    assert check.held_reason is None
    assert check.warnings == (
        f"list {LIST_ID} is ConfirmedOptIn: adds send confirmation emails and stay Unconfirmed "
        "until the person confirms",
    )
    assert check.confirmed_opt_in is True


def test_mapped_keys_the_list_lacks_hold_the_destination() -> None:
    dest = destination(fields='city = "city"\n"[Tier]" = "tier"\nShoe = "shoe"\n')
    check = check_list(dest, details(), CITY)  # "city" is the list's "[City]"
    assert check.held_reason == (
        f'list {LIST_ID} has no custom field "[Tier]", "Shoe" (mapped in custom_fields; '
        "Campaign Monitor would drop the values): create the field in the list or remove the "
        "mapping"
    )
    assert check.types == field_types(CITY)


def test_a_listing_that_cannot_be_typed_sends_values_as_they_are() -> None:
    listing = [*CITY, {"Key": "[Mood]", "DataType": "Emoji"}]
    check = check_list(destination(), details(), listing)
    assert check.types is None
    assert check.held_reason is None
    [warning] = check.warnings
    assert "cannot be typed" in warning
    assert "sent as they are" in warning
    # the keys are still checked
    other = destination(fields='Shoe = "shoe"\n')
    assert 'no custom field "Shoe"' in (check_list(other, details(), listing).held_reason or "")


class FakeReader:
    def __init__(self, refuse: bool = False) -> None:
        self.asked: list[str] = []
        self.refuse = refuse

    async def list_details(self, list_id: str, *, destination: str) -> dict[str, Any]:
        self.asked.append("details")
        if self.refuse:
            raise RequestInvalid("refused", status=400, code=999, endpoint="list_details")
        return details()

    async def custom_fields(self, list_id: str, *, destination: str) -> list[dict[str, Any]]:
        self.asked.append("custom_fields")
        return CITY


async def test_read_list_check_reads_custom_fields_only_when_some_are_mapped() -> None:
    reader = FakeReader()
    check = await read_list_check(reader, destination())
    assert reader.asked == ["details", "custom_fields"]
    assert check.types == field_types(CITY)
    reader = FakeReader()
    check = await read_list_check(reader, destination(fields=""))
    assert reader.asked == ["details"]
    assert check == ListCheck(unsubscribe_setting="OnlyThisList", confirmed_opt_in=False)


async def test_a_refused_read_holds_the_destination_with_its_code() -> None:
    check = await read_list_check(FakeReader(refuse=True), destination())
    assert check.held_reason == (
        "Campaign Monitor refused to read the list settings (HTTP 400, code 999)"
    )


# ------------------------------------------------------------------------ rows (pure)

TYPES = field_types(
    [
        {"Key": "[Birthday]", "DataType": "Date"},
        {"Key": "[Age]", "DataType": "Number"},
        {"Key": "[Tier]", "DataType": "MultiSelectOne", "FieldOptions": ["Gold", "Silver"]},
        {"Key": "[Topics]", "DataType": "MultiSelectMany", "FieldOptions": ["News", "Offers"]},
    ]
)


def test_rows_carry_coerced_values_under_the_lists_spelling_of_the_key() -> None:
    dest = destination(
        fields='birthday = "born"\nAGE = "age"\nTier = "tier"\nTopics = "topics"\n',
    )
    profile: dict[str, Any] = {
        "born": "1990-05-01T00:30:00+02:00",
        "age": 42,
        "tier": " gold ",
        "topics": ["offers", "NEWS"],
    }
    row = build_row(dest, "ada@example.com", profile, TYPES)
    assert not isinstance(row, Unfit)
    assert [(f.key, f.value, f.clear) for f in row.custom_fields] == [
        ("Birthday", "1990/05/01", False),
        ("Age", "42", False),
        ("Tier", "Gold", False),
        ("Topics", "Offers", False),
        ("Topics", "News", False),
    ]
    cleared = build_row(dest, "ada@example.com", {"born": None, "topics": []}, TYPES)
    assert not isinstance(cleared, Unfit)
    assert [(f.key, f.clear) for f in cleared.custom_fields] == [
        ("Birthday", True),
        ("Topics", True),
    ]
    unfit = build_row(dest, "ada@example.com", {"born": "1815-12-10", "age": 1}, TYPES)
    assert isinstance(unfit, Unfit)
    assert unfit.reason.startswith('Date field "Birthday" takes a date')
    assert "1815" not in unfit.reason
    # without types: as before (values in their text form, keys as mapped)
    untyped = build_row(dest, "ada@example.com", {"age": 42, "tier": " gold "})
    assert not isinstance(untyped, Unfit)
    assert [(f.key, f.value) for f in untyped.custom_fields] == [("AGE", "42"), ("Tier", " gold ")]
    assert FieldType("Age", "Number") in TYPES.values()


# ------------------------------------------------------------------------ the service

T0 = 1_764_417_600_000


def up(name: str) -> float | None:
    return obs.REGISTRY.get_sample_value("cmsync_destination_up", {"destination": name})


async def until(condition: Callable[[], bool], what: str, within_s: float = 30.0) -> None:
    deadline = time.monotonic() + within_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"never happened: {what}")
        await asyncio.sleep(0.05)


async def test_held_destinations_send_nothing_while_the_others_go_on(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    dests = [
        Dest("acl-held", "seg-a", removal="unsubscribe", unsubscribe_setting="AllClientLists"),
        Dest(
            "acl-accepted",
            "seg-a",
            removal="unsubscribe",
            unsubscribe_setting="AllClientLists",
            unsubscribe_all_client_lists=True,
        ),
        Dest("key-missing", "seg-a", fields=(CustomFieldSpec("Town"),)),  # maps City
        Dest("opt-in", "seg-a", confirmed_opt_in=True),
    ]
    async with SyncHarness(kafka_bootstrap, tmp_path, dests) as h:
        with structlog.testing.capture_logs() as logs:
            async with running(h):
                await h.produce([event("ada@example.com", at_ms=T0)])
                await until(lambda: h.active("acl-accepted") == {"ada@example.com"}, "synced")
                await until(lambda: h.active("opt-in") == {"ada@example.com"}, "synced")
                await until(lambda: up("key-missing") == 0 and up("acl-held") == 0, "held")
                assert h.members("acl-held") == {}
                assert h.members("key-missing") == {}
                assert up("acl-accepted") == 1
                assert up("opt-in") == 1
    held = {entry["destination"]: entry for entry in logs if entry["event"] == "destination_held"}
    assert set(held) == {"acl-held", "key-missing"}  # one line each
    assert "UnsubscribeSetting AllClientLists" in held["acl-held"]["reason"]
    assert held["key-missing"]["reason"].endswith(
        'has no custom field "City" (mapped in custom_fields; Campaign Monitor would drop the '
        "values): create the field in the list or remove the mapping"
    )
    warnings = [entry for entry in logs if entry["event"] == "list_settings_warning"]
    assert [(w["destination"], "ConfirmedOptIn" in w["warning"]) for w in warnings] == [
        ("opt-in", True)
    ]
    assert all("ada" not in str(entry) for entry in logs if entry["event"] != "flush")


async def test_values_are_coerced_to_the_lists_field_types_in_a_real_flush(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    """Against a list with declared fields (which would drop what they cannot hold): a Date
    written YYYY/MM/DD, a Number, multi-select options case-corrected; a value that fits no
    field is dead-lettered with its reason and the rest of the import applies."""
    dest = Dest(
        "typed",
        "seg-a",
        custom_fields={
            "city": "city",
            "Birthday": "birthday",
            "Age": "age",
            "Tier": "tier",
            "Topics": "topics",
        },
        fields=(
            CustomFieldSpec("City"),
            CustomFieldSpec("Birthday", "Date"),
            CustomFieldSpec("Age", "Number"),
            CustomFieldSpec("Tier", "MultiSelectOne", ("Gold", "Silver")),
            CustomFieldSpec("Topics", "MultiSelectMany", ("News", "Offers", "Events")),
        ),
    )
    ada = {"birthday": "1990-05-01", "age": "42.50", "tier": "gold", "topics": ["offers", "NEWS"]}
    bob = {"birthday": "1815-12-10", "age": 7}  # before 1900/01/01: no Date field holds it
    async with (
        SyncHarness(kafka_bootstrap, tmp_path, [dest], partitions=1) as h,
        running(h),
    ):
        await h.produce(
            [
                event("ada@example.com", at_ms=T0, extra=ada),
                event("bob@example.com", at_ms=T0, extra=bob),
                event("cy@example.com", at_ms=T0, city="Oslo", extra={"age": 3e2}),
            ]
        )
        await h.wait_synced()
        assert h.active("typed") == {"ada@example.com", "cy@example.com"}
        members = h.members("typed")
        ada_fields = members["ada@example.com"]["CustomFields"]
        fields = {f["Key"]: f["Value"] for f in ada_fields}
        topics = [f["Value"] for f in ada_fields if f["Key"] == "Topics"]
        assert fields["City"] == "London"  # mapped as "city": sent as the list spells it
        assert fields["Birthday"] == "1990/05/01"
        assert fields["Age"] == "42.50"
        assert fields["Tier"] == "Gold"
        assert sorted(topics) == ["News", "Offers"]
        cy = {f["Key"]: f["Value"] for f in members["cy@example.com"]["CustomFields"]}
        assert cy == {"City": "Oslo", "Age": "300.0"}  # the float 3e2, in plain decimal
        [letter] = await h.dead_letters(expect=1)
        headers = headers_of(letter)
        assert headers["cmsync-error"] == "field_type"
        assert headers["cmsync-destination"] == "typed"
        assert headers["cmsync-detail"] == (
            'Date field "Birthday" takes a date as YYYY-MM-DD, YYYY/MM/DD or an RFC 3339 '
            "timestamp, from 1900/01/01 to 2076/06/06"
        )
        assert "cmsync-cm-code" not in headers
        assert orjson.loads(letter.value)["profile"]["email"] == "bob@example.com"
    assert (
        obs.REGISTRY.get_sample_value(
            "cmsync_dead_letters_total", {"reason": "field_type", "destination": "typed"}
        )
        == 1
    )


# ------------------------------------------------------------------------ check-config --online


@pytest.fixture
def cm() -> Iterator[tuple[Simulator, str]]:
    sim = Simulator(SimulatorConfig(api_keys=(KEY,)))
    with SimulatorThread(sim) as base_url:
        yield sim, base_url


@pytest.fixture
def environ(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in list(os.environ):
        if name.startswith("CMSYNC_"):
            monkeypatch.delenv(name)
    return monkeypatch


def online(
    environ: pytest.MonkeyPatch,
    tmp_path: Path,
    base_url: str,
    tables: str,
    *args: str,
    key: str = KEY,
) -> int:
    path = tmp_path / "destinations.toml"
    path.write_text(tables, encoding="utf-8")
    environ.setenv("CMSYNC_KAFKA_BOOTSTRAP_SERVERS", "localhost:9092")
    environ.setenv("CMSYNC_DESTINATIONS_FILE", str(path))
    environ.setenv("CMSYNC_CM_API_KEY", key)
    environ.setenv("CMSYNC_CM_BASE_URL", base_url)
    return cli_main(["--online", *args])


def table(name: str, list_id: str, extra: str = "", fields: str = 'City = "city"\n') -> str:
    return f"""[[destination]]
name = "{name}"
segment_id = "seg-{name}"
list_id = "{list_id}"
email_field = "email"
{extra}
[destination.custom_fields]
{fields}
"""


def section(out: str, name: str) -> list[str]:
    lines = out.splitlines()
    start = lines.index(next(line for line in lines if line.startswith(f'[destination "{name}"] ')))
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("[")), len(lines))
    return lines[start:end]


def requests(sim: Simulator, endpoint: str) -> int:
    return sum(sim.request_counts().get(endpoint, {}).values())


def test_check_config_online_ok_and_warning_exit_0(
    cm: tuple[Simulator, str],
    environ: pytest.MonkeyPatch,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    sim, base_url = cm
    plain = sim.add_list(
        unsubscribe_setting="OnlyThisList", custom_fields=[CustomFieldSpec("City")]
    )
    opt_in = sim.add_list(confirmed_opt_in=True, custom_fields=[CustomFieldSpec("city")])
    tables = table("plain", plain) + table("opt-in", opt_in)
    assert online(environ, tmp_path, base_url, tables) == 0
    out, err = capsys.readouterr()
    assert f"# Campaign Monitor ({base_url}): list settings of each destination" in out
    assert section(out, "plain") == [
        '[destination "plain"] ok',
        "  UnsubscribeSetting = OnlyThisList, ConfirmedOptIn = no",
    ]
    assert section(out, "opt-in") == [
        '[destination "opt-in"] ok',
        "  UnsubscribeSetting = AllClientLists, ConfirmedOptIn = yes",
        f"  warning: list {opt_in} is ConfirmedOptIn: adds send confirmation emails and stay "
        "Unconfirmed until the person confirms",
    ]
    assert err == ""
    assert KEY not in out
    # one request for the details and one for the custom fields, per destination
    assert (requests(sim, "list_details"), requests(sim, "custom_fields")) == (2, 2)
    assert sum(sum(by_status.values()) for by_status in sim.request_counts().values()) == 4


def test_check_config_online_holds_exit_2(
    cm: tuple[Simulator, str],
    environ: pytest.MonkeyPatch,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    sim, base_url = cm
    everywhere = sim.add_list(custom_fields=[CustomFieldSpec("City")])  # AllClientLists
    accepted = sim.add_list(custom_fields=[CustomFieldSpec("City")])
    lacking = sim.add_list(unsubscribe_setting="OnlyThisList", custom_fields=[])
    unsubscribe = 'removal = "unsubscribe"\n'
    tables = (
        table("everywhere", everywhere, unsubscribe)
        + table("accepted", accepted, unsubscribe + "unsubscribe_all_client_lists = true\n")
        + table("lacking", lacking, fields='City = "city"\nTier = "tier"\n')
    )
    assert online(environ, tmp_path, base_url, tables) == 2
    out, err = capsys.readouterr()
    assert section(out, "everywhere")[0] == '[destination "everywhere"] HELD: would send nothing'
    assert section(out, "everywhere")[2] == (
        f"  problem: list {everywhere} has UnsubscribeSetting AllClientLists, so removal = "
        '"unsubscribe" would unsubscribe each removed member from every list of the client; use '
        'removal = "delete", or set unsubscribe_all_client_lists = true to accept that'
    )
    assert section(out, "accepted")[0] == '[destination "accepted"] ok'
    assert section(out, "lacking")[2] == (
        f'  problem: list {lacking} has no custom field "City", "Tier" (mapped in custom_fields; '
        "Campaign Monitor would drop the values): create the field in the list or remove the "
        "mapping"
    )
    assert err.splitlines()[-1] == (
        "check-config --online: destination(s) everywhere, lacking would not sync as configured "
        "(see above)"
    )

    assert online(environ, tmp_path, base_url, tables, "--format", "json") == 2
    document = orjson.loads(capsys.readouterr().out)
    verdicts = {r["destination"]: r["verdict"] for r in document["online"]}
    assert verdicts == {"everywhere": "held", "accepted": "ok", "lacking": "held"}
    accepted_json = next(r for r in document["online"] if r["destination"] == "accepted")
    assert accepted_json["custom_fields"] == {"City": "Text"}
    assert accepted_json["unsubscribe_setting"] == "AllClientLists"


def test_check_config_online_bad_key_or_list_exit_2_with_the_code(
    cm: tuple[Simulator, str],
    environ: pytest.MonkeyPatch,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    sim, base_url = cm
    real = sim.add_list(custom_fields=[CustomFieldSpec("City")])
    unknown = "fedcba9876543210fedcba9876543210"
    tables = table("unknown-list", unknown) + table("fine", real)
    assert online(environ, tmp_path, base_url, tables) == 2
    out, _ = capsys.readouterr()
    assert section(out, "unknown-list") == [
        '[destination "unknown-list"] REFUSED',
        "  problem: Campaign Monitor refused the destination (HTTP 400, code 101, invalid "
        f"ListID): check the API key in CMSYNC_CM_API_KEY and list_id {unknown}",
    ]
    assert section(out, "fine")[0] == '[destination "fine"] ok'

    bad_key = "not-the-key-0f1e2d3c"
    assert online(environ, tmp_path, base_url, table("fine", real), key=bad_key) == 2
    out, err = capsys.readouterr()
    assert "(HTTP 401, code 100, invalid API key)" in section(out, "fine")[1]
    assert bad_key not in out + err


def test_check_config_online_skips_destinations_that_send_nothing(
    cm: tuple[Simulator, str],
    environ: pytest.MonkeyPatch,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    sim, base_url = cm
    real = sim.add_list(custom_fields=[CustomFieldSpec("City")])
    tables = '[[connection]]\nname = "acme"\napi_key_env = "CMSYNC_CM_API_KEY"\n\n' + table(
        "quiet", real, 'connection = "acme"\n'
    )
    assert online(environ, tmp_path, base_url, tables) == 0
    out, _ = capsys.readouterr()
    assert section(out, "quiet") == [
        '[destination "quiet"] not checked',
        "  problem: sends nothing: personal data not acknowledged",
    ]
    assert sim.request_counts() == {}


def test_check_config_online_unanswered_exit_1(
    environ: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sim = Simulator(SimulatorConfig(api_keys=(KEY,)))
    real = sim.add_list(custom_fields=[CustomFieldSpec("City")])
    sim.update_faults({"outage": True})
    with SimulatorThread(sim) as base_url:
        assert online(environ, tmp_path, base_url, table("fine", real)) == 1
    out, _ = capsys.readouterr()
    assert section(out, "fine") == [
        '[destination "fine"] unanswered',
        "  problem: Campaign Monitor did not answer (HTTP 503): try again",
    ]


def test_check_config_help_documents_online(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["--help"]) == 0
    flat = " ".join(capsys.readouterr().out.split())
    assert "--online also checks every destination that sends against Campaign Monitor" in flat
    assert "unsubscribe_all_client_lists = true" in flat
    assert "exits 2 when a destination would be held or is refused" in flat
