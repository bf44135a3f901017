"""Spread the fault suite's long scenarios over the xdist workers.

`make test` runs `pytest -n 4` with xdist's default `load` scheduling, which hands each worker
a first batch of *consecutive* tests (a quarter of its share). The fault scenarios are
collected first and take most of the suite's time, so without this hook one worker would get
all of them and run them one after another. Each long scenario carries `@pytest.mark.slow(S)`
with its expected duration in seconds; the hook deals them (longest first, to the least loaded
worker) to the heads of the workers' first batches and leaves the rest of the order alone.
Without xdist (`make chaos`, or a single file) it does nothing.
"""

from __future__ import annotations

import pytest


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    workerinput = getattr(config, "workerinput", None)
    if workerinput is None:
        return
    nodes = int(workerinput.get("workercount", 1))
    if nodes < 2:
        return
    slow: list[tuple[float, pytest.Item]] = []
    rest: list[pytest.Item] = []
    for item in items:
        marker = item.get_closest_marker("slow")
        if marker is not None and marker.args:
            slow.append((float(marker.args[0]), item))
        else:
            rest.append(item)
    if not slow:
        return
    # xdist's LoadScheduling: each worker first gets max(len(items) // nodes // 4, 2) tests.
    chunk = max(len(items) // nodes // 4, 2)
    bins: list[list[pytest.Item]] = [[] for _ in range(nodes)]
    loads = [0.0] * nodes
    for seconds, item in sorted(slow, key=lambda pair: -pair[0]):
        least = loads.index(min(loads))
        bins[least].append(item)
        loads[least] += seconds
    ordered: list[pytest.Item] = []
    for batch in bins:
        fill = max(0, chunk - len(batch))
        ordered += batch + rest[:fill]
        rest = rest[fill:]
    items[:] = ordered + rest
