"""The one test and benchmark rig: a sync under test, built the same way everywhere.

What the demo, the integration tests, the fault suite and the benchmarks share, in one place:

- `Dest` and `destinations_toml`: the destinations file is rendered here and nowhere else;
  `DEMO_*` are the standard workload (the demo's four segments and four lists);
- `service_env`: the CMSYNC_* environment that points a service at a broker, topics, a group,
  a Campaign Monitor and a destinations file;
- `ServiceProcess` (`cmsync run` as a child process: logs, /metrics, readiness, memory,
  signals) and `InProcessService` (the real `consumer.app.Service` in this event loop);
- `Metrics`, the one parser of the Prometheus text a service serves;
- `produce` (end offsets from the broker's acknowledgements: the bundled broker's ListOffsets
  answers are not reliable), `read_topic`, `headers_of`;
- `field_values`, `expected_values` and `compare`: a list read back against the state
  `synthetic.expected_state` computed from the produced events alone;
- `SyncRig`: all of it assembled for one sync (simulator served in this process with a list
  per destination, its own topic, dead-letter topic and consumer group), so that runs share
  one broker without seeing each other's records.

Only the public surface of the service is used: `Service(settings)`, `run()`, `stop()`, and its
public attributes (`source.committed`, `pending`: see `sync_progress`).
Hazard: helpers that wait poll their condition; each says how often and for how long.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, ClassVar, Final, Literal

import aiohttp
import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from prometheus_client.parser import text_string_to_metric_families

from consumer.app import Service
from consumer.devtools.embedded_broker import create_topics, free_port
from consumer.devtools.simulator import CustomFieldSpec, Simulator, SimulatorConfig, serve
from consumer.devtools.synthetic import INTERESTS, TIERS, Expected, SegmentSpec
from consumer.settings import Destination, Settings, load_settings

__all__ = [
    "DEMO_DESTINATIONS",
    "DEMO_FIELDS",
    "DEMO_SEGMENTS",
    "Dest",
    "InProcessService",
    "Metrics",
    "ServiceExitedError",
    "ServiceProcess",
    "SyncRig",
    "compare",
    "create_list",
    "destinations_toml",
    "expected_values",
    "field_spec",
    "field_values",
    "free_port",
    "headers_of",
    "load_destinations",
    "produce",
    "read_topic",
    "service_env",
    "sync_progress",
    "wait_until",
]

UnsubscribeSetting = Literal["AllClientLists", "OnlyThisList"]


# ------------------------------------------------------------------------------- destinations


def load_destinations(toml: str, api_key: str, **variables: str) -> tuple[Destination, ...]:
    """The destinations of a destinations file with this text, as the service reads them
    (through the public settings loader; `api_key` in CMSYNC_CM_API_KEY, `variables` beside
    it, e.g. the variables the file's ``api_key_env`` names)."""
    with tempfile.TemporaryDirectory(prefix="cmsync-destinations-") as tmp:
        path = Path(tmp) / "destinations.toml"
        path.write_text(toml, encoding="utf-8")
        env = {
            "CMSYNC_KAFKA_BOOTSTRAP_SERVERS": "localhost:9092",
            "CMSYNC_DESTINATIONS_FILE": str(path),
            "CMSYNC_CM_API_KEY": api_key,
            **variables,
        }
        return load_settings(env).destinations


@dataclass
class Dest:
    """One destination of a sync under test: its `[[destination]]` table (`toml`) and how the
    simulator creates its list (`create_list`: `unsubscribe_setting`, `confirmed_opt_in`,
    `fields`; `list_id` None: a new list).

    `fields` None: the list stores any key (as the simulator did before it modelled fields)
    and has a field of each mapped key (`field_spec`), so the service's check of the list's
    fields passes; given: the list is made with exactly these fields declared, and ignores
    other keys and values a field cannot hold, as Campaign Monitor is reported to."""

    name: str
    segment_id: str
    removal: str = "delete"
    resubscribe: str = "deleted-only"
    unsubscribe_setting: UnsubscribeSetting = "OnlyThisList"
    custom_fields: Mapping[str, str] = field(default_factory=lambda: {"City": "city"})
    api_key_env: str = "CMSYNC_CM_API_KEY"
    list_id: str | None = None
    consent_to_track: str = "Yes"
    more_segments: tuple[str, ...] = ()  # a list fed by several segments (segment_ids)
    fields: tuple[CustomFieldSpec, ...] | None = None
    confirmed_opt_in: bool = False
    unsubscribe_all_client_lists: bool = False
    extras: str = "keep"

    def toml(self, list_id: str) -> str:
        """The destination's `[[destination]]` table, writing to `list_id`."""
        fields = "".join(f'{key} = "{value}"\n' for key, value in self.custom_fields.items())
        if self.more_segments:
            listed = ", ".join(f'"{s}"' for s in (self.segment_id, *self.more_segments))
            segments = f"segment_ids = [{listed}]"
        else:
            segments = f'segment_id = "{self.segment_id}"'
        return f"""[[destination]]
name = "{self.name}"
{segments}
list_id = "{list_id}"
api_key_env = "{self.api_key_env}"
email_field = "email"
name_field = "full_name"
removal = "{self.removal}"
resubscribe = "{self.resubscribe}"
consent_to_track = "{self.consent_to_track}"
unsubscribe_all_client_lists = {"true" if self.unsubscribe_all_client_lists else "false"}
extras = "{self.extras}"

[destination.custom_fields]
{fields}"""


#: The fields the simulator's lists get for the standard workload's multi-select keys
#: (`field_spec`); any other key is a Text field.
_MULTI_SELECTS: Final[Mapping[str, CustomFieldSpec]] = {
    "Tier": CustomFieldSpec("Tier", "MultiSelectOne", TIERS),
    "Interests": CustomFieldSpec("Interests", "MultiSelectMany", INTERESTS),
}


def field_spec(key: str) -> CustomFieldSpec:
    """The field a list made by `create_list` gets for a mapped key: the standard workload's
    multi-selects (Tier, Interests) with the synthetic stream's options, else Text."""
    return _MULTI_SELECTS.get(key, CustomFieldSpec(key))


def create_list(sim: Simulator, dest: Dest, *, api_key: str | None = None) -> str:
    """Make `dest`'s list in `sim` (see `Dest`); returns its ListID."""
    list_id = sim.add_list(
        title=dest.name,
        unsubscribe_setting=dest.unsubscribe_setting,
        api_key=api_key,
        confirmed_opt_in=dest.confirmed_opt_in,
        custom_fields=dest.fields,
    )
    if dest.fields is None:
        for key in dest.custom_fields:
            sim.add_custom_field(list_id, field_spec(key))
    return list_id


def destinations_toml(dests: Iterable[Dest], list_ids: Mapping[str, str]) -> str:
    """A destinations file: each destination writing to `list_ids[name]`."""
    return "\n".join(d.toml(list_ids[d.name]) for d in dests)


#: The custom fields of the standard workload's lists (Campaign Monitor key -> profile field).
DEMO_FIELDS: Final[Mapping[str, str]] = {"City": "city", "Tier": "tier", "Interests": "interests"}


def _demo(name: str, segment: str, removal: str, resubscribe: str, *more_segments: str) -> Dest:
    return Dest(
        name,
        segment,
        removal=removal,
        resubscribe=resubscribe,
        custom_fields=DEMO_FIELDS,
        consent_to_track="Unchanged",
        more_segments=more_segments,
    )


#: The standard workload (`cmsync demo`, bench/intake): one segment feeds three lists, one list
#: takes two segments (their union), one segment has no list.
DEMO_DESTINATIONS: Final = (
    _demo("vip-newsletter", "vip-customers", "delete", "deleted-only"),
    _demo("vip-offers", "vip-customers", "unsubscribe", "always"),
    _demo("winback", "lapsed-buyers", "delete", "deleted-only"),
    _demo("weekly-digest", "newsletter-all", "delete", "never"),
    _demo("vip-or-lapsed", "vip-customers", "delete", "deleted-only", "lapsed-buyers"),
)
DEMO_SEGMENTS: Final = (
    SegmentSpec("vip-customers", share=0.35, max_changes=5),
    SegmentSpec("lapsed-buyers", share=0.3, max_changes=4),
    SegmentSpec("newsletter-all", share=0.7, max_changes=3, exits=False),
    SegmentSpec("beta-testers", share=0.1, max_changes=3),  # no destination: skipped
)


def service_env(
    *,
    bootstrap: str,
    topic: str,
    group: str,
    base_url: str,
    api_key: str,
    destinations_file: Path,
    dlq_topic: str | None = None,
    **settings: str,
) -> dict[str, str]:
    """The CMSYNC_* environment of a service: where it reads (`topic`, its dead letters to
    `dlq_topic`, default ``<topic>.dlq``), as which group, which Campaign Monitor with which
    key, which destinations; then `settings` (by variable name), which win."""
    return {
        "CMSYNC_KAFKA_BOOTSTRAP_SERVERS": bootstrap,
        "CMSYNC_KAFKA_TOPIC": topic,
        "CMSYNC_DLQ_TOPIC": dlq_topic or f"{topic}.dlq",
        "CMSYNC_KAFKA_GROUP_ID": group,
        "CMSYNC_CM_BASE_URL": base_url,
        "CMSYNC_CM_API_KEY": api_key,
        "CMSYNC_DESTINATIONS_FILE": str(destinations_file),
        **settings,
    }


# ------------------------------------------------------------------------------- lists


def headers_of(record: Any) -> dict[str, str]:
    """A consumed Kafka record's headers, decoded."""
    return {k: v.decode() for k, v in record.headers}


def field_values(member: Mapping[str, Any], key: str) -> list[str]:
    """The values a member read back holds in custom field `key`, sorted."""
    return sorted(str(f["Value"]) for f in member.get("CustomFields", []) if f.get("Key") == key)


def expected_values(value: object) -> list[str]:
    """What a custom field holds after a profile value was synced (see `consumer.rows`)."""
    if value is None or value == []:
        return []
    if isinstance(value, list):
        return sorted(str(v) for v in value)
    if isinstance(value, bool):
        return ["true" if value else "false"]
    return [str(value)]


def compare(
    expected: Expected,
    members: Mapping[str, Mapping[str, Any]],
    custom_fields: Mapping[str, str] = DEMO_FIELDS,
) -> list[str]:
    """Differences between a list read back and its expected state, counted by kind (no
    address is named). `custom_fields`: Campaign Monitor key -> profile field."""
    problems: Counter[str] = Counter()
    active = {a for a, m in members.items() if m.get("State") == "Active"}
    problems["missing or inactive"] = len(set(expected.active) - active)
    problems["active but should not be"] = len(active & expected.inactive)
    problems["active but never in the segment"] = len(
        active - set(expected.active) - expected.inactive
    )
    for address in set(expected.active) & active:
        profile, member = expected.active[address], members[address]
        if member.get("Name") != profile.get("full_name"):
            problems["wrong name"] += 1
        for key, profile_field in custom_fields.items():
            if profile_field in profile and field_values(member, key) != expected_values(
                profile[profile_field]
            ):
                problems[f"wrong {key}"] += 1
    return [f"{n} {what}" for what, n in problems.items() if n]


# ------------------------------------------------------------------------------- metrics


Sample = tuple[dict[str, str], float]


@dataclass
class Metrics:
    """A /metrics scrape: {sample name: [(labels, value)]}."""

    samples: dict[str, list[Sample]]

    @classmethod
    def parse(cls, text: str) -> Metrics:
        """Parse Prometheus text exposition (what `/metrics` serves)."""
        samples: dict[str, list[Sample]] = defaultdict(list)
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                samples[sample.name].append((dict(sample.labels), float(sample.value)))
        return cls(dict(samples))

    def value(self, name: str, **labels: str) -> float:
        """Sum of the samples of `name` whose labels include `labels` (0 when none)."""
        return sum(
            v
            for have, v in self.samples.get(name, [])
            if all(have.get(k) == want for k, want in labels.items())
        )

    def has(self, name: str, **labels: str) -> bool:
        return any(
            all(have.get(k) == want for k, want in labels.items())
            for have, _ in self.samples.get(name, [])
        )

    def committed_offsets(self, topic: str) -> dict[int, int]:
        """Per partition, the offset the service last committed (`cmsync_committed_offset`)."""
        return {
            int(labels["partition"]): int(value)
            for labels, value in self.samples.get("cmsync_committed_offset", [])
            if labels.get("topic") == topic
        }


# ------------------------------------------------------------------------------- runners


class ServiceExitedError(RuntimeError):
    """A service under test exited while something waited on it."""


class ServiceProcess:
    """`python -m consumer run` as a child process; its output (log lines) goes to `log_path`.

    `env` is the service's CMSYNC_* environment; the child inherits every other variable of
    this process (PATH, the virtualenv), none of its CMSYNC_*. Without CMSYNC_HTTP_PORT (or
    with 0) a free port is picked, so that /metrics and /readyz can be reached. The process
    starts at once. `sample_rss` records its resident memory until it exits.
    """

    def __init__(
        self,
        env: Mapping[str, str],
        log_path: Path,
        *,
        name: str = "cmsync",
        cwd: Path | None = None,
    ) -> None:
        self.name = name
        inherited = {k: v for k, v in os.environ.items() if not k.startswith("CMSYNC_")}
        self.env = {**inherited, **env}
        if self.env.get("CMSYNC_HTTP_PORT", "0") == "0":
            self.env["CMSYNC_HTTP_PORT"] = str(free_port())
        self.port = int(self.env["CMSYNC_HTTP_PORT"])
        self.log_path = log_path
        self.rss_samples: list[tuple[float, int]] = []  # (monotonic, bytes)
        self._sampler: asyncio.Task[None] | None = None
        self._log: IO[bytes] = log_path.open("wb")
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "consumer", "run"],
            env=self.env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=cwd,
        )
        self.pid = self.proc.pid

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # lifecycle -----------------------------------------------------------------------------
    def alive(self) -> bool:
        return self.proc.poll() is None

    def check_alive(self) -> None:
        """Raise `ServiceExitedError` (with the log's tail) if the process has exited."""
        if not self.alive():
            raise ServiceExitedError(
                f"{self.name} exited with code {self.proc.returncode}\n{self.tail()}"
            )

    def terminate(self) -> None:
        """SIGTERM: the graceful stop."""
        self.proc.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        """SIGKILL: no flush, no commit, no LeaveGroup."""
        if self.alive():
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        self._log.close()

    async def wait(self, within_s: float) -> int:
        """The exit code; SIGKILL and `TimeoutError` if it has not exited within `within_s`."""
        try:
            await asyncio.to_thread(self.proc.wait, within_s)
        except subprocess.TimeoutExpired:
            self.kill()
            raise TimeoutError(
                f"{self.name} did not exit within {within_s:.0f} s\n{self.tail()}"
            ) from None
        self._log.close()
        await self._stop_sampling()
        return self.proc.returncode

    async def stop(self, within_s: float = 40.0) -> int | None:
        """SIGTERM (graceful drain) and wait; SIGKILL if it overstays. The exit code."""
        if self.alive():
            self.terminate()
        try:
            code = await asyncio.to_thread(self.proc.wait, within_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = await asyncio.to_thread(self.proc.wait, 5)
        self._log.close()
        await self._stop_sampling()
        return code

    def close(self) -> None:
        """Kill it if still running (for cleanup); stops sampling."""
        if self.alive():
            self.kill()
        self._log.close()
        if self._sampler is not None:
            self._sampler.cancel()

    # memory --------------------------------------------------------------------------------
    def rss(self) -> int:
        """Resident memory now, bytes (psutil.Error once it has exited)."""
        import psutil  # here: a dev dependency; the demo (installed wheel) runs without it

        return int(psutil.Process(self.pid).memory_info().rss)

    def sample_rss(self, every_s: float = 0.1) -> None:
        """Record (monotonic, resident bytes) into `rss_samples` every `every_s` from now
        until the process exits (a task on the running loop)."""

        import psutil  # see rss

        async def sample() -> None:
            process = psutil.Process(self.pid)
            with contextlib.suppress(psutil.Error):
                while self.alive():
                    self.rss_samples.append((time.monotonic(), process.memory_info().rss))
                    await asyncio.sleep(every_s)

        self._sampler = asyncio.get_running_loop().create_task(sample())

    def peak_rss(self, since: float = 0.0) -> int | None:
        """Largest sampled resident size at or after monotonic `since` (None: no sample)."""
        values = [rss for t, rss in self.rss_samples if t >= since]
        return max(values) if values else None

    async def _stop_sampling(self) -> None:
        if self._sampler is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._sampler

    # logs ----------------------------------------------------------------------------------
    def log_lines(self) -> list[dict[str, Any]]:
        """The JSON log lines written so far (other output skipped)."""
        lines = []
        for raw in self.log_path.read_bytes().splitlines():
            with contextlib.suppress(orjson.JSONDecodeError):
                parsed = orjson.loads(raw)
                if isinstance(parsed, dict):
                    lines.append(parsed)
        return lines

    def events(self, event: str) -> list[dict[str, Any]]:
        return [line for line in self.log_lines() if line.get("event") == event]

    def assigned(self) -> set[int] | None:
        """Partitions of the last `partitions_assigned` line (None before the first one)."""
        found = self.events("partitions_assigned")
        return set(found[-1]["partitions"]) if found else None

    def tail(self, lines: int = 25) -> str:
        text = self.log_path.read_text(errors="replace").splitlines()
        return f"--- last lines of {self.name}'s log ---\n" + "\n".join(text[-lines:])

    # HTTP ----------------------------------------------------------------------------------
    async def get(self, path: str, timeout_s: float = 5.0) -> tuple[int, str]:
        """(status, body) of a GET on the service's HTTP server."""
        timeout = aiohttp.ClientTimeout(total=timeout_s)
        async with (
            aiohttp.ClientSession(timeout=timeout) as session,
            session.get(f"{self.url}{path}") as response,
        ):
            return response.status, await response.text()

    async def metrics(self) -> Metrics:
        status, text = await self.get("/metrics")
        if status != 200:
            raise RuntimeError(f"/metrics of {self.name} answered {status}")
        return Metrics.parse(text)

    async def ready(self) -> str | None:
        """The /readyz reason when ready, else None (also when it cannot be reached)."""
        try:
            status, text = await self.get("/readyz")
            body = orjson.loads(text)
        except (aiohttp.ClientError, TimeoutError, orjson.JSONDecodeError):
            return None
        return str(body.get("reason")) if status == 200 and isinstance(body, dict) else None

    async def wait_joined(self, within_s: float = 90.0) -> float:
        """Until /readyz says "joined" (polled every 20 ms); returns that moment (monotonic)."""
        await wait_until(
            self._joined, within_s=within_s, what=f"{self.name} joined", watch=[self], every_s=0.02
        )
        return time.monotonic()

    async def _joined(self) -> bool:
        return await self.ready() == "joined"


async def wait_until(
    condition: Callable[[], bool | Awaitable[bool]],
    within_s: float,
    what: str,
    watch: Iterable[ServiceProcess] = (),
    *,
    every_s: float = 0.1,
) -> None:
    """Poll `condition` (sync or async) every `every_s` until true: `TimeoutError` naming
    `what` after `within_s`, `ServiceExitedError` at once if a watched process exits."""
    watched = list(watch)
    deadline = time.monotonic() + within_s

    def check_watched() -> None:
        for proc in watched:
            if not proc.alive():
                raise ServiceExitedError(
                    f"{proc.name} exited ({proc.proc.returncode}) while waiting for: "
                    f"{what}\n{proc.tail()}"
                )

    while True:
        try:
            result = condition()
            if not isinstance(result, bool):
                result = await result
        except Exception:  # e.g. /metrics of a process that died: say that it died
            check_watched()
            raise
        if result:
            return
        check_watched()
        if time.monotonic() >= deadline:
            tails = "\n".join(p.tail() for p in watched)
            raise TimeoutError(f"not within {within_s:.0f} s: {what}\n{tails}")
        await asyncio.sleep(every_s)


@dataclass(frozen=True)
class Progress:
    """How far an in-process service is with the records produced so far."""

    committed: dict[int, int]  # per partition produced to, its committed offset (0: none)
    done: int  # records below the committed offsets, counted up to the ends
    total: int  # records produced
    pending: int  # held offsets not yet durable

    @property
    def synced(self) -> bool:
        return self.done >= self.total and self.pending == 0


def sync_progress(service: Service, ends: Mapping[int, int]) -> Progress:
    """`service`'s commits and pending holds against the partition `ends` produced to."""
    committed = {p: service.source.committed(p) or 0 for p in ends}
    return Progress(
        committed=committed,
        done=sum(min(committed[p], end) for p, end in ends.items()),
        total=sum(ends.values()),
        pending=service.pending(),
    )


class InProcessService:
    """The real `Service` as a task of this event loop (the Kafka clients bind to it)."""

    def __init__(self, settings: Settings, **service_kwargs: Any) -> None:
        self.service = Service(settings, **service_kwargs)
        self.task: asyncio.Task[None] = asyncio.get_running_loop().create_task(
            self.service.run(), name="service"
        )

    async def stop(self, within_s: float = 30.0) -> None:
        """Graceful stop (what SIGTERM does); its error, if it failed, is raised."""
        self.service.stop()
        await asyncio.wait_for(self.task, within_s)

    async def wait_synced(
        self,
        ends: Mapping[int, int],
        within_s: float | None = None,
        *,
        every_s: float = 0.05,
        progress: Callable[[Progress], None] | None = None,
    ) -> None:
        """Until every record below `ends` is committed and nothing is pending, polled every
        `every_s` (`progress` sees each poll); `TimeoutError` after `within_s` (None: no
        limit); `ServiceExitedError` (or its error) if the service ends first."""
        deadline = None if within_s is None else time.monotonic() + within_s
        while True:
            if self.task.done():
                self.task.result()
                raise ServiceExitedError("the service stopped")
            now = sync_progress(self.service, ends)
            if progress is not None:
                progress(now)
            if now.synced:
                return
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(
                    f"not synced after {within_s}s: ends {dict(ends)}, committed "
                    f"{now.committed}, pending {now.pending}"
                )
            await asyncio.sleep(every_s)


# ------------------------------------------------------------------------------- kafka


async def produce(
    producer: AIOKafkaProducer,
    topic: str,
    records: Iterable[tuple[bytes | None, bytes | None]],
    ends: dict[int, int],
    *,
    one_by_one: bool = False,
) -> list[tuple[int, int]]:
    """Produce (key, value) pairs in order; returns each record's (partition, offset) from the
    acknowledgements and raises `ends` (partition -> offset after its last record) to match.
    `one_by_one` waits for each acknowledgement before sending the next record."""
    placed: list[tuple[int, int]] = []
    if one_by_one:
        for key, value in records:
            meta = await producer.send_and_wait(topic, key=key, value=value)
            placed.append((meta.partition, meta.offset))
    else:
        futures = [await producer.send(topic, key=key, value=value) for key, value in records]
        for future in futures:
            meta = await future
            placed.append((meta.partition, meta.offset))
    for partition, offset in placed:
        ends[partition] = max(ends.get(partition, 0), offset + 1)
    return placed


async def read_topic(
    bootstrap: str,
    topic: str,
    *,
    enough: Callable[[list[Any]], bool],
    within_s: float,
    poll_ms: int = 200,
    settle_ms: int = 300,
) -> list[Any]:
    """Every record of `topic` from the start: read until `enough(records)` or `within_s`,
    then once more for `settle_ms` (to see that nothing more is there)."""
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest")
    await consumer.start()
    out: list[Any] = []
    try:
        deadline = time.monotonic() + within_s
        while not enough(out) and time.monotonic() < deadline:
            for records in (await consumer.getmany(timeout_ms=poll_ms)).values():
                out.extend(records)
        for records in (await consumer.getmany(timeout_ms=settle_ms)).values():
            out.extend(records)
    finally:
        await consumer.stop()
    return out


# ------------------------------------------------------------------------------- the rig


class SyncRig:
    """One sync under test. Use as ``async with SyncRig(...) as rig:``.

    The simulator is served in this process (its state survives restarts of the service),
    with one list per destination (or the destination's `list_id`); `topic` (`partitions`
    partitions), `dlq_topic` and `group` are new for each rig. A service is run in process
    (`start`/`stop`/`running`) or as child processes (`spawn`), all configured by `env`:
    the rig's connection, then `defaults`, then the constructor's `env`, then per-call
    settings.
    """

    #: Settings every service of this kind of rig gets (subclasses: their suite's timings).
    defaults: ClassVar[Mapping[str, str]] = {}

    def __init__(
        self,
        bootstrap: str,
        workdir: Path,
        dests: Sequence[Dest],
        *,
        api_key: str,
        partitions: int = 3,
        sim_config: SimulatorConfig | None = None,
        env: Mapping[str, str] | None = None,
        prefix: str = "sync",
        cwd: Path | None = None,
    ) -> None:
        self.bootstrap = bootstrap
        self.tmp = workdir
        self.dests = list(dests)
        self.api_key = api_key
        self.partitions = partitions
        tag = uuid.uuid4().hex[:10]
        self.topic = f"{prefix}-{tag}"
        self.dlq_topic = f"{prefix}-{tag}.dlq"
        self.group = f"cmsync-{prefix}-{tag}"
        self.sim = Simulator(sim_config or SimulatorConfig(api_keys=(api_key,)))
        self.extra_env = dict(env or {})
        self.cwd = cwd
        self.list_ids: dict[str, str] = {}
        self.base_url = ""
        self.ends: dict[int, int] = {}  # partition -> offset after the last record produced
        self.procs: list[ServiceProcess] = []
        self.running_service: InProcessService | None = None
        self._producer: AIOKafkaProducer | None = None
        self._offsets: AIOKafkaConsumer | None = None
        self._stack = contextlib.AsyncExitStack()

    async def __aenter__(self) -> SyncRig:
        self.base_url = await self._stack.enter_async_context(serve(self.sim))
        for dest in self.dests:
            self.list_ids[dest.name] = dest.list_id or create_list(
                self.sim, dest, api_key=self.api_key
            )
        await create_topics(self.bootstrap, {self.topic: self.partitions, self.dlq_topic: 1})
        return self

    async def __aexit__(self, *exc: object) -> None:
        try:
            await self.stop()
        finally:
            for proc in self.procs:
                proc.close()
            if self._producer is not None:
                await self._producer.stop()
            if self._offsets is not None:
                await self._offsets.stop()
            await self._stack.aclose()

    # configuration -------------------------------------------------------------------------
    def env(self, **settings: str) -> dict[str, str]:
        """The CMSYNC_* environment of a service of this rig (writes the destinations file)."""
        dest_file = self.tmp / f"destinations-{self.topic}.toml"
        dest_file.write_text(destinations_toml(self.dests, self.list_ids))
        return service_env(
            bootstrap=self.bootstrap,
            topic=self.topic,
            dlq_topic=self.dlq_topic,
            group=self.group,
            base_url=self.base_url,
            api_key=self.api_key,
            destinations_file=dest_file,
            **{**self.defaults, **self.extra_env, **settings},
        )

    def settings(self, **settings: str) -> Settings:
        return load_settings(self.env(**settings))

    # in process ----------------------------------------------------------------------------
    @property
    def service(self) -> Service | None:
        """The service running in process, if any."""
        return None if self.running_service is None else self.running_service.service

    async def start(self, **service_kwargs: Any) -> Service:
        """Run the real service in this event loop (one at a time)."""
        assert self.running_service is None, "a service already runs in process"
        env = self.env()
        self.running_service = InProcessService(load_settings(env), env=env, **service_kwargs)
        return self.running_service.service

    async def stop(self) -> None:
        """Stop the in-process service, if one runs (its failure is raised)."""
        running, self.running_service = self.running_service, None
        if running is not None:
            await running.stop()

    @contextlib.asynccontextmanager
    async def running(self, **service_kwargs: Any) -> AsyncIterator[Service]:
        service = await self.start(**service_kwargs)
        try:
            yield service
        finally:
            await self.stop()

    async def wait_synced(self, within_s: float = 30.0) -> None:
        """Until every record produced so far is committed by the in-process service and
        nothing is pending (polled every 50 ms)."""
        assert self.running_service is not None, "no service runs in process"
        await self.running_service.wait_synced(dict(self.ends), within_s)

    # child processes -----------------------------------------------------------------------
    #: `wait_until`, for the rig's users: ``await rig.wait_for(condition, 30, "what", [proc])``.
    wait_for = staticmethod(wait_until)

    def spawn(self, name: str = "svc", **settings: str) -> ServiceProcess:
        """Start `cmsync run` as a child process of this rig (log in the work directory)."""
        log_path = self.tmp / f"{name}-{len(self.procs)}.log"
        proc = ServiceProcess(self.env(**settings), log_path, name=name, cwd=self.cwd)
        self.procs.append(proc)
        return proc

    # kafka ---------------------------------------------------------------------------------
    async def produce_pairs(
        self, records: Iterable[tuple[bytes | None, bytes | None]], *, one_by_one: bool = False
    ) -> list[tuple[int, int]]:
        """Produce (key, value) pairs in order to the rig's topic (see `produce`)."""
        if self._producer is None:
            self._producer = AIOKafkaProducer(
                bootstrap_servers=self.bootstrap, acks="all", linger_ms=5
            )
            await self._producer.start()
        return await produce(self._producer, self.topic, records, self.ends, one_by_one=one_by_one)

    async def _offsets_consumer(self) -> AIOKafkaConsumer:
        """A consumer of the rig's group that never joins it: reads the group's offsets."""
        if self._offsets is None:
            self._offsets = AIOKafkaConsumer(
                bootstrap_servers=self.bootstrap, group_id=self.group, enable_auto_commit=False
            )
            await self._offsets.start()
        return self._offsets

    async def committed_offsets(self) -> dict[int, int | None]:
        """The group's committed offsets as the broker holds them (None: none yet)."""
        consumer = await self._offsets_consumer()
        return {
            p: await consumer.committed(TopicPartition(self.topic, p))
            for p in range(self.partitions)
        }

    async def read_dead_letters(
        self, enough: Callable[[list[Any]], bool], within_s: float, **read: int
    ) -> list[Any]:
        """The dead-letter topic's records (see `read_topic`)."""
        return await read_topic(
            self.bootstrap, self.dlq_topic, enough=enough, within_s=within_s, **read
        )

    # lists ---------------------------------------------------------------------------------
    def members(self, dest: str) -> dict[str, dict[str, Any]]:
        """{address: subscriber} of a destination's list, from the simulator's state ({} for
        a list the simulator does not know: a destination configured with a wrong ListID)."""
        try:
            return self.sim.list_state(self.list_ids[dest])
        except KeyError:
            return {}

    def active(self, dest: str) -> set[str]:
        return {a for a, m in self.members(dest).items() if m["State"] == "Active"}

    def state_of(self, dest: str, email: str) -> str | None:
        member = self.members(dest).get(email.strip().lower())
        return None if member is None else str(member["State"])
