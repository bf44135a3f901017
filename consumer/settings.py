"""Settings: the environment plus the destinations file, validated once, immutable afterwards.

`load_settings(env)` is the only way in. It reads every ``CMSYNC_*`` variable of the contract
(table `VARIABLES`, the single source of defaults, of ``--help`` and of `describe`), normalises
units at the edge (seconds are floats, counts are ints, enum values take their canonical
spelling), reads and checks the destinations file, and either returns a frozen `Settings` or
raises `ConfigError` carrying *every* problem found, each a plain sentence naming the variable,
or the destination and key, at fault.

Conventions, stated once:

- A variable set to an empty (or blank) string counts as unset, so its default applies. This is
  what Kubernetes and shell templates produce when a value is "left out".
- Enum values are accepted in any letter case and stored canonically (``sasl_ssl`` becomes
  ``SASL_SSL``, ``yes`` becomes ``Yes``).
- A ListID is 32 hexadecimal characters; an upper-case ListID is accepted and lower-cased
  (Campaign Monitor's IDs are lower-case; an upper-case copy is the same list).
- Settings the chosen security protocol would ignore (SASL settings without a ``SASL_*``
  protocol, a CA file without TLS) are errors: silently ignoring them hides a connection that is
  less protected than its operator believes.
- Messages never contain a secret's value (API keys, SASL password) and never echo env-file lines.

Hazard: `KafkaSettings.client_kwargs` necessarily contains the SASL password in clear; hand it to
aiokafka and nowhere else (never log it).

This module is pure apart from reading the files it is told about (destinations file, CA file):
it imports nothing from aiokafka or aiohttp at import time and never reads the clock.
"""

from __future__ import annotations

import argparse
import difflib
import hmac
import math
import os
import re
import ssl
import sys
import textwrap
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from operator import attrgetter
from typing import Final, Literal, TypeVar
from urllib.parse import urlsplit

import orjson

Removal = Literal["delete", "unsubscribe"]
Resubscribe = Literal["never", "deleted-only", "always"]
ConsentToTrack = Literal["Yes", "No", "Unchanged"]

DEFAULT_API_KEY_ENV: Final = "CMSYNC_CM_API_KEY"

_T = TypeVar("_T")


class Secret:
    """A secret string: shown as ``***`` by repr/str/format; `reveal` gives the value."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "***"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Secret):
            return NotImplemented
        return hmac.compare_digest(self._value.encode(), other._value.encode())

    def __hash__(self) -> int:
        return hash((Secret, self._value))


@dataclass(frozen=True, slots=True)
class Destination:
    """One ``[[destination]]`` of the destinations file: one segment synced to one list."""

    name: str
    segment_id: str
    list_id: str
    api_key_env: str
    api_key: Secret
    email_field: str
    name_field: str | None
    removal: Removal
    resubscribe: Resubscribe
    consent_to_track: ConsentToTrack
    custom_fields: tuple[tuple[str, str], ...]  # (Campaign Monitor key, profile field), file order


@dataclass(frozen=True, slots=True)
class KafkaSettings:
    bootstrap_servers: tuple[str, ...]
    topic: str
    group_id: str
    dlq_topic: str
    security_protocol: str  # PLAINTEXT | SSL | SASL_PLAINTEXT | SASL_SSL
    sasl_mechanism: str | None  # PLAIN | SCRAM-SHA-256 | SCRAM-SHA-512, set iff SASL_*
    sasl_username: str | None
    sasl_password: Secret | None
    ssl_cafile: str | None  # only with SSL/SASL_SSL; None means the system's CAs

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

            kwargs["ssl_context"] = create_ssl_context(cafile=self.ssl_cafile)
        return kwargs


@dataclass(frozen=True, slots=True)
class Settings:
    kafka: KafkaSettings
    cm_base_url: str  # no trailing slash
    destinations: tuple[Destination, ...]
    http_port: int  # 0: any free port
    flush_interval_s: float
    max_pending: int
    rate_limit_rps: float
    shutdown_budget_s: float
    applied_memory: int
    log_level: str  # debug | info | warning | error | critical
    log_format: str  # json | console
    consent_refresh_s: float
    destinations_file: str | None = None  # where `destinations` came from, for check-config


class ConfigError(Exception):
    """The configuration is unusable. `problems` lists every problem, one plain sentence each."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems: list[str] = list(problems)
        super().__init__(self.problems)

    def __str__(self) -> str:
        return "configuration error:\n" + "\n".join(f"  - {p}" for p in self.problems)


# ---------------------------------------------------------------------------------------------
# The table: single source of names, defaults, --help text and describe() layout.


@dataclass(frozen=True, slots=True)
class Variable:
    name: str
    default: str | None  # spelled as in the environment; parsed like a set value; None: none
    meaning: str
    attr: str | None  # dotted path of the resolved value in Settings (None: not in Settings)
    required: bool = False
    secret: bool = False


VARIABLES: Final[tuple[Variable, ...]] = (
    Variable(
        "CMSYNC_KAFKA_BOOTSTRAP_SERVERS",
        None,
        "comma-separated host:port list of Kafka brokers",
        "kafka.bootstrap_servers",
        required=True,
    ),
    Variable(
        "CMSYNC_KAFKA_TOPIC", "segment-membership", "topic of membership events", "kafka.topic"
    ),
    Variable("CMSYNC_KAFKA_GROUP_ID", "cmsync", "consumer group", "kafka.group_id"),
    Variable(
        "CMSYNC_KAFKA_SECURITY_PROTOCOL",
        "PLAINTEXT",
        "PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL",
        "kafka.security_protocol",
    ),
    Variable(
        "CMSYNC_KAFKA_SASL_MECHANISM",
        None,
        "PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512 (required by SASL_* protocols only)",
        "kafka.sasl_mechanism",
    ),
    Variable(
        "CMSYNC_KAFKA_SASL_USERNAME",
        None,
        "SASL user name (required by SASL_* protocols only)",
        "kafka.sasl_username",
    ),
    Variable(
        "CMSYNC_KAFKA_SASL_PASSWORD",
        None,
        "SASL password (required by SASL_* protocols only)",
        "kafka.sasl_password",
        secret=True,
    ),
    Variable(
        "CMSYNC_KAFKA_SSL_CAFILE",
        None,
        "PEM file of the CAs trusted for the brokers (SSL, SASL_SSL only); unset: system CAs",
        "kafka.ssl_cafile",
    ),
    Variable("CMSYNC_DLQ_TOPIC", "segment-membership.dlq", "dead-letter topic", "kafka.dlq_topic"),
    Variable(
        "CMSYNC_CM_BASE_URL",
        "https://api.createsend.com/api/v3.3",
        "Campaign Monitor API root (http or https URL)",
        "cm_base_url",
    ),
    Variable(
        DEFAULT_API_KEY_ENV,
        None,
        "API key used by destinations that name no other (api_key_env)",
        None,
        secret=True,
    ),
    Variable(
        "CMSYNC_DESTINATIONS_FILE",
        None,
        "path of the destinations file (TOML)",
        "destinations_file",
        required=True,
    ),
    Variable(
        "CMSYNC_HTTP_PORT",
        "9400",
        "port of /metrics, /healthz, /readyz (1-65535; 0: any free port, for tests and the demo)",
        "http_port",
    ),
    Variable(
        "CMSYNC_FLUSH_INTERVAL_S",
        "5",
        "longest time a change waits in a buffer, seconds (> 0)",
        "flush_interval_s",
    ),
    Variable(
        "CMSYNC_MAX_PENDING",
        "200000",
        "pending changes held in memory before intake pauses (>= 1)",
        "max_pending",
    ),
    Variable(
        "CMSYNC_RATE_LIMIT_RPS",
        "10",
        "ceiling of requests per second per API key (> 0)",
        "rate_limit_rps",
    ),
    Variable(
        "CMSYNC_SHUTDOWN_BUDGET_S",
        "25",
        "time allowed to drain on SIGTERM, seconds (> 0)",
        "shutdown_budget_s",
    ),
    Variable(
        "CMSYNC_APPLIED_MEMORY",
        "1000000",
        "(destination, address) pairs whose last applied occurred_at is remembered (>= 0)",
        "applied_memory",
    ),
    Variable("CMSYNC_LOG_LEVEL", "info", "debug, info, warning, error or critical", "log_level"),
    Variable("CMSYNC_LOG_FORMAT", "json", "json or console", "log_format"),
    Variable(
        "CMSYNC_CONSENT_REFRESH_S",
        "300",
        "seconds between re-reads of each list's Unsubscribed and Bounced members, used by the "
        "resubscribe policy (> 0; extension)",
        "consent_refresh_s",
    ),
)
_BY_NAME: Final = {v.name: v for v in VARIABLES}

_SECURITY_PROTOCOLS: Final = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
_SASL_PROTOCOLS: Final = ("SASL_PLAINTEXT", "SASL_SSL")
_TLS_PROTOCOLS: Final = ("SSL", "SASL_SSL")
_SASL_MECHANISMS: Final = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")
_LOG_LEVELS: Final = ("debug", "info", "warning", "error", "critical")
_LOG_FORMATS: Final = ("json", "console")
_REMOVALS: Final[dict[str, Removal]] = {"delete": "delete", "unsubscribe": "unsubscribe"}
_RESUBSCRIBES: Final[dict[str, Resubscribe]] = {
    "never": "never",
    "deleted-only": "deleted-only",
    "always": "always",
}
_CONSENTS: Final[dict[str, ConsentToTrack]] = {"yes": "Yes", "no": "No", "unchanged": "Unchanged"}

_DESTINATION_KEYS: Final = (
    "name",
    "segment_id",
    "list_id",
    "api_key_env",
    "email_field",
    "name_field",
    "removal",
    "resubscribe",
    "consent_to_track",
    "custom_fields",
)
_REQUIRED_DESTINATION_KEYS: Final = ("name", "segment_id", "list_id", "email_field")

_NAME_RE: Final = re.compile(r"[A-Za-z0-9._-]{1,64}")
_LIST_ID_RE: Final = re.compile(r"[0-9a-f]{32}")
_ENV_NAME_RE: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_HOST_RE: Final = re.compile(r"\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+")


def _did_you_mean(word: str, candidates: Sequence[str]) -> str:
    close = difflib.get_close_matches(word, candidates, n=1, cutoff=0.6)
    return f' (did you mean "{close[0]}"?)' if close else ""


def _shown(value: str) -> str:
    """A non-secret value quoted for a message, cut short so a message stays one line."""
    return repr(value if len(value) <= 40 else value[:37] + "...")


def _is_set(value: str | None) -> bool:
    return value is not None and value.strip() != ""


# ---------------------------------------------------------------------------------------------
# Environment variables


class _Env:
    """Reads variables of the table, recording problems instead of raising.

    Each reader returns a placeholder when the value is unusable; `load_settings` raises before
    any placeholder can escape.
    """

    def __init__(self, env: Mapping[str, str], problems: list[str]) -> None:
        self._env = env
        self.problems = problems

    def text(self, name: str) -> str | None:
        """The stripped value, else the table's default; records a problem if required."""
        value = self._env.get(name)
        if _is_set(value):
            assert value is not None
            return value.strip()
        variable = _BY_NAME[name]
        if variable.required:
            self.problems.append(f"{name} is required ({variable.meaning}) but is not set")
        return variable.default

    def is_set(self, name: str) -> bool:
        return _is_set(self._env.get(name))

    def secret(self, name: str) -> Secret | None:
        value = self._env.get(name)
        # Kept unstripped when set: a password may legitimately begin or end with spaces.
        return Secret(value) if value is not None and _is_set(value) else None

    def _number_text(self, name: str) -> str:
        text = self.text(name)
        assert text is not None, f"{name} needs a default in VARIABLES"
        return text

    def integer(self, name: str, minimum: int, maximum: int | None = None) -> int:
        text = self._number_text(name)
        bounds = f"between {minimum} and {maximum}" if maximum is not None else f">= {minimum}"
        try:
            value = int(text)
        except ValueError:
            self.problems.append(f"{name} must be a whole number {bounds}, got {_shown(text)}")
            return minimum
        if value < minimum or (maximum is not None and value > maximum):
            self.problems.append(f"{name} must be {bounds}, got {value}")
        return value

    def positive_float(self, name: str) -> float:
        text = self._number_text(name)
        try:
            value = float(text)
        except ValueError:
            self.problems.append(f"{name} must be a number greater than 0, got {_shown(text)}")
            return 1.0
        if not math.isfinite(value) or value <= 0:
            self.problems.append(f"{name} must be a finite number greater than 0, got {text}")
        return value

    def choice(self, name: str, choices: Sequence[str]) -> str:
        """One of `choices`, matched case-insensitively, returned in its canonical spelling."""
        text = self.text(name)
        if text is None:  # optional variable without default: the caller checked it is set
            return ""
        canonical = {c.lower(): c for c in choices}
        found = canonical.get(text.lower())
        if found is None:
            close = difflib.get_close_matches(text.lower(), list(canonical), n=1, cutoff=0.6)
            hint = f' (did you mean "{canonical[close[0]]}"?)' if close else ""
            self.problems.append(
                f"{name} must be one of {', '.join(choices)}, got {_shown(text)}{hint}"
            )
            return choices[0]
        return found


def _bootstrap_servers(env: _Env) -> tuple[str, ...]:
    name = "CMSYNC_KAFKA_BOOTSTRAP_SERVERS"
    text = env.text(name)
    if text is None:
        return ()
    entries = tuple(e.strip() for e in text.split(",") if e.strip())
    if not entries:
        env.problems.append(f"{name} lists no host:port")
    for entry in entries:
        host, colon, port = entry.rpartition(":")
        if not colon or not _HOST_RE.fullmatch(host):
            env.problems.append(f"{name}: {_shown(entry)} is not host:port")
        elif not (port.isascii() and port.isdigit() and 1 <= int(port) <= 65535):
            env.problems.append(
                f"{name}: the port of {_shown(entry)} must be a number between 1 and 65535"
            )
    return entries


def _base_url(env: _Env) -> str:
    name = "CMSYNC_CM_BASE_URL"
    text = env.text(name)
    assert text is not None
    # The value is not echoed: a mistaken URL may carry credentials.
    try:
        parts = urlsplit(text)
    except ValueError:
        env.problems.append(f"{name} is not a valid URL")
        return text
    try:
        port_ok = parts.port is None or parts.port > 0
    except ValueError:  # out of range or not a number
        port_ok = False
    if parts.scheme not in ("http", "https") or not parts.hostname:
        env.problems.append(
            f"{name} must be an http:// or https:// URL with a host "
            "(like https://api.createsend.com/api/v3.3)"
        )
    elif not port_ok:
        env.problems.append(f"{name} has an invalid port")
    elif parts.username is not None or parts.password is not None:
        env.problems.append(f"{name} must not contain a user name or password")
    elif parts.query or parts.fragment:
        env.problems.append(f"{name} must not contain a query (?…) or fragment (#…)")
    return text.rstrip("/")


def _kafka(env: _Env) -> KafkaSettings:
    problems = env.problems
    bootstrap = _bootstrap_servers(env)
    protocol_ok_before = len(problems)
    protocol = env.choice("CMSYNC_KAFKA_SECURITY_PROTOCOL", _SECURITY_PROTOCOLS)
    protocol_ok = len(problems) == protocol_ok_before

    mechanism_set = env.is_set("CMSYNC_KAFKA_SASL_MECHANISM")
    username = env.text("CMSYNC_KAFKA_SASL_USERNAME")
    password = env.secret("CMSYNC_KAFKA_SASL_PASSWORD")
    cafile = env.text("CMSYNC_KAFKA_SSL_CAFILE")
    mechanism: str | None = None

    if protocol_ok and protocol in _SASL_PROTOCOLS:
        if mechanism_set:
            mechanism = env.choice("CMSYNC_KAFKA_SASL_MECHANISM", _SASL_MECHANISMS)
        else:
            problems.append(
                f"CMSYNC_KAFKA_SASL_MECHANISM is required with {protocol} "
                f"(one of {', '.join(_SASL_MECHANISMS)}) but is not set"
            )
        for name, value in (
            ("CMSYNC_KAFKA_SASL_USERNAME", username),
            ("CMSYNC_KAFKA_SASL_PASSWORD", password),
        ):
            if value is None:
                problems.append(f"{name} is required with {protocol} but is not set")
    elif protocol_ok:
        unused = [
            name
            for name, is_set in (
                ("CMSYNC_KAFKA_SASL_MECHANISM", mechanism_set),
                ("CMSYNC_KAFKA_SASL_USERNAME", username is not None),
                ("CMSYNC_KAFKA_SASL_PASSWORD", password is not None),
            )
            if is_set
        ]
        if unused:
            problems.append(
                f"{', '.join(unused)} {'is' if len(unused) == 1 else 'are'} set but "
                f"CMSYNC_KAFKA_SECURITY_PROTOCOL is {protocol}; SASL settings are used only "
                "with SASL_PLAINTEXT or SASL_SSL"
            )
        username, password = None, None

    if cafile is not None and protocol_ok:
        if protocol not in _TLS_PROTOCOLS:
            problems.append(
                f"CMSYNC_KAFKA_SSL_CAFILE is set but CMSYNC_KAFKA_SECURITY_PROTOCOL is {protocol}; "
                "the CA file is used only with SSL or SASL_SSL"
            )
        else:
            _check_cafile(cafile, problems)

    return KafkaSettings(
        bootstrap_servers=bootstrap,
        topic=env.text("CMSYNC_KAFKA_TOPIC") or "",
        group_id=env.text("CMSYNC_KAFKA_GROUP_ID") or "",
        dlq_topic=env.text("CMSYNC_DLQ_TOPIC") or "",
        security_protocol=protocol,
        sasl_mechanism=mechanism,
        sasl_username=username,
        sasl_password=password,
        ssl_cafile=cafile if protocol in _TLS_PROTOCOLS else None,
    )


def _check_cafile(path: str, problems: list[str]) -> None:
    where = f"CMSYNC_KAFKA_SSL_CAFILE ({path})"
    if not os.path.exists(path):
        problems.append(f"{where}: file not found")
        return
    if not os.path.isfile(path):
        problems.append(f"{where}: is not a file")
        return
    try:
        # The same call aiokafka's create_ssl_context makes: a bad file fails here, at start.
        ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=path)
    except ssl.SSLError:
        problems.append(f"{where}: contains no PEM CA certificate")
    except OSError as error:
        problems.append(f"{where}: cannot be read ({error.strerror})")


def load_settings(env: Mapping[str, str]) -> Settings:
    """Read, normalise and validate the whole configuration, once.

    `env` is the environment (usually ``os.environ``). Raises `ConfigError` listing every
    problem found, in the environment and in the destinations file alike.
    """
    problems: list[str] = []
    reader = _Env(env, problems)
    kafka = _kafka(reader)
    cm_base_url = _base_url(reader)
    # 0 lets the OS pick a free port: the demo and the test harness run several services at once.
    http_port = reader.integer("CMSYNC_HTTP_PORT", 0, 65535)
    flush_interval_s = reader.positive_float("CMSYNC_FLUSH_INTERVAL_S")
    max_pending = reader.integer("CMSYNC_MAX_PENDING", 1)
    rate_limit_rps = reader.positive_float("CMSYNC_RATE_LIMIT_RPS")
    shutdown_budget_s = reader.positive_float("CMSYNC_SHUTDOWN_BUDGET_S")
    applied_memory = reader.integer("CMSYNC_APPLIED_MEMORY", 0)
    log_level = reader.choice("CMSYNC_LOG_LEVEL", _LOG_LEVELS)
    log_format = reader.choice("CMSYNC_LOG_FORMAT", _LOG_FORMATS)
    consent_refresh_s = reader.positive_float("CMSYNC_CONSENT_REFRESH_S")
    destinations_file = reader.text("CMSYNC_DESTINATIONS_FILE")
    destinations: tuple[Destination, ...] = ()
    if destinations_file is not None:
        destinations = _load_destinations(destinations_file, env, problems)
    if problems:
        raise ConfigError(problems)
    return Settings(
        kafka=kafka,
        cm_base_url=cm_base_url,
        destinations=destinations,
        http_port=http_port,
        flush_interval_s=flush_interval_s,
        max_pending=max_pending,
        rate_limit_rps=rate_limit_rps,
        shutdown_budget_s=shutdown_budget_s,
        applied_memory=applied_memory,
        log_level=log_level,
        log_format=log_format,
        consent_refresh_s=consent_refresh_s,
        destinations_file=destinations_file,
    )


# ---------------------------------------------------------------------------------------------
# Destinations file


def _toml_type(value: object) -> str:
    names = {bool: "a boolean", int: "an integer", float: "a float", list: "an array"}
    names |= {dict: "a table", str: "a string"}
    return names.get(type(value), "a date or time")


def _load_destinations(
    path: str, env: Mapping[str, str], problems: list[str]
) -> tuple[Destination, ...]:
    where = f"CMSYNC_DESTINATIONS_FILE ({path})"
    try:
        with open(path, "rb") as file:
            data = file.read()
    except FileNotFoundError:
        problems.append(f"{where}: file not found")
        return ()
    except IsADirectoryError:
        problems.append(f"{where}: is a directory, not a file")
        return ()
    except OSError as error:
        problems.append(f"{where}: cannot be read ({error.strerror})")
        return ()
    try:
        text = data.decode("utf-8-sig")  # tolerate the byte-order mark some editors write
    except UnicodeDecodeError:
        problems.append(f"{where}: is not UTF-8 text")
        return ()
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        # The message carries the position: "Invalid value (at line 3, column 9)".
        problems.append(f"{where}: is not valid TOML: {error}")
        return ()
    return _parse_destinations(document, env, problems, where)


def _parse_destinations(
    document: Mapping[str, object], env: Mapping[str, str], problems: list[str], where: str
) -> tuple[Destination, ...]:
    for key in document:
        if key != "destination":
            hint = _did_you_mean(key, ["destination"])
            problems.append(f'{where}: unknown top-level key "{key}"{hint}')
    tables = document.get("destination")
    if isinstance(tables, dict):
        problems.append(
            f"{where}: destinations are written [[destination]] (an array of tables), "
            "not [destination]"
        )
        return ()
    if tables is not None and not (
        isinstance(tables, list) and all(isinstance(t, dict) for t in tables)
    ):
        problems.append(f'{where}: "destination" must be an array of tables ([[destination]])')
        return ()
    if not tables:
        problems.append(f"{where}: defines no destinations (add a [[destination]] table)")
        return ()

    destinations: list[Destination] = []
    missing_keys: dict[str, list[str]] = {}  # env var name -> labels of destinations needing it
    names: dict[str, list[int]] = {}
    routes: dict[tuple[str, str], list[str]] = {}
    for number, table in enumerate(tables, start=1):
        parsed = _parse_destination(number, table, env, problems, missing_keys)
        if parsed is None:
            continue
        destinations.append(parsed)
        names.setdefault(parsed.name, []).append(number)
        routes.setdefault((parsed.segment_id, parsed.list_id), []).append(f'"{parsed.name}"')

    for name, numbers in names.items():
        if len(numbers) > 1:
            listed = ", ".join(f"#{n}" for n in numbers)
            problems.append(f'destination name "{name}" is used more than once ({listed})')
    for (segment_id, list_id), labels in routes.items():
        if len(labels) > 1:
            problems.append(
                f"destinations {' and '.join(labels)} both send segment "
                f'"{segment_id}" to list {list_id}: keep one'
            )
    for variable, labels in missing_keys.items():
        problems.append(
            f"{variable} is not set or is empty; it holds the Campaign Monitor API key of "
            f"{', '.join(labels)}"
        )
    return tuple(destinations)


def _parse_destination(
    number: int,
    table: Mapping[str, object],
    env: Mapping[str, str],
    problems: list[str],
    missing_keys: dict[str, list[str]],
) -> Destination | None:
    """One destination, or None after recording its problems."""
    raw_name = table.get("name")
    label = f"destination #{number}"
    if isinstance(raw_name, str) and _NAME_RE.fullmatch(raw_name):
        label += f' "{raw_name}"'
    found = len(problems)

    for key in table:
        if key not in _DESTINATION_KEYS:
            problems.append(f'{label}: unknown key "{key}"{_did_you_mean(key, _DESTINATION_KEYS)}')
    for key in _REQUIRED_DESTINATION_KEYS:
        if key not in table:
            problems.append(f'{label}: required key "{key}" is missing')

    def string(key: str) -> str | None:
        value = table.get(key)
        if value is None:
            return None
        if not isinstance(value, str):
            problems.append(f'{label}: "{key}" must be a string, not {_toml_type(value)}')
            return None
        if not value.strip():
            problems.append(f'{label}: "{key}" must not be empty')
            return None
        if value != value.strip():
            problems.append(f'{label}: "{key}" must not start or end with spaces')
            return None
        return value

    def choice(key: str, choices: Mapping[str, _T], default: _T) -> _T:
        value = string(key)
        if value is None:
            return default
        found_choice = choices.get(value.lower())
        if found_choice is None:
            allowed = ", ".join(f'"{c}"' for c in choices.values())
            hint = _did_you_mean(value.lower(), list(choices))
            problems.append(f'{label}: "{key}" must be one of {allowed}, got {_shown(value)}{hint}')
            return default
        return found_choice

    name = string("name")
    if name is not None and not _NAME_RE.fullmatch(name):
        problems.append(
            f'{label}: "name" {_shown(name)} is not usable as a metric label: use 1 to 64 '
            'letters, digits, "-", "_" or "."'
        )
    segment_id = string("segment_id")
    list_id = string("list_id")
    if list_id is not None:
        list_id = list_id.lower()
        if not _LIST_ID_RE.fullmatch(list_id):
            detail = (
                f"got {len(list_id)} characters"
                if len(list_id) != 32
                else "got characters other than 0-9 and a-f"
            )
            problems.append(
                f'{label}: "list_id" must be a Campaign Monitor ListID, 32 hexadecimal '
                f"characters ({detail})"
            )
    email_field = string("email_field")
    name_field = string("name_field")
    removal = choice("removal", _REMOVALS, "delete")
    resubscribe = choice("resubscribe", _RESUBSCRIBES, "deleted-only")
    consent = choice("consent_to_track", _CONSENTS, "Unchanged")

    api_key: Secret | None = None
    api_key_env = string("api_key_env") if "api_key_env" in table else DEFAULT_API_KEY_ENV
    if api_key_env is not None and not _ENV_NAME_RE.fullmatch(api_key_env):
        problems.append(
            f'{label}: "api_key_env" must name an environment variable (letters, digits and '
            f'"_", not starting with a digit), got {_shown(api_key_env)}'
        )
    elif api_key_env is not None:
        key_value = env.get(api_key_env, "").strip()  # a secret file's trailing newline
        if key_value:
            api_key = Secret(key_value)
        else:
            missing_keys.setdefault(api_key_env, []).append(label)

    custom_fields = _custom_fields(label, table.get("custom_fields", {}), email_field, problems)

    if len(problems) > found or api_key is None:
        return None
    # No problem recorded means every required key was found and valid.
    assert name is not None
    assert segment_id is not None
    assert list_id is not None
    assert email_field is not None
    assert api_key_env is not None
    return Destination(
        name=name,
        segment_id=segment_id,
        list_id=list_id,
        api_key_env=api_key_env,
        api_key=api_key,
        email_field=email_field,
        name_field=name_field,
        removal=removal,
        resubscribe=resubscribe,
        consent_to_track=consent,
        custom_fields=custom_fields,
    )


def _custom_fields(
    label: str, raw: object, email_field: str | None, problems: list[str]
) -> tuple[tuple[str, str], ...]:
    where = f"{label}: custom_fields"
    if not isinstance(raw, dict):
        problems.append(
            f"{where} must be a table of Campaign Monitor key = profile field, "
            f"not {_toml_type(raw)}"
        )
        return ()
    fields: list[tuple[str, str]] = []
    by_folded: dict[str, list[str]] = {}
    for key, value in raw.items():
        if not key.strip():
            problems.append(f"{where}: a Campaign Monitor key must be a non-empty string")
            continue
        if not isinstance(value, str):
            problems.append(
                f'{where}: "{key}" must map to a profile field name (a string), '
                f"not {_toml_type(value)}"
            )
            continue
        if not value.strip():
            problems.append(f'{where}: "{key}" maps to an empty profile field name')
            continue
        if value == email_field:
            problems.append(
                f'{where}: profile field "{value}" is the email_field and cannot also be the '
                f'custom field "{key}"'
            )
            continue
        by_folded.setdefault(key.casefold(), []).append(key)
        fields.append((key, value))
    for keys in by_folded.values():
        if len(keys) > 1:
            spelled = ", ".join(f'"{k}"' for k in keys)
            problems.append(
                f"{where}: the Campaign Monitor key {spelled} is mapped more than once "
                "(keys differ only in letter case, which Campaign Monitor does not distinguish)"
            )
    return tuple(fields)


# ---------------------------------------------------------------------------------------------
# describe() and the check-config command


def origins_of(env: Mapping[str, str], label: str) -> dict[str, str]:
    """``{variable: label}`` for every table variable `env` sets (blank counts as unset)."""
    return {name: label for name, value in env.items() if name in _BY_NAME and _is_set(value)}


def _plain(value: object, secret: bool) -> object:
    if secret:
        return None if value is None else "***"
    if isinstance(value, tuple):
        return list(value)
    return value


def describe(settings: Settings, origins: Mapping[str, str] | None = None) -> dict[str, object]:
    """The resolved configuration as plain data (JSON-able), secrets masked as ``"***"``.

    A secret that is not set is ``None``. With `origins` (see `origins_of`) the result also says
    where each variable's value came from; variables absent from `origins` show "default".
    API keys are shown per destination (the variable each one names, and ``"***"``).
    """
    values: dict[str, object] = {}
    for variable in VARIABLES:
        if variable.attr is not None:
            values[variable.name] = _plain(attrgetter(variable.attr)(settings), variable.secret)
    destinations = [
        {
            "name": d.name,
            "segment_id": d.segment_id,
            "list_id": d.list_id,
            "api_key_env": d.api_key_env,
            "api_key": "***",
            "email_field": d.email_field,
            "name_field": d.name_field,
            "removal": d.removal,
            "resubscribe": d.resubscribe,
            "consent_to_track": d.consent_to_track,
            "custom_fields": dict(d.custom_fields),
        }
        for d in settings.destinations
    ]
    described: dict[str, object] = {"settings": values, "destinations": destinations}
    if origins is not None:
        described["sources"] = {name: origins.get(name, "default") for name in values}
    return described


def _text_value(value: object) -> str:
    if value is None:
        return "(not set)"
    if value == "***":
        return "*** (set)"
    if isinstance(value, list):
        return ",".join(map(str, value))
    return str(value)


def _aligned(rows: Sequence[tuple[str, str, str]]) -> list[str]:
    width = max(len(key) for key, _, _ in rows)
    value_width = max(len(value) for _, value, _ in rows)
    return [
        f"{key:<{width}} = {value:<{value_width}}  ({note})".rstrip()
        if note
        else f"{key:<{width}} = {value}"
        for key, value, note in rows
    ]


def render_text(described: Mapping[str, object]) -> str:
    """`describe` output as aligned ``key = value`` lines, one section per destination."""
    values = described["settings"]
    sources = described.get("sources", {})
    destinations = described["destinations"]
    assert isinstance(values, dict)
    assert isinstance(sources, dict)
    assert isinstance(destinations, list)
    lines = ["# cmsync configuration (valid; secrets masked)"]
    lines += _aligned(
        [(name, _text_value(value), sources.get(name, "")) for name, value in values.items()]
    )
    for destination in destinations:
        rows: list[tuple[str, str, str]] = []
        for key, value in destination.items():
            if key == "custom_fields":
                rows += [(f"custom_fields.{k}", v, "") for k, v in value.items()]
            elif key == "api_key":
                rows.append((key, _text_value(value), f"from {destination['api_key_env']}"))
            else:
                rows.append((key, _text_value(value), ""))
        lines += ["", f'[destination "{destination["name"]}"]', *_aligned(rows)]
    return "\n".join(lines)


def _read_env_file(path: str) -> dict[str, str]:
    """``NAME=VALUE`` lines; blank lines, ``#`` comments and an ``export`` prefix are allowed,
    one pair of surrounding quotes is removed. No escapes, no inline comments."""
    where = f"--env-file {path}"
    try:
        with open(path, encoding="utf-8-sig") as file:
            text = file.read()
    except FileNotFoundError:
        raise ConfigError([f"{where}: file not found"]) from None
    except UnicodeDecodeError:
        raise ConfigError([f"{where}: is not UTF-8 text"]) from None
    except OSError as error:
        raise ConfigError([f"{where}: cannot be read ({error.strerror})"]) from None
    values: dict[str, str] = {}
    problems: list[str] = []
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.startswith("export "):
            stripped = stripped.removeprefix("export ").lstrip()
        name, equals, value = stripped.partition("=")
        name, value = name.strip(), value.strip()
        if not equals or not _ENV_NAME_RE.fullmatch(name):
            # The line is not echoed: it may hold a secret.
            problems.append(f"{where}, line {number}: expected NAME=VALUE")
            continue
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
            value = value[1:-1]
        values[name] = value
    if problems:
        raise ConfigError(problems)
    return values


def _settings_help() -> str:
    lines = ["settings (environment variables; blank counts as unset):"]
    for variable in VARIABLES:
        if variable.default is not None:
            default = f"default: {variable.default}"
        else:
            default = "required" if variable.required else "default: not set"
        if variable.secret:
            default += ", secret"
        lines.append(f"  {variable.name}  ({default})")
        lines += textwrap.wrap(
            variable.meaning, 96, initial_indent=" " * 6, subsequent_indent=" " * 6
        )
    lines += [
        "",
        "destinations file keys ([[destination]] tables):",
        *textwrap.wrap(
            ", ".join(_DESTINATION_KEYS), 96, initial_indent="  ", subsequent_indent="  "
        ),
        "  required: " + ", ".join(_REQUIRED_DESTINATION_KEYS),
    ]
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cmsync check-config",
        description="Load and validate the configuration (environment and destinations file)\n"
        "and print it resolved, secrets masked. Exit 0 when valid; exit 2 listing every\n"
        "problem otherwise.",
        epilog=_settings_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--env-file",
        metavar="PATH",
        help="also read NAME=VALUE lines from PATH; variables set in the environment win",
    )
    parser.add_argument(
        "--format", choices=("text", "json"), default="text", help="output format (text)"
    )
    return parser


def cli_main(argv: list[str]) -> int:
    """`cmsync check-config`: 0 valid, 2 usage or configuration error."""
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exit_:  # argparse exits on --help (0) and on usage errors (2)
        return exit_.code if isinstance(exit_.code, int) else 2
    env: dict[str, str] = {}
    origins: dict[str, str] = {}
    try:
        if args.env_file is not None:
            from_file = _read_env_file(args.env_file)
            env.update(from_file)
            origins.update(origins_of(from_file, "env file"))
        env.update((name, value) for name, value in os.environ.items() if _is_set(value))
        origins.update(origins_of(os.environ, "environment"))
        settings = load_settings(env)
    except ConfigError as error:
        print(error, file=sys.stderr)
        return 2
    described = describe(settings, origins)
    if args.format == "json":
        sys.stdout.write(orjson.dumps(described, option=orjson.OPT_INDENT_2).decode() + "\n")
    else:
        print(render_text(described))
    return 0
