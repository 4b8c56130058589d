"""Retrieval: an image's neighbours in the memory, chosen as the settings say.

    from retrieval import Selection, nearest
    context = nearest(memory, image_id, vector, Selection.of(settings))
    context.neighbours      # (Neighbour(rank, image_id, score, captions), ...)

The exact search is similarity_search's (through Memory.search); how k neighbours
are picked among the nearest rows (top, mmr, dedup, sample) is neighbour_selection's;
the leak guard (NEAR_DUPLICATE_THRESHOLD) is applied here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Sequence

import config

if TYPE_CHECKING:
    import numpy as np

    from memory import Memory


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
