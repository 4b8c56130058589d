"""Start-up check cost: opening a database at Flickr8K's shape, before and after seals.

    python -m bench.db_open [--before REV] [--repeat 5]

Builds one database of 7,691 images (512-d) and 38,455 captions (768-d), as
bench/db_append.py does, and times DbManager.open on it, side by side in one run:
  * before: the code of git revision REV (default 83d956e, the last commit before
    seals), run from an export of it in a child process (its check: each JSON
    file's size and closing bytes)
  * now, stat unchanged: the usual start (each file's stat against its seal)
  * now, the folder copied: the first open of a copy (new inodes: every JSON
    file's block CRCs are computed and compared once, then recorded)
  * `--check-db`: the full check (parses everything), for scale
"""

from __future__ import annotations

import argparse
import itertools
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from bench.common import ROOT, record, table, timed
from bench.db_append import FLICKR8K, build
from db_format import FILES
from db_manager import DbManager, check_db

CHILD = """
import statistics, sys, time
from db_manager import DbManager
times = []
for _ in range({repeat}):
    start = time.perf_counter()
    DbManager.open({db!r})
    times.append(time.perf_counter() - start)
print(statistics.median(times))
"""


def before(rev: str, db_dir: Path, repeat: int, tmp: Path) -> float:
    """Median open time with the code of `rev`, in a fresh interpreter."""
    tree = tmp / "before"
    tree.mkdir()
    archive = subprocess.run(["git", "archive", rev], cwd=ROOT, check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
    out = subprocess.run([sys.executable, "-c", CHILD.format(repeat=repeat, db=str(db_dir))],
                         cwd=tree, env={"PYTHONPATH": str(tree), "PATH": "/usr/bin:/bin"},
                         check=True, capture_output=True, text=True)
    return float(out.stdout.split()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", default="83d956e", help="git revision of the old check")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-open-"))
    try:
        db_dir = tmp / "memory"
        build(db_dir, *FLICKR8K, np.random.default_rng(0))
        size_mb = sum((db_dir / f).stat().st_size for f in FILES) / 1e6
        old = before(args.before, db_dir, args.repeat, tmp)
        now = timed(lambda: DbManager.open(db_dir), args.repeat)
        copies = itertools.count()

        def open_copy() -> None:
            copy = tmp / f"copy{next(copies)}"
            shutil.copytree(db_dir, copy)
            DbManager.open(copy)
        copied = timed(open_copy, args.repeat) - timed(
            lambda: shutil.copytree(db_dir, tmp / f"plain{next(copies)}"), 1)
        full = timed(lambda: check_db(db_dir), 1)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    rows = [[f"before ({args.before}): size + closing bytes", f"{old:.3f} s", "1.00x"],
            ["now: stat against the seal", f"{now:.3f} s", f"{now / old:.2f}x"],
            ["now, first open of a copied folder: block CRCs", f"{copied:.3f} s",
             f"{copied / old:.2f}x"],
            ["--check-db (everything parsed)", f"{full:.3f} s", f"{full / old:.2f}x"]]
    record("Start-up check: opening a database (bench/db_open.py)", table(
        ["DbManager.open at Flickr8K's shape", "median", "vs before"], rows),
        f"7,691 images (512-d) and 38,455 captions (768-d), {size_mb:,.0f} MB of JSON. "
        f"Median of {args.repeat} opens each (the copy: opens of fresh copies, the copying "
        f"itself subtracted). Before = the previous check (size and closing bytes), run from "
        f"an export of {args.before} in a child process on the same files; it missed edits "
        "that keep a file's size. Now a save records each file's stat and a CRC-32 per MiB "
        "(updating only the blocks it wrote); a start compares the stat, and reads the files "
        "only when it differs.")


if __name__ == "__main__":
    main()
