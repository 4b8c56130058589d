"""Caption datastores (RETRIEVE "captions"): retrieval from 1M captions beside retrieval
from 1M images, and building a corpus's CLIP text vectors beside the text tower alone.

    python -m bench.caption_datastore [--size 1000000] [--queries 20] [--texts 2048]

Measured side by side in one run, on this machine:
  * retrieval, per query (median of --queries single queries), 512-d unit vectors:
      - images: retrieval.nearest over a Memory of SIZE images (top 5, the pipeline's
        image retrieval)
      - captions: retrieval.nearest_captions over a CaptionDatastore of SIZE corpus
        captions (top 5, no memory images)
      - guarded: both with the leak guard of batch runs (0.95), over a datastore of
        the SIZE memory images' own captions (SmallCap's datastore: each caption has
        its image, so the guard must keep the query's near-duplicates' captions out;
        it compares the query with the images of the captions that come up)
      - the exact scan alone (SearchIndex "numpy", single query): the floor of both
  * corpus embedding, captions/s: caption_datastore.TextVectors (tokenise, forward,
    normalise, save each chunk atomically, with its probe and progress bar) against
    the CLIP text tower's forward alone on the same texts tokenised ahead, in batches
    of the same size, under inference_mode. A real-size ViT-B/32 CLIP with random
    weights (bench/models.py: the cost is the real model's).
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time

import numpy as np

from bench.common import record, table, timed

DIM, K = 512, 5


def _unit(rng: np.random.Generator, n: int) -> np.ndarray:
    x = rng.standard_normal((n, DIM), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def retrieval_times(size: int, queries: int) -> list[list[object]]:
    """Milliseconds per query of image, caption and guarded caption retrieval."""
    from caption_datastore import CaptionDatastore, Entry
    from memory import Memory
    from retrieval import Selection, nearest, nearest_captions
    from similarity_search import SearchIndex

    rng = np.random.default_rng(0)
    images = _unit(rng, size)
    ids = [f"{n:07d}.jpg" for n in range(size)]
    memory = Memory(ids, images, lambda image_id: ["a caption"], ["train"] * size)
    texts = _unit(rng, size)
    store = CaptionDatastore([Entry(f"corpus:c.txt:{n + 1}", f"caption {n}", file="c.txt",
                                    line=n + 1) for n in range(size)], texts)
    asked = _unit(rng, queries)
    empty = Memory.empty(DIM)
    scan = SearchIndex.from_vectors(ids, images)

    def per_query(fn) -> float:
        fn(asked[0])                 # warm: first-touch page faults, lazily built lookups
        return 1000 * float(np.median([timed(lambda q=q: fn(q), 1) for q in asked]))
    image_ms = per_query(lambda q: nearest(memory, "query.jpg", q, Selection(K)))
    caption_ms = per_query(lambda q: nearest_captions(store, empty, "query.jpg", q,
                                                      Selection(K)))
    owned = CaptionDatastore([Entry(f"{i}#0", f"caption {n}", image_id=i)
                              for n, i in enumerate(ids)], texts)
    guard = Selection(K, near_duplicate_threshold=0.95)
    image_guarded_ms = per_query(lambda q: nearest(memory, "query.jpg", q, guard))
    guarded_ms = per_query(lambda q: nearest_captions(owned, memory, "query.jpg", q, guard))
    scan_ms = per_query(lambda q: scan.search(q, K))
    return [["images (retrieval.nearest)", f"{size:,} images", f"{image_ms:.1f} ms", "1.00x"],
            ["captions (retrieval.nearest_captions)", f"{size:,} captions",
             f"{caption_ms:.1f} ms", f"{caption_ms / image_ms:.2f}x"],
            ["images, leak guard 0.95", f"{size:,} images", f"{image_guarded_ms:.1f} ms",
             f"{image_guarded_ms / image_ms:.2f}x"],
            ["captions of the memory's images, leak guard 0.95",
             f"{size:,} captions of {size:,} images", f"{guarded_ms:.1f} ms",
             f"{guarded_ms / image_ms:.2f}x"],
            ["exact scan alone (SearchIndex numpy)", f"{size:,} vectors", f"{scan_ms:.1f} ms",
             f"{scan_ms / image_ms:.2f}x"]]


def _captions(n: int) -> list[str]:
    """Flickr-like captions, all different."""
    rng = np.random.default_rng(1)
    who = ["A dog", "Two children", "A man in a red shirt", "A woman", "A black and white dog",
           "A group of people", "A young girl", "A cyclist", "A brown horse", "Three boys"]
    what = ["runs through the grass", "jumps into a swimming pool", "sits on a park bench",
            "plays in the snow", "climbs a large rock", "rides a bike down a dirt road",
            "walks along the beach at sunset", "stands in front of a crowded market"]
    where = ["", "near a lake", "in the city", "on a sunny day", "beside a wooden fence"]
    return [f"{who[rng.integers(len(who))]} {what[rng.integers(len(what))]} "
            f"{where[rng.integers(len(where))]} ({n})".replace("  ", " ") for n in range(n)]


def embedding_rates(texts: int, batch_size: int, chunk: int) -> tuple[float, float, float]:
    """(forward only, pipeline, TEXT_CHUNK) captions/s for `texts` captions."""
    import torch

    import caption_datastore
    from bench.models import model_path
    from image_embedder import ImageEmbedder

    embedder = ImageEmbedder(str(model_path("clip")), batch_size=batch_size)
    captions = _captions(texts)
    embedder.embed_texts(captions[:batch_size])          # warm-up
    tokenizer = embedder.text_tokenizer()
    batches = [tokenizer(captions[s:s + batch_size], padding=True, truncation=True,
                         max_length=77, return_tensors="pt")
               for s in range(0, texts, batch_size)]

    def forward() -> None:
        with torch.inference_mode():
            for batch in batches:
                embedder.model.get_text_features(**batch)

    def pipeline() -> None:
        with tempfile.TemporaryDirectory() as db_dir:
            caption_datastore.TextVectors(embedder, db_dir)(captions, chunk=chunk,
                                                            progress=False)
    best = {"forward": float("inf"), "pipeline": float("inf")}
    for _ in range(2):            # alternated, best of two: least disturbed by other work
        for name, fn in (("forward", forward), ("pipeline", pipeline)):
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - start)
    return texts / best["forward"], texts / best["pipeline"], chunk


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=1_000_000)
    parser.add_argument("--queries", type=int, default=20)
    parser.add_argument("--texts", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--chunk", type=int, default=512,
                        help="texts per saved chunk (TEXT_CHUNK is 4096; smaller here so "
                             "the run pays for several saves)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    rows = retrieval_times(args.size, args.queries)
    forward, pipeline, chunk = embedding_rates(args.texts, args.batch_size, args.chunk)
    body = (f"Retrieval of the top {K} for one query ({args.queries} queries, median), 512-d:"
            "\n\n" + table(["retrieval", "datastore", "per query", "vs images"], rows)
            + f"\n\nCorpus embedding, {args.texts:,} captions, batch {args.batch_size}, "
            f"ViT-B/32 text tower (random weights), float32 on the CPU:\n\n"
            + table(["path", "captions/s", "vs forward only"],
                    [["forward only (pre-tokenised, inference_mode)", f"{forward:.0f}",
                      "1.00x"],
                     [f"TextVectors (tokenise, forward, normalise, save chunks of {chunk})",
                      f"{pipeline:.0f}", f"{pipeline / forward:.2f}x"]]))
    record("Caption datastores (bench/caption_datastore.py)", body)


if __name__ == "__main__":
    main()
