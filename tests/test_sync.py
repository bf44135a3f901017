"""The streaming sync end to end: real broker, simulator over real HTTP, the real service."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from consumer import observability as obs
from consumer.devtools.simulator import CustomFieldSpec
from consumer.events import MAX_EVENT_BYTES
from tests.harness import API_KEY, Dest, SyncHarness, event, headers_of, running

T0 = 1_764_417_600_000  # 2025-11-29T12:00:00Z


def field_values(member: dict[str, object], key: str) -> list[str]:
    fields = member.get("CustomFields", [])
    assert isinstance(fields, list)
    return sorted(str(f["Value"]) for f in fields if f["Key"] == key)


async def test_add_with_name_and_custom_fields(kafka_bootstrap: str, tmp_path: Path) -> None:
    dest = Dest(
        "news",
        "seg-a",
        custom_fields={"City": "city", "Tier": "tier", "Tags": "tags"},
        fields=(
            CustomFieldSpec("City"),
            CustomFieldSpec("Tier", "MultiSelectOne", ("gold", "silver")),
            CustomFieldSpec("Tags", "MultiSelectMany", ("a", "b", "c")),
        ),
    )
    async with SyncHarness(kafka_bootstrap, tmp_path, [dest]) as h, running(h):
        await h.produce(
            [
                event("ada@example.com", extra={"tier": "gold", "tags": ["a", "b"]}),
                event(" Grace@Example.COM ", name="Grace Hopper", city=None, at_ms=T0 + 1),
            ]
        )
        await h.wait_synced()
        members = h.members("news")
        assert set(members) == {"ada@example.com", "grace@example.com"}
        ada = members["ada@example.com"]
        assert ada["State"] == "Active"
        assert ada["Name"] == "Ada Lovelace"
        assert field_values(ada, "City") == ["London"]
        assert field_values(ada, "Tier") == ["gold"]
        assert field_values(ada, "Tags") == ["a", "b"]
        assert members["grace@example.com"]["Name"] == "Grace Hopper"
        assert field_values(members["grace@example.com"], "City") == []


@pytest.mark.parametrize(
    ("removal", "state"), [("delete", "Deleted"), ("unsubscribe", "Unsubscribed")]
)
async def test_remove_in_both_modes(
    kafka_bootstrap: str, tmp_path: Path, removal: str, state: str
) -> None:
    dest = Dest("news", "seg-a", removal=removal, resubscribe="always")
    async with SyncHarness(kafka_bootstrap, tmp_path, [dest]) as h, running(h):
        await h.produce([event("ada@example.com", at_ms=T0), event("bob@example.com", at_ms=T0)])
        await h.wait_synced()
        assert h.active("news") == {"ada@example.com", "bob@example.com"}
        await h.produce([event("ada@example.com", "exited", at_ms=T0 + 1000)])
        await h.wait_synced()
        assert h.state_of("news", "ada@example.com") == state
        assert h.active("news") == {"bob@example.com"}
        # removing an address that is not in the list (Code 203) is "already done"
        await h.produce([event("nobody@example.com", "exited", at_ms=T0 + 2000)])
        await h.wait_synced()
        assert h.state_of("news", "nobody@example.com") is None


async def test_reentry_after_the_sync_deleted_comes_back(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    async with SyncHarness(kafka_bootstrap, tmp_path, [Dest("news", "seg-a")]) as h, running(h):
        await h.produce([event("ada@example.com", at_ms=T0)])
        await h.wait_synced()
        await h.produce([event("ada@example.com", "exited", at_ms=T0 + 1000)])
        await h.wait_synced()
        assert h.state_of("news", "ada@example.com") == "Deleted"
        await h.produce([event("ada@example.com", at_ms=T0 + 2000)])
        await h.wait_synced()
        assert h.state_of("news", "ada@example.com") == "Active"


@pytest.mark.parametrize(
    ("policy", "final"),
    [("deleted-only", "Unsubscribed"), ("always", "Active"), ("never", "Unsubscribed")],
)
async def test_reentry_after_self_unsubscribe(
    kafka_bootstrap: str, tmp_path: Path, policy: str, final: str
) -> None:
    async with (
        SyncHarness(kafka_bootstrap, tmp_path, [Dest("news", "seg-a", resubscribe=policy)]) as h,
        running(h),
    ):
        await h.produce([event("ada@example.com", at_ms=T0), event("bob@example.com", at_ms=T0)])
        await h.wait_synced()
        # Ada unsubscribes herself in Campaign Monitor, then exits and re-enters the segment.
        h.sim.force_state(h.list_ids["news"], "ada@example.com", "Unsubscribed")
        await h.produce(
            [
                event("ada@example.com", "exited", at_ms=T0 + 1000),
                event("ada@example.com", at_ms=T0 + 2000, city="Paris"),
            ]
        )
        await h.wait_synced()
        await h.produce([event("ada@example.com", at_ms=T0 + 3000, city="Rome")])
        await h.wait_synced()
        assert h.state_of("news", "ada@example.com") == final
        assert h.state_of("news", "bob@example.com") == "Active"


async def test_coalescing_inside_one_window(kafka_bootstrap: str, tmp_path: Path) -> None:
    """Duplicates, out-of-order events, enter-then-exit and exit-then-enter in one window."""
    env = {"CMSYNC_FLUSH_INTERVAL_S": "2"}
    async with SyncHarness(kafka_bootstrap, tmp_path, [Dest("news", "seg-a")], env=env) as h:
        await h.produce([event("gone@example.com", at_ms=T0)])
        async with running(h):
            await h.wait_synced()
        h.sim.reset_stats()
        dup = event("dup@example.com", at_ms=T0 + 10, event_id="same-id")
        await h.produce(
            [
                event("flip@example.com", at_ms=T0 + 10),  # enter then exit: one removal
                event("flip@example.com", "exited", at_ms=T0 + 20),
                event("gone@example.com", "exited", at_ms=T0 + 10),  # exit then enter: one add
                event("gone@example.com", at_ms=T0 + 20, city="Paris"),
                dup,
                dup,
                event("late@example.com", at_ms=T0 + 50, city="Oslo"),  # newer first ...
                event("late@example.com", "exited", at_ms=T0 + 40),  # ... older arrives later
            ]
        )
        async with running(h):
            await h.wait_synced()
        members = h.members("news")
        assert h.active("news") == {"gone@example.com", "dup@example.com", "late@example.com"}
        assert field_values(members["gone@example.com"], "City") == ["Paris"]
        assert field_values(members["late@example.com"], "City") == ["Oslo"]
        assert "flip@example.com" not in members  # one removal of an address never added
        counts = h.sim.request_counts()
        assert sum(counts.get("import", {}).values()) == 1  # all adds in one import
        assert sum(counts.get("delete", {}).values()) == 1  # just flip's removal


async def test_late_event_after_newer_was_applied_is_ignored(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    async with SyncHarness(kafka_bootstrap, tmp_path, [Dest("news", "seg-a")]) as h, running(h):
        await h.produce([event("ada@example.com", at_ms=T0 + 5000)])
        await h.wait_synced()
        await h.produce([event("ada@example.com", "exited", at_ms=T0 + 1000)])  # older, late
        await h.wait_synced()
        assert h.state_of("news", "ada@example.com") == "Active"


async def test_invalid_records_are_dead_lettered_and_the_rest_applied(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    async with (
        SyncHarness(kafka_bootstrap, tmp_path, [Dest("news", "seg-a")], partitions=1) as h,
        running(h),
    ):
        huge = event("huge@example.com", extra={"blob": "x" * 9000})[1] * 8
        assert len(huge) > MAX_EVENT_BYTES
        records = [
            event("before@example.com"),
            (b"k1", b"{not json"),
            (b"k2", b'{"event_id": "e", "segment_id": "seg-a", "change": "sideways"}'),
            event(None, profile_id="no-email"),
            event("not-an-address", profile_id="bad-email"),
            (b"k3", huge),
            (b"k4", b"\xff\xfe\x00garbage"),
            event("after@example.com"),
        ]
        await h.produce(records)
        await h.wait_synced()
        assert h.active("news") == {"before@example.com", "after@example.com"}
        letters = await h.dead_letters(expect=6)
        assert len(letters) == 6
        by_offset = {int(headers_of(r)["cmsync-source"].rsplit("/", 1)[1]): r for r in letters}
        expected = {
            1: "invalid_json",
            2: "schema",
            3: "missing_email",
            4: "invalid_email",
            5: "too_large",
            6: "invalid_encoding",
        }
        assert {o: headers_of(r)["cmsync-error"] for o, r in by_offset.items()} == expected
        for offset, record in by_offset.items():
            headers = headers_of(record)
            assert record.value == records[offset][1]  # the original bytes
            assert record.key == records[offset][0]
            assert headers["cmsync-source"] == f"{h.topic}/0/{offset}"
            assert headers["cmsync-detail"]
            assert "@" not in headers["cmsync-detail"]
        assert headers_of(by_offset[3])["cmsync-destination"] == "news"


async def test_partial_import_failure_dead_letters_rejected_rows(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    dest = Dest("news", "seg-a")
    # Addresses the service lets through and Campaign Monitor (the simulator) refuses, Code 1.
    rejected = event("two..dots@example.com")
    # A key that is not the profile's id: kept with the change, not read back from the value.
    rejected_other_key = (b"not-the-profile-id", event("more..dots@example.com")[1])
    async with SyncHarness(kafka_bootstrap, tmp_path, [dest], partitions=1) as h, running(h):
        await h.produce(
            [event("ok1@example.com"), rejected, event("ok2@example.com"), rejected_other_key]
        )
        await h.wait_synced()
        assert h.active("news") == {"ok1@example.com", "ok2@example.com"}
        letters = await h.dead_letters(expect=2)
        assert len(letters) == 2
        by_source = {headers_of(letter)["cmsync-source"]: letter for letter in letters}
        assert set(by_source) == {f"{h.topic}/0/1", f"{h.topic}/0/3"}
        for source, (key, value) in (
            (f"{h.topic}/0/1", rejected),
            (f"{h.topic}/0/3", rejected_other_key),
        ):
            letter = by_source[source]
            assert (letter.key, letter.value) == (key, value)  # the original bytes
            headers = headers_of(letter)
            assert headers["cmsync-error"] == "cm_rejected"
            assert headers["cmsync-destination"] == "news"
            assert headers["cmsync-cm-code"] == "1"


async def test_one_segment_feeds_several_destinations(kafka_bootstrap: str, tmp_path: Path) -> None:
    dests = [
        Dest("news", "seg-a"),
        Dest("offers", "seg-a", removal="unsubscribe"),
        Dest("other", "seg-b"),
    ]
    async with SyncHarness(kafka_bootstrap, tmp_path, dests) as h, running(h):
        await h.produce(
            [
                event("ada@example.com", at_ms=T0),
                event("bob@example.com", at_ms=T0),
                event("bob@example.com", "exited", at_ms=T0 + 1),
                event("cy@example.com", segment="seg-b", at_ms=T0),
                event("dan@example.com", segment="unmapped", at_ms=T0),
            ]
        )
        await h.wait_synced()
        assert h.active("news") == {"ada@example.com"}
        assert h.active("offers") == {"ada@example.com"}
        assert h.active("other") == {"cy@example.com"}


async def test_bad_api_key_stalls_one_destination_and_its_changes_stay_owed(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    """A stalled destination holds nobody's offsets: its desired states are recorded in the
    membership state, and applied once the key is fixed (after a restart)."""
    dests = [Dest("good", "seg-a"), Dest("bad", "seg-b", api_key_env="CMSYNC_BAD_KEY")]
    env = {"CMSYNC_BAD_KEY": "wrong-key"}
    async with SyncHarness(kafka_bootstrap, tmp_path, dests, partitions=1, env=env) as h:
        async with running(h) as service:
            await h.produce(
                [
                    event("a1@example.com", at_ms=T0),
                    event("b1@example.com", segment="seg-b", at_ms=T0),  # offset 1: stalls
                    event("a2@example.com", at_ms=T0),
                ]
            )
            for _ in range(200):
                if h.active("good") == {"a1@example.com", "a2@example.com"}:
                    break
                await asyncio.sleep(0.05)
            assert h.active("good") == {"a1@example.com", "a2@example.com"}
            await asyncio.sleep(1.5)  # several commit ticks
            assert service.source.committed(0) == 3  # the state owes b1 to "bad"
            assert service.readiness() == (True, "joined")  # a metric and an alert instead
            up = obs.REGISTRY.get_sample_value("cmsync_destination_up", {"destination": "bad"})
            assert up == 0
        assert (await h.committed())[0] == 3
        assert h.active("bad") == set()
        h.extra_env["CMSYNC_BAD_KEY"] = API_KEY
        async with running(h):  # a fresh state dir: restored from the changelogs
            for _ in range(600):
                if h.active("bad") == {"b1@example.com"}:
                    break
                await asyncio.sleep(0.05)
        assert h.active("bad") == {"b1@example.com"}
        assert h.active("good") == {"a1@example.com", "a2@example.com"}


async def test_restart_resumes_from_committed_offsets(kafka_bootstrap: str, tmp_path: Path) -> None:
    async with SyncHarness(kafka_bootstrap, tmp_path, [Dest("news", "seg-a")], partitions=2) as h:
        async with running(h):
            await h.produce([event(f"u{i}@example.com", at_ms=T0 + i) for i in range(50)])
            await h.wait_synced()
        assert sum(v or 0 for v in (await h.committed()).values()) == 50
        h.sim.reset_stats()
        async with running(h):
            await h.produce([event("late-joiner@example.com", at_ms=T0 + 100)])
            await h.wait_synced()
        assert len(h.active("news")) == 51
        assert sum(h.sim.request_counts().get("import", {}).values()) == 1  # nothing re-sent
