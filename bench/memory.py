"""Scenario 5, memory, on its own: runs scenario 2 (the batch export, streamed) with the service
as a subprocess whose resident set is sampled every 100 ms, and reports the peak (target
≤ 300 MiB) next to what holds memory: the pending changes (bounded by `CMSYNC_MAX_PENDING`) and
the applied-time memory (`CMSYNC_APPLIED_MEMORY` entries). `python -m bench` measures it in the
same run as scenario 2.
"""

from __future__ import annotations

import sys

from bench import export
from bench.common import main_of

main = main_of(
    "python -m bench.memory",
    "Scenario 5: peak memory during scenario 2.",
    export.add_arguments,
    export.scenario,
)

if __name__ == "__main__":
    sys.exit(main())
