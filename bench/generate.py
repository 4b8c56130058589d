"""Caption generation on the CPU: captions/s by batch size, image splitting on/off, peak RSS.

    python -m bench.generate [--size 256m] [--new-tokens 20] [--batch-sizes 1 4 8]

A random-weight VLM of the real SmolVLM-256M-Instruct architecture (bench/models.py;
SigLIP base/512 vision, 64 tokens per 512-px tile, SmolLM2-135M text) captions
Flickr8K-size photos (500x375) through VLMCaptioner.caption_batch: greedy, with
exactly --new-tokens new tokens per caption, in float32 (the CPU default) and with
--dtype bfloat16. Each setting runs in a fresh process, so its peak RSS is its
own. Image splitting off: one 512-px tile per image;
on (the checkpoint's default): the image is resized to 2048 px and cut into 12
tiles plus the global one, 13 in all.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import record, table
from bench.embed import make_photos
from bench.models import model_path


def measure(size: str, batch: int, splitting: bool, captions: int, new_tokens: int,
            dtype: str = "float32") -> dict:
    """Run in a child process: seconds per caption, first-token latency, peak RSS."""
    import logging
    logging.disable(logging.WARNING)
    import torch
    from dataset_loader import open_image
    from vlm_captioner import VLMCaptioner
    captioner = VLMCaptioner(model_path(f"smolvlm-{size}"), image_splitting=splitting,
                             max_new_tokens=new_tokens, dtype=getattr(torch, dtype))
    captioner.generation["min_new_tokens"] = new_tokens  # fixed length: same work per caption
    with tempfile.TemporaryDirectory() as tmp:
        images = [open_image(p) for p in make_photos(Path(tmp), captions)]
    prompt = ("Similar images were described as: a dog runs on the grass; a brown dog "
              "plays outside. Write one short sentence that describes this image.")
    captioner.caption_batch(images[:1], [prompt])  # warm-up
    first = []
    start = time.perf_counter()
    for n in range(0, captions, batch):
        captioner.caption_batch(images[n:n + batch], [prompt] * len(images[n:n + batch]))
        first.append(captioner.last_first_token)
    seconds = time.perf_counter() - start
    tiles = 13 if splitting else 1
    return {"captions_per_s": captions / seconds, "s_per_caption": seconds / captions,
            "first_token_s": sum(first) / len(first), "tiles": tiles,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "threads": torch.get_num_threads()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=("256m", "500m"), default="256m")
    parser.add_argument("--new-tokens", type=int, default=20)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--captions", type=int, default=16,
                        help="captions per setting (splitting on: a quarter of them)")
    parser.add_argument("--out", help="append the table here instead of BENCHMARKS.md")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.size, new_tokens=args.new_tokens, **json.loads(args.child))))
        return
    model_path(f"smolvlm-{args.size}")  # build it once, outside the timed children
    settings = [(bs, False, max(args.captions, bs), "float32") for bs in args.batch_sizes]
    settings.append((1, True, max(2, args.captions // 4), "float32"))
    # --dtype bfloat16 (not the CPU default), at the smallest and largest batch
    settings += [(bs, False, max(args.captions, bs), "bfloat16")
                 for bs in sorted({min(args.batch_sizes), max(args.batch_sizes)})]
    rows, rate = [], {}
    for batch, splitting, captions, dtype in settings:
        child = json.dumps({"batch": batch, "splitting": splitting, "captions": captions,
                            "dtype": dtype})
        out = subprocess.run([sys.executable, "-m", "bench.generate", "--size", args.size,
                              "--new-tokens", str(args.new_tokens), "--child", child],
                             check=True, capture_output=True, text=True,
                             cwd=Path(__file__).resolve().parent.parent)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        rate[batch, splitting, dtype] = r["captions_per_s"]
        base = rate.get((1, False, "float32"))
        rows.append(["on (13 tiles)" if splitting else "off (1 tile)", dtype, batch, captions,
                     f"{r['captions_per_s']:.3f}", f"{r['s_per_caption']:.2f}",
                     f"{r['captions_per_s'] / base:.2f}×" if base else "",
                     f"{r['first_token_s']:.2f}", f"{r['peak_rss_mb']:.0f}"])
    body = table(["image splitting", "dtype", "batch", "captions", "captions/s", "s/caption",
                  "÷ batch 1, 1 tile", "first token (s)", "peak RSS (MB)"], rows)
    notes = (f"SmolVLM-{args.size.upper()}-Instruct architecture, random weights, on the "
             f"CPU ({r['threads']} torch threads), greedy, exactly {args.new_tokens} new tokens, "
             "500×375 photos, one fresh process per row. First token: seconds from the start "
             "of a generate call to its first new token (vision encoder + prefill).")
    record(f"Caption generation (bench/generate.py, SmolVLM-{args.size})", body, notes,
           path=args.out)


if __name__ == "__main__":
    main()
