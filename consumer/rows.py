"""What a buffered change carries (`Wanted`: a desired state of the membership state), what it
takes in memory (`payload_bytes`, for CMSYNC_MAX_PENDING_BYTES), and what the flusher makes of
it: the import row (`row_of`, its values coerced to the list's field types when they are
known, or `Unfit`), the event time (`event_time_ms`, for freshness) and, when Campaign Monitor
refuses it, the state's view of it (`view_of`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from sys import getsizeof
from typing import Final

import orjson

from consumer.buffer import Entry
from consumer.campaign_monitor.client import CustomField, SubscriberRow
from consumer.events import ProfileValue
from consumer.fieldtypes import FieldType, Unfit, coerce, field_of
from consumer.membership.model import Desired
from consumer.settings import Destination

__all__ = [
    "ORIGIN_BYTES",
    "WANTED_BYTES",
    "Wanted",
    "build_row",
    "event_time_ms",
    "payload_bytes",
    "row_of",
    "view_of",
    "wanted",
]

#: The fixed part of a payload: the `Wanted` and its `Desired` (with the ints they hold);
#: `ORIGIN_BYTES` more when the desired state has an `Origin` (the tuple and its offset).
#: Measured with tracemalloc (tests/test_buffer.py, ``test_entry_bytes_match_tracemalloc``:
#: 228 and 104 bytes on CPython 3.11), not guessed.
WANTED_BYTES: Final = 232
ORIGIN_BYTES: Final = 104


@dataclass(frozen=True, slots=True)
class Wanted:
    """The payload of a buffered change: the desired state of its (list, address), and the
    event time of the change that made it (freshness; for a state owed after a restore, the
    time it was restored)."""

    desired: Desired = field(repr=False)
    occurred_at_ms: int


def payload_bytes(desired: Desired) -> int:
    """Estimated bytes a buffered change of ``desired`` keeps alive beyond the buffer's own
    objects: `WANTED_BYTES`, the strings it holds (address, list id, the profile id of its
    origin) and its fields (the dict, each key and each value; a multi-select's list and its
    items), and the origin. Cheap: ``sys.getsizeof`` is O(1) for these types, one call per string.

    Counted even when shared with another object (a field name decoded once and cached by the
    decoder): an estimate that errs on the high side keeps the bound a bound."""
    fields = desired.fields
    size = WANTED_BYTES + getsizeof(desired.address) + getsizeof(desired.list_id)
    origin = desired.origin
    if origin is not None:
        size += ORIGIN_BYTES + getsizeof(origin.profile_id)
    size += getsizeof(fields)
    if not fields:
        return size
    size += sum(map(getsizeof, fields))  # the keys
    for value in fields.values():
        if isinstance(value, str):  # the common case first
            size += getsizeof(value)
        elif isinstance(value, list):
            size += getsizeof(value) + sum(map(getsizeof, value))
        elif value is not None and value is not True and value is not False:
            size += getsizeof(value)
    return size


def wanted(entry: Entry) -> Wanted:
    payload = entry.change.payload
    if not isinstance(payload, Wanted):
        raise TypeError(f"a buffered change carries a Wanted, not {type(payload).__name__}")
    return payload


def event_time_ms(entry: Entry) -> int:
    """When the change behind a buffered entry happened (epoch milliseconds)."""
    return wanted(entry).occurred_at_ms


def row_of(
    destination: Destination, entry: Entry, types: Mapping[str, FieldType] | None = None
) -> SubscriberRow | Unfit:
    """The import row of a buffered add (`build_row`)."""
    return build_row(destination, entry.change.key, wanted(entry).desired.fields, types)


def view_of(entry: Entry, topic: str) -> tuple[bytes | None, bytes, str]:
    """A dead letter's (key, value, source) from the state alone: the profile id as the key
    (the input's key), a JSON object with the list, the revision and the profile as the state
    holds it (the address under "email", the mapped fields), and where the change behind it
    is in ``topic`` (the input). The service reads the input record back instead, while the
    input still has it (`consumer.state.MembershipState.original`)."""
    desired = wanted(entry).desired
    profile = {**desired.fields, "email": desired.address}
    value = orjson.dumps(
        {"list_id": desired.list_id, "revision": desired.revision, "profile": profile}
    )
    origin = desired.origin
    if origin is None:  # a removal: nobody holds the address any more
        return None, value, f"{topic}/-/-"
    return origin.profile_id.encode(), value, f"{topic}/{origin.partition}/{origin.offset}"


def build_row(
    destination: Destination,
    address: str,
    profile: Mapping[str, ProfileValue],
    types: Mapping[str, FieldType] | None = None,
) -> SubscriberRow | Unfit:
    """Map a profile to an import row: name and custom fields per the destination's mapping.

    A profile field that is absent leaves the Campaign Monitor field as it is; `null` (or an
    empty multi-select) clears it; an array of strings is a multi-select (the key repeats).

    With `types` (the list's fields, `consumer.fieldtypes.field_types`) every value is coerced
    to its field's type and sent under the key as the list spells it; the first value that
    does not fit makes the row `Unfit` (its reason names the key and type, not the value). A
    key `types` lacks (the destination is held before that could happen) is sent untyped.
    Without `types` values go as they are, in their text form.
    """
    name_value = profile.get(destination.name_field) if destination.name_field else None
    fields: list[CustomField] = []
    for cm_key, profile_field in destination.custom_fields:
        if profile_field not in profile:
            continue
        value = profile[profile_field]
        field_type = None if types is None else field_of(cm_key, types)
        if field_type is not None:
            coerced = coerce(value, field_type)
            if isinstance(coerced, Unfit):
                return coerced
            key = field_type.key
            if coerced == "":
                fields.append(CustomField(key, "", clear=True))
            elif isinstance(coerced, list):
                fields.extend(CustomField(key, option) for option in coerced)
            else:
                fields.append(CustomField(key, coerced))
        elif value is None or value == []:
            fields.append(CustomField(cm_key, "", clear=True))
        elif isinstance(value, list):
            fields.extend(CustomField(cm_key, str(item)) for item in value)
        elif isinstance(value, bool):
            fields.append(CustomField(cm_key, "true" if value else "false"))
        else:
            fields.append(CustomField(cm_key, str(value)))
    return SubscriberRow(
        email=address,
        name=name_value if isinstance(name_value, str) else None,
        custom_fields=tuple(fields),
        consent_to_track=destination.consent_to_track,
    )
