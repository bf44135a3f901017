"""Which embedded store holds the membership state (issue 11): rocksdict vs SQLite vs LMDB.

``python -m bench.statestore [--entries 1000000] [--batch 5000] [--only rocksdict,sqlite,lmdb]``

Each store is measured in a child process of its own (so its resident set is its own), twice:

* ``write``: ``--entries`` puts of stage-1 member states (real keys and values from
  ``consumer.membership.codec``: ~20-byte keys, ~90-byte values), in a pseudo-random key order
  (profiles do not arrive sorted), committed every ``--batch`` puts as the service would at a
  checkpoint; then the size on disk; then ``--gets`` point gets of existing keys in another
  pseudo-random order, on the store reopened (so they do not all come from a write cache), and
  as many gets of absent keys (what stage 1 asks for every profile it has not seen yet).
* ``restore``: a fresh directory loaded with the same entries in the changelog's order, in
  batches of ``--restore-batch`` (a changelog consumer's ``getmany``), as a partition assignment
  with an empty ``CMSYNC_STATE_DIR`` does.

Peak RSS is the child's ``ru_maxrss`` (its Python and imports included; the baseline, measured
before the store is opened, is printed beside it). No store is asked to fsync: the local store
is a cache of the changelog topics (the contract says so), so a crash loses nothing that the
restore does not bring back, and each is run in the mode that says so (rocksdict without its
write-ahead log, SQLite ``synchronous=OFF`` in WAL mode, LMDB ``sync=False``).

Needs ``rocksdict`` and ``lmdb`` (``pip install rocksdict lmdb``); a store whose package is
missing is reported as such. Writes under ``--dir`` (default: a temporary directory).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

from consumer.membership.codec import encode_member, member_key
from consumer.membership.model import MemberState

BACKENDS = ("rocksdict", "rocksdict-lean", "sqlite", "lmdb")
_SEGMENT = "vip-customers"
# Multipliers coprime with 10**k and 2**k: i -> (i * M + C) % n is a bijection for the sizes
# used here (checked in `_order`), so keys come in a scrambled order without a 1M-entry list.
_WRITE_M, _GET_M = 2654435761, 48271


def _order(n: int, multiplier: int) -> Callable[[int], int]:
    from math import gcd

    if gcd(n, multiplier) != 1:
        raise SystemExit(f"--entries {n} shares a factor with {multiplier}; pick another size")
    return lambda i: (i * multiplier + 12345) % n


def _entry(i: int) -> tuple[bytes, bytes]:
    """The stage-1 state of profile ``i``: realistic sizes, built by the real codec."""
    state = MemberState(
        True,
        (1_764_417_600_000 + i * 7, 10_000_000 + i),
        f"customer.{i:07d}@example.com",
        {"full_name": f"Customer Number {i}", "city": "London"},
    )
    return member_key(_SEGMENT, f"cust-{i:08d}"), encode_member(state)


class Backend(Protocol):
    def write(self, items: list[tuple[bytes, bytes]]) -> None: ...

    def get(self, key: bytes) -> bytes | None: ...

    def close(self) -> None: ...


# --- the stores -------------------------------------------------------------------------------


class Rocks:
    """rocksdict, raw (bytes) mode: quix-streams' defaults, or a lean variant (smaller
    buffers and cache, and a bloom filter so that a get of an unknown key, every new profile's,
    mostly skips the files)."""

    def __init__(self, path: Path, *, small: bool) -> None:
        import rocksdict

        options = rocksdict.Options(raw_mode=True)
        options.create_if_missing(True)
        # quix-streams' RocksDBOptions: 64 MiB write buffers x3, 128 MiB block cache, lz4.
        write_buffer, buffers, cache = (16, 2, 16) if small else (64, 3, 128)
        options.set_write_buffer_size(write_buffer * 2**20)
        options.set_max_write_buffer_number(buffers)
        options.set_target_file_size_base(64 * 2**20)
        table = rocksdict.BlockBasedOptions()
        table.set_block_cache(rocksdict.Cache(cache * 2**20))
        if small:
            table.set_bloom_filter(10, False)  # ~1% false positives, full (not block) filter
        options.set_block_based_table_factory(table)
        options.set_compression_type(rocksdict.DBCompressionType.lz4())
        self._db = rocksdict.Rdict(str(path), options=options)
        self._write_options = rocksdict.WriteOptions()
        # The changelog is the log. (A property at run time; rocksdict's stub declares a
        # method, hence setattr rather than an ignore that would hide other mistakes.)
        setattr(self._write_options, "disable_wal", True)  # noqa: B010
        self._batch = rocksdict.WriteBatch

    def write(self, items: list[tuple[bytes, bytes]]) -> None:
        batch = self._batch(raw_mode=True)
        for key, value in items:
            batch.put(key, value)
        self._db.write(batch, self._write_options)

    def get(self, key: bytes) -> bytes | None:
        value = self._db.get(key)
        return value if isinstance(value, bytes) else None

    def close(self) -> None:
        self._db.flush()  # without a WAL, the memtable must reach an SST file before close
        self._db.close()


class Sqlite:
    """The standard library's sqlite3: one WITHOUT ROWID table, a transaction per batch."""

    def __init__(self, path: Path) -> None:
        path.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path / "state.db", isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=OFF")
        self._db.execute("CREATE TABLE IF NOT EXISTS kv (k BLOB PRIMARY KEY, v BLOB) WITHOUT ROWID")

    def write(self, items: list[tuple[bytes, bytes]]) -> None:
        self._db.execute("BEGIN")
        self._db.executemany("INSERT OR REPLACE INTO kv VALUES (?, ?)", items)
        self._db.execute("COMMIT")

    def get(self, key: bytes) -> bytes | None:
        row = self._db.execute("SELECT v FROM kv WHERE k = ?", (key,)).fetchone()
        return None if row is None else bytes(row[0])

    def close(self) -> None:
        self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        self._db.close()


class Lmdb:
    """py-lmdb: one environment, a write transaction per batch."""

    def __init__(self, path: Path) -> None:
        import lmdb

        self._env: Any = lmdb.open(str(path), map_size=8 * 2**30, sync=False, metasync=False)

    def write(self, items: list[tuple[bytes, bytes]]) -> None:
        with self._env.begin(write=True) as txn:
            cursor = txn.cursor()
            cursor.putmulti(items)

    def get(self, key: bytes) -> bytes | None:
        with self._env.begin(buffers=False) as txn:
            value = txn.get(key)
        return value if isinstance(value, bytes) else None

    def close(self) -> None:
        self._env.sync(True)
        self._env.close()


def _open(name: str, path: Path) -> Backend:
    if name.startswith("rocksdict"):
        return Rocks(path, small=name == "rocksdict-lean")
    return Sqlite(path) if name == "sqlite" else Lmdb(path)


# --- the child: one store, one phase ----------------------------------------------------------


def _batches(n: int, size: int, order: Callable[[int], int]) -> Iterator[list[tuple[bytes, bytes]]]:
    for start in range(0, n, size):
        yield [_entry(order(i)) for i in range(start, min(start + size, n))]


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _disk_mib(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20


def _load(store: Backend, n: int, batch: int) -> tuple[float, float]:
    """Write every entry; (seconds writing, seconds building entries, excluded)."""
    order = _order(n, _WRITE_M)
    writing = building = 0.0
    batches = _batches(n, batch, order)
    while True:
        started = time.perf_counter()
        items = next(batches, None)
        built = time.perf_counter()
        building += built - started
        if items is None:
            return writing, building
        store.write(items)
        writing += time.perf_counter() - built


def child(backend: str, phase: str, args: argparse.Namespace) -> dict[str, float]:
    path = Path(args.dir) / f"{backend}-{phase}"
    shutil.rmtree(path, ignore_errors=True)
    baseline = _rss_mib()
    store = _open(backend, path)
    n = args.entries
    result: dict[str, float] = {"baseline_rss_mib": baseline}
    batch = args.batch if phase == "write" else args.restore_batch
    seconds, _ = _load(store, n, batch)
    started = time.perf_counter()
    store.close()
    seconds += time.perf_counter() - started  # what is left to write belongs to the load
    result["load_s"] = seconds
    result["load_per_s"] = n / seconds
    result["disk_mib"] = _disk_mib(path)
    if phase == "write":
        store = _open(backend, path)
        order = _order(n, _GET_M)
        keys = [_entry(order(i))[0] for i in range(args.gets)]
        started = time.perf_counter()
        found = sum(store.get(key) is not None for key in keys)
        result["get_us"] = (time.perf_counter() - started) / args.gets * 1e6
        # New profiles, whose keys fall between the known ones (not all after them, which
        # would let every store answer from its key range alone).
        absent = [member_key(_SEGMENT, f"cust-{order(i):08d}-new") for i in range(args.gets)]
        started = time.perf_counter()
        found += sum(store.get(key) is not None for key in absent)
        result["miss_us"] = (time.perf_counter() - started) / args.gets * 1e6
        if found != args.gets:
            raise SystemExit(f"{backend}: gets disagree with what was written")
        store.close()
    result["peak_rss_mib"] = _rss_mib()
    shutil.rmtree(path, ignore_errors=True)
    return result


# --- the parent: every store, both phases, one table ---------------------------------------------


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--entries", type=int, default=1_000_000)
    p.add_argument("--batch", type=int, default=5_000, help="puts per commit in the write phase")
    p.add_argument("--restore-batch", type=int, default=50_000, help="puts per commit in restore")
    p.add_argument("--gets", type=int, default=200_000)
    p.add_argument("--only", default=",".join(BACKENDS), help="comma-separated stores")
    p.add_argument("--dir", default="", help="where the stores are written (default: temporary)")
    p.add_argument("--child", nargs=2, metavar=("STORE", "PHASE"), help=argparse.SUPPRESS)


def _run_child(backend: str, phase: str, argv: list[str], directory: str) -> dict[str, float]:
    command = [sys.executable, "-m", "bench.statestore", *argv, "--dir", directory]
    command += ["--child", backend, phase]
    done = subprocess.run(command, capture_output=True, text=True, check=False)  # noqa: S603  # our own module
    if done.returncode:
        raise RuntimeError(done.stderr.strip().splitlines()[-1] if done.stderr else "failed")
    parsed: dict[str, float] = json.loads(done.stdout)
    return parsed


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.statestore", description=__doc__)
    add_arguments(p)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child[0], args.child[1], args)))
        return 0
    forwarded = [
        f"--entries={args.entries}",
        f"--batch={args.batch}",
        f"--restore-batch={args.restore_batch}",
        f"--gets={args.gets}",
    ]
    print(
        f"{args.entries:,} entries, commits of {args.batch:,} (restore {args.restore_batch:,}), "
        f"{args.gets:,} gets; {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}"
    )
    print(
        f"{'store':<16}{'puts/s':>10}{'get µs':>8}{'miss µs':>9}{'disk MiB':>10}{'RSS MiB':>9}"
        f"{'restore s':>11}{'restore RSS':>12}  (baseline RSS)"
    )
    with tempfile.TemporaryDirectory(prefix="cmsync-statestore-", dir=args.dir or None) as tmp:
        for backend in [b for b in args.only.split(",") if b]:
            try:
                write = _run_child(backend, "write", forwarded, tmp)
                restore = _run_child(backend, "restore", forwarded, tmp)
            except RuntimeError as exc:
                print(f"{backend:<16}failed: {exc}")
                continue
            print(
                f"{backend:<16}{write['load_per_s']:>10,.0f}{write['get_us']:>8.1f}"
                f"{write['miss_us']:>9.1f}"
                f"{write['disk_mib']:>10.0f}{write['peak_rss_mib']:>9.0f}"
                f"{restore['load_s']:>11.1f}{restore['peak_rss_mib']:>12.0f}"
                f"  ({write['baseline_rss_mib']:.0f})",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
