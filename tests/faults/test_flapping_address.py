"""Issue 14: one address written too often ("Subscriber was added too many times too quickly",
a 429 without rate headers) beside thousands of other adds, through `cmsync run`.

Campaign Monitor throttles that one address; before, every such 429 halved the whole key's
rate and its import was retried whole. Now the flusher splits the address out of its import
and holds it back, so the other adds are applied at once, the key's permitted rate never drops,
and the flapping address ends in its latest state once the throttle lets it through.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path

import pytest

from consumer.devtools.simulator import AddressThrottle, SimulatorConfig
from tests.faults.support import API_KEY, FaultRig, ServiceProcess, change, note, scaled

CEILING = 20


async def lowest_rate(proc: ServiceProcess, into: list[float]) -> None:
    while proc.alive():
        with contextlib.suppress(Exception):
            metrics = await proc.metrics()
            into.append(metrics.value("cmsync_permitted_rate", api_key="CMSYNC_CM_API_KEY"))
        await asyncio.sleep(0.2)


@pytest.mark.slow(30)
async def test_a_flapping_address_does_not_slow_the_others(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    # One accepted write per address per 2 s: the flapping address trips it, nobody else does.
    config = SimulatorConfig(api_keys=(API_KEY,), per_address_throttle=AddressThrottle(1, 2.0))
    env = {"CMSYNC_RATE_LIMIT_RPS": str(CEILING)}
    others = scaled(5_000, 20_000)
    t0 = 1_764_417_600_000
    async with FaultRig(kafka_bootstrap, tmp_path, sim_config=config, env=env) as rig:
        proc = rig.spawn("svc")
        await rig.wait_assigned(proc)
        rates: list[float] = []
        scraper = asyncio.create_task(lowest_rate(proc, rates))
        started = time.monotonic()
        flips = 8
        for flip in range(flips):
            # The flapping address changes in every round (one flush each), beside its share
            # of the other adds.
            share = [
                change(f"p{n}@example.com", at_ms=t0 + n)
                for n in range(flip * others // flips, (flip + 1) * others // flips)
            ]
            flap = change("flap@example.com", entered=flip % 2 == 0, at_ms=t0 + 10_000 + flip)
            await rig.produce([flap, *share])
            await asyncio.sleep(0.4)  # longer than the flush interval: a write each round
        await rig.wait_all_committed(scaled(60, 180), [proc])
        applied = {w.email for w in rig.sim.applied_writes() if w.endpoint == "import"}
        others_at = time.monotonic() - started
        assert {f"p{n}@example.com" for n in range(others)} <= applied
        await rig.wait_for(
            lambda: not rig.list_problems(), 60, "the flapping address in its last state", [proc]
        )
        metrics = await proc.metrics()
        throttled = metrics.value("cmsync_address_throttled_total", api_key="CMSYNC_CM_API_KEY")
        held = metrics.value("cmsync_addresses_held_back_total", destination="news")
        proc.terminate()
        assert await proc.wait(30) == 0, proc.tail()
        scraper.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await scraper
    note(
        f"flapping address beside {others} adds: others applied {others_at:.1f} s after the "
        f"first record; per-address 429s {throttled:.0f}, changes held back {held:.0f}; "
        f"lowest permitted rate {min(rates, default=float('nan')):g}/s (ceiling {CEILING})"
    )
    assert throttled > 0  # the scenario did trip the throttle
    assert held > 0
    assert rates
    assert min(rates) == CEILING  # a per-address 429 never lowered the key's rate
