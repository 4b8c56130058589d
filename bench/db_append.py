"""Per-experiment database write cost as the memory grows, against rewriting it all.

    python -m bench.db_append [--sizes 1000 10000 100000] [--appends 20]

For each size N the database holds N images (512-d) and N captions (768-d),
like Flickr8K with CLIP ViT-B/32 and BGE-base. Measured side by side:
  * append: DbManager.add_experiment (journal + in-place JSON append + fsyncs)
  * rewrite: writing the three JSON files whole, as the original scripts did
    after every experiment (with orjson, the faster of the two serialisers,
    and fsync, so the comparison is fair to it)
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import numpy as np

from bench.common import record, table, timed
from db_manager import DbIdentity, DbManager, _write_json_file, _dumps, FILES

IMAGE_DIM, CAPTION_DIM = 512, 768


def unit(rows: int, dim: int, rng: np.random.Generator) -> np.ndarray:
    x = rng.standard_normal((rows, dim), dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def build(db_dir: Path, n: int, rng: np.random.Generator) -> DbManager:
    identity = DbIdentity("clip", "bge", "bench", "split")
    db = DbManager.open(db_dir, identity)
    ids = [f"{i:07d}.jpg" for i in range(n)]
    captions = [{"id": f"{i}#0", "image_id": i, "caption": "a dog runs through the grass .",
                 "source": "human"} for i in ids]
    db.seed(ids, unit(n, IMAGE_DIM, rng), captions, unit(n, CAPTION_DIM, rng))
    return db


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 100000])
    parser.add_argument("--appends", type=int, default=20)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    rows, first = [], None
    for n in args.sizes:
        tmp = Path(tempfile.mkdtemp(prefix="bench-db-"))
        try:
            db = build(tmp, n, rng)
            image_vectors, caption_vectors = unit(args.appends, IMAGE_DIM, rng), unit(
                args.appends, CAPTION_DIM, rng)
            counter = iter(range(args.appends))

            def append() -> None:
                k = next(counter)
                db.add_experiment(f"exp{k}.jpg", image_vectors[k], "a generated caption",
                                  caption_vectors[k], "vlm", k, "2026-11-23T00:00:00")
            per_append = timed(append, args.appends)
            headers = db._headers()

            def rewrite() -> None:  # the three files, whole
                _write_json_file(tmp / "rw_images.json", headers[FILES[0]], (
                    _dumps({"image_id": i, "kind": k, "embedding": v}) for i, k, v in
                    zip(db.image_ids, db.image_kinds, db.image_vectors)))
                _write_json_file(tmp / "rw_captions.json", headers[FILES[1]],
                                 (_dumps(c) for c in db.captions))
                _write_json_file(tmp / "rw_embeddings.json", headers[FILES[2]], (
                    _dumps({"id": c["id"], "image_id": c["image_id"], "embedding": v})
                    for c, v in zip(db.captions, db.caption_vectors)))
            per_rewrite = timed(rewrite, 3 if n <= 10000 else 1)
            size_mb = sum((tmp / f).stat().st_size for f in FILES) / 1e6
            first = first or per_append
            rows.append([f"{n:,}", f"{size_mb:,.0f} MB", f"{per_append * 1000:.1f} ms",
                         f"{per_append / first:.2f}x", f"{per_rewrite * 1000:,.0f} ms",
                         f"{per_rewrite / per_append:,.0f}x"])
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    record("Database append cost (bench/db_append.py)", table(
        ["entries", "JSON on disk", "append (median)", "vs smallest", "full rewrite",
         "rewrite / append"], rows),
        "Append = one experiment through DbManager.add_experiment: checksummed journal line, "
        "in-place appends to the three JSON files, sidecars and vector files, state commit, "
        "each fsynced. Full rewrite = the three JSON files written whole with orjson "
        "(what the original design did after every experiment).")


if __name__ == "__main__":
    main()
