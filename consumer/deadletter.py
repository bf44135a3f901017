"""Dead-letter producer: records the service cannot apply, kept with the reason why.

A dead-lettered record is *durable* (its offset may be committed) only once the broker has
acknowledged it, so `send` returns only after the acknowledgement. Headers follow the contract:
`cmsync-error`, `cmsync-detail`, `cmsync-source`, and where known `cmsync-destination` and
`cmsync-cm-code`. Details never carry personal data: they come from `events.Invalid.detail` or
fixed texts.

A letter that can never be sent as it is never blocks its partition (guarantee 1). Errors are
told apart (`never_as_is`):
  1. retriable ones (timeouts, no leader, the network, anything not known to be final) are
     retried with the shared backoff, without a limit, as before;
  2. on one that cannot succeed however often it is tried (too large for the producer's
     ``max_request_size`` or the topic's ``max.message.bytes``, a record the broker calls
     invalid or corrupt, the topic refused: authorization, policy), the letter is sent
     shortened: the same key and headers, plus `cmsync-shortened` saying why, and an empty
     value (nothing beyond what the original carried; less: its value is gone);
  3. if even the shortened letter cannot be sent (authorization), it is counted
     (``cmsync_dead_letters_failed_total{reason}``) and logged without personal data (its
     source and the error's name), and `send` returns: the partition goes on.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Final

import structlog
from aiokafka import AIOKafkaProducer
from aiokafka.errors import (
    BrokerResponseError,
    ClusterAuthorizationFailedError,
    KafkaError,
    MessageSizeTooLargeError,
    RecordTooLargeError,
    TopicAuthorizationFailedError,
)

from consumer import observability as obs
from consumer.retry import Backoff, retry_forever
from consumer.tuning import (
    DEAD_LETTER_BACKOFF_BASE_S,
    DEAD_LETTER_BACKOFF_CAP_S,
    DEAD_LETTER_MAX_REQUEST_BYTES,
)

__all__ = ["SHORTENED_HEADER", "DeadLetter", "DeadLetterQueue", "never_as_is"]

log = structlog.get_logger("cmsync.deadletter")

#: The header of a shortened letter: why it was shortened (``too_large``, ``invalid``,
#: ``unauthorized``, ``refused``) and the error's name.
SHORTENED_HEADER: Final = "cmsync-shortened"
#: Reasons of `never_as_is` (also the label values of ``cmsync_dead_letters_failed_total``).
FAILURE_REASONS: Final = obs.DEAD_LETTER_FAILURE_REASONS


def never_as_is(exc: BaseException) -> str | None:
    """Why sending a record can never succeed as it is (one of `FAILURE_REASONS`), or None
    when the error may go away (retry it).

    aiokafka's ``retriable`` flag alone does not tell: it is False for its own client-side
    timeouts and for a broker that cannot be reached (`KafkaTimeoutError`,
    `KafkaUnavailableError`), which do go away. So: the size errors (the client's and the
    broker's) are final; a broker's answer is final when the broker says it is not retriable
    (corrupt or invalid record, authorization, policy, invalid topic, an unexpected server
    error); everything else the client raises (timeouts, connections, a closing producer) is
    retried as before."""
    if isinstance(exc, MessageSizeTooLargeError | RecordTooLargeError):
        return "too_large"
    if isinstance(exc, TopicAuthorizationFailedError | ClusterAuthorizationFailedError):
        return "unauthorized"
    if isinstance(exc, BrokerResponseError) and not exc.retriable:
        # 2 CORRUPT_MESSAGE, 87 INVALID_RECORD (aiokafka has no class for it)
        return "invalid" if getattr(exc, "errno", None) in (2, 87) else "refused"
    return None


class _RetriableError(Exception):
    """Wraps a Kafka error that may go away, for `retry_forever`; final ones pass through."""

    def __init__(self, cause: KafkaError) -> None:
        super().__init__(type(cause).__name__)
        self.cause = cause


@dataclass(frozen=True, slots=True)
class DeadLetter:
    key: bytes | None
    value: bytes | None
    error: str
    detail: str
    source: str  # "topic/partition/offset"
    destination: str | None = None
    cm_code: int | None = None
    #: why the value was dropped (`shorten`), or None for a letter sent as it is
    shortened: str | None = None

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
        if self.shortened is not None:
            headers.append((SHORTENED_HEADER, self.shortened.encode()))
        return headers

    def shorten(self, why: str) -> DeadLetter:
        """The letter with its value dropped (the key and headers stay), saying ``why``."""
        return replace(self, value=b"", shortened=why)


class DeadLetterQueue:
    """Sends dead letters to one topic; retries until the broker acknowledges.

    Callers: the intake (records that fail decoding, validation or addressing) and the flushers
    (rows Campaign Monitor rejected), through `send`. It satisfies `flusher.DeadLetterSink`.
    """

    def __init__(
        self,
        topic: str,
        client_kwargs: dict[str, Any],
        *,
        backoff: Backoff | None = None,
        max_request_size: int = DEAD_LETTER_MAX_REQUEST_BYTES,
    ) -> None:
        self.topic = topic
        self._backoff = backoff or Backoff(DEAD_LETTER_BACKOFF_BASE_S, DEAD_LETTER_BACKOFF_CAP_S)
        self._producer = AIOKafkaProducer(
            acks="all",
            enable_idempotence=False,
            linger_ms=5,
            max_request_size=max_request_size,
            **client_kwargs,
        )

    async def start(self) -> None:
        await self._producer.start()

    async def stop(self) -> None:
        await self._producer.stop()

    async def send(self, letter: DeadLetter) -> None:
        """Return once the broker holds the letter, or its shortened form, or once neither
        can ever be sent (counted and logged): see the module docstring. Errors that may go
        away are retried with the shared backoff policy (`consumer.retry`), without a limit.
        Cancellation (shutdown) propagates; the record's offset then stays uncommitted."""
        destination = obs.NO_DESTINATION if letter.destination is None else letter.destination
        final = await self._send_retrying(letter)
        if final is None:
            obs.dead_letters.labels(reason=letter.error, destination=destination).inc()
            return
        why = never_as_is(final) or "refused"
        log.warning(
            "dead_letter_shortened",
            topic=self.topic,
            source=letter.source,
            error=type(final).__name__,
            reason=why,
            value_bytes=len(letter.value or b""),
        )
        shortened = letter.shorten(f"{why}: {type(final).__name__}")
        final = await self._send_retrying(shortened)
        if final is None:
            obs.dead_letters.labels(reason=letter.error, destination=destination).inc()
            obs.dead_letters_shortened.labels(reason=why).inc()
            return
        failed = never_as_is(final) or "refused"
        obs.dead_letters_failed.labels(reason=failed).inc()
        log.error(
            "dead_letter_failed",
            topic=self.topic,
            source=letter.source,
            error=type(final).__name__,
            reason=failed,
            code=letter.error,
        )

    async def _send_retrying(self, letter: DeadLetter) -> KafkaError | None:
        """Send until acknowledged (None), retrying what may go away; the error that can
        never go away, if one came."""

        def on_retry(exc: BaseException, attempt: int, delay: float) -> None:
            cause = exc.cause if isinstance(exc, _RetriableError) else exc
            log.warning(
                "dead_letter_retry",
                topic=self.topic,
                error=type(cause).__name__,
                attempt=attempt,
                delay_s=round(delay, 3),
            )

        async def attempt() -> None:
            try:
                await self._producer.send_and_wait(
                    self.topic, value=letter.value, key=letter.key, headers=letter.headers()
                )
            except KafkaError as exc:
                if never_as_is(exc) is None:
                    raise _RetriableError(exc) from exc
                raise

        try:
            await retry_forever(
                attempt, retry_on=_RetriableError, backoff=self._backoff, on_retry=on_retry
            )
        except KafkaError as exc:  # final: `attempt` lets only those through
            return exc
        return None
