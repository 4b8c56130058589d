"""Retrieval-augmented captioning: one experiment, end to end.

    python main.py                                   # experiment EXPERIMENT_IMAGE_INDEX
    python main.py --experiment-image-index 42 --top-k-similar 3

    from main import initialize_system, run_experiment
    dataset_loader, db_manager = initialize_system()
    result = run_experiment(dataset_loader, db_manager, experiment_index=42)

Stages: dataset_loader -> image_embedder -> similarity_search -> prompt_generator
-> vlm_captioner -> caption_embedder -> db_manager, and a JSON file per
experiment in RESULTS_DIR. This module wires them; it computes nothing itself.
Heavy modules (torch, transformers) are imported inside the functions so that
`python main.py --help` answers at once.
"""

from __future__ import annotations

import logging
import platform
import sys
import tempfile
import time
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import config
from errors import UserError, cli_failure

log = logging.getLogger("main")

# Loaded models and data, reused by later calls in the same process. One of
# each kind: asking for another model replaces the previous one, so a long
# session that compares VLMs does not keep them all in memory.
_loaded: dict[str, tuple[Any, Any]] = {}


def cached(kind: str, key: Any, load):
    """The object cached for `kind` if it was made with `key`, else `load()`."""
    cached = _loaded.get(kind)
    if cached is not None and cached[0] == key:
        return cached[1]
    _loaded.pop(kind, None)  # free the old one before loading its replacement
    value = load()
    _loaded[kind] = (key, value)
    return value


def _device(settings: config.Settings):
    from device import resolve_device
    key = (settings.device, settings.dtype)
    return cached("device", key, lambda: resolve_device(*key))


def _dataset(settings: config.Settings):
    from dataset_loader import load_and_split_dataset
    key = (settings.dataset_name, settings.experiment_samples, settings.random_seed)
    return cached("dataset", key, lambda: load_and_split_dataset(*key))


def _image_embedder(settings: config.Settings):
    from image_embedder import ImageEmbedder
    device, dtype = _device(settings)
    key = (settings.clip_model_name, str(device), str(dtype), settings.batch_size)
    return cached("image_embedder", key, lambda: ImageEmbedder(
        settings.clip_model_name, device=device, dtype=dtype, batch_size=settings.batch_size))


def _caption_embedder(settings: config.Settings):
    from caption_embedder import CaptionEmbedder
    device, _ = _device(settings)
    key = (settings.caption_embedding_model, str(device), settings.batch_size)
    return cached("caption_embedder", key, lambda: CaptionEmbedder(
        settings.caption_embedding_model, device=device, batch_size=settings.batch_size))


def _captioner(settings: config.Settings):
    from vlm_captioner import VLMCaptioner
    device, dtype = _device(settings)
    key = (settings.vlm_model_name, str(device), str(dtype), settings.max_new_tokens,
           settings.num_beams, settings.do_sample, settings.temperature,
           settings.vlm_image_longest_edge, settings.vlm_image_splitting,
           settings.vlm_attn_implementation, settings.random_seed)
    return cached("captioner", key, lambda: VLMCaptioner(
        settings.vlm_model_name, device=device, dtype=dtype,
        max_new_tokens=settings.max_new_tokens, num_beams=settings.num_beams,
        do_sample=settings.do_sample, temperature=settings.temperature,
        image_longest_edge=settings.vlm_image_longest_edge,
        image_splitting=settings.vlm_image_splitting,
        attn_implementation=settings.vlm_attn_implementation, seed=settings.random_seed))


def initialize_system(**overrides: Any):
    """Load the data set and the models, and open (on the first run: build) the databases.

    Returns `(dataset_loader, db_manager)`. Keyword arguments override any
    setting of config.py by its lower-case name. Models and data are loaded
    once per process and reused by later calls.
    """
    from db_manager import DbIdentity, DbManager
    settings = config.resolve(**overrides)
    dataset = _dataset(settings)
    identity = DbIdentity(clip_model=settings.clip_model_name,
                          caption_model=settings.caption_embedding_model,
                          dataset=settings.dataset_name, split=dataset.fingerprint)
    db_dir = Path(settings.db_dir).expanduser().resolve()
    db = cached("db", (db_dir, identity), lambda: DbManager.open(db_dir, identity))
    if db.needs_seed:
        _seed_database(settings, dataset, db)
    _image_embedder(settings), _caption_embedder(settings), _captioner(settings)
    return dataset, db


def _seed_database(settings: config.Settings, dataset, db) -> None:
    """First run: the training pool's image embeddings, captions and caption embeddings."""
    from image_embedder import embed_pool
    log.info("building the memory from %d training images (first run in %s)",
             len(dataset.train), settings.db_dir)
    ids, image_vectors = embed_pool(
        _image_embedder(settings), [s.image_id for s in dataset.train],
        lambda image_id: dataset.load_image(dataset.get(image_id)),
        settings.cache_dir, cache_key=f"{settings.dataset_name}|{dataset.fingerprint}")
    captions = [{"id": f"{image_id}#{n}", "image_id": image_id, "caption": text,
                 "source": "human"}
                for image_id in ids for n, text in enumerate(dataset.get(image_id).captions)]
    log.info("embedding %d training captions with %s", len(captions),
             settings.caption_embedding_model)
    caption_vectors = _caption_embedder(settings).embed_captions(
        [c["caption"] for c in captions], progress=True)
    db.seed(ids, image_vectors, captions, caption_vectors)


def run_experiment(dataset_loader=None, db_manager=None, experiment_index: int | None = None,
                   **overrides: Any) -> dict[str, Any]:
    """Caption experiment image `experiment_index` with retrieved context.

    Call as `run_experiment(dataset_loader, db_manager, experiment_index=42)`
    after `initialize_system()`, or standalone as
    `run_experiment(experiment_index=7, top_k_similar=3)`. Appends the result to
    the databases, writes RESULTS_DIR/experiment_{index}_{timestamp}.json and
    returns the same record as a dict.
    """
    settings = config.resolve(**overrides)
    index = settings.experiment_image_index if experiment_index is None else experiment_index
    check_writable(Path(settings.results_dir))  # fail before the slow work, not after
    start = time.perf_counter()
    if dataset_loader is None or db_manager is None:
        from dataset_loader import check_index
        check_index(index, settings.experiment_samples)  # before any slow loading
        dataset_loader, db_manager = initialize_system(**overrides)
    dataset_loader.experiment_sample(index)
    [result] = run_experiments(dataset_loader, db_manager, [int(index)], settings,
                               growing=settings.memory != "frozen",
                               load_seconds=time.perf_counter() - start)
    if "error" in result:
        raise result["exception"]
    return result


def run_experiments(dataset_loader, db_manager, indices: list[int], settings: config.Settings,
                    growing: bool = True, load_seconds: float = 0.0) -> list[dict[str, Any]]:
    """Run the experiments `indices` as one batch: one embedding pass, one
    `generate` call, then each result saved to RESULTS_DIR and the databases.

    Returns one dict per index: the result record, or {"experiment_index",
    "image_id", "error", "exception"} for an image that failed (unreadable,
    empty caption); the others go on. With `growing`, neighbours come from
    everything in the image database (the seed's growing memory); otherwise only
    from the human-captioned training pool, so results do not depend on order.
    Timings are the batch's seconds per stage divided by its size.
    """
    from prompt_generator import build_prompt
    from similarity_search import top_k

    db_manager.check_models(clip_model=settings.clip_model_name,
                            caption_model=settings.caption_embedding_model)
    timings: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(stage: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        timings[stage] = round((now - clock) / len(indices), 4)
        clock = now

    image_embedder, caption_embedder = _image_embedder(settings), _caption_embedder(settings)
    captioner = _captioner(settings)
    timings["load"] = round(load_seconds + time.perf_counter() - clock, 4)
    clock = time.perf_counter()

    results: dict[int, dict[str, Any]] = {}
    work = []  # (index, sample, image) of the images that could be read
    for index in indices:
        sample = dataset_loader.experiment_sample(index)
        try:
            work.append((index, sample, dataset_loader.load_image(sample)))
        except UserError as exc:
            results[index] = _failure(index, sample, exc)
    lap("load_image")
    queries = image_embedder.embed([image for _, _, image in work])
    lap("embed_image")
    ids, vectors = memory_rows(db_manager, growing)
    found = [top_k(query, vectors, ids, settings.top_k_similar, exclude={sample.image_id})
             for query, (_, sample, _) in zip(queries, work)]
    contexts = [[db_manager.captions_of(n.image_id) for n in neighbours] for neighbours in found]
    lap("search")
    prompts = [build_prompt(c, settings.prompt_template, settings.prompt_template_no_context,
                            settings.captions_per_neighbour) for c in contexts]
    lap("prompt")
    captions = generate_captions(captioner, [image for _, _, image in work], prompts)
    lap("generate")
    if getattr(captioner, "last_first_token", None) is not None:
        # Not per image and not a stage: from the start of `generate` to its first token.
        timings["first_token"] = round(captioner.last_first_token, 4)
    texts = [c for c in captions if isinstance(c, str)]
    caption_vectors = iter(caption_embedder.embed_captions(texts))
    lap("embed_caption")

    device, dtype = _device(settings)
    shared = {"config": {**{k.lower(): v for k, v in settings.as_dict().items()},
                         "memory": "growing" if growing else "frozen",
                         "resolved_device": str(device),
                         "resolved_dtype": str(dtype).replace("torch.", "")},
              "versions": _versions()}
    for (index, sample, _), query, neighbours, context, prompt, caption in zip(
            work, queries, found, contexts, prompts, captions):
        if not isinstance(caption, str):
            results[index] = _failure(index, sample, caption)
            continue
        now = datetime.now(timezone.utc).astimezone()
        result = {
            "experiment_index": index,
            "image_id": sample.image_id,
            "generated_caption": caption,
            "original_caption": sample.captions[0],
            "original_captions": list(sample.captions),
            "similar_images": [{"rank": n.rank, "image_id": n.image_id,
                                "score": round(n.score, 6), "captions": c}
                               for n, c in zip(neighbours, context)],
            "prompt": prompt,
            **shared,
            "timings": dict(timings),
            "batch_size": len(indices),
            "timestamp": now.isoformat(timespec="seconds"),
        }
        results[index] = _save(result, db_manager, query, next(caption_vectors), captioner.name,
                               Path(settings.results_dir))
    return [results[index] for index in indices]


def memory_rows(db_manager, growing: bool) -> tuple[list[str], Any]:
    """The ids and vectors retrieval may use: everything in the image database
    (growing memory), or only the human-captioned training pool (frozen)."""
    import numpy as np
    ids, vectors = db_manager.image_ids, db_manager.image_vectors
    if growing:
        return ids, vectors
    train = np.flatnonzero(np.asarray(db_manager.image_kinds) == "train")
    return [ids[n] for n in train], vectors[train]


def retrieve_prompts(image_vectors, ids: list[str], vectors, captions_of,
                     settings: config.Settings) -> tuple[list[list[Any]], list[str]]:
    """Each image's TOP_K_SIMILAR neighbours among the memory rows (`ids`,
    `vectors`) and its prompt holding their captions (`captions_of(image_id)`).
    No memory rows: no neighbours, the plain prompt. The per-batch step that
    --caption-folder and scale/caption_collection.py share."""
    from prompt_generator import build_prompt
    from similarity_search import top_k
    found = [top_k(vector, vectors, ids, settings.top_k_similar) if len(ids) else []
             for vector in image_vectors]
    prompts = [build_prompt([captions_of(n.image_id) for n in neighbours],
                            settings.prompt_template, settings.prompt_template_no_context,
                            settings.captions_per_neighbour) for neighbours in found]
    return found, prompts


def generate_captions(captioner, images: list, prompts: list[str]) -> list:
    """Captions for a batch; if the batch fails, image by image, so that one bad
    image costs only its own caption. Failures come back as exceptions."""
    if not images:
        return []
    try:
        captions = captioner.caption_batch(images, prompts)
    except Exception as exc:  # noqa: BLE001 - isolate the image that breaks the batch
        if len(images) == 1:
            return [exc if isinstance(exc, UserError) else UserError(
                f"caption generation failed: {type(exc).__name__}: {exc}")]
        return [item for image, prompt in zip(images, prompts)
                for item in generate_captions(captioner, [image], [prompt])]
    return [c or captioner.empty_caption_error() for c in captions]


def _failure(index: int, sample, exc: Exception) -> dict[str, Any]:
    return {"experiment_index": index, "image_id": sample.image_id, "error": str(exc),
            "exception": exc}


def _save(result: dict[str, Any], db_manager, image_vector, caption_vector, vlm_model: str,
          results_dir: Path) -> dict[str, Any]:
    """The result file first, then the databases: if saving to the databases
    fails, the result file goes too, so results/ never shows an unsaved run."""
    from atomic_files import write_json_atomic
    start = time.perf_counter()
    path = _result_path(results_dir, result["experiment_index"],
                        datetime.fromisoformat(result["timestamp"]))
    write_json_atomic(path, result)
    try:
        db_manager.add_experiment(result["image_id"], image_vector, result["generated_caption"],
                                  caption_vector, vlm_model=vlm_model,
                                  experiment_index=result["experiment_index"],
                                  timestamp=result["timestamp"])
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    timings = result["timings"]
    timings["save_to_db"] = round(time.perf_counter() - start, 4)
    timings["total"] = round(sum(v for k, v in timings.items()
                                 if k not in ("total", "first_token")), 4)
    write_json_atomic(path, result)  # again, now with the time the save took
    result["result_path"] = str(path)
    return result


def caption_folder(folder: str, retrieval: bool = True, **overrides: Any) -> dict[str, Any]:
    """Caption every image under `folder` so that `search.py --text ... --images-dir
    folder` can find them.

    With `retrieval`, each prompt holds the captions of the image's neighbours in
    the pipeline's memory (as in an experiment; MEMORY "auto" means the training
    pool only); without, the plain prompt PROMPT_TEMPLATE_NO_CONTEXT. BATCH_SIZE
    images share one `generate` call. Captions, their embeddings and the images' CLIP
    embeddings go to a database of their own under DB_DIR/folders/, never into
    the experiment memory. Images this VLM captioned before are skipped, so an
    interrupted run continues where it stopped.
    """
    import numpy as np
    from tqdm.auto import tqdm

    from dataset_loader import open_image
    from db_manager import DbIdentity, DbManager, generated_caption_id
    from folder_index import folder_db_dir, scan_folder

    settings = config.resolve(**overrides)
    files = scan_folder(folder)
    root = Path(folder).expanduser().resolve()
    if retrieval:
        _, memory = initialize_system(**overrides)
    image_embedder, caption_embedder = _image_embedder(settings), _caption_embedder(settings)
    captioner = _captioner(settings)
    identity = DbIdentity(clip_model=settings.clip_model_name,
                          caption_model=settings.caption_embedding_model,
                          dataset=str(root), split=f"folder:{root}")
    db = DbManager.open(folder_db_dir(settings.db_dir, root), identity)
    if db.needs_seed:
        db.seed([], np.zeros((0, image_embedder.dim), np.float32), [],
                np.zeros((0, caption_embedder.dim), np.float32))
    todo = [f for f in files if not db.has_caption(generated_caption_id(f, captioner.name))]
    position = {image_id: n for n, image_id in enumerate(files)}
    ids, vectors, captions_of = [], np.zeros((0, image_embedder.dim), np.float32), None
    if retrieval:
        ids, vectors = memory_rows(memory, growing=settings.memory == "growing")
        captions_of = memory.captions_of
    done, failed = 0, []
    bar = tqdm(total=len(todo), desc="captioning", unit="img")
    for start in range(0, len(todo), settings.batch_size):  # BATCH_SIZE images per generate
        batch = []
        for image_id in todo[start:start + settings.batch_size]:
            try:
                batch.append((image_id, open_image(root / image_id)))
            except UserError as exc:  # unreadable: count it, go on
                log.warning("skipping %s: %s", image_id, exc)
                failed.append(image_id)
        image_vectors = image_embedder.embed([image for _, image in batch])
        _, prompts = retrieve_prompts(image_vectors, ids, vectors, captions_of, settings)
        captions = generate_captions(captioner, [image for _, image in batch], prompts)
        good = [(image_id, vector, caption) for (image_id, _), vector, caption
                in zip(batch, image_vectors, captions) if isinstance(caption, str)]
        for (image_id, _), caption in zip(batch, captions):
            if not isinstance(caption, str):  # empty caption, generation error
                log.warning("skipping %s: %s", image_id, caption)
                failed.append(image_id)
        caption_vectors = caption_embedder.embed_captions([c for _, _, c in good])
        for (image_id, vector, caption), caption_vector in zip(good, caption_vectors):
            db.add_experiment(image_id, vector, caption, caption_vector,
                              vlm_model=captioner.name, experiment_index=position[image_id],
                              timestamp=datetime.now(timezone.utc).astimezone().isoformat(
                                  timespec="seconds"))
            done += 1
        bar.update(len(todo[start:start + settings.batch_size]))
    bar.close()
    return {"folder": str(root), "database": str(db.db_dir), "images": len(files),
            "captioned": done, "already_captioned": len(files) - len(todo),
            "failed": failed, "retrieval": retrieval}


def check_writable(folder: Path) -> None:
    """UserError unless files can be created in `folder` (made if missing)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        raise UserError(f"cannot write to {folder}: {exc.strerror}") from None


def _result_path(results_dir: Path, index: int, now: datetime) -> Path:
    stamp = now.strftime("%Y%m%d_%H%M%S")
    path = results_dir / f"experiment_{index}_{stamp}.json"
    n = 1
    while path.exists():  # two runs of one index within a second keep both files
        path = results_dir / f"experiment_{index}_{stamp}_{n}.json"
        n += 1
    return path


def _versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for package in ("torch", "transformers", "sentence-transformers", "numpy", "datasets"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return versions


def _summary(result: dict[str, Any]) -> str:
    lines = [f"experiment {result['experiment_index']}: {result['image_id']}",
             f"  generated: {result['generated_caption']}",
             f"  reference: {result['original_caption']}",
             "  neighbours: " + ", ".join(f"{n['image_id']} ({n['score']:.3f})"
                                          for n in result["similar_images"]),
             f"  time: {result['timings']['total']:.1f} s (loading {result['timings']['load']:.1f} s, "
             f"generation {result['timings']['generate']:.1f} s)",
             f"  result: {result['result_path']}"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit code."""
    parser = config.make_parser("main.py", __doc__.split("\n\n")[0] + "\n\n"
                                "Every setting of config.py is a flag below.")
    batch = parser.add_argument_group("many experiments (see batch_runner.py)")
    batch.add_argument("--all", action="store_true",
                       help="run every experiment index 0 .. EXPERIMENT_SAMPLES-1 (resumable)")
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
    actions.add_argument("--check-db", action="store_true",
                         help="validate the databases in DB_DIR and print a report")
    actions.add_argument("--repair-db", action="store_true",
                         help="back up DB_DIR, then fix what can be fixed and report the rest")
    actions.add_argument("--import-parquet", metavar="OUT_DIR",
                         help="add the images and captions of `python -m "
                              "scale.caption_collection --out OUT_DIR` to the databases")
    try:
        args, settings = config.parse_cli(parser, argv)
    except UserError as exc:
        return cli_failure("main.py", exc, code=2)
    config.configure_logging(settings)
    try:
        overrides = {k.lower(): v for k, v in settings.as_dict().items()}
        if args.check_db or args.repair_db:
            return _maintain_db(Path(settings.db_dir), repair=args.repair_db)
        if args.import_parquet:
            return _import_parquet(args.import_parquet, settings)
        if args.caption_folder:
            summary = caption_folder(args.caption_folder, not args.no_retrieval, **overrides)
            print(f"captioned {summary['captioned']} of {summary['images']} images in "
                  f"{summary['folder']} ({summary['already_captioned']} done before, "
                  f"{len(summary['failed'])} failed); search them with\n"
                  f"  python search.py --text \"...\" --images-dir {args.caption_folder}")
            return 1 if summary["failed"] else 0
        if args.all or args.indices or args.evaluate:
            return _batch(args, settings, overrides)
        if args.no_retrieval:
            raise UserError("--no-retrieval goes with --caption-folder; for an experiment "
                            "without retrieval use --top-k-similar 0")
        result = run_experiment(**overrides)
    # OSError: disk full, permissions: nothing a traceback would explain better
    except (UserError, OSError, KeyboardInterrupt) as exc:
        return cli_failure("main.py", exc)
    print(_summary(result))
    return 0


def _batch(args, settings: config.Settings, overrides: dict[str, Any]) -> int:
    """--all / --indices / --evaluate."""
    import batch_runner
    if args.evaluate:
        run_dir = Path(args.evaluate)
        summary = batch_runner.summarize(run_dir, **overrides)
    else:
        if args.all and args.indices:
            raise UserError("give --all or --indices, not both")
        indices = (list(range(settings.experiment_samples)) if args.all else
                   batch_runner.parse_indices(args.indices, settings.experiment_samples))
        summary = batch_runner.run_batch(indices, args.run_name, **overrides)
        run_dir = Path(settings.results_dir) / "runs" / summary["run"]
    print(batch_runner.format_summary(summary, run_dir))
    return batch_runner.exit_code(summary)


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
    from db_manager import check_db, repair_db
    if repair:
        for line in repair_db(db_dir):
            print(line)
        return 0
    if not db_dir.exists():
        raise UserError(f"no database in {db_dir}")
    problems = check_db(db_dir)
    for line in problems:
        print(f"problem: {line}")
    print(f"{db_dir}: " + (f"{len(problems)} problem(s); fix with --repair-db" if problems
                           else "all checks passed"))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
