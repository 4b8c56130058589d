"""Fail the N-th call of one OS primitive during one database write, for every N.

    python tests/fault_injection.py [KIND ...]

KIND is append (a new experiment), replace (a rerun of a stored experiment
whose caption fits the old one's room), rewrite (a rerun with a much longer
caption), batch (add_images of 4 images with captions), embed (first vectors for
4 of the human captions of a database seeded without them) or seed (creating the
database); all by default.
For each kind and primitive (write, fsync, replace, truncate: os.write /
os.fsync / os.replace / os.ftruncate, and a file object's write / truncate)
the write runs on a fresh copy of a small database with the N-th call of that
primitive raising OSError(EIO), for N = 1, 2, ... until the write finishes
without reaching N. Then ONE fresh process opens every copy as any command
does (no --repair-db) and runs check_db. A copy is inconsistent if opening
fails, check_db finds a problem, the write is half there (some of its entries
without the others, or a caption with another caption's vector), or a write
that returned is missing. Prints a table of points tried / inconsistent.
"""

from __future__ import annotations

import builtins
import errno
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT)]

KINDS = ("append", "replace", "rewrite", "batch", "embed", "seed")
IDENTITY = ("clip", "bge", "flickr", "abc")
PRIMITIVES = ("write", "fsync", "replace", "truncate")
OS_CALLS = {"write": "write", "fsync": "fsync", "replace": "replace", "truncate": "ftruncate"}


def unit(rows: int, dim: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).normal(size=(rows, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def seed(db, lazy: bool = False) -> None:
    """3 training images with 2 human captions each (`lazy`: without their vectors)."""
    db.seed([f"im{i}.jpg" for i in range(3)], unit(3, 4, 0),
            [{"id": f"im{i}.jpg#{n}", "image_id": f"im{i}.jpg", "caption": f"caption {i} {n}",
              "source": "human"} for i in range(3) for n in range(2)],
            None if lazy else unit(6, 5, 1), caption_dim=5)


def build(db_dir: Path, lazy: bool = False) -> None:
    """The seed and one experiment (a generated caption)."""
    from db_manager import DbIdentity, DbManager
    db = DbManager.open(db_dir, DbIdentity(*IDENTITY))
    seed(db, lazy)
    db.add_experiment("exp.jpg", unit(1, 4, 2)[0], "a dog on the grass", unit(1, 5, 3)[0],
                      vlm_model="vlm", experiment_index=0, timestamp="2026-12-01T00:00:00")


def batch():
    ids = [f"/photos/col-{i}.jpg" for i in range(4)]
    captions = [{"id": f"{i}#gen:vlm", "image_id": i, "caption": f"caption of {i}",
                 "source": "generated", "model": "vlm"} for i in ids]
    return ids, unit(4, 4, 20), captions, unit(4, 5, 21)


EMBEDDED = [1, 2, 3, 4]   # caption rows of the lazy base that get vectors
REPLACEMENT = {"replace": "a cat on the sofa", "rewrite": "a much longer caption " * 30}


def write(db, kind: str) -> None:
    if kind == "append":
        db.add_experiment("new.jpg", unit(1, 4, 4)[0], "a new caption", unit(1, 5, 5)[0],
                          vlm_model="vlm", experiment_index=1, timestamp="2026-12-01T00:00:01")
    elif kind in REPLACEMENT:
        db.add_experiment("exp.jpg", unit(1, 4, 2)[0], REPLACEMENT[kind], unit(1, 5, 6)[0],
                          vlm_model="vlm", experiment_index=0, timestamp="2026-12-01T00:00:02")
    elif kind == "batch":
        db.add_images(*batch())
    elif kind == "embed":
        db.add_caption_vectors(EMBEDDED, unit(len(EMBEDDED), 5, 7))
    else:
        seed(db)


class Faults:
    """Make the `n`-th call of `primitive` raise OSError while installed."""

    def __init__(self, primitive: str, n: int):
        self.primitive, self.n, self.calls = primitive, n, 0
        self.saved: list[tuple[object, str, object]] = []

    def hit(self) -> None:
        self.calls += 1
        if self.calls == self.n:
            raise OSError(errno.EIO, f"injected failure of {self.primitive} call {self.n}")

    def __enter__(self) -> "Faults":
        real = getattr(os, OS_CALLS[self.primitive])

        def failing(*args, **kwargs):
            self.hit()
            return real(*args, **kwargs)
        self._patch(os, OS_CALLS[self.primitive], failing)
        if self.primitive in ("write", "truncate"):  # file objects: not through os.write
            for owner, name in ((builtins, "open"), (os, "fdopen")):
                self._patch(owner, name, self._counted(getattr(owner, name)))
        return self

    def __exit__(self, *exc) -> None:
        for owner, name, value in reversed(self.saved):
            setattr(owner, name, value)

    def _patch(self, owner, name: str, value) -> None:
        self.saved.append((owner, name, getattr(owner, name)))
        setattr(owner, name, value)

    def _counted(self, opener):
        faults = self

        class Counted:
            def __init__(self, f):
                self._f = f

            def __enter__(self):
                self._f.__enter__()
                return self

            def __exit__(self, *exc):
                return self._f.__exit__(*exc)

            def __iter__(self):
                return iter(self._f)

            def __getattr__(self, name):
                return getattr(self._f, name)

            def write(self, data):
                if faults.primitive == "write":
                    faults.hit()
                return self._f.write(data)

            def truncate(self, *args):
                if faults.primitive == "truncate":
                    faults.hit()
                return self._f.truncate(*args)

        def opened(*args, **kwargs):
            f = opener(*args, **kwargs)
            mode = kwargs.get("mode", args[1] if len(args) > 1 else "r")
            return f if set(str(mode)) <= {"r", "b", "t"} else Counted(f)
        return opened


def trials(kinds: list[str], work: Path) -> list[dict]:
    from db_manager import DbIdentity, DbManager
    base, lazy = work / "base", work / "lazy-base"
    build(base)
    build(lazy, lazy=True)
    done = []
    for kind in kinds:
        for primitive in PRIMITIVES:
            n = 0
            while True:
                n += 1
                copy = work / f"{kind}-{primitive}-{n}"
                if kind == "seed":
                    copy.mkdir()
                else:
                    shutil.copytree(lazy if kind == "embed" else base, copy)
                db = DbManager.open(copy, DbIdentity(*IDENTITY))
                error = None
                with Faults(primitive, n) as faults:
                    try:
                        write(db, kind)
                    except BaseException as exc:  # noqa: BLE001 - what the user would see
                        error = f"{type(exc).__name__}: {exc}"
                if faults.calls < n:  # finished without reaching the N-th call
                    shutil.rmtree(copy)
                    break
                done.append({"kind": kind, "primitive": primitive, "n": n, "dir": str(copy),
                             "error": error})
    return done


def verify(trial: dict) -> str | None:
    """None if the database in trial["dir"] opens, checks clean and holds the write
    all or not at all (all, if it returned); else what is wrong."""
    from db_manager import DbManager, check_db
    try:
        db = DbManager.open(trial["dir"])
    except Exception as exc:  # noqa: BLE001
        return f"open: {exc}"
    described = db.describe()
    problems = check_db(trial["dir"]) if not described.empty else []
    if problems:
        return "check_db: " + "; ".join(problems)
    kind = trial["kind"]
    image_ids = set(db.image_rows().ids)
    if kind == "seed":
        parts = [not described.empty and described.images == 3 and described.captions == 6]
    elif kind == "append":
        parts = ["new.jpg" in image_ids, db.has_caption("new.jpg#gen:vlm")]
    elif kind in REPLACEMENT:
        entry = db.caption("exp.jpg#gen:vlm")
        new = entry.caption == REPLACEMENT[kind]
        vector = unit(1, 5, 6 if new else 3)[0]
        if not np.array_equal(db.caption_rows().vectors[entry.row], vector):
            return "the caption and its vector are from different writes"
        parts = [new]
    elif kind == "embed":
        missing = set(db.missing_caption_rows())
        parts = [row not in missing for row in EMBEDDED]
        if sorted(missing - set(EMBEDDED)) != [0, 5]:
            return "other captions got or lost vectors"
        if all(parts) and not np.array_equal(db.caption_rows().vectors[EMBEDDED],
                                             unit(len(EMBEDDED), 5, 7)):
            return "the captions hold other vectors than the write's"
    else:
        ids, _, captions, _ = batch()
        parts = [i in image_ids for i in ids] + [db.has_caption(c["id"]) for c in captions]
    if any(parts) and not all(parts):
        return "half of the write is visible"
    if trial["error"] is None and not all(parts):
        return "a write that returned is missing"
    return None


def run(kinds: list[str]) -> list[dict]:
    """Every trial of `kinds`, each with "problem" (None if consistent)."""
    work = Path(tempfile.mkdtemp(prefix="faults-"))
    try:
        done = trials(kinds, work)
        out = subprocess.run([sys.executable, __file__, "--verify"], input=json.dumps(done),
                             capture_output=True, text=True, check=True)
        return json.loads(out.stdout)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def table(results: list[dict]) -> str:
    lines = ["| primitive | " + " | ".join(sorted({r["kind"] for r in results}, key=KINDS.index))
             + " |", "|---" * (1 + len({r["kind"] for r in results})) + "|"]
    for primitive in PRIMITIVES:
        cells = []
        for kind in sorted({r["kind"] for r in results}, key=KINDS.index):
            mine = [r for r in results if r["kind"] == kind and r["primitive"] == primitive]
            cells.append(f"{len(mine)} points, {sum(r['problem'] is not None for r in mine)} "
                         "inconsistent")
        lines.append(f"| {primitive} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    if sys.argv[1:] == ["--verify"]:
        import logging
        logging.disable(logging.CRITICAL)
        done = json.load(sys.stdin)
        print(json.dumps([{**t, "problem": verify(t)} for t in done]))
        return
    results = run(sys.argv[1:] or list(KINDS))
    print(table(results))
    for r in results:
        if r["problem"]:
            print(f"{r['kind']} {r['primitive']} #{r['n']} ({r['error']}): {r['problem']}")


if __name__ == "__main__":
    main()
