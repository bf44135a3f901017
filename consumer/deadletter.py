"""Dead-letter producer: records the service cannot apply, kept with the reason why.

A dead-lettered record is *durable* (its offset may be committed) only once the broker has
acknowledged it, so `send` returns only after the acknowledgement. Headers follow the contract:
`cmsync-error`, `cmsync-detail`, `cmsync-source`, and where known `cmsync-destination` and
`cmsync-cm-code`. Details never carry personal data: they come from `events.Invalid.detail` or
fixed texts.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import structlog
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from consumer import observability as obs

log = structlog.get_logger("cmsync.deadletter")


@dataclass(frozen=True, slots=True)
class DeadLetter:
    key: bytes | None
    value: bytes | None
    error: str
    detail: str
    source: str  # "topic/partition/offset"
    destination: str | None = None
    cm_code: int | None = None

    def headers(self) -> list[tuple[str, bytes]]:
        headers = [
            ("cmsync-error", self.error.encode()),
            ("cmsync-detail", self.detail.encode()),
            ("cmsync-source", self.source.encode()),
        ]
        if self.destination is not None:
            headers.append(("cmsync-destination", self.destination.encode()))
        if self.cm_code is not None:
            headers.append(("cmsync-cm-code", str(self.cm_code).encode()))
        return headers


class DeadLetterQueue:
    """Sends dead letters to one topic; retries until the broker acknowledges."""

    def __init__(self, topic: str, client_kwargs: dict[str, Any]) -> None:
        self.topic = topic
        self._producer = AIOKafkaProducer(
            acks="all",
            enable_idempotence=False,
            linger_ms=5,
            max_request_size=2 * 1024 * 1024,
            **client_kwargs,
        )

    async def start(self) -> None:
        await self._producer.start()

    async def stop(self) -> None:
        await self._producer.stop()

    async def send(self, letter: DeadLetter) -> None:
        """Return once the broker holds the record. Retries with backoff on any Kafka error."""
        delay = 0.1
        while True:
            try:
                await self._producer.send_and_wait(
                    self.topic, value=letter.value, key=letter.key, headers=letter.headers()
                )
            except KafkaError as exc:  # broker trouble is retried: losing a record is not an option
                log.warning(
                    "dead_letter_retry", topic=self.topic, error=type(exc).__name__, delay_s=delay
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
            else:
                obs.dead_letters.labels(reason=letter.error).inc()
                return
