"""Approximate top-5 search (ivfpq, hnsw) against exact numpy and faiss-fp16, at
1M x 512 synthetic embeddings: build time, size, latency, throughput, recall@5.

    python bench/ann.py [--n 1000000] [--hnsw-n N] [--quick] [--out BENCHMARKS.md]

The data: `--n` unit vectors around random centres (one per 500 vectors), the
noise as large as the centre, with a decaying (1/i) variance spectrum in a random
rotation, as embeddings have; 500 queries drawn the same way, not in the index.
Measured in one run, on one machine, side by side:
  * build: SearchIndex.from_vectors (ivfpq: trains on a sample, then encodes all)
  * size: the float32 matrix (numpy), the float16 codes (faiss-fp16), the saved
    .faiss file (ivfpq, hnsw; what a load maps into memory)
  * single query: mean latency of one `search(query, 5)` at a time, and queries/s
  * batch-64: queries/s searching 64 queries per call
  * recall@5: share of the exact numpy top-5 found, over the 500 queries
ivfpq is measured at several nprobe (candidates re-scored exactly: rerank=200,
and once without re-scoring), and once more after save + load (memory-mapped, no
retraining); hnsw at several ef_search.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.common import record, table
from similarity_search import ANN_BACKENDS, SearchIndex, ann_params

DIM, K, QUERIES, BATCH = 512, 5, 500, 64


def embeddings(n: int, dim: int, seed: int, centres: int) -> np.ndarray:
    """`n` unit vectors around `centres` random directions (fixed by the shared
    seed 0); the noise, as large as the centre, has a 1/i spectrum in a random rotation."""
    shared = np.random.default_rng(0)
    centre = shared.standard_normal((centres, dim), dtype=np.float32)
    centre /= np.linalg.norm(centre, axis=1, keepdims=True)
    spectrum = 1 / np.arange(1, dim + 1)
    scale = np.sqrt(spectrum / spectrum.sum()).astype(np.float32)  # noise norm ~1
    rotation = np.linalg.qr(shared.standard_normal((dim, dim)))[0].astype(np.float32)
    rng, out = np.random.default_rng(seed), np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, 100_000):  # in chunks: no 2 GB temporaries
        m = min(100_000, n - start)
        x = centre[rng.integers(centres, size=m)] + (
            rng.standard_normal((m, dim), dtype=np.float32) * scale) @ rotation
        out[start:start + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def per_query(index: SearchIndex, queries: np.ndarray, batch: int) -> float:
    """Mean seconds per query, searching `batch` queries per call."""
    start = time.perf_counter()
    for i in range(0, len(queries), batch):
        index.search(queries[i:i + batch], K)
    return (time.perf_counter() - start) / len(queries)


def top5(index: SearchIndex, queries: np.ndarray) -> list[set[str]]:
    return [{n.image_id for n in hits} for i in range(0, len(queries), BATCH)
            for hits in index.search(queries[i:i + BATCH], K)]


def recall(index: SearchIndex, queries: np.ndarray, exact: list[set[str]]) -> float:
    return float(np.mean([len(f & e) / K for f, e in zip(top5(index, queries), exact)]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=1_000_000, help="vectors (default 1,000,000)")
    parser.add_argument("--hnsw-n", type=int, help="vectors for hnsw (default --n)")
    parser.add_argument("--quick", action="store_true", help="a smoke test: 20,000 vectors")
    parser.add_argument("--out", help="file to append the table to (default BENCHMARKS.md)")
    args = parser.parse_args()
    n = 20_000 if args.quick else args.n
    hnsw_n = min(n, args.hnsw_n or n)
    singles = 50 if args.quick else 200  # single-query latency: the first queries

    started = time.perf_counter()
    centres = max(1, n // 500)
    x, queries = embeddings(n, DIM, 1, centres), embeddings(QUERIES, DIM, 2, centres)
    ids = [str(i) for i in range(n)]
    rows: list[list[object]] = []
    tmp = tempfile.TemporaryDirectory(prefix="bench-ann-")

    def measure(name: str, setting: str, index: SearchIndex, build: float, size: int,
                exact: list[set[str]], count: int = n) -> dict:
        few = singles if index.backend in ANN_BACKENDS else 20  # exact ones take ~0.1 s each
        single = per_query(index, queries[:few], 1)
        batch = per_query(index, queries, BATCH)
        row = {"backend": name, "setting": setting, "recall": recall(index, queries, exact),
               "single": single, "size": size,
               "default": index.params == ann_params(index.backend, count, DIM)}
        rows.append([name, setting, f"{count:,}", f"{build:.1f} s" if build else "-",
                     f"{size / 1e6:,.0f} MB", f"{single * 1000:.2f} ms", f"{1 / single:,.0f}",
                     f"{1 / batch:,.0f}", f"{row['recall']:.3f}"])
        print(" | ".join(map(str, rows[-1])), flush=True)
        return row

    def timed_build(backend: str, count: int, **params: int) -> tuple[SearchIndex, float]:
        start = time.perf_counter()
        index = SearchIndex.from_vectors(ids[:count], x[:count], backend, **params)
        return index, time.perf_counter() - start

    def saved_size(index: SearchIndex) -> int:
        index.save(Path(tmp.name) / index.backend)
        return (Path(tmp.name) / f"{index.backend}.faiss").stat().st_size

    exact = SearchIndex.from_vectors(ids, x)
    truth = top5(exact, queries)
    measure("numpy", "exact float32", exact, 0, x.nbytes, truth)
    half, build = timed_build("faiss-fp16", n)
    measure("faiss-fp16", "float16 codes", half, build, n * DIM * 2, truth)
    del half

    results = []
    ivf, build = timed_build("ivfpq", n)
    size, p = saved_size(ivf), dict(ivf.params)  # the defaults; tune() changes ivf.params
    base = f"nlist={p['nlist']}, m={p['m']}"
    for nprobe in sorted({8, 16, 32, 64, 128, p["nprobe"]}):
        ivf.tune(nprobe=nprobe, rerank=p["rerank"])
        results.append(measure("ivfpq", f"{base}, nprobe={nprobe}, rerank={p['rerank']}", ivf,
                               build, size, truth))
    ivf.tune(nprobe=p["nprobe"], rerank=0)
    measure("ivfpq", f"{base}, nprobe={p['nprobe']}, no re-scoring", ivf, build, size, truth)
    del ivf
    start = time.perf_counter()
    loaded = SearchIndex.load(Path(tmp.name) / "ivfpq", "ivfpq")  # memory-mapped, not retrained
    load = time.perf_counter() - start
    measure("ivfpq", f"saved + loaded in {load:.1f} s (mmap), defaults", loaded, 0, size, truth)
    del loaded

    if hnsw_n < n:  # the exact top-5 among the first hnsw_n vectors
        truth = top5(SearchIndex.from_vectors(ids[:hnsw_n], x[:hnsw_n]), queries)
    graph, build = timed_build("hnsw", hnsw_n)
    size, p = saved_size(graph), dict(graph.params)
    for ef in sorted({16, 32, 64, 128, 256, p["ef_search"]}):
        graph.tune(ef_search=ef)
        results.append(measure("hnsw", f"hnsw_m={p['hnsw_m']}, ef_construction="
                               f"{p['ef_construction']}, ef_search={ef}", graph, build, size,
                               truth, hnsw_n))
    del graph
    tmp.cleanup()

    def default(backend: str) -> str:
        r = next(r for r in results if r["backend"] == backend and r["default"])
        return (f"{backend} at its defaults (recall@5 {r['recall']:.3f}, "
                f"{r['single'] * 1000:.2f} ms a query, {r['size'] / x.nbytes:.0%} of the "
                "float32 size)")

    def fastest(backend: str) -> str:
        good = [r for r in results if r["backend"] == backend and r["recall"] >= 0.95]
        r = min(good, key=lambda r: r["single"], default=None)
        return f"{backend} {r['setting']}" if r else f"{backend}: none"

    defaults = ann_params("ivfpq", n, DIM) | ann_params("hnsw", hnsw_n, DIM)
    reread = defaults["rerank"] * DIM * 4 / 1000
    notes = [
        f"Data: {n:,} unit vectors around {centres:,} random centres, noise as large as the "
        f"centre with a 1/i spectrum in a random rotation; {QUERIES} held-out queries drawn "
        "the same way. Recall@5: share of the exact numpy top-5 found"
        + (f" (hnsw: among its first {hnsw_n:,} vectors, built at that size to keep the run "
           "short)" if hnsw_n < n else "") + ".",
        f"Single query: mean of the first {singles} queries one at a time (20 for numpy and "
        "faiss-fp16). Index size: the float32 matrix (numpy), the float16 codes (faiss-fp16), "
        "the saved .faiss file (ivfpq, hnsw: what `load` maps into memory; the loaded "
        "index's first queries fault its pages in).",
        f"ivfpq re-scores its `rerank` best candidates from the float32 vectors ({reread:,.0f} "
        "KB read per query at the default, memory-mapped after a load); hnsw's own scores are "
        "float32. Defaults at this size: "
        + ", ".join(f"{k}={v}" for k, v in defaults.items())
        + f". Whole run {(time.perf_counter() - started) / 60:.1f} min.",
        f"Recommended: for large collections, {default('ivfpq')}; where the index fits in "
        f"RAM and training is unwanted, {default('hnsw')}. The fastest settings with "
        f"recall@5 >= 0.95 here: {fastest('ivfpq')}; {fastest('hnsw')}.",
    ]
    record(f"Approximate top-5 search (bench/ann.py, {n:,} x {DIM})", table(
        ["backend", "setting", "vectors", "build", "index size", "single query",
         "single q/s", "batch-64 q/s", "recall@5"], rows), " ".join(notes), path=args.out)


if __name__ == "__main__":
    main()
