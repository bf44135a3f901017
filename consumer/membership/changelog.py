"""The membership state's Kafka side: internal topic names, their creation, changelog writes and
restore.

Topics (contract: named from the group id, ``<group>.<name>``, with the input topic's partition
count):

* ``<group>.members-changelog`` (compacted): stage 1's state, partition p for input partition p;
* ``<group>.claims`` (the repartition topic, deleted by time like the input): stage 1's claims,
  keyed by (list, address), so every address has one owner in stage 2;
* ``<group>.addresses-changelog`` (compacted): stage 2's state, partition q for claims
  partition q.

A changelog record's key is the state key and its value the encoded state, or None (a
tombstone) for a deleted key. `checkpoint` sends a store's pending items (`send_batched`, which
returns the offset of the last once the broker acknowledged all of them) and only then writes
the checkpoint to disk (`PartitionStore.checkpoint`). `restore` brings a store up to the end of its
changelog partition: from the offset of its last checkpoint, or from the start for an empty
state directory; a store whose checkpoint is past the end of its changelog belongs to another
topic (deleted and re-created) and is rebuilt from scratch.

The bundled broker answers ListOffsets wrongly, so the end of a partition is read from fetch
responses (the high watermark), never from ``end_offsets``.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError

from consumer.membership.durable import PartitionStore

__all__ = [
    "InputTopicMissingError",
    "InternalTopics",
    "TopicLayoutError",
    "checkpoint",
    "ensure_internal_topics",
    "restore",
    "restore_all",
    "send_batched",
]

#: Records read per fetch while restoring.
RESTORE_BATCH: Final = 10_000
#: How long one restore fetch waits for records before it looks at the high watermark again.
RESTORE_FETCH_MS: Final = 500

COMPACTED: Final = {"cleanup.policy": "compact"}


class TopicLayoutError(RuntimeError):
    """An internal topic exists with another partition count than the input topic's, or is
    missing while the service may not create it."""


class InputTopicMissingError(TopicLayoutError):
    """The input topic does not exist (yet): the internal topics cannot be sized."""


@dataclass(frozen=True, slots=True)
class InternalTopics:
    members_changelog: str
    claims: str
    addresses_changelog: str

    @classmethod
    def of_group(cls, group_id: str) -> InternalTopics:
        return cls(
            f"{group_id}.members-changelog",
            f"{group_id}.claims",
            f"{group_id}.addresses-changelog",
        )

    def configs(self) -> dict[str, dict[str, str]]:
        """Each topic's configuration when the service creates it."""
        return {
            self.members_changelog: COMPACTED,
            self.claims: {},
            self.addresses_changelog: COMPACTED,
        }


async def _partition_counts(admin: AIOKafkaAdminClient, topics: Sequence[str]) -> dict[str, int]:
    """Partition count of each existing topic among ``topics``."""
    existing = set(await admin.list_topics())
    wanted = [t for t in topics if t in existing]
    if not wanted:
        return {}
    described: list[dict[str, Any]] = await admin.describe_topics(wanted)
    return {d["topic"]: len(d["partitions"]) for d in described if d.get("partitions")}


async def ensure_internal_topics(
    client: Mapping[str, object],
    input_topic: str,
    topics: InternalTopics,
    *,
    create: bool = True,
    replication_factor: int = -1,
) -> int:
    """Check (and, with ``create``, create what is missing of) the internal topics; returns the
    partition count they share with ``input_topic``. ``client``: the Kafka client's keyword
    arguments (``KafkaSettings.client_kwargs``). ``replication_factor`` -1 takes the broker's
    default. Raises `TopicLayoutError` with what to do."""
    names = list(topics.configs())
    admin = AIOKafkaAdminClient(**client)
    await admin.start()
    try:
        counts = await _partition_counts(admin, [input_topic, *names])
        if input_topic not in counts:
            raise InputTopicMissingError(f"the input topic {input_topic} does not exist")
        partitions = counts[input_topic]
        wrong = [f"{n} has {counts[n]}" for n in names if n in counts and counts[n] != partitions]
        if wrong:
            raise TopicLayoutError(
                f"internal topics must have the input topic's partition count ({input_topic}"
                f" has {partitions}): {', '.join(wrong)}; delete them to have them re-created"
                " (the state is rebuilt from the input) or give them that count"
            )
        missing = [n for n in names if n not in counts]
        if missing and not create:
            raise TopicLayoutError(
                f"internal topics missing: {', '.join(missing)}; create them with {partitions}"
                " partitions (changelogs compacted), or let the service create them"
            )
        if missing:
            configs = topics.configs()
            # An empty replica assignment is how aiokafka lets a replication factor of -1 (the
            # broker's default.replication.factor, KIP-464) through its argument check.
            new = [
                NewTopic(
                    n,
                    partitions,
                    replication_factor,
                    replica_assignments={} if replication_factor == -1 else None,
                    topic_configs=configs[n],
                )
                for n in missing
            ]
            # Another replica may have created them first: the counts are checked again below.
            with contextlib.suppress(TopicAlreadyExistsError):
                await admin.create_topics(new)
            counts = await _partition_counts(admin, names)
            wrong = [n for n in names if counts.get(n) != partitions]
            if wrong:
                raise TopicLayoutError(
                    f"internal topics not created with {partitions} partitions: {', '.join(wrong)}"
                )
        return partitions
    finally:
        await admin.close()


async def send_batched(
    producer: AIOKafkaProducer,
    topic: str,
    partition: int,
    items: Iterable[tuple[bytes, bytes | None]],
) -> int | None:
    """Send records to one partition, in order, as whole batches; the offset of the last once
    the broker acknowledged all of them (None for no items).

    Batches rather than one `send` per record: a `send` costs a coroutine and a future per
    record, several times what appending to a batch costs (bench/state.py). The producer keeps
    one batch per partition in flight, so the batches land in the order they are sent.
    """
    sent: list[tuple[asyncio.Future[Any], int]] = []
    batch = producer.create_batch()
    for key, value in items:
        while batch.append(key=key, value=value, timestamp=None) is None:  # full: send it
            batch.close()
            sent.append(
                (await producer.send_batch(batch, topic, partition=partition), batch.record_count())
            )
            batch = producer.create_batch()
    if batch.record_count():
        # Closed: complete as it is, so the producer sends it at once instead of letting it
        # linger for records that will never come (the caller waits for its acknowledgement).
        batch.close()
        sent.append(
            (await producer.send_batch(batch, topic, partition=partition), batch.record_count())
        )
    if not sent:
        return None
    for future, _ in sent:
        await future
    last, count = sent[-1]
    return int(last.result().offset) + count - 1


async def checkpoint(
    producer: AIOKafkaProducer, topic: str, partition: int, store: PartitionStore
) -> None:
    """Make ``store``'s pending checkpoint durable: changelog first (acknowledged), then the
    disk. On an exception the pending checkpoint is dropped (the disk keeps the last one) and
    the exception propagates: the caller reads its input again from the committed offset."""
    try:
        offset = await send_batched(producer, topic, partition, store.pending())
    except BaseException:
        store.discard()
        raise
    if offset is not None:
        store.checkpoint(offset)


async def restore(
    consumer: AIOKafkaConsumer,
    topic: str,
    partition: int,
    path: Path,
    *,
    progress: Callable[[int, int | None], None] | None = None,
) -> PartitionStore:
    """`restore_all` of one partition."""
    tp = TopicPartition(topic, partition)
    return (await restore_all(consumer, {tp: path}, progress=progress))[tp]


async def restore_all(
    consumer: AIOKafkaConsumer,
    paths: Mapping[TopicPartition, Path],
    *,
    progress: Callable[[int, int | None], None] | None = None,
) -> dict[TopicPartition, PartitionStore]:
    """Open the store of each changelog partition at its path and bring it up to the end of
    that partition, all partitions at once (one fetch session: restoring twelve empty
    partitions takes one fetch wait, not twelve).

    ``consumer`` is one without a group (the caller's restore consumer); it is assigned the
    partitions for the time of the restore. ``progress(restored, remaining)`` is called after
    each fetch, over all partitions (remaining None while some end is not known yet).
    """
    stores: dict[TopicPartition, PartitionStore] = {}
    try:
        for tp, path in paths.items():
            stores[tp] = PartitionStore(path)
        consumer.assign(list(paths))
        unchecked: set[TopicPartition] = set()
        for tp, store in stores.items():
            start = store.changelog_offset
            if start is None:
                await consumer.seek_to_beginning(tp)
            else:
                consumer.seek(tp, start + 1)
                unchecked.add(tp)
        left = dict.fromkeys(paths, -1)  # records still to read; -1 while not known
        restored = 0
        while any(n != 0 for n in left.values()):
            batches = await consumer.getmany(
                *[tp for tp, n in left.items() if n],
                timeout_ms=RESTORE_FETCH_MS,
                max_records=RESTORE_BATCH,
            )
            for tp, records in batches.items():
                if records:
                    stores[tp].apply_changelog(
                        [(r.key, r.value) for r in records], records[-1].offset
                    )
                    restored += len(records)
            for tp in list(left):
                if not left[tp]:
                    continue
                end = consumer.highwater(tp)
                if end is None:  # no fetch response yet
                    continue
                offset = stores[tp].changelog_offset
                if tp in unchecked and offset is not None and offset >= end:
                    # The checkpoint covers records the changelog does not have: the state
                    # was written to another (deleted and re-created) topic. Rebuild it.
                    unchecked.discard(tp)
                    stores[tp].close()
                    PartitionStore.wipe(paths[tp])
                    stores[tp] = PartitionStore(paths[tp])
                    await consumer.seek_to_beginning(tp)
                    continue
                unchecked.discard(tp)
                left[tp] = max(0, end - await consumer.position(tp))
            if progress:
                unknown = any(n < 0 for n in left.values())
                progress(restored, None if unknown else sum(left.values()))
        return stores
    except BaseException:
        for store in stores.values():
            store.close()
        raise
    finally:
        consumer.unsubscribe()
