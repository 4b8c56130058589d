"""The three JSON databases: the pipeline's memory. The only code that writes them.

What users see in DB_DIR (plain JSON, one entry per line, `json.load`-able
whenever no command is running):

image_embeddings.json
    {"format": "recap-image-embeddings", "version": 1, "model": CLIP name, "dim": D,
     "dataset": name, "split": fingerprint,
     "entries": [{"image_id", "kind": "train" | "experiment", "embedding": [D floats]}]}
captions.json
    {"format": "recap-captions", "version": 1, "dataset": name, "split": fingerprint,
     "entries": [{"id", "image_id", "caption", "source": "human"},
                 {"id", "image_id", "caption", "source": "generated", "model": VLM name,
                  "experiment_index", "timestamp"}]}
caption_embeddings.json
    {"format": "recap-caption-embeddings", "version": 1, "model": embedder name, "dim": D,
     "query_prompt", "document_prompt" (the text put before queries and captions;
     absent in databases made before they were recorded),
     "entries": [{"id" (same order as captions.json), "image_id", "embedding": [D floats]}]}

Keys: one image embedding per image id (the CLIP model is fixed per database);
one generated caption per (image id, VLM model), id "IMAGE#gen:MODEL", so
re-running an experiment with the same model replaces its entry and another
model adds its own. Human captions have ids "IMAGE#N".

Working copy (DB_DIR/.recap/), so that no command parses or rewrites the big
JSON files: the vectors as raw float32 rows (`image_vectors.f32`,
`caption_vectors.f32`, memory-mapped), the entries without vectors
(`images.jsonl`, `captions.jsonl`), `state.json` (the committed byte length
of every appended file, row counts, models, a sequence number) and
`journal.jsonl`.

Appending one experiment (under the lock DB_DIR/.recap.lock, held only for
this read-merge-write):
  1. merge what other processes committed since we loaded (new rows only);
  2. write the experiment's three entries as one checksummed line to the
     journal and fsync it: from here on the experiment is durable;
  3. append to the JSON files in place (the closing "]}" is overwritten by
     ",<entry>]}"), to the sidecars and the vector files, fsync each;
  4. commit: write state.json atomically (temp file, fsync, rename, fsync dir);
  5. empty the journal.
A crash before 2 leaves nothing; after 2, the next start (or --repair-db)
cuts every file back to the committed lengths of state.json and re-applies
the journal line, so the three databases get all three entries or none.
A torn journal line (crash during 2) was never acknowledged and is dropped.
`add_images` appends many images and captions the same way as one journal
line (one write, all rows or none; rows already stored are skipped): how
`main.py --import-parquet` brings in the output of scale/caption_collection.py.
Errors during 2-4 (disk full, Ctrl-C) roll every file back to its committed
length. Replacing a generated caption rewrites the two caption files whole
(temp file + rename), the only write whose cost grows with the database.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import zlib
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import orjson

from errors import UserError

log = logging.getLogger(__name__)

IMAGE_DB = "image_embeddings.json"
CAPTION_DB = "captions.json"
CAPTION_EMBEDDING_DB = "caption_embeddings.json"
FILES = (IMAGE_DB, CAPTION_DB, CAPTION_EMBEDDING_DB)
_FORMATS = ((IMAGE_DB, "recap-image-embeddings"), (CAPTION_DB, "recap-captions"),
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
TAIL = b"\n]}\n"
LOCK_TIMEOUT = 600.0
REPAIR = "run `python main.py --repair-db`, or restore the file from a backup"

# Files that grow by appending, relative to DB_DIR; state.json records their committed sizes.
IMAGE_TEXT = (IMAGE_DB, f"{WORK}/{IMAGE_META}")
CAPTION_TEXT = (CAPTION_DB, CAPTION_EMBEDDING_DB, f"{WORK}/{CAPTION_META}")
# Caption prompts, in state.json and the caption_embeddings.json header (when recorded).
PROMPT_FIELDS = ("query_prompt", "document_prompt")


@dataclass(frozen=True)
class DbIdentity:
    """What a database must have been built with to be used with these settings."""

    clip_model: str
    caption_model: str
    dataset: str
    split: str
    # Recorded so that search and import can reopen the data set from the database
    # alone; None for databases made before they were recorded.
    random_seed: int | None = None
    experiment_samples: int | None = None
    # The caption model's prompts (caption_embedder.TextPrompts, resolved): recorded by
    # a new database and checked like the models; None: not checked. Databases made
    # before they were recorded have captions without a document prompt
    # (pipeline.for_database fills CAPTION_DOCUMENT_PROMPT "" for them).
    query_prompt: str | None = None
    document_prompt: str | None = None


def generated_caption_id(image_id: str, vlm_model: str) -> str:
    return f"{image_id}#gen:{vlm_model}"


class DbManager:
    """Loads, checks and appends to the three databases in `db_dir`.

    Open with `DbManager.open(db_dir, identity)`; if `needs_seed` is true the
    databases do not exist yet and `seed(...)` creates them. `identity=None`
    accepts a database of any models (for checking and repairing).
    """

    def __init__(self, db_dir: Path, identity: DbIdentity | None):
        self.db_dir = Path(db_dir)
        self.work = self.db_dir / WORK
        self.identity = identity
        # The settings of the initialize_system call that returned it, for callers given
        # only the manager: run_experiment(dataset, db, ...).
        self.settings: Any = None
        self.state: dict[str, Any] = {}
        self.image_ids: list[str] = []
        self.image_kinds: list[str] = []
        self.captions: list[dict[str, Any]] = []
        self.image_vectors = np.zeros((0, 0), dtype=np.float32)
        self.caption_vectors = np.zeros((0, 0), dtype=np.float32)
        self.needs_seed = True
        self.repaired: list[str] = []
        self._image_pos: dict[str, int] = {}
        self._caption_pos: dict[str, int] = {}
        self._by_image: dict[str, list[dict[str, Any]]] | None = None

    # --- opening ---------------------------------------------------------------

    @classmethod
    def open(cls, db_dir: str | os.PathLike, identity: DbIdentity | None = None) -> "DbManager":
        """Load the databases in `db_dir` (finishing an interrupted write first)."""
        db = cls(Path(db_dir), identity)
        if not db.db_dir.exists():
            return db
        if not db.db_dir.is_dir():
            raise UserError(f"--db-dir {db.db_dir} is a file, not a folder")
        with db._locked():
            db._open_locked()
        if not db.needs_seed:
            db._check_identity()
            log.info("database %s: %d images, %d captions", db.db_dir, len(db.image_ids),
                     len(db.captions))
        return db

    def _open_locked(self) -> None:
        if (self.db_dir / NEW_WORK).exists() and not self.work.exists():
            self._clean_interrupted_create()
        if (self.work / STATE).exists():
            self._recover()
            self._load()
            return
        present = [f for f in FILES if (self.db_dir / f).exists()]
        if len(present) == len(FILES):
            self._import_json()
        elif present:
            missing = sorted(set(FILES) - set(present))
            raise UserError(f"database in {self.db_dir} is incomplete: {', '.join(missing)} missing "
                            f"but {', '.join(present)} present; restore the missing file(s) from "
                            "a backup or move the folder away to start a new memory")

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        from filelock import FileLock, Timeout
        try:
            self.db_dir.mkdir(parents=True, exist_ok=True)
            lock = FileLock(str(self.db_dir / LOCK), timeout=LOCK_TIMEOUT)
            lock.acquire()
        except Timeout:
            raise UserError(f"database {self.db_dir} stayed locked by another process for "
                            f"{LOCK_TIMEOUT:.0f} s") from None
        except PermissionError:
            raise UserError(f"database folder {self.db_dir} is not writable") from None
        try:
            yield
        finally:
            lock.release()

    def _check_identity(self) -> None:
        want, state = self.identity, self.state
        if want is None:
            return
        # The data set name is recorded for people, not checked: the same images may
        # be loaded from another folder. The split fingerprint (seed + ids) is checked.
        for field, found, expected, option in (
                ("CLIP model", state["clip_model"], want.clip_model, "--clip-model-name"),
                ("caption model", state["caption_model"], want.caption_model,
                 "--caption-embedding-model"),
                ("split", state["split"], want.split,
                 "--dataset-name / --random-seed / --experiment-samples")):
            if found != expected:
                raise UserError(f"database {self.db_dir} was built with {field} {found!r}, not "
                                f"{expected!r}: use another --db-dir for these settings, or set "
                                f"{option} back")
        if want.query_prompt is not None and want.document_prompt is not None:
            self.check_caption_prompts(want.query_prompt, want.document_prompt)

    @property
    def caption_prompts(self) -> tuple[str, str] | None:
        """(query prompt, document prompt) the captions were embedded with; None for a
        database made before prompts were recorded."""
        query, document = self.state.get("query_prompt"), self.state.get("document_prompt")
        return None if query is None or document is None else (query, document)

    def check_caption_prompts(self, query: str, document: str) -> None:
        """UserError if the database recorded other caption prompts than these. One
        made before they were recorded embedded its captions with no prompt (its query
        prompt was the model's, as now: not checked)."""
        if self.needs_seed:  # nothing embedded yet: the seed records these
            return
        recorded = self.caption_prompts or (None, "")
        for what, found, expected, option in (
                ("document (caption) prompt", recorded[1], document, "--caption-document-prompt"),
                ("query prompt", recorded[0], query, "--caption-query-prompt")):
            if found is not None and found != expected:
                raise UserError(f"database {self.db_dir} was built with the caption model's "
                                f"{what} {found!r}, not {expected!r}: use another --db-dir for "
                                f"these prompts, or set {option} {found!r}")

    # --- reading -----------------------------------------------------------------

    def has_caption(self, caption_id: str) -> bool:
        """Whether a caption with this id (e.g. generated_caption_id(...)) is stored."""
        return caption_id in self._caption_pos

    def captions_of(self, image_id: str) -> list[str]:
        """Human captions of an image; its generated captions if it has none."""
        if self._by_image is None:
            self._by_image = {}
            for entry in self.captions:
                self._by_image.setdefault(entry["image_id"], []).append(entry)
        entries = self._by_image.get(image_id, [])
        human = [c["caption"] for c in entries if c["source"] == "human"]
        return human or [c["caption"] for c in entries]

    def _load(self, state: dict[str, Any] | None = None) -> None:
        """Read the working copy; cheap checks that the JSON files are what state.json says."""
        self.state = state or _read_state(self.work / STATE)
        for name in FILES:
            _check_json_end(self.db_dir / name, self.state["bytes"][name])
        self.image_ids, self.image_kinds = [], []
        self.captions = []
        self._read_new_rows(0, 0, {k: 0 for k in self.state["bytes"]})
        self.needs_seed = False

    def _read_new_rows(self, old_images: int, old_captions: int, old_bytes: dict[str, int]) -> None:
        """Extend the in-memory copy with rows committed after `old_*`."""
        state = self.state
        for entry in _read_jsonl(self.work / IMAGE_META, old_bytes[f"{WORK}/{IMAGE_META}"],
                                 state["bytes"][f"{WORK}/{IMAGE_META}"]):
            self.image_ids.append(entry["image_id"])
            self.image_kinds.append(entry["kind"])
        self.captions.extend(_read_jsonl(self.work / CAPTION_META,
                                         old_bytes[f"{WORK}/{CAPTION_META}"],
                                         state["bytes"][f"{WORK}/{CAPTION_META}"]))
        if len(self.image_ids) != state["images"] or len(self.captions) != state["captions"]:
            raise UserError(f"the working copy in {self.work} does not match its state; {REPAIR}")
        self.image_vectors = _map_vectors(self.work / IMAGE_VECTORS, state["images"],
                                          state["image_dim"])
        self.caption_vectors = _map_vectors(self.work / CAPTION_VECTORS, state["captions"],
                                            state["caption_dim"])
        if old_images == 0 and old_captions == 0:  # a full load
            self._image_pos, self._caption_pos, self._by_image = {}, {}, None
        # Index only the new rows, so an append costs the same at 1k or 100k entries.
        for n in range(old_images, len(self.image_ids)):
            self._image_pos[self.image_ids[n]] = n
        for n in range(old_captions, len(self.captions)):
            entry = self.captions[n]
            self._caption_pos[entry["id"]] = n
            if self._by_image is not None:
                self._by_image.setdefault(entry["image_id"], []).append(entry)

    def _refresh(self) -> None:
        """Merge what other processes committed since we loaded (call under the lock)."""
        on_disk = _read_state(self.work / STATE)
        if on_disk["seq"] == self.state["seq"]:
            return
        if on_disk["epoch"] != self.state["epoch"]:  # a file was rewritten: read it all again
            self._load()
            return
        old = self.state
        self.state = on_disk
        self._read_new_rows(old["images"], old["captions"], old["bytes"])

    # --- writing ------------------------------------------------------------------

    def seed(self, image_ids: Sequence[str], image_vectors: np.ndarray,
             captions: Sequence[dict[str, Any]], caption_vectors: np.ndarray) -> None:
        """Create the databases from the training pool (first run only).

        If another process created them meanwhile, theirs are kept and loaded.
        """
        if not self.needs_seed:
            raise RuntimeError("database already exists")
        kinds = ["train"] * len(image_ids)
        with self._locked():
            self._open_locked()
            if not self.needs_seed:
                log.info("another process created %s meanwhile; using it", self.db_dir)
                self._check_identity()
                return
            self._create(list(image_ids), kinds, image_vectors, [dict(c) for c in captions],
                         caption_vectors, origin="seed")
        log.info("created database %s: %d images, %d captions", self.db_dir,
                 len(self.image_ids), len(self.captions))

    def add_experiment(self, image_id: str, image_vector: np.ndarray, caption: str,
                       caption_vector: np.ndarray, vlm_model: str, experiment_index: int,
                       timestamp: str) -> None:
        """Append an experiment image's embedding and generated caption (or replace the
        caption this VLM gave it before), durably and atomically across the three files."""
        if self.needs_seed:
            raise RuntimeError("seed the database first")
        image_vector = _as_vectors(image_vector, 1)[0]
        caption_vector = _as_vectors(caption_vector, 1)[0]
        entry = {"id": generated_caption_id(image_id, vlm_model), "image_id": image_id,
                 "caption": caption, "source": "generated", "model": vlm_model,
                 "experiment_index": experiment_index, "timestamp": timestamp}
        with self._locked():
            self._recover()
            self._refresh()
            _check_dim(image_vector, self.state["image_dim"], IMAGE_DB)
            _check_dim(caption_vector, self.state["caption_dim"], CAPTION_EMBEDDING_DB)
            record = {"seq": self.state["seq"] + 1,
                      "image": None if image_id in self._image_pos else
                      {"image_id": image_id, "kind": "experiment"},
                      "image_vector": image_vector, "caption": entry,
                      "caption_vector": caption_vector,
                      "replace": self._caption_pos.get(entry["id"])}
            if record["image"] is None:
                record["image_vector"] = None
            self._write_record(record)

    def add_images(self, image_ids: Sequence[str], image_vectors: np.ndarray,
                   captions: Sequence[dict[str, Any]], caption_vectors: np.ndarray,
                   kind: str = "imported") -> tuple[int, int]:
        """Append many images and captions in ONE journaled write: all rows or none
        across the three files, with add_experiment's guarantees (durable once it
        returns, completed or dropped after a crash, rolled back on an error).

        `image_vectors[i]` is image `image_ids[i]`'s embedding; each caption entry
        ({"id", "image_id", "caption", "source", ...}) comes with its row of
        `caption_vectors`, and its image must be stored or in this batch. `kind`
        labels the new images (e.g. "imported"). Images and caption ids already
        stored are left as they are, not replaced, so adding the same rows again
        adds nothing. Returns (images added, captions added).
        """
        if self.needs_seed:
            raise RuntimeError("seed the database first")
        image_vectors = _as_vectors(image_vectors, len(image_ids)) if len(image_ids) else None
        caption_vectors = _as_vectors(caption_vectors, len(captions)) if len(captions) else None
        for n, entry in enumerate(captions):
            if not all(isinstance(entry.get(k), str) for k in ("id", "image_id", "caption",
                                                               "source")):
                raise ValueError(f"caption entry {n} needs string id, image_id, caption, source")
        for what, keys in (("an image id", list(image_ids)),
                           ("a caption id", [c["id"] for c in captions])):
            if len(set(keys)) != len(keys):
                raise ValueError(f"the batch holds {what} twice")
        with self._locked():
            self._recover()
            self._refresh()  # what other processes added counts as already stored
            state = self.state
            new_images = [n for n, i in enumerate(image_ids) if i not in self._image_pos]
            new_captions = [n for n, c in enumerate(captions) if c["id"] not in self._caption_pos]
            if image_vectors is not None:
                _check_dim(image_vectors[0], state["image_dim"], IMAGE_DB)
            if caption_vectors is not None:
                _check_dim(caption_vectors[0], state["caption_dim"], CAPTION_EMBEDDING_DB)
            known = set(image_ids)
            orphan = next((captions[n]["image_id"] for n in new_captions
                           if captions[n]["image_id"] not in known
                           and captions[n]["image_id"] not in self._image_pos), None)
            if orphan is not None:
                raise ValueError(f"a caption of image {orphan!r}, which is neither stored nor "
                                 "in this batch")
            if not new_images and not new_captions:
                return 0, 0
            record = {"seq": state["seq"] + 1, "batch": True,
                      "images": [{"image_id": image_ids[n], "kind": kind} for n in new_images],
                      "image_vectors": (image_vectors[new_images] if new_images else
                                        np.zeros((0, state["image_dim"]), np.float32)),
                      "captions": [dict(captions[n]) for n in new_captions],
                      "caption_vectors": (caption_vectors[new_captions] if new_captions else
                                          np.zeros((0, state["caption_dim"]), np.float32)),
                      "replace": None}
            self._write_record(record)
        return len(new_images), len(new_captions)

    def _write_record(self, record: dict[str, Any]) -> None:
        journal = self.work / JOURNAL
        line = _journal_line(record)
        journal_size = journal.stat().st_size if journal.exists() else 0
        try:
            with open(journal, "ab") as f:
                f.write(line)
                f.flush()
                os.fsync(f.fileno())
            self._apply(record)
            self._finish(record)
        except BaseException:
            # Disk full, Ctrl-C, ...: put every file back as it was committed. If even
            # that fails, the journal stays and the next start completes the write.
            with contextlib.suppress(Exception):
                self._rollback(record)
                _truncate(journal, journal_size)
            raise

    def _apply(self, record: dict[str, Any]) -> None:
        """Write `record` into the files (their new sizes go to record["_sizes"])."""
        if record.get("batch"):
            return self._apply_batch(record)
        state = self.state
        sizes = dict(state["bytes"])
        if record["image"] is not None:
            image, vector = record["image"], np.asarray(record["image_vector"], np.float32)
            count = state["images"]
            sizes[IMAGE_DB] = _append_json(self.db_dir / IMAGE_DB, sizes[IMAGE_DB], count,
                                           _dumps({**image, "embedding": vector}))
            sizes[f"{WORK}/{IMAGE_META}"] = _append_bytes(
                self.work / IMAGE_META, sizes[f"{WORK}/{IMAGE_META}"], _dumps(image) + b"\n")
            _append_bytes(self.work / IMAGE_VECTORS, count * state["image_dim"] * 4,
                          vector.tobytes())
        entry, vector = record["caption"], np.asarray(record["caption_vector"], np.float32)
        position = record["replace"]
        if position is None:
            count = state["captions"]
            sizes[CAPTION_DB] = _append_json(self.db_dir / CAPTION_DB, sizes[CAPTION_DB], count,
                                             _dumps(entry))
            sizes[CAPTION_EMBEDDING_DB] = _append_json(
                self.db_dir / CAPTION_EMBEDDING_DB, sizes[CAPTION_EMBEDDING_DB], count,
                _dumps(_caption_vector_entry(entry, vector)))
            sizes[f"{WORK}/{CAPTION_META}"] = _append_bytes(
                self.work / CAPTION_META, sizes[f"{WORK}/{CAPTION_META}"], _dumps(entry) + b"\n")
            _append_bytes(self.work / CAPTION_VECTORS, count * state["caption_dim"] * 4,
                          vector.tobytes())
            record["_sizes"] = sizes
            return
        record["_undo"] = np.array(self.caption_vectors[position])  # for a rollback
        _write_row(self.work / CAPTION_VECTORS, position, vector)
        captions = list(self.captions)
        captions[position] = entry
        vectors = _map_vectors(self.work / CAPTION_VECTORS, state["captions"],
                               state["caption_dim"])
        sizes.update(_write_caption_files(self.db_dir, self.work, self._headers(), captions,
                                          vectors))
        record["_sizes"] = sizes

    def _apply_batch(self, record: dict[str, Any]) -> None:
        """add_images' record: every row appended to each file in one write."""
        state = self.state
        sizes = dict(state["bytes"])
        images, captions = record["images"], record["captions"]
        if images:
            vectors = np.asarray(record["image_vectors"], np.float32).reshape(
                len(images), state["image_dim"])
            count = state["images"]
            sizes[IMAGE_DB] = _append_json(
                self.db_dir / IMAGE_DB, sizes[IMAGE_DB], count,
                b",\n".join(_dumps({**i, "embedding": v}) for i, v in zip(images, vectors)))
            sizes[f"{WORK}/{IMAGE_META}"] = _append_bytes(
                self.work / IMAGE_META, sizes[f"{WORK}/{IMAGE_META}"],
                b"".join(_dumps(i) + b"\n" for i in images))
            _append_bytes(self.work / IMAGE_VECTORS, count * state["image_dim"] * 4,
                          vectors.tobytes())
        if captions:
            vectors = np.asarray(record["caption_vectors"], np.float32).reshape(
                len(captions), state["caption_dim"])
            count = state["captions"]
            sizes[CAPTION_DB] = _append_json(self.db_dir / CAPTION_DB, sizes[CAPTION_DB], count,
                                             b",\n".join(_dumps(c) for c in captions))
            sizes[CAPTION_EMBEDDING_DB] = _append_json(
                self.db_dir / CAPTION_EMBEDDING_DB, sizes[CAPTION_EMBEDDING_DB], count,
                b",\n".join(_dumps(_caption_vector_entry(c, v)) for c, v in zip(captions, vectors)))
            sizes[f"{WORK}/{CAPTION_META}"] = _append_bytes(
                self.work / CAPTION_META, sizes[f"{WORK}/{CAPTION_META}"],
                b"".join(_dumps(c) + b"\n" for c in captions))
            _append_bytes(self.work / CAPTION_VECTORS, count * state["caption_dim"] * 4,
                          vectors.tobytes())
        record["_sizes"] = sizes

    def _finish(self, record: dict[str, Any]) -> None:
        """Commit `record`'s writes in state.json, empty the journal, adopt the new rows."""
        new = dict(self.state, seq=record["seq"], bytes=record["_sizes"])
        if record.get("batch"):
            new["images"] += len(record["images"])
            new["captions"] += len(record["captions"])
        else:
            if record["image"] is not None:
                new["images"] += 1
            if record["replace"] is None:
                new["captions"] += 1
            else:
                new["epoch"] += 1
        _write_atomic(self.work / STATE, _dumps(new, indent=True))
        _truncate(self.work / JOURNAL, 0)
        old = self.state
        self.state = new
        if record["replace"] is None:
            self._read_new_rows(old["images"], old["captions"], old["bytes"])
        else:
            self._load()

    def _rollback(self, record: dict[str, Any]) -> None:
        """Put every file back as the last commit left it."""
        state = self.state
        _cut_to_state(self.db_dir, state, keep_captions=record["replace"] is not None)
        if "_undo" in record:
            _write_row(self.work / CAPTION_VECTORS, record["replace"], record["_undo"])
            vectors = _map_vectors(self.work / CAPTION_VECTORS, state["captions"],
                                   state["caption_dim"])
            _write_caption_files(self.db_dir, self.work, self._headers(), self.captions, vectors)

    def _recover(self) -> None:
        """Finish or drop a write that a crash interrupted (call under the lock)."""
        journal = self.work / JOURNAL
        if not journal.exists() or journal.stat().st_size == 0:
            return
        state = _read_state(self.work / STATE)
        records, torn = _read_journal(journal)
        pending = next((r for r in records if r["seq"] == state["seq"] + 1), None)
        replace = pending is not None and pending["replace"] is not None
        _cut_to_state(self.db_dir, state, keep_captions=replace)
        if torn:
            self.repaired.append("dropped an experiment whose save was interrupted before it "
                                 "was acknowledged")
        if pending is None:
            _truncate(journal, 0)  # its write was committed, or never started
        else:
            if replace:
                # The caption files may already be the rewritten ones (each renamed whole);
                # either version reads fine and re-applying the replacement gives the same.
                for name in CAPTION_TEXT:
                    state["bytes"][name] = (self.db_dir / name).stat().st_size
            self._load(state)
            self._apply(pending)
            self._finish(pending)
            if pending.get("batch"):
                self.repaired.append(
                    f"completed an interrupted batch of {len(pending['images'])} images and "
                    f"{len(pending['captions'])} captions: all its entries are present now")
            else:
                caption = pending["caption"]
                self.repaired.append(
                    f"completed the interrupted save of experiment "
                    f"{caption.get('experiment_index')} ({caption['image_id']}): its three "
                    "entries are all present now")
        for note in self.repaired:
            log.warning("database %s: %s", self.db_dir, note)

    def _headers(self) -> dict[str, dict[str, Any]]:
        s = self.state
        return {
            IMAGE_DB: {"format": "recap-image-embeddings", "version": VERSION,
                       "model": s["clip_model"], "dim": s["image_dim"], "dataset": s["dataset"],
                       "split": s["split"]},
            CAPTION_DB: {"format": "recap-captions", "version": VERSION, "dataset": s["dataset"],
                         "split": s["split"]},
            CAPTION_EMBEDDING_DB: {"format": "recap-caption-embeddings", "version": VERSION,
                                   "model": s["caption_model"], "dim": s["caption_dim"],
                                   **{k: s[k] for k in PROMPT_FIELDS if k in s}},
        }

    # --- creating ----------------------------------------------------------------

    def _create(self, image_ids: list[str], kinds: list[str], image_vectors: np.ndarray,
                captions: list[dict[str, Any]], caption_vectors: np.ndarray, origin: str,
                models: tuple[str, str, str, str] | None = None,
                prompts: dict[str, str] | None = None) -> None:
        """Write a complete database (JSON files and working copy) in one commit.

        Everything is written into DB_DIR/.recap-new/ first; the JSON files are
        moved into place, then .recap-new is renamed to .recap, which commits it.
        """
        image_vectors = _as_vectors(image_vectors, len(image_ids))
        caption_vectors = _as_vectors(caption_vectors, len(captions))
        _check_unique(self.db_dir / IMAGE_DB, image_ids)
        _check_unique(self.db_dir / CAPTION_DB, [c["id"] for c in captions])
        ident = self.identity
        clip, caption_model, dataset, split = models or (
            ident.clip_model, ident.caption_model, ident.dataset, ident.split)
        self.state = {"version": VERSION, "seq": 0, "epoch": 0, "origin": origin,
                      "clip_model": clip, "caption_model": caption_model, "dataset": dataset,
                      "split": split, **self._split_settings(),
                      # the caption prompts: the JSON header's on import, else the identity's
                      **(prompts if prompts is not None else self._prompt_settings()),
                      "image_dim": int(image_vectors.shape[1]),
                      "caption_dim": int(caption_vectors.shape[1]),
                      "images": len(image_ids), "captions": len(captions), "bytes": {}}
        new = self.db_dir / NEW_WORK
        shutil.rmtree(new, ignore_errors=True)
        (new / "json").mkdir(parents=True)
        headers = self._headers()
        sizes = {IMAGE_DB: _write_json_file(
            new / "json" / IMAGE_DB, headers[IMAGE_DB],
            (_dumps({"image_id": i, "kind": k, "embedding": v})
             for i, k, v in zip(image_ids, kinds, image_vectors)))}
        sizes[f"{WORK}/{IMAGE_META}"] = _write_atomic(new / IMAGE_META, b"".join(
            _dumps({"image_id": i, "kind": k}) + b"\n" for i, k in zip(image_ids, kinds)))
        _write_atomic(new / IMAGE_VECTORS, image_vectors.tobytes())
        _write_atomic(new / CAPTION_VECTORS, caption_vectors.tobytes())
        caption_sizes = _write_caption_files(new / "json", new, headers, captions, caption_vectors)
        sizes.update(caption_sizes)
        self.state["bytes"] = sizes
        _write_atomic(new / STATE, _dumps(self.state, indent=True))
        for name in FILES:
            os.replace(new / "json" / name, self.db_dir / name)
        (new / "json").rmdir()
        shutil.rmtree(self.work, ignore_errors=True)
        os.replace(new, self.work)
        _fsync_dir(self.db_dir)
        self._load()

    def _split_settings(self) -> dict[str, int]:
        ident = self.identity
        if ident is None:
            return {}
        return {k: v for k, v in (("random_seed", ident.random_seed),
                                  ("experiment_samples", ident.experiment_samples))
                if v is not None}

    def _prompt_settings(self) -> dict[str, str]:
        ident = self.identity
        if ident is None or ident.query_prompt is None or ident.document_prompt is None:
            return {}
        return {"query_prompt": ident.query_prompt, "document_prompt": ident.document_prompt}

    def _clean_interrupted_create(self) -> None:
        """A crash while creating a database: nothing was committed, so undo it."""
        new = self.db_dir / NEW_WORK
        try:
            origin = orjson.loads((new / STATE).read_bytes()).get("origin")
        except (OSError, orjson.JSONDecodeError):
            origin = None  # died before any JSON file was moved into place
        if origin == "seed":  # every JSON file in DB_DIR came from this first run
            for name in FILES:
                (self.db_dir / name).unlink(missing_ok=True)
            self.repaired.append("removed a database left half-created by an interrupted "
                                 "first run")
        shutil.rmtree(new)

    def _import_json(self) -> None:
        """Build the working copy from JSON files alone (an older database, or a copy
        without the hidden .recap folder)."""
        data = {name: _read_json(self.db_dir / name, fmt) for name, fmt in _FORMATS}
        parsed = _validate(self.db_dir, data)
        log.info("database %s: building the working copy from the JSON files", self.db_dir)
        images, captions, embeddings = data[IMAGE_DB], data[CAPTION_DB], data[CAPTION_EMBEDDING_DB]
        self._create([e["image_id"] for e in images["entries"]],
                     [e["kind"] for e in images["entries"]], parsed["image_vectors"],
                     captions["entries"], parsed["caption_vectors"], origin="import",
                     models=(images["model"], embeddings["model"], images.get("dataset", ""),
                             images.get("split", "")),
                     prompts={k: embeddings[k] for k in PROMPT_FIELDS if k in embeddings})


# --- checking and repairing ------------------------------------------------------

def check_db(db_dir: str | os.PathLike) -> list[str]:
    """Every problem found in the databases of `db_dir` (empty list: all good).

    Reads everything: JSON parse, schema, ids aligned across the three files,
    dimensions and models consistent, no NaN/inf, no duplicate ids, and the
    working copy equal to the JSON files.
    """
    db_dir = Path(db_dir)
    problems: list[str] = []
    data: dict[str, dict] = {}
    for name, fmt in _FORMATS:
        try:
            data[name] = _read_json(db_dir / name, fmt)
        except UserError as exc:
            problems.append(str(exc))
    parsed = None
    if len(data) == len(FILES):
        try:
            parsed = _validate(db_dir, data)
        except UserError as exc:
            problems.append(str(exc))
    work = db_dir / WORK
    journal = work / JOURNAL
    if journal.exists() and journal.stat().st_size:
        problems.append(f"{journal} holds an unfinished write; any command that opens the "
                        "database (or --repair-db) completes it")
    try:
        state = _read_state(work / STATE)
    except UserError as exc:
        return problems + [str(exc)]
    for name in FILES:
        if (db_dir / name).exists() and (db_dir / name).stat().st_size != state["bytes"][name]:
            problems.append(f"{db_dir / name} is {(db_dir / name).stat().st_size} bytes, the "
                            f"last committed write left {state['bytes'][name]}")
    if parsed is not None and not problems:
        try:
            copy = DbManager(db_dir, None)
            copy.state = state
            copy._read_new_rows(0, 0, {k: 0 for k in state["bytes"]})
        except (UserError, OSError, ValueError) as exc:
            return problems + [f"working copy {work}: {exc}"]
        if copy.image_ids != [e["image_id"] for e in data[IMAGE_DB]["entries"]] or \
                copy.captions != data[CAPTION_DB]["entries"]:
            problems.append(f"working copy {work} lists other entries than the JSON files")
        elif not (np.array_equal(copy.image_vectors, parsed["image_vectors"]) and
                  np.array_equal(copy.caption_vectors, parsed["caption_vectors"])):
            problems.append(f"working copy {work} holds other vectors than the JSON files")
        if (state["clip_model"], state["caption_model"]) != (
                data[IMAGE_DB]["model"], data[CAPTION_EMBEDDING_DB]["model"]):
            problems.append(f"{work / STATE} names other models than the JSON files")
    return problems


def repair_db(db_dir: str | os.PathLike) -> list[str]:
    """Fix what can be fixed, after a timestamped backup; returns what was done.

    First an interrupted write is finished (or dropped) from the journal. If
    problems remain: valid JSON files are the truth (users may have restored
    them from a backup), so the working copy is rebuilt from them; otherwise
    the JSON files are rebuilt from the working copy. UserError if neither is
    usable.
    """
    db_dir = Path(db_dir)
    if not any((db_dir / f).exists() for f in FILES + (WORK,)):
        raise UserError(f"no database in {db_dir}")
    backup = backup_db(db_dir)
    done = [f"backup of everything as it was: {backup}"]
    db = DbManager(db_dir, None)
    with db._locked():
        if (db_dir / NEW_WORK).exists() and not db.work.exists():
            db._clean_interrupted_create()
        try:
            db._recover()
            db.state = _read_state(db.work / STATE)
            db._read_new_rows(0, 0, {k: 0 for k in db.state["bytes"]})
            working_copy = None
        except (UserError, OSError, ValueError, KeyError, TypeError) as exc:
            working_copy = str(exc)
        done += db.repaired
        if not check_db(db_dir):
            return done + ["no problems left"]
        try:
            data = {name: _read_json(db_dir / name, fmt) for name, fmt in _FORMATS}
            _validate(db_dir, data)
            json_problem = None
        except UserError as exc:
            json_problem = str(exc)
        if json_problem is None:
            shutil.rmtree(db.work, ignore_errors=True)
            db._import_json()
            done.append("rebuilt the working copy from the JSON files")
        elif working_copy is None:
            headers = db._headers()
            sizes = dict(db.state["bytes"])
            sizes[IMAGE_DB] = _write_json_file(
                db_dir / IMAGE_DB, headers[IMAGE_DB],
                (_dumps({"image_id": i, "kind": k, "embedding": v}) for i, k, v in
                 zip(db.image_ids, db.image_kinds, db.image_vectors)))
            sizes.update(_write_caption_files(db_dir, db.work, headers, db.captions,
                                              db.caption_vectors))
            _write_atomic(db.work / STATE, _dumps(dict(db.state, bytes=sizes), indent=True))
            done.append(f"rebuilt the three JSON files from the working copy ({json_problem})")
        else:
            raise UserError(f"cannot repair {db_dir}: the JSON files are damaged ({json_problem}) "
                            f"and so is the working copy ({working_copy}); restore a backup "
                            f"from {db_dir / 'backups'}")
        left = check_db(db_dir)
        if left:
            raise UserError("could not repair: " + "; ".join(left))
    return done + ["no problems left"]


def backup_db(db_dir: str | os.PathLike) -> Path:
    """Copy the databases and working copy to DB_DIR/backups/<timestamp>/."""
    db_dir = Path(db_dir)
    target = db_dir / "backups" / datetime.now().strftime("%Y%m%d_%H%M%S_%f")
    target.mkdir(parents=True)
    for name in FILES:
        if (db_dir / name).exists():
            shutil.copy2(db_dir / name, target / name)
    if (db_dir / WORK).exists():
        shutil.copytree(db_dir / WORK, target / WORK)
    return target


# --- files ------------------------------------------------------------------------

def write_json_atomic(path: str | os.PathLike, data: Any) -> None:
    """Write `data` as JSON so that readers see the old file or the new one, never half."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _write_atomic(path, _dumps(data, indent=True))
    except PermissionError:
        raise UserError(f"cannot write {path}: permission denied") from None


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write a text file (UTF-8) atomically, like write_json_atomic."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _write_atomic(path, text.encode("utf-8"))
    except PermissionError:
        raise UserError(f"cannot write {path}: permission denied") from None


def _dumps(data: Any, indent: bool = False) -> bytes:
    option = orjson.OPT_SERIALIZE_NUMPY | (orjson.OPT_INDENT_2 if indent else 0)
    return orjson.dumps(data, option=option)


def _write_atomic(path: Path, data: bytes | Iterable[bytes]) -> int:
    """Temp file in the same folder, flush, fsync, rename, fsync the folder.

    `data` is the content, or an iterable of chunks (streamed). Returns the size.
    """
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            for chunk in ([data] if isinstance(data, bytes) else data):
                f.write(chunk)
            size = f.tell()
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)
    return size


def _write_json_file(path: Path, header: dict[str, Any], entries: Iterable[bytes]) -> int:
    """A database JSON file, one entry per line, written atomically; returns its size."""
    def chunks() -> Iterator[bytes]:
        yield _dumps(header)[:-1] + b',"entries":['
        for n, entry in enumerate(entries):
            yield (b",\n" if n else b"\n") + entry
        yield TAIL
    return _write_atomic(path, chunks())


def _write_caption_files(json_dir: Path, work: Path, headers: dict, captions: list[dict],
                         vectors: np.ndarray) -> dict[str, int]:
    sizes = {CAPTION_DB: _write_json_file(json_dir / CAPTION_DB, headers[CAPTION_DB],
                                          (_dumps(c) for c in captions)),
             CAPTION_EMBEDDING_DB: _write_json_file(
                 json_dir / CAPTION_EMBEDDING_DB, headers[CAPTION_EMBEDDING_DB],
                 (_dumps(_caption_vector_entry(c, v)) for c, v in zip(captions, vectors))),
             f"{WORK}/{CAPTION_META}": _write_atomic(
                 work / CAPTION_META, b"".join(_dumps(c) + b"\n" for c in captions))}
    return sizes


def _caption_vector_entry(caption: dict[str, Any], vector: np.ndarray) -> dict[str, Any]:
    return {"id": caption["id"], "image_id": caption["image_id"], "embedding": vector}


def _cut_to_state(db_dir: Path, state: dict[str, Any], keep_captions: bool) -> None:
    """Truncate every appended file to its committed length (caption files excepted
    while a replacement, which rewrites them whole, is being finished)."""
    for name in IMAGE_TEXT + (() if keep_captions else CAPTION_TEXT):
        if name in FILES:
            _cut_json(db_dir / name, state["bytes"][name])
        else:
            _truncate(db_dir / name, state["bytes"][name])
    work = db_dir / WORK
    _truncate(work / IMAGE_VECTORS, state["images"] * state["image_dim"] * 4)
    _truncate(work / CAPTION_VECTORS, state["captions"] * state["caption_dim"] * 4)


def _append_json(path: Path, size: int, count: int, entry: bytes) -> int:
    """Add `entry` to a database JSON file in place; returns the new size."""
    with open(path, "r+b") as f:
        f.seek(size - len(TAIL))
        if f.read(len(TAIL)) != TAIL:
            raise UserError(f"database file {path} does not end as expected; {REPAIR}")
        # Overwrite the closing bytes, never shorten first: a crash at any moment leaves
        # a file at least as long as the last commit, which recovery can cut back.
        f.seek(size - len(TAIL))
        f.write((b",\n" if count else b"\n") + entry + TAIL)
        new_size = f.tell()
        f.truncate()
        f.flush()
        os.fsync(f.fileno())
    return new_size


def _append_bytes(path: Path, size: int, blob: bytes) -> int:
    with open(path, "r+b") as f:
        f.seek(size)
        f.write(blob)
        f.truncate()
        f.flush()
        os.fsync(f.fileno())
        return size + len(blob)


def _write_row(path: Path, row: int, vector: np.ndarray) -> None:
    with open(path, "r+b") as f:
        f.seek(row * vector.size * 4)
        f.write(np.asarray(vector, np.float32).tobytes())
        f.flush()
        os.fsync(f.fileno())


def _truncate(path: Path, size: int) -> None:
    if path.exists() and path.stat().st_size != size:
        with open(path, "r+b") as f:
            f.truncate(size)
            f.flush()
            os.fsync(f.fileno())


def _cut_json(path: Path, size: int) -> None:
    """Back to the committed `size`: an append overwrote the closing bytes, so put them back."""
    with open(path, "r+b") as f:
        f.seek(max(0, size - len(TAIL)))
        if f.read(len(TAIL)) == TAIL and f.seek(0, 2) == size:
            return
        if f.seek(0, 2) < size - len(TAIL):
            raise UserError(f"database file {path} is shorter than its last save; {REPAIR}")
        f.truncate(size - len(TAIL))
        f.seek(size - len(TAIL))
        f.write(TAIL)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # not possible on every platform (Windows)
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _map_vectors(path: Path, rows: int, dim: int) -> np.ndarray:
    if rows == 0:
        return np.zeros((0, dim), dtype=np.float32)
    need = rows * dim * 4
    if not path.exists() or path.stat().st_size < need:
        raise UserError(f"vector file {path} is shorter than its {rows} rows; {REPAIR}")
    # A plain ndarray view of the map: numpy code and orjson treat it like any array.
    return np.memmap(path, dtype=np.float32, mode="r", shape=(rows, dim)).view(np.ndarray)


def _read_jsonl(path: Path, start: int, end: int) -> list[dict[str, Any]]:
    try:
        with open(path, "rb") as f:
            f.seek(start)
            blob = f.read(end - start)
        if len(blob) != end - start:
            raise ValueError("file is shorter than committed")
        return [orjson.loads(line) for line in blob.splitlines()]
    except (OSError, ValueError) as exc:
        raise UserError(f"working copy file {path} is damaged ({exc}); {REPAIR}") from None


def _read_state(path: Path) -> dict[str, Any]:
    try:
        state = orjson.loads(path.read_bytes())
        for key in ("seq", "epoch", "images", "captions", "image_dim", "caption_dim"):
            if not isinstance(state[key], int):
                raise TypeError(key)
        for name in FILES + (f"{WORK}/{IMAGE_META}", f"{WORK}/{CAPTION_META}"):
            if not isinstance(state["bytes"][name], int):
                raise TypeError(name)
    except FileNotFoundError:
        raise UserError(f"{path} is missing; {REPAIR}") from None
    except (OSError, orjson.JSONDecodeError, KeyError, TypeError) as exc:
        raise UserError(f"{path} is damaged ({type(exc).__name__}: {exc}); {REPAIR}") from None
    return state


def _check_json_end(path: Path, size: int) -> None:
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


def _journal_line(record: dict[str, Any]) -> bytes:
    body = _dumps({k: v for k, v in record.items() if not k.startswith("_")})
    return b"%08x " % zlib.crc32(body) + body + b"\n"


def _read_journal(path: Path) -> tuple[list[dict[str, Any]], bool]:
    """Complete records of the journal, and whether a torn/garbled line was found."""
    records, torn = [], False
    for line in path.read_bytes().split(b"\n"):
        if not line:
            continue
        crc, _, body = line.partition(b" ")
        try:
            if int(crc, 16) != zlib.crc32(body):
                raise ValueError("checksum")
            records.append(orjson.loads(body))
        except ValueError:
            torn = True
    return records, torn


def _read_json(path: Path, fmt: str) -> dict[str, Any]:
    try:
        data = orjson.loads(path.read_bytes())
    except FileNotFoundError:
        raise UserError(f"database file {path} is missing; {REPAIR}") from None
    except OSError as exc:
        raise UserError(f"database file {path} cannot be read: {exc.strerror}") from None
    except orjson.JSONDecodeError as exc:
        raise UserError(f"database file {path} is corrupt (not valid JSON: {exc}); "
                        f"{REPAIR}") from None
    if not isinstance(data, dict) or data.get("format") != fmt or not isinstance(
            data.get("entries"), list):
        raise UserError(f"database file {path} is not a {fmt} file")
    if data.get("version") != VERSION:
        raise UserError(f"database file {path} has version {data.get('version')}, "
                        f"this program reads version {VERSION}")
    return data


def _validate(db_dir: Path, data: dict[str, dict]) -> dict[str, np.ndarray]:
    """Full check of parsed JSON files; returns their vectors."""
    images, captions, embeddings = data[IMAGE_DB], data[CAPTION_DB], data[CAPTION_EMBEDDING_DB]
    _check_entries(db_dir / IMAGE_DB, images["entries"], {"image_id": str, "kind": str})
    _check_entries(db_dir / CAPTION_DB, captions["entries"],
                   {"id": str, "image_id": str, "caption": str, "source": str})
    _check_entries(db_dir / CAPTION_EMBEDDING_DB, embeddings["entries"],
                   {"id": str, "image_id": str})
    for name, d in ((IMAGE_DB, images), (CAPTION_EMBEDDING_DB, embeddings)):
        if not isinstance(d.get("model"), str):
            raise UserError(f"database file {db_dir / name} does not name its model")
    image_ids = [e["image_id"] for e in images["entries"]]
    caption_ids = [c["id"] for c in captions["entries"]]
    _check_unique(db_dir / IMAGE_DB, image_ids)
    _check_unique(db_dir / CAPTION_DB, caption_ids)
    if caption_ids != [e["id"] for e in embeddings["entries"]]:
        raise UserError(f"{db_dir}: {CAPTION_DB} and {CAPTION_EMBEDDING_DB} list different "
                        "caption ids; restore both from the same backup")
    known = set(image_ids)
    orphan = next((c["image_id"] for c in captions["entries"] if c["image_id"] not in known), None)
    if orphan is not None:
        raise UserError(f"{db_dir / CAPTION_DB} has captions of image {orphan!r}, which "
                        f"{IMAGE_DB} does not hold")
    if images.get("split") != captions.get("split"):
        raise UserError(f"{db_dir}: {IMAGE_DB} and {CAPTION_DB} were built from different splits")
    return {"image_vectors": _matrix(db_dir / IMAGE_DB, images),
            "caption_vectors": _matrix(db_dir / CAPTION_EMBEDDING_DB, embeddings)}


def _as_vectors(x: np.ndarray, rows: int) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    if x.ndim == 1:
        x = x[None]
    if x.shape[0] != rows:
        raise ValueError(f"expected {rows} vectors, got {x.shape[0]}")
    if not np.isfinite(x).all():
        raise ValueError("vectors contain NaN or inf")
    return np.ascontiguousarray(x)


def _check_dim(vector: np.ndarray, dim: int, name: str) -> None:
    if vector.shape[0] != dim:
        raise UserError(f"{name} holds {dim}-d vectors, got a {vector.shape[0]}-d one")


def _check_unique(path: Path, ids: Sequence[str]) -> None:
    seen: set[str] = set()
    for i in ids:
        if i in seen:
            raise UserError(f"database file {path} has duplicate id {i!r}")
        seen.add(i)


def _check_entries(path: Path, entries: list, fields: dict[str, type]) -> None:
    for n, entry in enumerate(entries):
        if not isinstance(entry, dict) or any(not isinstance(entry.get(k), t)
                                              for k, t in fields.items()):
            raise UserError(f"database file {path}: entry {n} is malformed "
                            f"(needs {', '.join(fields)})")


def _matrix(path: Path, data: dict[str, Any]) -> np.ndarray:
    entries = data["entries"]
    dim = data.get("dim")
    if not isinstance(dim, int) or dim <= 0:
        raise UserError(f"database file {path} has no valid 'dim'")
    if not entries:
        return np.zeros((0, dim), dtype=np.float32)
    vectors = [e.get("embedding") for e in entries]
    bad = next((n for n, v in enumerate(vectors) if not isinstance(v, list) or len(v) != dim), None)
    if bad is not None:
        raise UserError(f"database file {path}: entry {bad} is not a {dim}-d embedding")
    try:
        matrix = np.array(vectors, dtype=np.float32)  # null becomes NaN, caught below
    except (TypeError, ValueError):
        raise UserError(f"database file {path} has an embedding with non-numbers") from None
    if not np.isfinite(matrix).all():
        raise UserError(f"database file {path} has NaN, null or infinite values")
    return matrix


__all__ = ["DbManager", "DbIdentity", "FILES", "IMAGE_DB", "CAPTION_DB", "CAPTION_EMBEDDING_DB",
           "generated_caption_id", "write_json_atomic", "check_db", "repair_db", "backup_db"]
