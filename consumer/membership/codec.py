"""States, claims and keys as bytes: for the embedded store, the changelogs and the repartition
topic.

Keys sort by their first part, so one segment's members (one list's addresses) are one prefix
scan: a 2-byte big-endian length, the first part in UTF-8, then the second part in UTF-8 (a
length prefix, not a separator: ids may contain any character).

Values are a format version byte (`FORMAT_VERSION`) followed by a MessagePack array; on the
claims topic a *repair* (`cmsync reconcile`) is a MessagePack map instead (``{"repair": kind}``),
so it cannot be mistaken for a claim or a `Filled` whatever the ids. A release older than
repairs refuses one as malformed (docs/upgrade.md: every pod on this release first). A reader
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
from collections.abc import Callable
from typing import Any, Final, TypeVar

import msgspec

from consumer.membership.model import (
    AddressState,
    Applied,
    Claim,
    DriftFound,
    Fields,
    Filled,
    Holding,
    Member,
    MemberState,
    Repair,
)

__all__ = [
    "BACKFILL_PREFIX",
    "FORMAT_VERSION",
    "META_PREFIX",
    "AddressRows",
    "HoldingRow",
    "MemberRow",
    "StateFormatError",
    "address_key",
    "backfill_key",
    "claim_value",
    "decode_address",
    "decode_address_rows",
    "decode_backfill",
    "decode_claim",
    "decode_claim_row",
    "decode_claims_record",
    "decode_fill",
    "decode_member",
    "decode_member_row",
    "decode_routes",
    "encode_address",
    "encode_address_rows",
    "encode_backfill",
    "encode_claim",
    "encode_drift_found",
    "encode_fill",
    "encode_filled",
    "encode_member",
    "encode_member_row",
    "encode_repair",
    "encode_routes",
    "fill_key",
    "fingerprint",
    "is_claim_value",
    "list_prefix",
    "member_key",
    "routes_key",
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


_Row = TypeVar("_Row")
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


#: The first bytes of the stores' own bookkeeping keys (backfill progress, the routes a store
#: was last fitted to): a length prefix no state key has (identifiers are far shorter than
#: 0xFFFF bytes), so they sort after every state and no prefix scan of a segment or a list
#: meets them.
META_PREFIX: Final = b"\xff\xff"
BACKFILL_PREFIX: Final = META_PREFIX + b"backfill"
_ROUTES_KEY: Final = META_PREFIX + b"routes"
_FILL_PREFIX: Final = META_PREFIX + b"filled"


def backfill_key(segment_id: str, list_id: str) -> bytes:
    """Stage 1's record of how far the backfill of ``list_id`` from ``segment_id`` went."""
    return BACKFILL_PREFIX + _prefix(segment_id) + list_id.encode()


def fill_key(list_id: str) -> bytes:
    """Stage 2's record of which backfills of ``list_id`` completed (`Filled`)."""
    return _FILL_PREFIX + _prefix(list_id)


def routes_key() -> bytes:
    """Stage 2's record of which segments feed which list, as the store was last fitted."""
    return _ROUTES_KEY


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


def _typed(raw: bytes, what: str, decode: Callable[[memoryview], _Row]) -> _Row:
    """A value decoded straight into its typed rows (the hot paths), a wrong version byte or
    a damaged value raising `StateFormatError` as `_body` does."""
    if raw[:1] != _HEADER:
        _body(raw, what)  # raises the format error
    try:
        return decode(memoryview(raw)[1:])
    except _MALFORMED as exc:
        raise StateFormatError(f"{what}: malformed value") from exc


def decode_member_row(raw: bytes) -> MemberRow:
    """`decode_member` as a row (stage 1's hot path)."""
    return _typed(raw, "member state", _member_row)


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
    return _typed(raw, "address state", _address_rows)


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


def encode_backfill(done: bool, after: bytes | None) -> bytes:
    """A backfill's progress: ``[done, last member key sent | nil]``."""
    return _HEADER + _pack([done, after])


def decode_backfill(raw: bytes) -> tuple[bool, bytes | None]:
    try:
        done, after = _body(raw, "backfill progress")
        return bool(done), after
    except StateFormatError:
        raise
    except _MALFORMED as exc:
        raise StateFormatError("backfill progress: malformed value") from exc


def encode_routes(routes: dict[str, frozenset[str]]) -> bytes:
    """Per list, the segments feeding it: ``[[list, [segment, …]], …]``, sorted."""
    return _HEADER + _pack([[k, sorted(v)] for k, v in sorted(routes.items())])


def decode_routes(raw: bytes) -> dict[str, frozenset[str]]:
    try:
        return {list_id: frozenset(segments) for list_id, segments in _body(raw, "routes")}
    except StateFormatError:
        raise
    except _MALFORMED as exc:
        raise StateFormatError("routes: malformed value") from exc


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
    return _typed(value, "claim", _claim_row)


def decode_claim(key: bytes, value: bytes) -> Claim:
    return _claim(key, _checked_body(value, "claim"))


def _checked_body(value: bytes, what: str) -> Any:
    """`_body`, a damaged value raising `StateFormatError`."""
    try:
        return _body(value, what)
    except StateFormatError:
        raise
    except _MALFORMED as exc:
        raise StateFormatError(f"{what}: malformed value") from exc


def _claim(key: bytes, body: Any) -> Claim:
    list_id, address = split_key(key)
    try:
        segment, profile, occurred_at_ms, offset, holds, fields, partition = body
        return Claim(
            list_id,
            address,
            (segment, profile),
            (occurred_at_ms, offset),
            bool(holds),
            fields or {},
            partition,
        )
    except _MALFORMED as exc:
        raise StateFormatError("claim: malformed value") from exc


def encode_filled(filled: Filled) -> tuple[bytes, bytes]:
    """The repartition record of a `Filled`: keyed by the list with an empty address (no
    address is empty), ``["filled", segment, input partition, partitions]``."""
    return address_key(filled.list_id, ""), _HEADER + _pack(
        ["filled", filled.segment_id, filled.partition, filled.partitions]
    )


_REPAIR_KINDS: Final = ("reassert", "extra")


def encode_repair(repair: Repair) -> tuple[bytes, bytes]:
    """The claims topic record of a repair: (`address_key`, ``{"repair": kind}``)."""
    return address_key(repair.list_id, repair.address), _HEADER + _pack({"repair": repair.kind})


#: The first byte after the version of a claim's value: a MessagePack array of seven.
_CLAIM_ARRAY: Final = b"\x97"


def is_claim_value(value: bytes) -> bool:
    """Whether a claims topic value is a claim (the hot path: `decode_claim_row`), not a
    backfill's completion (an array of four) or a repair (a map): `decode_claims_record`."""
    return value[1:2] == _CLAIM_ARRAY


def encode_drift_found(found: DriftFound) -> tuple[bytes, bytes]:
    """The claims topic record of a reconcile's findings for one list: keyed by the list with
    an empty address (as `Filled`), ``{"drift": {kind: count}}``."""
    return address_key(found.list_id, ""), _HEADER + _pack({"drift": found.counts})


def decode_claims_record(key: bytes, value: bytes) -> Claim | Filled | Repair | DriftFound:
    """A record of the repartition topic: a `Claim`, a `Filled` (four elements, the first one
    ``"filled"``; a claim has seven), a `Repair` (a map, ``{"repair": kind}``) or a
    `DriftFound` (a map, ``{"drift": {kind: count}}``)."""
    body = _checked_body(value, "claim")
    if isinstance(body, dict) and "drift" in body:
        drift = body["drift"]
        if not (isinstance(drift, dict) and all(isinstance(n, int) for n in drift.values())):
            raise StateFormatError("claims record: malformed drift counts")
        return DriftFound(split_key(key)[0], {str(k): n for k, n in drift.items()})
    if isinstance(body, dict):
        kind = body.get("repair")
        if kind == "reassert" or kind == "extra":
            list_id, address = split_key(key)
            return Repair(list_id, address, kind)
        raise StateFormatError(f"claims record: unknown repair (expected one of {_REPAIR_KINDS})")
    if isinstance(body, list) and len(body) == 4 and body[0] == "filled":
        list_id, _ = split_key(key)
        try:
            _, segment, partition, partitions = body
            return Filled(list_id, str(segment), int(partition), int(partitions))
        except _MALFORMED as exc:
            raise StateFormatError("backfill record: malformed value") from exc
    return _claim(key, body)


def encode_fill(partitions: int, done: set[tuple[str, int]]) -> bytes:
    """Which backfills of a list completed: ``[partitions, [[segment, partition], …]]``."""
    return _HEADER + _pack([partitions, sorted([s, p] for s, p in done)])


def decode_fill(raw: bytes) -> tuple[int, set[tuple[str, int]]]:
    try:
        partitions, done = _body(raw, "backfill completion")
        return int(partitions), {(str(s), int(p)) for s, p in done}
    except StateFormatError:
        raise
    except _MALFORMED as exc:
        raise StateFormatError("backfill completion: malformed value") from exc
