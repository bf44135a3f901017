"""`cmsync reconcile` against the real parts: the bundled broker, the simulator over real HTTP
and the real service, which takes the repairs from its claims topic and applies them.

Drift is made by hand in the simulator, as an operator would in Campaign Monitor: a row gone
from the list, a row deleted, a person who unsubscribed, a field edited, a person added."""

from __future__ import annotations

import asyncio
import io
import os
import sys
from collections.abc import Callable
from pathlib import Path

import orjson
import pytest

from consumer import observability as obs
from consumer.devtools.rig import read_topic
from consumer.devtools.simulator import Served, SimulatorConfig
from consumer.membership.changelog import InternalTopics
from consumer.membership.codec import decode_claims_record
from consumer.membership.model import Repair
from consumer.reconcile import Outcome, reconcile, send_repairs
from tests.harness import Dest, SyncHarness, event, running

T0 = 1_764_417_600_000
PEOPLE = ("ada", "bob", "cat", "dan", "eve")


def address(who: str) -> str:
    return f"{who}@example.com"


async def seed(h: SyncHarness, dest: str = "news", segment: str = "seg-a") -> None:
    """Five members in the list, synced."""
    await h.produce([event(address(p), segment=segment, at_ms=T0) for p in PEOPLE])
    await h.wait_synced()
    assert h.active(dest) == {address(p) for p in PEOPLE}


def drift_by_hand(h: SyncHarness, dest: str = "news") -> None:
    """ada gone from the list, bob deleted by hand, cat unsubscribed, dan's City edited, and a
    person added by hand; eve as the sync left her."""
    list_id = h.list_ids[dest]
    h.sim.forget(list_id, address("ada"))
    h.sim.force_state(list_id, address("bob"), "Deleted")
    h.sim.force_state(list_id, address("cat"), "Unsubscribed")
    h.sim.state.get(h.sim.state.lists[list_id], address("dan")).fields = ("City", "Paris")
    h.sim.force_state(list_id, "hand@example.com", "Active")


def counts(outcome: Outcome, dest: str = "news") -> dict[str, int]:
    [drift] = [d for d in outcome.drifts if d.name == dest]
    assert drift.failed is None, drift.failed
    return {"expected": drift.expected, "active": drift.active} | {
        kind: n for kind, n in drift.counts.items()
    }


def city(h: SyncHarness, dest: str, who: str) -> list[str]:
    fields = h.members(dest)[address(who)]["CustomFields"]
    return [f["Value"] for f in fields if f["Key"] == "City"]


def repairs_taken(dest: str, kind: str) -> float:
    value: float = obs.drift_repairs.labels(destination=dest, kind=kind)._value.get()
    return value


def found(dest: str) -> dict[str, float]:
    """The service's `cmsync_drift_found` gauges of a destination, by kind."""
    return {
        kind: obs.REGISTRY.get_sample_value(
            "cmsync_drift_found", {"destination": dest, "kind": kind}
        )
        or 0.0
        for kind in ("missing", "extra", "stale", "protected")
    }


async def claims_repairs(h: SyncHarness) -> list[Repair]:
    """The repair records of the rig's claims topic (read from the start)."""
    topic = InternalTopics.of_group(h.group).claims
    records = await read_topic(h.bootstrap, topic, enough=lambda _: False, within_s=1.0)
    found = (decode_claims_record(r.key, r.value) for r in records)
    return [r for r in found if isinstance(r, Repair)]


async def until(h: SyncHarness, condition: Callable[[], bool], what: str) -> None:
    await h.wait_for(condition, 20, what, every_s=0.05)


async def test_each_kind_of_drift_is_reported_and_repaired_through_the_service(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    async with SyncHarness(kafka_bootstrap, tmp_path, [Dest("news", "seg-a")]) as h, running(h):
        await seed(h)
        drift_by_hand(h)
        before = repairs_taken("news", "reassert")
        report = io.BytesIO()
        outcome = await reconcile(h.settings(), report=report)
        assert counts(outcome) == {
            "expected": 5,
            "active": 3,  # dan, eve, the person added by hand
            "missing": 1,  # ada
            "extra": 1,  # added by hand: kept (extras = "keep")
            "stale": 1,  # dan
            "protected": 2,  # bob deleted by hand, cat unsubscribed (deleted-only)
        }
        assert outcome.drifts[0].repairs_sent == 2
        detail = sorted(
            (line["kind"], line["address"]) for line in map(orjson.loads, report.getvalue().split())
        )
        assert detail == [
            ("extra", "hand@example.com"),
            ("missing", address("ada")),
            ("protected", address("bob")),
            ("protected", address("cat")),
            ("stale", address("dan")),
        ]
        await until(
            h,
            lambda: (
                h.state_of("news", address("ada")) == "Active"
                and city(h, "news", "dan") == ["London"]
            ),
            "ada back and dan's City repaired",
        )
        assert city(h, "news", "ada") == ["London"]
        assert h.state_of("news", address("bob")) == "Deleted"  # protected: untouched
        assert h.state_of("news", address("cat")) == "Unsubscribed"
        assert h.state_of("news", "hand@example.com") == "Active"  # extras kept
        assert repairs_taken("news", "reassert") == before + 2
        # what was found is handed to the service too, which exports it
        first = {"missing": 1, "extra": 1, "stale": 1, "protected": 2}
        await until(h, lambda: found("news") == first, "the findings exported")
        again = await reconcile(h.settings())
        assert counts(again) == {
            "expected": 5,
            "active": 4,
            "missing": 0,
            "extra": 1,
            "stale": 0,
            "protected": 2,
        }
        assert again.drifts[0].repairs_sent == 0
        second = {"missing": 0, "extra": 1, "stale": 0, "protected": 2}
        await until(h, lambda: found("news") == second, "the second run's findings exported")


async def test_extras_are_removed_on_request_and_always_brings_back_what_was_deleted_by_hand(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    dest = Dest("news", "seg-a", extras="remove", resubscribe="always")
    async with SyncHarness(kafka_bootstrap, tmp_path, [dest]) as h, running(h):
        await seed(h)
        drift_by_hand(h)
        outcome = await reconcile(h.settings())
        assert counts(outcome) == {
            "expected": 5,
            "active": 3,
            "missing": 3,  # ada, and bob and cat: resubscribe = "always"
            "extra": 1,
            "stale": 1,
            "protected": 0,
        }
        assert outcome.drifts[0].repairs_sent == 5
        await until(
            h,
            lambda: h.active("news") == {address(p) for p in PEOPLE},
            "every member active, the extra gone",
        )
        assert h.state_of("news", "hand@example.com") == "Deleted"  # removal = "delete"


async def test_dry_run_writes_nothing_anywhere_and_destination_limits_the_run(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    dests = [Dest("news", "seg-a"), Dest("other", "seg-b")]
    async with SyncHarness(kafka_bootstrap, tmp_path, dests) as h:
        async with running(h):
            await seed(h)
            await seed(h, "other", "seg-b")
        drift_by_hand(h)
        drift_by_hand(h, "other")
        served: list[Served] = []
        stop = h.sim.observe(served.append)
        try:
            outcome = await reconcile(h.settings(), dry_run=True)
        finally:
            stop()
        assert counts(outcome)["missing"] == counts(outcome, "other")["missing"] == 1
        assert outcome.drifts[0].repairs
        assert outcome.drifts[0].repairs_sent == 0
        assert served
        assert {s.method for s in served} == {"GET"}
        assert await claims_repairs(h) == []
        assert h.state_of("news", address("ada")) is None

        served.clear()
        stop = h.sim.observe(served.append)
        try:
            limited = await reconcile(h.settings(), names=["other"])
        finally:
            stop()
        assert [d.name for d in limited.drifts] == ["other"]
        assert {s.list_id for s in served if s.list_id in h.list_ids.values()} == {
            h.list_ids["other"]
        }
        sent = await claims_repairs(h)  # the control: a run that repairs does write them
        assert sorted((r.list_id, r.kind) for r in sent) == [(h.list_ids["other"], "reassert")] * 2


@pytest.mark.parametrize("exit_first", [True, False])
async def test_a_change_racing_a_repair_wins(
    kafka_bootstrap: str, tmp_path: Path, exit_first: bool
) -> None:
    """The reconcile finds ada missing; before its repair is applied, ada leaves the segment.
    Whichever of the two the service takes first, ada ends out of the list."""
    async with SyncHarness(kafka_bootstrap, tmp_path, [Dest("news", "seg-a")]) as h:
        async with running(h):
            await seed(h)
        h.sim.forget(h.list_ids["news"], address("ada"))
        found = await reconcile(h.settings(), dry_run=True)  # computed, not sent yet
        [repair] = found.drifts[0].repairs
        topics = InternalTopics.of_group(h.group)
        kafka = h.settings().kafka.client_kwargs()
        taken = repairs_taken("news", "reassert")
        async with running(h):
            if exit_first:
                await h.produce([event(address("ada"), "exited", at_ms=T0 + 1000)])
                await h.wait_synced()
                await send_repairs(kafka, topics, [repair])
            else:
                await send_repairs(kafka, topics, [repair])
                await h.produce([event(address("ada"), "exited", at_ms=T0 + 1000)])
            await until(h, lambda: repairs_taken("news", "reassert") > taken, "the repair taken")
            await h.wait_synced()
            await asyncio.sleep(1.0)  # several flush intervals: a wrong write would be out
        assert h.state_of("news", address("ada")) in (None, "Deleted")
        assert h.active("news") == {address(p) for p in PEOPLE if p != "ada"}


async def test_a_reconcile_that_died_while_sending_is_rerun_and_converges(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    """A crash leaves some repair records acknowledged and not the others. The rerun repairs
    the rest; every address is written once: nothing is applied twice."""
    config = SimulatorConfig(api_keys=("test-key-0001",), apply_log=True)
    async with (
        SyncHarness(kafka_bootstrap, tmp_path, [Dest("news", "seg-a")], sim_config=config) as h,
        running(h),
    ):
        await seed(h)
        for who in PEOPLE:
            h.sim.forget(h.list_ids["news"], address(who))
        h.sim.reset_stats()
        found = await reconcile(h.settings(), dry_run=True)
        repairs = found.drifts[0].repairs
        assert len(repairs) == 5
        kafka = h.settings().kafka.client_kwargs()
        await send_repairs(kafka, InternalTopics.of_group(h.group), repairs[:2])  # then died
        await until(h, lambda: len(h.active("news")) == 2, "the sent repairs applied")
        rerun = await reconcile(h.settings())
        assert counts(rerun)["missing"] == 3
        await until(h, lambda: len(h.active("news")) == 5, "the rest repaired")
        await asyncio.sleep(1.0)
        writes = [w.email for w in h.sim.applied_writes()]
        assert sorted(writes) == sorted(address(p) for p in PEOPLE)  # each once


async def test_a_reconcile_killed_while_reading_wrote_nothing_and_its_rerun_repairs(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    """SIGKILL while the command reads the list: no repair was sent (they go out once every
    list is read), and the next run does the whole job."""
    async with SyncHarness(kafka_bootstrap, tmp_path, [Dest("news", "seg-a")]) as h, running(h):
        await seed(h)
        h.sim.forget(h.list_ids["news"], address("ada"))
        proc = await spawn_command(h)

        def kill(served: Served) -> None:
            if served.endpoint == "members" and proc.returncode is None:
                proc.kill()

        stop = h.sim.observe(kill)
        try:
            assert await asyncio.wait_for(proc.wait(), 60) == -9
        finally:
            stop()
        assert await claims_repairs(h) == []
        code, _, err = await command(h)
        assert code == 0, err
        await until(h, lambda: h.state_of("news", address("ada")) == "Active", "ada repaired")


async def test_an_unreachable_campaign_monitor_fails_the_destination_by_name(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    async with SyncHarness(kafka_bootstrap, tmp_path, [Dest("news", "seg-a")]) as h:
        async with running(h):
            await seed(h)
        h.sim.update_faults({"outage": True})
        outcome = await reconcile(h.settings(), stall_s=1.5)
        [failed] = outcome.failed
        assert failed.name == "news"
        assert failed.failed is not None
        assert "no progress" in failed.failed
        assert await claims_repairs(h) == []


async def test_the_command_prints_counts_only_and_reports_addresses_where_asked(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    async with SyncHarness(kafka_bootstrap, tmp_path, [Dest("news", "seg-a")]) as h:
        async with running(h):
            await seed(h)
            drift_by_hand(h)
            report = tmp_path / "drift.jsonl"
            code, out, err = await command(h, "--report", str(report))
            assert code == 0, err
            assert "@" not in out
            assert "@" not in err
            table = [line.split() for line in out.splitlines() if line.startswith("news ")]
            assert table == [["news", "5", "3", "1", "1", "1", "2", "2"]]
            assert report.stat().st_mode & 0o777 == 0o600  # addresses: for its owner only
            kinds = sorted(orjson.loads(line)["kind"] for line in report.read_text().splitlines())
            assert kinds == ["extra", "missing", "protected", "protected", "stale"]
            await until(h, lambda: h.state_of("news", address("ada")) == "Active", "repaired")
        code, out, err = await command(h, "--destination", "nope")
        assert code == 2
        assert "unknown destination(s) nope" in err
        code, out, _ = await command(h, "--help")
        assert code == 0
        assert "--dry-run" in out


async def spawn_command(h: SyncHarness, *args: str) -> asyncio.subprocess.Process:
    """`cmsync reconcile ARGS` started as a child process with the rig's environment."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CMSYNC_")}
    env.update(h.env())
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "consumer",
        "reconcile",
        *args,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )


async def command(h: SyncHarness, *args: str) -> tuple[int, str, str]:
    """`cmsync reconcile ARGS` run to its end: (exit code, stdout, stderr)."""
    proc = await spawn_command(h, *args)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()
