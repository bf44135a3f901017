"""Issue 14: two variables holding one API key (two destinations configured by different
teams) get one limiter, so the key's ceiling holds across both, through `cmsync run`.

Before, each variable had a limiter of its own: twice the ceiling. Measured from the
simulator's side: the most requests carrying the key in any sliding second while both lists
take removals (one call each) at once.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.faults.support import (
    API_KEY,
    Dest,
    FaultRig,
    note,
    peak_per_window,
    scaled,
    stream,
)

CEILING = 10


@pytest.mark.slow(60)
async def test_two_variables_holding_one_key_share_its_ceiling(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    dests = (Dest("news", "seg-a"), Dest("club", "seg-b", api_key_env="CLUB_CM_KEY"))
    env = {"CMSYNC_RATE_LIMIT_RPS": str(CEILING)}
    records = stream(scaled(300, 1_500), seed=61)
    async with FaultRig(kafka_bootstrap, tmp_path, dests=dests, env=env) as rig:
        proc = rig.spawn("svc", CLUB_CM_KEY=API_KEY)  # the same key under another name
        await rig.wait_assigned(proc)
        await rig.produce(records)
        await rig.wait_all_committed(scaled(120, 400), [proc])
        await rig.wait_for(lambda: not rig.list_problems(), 60, "both lists exact", [proc])
        times = rig.sim.request_times(API_KEY)
        peak = peak_per_window(times)
        proc.terminate()
        assert await proc.wait(30) == 0, proc.tail()
    note(
        f"two variables, one key: {len(times)} requests over both lists, peak {peak} in one "
        f"second (ceiling {CEILING})"
    )
    assert len(times) > 3 * CEILING  # long enough for a second of both lists at full pace
    assert peak <= CEILING + 1  # +1: arrival jitter on a shared machine (see the trouble tests)
