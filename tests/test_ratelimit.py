"""RateLimitInfo parsing and AimdRateLimiter pacing, with a fake clock."""

from __future__ import annotations

import asyncio
import itertools
import math
import time
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from consumer.ratelimit import AimdRateLimiter, RateLimitInfo
from consumer.tuning import IMPORT_PRIORITY, PRIORITY_STEP_S, REMOVAL_PRIORITY

# -- RateLimitInfo ----------------------------------------------------------------------------


def test_headers_parsed_case_insensitively() -> None:
    info = RateLimitInfo.from_headers(
        {"x-ratelimit-limit": "100", "X-RATELIMIT-REMAINING": "7", "X-RateLimit-Reset": "2.5"}
    )
    assert info == RateLimitInfo(limit=100, remaining=7, reset_s=2.5)


def test_no_rate_headers_is_none() -> None:
    assert RateLimitInfo.from_headers({}) is None
    assert RateLimitInfo.from_headers({"Content-Type": "application/json"}) is None


@pytest.mark.parametrize("garbage", ["", "abc", "-1", "nan", "inf", "1e999", "12 apples"])
def test_garbage_value_becomes_none_for_that_field(garbage: str) -> None:
    info = RateLimitInfo.from_headers({"X-RateLimit-Remaining": garbage, "X-RateLimit-Reset": "3"})
    assert info == RateLimitInfo(limit=None, remaining=None, reset_s=3.0)


def test_only_garbage_is_none() -> None:
    assert RateLimitInfo.from_headers({"X-RateLimit-Limit": "lots"}) is None


def test_fractional_counts_round_down_and_spaces_are_tolerated() -> None:
    info = RateLimitInfo.from_headers({"X-RateLimit-Remaining": " 4.9 ", "X-RateLimit-Reset": "0"})
    assert info == RateLimitInfo(limit=None, remaining=4, reset_s=0.0)


def test_first_occurrence_wins() -> None:
    class Multi(dict[str, str]):  # a multidict-like mapping whose items() repeats a name
        def items(self) -> list[tuple[str, str]]:  # type: ignore[override]  # repeats a name
            return [("X-RateLimit-Remaining", "3"), ("x-ratelimit-remaining", "9")]

    info = RateLimitInfo.from_headers(Multi())
    assert info is not None
    assert info.remaining == 3


# -- AimdRateLimiter: pacing ------------------------------------------------------------------


def grants(limiter: AimdRateLimiter, now: float, count: int) -> list[float]:
    """Absolute send times of `count` successive reservations made at `now`."""
    return [now + limiter.reserve(now) for _ in range(count)]


def max_in_window(times: list[float], window: float = 1.0) -> int:
    """Most send times in any half-open window [t, t + window)."""
    times = sorted(times)
    best = 0
    j = 0
    for i, t in enumerate(times):
        while times[j] <= t - window:
            j += 1
        best = max(best, i - j + 1)
    return best


def test_starts_at_the_ceiling_with_fifo_slots() -> None:
    limiter = AimdRateLimiter(10)
    assert limiter.rate == 10
    sends = grants(limiter, 100.0, 5)
    assert sends[0] == 100.0
    assert sends == sorted(sends)
    assert all(b - a == pytest.approx(0.1) for a, b in itertools.pairwise(sends))


def test_strict_pacing_never_exceeds_the_ceiling_in_any_second() -> None:
    limiter = AimdRateLimiter(10)
    sends = grants(limiter, 0.0, 200)
    assert max_in_window(sends) == 10


def test_burst_allows_back_to_back_requests_after_idle() -> None:
    limiter = AimdRateLimiter(10, burst=3)
    assert grants(limiter, 0.0, 3) == pytest.approx([0.0, 0.0, 0.0], abs=1e-6)
    sends = grants(limiter, 0.0, 100)
    assert max_in_window(sends) <= 10 + 3 - 1
    limiter2 = AimdRateLimiter(10, burst=3)
    assert max_in_window(grants(limiter2, 0.0, 100)) == 12


def test_idle_time_is_not_saved_up() -> None:
    limiter = AimdRateLimiter(10)
    grants(limiter, 0.0, 1)
    sends = grants(limiter, 60.0, 3)  # a minute of silence does not buy a burst
    assert sends == pytest.approx([60.0, 60.1, 60.2])


def test_constructor_validates() -> None:
    with pytest.raises(ValueError, match="ceiling"):
        AimdRateLimiter(0)
    with pytest.raises(ValueError, match="decrease"):
        AimdRateLimiter(10, decrease=1.0)
    with pytest.raises(ValueError, match="burst"):
        AimdRateLimiter(10, burst=0.5)
    with pytest.raises(ValueError, match="min_rps"):
        AimdRateLimiter(10, min_rps=0)
    assert AimdRateLimiter(0.1).min_rps == 0.1  # clamped to a ceiling below the default min
    assert AimdRateLimiter(10).increase_rps_per_s == 0.5  # ceiling / 20


# -- AIMD --------------------------------------------------------------------------------------


def test_429_halves_the_rate_and_pauses_one_interval() -> None:
    limiter = AimdRateLimiter(10)
    limiter.on_throttled(5.0, None)
    assert limiter.rate == 5
    assert limiter.throttled_total == 1
    assert 5.0 + limiter.reserve(5.0) == pytest.approx(5.2)  # 1 / new rate
    limiter.on_throttled(6.0, None)
    assert limiter.rate == 2.5


def test_429_never_goes_below_min_rps() -> None:
    limiter = AimdRateLimiter(10, min_rps=0.5)
    for i in range(20):
        limiter.on_throttled(float(i), None)
    assert limiter.rate == 0.5
    assert limiter.throttled_total == 20


def test_429_with_reset_pauses_until_the_reset() -> None:
    limiter = AimdRateLimiter(10)
    limiter.on_throttled(1.0, RateLimitInfo(limit=None, remaining=None, reset_s=7.0))
    assert 1.0 + limiter.reserve(1.0) == 8.0
    assert limiter.reserve(8.0) == pytest.approx(0.2)  # then at the halved rate


def test_absurd_reset_is_clamped() -> None:
    limiter = AimdRateLimiter(10, max_pause_s=30)
    limiter.on_throttled(0.0, RateLimitInfo(limit=None, remaining=0, reset_s=1.7e9))
    assert limiter.reserve(0.0) == 30.0


def test_429s_of_one_episode_decrease_once_when_send_times_are_known() -> None:
    limiter = AimdRateLimiter(10)
    limiter.on_throttled(2.0, None, sent_at=1.9)
    limiter.on_throttled(2.05, None, sent_at=1.95)  # sent before the decrease: same episode
    assert limiter.rate == 5
    assert limiter.throttled_total == 2
    limiter.on_throttled(3.0, None, sent_at=2.5)  # sent after it: a new signal
    assert limiter.rate == 2.5


def test_recovery_is_additive_and_time_based() -> None:
    limiter = AimdRateLimiter(10)  # increase 0.5 rps per second
    limiter.on_throttled(0.0, None)
    assert limiter.rate == 5
    for _ in range(1000):  # a burst of successes at one instant undoes nothing
        limiter.on_success(0.0, None)
    assert limiter.rate == 5
    limiter.on_success(1.0, None)
    assert limiter.rate == pytest.approx(5.5)
    limiter.on_success(2.0, None)
    assert limiter.rate == pytest.approx(6.0)
    limiter.on_success(600.0, None)  # long idle: credit capped at max(1 s, 2 intervals)
    assert limiter.rate == pytest.approx(6.5)


def test_recovery_from_min_to_ceiling_takes_ceiling_over_increase() -> None:
    limiter = AimdRateLimiter(10, min_rps=0.2)
    for _ in range(10):
        limiter.on_throttled(0.0, None)
    assert limiter.rate == 0.2
    now = 0.0
    while limiter.rate < 10:
        now += limiter.reserve(now)  # send at the granted slot, succeed at once
        limiter.on_success(now, None)
        assert now < 60
    expected = (10 - 0.2) / 0.5  # 19.6 s, the pause after the last 429 included
    assert expected <= now <= expected + 0.5


def test_raising_the_rate_respaces_the_slot_taken_at_the_old_rate() -> None:
    limiter = AimdRateLimiter(10, min_rps=1)
    limiter.on_throttled(0.0, None)
    limiter.on_throttled(0.0, None)
    limiter.on_throttled(0.0, None)
    assert limiter.rate == 1.25
    send = limiter.reserve(1.0) + 1.0  # after the 0.8 s pause; next slot 0.8 s later
    limiter.on_success(send, None)  # +0.5 rps credit: 1.75 rps
    assert limiter.rate == pytest.approx(1.75)
    assert send + limiter.reserve(send) == pytest.approx(send + 1 / 1.75)


def test_remaining_is_spread_over_the_window() -> None:
    limiter = AimdRateLimiter(10)
    limiter.on_success(0.0, RateLimitInfo(limit=100, remaining=4, reset_s=2.0))  # 2 rps
    assert limiter.effective_rate(0.0) == 2
    assert limiter.rate == 10  # AIMD state is untouched by headers
    sends = grants(limiter, 0.0, 4)
    assert sends == pytest.approx([0.0, 0.5, 1.0, 1.5])
    # After the reset the cap expires.
    assert limiter.effective_rate(2.0) == 10


def test_header_pace_survives_an_aimd_increase() -> None:
    limiter = AimdRateLimiter(10)
    limiter.on_throttled(0.0, None)  # AIMD rate 5
    limiter.on_success(0.1, RateLimitInfo(limit=None, remaining=2, reset_s=10.0))  # 0.2 rps
    assert 1.0 + limiter.reserve(1.0) == 1.0
    limiter.on_success(1.0, None)  # AIMD goes up, the header pace still rules until 10.1
    assert limiter.rate > 5
    assert 1.0 + limiter.reserve(1.0) == pytest.approx(6.0)


def test_remaining_zero_waits_for_the_reset() -> None:
    limiter = AimdRateLimiter(10)
    limiter.on_success(3.0, RateLimitInfo(limit=100, remaining=0, reset_s=4.0))
    assert 3.0 + limiter.reserve(3.0) == 7.0
    limiter2 = AimdRateLimiter(10)
    limiter2.on_success(3.0, RateLimitInfo(limit=None, remaining=0, reset_s=None))
    assert 3.0 + limiter2.reserve(3.0) == pytest.approx(3.1)  # reset unknown: one interval


def test_generous_headers_do_not_raise_the_pace_above_the_ceiling() -> None:
    limiter = AimdRateLimiter(10)
    limiter.on_success(0.0, RateLimitInfo(limit=1000, remaining=1000, reset_s=1.0))
    assert limiter.effective_rate(0.0) == 10
    assert max_in_window(grants(limiter, 0.0, 50)) == 10


# -- properties ----------------------------------------------------------------------------------

_info = st.none() | st.builds(
    RateLimitInfo,
    limit=st.none() | st.integers(0, 100),
    remaining=st.none() | st.integers(0, 20),
    reset_s=st.none() | st.floats(0, 5, allow_nan=False),
)
_op = st.tuples(
    st.sampled_from(["reserve", "reserve", "reserve", "success", "throttled"]),
    st.floats(0, 0.5, allow_nan=False),  # time step
    _info,
)


@settings(max_examples=150, deadline=None)
@given(
    ceiling=st.sampled_from([1.0, 2.5, 10.0, 50.0]),
    burst=st.sampled_from([1.0, 2.0, 4.0]),
    start=st.floats(0, 1e5, allow_nan=False),
    ops=st.lists(_op, max_size=120),
)
def test_any_sequence_stays_within_the_window_guarantee(
    ceiling: float, burst: float, start: float, ops: list[tuple[str, float, RateLimitInfo | None]]
) -> None:
    limiter = AimdRateLimiter(ceiling, burst=burst)
    now = start
    sends: list[float] = []
    not_before = -math.inf
    for op, step, info in ops:
        now += step
        if op == "reserve":
            send = now + limiter.reserve(now)
            assert send >= now
            assert send >= not_before  # pauses are honoured for slots reserved after them
            if sends:
                assert send >= sends[-1]  # FIFO
            sends.append(send)
        elif op == "success":
            limiter.on_success(now, info)
            if info and info.remaining == 0 and info.reset_s:
                not_before = max(not_before, now + info.reset_s)
        else:
            before = limiter.rate
            limiter.on_throttled(now, info)
            assert limiter.rate == max(limiter.min_rps, before / 2)
            not_before = max(not_before, now + (info.reset_s if info and info.reset_s else 0))
        assert limiter.min_rps <= limiter.rate <= ceiling
    # Documented guarantee: fewer than W * ceiling + burst sends in any [t, t + W).
    allowed = math.ceil(ceiling + burst) - 1
    assert max_in_window(sends) <= allowed
    if burst == 1:
        assert max_in_window(sends) <= math.ceil(ceiling)


def test_aimd_replicas_share_a_key_fairly() -> None:
    """Two replicas, one key, a server that allows `ceiling` requests per 1-second window and
    answers 429 (no headers) beyond: the AIMD limiters converge to similar shares."""
    ceiling = 10.0
    a, b = AimdRateLimiter(ceiling), AimdRateLimiter(ceiling)
    a.on_throttled(0.0, None)  # start unequal: a at 5 rps, b at 10 rps
    window_counts: dict[int, int] = {}
    latency = 0.05
    next_free = {"a": 0.0, "b": 0.0}
    ok = {"a": 0, "b": 0}
    limiters = {"a": a, "b": b}
    horizon, measure_from = 600.0, 300.0
    while min(next_free.values()) < horizon:
        name = min(next_free, key=lambda n: next_free[n])
        limiter = limiters[name]
        now = next_free[name]
        send = now + limiter.reserve(now)
        window = int(send)
        if window_counts.get(window, 0) < ceiling:
            window_counts[window] = window_counts.get(window, 0) + 1
            limiter.on_success(send + latency, None)
            if send >= measure_from:
                ok[name] += 1
        else:
            limiter.on_throttled(send + latency, None, sent_at=send)
        next_free[name] = send + latency
    share = ok["a"] / (ok["a"] + ok["b"])
    assert 0.35 <= share <= 0.65, (ok, share)
    utilisation = (ok["a"] + ok["b"]) / ((horizon - measure_from) * ceiling)
    assert utilisation > 0.5, utilisation


# -- acquire (the thin async wrapper) -----------------------------------------------------------


class FakeTime:
    def __init__(self, now: float = 0.0) -> None:
        self.now = now
        self.sleeps: list[float] = []
        self.on_sleep: Callable[[], None] | None = None

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        if self.on_sleep is not None:
            hook, self.on_sleep = self.on_sleep, None
            hook()
        self.now += seconds


async def test_acquire_sleeps_the_reserved_wait(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeTime(10.0)
    monkeypatch.setattr(asyncio, "sleep", fake.sleep)
    limiter = AimdRateLimiter(4)
    for _ in range(3):
        await limiter.acquire(fake.clock)
    assert fake.sleeps == pytest.approx([0.25, 0.25])  # first slot is immediate
    assert fake.now == pytest.approx(10.5)


async def test_acquire_requeues_behind_a_pause_imposed_while_waiting(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fake = FakeTime(0.0)
    monkeypatch.setattr(asyncio, "sleep", fake.sleep)
    limiter = AimdRateLimiter(10)
    await limiter.acquire(fake.clock)  # slot at 0.0
    # While the next caller waits for its slot at 0.1, a 429 arrives with a 3-second reset.
    fake.on_sleep = lambda: limiter.on_throttled(0.05, RateLimitInfo(None, None, 3.0))
    await limiter.acquire(fake.clock)
    assert fake.now >= 3.05  # did not send into the pause


async def test_acquire_with_the_real_clock() -> None:
    limiter = AimdRateLimiter(1)
    await asyncio.wait_for(limiter.acquire(), timeout=5)  # the first slot is immediate
    assert limiter.reserve(time.monotonic()) > 0  # and it was taken: the next is ~1 s away


async def test_a_busy_event_loop_does_not_let_overslept_slots_burst() -> None:
    """Strict in every sliding second of *actual* release times, not only of granted slots:
    when the event loop is blocked (a long synchronous step elsewhere in the process), the
    slots granted meanwhile must not all go out together on top of the next ones."""
    limiter = AimdRateLimiter(10)
    released: list[float] = []

    async def caller() -> None:
        await limiter.acquire()
        released.append(time.monotonic())

    callers = [asyncio.create_task(caller()) for _ in range(25)]
    await asyncio.sleep(0.35)
    time.sleep(0.6)  # noqa: ASYNC251 # the point: the loop is busy, slots due meanwhile are overslept
    await asyncio.gather(*callers)
    assert max_in_window(released) <= 10, released


async def test_a_removal_waits_behind_a_stream_of_imports_no_longer_than_its_head_start() -> None:
    """Aging: imports (priority 0) go before a removal (priority 1) that came moments before
    them, but a removal is not starved by imports that keep coming."""
    limiter = AimdRateLimiter(20)  # hands out the slots due within 0.3 s: 6
    order: list[str] = []
    stop = asyncio.Event()

    async def importer() -> None:  # each back in line at once: imports are always waiting
        while not stop.is_set():
            await limiter.acquire(priority=IMPORT_PRIORITY)
            order.append("import")

    importers = [asyncio.create_task(importer()) for _ in range(12)]  # more than 6 waiting
    await asyncio.sleep(0.2)
    asked = time.monotonic()
    try:
        await asyncio.wait_for(limiter.acquire(priority=REMOVAL_PRIORITY), timeout=5)
    except TimeoutError:
        pytest.fail("the removal was starved by the imports")
    waited = time.monotonic() - asked
    order.append("removal")
    first_import_after = len(order)
    await asyncio.sleep(0.2)
    stop.set()
    await asyncio.gather(*importers)
    # Its head start, then the imports already in line (12) at 20/s, and some slack.
    assert waited <= PRIORITY_STEP_S + 12 / 20 + 0.5, waited
    assert order.index("removal") >= 12  # imports that came moments later went first
    assert len(order) > first_import_after  # the imports went on after it
