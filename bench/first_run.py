"""First run: a cold `python main.py`, then two caption text searches, before vs after
lazy caption embedding.

    python -m bench.first_run [--images 2023] [--experiment-samples 100] [--before 49c846f]

Real-size random-weight models (bench/models.py, as in warm_start.py) and one
Flickr8K-layout folder of 500x375 JPEGs. Two arms, one after the other, each with
its own cold DB_DIR, CACHE_DIR (the image-embedding cache) and RESULTS_DIR:
  * before: the tree of git revision --before (extracted with `git archive`), whose
    first run embeds every training caption before it captions
  * after: the working tree, whose first run may leave the captions for later
In each arm, timed from launch to exit as separate processes: `python main.py`
(seconds to the first caption), then `python search.py --text "a dog runs"
--text-by captions` twice (the first may embed the captions; the second should not).

The default is a quarter of Flickr8K (2,023 of 8,091 images; 100 of 400 held out), about
10-12 minutes on 2 cores. The Flickr8K-size estimate scales the embedding stages linearly
by training images (7,691) and keeps the rest (start-up, model loading, the caption) as
measured. Stages come from the INFO log's timestamps (whole seconds), assuming of either
version's logs only this: a stage starts with the product's line "building the memory
from N training images" (CLIP) or "embedding N ... captions" (the caption model; a notice
like "the first search embeds N captions" is not one) and lasts until the next line the
product's own modules log (libraries' lines, progress bars, warnings skipped), else until
the process exits. So the database write after a stage scales with it; opening the memory
in later processes counts as fixed. Run it on a quiet machine: the notes give the load.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from bench.common import ROOT, record, table
from bench.models import model_path

FLICKR8K_TRAIN = 8091 - 400
QUERY = "a dog runs"
# config.configure_logging: "HH:MM:SS LEVEL module: message" (a date or ",ms" allowed)
LOG_LINE = re.compile(r"^(?:\d{4}-\d\d-\d\d )?(\d\d):(\d\d):(\d\d)(?:,\d+)? [A-Z]+ (\S+): (.*)$")
IMAGES_START = re.compile(r"building the memory from ([\d,]+) training images")
CAPTIONS_START = re.compile(r"embedding ([\d,]+) \D*captions")


def stages(log: str, modules: set[str], start: float, end: float) -> dict[str, tuple[int, float]]:
    """{"images"|"captions": (count, seconds)} of the embedding stages in the INFO log of
    a process that ran from `start` to `end` (epoch seconds), whose own top-level modules
    are `modules`; a stage seen twice is summed."""
    midnight = time.mktime(time.localtime(start)[:3] + (0, 0, 0, 0, 0, -1))
    lines = []
    for line in log.splitlines():
        if (m := LOG_LINE.match(line)) and m[4].split(".")[0] in modules:
            stamp = midnight + int(m[1]) * 3600 + int(m[2]) * 60 + int(m[3])
            lines.append((stamp + (86400 if stamp < start - 1 else 0), m[5]))  # past midnight
    found: dict[str, tuple[int, float]] = {}
    for i, (stamp, message) in enumerate(lines):
        for name, pattern in (("images", IMAGES_START), ("captions", CAPTIONS_START)):
            if m := pattern.search(message):
                count, seconds = found.get(name, (0, 0.0))
                until = lines[i + 1][0] if i + 1 < len(lines) else end
                found[name] = (count + int(m[1].replace(",", "")), seconds + until - stamp)
    return found


def launch(args: list[str], env: dict[str, str], cwd: Path) -> dict:
    """Run one process; its wall time, stderr and embedding stages. Exits if it fails."""
    own = {p.stem for p in cwd.glob("*.py")} | {p.parent.name for p in cwd.glob("*/__init__.py")}
    start, clock = time.time(), time.perf_counter()
    proc = subprocess.run([sys.executable, *args], env=env, cwd=cwd, capture_output=True,
                          text=True, check=False)
    wall = time.perf_counter() - clock
    if proc.returncode:
        sys.exit(f"{' '.join(args)} failed in {cwd}:\n{proc.stderr[-3000:]}")
    return {"wall": wall, "stdout": proc.stdout, "log": proc.stderr,
            "stages": stages(proc.stderr, own, start, start + wall)}


def run_arm(code: Path, env: dict[str, str]) -> dict:
    """A cold main.py, then two caption text searches, in the tree `code`."""
    first = launch(["main.py"], env, code)
    results = list(Path(env["RECAP_RESULTS_DIR"]).glob("experiment_*.json"))
    if len(results) != 1:
        sys.exit(f"{code}: expected one experiment result, found {len(results)}")
    first["timings"] = json.loads(results[0].read_text())["timings"]
    searches = []
    for n in (1, 2):
        search = launch(["search.py", "--text", QUERY, "--text-by", "captions", "--json",
                         "--plot", str(Path(env["RECAP_RESULTS_DIR"]) / f"search_{n}.png")],
                        env, code)
        hits = json.loads(search["stdout"][search["stdout"].index("{"):])["hits"]
        if not hits:
            sys.exit(f"{code}: text search {n} found nothing")
        searches.append(search)
    return {"main": first, "search": searches}


def at_full_size(r: dict, scale: float) -> float:
    """A process's wall time with its embedding stages scaled to Flickr8K's pool."""
    return r["wall"] + (scale - 1) * sum(s for _, s in r["stages"].values())


def extract(rev: str, dest: Path) -> Path:
    """The tree of git revision `rev` under `dest`; exits with one line if unavailable."""
    try:
        with open(dest.with_suffix(".tar"), "wb") as tar:
            proc = subprocess.run(["git", "-C", str(ROOT), "archive", rev], stdout=tar,
                                  stderr=subprocess.PIPE, text=True, check=False)
    except FileNotFoundError:
        sys.exit("bench.first_run: git is not installed; the 'before' arm needs it")
    if proc.returncode:
        sys.exit(f"bench.first_run: cannot extract revision {rev!r}: "
                 f"{(proc.stderr.strip().splitlines() or ['git archive failed'])[-1]}")
    with tarfile.open(dest.with_suffix(".tar")) as tar:
        tar.extractall(dest, filter="data")
    return dest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=2023)
    parser.add_argument("--experiment-samples", type=int, default=100)
    parser.add_argument("--new-tokens", type=int, default=20)
    parser.add_argument("--before", default="49c846f",
                        help="git revision of the 'before' arm (default: the last commit "
                             "before lazy caption embedding)")
    parser.add_argument("--out", help="append the table here instead of BENCHMARKS.md")
    args = parser.parse_args()
    from tests.fake_flickr import make_flickr

    models = {name: str(model_path(name)) for name in ("clip", "smolvlm-256m", "bge-base")}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        before = extract(args.before, tmp / "before")
        # `python main.py` puts the script's folder first on sys.path, ahead of the editable
        # install's finder (which sys.meta_path consults after the path), so each arm runs
        # its own modules: checked here rather than assumed
        spec = "import importlib.util as u; print(u.find_spec('pipeline').origin)"
        found = subprocess.run([sys.executable, "-c", spec], cwd=before, capture_output=True,
                               text=True, check=False).stdout.strip()
        if Path(found).resolve() != (before / "pipeline.py").resolve():
            sys.exit(f"bench.first_run: the 'before' tree imports pipeline from {found}")
        data = make_flickr(tmp / "flickr", n_images=args.images, image_size=(500, 375))
        base = {k: v for k, v in os.environ.items() if not k.startswith("RECAP_")}
        base.update(HF_HUB_OFFLINE="1", RECAP_DATASET_NAME=str(data), RECAP_LOG_LEVEL="INFO",
                    RECAP_EXPERIMENT_SAMPLES=str(args.experiment_samples),
                    RECAP_CLIP_MODEL_NAME=models["clip"],
                    RECAP_VLM_MODEL_NAME=models["smolvlm-256m"],
                    RECAP_CAPTION_EMBEDDING_MODEL=models["bge-base"],
                    RECAP_MAX_NEW_TOKENS=str(args.new_tokens))
        # not an arm's cost: compiling the fresh tree's modules, the first read of torch and
        # of the models from disk (the working tree has its __pycache__ already)
        subprocess.run([sys.executable, "-m", "compileall", "-q", str(before)], check=True)
        warm_up = "import torch, transformers, sentence_transformers"
        subprocess.run([sys.executable, "-c", warm_up], env=base, check=True)
        for path in (p for m in models.values() for p in Path(m).rglob("*") if p.is_file()):
            with open(path, "rb") as f:
                while f.read(1 << 24):
                    pass
        arms = {}
        for name, code in (("before", before), ("after", ROOT)):
            env = dict(base, **{f"RECAP_{d.upper()}_DIR": str(tmp / name / d)
                                for d in ("db", "cache", "results")})
            load = os.getloadavg()[0]  # other jobs on the CPUs skew the comparison
            arms[name] = run_arm(code, env) | {"load": load}
    report(args, arms)


def report(args: argparse.Namespace, arms: dict[str, dict]) -> None:
    """The table and notes, measured and scaled to Flickr8K, into BENCHMARKS.md or --out."""
    train = args.images - args.experiment_samples
    scale = FLICKR8K_TRAIN / train
    rows, totals = [], {}
    for label, full in ((f"{train} training images", False), ("est. Flickr8K", True)):
        for name, arm in arms.items():
            m, (s1, s2) = arm["main"], arm["search"]
            secs = [at_full_size(r, scale) if full else r["wall"] for r in (m, s1, s2)]
            totals[name, full] = secs
            images, captions, later = (r["stages"].get(k, (0, 0))[0] for r, k in
                                       ((m, "images"), (m, "captions"), (s1, "captions")))
            if full:
                images, captions, later = (FLICKR8K_TRAIN, round(captions * scale),
                                           round(later * scale))
            rows.append([f"{name} ({label})", *(f"{s:.1f}" for s in secs),
                         f"{secs[0] + secs[1]:.1f}", f"{images}, {captions}"
                         + (f" (+{later} at the first search)" if later else "")])
    body = table(["arm", "first caption (s)", "first text search (s)",
                  "second text search (s)", "first caption + first search (s)",
                  "memory built (images, captions embedded)"], rows)
    again = [name for name, arm in arms.items() if arm["search"][1]["stages"]]
    t = {name: arm["main"]["timings"] for name, arm in arms.items()}
    ratio = [totals["after", full][0] / totals["before", full][0] for full in (False, True)]
    notes = (f"{args.images} JPEGs of 500×375 ({train} in the training pool), arms run one "
             f"after the other, each cold (own DB, image-embedding cache, results). Before: "
             f"`git archive {args.before}`; after: the working tree. Time to the first caption, "
             f"after/before: {ratio[0]:.2f}× measured, {ratio[1]:.2f}× estimated at Flickr8K "
             f"size (goal ≤ 0.55×; the estimate scales the logged embedding stages by "
             f"{scale:.2f}, fixed costs as measured). main.py's own timings (load, generate): "
             + ", ".join(f"{n} {t[n]['load']:.1f} s, {t[n]['generate']:.1f} s" for n in t)
             + ". Embedding stages measured (s): " + "; ".join(
                 f"{n} {what} {', '.join(f'{k} {v[1]:.0f}' for k, v in r['stages'].items())}"
                 for n, arm in arms.items()
                 for what, r in (("main.py", arm["main"]), ("1st search", arm["search"][0]))
                 if r["stages"])
             + f". Second search embedded captions again: {', '.join(again) or 'neither arm'}. "
             f"1-minute load average as each arm began ({os.cpu_count()} cores; above the "
             "benchmark's own ~1, other work shared the CPUs): "
             + ", ".join(f"{n} {arm['load']:.1f}" for n, arm in arms.items()) + ".")
    if scale > 10:
        notes += (f" At this size the estimate is rough: the log's one-second clock and each "
                  f"stage's own start-up are scaled ×{scale:.0f} too.")
    if not any("captions" in r["stages"] for r in (arms["after"]["main"], *arms["after"]["search"])):
        notes += (" WARNING: no caption-embedding line found in the after arm's logs, so its "
                  "estimate keeps that cost unscaled; see the module docstring's assumptions.")
    record("First run: lazy caption embedding (bench/first_run.py)", body, notes,
           path=args.out)


if __name__ == "__main__":
    main()
