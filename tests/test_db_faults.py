"""Any failed write leaves the memory usable: the N-th call of each OS primitive
(write, fsync, replace, truncate) fails during one append, one rerun (in place,
and with a caption too long for that) and one batch import, for every N; a
fresh process then opens each database without --repair-db and --check-db
passes (tests/fault_injection.py does the work; run it to see the table)."""

import pytest

import fault_injection


@pytest.mark.parametrize("kind", fault_injection.KINDS)
def test_every_failing_os_call_leaves_the_database_as_it_was_or_complete(kind):
    results = fault_injection.run([kind])
    assert [r for r in results if r["problem"]] == []
    for primitive in fault_injection.PRIMITIVES:      # each primitive was failed at least once
        assert any(r["primitive"] == primitive for r in results), primitive
    assert any(r["error"] for r in results)          # failures before the commit are reported
    # failures after it (folder fsync, emptying the journal) do not undo it: reported done
    assert any(r["error"] is None for r in results)
