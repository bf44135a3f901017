"""An in-process sync under test: real broker, simulator over real HTTP, the real Service.

Each harness has its own topic, dead-letter topic and consumer group, so tests share one broker
without seeing each other's records.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from consumer.app import Service
from consumer.campaign_monitor.simulator import Simulator, SimulatorConfig, serve
from consumer.embedded_broker import create_topics
from consumer.settings import Settings, load_settings
from consumer.synthetic import event_bytes

API_KEY = "test-key-0001"


@dataclass
class Dest:
    name: str
    segment_id: str
    removal: str = "delete"
    resubscribe: str = "deleted-only"
    unsubscribe_setting: str = "OnlyThisList"
    custom_fields: Mapping[str, str] = field(default_factory=lambda: {"City": "city"})
    api_key_env: str = "CMSYNC_CM_API_KEY"
    list_id: str | None = None  # None: a new list in the simulator
    consent_to_track: str = "Yes"

    def toml(self, list_id: str) -> str:
        fields = "\n".join(f'{k} = "{v}"' for k, v in self.custom_fields.items())
        return f"""[[destination]]
name = "{self.name}"
segment_id = "{self.segment_id}"
list_id = "{list_id}"
api_key_env = "{self.api_key_env}"
email_field = "email"
name_field = "full_name"
removal = "{self.removal}"
resubscribe = "{self.resubscribe}"
consent_to_track = "{self.consent_to_track}"

[destination.custom_fields]
{fields}
"""


def event(
    email: str | None,
    change: str = "entered",
    *,
    segment: str = "seg-a",
    at_ms: int = 1_764_417_600_000,
    name: str = "Ada Lovelace",
    city: str | None = "London",
    event_id: str | None = None,
    profile_id: str | None = None,
    extra: Mapping[str, object] | None = None,
) -> tuple[bytes, bytes]:
    """(key, value) of one native membership event."""
    pid = profile_id or f"p-{email}"
    profile: dict[str, object] = {"id": pid, "full_name": name, "city": city}
    if email is not None:
        profile["email"] = email
    profile.update(extra or {})
    value = event_bytes(
        event_id=event_id or str(uuid.uuid4()),
        segment_id=segment,
        entered=change == "entered",
        occurred_at_ms=at_ms,
        profile=profile,
    )
    return pid.encode(), value


class Rig(Protocol):
    """Where a service under test connects: what `SyncHarness` and the fault suite's rig share."""

    tmp: Path
    bootstrap: str
    topic: str
    dlq_topic: str
    group: str
    base_url: str
    list_ids: dict[str, str]


def service_env(rig: Rig, destinations: Iterable[Dest], **settings: str) -> dict[str, str]:
    """The CMSYNC_* environment of a service under test: the rig's broker, topics, group and
    simulator, its destinations written to a file, the tests' common timings, then
    `settings` (each suite's own, by variable name)."""
    dest_file = rig.tmp / f"destinations-{rig.topic}.toml"
    dest_file.write_text("\n".join(d.toml(rig.list_ids[d.name]) for d in destinations))
    return {
        "CMSYNC_KAFKA_BOOTSTRAP_SERVERS": rig.bootstrap,
        "CMSYNC_KAFKA_TOPIC": rig.topic,
        "CMSYNC_DLQ_TOPIC": rig.dlq_topic,
        "CMSYNC_KAFKA_GROUP_ID": rig.group,
        "CMSYNC_CM_BASE_URL": rig.base_url,
        "CMSYNC_CM_API_KEY": API_KEY,
        "CMSYNC_DESTINATIONS_FILE": str(dest_file),
        "CMSYNC_FLUSH_INTERVAL_S": "0.3",
        "CMSYNC_SHUTDOWN_BUDGET_S": "10",
        **settings,
    }


class SyncHarness:
    def __init__(
        self,
        bootstrap: str,
        tmp: Path,
        destinations: Sequence[Dest],
        *,
        partitions: int = 3,
        env: Mapping[str, str] | None = None,
        sim_config: SimulatorConfig | None = None,
    ) -> None:
        self.bootstrap = bootstrap
        self.tmp = tmp
        self.destinations = list(destinations)
        self.partitions = partitions
        tag = uuid.uuid4().hex[:10]
        self.topic = f"membership-{tag}"
        self.dlq_topic = f"membership-{tag}.dlq"
        self.group = f"cmsync-test-{tag}"
        self.extra_env = dict(env or {})
        self.sim = Simulator(sim_config or SimulatorConfig(api_keys=(API_KEY,)))
        self.list_ids: dict[str, str] = {}
        self.ends: dict[int, int] = {}  # partition -> offset after the last record produced
        self.base_url = ""
        self.service: Service | None = None
        self.task: asyncio.Task[None] | None = None
        self._stack = contextlib.AsyncExitStack()

    # ------------------------------------------------------------------ lifecycle

    async def __aenter__(self) -> SyncHarness:
        self.base_url = await self._stack.enter_async_context(serve(self.sim))
        for dest in self.destinations:
            if dest.list_id is not None:
                self.list_ids[dest.name] = dest.list_id
            else:
                self.list_ids[dest.name] = self.sim.add_list(
                    title=dest.name, unsubscribe_setting=dest.unsubscribe_setting, api_key=API_KEY
                )
        await create_topics(self.bootstrap, {self.topic: self.partitions, self.dlq_topic: 1})
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
        await self._stack.aclose()

    def settings(self) -> Settings:
        return load_settings(self.env())

    def env(self) -> dict[str, str]:
        """The CMSYNC_* environment of a service for this harness (also for subprocesses)."""
        settings = {
            "CMSYNC_HTTP_PORT": "0",
            "CMSYNC_RATE_LIMIT_RPS": "500",
            "CMSYNC_CONSENT_REFRESH_S": "0.5",
        }
        return service_env(self, self.destinations, **(settings | self.extra_env))

    async def start(self) -> Service:
        assert self.task is None
        self.service = Service(self.settings(), commit_interval_s=0.1)
        self.task = asyncio.create_task(self.service.run())
        return self.service

    async def stop(self) -> None:
        if self.service is not None and self.task is not None:
            self.service.stop()
            await asyncio.wait_for(self.task, 30)
        self.service, self.task = None, None

    # ------------------------------------------------------------------ kafka

    async def produce(self, records: Iterable[tuple[bytes | None, bytes]]) -> None:
        """Produce in order; remembers each partition's end offset from the acknowledgements
        (the bundled broker's ListOffsets answers are not reliable)."""
        producer = AIOKafkaProducer(bootstrap_servers=self.bootstrap, acks="all", linger_ms=5)
        await producer.start()
        try:
            for key, value in records:
                meta = await producer.send_and_wait(self.topic, key=key, value=value)
                self.ends[meta.partition] = max(self.ends.get(meta.partition, 0), meta.offset + 1)
        finally:
            await producer.stop()

    async def committed(self) -> dict[int, int | None]:
        """The group's committed offsets as the broker holds them."""
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self.bootstrap, group_id=self.group, enable_auto_commit=False
        )
        await consumer.start()
        try:
            return {
                p: await consumer.committed(TopicPartition(self.topic, p))
                for p in range(self.partitions)
            }
        finally:
            await consumer.stop()

    async def wait_synced(self, within_s: float = 30.0) -> None:
        """Until every produced record is committed by the running service, nothing pending."""
        assert self.service is not None
        assert self.task is not None
        ends = dict(self.ends)
        deadline = time.monotonic() + within_s
        while time.monotonic() < deadline:
            if self.task.done():
                self.task.result()
                raise AssertionError("service stopped")
            committed = {p: self.service.source.committed(p) or 0 for p in ends}
            if (
                all(committed[p] >= ends[p] for p in ends)
                and self.service.tracker.outstanding() == 0
            ):
                return
            await asyncio.sleep(0.05)
        raise AssertionError(
            f"not synced after {within_s}s: ends {ends}, committed "
            f"{ {p: self.service.source.committed(p) for p in ends} }, "
            f"pending {self.service.tracker.outstanding()}"
        )

    async def dead_letters(self, expect: int, within_s: float = 10.0) -> list[Any]:
        consumer = AIOKafkaConsumer(
            self.dlq_topic, bootstrap_servers=self.bootstrap, auto_offset_reset="earliest"
        )
        await consumer.start()
        out: list[Any] = []
        try:
            deadline = time.monotonic() + within_s
            while len(out) < expect and time.monotonic() < deadline:
                batch = await consumer.getmany(timeout_ms=200)
                for records in batch.values():
                    out.extend(records)
            # and make sure nothing more is there
            batch = await consumer.getmany(timeout_ms=300)
            for records in batch.values():
                out.extend(records)
        finally:
            await consumer.stop()
        return out

    # ------------------------------------------------------------------ lists

    def members(self, dest: str) -> dict[str, dict[str, Any]]:
        """{address: subscriber} of a destination's list, from the simulator's state."""
        return self.sim.list_state(self.list_ids[dest])

    def state_of(self, dest: str, email: str) -> str | None:
        member = self.members(dest).get(email.strip().lower())
        return None if member is None else str(member["State"])

    def active(self, dest: str) -> set[str]:
        return {a for a, m in self.members(dest).items() if m["State"] == "Active"}


def headers_of(record: Any) -> dict[str, str]:
    return {k: v.decode() for k, v in record.headers}


def loads(value: bytes) -> Any:
    return orjson.loads(value)


@contextlib.asynccontextmanager
async def running(h: SyncHarness) -> AsyncIterator[Service]:
    service = await h.start()
    try:
        yield service
    finally:
        await h.stop()
