"""`cmsync check-config`: load and validate the configuration, print it resolved, secrets masked.

Exit 0 when valid; exit 2 listing every problem (`ConfigError`) otherwise, or on a usage error.
``--online`` also asks Campaign Monitor about every destination that sends (`online_checks`:
one request for the list details and one for its custom fields, judged by
`consumer.listsettings.check_list` as `cmsync run` judges them at start) and prints the
verdict per destination: exit 2 when one would be held or Campaign Monitor refuses its key or
list, 1 when one could not be checked (no answer), else 0.
A valid configuration can still hold destinations that send nothing (their connection lacks
the personal data acknowledgement): `warnings` says so, one line each, on stderr, exit 0.
``--env-file`` adds ``NAME=VALUE`` lines under the environment (the environment wins), so that a
deployment's values can be checked before they are deployed. `describe` is the resolved
configuration as plain data; it never holds a secret's value.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from operator import attrgetter
from typing import Final, Literal

import aiohttp
import orjson

from consumer.campaign_monitor.client import (
    ApiKey,
    CampaignMonitorClient,
    DestinationFatal,
    RateLimited,
    RecordRejected,
    RequestInvalid,
    TransientError,
)
from consumer.campaign_monitor.errors import DESCRIPTIONS
from consumer.cli import parse_args
from consumer.destinations import (
    CONNECTION_KEYS,
    DESTINATION_KEYS,
    ENV_NAME_RE,
    PERSONAL_DATA_ACKNOWLEDGED,
    REQUIRED_CONNECTION_KEYS,
    REQUIRED_DESTINATION_KEYS,
)
from consumer.fieldtypes import plain_key
from consumer.listsettings import check_list, refused
from consumer.settings import (
    RESERVED,
    VARIABLES,
    ConfigError,
    Destination,
    Settings,
    load_settings,
)
from consumer.variables import FILE_SUFFIX, is_set

_NAMES = frozenset(v.name for v in VARIABLES)
#: The longest an --online request may take (the service's own requests may take longer).
ONLINE_TIMEOUT_S: Final = 30.0


def origins_of(env: Mapping[str, str], label: str) -> dict[str, str]:
    """``{variable: label}`` for every table variable `env` sets (blank counts as unset)."""
    return {name: label for name, value in env.items() if name in _NAMES and is_set(value)}


def _plain(value: object, secret: bool) -> object:
    if secret:
        return None if value is None else "***"
    if isinstance(value, tuple):
        return list(value)
    return value


def describe(settings: Settings, origins: Mapping[str, str] | None = None) -> dict[str, object]:
    """The resolved configuration as plain data (JSON-able), secrets masked as ``"***"``.

    A secret that is not set is ``None``. With `origins` (see `origins_of`) the result also says
    where each variable's value came from; variables absent from `origins` show "default".
    API keys are shown per destination (the variable each one names, and ``"***"``), with the
    connection it names, the client ID and whether it sends (`Destination.sends`).
    """
    values: dict[str, object] = {}
    for variable in VARIABLES:
        if variable.attr is not None:
            values[variable.name] = _plain(attrgetter(variable.attr)(settings), variable.secret)
    destinations = [
        {
            "name": d.name,
            "segment_ids": list(d.segment_ids),
            "list_id": d.list_id,
            "api_key_env": d.api_key_env,
            "api_key": "***",
            "connection": d.connection,
            "client_id": d.client_id,
            "sends": d.sends,
            "email_field": d.email_field,
            "name_field": d.name_field,
            "removal": d.removal,
            "resubscribe": d.resubscribe,
            "consent_to_track": d.consent_to_track,
            "unsubscribe_all_client_lists": d.unsubscribe_all_client_lists,
            "extras": d.extras,
            "custom_fields": dict(d.custom_fields),
        }
        for d in settings.destinations
    ]
    described: dict[str, object] = {"settings": values, "destinations": destinations}
    if origins is not None:
        described["sources"] = {name: origins.get(name, "default") for name in values}
    return described


def warnings(settings: Settings) -> list[str]:
    """One line per destination that is valid but will send nothing, saying why and how to
    change that. No secret, no personal data."""
    return [
        f'warning: destination "{d.name}" will send nothing: its connection "{d.connection}" '
        f'lacks personal_data = "{PERSONAL_DATA_ACKNOWLEDGED}", the administrator\'s '
        "acknowledgement that profiles (personal data) leave for Campaign Monitor; add that "
        f'line to the [[connection]] named "{d.connection}" to start syncing this list'
        for d in settings.destinations
        if not d.sends
    ]


def _text_value(value: object) -> str:
    if value is None:
        return "(not set)"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if value == "***":
        return "*** (set)"
    if isinstance(value, list):
        return ",".join(map(str, value))
    return str(value)


def _aligned(rows: Sequence[tuple[str, str, str]]) -> list[str]:
    width = max(len(key) for key, _, _ in rows)
    value_width = max(len(value) for _, value, _ in rows)
    return [
        f"{key:<{width}} = {value:<{value_width}}  ({note})".rstrip()
        if note
        else f"{key:<{width}} = {value}"
        for key, value, note in rows
    ]


def render_text(described: Mapping[str, object]) -> str:
    """`describe` output as aligned ``key = value`` lines, one section per destination."""
    values = described["settings"]
    sources = described.get("sources", {})
    destinations = described["destinations"]
    assert isinstance(values, dict)
    assert isinstance(sources, dict)
    assert isinstance(destinations, list)
    lines = ["# cmsync configuration (valid; secrets masked)"]
    lines += _aligned(
        [(name, _text_value(value), sources.get(name, "")) for name, value in values.items()]
    )
    for destination in destinations:
        rows: list[tuple[str, str, str]] = []
        for key, value in destination.items():
            if key == "custom_fields":
                rows += [(f"custom_fields.{k}", v, "") for k, v in value.items()]
            elif key == "api_key":
                rows.append((key, _text_value(value), f"from {destination['api_key_env']}"))
            elif key == "client_id" and value is None:
                rows.append((key, _text_value(value), "the client's suppression list is not read"))
            elif key == "sends" and not value:
                rows.append((key, _text_value(value), "personal data not acknowledged"))
            else:
                rows.append((key, _text_value(value), ""))
        lines += ["", f'[destination "{destination["name"]}"]', *_aligned(rows)]
    return "\n".join(lines)


Verdict = Literal["ok", "held", "refused", "unanswered", "not checked"]
#: The exit code each verdict asks for (the largest wins; 0 when every destination is ok).
_EXIT: Final[Mapping[Verdict, int]] = {
    "ok": 0,
    "not checked": 0,
    "unanswered": 1,
    "held": 2,
    "refused": 2,
}


@dataclass(frozen=True, slots=True)
class OnlineCheck:
    """What Campaign Monitor says of one destination (no secret, no personal data)."""

    destination: str
    verdict: Verdict
    problems: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()
    unsubscribe_setting: str | None = None
    confirmed_opt_in: bool | None = None
    custom_fields: dict[str, str] = field(default_factory=dict)  # key -> DataType, as listed


async def _check_destination(client: CampaignMonitorClient, dest: Destination) -> OnlineCheck:
    name = dest.name
    try:
        details = await client.list_details(dest.list_id)
        fields = await client.custom_fields(dest.list_id)
    except DestinationFatal as exc:
        description = DESCRIPTIONS.get(exc.code, "") if exc.code is not None else ""
        return OnlineCheck(
            name,
            "refused",
            (
                f"Campaign Monitor refused the destination (HTTP {exc.status}, code {exc.code}"
                + (f", {description}" if description else "")
                + f"): check the API key in {dest.api_key_env} and list_id {dest.list_id}",
            ),
        )
    except (RecordRejected, RequestInvalid) as exc:
        return OnlineCheck(name, "refused", (refused(exc.code, exc.status),))
    except (RateLimited, TransientError) as exc:
        return OnlineCheck(
            name,
            "unanswered",
            (f"Campaign Monitor did not answer (HTTP {exc.status}): try again",),
        )
    check = check_list(dest, details, fields)
    listed = {plain_key(str(f.get("Key"))): str(f.get("DataType")) for f in fields if f.get("Key")}
    return OnlineCheck(
        name,
        "held" if check.problems else "ok",
        check.problems,
        check.warnings,
        check.unsubscribe_setting,
        check.confirmed_opt_in,
        listed,
    )


async def online_checks(settings: Settings) -> list[OnlineCheck]:
    """Ask Campaign Monitor about every destination, in order: two requests (list details,
    custom fields) per destination that sends, one after the other, none for the others."""
    results: list[OnlineCheck] = []
    async with aiohttp.ClientSession() as session:
        for dest in settings.destinations:
            if not dest.sends:
                results.append(
                    OnlineCheck(
                        dest.name, "not checked", ("sends nothing: personal data not acknowledged",)
                    )
                )
                continue
            client = CampaignMonitorClient(
                settings.cm_base_url,
                ApiKey(dest.api_key.reveal()),
                session=session,
                timeout_s=ONLINE_TIMEOUT_S,
            )
            results.append(await _check_destination(client, dest))
    return results


def online_exit_code(results: Sequence[OnlineCheck]) -> int:
    """2 when a destination would be held or is refused, 1 when one went unanswered, else 0."""
    return max((_EXIT[r.verdict] for r in results), default=0)


def render_online(results: Sequence[OnlineCheck], base_url: str) -> str:
    """`online_checks` as text: one line per destination, its problems and warnings below."""
    lines = [f"# Campaign Monitor ({base_url}): list settings of each destination"]
    for result in results:
        verdict = {"held": "HELD: would send nothing", "refused": "REFUSED"}.get(
            result.verdict, result.verdict
        )
        lines.append(f'[destination "{result.destination}"] {verdict}')
        if result.unsubscribe_setting is not None:
            lines.append(
                f"  UnsubscribeSetting = {result.unsubscribe_setting}, "
                f"ConfirmedOptIn = {_text_value(result.confirmed_opt_in)}"
            )
        lines += [f"  problem: {problem}" for problem in result.problems]
        lines += [f"  warning: {warning}" for warning in result.warnings]
    return "\n".join(lines)


def _read_env_file(path: str) -> dict[str, str]:
    """``NAME=VALUE`` lines; blank lines, ``#`` comments and an ``export`` prefix are allowed,
    one pair of surrounding quotes is removed. No escapes, no inline comments."""
    where = f"--env-file {path}"
    try:
        with open(path, encoding="utf-8-sig") as file:
            text = file.read()
    except FileNotFoundError:
        raise ConfigError([f"{where}: file not found"]) from None
    except UnicodeDecodeError:
        raise ConfigError([f"{where}: is not UTF-8 text"]) from None
    except OSError as error:
        raise ConfigError([f"{where}: cannot be read ({error.strerror})"]) from None
    values: dict[str, str] = {}
    problems: list[str] = []
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.startswith("export "):
            stripped = stripped.removeprefix("export ").lstrip()
        name, equals, value = stripped.partition("=")
        name, value = name.strip(), value.strip()
        if not equals or not ENV_NAME_RE.fullmatch(name):
            # The line is not echoed: it may hold a secret.
            problems.append(f"{where}, line {number}: expected NAME=VALUE")
            continue
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
            value = value[1:-1]
        values[name] = value
    if problems:
        raise ConfigError(problems)
    return values


def _settings_help() -> str:
    lines = ["settings (environment variables; blank counts as unset):"]
    rules = (
        f"A secret may instead be given as NAME{FILE_SUFFIX}, the path of a file holding it (a "
        "mounted Secret; its trailing newline is dropped); setting both is an error. The API "
        "key variables that destinations and connections name in api_key_env are secrets "
        "too. Any other "
        "CMSYNC_* variable is refused with the nearest known name, except names reserved for "
        "tools that read them themselves (each NAME and NAME_*): " + ", ".join(RESERVED) + "."
    )
    for variable in VARIABLES:
        if variable.default is not None:
            default = f"default: {variable.default}"
        else:
            default = "required" if variable.required else "default: not set"
        if variable.secret:
            default += ", secret"
        lines.append(f"  {variable.name}  ({default})")
        lines += textwrap.wrap(
            variable.meaning, 96, initial_indent=" " * 6, subsequent_indent=" " * 6
        )
    lines += ["", *textwrap.wrap(rules, 96, initial_indent="  ", subsequent_indent="  ")]
    lines += [
        "",
        "destinations file keys ([[destination]] tables):",
        *textwrap.wrap(
            ", ".join(DESTINATION_KEYS), 96, initial_indent="  ", subsequent_indent="  "
        ),
        "  required: " + ", ".join(REQUIRED_DESTINATION_KEYS),
        "",
        "connection keys ([[connection]] tables; a destination names one in connection):",
        "  " + ", ".join(CONNECTION_KEYS),
        "  required: " + ", ".join(REQUIRED_CONNECTION_KEYS),
        f'  without personal_data = "{PERSONAL_DATA_ACKNOWLEDGED}" its destinations send nothing',
    ]
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cmsync check-config",
        description="Load and validate the configuration (environment and destinations file)\n"
        "and print it resolved, secrets masked. Exit 0 when valid; exit 2 listing every\n"
        "problem otherwise.\n\n"
        "--online also checks every destination that sends against Campaign Monitor (two\n"
        "requests each: the list details and its custom fields), as `cmsync run` does when a\n"
        "destination starts: the API key works and the list exists; every mapped custom\n"
        "field key is a field of the list (keys compared without regard to letter case);\n"
        'removal = "unsubscribe" on a list whose UnsubscribeSetting is AllClientLists (it\n'
        "would unsubscribe each removed member from every list of the client) needs\n"
        "unsubscribe_all_client_lists = true; a ConfirmedOptIn list is a warning (adds send\n"
        "confirmation emails and stay Unconfirmed). It prints the verdict per destination\n"
        "(ok, HELD, REFUSED with Campaign Monitor's code, unanswered) and exits 2 when a\n"
        "destination would be held or is refused, 1 when Campaign Monitor did not answer,\n"
        "0 otherwise.",
        epilog=_settings_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--env-file",
        metavar="PATH",
        help="also read NAME=VALUE lines from PATH; variables set in the environment win",
    )
    parser.add_argument(
        "--format", choices=("text", "json"), default="text", help="output format (text)"
    )
    parser.add_argument(
        "--online",
        action="store_true",
        help="also check every destination against Campaign Monitor (see above); with "
        '--format json the verdicts are under "online"',
    )
    return parser


def cli_main(argv: list[str]) -> int:
    """`cmsync check-config`: 0 valid, 2 usage or configuration error."""
    args = parse_args(_parser(), argv)
    if isinstance(args, int):
        return args
    env: dict[str, str] = {}
    origins: dict[str, str] = {}
    try:
        if args.env_file is not None:
            from_file = _read_env_file(args.env_file)
            env.update(from_file)
            origins.update(origins_of(from_file, "env file"))
        env.update((name, value) for name, value in os.environ.items() if is_set(value))
        origins.update(origins_of(os.environ, "environment"))
        settings = load_settings(env)
    except ConfigError as error:
        print(error, file=sys.stderr)
        return 2
    described = describe(settings, origins)
    results: list[OnlineCheck] | None = None
    if args.online:
        results = asyncio.run(online_checks(settings))
        described["online"] = [asdict(result) for result in results]
    if args.format == "json":
        sys.stdout.write(orjson.dumps(described, option=orjson.OPT_INDENT_2).decode() + "\n")
    else:
        print(render_text(described))
        if results is not None:
            print()
            print(render_online(results, settings.cm_base_url))
    for warning in warnings(settings):
        print(warning, file=sys.stderr)
    if results is None:
        return 0
    code = online_exit_code(results)
    if code:
        bad = [r.destination for r in results if _EXIT[r.verdict]]
        print(
            f"check-config --online: destination(s) {', '.join(bad)} would not sync as "
            "configured (see above)",
            file=sys.stderr,
        )
    return code
