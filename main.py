"""Retrieval-augmented captioning: one experiment, end to end.

    python main.py                                   # experiment EXPERIMENT_IMAGE_INDEX
    python main.py --experiment-image-index 42 --top-k-similar 3

    from main import initialize_system, run_experiment
    dataset_loader, db_manager = initialize_system()
    result = run_experiment(dataset_loader, db_manager, experiment_index=42)

Stages: dataset_loader -> image_embedder -> similarity_search -> prompt_generator
-> vlm_captioner -> caption_embedder -> db_manager, and a JSON file per
experiment in RESULTS_DIR. The caption step is pipeline.caption_batch; an
experiment's bookkeeping is experiment.py; batch runs are batch_runner.py. This
module is the command line and the seed's Python API; it computes nothing.
Heavy modules (torch, transformers) are imported inside the functions so that
`python main.py --help` answers at once.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from pathlib import Path
from typing import Any

import config
from errors import UsageError, UserError, cli_failure

log = logging.getLogger("main")


def initialize_system(**overrides: Any):
    """Load the data set and the models, and open (on the first run: build) the databases.

    Returns `(dataset_loader, db_manager)`. Keyword arguments override any
    setting of config.py by its lower-case name. `run_experiment(dataset_loader,
    db_manager, ...)` then runs with these settings (the pair carries them).
    Models, data and the manager of a DB_DIR are loaded once per process and
    reused by later calls.
    """
    from memory import initialize
    from models import load_models
    settings = config.resolve("experiment", **overrides)
    dataset, db = initialize(settings)
    load_models(settings).load_all()
    return System(dataset, settings), db


class System:
    """The data set `initialize_system` returns, with the settings it was made with:
    attribute access goes to the data set (`dataset_loader.experiment`, ...)."""

    def __init__(self, dataset, settings: config.Settings):
        self.dataset, self.settings = dataset, settings

    def __getattr__(self, name: str) -> Any:
        return getattr(self.dataset, name)


def run_experiment(dataset_loader=None, db_manager=None, experiment_index: int | None = None,
                   **overrides: Any):
    """Caption experiment image `experiment_index` with retrieved context.

    Call as `run_experiment(dataset_loader, db_manager, experiment_index=42)`
    after `initialize_system(...)` (its settings, with these keywords on top), or
    standalone as `run_experiment(experiment_index=7, top_k_similar=3)`. Appends
    the result to the databases, writes RESULTS_DIR/experiment_{index}_{timestamp}.json
    and returns it: an experiment.ExperimentResult, a read-only mapping with the
    result file's keys (`result["generated_caption"]`, `result.get(...)`,
    `dict(result)`) and attributes. An image that cannot be captioned raises UserError.
    """
    made = getattr(dataset_loader, "settings", None)
    settings = config.settings_of(made, overrides)
    dataset = getattr(dataset_loader, "dataset", dataset_loader)
    if db_manager is not None and overrides:
        db_manager.check_models(settings.clip_model_name, settings.caption_embedding_model)
    return _run_one(settings, experiment_index, dataset, db_manager)


def _run_one(settings: config.Settings, index: int | None = None, dataset=None, db=None):
    import experiment
    from memory import initialize
    from models import load_models
    index = settings.experiment_image_index if index is None else index
    experiment.check_writable(Path(settings.results_dir))  # fail before the slow work
    start = time.perf_counter()
    if dataset is None or db is None:
        if settings.split == "seeded":  # its size is known before any slow loading
            from dataset_loader import check_index
            check_index(index, settings.experiment_samples)
        dataset, db = initialize(settings)
    dataset.experiment_sample(index)
    models = load_models(settings).load_all()
    [result] = experiment.run_experiments(dataset, db, [int(index)], settings, models=models,
                                          load_seconds=time.perf_counter() - start)
    if not isinstance(result, experiment.ExperimentResult):
        result.raise_it()
    return result


def caption_folder(folder: str, retrieval: bool = True, **overrides: Any) -> dict[str, Any]:
    """Caption every image under `folder` so that `search.py --text ... --images-dir
    folder` can find them (see caption_folder.py). Keywords override settings."""
    import caption_folder as folders
    return folders.caption_folder(
        folder, config.resolve("collection", folder=folder, **overrides), retrieval)


def _summary(result) -> str:
    timings = result.timings
    lines = [f"experiment {result.experiment_index}: {result.image_id}",
             f"  generated: {result.generated_caption}",
             f"  reference: {result.original_caption}",
             ("  captions: " + "; ".join(f"{n.captions[0]!r} ({n.label}, {n.score:.3f})"
                                         for n in result.similar_images)
              if any(n.source for n in result.similar_images) else
              "  neighbours: " + ", ".join(f"{n.image_id} ({n.score:.3f})"
                                           for n in result.similar_images)),
             f"  time: {timings['total']:.1f} s (loading {timings['load']:.1f} s, "
             f"generation {timings['generate']:.1f} s)",
             f"  result: {result.result_path}"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit code."""
    parser = config.make_parser("main.py", __doc__.split("\n\n")[0] + "\n\n"
                                "Every setting of config.py is a flag below.")
    batch = parser.add_argument_group("many experiments (see batch_runner.py)")
    batch.add_argument("--all", action="store_true",
                       help="run every experiment image of the split (0 .. EXPERIMENT_SAMPLES-1 "
                            "for --split seeded; resumable)")
    batch.add_argument("--indices", metavar="SPEC", help="run a subset, e.g. 0-49,100")
    batch.add_argument("--run-name", metavar="NAME",
                       help="run directory under RESULTS_DIR/runs/ (default: VLM and k)")
    batch.add_argument("--evaluate", metavar="RUN_DIR",
                       help="recompute summary.json/summary.csv and metrics of a run")
    actions = parser.add_argument_group("instead of an experiment")
    actions.add_argument("--caption-folder", metavar="DIR",
                         help="caption every image under DIR (makes it searchable with "
                              "search.py --text ... --images-dir DIR)")
    actions.add_argument("--no-retrieval", action="store_true",
                         help="with --caption-folder: plain prompt, no neighbours' captions")
    actions.add_argument("--quiet", action="store_true",
                         help="with --caption-folder: the summary only, not each caption")
    actions.add_argument("--check-db", action="store_true",
                         help="validate the databases in DB_DIR and print a report")
    actions.add_argument("--embed-captions", action="store_true",
                         help="give every caption of the memory its vector now (built on the "
                              "first text search otherwise): for a machine that will serve "
                              "searches")
    actions.add_argument("--repair-db", action="store_true",
                         help="back up DB_DIR, then fix what can be fixed and report the rest")
    actions.add_argument("--near-duplicates", action="store_true",
                         help="list the experiment images with a near-duplicate in the "
                              "training pool (table + RESULTS_DIR/near_duplicates.png)")
    actions.add_argument("--threshold", metavar="COSINE", type=float,
                         help="with --near-duplicates: CLIP cosine of a near-duplicate "
                              "(default: the batch runs' guard, 0.95)")
    actions.add_argument("--import-parquet", metavar="OUT_DIR",
                         help="add the images and captions of `python -m "
                              "scale.caption_collection --out OUT_DIR` to the databases")
    try:
        args, settings = config.parse_cli(parser, argv, _context,
                                          folder=lambda args: args.caption_folder)
    except UserError as exc:
        return cli_failure("main.py", exc, code=2)
    config.configure_logging(settings)
    try:
        if args.check_db or args.repair_db:
            return _maintain_db(Path(settings.db_dir), repair=args.repair_db)
        if args.import_parquet:
            return _import_parquet(args.import_parquet, settings)
        if args.embed_captions:
            return _embed_captions(settings)
        if args.near_duplicates:
            import near_duplicates
            print(near_duplicates.find(settings, args.threshold).table())
            return 0
        if args.threshold is not None:
            raise UsageError("--threshold goes with --near-duplicates; the guard of "
                             "experiments is --near-duplicate-threshold")
        if args.caption_folder:
            import caption_folder as folders
            summary = folders.caption_folder(args.caption_folder, settings,
                                             not args.no_retrieval)
            if summary["captions"] and not args.quiet:
                print(folders.format_captions(summary["captions"]))
            print(f"captioned {summary['captioned']} of {summary['images']} images in "
                  f"{summary['folder']} ({summary['already_captioned']} done before, "
                  f"{len(summary['failed'])} failed); all its captions: {summary['csv']}; "
                  "search them with\n"
                  f"  python search.py --text \"...\" --images-dir {args.caption_folder}")
            return 1 if summary["failed"] else 0
        if args.all or args.indices or args.evaluate:
            return _batch(args, settings)
        if args.no_retrieval:
            raise UsageError("--no-retrieval goes with --caption-folder; for an experiment "
                             "without retrieval use --top-k-similar 0")
        if args.quiet:
            raise UsageError("--quiet goes with --caption-folder")
        result = _run_one(settings)
    # OSError: disk full, permissions: nothing a traceback would explain better
    except (UserError, OSError, KeyboardInterrupt) as exc:
        return cli_failure("main.py", exc)
    print(_summary(result))
    return 0


def _context(args) -> str:
    """The entry point an invocation is (config.CONTEXTS): what "auto" settings mean."""
    if args.all or args.indices or args.evaluate or args.near_duplicates:
        return "batch"
    if args.caption_folder:
        return "collection"
    if args.embed_captions or args.import_parquet or args.check_db or args.repair_db:
        return "search"
    return "experiment"


def _batch(args, settings: config.Settings) -> int:
    """--all / --indices / --evaluate."""
    import batch_runner
    if args.evaluate:
        run_dir = Path(args.evaluate)
        summary = batch_runner.summarize(run_dir, settings)
    else:
        if args.all and args.indices:
            raise UsageError("give --all or --indices, not both")
        from models import experiment_count
        count = experiment_count(settings)  # the split's experiment images
        indices = (list(range(count)) if args.all else
                   batch_runner.parse_indices(args.indices, count))
        summary = batch_runner.run_batch(indices, args.run_name, settings=settings)
        run_dir = Path(settings.results_dir) / "runs" / summary["run"]
    print(batch_runner.format_summary(summary, run_dir))
    return batch_runner.exit_code(summary)


def _embed_captions(settings: config.Settings) -> int:
    """--embed-captions: the memory (built first if DB_DIR has none) with a vector for
    every caption, so that the first text search need not make them."""
    from memory import caption_embedder_for, embed_missing_captions, initialize
    _, db = initialize(settings, captioner=False)
    # the job's one duration is its bar's (and the log line after it)
    done = embed_missing_captions(caption_embedder_for(settings, db), db)
    print(f"{db.db_dir}: every one of its {db.describe().captions} captions has a vector ("
          f"{done} embedded now); text search is ready")
    return 0


def _import_parquet(out_dir: str, settings: config.Settings) -> int:
    """--import-parquet: the shards of a scale/ job into the databases (db_manager writes)."""
    from scale.shards import import_parquet
    s = import_parquet(out_dir, settings.db_dir, settings.clip_model_name,
                       settings.caption_embedding_model)
    print(f"imported {s['images_added']} images and {s['captions_added']} captions from "
          f"{s['shards']} shard(s) of {s['out_dir']} into {s['database']} "
          f"({s['already_present']} were there already); search them with\n"
          f"  python search.py --text \"...\"")
    return 0


def _maintain_db(db_dir: Path, repair: bool) -> int:
    """--check-db / --repair-db: a report on stdout; exit 1 if problems remain."""
    from db_manager import check_db, describe_db, repair_db
    if repair:
        for line in repair_db(db_dir):
            print(line)
        return 0
    if not db_dir.exists():
        raise UserError(f"no database in {db_dir}")
    problems = check_db(db_dir)
    with contextlib.suppress(UserError):
        print(f"{db_dir}: {describe_db(db_dir)}")
    for line in problems:
        print(f"problem: {line}")
    print(f"{db_dir}: " + (f"{len(problems)} problem(s); fix with --repair-db" if problems
                           else "all checks passed"))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
