"""An in-process sync under test: real broker, simulator over real HTTP, the real Service.

`SyncHarness` is the rig (`consumer.devtools.rig.SyncRig`) with the integration tests' key and
timings; each harness has its own topic, dead-letter topic and consumer group, so tests share
one broker without seeing each other's records.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

from consumer.app import Service
from consumer.devtools.rig import Dest, SyncRig, headers_of
from consumer.devtools.simulator import SimulatorConfig
from consumer.devtools.synthetic import event_bytes

__all__ = ["API_KEY", "Dest", "SyncHarness", "event", "headers_of", "running"]

API_KEY = "test-key-0001"


def event(
    email: str | None,
    change: str = "entered",
    *,
    segment: str = "seg-a",
    at_ms: int = 1_764_417_600_000,
    name: str = "Ada Lovelace",
    city: str | None = "London",
    event_id: str | None = None,
    profile_id: str | None = None,
    extra: Mapping[str, object] | None = None,
) -> tuple[bytes, bytes]:
    """(key, value) of one native membership event."""
    pid = profile_id or f"p-{email}"
    profile: dict[str, object] = {"id": pid, "full_name": name, "city": city}
    if email is not None:
        profile["email"] = email
    profile.update(extra or {})
    value = event_bytes(
        event_id=event_id or str(uuid.uuid4()),
        segment_id=segment,
        entered=change == "entered",
        occurred_at_ms=at_ms,
        profile=profile,
    )
    return pid.encode(), value


class SyncHarness(SyncRig):
    """The rig with the integration tests' API key and timings (flush every 0.3 s, commits
    every 0.1 s, consent refreshed every 0.5 s, a generous rate)."""

    defaults: ClassVar[Mapping[str, str]] = {
        "CMSYNC_FLUSH_INTERVAL_S": "0.3",
        "CMSYNC_SHUTDOWN_BUDGET_S": "10",
        "CMSYNC_HTTP_PORT": "0",
        "CMSYNC_RATE_LIMIT_RPS": "500",
        "CMSYNC_CONSENT_REFRESH_S": "0.5",
    }

    def __init__(
        self,
        bootstrap: str,
        tmp: Path,
        destinations: Sequence[Dest],
        *,
        partitions: int = 3,
        env: Mapping[str, str] | None = None,
        sim_config: SimulatorConfig | None = None,
    ) -> None:
        super().__init__(
            bootstrap,
            tmp,
            destinations,
            api_key=API_KEY,
            partitions=partitions,
            sim_config=sim_config,
            env=env,
            prefix="membership",
        )

    async def __aenter__(self) -> SyncHarness:
        await super().__aenter__()
        return self

    async def start(self, **service_kwargs: Any) -> Service:
        return await super().start(commit_interval_s=0.1, **service_kwargs)

    async def produce(self, records: Iterable[tuple[bytes | None, bytes]]) -> None:
        """Produce in order, each record acknowledged before the next is sent."""
        await self.produce_pairs(records, one_by_one=True)

    async def committed(self) -> dict[int, int | None]:
        """The group's committed offsets as the broker holds them (None: none yet)."""
        return await self.committed_offsets()

    async def dead_letters(self, expect: int, within_s: float = 10.0) -> list[Any]:
        """The dead-letter topic: until `expect` records are there, and whatever follows."""
        return await self.read_dead_letters(lambda out: len(out) >= expect, within_s)


@contextlib.asynccontextmanager
async def running(h: SyncHarness) -> AsyncIterator[Service]:
    async with h.running() as service:
        yield service
