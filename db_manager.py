"""The three JSON databases: the pipeline's memory. The only code that writes them.

What users see in DB_DIR (plain JSON, one entry per line, `json.load`-able
whenever no command is running):

image_embeddings.json
    {"format": "recap-image-embeddings", "version": 1, "model": CLIP name, "dim": D,
     "dataset": name, "split": fingerprint,
     "entries": [{"image_id", "kind": "train" | "experiment" | "imported", "embedding": [D floats]}]}
captions.json
    {"format": "recap-captions", "version": 1, "dataset": name, "split": fingerprint,
     "entries": [{"id", "image_id", "caption", "source": "human"},
                 {"id", "image_id", "caption", "source": "generated", "model": VLM name,
                  "experiment_index" (experiments only), "timestamp"}]}
caption_embeddings.json
    {"format": "recap-caption-embeddings", "version": 1, "model": embedder name, "dim": D,
     "entries": [{"id" (a captions.json id), "image_id", "embedding": [D floats]}]}
    One entry per caption that has a vector, matched by id: generated captions get
    theirs when they are saved; the training pool's human captions get theirs the
    first time something needs them (text search over captions, `python main.py
    --embed-captions`), appended then. Databases built before that have an entry for
    every caption, in captions.json's order.

Keys: one image embedding per image id (the CLIP model is fixed per database);
one generated caption per (image id, VLM model), id "IMAGE#gen:MODEL", so
re-running an experiment with the same model replaces its entry and another
model adds its own. Human captions have ids "IMAGE#N".

No command parses or rewrites the big JSON files: they read the working copy
in DB_DIR/.recap/ (db_format.py) and every change is one journaled write
(db_journal.py) that appends to the files in place, or, for a rerun, writes
the new caption over the old one's bytes, so a write costs the same at 1k or
100k entries, and any failed or killed write leaves the databases as they were
or with the write complete. check_db / repair_db (db_check.py) serve
`--check-db` and `--repair-db`.

This module is the facade: DbManager holds the in-memory copy (ids, entries,
memory-mapped vectors) and its typed state (db_format.DbState), and checks
that a database's models are the ones the settings ask for (`check_models`).
"""

from __future__ import annotations

import itertools
import logging
import os
from operator import itemgetter
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import orjson

import db_journal
from atomic_files import write_bytes_atomic, write_json_atomic, write_text_atomic  # noqa: F401
from db_check import backup_db, check_db, describe_db, import_json, repair_db
from db_format import (CAPTION_DB, CAPTION_EMBEDDING_DB, CAPTION_VECTORS, FILES, IMAGE_DB,
                       CAPTION_META, IMAGE_VECTORS, JOURNAL, NEW_WORK, STATE, WORK, DbIdentity,
                       DbState,
                       as_vectors, check_dim, check_seals, check_unique,
                       generated_caption_entry, generated_caption_id,
                       map_vectors, new_rows, read_caption_rows, read_state)
from errors import DatabaseConflict, UserError

log = logging.getLogger(__name__)


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
        self.state: DbState | None = None
        self.image_ids: list[str] = []
        self.image_kinds: list[str] = []
        # The caption entries, read on first use (see `captions`); None: not read yet
        self._captions: list[dict[str, Any]] | None = []
        self.image_vectors = np.zeros((0, 0), dtype=np.float32)
        # One row per caption; zeros for a caption without a vector (missing_caption_rows)
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
        with db_journal.locked(db.db_dir):
            db._open_locked()
        if not db.needs_seed:
            db._check_identity()
            log.info("database %s: %d images, %d captions", db.db_dir, len(db.image_ids),
                     db.state.captions)
        return db

    def _open_locked(self) -> None:
        if (self.db_dir / NEW_WORK).exists() and not self.work.exists():
            self.repaired += db_journal.clean_interrupted_create(self.db_dir)
        if (self.work / STATE).exists():
            self._recover()
            self._load()
            return
        present = [f for f in FILES if (self.db_dir / f).exists()]
        if len(present) == len(FILES):
            log.info("database %s: building the working copy from the JSON files", self.db_dir)
            import_json(self.db_dir)
            self._load()
        elif present:
            missing = sorted(set(FILES) - set(present))
            raise UserError(f"database in {self.db_dir} is incomplete: {', '.join(missing)} missing "
                            f"but {', '.join(present)} present; restore the missing file(s) from "
                            "a backup or move the folder away to start a new memory")

    def check_models(self, clip_model: str | None = None, caption_model: str | None = None) -> None:
        """UserError (one line, naming what the database holds and what was asked for)
        unless it was built with these models; None skips that model."""
        state = self.state
        wrong = [(what, found, wanted, option) for what, found, wanted, option in (
            ("CLIP model", state.clip_model, clip_model, "--clip-model-name"),
            ("caption model", state.caption_model, caption_model, "--caption-embedding-model"))
            if wanted is not None and found != wanted]
        if wrong:
            built = " and ".join(f"{what} {found!r}, not {wanted!r}"
                                 for what, found, wanted, _ in wrong)
            options = " and ".join(option for *_, option in wrong)
            raise UserError(f"database {self.db_dir} was built with {built}: use another "
                            f"--db-dir for these settings, or set {options} back")

    def _check_identity(self) -> None:
        want = self.identity
        if want is None:
            return
        self.check_models(clip_model=want.clip_model, caption_model=want.caption_model)
        # The data set name is recorded for people, not checked: the same images may
        # be loaded from another folder. The split fingerprint (seed + ids) is checked.
        if self.state.split != want.split:
            raise UserError(f"database {self.db_dir} was built with split {self.state.split!r}, "
                            f"not {want.split!r}: use another --db-dir for these settings, or "
                            "set --dataset-name / --split / --memory-dataset / --random-seed / "
                            "--experiment-samples back")
        if want.query_prompt is not None and want.document_prompt is not None:
            self.check_caption_prompts(want.query_prompt, want.document_prompt)

    @property
    def caption_prompts(self) -> tuple[str, str] | None:
        """(query prompt, document prompt) the captions were embedded with; None for a
        database made before prompts were recorded."""
        query, document = self.state.query_prompt, self.state.document_prompt
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

    @property
    def missing_caption_rows(self) -> list[int]:
        """Caption rows (indices into `captions`) without a vector yet."""
        return self.state.missing_rows() if self.state else []

    @property
    def captions(self) -> list[dict[str, Any]]:
        """Every caption entry ({"id", "image_id", "caption", "source", ...}), in row
        order. Read from the working copy on first use: opening a COCO-sized memory
        (566,747 captions, ~2 s to parse) need not wait for them, and an image search
        never reads them."""
        if self._captions is None:
            self._captions, self._caption_pos = [], {}
            self._add_captions(read_caption_rows(self.db_dir, None, self.state), 0)
        return self._captions

    def _add_captions(self, entries: list[dict[str, Any]], first: int) -> None:
        """Index caption rows first, first + 1, ... (by id, and by image once built)."""
        self._captions += entries
        # dict.update builds the index in C: a COCO memory has 566,747 captions
        self._caption_pos.update(zip(map(itemgetter("id"), entries), itertools.count(first)))
        if self._by_image is not None:
            for entry in entries:
                self._by_image.setdefault(entry["image_id"], []).append(entry)

    def _caption_index(self) -> dict[str, int]:
        """Caption id -> row (reading the captions first if they are not yet)."""
        self.captions  # noqa: B018
        return self._caption_pos

    def has_caption(self, caption_id: str) -> bool:
        """Whether a caption with this id (e.g. generated_caption_id(...)) is stored."""
        return caption_id in self._caption_index()

    def captions_of(self, image_id: str) -> list[str]:
        """Human captions of an image; its generated captions if it has none."""
        if self._by_image is None:
            captions, self._by_image = self.captions, {}  # read them first (they index it)
            for entry in captions:
                self._by_image.setdefault(entry["image_id"], []).append(entry)
        entries = self._by_image.get(image_id, [])
        human = [c["caption"] for c in entries if c["source"] == "human"]
        return human or [c["caption"] for c in entries]

    def _load(self, state: DbState | None = None) -> None:
        """Read the working copy, after checking that the JSON files are exactly as the
        last save left them (their stat; their bytes only if that changed)."""
        state = state or read_state(self.work / STATE)
        fresh = check_seals(self.db_dir, state)
        if fresh is not None:  # same bytes, new stat (a copied folder, a touched file)
            state = fresh
            try:
                write_bytes_atomic(self.work / STATE, state.to_json())
            except OSError as exc:  # read-only: the bytes are checked again next time
                log.info("database %s: could not record its files' stat (%s)", self.db_dir, exc)
        self.image_ids, self.image_kinds, self._captions = [], [], None
        self.state = None
        self._adopt(state)
        self.needs_seed = False

    def _adopt(self, state: DbState) -> None:
        """Extend the in-memory copy with the rows committed after self.state."""
        old = self.state
        # captions not read yet (a full load): left to the first use of `captions`
        read = self._captions is not None
        images, captions = new_rows(self.db_dir, old, state, captions=read)
        self.state = state
        self.image_ids += [e["image_id"] for e in images]
        self.image_kinds += [e["kind"] for e in images]
        self.image_vectors = map_vectors(self.work / IMAGE_VECTORS, state.images, state.image_dim)
        self.caption_vectors = map_vectors(self.work / CAPTION_VECTORS, state.captions,
                                           state.caption_dim)
        if old is None:  # a full load
            self._image_pos, self._caption_pos, self._by_image = {}, {}, None
        # Index only the new rows, so an append costs the same at 1k or 100k entries.
        self._image_pos.update(zip(map(itemgetter("image_id"), images),
                                   itertools.count(old.images if old else 0)))
        if read:
            self._add_captions(captions, old.captions if old else 0)

    def _refresh(self) -> None:
        """Merge what other processes committed since we loaded (call under the lock)."""
        on_disk = read_state(self.work / STATE)
        if on_disk.seq == self.state.seq:
            return
        if on_disk.epoch != self.state.epoch:  # rows were rewritten: read them all again
            self._load(on_disk)
        else:
            self._adopt(on_disk)

    def _recover(self) -> None:
        """Finish or drop a write a crash interrupted (call under the lock)."""
        notes = db_journal.recover(self.db_dir)
        for note in notes:
            log.warning("database %s: %s", self.db_dir, note)
        self.repaired += notes
        if notes and self.state is not None:
            self._load()

    # --- writing ------------------------------------------------------------------

    def seed(self, image_ids: Sequence[str], image_vectors: np.ndarray,
             captions: Sequence[dict[str, Any]], caption_vectors: np.ndarray | None = None,
             caption_dim: int | None = None) -> None:
        """Create the databases from the training pool (first run only).

        `caption_vectors=None`: the captions get no vectors now (`caption_dim`, the
        caption model's, is recorded); add_caption_vectors gives them theirs later.
        If another process created them meanwhile, theirs are kept and loaded.
        """
        if not self.needs_seed:
            raise RuntimeError("database already exists")
        image_vectors = as_vectors(image_vectors, len(image_ids))
        unembedded = ()
        if caption_vectors is None:
            if not caption_dim:
                raise ValueError("seed without caption vectors needs caption_dim")
            caption_vectors = np.zeros((len(captions), caption_dim), np.float32)
            unembedded = ((0, len(captions)),) if captions else ()
        caption_vectors = as_vectors(caption_vectors, len(captions))
        check_unique(self.db_dir / IMAGE_DB, list(image_ids))
        check_unique(self.db_dir / CAPTION_DB, [c["id"] for c in captions])
        with db_journal.locked(self.db_dir):
            self._open_locked()
            if not self.needs_seed:
                log.info("another process created %s meanwhile; using it", self.db_dir)
                self._check_identity()
                return
            ident = self.identity
            state = DbState(clip_model=ident.clip_model, caption_model=ident.caption_model,
                            dataset=ident.dataset, split=ident.split,
                            image_dim=int(image_vectors.shape[1]),
                            caption_dim=int(caption_vectors.shape[1]), images=len(image_ids),
                            captions=len(captions), unembedded=unembedded,
                            random_seed=ident.random_seed,
                            experiment_samples=ident.experiment_samples,
                            split_name=ident.split_name, memory_dataset=ident.memory_dataset,
                            **({"query_prompt": ident.query_prompt,
                                "document_prompt": ident.document_prompt}
                               if ident.query_prompt is not None
                               and ident.document_prompt is not None else {}))
            db_journal.create(self.db_dir, state, list(image_ids), ["train"] * len(image_ids),
                              image_vectors, [dict(c) for c in captions], caption_vectors)
            self._load()
        log.info("created database %s: %d images, %d captions", self.db_dir,
                 len(self.image_ids), self.state.captions)

    def add_experiment(self, image_id: str, image_vector: np.ndarray, caption: str,
                       caption_vector: np.ndarray, vlm_model: str, experiment_index: int | None,
                       timestamp: str) -> None:
        """Append an experiment image's embedding and generated caption (or replace the
        caption this VLM gave it before), durably and atomically across the three files.
        `experiment_index=None`: an image that is no experiment (a captioned folder's),
        whose entry has no "experiment_index"."""
        if self.needs_seed:
            raise RuntimeError("seed the database first")
        image_vector = as_vectors(image_vector, 1)[0]
        caption_vector = as_vectors(caption_vector, 1)[0]
        entry = generated_caption_entry(image_id, caption, vlm_model, timestamp,
                                        experiment_index)
        with db_journal.locked(self.db_dir):
            self._recover()
            self._refresh()
            state = self.state
            check_dim(image_vector, state.image_dim, IMAGE_DB)
            check_dim(caption_vector, state.caption_dim, CAPTION_EMBEDDING_DB)
            row = self._caption_index().get(entry["id"])
            if row is not None:
                self._write(db_journal.replace_record(self.db_dir, state, row, entry,
                                                      caption_vector))
                return
            new_image = image_id not in self._image_pos
            self._write(db_journal.append_record(
                state.seq + 1, [{"image_id": image_id, "kind": "experiment"}] if new_image else [],
                image_vector[None] if new_image else np.zeros((0, state.image_dim), np.float32),
                [entry], caption_vector[None]))

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
        image_vectors = as_vectors(image_vectors, len(image_ids)) if len(image_ids) else None
        caption_vectors = as_vectors(caption_vectors, len(captions)) if len(captions) else None
        for n, entry in enumerate(captions):
            if not all(isinstance(entry.get(k), str) for k in ("id", "image_id", "caption",
                                                               "source")):
                raise ValueError(f"caption entry {n} needs string id, image_id, caption, source")
        for what, keys in (("an image id", list(image_ids)),
                           ("a caption id", [c["id"] for c in captions])):
            if len(set(keys)) != len(keys):
                raise ValueError(f"the batch holds {what} twice")
        with db_journal.locked(self.db_dir):
            self._recover()
            self._refresh()  # what other processes added counts as already stored
            state = self.state
            new_images = [n for n, i in enumerate(image_ids) if i not in self._image_pos]
            known = self._caption_index()
            new_captions = [n for n, c in enumerate(captions) if c["id"] not in known]
            if image_vectors is not None:
                check_dim(image_vectors[0], state.image_dim, IMAGE_DB)
            if caption_vectors is not None:
                check_dim(caption_vectors[0], state.caption_dim, CAPTION_EMBEDDING_DB)
            known = set(image_ids)
            orphan = next((captions[n]["image_id"] for n in new_captions
                           if captions[n]["image_id"] not in known
                           and captions[n]["image_id"] not in self._image_pos), None)
            if orphan is not None:
                raise ValueError(f"a caption of image {orphan!r}, which is neither stored nor "
                                 "in this batch")
            if not new_images and not new_captions:
                return 0, 0
            self._write(db_journal.append_record(
                state.seq + 1, [{"image_id": image_ids[n], "kind": kind} for n in new_images],
                image_vectors[new_images] if new_images else
                np.zeros((0, state.image_dim), np.float32),
                [dict(captions[n]) for n in new_captions],
                caption_vectors[new_captions] if new_captions else
                np.zeros((0, state.caption_dim), np.float32)))
        return len(new_images), len(new_captions)

    def add_caption_vectors(self, rows: Sequence[int], vectors: np.ndarray) -> int:
        """Give caption rows that have no vector yet theirs (`vectors[i]` is row
        `rows[i]`'s), in ONE journaled write with add_experiment's guarantees. Rows
        another process filled meanwhile are left as they are. Returns how many
        rows got a vector."""
        if self.needs_seed:
            raise RuntimeError("seed the database first")
        vectors = as_vectors(vectors, len(rows)) if len(rows) else None
        with db_journal.locked(self.db_dir):
            self._recover()
            self._refresh()
            state = self.state
            missing = set(state.missing_rows())
            todo = sorted({int(r): n for n, r in enumerate(rows) if int(r) in missing}.items())
            if not todo:
                return 0
            check_dim(vectors[0], state.caption_dim, CAPTION_EMBEDDING_DB)
            self._write(db_journal.embed_record(
                state.seq + 1, [r for r, _ in todo], [self.captions[r] for r, _ in todo],
                vectors[[n for _, n in todo]]))
        return len(todo)

    def _write(self, record: dict[str, Any]) -> None:
        """One journaled write (under the lock), then the in-memory copy follows it."""
        db_journal.build_slots(self.db_dir, self.state)
        new = db_journal.write(self.db_dir, self.state, record, self.captions)
        try:
            row = record.get("replace")
            if row is None:
                self._adopt(new)
            elif record["spans"] is None:  # the caption files were rewritten
                self._load(new)
            else:  # one row changed in place; the vector map shows it already
                self.state = new
                self.captions[row] = record["caption"]
                self._by_image = None
        finally:
            db_journal.finish(self.db_dir)


# Settings a database records, as (DbState field, setting): a command run where it
# exists uses them unless told otherwise (config.resolve).
RECORDED = (("clip_model", "CLIP_MODEL_NAME"), ("caption_model", "CAPTION_EMBEDDING_MODEL"),
            ("dataset", "DATASET_NAME"), ("random_seed", "RANDOM_SEED"),
            ("experiment_samples", "EXPERIMENT_SAMPLES"), ("split_name", "SPLIT"),
            ("memory_dataset", "MEMORY_DATASET"),
            ("query_prompt", "CAPTION_QUERY_PROMPT"),
            ("document_prompt", "CAPTION_DOCUMENT_PROMPT"))
# A captioned collection's result-changing settings, beside its database.
SETTINGS_FILE = "settings.json"
# The captioner of the newest caption is read from this much of captions.jsonl's end.
_TAIL_BYTES = 1 << 16


def recorded_settings(values: Mapping[str, Any], given: frozenset[str] = frozenset(),
                      folder: str | os.PathLike | None = None) -> dict[str, Any]:
    """What the database in values["DB_DIR"] (or that of captioned `folder`) records,
    by setting name, for the settings not in `given`: its models, data set and split,
    caption prompts, and the captioner of its newest caption (a folder's: its
    settings.json); under the key "" the database's folder. {} where no database
    is there yet. Cheap: state.json and the end
    of one file are read, not the databases. A given CLIP or caption model that
    differs from the database's is one line naming both (as check_models)."""
    from folder_index import folder_db_dir
    db_dir = Path(values["DB_DIR"]).expanduser()
    if folder is not None and (folder_db_dir(db_dir, folder) / WORK / STATE).is_file():
        db_dir = folder_db_dir(db_dir, folder)
    else:  # a folder not captioned yet is searched with the memory's models
        folder = None
    state_file = db_dir / WORK / STATE
    if not state_file.is_file():
        return {}
    try:
        state = read_state(state_file)
    except UserError:  # damaged: the command that opens it says so (--check-db reports it)
        return {}
    found: dict[str, Any] = {}
    for field_name, name in RECORDED:
        value = getattr(state, field_name, None)
        if value is not None and not (folder is not None and name in _DATA_SET):
            found[name] = value
    if state.document_prompt is None:  # made before prompts were recorded: none
        document = values["CAPTION_DOCUMENT_PROMPT"]
        if "CAPTION_DOCUMENT_PROMPT" in given and document not in ("auto", ""):
            raise DatabaseConflict(
                f"database {db_dir} was built before caption prompts were recorded, with no "
                f"document (caption) prompt, not {document!r}: leave "
                "--caption-document-prompt out, or use another --db-dir")
        found["CAPTION_DOCUMENT_PROMPT"] = ""
    manifest = db_dir / SETTINGS_FILE
    if manifest.is_file():
        found.update({k.upper(): v for k, v in orjson.loads(manifest.read_bytes()).items()
                      if k.upper() in values and k.upper() not in _NOT_ADOPTED})
    else:
        captioner = _newest_captioner(db_dir / WORK / CAPTION_META)
        if captioner:
            found["VLM_MODEL_NAME"] = captioner
    _check_given_models(db_dir, state, values, given)
    return {"": str(db_dir), **{k: v for k, v in found.items() if k not in given}}


# Recorded for people, not adopted by a folder's commands: the data set's, and where
# files go (a folder database keeps its own results).
_DATA_SET = ("DATASET_NAME", "RANDOM_SEED", "EXPERIMENT_SAMPLES", "SPLIT", "MEMORY_DATASET")
_NOT_ADOPTED = ("DB_DIR", "RESULTS_DIR", "CACHE_DIR", "LOG_LEVEL", "DEVICE", "DTYPE",
                "BATCH_SIZE")


def _check_given_models(db_dir: Path, state: DbState, values: Mapping[str, Any],
                        given: frozenset[str]) -> None:
    wrong = [(what, found, values[name], flag) for what, found, name, flag in (
        ("CLIP model", state.clip_model, "CLIP_MODEL_NAME", "--clip-model-name"),
        ("caption model", state.caption_model, "CAPTION_EMBEDDING_MODEL",
         "--caption-embedding-model")) if name in given and found != values[name]]
    if wrong:
        built = " and ".join(f"{what} {found!r}, not {wanted!r}" for what, found, wanted, _ in wrong)
        options = " and ".join(option for *_, option in wrong)
        raise DatabaseConflict(f"database {db_dir} was built with {built}: use another "
                               f"--db-dir for these settings, or set {options} back")


def _newest_captioner(captions_meta: Path) -> str | None:
    """The captioner ("model") of the newest generated caption in captions.jsonl."""
    try:
        with open(captions_meta, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - _TAIL_BYTES))
            tail = f.read().splitlines()
    except OSError:
        return None
    for line in reversed(tail[1:] if len(tail) > 1 else tail):
        if b'"generated"' in line:
            try:
                entry = orjson.loads(line)
            except orjson.JSONDecodeError:
                continue
            if entry.get("source") == "generated" and entry.get("model"):
                return entry["model"]
    return None


__all__ = ["DbManager", "DbIdentity", "DbState", "FILES", "IMAGE_DB", "CAPTION_DB",
           "CAPTION_EMBEDDING_DB", "JOURNAL", "generated_caption_id",
           "generated_caption_entry", "check_db", "describe_db",
           "repair_db", "backup_db"]
