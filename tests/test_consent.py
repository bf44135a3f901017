"""Consent (guarantee 3) against the simulator over real HTTP: what the service reads, what it
costs, how it fails closed, and every timing of an opt-out against an exit and a re-entry.

The timing test runs the real flusher, buffer, gateway and consent knowledge, with the real
address table keeping what the sync removed, against the simulator; a person opts out at
each point of the timeline (also inside a flush: between taking its batch and sending it), for
every resubscribe policy and removal kind, and the list must end as the model below says. The
model is written from the contract, not from the code: it knows the list's state and who
changed it last, and what each policy allows.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
from collections.abc import AsyncIterator, Callable, Iterable, Sequence

import aiohttp
import pytest

from consumer import observability as obs
from consumer.buffer import AppliedMemory, Change, DestinationBuffer, Entry, Position
from consumer.campaign_monitor.client import ApiKey, CampaignMonitorClient
from consumer.consent import FRESH_S, ConsentBook, ConsentUnknownError, ListConsent
from consumer.destinations import Removal, Resubscribe
from consumer.devtools.rig import load_destinations
from consumer.devtools.simulator import FaultConfig, Simulator, SimulatorConfig, serve
from consumer.flusher import DestinationFlusher
from consumer.gateway import ApiGateway
from consumer.membership import AddressTable, Applied, Claim, DictStore
from consumer.ratelimit import AimdRateLimiter
from consumer.retry import Backoff
from consumer.rows import Wanted
from consumer.settings import Destination
from tests.simulator_fixtures import FakeClock

KEY = "k3y-for-consent-tests"
LIST_ID = "0123456789abcdef0123456789abcdef"
REFRESH_S = 300.0
FLUSH_S = 5.0

DESTINATIONS_TOML = f"""
[[destination]]
name = "news"
segment_id = "seg"
list_id = "{LIST_ID}"
email_field = "email"
"""


@pytest.fixture
def destination() -> Destination:
    return load_destinations(DESTINATIONS_TOML, KEY)[0]


@pytest.fixture
def wall() -> FakeClock:
    """The simulator's wall clock (the dates its listings show)."""
    return FakeClock(1_800_000_000.0)


@pytest.fixture
def sim(wall: FakeClock) -> Simulator:
    sim = Simulator(SimulatorConfig(api_keys=(KEY,)), wall_clock=wall)
    sim.add_list(LIST_ID, unsubscribe_setting="OnlyThisList")
    return sim


@pytest.fixture
async def gateway(sim: Simulator) -> AsyncIterator[ApiGateway]:
    async with serve(sim) as base_url, aiohttp.ClientSession() as session:
        client = CampaignMonitorClient(base_url, ApiKey(KEY), session=session)
        yield ApiGateway(
            "CMSYNC_CM_API_KEY",
            client,
            AimdRateLimiter(1000.0),
            backoff=Backoff(0.001, 0.01),
            stall_retry_s=0.02,
        )


def requests(sim: Simulator, endpoint: str) -> int:
    return sum(sim.request_counts().get(endpoint, {}).values())


def metric(name: str, **labels: str) -> float:
    return obs.REGISTRY.get_sample_value(name, labels) or 0.0


def consent_for(destination: Destination, gateway: ApiGateway, clock: FakeClock) -> ListConsent:
    book = ConsentBook({destination.name: gateway}, refresh_s=REFRESH_S, clock=clock)
    return book.for_destination(destination)


# ------------------------------------------------------------------ reads and their cost


async def test_a_full_read_then_incremental_reads_see_every_opt_out(
    sim: Simulator, gateway: ApiGateway, destination: Destination
) -> None:
    clock = FakeClock()
    sim.force_state(LIST_ID, "Left@Example.com", "Unsubscribed")
    sim.force_state(LIST_ID, "bounced@example.com", "Bounced")
    sim.force_state(LIST_ID, "active@example.com", "Active")
    consent = consent_for(destination, gateway, clock)
    await consent.warm()
    assert requests(sim, "members") == 2  # one page per state
    asked = ["left@example.com", "bounced@example.com", "active@example.com", "late@example.com"]

    found = await consent.opted_out(asked, since=clock(), activating=False)
    assert found.unsubscribed == {"left@example.com"}
    assert found.bounced == {"bounced@example.com"}
    assert requests(sim, "members") == 2  # the read of this very moment serves

    sim.force_state(LIST_ID, "late@example.com", "Unsubscribed")  # a second ago
    clock.advance(FRESH_S)
    found = await consent.opted_out(asked, since=clock(), activating=False)
    assert found.unsubscribed == {"left@example.com", "late@example.com"}
    assert requests(sim, "members") == 4  # incremental: one date-filtered page per state
    assert consent.sizes() == {"unsubscribed": 2, "bounced": 1}


async def test_one_read_serves_every_write_waiting_for_it(
    sim: Simulator, gateway: ApiGateway, destination: Destination
) -> None:
    clock = FakeClock()
    consent = consent_for(destination, gateway, clock)
    await consent.warm()
    clock.advance(FRESH_S)
    since = clock()
    batches = [[f"p{n}@example.com" for n in range(i, i + 20)] for i in range(0, 100, 20)]
    await asyncio.gather(*(consent.opted_out(b, since=since, activating=False) for b in batches))
    assert requests(sim, "members") == 2 + 2  # the warm-up, then one read for all five


async def test_request_cost_of_listings_is_pages_plus_a_constant(
    sim: Simulator, gateway: ApiGateway, destination: Destination
) -> None:
    """Issue 13's measure, at a tenth of its size: 10,000 Unsubscribed and 2,000 Bounced
    members are 12 pages of 1,000; then each check before a write is one page per state."""
    for n in range(10_000):
        sim.force_state(LIST_ID, f"u{n}@example.com", "Unsubscribed")
    for n in range(2_000):
        sim.force_state(LIST_ID, f"b{n}@example.com", "Bounced")
    clock = FakeClock()
    consent = consent_for(destination, gateway, clock)
    await consent.warm()
    assert requests(sim, "members") == 10 + 2
    assert consent.sizes() == {"unsubscribed": 10_000, "bounced": 2_000}
    for _ in range(3):
        clock.advance(FRESH_S)
        found = await consent.opted_out(["u7@example.com"] * 11, since=clock(), activating=False)
        assert found.unsubscribed == {"u7@example.com"}
    # Every row is as recent as the newest (the same second): the date filter alone would
    # give the whole listing each time; newest first, a page without a new address ends it.
    assert requests(sim, "members") == 12 + 3 * 2


async def test_incremental_reads_skip_what_is_older_than_the_margin(
    sim: Simulator, gateway: ApiGateway, destination: Destination, wall: FakeClock
) -> None:
    """An incremental read starts at the newest opt-out date seen less the margin: after the
    first ones (which re-read what is that recent), one short page per state."""
    for n in range(3_000):
        sim.force_state(LIST_ID, f"u{n}@example.com", "Unsubscribed")
    clock = FakeClock()
    consent = consent_for(destination, gateway, clock)
    await consent.warm()
    assert requests(sim, "members") == 3 + 1

    async def opt_out_and_ask(address: str) -> int:
        before = requests(sim, "members")
        wall.advance(3600)  # an hour later
        sim.force_state(LIST_ID, address, "Unsubscribed")
        clock.advance(FRESH_S)
        found = await consent.opted_out([address] * 11, since=clock(), activating=False)
        assert found.unsubscribed == {address}
        return requests(sim, "members") - before

    # Newest first: the page with the new one, then a page of known rows ends the read.
    assert await opt_out_and_ask("first@example.com") == 2 + 1
    assert await opt_out_and_ask("second@example.com") == 1 + 1  # all new ones on page 1
    assert await opt_out_and_ask("third@example.com") == 1 + 1


async def test_small_batches_ask_per_address_until_the_first_read_is_done(
    sim: Simulator, gateway: ApiGateway, destination: Destination
) -> None:
    clock = FakeClock()
    sim.force_state(LIST_ID, "left@example.com", "Unsubscribed")
    sim.force_state(LIST_ID, "stays@example.com", "Active")
    consent = consent_for(destination, gateway, clock)
    found = await consent.opted_out(
        ["left@example.com", "stays@example.com", "absent@example.com"],
        since=clock(),
        activating=False,
    )
    assert found.unsubscribed == {"left@example.com"}
    assert requests(sim, "get") == 3
    assert requests(sim, "members") == 0


async def test_a_listing_that_cannot_be_read_fails_closed(
    sim: Simulator, gateway: ApiGateway, destination: Destination
) -> None:
    clock = FakeClock()
    consent = consent_for(destination, gateway, clock)
    await consent.warm()
    sim.set_faults(FaultConfig(script=[400]))  # a refusal retrying cannot fix
    before = metric(
        "cmsync_consent_reads_total", destination="news", listing="unsubscribed", outcome="failed"
    )
    clock.advance(FRESH_S)
    with pytest.raises(ConsentUnknownError, match="listing could not be read") as failed:
        await consent.opted_out(["x@example.com"] * 11, since=clock(), activating=False)
    assert "@" not in str(failed.value)
    after = sum(
        metric("cmsync_consent_reads_total", destination="news", listing=s, outcome="failed")
        for s in ("unsubscribed", "bounced")
    )
    assert after - before >= 1
    # The next question reads again (nothing was taken from the failed read).
    found = await consent.opted_out(["x@example.com"] * 11, since=clock(), activating=False)
    assert not found.unsubscribed


async def test_a_failing_listing_is_retried_page_by_page_and_holds_the_answer(
    sim: Simulator, gateway: ApiGateway, destination: Destination
) -> None:
    """503s and 429s in the middle of a paged read: the read resumes at the page that failed
    and the answer waits for it (never a partial set)."""
    for n in range(25):
        sim.force_state(LIST_ID, f"u{n:02}@example.com", "Unsubscribed")
    clock = FakeClock()
    consent = ListConsent(destination, gateway, refresh_s=REFRESH_S, clock=clock)
    sim.set_faults(FaultConfig(script=[200, 503, 429, 200]))
    found = await consent.opted_out(
        [f"u{n:02}@example.com" for n in range(25)], since=clock(), activating=False
    )
    assert len(found.unsubscribed) == 25


async def test_the_clients_suppression_list_protects_a_re_entry(
    sim: Simulator, gateway: ApiGateway, destination: Destination, wall: FakeClock
) -> None:
    """With a connection's client ID the suppression list counts before a write that would
    reactivate (read in full, then newest first until older than the mark), and is shared by
    the destinations of that client; without one it is not read."""
    dest = dataclasses.replace(destination, client_id=sim.client_id())
    other = dataclasses.replace(dest, name="other")
    sim.suppress("old@example.com")
    clock = FakeClock()
    book = ConsentBook({"news": gateway, "other": gateway}, refresh_s=REFRESH_S, clock=clock)
    consent, sibling = book.for_destination(dest), book.for_destination(other)
    await consent.warm()
    assert requests(sim, "suppression_list") == 1
    assert consent.sizes()["suppressed"] == 1

    wall.advance(3600)
    sim.suppress("new@example.com")
    clock.advance(FRESH_S)
    asked = ["old@example.com", "new@example.com", "free@example.com"] * 4
    found = await consent.opted_out(asked, since=clock(), activating=True)
    assert found.suppressed == {"old@example.com", "new@example.com"}
    assert found.protects("new@example.com")
    again = await sibling.opted_out(asked, since=clock(), activating=True)
    assert again.suppressed == found.suppressed
    assert requests(sim, "suppression_list") == 2  # one incremental read, shared

    plain = consent_for(destination, gateway, clock)  # no client ID: not read
    await plain.warm()
    found = await plain.opted_out(asked, since=clock(), activating=True)
    assert not found.suppressed
    assert requests(sim, "suppression_list") == 2


# ------------------------------------------------------------------ every timing


SLOTS = (
    "before_start",  # before the service read anything
    "before_exit",
    "during_exit",  # the exit's batch is taken, its write not sent yet
    "after_exit",
    "during_entry",
    "after_entry",  # before the second exit
    "during_exit2",
)
POLICIES: tuple[Resubscribe, ...] = ("never", "deleted-only", "always")
REMOVALS: tuple[Removal, ...] = ("delete", "unsubscribe")
KINDS = ("Unsubscribed", "Bounced")


@dataclasses.dataclass
class Model:
    """The list's state of the one address, and what the contract lets the sync do."""

    policy: str
    removal: str
    state: str = "Active"
    removed_by_sync: bool = False

    def opt_out(self, kind: str) -> None:
        self.state = kind

    def exit(self) -> None:
        if self.policy != "always" and self.state in KINDS:
            self.removed_by_sync = False  # the person's: left as it is
            return
        if self.removal == "delete":
            self.state = "Deleted"
        elif self.state == "Active":
            self.state = "Unsubscribed"
        self.removed_by_sync = True

    def enter(self) -> None:
        resubscribe = self.policy == "always"
        if self.policy == "deleted-only" and self.removed_by_sync:
            theirs = self.state == "Bounced" or (
                self.state == "Unsubscribed" and self.removal != "unsubscribe"
            )
            resubscribe = not theirs
        if resubscribe or self.state == "Active":
            self.state = "Active"
        self.removed_by_sync = False


def expected(policy: str, removal: str, kind: str | None, slot: str) -> tuple[str, str]:
    """(state after the re-entry, state after the second exit)."""
    model = Model(policy, removal)
    steps: list[tuple[str, Callable[[], None]]] = [
        ("before_exit", lambda: None),
        ("during_exit", model.exit),
        ("after_exit", lambda: None),
        ("during_entry", model.enter),
        ("after_entry", lambda: None),
        ("during_exit2", model.exit),
    ]
    if kind is not None and slot == "before_start":
        model.opt_out(kind)
    after_entry = ""
    for name, step in steps:
        if kind is not None and slot == name:
            model.opt_out(kind)
        step()
        if name == "during_entry":
            after_entry = model.state
    return after_entry, model.state


CASES = [
    (policy, removal, kind, slot, refresh)
    for policy, removal in itertools.product(POLICIES, REMOVALS)
    for kind, slot, refresh in [
        *itertools.product(KINDS, SLOTS, (False, True)),
        (None, "none", False),
        (None, "none", True),
    ]
]


class Timeline:
    """One address through: synced, exit, re-entry, exit; the real flusher writes each."""

    def __init__(
        self, destination: Destination, gateway: ApiGateway, sim: Simulator, address: str
    ) -> None:
        self.clock = FakeClock()
        self.sim = sim
        self.address = address
        self.table = AddressTable(DictStore())
        self.buffer = DestinationBuffer(
            destination.name, AppliedMemory(100), flush_interval_s=FLUSH_S, max_removals=25
        )
        self.released: list[Position] = []
        self._changed = asyncio.Event()
        self.during: Callable[[], None] | None = None  # an opt-out inside the next flush
        self.version = 0
        self.flusher = DestinationFlusher(
            destination=destination,
            buffer=self.buffer,
            gateway=gateway,
            consent=consent_for(destination, gateway, self.clock),
            dead_letters=_NoLetters(),
            release=self._release,
            source_topic="membership",
            on_applied=self._applied,
            before_send=self._before_send,
            removed_by_sync=self._removed_by_sync,
            clock=self.clock,
        )

    def _release(self, positions: Iterable[Position]) -> None:
        self.released.extend(positions)
        self._changed.set()

    def _applied(self, entries: Sequence[Entry], outcome: Applied) -> None:
        for entry in entries:
            payload = entry.change.payload
            assert isinstance(payload, Wanted)
            self.table.record_applied(payload.desired, outcome)

    async def _before_send(self, entries: Sequence[Entry]) -> Sequence[Entry]:
        self._applied(entries, Applied.SENDING)
        if self.during is not None:
            self.during()
            self.during = None
        return entries

    def _removed_by_sync(self, entry: Entry) -> bool:
        state = self.table.state(LIST_ID, entry.change.key)
        return state is not None and state.removed_by_sync

    async def change(self, holds: bool) -> None:
        """The member enters (holds) or exits; wait until the flusher wrote it."""
        self.version += 1
        claim = Claim(LIST_ID, self.address, ("seg", "p1"), (self.version, self.version), holds)
        desired = self.table.apply(claim)
        assert desired is not None
        position: Position = self.version
        self.buffer.offer(
            Change(
                self.address,
                holds,
                desired.revision,
                desired.revision,
                desired.revision,
                Wanted(desired, 1_700_000_000_000),
                position,
            ),
            self.clock(),
        )
        self.clock.advance(FLUSH_S)
        self.flusher.wake()
        async with asyncio.timeout(10):  # only keeps a broken flusher from hanging the suite
            while position not in self.released:
                self._changed.clear()
                await self._changed.wait()

    def state(self) -> str:
        return str(self.sim.list_state(LIST_ID)[self.address]["State"])


class _NoLetters:
    async def send(self, letter: object) -> None:
        raise AssertionError("nothing here is rejected")


@pytest.mark.parametrize(("policy", "removal", "kind", "slot", "refresh"), CASES)
async def test_every_timing_of_an_opt_out_against_exit_and_re_entry(
    sim: Simulator,
    gateway: ApiGateway,
    destination: Destination,
    policy: Resubscribe,
    removal: Removal,
    kind: str | None,
    slot: str,
    refresh: bool,
) -> None:
    dest = dataclasses.replace(destination, resubscribe=policy, removal=removal)
    address = "ada@example.com"
    timeline = Timeline(dest, gateway, sim, address)
    sim.force_state(LIST_ID, address, "Active")
    # The sync added it (its state says so, as after the first sync of the member).
    [joined] = [timeline.table.apply(Claim(LIST_ID, address, ("seg", "p1"), (0, 0), True))]
    assert joined is not None
    timeline.table.record_applied(joined, Applied.ACTIVE)

    def opt_out() -> None:
        assert kind is not None
        sim.force_state(LIST_ID, address, kind)

    def at(name: str) -> None:
        if slot == name:
            opt_out()
        if slot == f"during_{name}":
            timeline.during = opt_out

    at("before_start")
    task = asyncio.create_task(timeline.flusher.run())
    try:
        await asyncio.sleep(0)
        at("before_exit")
        at("exit")
        await timeline.change(holds=False)
        at("after_exit")
        if refresh:  # the next read is a full one
            timeline.clock.advance(REFRESH_S)
        at("entry")
        await timeline.change(holds=True)
        after_entry = timeline.state()
        at("after_entry")
        at("exit2")
        await timeline.change(holds=False)
        final = timeline.state()
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    assert (after_entry, final) == expected(policy, removal, kind, slot)
    no_change = (removal, kind, slot) == ("unsubscribe", "Unsubscribed", "after_exit")
    if policy != "always" and kind is not None and not no_change:
        # The contract's own words: an opt-out is never reactivated nor deleted. (After the
        # sync's own unsubscribe, "Unsubscribed" by the person changes nothing: not counted.)
        assert final == kind
    if kind is None:  # what the sync removed comes back, unless the policy is "never"
        assert (after_entry == "Active") is (policy != "never")
