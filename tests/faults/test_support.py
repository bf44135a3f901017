"""The fault suite's checks can fail: each one, fed a violation, reports it (and only it)."""

from __future__ import annotations

from consumer.devtools.rig import expected_values
from consumer.devtools.simulator import AppliedWrite
from consumer.devtools.synthetic import Produced, expected_state
from tests.faults.support import (
    VERSION,
    Dest,
    Replay,
    Sent,
    change,
    list_problems,
    out_of_order_writes,
    peak_per_window,
    repeated_writes,
)

T0 = 1_764_417_600_000
DEST = Dest("news", "seg-a")
LIST = "0" * 32


def member(state: str, version: int | None = None) -> dict[str, object]:
    fields = [] if version is None else [{"Key": VERSION, "Value": str(version)}]
    return {"State": state, "CustomFields": fields, "Name": "x"}


def sent(*records: Produced) -> list[Sent]:
    return [Sent(r, 0, offset) for offset, r in enumerate(records)]


def write(endpoint: str, email: str, version: int | None = None, at: float = 0.0) -> AppliedWrite:
    fields = () if version is None else ((VERSION, str(version)),)
    return AppliedWrite(at, endpoint, LIST, email, fields)


def test_out_of_order_writes_flags_regressions_and_excuses_replays() -> None:
    a1 = change("a@example.com", at_ms=T0)
    a2 = change("a@example.com", False, at_ms=T0 + 10)
    a3 = change("a@example.com", at_ms=T0 + 20)
    log = sent(a1, a2, a3)
    in_order = [
        write("import", "a@example.com", T0),
        write("delete", "a@example.com"),
        write("import", "a@example.com", T0 + 20),
    ]
    assert out_of_order_writes(in_order, log, [DEST], {"news": LIST}) == []
    older_add = [write("import", "a@example.com", T0 + 20), write("import", "a@example.com", T0)]
    assert out_of_order_writes(older_add, log, [DEST], {"news": LIST}) != []
    older_removal = [write("import", "a@example.com", T0 + 20), write("delete", "a@example.com")]
    assert out_of_order_writes(older_removal, log, [DEST], {"news": LIST}) != []
    # a replay after a kill, of records at or above the commit of a dead process's partition
    replay = [
        write("import", "a@example.com", T0 + 20, at=1.0),
        write("import", "a@example.com", T0, at=3.0),
    ]
    excused = Replay(after=2.0, partitions={0}, committed={0: 0})
    assert out_of_order_writes(replay, log, [DEST], {"news": LIST}, [excused]) == []
    too_early = Replay(after=5.0, partitions={0}, committed={0: 0})
    assert out_of_order_writes(replay, log, [DEST], {"news": LIST}, [too_early]) != []
    committed_past = Replay(after=2.0, partitions={0}, committed={0: 1})
    assert out_of_order_writes(replay, log, [DEST], {"news": LIST}, [committed_past]) != []


def test_repeated_writes_counts_rows_and_removals_beyond_the_first() -> None:
    a1 = change("a@example.com", at_ms=T0)
    a2 = change("a@example.com", False, at_ms=T0 + 10)
    log = sent(a1, a2)
    writes = [
        write("import", "a@example.com", T0),
        write("delete", "a@example.com"),
        write("import", "a@example.com", T0),  # replayed
        write("delete", "a@example.com"),  # replayed
    ]
    repeats = repeated_writes(writes, log, [DEST], {"news": LIST})
    assert (repeats.rows, repeats.removals) == (1, 1)
    assert (repeats.total_rows, repeats.total_removals) == (2, 2)


def test_list_problems_and_peak_window() -> None:
    records = [change("a@example.com", at_ms=T0, city="Oslo"), change("b@example.com", at_ms=T0)]
    expected = expected_state(records, "seg-a")
    right = {
        "a@example.com": {
            "State": "Active",
            "Name": "Person a",
            "CustomFields": [
                {"Key": "City", "Value": "Oslo"},
                {"Key": VERSION, "Value": str(T0)},
            ],
        },
        "b@example.com": {
            "State": "Active",
            "Name": "Person b",
            "CustomFields": [
                {"Key": "City", "Value": "London"},
                {"Key": VERSION, "Value": str(T0)},
            ],
        },
    }
    assert list_problems(expected, right, DEST) == []
    wrong = {**right, "b@example.com": {**right["b@example.com"], "State": "Deleted"}}
    assert list_problems(expected, wrong, DEST) == ["1 missing or inactive"]
    assert expected_values(None) == []
    assert expected_values(["b", "a"]) == ["a", "b"]
    assert peak_per_window([0.0, 0.5, 0.99, 1.0, 1.5]) == 3
    assert peak_per_window([]) == 0
