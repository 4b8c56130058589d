"""The three JSON databases: the pipeline's memory. The only code that writes them.

Files under DB_DIR (all plain JSON that users and scripts can open):

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
     "entries": [{"id" (same as in captions.json), "image_id", "embedding": [D floats]}]}

Keys: one image embedding per image id (the CLIP model is fixed per database);
one generated caption per (image id, VLM model), with id "IMAGE#gen:MODEL", so
re-running an experiment with the same model replaces its entry and another
model adds its own. Human captions have ids "IMAGE#N".

Writes: every file is written to a temporary file in DB_DIR, flushed and
fsynced, then renamed over the old one, so a reader never sees half a file.
A database that cannot be parsed or does not match the models in use is an
error; it is never reset or repaired silently.
"""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import orjson

from errors import UserError

log = logging.getLogger(__name__)

IMAGE_DB = "image_embeddings.json"
CAPTION_DB = "captions.json"
CAPTION_EMBEDDING_DB = "caption_embeddings.json"
FILES = (IMAGE_DB, CAPTION_DB, CAPTION_EMBEDDING_DB)
VERSION = 1


@dataclass(frozen=True)
class DbIdentity:
    """What a database must have been built with to be used with these settings."""

    clip_model: str
    caption_model: str
    dataset: str
    split: str


def generated_caption_id(image_id: str, vlm_model: str) -> str:
    return f"{image_id}#gen:{vlm_model}"


class DbManager:
    """Loads, checks and appends to the three databases in `db_dir`.

    Open with `DbManager.open(db_dir, identity)`; if `needs_seed` is true the
    databases do not exist yet and `seed(...)` creates them.
    """

    def __init__(self, db_dir: Path, identity: DbIdentity):
        self.db_dir = db_dir
        self.identity = identity
        self.image_ids: list[str] = []
        self.image_kinds: list[str] = []
        self.image_vectors = np.zeros((0, 0), dtype=np.float32)
        self.captions: list[dict[str, Any]] = []
        self.caption_vectors = np.zeros((0, 0), dtype=np.float32)
        self.needs_seed = True
        self._by_image: dict[str, list[dict[str, Any]]] | None = None

    # --- loading ---------------------------------------------------------------

    @classmethod
    def open(cls, db_dir: str | os.PathLike, identity: DbIdentity) -> "DbManager":
        """Load the databases in `db_dir`, checking them against `identity`."""
        db = cls(Path(db_dir), identity)
        present = [f for f in FILES if (db.db_dir / f).exists()]
        if not present:
            return db
        if len(present) != len(FILES):
            missing = sorted(set(FILES) - set(present))
            raise UserError(f"database in {db.db_dir} is incomplete: {', '.join(missing)} missing "
                            f"but {', '.join(present)} present; restore the missing file(s) from "
                            "a backup or move the folder away to start a new memory")
        images = db._read(IMAGE_DB, "recap-image-embeddings")
        captions = db._read(CAPTION_DB, "recap-captions")
        caption_embeddings = db._read(CAPTION_EMBEDDING_DB, "recap-caption-embeddings")
        db._check_identity(images, captions, caption_embeddings)
        _check_entries(db.db_dir / IMAGE_DB, images["entries"], {"image_id": str, "kind": str})
        _check_entries(db.db_dir / CAPTION_DB, captions["entries"],
                       {"id": str, "image_id": str, "caption": str, "source": str})
        _check_entries(db.db_dir / CAPTION_EMBEDDING_DB, caption_embeddings["entries"],
                       {"id": str, "image_id": str})
        db.image_ids = [e["image_id"] for e in images["entries"]]
        db.image_kinds = [e["kind"] for e in images["entries"]]
        db.image_vectors = _matrix(db.db_dir / IMAGE_DB, images)
        db.captions = captions["entries"]
        db.caption_vectors = _matrix(db.db_dir / CAPTION_EMBEDDING_DB, caption_embeddings)
        _check_unique(db.db_dir / IMAGE_DB, db.image_ids)
        caption_ids = [c["id"] for c in db.captions]
        _check_unique(db.db_dir / CAPTION_DB, caption_ids)
        if caption_ids != [e["id"] for e in caption_embeddings["entries"]]:
            raise UserError(f"{db.db_dir}: {CAPTION_DB} and {CAPTION_EMBEDDING_DB} list different "
                            "caption ids; restore both from the same backup")
        db.needs_seed = False
        log.info("database %s: %d images, %d captions", db.db_dir, len(db.image_ids),
                 len(db.captions))
        return db

    def _read(self, name: str, fmt: str) -> dict[str, Any]:
        path = self.db_dir / name
        try:
            data = orjson.loads(path.read_bytes())
        except OSError as exc:
            raise UserError(f"database file {path} cannot be read: {exc.strerror}") from None
        except orjson.JSONDecodeError as exc:
            raise UserError(f"database file {path} is corrupt (not valid JSON: {exc}); restore it "
                            "from a backup, or move the database folder away to start anew") from None
        if not isinstance(data, dict) or data.get("format") != fmt or not isinstance(
                data.get("entries"), list):
            raise UserError(f"database file {path} is not a {fmt} file")
        if data.get("version") != VERSION:
            raise UserError(f"database file {path} has version {data.get('version')}, "
                            f"this program reads version {VERSION}")
        return data

    def _check_identity(self, images: dict, captions: dict, caption_embeddings: dict) -> None:
        want = self.identity
        checks = [(IMAGE_DB, "model", images.get("model"), want.clip_model, "--clip-model-name"),
                  (CAPTION_EMBEDDING_DB, "model", caption_embeddings.get("model"),
                   want.caption_model, "--caption-embedding-model")]
        # The data set is recorded for people, not checked: the same images may be
        # loaded from another folder. The split fingerprint (seed + ids) is checked.
        for data, name in ((images, IMAGE_DB), (captions, CAPTION_DB)):
            checks.append((name, "split", data.get("split"), want.split,
                           "--dataset-name / --random-seed / --experiment-samples"))
        for name, field, found, expected, option in checks:
            if found != expected:
                raise UserError(
                    f"database {self.db_dir / name} was built with {field} {found!r}, not "
                    f"{expected!r}: use another --db-dir for these settings, or set {option} "
                    "back")

    # --- reading -----------------------------------------------------------------

    def captions_of(self, image_id: str) -> list[str]:
        """Human captions of an image; its generated captions if it has none."""
        entries = self._captions_by_image().get(image_id, [])
        human = [c["caption"] for c in entries if c["source"] == "human"]
        return human or [c["caption"] for c in entries]

    def _captions_by_image(self) -> dict[str, list[dict[str, Any]]]:
        if self._by_image is None:
            self._by_image = {}
            for entry in self.captions:
                self._by_image.setdefault(entry["image_id"], []).append(entry)
        return self._by_image

    # --- writing ------------------------------------------------------------------

    def seed(self, image_ids: Sequence[str], image_vectors: np.ndarray,
             captions: Sequence[dict[str, Any]], caption_vectors: np.ndarray) -> None:
        """Create the databases from the training pool (first run only)."""
        if not self.needs_seed:
            raise RuntimeError("database already exists")
        self.image_ids = list(image_ids)
        self.image_kinds = ["train"] * len(self.image_ids)
        self.image_vectors = _as_vectors(image_vectors, len(self.image_ids))
        self.captions = [dict(c) for c in captions]
        self._by_image = None
        self.caption_vectors = _as_vectors(caption_vectors, len(self.captions))
        _check_unique(self.db_dir / IMAGE_DB, self.image_ids)
        _check_unique(self.db_dir / CAPTION_DB, [c["id"] for c in self.captions])
        self._write_all()
        self.needs_seed = False
        log.info("created database %s: %d images, %d captions", self.db_dir,
                 len(self.image_ids), len(self.captions))

    def add_experiment(self, image_id: str, image_vector: np.ndarray, caption: str,
                       caption_vector: np.ndarray, vlm_model: str, experiment_index: int,
                       timestamp: str) -> None:
        """Append (or replace) an experiment image's embedding and generated caption."""
        if self.needs_seed:
            raise RuntimeError("seed the database first")
        image_vector = _as_vectors(image_vector, 1)[0]
        caption_vector = _as_vectors(caption_vector, 1)[0]
        _check_dim(image_vector, self.image_vectors, IMAGE_DB)
        _check_dim(caption_vector, self.caption_vectors, CAPTION_EMBEDDING_DB)
        image_ids, image_kinds = list(self.image_ids), list(self.image_kinds)
        image_vectors = self.image_vectors
        if image_id in image_ids:
            image_vectors = image_vectors.copy()
            image_vectors[image_ids.index(image_id)] = image_vector
        else:
            image_ids.append(image_id)
            image_kinds.append("experiment")
            image_vectors = np.vstack([image_vectors, image_vector[None]])
        entry = {"id": generated_caption_id(image_id, vlm_model), "image_id": image_id,
                 "caption": caption, "source": "generated", "model": vlm_model,
                 "experiment_index": experiment_index, "timestamp": timestamp}
        captions = list(self.captions)
        caption_vectors = self.caption_vectors
        position = next((i for i, c in enumerate(captions) if c["id"] == entry["id"]), None)
        if position is None:
            captions.append(entry)
            caption_vectors = np.vstack([caption_vectors, caption_vector[None]])
        else:
            captions[position] = entry
            caption_vectors = caption_vectors.copy()
            caption_vectors[position] = caption_vector
        # Only adopt the new state once it is on disk, so a failed write leaves
        # memory and files as they were.
        previous = (self.image_ids, self.image_kinds, self.image_vectors, self.captions,
                    self.caption_vectors)
        self.image_ids, self.image_kinds, self.image_vectors = image_ids, image_kinds, image_vectors
        self.captions, self.caption_vectors = captions, caption_vectors
        self._by_image = None
        try:
            self._write_all()
        except BaseException:
            (self.image_ids, self.image_kinds, self.image_vectors, self.captions,
             self.caption_vectors) = previous
            raise

    def _write_all(self) -> None:
        ident = self.identity
        images = {"format": "recap-image-embeddings", "version": VERSION,
                  "model": ident.clip_model, "dim": int(self.image_vectors.shape[1]),
                  "dataset": ident.dataset, "split": ident.split,
                  "entries": [{"image_id": i, "kind": k, "embedding": v} for i, k, v in
                              zip(self.image_ids, self.image_kinds, self.image_vectors)]}
        captions = {"format": "recap-captions", "version": VERSION,
                    "dataset": ident.dataset, "split": ident.split, "entries": self.captions}
        caption_embeddings = {
            "format": "recap-caption-embeddings", "version": VERSION,
            "model": ident.caption_model, "dim": int(self.caption_vectors.shape[1]),
            "entries": [{"id": c["id"], "image_id": c["image_id"], "embedding": v}
                        for c, v in zip(self.captions, self.caption_vectors)]}
        self.db_dir.mkdir(parents=True, exist_ok=True)
        # Write all three temporary files first, then rename them one after the
        # other: the window in which the files disagree is three renames long.
        staged = [(_stage(self.db_dir, name, data)) for name, data in
                  ((CAPTION_EMBEDDING_DB, caption_embeddings), (CAPTION_DB, captions),
                   (IMAGE_DB, images))]
        try:
            for tmp, final in staged:
                os.replace(tmp, final)
        finally:
            for tmp, _ in staged:
                if os.path.exists(tmp):
                    os.unlink(tmp)
        _fsync_dir(self.db_dir)


def write_json_atomic(path: str | os.PathLike, data: Any) -> None:
    """Write `data` as JSON so that readers see the old file or the new one, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp, final = _stage(path.parent, path.name, data, indent=True)
    try:
        os.replace(tmp, final)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    _fsync_dir(path.parent)


def _stage(db_dir: Path, name: str, data: Any, indent: bool = False) -> tuple[str, Path]:
    option = orjson.OPT_SERIALIZE_NUMPY | (orjson.OPT_INDENT_2 if indent else 0)
    blob = orjson.dumps(data, option=option)
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=db_dir)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(blob)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        os.unlink(tmp)
        raise
    return tmp, db_dir / name


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # not possible on every platform (Windows)
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _as_vectors(x: np.ndarray, rows: int) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    if x.ndim == 1:
        x = x[None]
    if x.shape[0] != rows:
        raise ValueError(f"expected {rows} vectors, got {x.shape[0]}")
    if not np.isfinite(x).all():
        raise ValueError("vectors contain NaN or inf")
    return x


def _check_dim(vector: np.ndarray, matrix: np.ndarray, name: str) -> None:
    if matrix.size and vector.shape[0] != matrix.shape[1]:
        raise UserError(f"{name} holds {matrix.shape[1]}-d vectors, got a {vector.shape[0]}-d one")


def _check_unique(path: Path, ids: Sequence[str]) -> None:
    if len(set(ids)) != len(ids):
        seen, dup = set(), None
        for i in ids:
            if i in seen:
                dup = i
                break
            seen.add(i)
        raise UserError(f"database file {path} has duplicate id {dup!r}")


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
