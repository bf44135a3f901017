"""Benchmarks of cmsync: `make bench` (``python -m bench``) runs them all.

Each scenario is a module that also runs on its own (``python -m bench.intake`` …), measures the
service next to its reference in the same run (the machine is shared and noisy: ratios, not
absolute times, are what count), prints a table with every figure beside its target, and adds
its figures to ``bench/results/latest.json`` (git-ignored).

| module | scenario |
|---|---|
| `bench.intake` | 1. events/s: decode + validate + route + coalesce vs a bare aiokafka loop |
| `bench.export` | 2. the batch export, streamed (1M profiles, 10 requests/s) and 5. peak memory |
| `bench.churn` | 3. churn over 10 lists against the fewest possible requests |
| `bench.scaleout` | 4. scenario 2 with two service processes sharing one API key |
| `bench.memory` | 5. alone: peak resident memory of the service during scenario 2 |
| `bench.freshness` | 6. apply time − occurred_at at a steady 2,000 events/s |
| `bench.outage` | 7. peak resident memory during an outage, against record size (1, 4, 60 KB) |

Sizes are settings: every module takes ``--help``; the defaults are the issue's sizes.
Figures are measured, never asserted: a missed target is reported, not raised.
"""
