"""Backpressure (guarantee 4): intake pauses when either bound is reached, pending changes
(CMSYNC_MAX_PENDING) or their bytes (CMSYNC_MAX_PENDING_BYTES), and resumes once both are at
their low-water marks. The pure rule, then the source applying it to a consumer (a fake that
records pause and resume: the real one against the broker is tests/faults/test_backpressure.py).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import pytest
from aiokafka import TopicPartition
from structlog.testing import capture_logs

from consumer.settings import KafkaSettings
from consumer.source import Backpressure, Source
from consumer.tuning import LOW_WATER


def test_count_bound_pauses_and_resumes() -> None:
    rule = Backpressure(max_pending=100, max_pending_bytes=10_000)
    assert rule.reached(99, 0) is None
    assert rule.reached(100, 0) == "changes"
    assert not rule.relieved(51, 0)
    assert rule.relieved(int(100 * LOW_WATER), 0)


def test_bytes_bound_pauses_and_resumes() -> None:
    rule = Backpressure(max_pending=100, max_pending_bytes=10_000)
    assert rule.reached(1, 9_999) is None
    assert rule.reached(1, 10_000) == "bytes"
    assert not rule.relieved(1, 5_001)
    assert rule.relieved(1, int(10_000 * LOW_WATER))


def test_resuming_needs_both_bounds_relieved() -> None:
    rule = Backpressure(max_pending=100, max_pending_bytes=10_000)
    assert rule.reached(100, 10_000) == "changes"
    assert not rule.relieved(10, 9_000)  # few changes, but still many bytes
    assert not rule.relieved(90, 10)  # few bytes, but still many changes
    assert rule.relieved(10, 10)


class FakeConsumer:
    """What `Source._apply_backpressure` uses of aiokafka's consumer."""

    def __init__(self, assigned: set[TopicPartition]) -> None:
        self.assigned = assigned
        self.paused_set: set[TopicPartition] = set()
        self.calls: list[str] = []

    def assignment(self) -> set[TopicPartition]:
        return self.assigned

    def pause(self, *tps: TopicPartition) -> None:
        self.paused_set |= set(tps)
        self.calls.append("pause")

    def resume(self, *tps: TopicPartition) -> None:
        self.paused_set -= set(tps)
        self.calls.append("resume")

    def paused(self) -> set[TopicPartition]:
        return set(self.paused_set)


@pytest.fixture
def pending() -> list[int]:
    return [0, 0]  # [changes, bytes]


async def source_with(pending: list[int]) -> tuple[Source, FakeConsumer]:
    async def nothing(*_: Any) -> None:
        return None

    async def handle(topic: str, partition: int, records: Sequence[Any]) -> None:
        return None

    count: Callable[[], int] = lambda: pending[0]  # noqa: E731
    size: Callable[[], int] = lambda: pending[1]  # noqa: E731
    source = Source(
        KafkaSettings(
            bootstrap_servers=("localhost:9",),
            topic="members",
            group_id="cmsync",
            dlq_topic="members.dlq",
            security_protocol="PLAINTEXT",
            sasl_mechanism=None,
            sasl_username=None,
            sasl_password=None,
            ssl_cafile=None,
            ssl_certfile=None,
            ssl_keyfile=None,
        ),
        topics=("members",),
        handle=handle,
        committable=lambda topic, partition: None,
        outstanding=count,
        max_pending=100,
        outstanding_bytes=size,
        max_pending_bytes=10_000,
        on_revoked=nothing,
        on_assigned=nothing,
    )
    fake = FakeConsumer({TopicPartition("members", 0), TopicPartition("members", 1)})
    await source.consumer.stop()  # never started; closed so it does not warn
    source.consumer = fake  # aiokafka is untyped: the fake has what the rule uses
    return source, fake


@pytest.mark.parametrize(
    ("over", "half", "bound"),
    [((100, 0), (50, 0), "changes"), ((1, 10_000), (1, 5_000), "bytes")],
)
async def test_the_source_pauses_every_partition_and_resumes(
    pending: list[int], over: tuple[int, int], half: tuple[int, int], bound: str
) -> None:
    source, fake = await source_with(pending)
    source._apply_backpressure()
    assert fake.calls == []
    pending[:] = over
    with capture_logs() as logs:
        source._apply_backpressure()
    assert fake.calls == ["pause"]
    assert fake.paused_set == fake.assigned
    assert [(e["event"], e["bound"]) for e in logs] == [("intake_paused", bound)]
    source._apply_backpressure()  # still over: nothing more
    pending[:] = [half[0] + 1, half[1] + 1]
    source._apply_backpressure()  # between the marks: stays paused
    assert fake.calls == ["pause"]
    pending[:] = half
    source._apply_backpressure()
    assert fake.calls == ["pause", "resume"]
    assert fake.paused_set == set()
