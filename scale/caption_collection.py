"""Caption a large image collection with Ray Data: the pipeline's stages, distributed.

    python -m scale.caption_collection --images 'photos/**/*.jpg' --out out/   # local Ray
    python -m scale.caption_collection --images photos/ --out out/ --num-gpus 4
    ray job submit --working-dir . -- python -m scale.caption_collection \\
        --images s3://bucket/photos/ --out /mnt/shared/out --num-gpus 16         # a cluster
    python main.py --import-parquet out/                                          # then search

One streaming Ray Data pipeline, every stage the single-machine pipeline's own code:
  file list (driver) -> read_files (tasks: bytes from disk or any pyarrow filesystem)
  -> ImageStage actors: dataset_loader.open_image + image_embedder (CLIP)
  -> CaptionStage actors: the pipeline's caption step (pipeline.caption_batch: top-k
     in the memory, broadcast once with ray.put, the prompt, the VLM) on the
     embedded images
  -> TextStage actors: caption_embedder
  -> the driver writes Parquet shards atomically (scale/shards.py).
Each actor loads its model once (models.load_models: the same device, dtype and
settings); actors per stage, GPUs and CPUs per actor and batch sizes are flags.

The memory is the pipeline's database in DB_DIR (build it with `python main.py`),
as for `python main.py --caption-folder`: MEMORY "auto" retrieves from the
training pool only. --no-retrieval uses the plain prompt and needs no database.

Ids are file paths relative to --root (default: the folder part of --images).
Resuming: the ids in OUT_DIR's shards are skipped, so running the same command
again continues a stopped job; a killed job leaves only complete shards. The
driver writes a shard every --shard-size finished images (default 500) or
--shard-seconds after the oldest unwritten one (default 60), whichever comes
first, and images travel through the stages in blocks of one caption batch, so
a stopped job keeps all but about its last minute of work. If the Ray head node
is lost, the driver writes what it holds and ends with one line saying to run
the same command again, just before Ray itself would end it (Ray's
gcs_rpc_server_reconnect_timeout_s, 60 s by default, during which Ray logs its
own reconnection errors). An image that cannot be read or captioned is recorded
in OUT_DIR/failures/ and the job goes on (a batch that fails is retried, then
tried image by image); the next run retries it. Settings that change captions
must match the first run.
"""

from __future__ import annotations

import glob
import hashlib
import io
import logging
import os
import socket
import sys
import threading
import time
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Sequence

import availability
import config
from errors import UsageError, UserError, cli_failure

log = logging.getLogger("scale")

GLOB_CHARS = "*?["
STAGES = ("embed", "caption", "text")
# The models the stages load (availability.PARTS): CLIP, the VLM, the caption model.
STAGE_MODELS = ("image", "captioner", "caption")
# Share of one GPU per actor with --num-gpus: one actor of each stage fits a GPU.
GPU_SHARE = {"embed": 0.15, "caption": 0.7, "text": 0.15}
INSTALL = "pip install -r requirements-scale.txt"
PROG = "scale.caption_collection"
# Ray ends a driver whose GCS (head node) has not answered for this many seconds
# (its gcs_rpc_server_reconnect_timeout_s, default 60, RAY_<name> overrides it) ...
RAY_GCS_TIMEOUT_ENV = "RAY_gcs_rpc_server_reconnect_timeout_s"
# ... and our watchdog speaks this many seconds before it does.
HEAD_LOST_MARGIN = 5.0


def import_ray():
    """Ray with Ray Data, or a UserError saying how to install it."""
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise UserError(f"scaling out needs Ray Data, which is not installed: {INSTALL}") from None
    return ray


# --- the file list ----------------------------------------------------------------------

def list_images(spec: str, root: str | None = None) -> tuple[str, list[tuple[str, str]]]:
    """(root, [(id, path)]) of the images `spec` names: a folder (recursive, image
    extensions), a glob ("photos/**/*.jpg") or a URI of any pyarrow filesystem
    ("s3://bucket/photos/", "gs://...", with or without a glob). Ids are paths
    relative to `root` (default: the folder part of `spec`); paths are absolute
    paths or URIs. Sorted by id."""
    from folder_index import IMAGE_EXTENSIONS
    if "://" in spec:
        base, found = _list_uri(spec, IMAGE_EXTENSIONS)
    else:
        path = os.path.expanduser(spec)
        if any(c in path for c in GLOB_CHARS):
            base = _glob_base(path)
            found = [os.path.abspath(p) for p in glob.glob(path, recursive=True)
                     if os.path.isfile(p)]
        elif os.path.isdir(path):
            base, found = path, []
            for dirpath, dirnames, filenames in os.walk(path):
                dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
                found += [os.path.abspath(os.path.join(dirpath, name)) for name in filenames
                          if name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")]
        elif os.path.isfile(path):
            base, found = os.path.dirname(path) or ".", [os.path.abspath(path)]
        else:
            raise UserError(f"--images {spec}: no such file or folder (give a folder, a glob "
                            "such as 'photos/**/*.jpg', or a URI such as s3://bucket/photos/)")
    if not found:
        raise UserError(f"no images match --images {spec} (a folder is searched recursively "
                        f"for {', '.join(IMAGE_EXTENSIONS)})")
    root = root or base
    if "://" not in root:
        root = os.path.abspath(os.path.expanduser(root))
    root = root.rstrip("/")
    items = []
    for path in found:
        if not path.startswith(root + "/"):
            raise UserError(f"{path} is not under --root {root}")
        items.append((path[len(root) + 1:].replace(os.sep, "/"), path))
    return root, sorted(items)


def _glob_base(pattern: str) -> str:
    """The folder part of a glob before its first wildcard."""
    cut = min(pattern.find(c) for c in GLOB_CHARS if c in pattern)
    return pattern[:cut].rpartition("/")[0] or "."


def _glob_regex(pattern: str):
    """A glob as a regex with the local glob's meaning: * and ? stay within a folder,
    "**/" is any number of folders (none included)."""
    import re
    out, n = [], 0
    while n < len(pattern):
        if pattern.startswith("**/", n):
            out.append("(?:.*/)?")
            n += 3
        elif pattern.startswith("**", n):
            out.append(".*")
            n += 2
        elif pattern[n] == "*":
            out.append("[^/]*")
            n += 1
        elif pattern[n] == "?":
            out.append("[^/]")
            n += 1
        elif pattern[n] == "[" and "]" in pattern[n + 2:]:
            end = pattern.index("]", n + 2)
            body = pattern[n + 1:end]
            out.append("[" + ("^" + body[1:] if body.startswith("!") else body) + "]")
            n = end + 1
        else:
            out.append(re.escape(pattern[n]))
            n += 1
    return re.compile("".join(out) + r"\Z")


def _list_uri(spec: str, extensions: Sequence[str]) -> tuple[str, list[str]]:
    from pyarrow import fs as pafs
    has_glob = any(c in spec.split("://", 1)[1] for c in GLOB_CHARS)
    base = _glob_base(spec) if has_glob else spec.rstrip("/")
    try:
        filesystem, base_path = pafs.FileSystem.from_uri(base)
        infos = filesystem.get_file_info(pafs.FileSelector(base_path, recursive=True))
    except (OSError, ValueError) as exc:
        raise UserError(f"--images {spec}: cannot list {base}: {exc}") from None
    matches, found = _glob_regex(spec).match, []
    for info in infos:
        if info.type != pafs.FileType.File:
            continue
        uri = base + info.path[len(base_path.rstrip("/")):]
        name = uri.rpartition("/")[2]
        if name.startswith("."):
            continue
        if matches(uri) if has_glob else name.lower().endswith(tuple(extensions)):
            found.append(uri)
    return base, found


@lru_cache(maxsize=16)
def _filesystem(prefix: str):
    from pyarrow import fs as pafs
    return pafs.FileSystem.from_uri(prefix)


def read_bytes(path: str) -> bytes:
    """The bytes of a local file or of a URI (one filesystem client per bucket and worker)."""
    if "://" not in path:
        with open(path, "rb") as f:
            return f.read()
    scheme, rest = path.split("://", 1)
    netloc = rest.split("/", 1)[0]
    prefix = f"{scheme}://{netloc}" if netloc else f"{scheme}:///"
    filesystem, base = _filesystem(prefix)
    with filesystem.open_input_stream(
            base.rstrip("/") + "/" + path[len(prefix):].lstrip("/")) as f:
        return f.read()


# --- the stages (run in Ray workers) --------------------------------------------------------

def _vectors(rows: Sequence[Any]):
    """A list<float32> column from per-row vectors (None: a failed row)."""
    import numpy as np
    import pyarrow as pa
    valid = [r is not None for r in rows]
    lengths = [len(r) if r is not None else 0 for r in rows]
    offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))
    values = (np.concatenate([np.asarray(r, np.float32) for r in rows if r is not None])
              if any(valid) else np.zeros(0, np.float32))
    return pa.ListArray.from_arrays(offsets, pa.array(values, pa.float32()),
                                    mask=pa.array([not v for v in valid]))


def run_isolated(fn: Callable[[list], list], items: list, retries: int, what: str) -> list:
    """fn(items) -> one result per item, tried 1 + `retries` times; if it still
    fails, item by item, so a bad item costs only itself. Failures come back as
    exceptions in place of results."""
    if not items:
        return []
    error: Exception | None = None
    for attempt in range(1 + retries):
        try:
            return list(fn(items))
        except Exception as exc:  # noqa: BLE001 - recorded per image, the job goes on
            error = exc
            log.warning("%s of %d item(s) failed (attempt %d of %d): %s", what, len(items),
                        attempt + 1, 1 + retries, exc)
    if len(items) == 1:
        return [error]
    return [r for item in items for r in run_isolated(fn, [item], 0, what)]


def _message(what: str, exc: Exception) -> str:
    return str(exc) if isinstance(exc, UserError) else f"{what}: {type(exc).__name__}: {exc}"


def read_files(batch):
    """Ray task: the bytes of each file; a file that cannot be read is an error row."""
    import pyarrow as pa
    data, errors = [], []
    for path in batch.column("path").to_pylist():
        try:
            data.append(read_bytes(path))
            errors.append(None)
        except Exception as exc:  # noqa: BLE001 - missing, permissions, network
            data.append(None)
            errors.append(f"image {path} could not be read: {exc}")
    return pa.table({"id": batch.column("id"), "path": batch.column("path"),
                     "bytes": pa.array(data, pa.binary()), "error": pa.array(errors, pa.string())})


def _open_images(batch, errors: list[str | None]) -> dict[int, Any]:
    """Row -> PIL image for the rows without an error; unreadable ones get one."""
    from dataset_loader import open_image
    images = {}
    for n, (data, path) in enumerate(zip(batch.column("bytes").to_pylist(),
                                         batch.column("path").to_pylist())):
        if errors[n] is None:
            try:
                images[n] = open_image(io.BytesIO(data), name=path)
            except UserError as exc:
                errors[n] = str(exc)
    return images


class ImageStage:
    """Actor: decode each image as the pipeline does and embed it with CLIP."""

    def __init__(self, settings: config.Settings, retries: int):
        from models import load_models
        self.embedder = load_models(settings).image_embedder
        self.retries = retries

    def __call__(self, batch):
        import pyarrow as pa
        errors = batch.column("error").to_pylist()
        images = _open_images(batch, errors)
        rows = list(images)
        vectors = run_isolated(lambda ims: list(self.embedder.embed(ims)),
                               [images[n] for n in rows], self.retries, "image embedding")
        out: list[Any] = [None] * batch.num_rows
        for n, vector in zip(rows, vectors):
            if isinstance(vector, Exception):
                errors[n] = _message("image embedding", vector)
            else:
                out[n] = vector
        return pa.table({"id": batch.column("id"), "path": batch.column("path"),
                         "bytes": batch.column("bytes"), "image_embedding": _vectors(out),
                         "error": pa.array(errors, pa.string())})


class CaptionStage:
    """Actor: the pipeline's caption step (pipeline.caption_batch) on images embedded by
    ImageStage: neighbours in the broadcast memory, the prompt, the caption."""

    def __init__(self, settings: config.Settings, memory: list):
        import ray

        from memory import Memory
        from models import load_models
        self.models = load_models(settings)
        self.models.captioner  # noqa: B018 - load it once, now
        rows = ray.get(memory[0])  # the one copy in the object store (a list: not resolved)
        self.memory = Memory.from_rows(rows["ids"], rows["vectors"], rows["captions"])

    def __call__(self, batch):
        import pyarrow as pa

        import pipeline
        errors = batch.column("error").to_pylist()
        images = _open_images(batch, errors)
        rows = [n for n in images if errors[n] is None]
        ids, queries = batch.column("id").to_pylist(), batch.column("image_embedding").to_pylist()
        done = pipeline.caption_batch(self.models, [(ids[n], images[n]) for n in rows],
                                      self.memory, vectors=[queries[n] for n in rows],
                                      embed_captions=False)
        text: list[str | None] = [None] * batch.num_rows
        neighbours: list[Any] = [None] * batch.num_rows
        for n, record in zip(rows, done.items):
            if isinstance(record, pipeline.Failure):
                errors[n] = _message("caption generation", record.exception or record.error)
            else:
                text[n] = record.caption
                neighbours[n] = [{"id": x.image_id, "score": x.score} for x in record.neighbours]
        neighbour_type = pa.list_(pa.struct([("id", pa.string()), ("score", pa.float32())]))
        return pa.table({"id": batch.column("id"), "path": batch.column("path"),
                         "image_embedding": batch.column("image_embedding"),
                         "caption": pa.array(text, pa.string()),
                         "neighbours": pa.array(neighbours, neighbour_type),
                         "error": pa.array(errors, pa.string())})


class TextStage:
    """Actor: embed each caption with the caption model."""

    def __init__(self, settings: config.Settings, retries: int):
        from models import load_models
        self.embedder = load_models(settings).caption_embedder
        self.retries = retries

    def __call__(self, batch):
        import pyarrow as pa
        errors = batch.column("error").to_pylist()
        captions = batch.column("caption").to_pylist()
        rows = [n for n, e in enumerate(errors) if e is None]
        vectors = run_isolated(lambda texts: list(self.embedder.embed_captions(texts)),
                               [captions[n] for n in rows], self.retries, "caption embedding")
        out: list[Any] = [None] * batch.num_rows
        for n, vector in zip(rows, vectors):
            if isinstance(vector, Exception):
                errors[n] = _message("caption embedding", vector)
            else:
                out[n] = vector
        return batch.drop_columns(["error"]).append_column(
            "caption_embedding", _vectors(out)).append_column("error", pa.array(errors,
                                                                                pa.string()))


# --- the driver ---------------------------------------------------------------------------

def load_memory(settings: config.Settings, retrieval: bool) -> tuple[dict[str, Any], dict]:
    """The memory rows retrieval may use (ids, vectors, each one's captions), and a
    description of it for the manifest. Without retrieval: empty, no database.
    `settings` resolved where the database is use its models where none were given."""
    import numpy as np
    if not retrieval:
        return {"ids": [], "vectors": np.zeros((0, 0), np.float32), "captions": []}, {
            "policy": "none", "db_dir": None, "rows": 0, "digest": None}
    from memory import Memory
    from db_manager import DbManager
    db = DbManager.open(settings.db_dir)
    if db.describe().empty:
        raise UserError(f"no memory to retrieve from in {settings.db_dir}: build it with "
                        "`python main.py` (same settings) first, or caption without "
                        "retrieval (--no-retrieval)")
    db.check_models(settings.clip_model_name, settings.caption_embedding_model)
    policy = settings.memory
    memory = Memory.from_db(db, growing=policy == "growing")
    ids, vectors = memory.ids, np.ascontiguousarray(memory.vectors, dtype=np.float32)
    captions = [memory.captions_of(image_id) for image_id in ids]
    digest = hashlib.sha256("\n".join(ids).encode() + vectors.tobytes()).hexdigest()[:16]
    return {"ids": list(ids), "vectors": vectors, "captions": captions}, {
        "policy": policy, "db_dir": str(Path(settings.db_dir).resolve()), "rows": len(ids),
        "digest": digest}


def init_ray(ray, address: str | None = None, num_cpus: int | None = None) -> None:
    """Connect to `address` (or RAY_ADDRESS, or the job's cluster), else start a local
    instance. Reuses a session already started.

    A local instance's workers run this Python, whose editable install of the project
    (`-e .` in requirements.txt) imports its modules. A cluster's workers get the code
    from the job's `ray job submit --working-dir .`, which Ray puts on their path.
    """
    if ray.is_initialized():
        return
    if address or os.environ.get("RAY_ADDRESS"):
        ray.init(address=address)
        return
    ray.init(num_cpus=num_cpus)


def _plan(ray, num_gpus: float, actors: dict[str, int | None],
          gpus_per_actor: dict[str, float | None], cpus_per_actor: float | None,
          local: bool) -> dict[str, dict[str, float]]:
    """Actors, GPUs and CPUs per stage. With --num-gpus G: G actors per stage, one of
    each sharing a GPU (GPU_SHARE); without: one CPU actor per stage."""
    resources = ray.cluster_resources()
    cpus = cpus_per_actor or min(1.0, resources.get("CPU", 1.0) / (len(STAGES) + 1))
    plan = {}
    for stage in STAGES:
        share = gpus_per_actor.get(stage)
        if share is None:
            share = GPU_SHARE[stage] if num_gpus else 0.0
        count = actors.get(stage) or (max(1, int(num_gpus)) if num_gpus else 1)
        plan[stage] = {"actors": count, "gpus": share, "cpus": cpus}
    needed = sum(p["actors"] * p["gpus"] for p in plan.values())
    have = resources.get("GPU", 0.0)
    if needed > have + 1e-9:
        message = (f"the stages ask for {needed:g} GPUs but the Ray cluster has {have:g}; "
                   "lower --num-gpus (or the --*-gpus / --*-actors flags)")
        if local:
            raise UserError(message)
        log.warning("%s (waiting for an autoscaler to add them)", message)
    return plan


def caption_collection(images: str, out_dir: str | os.PathLike, *, retrieval: bool = True,
                       root: str | None = None, address: str | None = None,
                       num_cpus: int | None = None, num_gpus: float = 0,
                       actors: dict[str, int | None] | None = None,
                       gpus_per_actor: dict[str, float | None] | None = None,
                       cpus_per_actor: float | None = None,
                       batch_sizes: dict[str, int | None] | None = None,
                       shard_size: int | None = None, shard_seconds: float | None = None,
                       block_size: int | None = None, retries: int = 2,
                       settings: config.Settings | None = None,
                       **overrides: Any) -> dict[str, Any]:
    """Caption every image `images` names into Parquet shards in `out_dir` (resumable).

    `settings` (default config.resolve()) with `overrides` (settings of config.py by
    lower-case name, as for main.py) on top; with retrieval, the models the memory in
    DB_DIR was built with fill the ones not given.
    `actors`, `gpus_per_actor` and `batch_sizes` are keyed by stage ("embed",
    "caption", "text"); unset entries follow --num-gpus (see _plan) and
    BATCH_SIZE. A shard is written every `shard_size` finished images (default
    shards.SHARD_SIZE) or `shard_seconds` after the oldest unwritten one (default
    shards.SHARD_SECONDS), whichever comes first; input blocks hold `block_size`
    images (default: one caption batch), the unit in which finished images reach
    the driver. Returns a summary: images, already_done, captioned, failed, shards,
    out_dir.
    """
    from scale import shards

    shard_size = shards.SHARD_SIZE if shard_size is None else shard_size
    shard_seconds = shards.SHARD_SECONDS if shard_seconds is None else shard_seconds

    settings = config.settings_of(settings, overrides, "collection")
    if shard_size < 1 or (block_size is not None and block_size < 1):
        raise UsageError("--shard-size and --block-size must be at least 1")
    if not shard_seconds > 0:
        raise UsageError(f"--shard-seconds must be more than 0, got {shard_seconds:g}")
    if retries < 0:
        raise UsageError("--retries must be 0 or more")
    # Every model the stages load, looked for before Ray starts actors that would each
    # find one missing. What is checked is the driver's view (a local path, its hub
    # cache, the hub): a cluster's workers have caches of their own, where a model the
    # driver has may still be downloaded or missing. The data set is not loaded here.
    availability.require(settings, STAGE_MODELS)
    ray = import_ray()
    root, files = list_images(images, root)
    out = Path(out_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out_dir} is a file, not a folder")
    out.mkdir(parents=True, exist_ok=True)
    run = shards.new_run_id()
    with shards.locked(out):
        memory, memory_info = load_memory(settings, retrieval)
        models = {"clip": settings.clip_model_name, "vlm": settings.vlm_model_name,
                  "caption": settings.caption_embedding_model}
        manifest = shards.start_manifest(out, {
            "models": models, "retrieval": retrieval, "root": root, "memory": memory_info,
            "settings": settings.results(data_set=False)}, run)
        shards.remove_temporary_files(out)
        done = shards.written_ids(out)
        todo = [(i, p) for i, p in files if i not in done]
        summary = {"out_dir": str(out), "images": len(files),
                   "already_done": len(files) - len(todo), "captioned": 0, "failed": 0,
                   "shards": 0, "run": run}
        log.info("%d images under %s: %d to caption, %d done before", len(files), root,
                 len(todo), summary["already_done"])
        if todo:
            local = not (address or os.environ.get("RAY_ADDRESS") or ray.is_initialized())
            init_ray(ray, address, num_cpus)
            plan = _plan(ray, num_gpus, actors or {}, gpus_per_actor or {}, cpus_per_actor,
                         local)
            # One caption batch per call of every stage and per input block: a Ray task
            # hands its rows on only when its whole input is done, so larger blocks or
            # batches would hold finished captions back from the shards.
            given = {k: v for k, v in (batch_sizes or {}).items() if v}
            sizes = dict.fromkeys(STAGES, given.get("caption") or settings.batch_size)
            sizes.update(given)
            writer = shards.ShardWriter(out, run, shard_size, models, seconds=shard_seconds)
            failures = shards.FailureLog(out, run)
            dataset = _dataset(ray, todo, settings, memory, plan, sizes,
                               block_size or sizes["caption"], retries)
            watchdog = watch_head(ray.get_runtime_context().gcs_address,
                                  lambda address, seconds: _head_lost(writer, out, address,
                                                                      seconds))
            try:
                _drain(dataset, writer, failures, len(todo))
            except Exception as exc:  # a stage that could not start (model missing, ...)
                if isinstance(exc, UserError):
                    raise
                raise UserError(_explain(exc, out)) from None
            finally:
                watchdog.set()
            summary.update(captioned=writer.written, failed=failures.count,
                           shards=len(writer.shards), failures_file=str(failures.path))
        shards.finish_manifest(out, manifest, {k: summary[k] for k in ("captioned", "failed")})
    return summary


def _dataset(ray, todo: list[tuple[str, str]], settings: config.Settings, memory: dict,
             plan: dict, sizes: dict[str, int], block_size: int, retries: int):
    """The Ray Data pipeline over `todo` (not executed yet)."""
    import pyarrow as pa
    from ray.data import ActorPoolStrategy
    table = pa.table({"id": [i for i, _ in todo], "path": [p for _, p in todo]})
    blocks = [table.slice(n, block_size) for n in range(0, table.num_rows, block_size)]
    memory_ref = ray.put(memory)  # broadcast once; every CaptionStage actor reads this copy

    def pool(stage: str) -> dict[str, Any]:
        p = plan[stage]
        return {"compute": ActorPoolStrategy(size=int(p["actors"])), "num_gpus": p["gpus"],
                "num_cpus": p["cpus"], "batch_size": sizes[stage], "batch_format": "pyarrow"}

    dataset = ray.data.from_arrow(blocks)
    dataset = dataset.map_batches(read_files, batch_size=sizes["embed"], batch_format="pyarrow",
                                  num_cpus=plan["embed"]["cpus"])
    dataset = dataset.map_batches(ImageStage, fn_constructor_kwargs={
        "settings": settings, "retries": retries}, **pool("embed"))
    dataset = dataset.map_batches(CaptionStage, fn_constructor_kwargs={
        "settings": settings, "memory": [memory_ref]}, **pool("caption"))
    return dataset.map_batches(TextStage, fn_constructor_kwargs={
        "settings": settings, "retries": retries}, **pool("text"))


def _drain(dataset, writer, failures, total: int) -> None:
    """Run the pipeline; finished rows to shards, failed ones to the failure log. Rows
    that came back are written even when the pipeline stops (error, Ctrl-C)."""
    import pyarrow.compute as pc
    seen = 0
    try:
        for batch in dataset.iter_batches(batch_size=None, batch_format="pyarrow"):
            failed = pc.is_valid(batch.column("error"))
            bad = batch.filter(failed)
            failures.add(bad.column("id").to_pylist(), bad.column("path").to_pylist(),
                         bad.column("error").to_pylist())
            writer.add(batch.filter(pc.invert(failed)))
            seen += batch.num_rows
    finally:
        writer.close()
    if seen != total:
        log.warning("%d of %d images came back from the pipeline; run again for the rest",
                    seen, total)


def head_lost_after() -> float:
    """Seconds without an answer from the GCS after which the watchdog gives up: just
    before Ray would end the driver itself."""
    try:
        ray_timeout = float(os.environ.get(RAY_GCS_TIMEOUT_ENV, "60"))
    except ValueError:
        ray_timeout = 60.0
    return max(1.0, ray_timeout - HEAD_LOST_MARGIN)


def watch_head(address: str, on_lost: Callable[[str, float], None],
               after: float | None = None, every: float = 1.0) -> threading.Event:
    """Probe the GCS at `address` ("host:port", the Ray head node) every `every`
    seconds in a daemon thread; once it has refused or not answered for `after`
    seconds (default head_lost_after()), call on_lost(address, seconds) and stop.
    Set the returned event to stop watching."""
    after = head_lost_after() if after is None else after
    host, _, port = address.rpartition(":")
    stop = threading.Event()

    def probe() -> None:
        down_since = None
        while not stop.wait(every):
            try:
                with socket.create_connection((host.strip("[]"), int(port)),
                                              timeout=min(2.0, after)):
                    down_since = None
            except OSError:
                now = time.monotonic()
                down_since = down_since or now
                if now - down_since >= after and not stop.is_set():
                    on_lost(address, now - down_since)
                    return

    threading.Thread(target=probe, daemon=True, name="ray-head-watchdog").start()
    return stop


def _head_lost(writer, out: Path, address: str, seconds: float) -> None:
    """The head node is gone and Ray is about to end this process without a word of
    ours: write what came back, say how to resume, and exit 1."""
    try:
        writer.flush()
        kept = f"the {writer.written} images finished in this job are in {out / 'shards'}"
    except Exception as exc:  # noqa: BLE001 - the line below must still be said
        kept = f"the shards written so far are in {out / 'shards'} ({exc})"
    print(f"{PROG}: error: lost the Ray head node (its GCS at {address} has not answered "
          f"for {seconds:.0f} s); {kept}: run the same command again to continue once the "
          "cluster is back", file=sys.stderr, flush=True)
    os._exit(1)


def _explain(exc: BaseException, out: Path) -> str:
    """One line for a pipeline that stopped: the UserError a stage raised, if any."""
    text = str(exc)
    marker = "UserError: "
    line = next((ln for ln in reversed(text.splitlines()) if marker in ln), None)
    reason = (line.split(marker, 1)[1] if line else
              f"{type(exc).__name__}: {text.strip().splitlines()[-1] if text.strip() else ''}")
    return (f"the Ray pipeline stopped: {reason.strip()} (the shards written so far in {out} "
            "are kept; run the same command again to continue)")


# --- command line -----------------------------------------------------------------------------

def parse_args(argv: list[str] | None = None):
    parser = config.make_parser(
        "python -m scale.caption_collection",
        __doc__.split("\n\n")[0] + "\n\n" + __doc__.split("\n\n")[1] +
        "\n\nThe settings of config.py are flags too (same as main.py).")
    job = parser.add_argument_group("collection")
    job.add_argument("--images", metavar="SPEC", required=False,
                     help="a folder (recursive), a glob ('photos/**/*.jpg') or a URI "
                          "(s3://bucket/photos/, with or without a glob)")
    job.add_argument("--out", metavar="OUT_DIR", help="output folder: shards/, failures/, "
                     "manifest.json (a second run resumes)")
    job.add_argument("--root", metavar="DIR",
                     help="ids are paths relative to this (default: the folder part of --images)")
    job.add_argument("--no-retrieval", action="store_true",
                     help="plain prompt, no neighbours' captions (needs no database)")
    job.add_argument("--shard-size", type=int, metavar="N",
                     help="images per Parquet shard at most (default 500)")
    job.add_argument("--shard-seconds", type=float, metavar="S",
                     help="a shard is also written this long after the oldest finished "
                          "image not yet in one (default 60): what a stopped job can lose")
    job.add_argument("--retries", type=int, default=2, metavar="N",
                     help="retries of a failed embedding batch before it is split (default 2)")
    ray_group = parser.add_argument_group("Ray")
    ray_group.add_argument("--address", metavar="ADDR",
                           help="Ray cluster to join (default: RAY_ADDRESS, else a local instance)")
    ray_group.add_argument("--num-cpus", type=int, metavar="N",
                           help="CPUs of a local Ray instance (default: all)")
    ray_group.add_argument("--num-gpus", type=float, default=0, metavar="G",
                           help="GPUs to use: G actors per stage, one of each stage per GPU "
                                f"({', '.join(f'{k} {v:g}' for k, v in GPU_SHARE.items())} of "
                                "it; default 0: CPU)")
    ray_group.add_argument("--cpus-per-actor", type=float, metavar="C",
                           help="CPUs reserved per actor and read task (default: min(1, "
                                "cluster CPUs / 4))")
    ray_group.add_argument("--block-size", type=int, metavar="N",
                           help="images per input block (default: the caption batch size; "
                                "finished images reach the driver a block at a time)")
    for stage, what in (("embed", "CLIP image embedding"), ("caption", "retrieval + VLM"),
                        ("text", "caption embedding")):
        ray_group.add_argument(f"--{stage}-actors", type=int, metavar="N",
                               help=f"{what} actors (default: --num-gpus, or 1)")
        ray_group.add_argument(f"--{stage}-gpus", type=float, metavar="F",
                               help=f"GPUs per {what} actor (default {GPU_SHARE[stage]:g} "
                                    "with --num-gpus, else 0)")
        default = "BATCH_SIZE" if stage == "caption" else "the caption batch size"
        ray_group.add_argument(f"--{stage}-batch-size", type=int, metavar="N",
                               help=f"images per {what} call (default {default})")
    args, settings = config.parse_cli(parser, argv, "collection")
    if not args.images or not args.out:
        raise UsageError("give --images SPEC and --out OUT_DIR")
    return args, settings


def main(argv: list[str] | None = None) -> int:
    prog = PROG
    try:
        args, settings = parse_args(argv)
    except UserError as exc:
        return cli_failure(prog, exc, code=2)
    config.configure_logging(settings)
    try:
        summary = caption_collection(
            args.images, args.out, retrieval=not args.no_retrieval, root=args.root,
            address=args.address, num_cpus=args.num_cpus, num_gpus=args.num_gpus,
            actors={s: getattr(args, f"{s}_actors") for s in STAGES},
            gpus_per_actor={s: getattr(args, f"{s}_gpus") for s in STAGES},
            cpus_per_actor=args.cpus_per_actor,
            batch_sizes={s: getattr(args, f"{s}_batch_size") for s in STAGES},
            shard_size=args.shard_size, shard_seconds=args.shard_seconds,
            block_size=args.block_size, retries=args.retries,
            settings=settings)
    except (UserError, OSError, KeyboardInterrupt) as exc:
        return cli_failure(prog, exc, interrupted="interrupted (finished shards are kept; "
                           "run again to continue)")
    failed = (f", {summary['failed']} failed (see {summary['failures_file']})"
              if summary["failed"] else "")
    print(f"captioned {summary['captioned']} of {summary['images']} images into "
          f"{summary['out_dir']} ({summary['already_done']} done before{failed}); "
          "import them with\n"
          f"  python main.py --import-parquet {summary['out_dir']}")
    return 1 if summary["failed"] else 0


if __name__ == "__main__":
    # Run the importable module's main, not this __main__ copy: Ray pickles the stage
    # classes by module name, and workers can import scale.caption_collection only.
    from scale.caption_collection import main as cli
    sys.exit(cli())
