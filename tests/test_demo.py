"""`cmsync demo` end to end at a small size: what `make demo` runs, as a newcomer would."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys


async def test_demo_syncs_and_verifies_every_list() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CMSYNC_")}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "consumer",
        "demo",
        "--events",
        "4000",
        "--seed",
        "11",
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 240)
    text = out.decode()
    assert proc.returncode == 0, text[-3000:]
    assert "every list matches" in text
    for name in ("vip-newsletter", "vip-offers", "winback", "weekly-digest", "vip-or-lapsed"):
        assert re.search(rf"{name}\s+\d+ active\s+\d+ inactive\s+matches", text), text[-3000:]
    produced = int(re.search(r"events produced\s+(\d+)", text).group(1))  # type: ignore[union-attr]
    assert produced > 4000 * 0.8
    assert "unsubscribed themselves" in text
    assert "service stopped and started again" in text
    # The stream has guarantee 2's hard cases, late events across the restart among them.
    for pattern in (
        r"address changes\s+[1-9]\d*",
        r"shared addresses\s+[1-9]\d*",
        r"late events\s+\d+ ignored .*, [1-9]\d* of them after the restart",
        r"two-segment list\s+vip-or-lapsed .*: [1-9]\d* addresses held, [1-9]\d* of them",
    ):
        assert re.search(pattern, text), (pattern, text[-3000:])
