"""What a buffered change keeps of its record, and the import row rebuilt from it at flush time.

Two kinds of payload: the record itself (`Payload`, built by `payload_of`, for changes taken
from the input as they are) and `Wanted` (a desired state decided by the membership state, the
service's path). The flusher rebuilds the import row with `row_of`, reads the event time with
`event_time_ms` and, when it dead-letters a change, the key and value with `key_of` /
`value_of`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import cast

import orjson

from consumer.buffer import Entry
from consumer.campaign_monitor.client import CustomField, SubscriberRow
from consumer.events import MembershipChange, ProfileValue, decode
from consumer.membership.model import Desired
from consumer.settings import Destination

__all__ = [
    "Payload",
    "Wanted",
    "build_row",
    "event_time_ms",
    "key_of",
    "payload_of",
    "row_of",
    "value_of",
]


@dataclass(frozen=True, slots=True)
class Wanted:
    """The payload of a change decided by the membership state: the desired state of its
    (list, address), and the event time of the change that made it (freshness; for a state
    owed after a restore, the time it was restored)."""

    desired: Desired = field(repr=False)
    occurred_at_ms: int


#: What a buffer entry keeps of its event, as the change's payload: the record's original value
#: (to rebuild the row at flush time, which keeps memory per pending change small, and for the
#: dead-letter topic), and its key only when that is not the profile's id encoded in UTF-8, as
#: the contract has it: then the payload is the value alone, and the key is read back from it
#: when a dead letter needs it. Otherwise a (key, value) tuple. Bytes and a tuple of bytes are
#: objects the cyclic garbage collector does not track: hundreds of thousands of them sit in
#: the buffers, and every tracked object is traversed again at each full collection.
Payload = bytes | tuple[bytes | None, bytes]


def payload_of(key: bytes | None, value: bytes, profile_id: object) -> Payload:
    """The payload to keep for a record whose event has this profile id (hot path: no decode)."""
    if key is not None and profile_id.__class__ is str and key == profile_id.encode():
        return value
    return (key, value)


def _payload(entry: Entry) -> Payload:
    payload = entry.change.payload
    assert isinstance(payload, bytes | tuple)
    return cast(Payload, payload)


def event_time_ms(entry: Entry) -> int:
    """When the change behind a buffered entry happened (epoch milliseconds)."""
    payload = entry.change.payload
    return payload.occurred_at_ms if isinstance(payload, Wanted) else entry.change.occurred_at_ms


def value_of(entry: Entry) -> bytes:
    """The original record value of a buffered change; for a desired state, which has no one
    record behind it, a JSON object with the list, the revision and the profile as the state
    holds it (the address under "email", the mapped fields), and nothing else."""
    if isinstance(entry.change.payload, Wanted):
        desired = entry.change.payload.desired
        profile = {**desired.fields, "email": desired.address}
        return orjson.dumps(
            {"list_id": desired.list_id, "revision": desired.revision, "profile": profile}
        )
    payload = _payload(entry)
    return payload if isinstance(payload, bytes) else payload[1]


def key_of(entry: Entry) -> bytes | None:
    """The original record key of a buffered change (decodes the value when the key was the
    profile id and so was not kept); None for a desired state (it has no one record)."""
    if isinstance(entry.change.payload, Wanted):
        return None
    payload = _payload(entry)
    if isinstance(payload, tuple):
        return payload[0]
    event = decode(payload)  # decoded once already: valid
    assert isinstance(event, MembershipChange)
    profile_id = event.profile["id"]
    assert isinstance(profile_id, str)
    return profile_id.encode()


def row_of(destination: Destination, entry: Entry) -> SubscriberRow | None:
    """The import row of a buffered add, or None if its value no longer decodes (it did once,
    so this means a bug; the caller dead-letters it rather than guess)."""
    if isinstance(entry.change.payload, Wanted):
        return build_row(destination, entry.change.key, entry.change.payload.desired.fields)
    event = decode(value_of(entry))
    if not isinstance(event, MembershipChange):
        return None
    return build_row(destination, entry.change.key, event.profile)


def build_row(
    destination: Destination, address: str, profile: Mapping[str, ProfileValue]
) -> SubscriberRow:
    """Map a profile to an import row: name and custom fields per the destination's mapping.

    A profile field that is absent leaves the Campaign Monitor field as it is; `null` (or an
    empty multi-select) clears it; an array of strings is a multi-select (the key repeats).
    """
    name_value = profile.get(destination.name_field) if destination.name_field else None
    fields: list[CustomField] = []
    for cm_key, profile_field in destination.custom_fields:
        if profile_field not in profile:
            continue
        value = profile[profile_field]
        if value is None or value == []:
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
