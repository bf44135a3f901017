"""Settings: the environment plus the destinations file, validated once, immutable afterwards.

`load_settings(env)` is the only way in. Every ``CMSYNC_*`` variable is declared once, below, as
a field of `KafkaSettings` or `Settings` (or, when read elsewhere, in `OTHER_VARIABLES`): name,
parser, default, help text, secret or not. `VARIABLES` (``--help``, check-config) and the
reading both come from those declarations. `load_settings` parses every variable (units
normalised at the edge: seconds are floats, counts ints, enum values in their canonical
spelling), applies the rules that tie several variables together (SASL, TLS), reads the
destinations file (`consumer.destinations`), refuses ``CMSYNC_*`` names it does not know, and
either returns a frozen `Settings` or raises `ConfigError` carrying *every* problem found.

How values are read (blank is unset, secrets also from ``X_FILE``, parsers) is
`consumer.variables`. Rules stated here:

- Settings the chosen security protocol would ignore (SASL settings without a ``SASL_*``
  protocol, a CA file without TLS) are errors: silently ignoring them hides a connection that is
  less protected than its operator believes.
- A ``CMSYNC_*`` name that is not declared here is an error naming the nearest declared one,
  unless a destination names it in ``api_key_env`` (with its ``_FILE``), it is the ``_FILE`` of a
  secret, or it is reserved for tooling (`RESERVED`: the test suite, benchmarks and the demo
  read those themselves). The check needs the destinations file: it runs once that file is read.
- Messages never contain a secret's value (API keys, SASL password).

Hazard: `KafkaSettings.client_kwargs` necessarily contains the SASL password in clear; hand it to
aiokafka and nowhere else (never log it).

This module is pure apart from reading the files it is told about (destinations file, CA file,
secret files): it imports nothing from aiokafka or aiohttp at import time, never reads the clock.
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from consumer.destinations import DEFAULT_API_KEY_ENV, Destination, load_destinations
from consumer.variables import (
    FILE_SUFFIX,
    Secret,
    Variable,
    declared,
    host_ports,
    http_url,
    one_of,
    positive,
    read_fields,
    setting,
    text,
    unknown_variables,
    whole,
)

__all__ = [
    "VARIABLES",
    "ConfigError",
    "Destination",
    "KafkaSettings",
    "Secret",
    "Settings",
    "load_settings",
]

PREFIX: Final = "CMSYNC_"
#: Names the service leaves to tools that read them themselves; each covers NAME and NAME_*.
RESERVED: Final = (
    "CMSYNC_TEST",  # the test suite (CMSYNC_TEST_KAFKA_BOOTSTRAP, …)
    "CMSYNC_BENCH",  # make bench
    "CMSYNC_DEMO",  # cmsync demo against a real Campaign Monitor (CMSYNC_DEMO_LISTS)
    "CMSYNC_FAULTS",  # the fault suite's report and seed
    "CMSYNC_CHAOS",  # make chaos
    "CMSYNC_REQUIRE_TOOLS",  # CI: a missing external tool fails instead of skipping
)

_SECURITY_PROTOCOLS: Final = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
_SASL_PROTOCOLS: Final = ("SASL_PLAINTEXT", "SASL_SSL")
_TLS_PROTOCOLS: Final = ("SSL", "SASL_SSL")
_SASL_MECHANISMS: Final = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")


@dataclass(frozen=True, slots=True, kw_only=True)
class KafkaSettings:
    """How to reach Kafka: the fields below are the declarations of their variables."""

    bootstrap_servers: tuple[str, ...] = setting(
        "CMSYNC_KAFKA_BOOTSTRAP_SERVERS",
        host_ports,
        None,
        "comma-separated host:port list of Kafka brokers",
        required=True,
    )
    topic: str = setting(
        "CMSYNC_KAFKA_TOPIC", text, "segment-membership", "topic of membership events"
    )
    group_id: str = setting("CMSYNC_KAFKA_GROUP_ID", text, "cmsync", "consumer group")
    dlq_topic: str = setting(
        "CMSYNC_DLQ_TOPIC", text, "segment-membership.dlq", "dead-letter topic"
    )
    security_protocol: str = setting(
        "CMSYNC_KAFKA_SECURITY_PROTOCOL",
        one_of(*_SECURITY_PROTOCOLS),
        "PLAINTEXT",
        "PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL",
    )
    # Set iff the protocol is SASL_*.
    sasl_mechanism: str | None = setting(
        "CMSYNC_KAFKA_SASL_MECHANISM",
        one_of(*_SASL_MECHANISMS),
        None,
        "PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512 (required by SASL_* protocols only)",
    )
    sasl_username: str | None = setting(
        "CMSYNC_KAFKA_SASL_USERNAME",
        text,
        None,
        "SASL user name (required by SASL_* protocols only)",
    )
    # RUF009 cannot know that setting() returns a dataclasses.field, not a shared default.
    sasl_password: Secret | None = setting(  # noqa: RUF009
        "CMSYNC_KAFKA_SASL_PASSWORD",
        Secret,
        None,
        "SASL password (required by SASL_* protocols only)",
        secret=True,
    )
    # Only with SSL/SASL_SSL; None means the system's CAs.
    ssl_cafile: str | None = setting(
        "CMSYNC_KAFKA_SSL_CAFILE",
        text,
        None,
        "PEM file of the CAs trusted for the brokers (SSL, SASL_SSL only); unset: system CAs",
    )
    # Mutual TLS (e.g. Strimzi's `tls` authentication): both or neither; SSL/SASL_SSL only.
    ssl_certfile: str | None = setting(
        "CMSYNC_KAFKA_SSL_CERTFILE",
        text,
        None,
        "PEM file of the client certificate shown to the brokers (mutual TLS; SSL, SASL_SSL "
        "only; with CMSYNC_KAFKA_SSL_KEYFILE)",
    )
    ssl_keyfile: str | None = setting(
        "CMSYNC_KAFKA_SSL_KEYFILE",
        text,
        None,
        "PEM file of that certificate's private key, not encrypted (mounted from a Secret; "
        "with CMSYNC_KAFKA_SSL_CERTFILE)",
    )

    def client_kwargs(self) -> dict[str, object]:
        """Keyword arguments for ``AIOKafkaConsumer``/``AIOKafkaProducer`` (connection part).

        SASL keys appear only with a ``SASL_*`` protocol, ``ssl_context`` only with ``SSL`` or
        ``SASL_SSL``. Hazard: the result holds the SASL password in clear; do not log it.
        """
        kwargs: dict[str, object] = {
            "bootstrap_servers": list(self.bootstrap_servers),
            "security_protocol": self.security_protocol,
        }
        if self.security_protocol in _SASL_PROTOCOLS:
            kwargs["sasl_mechanism"] = self.sasl_mechanism
            kwargs["sasl_plain_username"] = self.sasl_username
            kwargs["sasl_plain_password"] = (
                self.sasl_password.reveal() if self.sasl_password is not None else None
            )
        if self.security_protocol in _TLS_PROTOCOLS:
            # Imported here so that importing settings never imports aiokafka.
            from aiokafka.helpers import create_ssl_context

            kwargs["ssl_context"] = create_ssl_context(
                cafile=self.ssl_cafile, certfile=self.ssl_certfile, keyfile=self.ssl_keyfile
            )
        return kwargs


@dataclass(frozen=True, slots=True, kw_only=True)
class Settings:
    """The whole configuration. Each field declared with `setting` is one variable (its name,
    parser, default and help live there and nowhere else); `kafka` and `destinations` are read
    by `load_settings` from their own declarations and the destinations file."""

    kafka: KafkaSettings
    destinations: tuple[Destination, ...]
    cm_base_url: str = setting(  # no trailing slash
        "CMSYNC_CM_BASE_URL",
        http_url,
        "https://api.createsend.com/api/v3.3",
        "Campaign Monitor API root (http or https URL)",
    )
    # Where `destinations` came from, for check-config.
    destinations_file: str = setting(
        "CMSYNC_DESTINATIONS_FILE",
        text,
        None,
        "path of the destinations file (TOML)",
        required=True,
    )
    # 0 lets the OS pick a free port: the demo and the test harness run several services at once.
    http_port: int = setting(
        "CMSYNC_HTTP_PORT",
        whole(0, 65535),
        "9400",
        "port of /metrics, /healthz, /readyz (1-65535; 0: any free port, for tests and the demo)",
    )
    flush_interval_s: float = setting(
        "CMSYNC_FLUSH_INTERVAL_S",
        positive,
        "5",
        "longest time a change waits in a buffer, seconds (> 0)",
    )
    max_pending: int = setting(
        "CMSYNC_MAX_PENDING",
        whole(1),
        "200000",
        "pending changes held in memory before intake pauses (>= 1)",
    )
    max_pending_bytes: int = setting(
        "CMSYNC_MAX_PENDING_BYTES",
        whole(1),
        "67108864",
        "bytes of pending changes held in memory before intake pauses, whichever of this and "
        "CMSYNC_MAX_PENDING is reached first (>= 1)",
    )
    rate_limit_rps: float = setting(
        "CMSYNC_RATE_LIMIT_RPS", positive, "10", "ceiling of requests per second per API key (> 0)"
    )
    shutdown_budget_s: float = setting(
        "CMSYNC_SHUTDOWN_BUDGET_S",
        positive,
        "25",
        "time allowed to drain on SIGTERM, seconds (> 0)",
    )
    applied_memory: int = setting(
        "CMSYNC_APPLIED_MEMORY",
        whole(0),
        "1000000",
        "(destination, address) pairs whose last applied occurred_at is remembered (>= 0)",
    )
    state_dir: str | None = setting(
        "CMSYNC_STATE_DIR",
        text,
        None,
        "where the local membership state lives (default: a fresh temporary directory); a "
        "cache of the changelog topics, rebuilt from them when empty",
    )
    state_keep: str = setting(
        "CMSYNC_STATE_KEEP",
        one_of("everything", "configured"),
        "everything",
        "everything: the state keeps every segment on the topic with every profile field, so "
        "a destination added later is filled exactly; configured: only the segments and "
        "fields the destinations name (a smaller state; a later destination for another "
        "segment starts empty) (extension)",
    )
    internal_topics: str = setting(
        "CMSYNC_INTERNAL_TOPICS",
        one_of("create", "require"),
        "create",
        "create: create the state's topics (<group>.members-changelog, <group>.claims, "
        "<group>.addresses-changelog) at start when missing; require: refuse to start without "
        "them (extension)",
    )
    log_level: str = setting(
        "CMSYNC_LOG_LEVEL",
        one_of("debug", "info", "warning", "error", "critical"),
        "info",
        "debug, info, warning, error or critical",
    )
    log_format: str = setting(
        "CMSYNC_LOG_FORMAT", one_of("json", "console"), "json", "json or console"
    )
    consent_refresh_s: float = setting(
        "CMSYNC_CONSENT_REFRESH_S",
        positive,
        "300",
        "seconds between full re-reads of each list's Unsubscribed and Bounced members (and "
        "the client's suppression list); between them, each write that could override an "
        "opt-out is preceded by an incremental read (> 0; extension)",
    )


#: Variables read outside `Settings`: declared here all the same (help, check-config, the
#: unknown-name check). Their readers use these declarations' names.
OTHER_VARIABLES: Final = (
    Variable(
        DEFAULT_API_KEY_ENV,
        Secret,
        None,
        "API key used by destinations that name no other (api_key_env)",
        secret=True,
    ),
    Variable(
        "CMSYNC_SCHEMA_DIR",
        text,
        None,
        "directory holding segment-membership.v1.json to validate events against instead of "
        "the schema shipped in the package (an override for trying a schema; not needed)",
    ),
)
VARIABLES: Final[tuple[Variable, ...]] = (
    *declared(KafkaSettings, "kafka."),
    *declared(Settings),
    *OTHER_VARIABLES,
)


class ConfigError(Exception):
    """The configuration is unusable. `problems` lists every problem, one plain sentence each."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems: list[str] = list(problems)
        super().__init__(self.problems)

    def __str__(self) -> str:
        return "configuration error:\n" + "\n".join(f"  - {p}" for p in self.problems)


def load_settings(env: Mapping[str, str]) -> Settings:
    """Read, normalise and validate the whole configuration, once.

    `env` is the environment (usually ``os.environ``). Raises `ConfigError` listing every
    problem found, in the environment and in the destinations file alike.
    """
    problems: list[str] = []
    invalid: set[str] = set()
    kafka = read_fields(KafkaSettings, env, problems, invalid)
    _kafka_rules(kafka, problems, invalid)
    values = read_fields(Settings, env, problems, invalid)
    destinations: tuple[Destination, ...] = ()
    path = values["destinations_file"]
    loaded = load_destinations(path, env, problems) if path is not None else None
    if loaded is not None:
        destinations = loaded.destinations
        known = {v.name for v in VARIABLES} | set(loaded.key_variables)
        secrets = {v.name for v in VARIABLES if v.secret} | set(loaded.key_variables)
        known |= {name + FILE_SUFFIX for name in secrets}
        problems += unknown_variables(env, known, RESERVED, PREFIX)
    if problems:
        raise ConfigError(problems)
    return Settings(kafka=KafkaSettings(**kafka), destinations=destinations, **values)


def _kafka_rules(kafka: dict[str, Any], problems: list[str], invalid: set[str]) -> None:
    """The rules between Kafka variables; clears what the chosen protocol does not use."""
    protocol = kafka["security_protocol"]
    if protocol is None:  # refused: nothing can be said of what depends on it
        return
    sasl = {
        "CMSYNC_KAFKA_SASL_MECHANISM": "sasl_mechanism",
        "CMSYNC_KAFKA_SASL_USERNAME": "sasl_username",
        "CMSYNC_KAFKA_SASL_PASSWORD": "sasl_password",
    }
    if protocol in _SASL_PROTOCOLS:
        for name, attr in sasl.items():
            if kafka[attr] is None and name not in invalid:
                needs = f" (one of {', '.join(_SASL_MECHANISMS)})" if "MECHANISM" in name else ""
                problems.append(f"{name} is required with {protocol}{needs} but is not set")
    else:
        unused = [name for name, attr in sasl.items() if kafka[attr] is not None]
        if unused:
            problems.append(
                f"{', '.join(unused)} {'is' if len(unused) == 1 else 'are'} set but "
                f"CMSYNC_KAFKA_SECURITY_PROTOCOL is {protocol}; SASL settings are used only "
                "with SASL_PLAINTEXT or SASL_SSL"
            )
        for attr in sasl.values():
            kafka[attr] = None
    tls_files = {
        "CMSYNC_KAFKA_SSL_CAFILE": ("ssl_cafile", "the CA file is"),
        "CMSYNC_KAFKA_SSL_CERTFILE": ("ssl_certfile", "the client certificate is"),
        "CMSYNC_KAFKA_SSL_KEYFILE": ("ssl_keyfile", "the client key is"),
    }
    if protocol not in _TLS_PROTOCOLS:
        for name, (attr, what) in tls_files.items():
            if kafka[attr] is not None:
                problems.append(
                    f"{name} is set but CMSYNC_KAFKA_SECURITY_PROTOCOL is {protocol}; "
                    f"{what} used only with SSL or SASL_SSL"
                )
            kafka[attr] = None
        return
    if kafka["ssl_cafile"] is not None:
        _check_tls_file("CMSYNC_KAFKA_SSL_CAFILE", kafka["ssl_cafile"], problems)
    certfile, keyfile = kafka["ssl_certfile"], kafka["ssl_keyfile"]
    if (certfile is None) != (keyfile is None):
        given, missing = (
            ("CMSYNC_KAFKA_SSL_CERTFILE", "CMSYNC_KAFKA_SSL_KEYFILE")
            if keyfile is None
            else ("CMSYNC_KAFKA_SSL_KEYFILE", "CMSYNC_KAFKA_SSL_CERTFILE")
        )
        problems.append(f"{given} is set but {missing} is not: mutual TLS needs both")
    elif certfile is not None:
        _check_tls_file("CMSYNC_KAFKA_SSL_CERTFILE", certfile, problems, keyfile)


def _check_tls_file(name: str, path: str, problems: list[str], keyfile: str | None = None) -> None:
    """A CA file, or (with `keyfile`) a client certificate and its key, loaded the way aiokafka's
    create_ssl_context will load them: a bad file fails here, at start. The files' content is
    never quoted (the key is a secret)."""
    where = f"{name} ({path})"
    for file_name, file_path in ((name, path), ("CMSYNC_KAFKA_SSL_KEYFILE", keyfile)):
        if file_path is None:
            continue
        if not os.path.exists(file_path):
            problems.append(f"{file_name} ({file_path}): file not found")
            return
        if not os.path.isfile(file_path):
            problems.append(f"{file_name} ({file_path}): is not a file")
            return
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    try:
        if keyfile is None:
            context.load_verify_locations(cafile=path)
        else:
            # A callable password keeps OpenSSL from prompting on a terminal for an encrypted key.
            context.load_cert_chain(path, keyfile, password=lambda: b"")
    except ssl.SSLError:
        problems.append(
            f"{where}: contains no PEM CA certificate"
            if keyfile is None
            else f"{where} and CMSYNC_KAFKA_SSL_KEYFILE ({keyfile}): not a PEM certificate and "
            "its matching, unencrypted private key"
        )
    except OSError as error:
        problems.append(f"{where}: cannot be read ({error.strerror})")
