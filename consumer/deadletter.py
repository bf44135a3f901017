"""Dead-letter producer: records the service cannot apply, kept with the reason why.

A dead-lettered record is *durable* (its offset may be committed) only once the broker has
acknowledged it, so `send` returns only after the acknowledgement. Headers follow the contract:
`cmsync-error`, `cmsync-detail`, `cmsync-source`, and where known `cmsync-destination` and
`cmsync-cm-code`. Details never carry personal data: they come from `events.Invalid.detail` or
fixed texts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import structlog
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from consumer import observability as obs
from consumer.retry import Backoff, retry_forever
from consumer.tuning import (
    DEAD_LETTER_BACKOFF_BASE_S,
    DEAD_LETTER_BACKOFF_CAP_S,
)

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
    """Sends dead letters to one topic; retries until the broker acknowledges.

    Callers: the intake (records that fail decoding, validation or addressing) and the flushers
    (rows Campaign Monitor rejected), through `send`. It satisfies `flusher.DeadLetterSink`.
    """

    def __init__(
        self, topic: str, client_kwargs: dict[str, Any], *, backoff: Backoff | None = None
    ) -> None:
        self.topic = topic
        self._backoff = backoff or Backoff(DEAD_LETTER_BACKOFF_BASE_S, DEAD_LETTER_BACKOFF_CAP_S)
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
        """Return once the broker holds the record. Any Kafka error is retried with the shared
        backoff policy (`consumer.retry`), without a limit: losing a record is not an option.
        Cancellation (shutdown) propagates; the record's offset then stays uncommitted."""

        def on_retry(exc: BaseException, attempt: int, delay: float) -> None:
            log.warning(
                "dead_letter_retry",
                topic=self.topic,
                error=type(exc).__name__,
                attempt=attempt,
                delay_s=round(delay, 3),
            )

        await retry_forever(
            lambda: self._producer.send_and_wait(
                self.topic, value=letter.value, key=letter.key, headers=letter.headers()
            ),
            retry_on=KafkaError,
            backoff=self._backoff,
            on_retry=on_retry,
        )
        destination = obs.NO_DESTINATION if letter.destination is None else letter.destination
        obs.dead_letters.labels(reason=letter.error, destination=destination).inc()
