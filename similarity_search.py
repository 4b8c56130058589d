"""Exact cosine top-k over L2-normalised vectors. Pure numpy, no I/O."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Collection, Sequence

import numpy as np


@dataclass(frozen=True)
class Neighbour:
    rank: int        # 1 = most similar
    image_id: str
    score: float     # cosine similarity


def top_k(query: np.ndarray, vectors: np.ndarray, ids: Sequence[str], k: int,
          exclude: Collection[str] = ()) -> list[Neighbour]:
    """The `k` rows of `vectors` most similar to `query`, best first.

    `query` (D,) and `vectors` (N, D) are unit vectors, so the dot product is
    the cosine similarity. Rows whose id is in `exclude` (the query image
    itself) are never returned. Equal scores are ordered by row, so the
    result is the same on every run. Fewer than `k` rows give fewer results.
    """
    vectors = np.asarray(vectors)
    query = np.asarray(query, dtype=vectors.dtype if vectors.size else np.float32).reshape(-1)
    if len(ids) != len(vectors):
        raise ValueError(f"{len(ids)} ids for {len(vectors)} vectors")
    if k <= 0 or len(vectors) == 0:
        return []
    if vectors.shape[1] != query.shape[0]:
        raise ValueError(f"query has dimension {query.shape[0]}, vectors {vectors.shape[1]}")
    scores = (vectors @ query).astype(np.float32)
    if exclude:
        banned = [i for i, image_id in enumerate(ids) if image_id in exclude]
        scores[banned] = -np.inf
    valid = int(np.isfinite(scores).sum())
    k = min(k, valid)
    if k == 0:
        return []
    # argpartition finds the k best in O(N); a stable sort of those orders them.
    # Rows tied with the k-th score may straddle the cut, so take every tied row.
    kth = np.partition(scores, len(scores) - k)[len(scores) - k]
    candidates = np.flatnonzero(scores >= kth)
    order = candidates[np.lexsort((candidates, -scores[candidates]))][:k]
    return [Neighbour(rank=r + 1, image_id=ids[i], score=float(scores[i]))
            for r, i in enumerate(order)]
