"""Scenario 7 — hostile input.

Property tests (hypothesis) of what `tests/test_events_properties.py` leaves out: the hostile
families a producer can send — deep nesting, huge strings at and around the size limits,
control characters raw and escaped, non-UTF-8 bytes and lone surrogates inside otherwise valid
events, byte-order marks, non-finite numbers, wrong types in every field — never make the
decoder raise, always end in one of the documented reasons with a short detail that quotes
nothing; the record-size boundary is exact; and `parse_email` never raises, normalises, is
idempotent, and its fast path (plain `str`) agrees with the general one (a `str` subclass).

Then the service itself (a subprocess) reads a stream mixing valid events (native and
CloudEvents, duplicates, late events) with every one of those families: it never crashes nor
stalls (everything committed, exit 0 on SIGTERM), every invalid record is on the dead-letter
topic exactly once with an allowed reason, its original key and bytes and the headers, and
every valid change is applied (the lists match the expected state).
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from consumer.devtools.synthetic import Produced
from consumer.events import MAX_EVENT_BYTES, Invalid, MembershipChange, decode, parse_email
from tests.faults.support import (
    FaultRig,
    change,
    dead_letter_source,
    headers_of,
    note,
    scaled,
    stream,
)

CODES = {"invalid_json", "schema", "too_large", "invalid_encoding", "empty"}
SENTINEL = "zz-hostile.person@example.com"
PROFILE = settings(
    deadline=None,
    max_examples=scaled(120, 1000),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
T0 = 1_764_417_600_000


def base_event(**overrides: Any) -> dict[str, Any]:
    event: dict[str, Any] = {
        "event_id": "e-1",
        "segment_id": "seg-a",
        "change": "entered",
        "occurred_at": "2025-11-29T12:00:00Z",
        "profile": {"id": "p-1", "email": "ada@example.com", "full_name": "Ada"},
    }
    event.update(overrides)
    return event


def check_invalid_or_valid(value: bytes | None) -> MembershipChange | Invalid:
    result = decode(value)
    assert isinstance(result, MembershipChange | Invalid)
    if isinstance(result, Invalid):
        assert result.code in CODES, result
        assert result.detail
        assert len(result.detail) <= 200
        assert SENTINEL not in result.detail
        assert "@" not in result.detail
    return result


# --- properties ----------------------------------------------------------------------------------


@PROFILE
@given(st.integers(1, 3000), st.sampled_from(["[", '{"a":', '{"profile":{"x":']))
def test_deep_nesting_never_raises(depth: int, opener: str) -> None:
    closer = {"[": "]", '{"a":': "}", '{"profile":{"x":': "}}"}[opener]
    value = (opener * depth + "1" + closer * depth).encode()
    result = check_invalid_or_valid(value)
    assert isinstance(result, Invalid)  # a nested value is never a valid event


@PROFILE
@given(st.integers(-50, 50), st.sampled_from(["name", "id", "event_id"]))
def test_size_limits_are_exact(delta: int, field: str) -> None:
    """Around 64 KiB a record is accepted or refused by its size alone; a profile string over
    10,000 characters or an identifier over 200 is a schema error, never a crash."""
    event = base_event()
    event["profile"]["pad"] = ""
    empty = len(orjson.dumps(event))
    event["profile"]["pad"] = "x" * (MAX_EVENT_BYTES - empty + delta)
    raw = orjson.dumps(event)
    result = check_invalid_or_valid(raw)
    if len(raw) > MAX_EVENT_BYTES:
        assert isinstance(result, Invalid)
        assert result.code == "too_large"
    else:
        assert isinstance(result, Invalid)  # a 64 KiB string breaks the 10,000 limit
        assert result.code == "schema"
    long = base_event()
    limit = 10_000 if field in ("name", "id") else 200
    target = long["profile"] if field != "event_id" else long
    target[field] = "y" * (limit + 1 + abs(delta))
    result = check_invalid_or_valid(orjson.dumps(long))
    assert isinstance(result, Invalid)
    assert result.code == "schema"


raw_strings = st.binary(max_size=40).map(lambda b: b.replace(b'"', b"").replace(b"\\", b""))


@PROFILE
@given(raw_strings, st.sampled_from(["event_id", "segment_id", "occurred_at", "email", "name"]))
def test_raw_bytes_inside_a_string_value(inside: bytes, field: str) -> None:
    """Control characters, non-UTF-8 and anything else placed raw inside a JSON string."""
    event = base_event()
    marker = "MARKER-VALUE"
    if field in ("email", "name"):
        event["profile"][field if field == "email" else "full_name"] = marker
    else:
        event[field] = marker
    raw = orjson.dumps(event).replace(marker.encode(), inside + SENTINEL.encode())
    result = check_invalid_or_valid(raw)
    if any(b < 0x20 for b in inside):
        assert isinstance(result, Invalid)  # JSON forbids raw control characters in strings
    try:
        inside.decode("utf-8")
    except UnicodeDecodeError:
        assert isinstance(result, Invalid)
        assert result.code == "invalid_encoding"


escapes = st.sampled_from(
    ["\\u0000", "\\u001f", "\\u007f", "\\u0085", "\\ud800", "\\udfff", "\\ud83d\\ude00", "\\n"]
)


@PROFILE
@given(st.lists(escapes, min_size=1, max_size=4), st.sampled_from(["email", "full_name", "id"]))
def test_escaped_control_characters_and_surrogates(parts: list[str], field: str) -> None:
    event = base_event()
    event["profile"][field] = "MARKER-VALUE"
    raw = orjson.dumps(event).replace(b"MARKER-VALUE", "".join(parts).encode() + b"x")
    result = check_invalid_or_valid(raw)
    try:  # a lone surrogate cannot be UTF-8; a high one followed by a low one is a pair
        json.loads('"' + "".join(parts) + '"').encode("utf-8")
        lone = False
    except UnicodeEncodeError:
        lone = True
    if lone:
        assert isinstance(result, Invalid)
        assert result.code == "invalid_encoding"
    elif isinstance(result, MembershipChange) and field == "email":
        assert parse_email(result.profile["email"]) is None  # never a usable address


wrong_types = st.sampled_from(
    [None, True, 0, -1, 1.5, 1e308, "", [], {}, ["entered"], {"$ne": 1}, "x" * 300]
)


@PROFILE
@given(st.sampled_from(["event_id", "segment_id", "change", "occurred_at", "profile"]), wrong_types)
def test_wrong_types_in_every_field(field: str, value: object) -> None:
    result = check_invalid_or_valid(orjson.dumps(base_event(**{field: value})))
    assert isinstance(result, Invalid)
    assert result.code == "schema"


@PROFILE
@given(
    st.sampled_from(
        [
            b"NaN",
            b"Infinity",
            b'{"a": NaN}',
            b"1e99999",
            b"\xef\xbb\xbf\xef\xbb\xbf{}",
            b"\xef\xbb\xbf",
            b"\x00",
            b"{}" * 2,
            b'{"event_id": "a", "event_id": "b"}',
        ]
    )
    | st.builds(lambda n: b"[" * n, st.integers(1, 5000))
    | st.builds(lambda n: b'"' + b"\\" * n + b'"', st.integers(0, 50))
)
def test_odd_documents(value: bytes) -> None:
    result = check_invalid_or_valid(value)
    assert isinstance(result, Invalid)


def test_a_byte_order_mark_is_tolerated_once() -> None:
    raw = orjson.dumps(base_event())
    assert isinstance(decode(b"\xef\xbb\xbf" + raw), MembershipChange)
    assert isinstance(decode(b"\xef\xbb\xbf\xef\xbb\xbf" + raw), Invalid)


class _Str(str):
    """Takes `parse_email`'s general path (its fast path is for plain `str` only)."""

    __slots__ = ()


address_parts = st.text(
    st.sampled_from("abcXYZ09.-_+!#$%&'*/=?^`{|}~@ \t\x00\x7f\x85éü()<>[]:;\\,\""),
    max_size=70,
)
addresses = st.builds(
    lambda pad, local, labels, end: pad + local + "@" + ".".join(labels) + end,
    st.sampled_from(["", " ", "\n", "\u00a0", "\u2003"]),
    address_parts,
    st.lists(st.text(st.sampled_from("abcXYZ09-é_"), max_size=70), max_size=5),
    st.sampled_from(["", " ", "\n", "."]),
)


@PROFILE
@given(addresses | st.text(max_size=300) | st.from_type(object).filter(lambda v: True))
def test_parse_email_never_raises_normalises_and_both_paths_agree(value: object) -> None:
    parsed = parse_email(value)
    if isinstance(value, str):
        assert parse_email(_Str(value)) == parsed
    if parsed is not None:
        assert parsed == parsed.strip().lower()
        assert parsed.count("@") >= 1
        assert len(parsed) <= 254
        assert parse_email(parsed) == parsed


# --- the service on a hostile stream -----------------------------------------------------------


Raw = tuple[bytes | None, bytes | None, set[str]]


def hostile_records(rng: random.Random, n: int) -> list[Raw]:
    """(key, value, allowed dead-letter reasons) of invalid records of every family."""
    valid = orjson.dumps(base_event(profile={"id": "h", "email": "hostile@example.com"}))
    out: list[Raw] = []
    for i in range(n):
        family = i % 16
        key: bytes | None = f"hostile-{i}".encode() if i % 5 else None
        if family == 0:
            value = bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 200)))
            out.append((key, value, {"invalid_json", "invalid_encoding", "schema"}))
        elif family == 1:
            out.append((key, valid[: rng.randint(1, len(valid) - 1)], {"invalid_json"}))
        elif family == 2:
            depth = rng.choice([600, 5000])
            # orjson refuses more than 1024 levels; fewer parse, and the schema refuses them
            out.append((key, b"[" * depth + b"]" * depth, {"invalid_json", "schema"}))
        elif family == 3:
            nested: Any = "x"
            for _ in range(rng.randint(2, 50)):
                nested = {"x": nested}
            value = orjson.dumps(
                base_event(profile={"id": "h", "email": "n@example.com", **nested})
            )
            out.append((key, value, {"schema"}))
        elif family == 4:
            out.append((key, b'"' + b"y" * (MAX_EVENT_BYTES + 10) + b'"', {"too_large"}))
        elif family == 5:
            value = orjson.dumps(base_event(profile={"id": "h", "bio": "z" * 20_000}))
            out.append((key, value, {"schema"}))
        elif family == 6:
            field = rng.choice(["event_id", "segment_id", "change", "occurred_at", "profile"])
            value = orjson.dumps(base_event(**{field: rng.choice([None, 5, [], {}, True])}))
            out.append((key, value, {"schema"}))
        elif family == 7:
            stamp = rng.choice(
                [
                    "2025-02-30T12:00:00Z",
                    "2025-13-01T00:00:00Z",
                    "2025-11-29T12:00:00",
                    "2025-11-29 12:00:00Z",
                    "2025-11-29T24:00:00Z",
                    "2025-11-29T12:00:60Z",
                    "yesterday",
                    "1764417600000",
                ]
            )
            out.append((key, orjson.dumps(base_event(occurred_at=stamp)), {"schema"}))
        elif family == 8:
            out.append(
                (
                    key,
                    valid.replace(b"Ada", b"A\x01da").replace(b"h", b"h\x07", 1),
                    {"invalid_json"},
                )
            )
        elif family == 9:
            out.append((key, valid.replace(b"hostile", b"host\xffile"), {"invalid_encoding"}))
        elif family == 10:
            out.append((key, valid.replace(b"hostile", b"host\\ud800ile"), {"invalid_encoding"}))
        elif family == 11:  # a tombstone (needs a key) or an empty value
            out.append((f"hostile-{i}".encode(), None if i % 2 else b"", {"empty"}))
        elif family == 12:
            out.append((key, rng.choice([b"null", b"[]", b'"text"', b"42", b"{}"]), {"schema"}))
        elif family == 13:
            profile = {"id": "h", "email": "ctl\u0000@example.com"}
            out.append((key, orjson.dumps(base_event(profile=profile)), {"invalid_email"}))
        elif family == 14:
            out.append((key, orjson.dumps(base_event(profile={"id": "h"})), {"missing_email"}))
        else:
            cloud = {
                "specversion": "0.3",
                "type": "segment.membership.changed",
                "source": "/x",
                "id": "c",
                "time": "2025-11-29T12:00:00Z",
                "data": {"segment_id": "seg-a", "change": "entered", "profile": {"id": "h"}},
            }
            out.append((key, orjson.dumps(cloud), {"schema"}))
    return out


def odd_but_valid(n: int) -> list[Produced]:
    """Valid events a careless reader might refuse: control characters and emoji in names,
    an address with surrounding blanks and capitals, unknown top-level fields."""
    out = []
    for i in range(n):
        name = ["Ada\u0007 Lovelace", "Zoë 😀", "tab\there", "x" * 500][i % 4]
        record = change(f" Odd{i}@Example.COM ", at_ms=T0 + i, extra={"full_name": name})
        value = orjson.loads(record.value)
        value["trace_id"] = f"t-{i}"
        out.append(
            Produced(
                key=record.key,
                value=orjson.dumps(value),
                segment_id=record.segment_id,
                email=record.email,
                entered=True,
                occurred_at_ms=record.occurred_at_ms,
                profile=record.profile,
            )
        )
    return out


@pytest.mark.slow(10)
async def test_service_survives_a_hostile_stream(kafka_bootstrap: str, tmp_path: Path) -> None:
    rng = random.Random(7)
    valid = stream(scaled(300, 2000), seed=71, ordered=False, invalid_rate=0.01)
    valid += odd_but_valid(20)
    hostile = hostile_records(rng, scaled(160, 800))
    mixed: list[Produced] = list(valid)
    allowed_by_value: list[tuple[Produced, set[str]]] = []
    for key, value, allowed in hostile:
        record = Produced(
            key=key or b"",
            value=value or b"",
            segment_id=None,
            email=None,
            entered=False,
            occurred_at_ms=0,
            profile={},
            invalid=sorted(allowed)[0],
        )
        allowed_by_value.append((record, allowed))
        mixed.insert(rng.randrange(len(mixed) + 1), record)
    async with FaultRig(kafka_bootstrap, tmp_path, partitions=2) as rig:
        proc = rig.spawn("svc")
        await rig.wait_assigned(proc)
        # Produced with the real key and value (None for a tombstone / no key).
        raw = {id(r): (k, v) for (k, v, _), (r, _) in zip(hostile, allowed_by_value, strict=True)}
        await rig.produce(mixed, raw)
        await rig.wait_all_committed(90, [proc])
        proc.terminate()
        assert await proc.wait(30) == 0, proc.tail()
        assert rig.list_problems() == {}

        # Where each invalid record is, what reasons it may be refused for, and how many
        # dead letters it makes: one, or one per list of its segment when the event is valid
        # but has no usable address (each list refuses it).
        lists_of = {"seg-a": 2, "seg-b": 1}
        email_reasons = {"missing_email", "invalid_email"}
        wanted: dict[tuple[int, int], tuple[set[str], int]] = {}
        originals: dict[tuple[int, int], tuple[bytes | None, bytes | None]] = {}
        hostile_ids = {id(record): allowed for record, allowed in allowed_by_value}
        for s in rig.sent:
            position = (s.partition, s.offset)
            if id(s.record) in hostile_ids:
                allowed = hostile_ids[id(s.record)]
                copies = 1  # one letter per record, naming every destination it concerns
                wanted[position] = (allowed, copies)
                originals[position] = raw[id(s.record)]
            elif s.record.invalid is not None:
                reason = s.record.invalid
                segment = s.record.segment_id or ""
                copies = min(1, lists_of.get(segment, 0)) if reason in email_reasons else 1
                if copies:  # the generator's "invalid_json" are random bytes: maybe not UTF-8
                    allowed = {reason, "invalid_encoding"} if reason == "invalid_json" else {reason}
                    wanted[position] = (allowed, copies)
        letters = await rig.dead_letters(set(wanted))
        by_source: dict[tuple[int, int], list[Any]] = {}
        for letter in letters:
            by_source.setdefault(dead_letter_source(letter), []).append(letter)
        assert set(by_source) == set(wanted)
        reasons: dict[str, int] = {}
        for source, found in by_source.items():
            allowed, copies = wanted[source]
            assert len(found) == copies, (source, len(found), copies)
            for letter in found:
                headers = headers_of(letter)
                assert headers["cmsync-error"] in allowed, (source, headers, allowed)
                assert headers["cmsync-detail"]
                assert "@" not in headers["cmsync-detail"]
                assert headers["cmsync-source"] == f"{rig.topic}/{source[0]}/{source[1]}"
                if source in originals:
                    assert (letter.key, letter.value) == originals[source]
                reasons[headers["cmsync-error"]] = reasons.get(headers["cmsync-error"], 0) + 1
        generated_invalid = sum(1 for r in valid if r.invalid)
        note(
            f"hostile stream: {len(mixed)} records ({len(hostile)} hostile of 16 families, "
            f"{generated_invalid} generator-invalid, {len(valid)} valid): all committed, "
            f"exit 0; dead letters by reason {dict(sorted(reasons.items()))}"
        )
