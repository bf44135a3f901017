"""Campaign Monitor custom field types, and the coercion of a profile value to what a field holds.

Campaign Monitor silently drops a custom field value its field cannot hold (a date in another
format, a number with a unit, a multi-select value that is no option), so the sync checks and
coerces every value before sending it, and the caller dead-letters what does not fit, with the
reason. `field_types` reads a list's ``GET /lists/{listid}/customfields.json`` answer;
`coerce` turns one profile value into the value to send, or `Unfit`; `missing_keys` names the
mapped keys the list lacks (a value for such a key is ignored by Campaign Monitor without an
error).

Rules, stated once:

- ``None`` (and an empty array) clears the field: the value is ``""``.
- Every value sent, and every option of a multi-select, is at most `MAX_VALUE_LENGTH`
  characters.
- Text (and Country, USState, checked no further): a string as it is; a number in plain
  decimal; a boolean as ``true``/``false``. An array does not fit.
- Number: an int, a finite float, or a string that is a finite decimal number (spaces around
  it allowed, an exponent allowed), written in plain decimal (``1e3`` is ``1000``). A boolean
  does not fit: it is no number, whatever Python says.
- Date: ``YYYY-MM-DD``, ``YYYY/MM/DD`` or an RFC 3339 timestamp (its date as written, not
  moved to UTC: ``1990-05-01T00:30:00+02:00`` is 1990/05/01), written ``YYYY/MM/DD``, from
  `EARLIEST_DATE` to `LATEST_DATE` inclusive.
- MultiSelectOne: one of the field's options, compared without regard to letter case and
  surrounding spaces, written as the option is declared; an array of one value is that value.
- MultiSelectMany: an array of options, or one option; each must be an option; written as
  declared, each once, in the order given.
- A scalar offered to a multi-select is compared as its Text form (``1`` matches option ``"1"``).

Keys are compared as Campaign Monitor compares them: brackets removed (`plain_key`) and without
regard to letter case (`key_of`): a mapped ``city`` is the list's ``[City]``. `field_types` is
keyed that way; `field_of` finds a mapped key's field, whose `FieldType.key` is the list's own
spelling (what to send).

An `Unfit` reason names the field's key and type, never the value (it is personal data), so it
may go into a dead letter's detail and a log line.

Pure: no I/O, no clock.
"""

from __future__ import annotations

import datetime
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Final, Literal, get_args

from consumer.membership.model import FieldValue

__all__ = [
    "EARLIEST_DATE",
    "LATEST_DATE",
    "MAX_VALUE_LENGTH",
    "DataType",
    "FieldType",
    "FieldValue",
    "Unfit",
    "coerce",
    "field_of",
    "field_types",
    "key_of",
    "missing_keys",
    "plain_key",
]

DataType = Literal[
    "Text", "Number", "Date", "MultiSelectOne", "MultiSelectMany", "Country", "USState"
]
_DATA_TYPES: Final[dict[str, DataType]] = {t.casefold(): t for t in get_args(DataType)}

#: The longest value Campaign Monitor keeps in a custom field (characters).
MAX_VALUE_LENGTH: Final = 250
#: The range of a Date field, inclusive (Campaign Monitor's documented limits).
EARLIEST_DATE: Final = datetime.date(1900, 1, 1)
LATEST_DATE: Final = datetime.date(2076, 6, 6)

_DATE_RE: Final = re.compile(r"([0-9]{4})([-/])([0-9]{2})\2([0-9]{2})")
_TIMESTAMP_RE: Final = re.compile(
    r"([0-9]{4})-([0-9]{2})-([0-9]{2})[Tt ]([0-9]{2}):([0-9]{2}):([0-9]{2})(?:\.[0-9]+)?"
    r"(?:[Zz]|[+-]([0-9]{2}):([0-9]{2}))"
)
_NUMBER_RE: Final = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
#: Beyond this decimal exponent a plain decimal is longer than any value Campaign Monitor keeps
#: (and formatting ``1e999999999`` would build a gigabyte string).
_MAX_EXPONENT: Final = MAX_VALUE_LENGTH
#: An int of more bits has more digits than any value Campaign Monitor keeps (and ``str`` of
#: one beyond 4300 digits raises).
_MAX_INT_BITS: Final = 900


@dataclass(frozen=True, slots=True)
class FieldType:
    """One custom field of a list: its key without brackets as the list spells it, its type,
    and for a multi-select its options as declared."""

    key: str
    data_type: DataType
    options: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Unfit:
    """A value the field cannot hold. `reason` names the field and its type and says what the
    field takes; it never contains the value."""

    reason: str


def plain_key(key: str) -> str:
    """A custom field key without its brackets: ``[City]`` and ``City`` are ``City``."""
    key = key.strip()
    if key.startswith("[") and key.endswith("]"):
        return key[1:-1].strip()
    return key


def key_of(key: str) -> str:
    """How a custom field key is compared: without brackets, letter case folded
    (``[City]``, ``city`` and ``CITY`` are one key, as Campaign Monitor's keys are)."""
    return plain_key(key).casefold()


def field_of(key: str, types: Mapping[str, FieldType]) -> FieldType | None:
    """The field of `types` (a list's `field_types`) that the mapped `key` names, or None."""
    return types.get(key_of(key))


def field_types(listing: Sequence[Mapping[str, Any]]) -> dict[str, FieldType]:
    """The fields of a list by `key_of` their key, from the customfields listing
    (``[{"FieldName", "Key": "[age]", "DataType", "FieldOptions": [...], ...}]``); each
    `FieldType.key` is spelled as the list spells it, brackets removed.

    Data types are matched without regard to letter case. Raises `ValueError` (naming the key,
    never a value) on an entry without a string ``Key`` or with a ``DataType`` this module does
    not know: the caller cannot check values against a field it cannot read.
    """
    fields: dict[str, FieldType] = {}
    for number, entry in enumerate(listing, start=1):
        raw_key = entry.get("Key")
        if not isinstance(raw_key, str) or not plain_key(raw_key):
            raise ValueError(f"custom field #{number} of the listing has no Key")
        key = plain_key(raw_key)
        raw_type = entry.get("DataType")
        data_type = _DATA_TYPES.get(raw_type.casefold()) if isinstance(raw_type, str) else None
        if data_type is None:
            known = ", ".join(get_args(DataType))
            raise ValueError(
                f'custom field "{key}" has a DataType that is not one of {known}: '
                f"{str(raw_type)[:40]!r}"
            )
        raw_options = entry.get("FieldOptions") or ()
        options = tuple(o for o in raw_options if isinstance(o, str))
        multi = data_type in ("MultiSelectOne", "MultiSelectMany")
        fields[key_of(key)] = FieldType(key, data_type, options if multi else ())
    return fields


def missing_keys(mapped: Iterable[str], types: Mapping[str, FieldType]) -> list[str]:
    """The keys of `mapped` (Campaign Monitor keys, with or without brackets, in any letter
    case) that `types` (a list's `field_types`) lacks, as they were given, in order, each
    once."""
    missing: list[str] = []
    for key in mapped:
        if field_of(key, types) is None and key not in missing:
            missing.append(key)
    return missing


def coerce(value: FieldValue, field: FieldType) -> str | list[str] | Unfit:
    """The value to send for `value` in `field`: a string (``""`` clears the field), a list of
    options for a MultiSelectMany, or `Unfit`. Never raises (module docstring: the rules)."""
    if value is None or (isinstance(value, list) and not value):
        return ""
    match field.data_type:
        case "Text" | "Country" | "USState":
            coerced: str | list[str] | Unfit = _text(value, field)
        case "Number":
            coerced = _number(value, field)
        case "Date":
            coerced = _date(value, field)
        case "MultiSelectOne":
            coerced = _one_option(value, field)
        case "MultiSelectMany":
            coerced = _options(value, field)
    return coerced


def _unfit(field: FieldType, takes: str) -> Unfit:
    return Unfit(f'{field.data_type} field "{field.key}" takes {takes}')


def _too_long(field: FieldType) -> Unfit:
    return Unfit(
        f'{field.data_type} field "{field.key}" takes at most {MAX_VALUE_LENGTH} characters '
        "and the value is longer"
    )


def _plain_decimal(number: Decimal) -> str | None:
    """`number` (finite) in plain decimal notation, or None when that is too long to send."""
    exponent = number.adjusted()
    if exponent > _MAX_EXPONENT or exponent < -_MAX_EXPONENT:
        return None
    text = format(number, "f")
    return text if len(text) <= MAX_VALUE_LENGTH else None


def _text_of(value: str | int | float | bool) -> str | None:
    """The Text form of a scalar; None for a float that is not finite and for an int too long
    to send."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value
    if isinstance(value, int):
        return str(value) if value.bit_length() <= _MAX_INT_BITS else None
    if not math.isfinite(value):
        return None
    # repr is the shortest text that reads back as the same float; Decimal writes it plainly
    # (at most 330 characters for a float: the caller refuses what is too long).
    return format(Decimal(repr(value)), "f")


def _text(value: FieldValue, field: FieldType) -> str | Unfit:
    if isinstance(value, list) or value is None:
        return _unfit(field, "one text value, not a list")
    text = _text_of(value)
    if text is None and isinstance(value, float):
        return _unfit(field, "text, a finite number or a boolean")
    if text is None or len(text) > MAX_VALUE_LENGTH:
        return _too_long(field)
    return text


def _number(value: FieldValue, field: FieldType) -> str | Unfit:
    takes = "a finite decimal number (a number, or a string holding one; not a boolean)"
    if isinstance(value, bool | list) or value is None:
        return _unfit(field, takes)
    if isinstance(value, int):
        number = Decimal(value)  # exact however long; _plain_decimal refuses the too long
    elif isinstance(value, float):
        if not math.isfinite(value):
            return _unfit(field, takes)
        number = Decimal(repr(value))
    else:
        text = value.strip()
        # The pattern first: Decimal alone also reads "NaN", "Infinity", "1_000" and non-ASCII
        # digits, none of which Campaign Monitor takes as a number.
        if len(text) > 2 * MAX_VALUE_LENGTH or not _NUMBER_RE.fullmatch(text):
            return _unfit(field, takes)
        try:
            number = Decimal(text)
        except ArithmeticError:  # an exponent beyond Decimal's own limits: 1e99999999999999999999
            return _too_long(field)
    written = _plain_decimal(number)
    if written is None:
        return _too_long(field)
    return written


def _date(value: FieldValue, field: FieldType) -> str | Unfit:
    takes = (
        "a date as YYYY-MM-DD, YYYY/MM/DD or an RFC 3339 timestamp, from "
        f"{EARLIEST_DATE:%Y/%m/%d} to {LATEST_DATE:%Y/%m/%d}"
    )
    if not isinstance(value, str):
        return _unfit(field, takes)
    text = value.strip()
    found = _DATE_RE.fullmatch(text)
    if found is not None:
        year, month, day = found.group(1, 3, 4)
    else:
        stamp = _TIMESTAMP_RE.fullmatch(text)
        if stamp is None:
            return _unfit(field, takes)
        year, month, day, hour, minute, second, offset_h, offset_m = stamp.groups()
        # RFC 3339: a leap second may be 60; an offset is at most 23:59.
        if not (int(hour) <= 23 and int(minute) <= 59 and int(second) <= 60):
            return _unfit(field, takes)
        if offset_h is not None and not (int(offset_h) <= 23 and int(offset_m) <= 59):
            return _unfit(field, takes)
    try:
        date = datetime.date(int(year), int(month), int(day))
    except ValueError:  # a day the calendar has not (2023-02-29, month 13, year 0)
        return _unfit(field, takes)
    if not EARLIEST_DATE <= date <= LATEST_DATE:
        return _unfit(field, takes)
    return f"{date.year:04d}/{date.month:02d}/{date.day:02d}"


def _option(value: str | int | float | bool, field: FieldType) -> str | None:
    """The declared option that `value` names, or None."""
    text = _text_of(value)
    if text is None:
        return None
    wanted = text.strip().casefold()
    for option in field.options:
        if option.strip().casefold() == wanted and len(option) <= MAX_VALUE_LENGTH:
            return option
    return None


def _one_option(value: FieldValue, field: FieldType) -> str | Unfit:
    takes = f"one of its {len(field.options)} options"
    if isinstance(value, list):
        if len(value) != 1:
            return _unfit(field, takes + ", not several")
        value = value[0]
    if value is None:
        return ""
    option = _option(value, field)
    return _unfit(field, takes) if option is None else option


def _options(value: FieldValue, field: FieldType) -> list[str] | Unfit:
    if value is None:
        return []
    chosen: list[str] = []
    for item in value if isinstance(value, list) else [value]:
        option = _option(item, field)
        if option is None:
            return _unfit(field, f"options of its {len(field.options)}, each one of them")
        if option not in chosen:
            chosen.append(option)
    return chosen
