"""Environment variables: how one ``CMSYNC_*`` variable is declared, read and checked.

`consumer.settings` declares every variable once, as a field of `Settings` or `KafkaSettings`
(`setting(...)`), with its parser, default, help text and whether it is secret; this module is
the machinery those declarations run on. It knows no variable by name.

Conventions, stated once:

- A variable set to an empty (or blank) string counts as unset, so its default applies. This is
  what Kubernetes and shell templates produce when a value is "left out".
- A parser takes the stripped text and returns the value, or raises `ValueError` whose message
  completes the sentence "NAME …" (e.g. "must be a whole number >= 1, got 'x'"), or "NAME: …"
  when the message starts with a colon.
- A secret variable ``X`` may instead be given as ``X_FILE``: the path of a file holding it (a
  mounted Kubernetes Secret). Setting both is an error; the file's trailing newline is dropped;
  a missing, unreadable or empty file is an error that names the variable and the path, never
  the content. A secret read from the environment keeps its spaces (a password may have some).
- Messages never contain a secret's value.

This module is pure apart from reading the secret files it is told about.
"""

from __future__ import annotations

import difflib
import hmac
import math
import re
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import Field, dataclass, field, fields, replace
from typing import Any, Final, TypeVar, cast
from urllib.parse import urlsplit

_T = TypeVar("_T")

#: Suffix of the variable that names a file holding a secret variable's value.
FILE_SUFFIX: Final = "_FILE"
_METADATA_KEY: Final = "cmsync.variable"
_HOST_RE: Final = re.compile(r"\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+")


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
class Variable:
    """One environment variable: the whole of what the code, ``--help`` and check-config know."""

    name: str
    parse: Callable[[str], object]
    default: str | None  # spelled as in the environment and parsed like a set value
    meaning: str
    attr: str | None = None  # dotted path of the value in `Settings`; None: read elsewhere
    required: bool = False
    secret: bool = False


def setting(
    name: str,
    parse: Callable[[str], _T],
    default: str | None,
    meaning: str,
    *,
    required: bool = False,
    secret: bool = False,
) -> _T:
    """Declare a settings dataclass field read from the variable `name`.

    Typed as returning what `parse` returns so that mypy checks the parser against the field's
    annotation; it really returns a `dataclasses.field` without default carrying the
    declaration (the dataclass must be ``kw_only``). Read with `declared` and `read_fields`.
    """
    variable = Variable(name, parse, default, meaning, required=required, secret=secret)
    return cast(_T, field(metadata={_METADATA_KEY: variable}))


def declared(cls: type, prefix: str = "") -> tuple[Variable, ...]:
    """The variables declared by the fields of the dataclass `cls`, in field order, each with
    its `attr` (``prefix`` + field name)."""
    found: list[Variable] = []
    for f in fields(cls):
        variable = _variable_of(f)
        if variable is not None:
            found.append(replace(variable, attr=prefix + f.name))
    return tuple(found)


def _variable_of(f: Field[Any]) -> Variable | None:
    variable = f.metadata.get(_METADATA_KEY)
    return variable if isinstance(variable, Variable) else None


def is_set(value: str | None) -> bool:
    return value is not None and value.strip() != ""


def shown(value: str) -> str:
    """A non-secret value quoted for a message, cut short so a message stays one line."""
    return repr(value if len(value) <= 40 else value[:37] + "...")


def did_you_mean(word: str, candidates: Sequence[str]) -> str:
    close = difflib.get_close_matches(word, candidates, n=1, cutoff=0.6)
    return f' (did you mean "{close[0]}"?)' if close else ""


# ---------------------------------------------------------------------------------------------
# Reading


def read_secret(env: Mapping[str, str], name: str, problems: list[str]) -> str | None:
    """The value of secret variable `name` from the environment or from ``name_FILE``.

    None when neither is set, or after recording a problem (both set; unreadable file).
    """
    value = env.get(name)
    file_name = name + FILE_SUFFIX
    path = env.get(file_name)
    if is_set(path):
        assert path is not None
        if is_set(value):
            problems.append(f"{name} and {file_name} are both set: set only one")
            return None
        return _read_secret_file(file_name, path.strip(), problems)
    return value if is_set(value) else None


def read_text_file(where: str, path: str, problems: list[str]) -> str | None:
    """The UTF-8 text of the file at `path` (a leading byte-order mark dropped), or None with
    the reason recorded in `problems`, prefixed by `where` (what names the file). The reason
    never quotes the file's content: it may be a secret."""
    try:
        with open(path, encoding="utf-8-sig") as file:
            return file.read()
    except FileNotFoundError:
        problems.append(f"{where}: file not found")
    except IsADirectoryError:
        problems.append(f"{where}: is a directory, not a file")
    except UnicodeDecodeError:  # the message would quote the bytes: say less
        problems.append(f"{where}: is not UTF-8 text")
    except OSError as error:
        problems.append(f"{where}: cannot be read ({error.strerror})")
    return None


def _read_secret_file(file_name: str, path: str, problems: list[str]) -> str | None:
    where = f"{file_name} ({path})"
    text = read_text_file(where, path, problems)
    if text is None:
        return None
    text = text.rstrip("\r\n")  # what `echo` and `kubectl create secret --from-file` leave
    if not text:
        problems.append(f"{where}: is empty")
        return None
    return text


def read_fields(
    cls: type, env: Mapping[str, str], problems: list[str], invalid: set[str]
) -> dict[str, Any]:
    """``{field: value}`` for every declared field of `cls`: parsed, else the parsed default,
    else None. Problems are recorded, not raised; a variable whose value was refused is added
    to `invalid` and its field holds None (the caller raises before such a value escapes)."""
    values: dict[str, Any] = {}
    for f in fields(cls):
        variable = _variable_of(f)
        if variable is None:
            continue
        found = len(problems)
        values[f.name] = _read(variable, env, problems)
        if len(problems) > found:
            invalid.add(variable.name)
    return values


def _read(variable: Variable, env: Mapping[str, str], problems: list[str]) -> object:
    if variable.secret:
        found = len(problems)
        text = read_secret(env, variable.name, problems)
        if len(problems) > found:
            return None
    else:
        value = env.get(variable.name)
        text = value.strip() if value is not None and is_set(value) else None
    if text is None:
        if variable.required:
            problems.append(f"{variable.name} is required ({variable.meaning}) but is not set")
            return None
        text = variable.default
    if text is None:
        return None
    try:
        return variable.parse(text)
    except ValueError as error:
        message = str(error)
        problems.append(f"{variable.name}{'' if message.startswith(':') else ' '}{message}")
        return None


def unknown_variables(
    env: Iterable[str], known: Collection[str], reserved: Sequence[str], prefix: str
) -> list[str]:
    """One problem per name of `env` that starts with `prefix` and is neither `known` nor
    reserved (a reserved entry ``R`` covers ``R`` and ``R_…``), with the nearest known name."""
    problems: list[str] = []
    stems = {name.removeprefix(prefix): name for name in known if name.startswith(prefix)}
    for name in sorted(env):
        if not name.startswith(prefix) or name in known:
            continue
        if any(name == r or name.startswith(r + "_") for r in reserved):
            continue
        close = difflib.get_close_matches(name.removeprefix(prefix), list(stems), n=1, cutoff=0.6)
        if close:
            problems.append(f"unknown variable {name}; did you mean {stems[close[0]]}?")
        else:
            problems.append(
                f"unknown variable {name}: cmsync reads no such setting "
                "(`cmsync check-config --help` lists them)"
            )
    return problems


# ---------------------------------------------------------------------------------------------
# Parsers: text in, value out, or ValueError("must …")


def text(value: str) -> str:
    return value


def whole(minimum: int, maximum: int | None = None) -> Callable[[str], int]:
    bounds = f"between {minimum} and {maximum}" if maximum is not None else f">= {minimum}"

    def parse(value: str) -> int:
        try:
            number = int(value)
        except ValueError:
            raise ValueError(f"must be a whole number {bounds}, got {shown(value)}") from None
        if number < minimum or (maximum is not None and number > maximum):
            raise ValueError(f"must be {bounds}, got {number}")
        return number

    return parse


def positive(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise ValueError(f"must be a number greater than 0, got {shown(value)}") from None
    if not math.isfinite(number) or number <= 0:
        raise ValueError(f"must be a finite number greater than 0, got {value}")
    return number


def one_of(*choices: str) -> Callable[[str], str]:
    """One of `choices`, matched case-insensitively, returned in its canonical spelling."""
    canonical = {c.lower(): c for c in choices}

    def parse(value: str) -> str:
        found = canonical.get(value.lower())
        if found is None:
            close = difflib.get_close_matches(value.lower(), list(canonical), n=1, cutoff=0.6)
            hint = f' (did you mean "{canonical[close[0]]}"?)' if close else ""
            raise ValueError(f"must be one of {', '.join(choices)}, got {shown(value)}{hint}")
        return found

    return parse


def host_ports(value: str) -> tuple[str, ...]:
    """A comma-separated ``host:port`` list (IPv6 hosts in brackets); blanks between commas
    are dropped."""
    entries = tuple(e.strip() for e in value.split(",") if e.strip())
    if not entries:
        raise ValueError("lists no host:port")
    for entry in entries:
        host, colon, port = entry.rpartition(":")
        if not colon or not _HOST_RE.fullmatch(host):
            raise ValueError(f": {shown(entry)} is not host:port")
        if not (port.isascii() and port.isdigit() and 1 <= int(port) <= 65535):
            raise ValueError(f": the port of {shown(entry)} must be a number between 1 and 65535")
    return entries


def http_url(value: str) -> str:
    """An http(s) URL with a host and no credentials, query or fragment; trailing ``/``
    dropped. The value is never echoed: a mistaken URL may carry credentials."""
    try:
        parts = urlsplit(value)
    except ValueError:
        raise ValueError("is not a valid URL") from None
    try:
        port_ok = parts.port is None or parts.port > 0
    except ValueError:  # out of range or not a number
        port_ok = False
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(
            "must be an http:// or https:// URL with a host "
            "(like https://api.createsend.com/api/v3.3)"
        )
    if not port_ok:
        raise ValueError("has an invalid port")
    if parts.username is not None or parts.password is not None:
        raise ValueError("must not contain a user name or password")
    if parts.query or parts.fragment:
        raise ValueError("must not contain a query (?…) or fragment (#…)")
    return value.rstrip("/")
