"""A writer process for the database's crash and concurrency tests.

    python db_writer.py DB_DIR PREFIX COUNT [CRASH_POINT]

Appends COUNT experiments with image ids PREFIX-0.jpg, PREFIX-1.jpg, ... and
prints "ack ID" once each append has returned. CRASH_POINT ("journal",
"json:N", "state", "truncate-journal") kills the process (os._exit, no
clean-up) at that point of the first append, to simulate a crash there.
"""

import os
import sys
from pathlib import Path

import numpy as np

import db_format
import db_journal
import db_manager


def vector(seed: int, dim: int) -> np.ndarray:
    v = np.random.default_rng(seed).normal(size=dim).astype(np.float32)
    return v / np.linalg.norm(v)


def crash_at(point: str) -> None:
    def die(*args, **kwargs):
        os._exit(9)
    if point == "journal":
        real_append = db_journal.append

        def torn_append(path, blob):
            if Path(path).name == db_format.JOURNAL:
                real_append(path, blob[: len(blob) // 2])  # half a line reaches the disk
                die()
            return real_append(path, blob)
        db_journal.append = torn_append
    elif point.startswith("json:"):
        calls, after = [0], int(point[5:])
        real = db_journal.append_json

        def append_then_die(*args, **kwargs):
            result = real(*args, **kwargs)
            calls[0] += 1
            if calls[0] == after:
                die()
            return result
        db_journal.append_json = append_then_die
    elif point == "state":
        real = db_journal.write_bytes_atomic

        def die_on_state(path, blob, **kwargs):
            if Path(path).name == db_format.STATE:
                die()
            return real(path, blob, **kwargs)
        db_journal.write_bytes_atomic = die_on_state
    elif point == "truncate-journal":
        real = db_journal.truncate

        def die_on_journal(path, size):
            if Path(path).name == db_format.JOURNAL:
                die()
            return real(path, size)
        db_journal.truncate = die_on_journal


def main() -> None:
    db_dir, prefix, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
    if len(sys.argv) > 4:
        crash_at(sys.argv[4])
    db = db_manager.DbManager.open(db_dir)
    dims = db.describe()
    for n in range(count):
        image_id = f"{prefix}-{n}.jpg"
        seed = abs(hash(image_id)) % 2**32
        db.add_experiment(image_id, vector(seed, dims.image_dim), f"caption of {image_id}",
                          vector(seed + 1, dims.caption_dim), vlm_model="vlm",
                          experiment_index=n, timestamp="2026-11-23T12:00:00+00:00")
        print("ack", image_id, flush=True)


if __name__ == "__main__":
    main()
