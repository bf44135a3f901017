"""Guarantee 2 through `cmsync run`'s service: real broker, simulator over real HTTP.

A list equals its segment(s) per (segment, profile), not per address: address changes, shared
addresses, a list fed by two segments, late events across restarts, a wiped state directory.
"""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

from consumer.app import Service
from consumer.devtools.rig import InProcessService
from tests.harness import Dest, SyncHarness, event, running

T0 = 1_764_417_600_000  # 2025-11-29T12:00:00Z


async def test_an_address_change_removes_the_old_address(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    async with SyncHarness(kafka_bootstrap, tmp_path, [Dest("news", "seg-a")]) as h, running(h):
        await h.produce([event("old@example.com", profile_id="p1", at_ms=T0)])
        await h.wait_synced()
        assert h.active("news") == {"old@example.com"}
        # The same profile, still in the segment, with a new address.
        await h.produce([event("new@example.com", profile_id="p1", at_ms=T0 + 1000)])
        await h.wait_synced()
        assert h.active("news") == {"new@example.com"}
        assert h.state_of("news", "old@example.com") == "Deleted"


async def test_a_shared_address_stays_while_any_member_is_in(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    async with SyncHarness(kafka_bootstrap, tmp_path, [Dest("news", "seg-a")]) as h, running(h):
        await h.produce(
            [
                event("home@example.com", profile_id="ann", at_ms=T0),
                event("Home@Example.com ", profile_id="bob", at_ms=T0 + 1),  # the same address
            ]
        )
        await h.wait_synced()
        assert h.active("news") == {"home@example.com"}
        await h.produce([event("home@example.com", "exited", profile_id="ann", at_ms=T0 + 10)])
        await h.wait_synced()
        assert h.active("news") == {"home@example.com"}  # bob is still in
        await h.produce([event("home@example.com", "exited", profile_id="bob", at_ms=T0 + 20)])
        await h.wait_synced()
        assert h.active("news") == set()


async def test_a_list_fed_by_two_segments_holds_their_union(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    dest = Dest("news", "seg-a", more_segments=("seg-b",))
    async with SyncHarness(kafka_bootstrap, tmp_path, [dest]) as h, running(h):
        await h.produce(
            [
                event("both@example.com", profile_id="p1", segment="seg-a", at_ms=T0),
                event("both@example.com", profile_id="p1", segment="seg-b", at_ms=T0),
                event("only-b@example.com", profile_id="p2", segment="seg-b", at_ms=T0),
            ]
        )
        await h.wait_synced()
        assert h.active("news") == {"both@example.com", "only-b@example.com"}
        await h.produce(
            [event("both@example.com", "exited", profile_id="p1", segment="seg-a", at_ms=T0 + 5)]
        )
        await h.wait_synced()
        assert h.active("news") == {"both@example.com", "only-b@example.com"}  # still in seg-b
        await h.produce(
            [event("both@example.com", "exited", profile_id="p1", segment="seg-b", at_ms=T0 + 6)]
        )
        await h.wait_synced()
        assert h.active("news") == {"only-b@example.com"}


async def test_a_non_ascii_letter_is_not_folded_into_another_address(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    async with SyncHarness(kafka_bootstrap, tmp_path, [Dest("news", "seg-a")]) as h, running(h):
        await h.produce([event("kate@example.com", profile_id="kate", at_ms=T0)])
        await h.wait_synced()
        # U+212A KELVIN SIGN: str.lower() would make it "kate@example.com".
        kelvin = "\u212aate@example.com"
        await h.produce([event(kelvin, "exited", profile_id="kelvin", at_ms=T0 + 1)])
        await h.wait_synced()
        assert h.active("news") == {"kate@example.com"}


async def test_late_events_are_ignored_across_restarts(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    """After a restart, with the state dir kept and with it wiped, a change older than the one
    applied for that (segment, profile) changes nothing, and nothing is sent again."""
    state_dir = tmp_path / "state"
    env = {"CMSYNC_STATE_DIR": str(state_dir)}
    async with SyncHarness(kafka_bootstrap, tmp_path, [Dest("news", "seg-a")], env=env) as h:
        async with running(h):
            await h.produce(
                [
                    event("ada@example.com", profile_id="ada", at_ms=T0 + 10_000),
                    event("bob@example.com", profile_id="bob", at_ms=T0),
                    event("bob@example.com", "exited", profile_id="bob", at_ms=T0 + 10_000),
                ]
            )
            await h.wait_synced()
            assert h.active("news") == {"ada@example.com"}
        imports = sum(h.sim.request_counts().get("import", {}).values())
        assert any(state_dir.iterdir())  # the state was kept on disk
        for wipe in (False, True):
            if wipe:
                shutil.rmtree(state_dir)
            async with running(h):
                await h.produce(
                    [  # both older than what decided ada and bob
                        event("ada@example.com", "exited", profile_id="ada", at_ms=T0 + 5_000),
                        event("bob@example.com", profile_id="bob", at_ms=T0 + 5_000),
                    ]
                )
                await h.wait_synced()
                assert h.active("news") == {"ada@example.com"}, f"wiped: {wipe}"
        # Restores did not re-send what was applied: the state records it.
        assert sum(h.sim.request_counts().get("import", {}).values()) == imports


async def test_two_replicas_keep_one_list_exact(kafka_bootstrap: str, tmp_path: Path) -> None:
    """Households (one address, four profiles on different input partitions) read by two
    services of one group, each owning some partitions: every (list, address) has one owner
    in stage 2, and the list ends exact."""
    h = SyncHarness(kafka_bootstrap, tmp_path, [Dest("news", "seg-a")], partitions=4)
    async with h, running(h) as first:
        other = Service(h.settings(), commit_interval_s=0.1)
        task = asyncio.create_task(other.run())
        try:
            services = (first, other)
            for _ in range(600):  # until the group has settled on two members
                owned = [len(s.source.consumer.assignment()) for s in services]
                if all(owned) and sum(owned) == 8:  # 4 input + 4 claims partitions
                    break
                await asyncio.sleep(0.05)
            assert all(owned), owned
            await h.produce(
                [
                    event(f"house{i % 10}@example.com", profile_id=f"p{i}", at_ms=T0 + i)
                    for i in range(40)
                ]
            )
            await h.produce(
                [  # every member of households 0-4 leaves
                    event(f"house{i % 10}@example.com", "exited", profile_id=f"p{i}", at_ms=T0 + 99)
                    for i in range(40)
                    if i % 10 < 5
                ]
            )
            expected = {f"house{k}@example.com" for k in range(5, 10)}
            for _ in range(600):
                if h.active("news") == expected and sum(s.pending() for s in services) == 0:
                    break
                await asyncio.sleep(0.05)
            assert h.active("news") == expected
        finally:
            other.stop()
            await asyncio.wait_for(task, 30)


async def test_a_replay_into_an_empty_state_gives_the_same_lists(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    """The whole topic read again by a new group (an empty state) leaves every list as the
    first group left it: address changes, households and late events included."""
    stream = [
        event("a@example.com", profile_id="p1", at_ms=T0),
        event("home@example.com", profile_id="p2", at_ms=T0),
        event("home@example.com", profile_id="p3", at_ms=T0 + 1),
        event("b@example.com", profile_id="p1", at_ms=T0 + 10),  # p1 moves
        event("home@example.com", "exited", profile_id="p2", at_ms=T0 + 20),
        event("c@example.com", profile_id="p4", at_ms=T0 + 30),
        event("c@example.com", "exited", profile_id="p4", at_ms=T0 + 5),  # late: ignored
    ]
    dest = Dest("news", "seg-a", more_segments=("seg-b",))
    async with SyncHarness(kafka_bootstrap, tmp_path, [dest]) as h:
        async with running(h):
            await h.produce(stream)
            await h.wait_synced()

        def shown() -> dict[str, tuple[object, ...]]:
            return {
                address: (m["State"], m.get("Name"), str(m.get("CustomFields")))
                for address, m in h.members("news").items()
            }

        first = shown()
        assert h.active("news") == {"b@example.com", "home@example.com", "c@example.com"}
        replay = InProcessService(h.settings(CMSYNC_KAFKA_GROUP_ID=f"{h.group}-replay"))
        try:
            await replay.wait_synced(dict(h.ends), within_s=60)
        finally:
            await replay.stop()
        assert shown() == first


async def test_ready_only_once_joined(kafka_bootstrap: str, tmp_path: Path) -> None:
    """/readyz is false until the consumer joined its group (then true, restore done)."""
    async with SyncHarness(kafka_bootstrap, tmp_path, [Dest("news", "seg-a")]) as h:
        service = Service(h.settings())
        assert service.readiness() == (False, "waiting to join the consumer group")
        async with running(h) as running_service:
            for _ in range(600):
                if running_service.readiness()[0]:
                    break
                await asyncio.sleep(0.05)
            assert running_service.readiness() == (True, "joined")
            assert running_service.source.joined
