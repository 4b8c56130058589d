"""Warm start: a second `python main.py` (another experiment index) vs the first, cold one.

    python -m bench.warm_start [--images 600] [--experiment-samples 100]

Real-size random-weight models (bench/models.py: ViT-B/32 CLIP, a BERT-base
sentence encoder in BGE-base's place, the SmolVLM-256M architecture with one tile per
image) and a Flickr8K-layout folder of 500x375 JPEGs. Both runs are separate
processes with the same DB_DIR and CACHE_DIR, as a user would run them:
  * cold: builds the memory (CLIP over every training image, the caption encoder
    over their captions), then captions one experiment image
  * warm: opens the databases it left and captions another image
Time to the first token is counted from the start of main() (settings parsed):
loading + reading, embedding and searching for the image + prompt + the generate
call up to its first new token, from the run's results/experiment_*.json timings.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import ROOT, record, table
from bench.models import model_path

BEFORE_FIRST_TOKEN = ("load", "load_image", "embed_image", "search", "prompt")


def run(env: dict[str, str], index: int, results: Path) -> dict:
    before = set(results.glob("experiment_*.json")) if results.exists() else set()
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "main.py", "--experiment-image-index", str(index)],
                          env=env, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode:
        sys.exit(f"main.py failed:\n{proc.stderr[-3000:]}")
    (new,) = set(results.glob("experiment_*.json")) - before
    timings = json.loads(new.read_text())["timings"]
    return {"wall": wall, "timings": timings, "log": proc.stderr,
            "first_token": sum(timings[k] for k in BEFORE_FIRST_TOKEN) + timings["first_token"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=600)
    parser.add_argument("--experiment-samples", type=int, default=100)
    parser.add_argument("--new-tokens", type=int, default=20)
    parser.add_argument("--out", help="append the table here instead of BENCHMARKS.md")
    args = parser.parse_args()
    from tests.fake_flickr import make_flickr

    models = {name: str(model_path(name)) for name in ("clip", "smolvlm-256m", "bge-base")}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = make_flickr(tmp / "flickr", n_images=args.images, image_size=(500, 375))
        env = {k: v for k, v in os.environ.items() if not k.startswith("RECAP_")}
        env.update(HF_HUB_OFFLINE="1", RECAP_DATASET_NAME=str(data),
                   RECAP_EXPERIMENT_SAMPLES=str(args.experiment_samples),
                   RECAP_CLIP_MODEL_NAME=models["clip"],
                   RECAP_VLM_MODEL_NAME=models["smolvlm-256m"],
                   RECAP_CAPTION_EMBEDDING_MODEL=models["bge-base"],
                   RECAP_MAX_NEW_TOKENS=str(args.new_tokens), RECAP_DB_DIR=str(tmp / "db"),
                   RECAP_RESULTS_DIR=str(tmp / "results"), RECAP_CACHE_DIR=str(tmp / "cache"))
        cold = run(env, 0, tmp / "results")
        cache = sorted((tmp / "cache").rglob("*.npy"))
        stamps = [p.stat().st_mtime_ns for p in cache]
        warm = run(env, 1, tmp / "results")
        untouched = stamps == [p.stat().st_mtime_ns for p in cache]
    rebuilt = "building the memory" in warm["log"]
    rows = []
    for name, r in (("cold (first run)", cold), ("warm (second run)", warm)):
        t = r["timings"]
        rows.append([name, f"{r['wall']:.1f}", f"{t['load']:.1f}", f"{r['first_token']:.1f}",
                     f"{t['generate']:.1f}", f"{t['embed_caption'] + t['save_to_db']:.2f}",
                     "yes" if "building the memory" in r["log"] else "no"])
    body = table(["run", "wall (s)", "load (s)", "first token (s)", "generate (s)",
                  "embed caption + save (s)", "memory built"], rows)
    train = args.images - args.experiment_samples
    share = (warm["timings"]["load"] + warm["timings"]["generate"]) / warm["wall"]
    notes = (f"{args.images} JPEGs of 500×375 ({train} in the training pool, {train * 5} "
             f"captions), {args.new_tokens}-token greedy captions, one tile per image. "
             f"Warm vs cold: {cold['wall'] / warm['wall']:.1f}× faster wall time, first token "
             f"{cold['first_token'] / warm['first_token']:.1f}× sooner. Warm run: training-pool "
             f"embeddings recomputed: {'YES' if rebuilt else 'none'}; image-embedding cache "
             f"{'untouched' if untouched else 'REWRITTEN'}; model loading + generation are "
             f"{share:.0%} of its wall time (the rest: interpreter start and imports, reading the "
             "data set's caption file, embedding the one query image and its caption, saving).")
    record("Warm start (bench/warm_start.py)", body, notes, path=args.out)


if __name__ == "__main__":
    main()
