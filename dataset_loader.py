"""Flickr8K: load it (hub or local folder), keep every caption, split it.

The only module that imports `datasets`. Three local layouts are recognised:

* Kaggle:    Images/ + captions.txt        (CSV with header ``image,caption``)
* original:  Flicker8k_Dataset/ (or Flickr8k_Dataset/) + Flickr8k.token.txt
             (lines ``NAME.jpg#N<TAB>caption``)
* Karpathy:  dataset_flickr8k.json + a folder of the images

The split depends on RANDOM_SEED and the image ids alone: every image id is
hashed with the seed and the EXPERIMENT_SAMPLES smallest hashes are the
experiment images, in hash order. Load order, machine and Python version do
not change it.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import numbers
import os
import warnings
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, ImageOps, UnidentifiedImageError

from errors import UserError, hf_token, hub_errors, looks_like_path

log = logging.getLogger(__name__)

MAX_SIDE = 4096           # JPEGs larger than this are decoded at 1/2, 1/4 or 1/8 scale
MAX_PIXELS = 64_000_000  # other images larger than this are refused
IMAGE_DIRS = ("Images", "images", "Flicker8k_Dataset", "Flickr8k_Dataset", "Flickr8k_Images", ".")
KAGGLE_CAPTIONS = "captions.txt"
ORIGINAL_CAPTIONS = "Flickr8k.token.txt"
KARPATHY_CAPTIONS = "dataset_flickr8k.json"
# Hub columns that may hold captions, in order of preference.
CAPTION_LIST_COLUMNS = ("captions", "sentences", "raw", "sentences_raw")
CAPTION_COLUMNS = ("caption", "text", "sentence")
ID_COLUMNS = ("image_filename", "filename", "file_name", "image_name", "image_id", "img_id")


@dataclass(frozen=True)
class Sample:
    """One image and all its human captions. `source` is a file path or a hub row."""

    image_id: str
    captions: tuple[str, ...]
    source: str | int


class Flickr8k:
    """A loaded, split Flickr8K: `experiment` and `train` lists of Samples."""

    def __init__(self, name: str, samples: list[Sample], experiment_samples: int, seed: int,
                 hub_rows: Any = None):
        if experiment_samples >= len(samples):
            raise UserError(
                f"--experiment-samples {experiment_samples} leaves no training pool: "
                f"the data set {name!r} has only {len(samples)} images")
        self.name = name
        self.seed = seed
        self._hub_rows = hub_rows
        order = sorted(samples, key=lambda s: split_key(s.image_id, seed))
        self.experiment: list[Sample] = order[:experiment_samples]
        self.train: list[Sample] = sorted(order[experiment_samples:], key=lambda s: s.image_id)
        self._by_id = {s.image_id: s for s in samples}

    def __repr__(self) -> str:
        return (f"Flickr8k({self.name!r}, experiment={len(self.experiment)}, "
                f"train={len(self.train)}, seed={self.seed})")

    @property
    def fingerprint(self) -> str:
        """Identifies the split: changes when the seed or any image id changes."""
        h = hashlib.sha256(f"{self.seed}|".encode())
        for group in (self.experiment, self.train):
            h.update("\n".join(s.image_id for s in group).encode() + b"\x00")
        return h.hexdigest()[:16]

    def experiment_sample(self, index: int) -> Sample:
        """The experiment image at `index` (0 .. EXPERIMENT_SAMPLES-1)."""
        check_index(index, len(self.experiment))
        return self.experiment[index]

    def get(self, image_id: str) -> Sample | None:
        return self._by_id.get(image_id)

    def load_image(self, sample: Sample) -> Image.Image:
        """The sample's image as RGB."""
        if isinstance(sample.source, int):
            cell = self._hub_rows[sample.source]
            data = cell.get("bytes")
            return open_image(io.BytesIO(data) if data else cell["path"], name=sample.image_id)
        return open_image(sample.source)


def check_index(index: Any, experiment_samples: int) -> None:
    """UserError unless `index` is an integer in 0 .. experiment_samples-1."""
    if isinstance(index, bool) or not isinstance(index, numbers.Integral):
        raise UserError(f"experiment index must be an integer, got {index!r}")
    if not 0 <= index < experiment_samples:
        raise UserError(f"experiment index {index} is out of range: "
                        f"choose 0 to {experiment_samples - 1}")


def split_key(image_id: str, seed: int) -> str:
    """Sort key of an image in the split: a hash of seed and id."""
    return hashlib.sha256(f"{seed}:{image_id}".encode()).hexdigest()


def open_image(source: str | os.PathLike | io.BytesIO, name: str | None = None) -> Image.Image:
    """Open an image file as RGB; UserError naming the file if it cannot be read.

    Very large JPEGs are decoded at a reduced scale (no model here looks at more
    than a few thousand pixels a side); other images over MAX_PIXELS are refused
    rather than filling memory (decompression-bomb guard).
    """
    label = name or str(source)
    try:
        with warnings.catch_warnings():
            # PIL warns between MAX_IMAGE_PIXELS and twice that; our own limit decides.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(source) as img:
                if img.format == "JPEG":
                    img.draft("RGB", (MAX_SIDE, MAX_SIDE))
                if img.width * img.height > MAX_PIXELS:
                    raise UserError(f"image {label} is too large ({img.width}x{img.height} "
                                    f"pixels, the limit is {MAX_PIXELS:,}); downscale it first")
                img.load()
                return to_rgb(ImageOps.exif_transpose(img))
    except FileNotFoundError:
        raise UserError(f"image not found: {label}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError,
            Image.DecompressionBombError) as exc:
        raise UserError(f"image {label} could not be read: {exc}") from None


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode to RGB; transparency is composited on white."""
    if img.mode == "RGB":
        return img.copy()
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        # 16-bit / float greyscale: rescale to 8 bits instead of clipping.
        lo, hi = img.getextrema()
        if hi > lo:
            img = img.point(lambda v: (v - lo) * (255.0 / (hi - lo))).convert("L")
        else:  # one flat value: keep its brightness on the 16-bit scale
            flat = hi / 257 if img.mode.startswith("I;16") else hi
            img = Image.new("L", img.size, int(min(255, max(0, flat))))
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def load_and_split_dataset(dataset_name: str | None = None, experiment_samples: int | None = None,
                           seed: int | None = None) -> Flickr8k:
    """Load Flickr8K from a local folder or the hub and split it deterministically."""
    import config
    name = config.DATASET_NAME if dataset_name is None else dataset_name
    n = config.EXPERIMENT_SAMPLES if experiment_samples is None else experiment_samples
    seed = config.RANDOM_SEED if seed is None else seed
    path = Path(name).expanduser()
    if path.is_dir():
        samples = load_local(path)
        return Flickr8k(name, samples, n, seed)
    if path.exists():
        raise UserError(f"data set {name!r} is a file; point --dataset-name at the folder holding it")
    if looks_like_path(name):
        raise UserError(f"data set folder not found: {name}")
    samples, rows = load_hub(name)
    return Flickr8k(name, samples, n, seed, hub_rows=rows)


# --- local folders ----------------------------------------------------------

def load_local(root: Path) -> list[Sample]:
    """Samples of a Flickr8K folder in the Kaggle, original or Karpathy layout."""
    found = _find_caption_file(root)
    if found is None:
        raise UserError(
            f"no Flickr8K captions in {root}: expected {KAGGLE_CAPTIONS} (Kaggle), "
            f"{ORIGINAL_CAPTIONS} (original) or {KARPATHY_CAPTIONS} (Karpathy)")
    kind, caption_file = found
    reader = {"kaggle": _read_kaggle, "original": _read_original, "karpathy": _read_karpathy}[kind]
    try:
        captions = reader(caption_file)
    except UnicodeDecodeError as exc:
        raise UserError(f"{caption_file} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    if not captions:
        raise UserError(f"{caption_file} holds no usable captions")
    image_dir = _find_image_dir(root, caption_file.parent, list(captions))
    samples, missing = [], 0
    for image_id, caps in captions.items():
        file = image_dir / image_id
        if not file.is_file():
            missing += 1
            continue
        samples.append(Sample(image_id, tuple(caps), str(file)))
    if missing:
        log.warning("%d of %d captioned images are missing from %s and were skipped",
                    missing, len(captions), image_dir)
    if not samples:
        raise UserError(f"none of the images named in {caption_file} are in {image_dir}")
    log.info("loaded %d images with %d captions from %s (%s layout)", len(samples),
             sum(len(s.captions) for s in samples), root, kind)
    return samples


def _find_caption_file(root: Path) -> tuple[str, Path] | None:
    candidates = [root] + sorted(p for p in root.iterdir() if p.is_dir())
    for folder in candidates:
        for kind, file in (("kaggle", KAGGLE_CAPTIONS), ("original", ORIGINAL_CAPTIONS),
                           ("karpathy", KARPATHY_CAPTIONS)):
            if (folder / file).is_file():
                return kind, folder / file
    return None


def _find_image_dir(root: Path, caption_dir: Path, image_ids: list[str]) -> Path:
    """The first candidate folder holding any of the captioned images (some may be missing)."""
    for base in dict.fromkeys((root, caption_dir, root.parent)):
        for name in IMAGE_DIRS:
            # the original zip nests Flicker8k_Dataset/ once more
            for folder in (base / name, base / name / name):
                if folder.is_dir() and any((folder / i).is_file() for i in image_ids):
                    return folder.resolve()
    raise UserError(f"image folder not found in {root}: looked for {image_ids[0]} and the other "
                    f"{len(image_ids) - 1} captioned images in "
                    + ", ".join(n for n in IMAGE_DIRS if n != "."))


def _add(captions: dict[str, list[str]], image_id: str, caption: str) -> None:
    caption = " ".join(caption.split())
    if image_id and caption:
        captions[image_id.strip()].append(caption)


def _read_kaggle(file: Path) -> dict[str, list[str]]:
    captions: dict[str, list[str]] = defaultdict(list)
    with open(file, newline="", encoding="utf-8-sig") as f:
        rows = csv.reader(f)
        header = [h.strip().lower() for h in next(rows, [])]
        if header[:2] != ["image", "caption"]:
            raise UserError(f"{file}: expected the header 'image,caption', got {','.join(header)!r}")
        bad = []
        for row in rows:
            if len(row) >= 2 and row[0].strip() and ",".join(row[1:]).strip():
                _add(captions, row[0], ",".join(row[1:]))
            elif row:
                bad.append(rows.line_num)
    _warn_skipped(file, bad)
    return captions


def _read_original(file: Path) -> dict[str, list[str]]:
    captions: dict[str, list[str]] = defaultdict(list)
    bad = []
    with open(file, encoding="utf-8-sig") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            key, sep, caption = line.partition("\t")
            if not sep or "#" not in key or not caption.strip():
                bad.append(line_no)
                continue
            _add(captions, key.rsplit("#", 1)[0], caption)
    _warn_skipped(file, bad, "expected 'NAME.jpg#N<TAB>caption'")
    return captions


def _warn_skipped(file: Path, bad_lines: list[int], expected: str = "") -> None:
    """Malformed lines are skipped and counted; the rest of the file is still used."""
    if bad_lines:
        shown = ", ".join(map(str, bad_lines[:5])) + (", ..." if len(bad_lines) > 5 else "")
        log.warning("%s: skipped %d malformed line(s) (line %s)%s", file, len(bad_lines), shown,
                    f"; {expected}" if expected else "")


def _read_karpathy(file: Path) -> dict[str, list[str]]:
    captions: dict[str, list[str]] = defaultdict(list)
    try:
        data = json.loads(file.read_text(encoding="utf-8-sig"))
        for image in data["images"]:
            for sentence in image.get("sentences", []):
                raw = sentence.get("raw") or " ".join(sentence.get("tokens", []))
                _add(captions, image["filename"], raw)
    except (ValueError, KeyError, TypeError, AttributeError) as exc:  # ValueError: bad JSON/UTF-8
        raise UserError(f"{file} is not a Karpathy split file: {type(exc).__name__}: {exc}") from None
    return captions


# --- hub -----------------------------------------------------------------------

def load_hub(name: str) -> tuple[list[Sample], Any]:
    """Samples of a hub data set (all splits together) and its undecoded image column."""
    import datasets
    with hub_errors("data set", name, "--dataset-name (a hub id or a local Flickr8K folder)"):
        loaded = datasets.load_dataset(name, token=hf_token())
    parts = list(loaded.values()) if isinstance(loaded, datasets.DatasetDict) else [loaded]
    table = datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0]
    return samples_from_table(table, name)


def samples_from_table(table: Any, name: str = "data set") -> tuple[list[Sample], Any]:
    """Samples from a `datasets.Dataset` in any of the common Flickr8K schemas.

    Image column: the first of type Image (or one called image/img). Captions:
    caption_0..caption_N, a list column (captions, sentences) or one caption per
    row (caption, text), grouped by image. The id is a file-name column, else
    the image's file name, else a hash of its bytes.
    """
    import datasets
    columns = list(table.column_names)
    image_col = next((c for c in columns if isinstance(table.features[c], datasets.Image)), None)
    image_col = image_col or next((c for c in ("image", "img") if c in columns), None)
    if image_col is None:
        raise UserError(f"{name}: no image column among {columns}")
    table = table.cast_column(image_col, datasets.Image(decode=False))
    numbered = sorted((c for c in columns if c.startswith("caption_") and c[8:].isdigit()),
                      key=lambda c: int(c[8:]))
    list_col = next((c for c in CAPTION_LIST_COLUMNS if c in columns), None)
    single_col = next((c for c in CAPTION_COLUMNS if c in columns), None)
    if not (numbered or list_col or single_col):
        raise UserError(f"{name}: no caption column among {columns}")
    id_col = next((c for c in ID_COLUMNS if c in columns), None)

    images = table[image_col]
    ids = table[id_col] if id_col else [_image_id(cell) for cell in images]
    if numbered:
        rows = zip(*(table[c] for c in numbered))
    elif list_col:
        rows = ([v.get("raw", "") if isinstance(v, dict) else str(v) for v in value or []]
                for value in table[list_col])
    else:
        rows = ([value] for value in table[single_col])
    captions: dict[str, list[str]] = defaultdict(list)
    first_row: dict[str, int] = {}
    for row, (image_id, row_captions) in enumerate(zip(ids, rows)):
        image_id = str(image_id).strip()  # the key _add files the captions under
        first_row.setdefault(image_id, row)
        for caption in row_captions:
            _add(captions, image_id, caption or "")
    samples = [Sample(i, tuple(captions[i]), first_row[i]) for i in first_row if captions[i]]
    return samples, images


def _image_id(cell: dict) -> str:
    path = cell.get("path")
    if path:
        return os.path.basename(path)
    return hashlib.sha1(cell["bytes"]).hexdigest()[:20] + ".jpg"
