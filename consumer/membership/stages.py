"""The two stages of one partition each, durable: state in a `PartitionStore`, checkpoints
through the changelog.

Stage 1 (`StageOne`, per input partition): changes in, claims out. It wraps a `MemberTable`
over the partition's `PartitionStore`. `apply` decides each change (in memory: the pending
checkpoint) and collects the claims it makes; `checkpoint` makes all of it durable, in the only
order that loses nothing:

  1. send the claims to the claims (repartition) topic, keyed by (list, address), and wait
     until the broker acknowledged every one;
  2. then send the state's pending writes to the members changelog (partition = the input
     partition) and wait for those acknowledgements;
  3. then write the checkpoint to disk with the changelog offset it reached.

Only after `checkpoint` returns may the input offsets of the applied changes be committed.

Why this order: a crash before 2 is acknowledged leaves the changelog without the new states, so
the changes, read again from the input, are decided again and make the same claims again (with
the same versions: stage 2 takes a claim it already has as a no-op). A crash after 2 leaves
states whose claims are already acknowledged (1 came first), so the changes, read again, are
rightly ignored as not newer. Sending 1 and 2 together would allow the one outcome that loses a
change: a state in the changelog whose claims never reached the broker.

The claims are keyed by their codec key and partitioned by `claim_partition`, a stable hash of
that key (CRC-32: not Python's per-process salted ``hash``), so every (list, address) has one
claims partition and so one owner in stage 2, whichever process wrote it. Only cmsync writes
that topic, so it need not be Kafka's murmur2, whose pure-Python form in aiokafka costs 18 µs
a key (bench/state.py), more than deciding the change. They are sent as whole batches per
partition (`changelog.send_batched`).

Stage 2 (`StageTwo`, per claims partition): claims in, desired states out, and what the sync
applied recorded. Its checkpoint is the changelog, then the disk. After it, the claims offsets
it covers may be committed even if the desired states are not applied yet: the state records
what is owed (`owed`), and an owner that restores the partition feeds the owed states to the
buffer again before reading new claims. So a crash between a checkpoint and the writes to
Campaign Monitor loses nothing, and one before the checkpoint reads the claims again, which
the restored table takes as it took them the first time.
"""

from __future__ import annotations

import asyncio
import itertools
import zlib
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

from aiokafka import AIOKafkaProducer

from consumer.membership import changelog
from consumer.membership.addresses import AddressTable
from consumer.membership.codec import encode_claim, encode_filled
from consumer.membership.durable import PartitionStore
from consumer.membership.members import MemberTable
from consumer.membership.model import Applied, Claim, Desired, Filled, ProfileChange, Verdict

__all__ = ["Durable", "StageOne", "StageTwo", "claim_partition"]


def claim_partition(key: bytes, partitions: int) -> int:
    """The claims partition of a claim's key: the same in every process and release."""
    return zlib.crc32(key) % partitions


@dataclass(frozen=True, slots=True)
class Durable:
    """One partition's store and the changelog partition its checkpoints go to."""

    partition: int
    store: PartitionStore
    producer: AIOKafkaProducer
    changelog_topic: str

    async def checkpoint(self) -> None:
        """Changelog acknowledged, then the disk (`changelog.checkpoint`)."""
        await changelog.checkpoint(self.producer, self.changelog_topic, self.partition, self.store)


class StageOne:
    """Stage 1 of one input partition (``state.partition``): its table, its claims, and its
    checkpoints."""

    def __init__(
        self,
        state: Durable,
        lists_of: Mapping[str, Sequence[str]],
        claims_topic: str,
        fields_of: Mapping[str, Collection[str]] | None = None,
    ) -> None:
        """``lists_of``, ``fields_of``: as for `MemberTable`."""
        self.state = state
        self.table = MemberTable(state.store, lists_of, state.partition, fields_of)
        self._claims_topic = claims_topic
        self._claims: list[Claim] = []
        self._records: list[tuple[bytes, bytes]] = []  # claims of `apply`, encoded
        self._filled: list[tuple[str, str]] = []  # backfills done: (segment, list)

    def reconfigure(
        self, lists_of: Mapping[str, Sequence[str]], fields_of: Mapping[str, Collection[str]]
    ) -> None:
        """A new segment → lists mapping from now on (the table is rebuilt over the store)."""
        self.table = MemberTable(self.state.store, lists_of, self.state.partition, fields_of)

    @property
    def pending_claims(self) -> int:
        return len(self._claims) + len(self._records)

    def apply(self, change: ProfileChange) -> Verdict:
        """Decide one change; its claims wait for the next checkpoint, encoded (the verdict
        carries none: `MemberTable.apply` returns them as objects)."""
        return Verdict(self.table.apply_encoded(change, self._records), [])

    def backfill(self, segment_id: str, list_id: str, limit: int) -> tuple[int, bool]:
        """Queue the next page of holds that fill ``list_id`` with ``segment_id``'s current
        members of this partition (a destination added later), its progress with them in the
        next checkpoint; returns how many holds, and whether the backfill is done."""
        claims, done = self.table.backfill_page(segment_id, list_id, limit)
        self._claims += claims
        if done:  # every claims partition hears of it, after the page's claims
            self._filled.append((segment_id, list_id))
        return len(claims), done

    async def checkpoint(self) -> dict[int, int]:
        """Claims acknowledged, then the changelog acknowledged, then the disk (see the module
        docstring); returns, per claims partition written to, the offset of its last claim.
        On an exception nothing is checkpointed and the pending work is dropped: the caller
        must read the input again from its committed offset (or give the partition up), which
        decides the same changes again."""
        claims, self._claims = self._claims, []
        records, self._records = self._records, []
        filled, self._filled = self._filled, []
        try:
            partitions = sorted(await self.state.producer.partitions_for(self._claims_topic))
            count = len(partitions)
            by_partition: dict[int, list[tuple[bytes, bytes]]] = {}
            for record in itertools.chain(records, map(encode_claim, claims)):
                partition = partitions[claim_partition(record[0], count)]
                by_partition.setdefault(partition, []).append(record)
            for segment_id, list_id in filled:  # after the page's claims, in every partition
                done = encode_filled(Filled(list_id, segment_id, self.state.partition, count))
                for partition in partitions:
                    by_partition.setdefault(partition, []).append(done)
            producer = self.state.producer
            written = await asyncio.gather(
                *(
                    changelog.send_batched(producer, self._claims_topic, partition, records)
                    for partition, records in by_partition.items()
                )
            )
        except BaseException:
            self.state.store.discard()
            raise
        await self.state.checkpoint()
        return {
            partition: last
            for partition, last in zip(by_partition, written, strict=True)
            if last is not None
        }


class StageTwo:
    """Stage 2 of one claims partition (``state.partition``): its table and its checkpoints."""

    def __init__(self, state: Durable) -> None:
        self.state = state
        self.table = AddressTable(state.store)

    def apply(self, claim: Claim) -> Desired | None:
        """Take one claim; the new desired state of its (list, address) if it changed."""
        return self.table.apply(claim)

    def apply_encoded(self, key: bytes, value: bytes) -> tuple[Desired | None, int]:
        """`apply` of a claims record (`AddressTable.apply_encoded`): (the new desired state or
        None, the claim's ``occurred_at_ms``)."""
        return self.table.apply_encoded(key, value)

    def filled(self, record: Filled) -> list[Desired]:
        """A backfill's completion (see `AddressTable.filled`)."""
        return self.table.filled(record)

    def record_applied(self, desired: Desired, outcome: Applied) -> None:
        """What the sync wrote for ``desired`` (see `AddressTable.record_applied`)."""
        self.table.record_applied(desired, outcome)

    def refit(self, routes: Mapping[str, frozenset[str]]) -> list[Desired]:
        """Fit the table to the configured routes (see `AddressTable.refit`)."""
        return self.table.refit(routes)

    def owed(self, list_ids: Iterable[str]) -> Iterator[Desired]:
        """The desired states of these lists that were not applied yet (after a restore)."""
        for list_id in list_ids:
            yield from self.table.owed(list_id)

    async def checkpoint(self) -> None:
        """Changelog acknowledged, then the disk; on an exception nothing is checkpointed and
        the claims are read again from their committed offset."""
        await self.state.checkpoint()
