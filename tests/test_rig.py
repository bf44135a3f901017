"""The rig's pieces and the simulator's public observer."""

from __future__ import annotations

import asyncio
import base64
from pathlib import Path

import aiohttp

from consumer.devtools.rig import Dest, Metrics, destinations_toml, service_env
from consumer.devtools.simulator import FaultConfig, Served, Simulator, SimulatorConfig, serve
from consumer.settings import load_settings

KEY = "rig-test-key"
AUTH = {"Authorization": "Basic " + base64.b64encode(f"{KEY}:x".encode()).decode()}


async def test_observer_sees_each_request_with_its_addresses_and_outcome() -> None:
    sim = Simulator(SimulatorConfig(api_keys=(KEY,), rate_limit_rps=1, rate_burst=2))
    list_id = sim.add_list(api_key=KEY)
    seen: list[Served] = []
    stop = sim.observe(seen.append)
    rows = {"Subscribers": [{"EmailAddress": "A@Example.com"}, {"EmailAddress": "b@x.io"}]}
    async with serve(sim) as url, aiohttp.ClientSession(headers=AUTH) as http:
        async with http.post(f"{url}/subscribers/{list_id}/import.json", json=rows) as r:
            assert r.status == 201
        async with http.delete(f"{url}/subscribers/{list_id}.json?email=Gone@x.io") as r:
            assert r.status == 400  # Code 203: not in the list, but the list was reached
        async with http.get(f"{url}/lists/{list_id}.json") as r:
            assert r.status == 429  # the bucket (2) is empty: refused before the list
        stop()
        sim.set_faults(FaultConfig(script=[0]))  # a dropped connection, no longer observed
        try:
            async with http.get(f"{url}/lists/{list_id}.json"):
                pass
        except aiohttp.ClientError:
            pass
    assert [(s.endpoint, s.status, s.handled) for s in seen] == [
        ("import", 201, True),
        ("delete", 400, True),
        ("list_details", 429, False),
    ]
    assert seen[0].addresses == ("a@example.com", "b@x.io")
    assert seen[1].addresses == ("gone@x.io",)
    assert seen[2].addresses == ()
    assert all(s.list_id == list_id and s.arrived <= s.at for s in seen)


async def test_in_flight_counts_a_request_while_it_is_held() -> None:
    entered, release = asyncio.Event(), asyncio.Event()

    async def held(_seconds: float) -> None:  # the injected latency, until released
        entered.set()
        await release.wait()

    sim = Simulator(
        SimulatorConfig(api_keys=(KEY,), faults=FaultConfig(latency_s=1.0, p_latency=1.0)),
        sleep=held,
    )
    list_id = sim.add_list(api_key=KEY)
    async with serve(sim) as url, aiohttp.ClientSession(headers=AUTH) as http:
        body = {"Subscribers": [{"EmailAddress": "a@x.io"}]}
        request = asyncio.create_task(
            http.post(f"{url}/subscribers/{list_id}/import.json", json=body)
        )
        await entered.wait()
        assert sim.in_flight["import"] == 1
        assert sim.in_flight["delete"] == 0
        release.set()
        response = await request
        assert response.status == 201
        response.release()
    assert sim.in_flight["import"] == 0


def test_destinations_rendered_by_dest_load_as_written(tmp_path: Path) -> None:
    dests = [
        Dest("news", "seg-a", custom_fields={"City": "city", "Tier": "tier"}),
        Dest("offers", "seg-a", removal="unsubscribe", resubscribe="always"),
    ]
    path = tmp_path / "destinations.toml"
    path.write_text(destinations_toml(dests, {"news": "a" * 32, "offers": "b" * 32}))
    env = service_env(
        bootstrap="127.0.0.1:9092",
        topic="t",
        group="g",
        base_url="http://127.0.0.1:1/api/v3.3",
        api_key=KEY,
        destinations_file=path,
    )
    settings = load_settings(env)
    assert settings.kafka.dlq_topic == "t.dlq"
    news, offers = settings.destinations
    assert (news.name, news.list_id, news.segment_ids) == ("news", "a" * 32, ("seg-a",))
    assert dict(news.custom_fields) == {"City": "city", "Tier": "tier"}
    assert (offers.removal, offers.resubscribe) == ("unsubscribe", "always")


def test_metrics_parser_sums_matching_labels() -> None:
    text = (
        "# TYPE cmsync_api_requests_total counter\n"
        'cmsync_api_requests_total{endpoint="import",status="200"} 3.0\n'
        'cmsync_api_requests_total{endpoint="delete",status="200"} 2.0\n'
        "# TYPE cmsync_committed_offset gauge\n"
        'cmsync_committed_offset{topic="t",partition="1"} 42.0\n'
    )
    metrics = Metrics.parse(text)
    assert metrics.value("cmsync_api_requests_total") == 5
    assert metrics.value("cmsync_api_requests_total", endpoint="delete") == 2
    assert not metrics.has("cmsync_api_requests_total", endpoint="get")
    assert metrics.committed_offsets("t") == {1: 42}
    assert metrics.committed_offsets("other") == {}
