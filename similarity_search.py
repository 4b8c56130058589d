"""Cosine top-k over L2-normalised vectors: exact, or approximate for large collections.

`search_exact` is the one exact search: `top_k` (the pipeline's memory, one
query), `SearchIndex`'s numpy backend and search.py's image and text rankings
all go through it. `SearchIndex` adds the other backends, many queries and
saving/loading an index. Which backend
(numbers for 1M x 512 on 2 cores in BENCHMARKS.md, bench/search.py and bench/ann.py):

* ``numpy`` (default): exact float32, one matrix product per batch of queries.
  Right up to about a million vectors (a query scans all of them, ~0.1 s at 1M).
* ``faiss``: FAISS flat inner product, exact; same results as numpy, not faster
  on a CPU. ``faiss-fp16``: float16 codes, half the bytes to scan (about 2x
  faster at 1M), scores exact to float16. Both `pip install faiss-cpu`.
* ``ivfpq``: FAISS IVF-PQ, approximate. For 10M+ vectors or little RAM: a query
  scans `nprobe` of `nlist` lists of `m`-byte codes (64 bytes for 512-d, 1/32
  of float32), then re-scores its best `rerank` candidates exactly from the
  float32 vectors, which may stay on disk (memory-mapped). Needs training: with
  fewer than 39 x max(256, nlist) vectors (faiss's minimum, 9,984 by default)
  it logs a warning and searches exactly, and trains once enough are added.
* ``hnsw``: FAISS HNSW graph over the float32 vectors, approximate. Where the
  index fits in RAM: no training and no second read of the vectors (its scores
  are float32), but the index holds the vectors and the graph (1.13x the float32
  size) and builds slowly (minutes per million vectors on 2 cores).
  `ef_search` trades speed for recall. On the clustered data of bench/ann.py
  (1M x 512) ivfpq was faster, at higher recall, than hnsw.

FAISS candidates are ordered as numpy orders them (ties by row). An ANN index is
saved as `path`.faiss beside the vectors and read back memory-mapped, not rebuilt;
`tune` changes the search settings of a built or loaded one.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Collection, Sequence

import numpy as np

log = logging.getLogger(__name__)

# numpy: exact float32; faiss: FAISS flat float32 (exact); faiss-fp16: FAISS scalar
# quantizer with float16 codes, half the bytes to scan (faster at a million
# vectors, see BENCHMARKS.md), scores exact to float16 precision; ivfpq, hnsw:
# approximate (ANN_BACKENDS), for 10M+ vectors.
BACKENDS = ("numpy", "faiss", "faiss-fp16", "ivfpq", "hnsw")
ANN_BACKENDS = ("ivfpq", "hnsw")

# Settings of the ANN backends (keyword arguments of SearchIndex, from_vectors, load).
# Build settings are fixed once the index is built; search settings can be changed
# at any time (`tune`), also on a loaded index. Unset ones get defaults from the
# number of vectors N and the dimension D (`ann_params`):
#   ivfpq  nlist   lists (k-means cells)              4 sqrt(N), at most N/39 and 65,536
#          m       bytes per vector (PQ sub-vectors)   the largest divisor of D <= D/8
#          nprobe  lists scanned per query             NPROBE_DEFAULT (at most nlist)
#          rerank  candidates re-scored exactly        RERANK_DEFAULT; 0 = PQ scores
#   hnsw   hnsw_m  graph links per vector              32
#          ef_construction  build-time beam width    40
#          ef_search        search-time beam width   EF_SEARCH_DEFAULT
BUILD_PARAMS = {"ivfpq": ("nlist", "m"), "hnsw": ("hnsw_m", "ef_construction")}
SEARCH_PARAMS = {"ivfpq": ("nprobe", "rerank"), "hnsw": ("ef_search",)}
# At 1M x 512 (bench/ann.py) nprobe=8 and ef_search=128 reached recall@5 >= 0.95
# (0.994, 0.981); nprobe=32 leaves room for less clustered data (near-uniform 64-d
# data needed 64 of 512 lists). Re-scoring 200 candidates lifts ivfpq's 0.53 to 0.99.
NPROBE_DEFAULT, RERANK_DEFAULT, EF_SEARCH_DEFAULT = 32, 200, 128
TRAIN_PER_LIST = 50       # IVF-PQ trains on a sample of 50 vectors per list
MIN_PER_CENTROID = 39     # faiss's minimum training points per k-means centroid
ADD_BATCH = 65536         # rows per faiss add call (bounds the float32 copies)


@dataclass(frozen=True)
class Neighbour:
    rank: int        # 1 = most similar
    image_id: str
    score: float     # cosine similarity


def search_exact(queries: np.ndarray, vectors: np.ndarray, ids: Sequence[str], k: int,
                 banned: Sequence[Collection[int]] | None = None) -> list[list[Neighbour]]:
    """The `k` rows of `vectors` most similar to each query, best first: exact cosine
    top-k, the one implementation every exact search of the project calls.

    `queries` (Q, D) or one (D,) and `vectors` (N, D) are unit vectors, so the dot
    product is the cosine similarity. `banned[q]` holds row numbers query q must
    never return. Equal scores are ordered by row, so the result is the same on
    every run. Fewer than `k` rows give fewer results; k >= N ranks every row.
    """
    vectors = np.asarray(vectors)
    queries = np.asarray(queries, dtype=vectors.dtype if vectors.size else np.float32)
    queries = queries[None] if queries.ndim == 1 else queries
    _check_shapes(queries, vectors, ids)
    banned = banned if banned is not None else [()] * len(queries)
    if len(banned) != len(queries):
        raise ValueError(f"{len(banned)} banned sets for {len(queries)} queries")
    if k <= 0 or len(vectors) == 0:
        return [[] for _ in queries]
    # One matrix product for the whole batch, much faster than Q products. For one
    # query numpy computes it as a matrix-vector product: the same float32 scores,
    # bit for bit, as `vectors @ query`.
    scores = queries @ vectors.T
    return [_best(row, ids, k, b) for row, b in zip(scores, banned)]


def top_k(query: np.ndarray, vectors: np.ndarray, ids: Sequence[str], k: int,
          exclude: Collection[str] = ()) -> list[Neighbour]:
    """`search_exact` for one query (D,), never returning a row whose id is in
    `exclude` (the query image itself)."""
    vectors = np.asarray(vectors)
    query = np.asarray(query).reshape(-1)
    banned = [n for n, image_id in enumerate(ids) if image_id in exclude] if exclude else []
    return search_exact(query, vectors, ids, k, [banned])[0]


def _check_shapes(queries: np.ndarray, vectors: np.ndarray, ids: Sequence[str]) -> None:
    if len(ids) != len(vectors):
        raise ValueError(f"{len(ids)} ids for {len(vectors)} vectors")
    if len(vectors) and vectors.shape[1] != queries.shape[-1]:
        raise ValueError(f"query has dimension {queries.shape[-1]}, vectors {vectors.shape[1]}")


def _best(scores: np.ndarray, ids: Sequence[str], k: int, banned: Collection[int] = (),
          rows: np.ndarray | None = None) -> list[Neighbour]:
    """Top `k` of `scores` for `rows` (default: all rows), never a row in `banned`;
    ties in row order."""
    scores = np.array(scores, dtype=np.float32)
    rows = np.arange(len(scores)) if rows is None else np.asarray(rows)
    if banned:
        scores[np.isin(rows, list(banned))] = -np.inf
    finite = int(np.isfinite(scores).sum())
    k = min(k, finite)
    if k <= 0:
        return []
    if k == finite:  # every row that may be returned: no selection to make
        candidates = np.flatnonzero(np.isfinite(scores))
    else:
        # argpartition-style selection finds the k best in O(N); a stable sort orders
        # them. Rows tied with the k-th score may straddle the cut, so take them all.
        kth = np.partition(scores, len(scores) - k)[len(scores) - k]
        candidates = np.flatnonzero(scores >= kth)
    order = candidates[np.lexsort((rows[candidates], -scores[candidates]))][:k]
    # Python ints and floats in one step each (a full ranking makes N records)
    return [Neighbour(rank, ids[row], score) for rank, (row, score)
            in enumerate(zip(rows[order].tolist(), scores[order].tolist()), start=1)]


def ann_params(backend: str, n: int, dim: int, **given: int) -> dict[str, int]:
    """The settings an ANN index over `n` vectors of dimension `dim` is built and
    searched with: the `given` ones, and defaults (table above) for the others."""
    if backend == "hnsw":
        return {"hnsw_m": 32, "ef_construction": 40, "ef_search": EF_SEARCH_DEFAULT} | given
    nlist = given.get("nlist") or int(max(1, min(4 * math.sqrt(n), n // MIN_PER_CENTROID, 65536)))
    m = max(d for d in range(1, max(1, dim // 8) + 1) if dim % d == 0)
    return {"nlist": nlist, "m": m, "nprobe": min(NPROBE_DEFAULT, nlist),
            "rerank": RERANK_DEFAULT} | given


class SearchIndex:
    """Ids and unit vectors, searchable by cosine similarity.

    >>> index = SearchIndex(dim=512)
    >>> index.add(["a.jpg", "b.jpg"], vectors)          # (2, 512), L2-normalised
    >>> index.search(queries, k=5)                      # one list of Neighbours per query
    >>> SearchIndex.from_vectors(ids, vectors, "ivfpq", nprobe=64)   # approximate, 10M+

    `params` are the ANN settings (see BUILD_PARAMS / SEARCH_PARAMS) given as
    keywords; once the index is built, `self.params` holds all of them.
    """

    def __init__(self, dim: int, backend: str = "numpy", **params: int):
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
        _check_params(backend, dim, params, BUILD_PARAMS.get(backend, ()))
        self.dim = dim
        self.backend = backend
        self.ids: list[str] = []
        self.params: dict[str, int] = {}         # ANN settings in use, once built
        self._given = {name: int(value) for name, value in params.items()}
        self._rows: dict[str, list[int]] | None = None  # id -> rows, made by the first exclude
        self._chunks: list[np.ndarray] = []
        self._matrix: np.ndarray | None = np.zeros((0, dim), dtype=np.float32)
        self._faiss = None                       # ANN backends: built by the first add
        self._mapped = False                     # the index is a read-only memory map
        if backend == "faiss":
            self._faiss = _faiss().IndexFlatIP(dim)
        elif backend == "faiss-fp16":
            faiss = _faiss()
            self._faiss = faiss.IndexScalarQuantizer(dim, faiss.ScalarQuantizer.QT_fp16,
                                                     faiss.METRIC_INNER_PRODUCT)

    @classmethod
    def from_vectors(cls, ids: Sequence[str], vectors: np.ndarray,
                     backend: str = "numpy", **params: int) -> "SearchIndex":
        """An index over `vectors` as given: a memory-mapped array is used in place."""
        vectors = np.asarray(vectors)
        index = cls(vectors.shape[1] if vectors.ndim == 2 else 0, backend, **params)
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
        """Append `vectors` (N, D), float32 and L2-normalised, under `ids`.

        An ANN index is built by the first add (IVF-PQ: trained on a sample of
        it, or of the first adds that bring enough vectors) and extended after.
        Its default nlist follows the vectors it is trained on: when adding a
        large collection in pieces, give `nlist` for the final size."""
        vectors = np.asanyarray(vectors)  # keeps a memory map a memory map
        if vectors.dtype != np.float32:
            vectors = vectors.astype(np.float32)
        if vectors.ndim != 2 or vectors.shape[1] != self.dim:
            raise ValueError(f"expected (N, {self.dim}) vectors, got {vectors.shape}")
        if len(ids) != len(vectors):
            raise ValueError(f"{len(ids)} ids for {len(vectors)} vectors")
        if not len(ids):
            return
        self._append(ids, vectors)
        if self.backend in ANN_BACKENDS and self._faiss is None:
            self._build(warn=len(self.ids) == len(ids))
        elif self.backend in ANN_BACKENDS:
            if self._mapped:  # a memory-mapped faiss index is read-only: copy it into RAM
                faiss = _faiss()
                self._faiss = faiss.deserialize_index(faiss.serialize_index(self._faiss))
                self._mapped = False
                self._tune()
            _add(self._faiss, vectors)
        elif self._faiss is not None:
            if not self._faiss.is_trained:  # fp16 codes need no statistics; faiss asks anyway
                self._faiss.train(np.ascontiguousarray(vectors[:1]))
            self._faiss.add(np.ascontiguousarray(vectors))

    def _append(self, ids: Sequence[str], vectors: np.ndarray) -> None:
        if self._rows is not None:
            for n, image_id in enumerate(ids, start=len(self.ids)):
                self._rows.setdefault(image_id, []).append(n)
        self.ids.extend(ids)
        if self._matrix is not None and len(self._matrix):
            self._chunks = [self._matrix]
        elif self._matrix is not None:
            self._chunks = []
        self._chunks.append(vectors)
        self._matrix = None

    def _build(self, warn: bool) -> None:
        """Build the ANN index over all vectors so far, if there are enough to train."""
        params = ann_params(self.backend, len(self.ids), self.dim, **self._given)
        need = MIN_PER_CENTROID * max(256, params["nlist"]) if self.backend == "ivfpq" else 1
        if len(self.ids) < need:
            if warn:
                log.warning("ivfpq: %d vectors are too few to train the index (it needs %d); "
                            "searching them exactly until there are enough", len(self.ids), need)
            return
        self.params = params
        self._faiss = _new_ann_index(self.backend, self.vectors, params)
        self._tune()

    def tune(self, **params: int) -> None:
        """Change search settings (ivfpq: nprobe, rerank; hnsw: ef_search) without
        rebuilding the index."""
        _check_params(self.backend, self.dim, params)
        params = {name: int(value) for name, value in params.items()}
        self._given |= params
        if self.params:
            self.params |= params
            self._tune()

    def _tune(self) -> None:
        if self.backend == "ivfpq":
            self._faiss.nprobe = self.params["nprobe"]
        elif self.backend == "hnsw":
            self._faiss.hnsw.efSearch = self.params["ef_search"]

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
        banned = [self._rows_of(ex) for ex in exclude]
        if self.backend in ANN_BACKENDS and self._faiss is not None:
            return self._search_ann(queries, k, banned)
        if self._faiss is not None:
            return [self._search_faiss(q, k, b) for q, b in zip(queries, banned)]
        return search_exact(queries, self.vectors, self.ids, k, banned)

    def _rows_of(self, exclude: Collection[str]) -> list[int]:
        """The rows of the ids in `exclude`, without a scan (the map is made once,
        by the first search that excludes anything)."""
        if not exclude:
            return []
        if self._rows is None:
            self._rows = {}
            for n, image_id in enumerate(self.ids):
                self._rows.setdefault(image_id, []).append(n)
        return [row for image_id in exclude for row in self._rows.get(image_id, ())]

    def _search_ann(self, queries: np.ndarray, k: int,
                    banned: list[list[int]]) -> list[list[Neighbour]]:
        # Ask the index for k rows plus the banned ones (ivfpq: at least `rerank`),
        # then order them by exact float32 score: re-scored from the vectors
        # (ivfpq; only these rows are read) or the index's own (hnsw stores float32).
        rerank = self.params.get("rerank", 0)
        want = max(k + max(map(len, banned)), rerank)
        if want >= len(self.ids):  # (nearly) every row: a scan is complete and cheap
            return search_exact(queries, self.vectors, self.ids, k, banned)
        scores, rows = self._faiss.search(np.ascontiguousarray(queries), want)
        results = []
        for query, score, row, ban in zip(queries, scores, rows, banned):
            keep = row >= 0  # -1: fewer candidates than asked for in the lists probed
            order = np.argsort(row[keep])  # in row order: a memory map is read forwards
            score, row = score[keep][order], row[keep][order]
            if rerank:
                score = self.vectors[row] @ query
            results.append(_best(score, self.ids, k, ban, rows=row))
        return results

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
        """Write `path`.npy (vectors), `path`.faiss (an ANN index, once built) and
        `path`.json (ids, dim, backend, the ANN index's settings), each atomically,
        the .json last."""
        from atomic_files import atomic_path, atomic_writer, write_text_atomic
        path = Path(path)
        with atomic_writer(path.with_suffix(".npy")) as f:
            np.save(f, self.vectors)
        ann = None
        if self.backend in ANN_BACKENDS and self._faiss is not None:
            with atomic_path(path.with_suffix(".faiss"), suffix=".faiss") as tmp:
                _faiss().write_index(self._faiss, str(tmp))
            ann = {"file": path.with_suffix(".faiss").name, "backend": self.backend,
                   "count": len(self.ids), "dim": self.dim, "params": self.params}
        write_text_atomic(path.with_suffix(".json"), json.dumps(
            {"dim": self.dim, "ids": self.ids, "backend": self.backend, "ann_index": ann}))

    @classmethod
    def load(cls, path: str | os.PathLike, backend: str | None = None,
             **params: int) -> "SearchIndex":
        """Read an index written by `save`, with `backend` (default: the one it was
        saved with). The vectors are memory-mapped, and so is a saved ANN index
        that matches (backend, count, dim and any build `params` given): it is read,
        not rebuilt; its search settings can be overridden by `params`."""
        path = Path(path)
        meta = json.loads(path.with_suffix(".json").read_text())
        vectors = np.load(path.with_suffix(".npy"), mmap_mode="r")
        if vectors.shape != (len(meta["ids"]), meta["dim"]):
            raise ValueError(f"{path}: {vectors.shape} vectors for {len(meta['ids'])} ids")
        backend = backend or meta.get("backend", "numpy")
        index = cls(meta["dim"], backend, **params)
        saved = meta.get("ann_index")  # absent in sidecars written before the ANN backends
        if not (saved and saved["backend"] == backend and saved["count"] == len(vectors)
                and saved["dim"] == index.dim):
            index.add(meta["ids"], vectors)  # builds (and trains) the backend's index
            return index
        index._append(meta["ids"], vectors)
        changed = [p for p in BUILD_PARAMS[backend] if p in params
                   and params[p] != saved["params"][p]]
        if changed:
            log.info("%s: %s changed; rebuilding the %s index", path, ", ".join(changed), backend)
            index._build(warn=True)
            return index
        try:
            index._faiss, index._mapped = _read_index(path.with_name(saved["file"]),
                                                      len(vectors), index.dim)
        except RuntimeError as exc:
            log.warning("%s: %s; rebuilding the %s index", path, exc, backend)
            index._build(warn=True)
            return index
        index.params = saved["params"] | params
        index._tune()
        return index


def _check_params(backend: str, dim: int, params: dict[str, int],
                  build: Sequence[str] = ()) -> None:
    """ValueError unless `params` are search settings of `backend` (or `build` ones),
    positive integers (rerank may be 0), with m dividing `dim`."""
    allowed = tuple(build) + SEARCH_PARAMS.get(backend, ())
    for name, value in params.items():
        if name not in allowed:
            raise ValueError(f"{name!r} is not a {'' if build else 'search '}setting of the "
                             f"{backend} backend" + (f": {', '.join(allowed)}" if allowed else ""))
        if (isinstance(value, bool) or not isinstance(value, (int, np.integer))
                or value < (0 if name == "rerank" else 1)):
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if params.get("m") and dim % params["m"]:
        raise ValueError(f"m={params['m']} does not divide the dimension {dim}")


def _new_ann_index(backend: str, vectors: np.ndarray, params: dict[str, int]):
    """A FAISS inner-product index over `vectors`: an HNSW graph, or IVF-PQ with
    8-bit codes trained on a sample (TRAIN_PER_LIST rows a list, fixed seed)."""
    faiss = _faiss()
    n, dim = vectors.shape
    if backend == "hnsw":
        index = faiss.IndexHNSWFlat(dim, params["hnsw_m"], faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = params["ef_construction"]
    else:
        index = faiss.IndexIVFPQ(faiss.IndexFlatIP(dim), dim, params["nlist"], params["m"], 8,
                                 faiss.METRIC_INNER_PRODUCT)
        sample = np.random.default_rng(0).choice(n, min(n, TRAIN_PER_LIST * params["nlist"]),
                                                 replace=False)
        index.train(np.ascontiguousarray(vectors[np.sort(sample)]))
        log.info("ivfpq: trained %d lists and %d-byte codes on %d of %d vectors",
                 params["nlist"], params["m"], len(sample), n)
    _add(index, vectors)
    return index


def _add(index, vectors: np.ndarray) -> None:
    for start in range(0, len(vectors), ADD_BATCH):
        index.add(np.ascontiguousarray(vectors[start:start + ADD_BATCH]))


def _read_index(file: Path, count: int, dim: int):
    """(index, memory-mapped?), RuntimeError unless it holds `count` vectors of
    `dim`. faiss 1.15's IO_FLAG_MMAP_IFC maps IVF-PQ's lists
    (codes and ids) and HNSW's float32 vectors; centroids, codebooks and the graph
    are read into RAM. (IO_FLAG_MMAP maps IVF lists as read-only on-disk lists that
    cannot be copied back into RAM for `add`, and reads HNSW whole.) Where mapping
    fails, the file is read normally."""
    faiss = _faiss()
    try:
        index, mapped = faiss.read_index(str(file), faiss.IO_FLAG_MMAP_IFC), True
    except (AttributeError, RuntimeError):  # an older faiss, or a file it cannot map
        index, mapped = faiss.read_index(str(file)), False
    if (index.ntotal, index.d) != (count, dim):
        raise RuntimeError(f"{file.name} holds {index.ntotal} vectors of dimension {index.d}, "
                           f"not {count} of {dim}")
    return index, mapped


def _faiss():
    try:
        import faiss
    except ImportError:
        from errors import UserError
        raise UserError("the faiss backend needs `pip install faiss-cpu`") from None
    return faiss
