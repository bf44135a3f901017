"""The service: one event loop, one TaskGroup, and the ordering of shutdown written down.

The pipeline (docs/architecture.md): the source reads the input and the claims topic; stage 1
of the membership state (`consumer.state`) decides each input change and writes claims, stage
2 turns claims into desired states per (list, address), which the destination buffers coalesce
and the flushers send. Tasks owned by the TaskGroup: the fetch loop, one flusher per
destination, the committer, the state's checkpointer and the destinations file's watcher. The
HTTP server (metrics, health) lives beside them for the whole run. At start, the state's
topics are checked (and created when missing and allowed); the state's stores are restored as
partitions are assigned, and the lists not fed yet are backfilled.

Shutdown (SIGTERM/SIGINT, or `Service.stop()`), all inside CMSYNC_SHUTDOWN_BUDGET_S (a stop
before the consumer started abandons the start instead: `run`):
  1. stop fetching: the fetch loop ends at its next poll (≤ 200 ms); backfills stop (they
     resume from their progress at the next start);
  2. drain: every flusher sends what it buffers without waiting for the flush interval, until
     nothing is held and all buffers are empty, or the budget (less a reserve for 3 and 4) is
     spent (the wait is woken by the releases of holds, `Intake.wait_until`: no polling);
  3. commit the offsets that are durable now, checkpoint what was applied, close the stores;
  4. close: cancel the dead letters in flight, leave the group, stop the producers, close the
     Campaign Monitor session, stop the HTTP server.
A second signal skips to the end: the process exits at once, committing nothing more.

SIGHUP, or a change of the destinations file, reloads it (`Service.reload`): flushers are added,
stopped or reconfigured and the state takes the new routes, with no restart and no rebalance.

A rebalance drains the same way, for the revoked partitions only and within REVOKE_BUDGET_S,
before the source commits them (`_on_revoked`): the desired states of revoked claims
partitions are flushed and their requests in flight waited for, so that the next owner of an
address starts after the last write of this one.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import dataclasses
import functools
import gc
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import structlog
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord

from consumer import observability as obs
from consumer.buffer import AppliedMemory, DestinationBuffer
from consumer.consent import ConsentBook
from consumer.deadletter import DeadLetterQueue
from consumer.destinations import load_destinations
from consumer.flusher import REMOVAL_BATCH_SIZE, DestinationFlusher
from consumer.gateway import ApiGateway, gateways_for
from consumer.intake import Intake
from consumer.listsettings import read_list_check
from consumer.membership.changelog import (
    InputTopicMissingError,
    InternalTopics,
    TopicLayoutError,
    ensure_internal_topics,
)
from consumer.offsets import OffsetTracker
from consumer.settings import ConfigError, Destination, Settings, load_settings
from consumer.source import Partitions, Source
from consumer.state import MembershipState, Target
from consumer.tuning import (
    CLOSE_RESERVE_S,
    CLOSE_TIMEOUT_S,
    EXIT_RESERVE_S,
    GC_THRESHOLDS,
    INPUT_TOPIC_RETRY_S,
    MALLOC_ARENAS,
    READ_BACK_FETCH_BYTES,
    RELOAD_POLL_S,
    REVOKE_BUDGET_S,
    STATE_BATCH_BYTES,
    STATE_LINGER_MS,
)

log = structlog.get_logger("cmsync.app")

#: glibc's mallopt parameter number of M_ARENA_MAX (malloc.h).
M_ARENA_MAX = -8


def tune_garbage_collector() -> None:
    """Freeze what start-up allocated (modules, clients, settings: alive for the whole run, so
    no collection should traverse it again) and collect the young generations less often."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


def limit_malloc_arenas() -> None:
    """At most `MALLOC_ARENAS` glibc malloc arenas (the default is eight per core): RocksDB's
    and aiokafka's threads each got an arena of their own, and memory freed there stayed in
    the process. Measured with `python -m bench.outage --records 10000 --sizes 60000`: peak
    RSS 280 MiB instead of 302-311 MiB. Must run before those threads start; a no-op where the
    C library is not glibc, and an explicit ``MALLOC_ARENA_MAX`` in the environment wins."""
    if "MALLOC_ARENA_MAX" in os.environ or not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(M_ARENA_MAX, MALLOC_ARENAS)
    except (OSError, AttributeError):  # not glibc (musl, …): nothing to tune
        return


def unreachable(settings: Settings) -> str:
    """What to tell the operator when no broker could be connected to at start-up: with a
    security protocol, a refused handshake (a wrong SASL mechanism or password, TLS) looks
    the same to the client as a broker that is down, so both are named."""
    kafka = settings.kafka
    servers = ",".join(kafka.bootstrap_servers)
    message = (
        f"cannot connect to the Kafka brokers at {servers} (CMSYNC_KAFKA_BOOTSTRAP_SERVERS): "
        "check the address and that the brokers are up"
    )
    if kafka.security_protocol != "PLAINTEXT":
        mechanism = f", CMSYNC_KAFKA_SASL_MECHANISM={kafka.sasl_mechanism}" * bool(
            kafka.sasl_mechanism
        )
        message += (
            f", and that they accept CMSYNC_KAFKA_SECURITY_PROTOCOL={kafka.security_protocol}"
            f"{mechanism} and the credentials"
        )
    return message


def sending(destinations: Iterable[Destination]) -> list[Destination]:
    """The destinations the service writes to: not those that send nothing
    (`Destination.sends`: their connection lacks the personal data acknowledgement). Those are
    kept in the membership state (so their lists are owed, not forgotten, until the
    acknowledgement comes), but get no buffer, no flusher and no request."""
    return [d for d in destinations if d.sends]


class Service:
    """Wires source → membership state → buffers → flushers → commits, and shuts them down in
    the order of the module docstring. The hot paths are `MembershipState.handle_input` and
    `handle_claims`; the service only builds the pieces, runs their tasks, waits for the
    drains and decides when to stop.

    Public for callers that run or watch it: `run`, `stop`, `pipeline` (everything wired and
    the state's clients started, without consuming: for benchmarks), `liveness`/`readiness`,
    and the parts `tracker`, `intake`, `state`, `source`, `health`. One `run` (or `pipeline`)
    per instance.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        commit_interval_s: float = 1.0,
        env: Mapping[str, str] = os.environ,
    ) -> None:
        """``env``: where a reload of the destinations file reads the API keys it names (the
        environment the settings came from)."""
        self._env = env
        self._withheld = [d.name for d in settings.destinations if not d.sends]
        self.settings = settings
        self._commit_interval_s = commit_interval_s
        self.tracker = OffsetTracker()
        self.applied = AppliedMemory(settings.applied_memory)
        self.topics = InternalTopics.of_group(settings.kafka.group_id)
        self._stopping = asyncio.Event()
        self._dlq = DeadLetterQueue(settings.kafka.dlq_topic, settings.kafka.client_kwargs())
        self.intake = Intake(tracker=self.tracker, send_dead_letter=self._dlq.send)
        self._state: MembershipState | None = None
        self._flushers: list[DestinationFlusher] = []
        self._buffers: list[DestinationBuffer] = []
        self._targets: dict[str, Target] = {}  # by destination name
        self._gateways: dict[str, ApiGateway] = {}  # by destination name
        self._gateways_by_key: dict[str, ApiGateway] = {}
        self._session: aiohttp.ClientSession | None = None
        self._consent: ConsentBook
        self._tasks: list[asyncio.Task[None]] = []
        self._flusher_tasks: dict[str, asyncio.Task[None]] = {}  # by destination name
        self._group: asyncio.TaskGroup | None = None
        self._reloading = asyncio.Lock()
        self._destinations_text: bytes | None = None  # the file as last read
        self._draining = False
        self._deadline: float | None = None  # end of the shutdown budget, once stopping
        self._started = False  # the consumer started: a stop goes the graceful way
        self.source = Source(
            settings.kafka,
            topics=(settings.kafka.topic, self.topics.claims),
            handle=self._handle,
            committable=self._committable,
            outstanding=self._outstanding,
            max_pending=settings.max_pending,
            outstanding_bytes=self._outstanding_bytes,
            max_pending_bytes=settings.max_pending_bytes,
            on_revoked=self._on_revoked,
            on_assigned=self._on_assigned,
        )
        self.health = obs.HealthServer(
            settings.http_port, liveness=self.liveness, readiness=self.readiness
        )

    @property
    def state(self) -> MembershipState:
        """The membership state (inside `pipeline` or `run`)."""
        if self._state is None:
            raise RuntimeError("the membership state exists inside pipeline() only")
        return self._state

    # ---------------------------------------------------------------- wiring

    def _build_flushers(self, session: aiohttp.ClientSession) -> list[Target]:
        s = self.settings
        self._session = session
        gateways = self._gateways_for(s.destinations)
        obs.init_labels(
            topic=s.kafka.topic,
            destinations=[d.name for d in sending(s.destinations)],
            api_keys={g.key_name for g in gateways.values()},
            flush_interval_s=s.flush_interval_s,
        )
        obs.max_pending.set(s.max_pending)
        self._consent = ConsentBook(self._gateways, refresh_s=s.consent_refresh_s)
        obs.max_pending_bytes.set(s.max_pending_bytes)
        obs.pending_bytes.labels(destination=obs.NO_DESTINATION).set_function(
            self.intake.letter_bytes
        )
        for dest in sending(s.destinations):
            self._add_flusher(dest)
        return list(self._targets.values())

    def _gateways_for(self, destinations: Iterable[Destination]) -> Mapping[str, ApiGateway]:
        """The gateways of these destinations, by name (one per API key for the whole run: a
        reload reuses the gateway, and so the rate limiter, of a key already in use)."""
        s = self.settings
        gateways = gateways_for(
            destinations,
            base_url=s.cm_base_url,
            rate_limit_rps=s.rate_limit_rps,
            session=self._session,
            by_key=self._gateways_by_key,
        )
        self._gateways.update(gateways)
        return gateways

    def _add_flusher(self, dest: Destination) -> DestinationFlusher:
        """A buffer and a flusher for one destination that sends (its task is started by
        `_serve`, or by `reload` for a destination added while running)."""
        s = self.settings
        state = self.state
        gateway = self._gateways[dest.name]
        buffer = DestinationBuffer(
            dest.name,
            self.applied,
            flush_interval_s=s.flush_interval_s,
            max_removals=REMOVAL_BATCH_SIZE,
        )
        flusher = DestinationFlusher(
            destination=dest,
            buffer=buffer,
            gateway=gateway,
            consent=self._consent.for_destination(dest),
            dead_letters=self._dlq,
            release=state.release,
            source_topic=s.kafka.topic,
            on_applied=state.record_applied,
            original=state.original,
            before_send=state.mark_sending,
            removed_by_sync=state.removed_by_sync,
            list_settings=functools.partial(read_list_check, gateway, dest),
        )
        flusher.backfilling = functools.partial(state.backfilling, dest.list_id)
        self._flushers.append(flusher)
        self._buffers.append(buffer)
        obs.pending_bytes.labels(destination=dest.name).set_function(buffer.pending_bytes)
        self._targets[dest.name] = Target(dest, buffer, flusher.wake)
        return flusher

    async def _handle(
        self, topic: str, partition: int, records: Sequence[ConsumerRecord[Any, Any]]
    ) -> None:
        if topic == self.topics.claims:
            await self.state.handle_claims(partition, records)
        else:
            await self.state.handle_input(partition, records)

    def _committable(self, topic: str, partition: int) -> int | None:
        return None if self._state is None else self._state.committable(topic, partition)

    def _outstanding(self) -> int:
        """What backpressure counts: desired states in the buffers, and records waiting for
        their dead letters."""
        held = self.tracker.outstanding()
        return held if self._state is None else held + self._state.in_buffers()

    def _outstanding_bytes(self) -> int:
        """What the bytes bound counts: the buffers' estimated bytes, and the dead letters'."""
        return self.intake.letter_bytes() + sum(b.pending_bytes() for b in self._buffers)

    def pending(self) -> int:
        """Everything not yet applied or dead-lettered that this process knows of: what
        backpressure counts, the claims it wrote to its own partitions and has not taken yet,
        its backfills under way, and one while a restore runs (what it owes and backfills is
        not known before it ends). Tests and benchmarks wait for 0."""
        state = self._state
        if state is None:
            return self._outstanding()
        return self._outstanding() + state.claims_unread() + state.backfills() + state.restoring

    # ---------------------------------------------------------------- rebalance

    async def _on_revoked(self, partitions: Partitions) -> None:
        """Hand revoked partitions over (within REVOKE_BUDGET_S): flush what the buffers hold
        of the claims partitions and wait for their requests in flight, wait for the input
        partitions' dead letters, then close their stores; the source then commits them."""
        inputs = partitions[self.settings.kafka.topic]
        claims = partitions[self.topics.claims]
        log.info(
            "partitions_revoked", partitions=sorted(inputs), internal_partitions=sorted(claims)
        )
        state = self.state
        if not self._draining:
            for flusher in self._flushers:
                flusher.drain()
        outstanding_in = self.tracker.outstanding_in
        flushers = self._flushers

        def handed_over() -> bool:
            # A stalled destination's changes are owed in the state: nothing to wait for.
            flushed = state.in_buffers(claims) == 0 or all(
                f.drained() or f.stalled_reason for f in flushers
            )
            return flushed and all(outstanding_in(p) == 0 for p in inputs)

        try:
            async with asyncio.timeout(REVOKE_BUDGET_S):
                await self.intake.wait_until(handed_over)
        except TimeoutError:
            log.warning(
                "revocation_flush_incomplete",
                partitions=sorted(inputs),
                pending=state.in_buffers(claims) + sum(outstanding_in(p) for p in inputs),
            )
        if not self._draining:
            for flusher in self._flushers:
                flusher.end_drain()
        await state.revoke_claims(claims)
        await state.revoke_inputs(inputs)

    async def _on_assigned(self, partitions: Partitions) -> None:
        inputs = partitions[self.settings.kafka.topic]
        self.intake.forget([p for p in self.tracker.partitions() if p not in inputs])
        await self.state.assign(inputs, partitions[self.topics.claims])

    # ---------------------------------------------------------------- health

    def liveness(self) -> tuple[bool, str]:
        """(alive, reason) for /healthz: every long-running task still runs, or we stop."""
        tasks = [*self._tasks, *self._flusher_tasks.values()]
        dead = [t.get_name() for t in tasks if t.done()]
        if dead and not self._stopping.is_set():
            return False, f"tasks ended: {', '.join(dead)}"
        return True, "ok"

    def readiness(self) -> tuple[bool, str]:
        """(ready, reason) for /readyz. A stalled destination does not make the pod unready
        (`cmsync_destination_up` and CmsyncDestinationStalled report it): every pod that
        writes to it would be, and drains and rollouts would stop while its changes are owed
        in the membership state anyway."""
        if self._stopping.is_set():
            return False, "shutting down"
        if not self.source.joined:
            # Not before: a release that cannot reach Kafka (a wrong SASL secret) must not turn
            # Ready and replace the healthy pods. An idle replica (no partition) has joined.
            return False, "waiting to join the consumer group"
        if self._state is not None and self._state.restoring:
            return False, "restoring the membership state"
        return True, "joined"

    # ---------------------------------------------------------------- lifecycle

    def stop(self) -> None:
        """Ask for a graceful stop (what SIGTERM does)."""
        self._stopping.set()

    async def run(self) -> None:
        """Run until `stop` (or SIGTERM through `run_until_signalled`), then shut down in the
        order of the module docstring, inside CMSYNC_SHUTDOWN_BUDGET_S.

        A stop that comes while the service is still starting (its Kafka clients wait for a
        broker that does not answer) abandons the start at once: nothing was read, so nothing
        is owed, and the clients are closed within the budget."""
        obs.build_info.info({"version": _version(), "python": sys.version.split()[0]})
        await self.health.start()
        serving = asyncio.ensure_future(self._serve())
        stopping = asyncio.ensure_future(self._stopping.wait())
        try:
            await asyncio.wait({serving, stopping}, return_when=asyncio.FIRST_COMPLETED)
            if not serving.done() and not self._started:
                log.info("stopping_before_start")
                self._deadline = time.monotonic() + self.settings.shutdown_budget_s
                serving.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await serving
            else:
                await serving
        finally:
            stopping.cancel()
            if not serving.done():  # a forced stop (second signal): the caller was cancelled
                serving.cancel()
            await self.health.stop()
        log.info("stopped", pending=self._outstanding())

    async def _serve(self) -> None:
        """`run` without the HTTP server: start, serve, shut down (module docstring)."""
        budget = self.settings.shutdown_budget_s
        async with self.pipeline():
            try:
                if not await self._internal_topics():
                    return
                await self.source.start()
                self._started = True
                tune_garbage_collector()
                for name in self._withheld:
                    log.warning(
                        "destination_sends_nothing",
                        destination=name,
                        reason="its connection lacks personal_data = acknowledged",
                    )
                log.info(
                    "started",
                    destinations=[d.name for d in sending(self.settings.destinations)],
                    topic=self.settings.kafka.topic,
                    group=self.settings.kafka.group_id,
                )
                async with asyncio.TaskGroup() as tg:
                    self._group = tg
                    fetch = tg.create_task(self.source.fetch_loop(self._stopping), name="fetch")
                    for flusher in self._flushers:
                        self._start_flusher(flusher)
                    committer = tg.create_task(
                        self.source.commit_loop(self._commit_interval_s), name="commit"
                    )
                    checkpointer = tg.create_task(
                        self.state.checkpoint_loop(self._commit_interval_s), name="checkpoint"
                    )
                    watcher = tg.create_task(self._watch_destinations(), name="reload")
                    self._tasks = [fetch, committer, checkpointer, watcher]
                    await self._stopping.wait()
                    deadline = self._deadline = time.monotonic() + budget
                    # 1. stop fetching (and backfilling, and reloading)
                    watcher.cancel()
                    await fetch
                    await self.state.stop_backfills()
                    # 2. drain
                    self._draining = True
                    for flusher in self._flushers:
                        flusher.drain()
                    await self._drain(deadline - CLOSE_RESERVE_S)
                    # 3. commit, then checkpoint and close the stores
                    with contextlib.suppress(Exception):  # a failed commit means a re-read
                        await asyncio.wait_for(
                            self.source.commit(), max(0.5, deadline - time.monotonic() - 1)
                        )
                    for task in [*self._flusher_tasks.values(), committer, checkpointer]:
                        task.cancel()
                await self._within_budget(self.state.close)
            finally:
                # 4. close: dead letters in flight, the group (then, leaving `pipeline`,
                # the producers and the session; then the HTTP server)
                self.intake.close()
                await self._within_budget(self.source.stop)

    # ---------------------------------------------------------------- reload

    def _start_flusher(self, flusher: DestinationFlusher) -> None:
        assert self._group is not None
        name = flusher.destination.name
        self._flusher_tasks[name] = self._group.create_task(flusher.run(), name=f"flush:{name}")

    def request_reload(self) -> None:
        """Read the destinations file again now (SIGHUP)."""
        if self._group is not None and not self._stopping.is_set():
            self._group.create_task(self.reload(forced=True), name="reload:signal")

    async def _watch_destinations(self) -> None:
        """Reload the destinations file whenever its content changes (a mounted ConfigMap is
        replaced in place), looked at every RELOAD_POLL_S."""
        self._destinations_text = self._read_destinations()
        while True:
            await asyncio.sleep(RELOAD_POLL_S)
            text = self._read_destinations()
            if text is not None and text != self._destinations_text:
                await self.reload()

    def _read_destinations(self) -> bytes | None:
        with contextlib.suppress(OSError):  # gone for a moment: looked at again next time
            return Path(self.settings.destinations_file).read_bytes()
        return None

    async def reload(self, *, forced: bool = False) -> None:
        """Take the destinations file as it is now, without a restart or a rebalance (issue
        12): added destinations get a flusher and their lists are backfilled; removed ones
        stop writing at once (their buffered changes dropped, their positions released, their
        series removed); changed ones take effect for the next batch (their list's settings
        read again). An invalid file is refused (a log line, `cmsync_config_reloads`
        {outcome="refused"}) and the running configuration stays. ``forced`` (SIGHUP): also
        read the settings of held lists again, even if the file did not change."""
        async with self._reloading:
            self._destinations_text = self._read_destinations()
            problems: list[str] = []
            loaded = load_destinations(self.settings.destinations_file, self._env, problems)
            obs.destinations_refused.set(loaded is None or bool(problems))
            if loaded is None or problems:
                obs.config_reloads.labels(outcome="refused").inc()
                log.error("destinations_reload_refused", problems=problems)
                return
            old = {d.name: d for d in self.settings.destinations}
            new = {d.name: d for d in loaded.destinations}
            if old == new:
                obs.config_reloads.labels(outcome="unchanged").inc()
                if forced:
                    for flusher in self._flushers:
                        if flusher.stalled_reason is not None:
                            flusher.recheck()
                return
            self.settings = dataclasses.replace(self.settings, destinations=loaded.destinations)
            was = {d.name: d for d in sending(old.values())}
            now = {d.name: d for d in sending(new.values())}
            gone = [n for n, d in was.items() if n not in now or now[n].list_id != d.list_id]
            came = [n for n, d in now.items() if n not in was or was[n].list_id != d.list_id]
            changed = [n for n, d in now.items() if n in was and n not in came and was[n] != d]
            for name in gone:
                await self._remove_flusher(name)
            gateways = self._gateways_for(now.values())
            for flusher in self._flushers:
                name = flusher.destination.name
                if name in changed:
                    dest = now[name]
                    flusher.reconfigure(
                        dest,
                        gateway=gateways[name],
                        consent=self._consent.for_destination(dest),
                        list_settings=functools.partial(read_list_check, gateways[name], dest),
                    )
            obs.init_destination_labels(came)
            for name in came:
                self._start_flusher(self._add_flusher(now[name]))
            self.state.set_targets(self._targets.values())
            await self.state.reconfigure(loaded.destinations)
            obs.config_reloads.labels(outcome="applied").inc()
            log.info(
                "destinations_reloaded",
                added=sorted(set(new) - set(old)),
                removed=sorted(set(old) - set(new)),
                changed=sorted(n for n in set(old) & set(new) if old[n] != new[n]),
            )

    async def _remove_flusher(self, name: str) -> None:
        """Stop writing to a destination at once: its flusher stopped (requests under way are
        cancelled), everything its buffer holds dropped and released, its series removed."""
        task = self._flusher_tasks.pop(name, None)
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        flusher = next(f for f in self._flushers if f.destination.name == name)
        target = self._targets.pop(name)
        self._flushers.remove(flusher)
        self._buffers.remove(target.buffer)
        self._gateways.pop(name, None)
        self.state.set_targets(self._targets.values())
        self.state.release(target.buffer.abandon())
        obs.forget_destination(name)

    async def _internal_topics(self) -> bool:
        """Check (and create, unless CMSYNC_INTERNAL_TOPICS=require) the state's topics. While
        the input topic does not exist, wait for it (the group would read nothing anyway:
        CmsyncNoPartitionsAssigned); False when asked to stop meanwhile."""
        client = self.settings.kafka.client_kwargs()
        warned = False
        while True:
            try:
                await ensure_internal_topics(
                    client,
                    self.settings.kafka.topic,
                    self.topics,
                    create=self.settings.internal_topics == "create",
                )
                return True
            except InputTopicMissingError:
                if not warned:
                    log.warning("input_topic_missing", topic=self.settings.kafka.topic)
                    warned = True
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(INPUT_TOPIC_RETRY_S):
                    await self._stopping.wait()
                    return False

    @contextlib.asynccontextmanager
    async def pipeline(self) -> AsyncIterator[MembershipState]:
        """Everything `run` wires, without consuming: the state directory, the state's
        producer and restore consumer (started), the membership state, the Campaign Monitor
        session, the buffers and flushers (not started), the dead-letter producer (started).
        `run` uses it; benchmarks that drive the state's handlers themselves do too. Leaving
        it cancels the dead letters in flight, stops the clients and closes the session (and
        removes a temporary state directory)."""
        kafka = self.settings.kafka.client_kwargs()
        producer = AIOKafkaProducer(
            acks="all", linger_ms=STATE_LINGER_MS, max_batch_size=STATE_BATCH_BYTES, **kafka
        )
        restorer = AIOKafkaConsumer(
            group_id=None, enable_auto_commit=False, auto_offset_reset="earliest", **kafka
        )
        # Reads single records back for dead letters: a fetch of one record, not a megabyte
        # per read (a burst of dead letters, each fetching 1 MiB, took the process to 2.7 GiB).
        reader = AIOKafkaConsumer(
            group_id=None,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_partition_fetch_bytes=READ_BACK_FETCH_BYTES,
            fetch_max_bytes=READ_BACK_FETCH_BYTES,
            **kafka,
        )
        temporary = self.settings.state_dir is None
        root = Path(self.settings.state_dir or tempfile.mkdtemp(prefix="cmsync-state-"))
        session = aiohttp.ClientSession()
        # aiohttp silently re-sends a GET or DELETE once when a kept-alive connection drops;
        # that copy bypasses the rate limiter (guarantee 5: found by tests/faults, a 15 % drop
        # rate took one second to 57 requests under a ceiling of 50). Without it the drop
        # surfaces as a TransientError, retried through the limiter with backoff. No public
        # switch exists; aiohttp's own test client sets the same attribute.
        session._retry_connection = False
        try:
            await producer.start()
            await restorer.start()
            await reader.start()
            self._state = MembershipState(
                destinations=self.settings.destinations,
                topics=self.topics,
                state_dir=root / self.settings.kafka.group_id,
                producer=producer,
                restorer=restorer,
                reader=reader,
                input_topic=self.settings.kafka.topic,
                intake=self.intake,
                keep=self.settings.state_keep,
            )
            self._state.set_targets(self._build_flushers(session))
            try:
                await self._dlq.start()
                yield self._state
            finally:
                self.intake.close()
                await self._within_budget(self._dlq.stop)
        finally:
            await session.close()
            await self._within_budget(restorer.stop)
            await self._within_budget(reader.stop)
            await self._within_budget(producer.stop)
            if temporary:
                shutil.rmtree(root, ignore_errors=True)

    async def _drain(self, until: float) -> None:
        """Step 2: wait until no dead letter is in flight and every buffer is empty but those
        of stalled destinations (what they hold is owed in the state), or until ``until``."""
        flushers = self._flushers
        outstanding = self._outstanding
        letters = self.tracker.outstanding
        try:
            async with asyncio.timeout(until - time.monotonic()):
                await self.intake.wait_until(
                    lambda: (
                        letters() == 0 and all(f.drained() or f.stalled_reason for f in flushers)
                    )
                )
        except TimeoutError:
            log.warning("shutdown_drain_incomplete", pending=outstanding())

    async def _within_budget(self, stop: Callable[[], Awaitable[None]]) -> None:
        """Await a Kafka client's ``stop`` inside the shutdown budget; its failure is ignored.

        Leaving the group and stopping the producer wait on the broker. (A group join in
        progress holds the consumer's stop() until it completes — found by tests/faults:
        SIGTERM during a slow join exited after 12 s, budget 10. Cut short, the group notices
        our absence by the session timeout instead of LeaveGroup.)
        """
        left = CLOSE_TIMEOUT_S
        if self._deadline is not None:  # the process must also exit before the deadline
            left = self._deadline - EXIT_RESERVE_S - time.monotonic()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(stop(), max(0.1, left))


def _version() -> str:
    from consumer import __version__

    return __version__


async def run_until_signalled(settings: Settings) -> None:
    """Run the service; the first SIGTERM/SIGINT stops it gracefully, a second one forces."""
    service = Service(settings)  # inside the loop: the Kafka clients bind to it
    loop = asyncio.get_running_loop()
    main = asyncio.current_task()
    signals_seen = 0

    def on_signal(signum: int) -> None:
        nonlocal signals_seen
        signals_seen += 1
        if signals_seen == 1:
            log.info("stopping", signal=signal.Signals(signum).name)
            service.stop()
        else:
            log.warning("forced_stop", signal=signal.Signals(signum).name)
            if main is not None:
                main.cancel()

    def on_hangup() -> None:
        log.info("reload_requested", signal="SIGHUP")
        service.request_reload()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
    loop.add_signal_handler(signal.SIGHUP, on_hangup)
    try:
        await service.run()
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(signum)


def cli_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="cmsync run",
        description="Run the sync: consume membership events from Kafka, coalesce them per "
        "destination list and flush them to Campaign Monitor, serving /metrics, /healthz and "
        "/readyz, until SIGTERM or SIGINT. Configured entirely by CMSYNC_* environment "
        "variables (see `cmsync check-config --help`).",
    )
    parser.parse_args(argv)

    try:
        settings = load_settings(os.environ)
    except ConfigError as exc:
        print("configuration error:", file=sys.stderr)
        for problem in exc.problems:
            print(f"  - {problem}", file=sys.stderr)
        return 2
    obs.configure_logging(settings.log_level, settings.log_format)  # type: ignore[arg-type]
    from aiokafka.errors import KafkaConnectionError

    try:
        limit_malloc_arenas()
        asyncio.run(run_until_signalled(settings))
    except asyncio.CancelledError:
        return 1
    except TopicLayoutError as exc:
        log.error("fatal", error=type(exc).__name__)
        print(f"cmsync run: {exc}", file=sys.stderr)
        return 2
    except KafkaConnectionError as exc:  # at start-up: no broker answered
        log.error("fatal", error=type(exc).__name__, detail=str(exc)[:200])
        print(f"cmsync run: {unreachable(settings)}", file=sys.stderr)
        return 1
    except Exception as exc:
        # A task's failure arrives wrapped in the TaskGroup's ExceptionGroup: name the cause.
        cause: BaseException = exc
        while isinstance(cause, BaseExceptionGroup) and cause.exceptions:
            cause = cause.exceptions[0]
        log.error("fatal", error=type(cause).__name__, detail=str(cause)[:200], exc_info=exc)
        return 1
    return 0
