"""States, claims and keys as bytes: for the embedded store, the changelogs and the repartition
topic.

Keys sort by their first part, so one segment's members (one list's addresses) are one prefix
scan: a 2-byte big-endian length, the first part in UTF-8, then the second part in UTF-8 (a
length prefix, not a separator: ids may contain any character).

Values are a format version byte (`FORMAT_VERSION`) followed by a MessagePack array. A reader
refuses a version byte it does not know (`StateFormatError`) rather than guess: state written
by a newer release must not be misread by an older one during a rolling upgrade. Field maps are
encoded with sorted keys, so equal fields give equal bytes and `fingerprint` is stable across
processes and releases (it is not Python's salted ``hash``).

`encode_address` returns None when a state holds nothing worth keeping: the caller deletes the
key and writes a tombstone to the changelog. Under the rules of this package that only happens
to a state that was never written (releases and what was applied are kept; see the tables).

Stage 2's hot path reads and writes an address state as typed rows (`AddressRows`,
`HoldingRow`: msgspec structs decoded and encoded in one C pass, the same bytes as
`encode_address` writes), without building the model's objects; `decode_address` and
`encode_address` are the model's view of the same values.
"""

from __future__ import annotations

import functools
import hashlib
from typing import Any, Final

import msgspec

from consumer.membership.model import (
    AddressState,
    Applied,
    Claim,
    Fields,
    Holding,
    Member,
    MemberState,
)

__all__ = [
    "FORMAT_VERSION",
    "AddressRows",
    "HoldingRow",
    "MemberRow",
    "StateFormatError",
    "address_key",
    "claim_value",
    "decode_address",
    "decode_address_rows",
    "decode_claim",
    "decode_claim_row",
    "decode_member",
    "decode_member_row",
    "encode_address",
    "encode_address_rows",
    "encode_claim",
    "encode_member",
    "encode_member_row",
    "fingerprint",
    "list_prefix",
    "member_key",
    "segment_prefix",
    "split_key",
]

FORMAT_VERSION: Final = 1
_HEADER: Final = bytes([FORMAT_VERSION])
_MAX_PART: Final = 0xFFFF

_pack = msgspec.msgpack.Encoder(order="sorted").encode
_unpack = msgspec.msgpack.Decoder().decode
# What a damaged or foreign value raises while being unpacked and taken apart.
_MALFORMED = (msgspec.DecodeError, ValueError, TypeError, IndexError, KeyError)


class StateFormatError(ValueError):
    """Bytes this release cannot read: damaged, or written in an unknown format version.

    Fatal for the partition being restored: skipping the record would silently lose state.
    The message names the format, never the content.
    """


class HoldingRow(msgspec.Struct, array_like=True, gc=False):
    """One member's latest claim at one (list, address), as encoded: ``[segment, profile,
    occurred_at_ms, offset, holds, fields | nil, input partition]`` (a claim's value, and a row
    of an address state). ``fields`` is None when empty. Not tracked by the cyclic GC: it
    holds no container that could refer back to it."""

    segment: str
    profile: str
    occurred_at_ms: int
    offset: int
    holds: bool
    fields: dict[str, Any] | None
    partition: int

    def __repr__(self) -> str:  # personal data (the profile, its fields) stays out
        return f"HoldingRow(holds={self.holds}, partition={self.partition})"


class AddressRows(msgspec.Struct, array_like=True, gc=False):
    """Stage 2's value as encoded (see `encode_address`); ``holders`` sorted by member."""

    revision: int
    applied: Applied
    applied_fingerprint: bytes
    holders: list[HoldingRow]
    removed_by_sync: bool = False

    def __repr__(self) -> str:  # the holders carry personal data
        return f"AddressRows(revision={self.revision}, applied={self.applied!r})"


class MemberRow(msgspec.Struct, array_like=True, gc=False):
    """Stage 1's value as encoded (see `encode_member`)."""

    in_segment: bool
    occurred_at_ms: int
    offset: int
    address: str | None
    fields: dict[str, Any] | None

    def __repr__(self) -> str:  # the address and fields are personal data
        return f"MemberRow(in_segment={self.in_segment})"


_claim_row = msgspec.msgpack.Decoder(HoldingRow).decode
_member_row = msgspec.msgpack.Decoder(MemberRow).decode
_address_rows = msgspec.msgpack.Decoder(AddressRows).decode


# --- keys -------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=4096)  # segment and list ids: a few, met for every key
def _prefix(first: str) -> bytes:
    raw = first.encode()
    if len(raw) > _MAX_PART:
        raise ValueError(f"a key part is limited to {_MAX_PART} bytes, got {len(raw)}")
    return len(raw).to_bytes(2, "big") + raw


def segment_prefix(segment_id: str) -> bytes:
    """The prefix of every `member_key` of one segment."""
    return _prefix(segment_id)


def member_key(segment_id: str, profile_id: str) -> bytes:
    """Stage 1's key of one (segment, profile)."""
    return _prefix(segment_id) + profile_id.encode()


def list_prefix(list_id: str) -> bytes:
    """The prefix of every `address_key` of one list."""
    return _prefix(list_id)


def address_key(list_id: str, address: str) -> bytes:
    """Stage 2's key of one (list, address); also the repartition topic's record key."""
    return _prefix(list_id) + address.encode()


def split_key(key: bytes) -> tuple[str, str]:
    """The two parts of a `member_key` or `address_key`."""
    try:
        size = int.from_bytes(key[:2], "big")
        if len(key) < 2 + size:
            raise ValueError("key shorter than its prefix says")
        return key[2 : 2 + size].decode(), key[2 + size :].decode()
    except ValueError as exc:  # UnicodeDecodeError is a ValueError
        raise StateFormatError("malformed state key") from exc


# --- values -----------------------------------------------------------------------------------


def fingerprint(fields: Fields) -> bytes:
    """8 bytes that change when ``fields`` do (BLAKE2b of their canonical encoding)."""
    return hashlib.blake2b(_pack(fields), digest_size=8).digest()


def _body(raw: bytes, what: str) -> Any:
    """The unpacked MessagePack after the version byte (Any: its shape is checked by the
    caller, which takes it apart inside ``_MALFORMED``)."""
    if raw[:1] != _HEADER:
        found = raw[0] if raw else "none"
        raise StateFormatError(f"{what}: unknown format version {found} (expected 1)")
    return _unpack(raw[1:])


def encode_member(state: MemberState) -> bytes:
    """Stage 1's value: ``[in, occurred_at_ms, offset, address | nil, fields | nil]``."""
    occurred_at_ms, offset = state.version
    return encode_member_row(state.in_segment, occurred_at_ms, offset, state.address, state.fields)


def encode_member_row(
    in_segment: bool, occurred_at_ms: int, offset: int, address: str | None, fields: Fields
) -> bytes:
    """`encode_member` of its parts (stage 1's hot path: no `MemberState` made)."""
    return _HEADER + _pack([in_segment, occurred_at_ms, offset, address, fields or None])


def decode_member_row(raw: bytes) -> MemberRow:
    """`decode_member` as a row (stage 1's hot path)."""
    if raw[:1] != _HEADER:
        _body(raw, "member state")  # raises the format error
    try:
        return _member_row(memoryview(raw)[1:])
    except _MALFORMED as exc:
        raise StateFormatError("member state: malformed value") from exc


def decode_member(raw: bytes) -> MemberState:
    try:
        in_segment, occurred_at_ms, offset, address, fields = _body(raw, "member state")
        return MemberState(bool(in_segment), (occurred_at_ms, offset), address, fields or {})
    except StateFormatError:
        raise
    except _MALFORMED as exc:
        raise StateFormatError("member state: malformed value") from exc


def _holding_row(member: Member, holding: Holding) -> list[object]:
    occurred_at_ms, offset = holding.version
    return [
        *member,
        occurred_at_ms,
        offset,
        holding.holds,
        holding.fields or None,
        holding.partition,
    ]


def encode_address(state: AddressState) -> bytes | None:
    """Stage 2's value, or None (a tombstone) when the state holds nothing:
    ``[revision, applied, applied_fingerprint, [[segment, profile, occurred_at_ms, offset,
    holds, fields | nil, input partition], …], removed_by_sync]`` with the members sorted
    (equal states, equal bytes). A value without the last element (written before it existed)
    reads as not removed by the sync."""
    if not state.holders and state.applied is Applied.NOTHING and not state.revision:
        return None
    rows = [_holding_row(member, state.holders[member]) for member in sorted(state.holders)]
    return _HEADER + _pack(
        [
            state.revision,
            int(state.applied),
            state.applied_fingerprint,
            rows,
            state.removed_by_sync,
        ]
    )


def decode_address_rows(raw: bytes) -> AddressRows:
    """`decode_address` as rows (stage 2's hot path)."""
    if raw[:1] != _HEADER:
        _body(raw, "address state")  # raises the format error
    try:
        return _address_rows(memoryview(raw)[1:])
    except _MALFORMED as exc:
        raise StateFormatError("address state: malformed value") from exc


def encode_address_rows(rows: AddressRows) -> bytes:
    """`encode_address` of rows: the same bytes for the same state (rows never hold nothing:
    no tombstone here)."""
    return _HEADER + _pack(rows)


def decode_address(raw: bytes) -> AddressState:
    try:
        revision, applied, applied_fingerprint, rows, *rest = _body(raw, "address state")
        removed_by_sync = bool(rest[0]) if rest else False
        holders = {
            (segment, profile): Holding(
                (occurred_at_ms, offset), bool(holds), fields or {}, partition
            )
            for segment, profile, occurred_at_ms, offset, holds, fields, partition in rows
        }
        return AddressState(
            holders, revision, Applied(applied), applied_fingerprint, removed_by_sync
        )
    except StateFormatError:
        raise
    except _MALFORMED as exc:
        raise StateFormatError("address state: malformed value") from exc


def encode_claim(claim: Claim) -> tuple[bytes, bytes]:
    """The repartition record of a claim: (`address_key`, value)."""
    segment, profile = claim.member
    occurred_at_ms, offset = claim.version
    value = claim_value(
        segment, profile, occurred_at_ms, offset, claim.holds, claim.fields, claim.partition
    )
    return address_key(claim.list_id, claim.address), value


def claim_value(
    segment: str,
    profile: str,
    occurred_at_ms: int,
    offset: int,
    holds: bool,
    fields: Fields,
    partition: int,
) -> bytes:
    """A claim's value (`encode_claim`) of its parts: a `HoldingRow`, ``fields`` nil when
    empty (stage 1's hot path: no `Claim` made)."""
    return _HEADER + _pack(
        [segment, profile, occurred_at_ms, offset, holds, fields or None, partition]
    )


def decode_claim_row(value: bytes) -> HoldingRow:
    """A claim's value as a row (stage 2's hot path; the key says the list and address)."""
    if value[:1] != _HEADER:
        _body(value, "claim")  # raises the format error
    try:
        return _claim_row(memoryview(value)[1:])
    except _MALFORMED as exc:
        raise StateFormatError("claim: malformed value") from exc


def decode_claim(key: bytes, value: bytes) -> Claim:
    list_id, address = split_key(key)
    try:
        segment, profile, occurred_at_ms, offset, holds, fields, partition = _body(value, "claim")
        return Claim(
            list_id,
            address,
            (segment, profile),
            (occurred_at_ms, offset),
            bool(holds),
            fields or {},
            partition,
        )
    except StateFormatError:
        raise
    except _MALFORMED as exc:
        raise StateFormatError("claim: malformed value") from exc
