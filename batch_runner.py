"""Many experiments: a resumable run over experiment indices, with a summary.

    python main.py --all                              # indices 0 .. EXPERIMENT_SAMPLES-1
    python main.py --all --run-name k3 --top-k-similar 3
    python main.py --indices 0-49,100                 # a subset
    python main.py --evaluate results/runs/k3         # (re)compute the summary and metrics

A run lives in RESULTS_DIR/runs/<run-name>/:
  manifest.json   settings, versions, indices, start and end times
  items/N.json    one file per finished (or failed) experiment, written atomically
  summary.json    corpus metrics + one record per image
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
from typing import Any

import config
from errors import UserError

log = logging.getLogger("batch")


def parse_indices(spec: str, samples: int) -> list[int]:
    """"0-49,100" -> [0, 1, ..., 49, 100], checked against 0 .. samples-1."""
    indices: list[int] = []
    for part in spec.split(","):
        part = part.strip()
        match = re.fullmatch(r"(\d+)(?:\s*-\s*(\d+))?", part)
        if not match:
            raise UserError(f"--indices: {part!r} is not N or N-M (e.g. 0-49,100)")
        first = int(match.group(1))
        last = int(match.group(2)) if match.group(2) is not None else first
        if last < first:
            raise UserError(f"--indices: range {part!r} runs backwards")
        if last >= samples:
            raise UserError(f"--indices: {last} is out of range: choose 0 to {samples - 1}")
        indices.extend(range(first, last + 1))
    return list(dict.fromkeys(indices))


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
        bar = tqdm(total=len(todo), desc="captioning", unit="caption", smoothing=0.1)
        for start in range(0, len(todo), settings.batch_size):
            batch = todo[start:start + settings.batch_size]
            for record in experiment.run_experiments(dataset, db, batch, settings, memory):
                item = record.to_json()
                item["status"] = "failed" if isinstance(record, pipeline.Failure) else "ok"
                _write_item(run_dir, item)
                if item["status"] == "failed":
                    log.warning("experiment %d (%s) failed: %s", record.experiment_index,
                                record.image_id, record.error)
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
    """summary.json + summary.csv of a run directory, with caption metrics."""
    import metrics
    from models import load_models

    run_dir = Path(run_dir)
    if not (run_dir / "manifest.json").exists():
        raise UserError(f"{run_dir} is not a run directory (no manifest.json)")
    manifest = _read_manifest(run_dir / "manifest.json")
    items = read_items(run_dir)
    ok = [i for i in items if i.get("status") == "ok"]
    embedder = None
    if ok:
        settings = config.settings_of(settings, overrides)
        embedder = load_models(settings.replace(
            caption_embedding_model=manifest["settings"]["caption_embedding_model"])
        ).caption_embedder
    scores = metrics.evaluate_captions(
        {str(i["experiment_index"]): i["generated_caption"] for i in ok},
        {str(i["experiment_index"]): i["original_captions"] for i in ok},
        caption_embedder=embedder) if ok else {"skipped": {"all": "no finished experiments"}}
    per_image = scores.pop("per_image", {})
    for item in items:
        item["metrics"] = per_image.get(str(item["experiment_index"]), {})
    failed = [i for i in items if i.get("status") != "ok"]
    seconds = [i["timings"]["total"] for i in ok]
    summary = {"run": manifest["run"], "settings": manifest["settings"],
               "experiments": len(items), "finished": len(ok), "failed": len(failed),
               "metrics": scores,
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
    if db.needs_seed:
        return None
    counted = near_duplicates.count_in_db(db, [i["image_id"] for i in ok], threshold)
    return {**counted, "guarded": bool(guard)}


CSV_COLUMNS = ("experiment_index", "image_id", "status", "error", "generated_caption",
               "references", "neighbours", "context_used", "BLEU-4", "CIDEr-D", "ROUGE-L",
               "embedding_similarity", "seconds_total", "seconds_generate")


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
            *(scores.get(m, "") for m in ("BLEU-4", "CIDEr-D", "ROUGE-L", "embedding_similarity")),
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
    return "\n".join(lines)


