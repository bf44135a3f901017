"""Guarantee 3 through `cmsync run`'s service, as issue 13 tried it: real broker, simulator over
real HTTP, the default consent refresh (300 s), so only the reads right before a write can see
an opt-out made seconds earlier."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.harness import Dest, SyncHarness, event, running

T0 = 1_764_417_600_000
#: The harness refreshes consent every 0.5 s; these tests need the default, so that a refresh
#: cannot be what saw the opt-out.
DEFAULT_REFRESH = {"CMSYNC_CONSENT_REFRESH_S": "300"}


@pytest.mark.parametrize("removal", ["delete", "unsubscribe"])
@pytest.mark.parametrize("opt_out", ["Unsubscribed", "Bounced"])
async def test_an_opt_out_seconds_before_an_exit_is_neither_deleted_nor_reactivated(
    kafka_bootstrap: str, tmp_path: Path, removal: str, opt_out: str
) -> None:
    dest = Dest("news", "seg-a", removal=removal)
    async with (
        SyncHarness(kafka_bootstrap, tmp_path, [dest], env=DEFAULT_REFRESH) as h,
        running(h),
    ):
        await h.produce([event("ada@example.com", at_ms=T0), event("bob@example.com", at_ms=T0)])
        await h.wait_synced()
        assert h.state_of("news", "ada@example.com") == "Active"
        # Ada opts out in Campaign Monitor; moments later she leaves the segment, comes back.
        h.sim.force_state(h.list_ids["news"], "ada@example.com", opt_out)
        await h.produce(
            [
                event("ada@example.com", "exited", at_ms=T0 + 1000),
                event("bob@example.com", "exited", at_ms=T0 + 1000),
            ]
        )
        await h.wait_synced()
        assert h.state_of("news", "ada@example.com") == opt_out  # not deleted
        await h.produce(
            [event("ada@example.com", at_ms=T0 + 2000), event("bob@example.com", at_ms=T0 + 2000)]
        )
        await h.wait_synced()
        assert h.state_of("news", "ada@example.com") == opt_out  # not reactivated
        assert h.state_of("news", "bob@example.com") == "Active"  # the sync's removal undone


@pytest.mark.parametrize("wipe", [False, True])
async def test_the_syncs_own_unsubscribe_comes_back_after_a_restart(
    kafka_bootstrap: str, tmp_path: Path, wipe: bool
) -> None:
    """removal = "unsubscribe": the list shows the sync's removal as Unsubscribed, like a
    person's. The state remembers it was the sync's, across a restart, and across a wiped state
    directory (restored from the changelog): the re-entry brings the address back, while a
    person's own unsubscribe stays."""
    state_dir = tmp_path / "state"
    env = {**DEFAULT_REFRESH, "CMSYNC_STATE_DIR": str(state_dir)}
    dest = Dest("news", "seg-a", removal="unsubscribe")
    async with SyncHarness(kafka_bootstrap, tmp_path, [dest], env=env) as h:
        async with running(h):
            await h.produce(
                [event("ours@example.com", at_ms=T0), event("theirs@example.com", at_ms=T0)]
            )
            await h.wait_synced()
            h.sim.force_state(h.list_ids["news"], "theirs@example.com", "Unsubscribed")
            await h.produce([event("ours@example.com", "exited", at_ms=T0 + 1000)])
            await h.wait_synced()
            assert h.state_of("news", "ours@example.com") == "Unsubscribed"  # by the sync
        if wipe:
            shutil.rmtree(state_dir)
        async with running(h):
            await h.produce(
                [
                    event("ours@example.com", at_ms=T0 + 2000),
                    event("theirs@example.com", "exited", at_ms=T0 + 2000),
                ]
            )
            await h.wait_synced()
            await h.produce([event("theirs@example.com", at_ms=T0 + 3000)])
            await h.wait_synced()
        assert h.state_of("news", "ours@example.com") == "Active"
        assert h.state_of("news", "theirs@example.com") == "Unsubscribed"
