"""Image embeddings of a folder (or of any id -> image source), cached and updated
incrementally.

The cache is `NAME.npy` (float32 rows) + `NAME.json`
({"model", "dim", "ids", "stamps", "skipped"}), where a stamp says which
version of a file was embedded (size and modification time). On update, a
new or changed file is embedded, a deleted file leaves the index, and nothing
else is recomputed. Unreadable files are skipped with a warning, counted, and
remembered with their stamp so they are not retried until they change.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping

import numpy as np
from PIL import Image

from errors import UserError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
CACHE_VERSION = 1


@dataclass
class IndexUpdate:
    """What one update did."""

    kept: int = 0
    added: int = 0
    changed: int = 0
    removed: int = 0
    skipped: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        return (f"{self.kept} unchanged, {self.added} new, {self.changed} changed, "
                f"{self.removed} removed, {len(self.skipped)} unreadable")


def scan_folder(folder: str | os.PathLike) -> dict[str, str]:
    """Image files under `folder` (recursive), as relative path -> stamp "size:mtime_ns"."""
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise UserError(f"image folder not found: {folder}")
    found = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith("."):
                path = Path(dirpath) / name
                st = path.stat()
                found[path.relative_to(root).as_posix()] = f"{st.st_size}:{st.st_mtime_ns}"
    if not found:
        raise UserError(f"no images in {folder} (looked for {', '.join(IMAGE_EXTENSIONS)}, "
                        "recursively)")
    return found


def cache_name(kind: str, source: str, model: str) -> str:
    """A readable, unique file name for the cache of `source` embedded by `model`."""
    import hashlib
    digest = hashlib.sha256(f"{source}\n{model}".encode()).hexdigest()[:12]
    slug = re.sub(r"[^A-Za-z0-9_-]+", "_", f"{Path(source).name}-{model.rstrip('/')}")[-60:]
    return f"{kind}-{slug}-{digest}"


def update_index(cache: str | os.PathLike, embedder, items: Mapping[str, str],
                 load: Callable[[str], Image.Image]) -> tuple[list[str], np.ndarray, IndexUpdate]:
    """Bring the cached embeddings of `items` (id -> stamp) up to date.

    `embedder` is an image_embedder.ImageEmbedder; `load(id)` opens an image
    (raising UserError if it cannot). Returns the ids in `items` order that
    have an embedding, their (N, D) vectors, and what changed.
    """
    cache = Path(cache)
    old = _read(cache, embedder.key)
    old_rows = {image_id: n for n, image_id in enumerate(old["ids"])} if old else {}
    old_stamps = dict(zip(old["ids"], old["stamps"])) if old else {}
    old_skipped = old["skipped"] if old else {}
    update = IndexUpdate()
    todo, keep = [], {}
    for image_id, stamp in items.items():
        if old_stamps.get(image_id) == stamp:
            keep[image_id] = old_rows[image_id]
        elif old_skipped.get(image_id) == stamp:
            update.skipped.append(image_id)   # still the same unreadable file
        else:
            todo.append(image_id)
    update.kept = len(keep)
    update.removed = sum(1 for i in old_stamps if i not in items)

    embedded: list[str] = []

    def images():
        for image_id in todo:
            try:
                image = load(image_id)
            except UserError as exc:
                log.warning("skipping unreadable image: %s", exc)
                update.skipped.append(image_id)
                yield None  # counted on the bar, not embedded
                continue
            embedded.append(image_id)
            yield image

    fresh = embedder.embed(images(), total=len(todo), progress=len(todo) > 1)
    known = old_stamps.keys() | old_skipped.keys()
    update.changed = sum(1 for i in embedded if i in known)
    update.added = len(embedded) - update.changed
    new_rows = {image_id: n for n, image_id in enumerate(embedded)}
    ids = [i for i in items if i in keep or i in new_rows]
    vectors = np.empty((len(ids), fresh.shape[1]), dtype=np.float32)
    for n, image_id in enumerate(ids):
        vectors[n] = old["vectors"][keep[image_id]] if image_id in keep else fresh[new_rows[image_id]]
    skipped = {i: items[i] for i in update.skipped}
    if old is None or todo or update.removed or skipped != old_skipped:
        _write(cache, embedder.key, ids, [items[i] for i in ids], vectors, skipped)
    if update.skipped:
        log.warning("%d unreadable image(s) left out of the index", len(update.skipped))
    return ids, vectors, update


def _read(cache: Path, model: str) -> dict | None:
    meta_file, array_file = cache.with_suffix(".json"), cache.with_suffix(".npy")
    if not meta_file.is_file():
        return None
    try:
        meta = json.loads(meta_file.read_text())
        if meta.get("version") != CACHE_VERSION or meta["model"] != model:
            return None
        vectors = np.load(array_file, mmap_mode="r")
        if vectors.shape != (len(meta["ids"]), meta["dim"]) or len(meta["stamps"]) != len(
                meta["ids"]):
            raise ValueError("vectors and ids disagree")
        meta["vectors"] = vectors
        meta.setdefault("skipped", {})
        return meta
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("rebuilding unusable index cache %s: %s", cache, exc)
        return None


def _write(cache: Path, model: str, ids: list[str], stamps: list[str], vectors: np.ndarray,
           skipped: dict[str, str]) -> None:
    # A cache, not a database: each file atomic, the JSON (which names the row
    # count) last, and a mismatch on read just rebuilds.
    from atomic_files import atomic_writer, write_text_atomic
    with atomic_writer(cache.with_suffix(".npy")) as f:
        np.save(f, vectors)
    meta = {"version": CACHE_VERSION, "model": model, "dim": int(vectors.shape[1]),
            "ids": ids, "stamps": stamps, "skipped": skipped}
    write_text_atomic(cache.with_suffix(".json"), json.dumps(meta))


def folder_db_dir(db_dir: str | os.PathLike, images_dir: str | os.PathLike) -> Path:
    """Where the caption databases of a captioned folder live (under DB_DIR/folders/)."""
    source = str(Path(images_dir).expanduser().resolve())
    return Path(db_dir) / "folders" / cache_name("captions", source, "")


def index_path(db_dir: str | os.PathLike, kind: str, source: str, model: str) -> Path:
    """The embedding cache of `source` (a folder or a database) for `model`."""
    return Path(db_dir) / "indexes" / cache_name(kind, source, model)
