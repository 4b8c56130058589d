"""The memory retrieval reads: its database opened (built from the training pool on a
first run), its rows as a `Memory`, and the vectors its captions are missing.

    from memory import Memory, initialize
    dataset, db = initialize(settings)               # data set, database (seeded once)
    memory = Memory.from_db(db, growing=False)       # the rows retrieval reads

Nothing here writes a database but through db_manager.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Protocol, Sequence

import availability
import config
from errors import UserError
from models import Models, cached, load_dataset, load_models

if TYPE_CHECKING:
    import numpy as np

    from dataset_loader import Collection
    from db_manager import DbManager

log = logging.getLogger("memory")

def identity(settings: config.Settings, dataset: "Collection"):
    """What the database in DB_DIR must have been built with, for these settings:
    models, split and the caption model's prompts (finished by config.resolve)."""
    from dataset_loader import collection_label
    from db_manager import DbIdentity
    return DbIdentity(clip_model=settings.clip_model_name,
                      caption_model=settings.caption_embedding_model,
                      # a local folder by its absolute path: a later command from
                      # another folder (search.py) finds it from the database alone
                      dataset=collection_label(settings.dataset_name),
                      split=dataset.fingerprint, random_seed=settings.random_seed,
                      experiment_samples=settings.experiment_samples,
                      query_prompt=settings.caption_query_prompt,
                      document_prompt=settings.caption_document_prompt,
                      split_name=settings.split,
                      memory_dataset=settings.memory_dataset and collection_label(
                          settings.memory_dataset))


def initialize(settings: config.Settings, captioner: bool = True
               ) -> tuple["Collection", "DbManager"]:
    """The data set and the database manager for `settings` (one per DB_DIR and
    models in a process, reused); on a first run the memory is built from the
    training pool. First every model (the captioner too, unless `captioner` is
    false) and the data set must be available: one line names all that are not.
    The database is checked against the settings' models, split and caption
    prompts before any model loads."""
    from db_manager import DbManager
    availability.require(settings, availability.PARTS if captioner else availability.PARTS[:3])
    dataset = load_dataset(settings)
    db_dir = Path(settings.db_dir).expanduser().resolve()
    wanted = identity(settings, dataset)
    db = cached("db", (db_dir, wanted), lambda: DbManager.open(db_dir, wanted))
    if db.describe().empty:
        seed_memory(load_models(settings), dataset, db)
    if settings.neighbour_selection == "dedup":  # it compares the neighbours' captions too
        embed_missing_captions(load_models(settings).caption_embedder, db)
    return dataset, db


def seed_memory(models: Models, dataset: "Collection", db: "DbManager") -> None:
    """First run: the training pool's image embeddings and captions. Not their
    captions' vectors: captioning reads image vectors alone, so those are made when
    something first needs them (embed_missing_captions)."""
    from image_embedder import embed_pool
    settings = models.settings
    log.info("building the memory from %d training images (first run in %s)",
             len(dataset.train), settings.db_dir)
    ids, image_vectors = embed_pool(
        models.image_embedder, [s.image_id for s in dataset.train],
        lambda image_id: dataset.load_image(dataset.get(image_id)),
        settings.cache_dir, cache_key=f"{settings.dataset_name}|{dataset.fingerprint}")
    captions = [{"id": f"{image_id}#{n}", "image_id": image_id, "caption": text,
                 "source": "human"}
                for image_id in ids for n, text in enumerate(dataset.get(image_id).captions)]
    db.seed(ids, image_vectors, captions, caption_dim=models.caption_embedder.dim)
    log.info("stored %d human captions; their vectors are made when first needed (text "
             "search over captions, or `python main.py --embed-captions` ahead of time)",
             len(captions))


# Captions per journaled write when the memory's captions get their vectors: a killed
# run loses at most this much work (~40 s with BGE-base on 2 CPU cores).
EMBED_CHUNK = 2048
# The first captions are embedded alone, so that the bar shows a rate and an ETA at once.
_PROBE = 64


def embed_missing_captions(embedder, db: "DbManager", chunk: int | None = None) -> int:
    """Give the memory's captions that have no vector yet (after a first run: the
    training pool's human captions) theirs, once, with `embedder` (the caption model
    the database was built with: caption_embedder_for). Saved in journaled chunks, so
    a killed run keeps what it saved and the next call does the rest. Returns how many
    captions got a vector (0: none was missing). The bar times the whole job; the
    closing log line gives the same duration."""
    import os

    import numpy as np
    from tqdm import tqdm
    rows = db.missing_caption_rows()
    if not rows:
        return 0
    if not os.access(db.db_dir, os.W_OK):
        raise UserError(f"{len(rows)} captions of the memory in {db.db_dir} have no vectors "
                        "yet and the folder is not writable: run `python main.py "
                        "--embed-captions` once where it is")
    texts = [entry.caption for entry in db.entries(rows)]
    step = chunk or EMBED_CHUNK
    log.info("embedding %d captions of the memory once (the training pool's human captions "
             "have no vectors yet) with %s", len(rows),
             getattr(embedder, "name", "the caption model"))
    saved = 0
    with tqdm(total=len(rows), unit="caption", desc="embedding captions") as bar:
        for begin in range(0, len(rows), step):
            end = min(begin + step, len(rows))
            cuts = [begin] + ([_PROBE] if begin < _PROBE < end else []) + [end]
            vectors = []
            for a, b in zip(cuts, cuts[1:]):
                vectors.append(embedder.embed_captions(texts[a:b]))
                bar.update(b - a)
            saved += db.add_caption_vectors(rows[begin:end], np.concatenate(vectors))
        elapsed = bar.format_dict["elapsed"]
    log.info("embedded %d captions in %s (%.0f captions/s); saved in %s", len(rows),
             tqdm.format_interval(elapsed), len(rows) / max(elapsed, 1e-9), db.db_dir)
    return saved


def caption_embedder_for(settings: config.Settings, db: "DbManager"):
    """The caption embedder of `settings`, checked to embed with the prompts `db`
    recorded: a search embeds its query the way the database was built."""
    embedder = load_models(settings).caption_embedder
    db.check_caption_prompts(embedder.prompts.query, embedder.prompts.document)
    return embedder


class CaptionedImage(Protocol):
    """What save_caption stores (pipeline.Captioned is one): named here, so the memory
    does not import the caption step that imports it."""

    image_id: str
    caption: str
    vector: "np.ndarray"             # the image's (D,) CLIP vector
    caption_vector: "np.ndarray"     # the caption's (D',) vector


def save_caption(db: "DbManager", record: CaptionedImage, vlm_model: str,
                 experiment_index: int | None = None) -> str:
    """Save a captioned image (pipeline.Captioned: its CLIP vector, caption and caption
    vector) to `db`, the one way every entry point does (an experiment, a captioned
    folder, the web page); `experiment_index` for the data set's experiment images
    only. Returns the timestamp it was saved with (ISO 8601, local time zone)."""
    from datetime import datetime, timezone
    stamp = datetime.now(timezone.utc).astimezone().isoformat(timespec="seconds")
    db.add_experiment(record.image_id, record.vector, record.caption, record.caption_vector,
                      vlm_model=vlm_model, experiment_index=experiment_index, timestamp=stamp)
    return stamp


class Memory:
    """The rows retrieval reads: ids, (N, D) float32 unit vectors, kinds and captions.

    `growing`: rows added with `add` are retrieved by the images captioned after
    them, within one batch too (the caption step adds each image it captions).
    Frozen: the rows stay as they are. Adding changes only this view; the
    database is written by its callers.
    """

    def __init__(self, ids: Sequence[str], vectors: "np.ndarray",
                 captions_of: Callable[[str], Sequence[str]],
                 kinds: Sequence[str] | None = None, growing: bool = False,
                 caption_vector_of: Callable[[str], "np.ndarray | None"] | None = None):
        import numpy as np
        self._ids = list(ids)
        self._vectors = np.asarray(vectors, dtype=np.float32)
        if self._vectors.ndim != 2 or len(self._ids) != len(self._vectors):
            raise ValueError(f"{len(self._ids)} ids for vectors of shape {self._vectors.shape}")
        self._kinds = list(kinds) if kinds is not None else ["memory"] * len(self._ids)
        self._captions_of = captions_of
        # a row's captions as one unit vector (NEIGHBOUR_SELECTION "dedup"); None: unknown
        self._caption_vector_of = caption_vector_of
        self.growing = growing
        # rows added in this process: id -> (vector, kind); captions None while pending
        self._added: dict[str, tuple[Any, str]] = {}
        self._added_captions: dict[str, list[str] | None] = {}
        self._replaced: set[str] = set()     # added ids that replace a row of `ids`
        self._base: set[str] | None = None   # the ids given, as a set (made on first add)
        self._position: dict[str, int] | None = None   # row of each id given (vectors_of)

    @classmethod
    def from_db(cls, db: "DbManager", growing: bool) -> "Memory":
        """The database's rows: all of them (growing), or the training pool only
        (frozen), so results do not depend on what ran before."""
        rows = db.image_rows(None if growing else "train")
        return cls(rows.ids, rows.vectors, db.captions_of, rows.kinds, growing=growing,
                   caption_vector_of=caption_vector_lookup(db))

    @classmethod
    def from_rows(cls, ids: Sequence[str], vectors: "np.ndarray",
                  captions: Sequence[Sequence[str]], growing: bool = False) -> "Memory":
        """A memory of given rows, each with its captions (a broadcast copy)."""
        by_id = {image_id: list(c) for image_id, c in zip(ids, captions)}
        return cls(ids, vectors, lambda image_id: by_id.get(image_id, []), growing=growing)

    @classmethod
    def empty(cls, dim: int = 0) -> "Memory":
        """No rows: every prompt is the plain one."""
        import numpy as np
        return cls([], np.zeros((0, dim), np.float32), lambda image_id: [])

    def read_only(self) -> "Memory":
        """The same rows, never added to: a collection (--caption-folder, scale/) reads
        the whole memory under MEMORY "growing" but keeps its captions elsewhere."""
        import copy
        view = copy.copy(self)
        view.growing = False
        return view

    def __len__(self) -> int:
        return len(self._ids) + len(self._added) - len(self._replaced)

    @property
    def ids(self) -> list[str]:
        return [i for i in self._ids if i not in self._added] + list(self._added)

    @property
    def kinds(self) -> list[str]:
        kept = [k for i, k in zip(self._ids, self._kinds) if i not in self._added]
        return kept + [kind for _, kind in self._added.values()]

    @property
    def vectors(self) -> "np.ndarray":
        """(N, D) rows in `ids` order (a copy when rows were added)."""
        import numpy as np
        if not self._added:
            return self._vectors
        keep = [n for n, i in enumerate(self._ids) if i not in self._added]
        return np.concatenate([self._vectors[keep],
                               np.stack([v for v, _ in self._added.values()])])

    @property
    def added(self) -> set[str]:
        """Ids of the rows added to this view (the images captioned into it)."""
        return set(self._added)

    @property
    def pending(self) -> set[str]:
        """Rows added without a caption yet (their image is being captioned)."""
        return {i for i, c in self._added_captions.items() if c is None}

    def search(self, vector: "np.ndarray", k: int, exclude: Sequence[str] = ()) -> list:
        """The `k` rows most similar to `vector` (similarity_search.Neighbour), best
        first, never one whose id is in `exclude`; ties by row order."""
        from similarity_search import Neighbour as Hit
        from similarity_search import top_k
        if k <= 0 or not len(self):
            return []
        hits = []
        if self._ids:
            skip = set(exclude) | set(self._added)  # an added row replaces its old one
            hits += [(h.score, n, h.image_id) for n, h in enumerate(
                top_k(vector, self._vectors, self._ids, k, exclude=skip))]
        if self._added:
            import numpy as np
            added = list(self._added)
            hits += [(h.score, len(self._ids) + n, h.image_id) for n, h in enumerate(
                top_k(vector, np.stack([v for v, _ in self._added.values()]), added, k,
                      exclude=set(exclude)))]
        hits.sort(key=lambda h: (-h[0], h[1]))
        return [Hit(rank, image_id, score) for rank, (score, _, image_id)
                in enumerate(hits[:k], start=1)]

    def _positions(self) -> dict[str, int]:
        if self._position is None:      # indexed on first use
            self._position = {image_id: n for n, image_id in enumerate(self._ids)}
        return self._position

    def __contains__(self, image_id: object) -> bool:
        """Whether `image_id` is a row (given or added)."""
        return image_id in self._added or image_id in self._positions()

    def vectors_of(self, ids: Sequence[str]) -> "np.ndarray":
        """(len(ids), D) vectors of rows by id (an added row's own vector)."""
        import numpy as np
        position = self._positions()
        return np.stack([self._added[i][0] if i in self._added else
                         self._vectors[position[i]] for i in ids]) if ids else \
            np.zeros((0, self._vectors.shape[1]), np.float32)

    def caption_vector_of(self, image_id: str) -> "np.ndarray | None":
        """A row's captions as one unit vector (their mean); None when unknown (a row
        added here, a memory without caption vectors)."""
        if image_id in self._added or self._caption_vector_of is None:
            return None
        return self._caption_vector_of(image_id)

    def captions_of(self, image_id: str) -> list[str]:
        """The captions of a row: a row added here has its generated caption only."""
        if image_id in self._added_captions:
            return list(self._added_captions[image_id] or [])
        return list(self._captions_of(image_id))

    def add(self, image_id: str, vector: "np.ndarray", caption: str | None = None,
            kind: str = "experiment") -> None:
        """A row for `image_id` (replacing one of the same id); `caption` None: pending."""
        import numpy as np
        if self._base is None:
            self._base = set(self._ids)
        if image_id in self._base:
            self._replaced.add(image_id)
        self._added.pop(image_id, None)
        self._added[image_id] = (np.asarray(vector, np.float32).reshape(-1), kind)
        self._added_captions[image_id] = None if caption is None else [caption]

    def set_caption(self, image_id: str, caption: str) -> None:
        self._added_captions[image_id] = [caption]

    def remove(self, image_id: str) -> None:
        """Drop a row added here (its image failed: nothing is saved for it)."""
        self._added.pop(image_id, None)
        self._added_captions.pop(image_id, None)
        self._replaced.discard(image_id)


def caption_vector_lookup(db: "DbManager") -> Callable[[str], "np.ndarray | None"]:
    """image id -> the unit mean of its caption vectors (human ones where it has
    any, as captions_of), computed on first use; None where they have no vectors.
    The database's vectors as they were at the first lookup."""
    vectors: Any = None
    missing: set[int] = set()          # caption rows without a vector, read with vectors
    cache: dict[str, Any] = {}

    def lookup(image_id: str):
        nonlocal vectors, missing
        from neighbour_selection import mean_caption_vector
        if image_id in cache:
            return cache[image_id]
        if vectors is None:
            vectors, missing = db.caption_rows().vectors, set(db.missing_caption_rows())
        entries = db.entries_of(image_id)
        human = [e.row for e in entries if e.source == "human"]
        rows = human or [e.row for e in entries]
        # no vector yet, or saved after the first lookup: unknown
        rows = [n for n in rows if n not in missing and n < len(vectors)]
        if not rows or vectors.ndim != 2:
            cache[image_id] = None
        else:
            cache[image_id] = mean_caption_vector(vectors[rows], vectors.shape[1])
        return cache[image_id]

    return lookup
