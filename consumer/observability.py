"""Metrics, logging and the health server: everything an operator sees, defined in one place.

Metrics live on :data:`REGISTRY` (not the library's global one, so tests and embedded runs see
only cmsync's series). Every label value comes from configuration or a closed set of codes —
destination names, topic, partition, endpoint, HTTP status, reason codes, and the *name* of the
env var holding an API key — never from message content. Dashboards (`dashboards/cmsync.json`)
and alert rules (`alerts/cmsync.rules.yml`) reference these names; a test checks that every
name they use is exported here.

Logging: :func:`configure_logging` routes structlog *and* the standard library (aiokafka,
aiohttp) through one structlog processor chain into one handler on stdout, so every line has
the same shape. A redaction processor replaces anything that looks like an email address with
``<redacted>`` — defence in depth: code must not log personal data in the first place.

Health: :class:`HealthServer` serves ``/metrics``, ``/healthz`` (liveness) and ``/readyz``
(readiness); what "alive" and "ready" mean is decided by the callables the service passes in.
"""

from __future__ import annotations

import contextlib
import logging
import re
import sys
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Final, Literal, TextIO

import orjson
import prometheus_client
import structlog
from aiohttp import web
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    Info,
    ProcessCollector,
)
from prometheus_client.exposition import choose_encoder
from structlog.typing import EventDict, Processor, WrappedLogger

from consumer import __version__

# `_created` series double the series count and carry no operational meaning for us (the
# process start time is already exported). The switch is module-global in prometheus_client.
prometheus_client.disable_created_metrics()  # type: ignore[no-untyped-call]  # untyped upstream

REGISTRY: Final = CollectorRegistry()
"""The registry `/metrics` exposes: cmsync's metrics plus process and GC collectors."""

ProcessCollector(registry=REGISTRY)
GCCollector(registry=REGISTRY)

# --------------------------------------------------------------------------- buckets

#: Campaign Monitor calls: 5 ms .. the client's 60 s timeout.
API_LATENCY_BUCKETS: Final = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0,
)  # fmt: skip
#: One flush = one or more API calls including rate-limit waits and retries.
FLUSH_DURATION_BUCKETS: Final = (
    0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
)  # fmt: skip
#: Apply time − occurred_at: 0.1 s .. 1 h, dense around the flush interval (5 s default) so
#: that the freshness objective (p99 ≤ flush interval + 2 s) is measured, not interpolated away.
FRESHNESS_BUCKETS: Final = (
    0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 10.0, 12.5, 15.0, 20.0, 30.0,
    60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0,
)  # fmt: skip

# --------------------------------------------------------------------------- intake

events_consumed: Final = Counter(
    "cmsync_events_consumed_total",
    "Records fetched from Kafka.",
    ["topic", "partition"],
    registry=REGISTRY,
)
events_decoded: Final = Counter(
    "cmsync_events_decoded_total",
    "Records decoded into a valid membership change.",
    ["topic"],
    registry=REGISTRY,
)
events_invalid: Final = Counter(
    "cmsync_events_invalid_total",
    "Records that failed decoding or validation, by reason code (they are dead-lettered).",
    ["reason"],
    registry=REGISTRY,
)
events_skipped: Final = Counter(
    "cmsync_events_skipped_total",
    "Valid changes that needed no API call, by reason (no_destination, late, duplicate, …).",
    ["reason"],
    registry=REGISTRY,
)
changes_coalesced: Final = Counter(
    "cmsync_changes_coalesced_total",
    "Changes merged into a newer buffered change for the same address (saved API work).",
    ["destination"],
    registry=REGISTRY,
)
pending_changes: Final = Gauge(
    "cmsync_pending_changes",
    "Changes buffered for a destination and not yet applied.",
    ["destination"],
    registry=REGISTRY,
)
pending_bytes: Final = Gauge(
    "cmsync_pending_bytes",
    "Estimated bytes of the changes buffered for a destination and not yet applied; with"
    ' destination="", of the records waiting for their dead letters. Their sum is what'
    " CMSYNC_MAX_PENDING_BYTES bounds.",
    ["destination"],
    registry=REGISTRY,
)
assigned_partitions: Final = Gauge(
    "cmsync_assigned_partitions",
    "Partitions of the input topic assigned to this process (0 for an idle replica, and while"
    " a rebalance is under way). 0 in every replica of a group: no partition reached any of"
    " them (a mistyped topic?).",
    registry=REGISTRY,
)
paused_partitions: Final = Gauge(
    "cmsync_paused_partitions",
    "Partitions whose intake is paused by backpressure (CMSYNC_MAX_PENDING or"
    " CMSYNC_MAX_PENDING_BYTES).",
    registry=REGISTRY,
)

# --------------------------------------------------------------------------- flushing

flushes: Final = Counter(
    "cmsync_flushes_total",
    "Flushes of a destination buffer, by outcome.",
    ["destination", "outcome"],
    registry=REGISTRY,
)
flush_duration: Final = Histogram(
    "cmsync_flush_duration_seconds",
    "Duration of one flush, rate-limit waits and retries included.",
    ["destination"],
    buckets=FLUSH_DURATION_BUCKETS,
    registry=REGISTRY,
)
applied_changes: Final = Counter(
    "cmsync_changes_applied_total",
    "Changes applied in Campaign Monitor, by kind (add, remove).",
    ["destination", "kind"],
    registry=REGISTRY,
)
retries: Final = Counter(
    "cmsync_retries_total",
    "Retried API work, by reason.",
    ["destination", "reason"],
    registry=REGISTRY,
)
dead_letters: Final = Counter(
    "cmsync_dead_letters_total",
    "Records written to the dead-letter topic, by error code and destination (empty when the"
    " record failed before it reached one).",
    ["reason", "destination"],
    registry=REGISTRY,
)
dead_letters_shortened: Final = Counter(
    "cmsync_dead_letters_shortened_total",
    "Dead letters that could not be sent as they were and went out shortened (the value"
    " dropped, headers kept), by reason: too_large, invalid, unauthorized, refused.",
    ["reason"],
    registry=REGISTRY,
)
dead_letters_failed: Final = Counter(
    "cmsync_dead_letters_failed_total",
    "Dead letters that could be sent neither as they were nor shortened (e.g. the dead-letter"
    " topic refuses the service): logged and dropped so that their partition goes on.",
    ["reason"],
    registry=REGISTRY,
)
freshness: Final = Histogram(
    "cmsync_freshness_seconds",
    "Time from a change's occurred_at to its application in Campaign Monitor.",
    ["destination"],
    buckets=FRESHNESS_BUCKETS,
    registry=REGISTRY,
)
destination_up: Final = Gauge(
    "cmsync_destination_up",
    "1 when the destination is being served, 0 when it is fatally stalled (bad key or list)"
    " or held by its list's settings.",
    ["destination"],
    registry=REGISTRY,
)
flush_interval: Final = Gauge(
    "cmsync_flush_interval_seconds",
    "Configured CMSYNC_FLUSH_INTERVAL_S (the freshness objective is this plus 2 s).",
    registry=REGISTRY,
)
max_pending: Final = Gauge(
    "cmsync_max_pending",
    "Configured CMSYNC_MAX_PENDING: pending changes past which intake pauses (set at start).",
    registry=REGISTRY,
)
max_pending_bytes: Final = Gauge(
    "cmsync_max_pending_bytes",
    "Configured CMSYNC_MAX_PENDING_BYTES: estimated bytes of pending changes past which intake"
    " pauses (set at start).",
    registry=REGISTRY,
)

#: cgroup files holding the container's memory limit (v2, then v1). A value at or above 2**62
#: (v1's page-aligned LONG_MAX) or "max" means no limit.
CGROUP_MEMORY_LIMIT_FILES: Final = (
    "/sys/fs/cgroup/memory.max",
    "/sys/fs/cgroup/memory/memory.limit_in_bytes",
)


def cgroup_memory_limit(files: Iterable[str] = CGROUP_MEMORY_LIMIT_FILES) -> float:
    """The memory limit of this process's container in bytes; NaN when there is none or it
    cannot be read (outside a container, or an unlimited cgroup). Read on every scrape (one
    small file), so it follows a limit changed in place."""
    for name in files:
        try:
            with open(name, encoding="ascii") as file:
                text = file.read().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < 2**62:
            return float(text)
        return float("nan")
    return float("nan")


memory_limit: Final = Gauge(
    "cmsync_memory_limit_bytes",
    "Memory limit of the container (cgroup); NaN when unlimited. Compare with"
    " process_resident_memory_bytes.",
    registry=REGISTRY,
)
memory_limit.set_function(cgroup_memory_limit)

# --------------------------------------------------------------------------- Campaign Monitor API

api_requests: Final = Counter(
    "cmsync_api_requests_total",
    "Campaign Monitor API responses by endpoint and HTTP status (0: no response).",
    ["endpoint", "status"],
    registry=REGISTRY,
)
api_latency: Final = Histogram(
    "cmsync_api_latency_seconds",
    "Campaign Monitor API request duration by endpoint.",
    ["endpoint"],
    buckets=API_LATENCY_BUCKETS,
    registry=REGISTRY,
)
api_throttled: Final = Counter(
    "cmsync_api_throttled_total",
    "HTTP 429 responses, by the name of the env var holding the API key.",
    ["api_key"],
    registry=REGISTRY,
)
permitted_rate: Final = Gauge(
    "cmsync_permitted_rate",
    "Requests per second the rate limiter currently permits, by API key env var name.",
    ["api_key"],
    registry=REGISTRY,
)

# --------------------------------------------------------------------------- Kafka offsets

state_restore_remaining: Final = Gauge(
    "cmsync_state_restore_remaining",
    "Changelog records still to read by the restore under way (0 when none is; while the end"
    " of some partition is not known yet, what was read so far). /readyz is false while a"
    " restore runs.",
    registry=REGISTRY,
)
state_restored_records: Final = Counter(
    "cmsync_state_restored_records",
    "Changelog records read into the local membership state by restores.",
    registry=REGISTRY,
)
addresses_held_back: Final = Counter(
    "cmsync_addresses_held_back",
    "Changes held back for a while because Campaign Monitor said their address was written"
    " too often (split out of their import; the rest of it went on).",
    ["destination"],
    registry=REGISTRY,
)
address_throttled: Final = Counter(
    "cmsync_address_throttled",
    "429s about one subscriber written too often (no rate headers): that address is held"
    " back, the key's rate is not lowered.",
    ["api_key"],
    registry=REGISTRY,
)
consent_reads: Final = Counter(
    "cmsync_consent_reads",
    "Reads of who opted out (consent): listing is unsubscribed, bounced, suppressed (the"
    " client's suppression list) or subscriber (one address, while a list's first full read"
    " runs); outcome is full, incremental, per_address (counted per address) or failed.",
    ["destination", "listing", "outcome"],
    registry=REGISTRY,
)
consent_unknown: Final = Counter(
    "cmsync_consent_unknown",
    "Writes held back because who opted out could not be known (a listing failed): they are"
    " tried again later, never sent blind.",
    ["destination"],
    registry=REGISTRY,
)
drift_repairs: Final = Counter(
    "cmsync_drift_repairs",
    "Repairs of drift (cmsync reconcile) taken by the owner of their address: kind reassert"
    " (missing from the list, or stale fields: applied again) or extra (active in the list,"
    ' held by no member: removed, with extras = "remove" only). A repair a newer change'
    " made moot is counted too.",
    ["destination", "kind"],
    registry=REGISTRY,
)
drift_found: Final = Gauge(
    "cmsync_drift_found",
    "What the last cmsync reconcile that repaired found in a destination's list, by kind:"
    " missing, extra, stale, protected (addresses). Exported by the replica owning the list's"
    " record (aggregate with max by destination); absent before a first reconcile.",
    ["destination", "kind"],
    registry=REGISTRY,
)
reconcile_time: Final = Gauge(
    "cmsync_reconcile_last_timestamp_seconds",
    "When the last cmsync reconcile that repaired a destination handed its findings over.",
    ["destination"],
    registry=REGISTRY,
)
#: The kinds of `drift_repairs` (`consumer.membership.model.RepairKind`).
REPAIR_KINDS: Final = ("reassert", "extra")
state_checkpoint_failures: Final = Counter(
    "cmsync_state_checkpoint_failures",
    "Checkpoints of the membership state that Kafka did not acknowledge; their records are"
    " read again. store: members (stage 1) or addresses (stage 2).",
    ["store"],
    registry=REGISTRY,
)
backfill_members: Final = Counter(
    "cmsync_backfill_members",
    "Members of a segment sent to fill a list added later (a destination added for a segment"
    " the state knows), counted as their claims are durable.",
    ["destination"],
    registry=REGISTRY,
)
backfills_running: Final = Gauge(
    "cmsync_backfills_running",
    "Backfills under way in this process: one per (input partition, segment) of a destination"
    " being filled; 0 once its list holds the segment's members.",
    ["destination"],
    registry=REGISTRY,
)
config_reloads: Final = Counter(
    "cmsync_config_reloads",
    "Reloads of the destinations file (a change seen, or SIGHUP): applied, unchanged, or"
    " refused (invalid: the running configuration stays, the log says why).",
    ["outcome"],
    registry=REGISTRY,
)
destinations_refused: Final = Gauge(
    "cmsync_destinations_file_refused",
    "1 while the destinations file as it is now was refused by a reload (invalid: the"
    " process runs the configuration it had before), else 0.",
    registry=REGISTRY,
)
committed_offset: Final = Gauge(
    "cmsync_committed_offset",
    "Last offset committed for a partition owned by this process.",
    ["topic", "partition"],
    registry=REGISTRY,
)
consumer_lag: Final = Gauge(
    "cmsync_consumer_lag",
    "Records of a partition owned by this process not yet durable (high watermark − committable).",
    ["topic", "partition"],
    registry=REGISTRY,
)

build_info: Final = Info("cmsync_build", "Version of cmsync and of Python.", registry=REGISTRY)
build_info.info({"version": __version__, "python": sys.version.split()[0]})

#: Closed sets of reason codes, primed to 0 by :func:`init_labels` so that `increase()` in
#: alert rules sees the first occurrence (a series born at 1 has no increase).
INVALID_REASONS: Final = ("invalid_json", "schema", "too_large", "invalid_encoding", "empty")
SKIP_REASONS: Final = ("no_destination", "late", "duplicate", "consent")
RELOAD_OUTCOMES: Final = ("applied", "unchanged", "refused")
#: Dead-letter reasons of a record that reached a destination (labelled with its name); the
#: INVALID_REASONS come before routing (labelled with destination "").
DESTINATION_DEAD_LETTER_REASONS: Final = (
    "missing_email",
    "invalid_email",
    "cm_rejected",
    "field_type",
)
DEAD_LETTER_REASONS: Final = (*INVALID_REASONS, *DESTINATION_DEAD_LETTER_REASONS)
#: Why a dead letter went out shortened or not at all (`consumer.deadletter.never_as_is`).
DEAD_LETTER_FAILURE_REASONS: Final = ("too_large", "invalid", "unauthorized", "refused")
#: `dead_letters`' destination label of a record that reached no destination (Prometheus reads
#: an empty label as an absent one, so `sum by (reason)` queries are unaffected).
NO_DESTINATION: Final = ""


def init_labels(
    *,
    topic: str,
    destinations: Iterable[str],
    api_keys: Iterable[str],
    flush_interval_s: float,
) -> None:
    """Create the configured label combinations at zero (and destinations as up).

    Call once at start with the configuration. Series that exist from the start make
    dashboards continuous and let `increase()`/`rate()` see the first event.
    """
    flush_interval.set(flush_interval_s)
    events_decoded.labels(topic=topic)
    for reason in INVALID_REASONS:
        events_invalid.labels(reason=reason)
    for reason in SKIP_REASONS:
        events_skipped.labels(reason=reason)
    for reason in INVALID_REASONS:
        dead_letters.labels(reason=reason, destination=NO_DESTINATION)
    for reason in DEAD_LETTER_FAILURE_REASONS:
        dead_letters_shortened.labels(reason=reason)
        dead_letters_failed.labels(reason=reason)
    for outcome in RELOAD_OUTCOMES:
        config_reloads.labels(outcome=outcome)
    init_destination_labels(destinations)
    for key in api_keys:
        api_throttled.labels(api_key=key)
        address_throttled.labels(api_key=key)


def init_destination_labels(destinations: Iterable[str]) -> None:
    """Create the label combinations of these destinations at zero (at start, and for the
    destinations a reload adds)."""
    for name in destinations:
        backfill_members.labels(destination=name)
        backfills_running.labels(destination=name)
        for reason in DESTINATION_DEAD_LETTER_REASONS:
            dead_letters.labels(reason=reason, destination=name)
        pending_changes.labels(destination=name).set(0)
        destination_up.labels(destination=name).set(1)
        changes_coalesced.labels(destination=name)
        consent_unknown.labels(destination=name)
        addresses_held_back.labels(destination=name)
        flush_duration.labels(destination=name)
        freshness.labels(destination=name)
        for kind in ("add", "remove"):
            applied_changes.labels(destination=name, kind=kind)
        for kind in REPAIR_KINDS:
            drift_repairs.labels(destination=name, kind=kind)


def forget_destination(name: str) -> None:
    """Drop every series of a destination the destinations file no longer has (a reload)."""
    # prometheus_client has no public way to list a registry's metrics or their label names;
    # these private attributes have been stable since 0.4.
    for collector in list(REGISTRY._collector_to_names):
        labelnames = getattr(collector, "_labelnames", ())
        if "destination" not in labelnames:
            continue
        where = labelnames.index("destination")
        combos = {
            tuple(sample.labels[label] for label in labelnames)
            for metric in collector.collect()
            for sample in metric.samples
            if sample.labels.get("destination") == name
        }
        for values in combos:
            if values[where] == name:
                with contextlib.suppress(KeyError):
                    collector.remove(*values)  # type: ignore[attr-defined]


def forget_partition(topic: str, partition: int) -> None:
    """Drop the per-partition gauges of a partition this process no longer owns.

    Call on revocation: a stale lag or offset series of the previous owner would otherwise
    linger (and look like a stuck partition) until the process restarts.
    """
    for gauge in (committed_offset, consumer_lag):
        with contextlib.suppress(KeyError):  # never exported for this partition
            gauge.remove(topic, str(partition))


# --------------------------------------------------------------------------- logging

_EMAIL = re.compile(
    # local part, "@" or its URL encoding, a dotted domain. Broad (a false positive costs a word
    # in a log line, a false negative leaks an address), but the local part stops at URL and
    # query syntax (/ ? = & %) so that a logged URL keeps its path. The lookbehind lets a match
    # start only where a run of local-part characters starts: linear time on long strings.
    r"(?<![\w.+-])[\w.+-]+(?:@|%40)[\w-]+(?:\.[\w-]+)+"
)
REDACTED: Final = "<redacted>"


def _redact(value: object) -> object:
    if isinstance(value, str):
        return _EMAIL.sub(REDACTED, value) if ("@" in value or "%" in value) else value
    if value is None or isinstance(value, bool | int | float):
        return value
    if isinstance(value, Mapping):
        return {k: _redact(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_redact(v) for v in value]
    # Anything else would be rendered through str()/repr(): redact that text.
    return _redact(str(value))


def redact_emails(_logger: WrappedLogger, _method: str, event_dict: EventDict) -> EventDict:
    """structlog processor: replace email-address-like text in every value with ``<redacted>``.

    Runs after exceptions are formatted, so tracebacks are covered too. Keys are left alone.
    """
    for key, value in event_dict.items():
        event_dict[key] = _redact(value)
    return event_dict


_FIRST_KEYS: Final = ("timestamp", "level", "logger", "event")


def _order_keys(_logger: WrappedLogger, _method: str, event_dict: EventDict) -> EventDict:
    """Put timestamp, level, logger and event first: lines read left to right."""
    ordered = {k: event_dict.pop(k) for k in _FIRST_KEYS if k in event_dict}
    ordered.update(event_dict)
    return ordered


def _orjson_dumps(obj: Any, **kwargs: Any) -> str:
    return orjson.dumps(obj, option=orjson.OPT_NON_STR_KEYS, **kwargs).decode()


LOG_LEVELS: Final = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
}


class _StdoutHandler(logging.StreamHandler[TextIO]):
    """Writes to whatever `sys.stdout` is at the time of the record (follows redirection)."""

    def __init__(self) -> None:
        super().__init__(sys.stdout)

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stdout  # under the handler's lock (Handler.handle acquires it)
        super().emit(record)


def configure_logging(level: str, fmt: Literal["json", "console", "auto"]) -> None:
    """Route structlog and the standard library's logging to stdout, rendered one way.

    `fmt`: "json" — one JSON object per line (orjson): ``timestamp`` (ISO 8601, UTC),
    ``level``, ``logger``, ``event``, bound context (structlog.contextvars) and an
    ``exception`` traceback when there is one; "console" — human-readable lines; "auto" —
    console when stdout is a terminal, else JSON. Idempotent: calling it again reconfigures.
    Raises ValueError for an unknown level or format.
    """
    numeric = LOG_LEVELS.get(level.lower())
    if numeric is None:
        raise ValueError(f"unknown log level {level!r}; expected one of {', '.join(LOG_LEVELS)}")
    if fmt == "auto":
        fmt = "console" if sys.stdout.isatty() else "json"
    renderer: Processor
    if fmt == "json":
        renderer = structlog.processors.JSONRenderer(serializer=_orjson_dumps)
    elif fmt == "console":
        renderer = structlog.dev.ConsoleRenderer(colors=sys.stdout.isatty())
    else:
        raise ValueError(f"unknown log format {fmt!r}; expected json or console")

    # Both structlog's and foreign (stdlib) records get these before the final processors.
    shared: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    structlog.configure(
        processors=[
            *shared,
            structlog.processors.StackInfoRenderer(),
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        # Calls below the level are no-ops before any processor runs.
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        # Not cached: reconfiguring (tests, the demo) must reach loggers created at import.
        cache_logger_on_first_use=False,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            redact_emails,
            _order_keys,
            renderer,
        ],
    )
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _StdoutHandler)]:
        root.removeHandler(old)
    handler = _StdoutHandler()
    handler.setFormatter(formatter)
    root.addHandler(handler)
    root.setLevel(numeric)
    # The Kafka and HTTP libraries log whole records and URLs (addresses, names) at debug
    # level: they never go below info, whatever CMSYNC_LOG_LEVEL says.
    for name in QUIET_LIBRARIES:
        logging.getLogger(name).setLevel(max(numeric, logging.INFO))


#: Libraries whose debug logs carry message content (aiokafka logs every record it sends).
QUIET_LIBRARIES: Final = ("aiokafka", "kafka", "aiohttp", "asyncio")


# --------------------------------------------------------------------------- health server

Check = Callable[[], tuple[bool, str]]
"""A health check: (ok, short reason). Must be cheap and must not block."""


class HealthServer:
    """HTTP server for `/metrics`, `/healthz` and `/readyz` (aiohttp).

    `/metrics` speaks the Prometheus text format, or OpenMetrics when the scraper asks for it
    (Accept). `/healthz` and `/readyz` answer 200 when their check says ok, else 503; both with
    a JSON body ``{"status": "ok"|"fail", "reason": …}``. A check that raises counts as failed.
    `port` 0 picks a free port; after :meth:`start` the attribute holds the bound port.
    """

    def __init__(
        self,
        port: int,
        *,
        liveness: Check,
        readiness: Check,
        host: str = "0.0.0.0",  # noqa: S104 - in a pod the scraper and kubelet come from outside
        registry: CollectorRegistry = REGISTRY,
    ) -> None:
        self.port = port
        self.host = host
        self._liveness = liveness
        self._readiness = readiness
        self._registry = registry
        self._runner: web.AppRunner | None = None
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        self._app = app

    async def start(self) -> None:
        runner = web.AppRunner(self._app, access_log=None, handle_signals=False)
        await runner.setup()
        site = web.TCPSite(runner, self.host, self.port)
        try:
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self.port = int(runner.addresses[0][1])

    async def stop(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    async def _metrics(self, request: web.Request) -> web.Response:
        encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
        body = encoder(self._registry)
        response = web.Response(body=body)
        # content_type contains parameters (version, charset): set the raw header.
        response.headers["Content-Type"] = content_type
        return response

    async def _healthz(self, _request: web.Request) -> web.Response:
        return _answer(self._liveness)

    async def _readyz(self, _request: web.Request) -> web.Response:
        return _answer(self._readiness)


def _answer(check: Check) -> web.Response:
    try:
        ok, reason = check()
    except Exception as exc:  # a broken check is a failed check, never a 500
        ok, reason = False, f"check raised {type(exc).__name__}"
    body = {"status": "ok" if ok else "fail", "reason": reason}
    return web.json_response(body, status=200 if ok else 503)
