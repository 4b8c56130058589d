"""Which neighbours a prompt gets: the math of choosing among the nearest memory rows.

    import neighbour_selection as ns
    rows = ns.mmr(query, candidates, k=5, weight=0.7)       # indices into candidates
    rows = ns.dedup(candidates, k=5, threshold=0.9, caption_vectors=texts)
    pairs = ns.near_duplicate_pairs(experiment_vectors, pool_vectors, threshold=0.95)
    ns.scene_count(neighbour_vectors, threshold=0.9), ns.distinct_words(captions)

Every vector here is a float32 L2-normalised row of an (N, D) numpy array, so a dot
product is a cosine. Candidates come best first (the memory's search order); each
selection returns row numbers into them, in the order they should appear in the
prompt. Pure numpy: the pipeline's retrieval (retrieval.nearest) calls these, and so
do the near-duplicate report (near_duplicates.py) and bench/ablation.py.
"""

from __future__ import annotations

import re
from typing import Iterable, Sequence

import numpy as np

SELECTIONS = ("top", "mmr", "dedup", "sample")


def mmr(query: np.ndarray, candidates: np.ndarray, k: int, weight: float) -> list[int]:
    """Maximal marginal relevance (Carbonell & Goldstein 1998): repeatedly the candidate
    maximising weight * cos(query, c) - (1 - weight) * max cos(c, chosen). weight 1 is
    plain top-k; lower weights trade similarity for variety. Ties go to the earlier row."""
    n = len(candidates)
    if k <= 0 or n == 0:
        return []
    relevance = candidates @ np.asarray(query, np.float32).reshape(-1)
    redundancy = np.full(n, -np.inf, dtype=np.float32)   # max cosine to a chosen row
    chosen: list[int] = []
    free = np.ones(n, dtype=bool)
    for _ in range(min(k, n)):
        penalty = np.where(np.isfinite(redundancy), redundancy, 0.0)
        gain = weight * relevance - (1.0 - weight) * penalty
        gain[~free] = -np.inf
        best = int(np.argmax(gain))          # first of equal maxima
        chosen.append(best)
        free[best] = False
        redundancy = np.maximum(redundancy, candidates @ candidates[best])
    return chosen


def dedup(image_vectors: np.ndarray, k: int, threshold: float,
          caption_vectors: np.ndarray | None = None) -> list[int]:
    """The first `k` candidates, in order, skipping any whose image vector, or caption
    vector (a row of NaN: unknown, compared by image only), has a cosine above
    `threshold` to one already kept: one neighbour per near-duplicate group."""
    kept: list[int] = []
    for row in range(len(image_vectors)):
        if len(kept) >= k:
            break
        if kept and _too_close(image_vectors, row, kept, threshold):
            continue
        if kept and caption_vectors is not None and _too_close(caption_vectors, row, kept,
                                                               threshold):
            continue
        kept.append(row)
    return kept


def _too_close(vectors: np.ndarray, row: int, kept: list[int], threshold: float) -> bool:
    cosines = vectors[kept] @ vectors[row]
    return bool(np.any(cosines[~np.isnan(cosines)] > threshold))


def sample(n: int, k: int, rng: np.random.Generator) -> list[int]:
    """`k` of the first `n` rows drawn without replacement, kept in their order."""
    if n <= k:
        return list(range(n))
    return sorted(int(r) for r in rng.choice(n, size=k, replace=False))


def near_duplicate_pairs(queries: np.ndarray, pool: np.ndarray, threshold: float
                         ) -> list[tuple[int, int, float]]:
    """(query row, its most similar pool row, cosine) for every query row whose most
    similar pool row has a cosine of at least `threshold`, by query row."""
    if not len(queries) or not len(pool):
        return []
    cosines = np.asarray(queries, np.float32) @ np.asarray(pool, np.float32).T
    best = np.argmax(cosines, axis=1)          # first of equal maxima
    score = cosines[np.arange(len(queries)), best]
    return [(int(q), int(best[q]), float(score[q])) for q in np.flatnonzero(score >= threshold)]


def scene_count(vectors: np.ndarray, threshold: float) -> int:
    """How many scenes the rows show: groups of rows linked by cosines above
    `threshold` (connected components, so a chain of near-duplicates is one scene)."""
    n = len(vectors)
    if n == 0:
        return 0
    linked = (vectors @ vectors.T) > threshold
    scene = list(range(n))

    def root(i: int) -> int:
        while scene[i] != i:
            scene[i] = scene[scene[i]]
            i = scene[i]
        return i

    for a, b in zip(*np.nonzero(np.triu(linked, 1))):
        scene[root(int(a))] = root(int(b))
    return len({root(i) for i in range(n)})


def distinct_words(captions: Iterable[str]) -> int:
    """Distinct lower-case words (letters, digits, apostrophes) over `captions`."""
    return len({w for text in captions for w in re.findall(r"[a-z0-9']+", text.lower())})


def mean_caption_vector(vectors: Sequence[np.ndarray] | np.ndarray, dim: int) -> np.ndarray:
    """The unit mean of an image's caption vectors: what its captions say, as one row;
    NaNs (unknown) when it has none."""
    rows = np.asarray(vectors, np.float32).reshape(-1, dim)
    mean = rows.mean(axis=0) if len(rows) else np.zeros(dim, np.float32)
    norm = float(np.linalg.norm(mean))
    return mean / norm if norm > 0 else np.full(dim, np.nan, np.float32)
