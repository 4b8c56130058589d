"""Image-embedding throughput: our pipeline vs a per-image loop vs the model's forward alone.

    python -m bench.embed [--images 500] [--batch-sizes 8 16 32] [--loop-images 200]

A real-size ViT-B/32 CLIP with random weights (bench/models.py; the cost is the
real model's) embeds a folder of Flickr8K-size JPEGs (500x375). Measured side by
side in one run, images/s:
  * loop: the seed scripts' way, one image at a time: open, preprocess, forward
    (autograd on, as they had it), to numpy
  * forward only: the model on pre-made pixel tensors, under inference_mode: the
    limit for this model on this machine, per batch size
  * pipeline: ImageEmbedder.embed over files opened by dataset_loader.open_image,
    as it runs on the CPU (read, preprocess, forward, batch after batch)
  * pipeline + prefetch thread: reading and preprocessing the next batch
    overlapped with the forward, as it runs on GPUs
  * the three again with --dtype bfloat16, at the largest batch size
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.common import record, table
from bench.models import model_path


def make_photos(folder: Path, n: int) -> list[Path]:
    """`n` 500x375 JPEGs with smooth, photo-like content (random noise would be
    unrealistically hard to compress and slow to decode)."""
    from PIL import Image, ImageFilter
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        small = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
        img = Image.fromarray(small).resize((500, 375), Image.BICUBIC)
        grain = rng.normal(0, 12, (375, 500, 3))
        img = Image.fromarray(np.clip(np.asarray(img) + grain, 0, 255).astype(np.uint8))
        path = folder / f"{i:05d}.jpg"
        img.filter(ImageFilter.SMOOTH).save(path, quality=90)
        paths.append(path)
    return paths


def rate(n: int, fn, repeat: int = 1) -> float:
    """Items per second of `fn` (which handles `n` items): the best of `repeat` runs,
    the least disturbed by other work on a shared machine."""
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return n / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=500)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 16, 32])
    parser.add_argument("--loop-images", type=int, default=200)
    parser.add_argument("--repeat", type=int, default=2, help="runs per measurement; the best")
    parser.add_argument("--out", help="append the table here instead of BENCHMARKS.md")
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    import torch
    from dataset_loader import open_image
    from image_embedder import ImageEmbedder
    from PIL import Image

    clip = model_path("clip")
    embedder = ImageEmbedder(clip)
    model, processor = embedder.model, embedder.processor
    with tempfile.TemporaryDirectory() as tmp:
        paths = make_photos(Path(tmp), args.images)
        kb = sum(p.stat().st_size for p in paths) / len(paths) / 1024
        loop_paths = paths[:args.loop_images]

        def seed_loop() -> None:
            for path in loop_paths:
                img = Image.open(path)
                inputs = processor(images=img, return_tensors="pt")
                model.get_image_features(**inputs).pooler_output.detach().numpy().squeeze()

        seed_loop()  # warm-up
        loop = rate(len(loop_paths), seed_loop, args.repeat)
        pixels = embedder.pixels([open_image(p) for p in paths])

        def measure(embedder: ImageEmbedder, bs: int) -> tuple[float, float, float]:
            """images/s: forward only, the pipeline as is (on the CPU: no prefetch
            thread), the pipeline with the prefetch thread (as on GPUs)."""
            embedder.batch_size = bs
            embedder.embed([open_image(p) for p in paths[:bs]])  # warm-up
            forward = lambda: [embedder.encode(pixels[n:n + bs])  # noqa: E731
                               for n in range(0, len(pixels), bs)]
            pipeline = lambda: embedder.embed(open_image(p) for p in paths)  # noqa: E731
            speeds = [rate(len(paths), forward, args.repeat), rate(len(paths), pipeline,
                                                                   args.repeat)]
            embedder.overlap = True
            speeds.append(rate(len(paths), pipeline, args.repeat))
            embedder.overlap = False
            return tuple(speeds)

        def rows_for(label: str, bs: int, limit: float, piped: float, overlapped: float) -> list:
            return [[f"forward only (limit){label}", bs, f"{limit:.1f}", "1.00",
                     f"{limit / loop:.2f}×"],
                    [f"pipeline{label}", bs, f"{piped:.1f}", f"{piped / limit:.2f}",
                     f"{piped / loop:.2f}×"],
                    [f"pipeline + prefetch thread{label}", bs, f"{overlapped:.1f}",
                     f"{overlapped / limit:.2f}", f"{overlapped / loop:.2f}×"]]

        rows = [["loop (seed scripts)", 1, f"{loop:.1f}", "", "1.00×"]]
        best = 0.0
        for bs in args.batch_sizes:
            limit, piped, overlapped = measure(embedder, bs)
            best = max(best, piped)
            rows += rows_for("", bs, limit, piped, overlapped)
        # --dtype bfloat16 (not the CPU default): CPUs with AVX512-BF16 or AMX run it natively.
        bs = max(args.batch_sizes)
        limit, half, overlapped = measure(ImageEmbedder(clip, dtype=torch.bfloat16), bs)
        rows += rows_for(", --dtype bfloat16", bs, limit, half, overlapped)
    body = table(["path", "batch", "images/s", "÷ forward only", "÷ loop"], rows)
    notes = (f"ViT-B/32 CLIP (CLIPConfig() defaults, random weights), float32 on the CPU unless "
             f"marked, {args.images} JPEGs of 500×375 ({kb:.0f} KB average), loop over the first "
             f"{len(loop_paths)}; best of {args.repeat} runs each; torch {torch.__version__} with "
             f"{torch.get_num_threads()} threads; the prefetch thread reads and preprocesses the "
             f"next batch during the forward (ImageEmbedder.overlap: on for GPUs, off on the "
             f"CPU, where the forward uses every core). Best float32 pipeline: {best:.1f} images/s = {best / loop:.2f}× the "
             f"loop; with --dtype bfloat16: {half:.1f} images/s = {half / loop:.2f}× the loop.")
    record("Image embedding throughput (bench/embed.py)", body, notes, path=args.out)


if __name__ == "__main__":
    main()
