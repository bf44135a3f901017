"""The membership state through Kafka (issue 11): stage 1's cost per change with its
checkpoints, and the restore of a partition's state from its changelog.

``python -m bench.state [--entries 1000000] [--checkpoint 5000] [--bootstrap HOST:PORT]``

* **Stage 1**: ``--entries`` entries of distinct profiles into one segment that feeds one list,
  through `StageOne` over a `PartitionStore` (one input partition), a checkpoint every
  ``--checkpoint`` changes (what the intake would do per fetched batch): each change is a state
  write (to the members changelog) and a claim (to the claims topic). Reported: changes/s for
  the whole, and the share spent deciding (``apply``, in memory) against the checkpoints
  (producing, waiting for acknowledgements, writing the disk).
* **Restore**: the members changelog partition, now holding ``--entries`` records, restored
  into an empty directory by `changelog.restore`, in a child process of its own so that its
  peak RSS (``ru_maxrss``, Python and imports included) is the restore's.

The producer batches as a service would (``linger_ms`` 5, batches of up to 1 MiB). Runs the
bundled broker unless ``--bootstrap`` names one. Figures, not assertions; the targets of issue
11 are shown beside them (restore of 1M entries in at most 15 s).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import sys
import tempfile
import time
import uuid
from pathlib import Path

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from consumer.devtools.embedded_broker import create_topics, running_broker
from consumer.membership import ProfileChange
from consumer.membership.changelog import InternalTopics, restore
from consumer.membership.durable import PartitionStore
from consumer.membership.stages import Durable, StageOne

SEGMENT, LIST = "vip", "list-vip"
PRODUCER_OPTIONS: dict[str, object] = {"acks": "all", "linger_ms": 5, "max_batch_size": 1 << 20}


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


async def stage_one(
    bootstrap: str, topics: InternalTopics, args: argparse.Namespace
) -> dict[str, float]:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, **PRODUCER_OPTIONS)
    await producer.start()
    applying = checkpointing = 0.0
    with tempfile.TemporaryDirectory(prefix="cmsync-bench-state-") as tmp:
        store = PartitionStore(Path(tmp) / "members-0")
        stage = StageOne(
            Durable(0, store, producer, topics.members_changelog), {SEGMENT: (LIST,)}, topics.claims
        )
        started = time.perf_counter()
        try:
            for start in range(0, args.entries, args.checkpoint):
                t0 = time.perf_counter()
                for i in range(start, min(start + args.checkpoint, args.entries)):
                    stage.apply(
                        ProfileChange(
                            SEGMENT,
                            f"p{i}",
                            True,
                            1_700_000_000_000 + i,
                            i,
                            f"user{i}@example.com",
                            {"city": "Paris", "tier": i % 5},
                        )
                    )
                t1 = time.perf_counter()
                await stage.checkpoint()
                applying += t1 - t0
                checkpointing += time.perf_counter() - t1
            elapsed = time.perf_counter() - started
        finally:
            store.close()
            await producer.stop()
    return {
        "per_s": args.entries / elapsed,
        "elapsed_s": elapsed,
        "apply_share": applying / elapsed,
        "checkpoint_share": checkpointing / elapsed,
    }


async def restore_child(bootstrap: str, topic: str) -> dict[str, float]:
    baseline = _rss_mib()
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    with tempfile.TemporaryDirectory(prefix="cmsync-bench-restore-") as tmp:
        started = time.perf_counter()
        store = await restore(consumer, topic, 0, Path(tmp) / "members-0")
        elapsed = time.perf_counter() - started
        entries = sum(1 for _ in store.scan(b""))
        store.close()
    await consumer.stop()
    return {"elapsed_s": elapsed, "entries": entries, "rss_mib": _rss_mib(), "baseline": baseline}


async def run(args: argparse.Namespace) -> None:
    async def measure(bootstrap: str) -> None:
        topics = InternalTopics.of_group(f"bench-state-{uuid.uuid4().hex[:8]}")
        await create_topics(bootstrap, {topics.members_changelog: 1, topics.claims: 3})
        print(
            f"{args.entries:,} entries, a checkpoint every {args.checkpoint:,} changes; "
            f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}",
            flush=True,
        )
        one = await stage_one(bootstrap, topics, args)
        print(
            f"stage 1: {one['per_s']:,.0f} changes/s ({one['elapsed_s']:.1f} s); deciding "
            f"{one['apply_share']:.0%}, checkpoints (claims, changelog, disk) "
            f"{one['checkpoint_share']:.0%}",
            flush=True,
        )
        command = [
            sys.executable,
            "-m",
            "bench.state",
            "--restore-child",
            bootstrap,
            topics.members_changelog,
        ]
        child = await asyncio.create_subprocess_exec(*command, stdout=asyncio.subprocess.PIPE)
        out, _ = await child.communicate()
        if child.returncode:
            raise SystemExit(f"the restore child failed with exit code {child.returncode}")
        back = json.loads(out)
        print(
            f"restore: {back['entries']:,} entries in {back['elapsed_s']:.1f} s "
            f"({back['entries'] / back['elapsed_s']:,.0f}/s), peak RSS {back['rss_mib']:.0f} MiB "
            f"(baseline {back['baseline']:.0f}); target for 1M entries: ≤ 15 s",
            flush=True,
        )

    if args.bootstrap:
        await measure(args.bootstrap)
        return
    async with running_broker() as broker:
        await measure(broker.bootstrap)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.state", description=__doc__)
    p.add_argument("--entries", type=int, default=1_000_000)
    p.add_argument("--checkpoint", type=int, default=5_000, help="changes per checkpoint")
    p.add_argument("--bootstrap", default="", help="a broker to use instead of the bundled one")
    p.add_argument(
        "--restore-child", nargs=2, metavar=("BOOTSTRAP", "TOPIC"), help=argparse.SUPPRESS
    )
    args = p.parse_args(argv)
    if args.restore_child:
        print(json.dumps(asyncio.run(restore_child(*args.restore_child))))
        return 0
    asyncio.run(run(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
