"""Property tests for consumer.events.decode.

- decode never raises, whatever the bytes or JSON value;
- decode agrees with the pure-Python `jsonschema` oracle (the schema file is the single source
  of truth) on generated events that are valid or one mutation away from valid;
- a generated valid event decodes to exactly what was put in, in both forms;
- details of rejected events never repeat a value from the message.
"""

from __future__ import annotations

import copy
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import jsonschema
import orjson
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from consumer import events
from consumer.events import Invalid, MembershipChange, decode

SCHEMA_FILE = Path(__file__).resolve().parent.parent / "schemas" / "segment-membership.v1.json"
ORACLE = jsonschema.Draft202012Validator(
    json.loads(SCHEMA_FILE.read_text(encoding="utf-8")),
    format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER,
)
SENTINEL = "zz-secret.person@example.com"
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
DAY_MS = 86_400_000

# The machine is shared and small: no deadlines (they only make runs flaky), modest counts.
PROFILE = settings(deadline=None, max_examples=150, suppress_health_check=[HealthCheck.too_slow])

# Text that JSON can carry: no lone surrogates (orjson refuses to encode them, rightly).
text = st.text(st.characters(codec="utf-8"), max_size=20)
json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | text
)
json_values = st.recursive(
    json_scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(text, children, max_size=4),
    max_leaves=12,
)


# --- valid events -----------------------------------------------------------------------------

DAYS_IN_MONTH = (31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)


def is_leap(year: int) -> bool:
    return year % 4 == 0 and (year % 100 != 0 or year % 400 == 0)


def reference_ms(
    year: int, month: int, day: int, hour: int, minute: int, second: int, fraction: str, offset: int
) -> int:
    """Epoch ms computed with datetime (year 0 shifted by one 400-year cycle of 146097 days)."""
    shift = 400 if year == 0 else 0
    moment = datetime(year + shift, month, day, hour, minute, second, tzinfo=UTC)
    whole = (moment - EPOCH) // timedelta(milliseconds=1) - shift // 400 * 146097 * DAY_MS
    return whole + int((fraction + "000")[:3]) - offset * 60_000


@st.composite
def timestamps(draw: st.DrawFn) -> tuple[str, int]:
    """A valid RFC 3339 date-time and its epoch ms."""
    year = draw(st.integers(0, 9999) | st.integers(1969, 2100))
    month = draw(st.integers(1, 12))
    days = DAYS_IN_MONTH[month - 1] + (month == 2 and is_leap(year))
    day = draw(st.integers(1, days))
    hour, minute, second = (
        draw(st.integers(0, 23)),
        draw(st.integers(0, 59)),
        draw(st.integers(0, 59)),
    )
    fraction = draw(st.text("0123456789", max_size=12))
    offset = draw(st.integers(-(23 * 60 + 59), 23 * 60 + 59))
    if offset == 0 and draw(st.booleans()):
        zone = draw(st.sampled_from(["Z", "z"]))
    else:
        sign = "-" if offset < 0 or (offset == 0 and draw(st.booleans())) else "+"
        zone = f"{sign}{abs(offset) // 60:02d}:{abs(offset) % 60:02d}"
    separator = draw(st.sampled_from(["T", "T", "T", "t"]))
    stamp = (
        f"{year:04d}-{month:02d}-{day:02d}{separator}{hour:02d}:{minute:02d}:{second:02d}"
        + (f".{fraction}" if fraction else "")
        + zone
    )
    return stamp, reference_ms(year, month, day, hour, minute, second, fraction, offset)


identifiers = st.text(st.characters(codec="utf-8"), min_size=1, max_size=200)
profile_values = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(st.characters(codec="utf-8"), max_size=30)
    | st.lists(st.text(st.characters(codec="utf-8"), max_size=10), max_size=4)
)
profiles = st.builds(
    lambda pid, rest: {**rest, "id": pid},
    st.text(st.characters(codec="utf-8"), min_size=1, max_size=30),
    st.dictionaries(text, profile_values, max_size=8),
)


@st.composite
def valid_events(draw: st.DrawFn) -> tuple[dict[str, Any], MembershipChange]:
    """A valid event in either form, and what it must decode to."""
    stamp, millis = draw(timestamps())
    event_id, segment_id = draw(identifiers), draw(identifiers)
    change = draw(st.sampled_from(["entered", "exited"]))
    profile = draw(profiles)
    expected = MembershipChange(event_id, segment_id, change == "entered", millis, profile)
    # Unknown top-level members are allowed; CloudEvents attributes the schema types are not
    # "unknown", so keep them out of the extras.
    typed = {"specversion", "datacontenttype", "subject", "dataschema"}
    extras = draw(
        st.dictionaries(text.filter(lambda key: key not in typed), json_values, max_size=2)
    )
    if draw(st.booleans()):
        event = {**extras, "event_id": event_id, "segment_id": segment_id, "change": change}
        event |= {"occurred_at": stamp, "profile": profile}
    else:
        event = {
            **extras,
            "specversion": "1.0",
            "type": "segment.membership.changed",
            "source": draw(st.sampled_from(["/cdp", "https://cdp.example.com/segments", "urn:x"])),
            "id": event_id,
            "time": stamp,
            "data": {"segment_id": segment_id, "change": change, "profile": profile},
        }
        if draw(st.booleans()):
            event["datacontenttype"] = "application/json"
    return event, expected


# --- mutations: one step away from valid ----------------------------------------------------------


def containers(node: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Paths of every dict and list in an event (the root included)."""
    found = [path]
    if isinstance(node, dict):
        items: Any = node.items()
    elif isinstance(node, list):
        items = enumerate(node)
    else:
        return []
    for key, child in items:
        if isinstance(child, dict | list):
            found += containers(child, (*path, key))
    return found


def at(node: Any, path: tuple[Any, ...]) -> Any:
    for key in path:
        node = node[key]
    return node


bad_timestamps = st.builds(
    "{:04d}-{:02d}-{:02d}{}{:02d}:{:02d}:{:02d}{}{}".format,
    st.integers(0, 9999),
    st.integers(0, 14),
    st.integers(0, 32),
    st.sampled_from(["T", "t", " ", "_"]),
    st.integers(0, 25),
    st.integers(0, 61),
    st.integers(0, 61),
    st.sampled_from(["", ".", ".5", ".123456789"]),
    st.sampled_from(["", "Z", "z", "+00:00", "-23:59", "+24:00", "+05:60", "+0530", "Z\n", " "]),
)
replacements = (
    json_values
    | st.sampled_from(
        ["", "x" * 201, "x" * 10_001, "entered", "exited", "1.0", {"k": "v"}, [1], ["x"]]
    )
    | bad_timestamps
    | st.just(SENTINEL)
)


def fresh(value: Any) -> Any:
    """A copy: `sampled_from` hands out the same list object every time."""
    return copy.deepcopy(value)


@st.composite
def near_valid_events(draw: st.DrawFn) -> dict[str, Any]:
    event = copy.deepcopy(draw(valid_events())[0])
    for _ in range(draw(st.integers(1, 2))):
        path = draw(st.sampled_from(containers(event)))
        node = at(event, path)
        if isinstance(node, list):
            if len(node) > 0 and draw(st.booleans()):
                node[draw(st.integers(0, len(node) - 1))] = fresh(draw(replacements))
            else:
                node.append(fresh(draw(replacements)))
            continue
        keys = sorted(node)
        operation = draw(st.sampled_from(["drop", "replace", "replace", "add"]))
        if operation == "add" or not keys:
            key = draw(
                st.sampled_from(
                    ["specversion", "event_id", "profile", "data", "id", "time", SENTINEL]
                )
                | text
            )
            node[key] = fresh(draw(replacements))
        elif operation == "drop":
            del node[draw(st.sampled_from(keys))]
        else:
            node[draw(st.sampled_from(keys))] = fresh(draw(replacements))
    return event


# --- properties ----------------------------------------------------------------------------------


@PROFILE
@given(st.binary(max_size=300))
def test_decode_never_raises_on_arbitrary_bytes(value: bytes) -> None:
    result = decode(value)
    assert isinstance(result, MembershipChange | Invalid)


@PROFILE
@given(valid_events(), st.data())
def test_decode_never_raises_on_damaged_bytes_of_an_event(
    generated: tuple[dict[str, Any], MembershipChange], data: st.DataObject
) -> None:
    raw = bytearray(orjson.dumps(generated[0]))
    for _ in range(data.draw(st.integers(1, 4))):
        position = data.draw(st.integers(0, len(raw) - 1))
        action = data.draw(st.sampled_from(["flip", "cut", "insert"]))
        if action == "flip":
            raw[position] = data.draw(st.integers(0, 255))
        elif action == "cut":
            del raw[position:]
            break
        else:
            raw[position:position] = data.draw(st.binary(min_size=1, max_size=4))
    result = decode(bytes(raw))
    assert isinstance(result, MembershipChange | Invalid)
    if isinstance(result, Invalid):
        assert result.code in {"invalid_json", "invalid_encoding", "schema", "empty"}


@PROFILE
@given(json_values)
def test_decode_never_raises_on_arbitrary_json_and_agrees_with_the_oracle(value: object) -> None:
    result = decode(orjson.dumps(value))
    assert isinstance(result, MembershipChange | Invalid)
    assert isinstance(result, MembershipChange) == ORACLE.is_valid(value)


@PROFILE
@given(valid_events())
def test_valid_events_round_trip(generated: tuple[dict[str, Any], MembershipChange]) -> None:
    event, expected = generated
    assert ORACLE.is_valid(event)
    assert decode(orjson.dumps(event)) == expected


@PROFILE
@given(valid_events())
def test_both_forms_of_a_change_decode_equal(
    generated: tuple[dict[str, Any], MembershipChange],
) -> None:
    event, expected = generated
    time = event["time"] if "specversion" in event else event["occurred_at"]
    body = {
        "segment_id": expected.segment_id,
        "change": "entered" if expected.entered else "exited",
        "profile": expected.profile,
    }
    native = {"event_id": expected.event_id, "occurred_at": time, **body}
    cloud = {
        "specversion": "1.0",
        "type": "segment.membership.changed",
        "source": "/cdp",
        "id": expected.event_id,
        "time": time,
        "data": body,
    }
    assert decode(orjson.dumps(native)) == decode(orjson.dumps(cloud)) == expected


@PROFILE
@given(near_valid_events())
def test_decode_agrees_with_the_oracle_on_near_valid_events(event: dict[str, Any]) -> None:
    result = decode(orjson.dumps(event))
    assert isinstance(result, MembershipChange) == ORACLE.is_valid(event), result
    if isinstance(result, Invalid):
        assert result.code == "schema"
        assert SENTINEL not in result.detail
        assert len(result.detail) <= 200


@PROFILE
@given(timestamps())
def test_fast_and_strict_timestamp_parsers_agree(generated: tuple[str, int]) -> None:
    stamp, millis = generated
    assert events._epoch_ms(stamp) == millis
    assert events._epoch_ms_rfc3339(stamp) == millis


@PROFILE
@given(bad_timestamps)
def test_timestamps_decode_accepts_are_exactly_those_the_schema_accepts(stamp: str) -> None:
    event = {
        "event_id": "e",
        "segment_id": "s",
        "change": "exited",
        "occurred_at": stamp,
        "profile": {"id": "p"},
    }
    result = decode(orjson.dumps(event))
    assert isinstance(result, MembershipChange) == ORACLE.is_valid(event)
    assert (events._epoch_ms_rfc3339(stamp) is not None) == ORACLE.is_valid(event)


@PROFILE
@given(st.binary(max_size=100), st.binary(max_size=100))
def test_details_of_broken_bytes_never_quote_them(before: bytes, after: bytes) -> None:
    result = decode(before + SENTINEL.encode() + after)
    assume(isinstance(result, Invalid))
    assert isinstance(result, Invalid)
    assert SENTINEL not in result.detail


# --- the fast path -------------------------------------------------------------------------------
# `decode_fields` tries msgspec structs first and asks the strict path (orjson + the compiled
# schema) whatever they decline. The fast path must never accept what the strict path refuses,
# nor read an event differently: it either declines (None) or gives the strict path's answer.


def _fast_agrees_with_strict(value: bytes) -> bool:
    fast = events._decode_fast(value)
    return fast is None or fast == events._decode_strict(value)


@PROFILE
@given(valid_events())
def test_fast_path_reads_valid_events_as_the_strict_path_does(
    generated: tuple[dict[str, Any], MembershipChange],
) -> None:
    value = orjson.dumps(generated[0])
    assert _fast_agrees_with_strict(value)


@PROFILE
@given(near_valid_events())
def test_fast_path_never_accepts_what_the_strict_path_refuses(event: dict[str, Any]) -> None:
    value = orjson.dumps(event)
    assert _fast_agrees_with_strict(value)
    if events._decode_fast(value) is not None:
        assert ORACLE.is_valid(event)


@PROFILE
@given(bad_timestamps)
def test_fast_path_timestamps(stamp: str) -> None:
    for event in (
        {"event_id": "e", "segment_id": "s", "change": "exited", "occurred_at": stamp},
        {
            "specversion": "1.0",
            "type": "segment.membership.changed",
            "source": "/cdp",
            "id": "e",
            "time": stamp,
            "data": {"segment_id": "s", "change": "exited"},
        },
    ):
        body = event.get("data", event)
        assert isinstance(body, dict)
        body["profile"] = {"id": "p"}
        assert _fast_agrees_with_strict(orjson.dumps(event))


def test_fast_path_takes_the_common_forms_and_declines_the_rest() -> None:
    native = {
        "event_id": "e",
        "segment_id": "s",
        "change": "entered",
        "occurred_at": "2026-11-29T16:21:36.666Z",
        "profile": {"id": "p", "email": "a@example.com", "tags": ["x"], "n": 1.5, "b": None},
    }
    cloud = {
        "specversion": "1.0",
        "type": "segment.membership.changed",
        "source": "/cdp",
        "id": "e",
        "time": "2026-11-29T16:21:36.666Z",
        "datacontenttype": "application/json",
        "data": {k: native[k] for k in ("segment_id", "change", "profile")},
    }
    expected = events._decode_strict(orjson.dumps(native))
    assert not isinstance(expected, Invalid)
    assert events._decode_fast(orjson.dumps(native)) == expected
    assert events._decode_fast(orjson.dumps(cloud)) == expected
    declined = [
        b"\xef\xbb\xbf" + orjson.dumps(native),  # a byte order mark: the strict path strips it
        orjson.dumps({**native, "occurred_at": "2026-11-29t16:21:36z"}),  # valid, unusual form
        orjson.dumps({**native, "occurred_at": "2026-02-30T16:21:36Z"}),  # no such day
        orjson.dumps({**native, "specversion": "1.0"}),  # a native event may not carry it
        orjson.dumps({**native, "profile": {"email": "a@example.com"}}),  # no id
        orjson.dumps({**native, "profile": {"id": "p", "nested": {"a": 1}}}),
        orjson.dumps({**cloud, "datacontenttype": "text/plain"}),
        # a lone surrogate escape: orjson refuses it, so msgspec must not let it through
        orjson.dumps(native).replace(b'"p"', b'"\\ud800"'),
    ]
    for value in declined:
        assert events._decode_fast(value) is None, value
    assert events.decode_fields(declined[0]) == expected
