"""Retrieval robustness: is an image still found after it is resized, cropped, turned,
re-lit, re-encoded or put on another background?

    python -m bench.robustness --images-dir DIR                       # clip siglip resnet50 dinov2
    python -m bench.robustness --images-dir DIR --backbones clip dinov2 --limit 200
    python -m bench.robustness --images-dir DIR --json --no-record    # raw numbers, no log entry

The test items of the original image-search design (resolution, background,
angle), measured per backbone. Every readable image of the folder (recursive)
is an original; the originals form the gallery. Each image is then changed by
every variant below and the changed image is the query: recall@1 is the share
of queries whose original is the most similar gallery image (exact cosine
search, `similarity_search.SearchIndex`), recall@5 the share with the original
among the 5 most similar. The query itself is never in the gallery.

Variants (deterministic functions PIL RGB -> PIL RGB, in `VARIANTS`):

    resize_0.25, resize_0.5   downscaled to a quarter / half of each side (bicubic), not scaled back
    crop_80                   the central 80% of width and height
    flip                      mirrored left-right
    rotate_+15, rotate_-15    turned 15 degrees counter-clockwise / clockwise about the centre,
                              same size (corners cut off), uncovered corners mid-grey (128, 128, 128)
    brightness_+30/-30        brightness x1.3 / x0.7 (PIL ImageEnhance.Brightness)
    grayscale                 to 8-bit grey and back to RGB
    jpeg_q20                  re-encoded as JPEG at quality 20 (in memory)
    background_pad            centred on a canvas 1.5x its width and height, filled with a
                              fixed smooth random colour field (the same for every image)

Backbones are the aliases of `image_embedder.BACKBONES` ("clip" is
CLIP_MODEL_NAME, so RECAP_CLIP_MODEL_NAME / --clip-model-name apply) or any hub
id / local path. The table (rows = variants, recall@1 / recall@5 per backbone)
is printed and appended to BENCHMARKS.md with the machine, folder, image count
and exact models; a grouped bar chart of recall@1 goes to results/robustness.png.

Only numbers measured with real pretrained weights mean anything: download the
checkpoints once (e.g. `hf download facebook/dinov2-small`) and run with real
backbones (`--backbones clip dinov2`). The tiny random-weight models of the test
suite only check the mechanics; their recalls are noise.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import sys
import time
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

import config
from bench.common import ROOT, record, table
from errors import UserError, cli_failure, looks_like_path

log = logging.getLogger("robustness")

Variant = Callable[[Image.Image], Image.Image]

DEFAULT_BACKBONES = ("clip", "siglip", "resnet50", "dinov2")
ROTATE_FILL = (128, 128, 128)     # uncovered corners of a rotated image: mid-grey
PAD_SCALE = 1.5                   # background_pad canvas, per side
TOP_K = 5                         # recall@1 and recall@5


# --- variants -----------------------------------------------------------------------

def scaled(size: int, factor: float) -> int:
    """`size` * `factor`, rounded half up, at least 1 pixel."""
    return max(1, int(size * factor + 0.5))


def _rgb(img: Image.Image) -> Image.Image:
    return img if img.mode == "RGB" else img.convert("RGB")


def resize(factor: float) -> Variant:
    def variant(img: Image.Image) -> Image.Image:
        img = _rgb(img)
        return img.resize((scaled(img.width, factor), scaled(img.height, factor)),
                          Image.Resampling.BICUBIC)
    return variant


def crop_central(fraction: float) -> Variant:
    def variant(img: Image.Image) -> Image.Image:
        img = _rgb(img)
        w, h = scaled(img.width, fraction), scaled(img.height, fraction)
        left, top = (img.width - w) // 2, (img.height - h) // 2
        return img.crop((left, top, left + w, top + h))
    return variant


def flip(img: Image.Image) -> Image.Image:
    return ImageOps.mirror(_rgb(img))


def rotate(degrees: float) -> Variant:
    """Counter-clockwise for positive `degrees`, same size, corners ROTATE_FILL."""
    def variant(img: Image.Image) -> Image.Image:
        return _rgb(img).rotate(degrees, resample=Image.Resampling.BICUBIC, expand=False,
                                fillcolor=ROTATE_FILL)
    return variant


def brightness(factor: float) -> Variant:
    def variant(img: Image.Image) -> Image.Image:
        return ImageEnhance.Brightness(_rgb(img)).enhance(factor)
    return variant


def grayscale(img: Image.Image) -> Image.Image:
    return _rgb(img).convert("L").convert("RGB")


def jpeg(quality: int) -> Variant:
    def variant(img: Image.Image) -> Image.Image:
        buffer = io.BytesIO()
        _rgb(img).save(buffer, format="JPEG", quality=quality)
        buffer.seek(0)
        with Image.open(buffer) as out:
            out.load()
            return out.convert("RGB")
    return variant


def background(size: tuple[int, int]) -> Image.Image:
    """A smooth random colour field of `size`, the same on every call (seed 0): a 6x6
    grid of random colours upscaled bicubically, so it looks alike at any resolution."""
    grid = np.random.default_rng(0).integers(0, 256, size=(6, 6, 3), dtype=np.uint8)
    return Image.fromarray(grid, "RGB").resize(size, Image.Resampling.BICUBIC)


def background_pad(img: Image.Image) -> Image.Image:
    img = _rgb(img)
    canvas = background((scaled(img.width, PAD_SCALE), scaled(img.height, PAD_SCALE)))
    canvas.paste(img, ((canvas.width - img.width) // 2, (canvas.height - img.height) // 2))
    return canvas


VARIANTS: dict[str, Variant] = {
    "resize_0.25": resize(0.25),
    "resize_0.5": resize(0.5),
    "crop_80": crop_central(0.8),
    "flip": flip,
    "rotate_+15": rotate(15),
    "rotate_-15": rotate(-15),
    "brightness_+30": brightness(1.3),
    "brightness_-30": brightness(0.7),
    "grayscale": grayscale,
    "jpeg_q20": jpeg(20),
    "background_pad": background_pad,
}


# --- measurement --------------------------------------------------------------------

def evaluate(images: Sequence[Image.Image], ids: Sequence[str], embedders: Mapping[str, object],
             variants: Mapping[str, Variant] = VARIANTS, *, progress: bool = False
             ) -> dict[str, dict[str, dict[str, float]]]:
    """Recall@1 and recall@5 of finding each original from its variants.

    `images` (RGB, any sequence: a lazy one that opens files on indexing keeps
    memory flat) are the originals, `ids` their unique names, `embedders` maps a
    label to an `image_embedder.ImageEmbedder`. Images are taken a batch at a
    time; each is opened once and each variant made once for all backbones.
    Returns {label: {variant: {"recall@1": r1, "recall@5": r5}}}.
    """
    from tqdm.auto import tqdm

    from similarity_search import SearchIndex

    n, ids = len(images), list(ids)
    if len(ids) != n:
        raise ValueError(f"{len(ids)} ids for {n} images")
    if len(set(ids)) != n:
        raise ValueError("the image ids are not unique")
    if n < 2:
        raise UserError(f"robustness needs at least 2 images to search among, got {n}")
    if not embedders:
        raise ValueError("no embedders")
    batch = max(int(getattr(e, "batch_size", 32)) for e in embedders.values())
    originals: dict[str, list[np.ndarray]] = {b: [] for b in embedders}
    queries: dict[str, dict[str, list[np.ndarray]]] = {
        b: {v: [] for v in variants} for b in embedders}
    bar = tqdm(total=n, desc="robustness", unit="img", disable=not progress)
    for start in range(0, n, batch):
        chunk = [images[i] for i in range(start, min(n, start + batch))]
        for label, embedder in embedders.items():
            originals[label].append(embedder.embed(chunk))
        for name, variant in variants.items():
            changed = [variant(img) for img in chunk]
            for label, embedder in embedders.items():
                queries[label][name].append(embedder.embed(changed))
        bar.update(len(chunk))
    bar.close()

    truth = np.array(ids, dtype=object)
    results: dict[str, dict[str, dict[str, float]]] = {}
    for label in embedders:
        index = SearchIndex.from_vectors(ids, np.concatenate(originals[label]))
        results[label] = {}
        for name in variants:
            found = index.search(np.concatenate(queries[label][name]), TOP_K)
            first = np.array([hits[0].image_id if hits else None for hits in found], dtype=object)
            top = [{h.image_id for h in hits} for hits in found]
            results[label][name] = {
                "recall@1": float(np.mean(first == truth)),
                "recall@5": float(np.mean([t in s for t, s in zip(ids, top)])),
            }
    return results


# --- reporting ----------------------------------------------------------------------

def column_labels(backbones: Sequence[str]) -> dict[str, str]:
    """Short column names: aliases and hub ids as given, local paths by their last part."""
    short = {b: Path(b).name if looks_like_path(b) and Path(b).name else b for b in backbones}
    if len(set(short.values())) < len(short):
        return {b: b for b in backbones}
    return short


def results_table(results: Mapping[str, Mapping[str, Mapping[str, float]]],
                  labels: Mapping[str, str]) -> str:
    backbones = list(results)
    variants = list(next(iter(results.values())))
    header = ["variant"] + [f"{labels[b]} {m}" for b in backbones for m in ("R@1", "R@5")]
    rows = [[v] + [f"{results[b][v][m]:.3f}" for b in backbones
                   for m in ("recall@1", "recall@5")] for v in variants]
    rows.append(["**mean**"] + [f"{np.mean([results[b][v][m] for v in variants]):.3f}"
                                for b in backbones for m in ("recall@1", "recall@5")])
    return table(header, rows)


def plot_chart(results: Mapping[str, Mapping[str, Mapping[str, float]]],
               labels: Mapping[str, str], images: int, path: str | Path) -> Path:
    """Grouped bars: recall@1 per variant (groups) and backbone (bars)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    backbones = list(results)
    variants = list(next(iter(results.values())))
    x = np.arange(len(variants))
    width = 0.8 / len(backbones)
    fig, ax = plt.subplots(figsize=(max(8.0, 0.9 * len(variants) + 2), 4.8),
                           layout="constrained")
    for n, backbone in enumerate(backbones):
        ax.bar(x - 0.4 + width * (n + 0.5), [results[backbone][v]["recall@1"] for v in variants],
               width, label=labels[backbone])
    ax.set_xticks(x, variants, rotation=35, ha="right")
    ax.set_ylim(0, 1.18)                   # room for the legend above the bars
    ax.set_yticks(np.linspace(0, 1, 6))
    ax.set_ylabel("recall@1 (original ranked first)")
    ax.set_title(f"Retrieval robustness: recall@1 over {images} images")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=9, ncol=min(4, len(backbones)), loc="upper center")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# --- command line -------------------------------------------------------------------

class _Files(Sequence):
    """The images of a folder, opened (as RGB) when indexed."""

    def __init__(self, root: Path, ids: Sequence[str]):
        self.root, self.ids = root, list(ids)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i):
        from dataset_loader import open_image
        return open_image(self.root / self.ids[i], name=self.ids[i])


def readable_images(folder: str, limit: int | None = None) -> tuple[Path, list[str], int]:
    """The folder, its first `limit` readable images (relative paths, sorted) and how
    many unreadable ones were skipped on the way."""
    from dataset_loader import open_image
    from folder_index import scan_folder

    files = sorted(scan_folder(folder))
    root = Path(folder).expanduser().resolve()
    ids, skipped = [], 0
    for image_id in files:
        if limit is not None and len(ids) >= limit:
            break
        try:
            open_image(root / image_id, name=image_id)
        except UserError as exc:
            log.warning("skipping unreadable image: %s", exc)
            skipped += 1
            continue
        ids.append(image_id)
    if skipped:
        log.warning("%d unreadable image(s) left out", skipped)
    if len(ids) < 2:
        raise UserError(f"{folder} has {len(ids)} readable image(s)"
                        f"{f' ({skipped} unreadable)' if skipped else ''}: robustness needs at "
                        "least 2 to search among")
    return root, ids, skipped


def main(argv: list[str] | None = None) -> int:
    parser = config.make_parser(
        "python -m bench.robustness", __doc__.split("\n\n")[0] + "\n\n" + __doc__.split("\n\n")[1]
        + "\n\nThe settings of config.py are flags too (--device, --batch-size, "
          "--clip-model-name, ...).")
    what = parser.add_argument_group("robustness")
    what.add_argument("--images-dir", metavar="DIR", required=True,
                      help="folder of images (recursive); its images are the gallery")
    what.add_argument("--backbones", nargs="+", metavar="NAME", default=list(DEFAULT_BACKBONES),
                      help="clip (CLIP_MODEL_NAME), siglip, resnet50, dinov2, or hub ids / local "
                           "paths (default: all four aliases)")
    what.add_argument("--limit", type=int, metavar="N",
                      help="only the first N readable images (sorted by path): a quick run")
    what.add_argument("--chart", metavar="PNG",
                      help="bar chart of recall@1 (default RESULTS_DIR/robustness.png)")
    what.add_argument("--json", action="store_true",
                      help="print the raw numbers as JSON (the table goes to stderr)")
    what.add_argument("--benchmarks-file", metavar="MD",
                      help="where the table is appended (default: the repository's BENCHMARKS.md)")
    what.add_argument("--no-record", action="store_true",
                      help="print the table, append it nowhere")
    try:
        args, settings = config.parse_cli(parser, argv, "search")
        if args.limit is not None and args.limit < 2:
            raise UserError(f"--limit must be at least 2, got {args.limit}")
    except UserError as exc:
        return cli_failure("robustness", exc, code=2)
    config.configure_logging(settings)
    try:
        import torch
        import transformers

        from device import resolve_device
        from image_embedder import ImageEmbedder, backbone_model_name

        backbones = list(dict.fromkeys(b.strip() for b in args.backbones))
        root, ids, skipped = readable_images(args.images_dir, args.limit)
        device, dtype = resolve_device(settings.device, settings.dtype)
        embedders = {}
        for backbone in backbones:   # all loaded first: a bad name fails before the long part
            names = ({} if backbone.lower() == "clip" else
                     {"what": "image model", "setting": "--backbones"})
            embedders[backbone] = ImageEmbedder(
                backbone_model_name(backbone, settings.clip_model_name), device=device,
                dtype=dtype, batch_size=settings.batch_size, **names)
        log.info("%d images, %d variants, backbones %s", len(ids), len(VARIANTS),
                 ", ".join(e.name for e in embedders.values()))
        start = time.perf_counter()
        results = evaluate(_Files(root, ids), ids, embedders, progress=True)
        seconds = time.perf_counter() - start

        labels = column_labels(backbones)
        chart = plot_chart(results, labels, len(ids),
                           args.chart or Path(settings.results_dir) / "robustness.png")
        body = results_table(results, labels)
        models = "; ".join(f"{labels[b]} = `{e.name}`" for b, e in embedders.items())
        limited = f", the first {len(ids)} by path (--limit)" if args.limit else ""
        notes = (
            f"Folder `{root}`: {len(ids)} images{limited}"
            f"{f' ({skipped} unreadable skipped)' if skipped else ''}. Models: {models}. "
            f"Device {device}, torch {torch.__version__}, transformers "
            f"{transformers.__version__}; {seconds:.0f} s for {len(ids) * (len(VARIANTS) + 1)} "
            f"images per backbone. The originals are the gallery; each variant of an image is a "
            f"query (never in the gallery); R@k = share of queries whose original is among the k "
            f"most similar originals (exact cosine). Variants: resize_* downscale each side; "
            f"crop_80 keeps the central 80%; rotate_±15 keeps the size with mid-grey corners; "
            f"brightness ±30% (ImageEnhance); jpeg_q20 re-encodes at quality 20; background_pad "
            f"centres the image on a 1.5x canvas of a fixed random colour field. "
            f"Chart: `{chart}`. Only numbers from real pretrained weights count: random-weight "
            f"models (such as the tiny test models) give meaningless numbers."
            + (" With 5 or fewer images R@5 is 1 by construction." if len(ids) <= TOP_K else ""))
        title = "Retrieval robustness (bench/robustness.py)"
        with contextlib.redirect_stdout(sys.stderr) if args.json else contextlib.nullcontext():
            if args.no_record:
                print(f"\n## {title}\n\n{body}\n\n{notes}\n")
            else:
                record(title, body, notes, path=args.benchmarks_file or ROOT / "BENCHMARKS.md")
    except (UserError, OSError, KeyboardInterrupt) as exc:
        return cli_failure("robustness", exc)
    if args.json:
        print(json.dumps({**results, "images": len(ids)}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
