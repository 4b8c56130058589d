"""The databases' files: names, the committed state, and reading them back.

DB_DIR holds the three JSON files users see (see db_manager.py) and the
working copy DB_DIR/.recap/ that commands read instead of parsing them:

  images.jsonl, captions.jsonl   the entries without vectors, one per line
  image_vectors.f32, caption_vectors.f32   the vectors, raw float32 rows (mapped)
  caption_slots.i64   per caption row, where its entry starts in captions.json,
                      caption_embeddings.json (-1: no vector yet) and captions.jsonl
                      (3 int64), so that a rerun rewrites one entry in place
                      (db_journal.py)
  state.json          the last commit: a DbState
  journal.jsonl       the write in progress, if any

Caption rows without a vector (human captions not embedded yet: DbState.unembedded)
have a zero row in caption_vectors.f32 and no entry in caption_embeddings.json;
an embedding write appends their entries there and fills their rows in place.

A generated caption's entries are followed by spaces (valid JSON whitespace)
so that a rerun's caption and vector usually fit where the old ones were.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import orjson

from atomic_files import dumps
from errors import UserError

IMAGE_DB = "image_embeddings.json"
CAPTION_DB = "captions.json"
CAPTION_EMBEDDING_DB = "caption_embeddings.json"
FILES = (IMAGE_DB, CAPTION_DB, CAPTION_EMBEDDING_DB)
FORMATS = ((IMAGE_DB, "recap-image-embeddings"), (CAPTION_DB, "recap-captions"),
           (CAPTION_EMBEDDING_DB, "recap-caption-embeddings"))
VERSION = 1

WORK = ".recap"
NEW_WORK = ".recap-new"
LOCK = ".recap.lock"
STATE = "state.json"
JOURNAL = "journal.jsonl"
IMAGE_META = "images.jsonl"
CAPTION_META = "captions.jsonl"
IMAGE_VECTORS = "image_vectors.f32"
CAPTION_VECTORS = "caption_vectors.f32"
CAPTION_SLOTS = "caption_slots.i64"
TAIL = b"\n]}\n"
REPAIR = "run `python main.py --repair-db`, or restore the file from a backup"

# Files that grow by appending, relative to DB_DIR; state.json records their committed sizes.
IMAGE_TEXT = (IMAGE_DB, f"{WORK}/{IMAGE_META}")
CAPTION_TEXT = (CAPTION_DB, CAPTION_EMBEDDING_DB, f"{WORK}/{CAPTION_META}")
# The files caption_slots.i64 points into, in its column order.
SLOT_FILES = (CAPTION_DB, CAPTION_EMBEDDING_DB, f"{WORK}/{CAPTION_META}")


@dataclass(frozen=True)
class DbIdentity:
    """What a database must have been built with to be used with these settings."""

    clip_model: str
    caption_model: str
    dataset: str
    split: str
    # Recorded so that search and import can reopen the data set from the database
    # alone (memory.for_database); None for databases made before they were recorded.
    random_seed: int | None = None
    experiment_samples: int | None = None
    # The caption model's prompts (caption_embedder.TextPrompts, resolved): recorded by
    # a new database and checked like the models; None: not checked. Databases made
    # before they were recorded have captions without a document prompt
    # (memory.for_database fills CAPTION_DOCUMENT_PROMPT "" for them).
    query_prompt: str | None = None
    document_prompt: str | None = None
    # SPLIT and MEMORY_DATASET (a local one by its absolute path), recorded like the seed
    # (last, so that positional DbIdentity(...) calls keep their meaning)
    split_name: str | None = None
    memory_dataset: str | None = None


# Caption prompts, in state.json and the caption_embeddings.json header (when recorded).
PROMPT_FIELDS = ("query_prompt", "document_prompt")


@dataclass(frozen=True)
class DbState:
    """The last committed write (state.json): models, dimensions, row counts and the
    committed byte length of every appended file."""

    clip_model: str
    caption_model: str
    dataset: str
    split: str
    image_dim: int
    caption_dim: int
    images: int = 0
    captions: int = 0
    seq: int = 0       # one more per committed write
    epoch: int = 0     # one more per write that changed rows in place (others reload)
    origin: str = "seed"
    bytes: Mapping[str, int] = field(default_factory=dict)
    version: int = VERSION
    random_seed: int | None = None          # the split's settings, when recorded
    experiment_samples: int | None = None
    query_prompt: str | None = None         # the caption model's prompts, when recorded
    document_prompt: str | None = None
    # Caption rows with no vector yet, as [start, end) ranges (human captions are
    # embedded when something first needs them); () for every database before.
    unembedded: tuple[tuple[int, int], ...] = ()
    split_name: str | None = None           # SPLIT and MEMORY_DATASET, when recorded
    memory_dataset: str | None = None
    # Per JSON file, what the last save left (see `seal`): {"stat": [size, mtime_ns,
    # ctime_ns, inode], "crc": one CRC-32 per SEAL_BLOCK bytes, as hex}; {} for
    # databases from before, sealed at their first open.
    seals: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    def but(self, **changes: Any) -> "DbState":
        """A copy with `changes`."""
        return dataclasses.replace(self, **changes)

    def to_json(self) -> bytes:
        return dumps({**dataclasses.asdict(self), "bytes": dict(self.bytes),
                      "seals": {k: dict(v) for k, v in self.seals.items()}}, indent=True)

    @property
    def embedded(self) -> int:
        """Caption rows that have a vector (entries in caption_embeddings.json)."""
        return self.captions - sum(end - start for start, end in self.unembedded)

    def missing_rows(self) -> list[int]:
        """The caption rows without a vector, in order."""
        return [row for start, end in self.unembedded for row in range(start, end)]

    def vector_bytes(self) -> dict[str, int]:
        """Committed sizes of the working copy's fixed-width files."""
        return {IMAGE_VECTORS: self.images * self.image_dim * 4,
                CAPTION_VECTORS: self.captions * self.caption_dim * 4,
                CAPTION_SLOTS: self.captions * 8 * len(SLOT_FILES)}


def as_ranges(rows) -> tuple[tuple[int, int], ...]:
    """Sorted row numbers as [start, end) ranges: [0, 1, 2, 5] -> ((0, 3), (5, 6))."""
    ranges: list[list[int]] = []
    for row in sorted(int(r) for r in rows):
        if ranges and ranges[-1][1] == row:
            ranges[-1][1] += 1
        elif not ranges or ranges[-1][1] < row:
            ranges.append([row, row + 1])
    return tuple((start, end) for start, end in ranges)


def generated_caption_id(image_id: str, vlm_model: str) -> str:
    return f"{image_id}#gen:{vlm_model}"


def generated_caption_entry(image_id: str, caption: str, vlm_model: str, timestamp: str,
                            experiment_index: int | None = None, **more: Any) -> dict[str, Any]:
    """captions.json's entry of a generated caption: an experiment's (with its index),
    a captioned folder's or the web page's, or an imported one (`more`: imported_from)."""
    entry = {"id": generated_caption_id(image_id, vlm_model), "image_id": image_id,
             "caption": caption, "source": "generated", "model": vlm_model}
    if experiment_index is not None:
        entry["experiment_index"] = experiment_index
    return {**entry, **more, "timestamp": timestamp}


def read_state(path: Path) -> DbState:
    try:
        raw = orjson.loads(path.read_bytes())
        names = {f.name for f in dataclasses.fields(DbState)}
        state = DbState(**{k: v for k, v in raw.items() if k in names})
        ranges = tuple((int(a), int(b)) for a, b in state.unembedded)
        if any(not 0 <= a < b <= state.captions for a, b in ranges):
            raise TypeError("unembedded")
        state = state.but(unembedded=ranges)
        for key in ("seq", "epoch", "images", "captions", "image_dim", "caption_dim"):
            if not isinstance(getattr(state, key), int):
                raise TypeError(key)
        for name in FILES + (f"{WORK}/{IMAGE_META}", f"{WORK}/{CAPTION_META}"):
            if not isinstance(state.bytes[name], int):
                raise TypeError(name)
    except FileNotFoundError:
        raise UserError(f"{path} is missing; {REPAIR}") from None
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise UserError(f"{path} is damaged ({type(exc).__name__}: {exc}); {REPAIR}") from None
    return state


def headers(state: DbState) -> dict[str, dict[str, Any]]:
    """The JSON files' fields before "entries"."""
    return {
        IMAGE_DB: {"format": "recap-image-embeddings", "version": VERSION,
                   "model": state.clip_model, "dim": state.image_dim, "dataset": state.dataset,
                   "split": state.split},
        CAPTION_DB: {"format": "recap-captions", "version": VERSION, "dataset": state.dataset,
                     "split": state.split},
        CAPTION_EMBEDDING_DB: {"format": "recap-caption-embeddings", "version": VERSION,
                               "model": state.caption_model, "dim": state.caption_dim,
                               **{k: getattr(state, k) for k in PROMPT_FIELDS
                                  if getattr(state, k) is not None}},
    }


def json_head(header: dict[str, Any]) -> bytes:
    """A JSON file's bytes before its first entry."""
    return dumps(header)[:-1] + b',"entries":['


def image_entry(image: dict[str, Any], vector: np.ndarray) -> bytes:
    return dumps({**image, "embedding": vector})


def caption_entry(caption: dict[str, Any]) -> bytes:
    """A caption's entry in captions.json and its line in captions.jsonl (the same bytes)."""
    return padded(dumps(caption), caption)


def caption_vector_entry(caption: dict[str, Any], vector: np.ndarray) -> bytes:
    return padded(dumps({"id": caption["id"], "image_id": caption["image_id"],
                         "embedding": vector}), caption)


def padded(entry: bytes, caption: dict[str, Any]) -> bytes:
    """Room after a generated caption's entry for a longer one from a rerun."""
    if caption.get("source") != "generated":
        return entry
    return entry + b" " * max(192, len(entry) // 8)


def read_jsonl(path: Path, start: int, end: int) -> list[dict[str, Any]]:
    try:
        with open(path, "rb") as f:
            f.seek(start)
            blob = f.read(end - start)
        if len(blob) != end - start:
            raise ValueError("file is shorter than committed")
        # One parse of the lines as a JSON array: 3x faster than a parse per line at
        # COCO's 566,747 captions (a line holds no raw newline: JSON escapes it).
        body = blob.rstrip(b"\n").replace(b"\n", b",")
        return orjson.loads(b"[" + body + b"]")
    except (OSError, ValueError) as exc:
        raise UserError(f"working copy file {path} is damaged ({exc}); {REPAIR}") from None


def map_vectors(path: Path, rows: int, dim: int) -> np.ndarray:
    if rows == 0:
        return np.zeros((0, dim), dtype=np.float32)
    need = rows * dim * 4
    if not path.exists() or path.stat().st_size < need:
        raise UserError(f"vector file {path} is shorter than its {rows} rows; {REPAIR}")
    # A plain ndarray view of the map: numpy code and orjson treat it like any array.
    # The map is shared: a row rewritten in place shows here too.
    return np.memmap(path, dtype=np.float32, mode="r", shape=(rows, dim)).view(np.ndarray)


def new_rows(db_dir: Path, old: DbState | None, new: DbState, captions: bool = True
             ) -> tuple[list[dict], list[dict]]:
    """The image entries and caption entries committed after `old` (all, if None);
    `captions=False`: the image entries only (the captions are read when needed)."""
    work = db_dir / WORK
    start = old.bytes if old is not None else {}
    images = read_jsonl(work / IMAGE_META, start.get(f"{WORK}/{IMAGE_META}", 0),
                        new.bytes[f"{WORK}/{IMAGE_META}"])
    if len(images) != new.images - (old.images if old else 0):
        raise UserError(f"the working copy in {work} does not match its state; {REPAIR}")
    return images, read_caption_rows(db_dir, old, new) if captions else []


def read_caption_rows(db_dir: Path, old: DbState | None, new: DbState) -> list[dict]:
    """The caption entries committed after `old` (all, if None)."""
    work = db_dir / WORK
    start = old.bytes if old is not None else {}
    captions = read_jsonl(work / CAPTION_META, start.get(f"{WORK}/{CAPTION_META}", 0),
                          new.bytes[f"{WORK}/{CAPTION_META}"])
    if len(captions) != new.captions - (old.captions if old else 0):
        raise UserError(f"the working copy in {work} does not match its state; {REPAIR}")
    return captions


def check_json_end(path: Path, size: int) -> None:
    """Cheap check that a JSON file has the size and closing bytes the last commit left."""
    try:
        actual = path.stat().st_size
        with open(path, "rb") as f:
            f.seek(max(0, size - len(TAIL)))
            end = f.read(len(TAIL))
    except FileNotFoundError:
        raise UserError(f"database file {path} is missing; {REPAIR}") from None
    if actual != size or end != TAIL:
        raise UserError(f"database file {path} is corrupt or was changed by another program "
                        f"({actual} bytes, the last save left {size}); {REPAIR}")


# --- seals: is each JSON file exactly as the last save left it? -----------------------------
# A save records each JSON file's stat (size, mtime, ctime, inode) and a CRC-32 of
# every SEAL_BLOCK bytes, updating only the blocks it wrote. A start compares the
# stat only (no reading); when it differs (the file was touched, or the folder
# copied) the CRCs decide, and a match re-records the stat.

SEAL_BLOCK = 1 << 20
# The file clock's tick (Linux: CLOCK_REALTIME_COARSE); a save waits until it has
# passed, so that any later change gives the file another mtime/ctime.
_TICK_NS = int(time.clock_getres(5) * 1e9) if sys.platform == "linux" else 20_000_000


def _stat(path: Path) -> list[int]:
    st = os.stat(path)
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


def _crcs(path: Path, blocks: list[int] | None = None) -> dict[int, str]:
    """CRC-32 (8 hex digits) of SEAL_BLOCK-sized blocks of `path` (all if None)."""
    out: dict[int, str] = {}
    with open(path, "rb") as f:
        if blocks is None:
            while chunk := f.read(SEAL_BLOCK):
                out[len(out)] = "%08x" % zlib.crc32(chunk)
            return out
        for n in blocks:
            f.seek(n * SEAL_BLOCK)
            out[n] = "%08x" % zlib.crc32(f.read(SEAL_BLOCK))
    return out


def seal(path: Path, old: Mapping[str, Any] | None = None,
         changed: list[tuple[int, int]] | None = None) -> dict[str, Any]:
    """What a save left in `path`: its stat and block CRCs. With the `old` seal and
    the byte ranges [start, end) written since (None: unknown), only the blocks
    those touch, and any beyond the old end, are read again."""
    stat = _stat(path)
    count = -(-stat[0] // SEAL_BLOCK)
    if old is None or changed is None or "crc" not in old:
        crc = "".join(_crcs(path).values())
    else:
        blocks = [old["crc"][8 * n:8 * n + 8] for n in range(min(count, len(old["crc"]) // 8))]
        stale = {n for start, end in changed
                 for n in range(start // SEAL_BLOCK, -(-end // SEAL_BLOCK))}
        stale |= set(range(max(0, -(-old["stat"][0] // SEAL_BLOCK) - 1), count))
        for n, value in _crcs(path, sorted(b for b in stale if b < count)).items():
            if n < len(blocks):
                blocks[n] = value
            else:  # past the old end: blocks come in order
                blocks.append(value)
        crc = "".join(blocks)
    return {"stat": stat, "crc": crc}


def settle(state: DbState) -> None:
    """Wait, after a save, until the file clock has ticked past the times its seals
    record (at most two ticks, usually not at all: the commit's fsyncs take longer),
    so that a change made after the save returns cannot leave the same mtime and
    ctime behind, however few bytes it changes."""
    newest = max((max(s["stat"][1], s["stat"][2]) for s in state.seals.values()), default=0)
    wait = newest + 2 * _TICK_NS - time.time_ns()
    if wait > 0:
        time.sleep(wait / 1e9)


def check_seals(db_dir: Path, state: DbState) -> DbState | None:
    """UserError (one line) unless every JSON file is exactly as the last save left
    it. Reads nothing while a file's stat is the recorded one; else compares the
    block CRCs. Returns the state with fresh seals to record when some had to be
    re-made (a copied folder, a touched file, a database sealed by no save yet),
    else None."""
    fresh = dict(state.seals)
    for name in FILES:
        path = db_dir / name
        check_json_end(path, state.bytes[name])
        old = state.seals.get(name)
        if old is not None and _stat(path) == list(old["stat"]):
            continue
        now = seal(path)
        if old is not None and now["crc"] != old["crc"]:
            raise UserError(f"database file {path} was changed by another program since the "
                            f"last save (same size, other bytes); {REPAIR}")
        fresh[name] = now
    return state.but(seals=fresh) if fresh != dict(state.seals) else None


def as_vectors(x: np.ndarray, rows: int) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    if x.ndim == 1:
        x = x[None]
    if x.shape[0] != rows:
        raise ValueError(f"expected {rows} vectors, got {x.shape[0]}")
    if not np.isfinite(x).all():
        raise ValueError("vectors contain NaN or inf")
    return np.ascontiguousarray(x)


def check_dim(vector: np.ndarray, dim: int, name: str) -> None:
    if vector.shape[0] != dim:
        raise UserError(f"{name} holds {dim}-d vectors, got a {vector.shape[0]}-d one")


def check_unique(path: Path, ids: list[str]) -> None:
    seen: set[str] = set()
    for i in ids:
        if i in seen:
            raise UserError(f"database file {path} has duplicate id {i!r}")
        seen.add(i)


def path_of(db_dir: Path, name: str) -> Path:
    """A file named relative to DB_DIR (as in DbState.bytes) or to the working copy."""
    return db_dir / name if name in FILES or name.startswith(WORK) else db_dir / WORK / name


__all__ = ["DbIdentity", "DbState", "as_ranges", "FILES", "IMAGE_DB", "CAPTION_DB", "CAPTION_EMBEDDING_DB",
           "generated_caption_id", "read_state", "headers", "new_rows", "read_caption_rows",
           "map_vectors", "check_json_end", "seal", "settle", "check_seals", "SEAL_BLOCK"]
