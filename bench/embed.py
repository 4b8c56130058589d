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
    reading and preprocessing overlapped with the forward (a prefetch thread)
  * sequential: the same batches without the overlap (read, preprocess, forward)
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import record, table  # noqa: E402
from bench.models import model_path  # noqa: E402


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


def rate(n: int, fn) -> float:
    start = time.perf_counter()
    fn()
    return n / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=500)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 16, 32])
    parser.add_argument("--loop-images", type=int, default=200)
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

        def seed_loop() -> None:
            for path in paths[:args.loop_images]:
                img = Image.open(path)
                inputs = processor(images=img, return_tensors="pt")
                model.get_image_features(**inputs).pooler_output.detach().numpy().squeeze()

        seed_loop_n = min(args.loop_images, len(paths))
        model.get_image_features(**processor(images=Image.open(paths[0]), return_tensors="pt"))
        loop = rate(seed_loop_n, seed_loop)
        pixels = embedder._pixels([open_image(p) for p in paths])
        rows = [["loop (seed scripts)", 1, f"{loop:.1f}", "", "1.00×"]]
        best = 0.0
        for bs in args.batch_sizes:
            embedder.batch_size = bs
            embedder.embed([open_image(p) for p in paths[:bs]])  # warm-up

            def forward() -> None:
                for start in range(0, len(pixels), bs):
                    embedder._encode(pixels[start:start + bs])

            def sequential() -> None:
                for start in range(0, len(paths), bs):
                    embedder._encode(embedder._pixels([open_image(p)
                                                       for p in paths[start:start + bs]]))

            limit = rate(len(paths), forward)
            piped = rate(len(paths), lambda: embedder.embed(open_image(p) for p in paths))
            plain = rate(len(paths), sequential)
            best = max(best, piped)
            rows += [[f"forward only (limit)", bs, f"{limit:.1f}", "1.00", f"{limit / loop:.2f}×"],
                     [f"pipeline (overlapped)", bs, f"{piped:.1f}", f"{piped / limit:.2f}",
                      f"{piped / loop:.2f}×"],
                     [f"sequential (no overlap)", bs, f"{plain:.1f}", f"{plain / limit:.2f}",
                      f"{plain / loop:.2f}×"]]
    # What a lower precision would allow: not used on the CPU (resolve_device keeps
    # fp32 there), measured for the record on CPUs with native bfloat16 instructions.
    bs = max(args.batch_sizes)
    embedder.model.to(torch.bfloat16)
    embedder.dtype = torch.bfloat16
    embedder._encode(pixels[:bs])
    half = rate(len(pixels), lambda: [embedder._encode(pixels[n:n + bs])
                                      for n in range(0, len(pixels), bs)])
    rows.append(["forward only, bfloat16 (not used on CPU)", bs, f"{half:.1f}", "",
                 f"{half / loop:.2f}×"])
    body = table(["path", "batch", "images/s", "÷ forward only", "÷ loop"], rows)
    notes = (f"ViT-B/32 CLIP (CLIPConfig() defaults, random weights), float32 on the CPU, "
             f"{args.images} JPEGs of 500×375 ({kb:.0f} KB average), loop over the first "
             f"{seed_loop_n}; torch {torch.__version__} with {torch.get_num_threads()} threads, "
             f"plus 1 prefetch thread for reading and preprocessing. Best pipeline: "
             f"{best:.1f} images/s = {best / loop:.2f}× the loop.")
    record("Image embedding throughput (bench/embed.py)", body, notes, path=args.out)


if __name__ == "__main__":
    main()
