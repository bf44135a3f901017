"""`make bench`: every scenario in one run, then a summary of every figure with its target.

``python -m bench [--only intake,export,churn,scaleout,freshness,outage,consent,backfill,
reconcile] [--skip …]``;
sizes come from each scenario's settings (its ``--help``; environment variables
``CMSYNC_BENCH_*``). Scenario 5 (memory) is measured during scenario 2 (``export``); scenario 7
(``outage``) measures memory during a Campaign Monitor outage against record size; scenario 8
(``consent``) the consent reads on a list with 120,000 opt-outs; scenario 9 (``backfill``) a
destination added by a reload for a segment of 200,000 members, beside a live list; scenario 10
(``reconcile``) `cmsync reconcile` on a list of a million members with 1 % drift.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from collections.abc import Callable

from bench import (
    backfill,
    churn,
    consent,
    export,
    freshness,
    intake,
    outage,
    reconcile,
    scaleout,
)
from bench.common import Result, Scenario, machine, print_result, print_summary, report

SCENARIOS: dict[str, tuple[Callable[[argparse.ArgumentParser], None], Scenario]] = {
    module.__name__.removeprefix("bench."): (module.add_arguments, module.scenario)
    for module in (
        intake,
        export,
        churn,
        scaleout,
        freshness,
        outage,
        consent,
        backfill,
        reconcile,
    )
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    p.add_argument("--only", default="", help="comma-separated scenarios to run (default: all)")
    p.add_argument("--skip", default="", help="comma-separated scenarios to leave out")
    args = p.parse_args(argv)
    chosen = [s for s in args.only.split(",") if s] or list(SCENARIOS)
    skipped = {s for s in args.skip.split(",") if s}
    unknown = (set(chosen) | skipped) - set(SCENARIOS)
    if unknown:
        p.error(f"unknown scenario(s): {', '.join(sorted(unknown))}; known: {', '.join(SCENARIOS)}")
    facts = machine()
    print(
        f"cmsync benchmarks on {facts['nproc']} CPUs ({facts['cpu']}), Python {facts['python']}, "
        f"load average {'/'.join(f'{x:.2f}' for x in os.getloadavg())}",
        flush=True,
    )
    started = time.monotonic()
    results: list[Result] = []
    failed: list[str] = []
    for key in chosen:
        if key in skipped:
            continue
        add_arguments, runner = SCENARIOS[key]
        scenario_parser = argparse.ArgumentParser()
        add_arguments(scenario_parser)
        print(f"\n-- running {key} …", flush=True)
        try:
            produced = asyncio.run(runner(scenario_parser.parse_args([])))
        except Exception as exc:  # one broken scenario must not hide the others' figures
            print(f"   {key} FAILED: {type(exc).__name__}: {exc}", flush=True)
            failed.append(key)
            continue
        for result in produced:
            print_result(result)
        results.extend(produced)
    print_summary(results)
    missed = [f"{r.key}: {f.name}" for r in results for f in r.figures if f.met is False]
    print(f"\ntargets missed: {len(missed)}" + "".join(f"\n   {m}" for m in missed))
    if failed:
        print(f"scenarios that failed to run: {', '.join(failed)}")
    print(f"make bench wall time: {time.monotonic() - started:.0f} s")
    report(results, "python -m bench " + " ".join(argv if argv is not None else sys.argv[1:]))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
