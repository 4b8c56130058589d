"""Exact cosine top-k over L2-normalised vectors.

`top_k` is the pure function the pipeline uses for one query. `SearchIndex`
wraps it for many queries and for saving/loading an index: numpy by default
(one matrix product per batch of queries), or a FAISS flat inner-product index
(`pip install faiss-cpu`) with `backend="faiss"`. Both return the same top-k:
FAISS candidates are re-scored and ordered exactly as numpy orders them.
`backend="faiss-fp16"` stores float16 codes (half the memory traffic); its
scores are float16-exact and its ties are ordered the same way.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Collection, Sequence

import numpy as np

# numpy: exact float32; faiss: FAISS flat float32 (exact); faiss-fp16: FAISS scalar
# quantizer with float16 codes, half the bytes to scan (faster at a million
# vectors, see BENCHMARKS.md), scores exact to float16 precision.
BACKENDS = ("numpy", "faiss", "faiss-fp16")


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
    _check_shapes(query, vectors, ids)
    if k <= 0 or len(vectors) == 0:
        return []
    banned = [n for n, image_id in enumerate(ids) if image_id in exclude] if exclude else []
    return _best(vectors @ query, ids, k, banned)


def _check_shapes(query: np.ndarray, vectors: np.ndarray, ids: Sequence[str]) -> None:
    if len(ids) != len(vectors):
        raise ValueError(f"{len(ids)} ids for {len(vectors)} vectors")
    if len(vectors) and vectors.shape[1] != query.shape[-1]:
        raise ValueError(f"query has dimension {query.shape[-1]}, vectors {vectors.shape[1]}")


def _best(scores: np.ndarray, ids: Sequence[str], k: int, banned: Collection[int] = (),
          rows: np.ndarray | None = None) -> list[Neighbour]:
    """Top `k` of `scores` for `rows` (default: all rows), never a row in `banned`;
    ties in row order."""
    scores = np.array(scores, dtype=np.float32)
    rows = np.arange(len(scores)) if rows is None else np.asarray(rows)
    if banned:
        scores[np.isin(rows, list(banned))] = -np.inf
    k = min(k, int(np.isfinite(scores).sum()))
    if k <= 0:
        return []
    # argpartition-style selection finds the k best in O(N); a stable sort orders
    # them. Rows tied with the k-th score may straddle the cut, so take them all.
    kth = np.partition(scores, len(scores) - k)[len(scores) - k]
    candidates = np.flatnonzero(scores >= kth)
    order = candidates[np.lexsort((rows[candidates], -scores[candidates]))][:k]
    return [Neighbour(rank=r + 1, image_id=ids[rows[i]], score=float(scores[i]))
            for r, i in enumerate(order)]


class SearchIndex:
    """Ids and unit vectors, searchable by cosine similarity.

    >>> index = SearchIndex(dim=512)
    >>> index.add(["a.jpg", "b.jpg"], vectors)          # (2, 512), L2-normalised
    >>> index.search(queries, k=5)                      # one list of Neighbours per query
    """

    def __init__(self, dim: int, backend: str = "numpy"):
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
        self.dim = dim
        self.backend = backend
        self.ids: list[str] = []
        self._rows: dict[str, list[int]] = {}   # id -> rows, to exclude ids without a scan
        self._chunks: list[np.ndarray] = []
        self._matrix: np.ndarray | None = np.zeros((0, dim), dtype=np.float32)
        self._faiss = None
        if backend == "faiss":
            self._faiss = _faiss().IndexFlatIP(dim)
        elif backend == "faiss-fp16":
            faiss = _faiss()
            self._faiss = faiss.IndexScalarQuantizer(dim, faiss.ScalarQuantizer.QT_fp16,
                                                     faiss.METRIC_INNER_PRODUCT)

    @classmethod
    def from_vectors(cls, ids: Sequence[str], vectors: np.ndarray,
                     backend: str = "numpy") -> "SearchIndex":
        """An index over `vectors` as given: a memory-mapped array is used in place."""
        vectors = np.asarray(vectors)
        index = cls(vectors.shape[1] if vectors.ndim == 2 else 0, backend)
        index.add(ids, vectors)
        return index

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def vectors(self) -> np.ndarray:
        """All vectors, (N, D) float32."""
        if self._matrix is None:
            self._matrix = self._chunks[0] if len(self._chunks) == 1 else np.concatenate(
                self._chunks)
            self._chunks = [self._matrix]
        return self._matrix

    def add(self, ids: Sequence[str], vectors: np.ndarray) -> None:
        """Append `vectors` (N, D), float32 and L2-normalised, under `ids`."""
        vectors = np.asanyarray(vectors)  # keeps a memory map a memory map
        if vectors.dtype != np.float32:
            vectors = vectors.astype(np.float32)
        if vectors.ndim != 2 or vectors.shape[1] != self.dim:
            raise ValueError(f"expected (N, {self.dim}) vectors, got {vectors.shape}")
        if len(ids) != len(vectors):
            raise ValueError(f"{len(ids)} ids for {len(vectors)} vectors")
        if not len(ids):
            return
        for n, image_id in enumerate(ids, start=len(self.ids)):
            self._rows.setdefault(image_id, []).append(n)
        self.ids.extend(ids)
        if self._matrix is not None and len(self._matrix):
            self._chunks = [self._matrix]
        elif self._matrix is not None:
            self._chunks = []
        self._chunks.append(vectors)
        self._matrix = None
        if self._faiss is not None:
            if not self._faiss.is_trained:  # fp16 codes need no statistics; faiss asks anyway
                self._faiss.train(np.ascontiguousarray(vectors[:1]))
            self._faiss.add(np.ascontiguousarray(vectors))

    def search(self, queries: np.ndarray, k: int,
               exclude: Sequence[Collection[str]] | None = None) -> list[list[Neighbour]]:
        """The `k` nearest rows for each query row (Q, D); `exclude[q]` holds ids
        that query q must not return (e.g. itself)."""
        queries = np.asarray(queries, dtype=np.float32)
        queries = queries[None] if queries.ndim == 1 else queries
        exclude = exclude if exclude is not None else [()] * len(queries)
        if len(exclude) != len(queries):
            raise ValueError(f"{len(exclude)} exclude sets for {len(queries)} queries")
        if queries.shape[1] != self.dim:
            raise ValueError(f"queries have dimension {queries.shape[1]}, the index {self.dim}")
        if k <= 0 or not self.ids:
            return [[] for _ in queries]
        banned = [[row for image_id in ex for row in self._rows.get(image_id, ())]
                  for ex in exclude]
        if self._faiss is not None:
            return [self._search_faiss(q, k, b) for q, b in zip(queries, banned)]
        # One matrix-matrix product for the whole batch: much faster than Q products.
        scores = queries @ self.vectors.T
        return [_best(row, self.ids, k, b) for row, b in zip(scores, banned)]

    def _search_faiss(self, query: np.ndarray, k: int, banned: list[int]) -> list[Neighbour]:
        # Ask for a few more rows than needed (for the banned ones and for ties at
        # the cut), widening until the cut is strictly above the last candidate,
        # then re-score the candidates and order them the way numpy does.
        n, need = len(self.ids), k + len(banned)
        want = min(n, need + 8)
        while True:
            scores, rows = self._faiss.search(query[None], want)
            scores, rows = scores[0], rows[0]
            if want == n or scores[min(need, want) - 1] > scores[want - 1]:
                break
            want = min(n, want * 2)
        keep = rows >= 0
        if self.backend == "faiss-fp16":  # its own (float16) scores, in row order for ties
            order = np.argsort(rows[keep], kind="stable")
            return _best(scores[keep][order], self.ids, k, banned, rows=rows[keep][order])
        rows = np.sort(rows[keep])
        return _best(self.vectors[rows] @ query, self.ids, k, banned, rows=rows)

    def save(self, path: str | os.PathLike) -> None:
        """Write `path`.npy (vectors) and `path`.json (ids, dim), each atomically."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.npy")
        np.save(tmp, self.vectors)
        os.replace(tmp, path.with_suffix(".npy"))
        meta = path.with_name(f".{path.name}.{os.getpid()}.tmp.json")
        meta.write_text(json.dumps({"dim": self.dim, "ids": self.ids}))
        os.replace(meta, path.with_suffix(".json"))

    @classmethod
    def load(cls, path: str | os.PathLike, backend: str = "numpy") -> "SearchIndex":
        """Read an index written by `save`; the vectors are memory-mapped."""
        path = Path(path)
        meta = json.loads(path.with_suffix(".json").read_text())
        vectors = np.load(path.with_suffix(".npy"), mmap_mode="r")
        if vectors.shape != (len(meta["ids"]), meta["dim"]):
            raise ValueError(f"{path}: {vectors.shape} vectors for {len(meta['ids'])} ids")
        index = cls(meta["dim"], backend)
        index.add(meta["ids"], vectors)
        return index


def _faiss():
    try:
        import faiss
    except ImportError:
        from errors import UserError
        raise UserError("the faiss backend needs `pip install faiss-cpu`") from None
    return faiss
