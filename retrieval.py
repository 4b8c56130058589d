"""Retrieval: an image's context, chosen as the settings say: its neighbour images in
the memory (RETRIEVE "images") or the captions nearest to it (RETRIEVE "captions").

    from retrieval import Selection, nearest, nearest_captions, retriever
    context = nearest(memory, image_id, vector, Selection.of(settings))
    context.neighbours      # (Neighbour(rank, image_id, score, captions), ...)
    retrieve = retriever(models, Selection.of(settings))   # what the caption step calls
    context = retrieve(memory, image_id, vector)

The exact search is similarity_search's (through Memory.search, or a caption
datastore's SearchIndex: caption_datastore.py); how k are picked among the nearest
(top, mmr, dedup, sample) is neighbour_selection's; the leak guard
(NEAR_DUPLICATE_THRESHOLD) is applied here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Sequence

import config

if TYPE_CHECKING:
    import numpy as np

    from caption_datastore import CaptionDatastore
    from memory import Memory
    from models import Models


@dataclass(frozen=True)
class Neighbour:
    """A memory row whose captions went into a prompt, or (RETRIEVE "captions") one
    retrieved caption."""

    rank: int                    # 1 = most similar
    image_id: str                # the memory row; "" for a caption of a corpus
    score: float                 # cosine similarity to the query
    captions: tuple[str, ...]    # its captions as the memory gives them; a caption: itself
    # A retrieved caption's origin: "memory" (a caption of image_id) or "FILE:LINE" of
    # a corpus; None for a retrieved image (its result records are as before).
    source: str | None = None

    def to_json(self) -> dict[str, Any]:
        record = {"rank": self.rank, "image_id": self.image_id, "score": round(self.score, 6),
                  "captions": list(self.captions)}
        if self.source is not None:
            record["source"] = self.source
        return record

    @classmethod
    def from_json(cls, record: dict[str, Any]) -> "Neighbour":
        """A neighbour as a result file records it (files without "source" too)."""
        return cls(int(record["rank"]), record.get("image_id") or "", float(record["score"]),
                   tuple(record.get("captions") or ()), record.get("source"))

    @property
    def label(self) -> str:
        """Where it came from, for people: the image id, or a corpus's FILE:LINE."""
        return self.image_id or (self.source or "")


@dataclass(frozen=True)
class Context:
    """What one image's prompt is built from."""

    neighbours: tuple[Neighbour, ...]
    # One list of captions per prompt entry; None: each neighbour's captions.
    captions: tuple[tuple[str, ...], ...] | None = None
    per_neighbour: int | None = None     # captions taken from each; None: CAPTIONS_PER_NEIGHBOUR
    looked_at: tuple[str, ...] | None = None   # memory ids read; None: the neighbours'
    # RETRIEVE "captions" under the leak guard: corpus captions left out because they
    # are one of the query's references (case and spaces normalised)
    identical_excluded: int = 0

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
    def of(cls, settings: config.Settings) -> "Selection":
        """The settings' selection (their near-duplicate guard is their context's:
        config.resolve)."""
        return cls(settings.top_k_similar, settings.neighbour_selection, settings.mmr_lambda,
                   settings.dedup_threshold, settings.near_duplicate_threshold,
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


def nearest_captions(store: "CaptionDatastore", memory: Memory, image_id: str,
                     vector: "np.ndarray", select: Selection,
                     references: Sequence[str] = (),
                     embed_texts: Callable[[list[str]], "np.ndarray"] | None = None
                     ) -> Context:
    """RETRIEVE "captions": the captions of `store` (caption_datastore.py) nearest to
    the image's CLIP vector by image-text cosine, picked by the selection's method over
    their text vectors; one Neighbour per caption, ranks 1..k in prompt order.

    Each caption text once (the best-scoring of its copies). Never a caption of the
    image itself. Under the leak guard (the selection's
    near-duplicate threshold, on in batch runs) neither the captions of memory rows at
    or above it to the image, nor a corpus caption identical to one of `references`
    (normalised; counted in `identical_excluded`). A growing memory's rows added in
    this process take part with their captions (vectors from `embed_texts`); while
    any is pending the context says it read them all, so the caption step captions
    those first."""
    import numpy as np

    import neighbour_selection as choose
    if select.k <= 0:
        return Context(())
    guard = select.near_duplicate_threshold
    query = np.asarray(vector, np.float32).reshape(-1)
    twin: dict[str, bool] = {image_id: True}    # memory row -> kept out by the guard

    def kept_out(row: str) -> bool:
        """The image itself, or (under the guard) a row at or above it to the image. Only
        the rows whose captions come up are compared, not the whole memory: the guard
        costs a few dot products, not a second scan of every image."""
        if not row:                              # a corpus caption
            return False
        if row not in twin:
            twin[row] = guard > 0 and row in memory and \
                float(memory.vectors_of([row])[0] @ query) >= guard
        return twin[row]

    exclude = set(store.keys_of(image_id))
    identical = store.corpus_keys_like(references) if guard > 0 and references else []
    exclude.update(identical)
    added = [i for i in memory.added if i not in memory.pending] if memory.growing else []
    for i in added:          # an added row replaces the datastore's captions of its id
        exclude.update(store.keys_of(i))
    wanted = select.candidates
    looked = wanted
    while True:      # one row per distinct caption: a repeated one would waste a line
        found = store.search(vector, looked, exclude)   # image_id: the entry's key
        # (score, order, text, image id, source, vector)
        rows = [(h.score, n, e.text, e.image_id, e.source, store.vector(h.image_id))
                for n, (h, e) in enumerate((h, store.entry(h.image_id)) for h in found)
                if not kept_out(e.image_id)]
        if len(_distinct(rows)) >= wanted or len(found) < looked:
            break
        looked *= 2
    extra = [(i, text) for i in added if not kept_out(i) for text in memory.captions_of(i)]
    if extra and embed_texts is not None:
        vectors = embed_texts([text for _, text in extra])
        scores = vectors @ query
        rows += [(float(s), len(found) + n, text, i, "memory", v)
                 for n, ((i, text), s, v) in enumerate(zip(extra, scores, vectors))]
    rows.sort(key=lambda r: (-r[0], r[1]))
    rows = _distinct(rows)[:wanted]
    chosen = list(range(len(rows)))
    if select.method != "top" and len(rows) > select.k:
        caption_vectors = np.stack([r[5] for r in rows]).astype(np.float32)
        if select.method == "mmr":
            chosen = choose.mmr(vector, caption_vectors, select.k, select.mmr_lambda)
        elif select.method == "dedup":
            chosen = choose.dedup(caption_vectors, select.k, select.dedup_threshold)
        elif select.method == "sample":
            chosen = choose.sample(len(rows), select.k, np.random.default_rng(
                [select.seed, _stable_hash(image_id)]))
    neighbours = tuple(Neighbour(rank, rows[n][3], float(rows[n][0]), (rows[n][2],), rows[n][4])
                       for rank, n in enumerate(chosen[:select.k], start=1))
    read = tuple(dict.fromkeys([*(n.image_id for n in neighbours if n.image_id),
                                *(memory.pending if memory.growing else ())]))
    return Context(neighbours, per_neighbour=1, looked_at=read,
                   identical_excluded=len(identical))


def no_retrieval(memory: Memory, image_id: str, vector: Any) -> Context:
    """A retriever that finds nothing: the plain prompt (PROMPT_TEMPLATE_NO_CONTEXT)."""
    return Context(())


def _distinct(rows: list[tuple]) -> list[tuple]:
    """Rows (score, order, text, ...) with the first of each caption text (compared as
    caption_datastore.normalise does: case, spaces and a final full stop aside)."""
    from caption_datastore import normalise
    seen: set[str] = set()
    kept = []
    for row in rows:
        text = normalise(row[2])
        if text not in seen:
            seen.add(text)
            kept.append(row)
    return kept


def retriever(models: "Models", selection: Selection | None = None,
              references: Callable[[str], Sequence[str]] | None = None) -> Retriever:
    """The retrieval the settings of `models` ask for (RETRIEVE), as the caption step
    calls it: `nearest` images, or `nearest_captions` from the caption datastore
    (caption_datastore.datastore_for, built on first use). `selection`: default the
    settings'; `references(image_id)`: the query's human captions, for the leak
    guard's check of corpus captions (batch evaluation runs)."""
    select = selection or Selection.of(models.settings)
    if models.settings.retrieve != "captions":
        return lambda memory, image_id, vector: nearest(memory, image_id, vector, select)
    from caption_datastore import datastore_for, text_vectors_for
    stores: dict[int, tuple[Memory, Any]] = {}   # by memory (held, so ids stay unique)

    def embed(texts: list[str]):
        return text_vectors_for(models)(texts, progress=False)

    def retrieve(memory: Memory, image_id: str, vector) -> Context:
        if id(memory) not in stores:
            stores[id(memory)] = (memory, datastore_for(models, memory))
        store = stores[id(memory)][1]
        return nearest_captions(store, memory, image_id, vector, select,
                                references(image_id) if references else (), embed)

    return retrieve
