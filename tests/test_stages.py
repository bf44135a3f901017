"""consumer.membership.stageone against a real broker: claims before changelog before disk, and
what a crash at each step leaves."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
import pytest_asyncio
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from consumer.devtools.embedded_broker import create_topics
from consumer.devtools.rig import read_topic
from consumer.membership import Applied, Claim, Desired, ProfileChange
from consumer.membership.changelog import InternalTopics, restore
from consumer.membership.codec import address_key, decode_claim
from consumer.membership.durable import PartitionStore
from consumer.membership.stages import Durable, StageOne, StageTwo, claim_partition

LISTS_OF = {"vip": ("list-a", "list-b")}
PARTITIONS = 3
INPUT_PARTITION = 1


def changes() -> list[ProfileChange]:
    return [
        ProfileChange("vip", "ada", True, 10, 0, "Ada@X.io", {"city": "Paris"}),
        ProfileChange("vip", "bob", True, 11, 1, "home@x.io", {}),
        ProfileChange("vip", "ada", True, 12, 2, "ada@new.io", {"city": "Oslo"}),
        ProfileChange("vip", "bob", False, 13, 3),
        ProfileChange("other", "cy", True, 14, 4, "cy@x.io", {}),  # no list: state only
    ]


class Setup:
    def __init__(self, bootstrap: str, producer: AIOKafkaProducer, restorer: AIOKafkaConsumer):
        self.bootstrap, self.producer, self.restorer = bootstrap, producer, restorer
        self.topics = InternalTopics.of_group(f"g-{uuid.uuid4().hex[:8]}")

    def stage(self, store: PartitionStore, *, changelog_partition: int | None = None) -> StageOne:
        partition = INPUT_PARTITION if changelog_partition is None else changelog_partition
        state = Durable(partition, store, self.producer, self.topics.members_changelog)
        return StageOne(state, LISTS_OF, self.topics.claims)

    async def claims(self, at_least: int) -> list[tuple[int, Claim]]:
        records = await read_topic(
            self.bootstrap, self.topics.claims, enough=lambda r: len(r) >= at_least, within_s=10
        )
        return [(r.partition, decode_claim(r.key, r.value)) for r in records]

    async def restore(self, path: Path) -> PartitionStore:
        return await restore(self.restorer, self.topics.members_changelog, INPUT_PARTITION, path)


@pytest_asyncio.fixture
async def setup(
    kafka_bootstrap: str, kafka_producer: AIOKafkaProducer, restore_consumer: AIOKafkaConsumer
) -> Setup:
    s = Setup(kafka_bootstrap, kafka_producer, restore_consumer)
    await create_topics(
        kafka_bootstrap,
        {s.topics.claims: PARTITIONS, s.topics.members_changelog: PARTITIONS},
    )
    return s


def summary(claims: list[tuple[int, Claim]]) -> list[tuple[str, str, str, bool]]:
    return sorted((c.list_id, c.address, c.member[1], c.holds) for _, c in claims)


async def test_claims_reach_one_partition_per_address_and_the_state_is_durable(
    setup: Setup, tmp_path: Path
) -> None:
    store = PartitionStore(tmp_path / "members")
    stage = setup.stage(store)
    for change in changes():
        assert stage.apply(change).accepted
    await stage.checkpoint()
    assert stage.pending_claims == 0
    assert store.pending() == []
    assert store.changelog_offset is not None

    claims = await setup.claims(at_least=10)
    assert summary(claims) == sorted(
        [
            (lst, address, member, holds)
            for lst in ("list-a", "list-b")
            for address, member, holds in [
                ("ada@x.io", "ada", True),  # normalised
                ("ada@x.io", "ada", False),  # released on the address change
                ("ada@new.io", "ada", True),
                ("home@x.io", "bob", True),
                ("home@x.io", "bob", False),
            ]
        ]
    )
    partition_of: dict[tuple[str, str], set[int]] = {}
    for partition, claim in claims:
        partition_of.setdefault((claim.list_id, claim.address), set()).add(partition)
        assert partition == claim_partition(address_key(claim.list_id, claim.address), PARTITIONS)
    assert all(len(p) == 1 for p in partition_of.values())  # one owner per (list, address)
    assert len(set().union(*partition_of.values())) > 1  # and the keys do spread

    # A fresh state dir rebuilt from the changelog decides alike: everything read again is old.
    store.close()
    copy = await setup.restore(tmp_path / "copy")
    again = setup.stage(copy)
    assert not any(again.apply(change).accepted for change in changes())
    copy.close()


async def test_a_crash_before_the_changelog_makes_the_same_claims_again(
    setup: Setup, tmp_path: Path
) -> None:
    """Claims acknowledged, changelog not: the input is read again and decided again."""
    store = PartitionStore(tmp_path / "members")
    stage = setup.stage(store, changelog_partition=PARTITIONS + 5)  # a write that must fail
    for change in changes():
        stage.apply(change)
    with pytest.raises(AssertionError, match="Unrecognized partition"):  # aiokafka's check
        await stage.checkpoint()
    assert store.pending() == []
    assert store.changelog_offset is None
    first = await setup.claims(at_least=10)
    store.close()

    restored = await setup.restore(tmp_path / "members")  # what a restart does
    stage = setup.stage(restored)
    assert all(stage.apply(change).accepted for change in changes())
    await stage.checkpoint()
    both = await setup.claims(at_least=20)
    assert summary(both) == sorted(summary(first) * 2)  # the same claims, versions included
    assert sorted(c.version for _, c in both) == sorted([c.version for _, c in first] * 2)
    restored.close()


async def test_a_crash_after_the_changelog_ignores_the_changes_read_again(
    setup: Setup, tmp_path: Path
) -> None:
    """Changelog acknowledged, disk not written: the restore brings the states back, so the
    changes read again are not newer and make no claims (theirs were acknowledged first)."""
    store = PartitionStore(tmp_path / "members")
    stage = setup.stage(store)
    for change in changes():
        stage.apply(change)
    await stage.checkpoint()
    store.close()
    PartitionStore.wipe(tmp_path / "members")  # the disk never got it (or the pod moved)

    restored = await setup.restore(tmp_path / "members")
    stage = setup.stage(restored)
    verdicts = [stage.apply(change) for change in changes()]
    assert [v.accepted for v in verdicts] == [False] * len(verdicts)
    assert stage.pending_claims == 0
    restored.close()


async def test_stage_two_owes_after_a_restore_exactly_what_was_not_applied(
    setup: Setup, tmp_path: Path
) -> None:
    """Stage 2 over the claims stage 1 sent: a checkpoint makes the claims committable, and a
    new owner, rebuilt from the changelog, knows what it still has to write."""
    one = setup.stage(PartitionStore(tmp_path / "members"))
    for change in changes():
        one.apply(change)
    await one.checkpoint()
    one.state.store.close()
    claims = await setup.claims(at_least=10)
    changelog = setup.topics.addresses_changelog
    await create_topics(setup.bootstrap, {changelog: PARTITIONS})

    # One stage 2 per claims partition, as the owners of those partitions would run them.
    stages: dict[int, StageTwo] = {}
    desired: list[Desired] = []
    for partition, claim in claims:
        if partition not in stages:
            store = PartitionStore(tmp_path / f"addresses-{partition}")
            stages[partition] = StageTwo(Durable(partition, store, setup.producer, changelog))
        made = stages[partition].apply(claim)
        if made is not None:
            desired.append(made)
    latest = {(d.list_id, d.address): d for d in desired}
    assert {k for k, d in latest.items() if d.active} == {
        ("list-a", "ada@new.io"),
        ("list-b", "ada@new.io"),
    }
    # The sync wrote list-a's changes, not list-b's yet; then every stage checkpoints.
    for (list_id, _), d in latest.items():
        if list_id == "list-a":
            owner = next(p for p, c in claims if (c.list_id, c.address) == (list_id, d.address))
            stages[owner].record_applied(d, Applied.ACTIVE if d.active else Applied.REMOVED)
    for stage in stages.values():
        await stage.checkpoint()
        stage.state.store.close()

    owed: list[Desired] = []
    for partition in stages:
        store = await restore(setup.restorer, changelog, partition, tmp_path / f"new-{partition}")
        again = StageTwo(Durable(partition, store, setup.producer, changelog))
        owed += again.owed(["list-a", "list-b"])
        # Claims read again (their offsets were not committed yet) change nothing.
        assert [again.apply(c) for p, c in claims if p == partition] == [None] * sum(
            1 for p, _ in claims if p == partition
        )
        store.close()
    # list-b owes the add of ada@new.io; ada@x.io and home@x.io were never applied there
    # (added and removed before any write), so nothing is owed for them.
    assert sorted((d.list_id, d.address, d.active) for d in owed) == [
        ("list-b", "ada@new.io", True)
    ]
