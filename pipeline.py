"""The pipeline core: the models of a process, the memory retrieval reads, and the
one caption step every entry point calls.

    import config, pipeline
    settings = config.resolve(top_k_similar=3)
    dataset, db = pipeline.initialize(settings)        # data set, memory (built on a first run)
    models = pipeline.load_models(settings)            # loaded once per process
    memory = pipeline.Memory.from_db(db, growing=False)
    batch = pipeline.caption_batch(models, [("a.jpg", image)], memory)
    batch.items[0].caption, batch.items[0].neighbours

The caption step, for a batch of images: read each image -> embed it (CLIP) ->
its neighbours in the memory -> the prompt with their captions -> the VLM's
caption -> the caption's embedding. An image that fails at any stage becomes a
`Failure` and the others go on. main.py (one experiment and --all), --caption-folder,
the web page, bench/ablation.py and the Ray actors of scale/ all call it (Ray runs
its stages in separate actor pools: the embedders' `embed` methods and
`caption_batch` with vectors given). Nothing is saved here: the callers write.

Importing this module loads nothing; torch comes with the first model.
"""

from __future__ import annotations

import logging
import platform
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import availability
import config
from errors import UserError

if TYPE_CHECKING:
    import numpy as np
    from PIL import Image

    from dataset_loader import Flickr8k
    from db_manager import DbManager

log = logging.getLogger("pipeline")

# --- what a process has loaded ------------------------------------------------------------

# One object of each kind, reused by later calls in the same process. Asking for
# another (another model, another precision) replaces the previous one, so a
# long session that compares VLMs does not keep them all in memory.
_loaded: dict[str, tuple[Any, Any]] = {}


def cached(kind: str, key: Any, load: Callable[[], Any]) -> Any:
    """The object cached for `kind` if it was made with `key`, else `load()` (kept)."""
    held = _loaded.get(kind)
    if held is not None and held[0] == key:
        return held[1]
    _loaded.pop(kind, None)  # free the old one before loading its replacement
    value = load()
    _loaded[kind] = (key, value)
    return value


def loaded(kind: str) -> Any:
    """The object of `kind` this process holds (None if none): for tests and tools."""
    held = _loaded.get(kind)
    return None if held is None else held[1]


def device_of(settings: config.Settings):
    """(torch.device, torch.dtype) for DEVICE and DTYPE, resolved once per process."""
    from device import resolve_device
    key = (settings.device, settings.dtype)
    return cached("device", key, lambda: resolve_device(*key))


def dtype_name(dtype: Any) -> str:
    """torch.bfloat16 -> "bfloat16"."""
    return str(dtype).replace("torch.", "")


class Models:
    """The models `settings` name, each loaded on first use and kept for the process.

    Carries its settings: the caption step reads k, the prompt templates and the
    generation settings from `models.settings`.
    """

    def __init__(self, settings: config.Settings):
        self.settings = settings
        self.device, self.dtype = device_of(settings)

    @property
    def image_embedder(self):
        from image_embedder import ImageEmbedder
        s = self.settings
        key = (s.clip_model_name, str(self.device), str(self.dtype), s.batch_size)
        return cached("image_embedder", key, lambda: ImageEmbedder(
            s.clip_model_name, device=self.device, dtype=self.dtype, batch_size=s.batch_size))

    @property
    def caption_embedder(self):
        from caption_embedder import CaptionEmbedder
        s = self.settings
        key = (s.caption_embedding_model, str(self.device), s.batch_size,
               s.caption_query_prompt, s.caption_document_prompt)
        return cached("caption_embedder", key, lambda: CaptionEmbedder(
            s.caption_embedding_model, device=self.device, batch_size=s.batch_size,
            query_prompt=s.caption_query_prompt, document_prompt=s.caption_document_prompt))

    @property
    def captioner(self):
        from vlm_captioner import VLMCaptioner
        s = self.settings
        key = (s.vlm_model_name, str(self.device), str(self.dtype), s.max_new_tokens,
               s.num_beams, s.do_sample, s.temperature, s.vlm_image_longest_edge,
               s.vlm_image_splitting, s.vlm_attn_implementation, s.random_seed,
               s.vlm_caption_prefix, s.vlm_device_map, s.vlm_max_memory,
               s.cache_dir if s.vlm_device_map else "")   # the offload folder's place
        return cached("captioner", key, lambda: VLMCaptioner(
            s.vlm_model_name, device=self.device, dtype=self.dtype,
            max_new_tokens=s.max_new_tokens, num_beams=s.num_beams, do_sample=s.do_sample,
            temperature=s.temperature, image_longest_edge=s.vlm_image_longest_edge,
            image_splitting=s.vlm_image_splitting,
            attn_implementation=s.vlm_attn_implementation, seed=s.random_seed,
            caption_prefix=s.vlm_caption_prefix, device_map=s.vlm_device_map,
            max_memory=config.parse_max_memory(s.vlm_max_memory),
            offload_folder=Path(s.cache_dir).expanduser() / "offload"))

    def load_all(self) -> "Models":
        """Load every model now (a command's start, a web server's warm-up)."""
        self.image_embedder, self.caption_embedder, self.captioner  # noqa: B018
        return self

    def describe(self) -> dict[str, str]:
        """The resolved device and dtype, for result files."""
        return {"resolved_device": str(self.device), "resolved_dtype": dtype_name(self.dtype)}


def load_models(settings: config.Settings) -> Models:
    """The models of `settings` (each loaded on first use, once per process)."""
    return Models(settings)


def load_dataset(settings: config.Settings) -> "Flickr8k":
    """DATASET_NAME split by EXPERIMENT_SAMPLES and RANDOM_SEED, once per process."""
    from dataset_loader import load_and_split_dataset
    key = (settings.dataset_name, settings.experiment_samples, settings.random_seed)
    return cached("dataset", key, lambda: load_and_split_dataset(*key))


def versions() -> dict[str, str]:
    """Python's and the main packages' versions, for result files and manifests."""
    found = {"python": platform.python_version()}
    for package in ("torch", "transformers", "sentence-transformers", "numpy", "datasets"):
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[package] = "not installed"
    return found


# --- the memory's database ----------------------------------------------------------------

def identity(settings: config.Settings, dataset: "Flickr8k", prompts=None):
    """What the database in DB_DIR must have been built with, for these settings;
    with the caption model's `prompts` (caption_embedder.TextPrompts) when given."""
    from db_manager import DbIdentity
    name = settings.dataset_name
    local = Path(name).expanduser()
    return DbIdentity(clip_model=settings.clip_model_name,
                      caption_model=settings.caption_embedding_model,
                      # a local folder by its absolute path: a later command from
                      # another folder (search.py) finds it from the database alone
                      dataset=str(local.resolve()) if local.is_dir() else name,
                      split=dataset.fingerprint, random_seed=settings.random_seed,
                      experiment_samples=settings.experiment_samples,
                      query_prompt=prompts and prompts.query,
                      document_prompt=prompts and prompts.document)


def initialize(settings: config.Settings, captioner: bool = True
               ) -> tuple["Flickr8k", "DbManager"]:
    """The data set and the database manager for `settings` (one per DB_DIR and
    models in a process, reused); on a first run the memory is built from the
    training pool. First, every model (the captioner too, unless `captioner` is
    false) and the data set must be available: one line names all that are not."""
    from db_manager import DbManager
    availability.require(settings, availability.PARTS if captioner else availability.PARTS[:3])
    dataset = load_dataset(settings)
    db_dir = Path(settings.db_dir).expanduser().resolve()
    wanted = identity(settings, dataset)  # models and split: checked before a model loads
    db = cached("db", (db_dir, wanted), lambda: DbManager.open(db_dir, wanted))
    # the caption model's prompts need the model: checked next, recorded by a first
    # run (the image model first, as every command loads it: its errors come first)
    models = load_models(settings)
    models.image_embedder  # noqa: B018
    prompts = models.caption_embedder.prompts
    db.check_caption_prompts(prompts.query, prompts.document)
    if db.needs_seed:
        db.identity = identity(settings, dataset, prompts)
        seed_memory(models, dataset, db)
    if settings.neighbour_selection == "dedup":  # it compares the neighbours' captions too
        embed_missing_captions(models.caption_embedder, db)
    return dataset, db


def seed_memory(models: Models, dataset: "Flickr8k", db: "DbManager") -> None:
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
    rows = db.missing_caption_rows
    if not rows:
        return 0
    if not os.access(db.db_dir, os.W_OK):
        raise UserError(f"{len(rows)} captions of the memory in {db.db_dir} have no vectors "
                        "yet and the folder is not writable: run `python main.py "
                        "--embed-captions` once where it is")
    texts = [db.captions[row]["caption"] for row in rows]
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


# What a database records, and the settings that name it.
_RECORDED = (("clip_model", "CLIP_MODEL_NAME"), ("caption_model", "CAPTION_EMBEDDING_MODEL"),
             ("dataset", "DATASET_NAME"), ("random_seed", "RANDOM_SEED"),
             ("experiment_samples", "EXPERIMENT_SAMPLES"))


def for_database(settings: config.Settings, db: "DbManager") -> config.Settings:
    """`settings` with the models and data set the database in `db` was built with
    filling the ones not given; a model given that differs is one line naming both
    (db.check_models, the one check main, search, import and scale/ share)."""
    if db.needs_seed:
        return settings
    fill = {}
    for recorded, name in _RECORDED:
        value = getattr(db.state, recorded, None)
        if value is not None and name not in settings.given and value != settings.values[name]:
            fill[name.lower()] = value
    fill.update(_legacy_prompts(settings, db))
    if fill:
        log.info("using the database's settings: %s",
                 ", ".join(f"{k}={v!r}" for k, v in fill.items()))
    settings = settings.replace(**fill)
    db.check_models(clip_model=settings.clip_model_name,
                    caption_model=settings.caption_embedding_model)
    return settings


def _legacy_prompts(settings: config.Settings, db: "DbManager") -> dict[str, str]:
    """A database made before caption prompts were recorded embedded its captions
    with none: new captions get none either (queries keep their query prompt, as
    then). Recorded prompts are checked where the caption model is loaded
    (identity, caption_embedder_for): "auto" means them unless the model changed."""
    from caption_embedder import AUTO
    if db.caption_prompts is not None or settings.caption_document_prompt == "":
        return {}
    if settings.caption_document_prompt != AUTO:
        raise UserError(f"database {db.db_dir} was built before caption prompts were "
                        f"recorded, with no document (caption) prompt, not "
                        f"{settings.caption_document_prompt!r}: leave "
                        "--caption-document-prompt out, or use another --db-dir")
    return {"caption_document_prompt": ""}


def caption_embedder_for(settings: config.Settings, db: "DbManager"):
    """The caption embedder of `settings` (for_database's), checked to embed with the
    prompts `db` recorded: a search embeds its query the way the database was built."""
    embedder = load_models(settings).caption_embedder
    db.check_caption_prompts(embedder.prompts.query, embedder.prompts.document)
    return embedder


def with_database_settings(settings: config.Settings) -> config.Settings:
    """`for_database` over the database in DB_DIR; the settings as they are if none
    is there yet."""
    from db_manager import DbManager
    if not Path(settings.db_dir).expanduser().is_dir():
        return settings
    return for_database(settings, DbManager.open(settings.db_dir))


# --- records --------------------------------------------------------------------------------

@dataclass(frozen=True)
class Neighbour:
    """A memory row whose captions went into a prompt."""

    rank: int                    # 1 = most similar
    image_id: str
    score: float                 # cosine similarity to the query
    captions: tuple[str, ...]    # its captions as the memory gives them

    def to_json(self) -> dict[str, Any]:
        return {"rank": self.rank, "image_id": self.image_id, "score": round(self.score, 6),
                "captions": list(self.captions)}


@dataclass(frozen=True)
class Failure:
    """An image the caption step could not caption, and why."""

    image_id: str
    error: str                                   # one line for people
    stage: str                                   # load_image | embed_image | generate | ...
    experiment_index: int | None = None
    exception: BaseException | None = field(default=None, compare=False, repr=False)

    def to_json(self) -> dict[str, Any]:
        record = {"image_id": self.image_id, "error": self.error, "stage": self.stage}
        if self.experiment_index is not None:
            record = {"experiment_index": self.experiment_index, **record}
        return record

    def raise_it(self) -> None:
        """Raise the error this failure records (a UserError for a user's mistake)."""
        raise self.exception if self.exception is not None else UserError(self.error)


@dataclass(frozen=True)
class Captioned:
    """One image through the caption step."""

    image_id: str
    vector: Any                          # (D,) float32 unit CLIP embedding
    neighbours: tuple[Neighbour, ...]
    prompt: str                          # built from the context (recorded even when unused)
    prompt_captions: tuple[str, ...]     # the captions the prompt holds, in order
    caption: str
    caption_vector: Any = None           # (D',) float32 unit vector, None when not embedded
    # Whether the retrieved captions reached the captioner: False for a captioner of
    # the image alone or of a fixed task prompt (BLIP, GIT, PaliGemma, Florence-2),
    # and for a prompt that holds no captions.
    context_used: bool = True
    model_prompt: str | None = None      # the text the captioner was given, in its form


@dataclass(frozen=True)
class CaptionBatch:
    """What `caption_batch` returns: one record per input, in order, and its cost."""

    items: list[Captioned | Failure]
    seconds: dict[str, float]            # per stage, for the whole batch
    first_token: float | None = None     # start of the last generate call to its first token
    generate_calls: int = 0


# --- the memory -----------------------------------------------------------------------------

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
        import numpy as np
        ids, kinds, vectors = db.image_ids, db.image_kinds, db.image_vectors
        if not growing:
            rows = np.flatnonzero(np.asarray(kinds) == "train")
            ids, kinds, vectors = [ids[n] for n in rows], ["train"] * len(rows), vectors[rows]
        return cls(ids, vectors, db.captions_of, kinds, growing=growing,
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

    def vectors_of(self, ids: Sequence[str]) -> "np.ndarray":
        """(len(ids), D) vectors of rows by id (an added row's own vector)."""
        import numpy as np
        if self._position is None:
            self._position = {image_id: n for n, image_id in enumerate(self._ids)}
        return np.stack([self._added[i][0] if i in self._added else
                         self._vectors[self._position[i]] for i in ids]) if ids else \
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
    any, as captions_of), computed on first use."""
    by_image: dict[str, Any] | None = None
    missing: set[int] = set()          # caption rows without a vector, read with by_image
    cache: dict[str, Any] = {}

    def lookup(image_id: str):
        nonlocal by_image, missing
        from neighbour_selection import mean_caption_vector
        if image_id in cache:
            return cache[image_id]
        if by_image is None:
            by_image, missing = {}, set(db.missing_caption_rows)
            for n, entry in enumerate(db.captions):
                by_image.setdefault(entry["image_id"], []).append((entry["source"], n))
        rows = by_image.get(image_id, [])
        human = [n for source, n in rows if source == "human"]
        rows = human or [n for _, n in rows]
        rows = [n for n in rows if n not in missing]  # no vector yet: unknown
        vectors = db.caption_vectors
        if not rows or vectors.ndim != 2 or max(rows) >= len(vectors):
            cache[image_id] = None
        else:
            cache[image_id] = mean_caption_vector(vectors[rows], vectors.shape[1])
        return cache[image_id]

    return lookup


# --- retrieval and prompt -------------------------------------------------------------------

@dataclass(frozen=True)
class Context:
    """What one image's prompt is built from."""

    neighbours: tuple[Neighbour, ...]
    # One list of captions per prompt entry; None: each neighbour's captions.
    captions: tuple[tuple[str, ...], ...] | None = None
    per_neighbour: int | None = None     # captions taken from each; None: CAPTIONS_PER_NEIGHBOUR
    looked_at: tuple[str, ...] | None = None   # memory ids read; None: the neighbours'

    @property
    def prompt_captions(self) -> tuple[tuple[str, ...], ...]:
        return self.captions if self.captions is not None else tuple(
            n.captions for n in self.neighbours)

    @property
    def read_ids(self) -> tuple[str, ...]:
        return self.looked_at if self.looked_at is not None else tuple(
            n.image_id for n in self.neighbours)


# retrieve(memory, image_id, vector) -> Context: how an image finds its context.
Retriever = Callable[["Memory", str, Any], Context]


@dataclass(frozen=True)
class Selection:
    """How retrieval picks an image's neighbours (see config.py: NEIGHBOUR_SELECTION,
    MMR_LAMBDA, DEDUP_THRESHOLD, NEAR_DUPLICATE_THRESHOLD, RANDOM_SEED)."""

    k: int
    method: str = "top"                  # top | mmr | dedup | sample
    mmr_lambda: float = 0.5
    dedup_threshold: float = 0.92
    near_duplicate_threshold: float = 0.0    # the leak guard; 0 = off
    seed: int = 42

    @classmethod
    def of(cls, settings: config.Settings, batch: bool = False) -> "Selection":
        """The settings' selection; `batch`: a batch evaluation run (NEAR_DUPLICATE_THRESHOLD
        "auto" guards there)."""
        return cls(settings.top_k_similar, settings.neighbour_selection, settings.mmr_lambda,
                   settings.dedup_threshold, config.near_duplicate_threshold(settings, batch),
                   settings.random_seed)

    @property
    def candidates(self) -> int:
        """Nearest rows the method chooses from (before the guard removes any)."""
        return {"top": 1, "sample": 2}.get(self.method, CANDIDATES_PER_NEIGHBOUR) * self.k


# "mmr" and "dedup" choose among the 4k nearest rows: enough for k scenes when each
# has a few views, without reaching into unrelated images for variety alone.
CANDIDATES_PER_NEIGHBOUR = 4


def nearest(memory: Memory, image_id: str, vector: "np.ndarray", k: "int | Selection"
            ) -> Context:
    """The pipeline's retrieval: an image's neighbours, never the image itself.

    `k` an int: the k most similar memory rows. A `Selection`: among the nearest
    rows, without those at or above its near-duplicate threshold to the query
    (searching further while fewer than the candidates it needs are left), the
    k its method picks, in prompt order; ranks are 1..k in that order and scores
    stay the cosine to the query."""
    import numpy as np

    import neighbour_selection as choose
    select = k if isinstance(k, Selection) else Selection(int(k))
    if select.k <= 0:
        return Context(())
    wanted = select.candidates
    guard = select.near_duplicate_threshold
    looked = wanted
    while True:
        found = memory.search(vector, looked, exclude=(image_id,))
        kept = [h for h in found if not (guard > 0 and h.score >= guard)]
        if len(kept) >= wanted or len(found) < looked:
            break
        looked *= 2          # near-duplicates took places: look further
    kept = kept[:wanted]
    rows = list(range(len(kept)))
    if select.method != "top" and len(kept) > select.k:
        images = memory.vectors_of([h.image_id for h in kept])
        if select.method == "mmr":
            rows = choose.mmr(vector, images, select.k, select.mmr_lambda)
        elif select.method == "dedup":
            rows = choose.dedup(images, select.k, select.dedup_threshold,
                                _caption_rows(memory, [h.image_id for h in kept]))
        elif select.method == "sample":
            rows = choose.sample(len(kept), select.k, np.random.default_rng(
                [select.seed, _stable_hash(image_id)]))
    # The choice reads vectors only (an added row has no caption vector, pending or
    # not), so it is the same before and after a pending row gets its caption: the
    # neighbours alone are what a growing batch must wait for.
    return Context(tuple(Neighbour(rank, kept[n].image_id, float(kept[n].score),
                                   tuple(memory.captions_of(kept[n].image_id)))
                         for rank, n in enumerate(rows[:select.k], start=1)))


def _caption_rows(memory: Memory, ids: Sequence[str]) -> "np.ndarray":
    """(N, D') caption vectors of `ids`, NaN rows where unknown; None if none is known."""
    import numpy as np
    found = [memory.caption_vector_of(i) for i in ids]
    known = [v for v in found if v is not None]
    if not known:
        return None
    dim = len(known[0])
    return np.stack([np.full(dim, np.nan, np.float32) if v is None else v for v in found])


def _stable_hash(text: str) -> int:
    """The same number for an image id in every process (str hashes are salted)."""
    import zlib
    return zlib.crc32(text.encode("utf-8"))


def build_prompt(settings: config.Settings, context: Context) -> tuple[str, tuple[str, ...]]:
    """(prompt, the captions it holds) for `context` with the settings' templates."""
    from prompt_generator import build_prompt as fill, select_captions
    per = settings.captions_per_neighbour if context.per_neighbour is None \
        else context.per_neighbour
    captions = context.prompt_captions
    prompt = fill(captions, settings.prompt_template, settings.prompt_template_no_context, per)
    return prompt, tuple(select_captions(captions, per))


def generate_captions(captioner, images: Sequence["Image.Image"], prompts: Sequence[str]
                      ) -> list[str | UserError]:
    """Captions for a batch in one generate call; if the batch fails, image by image,
    so one bad image costs only its own caption. Failures come back as UserErrors."""
    if not images:
        return []
    try:
        captions = captioner.caption_batch(list(images), list(prompts))
    except Exception as exc:  # noqa: BLE001 - isolate the image that breaks the batch
        if len(images) == 1:
            return [exc if isinstance(exc, UserError) else UserError(
                f"caption generation failed: {type(exc).__name__}: {exc}")]
        return [item for image, prompt in zip(images, prompts)
                for item in generate_captions(captioner, [image], [prompt])]
    return [c or captioner.empty_caption_error() for c in captions]


class _Stopwatch:
    def __init__(self):
        self.seconds: dict[str, float] = {}
        self._clock = time.perf_counter()

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        self.seconds[stage] = self.seconds.get(stage, 0.0) + now - self._clock
        self._clock = now


def caption_batch(models: Models, items: Sequence[tuple[str, Any]], memory: Memory, *,
                  retrieve: Retriever | None = None, vectors: Sequence[Any] | None = None,
                  embed_captions: bool = True, selection: Selection | None = None
                  ) -> CaptionBatch:
    """The caption step for a batch: one record per (image_id, image or opener) of
    `items`, in order, a `Captioned` or a `Failure`.

    `retrieve` finds each image's context (default: `nearest` with `selection`,
    which defaults to the settings' for one experiment: TOP_K_SIMILAR neighbours by
    NEIGHBOUR_SELECTION, never the image itself; batch evaluation runs pass
    `Selection.of(settings, batch=True)`). With a growing memory each captioned image joins
    it, and an image is generated only after every earlier image it retrieves,
    so a batch gives exactly the neighbours one image at a time would.
    `vectors` (one per item) skips the image embedding (computed elsewhere);
    `embed_captions=False` leaves `caption_vector` None.
    """
    import numpy as np
    settings = models.settings
    if retrieve is None:
        select = selection or Selection.of(settings)
        retrieve = lambda m, image_id, vector: nearest(m, image_id, vector, select)  # noqa: E731
    clock = _Stopwatch()
    records: list[Captioned | Failure | None] = [None] * len(items)
    images: dict[int, Any] = {}
    for n, (image_id, source) in enumerate(items):
        try:
            images[n] = source() if callable(source) else source
        except UserError as exc:
            records[n] = Failure(image_id, str(exc), "load_image", exception=exc)
    clock.lap("load_image")
    rows = list(images)
    if vectors is not None:
        queries = {n: np.asarray(vectors[n], np.float32).reshape(-1) for n in rows}
    elif rows:
        embedded = models.image_embedder.embed([images[n] for n in rows])
        queries = dict(zip(rows, embedded))
    else:
        queries = {}
    clock.lap("embed_image")

    waiting: list[tuple[int, Context, str, tuple[str, ...]]] = []
    calls = 0
    first_token = None

    def flush() -> None:
        nonlocal calls, first_token
        if not waiting:
            return
        captioner = models.captioner
        made = generate_captions(captioner, [images[n] for n, *_ in waiting],
                                 [prompt for _, _, prompt, _ in waiting])
        calls += 1
        first_token = getattr(captioner, "last_first_token", None)
        clock.lap("generate")
        for (n, context, prompt, shown), caption in zip(waiting, made):
            image_id = items[n][0]
            if isinstance(caption, str):
                records[n] = Captioned(
                    image_id, queries[n], context.neighbours, prompt, shown, caption,
                    context_used=bool(shown) and captioner.uses_context,
                    model_prompt=captioner.model_prompt(prompt))
                if memory.growing:
                    memory.set_caption(image_id, caption)
            else:
                records[n] = Failure(image_id, str(caption), "generate", exception=caption)
                if memory.growing:
                    memory.remove(image_id)
        waiting.clear()

    for n in rows:
        image_id = items[n][0]
        context = retrieve(memory, image_id, queries[n])
        if memory.growing and memory.pending & set(context.read_ids):
            clock.lap("search")
            flush()  # it retrieves an image of this batch: caption that one first
            context = retrieve(memory, image_id, queries[n])
        clock.lap("search")
        prompt, shown = build_prompt(settings, context)
        clock.lap("prompt")
        waiting.append((n, context, prompt, shown))
        if memory.growing:
            memory.add(image_id, queries[n])  # pending: later images may retrieve it
    flush()

    done = [n for n, r in enumerate(records) if isinstance(r, Captioned)]
    if embed_captions and done:
        caption_vectors = models.caption_embedder.embed_captions([records[n].caption
                                                                 for n in done])
        for n, vector in zip(done, caption_vectors):
            records[n] = _with_caption_vector(records[n], vector)
        clock.lap("embed_caption")
    return CaptionBatch(records, {k: round(v, 4) for k, v in clock.seconds.items()},
                        first_token, calls)


def _with_caption_vector(record: Captioned, vector) -> Captioned:
    from dataclasses import replace
    return replace(record, caption_vector=vector)
