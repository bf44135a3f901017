"""Command line: `cmsync COMMAND [options]`.

Each command lives in the module that owns it and exposes ``cli_main(argv) -> int``; this module
only dispatches, so that `cmsync --help` stays cheap (no command's imports are paid up front).
Exit codes follow the contract: 0 success, 2 usage or configuration error, 1 anything else.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

COMMANDS: dict[str, tuple[str, str]] = {
    "run": (
        "consumer.app",
        "the service: consume, coalesce, flush to Campaign Monitor, serve metrics",
    ),
    "demo": (
        "consumer.devtools.demo",
        "the embedded default: broker + simulator + synthetic stream, verified",
    ),
    "simulator": ("consumer.devtools.simulator", "the Campaign Monitor simulator (HTTP)"),
    "check-config": (
        "consumer.checkconfig",
        "validate the configuration and print it, secrets masked",
    ),
    "reconcile": (
        "consumer.reconcile",
        "compare the lists with the membership state, report the drift, repair it",
    ),
}

USAGE = "usage: cmsync [-h] [--version] COMMAND [options]"


def parse_args(parser: argparse.ArgumentParser, argv: Sequence[str]) -> argparse.Namespace | int:
    """``parser.parse_args(argv)``, or the exit code argparse chose instead (0 after
    ``--help``, 2 for a usage error): a command's ``cli_main`` returns its code, never exits."""
    try:
        return parser.parse_args(argv)
    except SystemExit as exit_:
        return exit_.code if isinstance(exit_.code, int) else 2


def _help() -> str:
    width = max(map(len, COMMANDS))
    lines = [USAGE, "", "Streaming sync from segment membership on Kafka to Campaign Monitor.", ""]
    lines.append("commands:")
    lines += [f"  {name:<{width}}  {summary}" for name, (_, summary) in COMMANDS.items()]
    lines += ["", "Run `cmsync COMMAND --help` for a command's options and settings."]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(_help())
        return 0 if args else 2
    if args[0] == "--version":
        from consumer import __version__

        print(f"cmsync {__version__}")
        return 0
    command, rest = args[0], args[1:]
    if command not in COMMANDS:
        print(f"{USAGE}\ncmsync: error: unknown command {command!r}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[command][0])
    result: int = module.cli_main(rest)
    return result


if __name__ == "__main__":
    sys.exit(main())
