"""Request pacing per API key: a token bucket driven by AIMD and ``X-RateLimit-*`` headers.

Pure core (``AimdRateLimiter.reserve`` / ``on_success`` / ``on_throttled`` take the time as an
argument and never read a clock) plus one thin async wrapper, ``acquire``, the only place that
sleeps.

Pacing is GCRA ("virtual scheduling"): the limiter keeps the theoretical time of the next free
slot; ``reserve(now)`` hands that slot to the caller and moves it on by one interval ``1/rate``.
Callers get successive slots in call order (FIFO), so nobody starves and nobody can jump ahead.

Window guarantee (per limiter, i.e. per process and API key): whatever ``rate`` does and whatever
headers say, any two granted send times ``k`` slots apart are at least ``k/ceiling - (burst-1)/
ceiling`` seconds apart. Hence in every half-open window ``[t, t + W)`` the number of granted sends
is strictly below ``W * ceiling + burst``, i.e. at most ``ceil(W * ceiling + burst) - 1``. For a
1-second window and integral ceiling and burst that is ``ceiling + burst - 1``: with the default
``burst = 1`` (strict pacing) never more than ``ceiling`` requests in any second. (Intervals are
rounded up by one part in 10^9 so that float rounding can never let one more in.)

Sharing a key between replicas: each replica runs its own limiter; they coordinate only through
what the server tells all of them (429s and the shared ``X-RateLimit-Remaining``). Additive
increase (the same absolute rps/s everywhere) with multiplicative decrease converges to equal
shares, as TCP flows do on one link. The per-limiter window guarantee above is against the
*configured* ceiling; N replicas at full rate could offer N times that until the server pushes
back, unless the ceiling is set per replica.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import math
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from consumer.tuning import LOOKAHEAD_S, PRIORITY_STEP_S

__all__ = ["AimdRateLimiter", "RateLimitInfo"]

_LIMIT = "x-ratelimit-limit"
_REMAINING = "x-ratelimit-remaining"
_RESET = "x-ratelimit-reset"
_NAMES = frozenset((_LIMIT, _REMAINING, _RESET))


# Each interval is stretched by one part in 10^9: accumulated float rounding over many slots is
# far smaller, so the window guarantee holds exactly, not just "up to rounding".
_ROUND_UP = 1.0 + 1e-9


def _number(value: object) -> float | None:
    """A finite, non-negative number from a header value, else None (garbage is tolerated)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        number = float(value)
    elif isinstance(value, str | bytes):
        try:
            number = float(value)
        except ValueError:
            return None
    else:
        return None
    if math.isnan(number) or math.isinf(number) or number < 0:
        return None
    return number


def _count(value: object) -> int | None:
    number = _number(value)
    return None if number is None else math.floor(number)


@dataclass(frozen=True, slots=True)
class RateLimitInfo:
    """Parsed ``X-RateLimit-*`` response headers; each field is None when absent or garbage.

    ``reset_s`` is in seconds until the window resets (Campaign Monitor's documented style),
    not an epoch timestamp.
    """

    limit: int | None
    remaining: int | None
    reset_s: float | None

    @classmethod
    def from_headers(cls, headers: Mapping[str, str]) -> RateLimitInfo | None:
        """Parse the headers; names are matched case-insensitively, the first occurrence wins.

        Returns None when none of the three headers is present, or none has a usable value
        (an all-None info would carry nothing). Non-numeric, negative, NaN or infinite values
        become None for their field; fractional counts are rounded down.
        """
        found: dict[str, object] = {}
        for name, value in headers.items():
            lowered = name.lower()
            if lowered in _NAMES and lowered not in found:
                found[lowered] = value
        if not found:
            return None
        info = cls(
            limit=_count(found.get(_LIMIT)),
            remaining=_count(found.get(_REMAINING)),
            reset_s=_number(found.get(_RESET)),
        )
        if info.limit is None and info.remaining is None and info.reset_s is None:
            return None
        return info


class AimdRateLimiter:
    """Token bucket (GCRA) whose rate follows AIMD and the server's rate-limit headers.

    * Starts at ``ceiling_rps`` and never exceeds it (see the module docstring for the exact
      window guarantee). ``burst`` is counted in slots at the ceiling rate: after an idle spell
      up to ``burst`` requests may go back to back (default 1: strict pacing).
    * ``on_throttled`` (a 429): multiplicative decrease, ``rate *= decrease`` but not below
      ``min_rps``; and no slot before ``now + reset_s`` when the reset is known, nor before one
      interval at the new rate in any case. ``sent_at`` (when the throttled request was sent) makes
      several 429s of one congestion episode count as one decrease, like TCP's once per window:
      a 429 for a request sent before the last decrease pauses but does not decrease again.
    * ``on_success``: additive increase by ``increase_rps_per_s`` per second of successful
      traffic (time since the previous success or 429, at most ``max(1 s, 2 intervals)``, so
      idle time earns little), capped at the ceiling. Time-based, not per request: a fast
      stream of successes cannot undo a decrease at once. Recovery from ``min_rps`` to the
      ceiling under steady successful traffic takes ``(ceiling - min_rps) / increase_rps_per_s``
      seconds; with the default ``increase_rps_per_s = ceiling / 20`` that is just under 20 s.
      (The latest reservation is re-spaced at the raised pace, so a slot taken at a low rate
      does not hold the next one back for a whole old interval.)
    * Headers, on success and on 429 alike: when ``remaining`` is known and ``reset_s > 0``,
      the pace is at most ``remaining / reset_s`` until the reset (what is left is spread evenly
      over the window), unless ``limit`` is known and at least half of it remains (then the
      allowance is not being drawn down and an earlier cap is dropped); ``remaining == 0``
      means no slot before ``now + reset_s`` (one interval when the reset is unknown).
      ``limit`` serves only that comparison (the window length is not published). A reset
      further away than ``max_pause_s`` is clamped to it (protects against a server that sends
      an epoch timestamp), and the next 429 would pause again anyway.

    Slots already handed out are not revoked by a later 429 in the pure API; ``acquire``
    re-checks after sleeping and queues again if a pause was imposed meanwhile.
    """

    __slots__ = (
        "_arrivals",
        "_cap_rate",
        "_cap_until",
        "_last_decrease",
        "_last_signal",
        "_not_before",
        "_pause_epoch",
        "_rate",
        "_released",
        "_server",
        "_tat",
        "_tat_base",
        "_tau",
        "_waiting",
        "burst",
        "ceiling",
        "decrease",
        "increase_rps_per_s",
        "max_pause_s",
        "min_rps",
        "throttled_total",
    )

    def __init__(
        self,
        ceiling_rps: float,
        *,
        min_rps: float = 0.2,
        increase_rps_per_s: float | None = None,
        decrease: float = 0.5,
        burst: float = 1.0,
        max_pause_s: float = 60.0,
    ) -> None:
        """``increase_rps_per_s`` defaults to ``ceiling_rps / 20``; ``min_rps`` is clamped to
        the ceiling. Raises ``ValueError`` on a non-positive ceiling or min, a decrease outside
        (0, 1), a burst below 1, a negative increase or a non-positive ``max_pause_s``."""
        if not (ceiling_rps > 0 and math.isfinite(ceiling_rps)):
            raise ValueError("ceiling_rps must be a positive number")
        if not min_rps > 0:
            raise ValueError("min_rps must be positive")
        if not 0 < decrease < 1:
            raise ValueError("decrease must be in (0, 1)")
        if not burst >= 1:
            raise ValueError("burst must be >= 1")
        if increase_rps_per_s is None:
            increase_rps_per_s = ceiling_rps / 20
        if not increase_rps_per_s >= 0:
            raise ValueError("increase_rps_per_s must be >= 0")
        if not max_pause_s > 0:
            raise ValueError("max_pause_s must be positive")
        self.ceiling = float(ceiling_rps)
        self.min_rps = min(float(min_rps), self.ceiling)
        self.increase_rps_per_s = float(increase_rps_per_s)
        self.decrease = float(decrease)
        self.burst = float(burst)
        self.max_pause_s = float(max_pause_s)
        self.throttled_total = 0  # 429s seen (monotonic counter, for metrics)
        self._rate = self.ceiling
        self._tau = (self.burst - 1.0) / self.ceiling  # GCRA tolerance, at the ceiling rate
        self._tat = -math.inf  # theoretical arrival time of the next free slot
        self._tat_base = -math.inf  # _tat before the last reservation added its interval
        self._not_before = -math.inf  # no slot before this (429 / exhausted window)
        self._pause_epoch = 0  # bumped whenever _not_before moves; acquire re-checks on change
        self._cap_rate = math.inf  # header-derived pace: remaining / reset_s ...
        self._cap_until = -math.inf  # ... valid until the window resets
        self._last_signal: float | None = None  # last success or 429 (additive increase clock)
        self._last_decrease = -math.inf
        # acquire's waiting line: (arrival time + priority head start, arrival, turn), and the
        # task serving it
        self._waiting: list[tuple[float, int, asyncio.Future[tuple[float, int]]]] = []
        self._arrivals = itertools.count()
        self._server: asyncio.Task[None] | None = None
        # acquire's release times, the last `ceiling + burst - 1` of them (see `acquire`)
        self._released: deque[float] = deque(
            maxlen=max(1, math.floor(self.ceiling + self.burst - 1))
        )

    @property
    def rate(self) -> float:
        """Currently permitted requests/s by AIMD (``min_rps <= rate <= ceiling``)."""
        return self._rate

    def effective_rate(self, now: float) -> float:
        """The pace ``reserve`` applies at ``now``: ``rate``, lowered by a header-derived cap."""
        if now < self._cap_until and self._cap_rate < self._rate:
            return self._cap_rate
        return self._rate

    def next_slot_in(self, now: float) -> float:
        """Seconds until the slot ``reserve(now)`` would hand out (0 = now), without taking it."""
        return max(now, self._tat - self._tau, self._not_before) - now

    def reserve(self, now: float) -> float:
        """Take the next slot; returns seconds to wait before sending (0 = send now).

        Successive calls get successive slots, each at least one interval after the previous,
        so callers are served first come, first served.
        """
        interval = _ROUND_UP / self.effective_rate(now)
        send = max(now, self._tat - self._tau, self._not_before)
        self._tat_base = max(self._tat, send)
        self._tat = self._tat_base + interval
        wait = send - now
        if now + wait < send:  # float rounding: the caller's `now + wait` must not fall short
            wait = math.nextafter(wait, math.inf)
        return wait

    def on_success(self, now: float, info: RateLimitInfo | None) -> None:
        """A request succeeded (any non-429 answer): additive increase, then honour headers."""
        if self._last_signal is not None and self._rate < self.ceiling:
            credit = min(now - self._last_signal, max(1.0, 2.0 / self._rate))
            if credit > 0:
                self._rate = min(self.ceiling, self._rate + self.increase_rps_per_s * credit)
                # Re-space the latest reservation at the new pace, as if it had been made now:
                # a slot taken at a low rate would otherwise hold the next one back for a whole
                # old interval. Still >= 1/ceiling per slot, so the window guarantee holds.
                retimed = self._tat_base + _ROUND_UP / self.effective_rate(now)
                self._tat = min(self._tat, retimed)
        self._last_signal = now if self._last_signal is None else max(self._last_signal, now)
        self._apply_headers(now, info)

    def on_throttled(
        self, now: float, info: RateLimitInfo | None, *, sent_at: float | None = None
    ) -> None:
        """A 429: multiplicative decrease; pause until the reset if known, at least one interval.

        ``sent_at``: when the throttled request was sent, if the caller knows; a 429 for a
        request sent before the last decrease belongs to the same episode and does not decrease
        the rate again (it still pauses).
        """
        self.throttled_total += 1
        if sent_at is None or sent_at >= self._last_decrease:
            self._rate = max(self.min_rps, self._rate * self.decrease)
            self._last_decrease = now
        self._last_signal = now
        reset = None if info is None else info.reset_s
        pause = 1.0 / self._rate
        if reset is not None:
            pause = max(pause, min(reset, self.max_pause_s))
        self._pause_until(now + pause)
        self._apply_headers(now, info)

    def _pause_until(self, until: float) -> None:
        if until > self._not_before:
            self._not_before = until
            self._pause_epoch += 1

    def _apply_headers(self, now: float, info: RateLimitInfo | None) -> None:
        if info is None or info.remaining is None:
            return
        reset = info.reset_s
        if reset is None:
            if info.remaining == 0:  # exhausted, reset unknown: hold back one interval
                self._pause_until(now + 1.0 / self._rate)
            return
        if reset <= 0:  # the window resets now: nothing to spread
            return
        reset = min(reset, self.max_pause_s)
        if info.remaining == 0:
            self._pause_until(now + reset)
        elif info.limit is not None and info.remaining * 2 >= info.limit:
            # At least half of the allowance is left: nothing is being used up faster than it
            # comes back, so there is nothing to spread (and an older cap is out of date). A
            # token bucket paced at its own rate reads "nearly full" on every answer; capping
            # at remaining/reset there (a whole second, rounded up) cost a fifth of the rate.
            self._cap_until = -math.inf
        else:
            self._cap_rate = info.remaining / reset
            self._cap_until = now + reset

    async def acquire(
        self, clock: Callable[[], float] = time.monotonic, *, priority: int = 0
    ) -> None:
        """Wait for a slot (the thin async wrapper; the only place that sleeps).

        Callers wait in line by arrival, each ``priority`` step counting as arriving
        `PRIORITY_STEP_S` later (aging): an import, which can carry a thousand changes, need
        not queue behind a hundred single removals that came moments before it, yet a removal
        waits behind a steady stream of imports no longer than that head start plus the line
        already ahead of it (strict priority let a backlog of adds starve the removals,
        holding their offsets).
        Slots are handed out in that order, each as soon as it is at most
        `LOOKAHEAD_S` away, at the pace of that moment: after a low header cap is lifted the
        pace is back within `LOOKAHEAD_S` (reserving for every caller on arrival had spaced
        them all at the low pace; two processes sharing a key reached ~55 % of its rate that
        way), and a busy event loop does not cost slots: everything due within the lookahead
        is handed out at once, and slots a busy loop overslept go out as soon as the sliding
        second below allows (handing out one slot per loop turn had halved the request rate
        while intake kept the loop busy). If a pause was imposed while waiting (a 429, an
        exhausted window) and the slot falls inside it, queue again behind the pause instead
        of sending into it. Cancelling
        the wait forfeits the slot (which errs on the polite side).

        The window guarantee holds for the granted slots; the releases are checked once more
        against the clock: a blocked event loop oversleeps the slots due meanwhile, and they
        would all go out together, on top of the next ones (a 10 requests/s limiter released
        14 in one second after the loop was blocked for 0.6 s). So a caller is released only
        when fewer than ``ceiling + burst - 1`` callers were released in the second before;
        otherwise it waits for the oldest of them to be a second old.
        """
        while True:
            turn: asyncio.Future[tuple[float, int]] = asyncio.get_running_loop().create_future()
            rank = clock() + priority * PRIORITY_STEP_S
            heapq.heappush(self._waiting, (rank, next(self._arrivals), turn))
            if self._server is None or self._server.done():
                self._server = asyncio.get_running_loop().create_task(self._serve(clock))
            wait, epoch = await turn
            if wait > 0:
                await asyncio.sleep(wait)
            if self._pause_epoch == epoch or clock() >= self._not_before:
                break
        released = self._released
        while True:
            now = clock()
            if len(released) < (released.maxlen or 1) or now - released[0] >= 1.0:
                released.append(now)
                return
            await asyncio.sleep(released[0] + 1.0 - now)

    async def _serve(self, clock: Callable[[], float]) -> None:
        """Hand out slots to the waiting line while anyone waits (see `acquire`)."""
        waiting = self._waiting
        while waiting:
            now = clock()
            ahead = self.next_slot_in(now)
            if ahead > LOOKAHEAD_S:
                await asyncio.sleep(ahead - LOOKAHEAD_S)
                continue
            _, _, turn = heapq.heappop(waiting)
            if not turn.done():  # else: cancelled while waiting
                epoch = self._pause_epoch
                turn.set_result((self.reserve(now), epoch))
