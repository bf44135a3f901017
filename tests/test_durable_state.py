"""consumer.membership.durable: one partition's state on disk, written in checkpoints.

A hypothesis state machine holds a `PartitionStore` against a model of what the disk and the
pending checkpoint hold, through puts, deletions, checkpoints, discards, crashes (reopen without
a checkpoint) and restores into an empty directory; then the membership tables run over real
stores through restarts.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from tempfile import TemporaryDirectory

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from consumer.membership import AddressTable, MemberTable, ProfileChange
from consumer.membership.durable import PartitionStore, StateDirError

KEYS = [b"\x00\x01a", b"\x00\x01a\x00", b"\x00\x01b", b"\x00\x02ab", b"\x00\x02ac", b"\x01"]
PREFIXES = [b"", b"\x00", b"\x00\x01", b"\x00\x01a", b"\x00\x02a", b"\x02"]


def test_writes_wait_in_the_pending_checkpoint_until_it_is_written(tmp_path: Path) -> None:
    store = PartitionStore(tmp_path / "s")
    assert store.changelog_offset is None  # never checkpointed: restore from the start
    store.put(b"k1", b"v1")
    store.put(b"k2", b"v2")
    store.put(b"k1", b"v1'")
    assert store.get(b"k1") == b"v1'"  # reads see pending writes
    assert store.pending() == [(b"k1", b"v1'"), (b"k2", b"v2")]  # one item per key
    store.checkpoint(41)
    assert store.pending() == []
    store.put(b"k2", None)
    store.put(b"k3", b"v3")
    store.close()  # a crash before the second checkpoint

    store = PartitionStore(tmp_path / "s")
    assert store.changelog_offset == 41
    assert list(store.scan(b"k")) == [(b"k1", b"v1'"), (b"k2", b"v2")]
    store.put(b"k2", None)
    store.checkpoint(42)
    store.close()
    store = PartitionStore(tmp_path / "s")
    assert (store.get(b"k2"), store.changelog_offset) == (None, 42)
    store.close()


def test_discard_keeps_the_last_checkpoint(tmp_path: Path) -> None:
    store = PartitionStore(tmp_path / "s")
    store.put(b"k", b"old")
    store.checkpoint(0)
    store.put(b"k", b"new")
    store.discard()
    assert store.get(b"k") == b"old"
    store.close()


def test_a_store_is_held_by_one_process_at_a_time(tmp_path: Path) -> None:
    store = PartitionStore(tmp_path / "s")
    with pytest.raises(StateDirError, match="cannot open the state store"):
        PartitionStore(tmp_path / "s")
    store.close()


def test_restore_refuses_to_mix_with_a_pending_checkpoint(tmp_path: Path) -> None:
    store = PartitionStore(tmp_path / "s")
    store.put(b"k", b"v")
    with pytest.raises(RuntimeError, match="pending"):
        store.apply_changelog([(b"x", b"y")], 0)
    store.close()


class StoreMachine(RuleBasedStateMachine):
    """The store against a model: ``disk`` (the last checkpoint), ``pending`` (what the next
    one writes) and ``changelog`` (every checkpoint's items, in order, with offsets)."""

    def __init__(self) -> None:
        super().__init__()
        self._tmp = TemporaryDirectory(prefix="cmsync-durable-")
        self.dirs = itertools.count()
        self.path = Path(self._tmp.name) / str(next(self.dirs))
        self.store = PartitionStore(self.path)
        self.disk: dict[bytes, bytes] = {}
        self.pending: dict[bytes, bytes | None] = {}
        self.changelog: list[tuple[bytes, bytes | None]] = []
        self.offset: int | None = None

    def teardown(self) -> None:
        self.store.close()
        self._tmp.cleanup()

    def view(self) -> dict[bytes, bytes]:
        merged = dict(self.disk)
        for key, value in self.pending.items():
            if value is None:
                merged.pop(key, None)
            else:
                merged[key] = value
        return merged

    @rule(key=st.sampled_from(KEYS), value=st.none() | st.binary(min_size=0, max_size=3))
    def put(self, key: bytes, value: bytes | None) -> None:
        self.store.put(key, value)
        self.pending[key] = value

    @rule()
    def checkpoint(self) -> None:
        items = self.store.pending()
        assert items == list(self.pending.items())
        self.changelog += items  # what the owner sends to the changelog before checkpointing
        offset = len(self.changelog) - 1
        self.store.checkpoint(offset)
        self.disk, self.pending, self.offset = self.view(), {}, offset

    @rule()
    def discard(self) -> None:
        self.store.discard()
        self.pending = {}

    @rule()
    def crash_and_reopen(self) -> None:
        self.store.close()
        self.store = PartitionStore(self.path)
        self.pending = {}

    @rule(batch=st.integers(1, 4))
    def restore_into_an_empty_directory(self, batch: int) -> None:
        """A new owner with an empty state dir rebuilds the state from the changelog alone."""
        self.store.close()
        self.path = Path(self._tmp.name) / str(next(self.dirs))
        self.store = PartitionStore(self.path)
        for start in range(0, len(self.changelog), batch):
            chunk = self.changelog[start : start + batch]
            self.store.apply_changelog(chunk, start + len(chunk) - 1)
        self.pending = {}
        self.offset = len(self.changelog) - 1 if self.changelog else None

    @invariant()
    def reads_see_the_disk_under_the_pending_writes(self) -> None:
        view = self.view()
        for key in KEYS:
            assert self.store.get(key) == view.get(key)
        for prefix in PREFIXES:
            expected = sorted((k, v) for k, v in view.items() if k.startswith(prefix))
            assert list(self.store.scan(prefix)) == expected
        assert self.store.changelog_offset == self.offset


TestStoreMachine = StoreMachine.TestCase
TestStoreMachine.settings = settings(max_examples=60, stateful_step_count=30, deadline=None)


def test_membership_tables_over_disk_stores_survive_restarts(tmp_path: Path) -> None:
    """Stage 1 and 2 over real stores; each change is a checkpoint; a restart reopens them."""
    lists_of = {"vip": ("list-a",)}
    members_path, addresses_path = tmp_path / "members-0", tmp_path / "addresses-0"
    offsets = itertools.count()

    def open_tables() -> tuple[PartitionStore, PartitionStore, MemberTable, AddressTable]:
        m, a = PartitionStore(members_path), PartitionStore(addresses_path)
        return m, a, MemberTable(m, lists_of), AddressTable(a)

    m_store, a_store, members, addresses = open_tables()

    def change(profile: str, entered: bool, at: int, address: str | None = None) -> None:
        offset = next(offsets)
        change = ProfileChange("vip", profile, entered, at, offset, address, {})
        for claim in members.apply(change).claims:
            addresses.apply(claim)
        m_store.checkpoint(offset)
        a_store.checkpoint(offset)

    def active() -> set[str]:
        return {d.address for d in addresses.addresses("list-a") if d.active}

    change("ada", True, 10, "home@x.io")
    change("bob", True, 10, "home@x.io")
    change("ada", True, 20, "ada@x.io")
    m_store.close()
    a_store.close()

    m_store, a_store, members, addresses = open_tables()
    assert active() == {"home@x.io", "ada@x.io"}  # bob still holds home@x.io
    change("ada", False, 15)  # late, across the restart: ignored
    assert active() == {"home@x.io", "ada@x.io"}
    change("bob", False, 30)
    assert active() == {"ada@x.io"}
    m_store.close()
    a_store.close()
