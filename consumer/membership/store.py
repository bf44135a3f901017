"""The store the tables read and write through: bytes in, bytes out, ordered by key.

`consumer.membership.durable.PartitionStore` is the service's implementation: the embedded store
of one partition, whose pending writes become changelog records at a checkpoint (a None
value as a tombstone), as quix-streams' partition transactions do; the tables neither know nor
care.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

__all__ = ["DictStore", "Store"]


class Store(Protocol):
    """A key-value store of bytes.

    * ``get``: the value of ``key``, or None.
    * ``put``: set ``key`` to ``value``; None deletes it (a tombstone in the changelog).
    * ``scan``: every (key, value) whose key starts with ``prefix`` (and is not below
      ``start``, when given: a scan resumed where an earlier one stopped), in byte order of
      keys. Callers do not write while iterating.
    """

    def get(self, key: bytes) -> bytes | None: ...

    def put(self, key: bytes, value: bytes | None) -> None: ...

    def scan(self, prefix: bytes, start: bytes = b"") -> Iterator[tuple[bytes, bytes]]: ...


class DictStore:
    """`Store` in a dict: for tests, and for replaying a changelog into memory.

    ``data`` is the whole state; copying it (``DictStore(dict(old.data))``) is what restoring a
    changelog into an empty store amounts to. ``scan`` sorts: O(n log n), fine off the hot path.
    """

    def __init__(self, data: dict[bytes, bytes] | None = None) -> None:
        self.data: dict[bytes, bytes] = {} if data is None else data

    def get(self, key: bytes) -> bytes | None:
        return self.data.get(key)

    def put(self, key: bytes, value: bytes | None) -> None:
        if value is None:
            self.data.pop(key, None)
        else:
            self.data[key] = value

    def scan(self, prefix: bytes, start: bytes = b"") -> Iterator[tuple[bytes, bytes]]:
        for key in sorted(k for k in self.data if k.startswith(prefix) and k >= start):
            yield key, self.data[key]
