"""Dead letters that cannot be sent as they are (guarantee 1: "dead-lettered in a shortened
form and never blocks its partition"), against the bundled broker.

A letter larger than the producer's ``max_request_size`` is a real refusal (aiokafka's own
check); the broker's answers that the bundled broker cannot be made to give (authorization:
it has no ACLs; a leader election) are raised by a wrapper around the real producer's
``send_and_wait``, which otherwise sends for real.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from aiokafka import ConsumerRecord
from aiokafka.errors import (
    CorruptRecordException,
    KafkaConnectionError,
    KafkaTimeoutError,
    LeaderNotAvailableError,
    MessageSizeTooLargeError,
    NotLeaderForPartitionError,
    ProducerClosed,
    RecordTooLargeError,
    RequestTimedOutError,
    TopicAuthorizationFailedError,
    UnknownTopicOrPartitionError,
)

from consumer import observability as obs
from consumer.deadletter import SHORTENED_HEADER, DeadLetterQueue, never_as_is
from consumer.devtools.embedded_broker import create_topics
from consumer.devtools.rig import headers_of, read_topic
from consumer.intake import Intake
from consumer.offsets import OffsetTracker
from consumer.retry import Backoff

SOURCE_TOPIC = "members"
MAX_REQUEST = 20_000


@pytest.mark.parametrize(
    ("error", "why"),
    [
        (MessageSizeTooLargeError(), "too_large"),
        (RecordTooLargeError(), "too_large"),
        (TopicAuthorizationFailedError(), "unauthorized"),
        (CorruptRecordException(), "invalid"),
        (KafkaTimeoutError(), None),  # aiokafka says not retriable; it goes away
        (KafkaConnectionError(), None),
        (LeaderNotAvailableError(), None),
        (NotLeaderForPartitionError(), None),
        (RequestTimedOutError(), None),
        (UnknownTopicOrPartitionError(), None),
        (ProducerClosed(), None),  # shutdown: cancelled, never dropped
    ],
)
def test_errors_that_can_never_succeed_are_told_apart(error: Exception, why: str | None) -> None:
    assert never_as_is(error) == why


@pytest.fixture
async def dlq(kafka_bootstrap: str) -> AsyncIterator[DeadLetterQueue]:
    topic = f"dlq-{uuid.uuid4().hex[:8]}"
    await create_topics(kafka_bootstrap, {topic: 1})
    queue = DeadLetterQueue(
        topic,
        {"bootstrap_servers": kafka_bootstrap},
        backoff=Backoff(0.01, 0.05),
        max_request_size=MAX_REQUEST,
    )
    await queue.start()
    try:
        yield queue
    finally:
        await queue.stop()


def record(offset: int, value: bytes) -> ConsumerRecord[Any, Any]:
    return ConsumerRecord(
        topic=SOURCE_TOPIC,
        partition=0,
        offset=offset,
        timestamp=0,
        timestamp_type=0,
        key=b"cust-42",
        value=value,
        checksum=None,
        serialized_key_size=7,
        serialized_value_size=len(value),
        headers=[],
    )


async def letters_of(bootstrap: str, topic: str, n: int) -> list[Any]:
    return await read_topic(bootstrap, topic, enough=lambda got: len(got) >= n, within_s=15)


def fail_first(queue: DeadLetterQueue, errors: list[Exception]) -> list[dict[str, Any]]:
    """Make the queue's producer raise `errors` in turn, then send for real; returns the
    attempts seen (their headers)."""
    producer = queue._producer
    real: Callable[..., Awaitable[Any]] = producer.send_and_wait
    attempts: list[dict[str, Any]] = []

    async def send_and_wait(topic: str, **kwargs: Any) -> Any:
        attempts.append(kwargs)
        if errors:
            raise errors.pop(0)
        return await real(topic, **kwargs)

    producer.send_and_wait = send_and_wait
    return attempts


async def test_an_oversized_letter_is_shortened_and_its_partition_commits(
    kafka_bootstrap: str, dlq: DeadLetterQueue
) -> None:
    tracker = OffsetTracker()
    intake = Intake(tracker=tracker, send_dead_letter=dlq.send)
    big = b"{" + b"x" * (2 * MAX_REQUEST)  # invalid JSON, too large for the producer
    for offset in (10, 11):
        tracker.track(0, offset, 1)
    before = obs.dead_letters_shortened.labels(reason="too_large")._value.get()
    intake.dead_letter(record(10, big), 0, "invalid_json", "not JSON", None)
    intake.dead_letter(record(11, b"{"), 0, "invalid_json", "not JSON", None)
    async with asyncio.timeout(20):
        await intake.wait_until(lambda: intake.letters_in_flight() == 0)
    assert tracker.committable(0) == 12  # the oversized letter held nothing back
    letters = {
        headers_of(r)["cmsync-source"]: r for r in await letters_of(kafka_bootstrap, dlq.topic, 2)
    }
    assert set(letters) == {f"{SOURCE_TOPIC}/0/10", f"{SOURCE_TOPIC}/0/11"}
    short = letters[f"{SOURCE_TOPIC}/0/10"]
    headers = headers_of(short)
    assert short.key == b"cust-42"
    assert short.value in (b"", None)
    assert headers[SHORTENED_HEADER] == "too_large: MessageSizeTooLargeError"
    assert headers["cmsync-error"] == "invalid_json"
    assert headers["cmsync-detail"] == "not JSON"
    whole = letters[f"{SOURCE_TOPIC}/0/11"]
    assert whole.value == b"{"
    assert SHORTENED_HEADER not in headers_of(whole)
    assert obs.dead_letters_shortened.labels(reason="too_large")._value.get() == before + 1


async def test_retriable_errors_are_retried_until_the_letter_is_sent(
    kafka_bootstrap: str, dlq: DeadLetterQueue
) -> None:
    attempts = fail_first(
        dlq,
        [
            LeaderNotAvailableError(),
            KafkaTimeoutError(),
            KafkaConnectionError(),
            NotLeaderForPartitionError(),
        ],
    )
    tracker = OffsetTracker()
    intake = Intake(tracker=tracker, send_dead_letter=dlq.send)
    tracker.track(0, 5, 1)
    intake.dead_letter(record(5, b"[1]"), 0, "schema", "not an object", None)
    async with asyncio.timeout(20):
        await intake.wait_until(lambda: intake.letters_in_flight() == 0)
    assert tracker.committable(0) == 6
    assert len(attempts) == 5
    (letter,) = await letters_of(kafka_bootstrap, dlq.topic, 1)
    assert letter.value == b"[1]"  # sent as it was: nothing final happened
    assert SHORTENED_HEADER not in headers_of(letter)


async def test_a_letter_refused_even_shortened_is_counted_and_its_partition_goes_on(
    kafka_bootstrap: str, dlq: DeadLetterQueue
) -> None:
    attempts = fail_first(
        dlq,
        [
            TopicAuthorizationFailedError(),
            LeaderNotAvailableError(),
            TopicAuthorizationFailedError(),
        ],
    )
    failed = obs.dead_letters_failed.labels(reason="unauthorized")
    before = failed._value.get()
    tracker = OffsetTracker()
    intake = Intake(tracker=tracker, send_dead_letter=dlq.send)
    tracker.track(0, 7, 1)
    intake.dead_letter(record(7, b"{}"), 0, "schema", "missing fields", None)
    async with asyncio.timeout(20):
        await intake.wait_until(lambda: intake.letters_in_flight() == 0)
    assert tracker.committable(0) == 8
    assert failed._value.get() == before + 1
    # The first as it was; then shortened, retried once (no leader), refused again.
    assert [a["value"] for a in attempts] == [b"{}", b"", b""]
    assert dict(attempts[1]["headers"])[SHORTENED_HEADER] == (
        b"unauthorized: TopicAuthorizationFailedError"
    )
    nothing = await read_topic(kafka_bootstrap, dlq.topic, enough=lambda got: False, within_s=1)
    assert nothing == []
