"""The one backoff policy of the process: exponential, capped, full jitter.

Used by the Campaign Monitor gateway (`consumer.gateway`: transient API errors) and by the
dead-letter producer (`consumer.deadletter`: broker trouble). Each picks its own base and cap;
the shape of the policy is the same everywhere:

    delay(attempt) = uniform(0, min(cap, base * 2**attempt))      attempt = 0, 1, 2, …

Full jitter (rather than "equal" or no jitter) spreads the retries of many callers that failed
together over the whole window, so they do not come back in a synchronised wave (see AWS's
"Exponential Backoff and Jitter"). Neither user gives up: both retry until the work is done,
because giving up would lose a change (the contract's "nothing lost"). A library such as
`stamina` was considered; its strength is bounded retries with timeouts and its hooks, while
both users here retry forever and the gateway decides per error type (retry at once, back off,
stall), so the dozen lines below serve better than a dependency.
"""

from __future__ import annotations

import asyncio
import math
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Final, TypeVar

__all__ = ["Backoff", "retry_forever"]

T = TypeVar("T")

#: Exponents beyond this add nothing (base * 2**62 exceeds any sane cap) and keep the float
#: arithmetic finite: unclamped, `0.5 * 2**1024` raises OverflowError after about 8.5 hours
#: of a 30 s-capped outage.
_MAX_EXPONENT: Final = 62


@dataclass(frozen=True, slots=True)
class Backoff:
    """Exponential backoff with full jitter: ``base_s`` for the first retry's window, doubling
    per attempt up to ``cap_s``. ``rng`` is shared by the callers of one policy; pass a seeded
    (or fake) one in tests."""

    base_s: float
    cap_s: float
    rng: random.Random = field(default_factory=random.Random, compare=False)

    def __post_init__(self) -> None:
        if not 0 < self.base_s <= self.cap_s:
            raise ValueError("backoff needs 0 < base_s <= cap_s")

    def bound(self, attempt: int) -> float:
        """The upper end of the window for retry number ``attempt`` (0 for the first)."""
        return min(self.cap_s, math.ldexp(self.base_s, min(max(attempt, 0), _MAX_EXPONENT)))

    def delay(self, attempt: int) -> float:
        """Seconds to wait before retry number ``attempt``: uniform in ``[0, bound(attempt)]``."""
        return self.rng.uniform(0.0, self.bound(attempt))


async def retry_forever(
    operation: Callable[[], Awaitable[T]],
    *,
    retry_on: type[BaseException] | tuple[type[BaseException], ...],
    backoff: Backoff,
    on_retry: Callable[[BaseException, int, float], None] | None = None,
    sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
) -> T:
    """Await ``operation()`` until it returns; on an exception of ``retry_on`` wait
    ``backoff.delay(attempt)`` and try again, without a limit. Other exceptions (and
    cancellation) propagate at once.

    ``on_retry(exc, attempt, delay_s)`` is called before each wait (attempt counts from 1):
    the place for a log line or a metric, so the caller's domain code stays free of them.
    """
    attempt = 0
    while True:
        try:
            return await operation()
        except retry_on as exc:
            delay = backoff.delay(attempt)
            attempt += 1
            if on_retry is not None:
                on_retry(exc, attempt, delay)
            await sleep(delay)
