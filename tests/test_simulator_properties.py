"""Properties of the simulator's state model (directly, and over HTTP against the model)."""

from __future__ import annotations

import base64
import http.client
import json
from typing import Any
from urllib.parse import urlsplit

from hypothesis import given, settings
from hypothesis import strategies as st

from consumer.devtools._simstate import (
    STATE_NAMES,
    PageRequest,
    SimList,
    SimState,
    TokenBucket,
)
from consumer.devtools.simulator import Simulator, SimulatorConfig
from tests.simulator_fixtures import SimulatorThread

LIST_ID = "0123456789abcdef0123456789abcdef"
OWNER = "key"
NOW = 1_700_000_000
POOL = [f"{name}@example.com" for name in ("ada", "bob", "cy", "dee", "eve", "fay", "gus")]
INACTIVE = {"Unsubscribed", "Bounced", "Deleted"}

addresses = st.sampled_from(POOL).flatmap(lambda e: st.sampled_from([e, e.upper(), e.capitalize()]))
invalid = st.sampled_from(["bad@example", "no-at-sign", "", "a b@example.com"])
custom_field = st.fixed_dictionaries(
    {
        "Key": st.sampled_from(["City", "Tags", "[Tier]"]),
        "Value": st.one_of(
            st.sampled_from(["", "London", "Paris", "x" * 251, "y" * 250]), st.integers(0, 9)
        ),
    },
    optional={"Clear": st.booleans()},
)
import_row = st.fixed_dictionaries(
    {"EmailAddress": st.one_of(addresses, addresses, addresses, invalid, st.none())},
    optional={
        "Name": st.sampled_from(["Ada", "Bob", ""]),
        "CustomFields": st.lists(custom_field, max_size=4),
        "ConsentToTrack": st.sampled_from(["Yes", "no", "UNCHANGED", "maybe"]),
    },
)
rows_strategy = st.lists(import_row, min_size=1, max_size=15)
prior_state = st.dictionaries(
    st.sampled_from(POOL),
    st.tuples(st.sampled_from([*STATE_NAMES, "absent"]), st.booleans()),
    max_size=len(POOL),
)
reports = st.sampled_from(["existing", "failure"])


def make_state(
    prior: dict[str, tuple[str, bool]], report: str = "existing"
) -> tuple[SimState, SimList]:
    state = SimState(resubscribe_false_reports="failure" if report == "failure" else "existing")
    lst = state.add_list(LIST_ID, title="t", unsubscribe_setting="AllClientLists", owner=OWNER)
    for email, (name, suppressed) in prior.items():
        if name == "absent":
            if suppressed:
                state.suppress(OWNER, email, now=NOW - 10, reason="Suppressed")
        else:
            state.set_state(lst, email, name, now=NOW - 10, suppress=suppressed)
    return state, lst


def key_of(row: dict[str, Any]) -> str:
    email = row.get("EmailAddress")
    return email.lower() if isinstance(email, str) else ""


@settings(max_examples=150, deadline=None)
@given(prior=prior_state, rows=rows_strategy, resubscribe=st.booleans(), report=reports)
def test_import_totals_add_up(
    prior: dict[str, tuple[str, bool]], rows: list[dict[str, Any]], resubscribe: bool, report: str
) -> None:
    sim, lst = make_state(prior, report)
    before = set(lst.subscribers)
    out = sim.import_subscribers(lst, rows, resubscribe=resubscribe, now=NOW)
    after = set(lst.subscribers)

    keys = {key_of(r) for r in rows}
    assert out.unique == len(keys)
    assert out.unique == out.new + out.existing + out.failed
    assert out.new == len(after - before)
    failed_keys = {f.email.lower() for f in out.failures}
    assert out.failed <= len(failed_keys)
    assert failed_keys <= keys
    assert len(out.duplicates) == len({k for k in keys if sum(key_of(r) == k for r in rows) > 1})
    assert after >= before  # nothing is ever removed from a list
    if report == "existing":
        assert all(f.code in (1, 215, 216) for f in out.failures)
    assert sum(lst.counts) == len(lst.subscribers)
    for i, name in enumerate(STATE_NAMES):
        assert lst.counts[i] == sum(s.state == i for s in lst.subscribers.values()), name


@settings(max_examples=150, deadline=None)
@given(prior=prior_state, rows=rows_strategy, resubscribe=st.booleans(), report=reports)
def test_importing_the_same_batch_twice_changes_nothing_the_second_time(
    prior: dict[str, tuple[str, bool]], rows: list[dict[str, Any]], resubscribe: bool, report: str
) -> None:
    sim, lst = make_state(prior, report)
    first = sim.import_subscribers(lst, rows, resubscribe=resubscribe, now=NOW)
    snapshot = sim.snapshot(lst)
    suppressed = sim.suppressed(OWNER)
    second = sim.import_subscribers(lst, rows, resubscribe=resubscribe, now=NOW + 3600)
    assert sim.snapshot(lst) == snapshot
    assert sim.suppressed(OWNER) == suppressed
    assert second.new == 0
    assert second.unique == first.unique
    assert second.failures == first.failures or report == "failure"


@settings(max_examples=150, deadline=None)
@given(prior=prior_state, rows=rows_strategy, report=reports)
def test_resubscribe_false_never_reactivates(
    prior: dict[str, tuple[str, bool]], rows: list[dict[str, Any]], report: str
) -> None:
    sim, lst = make_state(prior, report)
    before = sim.snapshot(lst)
    sim.import_subscribers(lst, rows, resubscribe=False, now=NOW)
    after = sim.snapshot(lst)
    for email, (name, suppressed) in prior.items():
        if name in INACTIVE:
            assert after[email]["State"] == name
            assert after[email] == before[email]  # a refused row changes nothing
        if suppressed and name in (*INACTIVE, "absent"):
            assert after.get(email, {}).get("State") == before.get(email, {}).get("State")
        if name == "Active":
            assert after[email]["State"] == "Active"


@settings(max_examples=100, deadline=None)
@given(
    members=st.dictionaries(
        st.from_regex(r"[a-z]{1,6}\.[a-z]{1,3}@example\.com", fullmatch=True),
        st.tuples(st.sampled_from(STATE_NAMES), st.sampled_from(["Zed", "amy", "Bo", ""])),
        max_size=60,
    ),
    state=st.integers(0, 4),
    page_size=st.integers(10, 25),
    order=st.sampled_from(["email", "name", "date"]),
    descending=st.booleans(),
)
def test_paged_listings_cover_every_member_exactly_once(
    members: dict[str, tuple[str, str]],
    state: int,
    page_size: int,
    order: str,
    descending: bool,
) -> None:
    sim, lst = make_state({})
    for i, (email, (state_name, name)) in enumerate(members.items()):
        sim.set_state(lst, email, state_name, now=NOW + i % 7, name=name, suppress=False)
    expected = {e for e, (s, _) in members.items() if s == STATE_NAMES[state]}

    seen: list[str] = []
    first = sim.page(lst, state, PageRequest(1, page_size, order, descending))
    pages = first["NumberOfPages"]
    assert pages == -(-len(expected) // page_size)
    for number in range(1, pages + 2):  # one page past the end is empty
        page = sim.page(lst, state, PageRequest(number, page_size, order, descending))
        assert page["TotalNumberOfRecords"] == len(expected)
        assert page["RecordsOnThisPage"] == len(page["Results"]) <= page_size
        seen += [r["EmailAddress"] for r in page["Results"]]
    assert len(seen) == len(set(seen)) == len(expected)
    assert set(seen) == expected
    if order == "email":
        assert seen == sorted(seen, reverse=descending)


@settings(max_examples=100, deadline=None)
@given(
    rate=st.floats(0.5, 50),
    burst=st.floats(1, 20),
    gaps=st.lists(st.floats(0, 0.5), min_size=1, max_size=200),
)
def test_token_bucket_never_admits_more_than_burst_plus_rate(
    rate: float, burst: float, gaps: list[float]
) -> None:
    bucket = TokenBucket(rate, burst, 0.0)
    now, admitted = 0.0, []
    for gap in gaps:
        now += gap
        if bucket.take(now):
            admitted.append(now)
    for i, start in enumerate(admitted):
        for j in range(i, len(admitted)):
            window = admitted[j] - start
            assert j - i + 1 <= burst + rate * window + 1e-6


def test_http_imports_match_the_model() -> None:
    """The same imports over HTTP and straight into the model give the same answers."""
    sim = Simulator(SimulatorConfig(api_keys=(OWNER,)), wall_clock=lambda: NOW)
    auth = "Basic " + base64.b64encode(f"{OWNER}:x".encode()).decode()
    with SimulatorThread(sim) as base_url:
        url = urlsplit(base_url)
        assert url.hostname is not None
        conn = http.client.HTTPConnection(url.hostname, url.port, timeout=10)

        @settings(max_examples=40, deadline=None)
        @given(batches=st.lists(st.tuples(rows_strategy, st.booleans()), min_size=1, max_size=3))
        def check(batches: list[tuple[list[dict[str, Any]], bool]]) -> None:
            list_id = sim.add_list()
            model = SimState()
            mlst = model.add_list(
                list_id, title="t", unsubscribe_setting="AllClientLists", owner=OWNER
            )
            for rows, resubscribe in batches:
                body = json.dumps({"Subscribers": rows, "Resubscribe": resubscribe})
                conn.request(
                    "POST",
                    f"{url.path}/subscribers/{list_id}/import.json",
                    body=body,
                    headers={"Authorization": auth, "Content-Type": "application/json"},
                )
                resp = conn.getresponse()
                reply = json.loads(resp.read())
                expected = model.import_subscribers(mlst, rows, resubscribe=resubscribe, now=NOW)
                if expected.failures:
                    assert resp.status == 400
                    assert reply["Code"] == 210
                    reply = reply["ResultData"]
                else:
                    assert resp.status == 201
                assert reply == expected.result()
            assert sim.list_state(list_id) == model.snapshot(mlst)

        try:
            check()
        finally:
            conn.close()
