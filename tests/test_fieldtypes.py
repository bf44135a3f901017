"""consumer.fieldtypes: the listing read, every coercion rule at its boundaries, missing keys, and
a property test: coerce never raises and what it returns is valid for the field."""

from __future__ import annotations

import datetime
import re
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from consumer.fieldtypes import (
    EARLIEST_DATE,
    LATEST_DATE,
    MAX_VALUE_LENGTH,
    DataType,
    FieldType,
    FieldValue,
    Unfit,
    coerce,
    field_of,
    field_types,
    key_of,
    missing_keys,
    plain_key,
)

TEXT = FieldType("City", "Text")
NUMBER = FieldType("Age", "Number")
DATE = FieldType("Birthday", "Date")
ONE = FieldType("Tier", "MultiSelectOne", ("Gold", "Silver", "Bronze"))
MANY = FieldType("Topics", "MultiSelectMany", ("News", "Offers", "Events"))
COUNTRY = FieldType("Country", "Country")
STATE = FieldType("State", "USState")
EVERY_FIELD = (TEXT, NUMBER, DATE, ONE, MANY, COUNTRY, STATE)


def unfit_reason(value: FieldValue, field: FieldType) -> str:
    result = coerce(value, field)
    assert isinstance(result, Unfit), result
    return result.reason


# --- the listing ----------------------------------------------------------------------------


def test_field_types_from_the_customfields_listing() -> None:
    listing: list[dict[str, Any]] = [
        {"FieldName": "City", "Key": "[City]", "DataType": "Text", "FieldOptions": []},
        {"FieldName": "age", "Key": "[age]", "DataType": "Number", "FieldOptions": []},
        {"FieldName": "Birthday", "Key": "[Birthday]", "DataType": "Date", "FieldOptions": []},
        {
            "FieldName": "Tier",
            "Key": "[Tier]",
            "DataType": "MultiSelectOne",
            "FieldOptions": ["Gold", "Silver"],
            "VisibleInPreferenceCenter": True,
        },
        {"Key": "[Topics]", "DataType": "MultiSelectMany", "FieldOptions": ["News"]},
        {"Key": "[Country]", "DataType": "Country", "FieldOptions": ["Afghanistan"]},
        {"Key": "[State]", "DataType": "usstate"},  # letter case of the type does not matter
    ]
    # keyed by the key as compared (no brackets, case folded); spelled as the list does
    assert field_types(listing) == {
        "city": FieldType("City", "Text"),
        "age": FieldType("age", "Number"),
        "birthday": FieldType("Birthday", "Date"),
        "tier": FieldType("Tier", "MultiSelectOne", ("Gold", "Silver")),
        "topics": FieldType("Topics", "MultiSelectMany", ("News",)),
        # options of a type that is no multi-select are not kept
        "country": FieldType("Country", "Country"),
        "state": FieldType("State", "USState"),
    }


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"DataType": "Text"}, "custom field #1 of the listing has no Key"),
        ({"Key": "[]", "DataType": "Text"}, "has no Key"),
        ({"Key": "[Shoe]", "DataType": "Size"}, 'custom field "Shoe" has a DataType that is not'),
        ({"Key": "[Shoe]"}, 'custom field "Shoe" has a DataType that is not one of Text, Number'),
    ],
)
def test_field_types_refuses_a_listing_it_cannot_read(entry: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        field_types([entry])


def test_plain_key() -> None:
    assert plain_key("[City]") == plain_key("City") == plain_key(" [City] ") == "City"


def test_missing_keys() -> None:
    types = field_types(
        [{"Key": "[City]", "DataType": "Text"}, {"Key": "[age]", "DataType": "Number"}]
    )
    mapped = ["[City]", "age", "Tier", "[Shoe]", "Tier", "city", "[AGE]"]
    # given as mapped, in order, each once; letter case does not count (nor in Campaign
    # Monitor: a mapped "city" writes the list's "[City]")
    assert missing_keys(mapped, types) == ["Tier", "[Shoe]"]
    assert missing_keys([], types) == []


def test_a_mapped_key_finds_its_field_whatever_its_letter_case() -> None:
    types = field_types([{"Key": "[FavouriteColour]", "DataType": "Text"}])
    for mapped in (
        "FavouriteColour",
        "favouritecolour",
        "[FAVOURITECOLOUR]",
        " [favouriteColour] ",
    ):
        found = field_of(mapped, types)
        assert found is not None
        assert found.key == "FavouriteColour"  # what to send: the list's own spelling
    assert key_of("[FavouriteColour]") == "favouritecolour"
    assert field_of("Favourite", types) is None


# --- None clears ----------------------------------------------------------------------------


@pytest.mark.parametrize("field", EVERY_FIELD, ids=lambda f: f.data_type)
def test_none_and_an_empty_list_clear_every_field(field: FieldType) -> None:
    assert coerce(None, field) == ""
    assert coerce([], field) == ""


# --- Text, Country, USState -----------------------------------------------------------------


@pytest.mark.parametrize("field", [TEXT, COUNTRY, STATE], ids=lambda f: f.data_type)
@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("London", "London"),
        ("  spaced  ", "  spaced  "),  # text is sent as it is
        ("", ""),
        (42, "42"),
        (-7, "-7"),
        (1.5, "1.5"),
        (1e20, "100000000000000000000"),
        (1e-7, "0.0000001"),
        (True, "true"),
        (False, "false"),
        ("x" * MAX_VALUE_LENGTH, "x" * MAX_VALUE_LENGTH),
        ("é" * MAX_VALUE_LENGTH, "é" * MAX_VALUE_LENGTH),  # characters, not bytes
    ],
)
def test_text(field: FieldType, value: FieldValue, expected: str) -> None:
    assert coerce(value, field) == expected


def test_text_of_251_characters_does_not_fit() -> None:
    reason = unfit_reason("x" * (MAX_VALUE_LENGTH + 1), TEXT)
    assert reason == 'Text field "City" takes at most 250 characters and the value is longer'
    assert isinstance(coerce(10 ** (MAX_VALUE_LENGTH + 1), TEXT), Unfit)
    assert isinstance(coerce(10**5000, TEXT), Unfit)  # str() of it would raise
    assert isinstance(coerce(1e250, TEXT), Unfit)  # 251 digits in plain decimal
    assert isinstance(coerce(5e-324, TEXT), Unfit)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_text_of_a_float_that_is_not_finite_does_not_fit(value: float) -> None:
    assert unfit_reason(value, TEXT).startswith('Text field "City" takes text, a finite number')


def test_text_does_not_take_a_list() -> None:
    assert unfit_reason(["a", "b"], TEXT) == 'Text field "City" takes one text value, not a list'
    assert isinstance(coerce(["a"], COUNTRY), Unfit)


# --- Number ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (0, "0"),
        (42, "42"),
        (-3, "-3"),
        (10**30, "1" + "0" * 30),
        (2.5, "2.5"),
        (-0.25, "-0.25"),
        (3.0, "3.0"),
        (1e21, "1000000000000000000000"),
        (1.5e-5, "0.000015"),
        ("42", "42"),
        (" 42 ", "42"),
        ("+7", "7"),
        ("-1.50", "-1.50"),
        (".5", "0.5"),
        ("5.", "5"),
        ("1e3", "1000"),
        ("2.5E-3", "0.0025"),
        ("007", "7"),
    ],
)
def test_number(value: FieldValue, expected: str) -> None:
    assert coerce(value, NUMBER) == expected


@pytest.mark.parametrize(
    "value",
    [
        True,
        False,
        float("nan"),
        float("inf"),
        float("-inf"),
        "nan",
        "NaN",
        "inf",
        "Infinity",
        "-Infinity",
        "",
        "  ",
        "12 kg",
        "1,5",
        "1_000",
        "0x1f",
        "١٢",  # digits, but not ASCII ones
        "1e",
        ".",
        ["1"],
    ],
)
def test_number_does_not_take(value: FieldValue) -> None:
    reason = unfit_reason(value, NUMBER)
    assert reason == (
        'Number field "Age" takes a finite decimal number (a number, or a string holding one; '
        "not a boolean)"
    )


@pytest.mark.parametrize("value", ["1e251", "1e-251", "1e99999999999999999999999", 10**251])
def test_number_too_long_in_plain_decimal_does_not_fit(value: FieldValue) -> None:
    assert "at most 250 characters" in unfit_reason(value, NUMBER)


def test_number_of_250_digits_fits() -> None:
    assert coerce("9" * MAX_VALUE_LENGTH, NUMBER) == "9" * MAX_VALUE_LENGTH
    assert isinstance(coerce("9" * (MAX_VALUE_LENGTH + 1), NUMBER), Unfit)


# --- Date -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("2026-11-29", "2026/11/29"),
        ("2026/11/29", "2026/11/29"),
        (" 2026-11-29 ", "2026/11/29"),
        ("1900-01-01", "1900/01/01"),
        ("1900/01/01", "1900/01/01"),
        ("2076-06-06", "2076/06/06"),
        ("2076/06/06", "2076/06/06"),
        ("2024-02-29", "2024/02/29"),
        ("2026-11-29T12:00:00Z", "2026/11/29"),
        ("2026-11-29T12:00:00.123Z", "2026/11/29"),
        ("2026-11-29t12:00:00z", "2026/11/29"),
        ("2026-11-29 12:00:00+01:00", "2026/11/29"),
        ("1990-05-01T00:30:00+02:00", "1990/05/01"),  # the date as written, not moved to UTC
        ("2016-12-31T23:59:60Z", "2016/12/31"),  # a leap second
        ("2076-06-06T23:59:59-12:00", "2076/06/06"),
        ("1900-01-01T00:00:00+14:00", "1900/01/01"),
    ],
)
def test_date(value: str, expected: str) -> None:
    assert coerce(value, DATE) == expected


@pytest.mark.parametrize(
    "value",
    [
        "1899-12-31",
        "1899/12/31",
        "2076-06-07",
        "2076/06/07",
        "2077-01-01",
        "0000-01-01",
        "2023-02-29",
        "2026-13-01",
        "2026-00-10",
        "2026-11-31",
        "2026-11-29T24:00:00Z",
        "2026-11-29T12:60:00Z",
        "2026-11-29T12:00:61Z",
        "2026-11-29T12:00:00+24:00",
        "2026-11-29T12:00:00",  # RFC 3339 needs the offset
        "2026-11-29T12:00Z",
        "2076-06-07T00:00:00Z",
        "2026-11/29",
        "29/11/2026",
        "2026-1-5",
        "20261129",
        "２０２６-１１-２９",
        "yesterday",
        "",
        20261129,
        1.5,
        True,
        ["2026-11-29"],
    ],
)
def test_date_does_not_take(value: FieldValue) -> None:
    reason = unfit_reason(value, DATE)
    assert reason == (
        'Date field "Birthday" takes a date as YYYY-MM-DD, YYYY/MM/DD or an RFC 3339 '
        "timestamp, from 1900/01/01 to 2076/06/06"
    )


# --- multi-select ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("Gold", "Gold"),
        ("gold", "Gold"),
        ("SILVER", "Silver"),
        (" bronze ", "Bronze"),
        (["gold"], "Gold"),
    ],
)
def test_multi_select_one_writes_the_option_as_declared(value: FieldValue, expected: str) -> None:
    assert coerce(value, ONE) == expected


def test_multi_select_one_compares_scalars_as_text() -> None:
    sizes = FieldType("Size", "MultiSelectOne", ("1", "2", "true"))
    assert coerce(2, sizes) == "2"
    assert coerce(True, sizes) == "true"
    assert isinstance(coerce(2.5, sizes), Unfit)
    assert isinstance(coerce(float("nan"), sizes), Unfit)


@pytest.mark.parametrize("value", ["Platinum", "Gol", "", 1, ["Gold", "Silver"], ["Platinum"]])
def test_multi_select_one_does_not_take(value: FieldValue) -> None:
    assert unfit_reason(value, ONE).startswith(
        'MultiSelectOne field "Tier" takes one of its 3 options'
    )


def test_multi_select_one_without_options_takes_nothing_but_a_clear() -> None:
    empty = FieldType("Tier", "MultiSelectOne")
    assert isinstance(coerce("Gold", empty), Unfit)
    assert coerce(None, empty) == ""


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (["News"], ["News"]),
        (["news", "OFFERS"], ["News", "Offers"]),
        (["Events", "News"], ["Events", "News"]),  # the order given
        (["News", "news", "News"], ["News"]),  # each once
        ("offers", ["Offers"]),  # one option as a string
    ],
)
def test_multi_select_many(value: FieldValue, expected: list[str]) -> None:
    assert coerce(value, MANY) == expected


@pytest.mark.parametrize("value", [["News", "Sport"], ["Sport"], "News,Offers", "Sport", ""])
def test_multi_select_many_takes_options_only(value: FieldValue) -> None:
    assert unfit_reason(value, MANY) == (
        'MultiSelectMany field "Topics" takes options of its 3, each one of them'
    )


# --- reasons carry no personal data ---------------------------------------------------------

SENTINEL = "ada.lovelace@example.com"


@pytest.mark.parametrize("field", EVERY_FIELD, ids=lambda f: f.data_type)
def test_a_reason_names_the_field_and_type_never_the_value(field: FieldType) -> None:
    for value in (SENTINEL * 11, [SENTINEL, SENTINEL + "x"], SENTINEL):
        result = coerce(value, field)
        if isinstance(result, Unfit):
            assert SENTINEL not in result.reason
            assert f'{field.data_type} field "{field.key}"' in result.reason


# --- property: never raises, and what it returns is valid for the field ---------------------

PROFILE = settings(deadline=None, max_examples=300)

field_values: st.SearchStrategy[FieldValue] = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=-(10**300), max_value=10**300),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=300),
    st.text(alphabet="0123456789+-.eE_ ", max_size=30),  # near-numbers
    st.dates(datetime.date(1, 1, 1), datetime.date(9999, 12, 31)).map(str),
    st.dates().map(lambda d: d.strftime("%Y/%m/%d")),
    st.datetimes(timezones=st.timezones()).map(lambda t: t.isoformat()),
    st.from_regex(
        r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(Z|[+-][0-9]{2}:[0-9]{2})",
        fullmatch=True,
    ),
    st.sampled_from(["Gold", "gold", "News", " offers ", "Sport"]),
    st.lists(
        st.one_of(st.text(max_size=5), st.sampled_from(["News", "OFFERS", "Gold"])), max_size=5
    ),
)
data_types: st.SearchStrategy[DataType] = st.sampled_from(
    ["Text", "Number", "Date", "MultiSelectOne", "MultiSelectMany", "Country", "USState"]
)
field_kinds = st.builds(
    FieldType,
    key=st.sampled_from(["City", "Age", "Tier"]),
    data_type=data_types,
    options=st.lists(
        st.one_of(st.sampled_from(["Gold", "Silver", "News", "Offers"]), st.text(max_size=8)),
        max_size=5,
    ).map(tuple),
)
PLAIN_DECIMAL = re.compile(r"-?[0-9]+(\.[0-9]+)?")


def assert_valid(result: str | list[str] | Unfit, field: FieldType) -> None:
    if isinstance(result, Unfit):
        assert result.reason.startswith(f'{field.data_type} field "{field.key}" takes ')
        return
    if result == "":
        return  # clears the field
    if field.data_type == "MultiSelectMany":
        assert isinstance(result, list)
        assert result
        assert len(set(result)) == len(result)
        assert all(option in field.options for option in result)
        return
    assert isinstance(result, str)
    assert len(result) <= MAX_VALUE_LENGTH
    if field.data_type == "Number":
        assert PLAIN_DECIMAL.fullmatch(result), result
        assert Decimal(result).is_finite()
    elif field.data_type == "Date":
        written = datetime.datetime.strptime(result, "%Y/%m/%d").date()
        assert EARLIEST_DATE <= written <= LATEST_DATE
        assert written.strftime("%Y/%m/%d") == result
    elif field.data_type == "MultiSelectOne":
        assert result in field.options


@PROFILE
@given(value=field_values, field=field_kinds)
def test_coerce_never_raises_and_returns_what_the_field_holds(
    value: FieldValue, field: FieldType
) -> None:
    result = coerce(value, field)
    assert_valid(result, field)
    if value is None:
        assert result == ""


@PROFILE
@given(day=st.dates(EARLIEST_DATE, LATEST_DATE), separator=st.sampled_from(["-", "/"]))
def test_every_date_in_range_fits(day: datetime.date, separator: str) -> None:
    assert coerce(day.strftime(f"%Y{separator}%m{separator}%d"), DATE) == day.strftime("%Y/%m/%d")


@PROFILE
@given(
    number=st.one_of(
        st.integers(-(10**50), 10**50), st.floats(allow_nan=False, allow_infinity=False)
    )
)
def test_a_number_reads_back_as_itself(number: int | float) -> None:
    exact = Decimal(repr(number) if isinstance(number, float) else number)
    written = coerce(number, NUMBER)
    if isinstance(written, Unfit):  # 1e250 and 5e-324 need more than 250 digits
        assert len(f"{exact:f}") > MAX_VALUE_LENGTH
        return
    assert isinstance(written, str)
    assert Decimal(written) == exact
    assert coerce(written, NUMBER) == written  # coercing what it wrote changes nothing
