"""Exact top-5 search: our numpy path vs FAISS vs a pure-Python loop, and the
memory-bandwidth floor, at 8k / 100k / 1M 512-d float32 vectors.

    python -m bench.search [--sizes 8000 100000 1000000] [--repeat 5]
    python -m bench.search --against 83d956e     # this tree's exact search vs a commit's

Measured side by side in one run:
  * floor: bytes of the float32 matrix / the machine's copy bandwidth, taken
    from a numpy copy of the same matrix in the same run (bytes read + written
    over time, so one scan is bounded by half that time)
  * numpy (SearchIndex "numpy"): one matrix-vector product + partial sort
  * numpy, batch of 64 queries (one matrix-matrix product), per query
  * FAISS IndexFlatIP (SearchIndex "faiss"), single query
  * FAISS float16 scalar quantizer (SearchIndex "faiss-fp16"), single query, and its
    top-5 agreement with exact float32
  * a pure-Python loop (8k only: the others would take minutes)

With --against REV: similarity_search.py of commit REV against this tree's, timed
in turns (old, new, old, ...) on the same data: SearchIndex numpy single query
and batch of 64, `top_k` (the memory's retrieval) and a full ranking (k = N, as
text search's fusion asks), with the ratio new/old and whether the top-5s agree.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.common import ROOT, record, table, timed
from similarity_search import SearchIndex

DIM, K = 512, 5


def python_loop(vectors: list[list[float]], query: list[float]) -> list[int]:
    scores = [sum(a * b for a, b in zip(row, query)) for row in vectors]
    return sorted(range(len(scores)), key=lambda i: -scores[i])[:K]


def old_module(rev: str):
    """similarity_search.py as it was at commit `rev`, imported under another name."""
    source = subprocess.run(["git", "show", f"{rev}:similarity_search.py"], cwd=ROOT,
                            check=True, capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp()) / "similarity_search_old.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("similarity_search_old", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def in_turns(old, new, repeat: int) -> tuple[float, float]:
    """Median seconds of `old()` and `new()`, called in turns so both see the same load."""
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(repeat):
        for fn, out in ((old, times[0]), (new, times[1])):
            start = time.perf_counter()
            fn()
            out.append(time.perf_counter() - start)
    return statistics.median(times[0]), statistics.median(times[1])


def against(rev: str, sizes: list[int], repeat: int) -> None:
    import similarity_search as new
    old = old_module(rev)
    rng = np.random.default_rng(0)
    rows = []
    for n in sizes:
        x = rng.standard_normal((n, DIM), dtype=np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        ids = [str(i) for i in range(n)]
        queries = rng.standard_normal((64, DIM), dtype=np.float32)
        queries /= np.linalg.norm(queries, axis=1, keepdims=True)
        a, b = old.SearchIndex.from_vectors(ids, x), new.SearchIndex.from_vectors(ids, x)
        cases = {
            "index single": (lambda: a.search(queries[0], K), lambda: b.search(queries[0], K)),
            "index batch-64": (lambda: a.search(queries, K), lambda: b.search(queries, K)),
            "top_k, exclude 1": (lambda: old.top_k(queries[0], x, ids, K, {"7"}),
                                 lambda: new.top_k(queries[0], x, ids, K, {"7"})),
            "full ranking": (lambda: a.search(queries[0], n), lambda: b.search(queries[0], n)),
        }
        same = all([[h.image_id for h in r] for r in old_run()] ==
                   [[h.image_id for h in r] for r in new_run()]
                   for old_run, new_run in ((lambda: a.search(queries, n), lambda: b.search(
                       queries, n)), (lambda: [old.top_k(q, x, ids, K, {"7"}) for q in queries],
                                      lambda: [new.top_k(q, x, ids, K, {"7"}) for q in queries])))
        for name, (run_old, run_new) in cases.items():
            t_old, t_new = in_turns(run_old, run_new, repeat)
            rows.append([f"{n:,}", name, f"{t_old * 1000:.2f} ms", f"{t_new * 1000:.2f} ms",
                         f"{t_new / t_old:.2f}x", "yes" if same else "NO"])
        del x, a, b
    record(f"Exact search, this tree vs {rev} (bench/search.py --against)", table(
        ["vectors", "search", f"{rev}", "this tree", "new/old", "same results"], rows),
        "Timed in turns (old, new, ...) on the same vectors, median of the repeats. Same "
        "results: every query's full ranking and top-5 (with an excluded id) identical.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[8000, 100000, 1000000])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--against", metavar="REV",
                        help="compare this tree's exact search with commit REV's")
    args = parser.parse_args()
    if args.against:
        return against(args.against, args.sizes, args.repeat)
    rng = np.random.default_rng(0)
    rows = []
    for n in args.sizes:
        x = rng.standard_normal((n, DIM), dtype=np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        ids = [str(i) for i in range(n)]
        queries = rng.standard_normal((64, DIM), dtype=np.float32)
        queries /= np.linalg.norm(queries, axis=1, keepdims=True)
        copy = np.empty_like(x)
        copy_s = timed(lambda: np.copyto(copy, x), args.repeat)
        del copy
        floor = copy_s / 2  # a copy reads and writes every byte; a scan only reads
        exact = SearchIndex.from_vectors(ids, x)
        single = timed(lambda: exact.search(queries[0], K), args.repeat)
        batch = timed(lambda: exact.search(queries, K), args.repeat) / len(queries)
        flat = SearchIndex.from_vectors(ids, x, backend="faiss")
        faiss_single = timed(lambda: flat.search(queries[0], K), args.repeat)
        del flat
        half = SearchIndex.from_vectors(ids, x, backend="faiss-fp16")
        half_single = timed(lambda: half.search(queries[0], K), args.repeat)
        want, got = exact.search(queries, K), half.search(queries, K)
        agreement = statistics.mean(len({h.image_id for h in a} & {h.image_id for h in b}) / K
                                    for a, b in zip(want, got))
        del half
        if n <= 10000:
            as_lists, query = x.tolist(), queries[0].tolist()
            start = time.perf_counter()
            python_loop(as_lists, query)
            loop = f"{(time.perf_counter() - start) * 1000:,.0f} ms"
        else:
            loop = "not run"
        ms = lambda s: f"{s * 1000:.2f} ms"  # noqa: E731
        rows.append([f"{n:,}", f"{x.nbytes / 1e9:.2f} GB", ms(floor), ms(single),
                     f"{single / floor:.2f}x", ms(batch), f"{single / batch:.1f}x",
                     ms(faiss_single), ms(half_single), f"{half_single / floor:.2f}x",
                     f"{agreement:.3f}", loop])
        del x, exact
    record("Exact top-5 search (bench/search.py)", table(
        ["vectors", "float32 size", "bandwidth floor", "numpy single", "vs floor",
         "numpy batch-64 per query", "batch speed-up", "faiss flat single",
         "faiss fp16 single", "fp16 vs f32 floor", "fp16 top-5 agreement", "python loop"],
        rows),
        "Floor = half the time of a numpy copy of the float32 matrix in the same run (a copy "
        "reads and writes every byte, a scan only reads). Goals at 1M: numpy single <= 1.25x "
        "the floor; batch-64 >= 3x the per-query throughput of single queries; fp16 single "
        "<= 0.65x the float32 floor with top-5 agreement >= 0.99. Median of the repeats.")


if __name__ == "__main__":
    main()
