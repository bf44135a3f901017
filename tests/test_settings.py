"""Settings: defaults, every validation message, masking, client kwargs, check-config."""

from __future__ import annotations

import os
import ssl
import subprocess
import sys
from pathlib import Path

import orjson
import pytest
import trustme

from consumer.checkconfig import cli_main, describe
from consumer.settings import (
    VARIABLES,
    ConfigError,
    Destination,
    Secret,
    Settings,
    load_settings,
)

API_KEY = "cm-api-key-9f8e7d6c5b4a"
PASSWORD = "sasl-password-0a1b2c3d"
LIST_A = "0123456789abcdef0123456789abcdef"
LIST_B = "fedcba9876543210fedcba9876543210"

ONE_DESTINATION = f"""
[[destination]]
name = "vip-newsletter"
segment_id = "vip-customers"
list_id = "{LIST_A}"
email_field = "email"
"""


def write(tmp_path: Path, text: str, name: str = "destinations.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def base_env(path: Path, **extra: str) -> dict[str, str]:
    env = {
        "CMSYNC_KAFKA_BOOTSTRAP_SERVERS": "kafka-0:9092",
        "CMSYNC_DESTINATIONS_FILE": str(path),
        "CMSYNC_CM_API_KEY": API_KEY,
    }
    env.update(extra)
    return env


def problems_of(env: dict[str, str]) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load_settings(env)
    return caught.value.problems


def destination_problems(tmp_path: Path, toml: str, **extra: str) -> list[str]:
    return problems_of(base_env(write(tmp_path, toml), **extra))


def only_problem(problems: list[str]) -> str:
    assert len(problems) == 1, problems
    return problems[0]


@pytest.fixture
def valid_env(tmp_path: Path) -> dict[str, str]:
    return base_env(write(tmp_path, ONE_DESTINATION))


# --- defaults and normalisation ------------------------------------------------------------


def test_defaults(valid_env: dict[str, str]) -> None:
    settings = load_settings(valid_env)
    kafka = settings.kafka
    assert kafka.bootstrap_servers == ("kafka-0:9092",)
    assert (kafka.topic, kafka.group_id, kafka.dlq_topic) == (
        "segment-membership",
        "cmsync",
        "segment-membership.dlq",
    )
    assert kafka.security_protocol == "PLAINTEXT"
    assert (kafka.sasl_mechanism, kafka.sasl_username, kafka.sasl_password) == (None, None, None)
    assert kafka.ssl_cafile is None
    assert settings.cm_base_url == "https://api.createsend.com/api/v3.3"
    assert settings.http_port == 9400
    assert settings.max_pending == 200000
    assert settings.applied_memory == 1000000
    for value, expected in (
        (settings.flush_interval_s, 5.0),
        (settings.rate_limit_rps, 10.0),
        (settings.shutdown_budget_s, 25.0),
        (settings.consent_refresh_s, 300.0),
    ):
        assert type(value) is float
        assert value == expected
    assert (settings.log_level, settings.log_format) == ("info", "json")
    assert settings.destinations_file == valid_env["CMSYNC_DESTINATIONS_FILE"]
    assert settings.destinations == (
        Destination(
            name="vip-newsletter",
            segment_ids=("vip-customers",),
            list_id=LIST_A,
            api_key_env="CMSYNC_CM_API_KEY",
            api_key=Secret(API_KEY),
            connection=None,
            client_id=None,
            personal_data_acknowledged=True,
            email_field="email",
            name_field=None,
            removal="delete",
            resubscribe="deleted-only",
            consent_to_track="Unchanged",
            custom_fields=(),
        ),
    )


def test_every_table_default_is_what_load_settings_uses(valid_env: dict[str, str]) -> None:
    described = describe(load_settings(valid_env))["settings"]
    assert isinstance(described, dict)
    for variable in VARIABLES:
        if variable.default is not None and variable.attr is not None:
            assert str(described[variable.name]).startswith(variable.default), variable.name


def test_values_are_normalised_at_the_edge(tmp_path: Path) -> None:
    env = base_env(
        write(tmp_path, ONE_DESTINATION),
        CMSYNC_KAFKA_BOOTSTRAP_SERVERS=" kafka-0:9092 , [::1]:9093 ,",
        CMSYNC_KAFKA_TOPIC="  events  ",
        CMSYNC_CM_BASE_URL="http://127.0.0.1:8080/api/v3.3/",
        CMSYNC_HTTP_PORT="9500",
        CMSYNC_FLUSH_INTERVAL_S="0.25",
        CMSYNC_MAX_PENDING="1_000",
        CMSYNC_RATE_LIMIT_RPS="2",
        CMSYNC_SHUTDOWN_BUDGET_S="10",
        CMSYNC_APPLIED_MEMORY="0",
        CMSYNC_LOG_LEVEL="DEBUG",
        CMSYNC_LOG_FORMAT="Console",
        CMSYNC_CONSENT_REFRESH_S="60",
        CMSYNC_KAFKA_SECURITY_PROTOCOL="sasl_plaintext",
        CMSYNC_KAFKA_SASL_MECHANISM="scram-sha-512",
        CMSYNC_KAFKA_SASL_USERNAME="svc",
        CMSYNC_KAFKA_SASL_PASSWORD=PASSWORD,
    )
    settings = load_settings(env)
    assert settings.kafka.bootstrap_servers == ("kafka-0:9092", "[::1]:9093")
    assert settings.kafka.topic == "events"
    assert settings.cm_base_url == "http://127.0.0.1:8080/api/v3.3"
    assert settings.http_port == 9500
    assert settings.flush_interval_s == 0.25
    assert settings.max_pending == 1000
    assert type(settings.rate_limit_rps) is float
    assert settings.applied_memory == 0
    assert (settings.log_level, settings.log_format) == ("debug", "console")
    assert settings.consent_refresh_s == 60.0
    assert settings.kafka.security_protocol == "SASL_PLAINTEXT"
    assert settings.kafka.sasl_mechanism == "SCRAM-SHA-512"
    assert settings.kafka.sasl_password == Secret(PASSWORD)


def test_http_port_zero_means_any_free_port(valid_env: dict[str, str]) -> None:
    valid_env["CMSYNC_HTTP_PORT"] = "0"
    assert load_settings(valid_env).http_port == 0


def test_blank_values_count_as_unset(valid_env: dict[str, str]) -> None:
    valid_env.update(CMSYNC_HTTP_PORT="", CMSYNC_LOG_LEVEL="   ", CMSYNC_KAFKA_SASL_PASSWORD="")
    settings = load_settings(valid_env)
    assert settings.http_port == 9400
    assert settings.log_level == "info"
    assert settings.kafka.sasl_password is None


def test_destination_file_fully_specified(tmp_path: Path) -> None:
    toml = f"""
[[destination]]
name = "vip-newsletter"
segment_id = "vip-customers"
list_id = "{LIST_A.upper()}"
api_key_env = "CMSYNC_CM_API_KEY_EU"
email_field = "email"
name_field = "full_name"
removal = "unsubscribe"
resubscribe = "Always"
consent_to_track = "yes"

[destination.custom_fields]
Tier = "tier"
City = "city"

[[destination]]
name = "vip.all_2"
segment_id = "vip-customers"
list_id = "{LIST_B}"
email_field = "email"
consent_to_track = "NO"
"""
    env = base_env(write(tmp_path, toml), CMSYNC_CM_API_KEY_EU=f"  {API_KEY}-eu\n")
    first, second = load_settings(env).destinations
    assert first.list_id == LIST_A  # upper-case accepted, lower-cased
    assert first.api_key_env == "CMSYNC_CM_API_KEY_EU"
    assert first.api_key.reveal() == f"{API_KEY}-eu"  # a secret file's newline is stripped
    assert first.name_field == "full_name"
    assert (first.removal, first.resubscribe, first.consent_to_track) == (
        "unsubscribe",
        "always",
        "Yes",
    )
    assert first.custom_fields == (("Tier", "tier"), ("City", "city"))  # file order kept
    assert second.consent_to_track == "No"
    assert second.api_key.reveal() == API_KEY


def test_consent_to_track_unchanged_any_case(tmp_path: Path) -> None:
    toml = ONE_DESTINATION + 'consent_to_track = "UNCHANGED"\n'
    (destination,) = load_settings(base_env(write(tmp_path, toml))).destinations
    assert destination.consent_to_track == "Unchanged"


# --- environment problems ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("CMSYNC_HTTP_PORT", "-1", "between 0 and 65535, got -1"),
        ("CMSYNC_HTTP_PORT", "65536", "between 0 and 65535"),
        ("CMSYNC_HTTP_PORT", "http", "whole number between 0 and 65535, got 'http'"),
        ("CMSYNC_HTTP_PORT", "94.5", "whole number"),
        ("CMSYNC_FLUSH_INTERVAL_S", "0", "greater than 0"),
        ("CMSYNC_FLUSH_INTERVAL_S", "-1", "greater than 0"),
        ("CMSYNC_FLUSH_INTERVAL_S", "nan", "finite number greater than 0"),
        ("CMSYNC_FLUSH_INTERVAL_S", "inf", "finite number greater than 0"),
        ("CMSYNC_FLUSH_INTERVAL_S", "5s", "number greater than 0, got '5s'"),
        ("CMSYNC_MAX_PENDING", "0", ">= 1"),
        ("CMSYNC_MAX_PENDING", "lots", "whole number >= 1"),
        ("CMSYNC_RATE_LIMIT_RPS", "0", "greater than 0"),
        ("CMSYNC_SHUTDOWN_BUDGET_S", "-5", "greater than 0"),
        ("CMSYNC_APPLIED_MEMORY", "-1", ">= 0"),
        ("CMSYNC_CONSENT_REFRESH_S", "0", "greater than 0"),
        ("CMSYNC_KAFKA_SECURITY_PROTOCOL", "TLS", "PLAINTEXT, SSL, SASL_PLAINTEXT, SASL_SSL"),
        ("CMSYNC_KAFKA_SECURITY_PROTOCOL", "SASL-SSL", 'did you mean "SASL_SSL"'),
        ("CMSYNC_LOG_LEVEL", "verbose", "debug, info, warning, error, critical"),
        ("CMSYNC_LOG_LEVEL", "warn", 'did you mean "warning"'),
        ("CMSYNC_LOG_FORMAT", "text", "json, console"),
        ("CMSYNC_CM_BASE_URL", "ftp://api.createsend.com", "http:// or https:// URL"),
        ("CMSYNC_CM_BASE_URL", "api.createsend.com/api/v3.3", "http:// or https:// URL"),
        ("CMSYNC_CM_BASE_URL", "https://", "with a host"),
        ("CMSYNC_CM_BASE_URL", "http://[::1", "not a valid URL"),
        ("CMSYNC_CM_BASE_URL", "https://host:99999/api", "invalid port"),
        ("CMSYNC_CM_BASE_URL", "https://host/api?x=1", "query"),
        ("CMSYNC_KAFKA_BOOTSTRAP_SERVERS", "kafka-0", "'kafka-0' is not host:port"),
        ("CMSYNC_KAFKA_BOOTSTRAP_SERVERS", "kafka://kafka-0:9092", "is not host:port"),
        ("CMSYNC_KAFKA_BOOTSTRAP_SERVERS", "a:9092,b:x", "port of 'b:x' must be a number"),
        ("CMSYNC_KAFKA_BOOTSTRAP_SERVERS", "a:65536", "between 1 and 65535"),
        ("CMSYNC_KAFKA_BOOTSTRAP_SERVERS", ",", "lists no host:port"),
    ],
)
def test_environment_problem(
    valid_env: dict[str, str], name: str, value: str, expected: str
) -> None:
    valid_env[name] = value
    problem = only_problem(problems_of(valid_env))
    assert problem.startswith(name)
    assert expected in problem


def test_credentials_in_base_url_are_refused_and_not_echoed(valid_env: dict[str, str]) -> None:
    valid_env["CMSYNC_CM_BASE_URL"] = f"https://user:{PASSWORD}@api.createsend.com/api/v3.3"
    problem = only_problem(problems_of(valid_env))
    assert "must not contain a user name or password" in problem
    assert PASSWORD not in problem


def test_required_variables(tmp_path: Path) -> None:
    problems = problems_of({"CMSYNC_KAFKA_BOOTSTRAP_SERVERS": " ", "CMSYNC_CM_API_KEY": API_KEY})
    assert len(problems) == 2
    assert problems[0].startswith("CMSYNC_KAFKA_BOOTSTRAP_SERVERS is required")
    assert problems[1].startswith("CMSYNC_DESTINATIONS_FILE is required")


def test_sasl_protocols_need_mechanism_username_password(valid_env: dict[str, str]) -> None:
    valid_env["CMSYNC_KAFKA_SECURITY_PROTOCOL"] = "SASL_PLAINTEXT"
    problems = problems_of(valid_env)
    assert len(problems) == 3
    for problem, name in zip(
        problems,
        ("CMSYNC_KAFKA_SASL_MECHANISM", "CMSYNC_KAFKA_SASL_USERNAME", "CMSYNC_KAFKA_SASL_PASSWORD"),
        strict=True,
    ):
        assert problem.startswith(f"{name} is required with SASL_PLAINTEXT")


def test_unknown_sasl_mechanism(valid_env: dict[str, str]) -> None:
    valid_env.update(
        CMSYNC_KAFKA_SECURITY_PROTOCOL="SASL_PLAINTEXT",
        CMSYNC_KAFKA_SASL_MECHANISM="SCRAM-SHA-1",
        CMSYNC_KAFKA_SASL_USERNAME="svc",
        CMSYNC_KAFKA_SASL_PASSWORD=PASSWORD,
    )
    problem = only_problem(problems_of(valid_env))
    assert problem.startswith("CMSYNC_KAFKA_SASL_MECHANISM must be one of PLAIN, SCRAM-SHA-256")


def test_sasl_settings_without_sasl_protocol(valid_env: dict[str, str]) -> None:
    valid_env.update(CMSYNC_KAFKA_SASL_USERNAME="svc", CMSYNC_KAFKA_SASL_PASSWORD=PASSWORD)
    problem = only_problem(problems_of(valid_env))
    assert problem.startswith("CMSYNC_KAFKA_SASL_USERNAME, CMSYNC_KAFKA_SASL_PASSWORD are set")
    assert "PLAINTEXT" in problem
    assert PASSWORD not in problem


def test_cafile_problems(valid_env: dict[str, str], tmp_path: Path) -> None:
    valid_env["CMSYNC_KAFKA_SECURITY_PROTOCOL"] = "SSL"
    valid_env["CMSYNC_KAFKA_SSL_CAFILE"] = str(tmp_path / "missing.pem")
    assert only_problem(problems_of(valid_env)).endswith("missing.pem): file not found")

    valid_env["CMSYNC_KAFKA_SSL_CAFILE"] = str(tmp_path)
    assert only_problem(problems_of(valid_env)).endswith("is not a file")

    valid_env["CMSYNC_KAFKA_SSL_CAFILE"] = str(write(tmp_path, "not a certificate\n", "ca.pem"))
    assert only_problem(problems_of(valid_env)).endswith("contains no PEM CA certificate")

    valid_env["CMSYNC_KAFKA_SECURITY_PROTOCOL"] = "PLAINTEXT"
    problem = only_problem(problems_of(valid_env))
    assert problem.startswith("CMSYNC_KAFKA_SSL_CAFILE is set but")
    assert "used only with SSL or SASL_SSL" in problem


# --- destinations file problems -------------------------------------------------------------


def test_destinations_file_missing(tmp_path: Path) -> None:
    problems = problems_of(base_env(tmp_path / "nope.toml"))
    assert (
        only_problem(problems) == f"CMSYNC_DESTINATIONS_FILE ({tmp_path}/nope.toml): file not found"
    )


def test_destinations_file_is_a_directory(tmp_path: Path) -> None:
    assert only_problem(problems_of(base_env(tmp_path))).endswith("is a directory, not a file")


def test_destinations_file_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "d.toml"
    path.write_bytes(b'[[destination]]\nname = "caf\xe9"\n')
    assert only_problem(problems_of(base_env(path))).endswith("is not UTF-8 text")


def test_destinations_file_not_toml_names_the_line(tmp_path: Path) -> None:
    problem = only_problem(destination_problems(tmp_path, "[[destination]]\nname = vip\n"))
    assert "is not valid TOML" in problem
    assert "line 2" in problem


def test_literal_duplicate_key_is_a_toml_error(tmp_path: Path) -> None:
    toml = ONE_DESTINATION + '[destination.custom_fields]\nCity = "city"\nCity = "town"\n'
    problem = only_problem(destination_problems(tmp_path, toml))
    assert "is not valid TOML: Cannot overwrite a value" in problem


def test_byte_order_mark_is_tolerated(tmp_path: Path) -> None:
    path = tmp_path / "d.toml"
    path.write_bytes(b"\xef\xbb\xbf" + ONE_DESTINATION.encode())
    assert len(load_settings(base_env(path)).destinations) == 1


@pytest.mark.parametrize(
    ("toml", "expected"),
    [
        ("", "defines no destinations"),
        ("# nothing yet\n", "defines no destinations"),
        ("destination = []\n", "defines no destinations"),
        ('[destination]\nname = "x"\n', "written [[destination]] (an array of tables)"),
        ('destination = ["x"]\n', '"destination" must be an array of tables'),
    ],
)
def test_no_usable_destinations(tmp_path: Path, toml: str, expected: str) -> None:
    problem = only_problem(destination_problems(tmp_path, toml))
    assert problem.startswith("CMSYNC_DESTINATIONS_FILE (")
    assert expected in problem


def test_unknown_top_level_key(tmp_path: Path) -> None:
    toml = ONE_DESTINATION + '\n[[destinations]]\nname = "other"\n'
    problem = only_problem(destination_problems(tmp_path, toml))
    assert problem.endswith('unknown top-level key "destinations" (did you mean "destination"?)')


def test_unknown_top_level_key_without_suggestion(tmp_path: Path) -> None:
    problem = only_problem(destination_problems(tmp_path, "version = 2\n" + ONE_DESTINATION))
    assert problem.endswith('unknown top-level key "version"')


D = f"""[[destination]]
name = "vip"
segment_id = "vip-customers"
list_id = "{LIST_A}"
email_field = "email"
"""


def test_unsubscribe_all_client_lists_is_a_boolean_false_by_default(tmp_path: Path) -> None:
    def destination(extra: str) -> Destination:
        (dest,) = load_settings(base_env(write(tmp_path, D + extra))).destinations
        return dest

    assert destination("").unsubscribe_all_client_lists is False
    accepted = destination('removal = "unsubscribe"\nunsubscribe_all_client_lists = true\n')
    assert accepted.unsubscribe_all_client_lists is True
    assert (
        destination("unsubscribe_all_client_lists = false\n").unsubscribe_all_client_lists is False
    )
    problem = only_problem(
        destination_problems(tmp_path, D + 'unsubscribe_all_client_lists = "yes"\n')
    )
    assert problem == (
        'destination #1 "vip": "unsubscribe_all_client_lists" must be a boolean (true or '
        "false), not a string"
    )


def test_extras_is_keep_by_default_and_remove_on_request(tmp_path: Path) -> None:
    def destination(extra: str) -> Destination:
        (dest,) = load_settings(base_env(write(tmp_path, D + extra))).destinations
        return dest

    assert destination("").extras == "keep"
    assert destination('extras = "Remove"\n').extras == "remove"
    problem = only_problem(destination_problems(tmp_path, D + 'extras = "delete"\n'))
    assert problem == (
        'destination #1 "vip": "extras" must be one of "keep", "remove", got \'delete\''
    )


@pytest.mark.parametrize(
    ("toml", "expected"),
    [
        (D + 'emial_field = "mail"\n', 'unknown key "emial_field" (did you mean "email_field"?)'),
        (D + "[destination.custom_field]\nCity = 'city'\n", '(did you mean "custom_fields"?)'),
        (D + "colour = 'red'\n", 'unknown key "colour"'),
        (
            D.replace('segment_id = "vip-customers"\n', ""),
            'required key "segment_id" (or "segment_ids") is missing',
        ),
        (D.replace(f'list_id = "{LIST_A}"\n', ""), 'required key "list_id" is missing'),
        (D.replace('email_field = "email"\n', ""), 'required key "email_field" is missing'),
        (D.replace(f'"{LIST_A}"', "0x0123"), '"list_id" must be a string, not an integer'),
        (D.replace('"email"', "true"), '"email_field" must be a string, not a boolean'),
        (D.replace('"email"', '["email"]'), '"email_field" must be a string, not an array'),
        (D + "name_field = 1.5\n", '"name_field" must be a string, not a float'),
        (D.replace('"vip-customers"', '""'), '"segment_id" must not be empty'),
        (D.replace('"vip-customers"', '"vip "'), '"segment_id" must not start or end with spaces'),
        (D.replace(LIST_A, LIST_A[:-1]), "32 hexadecimal characters (got 31 characters)"),
        (D.replace(LIST_A, "g" + LIST_A[1:]), "(got characters other than 0-9 and a-f)"),
        (D.replace('"vip"', '"vip newsletter"'), "is not usable as a metric label"),
        (D.replace('"vip"', '"' + "v" * 65 + '"'), "is not usable as a metric label"),
        (D.replace('"vip"', '"vïp"'), "is not usable as a metric label"),
        (D + 'removal = "archive"\n', '"removal" must be one of "delete", "unsubscribe"'),
        (D + 'resubscribe = "deleted_only"\n', 'did you mean "deleted-only"?'),
        (D + 'consent_to_track = "maybe"\n', '"Yes", "No", "Unchanged", got \'maybe\''),
        (D + 'api_key_env = "CM KEY"\n', '"api_key_env" must name an environment variable'),
        (D + 'api_key_env = ""\n', '"api_key_env" must not be empty'),
        (D + "custom_fields = 'City'\n", "custom_fields must be a table"),
        (D + '[destination.custom_fields]\n"" = "city"\n', "key must be a non-empty string"),
        (D + '[destination.custom_fields]\n" " = "city"\n', "key must be a non-empty string"),
        (D + "[destination.custom_fields]\nCity = 3\n", '"City" must map to a profile field'),
        (D + '[destination.custom_fields]\nCity = ""\n', '"City" maps to an empty profile field'),
        (
            D + '[destination.custom_fields]\nCity = "city"\ncity = "town"\n',
            'the Campaign Monitor key "City", "city" is mapped more than once',
        ),
        (
            D + '[destination.custom_fields]\nEmail = "email"\n',
            'profile field "email" is the email_field and cannot also be the custom field "Email"',
        ),
    ],
)
def test_destination_problem(tmp_path: Path, toml: str, expected: str) -> None:
    problem = only_problem(destination_problems(tmp_path, toml))
    assert problem.startswith("destination #1"), problem
    assert expected in problem


def test_destination_label_uses_valid_name_only(tmp_path: Path) -> None:
    problem = only_problem(destination_problems(tmp_path, D + 'removal = "x"\n'))
    assert problem.startswith('destination #1 "vip": ')
    problem = only_problem(destination_problems(tmp_path, D.replace('"vip"', "7")))
    assert problem == 'destination #1: "name" must be a string, not an integer'


def test_duplicate_names(tmp_path: Path) -> None:
    toml = D + "\n" + D.replace(LIST_A, LIST_B)
    assert only_problem(destination_problems(tmp_path, toml)) == (
        'destination name "vip" is used more than once (#1, #2)'
    )


def test_same_segment_to_same_list(tmp_path: Path) -> None:
    toml = D + "\n" + D.replace('"vip"', '"vip-2"')
    problem = only_problem(destination_problems(tmp_path, toml))
    assert problem.startswith(f'destinations "vip" and "vip-2" both write list {LIST_A}: ')


def test_one_list_written_by_two_destinations_is_refused_with_the_segment_ids_hint(
    tmp_path: Path,
) -> None:
    other_segment = D.replace('"vip"', '"vip-2"').replace('"vip-customers"', '"top"')
    third = D.replace('"vip"', '"vip-3"').replace('"vip-customers"', '"new"')
    problem = only_problem(destination_problems(tmp_path, D + "\n" + other_segment + "\n" + third))
    assert problem.startswith(f'destinations "vip" and "vip-2" and "vip-3" all write list {LIST_A}')
    assert "segment_ids" in problem


def test_segment_ids_make_one_list_of_several_segments(tmp_path: Path) -> None:
    toml = D.replace('segment_id = "vip-customers"', 'segment_ids = ["vip-customers", "top"]')
    (dest,) = load_settings(base_env(write(tmp_path, toml))).destinations
    assert dest.segment_ids == ("vip-customers", "top")


@pytest.mark.parametrize(
    ("segments", "problem"),
    [
        ('segment_ids = []\nsegment_id = "x"', 'give "segment_id" or "segment_ids", not both'),
        ("segment_ids = []", '"segment_ids" must be a non-empty array of strings'),
        ('segment_ids = ["a", 1]', '"segment_ids" must be a non-empty array of strings'),
        ('segment_ids = ["a", " b"]', "must not be empty nor start or end with spaces: ' b'"),
        ('segment_ids = ["a", "b", "a"]', "names 'a' more than once"),
    ],
)
def test_segment_ids_problems(tmp_path: Path, segments: str, problem: str) -> None:
    toml = D.replace('segment_id = "vip-customers"', segments)
    assert problem in only_problem(destination_problems(tmp_path, toml))


def test_one_segment_has_one_email_field(tmp_path: Path) -> None:
    work = D.replace('"vip"', '"work"').replace(LIST_A, LIST_B)
    work = work.replace('email_field = "email"', 'email_field = "work_email"')
    problem = only_problem(destination_problems(tmp_path, D + "\n" + work))
    assert problem.startswith("the destinations of segment 'vip-customers' read the address")
    assert "email_field" in problem


def test_missing_api_keys_are_reported_once_per_variable(tmp_path: Path) -> None:
    toml = (
        D
        + "\n"
        + D.replace('"vip"', '"b"').replace(LIST_A, LIST_B)
        + "\n"
        + D.replace('"vip"', '"eu"').replace(LIST_A, "a" * 32)
        + 'api_key_env = "CMSYNC_CM_API_KEY_EU"\n'
    )
    env = base_env(write(tmp_path, toml), CMSYNC_CM_API_KEY_EU=" ")
    del env["CMSYNC_CM_API_KEY"]
    assert problems_of(env) == [
        "CMSYNC_CM_API_KEY (or CMSYNC_CM_API_KEY_FILE) is not set or is empty; it holds the "
        'Campaign Monitor API key of destination #1 "vip", destination #2 "b"',
        "CMSYNC_CM_API_KEY_EU (or CMSYNC_CM_API_KEY_EU_FILE) is not set or is empty; it holds "
        'the Campaign Monitor API key of destination #3 "eu"',
    ]


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    toml = f"""
[[destination]]
name = "vip newsletter"
segment_id = "vip-customers"
list_id = "{LIST_A[:20]}"
email_field = "email"
resubscribe = "sometimes"

[[destination]]
name = "second"
list_id = "{LIST_B}"
email_field = "email"
"""
    problems = destination_problems(tmp_path, toml, CMSYNC_HTTP_PORT="-1")
    assert len(problems) == 5, problems
    assert problems[0].startswith("CMSYNC_HTTP_PORT")
    assert "metric label" in problems[1]
    assert "list_id" in problems[2]
    assert '"resubscribe"' in problems[3]
    assert (
        problems[4]
        == 'destination #2 "second": required key "segment_id" (or "segment_ids") is missing'
    )


def test_four_mistakes_in_the_file_give_four_messages(tmp_path: Path) -> None:
    toml = f"""
[[destination]]
name = "vip"
segment_id = "vip-customers"
list_id = "{LIST_A}"
email_field = "email"
removal = "remove"
consent_to_track = "sure"
colour = "red"

[destination.custom_fields]
City = "city"
CITY = "town"
"""
    problems = destination_problems(tmp_path, toml)
    assert len(problems) == 4, problems
    assert all(p.startswith('destination #1 "vip": ') for p in problems)


def test_config_error_str_lists_every_problem() -> None:
    error = ConfigError(["first thing", "second thing"])
    assert str(error) == "configuration error:\n  - first thing\n  - second thing"


# --- unknown variables ----------------------------------------------------------------------


def test_a_mistyped_variable_is_refused_with_the_nearest_name(valid_env: dict[str, str]) -> None:
    valid_env["CMSYNC_FLUSH_INTERVAL"] = "9"
    assert only_problem(problems_of(valid_env)) == (
        "unknown variable CMSYNC_FLUSH_INTERVAL; did you mean CMSYNC_FLUSH_INTERVAL_S?"
    )


def test_an_unknown_variable_far_from_every_name_is_refused_without_a_guess(
    valid_env: dict[str, str],
) -> None:
    valid_env.update(CMSYNC_ZZZ="1", CMSYNC_KAFKA_SASL_PASSWORD_FIEL="/run/secret")
    problems = problems_of(valid_env)
    assert problems == [
        "unknown variable CMSYNC_KAFKA_SASL_PASSWORD_FIEL; "
        "did you mean CMSYNC_KAFKA_SASL_PASSWORD_FILE?",
        "unknown variable CMSYNC_ZZZ: cmsync reads no such setting "
        "(`cmsync check-config --help` lists them)",
    ]


def test_blank_unknown_variable_is_refused_too(valid_env: dict[str, str]) -> None:
    valid_env["CMSYNC_MAX_PENDNG"] = ""
    assert "did you mean CMSYNC_MAX_PENDING?" in only_problem(problems_of(valid_env))


def test_variables_named_by_api_key_env_and_their_files_are_known(tmp_path: Path) -> None:
    toml = ONE_DESTINATION + 'api_key_env = "CMSYNC_CM_API_KEY_EU"\n'
    key_file = write(tmp_path, API_KEY + "\n", "key")
    env = base_env(write(tmp_path, toml), CMSYNC_CM_API_KEY_EU_FILE=str(key_file))
    (destination,) = load_settings(env).destinations
    assert destination.api_key == Secret(API_KEY)
    # the same variable is unknown when no destination names it
    problem = only_problem(
        problems_of(base_env(write(tmp_path, ONE_DESTINATION), **{"CMSYNC_CM_API_KEY_EU": API_KEY}))
    )
    assert problem == "unknown variable CMSYNC_CM_API_KEY_EU; did you mean CMSYNC_CM_API_KEY?"
    assert API_KEY not in problem


@pytest.mark.parametrize(
    "name",
    [
        "CMSYNC_TEST_KAFKA_BOOTSTRAP",
        "CMSYNC_CHAOS",
        "CMSYNC_REQUIRE_TOOLS",
        "CMSYNC_BENCH_INTAKE_EVENTS",
        "CMSYNC_FAULTS_REPORT",
        "CMSYNC_DEMO_LISTS",
        "CMSYNC_SCHEMA_DIR",
    ],
)
def test_names_reserved_for_tooling_are_not_refused(valid_env: dict[str, str], name: str) -> None:
    valid_env[name] = "1"
    load_settings(valid_env)


def test_reserved_names_cover_whole_words_only(valid_env: dict[str, str]) -> None:
    valid_env["CMSYNC_CHAOSMONKEY"] = "1"  # not CMSYNC_CHAOS nor CMSYNC_CHAOS_*
    assert only_problem(problems_of(valid_env)).startswith("unknown variable CMSYNC_CHAOSMONKEY")


def test_unknown_names_wait_for_a_readable_destinations_file(tmp_path: Path) -> None:
    # Unreadable file: nothing is known of the keys it names, so only the file is reported.
    env = base_env(tmp_path / "nope.toml", CMSYNC_CM_API_KEY_EU=API_KEY)
    assert only_problem(problems_of(env)).endswith("nope.toml): file not found")


# --- connections ----------------------------------------------------------------------------

CLIENT_ID = "00112233445566778899aabbccddeeff"

ACME = """[[connection]]
name = "acme"
api_key_env = "ACME_CM_KEY"
"""
ACKNOWLEDGED = ACME + 'personal_data = "acknowledged"\n'
VIA_ACME = D.replace('email_field = "email"\n', 'email_field = "email"\nconnection = "acme"\n')


def test_a_connection_gives_its_key_client_id_and_acknowledgement(tmp_path: Path) -> None:
    toml = (
        ACME.replace('"acme"', '"acme"\nclient_id = "' + CLIENT_ID.upper() + '"')
        + 'personal_data = "Acknowledged"\n\n'
        + VIA_ACME
        + "\n"
        + D.replace('"vip"', '"legacy"').replace(LIST_A, LIST_B)
    )
    env = base_env(write(tmp_path, toml), ACME_CM_KEY=f"{API_KEY}-acme")
    via, legacy = load_settings(env).destinations
    assert (via.connection, via.api_key_env) == ("acme", "ACME_CM_KEY")
    assert via.api_key == Secret(f"{API_KEY}-acme")
    assert via.client_id == CLIENT_ID  # upper case accepted, lower-cased
    assert via.personal_data_acknowledged
    assert via.sends
    # configured before connections existed: acknowledged, no client ID, the default key
    assert (legacy.connection, legacy.client_id, legacy.api_key_env) == (
        None,
        None,
        "CMSYNC_CM_API_KEY",
    )
    assert legacy.personal_data_acknowledged
    assert legacy.sends


def test_a_connection_without_acknowledgement_is_valid_and_sends_nothing(tmp_path: Path) -> None:
    env = base_env(write(tmp_path, ACME + "\n" + VIA_ACME), ACME_CM_KEY=API_KEY)
    (destination,) = load_settings(env).destinations
    assert destination.client_id is None
    assert not destination.personal_data_acknowledged
    assert not destination.sends


def test_a_connection_no_destination_names_is_fine_and_its_key_not_needed(
    tmp_path: Path,
) -> None:
    (destination,) = load_settings(base_env(write(tmp_path, ACME + "\n" + D))).destinations
    assert destination.connection is None


@pytest.mark.parametrize(
    ("toml", "expected"),
    [
        (ACME + 'clientid = "x"\n', 'unknown key "clientid" (did you mean "client_id"?)'),
        (ACME + "colour = 'red'\n", 'unknown key "colour"'),
        (ACME.replace('name = "acme"\n', ""), 'required key "name" is missing'),
        (ACME.replace('api_key_env = "ACME_CM_KEY"\n', ""), 'required key "api_key_env" is'),
        (ACME.replace('"acme"', '"ac me"'), "must be 1 to 64 letters, digits"),
        (ACME.replace('"ACME_CM_KEY"', '"ACME KEY"'), '"api_key_env" must name an environment'),
        (ACME + f'client_id = "{CLIENT_ID[:-1]}"\n', "ClientID, 32 hexadecimal characters"),
        (ACME + 'client_id = "' + "g" * 32 + '"\n', "got characters other than 0-9 and a-f"),
        (ACME + 'personal_data = "yes"\n', '"personal_data" must be "acknowledged", got \'yes\''),
        (ACME + "personal_data = true\n", '"personal_data" must be a string, not a boolean'),
        (ACME + 'personal_data = ""\n', '"personal_data" must not be empty'),
    ],
)
def test_connection_problem(tmp_path: Path, toml: str, expected: str) -> None:
    problem = only_problem(destination_problems(tmp_path, toml + "\n" + D))
    assert problem.startswith("connection #1"), problem
    assert expected in problem


def test_personal_data_problem_says_how_to_leave_it_unacknowledged(tmp_path: Path) -> None:
    problem = only_problem(destination_problems(tmp_path, ACME + 'personal_data = "no"\n\n' + D))
    assert "leave it out until then" in problem
    assert "send nothing" in problem


def test_a_destination_names_a_connection_or_a_key_not_both(tmp_path: Path) -> None:
    toml = ACKNOWLEDGED + "\n" + VIA_ACME + 'api_key_env = "ACME_CM_KEY"\n'
    problem = only_problem(destination_problems(tmp_path, toml, ACME_CM_KEY=API_KEY))
    assert problem == (
        'destination #1 "vip": give "connection" or "api_key_env", not both (the connection '
        "names the API key variable)"
    )


def test_an_unknown_connection_is_refused_with_the_nearest_name(tmp_path: Path) -> None:
    toml = ACKNOWLEDGED + "\n" + VIA_ACME.replace('connection = "acme"', 'connection = "acne"')
    problem = only_problem(destination_problems(tmp_path, toml, ACME_CM_KEY=API_KEY))
    assert problem == (
        'destination #1 "vip": "connection" names no [[connection]] \'acne\' (did you mean "acme"?)'
    )
    problem = only_problem(destination_problems(tmp_path, VIA_ACME))
    assert problem.endswith("no [[connection]] 'acme' (the file defines no [[connection]])")


def test_duplicate_connection_names(tmp_path: Path) -> None:
    toml = ACKNOWLEDGED + "\n" + ACME + "\n" + VIA_ACME
    problems = destination_problems(tmp_path, toml, ACME_CM_KEY=API_KEY)
    # which of the two the destination meant is unknown: one problem, not a second one for it
    assert only_problem(problems) == 'connection name "acme" is used more than once (#1, #2)'


def test_a_destination_of_an_invalid_connection_adds_no_problem_of_its_own(
    tmp_path: Path,
) -> None:
    toml = ACME + 'personal_data = "sure"\n\n' + VIA_ACME
    problem = only_problem(destination_problems(tmp_path, toml, ACME_CM_KEY=API_KEY))
    assert problem.startswith('connection #1 "acme": "personal_data" must be')


@pytest.mark.parametrize(
    ("toml", "expected"),
    [
        ('[connection]\nname = "acme"\n', "connections are written [[connection]]"),
        ('connection = ["acme"]\n', '"connection" must be an array of tables ([[connection]])'),
        ('[[connections]]\nname = "acme"\n', '"connections" (did you mean "connection"?)'),
    ],
)
def test_connection_tables_must_be_an_array_of_tables(
    tmp_path: Path, toml: str, expected: str
) -> None:
    problem = only_problem(destination_problems(tmp_path, toml + D))
    assert problem.startswith("CMSYNC_DESTINATIONS_FILE (")
    assert expected in problem


def test_a_connection_key_variable_is_known_read_from_its_file_and_missing_once(
    tmp_path: Path,
) -> None:
    second = VIA_ACME.replace('"vip"', '"b"').replace(LIST_A, LIST_B)
    toml = ACKNOWLEDGED + "\n" + VIA_ACME + "\n" + second
    key_file = write(tmp_path, API_KEY + "\n", "key")
    env = base_env(write(tmp_path, toml), ACME_CM_KEY_FILE=str(key_file))
    del env["CMSYNC_CM_API_KEY"]  # no destination uses the default key
    assert [d.api_key for d in load_settings(env).destinations] == [Secret(API_KEY)] * 2
    del env["ACME_CM_KEY_FILE"]
    assert problems_of(env) == [
        "ACME_CM_KEY (or ACME_CM_KEY_FILE) is not set or is empty; it holds the Campaign "
        'Monitor API key of connection "acme"'
    ]


def test_a_cmsync_named_connection_key_is_not_an_unknown_variable(tmp_path: Path) -> None:
    toml = ACKNOWLEDGED.replace("ACME_CM_KEY", "CMSYNC_CM_API_KEY_ACME") + "\n" + VIA_ACME
    env = base_env(write(tmp_path, toml), CMSYNC_CM_API_KEY_ACME=API_KEY)
    (destination,) = load_settings(env).destinations
    assert destination.api_key == Secret(API_KEY)
    # named by an unused connection, the variable is still cmsync's to read, not unknown
    unused = ACKNOWLEDGED.replace("ACME_CM_KEY", "CMSYNC_CM_API_KEY_ACME") + "\n" + D
    load_settings(base_env(write(tmp_path, unused), CMSYNC_CM_API_KEY_ACME=API_KEY))


def test_the_service_writes_only_to_the_destinations_that_send(tmp_path: Path) -> None:
    from consumer.app import sending

    legacy = D.replace('"vip"', '"legacy"').replace(LIST_A, LIST_B)
    env = base_env(write(tmp_path, ACME + "\n" + VIA_ACME + "\n" + legacy), ACME_CM_KEY=API_KEY)
    settings = load_settings(env)
    assert [d.name for d in settings.destinations] == ["vip", "legacy"]  # both in the state
    assert [d.name for d in sending(settings.destinations)] == ["legacy"]


# --- secrets ------------------------------------------------------------------------------


def test_secret_is_masked() -> None:
    secret = Secret(API_KEY)
    assert repr(secret) == str(secret) == f"{secret}" == "***"
    assert secret.reveal() == API_KEY
    assert secret == Secret(API_KEY)
    assert secret != Secret("other")
    assert len({secret, Secret(API_KEY)}) == 1


def test_secrets_from_files_drop_the_trailing_newline_only(tmp_path: Path) -> None:
    password_file = write(tmp_path, f" {PASSWORD} \r\n", "password")
    key_file = write(tmp_path, f"{API_KEY}\n", "key")
    env = sasl_env(tmp_path, CMSYNC_KAFKA_SASL_PASSWORD_FILE=str(password_file))
    del env["CMSYNC_KAFKA_SASL_PASSWORD"], env["CMSYNC_CM_API_KEY"]
    env["CMSYNC_CM_API_KEY_FILE"] = str(key_file)
    settings = load_settings(env)
    assert settings.kafka.sasl_password == Secret(f" {PASSWORD} ")  # a password keeps spaces
    assert settings.destinations[0].api_key == Secret(API_KEY)


def test_a_secret_and_its_file_both_set_is_an_error(tmp_path: Path) -> None:
    key_file = write(tmp_path, API_KEY, "key")
    env = sasl_env(tmp_path, CMSYNC_KAFKA_SASL_PASSWORD_FILE=str(key_file))
    env["CMSYNC_CM_API_KEY_FILE"] = str(key_file)
    assert problems_of(env) == [
        "CMSYNC_KAFKA_SASL_PASSWORD and CMSYNC_KAFKA_SASL_PASSWORD_FILE are both set: set only one",
        "CMSYNC_CM_API_KEY and CMSYNC_CM_API_KEY_FILE are both set: set only one",
    ]


def test_secret_file_problems_name_the_path_never_the_content(tmp_path: Path) -> None:
    unreadable = write(tmp_path, API_KEY, "unreadable")
    unreadable.chmod(0)
    cases = {
        str(tmp_path / "missing"): "file not found",
        str(tmp_path): "is a directory, not a file",
        str(write(tmp_path, "\n", "empty")): "is empty",
    }
    if os.geteuid() != 0:  # root reads any file
        cases[str(unreadable)] = "cannot be read (Permission denied)"
    for path, expected in cases.items():
        env = base_env(write(tmp_path, ONE_DESTINATION), CMSYNC_CM_API_KEY_FILE=path)
        del env["CMSYNC_CM_API_KEY"]
        problem = only_problem(problems_of(env))
        assert problem == f"CMSYNC_CM_API_KEY_FILE ({path}): {expected}"
        assert API_KEY not in problem


def test_a_key_file_shared_by_destinations_is_one_problem(tmp_path: Path) -> None:
    toml = D + "\n" + D.replace('"vip"', '"b"').replace(LIST_A, LIST_B)
    env = base_env(write(tmp_path, toml), CMSYNC_CM_API_KEY_FILE=str(tmp_path / "missing"))
    del env["CMSYNC_CM_API_KEY"]
    assert only_problem(problems_of(env)).endswith("missing): file not found")


def test_a_required_secret_file_counts_as_set(tmp_path: Path) -> None:
    env = sasl_env(tmp_path, CMSYNC_KAFKA_SASL_PASSWORD_FILE=str(tmp_path / "missing"))
    del env["CMSYNC_KAFKA_SASL_PASSWORD"]
    # the file's problem, not also "CMSYNC_KAFKA_SASL_PASSWORD is required with SASL_PLAINTEXT"
    assert only_problem(problems_of(env)).startswith("CMSYNC_KAFKA_SASL_PASSWORD_FILE (")


def sasl_env(tmp_path: Path, protocol: str = "SASL_PLAINTEXT", **extra: str) -> dict[str, str]:
    env = base_env(
        write(tmp_path, ONE_DESTINATION),
        CMSYNC_KAFKA_SECURITY_PROTOCOL=protocol,
        CMSYNC_KAFKA_SASL_MECHANISM="PLAIN",
        CMSYNC_KAFKA_SASL_USERNAME="svc",
        CMSYNC_KAFKA_SASL_PASSWORD=PASSWORD,
    )
    env.update(extra)
    return env


def test_secrets_not_in_repr_or_describe(tmp_path: Path) -> None:
    settings = load_settings(sasl_env(tmp_path))
    for text in (repr(settings), str(settings), orjson.dumps(describe(settings)).decode()):
        assert API_KEY not in text
        assert PASSWORD not in text
        assert "***" in text
    described = orjson.loads(orjson.dumps(describe(settings)))
    assert described["settings"]["CMSYNC_KAFKA_SASL_PASSWORD"] == "***"
    assert described["destinations"][0]["api_key"] == "***"


def test_describe_sources(valid_env: dict[str, str]) -> None:
    described = describe(
        load_settings(valid_env), {"CMSYNC_KAFKA_BOOTSTRAP_SERVERS": "environment"}
    )
    sources = described["sources"]
    assert isinstance(sources, dict)
    assert sources["CMSYNC_KAFKA_BOOTSTRAP_SERVERS"] == "environment"
    assert sources["CMSYNC_HTTP_PORT"] == "default"
    assert "sources" not in describe(load_settings(valid_env))


# --- client kwargs ------------------------------------------------------------------------


def test_client_kwargs_plaintext(valid_env: dict[str, str]) -> None:
    valid_env["CMSYNC_KAFKA_BOOTSTRAP_SERVERS"] = "k0:9092,k1:9092"
    assert load_settings(valid_env).kafka.client_kwargs() == {
        "bootstrap_servers": ["k0:9092", "k1:9092"],
        "security_protocol": "PLAINTEXT",
    }


def test_client_kwargs_sasl_plaintext(tmp_path: Path) -> None:
    kwargs = load_settings(sasl_env(tmp_path)).kafka.client_kwargs()
    assert kwargs == {
        "bootstrap_servers": ["kafka-0:9092"],
        "security_protocol": "SASL_PLAINTEXT",
        "sasl_mechanism": "PLAIN",
        "sasl_plain_username": "svc",
        "sasl_plain_password": PASSWORD,
    }


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


def test_client_kwargs_sasl_ssl_with_ca_file(tmp_path: Path, ca: trustme.CA) -> None:
    cafile = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(cafile))
    settings = load_settings(
        sasl_env(
            tmp_path,
            "SASL_SSL",
            CMSYNC_KAFKA_SASL_MECHANISM="SCRAM-SHA-256",
            CMSYNC_KAFKA_SSL_CAFILE=str(cafile),
        )
    )
    assert settings.kafka.ssl_cafile == str(cafile)
    kwargs = settings.kafka.client_kwargs()
    context = kwargs.pop("ssl_context")
    assert kwargs == {
        "bootstrap_servers": ["kafka-0:9092"],
        "security_protocol": "SASL_SSL",
        "sasl_mechanism": "SCRAM-SHA-256",
        "sasl_plain_username": "svc",
        "sasl_plain_password": PASSWORD,
    }
    assert isinstance(context, ssl.SSLContext)
    assert context.verify_mode == ssl.CERT_REQUIRED
    assert context.check_hostname
    # exactly the configured CA is trusted, not the system's
    assert context.get_ca_certs(binary_form=True) == [
        ssl.PEM_cert_to_DER_cert(ca.cert_pem.bytes().decode())
    ]


def test_mutual_tls_client_certificate(tmp_path: Path, ca: trustme.CA) -> None:
    client, other = ca.issue_cert("cmsync.example"), ca.issue_cert("other.example")
    certfile, keyfile = tmp_path / "user.crt", tmp_path / "user.key"
    client.cert_chain_pems[0].write_to_path(str(certfile))
    client.private_key_pem.write_to_path(str(keyfile))
    env = base_env(
        write(tmp_path, ONE_DESTINATION),
        CMSYNC_KAFKA_SECURITY_PROTOCOL="SSL",
        CMSYNC_KAFKA_SSL_CERTFILE=str(certfile),
        CMSYNC_KAFKA_SSL_KEYFILE=str(keyfile),
    )
    kafka = load_settings(env).kafka
    assert (kafka.ssl_certfile, kafka.ssl_keyfile) == (str(certfile), str(keyfile))
    assert isinstance(kafka.client_kwargs()["ssl_context"], ssl.SSLContext)

    other_key = tmp_path / "other.key"
    other.private_key_pem.write_to_path(str(other_key))
    problem = only_problem(problems_of({**env, "CMSYNC_KAFKA_SSL_KEYFILE": str(other_key)}))
    assert problem.startswith(f"CMSYNC_KAFKA_SSL_CERTFILE ({certfile}) and")
    assert "matching" in problem
    assert "PRIVATE KEY" not in problem

    del env["CMSYNC_KAFKA_SSL_KEYFILE"]
    assert only_problem(problems_of(env)) == (
        "CMSYNC_KAFKA_SSL_CERTFILE is set but CMSYNC_KAFKA_SSL_KEYFILE is not: "
        "mutual TLS needs both"
    )
    env.update(CMSYNC_KAFKA_SECURITY_PROTOCOL="PLAINTEXT", CMSYNC_KAFKA_SSL_KEYFILE=str(keyfile))
    problems = problems_of(env)
    assert len(problems) == 2
    assert all("used only with SSL or SASL_SSL" in p for p in problems)


def test_client_kwargs_ssl_without_ca_file(valid_env: dict[str, str]) -> None:
    valid_env["CMSYNC_KAFKA_SECURITY_PROTOCOL"] = "SSL"
    kwargs = load_settings(valid_env).kafka.client_kwargs()
    assert set(kwargs) == {"bootstrap_servers", "security_protocol", "ssl_context"}
    assert isinstance(kwargs["ssl_context"], ssl.SSLContext)


# --- check-config ---------------------------------------------------------------------------


@pytest.fixture
def clean_environ(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in list(os.environ):
        if name.startswith("CMSYNC_"):
            monkeypatch.delenv(name)
    return monkeypatch


def set_environ(monkeypatch: pytest.MonkeyPatch, env: dict[str, str]) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)


def test_check_config_text(
    tmp_path: Path, clean_environ: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    toml = ONE_DESTINATION + '[destination.custom_fields]\nCity = "city"\n'
    set_environ(clean_environ, sasl_env(tmp_path, CMSYNC_HTTP_PORT="9500"))
    write(tmp_path, toml)
    assert cli_main([]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    lines = out.splitlines()
    assert any(
        line.startswith("CMSYNC_HTTP_PORT ")
        and " = 9500 " in line
        and line.endswith("(environment)")
        for line in lines
    )
    assert any(line.startswith("CMSYNC_KAFKA_TOPIC ") and "(default)" in line for line in lines)
    assert any(
        line.startswith("CMSYNC_KAFKA_SASL_PASSWORD ") and "*** (set)" in line for line in lines
    )
    assert '[destination "vip-newsletter"]' in lines
    assert any(line.startswith("custom_fields.City") and line.endswith("= city") for line in lines)
    # aligned: every "=" of the settings block in one column
    settings_block = lines[1 : lines.index("")]
    assert len({line.index(" = ") for line in settings_block}) == 1
    assert API_KEY not in out
    assert PASSWORD not in out


def test_check_config_json(
    valid_env: dict[str, str],
    clean_environ: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    set_environ(clean_environ, valid_env)
    assert cli_main(["--format", "json"]) == 0
    out, err = capsys.readouterr()
    document = orjson.loads(out)
    assert document["settings"]["CMSYNC_FLUSH_INTERVAL_S"] == 5.0
    assert document["sources"]["CMSYNC_DESTINATIONS_FILE"] == "environment"
    assert document["destinations"][0]["list_id"] == LIST_A
    assert document["destinations"][0]["api_key"] == "***"
    assert API_KEY not in out + err


def test_check_config_says_which_destinations_send_nothing_and_exits_0(
    tmp_path: Path, clean_environ: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    legacy = D.replace('"vip"', '"legacy"').replace(LIST_A, LIST_B)
    toml = ACME + "\n" + VIA_ACME + "\n" + legacy
    set_environ(clean_environ, base_env(write(tmp_path, toml), ACME_CM_KEY=f"{API_KEY}-acme"))
    assert cli_main([]) == 0
    out, err = capsys.readouterr()
    assert err.splitlines() == [
        'warning: destination "vip" will send nothing: its connection "acme" lacks '
        'personal_data = "acknowledged", the administrator\'s acknowledgement that profiles '
        "(personal data) leave for Campaign Monitor; add that line to the [[connection]] named "
        '"acme" to start syncing this list'
    ]
    lines = out.splitlines()
    vip = lines[lines.index('[destination "vip"]') :]
    assert any(line.startswith("connection ") and "= acme" in line for line in vip)
    assert any(line.startswith("sends ") and "= no " in line for line in vip)
    legacy_lines = lines[lines.index('[destination "legacy"]') :]
    assert any(
        line.startswith("client_id ") and "suppression list is not read" in line
        for line in legacy_lines
    )
    assert any(line.startswith("sends ") and line.endswith("= yes") for line in legacy_lines)
    assert API_KEY not in out + err

    assert cli_main(["--format", "json"]) == 0
    out, err = capsys.readouterr()
    vip_json, legacy_json = orjson.loads(out)["destinations"]
    assert (vip_json["connection"], vip_json["sends"], vip_json["api_key"]) == (
        "acme",
        False,
        "***",
    )
    assert vip_json["api_key_env"] == "ACME_CM_KEY"
    assert (legacy_json["connection"], legacy_json["client_id"], legacy_json["sends"]) == (
        None,
        None,
        True,
    )
    assert "will send nothing" in err  # stdout stays one JSON document
    assert API_KEY not in out + err


def test_check_config_is_quiet_when_every_destination_sends(
    tmp_path: Path, clean_environ: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    toml = ACKNOWLEDGED.replace('"acme"', f'"acme"\nclient_id = "{CLIENT_ID}"') + "\n" + VIA_ACME
    set_environ(clean_environ, base_env(write(tmp_path, toml), ACME_CM_KEY=API_KEY))
    assert cli_main(["--format", "json"]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    (destination,) = orjson.loads(out)["destinations"]
    assert (destination["client_id"], destination["sends"]) == (CLIENT_ID, True)


def test_check_config_errors_go_to_stderr_with_exit_2(
    tmp_path: Path, clean_environ: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    set_environ(
        clean_environ,
        sasl_env(
            tmp_path,
            CMSYNC_HTTP_PORT="none",
            CMSYNC_KAFKA_SASL_MECHANISM="KERBEROS",
            CMSYNC_CM_BASE_URL=f"https://u:{API_KEY}@example.com",
        ),
    )
    write(tmp_path, D + 'removal = "x"\n')
    assert cli_main([]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    lines = err.splitlines()
    assert lines[0] == "configuration error:"
    assert len(lines) == 5
    assert all(line.startswith("  - ") for line in lines[1:])
    assert API_KEY not in err
    assert PASSWORD not in err


def test_check_config_env_file(
    tmp_path: Path, clean_environ: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, ONE_DESTINATION)
    env_file = write(
        tmp_path,
        "# deployment values\n"
        "export CMSYNC_KAFKA_BOOTSTRAP_SERVERS=file:9092\n"
        f'CMSYNC_DESTINATIONS_FILE="{path}"\n'
        f"CMSYNC_CM_API_KEY='{API_KEY}'\n"
        "CMSYNC_HTTP_PORT = 9501\n"
        "\n"
        "CMSYNC_LOG_LEVEL=debug\n",
        "cmsync.env",
    )
    clean_environ.setenv("CMSYNC_LOG_LEVEL", "error")  # the environment wins over the file
    clean_environ.setenv("CMSYNC_HTTP_PORT", "")  # blank is unset: the file's value stays
    assert cli_main(["--env-file", str(env_file), "--format", "json"]) == 0
    out, _ = capsys.readouterr()
    document = orjson.loads(out)
    assert document["settings"]["CMSYNC_KAFKA_BOOTSTRAP_SERVERS"] == ["file:9092"]
    assert document["settings"]["CMSYNC_HTTP_PORT"] == 9501
    assert document["settings"]["CMSYNC_LOG_LEVEL"] == "error"
    assert document["sources"]["CMSYNC_HTTP_PORT"] == "env file"
    assert document["sources"]["CMSYNC_LOG_LEVEL"] == "environment"
    assert API_KEY not in out


def test_check_config_env_file_problems(
    tmp_path: Path, clean_environ: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli_main(["--env-file", str(tmp_path / "none.env")]) == 2
    assert "none.env: file not found" in capsys.readouterr().err
    env_file = write(tmp_path, f"CMSYNC_CM_API_KEY {API_KEY}\nok=1\n", "bad.env")
    assert cli_main(["--env-file", str(env_file)]) == 2
    err = capsys.readouterr().err
    assert "bad.env, line 1: expected NAME=VALUE" in err
    assert API_KEY not in err


def test_check_config_help_lists_every_variable_and_default(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert cli_main(["--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: cmsync check-config")
    for variable in VARIABLES:
        line = next(line for line in out.splitlines() if line.strip().startswith(variable.name))
        if variable.default is not None:
            assert f"(default: {variable.default}" in line
        else:
            assert "(required)" in line if variable.required else "not set" in line
    assert "CMSYNC_CONSENT_REFRESH_S  (default: 300)" in out
    assert "CMSYNC_KAFKA_SASL_PASSWORD  (default: not set, secret)" in out
    flat = " ".join(out.split())
    assert "NAME_FILE, the path of a file holding it" in flat
    assert "CMSYNC_TEST, CMSYNC_BENCH, CMSYNC_DEMO" in flat
    assert "api_key_env" in flat
    assert "connection keys ([[connection]] tables" in flat
    assert "name, api_key_env, client_id, personal_data" in flat


def test_check_config_refuses_two_destinations_on_one_list_with_exit_2(
    tmp_path: Path, clean_environ: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    toml = D + "\n" + D.replace('"vip"', '"vip-2"').replace('"vip-customers"', '"top"')
    set_environ(clean_environ, base_env(write(tmp_path, toml)))
    assert cli_main([]) == 2
    assert "segment_ids" in capsys.readouterr().err


def test_check_config_refuses_an_unknown_variable_from_the_env_file(
    tmp_path: Path, clean_environ: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    set_environ(clean_environ, base_env(write(tmp_path, ONE_DESTINATION)))
    env_file = write(tmp_path, "CMSYNC_LOG_LEVLE=debug\n", "cmsync.env")
    assert cli_main(["--env-file", str(env_file)]) == 2
    err = capsys.readouterr().err
    assert "unknown variable CMSYNC_LOG_LEVLE; did you mean CMSYNC_LOG_LEVEL?" in err


def test_check_config_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["--format", "yaml"]) == 2
    assert "invalid choice" in capsys.readouterr().err


def test_settings_is_frozen(valid_env: dict[str, str]) -> None:
    settings: Settings = load_settings(valid_env)
    with pytest.raises(AttributeError):
        settings.http_port = 1  # type: ignore[misc]  # the point: frozen dataclass


def test_importing_settings_does_not_import_aiokafka() -> None:
    code = "import sys, consumer.settings; sys.exit('aiokafka' in sys.modules)"
    # S603: fixed arguments, no untrusted input
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0  # noqa: S603
