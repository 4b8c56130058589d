"""Per-experiment database write cost as the memory grows: an append, a rerun
(replacing a generated caption), and rewriting everything.

    python -m bench.db_append [--sizes 1000 10000 100000] [--flickr8k] [--appends 20]

For each size N the database holds N images (512-d) and N captions (768-d),
like Flickr8K with CLIP ViT-B/32 and BGE-base; --flickr8k adds the real
shape: 7,691 training images and their 38,455 captions. Measured side by side:
  * append: DbManager.add_experiment of a new image (journal + in-place JSON
    appends + fsyncs)
  * replace: add_experiment again for an image and VLM already stored (a rerun),
    which writes the new caption and vector over the old ones in place
  * rewrite: writing the three JSON files whole, as the original scripts did
    after every experiment (with orjson, the faster of the two serialisers,
    and fsync, so the comparison is fair to it)
After each size the JSON files are parsed with json.load and must hold one
entry per (image, VLM).
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np

from atomic_files import dumps
from bench.common import record, table, timed
from db_format import FILES, STATE, WORK, headers, read_state
from db_journal import write_json_file
from db_manager import DbIdentity, DbManager

IMAGE_DIM, CAPTION_DIM = 512, 768
FLICKR8K = (7691, 38455)


def unit(rows: int, dim: int, rng: np.random.Generator) -> np.ndarray:
    x = rng.standard_normal((rows, dim), dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def build(db_dir: Path, images: int, captions: int, rng: np.random.Generator) -> DbManager:
    identity = DbIdentity("clip", "bge", "bench", "split")
    db = DbManager.open(db_dir, identity)
    ids = [f"{i:07d}.jpg" for i in range(images)]
    entries = [{"id": f"{ids[n % images]}#{n // images}", "image_id": ids[n % images],
                "caption": "a dog runs through the grass .", "source": "human"}
               for n in range(captions)]
    db.seed(ids, unit(images, IMAGE_DIM, rng), entries, unit(captions, CAPTION_DIM, rng))
    return db


def check_files(db_dir: Path) -> None:
    """The JSON files load with json.load and hold one entry per (image, VLM)."""
    data = {name: json.loads((db_dir / name).read_bytes()) for name in FILES}
    generated = [(c["image_id"], c["model"]) for c in data[FILES[1]]["entries"]
                 if c["source"] == "generated"]
    assert len(generated) == len(set(generated)), "two entries for one (image, VLM)"
    assert [c["id"] for c in data[FILES[1]]["entries"]] == [
        e["id"] for e in data[FILES[2]]["entries"]], "caption files disagree"


def measure(images: int, captions: int, appends: int, rng: np.random.Generator) -> list[str]:
    tmp = Path(tempfile.mkdtemp(prefix="bench-db-"))
    try:
        db = build(tmp, images, captions, rng)
        image_vectors = unit(appends, IMAGE_DIM, rng)
        caption_vectors = unit(2 * appends, CAPTION_DIM, rng)
        counter = iter(range(appends))

        def append() -> None:
            k = next(counter)
            db.add_experiment(f"exp{k}.jpg", image_vectors[k], "a generated caption",
                              caption_vectors[k], "vlm", k, "2026-11-23T00:00:00")
        per_append = timed(append, appends)
        reruns = iter(range(appends))

        def replace() -> None:  # a rerun of experiment k: same image, same VLM
            k = next(reruns)
            db.add_experiment(f"exp{k}.jpg", image_vectors[k], "another generated caption",
                              caption_vectors[appends + k], "vlm", k, "2026-11-24T00:00:00")
        per_replace = timed(replace, appends)
        check_files(tmp)
        head = headers(read_state(tmp / WORK / STATE))
        # read before timing: the original scripts held these in memory
        rows, entries = db.image_rows(), [e.to_dict() for e in db.entries()]
        stored_vectors = db.caption_rows().vectors

        def rewrite() -> None:  # the three files, whole
            write_json_file(tmp / "rw_images.json", head[FILES[0]], (
                dumps({"image_id": i, "kind": k, "embedding": v}) for i, k, v in
                zip(rows.ids, rows.kinds, rows.vectors)))
            write_json_file(tmp / "rw_captions.json", head[FILES[1]],
                            (dumps(c) for c in entries))
            write_json_file(tmp / "rw_embeddings.json", head[FILES[2]], (
                dumps({"id": c["id"], "image_id": c["image_id"], "embedding": v})
                for c, v in zip(entries, stored_vectors)))
        per_rewrite = timed(rewrite, 3 if captions <= 10000 else 1)
        size_mb = sum((tmp / f).stat().st_size for f in FILES) / 1e6
        return [f"{images:,} / {captions:,}", f"{size_mb:,.0f} MB", f"{per_append * 1000:.1f} ms",
                f"{per_replace * 1000:.1f} ms", f"{per_replace / per_append:.2f}x",
                f"{per_rewrite * 1000:,.0f} ms", f"{per_rewrite / per_append:,.0f}x"]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="*", default=[1000, 10000, 100000])
    parser.add_argument("--flickr8k", action="store_true", help="add the Flickr8K shape")
    parser.add_argument("--appends", type=int, default=20)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    shapes = [(n, n) for n in args.sizes] + ([FLICKR8K] if args.flickr8k else [])
    rows = [measure(images, captions, args.appends, rng) for images, captions in shapes]
    record("Database write cost: append, rerun, rewrite (bench/db_append.py)", table(
        ["images / captions", "JSON on disk", "append (median)", "replace (median)",
         "replace / append", "full rewrite", "rewrite / append"], rows),
        f"Append = one new experiment through DbManager.add_experiment: checksummed journal "
        f"line, in-place appends to the three JSON files, sidecars, vector and slot files, state "
        f"commit, each fsynced. Replace = add_experiment again for a stored (image, VLM), a "
        f"rerun: the new caption and vector written over the old ones' bytes in place (median "
        f"of {args.appends} each). Full rewrite = the three JSON files written whole with orjson "
        f"(what the original design did after every experiment). After each size the JSON "
        f"files were json.load-ed: one entry per (image, VLM).")


if __name__ == "__main__":
    main()
