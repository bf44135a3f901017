"""The destinations file (TOML): ``[[destination]]`` tables, each one segment synced to one list,
and the ``[[connection]]`` tables they may refer to.

`load_destinations(path, env, problems)` reads and checks the file named by
``CMSYNC_DESTINATIONS_FILE``, and reads each destination's API key from the variable its
connection or its ``api_key_env`` names (or that variable's ``_FILE``, as for every secret).
Like the settings, it records *every* problem, one plain sentence naming the table and key at
fault, instead of raising; `consumer.settings.load_settings` raises them all at once.

Rules, stated once:

- A ListID is 32 hexadecimal characters; an upper-case ListID is accepted and lower-cased
  (Campaign Monitor's IDs are lower-case; an upper-case copy is the same list).
- Enum values are accepted in any letter case and stored canonically (``yes`` becomes ``Yes``).
- A destination takes one segment (``segment_id``) or several (``segment_ids``: its list holds
  the union), never both keys.
- Names are unique, and one list is written by one destination: two destinations naming the
  same list would fight over it (one removes what the other adds); a list that should hold
  several segments is one destination with ``segment_ids``.
- The destinations of one segment read the address from the same profile field: the state
  keeps one address per (segment, profile).
- A connection (``[[connection]]``: name, ``api_key_env``, optional ``client_id``, optional
  ``personal_data = "acknowledged"``) is what the administrator set up for one Campaign Monitor
  client. A destination names one with ``connection`` or names its key with ``api_key_env``
  (or neither: the default key), never both. A connection no destination names is allowed,
  and its key is not read.
- Personal data leaves for Campaign Monitor only with the administrator's acknowledgement:
  the destinations of a connection without ``personal_data = "acknowledged"`` are valid but
  send nothing (`Destination.sends`). A destination without a connection was configured before
  the acknowledgement existed and counts as acknowledged; it has no client ID.
- ``removal = "unsubscribe"`` on a list whose ``UnsubscribeSetting`` is ``AllClientLists``
  unsubscribes the person from every list of the client; the sync holds such a destination
  (`consumer.listsettings`) unless it says ``unsubscribe_all_client_lists = true`` (a boolean,
  false by default; it changes nothing with ``removal = "delete"``).
- ``extras = "remove"`` lets `cmsync reconcile` remove active addresses that no member of the
  segments holds (people added by hand); the default ``"keep"`` leaves them.
- Messages never contain an API key.

Pure apart from reading the destinations file and the secret files it is told about.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final, Literal, TypeVar

from consumer.variables import (
    FILE_SUFFIX,
    Secret,
    did_you_mean,
    read_secret,
    read_text_file,
    shown,
)

Removal = Literal["delete", "unsubscribe"]
Resubscribe = Literal["never", "deleted-only", "always"]
ConsentToTrack = Literal["Yes", "No", "Unchanged"]
Extras = Literal["keep", "remove"]

#: The variable holding the API key of destinations that name no ``api_key_env``.
DEFAULT_API_KEY_ENV: Final = "CMSYNC_CM_API_KEY"

_T = TypeVar("_T")


@dataclass(frozen=True, slots=True)
class Destination:
    """One ``[[destination]]`` of the destinations file: one or more segments synced to one
    list (the union of their members)."""

    name: str
    segment_ids: tuple[str, ...]  # in file order, each once
    list_id: str
    api_key_env: str  # the connection's, or the destination's own
    api_key: Secret
    connection: str | None  # the [[connection]] named; None: the key came from api_key_env
    client_id: str | None  # the connection's Campaign Monitor ClientID (suppression list)
    personal_data_acknowledged: bool  # True without a connection (configured before the rule)
    email_field: str
    name_field: str | None
    removal: Removal
    resubscribe: Resubscribe
    consent_to_track: ConsentToTrack
    custom_fields: tuple[tuple[str, str], ...]  # (Campaign Monitor key, profile field), file order
    # removal = "unsubscribe" accepted on an AllClientLists list (consumer.listsettings)
    unsubscribe_all_client_lists: bool = False
    # what `cmsync reconcile` does with active addresses no member holds (added by hand)
    extras: Extras = "keep"

    @property
    def sends(self) -> bool:
        """Whether anything may be written to this destination's list: only once the
        administrator acknowledged that personal data leaves for Campaign Monitor."""
        return self.personal_data_acknowledged


@dataclass(frozen=True, slots=True)
class _Connection:
    """One valid ``[[connection]]``."""

    name: str
    api_key_env: str
    client_id: str | None
    personal_data_acknowledged: bool

    @property
    def label(self) -> str:
        return f'connection "{self.name}"'


@dataclass(frozen=True, slots=True)
class DestinationsFile:
    """What a readable destinations file gave: its valid destinations, and every variable its
    tables name in ``api_key_env`` (destinations and connections, valid or not, with the
    default's), which the environment may set although they are no settings of cmsync."""

    destinations: tuple[Destination, ...]
    key_variables: frozenset[str]


_REMOVALS: Final[dict[str, Removal]] = {"delete": "delete", "unsubscribe": "unsubscribe"}
_RESUBSCRIBES: Final[dict[str, Resubscribe]] = {
    "never": "never",
    "deleted-only": "deleted-only",
    "always": "always",
}
_CONSENTS: Final[dict[str, ConsentToTrack]] = {"yes": "Yes", "no": "No", "unchanged": "Unchanged"}
_EXTRAS: Final[dict[str, Extras]] = {"keep": "keep", "remove": "remove"}

DESTINATION_KEYS: Final = (
    "name",
    "segment_id",
    "segment_ids",
    "list_id",
    "connection",
    "api_key_env",
    "email_field",
    "name_field",
    "removal",
    "resubscribe",
    "consent_to_track",
    "unsubscribe_all_client_lists",
    "extras",
    "custom_fields",
)
REQUIRED_DESTINATION_KEYS: Final = ("name", "list_id", "email_field")
CONNECTION_KEYS: Final = ("name", "api_key_env", "client_id", "personal_data")
REQUIRED_CONNECTION_KEYS: Final = ("name", "api_key_env")
#: The only value of a connection's ``personal_data`` (any letter case).
PERSONAL_DATA_ACKNOWLEDGED: Final = "acknowledged"

_NAME_RE: Final = re.compile(r"[A-Za-z0-9._-]{1,64}")
_HEX_ID_RE: Final = re.compile(r"[0-9a-f]{32}")
ENV_NAME_RE: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_TOP_LEVEL_KEYS: Final = ("destination", "connection")


def _toml_type(value: object) -> str:
    names = {bool: "a boolean", int: "an integer", float: "a float", list: "an array"}
    names |= {dict: "a table", str: "a string"}
    return names.get(type(value), "a date or time")


def load_destinations(
    path: str, env: Mapping[str, str], problems: list[str]
) -> DestinationsFile | None:
    """The destinations of the file at `path` (named by ``CMSYNC_DESTINATIONS_FILE``), API keys
    read from `env`. Records every problem in `problems`; None when the file could not be read
    as TOML at all (then nothing is known of the variables it names)."""
    where = f"CMSYNC_DESTINATIONS_FILE ({path})"
    text = read_text_file(where, path, problems)
    if text is None:
        return None
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        # The message carries the position: "Invalid value (at line 3, column 9)".
        problems.append(f"{where}: is not valid TOML: {error}")
        return None
    return _parse_destinations(document, env, problems, where)


def _tables(
    document: Mapping[str, object], key: str, where: str, problems: list[str]
) -> list[dict[str, object]] | None:
    """The ``[[key]]`` tables of the document (empty when absent); None after recording that
    `key` is not an array of tables."""
    tables = document.get(key)
    if tables is None:
        return []
    if isinstance(tables, dict):
        problems.append(f"{where}: {key}s are written [[{key}]] (an array of tables), not [{key}]")
        return None
    if not (isinstance(tables, list) and all(isinstance(t, dict) for t in tables)):
        problems.append(f'{where}: "{key}" must be an array of tables ([[{key}]])')
        return None
    return tables


def _parse_destinations(
    document: Mapping[str, object], env: Mapping[str, str], problems: list[str], where: str
) -> DestinationsFile:
    for key in document:
        if key not in _TOP_LEVEL_KEYS:
            hint = did_you_mean(key, _TOP_LEVEL_KEYS)
            problems.append(f'{where}: unknown top-level key "{key}"{hint}')
    connection_tables = _tables(document, "connection", where, problems) or []
    tables = _tables(document, "destination", where, problems)
    if tables is None:
        return DestinationsFile((), frozenset())
    if not tables:
        problems.append(f"{where}: defines no destinations (add a [[destination]] table)")
        return DestinationsFile((), frozenset())
    key_variables = frozenset(
        str(table.get("api_key_env", DEFAULT_API_KEY_ENV)).strip()
        for table in (*tables, *connection_tables)
        if "api_key_env" in table or "connection" not in table
    )

    connections = _parse_connections(connection_tables, problems)
    destinations: list[Destination] = []
    keys = _ApiKeys(env, problems)
    names: dict[str, list[int]] = {}
    writers: dict[str, list[str]] = {}  # list_id -> labels of the destinations writing it
    for number, table in enumerate(tables, start=1):
        parsed = _parse_destination(number, table, keys, connections, problems)
        if parsed is None:
            continue
        destinations.append(parsed)
        names.setdefault(parsed.name, []).append(number)
        writers.setdefault(parsed.list_id, []).append(f'"{parsed.name}"')

    for name, numbers in names.items():
        if len(numbers) > 1:
            listed = ", ".join(f"#{n}" for n in numbers)
            problems.append(f'destination name "{name}" is used more than once ({listed})')
    for list_id, labels in writers.items():
        if len(labels) > 1:
            problems.append(
                f"destinations {' and '.join(labels)} {'both' if len(labels) == 2 else 'all'} "
                f"write list {list_id}: one destination per list (an exit from one segment "
                "would remove a member of the other); to fill one list from several segments, "
                'give one destination segment_ids = ["a", "b"]'
            )
    fields: dict[str, dict[str, list[str]]] = {}  # segment -> email_field -> destination labels
    for dest in destinations:
        for segment in dest.segment_ids:
            fields.setdefault(segment, {}).setdefault(dest.email_field, []).append(f'"{dest.name}"')
    for segment, by_field in fields.items():
        if len(by_field) > 1:
            which = "; ".join(f"{', '.join(labels)} use {f!r}" for f, labels in by_field.items())
            problems.append(
                f"the destinations of segment {shown(segment)} read the address from different "
                f"profile fields ({which}): a member has one address per segment, so give them "
                "the same email_field"
            )
    keys.report_missing()
    return DestinationsFile(tuple(destinations), key_variables)


class _ApiKeys:
    """Reads each API key variable once, so that a key file several destinations share is one
    problem, and gathers who needs a key that is not set."""

    def __init__(self, env: Mapping[str, str], problems: list[str]) -> None:
        self._env = env
        self._problems = problems
        self._read: dict[str, Secret | None] = {}
        self._failed: set[str] = set()
        self._missing: dict[str, list[str]] = {}  # variable -> labels of the tables needing it

    def get(self, variable: str, label: str) -> Secret | None:
        if variable not in self._read:
            found = len(self._problems)
            # API keys hold no spaces: any around one were pasted in with it.
            value = (read_secret(self._env, variable, self._problems) or "").strip()
            self._read[variable] = Secret(value) if value else None
            if len(self._problems) > found:
                self._failed.add(variable)
        key = self._read[variable]
        if key is None and variable not in self._failed:
            labels = self._missing.setdefault(variable, [])
            if label not in labels:  # a connection is named by several destinations
                labels.append(label)
        return key

    def report_missing(self) -> None:
        for variable, labels in self._missing.items():
            self._problems.append(
                f"{variable} (or {variable}{FILE_SUFFIX}) is not set or is empty; it holds the "
                f"Campaign Monitor API key of {', '.join(labels)}"
            )


def _string(label: str, table: Mapping[str, object], key: str, problems: list[str]) -> str | None:
    """``table[key]``: a non-empty string without surrounding spaces; None when absent or after
    recording a problem."""
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


def _key_variable(label: str, variable: str | None, problems: list[str]) -> str | None:
    """`variable` (an ``api_key_env`` value) when it can name an environment variable."""
    if variable is not None and not ENV_NAME_RE.fullmatch(variable):
        problems.append(
            f'{label}: "api_key_env" must name an environment variable (letters, digits and '
            f'"_", not starting with a digit), got {shown(variable)}'
        )
        return None
    return variable


def _hex_id(label: str, key: str, what: str, value: str | None, problems: list[str]) -> str | None:
    """`value` lower-cased when it is a 32-character hexadecimal ID (a ListID, a ClientID)."""
    if value is None:
        return None
    value = value.lower()
    if not _HEX_ID_RE.fullmatch(value):
        detail = (
            f"got {len(value)} characters"
            if len(value) != 32
            else "got characters other than 0-9 and a-f"
        )
        problems.append(
            f'{label}: "{key}" must be a Campaign Monitor {what}, 32 hexadecimal '
            f"characters ({detail})"
        )
        return None
    return value


class _Connections:
    """The ``[[connection]]`` tables by name: the valid ones, and the names of every table, so
    that a destination naming an invalid connection adds no second problem."""

    def __init__(self, valid: dict[str, _Connection], named: list[str]) -> None:
        self._valid = valid
        self._named = named

    def find(self, name: str, label: str, problems: list[str]) -> _Connection | None:
        """The connection `name`; None after recording a problem, or when the connection
        itself is invalid (its problems are recorded already)."""
        if name in self._named:
            return self._valid.get(name)
        hint = " (the file defines no [[connection]])"
        if self._named:
            hint = did_you_mean(name, self._named)
        problems.append(f'{label}: "connection" names no [[connection]] {shown(name)}{hint}')
        return None


def _parse_connections(tables: list[dict[str, object]], problems: list[str]) -> _Connections:
    valid: dict[str, _Connection] = {}
    numbers: dict[str, list[int]] = {}
    for number, table in enumerate(tables, start=1):
        raw_name = table.get("name")
        if isinstance(raw_name, str):
            numbers.setdefault(raw_name, []).append(number)
        parsed = _parse_connection(number, table, problems)
        if parsed is not None:
            valid[parsed.name] = parsed
    for name, found in numbers.items():
        if len(found) > 1:
            listed = ", ".join(f"#{n}" for n in found)
            problems.append(f'connection name "{name}" is used more than once ({listed})')
            valid.pop(name, None)  # which one a destination meant is unknown
    return _Connections(valid, list(numbers))


def _label(kind: str, number: int, table: Mapping[str, object]) -> str:
    """How problems name a table: ``destination #2 "vip"`` (the name only when usable)."""
    raw_name = table.get("name")
    label = f"{kind} #{number}"
    if isinstance(raw_name, str) and _NAME_RE.fullmatch(raw_name):
        label += f' "{raw_name}"'
    return label


def _check_keys(
    label: str,
    table: Mapping[str, object],
    known: Sequence[str],
    required: Sequence[str],
    problems: list[str],
) -> None:
    """Record unknown keys (with the nearest known one) and missing required keys."""
    for key in table:
        if key not in known:
            problems.append(f'{label}: unknown key "{key}"{did_you_mean(key, known)}')
    for key in required:
        if key not in table:
            problems.append(f'{label}: required key "{key}" is missing')


def _parse_connection(
    number: int, table: Mapping[str, object], problems: list[str]
) -> _Connection | None:
    """One connection, or None after recording its problems."""
    label = _label("connection", number, table)
    found = len(problems)
    _check_keys(label, table, CONNECTION_KEYS, REQUIRED_CONNECTION_KEYS, problems)

    name = _string(label, table, "name", problems)
    if name is not None and not _NAME_RE.fullmatch(name):
        problems.append(
            f'{label}: "name" {shown(name)} must be 1 to 64 letters, digits, "-", "_" or "."'
        )
    api_key_env = _key_variable(label, _string(label, table, "api_key_env", problems), problems)
    client_id = _hex_id(
        label, "client_id", "ClientID", _string(label, table, "client_id", problems), problems
    )
    personal_data = _string(label, table, "personal_data", problems)
    if personal_data is not None and personal_data.lower() != PERSONAL_DATA_ACKNOWLEDGED:
        problems.append(
            f'{label}: "personal_data" must be "{PERSONAL_DATA_ACKNOWLEDGED}", got '
            f"{shown(personal_data)}: it records the administrator's acknowledgement that "
            "profiles (personal data) leave for Campaign Monitor; leave it out until then "
            "(the connection's destinations then send nothing)"
        )
    if len(problems) > found:
        return None
    assert name is not None
    assert api_key_env is not None
    return _Connection(
        name=name,
        api_key_env=api_key_env,
        client_id=client_id,
        personal_data_acknowledged=personal_data is not None,
    )


def _parse_destination(
    number: int,
    table: Mapping[str, object],
    keys: _ApiKeys,
    connections: _Connections,
    problems: list[str],
) -> Destination | None:
    """One destination, or None after recording its problems (or when its connection is
    invalid: the connection's problems say why)."""
    label = _label("destination", number, table)
    found = len(problems)
    _check_keys(label, table, DESTINATION_KEYS, REQUIRED_DESTINATION_KEYS, problems)

    def string(key: str) -> str | None:
        return _string(label, table, key, problems)

    def choice(key: str, choices: Mapping[str, _T], default: _T) -> _T:
        value = string(key)
        if value is None:
            return default
        found_choice = choices.get(value.lower())
        if found_choice is None:
            allowed = ", ".join(f'"{c}"' for c in choices.values())
            hint = did_you_mean(value.lower(), list(choices))
            problems.append(f'{label}: "{key}" must be one of {allowed}, got {shown(value)}{hint}')
            return default
        return found_choice

    name = string("name")
    if name is not None and not _NAME_RE.fullmatch(name):
        problems.append(
            f'{label}: "name" {shown(name)} is not usable as a metric label: use 1 to 64 '
            'letters, digits, "-", "_" or "."'
        )
    segment_ids = _segments(label, table, string, problems)
    list_id = _hex_id(label, "list_id", "ListID", string("list_id"), problems)
    email_field = string("email_field")
    name_field = string("name_field")
    removal = choice("removal", _REMOVALS, "delete")
    resubscribe = choice("resubscribe", _RESUBSCRIBES, "deleted-only")
    consent = choice("consent_to_track", _CONSENTS, "Unchanged")
    extras = choice("extras", _EXTRAS, "keep")
    all_client_lists = table.get("unsubscribe_all_client_lists", False)
    if not isinstance(all_client_lists, bool):
        problems.append(
            f'{label}: "unsubscribe_all_client_lists" must be a boolean (true or false), not '
            f"{_toml_type(all_client_lists)}"
        )

    api_key: Secret | None = None
    connection: _Connection | None = None
    api_key_env: str | None = None
    if "connection" in table and "api_key_env" in table:
        problems.append(
            f'{label}: give "connection" or "api_key_env", not both (the connection names the '
            "API key variable)"
        )
    elif "connection" in table:
        connection_name = string("connection")
        if connection_name is not None:
            connection = connections.find(connection_name, label, problems)
        if connection is not None:
            api_key_env = connection.api_key_env
            api_key = keys.get(api_key_env, connection.label)
    else:
        api_key_env = _key_variable(
            label,
            string("api_key_env") if "api_key_env" in table else DEFAULT_API_KEY_ENV,
            problems,
        )
        if api_key_env is not None:
            api_key = keys.get(api_key_env, label)

    custom_fields = _custom_fields(label, table.get("custom_fields", {}), email_field, problems)

    if len(problems) > found or api_key is None:
        return None
    # No problem recorded means every required key was found and valid.
    assert name is not None
    assert segment_ids
    assert list_id is not None
    assert email_field is not None
    assert api_key_env is not None
    return Destination(
        name=name,
        segment_ids=segment_ids,
        list_id=list_id,
        api_key_env=api_key_env,
        api_key=api_key,
        connection=None if connection is None else connection.name,
        client_id=None if connection is None else connection.client_id,
        # Without a connection: configured before the acknowledgement existed.
        personal_data_acknowledged=connection is None or connection.personal_data_acknowledged,
        email_field=email_field,
        name_field=name_field,
        removal=removal,
        resubscribe=resubscribe,
        consent_to_track=consent,
        custom_fields=custom_fields,
        unsubscribe_all_client_lists=all_client_lists is True,
        extras=extras,
    )


def _segments(
    label: str,
    table: Mapping[str, object],
    string: Callable[[str], str | None],
    problems: list[str],
) -> tuple[str, ...]:
    """The segments of a destination: ``segment_id``, or ``segment_ids`` (a non-empty array of
    strings, each once); empty after recording a problem."""
    if "segment_id" in table and "segment_ids" in table:
        problems.append(f'{label}: give "segment_id" or "segment_ids", not both')
        return ()
    if "segment_ids" not in table:
        if "segment_id" not in table:
            problems.append(f'{label}: required key "segment_id" (or "segment_ids") is missing')
            return ()
        segment = string("segment_id")
        return () if segment is None else (segment,)
    raw = table["segment_ids"]
    if not (isinstance(raw, list) and raw and all(isinstance(s, str) for s in raw)):
        problems.append(f'{label}: "segment_ids" must be a non-empty array of strings')
        return ()
    bad = [shown(s) for s in raw if not s.strip() or s != s.strip()]
    if bad:
        problems.append(
            f'{label}: "segment_ids" entries must not be empty nor start or end with spaces: '
            + ", ".join(bad)
        )
        return ()
    twice = sorted({shown(s) for s in raw if raw.count(s) > 1})
    if twice:
        problems.append(f'{label}: "segment_ids" names {", ".join(twice)} more than once')
        return ()
    return tuple(raw)


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
