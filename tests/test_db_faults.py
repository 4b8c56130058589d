"""Any failed write leaves the memory usable: the N-th call of each OS primitive
(write, fsync, replace, truncate) fails during one append, one rerun (in place,
and with a caption too long for that), one batch import and the seed, for every N; a
fresh process then opens each database without --repair-db and --check-db
passes (tests/fault_injection.py does the work; run it to see the table)."""

import pytest

import fault_injection


@pytest.mark.parametrize("kind", fault_injection.KINDS)
def test_every_failing_os_call_leaves_the_database_as_it_was_or_complete(kind):
    results = fault_injection.run([kind])
    assert [r for r in results if r["problem"]] == []
    used = [p for p in fault_injection.PRIMITIVES if kind != "seed" or p != "truncate"]
    for primitive in used:       # each was failed at least once (the seed writes whole files)
        assert any(r["primitive"] == primitive for r in results), primitive
    assert any(r["error"] for r in results)          # failures before the commit are reported
    if kind != "seed":  # failures after a commit (folder fsync, emptying the journal)
        assert any(r["error"] is None for r in results)    # do not undo it: reported done
