"""The one backoff policy (consumer.retry): its window per attempt and the retry loop."""

from __future__ import annotations

import random

import pytest

from consumer.retry import Backoff, retry_forever


class Highest(random.Random):
    """Always draws the top of the window, so the window itself is what is checked."""

    def uniform(self, a: float, b: float) -> float:
        return b


def test_the_window_doubles_per_attempt_up_to_the_cap() -> None:
    backoff = Backoff(0.5, 30.0, rng=Highest())
    assert [backoff.delay(attempt) for attempt in range(8)] == [
        0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0,
    ]  # fmt: skip


def test_a_very_long_outage_stays_at_the_cap() -> None:
    # 0.5 * 2**1024 overflows a float: the retry loop must not die after hours of outage.
    assert Backoff(0.5, 30.0, rng=Highest()).delay(5000) == 30.0


def test_full_jitter_spreads_delays_over_the_whole_window() -> None:
    backoff = Backoff(1.0, 8.0, rng=random.Random(7))
    delays = [backoff.delay(3) for _ in range(200)]
    assert all(0.0 <= d <= 8.0 for d in delays)
    assert min(delays) < 1.0  # full jitter, not "equal jitter" (which starts at half, 4)
    assert max(delays) > 7.0


@pytest.mark.parametrize(("base", "cap"), [(0.0, 1.0), (2.0, 1.0), (-1.0, 5.0)])
def test_a_policy_needs_a_positive_base_below_its_cap(base: float, cap: float) -> None:
    with pytest.raises(ValueError, match="base_s"):
        Backoff(base, cap)


async def test_retry_forever_retries_only_what_it_is_told_to() -> None:
    answers: list[BaseException | str] = [ConnectionError("a"), ConnectionError("b"), "done"]
    slept: list[float] = []
    seen: list[tuple[str, int, float]] = []

    async def operation() -> str:
        answer = answers.pop(0)
        if isinstance(answer, BaseException):
            raise answer
        return answer

    async def sleep(seconds: float) -> None:
        slept.append(seconds)

    result = await retry_forever(
        operation,
        retry_on=ConnectionError,
        backoff=Backoff(0.1, 5.0, rng=Highest()),
        on_retry=lambda exc, attempt, delay: seen.append((str(exc), attempt, delay)),
        sleep=sleep,
    )
    assert result == "done"
    assert slept == [0.1, 0.2]
    assert seen == [("a", 1, 0.1), ("b", 2, 0.2)]

    async def broken() -> str:
        raise KeyError("not retried")

    with pytest.raises(KeyError):
        await retry_forever(broken, retry_on=ConnectionError, backoff=Backoff(0.1, 5.0))
