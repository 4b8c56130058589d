"""Caption generation on the CPU: seconds per caption by batch size, image splitting and dtype.

    python -m bench.generate                          # SmolVLM-Instruct (2B), 2 captions a row
    python -m bench.generate --size 256m --captions 16 --batch-sizes 1 4 8
    python -m bench.generate --dtypes float32 --splitting off --max-seconds 1800

A random-weight VLM of a real SmolVLM architecture (bench/models.py) captions
Flickr8K-size photos (500x375) through VLMCaptioner.caption_batch: greedy, with
exactly --new-tokens new tokens per caption. `--size instruct` (the default) is
HuggingFaceTB/SmolVLM-Instruct, the product's default captioner (SigLIP so400m,
81 tokens per 384-px tile, SmolLM2-1.7B); `256m` / `500m` are the small
SmolVLM-256M/500M-Instruct (SigLIP base/512, 64 tokens per 512-px tile). Every
combination of dtype (float32, the CPU default, and bfloat16), image splitting
(off: one tile per image; on: the processor's default, a 500x375 photo resized to
4 tiles wide and cut into 12 tiles plus the global one) and batch size is one row,
each in a fresh process, so its peak RSS is its own; a row that runs past
--max-seconds is stopped and reported as such. Rows print as they finish; the
table goes to BENCHMARKS.md at the end.
"""

from __future__ import annotations

import argparse
import json
import os
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
    """Run in a child process: seconds per caption, first-token latency, tiles, peak RSS."""
    import logging
    logging.disable(logging.WARNING)
    import torch
    from dataset_loader import open_image
    from vlm_captioner import VLMCaptioner
    captioner = VLMCaptioner(model_path(f"smolvlm-{size}"), image_splitting=splitting,
                             max_new_tokens=new_tokens, dtype=getattr(torch, dtype))
    with tempfile.TemporaryDirectory() as tmp:
        images = [open_image(p) for p in make_photos(Path(tmp), captions)]
    prompt = ("Similar images were described as: a dog runs on the grass; a brown dog "
              "plays outside. Write one short sentence that describes this image.")
    inputs = captioner.processor(text=[captioner.chat_text(prompt)], images=[[images[0]]],
                                 return_tensors="pt")
    pixels = inputs["pixel_values"]
    tiles = pixels.shape[1] if pixels.dim() == 5 else 1   # Idefics3: (batch, tiles, C, H, W)
    # warm-up: one image, one new token (every weight is read once: page cache, allocator)
    captioner.generation.update(max_new_tokens=1, min_new_tokens=1)
    captioner.caption_batch(images[:1], [prompt])
    captioner.generation.update(max_new_tokens=new_tokens, min_new_tokens=new_tokens)
    first = []
    cpu, start = _cpu_seconds(), time.perf_counter()
    for n in range(0, captions, batch):
        captioner.caption_batch(images[n:n + batch], [prompt] * len(images[n:n + batch]))
        first.append(captioner.last_first_token)
    seconds = time.perf_counter() - start
    return {"captions_per_s": captions / seconds, "s_per_caption": seconds / captions,
            # CPU time of the process: what a caption costs whatever else the machine runs
            "cpu_s_per_caption": (_cpu_seconds() - cpu) / captions,
            "first_token_s": sum(first) / len(first), "tiles": tiles,
            "prompt_tokens": int(inputs["input_ids"].shape[1]),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "threads": torch.get_num_threads()}


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


NAMES = {"instruct": "SmolVLM-Instruct (2B)", "256m": "SmolVLM-256M-Instruct",
         "500m": "SmolVLM-500M-Instruct"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=tuple(NAMES), default="instruct",
                        help="architecture (default instruct: the default captioner)")
    parser.add_argument("--new-tokens", type=int, default=20)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--dtypes", nargs="+", choices=("float32", "bfloat16"),
                        default=["float32", "bfloat16"])
    parser.add_argument("--splitting", nargs="+", choices=("off", "on"), default=["off", "on"],
                        help="image splitting off (one tile) and/or on (the processor's default)")
    parser.add_argument("--captions", type=int, default=2,
                        help="captions per row, at least one batch (default 2: the 2B model "
                             "takes tens of seconds per caption on a CPU)")
    parser.add_argument("--max-seconds", type=float, default=3600,
                        help="a row still running after this long is stopped and reported")
    parser.add_argument("--out", help="append the table here instead of BENCHMARKS.md")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.size, new_tokens=args.new_tokens, **json.loads(args.child))))
        return
    model_path(f"smolvlm-{args.size}")  # build it once, outside the timed children
    # the cheap rows first: one tile, then the processor's splitting
    settings = [(bs, split == "on", max(args.captions, bs), dtype) for split in args.splitting
                for dtype in args.dtypes for bs in args.batch_sizes]
    import torch
    rows, rate, load = [], {}, os.getloadavg()
    threads = torch.get_num_threads()  # the children's default; each reports its own
    for batch, splitting, captions, dtype in settings:
        child = json.dumps({"batch": batch, "splitting": splitting, "captions": captions,
                            "dtype": dtype})
        started = time.perf_counter()
        try:
            out = subprocess.run([sys.executable, "-m", "bench.generate", "--size", args.size,
                                  "--new-tokens", str(args.new_tokens), "--child", child],
                                 capture_output=True, text=True, timeout=args.max_seconds,
                                 cwd=Path(__file__).resolve().parent.parent)
            stopped = (f"stopped (exit {out.returncode}: {out.stderr.strip()[-200:]})"
                       if out.returncode else None)
        except subprocess.TimeoutExpired:
            stopped = f"not finished in {args.max_seconds:.0f} s"
        if stopped:  # out of memory, killed, too slow: the other rows still count
            rows.append(["on" if splitting else "off", dtype, batch, captions, "", stopped,
                         "", "", "", "", ""])
            print("| " + " | ".join(map(str, rows[-1])) + " |", flush=True)
            continue
        r = json.loads(out.stdout.strip().splitlines()[-1])
        threads = r["threads"]
        rate[batch, splitting, dtype] = r["captions_per_s"]
        base = rate.get((1, False, "float32"))
        rows.append([f"{'on' if splitting else 'off'} ({r['tiles']} tile"
                     f"{'s' if r['tiles'] > 1 else ''})", dtype, batch, captions,
                     r["prompt_tokens"], f"{r['s_per_caption']:.2f}",
                     f"{r['cpu_s_per_caption']:.1f}", f"{r['captions_per_s']:.4f}",
                     f"{r['captions_per_s'] / base:.2f}×" if base else "",
                     f"{r['first_token_s']:.2f}", f"{r['peak_rss_mb']:.0f}"])
        print("| " + " | ".join(map(str, rows[-1])) + f" | ({time.perf_counter() - started:.0f} s"
              " with loading)", flush=True)
    body = table(["image splitting", "dtype", "batch", "captions", "prompt tokens",
                  "s/caption", "CPU s/caption", "captions/s", "÷ batch 1, 1 tile, float32",
                  "first token (s)", "peak RSS (MB)"], rows)
    notes = (f"{NAMES[args.size]} architecture, random weights, on the CPU ({threads} torch "
             f"threads), greedy, exactly {args.new_tokens} new tokens, 500×375 photos, one "
             "fresh process per row, after a one-token warm-up. Prompt tokens: one image's "
             "prompt (image tokens + text). CPU s/caption: the process's CPU time (all threads) "
             "per caption, which other load on the machine inflates far less than wall time. "
             "First token: seconds from the start of a generate call to its first new token "
             "(vision encoder + prefill), per call. Load average (1 min) of the machine: "
             f"{load[0]:.1f} at the start, {os.getloadavg()[0]:.1f} at the end.")
    record(f"Caption generation (bench/generate.py, {NAMES[args.size]})", body, notes,
           path=args.out)


if __name__ == "__main__":
    main()
