"""A COCO-sized collection: loading its captions, building the Karpathy split, and
the memory's database (open, one experiment's append), on a synthetic collection
of Karpathy COCO's shape.

    python -m bench.coco_scale [--appends 20]

The collection is generated: dataset_coco.json with Karpathy's schema (filepath
train2014/val2014, filename, split, sentences with raw and tokens) for 82,783
train + 30,504 restval images (566,747 captions: 5 each, 312 with a sixth, as
the real memory has), 5,000 val and 5,000 test (5 captions each), and an empty
file per image (the loader checks that each image is there; no pixels are read
by what is measured). The database is seeded through db_manager as a first run
seeds it, with stand-in unit vectors (512-d images; the 566,747 human captions
waiting for their 768-d vectors, as after a first run), beside one of Flickr8K's
shape (7,691 training images, 38,455 captions) seeded the same way.

Measured, side by side in one run:
  * load: dataset_loader.load_local (parse the JSON, check every image file)
  * split: the Karpathy split of the loaded samples (test = experiments,
    train + restval = memory)
  * peak memory: the peak resident memory (VmHWM) of a fresh process after loading
    and splitting, minus its peak before (Python and the imports)
  * open: DbManager.open of the seeded COCO-shape database (median of 3, each in
    a fresh process, page cache warm): image ids and vectors; the captions are read
    on first use, timed next (the first experiment or text search of a process)
  * append: DbManager.add_experiment of a new experiment, COCO shape vs Flickr8K
    shape, alternating (median of --appends each)
Goals: open <= 1 s; the COCO-shape append <= 2x the Flickr8K-shape append.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.common import ROOT, record, table

TRAIN, RESTVAL, VAL, TEST = 82_783, 30_504, 5_000, 5_000
MEMORY_CAPTIONS = 566_747              # Karpathy COCO train + restval
SIXTH = MEMORY_CAPTIONS - 5 * (TRAIN + RESTVAL)   # images with a sixth caption
FLICKR8K = (7_691, 38_455)
IMAGE_DIM, CAPTION_DIM = 512, 768
WORDS = ("a man riding a wave on top of a surfboard", "two dogs play with a frisbee in a park",
         "a plate of food with broccoli and rice", "a red double decker bus on a city street",
         "a cat sleeping on a laptop keyboard", "people standing around a kitchen counter",
         "a giraffe eating leaves from a tall tree", "a train pulling into a station")


def generate(root: Path) -> None:
    """dataset_coco.json and an empty file per image under train2014/ and val2014/."""
    import orjson
    images, sentid = [], 0
    splits = ["train"] * TRAIN + ["restval"] * RESTVAL + ["val"] * VAL + ["test"] * TEST
    for folder in ("train2014", "val2014"):
        (root / folder).mkdir(parents=True)
    for n, split in enumerate(splits):
        folder = "train2014" if split in ("train", "restval") else "val2014"
        name = f"COCO_{folder}_{n:012d}.jpg"
        count = 6 if n < SIXTH else 5
        sentences = []
        for k in range(count):
            raw = f"{WORDS[(n + k) % len(WORDS)]} number {n} view {k}."
            sentences.append({"tokens": raw.rstrip(".").split(), "raw": raw, "imgid": n,
                              "sentid": sentid})
            sentid += 1
        images.append({"filepath": folder, "sentids": [s["sentid"] for s in sentences],
                       "filename": name, "imgid": n, "split": split, "sentences": sentences,
                       "cocoid": n})
        (root / folder / name).touch()
    (root / "dataset_coco.json").write_bytes(orjson.dumps({"images": images, "dataset": "coco"}))


def unit(rows: int, dim: int, rng: np.random.Generator) -> np.ndarray:
    x = rng.standard_normal((rows, dim), dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def seed(db_dir: Path, image_ids: list[str], captions: list[tuple[str, tuple[str, ...]]],
         rng: np.random.Generator):
    """A memory's database as a first run seeds it: image vectors, human captions
    without vectors yet."""
    from db_manager import DbIdentity, DbManager
    db = DbManager.open(db_dir, DbIdentity("clip", "bge", "bench", "split", split_name="karpathy"))
    entries = [{"id": f"{image_id}#{n}", "image_id": image_id, "caption": text, "source": "human"}
               for image_id, texts in captions for n, text in enumerate(texts)]
    db.seed(image_ids, unit(len(image_ids), IMAGE_DIM, rng), entries, caption_dim=CAPTION_DIM)
    return db


def peak_mb() -> float:
    """This process's peak resident memory so far (VmHWM: unlike ru_maxrss on Linux, it
    does not carry the parent's peak over exec)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure_load(root: Path, db_dir: Path) -> dict:
    """In a fresh process: load, split, seed; the times and memory of load + split."""
    start = peak_mb()
    from dataset_loader import Collection, load_local
    before = peak_mb()
    t0 = time.perf_counter()
    samples = load_local(root)
    t1 = time.perf_counter()
    collection = Collection(str(root), samples, 0, 42, split="karpathy")
    t2 = time.perf_counter()
    peak = peak_mb()
    memory = collection.train
    result = {"load_s": t1 - t0, "split_s": t2 - t1, "peak_mb": peak - before,
              "process_mb": peak, "python_mb": start,
              "images": len(samples), "experiment": len(collection.experiment),
              "memory": len(memory), "memory_captions": sum(len(s.captions) for s in memory),
              "val_left_out": sum(s.split == "val" for s in samples)}
    t3 = time.perf_counter()
    seed(db_dir, [s.image_id for s in memory], [(s.image_id, s.captions) for s in memory],
         np.random.default_rng(0))
    result["seed_s"] = time.perf_counter() - t3
    return result


def measure_open(db_dir: Path) -> dict:
    """In a fresh process: DbManager.open of the database, and the memory it took."""
    from db_manager import DbManager
    before = peak_mb()
    t0 = time.perf_counter()
    db = DbManager.open(db_dir)
    seconds = time.perf_counter() - t0
    opened = peak_mb() - before
    t1 = time.perf_counter()
    captions = len(db.captions)         # what the first experiment or text search reads
    return {"open_s": seconds, "images": len(db.image_ids), "captions": captions,
            "open_mb": opened, "captions_s": time.perf_counter() - t1,
            "captions_mb": peak_mb() - before}


def child(mode: str, *paths: Path) -> dict:
    out = subprocess.run([sys.executable, "-m", "bench.coco_scale", f"--{mode}", *map(str, paths)],
                         cwd=ROOT, capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    return json.loads(out.stdout.strip().splitlines()[-1])


def appends(coco_db: Path, flickr_db: Path, count: int) -> tuple[float, float]:
    """Median seconds of one experiment's append, COCO shape and Flickr8K shape, alternating."""
    import statistics
    from db_manager import DbManager
    dbs = {"coco": DbManager.open(coco_db), "flickr": DbManager.open(flickr_db)}
    rng = np.random.default_rng(1)
    times: dict[str, list[float]] = {"coco": [], "flickr": []}
    for k in range(count):
        for name, db in dbs.items():
            image, caption = unit(1, IMAGE_DIM, rng)[0], unit(1, CAPTION_DIM, rng)[0]
            start = time.perf_counter()
            db.add_experiment(f"COCO_val2014_exp{k:08d}.jpg", image, "a generated caption",
                              caption, "vlm", k, "2026-12-03T00:00:00")
            times[name].append(time.perf_counter() - start)
    return statistics.median(times["coco"]), statistics.median(times["flickr"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--appends", type=int, default=20)
    parser.add_argument("--measure-load", nargs=2, metavar=("ROOT", "DB"), help=argparse.SUPPRESS)
    parser.add_argument("--measure-open", metavar="DB", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure_load:
        print(json.dumps(measure_load(*map(Path, args.measure_load))))
        return
    if args.measure_open:
        print(json.dumps(measure_open(Path(args.measure_open))))
        return

    tmp = Path(tempfile.mkdtemp(prefix="bench-coco-"))
    try:
        start = time.perf_counter()
        generate(tmp / "coco")
        generated = time.perf_counter() - start
        size_mb = (tmp / "coco" / "dataset_coco.json").stat().st_size / 1e6
        loaded = child("measure-load", tmp / "coco", tmp / "coco-db")
        opens = [child("measure-open", tmp / "coco-db") for _ in range(3)]
        opened = sorted(opens, key=lambda o: o["open_s"])[1]
        flickr_ids = [f"{n:07d}.jpg" for n in range(FLICKR8K[0])]
        seed(tmp / "flickr-db", flickr_ids, [(i, tuple(f"{WORDS[n % 8]} {n} {k}." for k in range(5)))
                                             for n, i in enumerate(flickr_ids)],
             np.random.default_rng(2))
        flickr_open = sorted(child("measure-open", tmp / "flickr-db")["open_s"] for _ in range(3))[1]
        coco_append, flickr_append = appends(tmp / "coco-db", tmp / "flickr-db", args.appends)
        db_mb = sum(f.stat().st_size for f in (tmp / "coco-db").rglob("*") if f.is_file()) / 1e6
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    sizes = table(["split", "images", "captions"], [
        ["experiment (test)", f"{loaded['experiment']:,}", ""],
        ["memory (train + restval)", f"{loaded['memory']:,}", f"{loaded['memory_captions']:,}"],
        ["val (in neither)", f"{loaded['val_left_out']:,}", ""],
        ["all images loaded", f"{loaded['images']:,}", ""]])
    costs = table(["step", "COCO shape", "Flickr8K shape", "ratio", "goal"], [
        ["load captions (parse + check files)", f"{loaded['load_s']:.2f} s", "", "", ""],
        ["Karpathy split", f"{loaded['split_s'] * 1000:.0f} ms", "", "", ""],
        ["peak memory of load + split", f"{loaded['peak_mb']:,.0f} MB", "", "",
         f"reported (process {loaded['process_mb']:,.0f} MB)"],
        ["open the database", f"{opened['open_s']:.2f} s", f"{flickr_open:.2f} s",
         f"{opened['open_s'] / flickr_open:.1f}x", "<= 1 s"],
        ["memory of the open database", f"{opened['open_mb']:,.0f} MB", "", "", ""],
        ["first read of its captions (first experiment)", f"{opened['captions_s']:.2f} s",
         "", "", f"once per process; {opened['captions_mb']:,.0f} MB with them"],
        ["one experiment's append (median)", f"{coco_append * 1000:.1f} ms",
         f"{flickr_append * 1000:.1f} ms", f"{coco_append / flickr_append:.2f}x", "<= 2x"]])
    record("COCO scale: loading, split, database (bench/coco_scale.py)",
           sizes + "\n\n" + costs,
           f"Synthetic Karpathy COCO ({loaded['images']:,} images, dataset_coco.json "
           f"{size_mb:,.0f} MB with tokens, generated in {generated:.0f} s; an empty file per "
           f"image). The database was seeded through db_manager as a first run seeds it "
           f"({loaded['seed_s']:.0f} s, {db_mb:,.0f} MB on disk: image vectors and JSON, the "
           f"captions waiting for their vectors), with stand-in unit vectors; Flickr8K shape = "
           f"{FLICKR8K[0]:,} images / {FLICKR8K[1]:,} captions seeded the same way. Load, split "
           f"and their memory in a fresh process (peak resident memory after minus before); open = median "
           f"of 3 fresh processes; appends alternate between the two databases "
           f"({args.appends} each).")


if __name__ == "__main__":
    main()
