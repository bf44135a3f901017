"""consumer.membership.changelog against a real broker: internal topics, writes and restore."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from consumer.devtools.embedded_broker import create_topics
from consumer.membership.changelog import (
    InternalTopics,
    TopicLayoutError,
    checkpoint,
    ensure_internal_topics,
    restore,
)
from consumer.membership.durable import PartitionStore


def unique(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:8]}"


@dataclass
class Kit:
    """A producer and a group-less restore consumer on the test broker."""

    bootstrap: str
    producer: AIOKafkaProducer
    restorer: AIOKafkaConsumer

    async def topic(self, partitions: int) -> str:
        name = unique("changelog")
        await create_topics(self.bootstrap, {name: partitions})
        return name

    async def checkpoint(self, topic: str, partition: int, store: PartitionStore) -> None:
        """What an owner does at a checkpoint (changelog first, then the disk)."""
        assert store.pending()  # each checkpoint of these tests writes something
        await checkpoint(self.producer, topic, partition, store)

    async def restore(
        self,
        topic: str,
        partition: int,
        path: Path,
        progress: Callable[[int, int | None], None] | None = None,
    ) -> PartitionStore:
        return await restore(self.restorer, topic, partition, path, progress=progress)


@pytest.fixture
def kit(
    kafka_bootstrap: str, kafka_producer: AIOKafkaProducer, restore_consumer: AIOKafkaConsumer
) -> Kit:
    return Kit(kafka_bootstrap, kafka_producer, restore_consumer)


async def test_internal_topics_are_created_with_the_input_partition_count(
    kafka_bootstrap: str,
) -> None:
    group, source = unique("group"), unique("input")
    await create_topics(kafka_bootstrap, {source: 3})
    topics = InternalTopics.of_group(group)
    assert topics.members_changelog == f"{group}.members-changelog"

    with pytest.raises(TopicLayoutError, match=r"internal topics missing: .*members-changelog"):
        await ensure_internal_topics(
            {"bootstrap_servers": kafka_bootstrap}, source, topics, create=False
        )
    assert await ensure_internal_topics({"bootstrap_servers": kafka_bootstrap}, source, topics) == 3
    # Again, as every replica does at start: nothing to create, the layout checks out.
    assert (
        await ensure_internal_topics(
            {"bootstrap_servers": kafka_bootstrap}, source, topics, create=False
        )
        == 3
    )


async def test_a_different_partition_count_is_a_clear_error(kafka_bootstrap: str) -> None:
    group, source = unique("group"), unique("input")
    topics = InternalTopics.of_group(group)
    await create_topics(kafka_bootstrap, {source: 3, topics.claims: 2})
    with pytest.raises(TopicLayoutError, match=rf"has 3\): {topics.claims} has 2"):
        await ensure_internal_topics({"bootstrap_servers": kafka_bootstrap}, source, topics)


async def test_a_missing_input_topic_is_a_clear_error(kafka_bootstrap: str) -> None:
    with pytest.raises(TopicLayoutError, match=r"input topic .* does not exist"):
        await ensure_internal_topics(
            {"bootstrap_servers": kafka_bootstrap},
            unique("absent"),
            InternalTopics.of_group(unique("g")),
        )


async def test_an_empty_state_dir_is_rebuilt_from_the_changelog(kit: Kit, tmp_path: Path) -> None:
    topic = await kit.topic(2)
    owner = PartitionStore(tmp_path / "owner")
    for i in range(250):
        owner.put(b"k%03d" % (i % 100), b"v%d" % i)  # keys written several times
        if i % 7 == 0:
            owner.put(b"k%03d" % ((i * 3) % 100), None)  # and deleted
        if i % 50 == 49:
            await kit.checkpoint(topic, 1, owner)
    owner.put(b"last", b"x")
    await kit.checkpoint(topic, 1, owner)
    expected = list(owner.scan(b""))
    assert expected  # the test means something

    seen: list[tuple[int, int | None]] = []
    copy = await kit.restore(topic, 1, tmp_path / "copy", lambda *a: seen.append(a))
    assert list(copy.scan(b"")) == expected
    assert copy.changelog_offset == owner.changelog_offset
    assert seen[-1][1] == 0  # nothing left at the end
    copy.close()

    # The other partition of the changelog is another store: empty.
    other = await kit.restore(topic, 0, tmp_path / "other")
    assert list(other.scan(b"")) == []
    other.close()
    owner.close()


async def test_a_restore_reads_only_what_came_after_the_last_checkpoint(
    kit: Kit, tmp_path: Path
) -> None:
    topic = await kit.topic(1)
    owner = PartitionStore(tmp_path / "owner")
    owner.put(b"a", b"1")
    owner.put(b"b", b"1")
    await kit.checkpoint(topic, 0, owner)
    copy = await kit.restore(topic, 0, tmp_path / "copy")
    copy.close()  # this replica stops; the owner goes on

    owner.put(b"a", None)
    owner.put(b"c", b"2")
    await kit.checkpoint(topic, 0, owner)
    counts: list[int] = []
    copy = await kit.restore(topic, 0, tmp_path / "copy", lambda done, _: counts.append(done))
    assert list(copy.scan(b"")) == [(b"b", b"1"), (b"c", b"2")]
    assert counts[-1] == 2  # the two records of the second checkpoint, not all four
    copy.close()
    owner.close()


async def test_a_state_dir_ahead_of_its_changelog_is_rebuilt(kit: Kit, tmp_path: Path) -> None:
    """A changelog deleted and re-created under the same name: the local state is not its."""
    topic = await kit.topic(1)
    stale = PartitionStore(tmp_path / "state")
    stale.put(b"gone", b"x")
    stale.checkpoint(1000)  # as if written to an older topic that got that far
    stale.close()
    owner = PartitionStore(tmp_path / "owner")
    owner.put(b"kept", b"y")
    await kit.checkpoint(topic, 0, owner)
    owner.close()

    state = await kit.restore(topic, 0, tmp_path / "state")
    assert list(state.scan(b"")) == [(b"kept", b"y")]
    assert state.changelog_offset == 0
    state.close()
