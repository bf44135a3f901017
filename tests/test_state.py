"""consumer.state: the two stages as the service runs them, against a real broker.

Real stores, topics, buffers and offset tracker; the dead-letter sink is the only fake (a
letter is durable when the test says so). The stages are fed the records the broker returns,
as the source would feed them.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest
import pytest_asyncio
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition

from consumer.buffer import AppliedMemory, DestinationBuffer, Entry
from consumer.deadletter import DeadLetter
from consumer.devtools.embedded_broker import create_topics
from consumer.intake import Intake
from consumer.membership import Applied, Claim
from consumer.membership.changelog import InternalTopics, ensure_internal_topics
from consumer.membership.codec import decode_claims_record
from consumer.offsets import OffsetTracker
from consumer.rows import Wanted
from consumer.settings import Destination, load_settings
from consumer.state import MembershipState, Target

T0 = 1_700_000_000_000


def destinations(tmp_path: Path) -> list[Destination]:
    """news ← seg-a; club ← seg-a ∪ seg-b (as `load_settings` reads them from a file)."""
    path = tmp_path / "destinations.toml"
    path.write_text(
        f'[[destination]]\nname = "news"\nsegment_id = "seg-a"\nlist_id = "{1:032x}"\n'
        'email_field = "email"\n[destination.custom_fields]\nCity = "city"\n\n'
        f'[[destination]]\nname = "club"\nsegment_ids = ["seg-a", "seg-b"]\n'
        f'list_id = "{2:032x}"\nemail_field = "email"\n'
    )
    env = {
        "CMSYNC_KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:9",
        "CMSYNC_CM_API_KEY": "test-key",
        "CMSYNC_DESTINATIONS_FILE": str(path),
    }
    return list(load_settings(env).destinations)


def event(
    email: str | None,
    profile_id: str,
    *,
    segment: str = "seg-a",
    entered: bool = True,
    at_ms: int = T0,
    city: str = "Oslo",
) -> tuple[bytes, bytes]:
    profile: dict[str, Any] = {"id": profile_id, "city": city}
    if email is not None:
        profile["email"] = email
    occurred_at = datetime.fromtimestamp(at_ms / 1000, UTC).isoformat(timespec="milliseconds")
    value = orjson.dumps(
        {
            "event_id": str(uuid.uuid4()),
            "segment_id": segment,
            "change": "entered" if entered else "exited",
            "occurred_at": occurred_at.replace("+00:00", "Z"),
            "profile": profile,
        }
    )
    return profile_id.encode(), value


class Letters:
    def __init__(self) -> None:
        self.sent: list[DeadLetter] = []

    async def send(self, letter: DeadLetter) -> None:
        self.sent.append(letter)


def claims_only(records: list[ConsumerRecord[Any, Any]]) -> list[ConsumerRecord[Any, Any]]:
    """The claims among records of the claims topic (not the backfills' `Filled` records)."""
    return [r for r in records if isinstance(decode_claims_record(r.key, r.value), Claim)]


@dataclass
class Kit:
    bootstrap: str
    producer: AIOKafkaProducer
    input_topic: str
    topics: InternalTopics
    dests: list[Destination]
    tmp: Path
    clients: list[AIOKafkaConsumer]
    letters: Letters = field(default_factory=Letters)
    intake: Intake | None = None  # the last state's

    async def consumer(self) -> AIOKafkaConsumer:
        consumer = AIOKafkaConsumer(bootstrap_servers=self.bootstrap, enable_auto_commit=False)
        await consumer.start()
        self.clients.append(consumer)
        return consumer

    async def state(self, name: str = "a") -> tuple[MembershipState, dict[str, DestinationBuffer]]:
        """A MembershipState with its own state dir (``name``), buffers for both lists."""
        intake = self.intake = Intake(tracker=OffsetTracker(), send_dead_letter=self.letters.send)
        state = MembershipState(
            destinations=self.dests,
            topics=self.topics,
            state_dir=self.tmp / name,
            producer=self.producer,
            restorer=await self.consumer(),
            reader=await self.consumer(),
            input_topic=self.input_topic,
            intake=intake,
        )
        memory = AppliedMemory(100)
        buffers = {
            d.name: DestinationBuffer(d.name, memory, flush_interval_s=5) for d in self.dests
        }
        state.set_targets(Target(d, buffers[d.name], lambda: None) for d in self.dests)
        await state.assign([0], [0])
        # A new state fills its lists first (backfills, each ending with a `Filled` record
        # to the claims partition); stage 2 takes those records before the test starts.
        await state.backfills_done()
        records = await self.read(self.topics.claims, state.committable(self.topics.claims, 0) or 0)
        if records and not claims_only(records):
            await state.handle_claims(0, records)
        return state, buffers

    async def produce(self, topic: str, pairs: list[tuple[bytes, bytes]]) -> None:
        for key, value in pairs:
            await self.producer.send_and_wait(topic, value, key=key, partition=0)

    async def read(self, topic: str, start: int = 0) -> list[ConsumerRecord[Any, Any]]:
        """Every record of partition 0 of ``topic`` from ``start``."""
        tp = TopicPartition(topic, 0)
        reader = AIOKafkaConsumer(bootstrap_servers=self.bootstrap, enable_auto_commit=False)
        await reader.start()
        try:
            reader.assign([tp])
            reader.seek(tp, start)
            out: list[ConsumerRecord[Any, Any]] = []
            while True:
                batches = await reader.getmany(tp, timeout_ms=200)
                out += batches.get(tp, [])
                end = reader.highwater(tp)
                if end is not None and await reader.position(tp) >= end:
                    return out
        finally:
            await reader.stop()


@pytest_asyncio.fixture
async def kit(
    kafka_bootstrap: str, kafka_producer: AIOKafkaProducer, tmp_path: Path
) -> AsyncIterator[Kit]:
    input_topic = f"input-{uuid.uuid4().hex[:8]}"
    topics = InternalTopics.of_group(f"g-{uuid.uuid4().hex[:8]}")
    await create_topics(kafka_bootstrap, {input_topic: 1})
    await ensure_internal_topics({"bootstrap_servers": kafka_bootstrap}, input_topic, topics)
    kit = Kit(
        kafka_bootstrap, kafka_producer, input_topic, topics, destinations(tmp_path), tmp_path, []
    )
    yield kit
    for client in kit.clients:
        await client.stop()


async def run_both(kit: Kit, state: MembershipState, pairs: list[tuple[bytes, bytes]]) -> None:
    """Produce ``pairs`` to the input, feed them to stage 1, then its claims to stage 2."""
    before = len(await kit.read(kit.input_topic))
    await kit.produce(kit.input_topic, pairs)
    await state.handle_input(0, (await kit.read(kit.input_topic, before))[: len(pairs)])
    done = state.committable(kit.topics.claims, 0) or 0
    claims = await kit.read(kit.topics.claims, done)
    if claims:
        await state.handle_claims(0, claims)


def wanted(buffer: DestinationBuffer) -> dict[str, bool]:
    """address → active, of what a buffer sends now (then completed, as if applied)."""
    batch = buffer.take(0.0, force=True)
    assert batch is not None
    entries = [*batch.adds, *batch.removals]
    buffer.complete(entries, applied=True)
    return {e.change.key: e.change.entered for e in entries}


async def test_changes_become_desired_states_and_offsets_are_committable(kit: Kit) -> None:
    state, buffers = await kit.state()
    await run_both(
        kit,
        state,
        [
            event("Ada@X.io", "ada"),
            event("home@x.io", "bob", segment="seg-b"),
            event("cy@x.io", "cy", segment="elsewhere"),  # no destination: state only
        ],
    )
    assert state.committable(kit.input_topic, 0) == 3
    claims = await kit.read(kit.topics.claims)
    assert state.committable(kit.topics.claims, 0) == len(claims)
    assert len(claims_only(claims)) == 3  # news, club, club
    assert wanted(buffers["news"]) == {"ada@x.io": True}
    assert wanted(buffers["club"]) == {"ada@x.io": True, "home@x.io": True}
    assert state.claims_unread() == 0


async def test_an_address_change_releases_the_old_address_once_nobody_holds_it(kit: Kit) -> None:
    state, buffers = await kit.state()
    await run_both(kit, state, [event("old@x.io", "ada"), event("old@x.io", "bob")])
    assert wanted(buffers["news"]) == {"old@x.io": True}
    await run_both(kit, state, [event("new@x.io", "ada", at_ms=T0 + 1)])
    assert wanted(buffers["news"]) == {"new@x.io": True}  # bob still holds old@x.io
    await run_both(kit, state, [event("new2@x.io", "bob", at_ms=T0 + 2)])
    assert wanted(buffers["news"]) == {"old@x.io": False, "new2@x.io": True}


async def test_a_late_change_makes_no_claim(kit: Kit) -> None:
    state, _ = await kit.state()
    await run_both(kit, state, [event("ada@x.io", "ada", at_ms=T0 + 10)])
    claims = len(await kit.read(kit.topics.claims))
    await run_both(kit, state, [event("ada@x.io", "ada", entered=False, at_ms=T0)])
    assert len(await kit.read(kit.topics.claims)) == claims
    assert state.committable(kit.input_topic, 0) == 2


async def test_unusable_records_are_held_until_their_one_dead_letter_is_durable(
    kit: Kit,
) -> None:
    state, _ = await kit.state()
    await kit.produce(kit.input_topic, [(b"x", b"{not json"), event(None, "ada")])
    await state.handle_input(0, await kit.read(kit.input_topic))
    intake = kit.intake
    assert intake is not None
    await intake.wait_until(lambda: intake.letters_in_flight() == 0)
    assert sorted((x.error, x.destination) for x in kit.letters.sent) == [
        ("invalid_json", None),
        ("missing_email", "news,club"),  # one letter per record, naming its destinations
    ]
    assert state.committable(kit.input_topic, 0) == 2
    assert claims_only(await kit.read(kit.topics.claims)) == []


async def test_what_was_applied_is_durable_and_what_is_owed_comes_back(kit: Kit) -> None:
    """A restore from the changelogs (an empty state dir) feeds the buffers what was not
    applied, and only that."""
    state, buffers = await kit.state("first")
    await run_both(kit, state, [event("ada@x.io", "ada"), event("bob@x.io", "bob")])
    batch = buffers["news"].take(0.0, force=True)
    assert batch is not None
    applied: list[Entry] = [e for e in batch.adds if e.change.key == "ada@x.io"]
    buffers["news"].complete(applied, applied=True)
    state.record_applied(applied, Applied.ACTIVE)
    assert isinstance(applied[0].change.payload, Wanted)
    await state.checkpoint_applied()
    await state.close()

    again, rebuilt = await kit.state("second")  # another process: restored from Kafka
    assert wanted(rebuilt["news"]) == {"bob@x.io": True}
    assert wanted(rebuilt["club"]) == {"ada@x.io": True, "bob@x.io": True}
    await again.close()


async def test_giving_up_a_claims_partition_drops_only_what_is_buffered(kit: Kit) -> None:
    state, buffers = await kit.state()
    await run_both(kit, state, [event("ada@x.io", "ada"), event("bob@x.io", "bob")])
    news = buffers["news"]
    flying = news.take(0.0, force=True)
    assert flying is not None
    await run_both(kit, state, [event("ada@x.io", "ada", at_ms=T0 + 1, city="Rome")])
    assert news.pending() == 1
    assert news.in_flight() == 2
    # news: 2 in flight and 1 waiting; club: 2 (it maps no City: the new city changes nothing)
    assert state.in_buffers([0]) == 2 + 1 + 2
    await state.revoke_claims([0])
    assert news.pending() == 0
    assert news.in_flight() == 2  # in flight: not ours to drop
    assert buffers["club"].pending() == 0
    with pytest.raises(Exception, match="not restored here"):
        await state.handle_claims(0, await kit.read(kit.topics.claims))


async def test_a_write_in_flight_when_the_process_died_is_owed_again(kit: Kit) -> None:
    """An add was sent but its outcome never recorded (the process died); then the profile
    left. The list may show the address, so the next owner must remove it."""
    state, buffers = await kit.state("first")
    await run_both(kit, state, [event("ada@x.io", "ada")])
    batch = buffers["news"].take(0.0, force=True)
    assert batch is not None
    assert await state.mark_sending(batch.adds) == batch.adds
    await run_both(kit, state, [event("ada@x.io", "ada", entered=False, at_ms=T0 + 1)])
    await state.close()  # no record_applied: the process died with the add in flight

    _, rebuilt = await kit.state("second")
    assert wanted(rebuilt["news"]) == {"ada@x.io": False}


async def test_a_crash_between_the_stages_loses_nothing(kit: Kit) -> None:
    """Stage 1 checkpointed (its input offsets committable) and the process died before stage 2
    read the claims: the next owner of the claims partition takes them from the topic."""
    state, _ = await kit.state("first")
    await kit.produce(kit.input_topic, [event("ada@x.io", "ada"), event("bob@x.io", "bob")])
    await state.handle_input(0, await kit.read(kit.input_topic))
    assert state.committable(kit.input_topic, 0) == 2
    assert state.claims_unread() == 4  # news and club, for each
    # the process dies here: no stage 2, no close

    again, rebuilt = await kit.state("second")
    assert again.committable(kit.topics.claims, 0) is None  # nothing of the claims taken yet
    await again.handle_claims(0, await kit.read(kit.topics.claims))
    assert wanted(rebuilt["news"]) == {"ada@x.io": True, "bob@x.io": True}
    assert wanted(rebuilt["club"]) == {"ada@x.io": True, "bob@x.io": True}
