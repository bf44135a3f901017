"""Destinations added, removed and changed (issue 12) through `cmsync run`'s service: real
broker, simulator over real HTTP.

A destination added for a segment the state knows is filled from the state (no replay); the
destinations file is reloaded without a restart or a rebalance: added destinations are
backfilled, removed ones stop writing at once, changed ones take effect, an invalid file is
refused and the running configuration stays.
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Iterator
from pathlib import Path

from prometheus_client import generate_latest

from consumer import observability as obs
from consumer.devtools.rig import create_list
from consumer.devtools.simulator import Served
from tests.harness import API_KEY, Dest, SyncHarness, event, running

T0 = 1_764_417_600_000  # 2025-11-29T12:00:00Z


def stream(
    segment: str, count: int, *, exits: int = 0, at_ms: int = T0
) -> Iterator[tuple[bytes, bytes]]:
    """``count`` profiles entering ``segment``, then the first ``exits`` of them leaving."""
    for i in range(count):
        yield event(f"{segment}-{i}@example.com", segment=segment, at_ms=at_ms + i)
    for i in range(exits):
        yield event(
            f"{segment}-{i}@example.com", "exited", segment=segment, at_ms=at_ms + count + i
        )


def members(segment: str, count: int, *, exits: int = 0) -> set[str]:
    return {f"{segment}-{i}@example.com" for i in range(exits, count)}


def add_destination(h: SyncHarness, dest: Dest) -> None:
    """A new destination in the rig's file (written by the next `h.env()`), with a new list."""
    h.dests.append(dest)
    h.list_ids[dest.name] = create_list(h.sim, dest, api_key=API_KEY)


def writes_to(h: SyncHarness, name: str) -> list[Served]:
    """Collects the writes (not the reads) to ``name``'s list from now on."""
    seen: list[Served] = []
    list_id = h.list_ids[name]

    def observe(served: Served) -> None:
        if served.list_id == list_id and served.method != "GET":
            seen.append(served)

    h.sim.observe(observe)
    return seen


def metric(name: str, **labels: str) -> float:
    return obs.REGISTRY.get_sample_value(name, labels) or 0.0


async def test_a_destination_added_later_is_filled_from_the_state(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    """The state keeps every segment on the topic, fed to a list or not: after a restart with
    two new destinations, one for the configured segment and one for a segment no list had,
    both lists hold their segment's current members, and the first list is not written again."""
    async with SyncHarness(kafka_bootstrap, tmp_path, [Dest("news", "seg-a")]) as h:
        async with running(h):
            await h.produce([*stream("seg-a", 40, exits=10), *stream("seg-b", 25, exits=5)])
            await h.wait_synced()
            assert h.active("news") == members("seg-a", 40, exits=10)
        add_destination(h, Dest("later", "seg-a"))
        add_destination(h, Dest("b-list", "seg-b"))
        news = writes_to(h, "news")
        async with running(h):
            await h.wait_synced()
            assert h.active("later") == members("seg-a", 40, exits=10)
            assert h.active("b-list") == members("seg-b", 25, exits=5)
            assert news == []  # already equal: nothing to write
            assert metric("cmsync_backfill_members_total", destination="later") == 30
            assert metric("cmsync_backfill_members_total", destination="b-list") == 20
            assert metric("cmsync_backfills_running", destination="later") == 0


async def test_reload_adds_removes_and_changes_destinations_without_a_rebalance(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    dests = [Dest("news", "seg-a"), Dest("old", "seg-b")]
    async with SyncHarness(kafka_bootstrap, tmp_path, dests) as h, running(h) as service:
        await h.produce([*stream("seg-a", 30, exits=5), *stream("seg-b", 20)])
        await h.wait_synced()
        assignment = set(service.source.consumer.assignment())
        restored = metric("cmsync_state_restored_records_total")

        # Remove "old", add "later" (seg-a), change "news" (City now maps to another field).
        h.dests = [Dest("news", "seg-a", custom_fields={"City": "town"})]
        add_destination(h, Dest("later", "seg-a"))
        h.env()  # writes the file
        old = writes_to(h, "old")
        await service.reload()
        await h.wait_synced()
        assert h.active("later") == members("seg-a", 30, exits=5)

        # "old" is written no more, and its series are gone; "news" writes the new mapping.
        town = {"town": "Paris", "city": "London"}
        await h.produce(
            [
                *stream("seg-b", 20, at_ms=T0 + 100_000, exits=20),  # every old member leaves
                event("new@example.com", segment="seg-a", at_ms=T0 + 100_000, extra=town),
            ]
        )
        await h.wait_synced()
        assert old == []
        assert h.active("old") == members("seg-b", 20)  # as it was at the reload
        fields = {
            f["Key"]: f["Value"] for f in h.members("news")["new@example.com"]["CustomFields"]
        }
        assert fields.get("City") == "Paris"
        assert "new@example.com" in h.active("later")
        assert 'destination="old"' not in generate_latest(obs.REGISTRY).decode()
        assert metric("cmsync_config_reloads_total", outcome="applied") >= 1
        # No rebalance: the same partitions, and no store restored again.
        assert set(service.source.consumer.assignment()) == assignment
        assert metric("cmsync_state_restored_records_total") == restored


async def test_a_removed_segment_leaves_the_list_and_a_list_removed_and_added_is_refilled(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    """A list fed by two segments that loses one holds the other's members only; a
    destination removed and added again equals its segments again."""
    dest = Dest("news", "seg-a", more_segments=("seg-b",))
    async with SyncHarness(kafka_bootstrap, tmp_path, [dest]) as h, running(h) as service:
        await h.produce([*stream("seg-a", 10), *stream("seg-b", 10)])
        await h.wait_synced()
        assert h.active("news") == members("seg-a", 10) | members("seg-b", 10)

        h.dests = [Dest("news", "seg-a")]
        h.env()
        await service.reload()
        await h.wait_synced()
        assert h.active("news") == members("seg-a", 10)

        h.dests = []  # a file needs one destination: another list
        add_destination(h, Dest("other", "seg-z"))
        h.env()
        await service.reload()
        await h.produce(list(stream("seg-a", 10, exits=4, at_ms=T0 + 50_000)))
        await h.wait_synced()
        assert h.active("news") == members("seg-a", 10)  # removed: not written

        h.dests = [Dest("news", "seg-a", more_segments=("seg-b",)), h.dests[0]]
        h.env()
        await service.reload()
        await h.wait_synced()
        # Exact again: those who left while it was removed are taken off once the backfill is
        # complete, those the sync removed itself (seg-b, above) come back.
        assert h.active("news") == members("seg-a", 10, exits=4) | members("seg-b", 10)


async def test_an_invalid_destinations_file_is_refused_and_the_running_one_stays(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    dests = [Dest("news", "seg-a")]
    async with SyncHarness(kafka_bootstrap, tmp_path, dests) as h, running(h) as service:
        path = Path(service.settings.destinations_file)
        good = await asyncio.to_thread(path.read_text)
        before = metric("cmsync_config_reloads_total", outcome="refused")
        for bad in (
            "[[destination]]\nname = 'x'\n",  # list_id and email_field missing
            good + good,  # two destinations with one name and one list
            "not toml at all [",
        ):
            await asyncio.to_thread(path.write_text, bad)
            await service.reload()
        after = metric("cmsync_config_reloads_total", outcome="refused")
        assert after - before == 3
        await h.produce(list(stream("seg-a", 5)))
        await h.wait_synced()
        assert h.active("news") == members("seg-a", 5)  # still the running configuration


async def test_sighup_and_a_changed_file_reload_cmsync_run(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    """Through the process: SIGHUP reloads at once; a file that stays the same is not
    applied again."""
    async with SyncHarness(kafka_bootstrap, tmp_path, [Dest("news", "seg-a")]) as h:
        proc = h.spawn()
        await proc.wait_joined()
        await h.produce(list(stream("seg-a", 12)))
        await h.wait_for(lambda: h.active("news") == members("seg-a", 12), 60, "synced", [proc])
        add_destination(h, Dest("later", "seg-a"))
        h.env()
        os.kill(proc.pid, signal.SIGHUP)
        await h.wait_for(
            lambda: h.active("later") == members("seg-a", 12), 60, "backfilled", [proc]
        )
        os.kill(proc.pid, signal.SIGHUP)  # nothing changed
        await h.wait_for(
            lambda: len(proc.events("reload_requested")) == 2, 30, "second signal", [proc]
        )
        await asyncio.sleep(0.5)
        reloaded = proc.events("destinations_reloaded")
        assert len(reloaded) == 1
        assert reloaded[0]["added"] == ["later"]
        assert proc.events("partitions_revoked") == []  # no rebalance
        figures = await proc.metrics()
        assert figures.value("cmsync_config_reloads_total", outcome="unchanged") == 1
        assert await proc.stop() == 0
