"""Consent bookkeeping: which addresses of a list the sync must neither reactivate nor delete.

Under ``resubscribe = "deleted-only"`` those are the list's Unsubscribed and Bounced members:
they chose to leave (or cannot receive), so they are never imported with ``Resubscribe: true``
and never deleted (deleting would turn an unsubscribe into a deletion that a re-entry could
undo). Every other address may be resubscribed, so addresses the sync deleted come back on
re-entry. Under ``never`` and ``always`` nothing is protected here (``never`` imports with
``Resubscribe: false``; Campaign Monitor then keeps inactive addresses inactive).

The protected set is read in full from the paged member listings (through the gateway, one
rate-limit slot per page) at the first flush and every ``refresh_s`` after. Known limit
(docs/architecture.md): an address that unsubscribes after the last refresh and re-enters the
segment before the next one is resubscribed. Issue 13 changes this policy: it lives here alone.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, Final, Protocol

from consumer.campaign_monitor.client import MemberState
from consumer.membership.normalise import normalise_address
from consumer.settings import Destination

__all__ = ["Consent", "MemberListing"]

#: Member states whose addresses the sync must not override under "deleted-only".
PROTECTED_STATES: Final[tuple[MemberState, ...]] = ("unsubscribed", "bounced")


class MemberListing(Protocol):
    """What consent needs of the gateway (`ApiGateway.members`)."""

    def members(
        self, list_id: str, state: MemberState, *, destination: str
    ) -> AsyncIterator[dict[str, Any]]: ...


class Consent:
    """The protected addresses of one destination's list. Caller: that destination's flusher,
    before each batch (`protected`)."""

    def __init__(
        self,
        destination: Destination,
        listing: MemberListing,
        *,
        refresh_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.destination = destination
        self._listing = listing
        self._refresh_s = refresh_s
        self._clock = clock
        self._protected: frozenset[str] = frozenset()
        self._read_at: float | None = None
        self._reading = asyncio.Lock()  # batches flushing together share one read

    async def protected(self) -> frozenset[str]:
        """Normalised addresses the flusher must skip (neither send nor remove; they count as
        done). Re-reads the listings when the last read is older than ``refresh_s`` (the
        first call always reads); waits for a read in progress. Empty unless the destination
        says ``resubscribe = "deleted-only"``."""
        if self.destination.resubscribe != "deleted-only":
            return frozenset()
        async with self._reading:
            now = self._clock()
            if self._read_at is None or now - self._read_at >= self._refresh_s:
                self._protected = await self._read()
                self._read_at = now
        return self._protected

    async def _read(self) -> frozenset[str]:
        found: set[str] = set()
        dest = self.destination
        for state in PROTECTED_STATES:
            async for member in self._listing.members(dest.list_id, state, destination=dest.name):
                found.add(normalise_address(str(member["EmailAddress"])))
        return frozenset(found)
