"""Caption datastores (SmallCap's retrieval): captions with their CLIP text vectors, searched
by an image's CLIP image vector (RETRIEVE "captions").

    from caption_datastore import datastore_for
    store = datastore_for(models, memory)      # the memory's captions (+ CAPTION_DATASTORE)
    store.search(image_vector, k, exclude={"1000268201_693b08cb0e.jpg#0"})

A datastore holds the memory's captions (human and generated: Memory.captions_of of each
row), a corpus of captions without images (CAPTION_DATASTORE: .txt one per line, .jsonl or
.csv with a `caption` column, .parquet), or both (CAPTION_DATASTORE_ONLY drops the
memory's). Every entry has a key: "IMAGE#N" for the memory's N-th caption of IMAGE,
"corpus:FILE:LINE" for a corpus line.

Text vectors are made once per caption text and CLIP model and kept beside the memory:

    DB_DIR/clip_text_vectors/<model>/NNNNNN.npy    (n, D) float32 unit vectors
    DB_DIR/clip_text_vectors/<model>/NNNNNN.json   {"model", "dim", "texts": [n texts]}

one pair per chunk of TEXT_CHUNK texts, each file written atomically and the .json last:
a chunk counts once its .json is there, so a killed run keeps every chunk it finished
and the next run embeds only the texts no chunk holds (`text_vectors`).

Importing this module loads nothing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Sequence

import config
from errors import UserError

if TYPE_CHECKING:
    import numpy as np

    from memory import Memory
    from models import Models
    from similarity_search import Neighbour as Hit

log = logging.getLogger("caption_datastore")

VECTORS_DIR = "clip_text_vectors"
# Texts per saved chunk: a killed run loses at most this much work (~15 s with CLIP
# ViT-B/32's text tower on 2 CPU cores). A multiple of any usual BATCH_SIZE, so a rerun
# embeds its texts in the batches one uninterrupted run would.
TEXT_CHUNK = 4096
# Texts embedded first to time the rest (the estimate in the log).
_PROBE = 64
CORPUS_SUFFIXES = config.CORPUS_SUFFIXES
CORPUS_PREFIX = "corpus:"


# --- corpora ------------------------------------------------------------------------------

@dataclass(frozen=True)
class CorpusLine:
    """A caption of a corpus and where it is: the line of a .txt / .jsonl, the line a
    .csv row starts on, the row of a .parquet (1 = its first row)."""

    text: str
    file: str
    line: int

    @property
    def key(self) -> str:
        return f"{CORPUS_PREFIX}{self.file}:{self.line}"


def read_corpus(path: str | Path) -> list[CorpusLine]:
    """The captions of a corpus file, blank ones left out. UserError for a missing
    file, another format, or no `caption` column."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"--caption-datastore {path}: no such file")
    suffix = path.suffix.lower()
    if suffix not in CORPUS_SUFFIXES:
        raise UserError(f"--caption-datastore {path}: expected a .txt (one caption per line), "
                        ".jsonl or .csv (a 'caption' column) or .parquet file")
    name = str(path)
    if suffix == ".parquet":
        rows = enumerate(_parquet_captions(path), start=1)
    else:
        with open(path, encoding="utf-8-sig", newline="") as f:
            text = f.read()
        rows = {".txt": _txt_rows, ".jsonl": _jsonl_rows, ".csv": _csv_rows}[suffix](text, path)
    lines = [CorpusLine(c.strip(), name, n) for n, c in rows
             if isinstance(c, str) and c.strip()]
    if not lines:
        raise UserError(f"--caption-datastore {path}: no captions in it")
    return lines


def _txt_rows(text: str, path: Path) -> Iterable[tuple[int, str]]:
    return enumerate(text.splitlines(), start=1)


def _jsonl_rows(text: str, path: Path) -> Iterable[tuple[int, Any]]:
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(f"--caption-datastore {path}, line {n}: not JSON ({exc.msg})") from None
        if not isinstance(record, dict) or "caption" not in record:
            raise UserError(f"--caption-datastore {path}, line {n}: expected an object with a "
                            "'caption' field")
        yield n, record["caption"]


def _csv_rows(text: str, path: Path) -> Iterable[tuple[int, str]]:
    import csv
    import io
    reader = csv.DictReader(io.StringIO(text))
    if "caption" not in (reader.fieldnames or []):
        raise UserError(f"--caption-datastore {path}: no 'caption' column (columns: "
                        f"{', '.join(reader.fieldnames or []) or 'none'})")
    start = reader.line_num + 1          # the line the next row starts on
    for row in reader:
        yield start, row["caption"]
        start = reader.line_num + 1


def _parquet_captions(path: Path) -> list[Any]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise UserError("reading a .parquet caption datastore needs pyarrow "
                        "(pip install -r requirements-scale.txt)") from None
    schema = pq.read_schema(path)
    if "caption" not in schema.names:
        raise UserError(f"--caption-datastore {path}: no 'caption' column (columns: "
                        f"{', '.join(schema.names)})")
    return pq.read_table(path, columns=["caption"]).column("caption").to_pylist()


def normalise(text: str) -> str:
    """A caption compared by words: lower case, runs of spaces as one, no trailing
    full stop ("A dog runs ." and "a dog  runs" are one caption)."""
    return re.sub(r"\s+", " ", text.lower()).strip().rstrip(" .")


# --- the text vectors, made once --------------------------------------------------------------

def vectors_folder(db_dir: str | Path, model_key: str) -> Path:
    """Where the CLIP text vectors of `model_key` (ImageEmbedder.key) are kept."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", model_key).strip("_")[:80]
    digest = hashlib.sha1(model_key.encode("utf-8")).hexdigest()[:8]
    return Path(db_dir).expanduser() / VECTORS_DIR / f"{slug}-{digest}"


def stored_vectors(folder: Path, model_key: str) -> dict[str, "np.ndarray"]:
    """Text -> vector of every finished chunk in `folder` (a chunk whose .json is
    missing or does not match its .npy is a run's unfinished write: ignored)."""
    import numpy as np
    found: dict[str, np.ndarray] = {}
    for meta_file in sorted(folder.glob("[0-9]*.json")):
        try:
            meta = json.loads(meta_file.read_text(encoding="utf-8"))
            vectors = np.load(meta_file.with_suffix(".npy"), mmap_mode="r")
        except (OSError, ValueError) as exc:
            log.warning("ignoring %s: %s", meta_file, exc)
            continue
        texts = meta.get("texts", [])
        if meta.get("model") != model_key or len(texts) != len(vectors):
            log.warning("ignoring %s: not %d vectors of %s", meta_file, len(texts), model_key)
            continue
        found.update(zip(texts, vectors))
    return found


class TextVectors:
    """The CLIP text vectors of one model kept in DB_DIR/clip_text_vectors: read once,
    then each text not held embedded (and saved) when first asked for."""

    def __init__(self, embedder, db_dir: str | Path):
        self.embedder = embedder
        self.folder = vectors_folder(db_dir, embedder.key)
        self._stored: dict[str, "np.ndarray"] | None = None

    def __call__(self, texts: Sequence[str], chunk: int | None = None,
                 progress: bool = True) -> "np.ndarray":
        """(len(texts), D) unit vectors of `texts`: the stored ones read, the others
        embedded in chunks of `chunk` (TEXT_CHUNK), each saved before the next starts,
        with a progress bar and a time estimate when there are many."""
        import numpy as np
        from tqdm import tqdm
        embedder = self.embedder
        if self._stored is None:
            self._stored = stored_vectors(self.folder, embedder.key) \
                if self.folder.is_dir() else {}
        stored = self._stored
        missing = list(dict.fromkeys(t for t in texts if t not in stored))
        if missing:
            step = chunk or TEXT_CHUNK
            many = len(missing) > step
            start = time.perf_counter()
            probe = embedder.embed_texts(missing[:min(_PROBE, step)])
            if many:
                rate = len(probe) / max(time.perf_counter() - start, 1e-9)
                log.info("embedding %d captions with the CLIP text tower of %s once (kept in "
                         "%s): about %s at %.0f captions/s", len(missing), embedder.name,
                         self.folder, _duration(len(missing) / rate), rate)
            number = _next_chunk(self.folder)
            with tqdm(total=len(missing), initial=len(probe), unit="caption", disable=not (
                    progress and many), desc="embedding captions (CLIP text)") as bar:
                for begin in range(0, len(missing), step):
                    batch = missing[begin:begin + step]
                    rest = batch[len(probe):] if begin == 0 else batch
                    fresh = embedder.embed_texts(rest) if rest else probe[:0]
                    vectors = np.concatenate([probe, fresh]) if begin == 0 else fresh
                    _save_chunk(self.folder, number, embedder.key, batch, vectors)
                    stored.update(zip(batch, vectors))
                    number += 1
                    bar.update(len(fresh))
            if many:
                seconds = time.perf_counter() - start
                log.info("embedded %d captions in %.1f s (%.0f captions/s)", len(missing),
                         seconds, len(missing) / max(seconds, 1e-9))
        if not texts:
            return np.zeros((0, embedder.dim), np.float32)
        return np.stack([stored[t] for t in texts]).astype(np.float32, copy=False)


def text_vectors(embedder, texts: Sequence[str], db_dir: str | Path,
                 chunk: int | None = None, progress: bool = True) -> "np.ndarray":
    """(len(texts), D) CLIP text vectors of `texts` with `embedder` (an ImageEmbedder
    with a text tower), each text embedded once per model: see TextVectors."""
    return TextVectors(embedder, db_dir)(texts, chunk, progress)


def text_vectors_for(models: "Models") -> TextVectors:
    """The stored CLIP text vectors of the settings' CLIP model, once per process."""
    from models import cached
    embedder = models.image_embedder
    db_dir = Path(models.settings.db_dir).expanduser().resolve()
    return cached("clip_text_vectors", (embedder.key, str(db_dir)),
                  lambda: TextVectors(embedder, db_dir))


def _next_chunk(folder: Path) -> int:
    numbers = [int(p.stem) for p in folder.glob("[0-9]*.npy") if p.stem.isdigit()] + \
        [int(p.stem) for p in folder.glob("[0-9]*.json") if p.stem.isdigit()]
    return max(numbers, default=-1) + 1


def _save_chunk(folder: Path, number: int, model_key: str, texts: Sequence[str],
                vectors: "np.ndarray") -> None:
    import numpy as np

    from atomic_files import atomic_writer, write_json_atomic
    try:
        with atomic_writer(folder / f"{number:06d}.npy") as f:
            np.save(f, np.ascontiguousarray(vectors, dtype=np.float32))
        # the .json last: the chunk counts once it is there
        write_json_atomic(folder / f"{number:06d}.json",
                          {"model": model_key, "dim": int(vectors.shape[1]),
                           "texts": list(texts)})
    except PermissionError:
        raise UserError(f"cannot write the caption vectors to {folder}: permission denied "
                        "(use a --db-dir you can write to)") from None


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min"


# --- the datastore ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Entry:
    """One caption of a datastore."""

    key: str                      # "IMAGE#N" or "corpus:FILE:LINE"
    text: str
    image_id: str = ""            # the memory row it describes; "" for a corpus line
    file: str = ""                # the corpus file; "" for a memory caption
    line: int = 0

    @property
    def source(self) -> str:
        """Where it came from: "memory", or "FILE:LINE" of its corpus."""
        return f"{self.file}:{self.line}" if self.file else "memory"


class CaptionDatastore:
    """Captions and their CLIP text vectors, searchable by an image's CLIP vector
    (similarity_search.SearchIndex: exact, or an ANN backend for large corpora)."""

    def __init__(self, entries: Sequence[Entry], vectors: "np.ndarray", backend: str = "numpy"):
        from similarity_search import SearchIndex
        self.entries = list(entries)
        self.index = SearchIndex.from_vectors([e.key for e in self.entries], vectors, backend)
        self._row = {e.key: n for n, e in enumerate(self.entries)}
        self._keys_of: dict[str, list[str]] | None = None
        self._corpus_by_text: dict[str, list[str]] | None = None

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def vectors(self) -> "np.ndarray":
        return self.index.vectors

    def entry(self, key: str) -> Entry:
        return self.entries[self._row[key]]

    def vector(self, key: str) -> "np.ndarray":
        return self.index.vectors[self._row[key]]

    def keys_of(self, image_id: str) -> list[str]:
        """Keys of the captions of a memory row."""
        if self._keys_of is None:
            self._keys_of = {}
            for e in self.entries:
                if e.image_id:
                    self._keys_of.setdefault(e.image_id, []).append(e.key)
        return self._keys_of.get(image_id, [])

    def corpus_keys_like(self, texts: Iterable[str]) -> list[str]:
        """Keys of the corpus captions identical to one of `texts` after `normalise`."""
        if self._corpus_by_text is None:
            self._corpus_by_text = {}
            for e in self.entries:
                if e.file:
                    self._corpus_by_text.setdefault(normalise(e.text), []).append(e.key)
        return [key for text in {normalise(t) for t in texts}
                for key in self._corpus_by_text.get(text, [])]

    def search(self, vector: "np.ndarray", k: int, exclude: Iterable[str] = ()) -> list["Hit"]:
        """The `k` captions nearest to `vector` (similarity_search.Neighbour, its
        image_id the entry's key), best first, none whose key is in `exclude`."""
        return self.index.search(vector, k, exclude=[set(exclude)])[0]


def memory_entries(memory: "Memory") -> list[Entry]:
    """The captions of the memory's rows (not those added in this process)."""
    added = memory.added
    return [Entry(f"{image_id}#{n}", text, image_id=image_id)
            for image_id in memory.ids if image_id not in added
            for n, text in enumerate(memory.captions_of(image_id))]


def build(entries: Sequence[Entry], vectors: TextVectors,
          backend: str = "numpy") -> CaptionDatastore:
    """A datastore of `entries`, their vectors made (once) by `vectors`."""
    return CaptionDatastore(entries, vectors([e.text for e in entries]), backend)


def datastore_for(models: "Models", memory: "Memory") -> CaptionDatastore:
    """The datastore of `models.settings`: the memory's captions (unless
    CAPTION_DATASTORE_ONLY) and CAPTION_DATASTORE's, once per process while neither
    changes (the rows `memory` had when it was made; rows added later are the
    retriever's to add)."""
    from models import cached
    settings = models.settings
    corpus = settings.caption_datastore
    if settings.caption_datastore_only and not corpus:
        raise UserError("--caption-datastore-only needs --caption-datastore FILE")
    entries = [] if settings.caption_datastore_only else memory_entries(memory)
    corpus_key = None
    if corpus:
        path = Path(corpus).expanduser().resolve()
        stat = path.stat() if path.is_file() else None
        corpus_key = (str(path), stat and stat.st_size, stat and stat.st_mtime_ns)
    digest = hashlib.sha1("\n".join(f"{e.key}\t{e.text}" for e in entries).encode()).hexdigest()
    embedder = models.image_embedder
    key = (embedder.key, settings.db_dir, digest, corpus_key, settings.caption_datastore_index)

    def make() -> CaptionDatastore:
        lines = read_corpus(corpus) if corpus else []
        every = entries + [Entry(c.key, c.text, file=c.file, line=c.line) for c in lines]
        if not every:
            raise UserError("the caption datastore is empty: the memory has no captions and "
                            "no --caption-datastore FILE was given")
        log.info("caption datastore: %d captions (%d of the memory, %d of %s)", len(every),
                 len(entries), len(lines), corpus or "no corpus")
        return build(every, text_vectors_for(models), settings.caption_datastore_index)
    return cached("caption_datastore", key, make)

