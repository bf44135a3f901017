"""consumer.events: the v1 schema, its examples, `decode` and `parse_email`.

The schema file is the single source of truth: the examples are checked against it with the
pure-Python `jsonschema` package as an independent oracle, and `decode` must agree with that
oracle on every example.
"""

from __future__ import annotations

import calendar
import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import jsonschema
import orjson
import pytest

from consumer import events
from consumer.events import MAX_EVENT_BYTES, Invalid, MembershipChange, decode, parse_email

REPO = Path(__file__).resolve().parent.parent
SCHEMA_FILE = REPO / "schemas" / "segment-membership.v1.json"
EXAMPLES = REPO / "schemas" / "examples"
VALID = sorted((EXAMPLES / "valid").glob("*.json"))
INVALID = sorted((EXAMPLES / "invalid").glob("*.json"))
SENTINEL = "zz-secret.person@example.com"


def oracle() -> jsonschema.Draft202012Validator:
    schema = json.loads(SCHEMA_FILE.read_text(encoding="utf-8"))
    return jsonschema.Draft202012Validator(
        schema, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER
    )


ORACLE = oracle()


def native(**fields: Any) -> dict[str, Any]:
    event: dict[str, Any] = {
        "event_id": "evt-1",
        "segment_id": "vip-customers",
        "change": "entered",
        "occurred_at": "2026-11-29T12:00:00.123Z",
        "profile": {"id": "cust-42", "email": "ada@example.com", "tags": ["a", "b"], "n": 3},
    }
    event.update(fields)
    return event


def cloud_event(event: dict[str, Any]) -> dict[str, Any]:
    """The CloudEvents structured form of a native event."""
    return {
        "specversion": "1.0",
        "type": "segment.membership.changed",
        "source": "https://cdp.example.com/segments",
        "id": event["event_id"],
        "time": event["occurred_at"],
        "datacontenttype": "application/json",
        "data": {key: event[key] for key in ("segment_id", "change", "profile")},
    }


def as_bytes(event: object) -> bytes:
    return orjson.dumps(event)


def utc_ms(year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0) -> int:
    return calendar.timegm((year, month, day, hour, minute, second, 0, 0, 0)) * 1000


# --- the schema and its examples ----------------------------------------------------------------


def test_schema_is_a_valid_draft_2020_12_schema() -> None:
    schema = json.loads(SCHEMA_FILE.read_text(encoding="utf-8"))
    jsonschema.Draft202012Validator.check_schema(schema)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema["$id"]
    assert {"native", "cloudEvent"} <= set(schema["$defs"])


def test_examples_cover_both_forms_and_many_faults() -> None:
    assert len(VALID) >= 15
    assert len(INVALID) >= 40
    assert any(path.name.startswith("cloudevents-") for path in VALID)
    assert any(path.name.startswith("cloudevents-") for path in INVALID)


@pytest.mark.parametrize("path", VALID, ids=lambda path: path.stem)
def test_valid_example_decodes(path: Path) -> None:
    raw = path.read_bytes()
    result = decode(raw)
    assert isinstance(result, MembershipChange), result
    assert ORACLE.is_valid(json.loads(raw))


@pytest.mark.parametrize("path", INVALID, ids=lambda path: path.stem)
def test_invalid_example_is_rejected(path: Path) -> None:
    raw = path.read_bytes()
    result = decode(raw)
    assert isinstance(result, Invalid)
    assert result.code == "schema"
    assert result.detail
    assert not ORACLE.is_valid(json.loads(raw))


@pytest.mark.parametrize("path", VALID, ids=lambda path: path.stem)
def test_valid_example_decodes_to_its_own_fields(path: Path) -> None:
    event = json.loads(path.read_bytes())
    result = decode(path.read_bytes())
    assert isinstance(result, MembershipChange)
    body = event["data"] if "specversion" in event else event
    assert result.event_id == (event["id"] if "specversion" in event else event["event_id"])
    assert result.segment_id == body["segment_id"]
    assert result.entered is (body["change"] == "entered")
    assert result.profile == body["profile"]


def test_typical_examples_of_both_forms_are_the_same_change() -> None:
    native_form = decode((EXAMPLES / "valid" / "native-typical.json").read_bytes())
    cloud_form = decode((EXAMPLES / "valid" / "cloudevents-typical.json").read_bytes())
    assert isinstance(native_form, MembershipChange)
    assert native_form == cloud_form


@pytest.mark.parametrize(
    "path",
    [path for path in VALID if not path.name.startswith("cloudevents-")],
    ids=lambda path: path.stem,
)
def test_native_example_and_its_cloud_event_decode_equal(path: Path) -> None:
    event = json.loads(path.read_bytes())
    native_form = decode(path.read_bytes())
    cloud_form = decode(as_bytes(cloud_event(event)))
    assert isinstance(native_form, MembershipChange)
    assert cloud_form == native_form


# --- decode: a few events spelled out ------------------------------------------------------------


def test_decode_typical_native_event() -> None:
    assert decode(as_bytes(native())) == MembershipChange(
        event_id="evt-1",
        segment_id="vip-customers",
        entered=True,
        occurred_at_ms=utc_ms(2026, 11, 29, 12) + 123,
        profile={"id": "cust-42", "email": "ada@example.com", "tags": ["a", "b"], "n": 3},
    )


def test_decode_exited_cloud_event() -> None:
    event = cloud_event(native(change="exited"))
    del event["datacontenttype"]  # optional
    result = decode(as_bytes(event))
    assert isinstance(result, MembershipChange)
    assert result.entered is False
    assert result.event_id == "evt-1"


def test_unknown_top_level_properties_are_ignored() -> None:
    plain = decode(as_bytes(native()))
    extended = decode(as_bytes(native(schema_version=2, trace={"id": "t"}, tags=[1, {"x": []}])))
    assert extended == plain


def test_native_event_carrying_specversion_is_read_as_a_cloud_event() -> None:
    result = decode(as_bytes(native(specversion="1.0")))
    assert isinstance(result, Invalid)
    assert result.code == "schema"


def test_string_lengths_are_counted_in_code_points() -> None:
    # 200 astral characters are 400 UTF-16 units and 800 UTF-8 bytes: still 200 characters.
    assert isinstance(decode(as_bytes(native(event_id="😀" * 200))), MembershipChange)
    assert decode(as_bytes(native(event_id="😀" * 201))) == Invalid(
        "schema", "event_id: too long (at most 200 characters)"
    )


@pytest.mark.parametrize(
    ("timestamp", "expected"),
    [
        ("2026-11-29T12:00:00Z", utc_ms(2026, 11, 29, 12)),
        ("2026-11-29T12:00:00.123Z", utc_ms(2026, 11, 29, 12) + 123),
        ("2026-11-29T12:00:00.1Z", utc_ms(2026, 11, 29, 12) + 100),
        ("2026-11-29T12:00:00.12Z", utc_ms(2026, 11, 29, 12) + 120),
        ("2026-11-29T12:00:00.999999999999Z", utc_ms(2026, 11, 29, 12) + 999),  # truncated
        ("2026-11-29T12:00:00.0009Z", utc_ms(2026, 11, 29, 12)),
        ("2026-11-29T17:30:00.123+05:30", utc_ms(2026, 11, 29, 12) + 123),
        ("2026-11-29T07:00:00.123456-05:00", utc_ms(2026, 11, 29, 12) + 123),
        ("2026-11-29T12:00:00-00:00", utc_ms(2026, 11, 29, 12)),
        ("2026-11-30T00:30:00+12:30", utc_ms(2026, 11, 29, 12)),
        ("2026-11-29t12:00:00.5z", utc_ms(2026, 11, 29, 12) + 500),  # lower case: slow path
        ("2024-02-29T23:59:59.999Z", utc_ms(2024, 2, 29, 23, 59, 59) + 999),
        ("2000-02-29T00:00:00+23:59", utc_ms(2000, 2, 28, 0, 1)),
        ("1970-01-01T00:00:00Z", 0),
        ("1969-12-31T23:59:59.9996Z", -1),  # the floor of the instant, also before 1970
        ("0001-01-01T00:00:00Z", utc_ms(1, 1, 1)),
        ("0001-01-01T00:00:00+01:00", utc_ms(1, 1, 1) - 3_600_000),  # before datetime.min
        ("0000-03-01T00:00:00Z", utc_ms(1, 3, 1) - 365 * 86_400_000),  # year 0 (slow path)
        ("9999-12-31T23:59:59.999-01:00", utc_ms(9999, 12, 31, 23, 59, 59) + 999 + 3_600_000),
    ],
)
def test_occurred_at_is_normalised_to_utc_epoch_ms(timestamp: str, expected: int) -> None:
    for event in (native(occurred_at=timestamp), cloud_event(native(occurred_at=timestamp))):
        result = decode(as_bytes(event))
        assert isinstance(result, MembershipChange), result
        assert result.occurred_at_ms == expected
    assert events._epoch_ms(timestamp) == expected
    assert events._epoch_ms_rfc3339(timestamp) == expected


@pytest.mark.parametrize(
    "timestamp",
    [
        "2026-02-30T00:00:00Z",
        "2026-02-29T00:00:00Z",
        "1900-02-29T00:00:00Z",
        "2026-04-31T00:00:00Z",
        "2026-13-01T00:00:00Z",
        "2026-00-01T00:00:00Z",
        "2026-01-00T00:00:00Z",
        "2026-01-01T24:00:00Z",
        "2026-01-01T00:60:00Z",
        "2016-12-31T23:59:60Z",
        "2026-01-01T00:00:00",
        "2026-01-01T00:00:00.123",
        "2026-01-01T00:00:00.Z",
        "2026-01-01T00:00:00+24:00",
        "2026-01-01T00:00:00+05:60",
        "2026-01-01T00:00:00+0530",
        "2026-01-01T00:00:00Z ",
        "2026-01-01",
        "",
    ],
)
def test_impossible_date_times_are_rejected(timestamp: str) -> None:
    assert decode(as_bytes(native(occurred_at=timestamp))) == Invalid(
        "schema", "occurred_at is not a valid date-time"
    )
    assert decode(as_bytes(cloud_event(native(occurred_at=timestamp)))) == Invalid(
        "schema", "time is not a valid date-time"
    )
    assert events._epoch_ms_rfc3339(timestamp) is None


# --- decode with a schema from CMSYNC_SCHEMA_DIR -------------------------------------------------


def load_events_module(schema_dir: Path, monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """A private copy of consumer.events that read its schema from `schema_dir`."""
    monkeypatch.setenv("CMSYNC_SCHEMA_DIR", str(schema_dir))
    spec = importlib.util.spec_from_file_location("events_copy", events.__file__)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "events_copy", module)  # dataclasses look the module up
    spec.loader.exec_module(module)
    return module


def test_schema_dir_override_and_date_check_without_the_pattern(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With a looser schema (no calendar in the pattern), decode still refuses Feb 30."""
    schema = json.loads(SCHEMA_FILE.read_text(encoding="utf-8"))
    date_time = schema["$defs"]["dateTime"]
    del date_time["pattern"]
    del date_time["not"]
    (tmp_path / SCHEMA_FILE.name).write_text(json.dumps(schema), encoding="utf-8")
    loose = load_events_module(tmp_path, monkeypatch)
    assert loose.schema_path() == tmp_path / SCHEMA_FILE.name

    for bad in ("2026-02-30T00:00:00Z", "2026-01-01T00:00:00", "yesterday"):
        result = loose.decode(as_bytes(native(occurred_at=bad)))
        assert result == loose.Invalid("schema", "occurred_at is not a valid date-time")
    ok = loose.decode(as_bytes(native(occurred_at="2026-11-29T12:00:00.123Z")))
    assert ok.occurred_at_ms == utc_ms(2026, 11, 29, 12) + 123


def test_a_schema_looser_than_the_code_dead_letters_instead_of_raising(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / SCHEMA_FILE.name).write_text(
        json.dumps(
            {
                "$schema": "https://json-schema.org/draft/2020-12/schema",
                "$defs": {"native": {}, "cloudEvent": {}},
            }
        ),
        encoding="utf-8",
    )
    loose = load_events_module(tmp_path, monkeypatch)
    candidates: list[object] = [{}, [], {"specversion": "1.0"}, native(profile=None, occurred_at=7)]
    for event in candidates:
        result = loose.decode(as_bytes(event))
        assert isinstance(result, loose.Invalid)
        assert result.code == "schema"


# --- decode: records that are not events ------------------------------------------------------


@pytest.mark.parametrize("value", [None, b""])
def test_empty_record(value: bytes | None) -> None:
    assert decode(value) == Invalid("empty", "record has no value")


def test_size_limit() -> None:
    event = as_bytes(native())
    at_limit = event + b" " * (MAX_EVENT_BYTES - len(event))
    assert len(at_limit) == MAX_EVENT_BYTES == 64 * 1024
    assert isinstance(decode(at_limit), MembershipChange)
    result = decode(at_limit + b" ")
    assert isinstance(result, Invalid)
    assert result.code == "too_large"


@pytest.mark.parametrize(
    "value",
    [
        b"\xff",
        b"\x80{}",
        json.dumps(native(profile={"id": "p", "name": "Zoë"}), ensure_ascii=False).encode(
            "latin-1"
        ),
        json.dumps(native()).encode("utf-16"),
        b'{"event_id": "\xed\xa0\x80"}',  # an encoded surrogate is not UTF-8
        b'{"event_id": "\xc3"}',  # truncated sequence
        b'"\\ud800"',  # escaped lone high surrogate
        b'"\\udc00x"',  # escaped lone low surrogate
    ],
)
def test_not_utf8_is_invalid_encoding(value: bytes) -> None:
    result = decode(value)
    assert isinstance(result, Invalid)
    assert result.code == "invalid_encoding", result


@pytest.mark.parametrize(
    "value",
    [
        b"{",
        b"   ",
        b"not json",
        as_bytes(native())[:-1],
        as_bytes(native()) + b"}",
        as_bytes(native()) + b"\n{}",
        b'{"event_id": NaN}',
        b"[" * 10_000,
        b"[" * 10_000 + b"]" * 10_000,
        b"\xef\xbb\xbf\xef\xbb\xbf" + as_bytes(native()),  # one byte order mark is enough
    ],
)
def test_not_json_is_invalid_json(value: bytes) -> None:
    result = decode(value)
    assert isinstance(result, Invalid)
    assert result.code == "invalid_json", result


def test_a_leading_byte_order_mark_is_ignored() -> None:
    assert decode(b"\xef\xbb\xbf" + as_bytes(native())) == decode(as_bytes(native()))


@pytest.mark.parametrize("depth", [200, 1000, 1020])
def test_deep_nesting_inside_the_event_is_invalid_not_a_crash(depth: int) -> None:
    nested = b"[" * depth + b"]" * depth
    in_profile = as_bytes(native(profile={"id": "p", "x": 0})).replace(b'"x":0', b'"x":' + nested)
    in_objects = b'{"a":' * depth + b"1" + b"}" * depth
    for value in (nested, in_profile, in_objects):
        result = decode(value)
        assert isinstance(result, Invalid)
        assert result.code == "schema"


def test_deep_nesting_in_an_unknown_field_does_not_matter() -> None:
    deep = b"[" * 1000 + b"]" * 1000
    value = as_bytes(native(extra=0)).replace(b'"extra":0', b'"extra":' + deep)
    assert isinstance(decode(value), MembershipChange)


@pytest.mark.parametrize("event", [[], "x", 1, None, True, 1.5])
def test_json_that_is_not_an_object(event: object) -> None:
    assert decode(as_bytes(event)) == Invalid("schema", "event: wrong type (expected object)")


# --- Invalid.detail: short, useful, and free of personal data -----------------------------------


@pytest.mark.parametrize(
    ("event", "detail"),
    [
        (native(change="joined"), 'change: not one of "entered", "exited"'),
        (native(profile={"email": "x"}), "profile.id: missing"),
        (
            native(profile={"id": "p", "email": ["a", 1]}),
            "profile.email[1]: wrong type (expected string)",
        ),
        (native(event_id=""), "event_id: empty"),
        ({k: v for k, v in native().items() if k != "segment_id"}, "segment_id: missing"),
        (dict(cloud_event(native()), specversion="0.3"), 'specversion: must be "1.0"'),
        (dict(cloud_event(native()), data=[]), "data: wrong type (expected object)"),
    ],
)
def test_detail_names_the_field_and_the_rule(event: dict[str, Any], detail: str) -> None:
    assert decode(as_bytes(event)) == Invalid("schema", detail)


def test_detail_counts_further_problems() -> None:
    result = decode(b"{}")
    assert result == Invalid("schema", "event_id: missing (and 4 more)")


def leaky_events() -> list[bytes]:
    """Invalid events with the sentinel in every place a careless detail could copy from."""
    s = SENTINEL
    events_: list[object] = [
        native(event_id=s * 10),
        native(event_id=7, segment_id=s),
        native(segment_id=[s]),
        native(change=s),
        native(occurred_at=s),
        native(occurred_at="2026-02-30T00:00:00Z", profile={"id": s, "email": s}),
        native(profile={"id": s, "email": {"address": s}}),
        native(profile={"id": s, s: {"nested": s}}),
        native(profile={"id": s, "tags": [s, {s: s}]}),
        native(profile={"id": s, "bio": s * 400}),
        native(profile={"id": "", "email": s}),
        native(profile=s),
        native(profile=[s]),
        native(specversion=s),
        dict(cloud_event(native()), type=s),
        dict(cloud_event(native()), datacontenttype=s),
        dict(cloud_event(native()), specversion=s),
        dict(cloud_event(native()), data={"profile": {"id": s, s: s}}),
        dict(cloud_event(native()), time=s),
        {s: s},
        [s],
        s,
    ]
    raw: list[bytes] = [as_bytes(event) for event in events_]
    raw += [
        b'{"email": "' + s.encode() + b'", oops}',
        s.encode(),
        b'{"' + s.encode() + b'": \xff}',
        b'{"email": "' + s.encode() + b'\\ud800"}',
        as_bytes(native(profile={"id": "p", "email": s}))[:-2],
        b"[" * 2000 + s.encode(),
    ]
    return raw


@pytest.mark.parametrize("value", leaky_events())
def test_detail_never_contains_values_from_the_message(value: bytes) -> None:
    result = decode(value)
    assert isinstance(result, Invalid)
    assert SENTINEL not in result.detail
    assert "@" not in result.detail
    assert "secret" not in result.detail
    assert 0 < len(result.detail) <= 200


def test_field_names_that_look_like_data_are_masked() -> None:
    result = decode(as_bytes(native(profile={"id": "p", "ada@example.com": {}})))
    assert isinstance(result, Invalid)
    assert result.detail.startswith("profile.<field>: wrong type")


LONGEST = "a" * 64 + "@" + "b" * 63 + "." + "b" * 63 + "." + "b" * 61  # 254 bytes


# --- parse_email ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("ada@example.com", "ada@example.com"),
        ("  Ada.Lovelace@Example.COM \n", "ada.lovelace@example.com"),
        ("ada+newsletter@mail.example.co.uk", "ada+newsletter@mail.example.co.uk"),
        ("o'brien@example.ie", "o'brien@example.ie"),
        ("a@b.c", "a@b.c"),
        ("x-1_2@sub-domain.example.com", "x-1_2@sub-domain.example.com"),
        ("zoë@exämple.de", "zoë@exämple.de"),
        # Only ASCII letters are lower-cased (contract, guarantee 2): str.lower() would fold
        # U+212A KELVIN SIGN into "k" and so make another person's address of this one.
        ("ÄDA@EXAMPLE.COM", "Äda@example.com"),
        ("\u212aATE@Example.com", "\u212aate@example.com"),
        ("  \u0130DA@EXAMPLE.COM", "\u0130da@example.com"),
        ("a" * 64 + "@example.com", "a" * 64 + "@example.com"),
        ("a@" + "b" * 63 + ".com", "a@" + "b" * 63 + ".com"),
        (LONGEST, LONGEST),
    ],
)
def test_parse_email_accepts_and_normalises(value: str, expected: str) -> None:
    assert parse_email(value) == expected
    assert len(expected.encode()) <= 254


@pytest.mark.parametrize(
    "value",
    [
        None,
        42,
        b"ada@example.com",
        ["ada@example.com"],
        "",
        "   ",
        "ada",
        "ada.example.com",
        "ada@@example.com",
        "ada@x@example.com",
        "@example.com",
        "ada@",
        "ada@localhost",
        "ada@example.",
        "ada@.example.com",
        "ada@example..com",
        "ada@-example.com",
        "ada@example-.com",
        "ada@example.-com",
        "ada lovelace@example.com",
        "ada@exam ple.com",
        "ada\t@example.com",
        "ada\x00@example.com",
        "ada\u0085@example.com",
        "ada\u00a0x@example.com",
        "ada\u2028@example.com",
        "Ada <ada@example.com>",
        '"ada"@example.com',
        "ada@[192.0.2.1]",
        "ada,bob@example.com",
        "ada;@example.com",
        "ada\ud800@example.com",
        "a" * 65 + "@example.com",
        "é" * 33 + "@example.com",  # 33 characters, 66 bytes
        "a@" + "b" * 64 + ".com",
        LONGEST.replace("@", "@b"),  # 255 bytes
    ],
)
def test_parse_email_rejects(value: object) -> None:
    assert parse_email(value) is None


def test_a_missing_schema_fails_at_import_with_a_clear_message(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(RuntimeError, match="CMSYNC_SCHEMA_DIR"):
        load_events_module(tmp_path, monkeypatch)
