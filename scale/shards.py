"""The output of scale/caption_collection.py, and its import into the databases.

OUT_DIR/
  manifest.json                       what made the shards (below); a resumed job must match it
  shards/part-<run>-<n>.parquet       one row per captioned image, SCHEMA
  failures/<run>.jsonl                one line per image that failed:
                                      {"id", "path", "error", "run", "time"}
  .lock                               held by the job writing OUT_DIR

Shard columns: id (string: the file's path relative to the job's root), path
(string: absolute path or URI), image_embedding (list<float32>, CLIP, unit
length), caption (string), caption_embedding (list<float32>, unit length),
neighbours (list<struct<id: string, score: float32>>: the memory images
whose captions were in the prompt, best first). Each shard's key-value
metadata "recap" names the three models, as manifest.json does:
{"format": "recap-scale-captions", "version": 1,
 "models": {"clip", "vlm", "caption"}, "settings": {...the settings that change a caption},
 "retrieval": bool, "memory": {"policy", "db_dir", "rows", "digest"}, "root", "runs": [...]}.

A shard is written to a hidden temporary file, fsynced and renamed: a killed
job leaves complete shards only (and perhaps a hidden temporary file, which
readers ignore and the next job deletes). The ids of the shards are the ids
that are done; every other id is (re)done by the next job. A shard is written
every SHARD_SIZE finished images or SHARD_SECONDS after the oldest finished image
not yet in a shard, whichever comes first, so a stopped job loses at most its
last SHARD_SECONDS of finished work (plus the images Ray was still working on).

Nothing here imports Ray or torch; pyarrow is imported where it is used.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

import config
from errors import UserError

log = logging.getLogger(__name__)

FORMAT = "recap-scale-captions"
VERSION = 1
MANIFEST = "manifest.json"
SHARDS = "shards"
FAILURES = "failures"
LOCK = ".lock"
METADATA_KEY = b"recap"
# Images per shard at most (--shard-size): a shard is written as soon as this many
# images are finished ...
SHARD_SIZE = 500
# ... or this many seconds after the oldest finished image not yet in a shard
# (--shard-seconds), whichever comes first: what a stopped job can lose.
SHARD_SECONDS = 60.0
# Rows per journaled database write when importing (about 15 MB of journal for
# 512-d image and 768-d caption vectors).
IMPORT_ROWS = 1000


def schema():
    """The shards' Arrow schema."""
    import pyarrow as pa
    return pa.schema([
        ("id", pa.string()), ("path", pa.string()),
        ("image_embedding", pa.list_(pa.float32())), ("caption", pa.string()),
        ("caption_embedding", pa.list_(pa.float32())),
        ("neighbours", pa.list_(pa.struct([("id", pa.string()), ("score", pa.float32())]))),
    ])


def now() -> str:
    return datetime.now(timezone.utc).astimezone().isoformat(timespec="seconds")


def new_run_id() -> str:
    """Unique per job: shards and failure files of different jobs never collide."""
    return f"{datetime.now(timezone.utc):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:8]}"


# --- reading -------------------------------------------------------------------------

def shard_paths(out_dir: str | os.PathLike) -> list[Path]:
    """The complete shards of `out_dir`, in name order (temporary files excluded)."""
    folder = Path(out_dir) / SHARDS
    return sorted(folder.glob("part-*.parquet")) if folder.is_dir() else []


def iter_shards(out_dir: str | os.PathLike, columns: list[str] | None = None
                ) -> Iterator[tuple[Path, Any]]:
    """(path, pyarrow.Table) of each shard, one at a time (memory: one shard)."""
    for path in shard_paths(out_dir):
        yield path, read_shard(path, columns)


def read_shard(path: Path, columns: list[str] | None = None):
    import pyarrow.parquet as pq
    try:
        return pq.read_table(path, columns=columns)
    except (OSError, ValueError) as exc:  # pyarrow's errors are OSError/ValueError subclasses
        raise UserError(f"shard {path} is unreadable ({exc}); move it away and run the "
                        "job again to redo its images") from None


def written_ids(out_dir: str | os.PathLike) -> set[str]:
    """Ids of every image in the shards of `out_dir`."""
    ids: set[str] = set()
    for _, table in iter_shards(out_dir, columns=["id"]):
        ids.update(table.column("id").to_pylist())
    return ids


def shard_models(path: str | os.PathLike) -> dict[str, str]:
    """The model names recorded in a shard's metadata."""
    import pyarrow.parquet as pq
    meta = pq.read_schema(path).metadata or {}
    return json.loads(meta.get(METADATA_KEY, b"{}")).get("models", {})


def matrix(column):
    """A list<float32> column of equal-length rows as an (N, D) float32 array."""
    import numpy as np
    array = column.combine_chunks() if hasattr(column, "combine_chunks") else column
    if len(array) == 0:
        return np.zeros((0, 0), np.float32)
    values = array.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    return values.reshape(len(array), -1)


def read_manifest(out_dir: str | os.PathLike) -> dict[str, Any] | None:
    path = Path(out_dir) / MANIFEST
    if not path.exists():
        return None
    try:
        manifest = json.loads(path.read_text())
        if manifest.get("format") != FORMAT:
            raise ValueError(f"not a {FORMAT} manifest")
    except (OSError, ValueError) as exc:
        raise UserError(f"{path} is unreadable ({exc}); move {out_dir} away or repair the "
                        "file") from None
    return manifest


def read_failures(out_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """Every failure recorded in `out_dir` (a line cut short by a kill is skipped)."""
    records = []
    for path in sorted((Path(out_dir) / FAILURES).glob("*.jsonl")):
        for line in path.read_text().splitlines():
            with contextlib.suppress(ValueError):
                records.append(json.loads(line))
    return records


# --- writing ---------------------------------------------------------------------------

@contextlib.contextmanager
def locked(out_dir: Path) -> Iterator[None]:
    """Hold OUT_DIR/.lock, or UserError if another job holds it."""
    from filelock import FileLock, Timeout
    lock = FileLock(str(out_dir / LOCK), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise UserError(f"another job is writing to {out_dir} (it holds {out_dir / LOCK}); "
                        "wait for it to finish or choose another --out") from None
    try:
        yield
    finally:
        lock.release()


def start_manifest(out_dir: Path, wanted: dict[str, Any], run: str) -> dict[str, Any]:
    """Write the manifest of a new OUT_DIR, or check that a resumed job matches it."""
    from atomic_files import write_json_atomic
    manifest = read_manifest(out_dir)
    if manifest is None:
        manifest = {"format": FORMAT, "version": VERSION, **wanted, "created": now(),
                    "runs": []}
    else:
        config.check_same_results(manifest.get("settings", {}), wanted["settings"],
                                  f"{out_dir} was started",
                                  "resume it with the same settings or choose another --out")
        for key in ("models", "retrieval", "root"):
            was, want = manifest.get(key), wanted[key]
            if isinstance(want, dict):
                differ = next((k for k in want if was.get(k) != want[k]), None)
                if differ is not None:
                    raise UserError(f"{out_dir} was started with {key} {differ}="
                                    f"{was.get(differ)!r}, "
                                    f"not {want[differ]!r}; resume it with the same settings "
                                    "or choose another --out")
            elif was != want:
                hint = ("pass --root " + str(was) if key == "root" else
                        "run it with --no-retrieval" if was is False else
                        "run it without --no-retrieval")
                raise UserError(f"{out_dir} was started with {key} {was!r}, not {want!r}; "
                                f"{hint}, or choose another --out")
        memory, was = wanted["memory"], manifest.get("memory", {})
        if memory.get("digest") != was.get("digest"):
            raise UserError(f"the memory the prompts retrieve from changed since {out_dir} was "
                            f"started ({was.get('rows')} images in {was.get('db_dir')} then, "
                            f"{memory.get('rows')} in {memory.get('db_dir')} now); captions "
                            "would not be comparable: choose another --out")
    manifest["runs"].append({"run": run, "started": now(), "finished": None})
    write_json_atomic(out_dir / MANIFEST, manifest)
    return manifest


def finish_manifest(out_dir: Path, manifest: dict[str, Any], counts: dict[str, int]) -> None:
    from atomic_files import write_json_atomic
    manifest["runs"][-1].update(finished=now(), **counts)
    write_json_atomic(out_dir / MANIFEST, manifest)


def remove_temporary_files(out_dir: Path) -> int:
    """Delete the temporary shard files a killed job left (call under the lock)."""
    removed = 0
    for path in (out_dir / SHARDS).glob(".part-*.tmp"):
        path.unlink(missing_ok=True)
        removed += 1
    if removed:
        log.info("removed %d unfinished shard file(s) a stopped job left in %s", removed,
                 out_dir / SHARDS)
    return removed


class ShardWriter:
    """Collects finished rows and writes them as shards: every `shard_size` rows, and
    whatever is buffered once its oldest row has waited `seconds` (checked by a
    background thread, so rows never wait for the next batch to arrive).

    Thread-safe; `close` (or `flush`) writes what is left."""

    def __init__(self, out_dir: Path, run: str, shard_size: int, models: dict[str, str],
                 seconds: float | None = SHARD_SECONDS):
        self.folder = out_dir / SHARDS
        self.folder.mkdir(parents=True, exist_ok=True)
        self.run, self.shard_size, self.seconds = run, shard_size, seconds
        self.metadata = {METADATA_KEY: json.dumps({"models": models, "run": run}).encode()}
        self.pending: list[Any] = []
        self.rows = 0          # buffered
        self.written = 0       # rows in shards
        self.shards: list[Path] = []
        self._oldest: float | None = None     # time.monotonic() the oldest buffered row came
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._timer = None
        if seconds:
            self._timer = threading.Thread(target=self._flush_when_due, daemon=True,
                                           name="shard-timer")
            self._timer.start()

    def add(self, table) -> None:
        if not table.num_rows:
            return
        with self._lock:
            self.pending.append(table.select(schema().names).cast(schema()))
            self.rows += table.num_rows
            if self._oldest is None:
                self._oldest = time.monotonic()
            while self.rows >= self.shard_size:
                self._flush(self.shard_size)

    def flush(self) -> None:
        """Write every buffered row now."""
        with self._lock:
            if self.rows:
                self._flush(self.rows)

    def close(self) -> None:
        self._closed.set()
        if self._timer is not None and self._timer is not threading.current_thread():
            self._timer.join()
        self.flush()

    def _flush_when_due(self) -> None:
        tick = min(1.0, self.seconds / 4)
        while not self._closed.wait(tick):
            with self._lock:
                if self.rows and time.monotonic() - self._oldest >= self.seconds:
                    self._flush(self.rows)

    def _flush(self, rows: int) -> None:
        """Write the first `rows` buffered rows as one shard (call under the lock)."""
        import pyarrow as pa
        table = pa.concat_tables(self.pending)
        self.pending = [table.slice(rows)] if table.num_rows > rows else []
        self.rows = table.num_rows - rows
        # a remainder is only left by `add`, and came with the table it just added
        self._oldest = time.monotonic() if self.rows else None
        path = self.folder / f"part-{self.run}-{len(self.shards):05d}.parquet"
        write_table_atomic(table.slice(0, rows).replace_schema_metadata(self.metadata), path)
        self.shards.append(path)
        self.written += rows
        log.info("wrote %s (%d images, %d in this job so far)", path.name, rows, self.written)


def write_table_atomic(table, path: Path) -> None:
    """A Parquet file that appears complete or not at all (temp file, fsync, rename)."""
    import pyarrow.parquet as pq

    from atomic_files import atomic_writer
    with atomic_writer(path) as f:
        pq.write_table(table, f)


class FailureLog:
    """OUT_DIR/failures/<run>.jsonl: one line per image that failed, flushed at once."""

    def __init__(self, out_dir: Path, run: str):
        self.path = out_dir / FAILURES / f"{run}.jsonl"
        self.run = run
        self.count = 0

    def add(self, ids: list[str], paths: list[str], errors: list[str]) -> None:
        if not ids:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            for image_id, path, error in zip(ids, paths, errors):
                log.warning("failed: %s: %s", image_id, error)
                f.write(json.dumps({"id": image_id, "path": path, "error": error,
                                    "run": self.run, "time": now()}) + "\n")
            f.flush()
        self.count += len(ids)


# --- import into the databases -----------------------------------------------------------

def import_parquet(out_dir: str | os.PathLike, db_dir: str | os.PathLike,
                   clip_model: str, caption_model: str) -> dict[str, Any]:
    """Add the images and captions of `out_dir`'s shards to the databases in `db_dir`
    (`python main.py --import-parquet OUT_DIR`).

    Each image is keyed by its path (absolute path or URI), kind "imported"; its
    caption is a generated caption of the VLM that wrote it, with "imported_from"
    naming `out_dir`. Rows go in IMPORT_ROWS at a time, each batch one journaled
    write (DbManager.add_images): an interrupted import leaves whole batches,
    and importing again adds only what is missing. `clip_model` and
    `caption_model` are the settings the databases are used with; they, the
    databases and the shards must name the same models.
    """
    from tqdm.auto import tqdm

    from db_manager import DbManager, generated_caption_entry

    out = Path(out_dir).expanduser()
    if not out.is_dir():
        raise UserError(f"--import-parquet: no such folder {out_dir}")
    manifest = read_manifest(out)
    if manifest is None:
        raise UserError(f"{out_dir} is not an output folder of scale.caption_collection "
                        f"(no {MANIFEST})")
    paths = shard_paths(out)
    if not paths:
        raise UserError(f"{out_dir} holds no shards yet: run scale.caption_collection first")
    db = DbManager.open(db_dir)
    if db.needs_seed:
        raise UserError(f"no database in {db_dir}: run `python main.py` first (it builds the "
                        "memory), then import")
    db.check_models(clip_model=clip_model, caption_model=caption_model)
    models = manifest["models"]
    for what, option, ours, key in (
            ("CLIP model", "--clip-model-name", db.state.clip_model, "clip"),
            ("caption model", "--caption-embedding-model", db.state.caption_model, "caption")):
        if models[key] != ours:
            raise UserError(f"{out_dir} was made with {what} {models[key]!r} but the database "
                            f"{db_dir} holds {ours!r} embeddings; import it into a database of "
                            f"the same models (--db-dir), or caption the collection again with "
                            f"{option} {ours}")
    vlm, source = models["vlm"], str(out.resolve())
    rows = images_added = captions_added = 0
    for path in tqdm(paths, desc="importing shards", unit="shard", disable=len(paths) < 2):
        found = shard_models(path)
        if found and found != models:
            raise UserError(f"shard {path} was made with other models ({found}) than "
                            f"{out / MANIFEST} names ({models}); move it away")
        table = read_shard(path, ["path", "image_embedding", "caption", "caption_embedding"])
        for start in range(0, table.num_rows, IMPORT_ROWS):
            part = table.slice(start, IMPORT_ROWS)
            image_ids = part.column("path").to_pylist()
            stamp = now()
            captions = [generated_caption_entry(image_id, caption, vlm, stamp,
                                                imported_from=source)
                        for image_id, caption in zip(image_ids, part.column("caption").to_pylist())]
            added = db.add_images(image_ids, matrix(part.column("image_embedding")), captions,
                                  matrix(part.column("caption_embedding")), kind="imported")
            images_added += added[0]
            captions_added += added[1]
            rows += part.num_rows
    return {"out_dir": str(out), "database": str(db.db_dir), "shards": len(paths), "rows": rows,
            "images_added": images_added, "captions_added": captions_added,
            "already_present": rows - captions_added}

