"""Many experiments: a resumable run over experiment indices, with a summary.

    python main.py --all                              # indices 0 .. EXPERIMENT_SAMPLES-1
    python main.py --all --run-name k3 --top-k-similar 3
    python main.py --indices 0-49,100                 # a subset
    python main.py --evaluate results/runs/k3         # (re)compute the summary and metrics

A run lives in RESULTS_DIR/runs/<run-name>/:
  manifest.json   settings, versions, indices, start and end times
  items/N.json    one file per finished (or failed) experiment, written atomically
  summary.json    corpus metrics (with the CLIP of CLIPScore in metrics.clip_score;
                  per domain too where the collection gives domains: NoCaps)
                  + one record per image
  summary.csv     one row per image: id, captions, references, neighbours, metrics, timings

Resuming: re-running the same command skips every index with a finished item
file; a killed run never leaves a half-written one (temporary file + rename),
and an experiment whose item was not written is simply run again (its
database entry is replaced, not duplicated). Failed images are recorded with
their error and retried on the next run. BATCH_SIZE images share one
`generate` call.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import re
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

import config
from errors import UsageError, UserError

log = logging.getLogger("batch")


def parse_indices(spec: str, samples: int) -> list[int]:
    """"0-49,100" -> [0, 1, ..., 49, 100], checked against 0 .. samples-1."""
    indices: list[int] = []
    for part in spec.split(","):
        part = part.strip()
        match = re.fullmatch(r"(\d+)(?:\s*-\s*(\d+))?", part)
        if not match:
            raise UsageError(f"--indices: {part!r} is not N or N-M (e.g. 0-49,100)")
        first = int(match.group(1))
        last = int(match.group(2)) if match.group(2) is not None else first
        if last < first:
            raise UsageError(f"--indices: range {part!r} runs backwards")
        if last >= samples:
            raise UserError(f"--indices: {last} is out of range: choose 0 to {samples - 1}")
        indices.extend(range(first, last + 1))
    return list(dict.fromkeys(indices))


def indices_spec(indices: Sequence[int]) -> str:
    """[0, 1, 2, 5] -> "0-2,5" (parse_indices' inverse, for messages and commands)."""
    parts: list[str] = []
    run: list[int] = []
    for i in indices:
        if run and i == run[-1] + 1:
            run.append(i)
            continue
        if run:
            parts.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
        run = [i]
    if run:
        parts.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
    return ",".join(parts)


def default_run_name(settings: config.Settings) -> str:
    vlm = Path(settings.vlm_model_name.rstrip("/")).name
    return re.sub(r"[^A-Za-z0-9._-]+", "_", f"{vlm}-k{settings.top_k_similar}")


def run_batch(indices: list[int], run_name: str | None = None,
              settings: config.Settings | None = None, **overrides: Any) -> dict[str, Any]:
    """Run (or resume) the experiments `indices`; returns the summary.

    `settings` (default: config.resolve()) with keyword `overrides` on top.
    MEMORY "auto" means frozen here: neighbours come from the training pool only.
    With "growing", every image sees the ones captioned before it, in index
    order, whatever BATCH_SIZE.
    """
    from tqdm.auto import tqdm

    import experiment
    import pipeline
    from memory import Memory, initialize

    settings = config.settings_of(settings, overrides, "batch")
    policy = settings.memory
    run_dir = Path(settings.results_dir) / "runs" / (run_name or default_run_name(settings))
    manifest = _start(run_dir, settings, indices, policy)
    done = finished_items(run_dir)
    todo = [i for i in indices if i not in done]
    log.info("run %s: %d of %d experiments to do (%d finished before)", run_dir, len(todo),
             len(indices), len(indices) - len(todo))
    if todo:
        dataset, db = initialize(settings)
        memory = Memory.from_db(db, growing=policy == "growing")
        # the bar counts this run's experiments; those finished before and those
        # that failed are shown beside it
        bar = tqdm(total=len(todo), desc="captioning", unit="caption", smoothing=0.1)
        counts = {"done_before": len(indices) - len(todo), "failed": 0}
        bar.set_postfix(counts, refresh=False)
        for start in range(0, len(todo), settings.batch_size):
            batch = todo[start:start + settings.batch_size]
            for record in experiment.run_experiments(dataset, db, batch, settings, memory):
                item = record.to_json()
                item["status"] = "failed" if isinstance(record, pipeline.Failure) else "ok"
                _write_item(run_dir, item)
                if item["status"] == "failed":
                    log.warning("experiment %d (%s) failed: %s", record.experiment_index,
                                record.image_id, record.error)
                    counts["failed"] += 1
                    bar.set_postfix(counts, refresh=False)
            bar.update(len(batch))
        bar.close()
    manifest["finished"] = _now()
    _write_json(run_dir / "manifest.json", manifest)
    return summarize(run_dir, settings)


def _start(run_dir: Path, settings: config.Settings, indices: list[int],
           policy: str) -> dict[str, Any]:
    """Create the run directory, or check that a resumed run used the same settings."""
    from models import versions
    wanted = {**settings.results(), "memory": policy,
              "near_duplicate_threshold": settings.near_duplicate_threshold}
    path = run_dir / "manifest.json"
    if path.exists():
        manifest = _read_manifest(path)
        config.check_same_results(manifest["settings"], wanted,
                                  f"run {run_dir.name!r} was started",
                                  "resume it with the same settings or choose another --run-name")
        manifest["settings"] = {**manifest["settings"], **wanted}
        manifest["indices"] = sorted(set(manifest["indices"]) | set(indices))
        manifest["resumed"] = manifest.get("resumed", []) + [_now()]
    else:
        manifest = {"run": run_dir.name, "settings": wanted, "config": settings.to_json(),
                    "versions": versions(), "indices": sorted(indices),
                    "started": _now(), "finished": None}
    _write_json(path, manifest)
    return manifest


def _read_manifest(path: Path) -> dict[str, Any]:
    try:
        manifest = json.loads(path.read_text())
        if not isinstance(manifest, dict) or not isinstance(manifest.get("settings"), dict):
            raise ValueError("no settings in it")
        return manifest
    except (OSError, UnicodeDecodeError, ValueError) as exc:  # JSONDecodeError is a ValueError
        raise UserError(f"{path} is unreadable ({exc}); move the run directory away") from None


def finished_items(run_dir: Path) -> dict[int, dict[str, Any]]:
    """Items of experiments that finished successfully (failed ones are retried)."""
    return {item["experiment_index"]: item for item in read_items(run_dir)
            if item.get("status") == "ok"}


def read_items(run_dir: Path) -> list[dict[str, Any]]:
    """The run's items/N.json records, by index. Other files there (notes.json, an
    editor's backup) and unreadable ones are left out with a warning."""
    items = []
    for file in (run_dir / "items").glob("*.json"):
        if not file.stem.isdigit():
            log.warning("ignoring %s: not an item file (items/N.json)", file)
            continue
        try:
            item = json.loads(file.read_text())
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            # cannot be half-written (rename), but never trust a damaged one
            log.warning("skipping unreadable item %s: %s", file, exc)
            continue
        if not isinstance(item, dict) or item.get("experiment_index") != int(file.stem):
            log.warning("ignoring %s: not an item of this run", file)
            continue
        items.append(item)
    return sorted(items, key=lambda item: item["experiment_index"])


def summarize(run_dir: str | Path, settings: config.Settings | None = None,
              **overrides: Any) -> dict[str, Any]:
    """summary.json + summary.csv of a run directory, with caption metrics (overall,
    and per domain where the items have one)."""
    from models import load_models

    run_dir = Path(run_dir)
    if not (run_dir / "manifest.json").exists():
        raise UserError(f"{run_dir} is not a run directory (no manifest.json)")
    manifest = _read_manifest(run_dir / "manifest.json")
    items = read_items(run_dir)
    ok = [i for i in items if i.get("status") == "ok"]
    embedder = clip = None
    if ok:
        settings = config.settings_of(settings, overrides)
        run_settings = _run_settings(settings, manifest)
        embedder = load_models(run_settings).caption_embedder
        clip = _clip_scorer(run_settings, ok)
    scores = _score(ok, embedder, clip)
    per_image = scores.pop("per_image", {})
    # NoCaps-style collections: the metrics of each domain's images besides the overall ones
    by_domain = {domain: {k: v for k, v in _score([i for i in ok if i.get("domain") == domain],
                                                  embedder, clip).items() if k != "per_image"}
                 for domain in sorted({i["domain"] for i in ok if i.get("domain")})}
    for item in items:
        item["metrics"] = per_image.get(str(item["experiment_index"]), {})
    failed = [i for i in items if i.get("status") != "ok"]
    seconds = [i["timings"]["total"] for i in ok]
    summary = {"run": manifest["run"], "settings": manifest["settings"],
               "experiments": len(items), "finished": len(ok), "failed": len(failed),
               "metrics": scores,
               **({"metrics_by_domain": by_domain} if by_domain else {}),
               "near_duplicates": _near_duplicates(manifest, ok,
                                                   config.settings_of(settings, overrides)),
               "seconds_per_caption": round(sum(seconds) / len(seconds), 4) if seconds else None,
               # false: no caption of the run had the retrieved captions in its input
               # (a captioner of the image alone), so compare it as such
               "context_used": any(i.get("context_used", True) for i in ok) if ok else None,
               **_identical_excluded(manifest, ok),
               "items": items}
    _write_json(run_dir / "summary.json", summary)
    _write_csv(run_dir / "summary.csv", items)
    return summary


def _identical_excluded(manifest: dict[str, Any], ok: list[dict[str, Any]]) -> dict[str, Any]:
    """RETRIEVE "captions" under the guard: the corpus captions left out of the run's
    prompts as identical to a reference, in all and per image (nothing otherwise)."""
    settings = manifest["settings"]
    if settings.get("retrieve") != "captions" or not settings.get("near_duplicate_threshold"):
        return {}
    counts = [i.get("identical_excluded", 0) for i in ok]
    return {"identical_excluded": {"captions": sum(counts),
                                   "images": sum(1 for c in counts if c)}}


def _score(items: list[dict[str, Any]], embedder, clip) -> dict[str, Any]:
    """metrics.evaluate_captions over finished items, keyed by experiment index."""
    import metrics
    if not items:
        return {"skipped": {"all": "no finished experiments"}}
    return metrics.evaluate_captions(
        {str(i["experiment_index"]): i["generated_caption"] for i in items},
        {str(i["experiment_index"]): i["original_captions"] for i in items},
        caption_embedder=embedder, clip_scorer=clip)


def format_by_domain(by_domain: dict[str, dict[str, Any]]) -> str:
    """One row per domain: its images and corpus metrics (markdown)."""
    import metrics
    names = [m for m in metrics.CORPUS_METRICS if any(m in r for r in by_domain.values())]
    lines = ["### Caption metrics by domain", "",
             "| domain | images | " + " | ".join(names) + " |", "|---|---:|" + "---:|" * len(names)]
    for domain, result in by_domain.items():
        cells = [f"{result[m]:.4f}" if m in result else "-" for m in names]
        lines.append(f"| {domain} | {result.get('images', 0)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# The run's own models and data (from its manifest) for scoring it: the data set and
# split its images come from, the CLIP whose vectors retrieval made.
_RUN_SETTINGS = ("dataset_name", "experiment_samples", "random_seed", "split",
                 "memory_dataset", "clip_model_name", "caption_embedding_model", "dtype")


def _run_settings(settings: config.Settings, manifest: dict[str, Any]) -> config.Settings:
    recorded = manifest["settings"]
    return settings.replace(**{k: recorded[k] for k in _RUN_SETTINGS
                               if k in recorded and k.upper() in config.defaults()})


def _clip_scorer(settings: config.Settings, ok: list[dict[str, Any]]):
    """CLIPScore's scorer for a run's finished items (keyed by experiment index): when
    METRIC_CLIP_MODEL is the run's CLIP, its loaded model and the image vectors retrieval
    stored in DB_DIR; images without one are opened from the run's data set."""
    import clip_score
    from models import load_dataset, load_models
    image_ids = {str(i["experiment_index"]): i["image_id"] for i in ok}
    retrieval, vectors = None, {}
    if settings.metric_clip_model == settings.clip_model_name:
        try:
            retrieval = load_models(settings).image_embedder
        except UserError:  # scorer_for says why in the skip line
            retrieval = None
        vectors = _stored_image_vectors(settings, set(image_ids.values()))

    def image_of(key: str):
        dataset = load_dataset(settings)
        sample = dataset.get(image_ids[key])
        if sample is None:
            raise UserError(f"image {image_ids[key]} of the run is not in the data set "
                            f"{settings.dataset_name}")
        return dataset.load_image(sample)

    return clip_score.scorer_for(settings, retrieval=retrieval, image_of=image_of,
                                 known_vector=lambda key: vectors.get(image_ids[key]))


def _stored_image_vectors(settings: config.Settings, image_ids: set[str]) -> dict[str, Any]:
    """The CLIP vectors DB_DIR holds for `image_ids` (experiments store theirs), if its
    CLIP is METRIC_CLIP_MODEL."""
    from db_manager import DbManager
    db_dir = Path(settings.db_dir)
    if not db_dir.is_dir():
        return {}
    try:
        db = DbManager.open(db_dir)
    except UserError as exc:
        log.warning("image vectors of %s not reused for CLIPScore: %s", db_dir, exc)
        return {}
    described = db.describe()
    if described.empty or described.clip_model != settings.metric_clip_model:
        return {}
    return {image_id: vector for image_id in image_ids
            if (vector := db.image_vector(image_id)) is not None}


def _near_duplicates(manifest: dict[str, Any], ok: list[dict[str, Any]],
                     settings: config.Settings) -> dict[str, Any] | None:
    """How many finished images have a near-duplicate in the training pool of DB_DIR:
    at the run's guard, or at the batch runs' default (0.95) when it ran unguarded,
    so the leak shows either way (near_duplicates.count_in_db)."""
    from db_manager import DbManager
    import near_duplicates
    recorded = manifest["settings"].get("near_duplicate_threshold", 0.0)
    guard = config.finish_value("NEAR_DUPLICATE_THRESHOLD", recorded, "batch")
    threshold = guard or config.AUTO_BATCH_THRESHOLD
    db_dir = Path(settings.db_dir)
    if not ok or not db_dir.is_dir():
        return None
    db = DbManager.open(db_dir)
    if db.describe().empty:
        return None
    counted = near_duplicates.count_in_db(db, [i["image_id"] for i in ok], threshold)
    return {**counted, "guarded": bool(guard)}


CSV_COLUMNS = ("experiment_index", "image_id", "status", "error", "generated_caption",
               "references", "neighbours", "context_used", "BLEU-4", "CIDEr-D", "ROUGE-L",
               "embedding_similarity", "CLIPScore", "RefCLIPScore", "seconds_total",
               "seconds_generate")


def _write_csv(path: Path, items: list[dict[str, Any]]) -> None:
    from atomic_files import write_text_atomic
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(CSV_COLUMNS)
    for item in items:
        timings, scores = item.get("timings", {}), item.get("metrics", {})
        writer.writerow([
            item["experiment_index"], item["image_id"], item.get("status"), item.get("error", ""),
            item.get("generated_caption", ""), " | ".join(item.get("original_captions", [])),
            "; ".join(f"{n.get('image_id') or n.get('source')}:{n['score']:.4f}"
                      for n in item.get("similar_images", [])),
            item.get("context_used", ""),
            *(scores.get(m, "") for m in ("BLEU-4", "CIDEr-D", "ROUGE-L", "embedding_similarity",
                                          "CLIPScore", "RefCLIPScore")),
            timings.get("total", ""), timings.get("generate", "")])
    write_text_atomic(path, out.getvalue())


def _write_item(run_dir: Path, item: dict[str, Any]) -> None:
    _write_json(run_dir / "items" / f"{item['experiment_index']}.json", item)


def _write_json(path: Path, data: Any) -> None:
    from atomic_files import write_json_atomic
    write_json_atomic(path, data)


def _now() -> str:
    return datetime.now(timezone.utc).astimezone().isoformat(timespec="seconds")


def exit_code(summary: dict[str, Any]) -> int:
    """0 if every experiment finished, 1 if any failed."""
    return 1 if summary["failed"] else 0


def format_summary(summary: dict[str, Any], run_dir: Path) -> str:
    import metrics
    lines = [f"run {summary['run']}: {summary['finished']} finished, {summary['failed']} failed "
             f"({run_dir})"]
    if summary.get("context_used") is False:
        lines.append("context_used: false (the captioner does not read the retrieved captions)")
    if summary.get("seconds_per_caption"):
        lines.append(f"{summary['seconds_per_caption']:.2f} s per caption")
    near = summary.get("near_duplicates")
    if near:
        lines.append(f"{near['with_near_duplicate']} of {near['images']} images have a "
                     f"near-duplicate in the training pool (cosine >= {near['threshold']:g}; "
                     + ("kept out of their prompts)" if near["guarded"] else
                        "NOT guarded: their twins' captions may be in the prompts)"))
    identical = summary.get("identical_excluded")
    if identical:
        lines.append(f"{identical['captions']} corpus captions identical to a reference kept "
                     f"out of the prompts of {identical['images']} images")
    lines.append(metrics.format_report(summary["metrics"]))
    if summary.get("metrics_by_domain"):
        lines += ["", format_by_domain(summary["metrics_by_domain"])]
    return "\n".join(lines)


