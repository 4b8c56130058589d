"""Captioned image collections: load one (a local folder or file in any layout
collection_formats.py reads, or a hub table), keep every caption, and split it
into experiment images and the memory.

The only module that imports `datasets`. Splits (SPLIT):

* "seeded": every image id is hashed with RANDOM_SEED and the EXPERIMENT_SAMPLES
  smallest hashes are the experiment images, in hash order; the rest is the
  memory. Load order, machine and Python version do not change it.
* "karpathy": the collection's `test` images are the experiment images, in file
  order; its `train` + `restval` images are the memory (`val` is in neither).
* "all": every image, in file order, is an experiment image; the memory comes
  from MEMORY_DATASET.
* any other name: the images of the split of that name the collection ships, in
  file order; the memory is its training images (train, restval, train2014, ...).

MEMORY_DATASET names another collection whose training images (all of them where
it names no split) are the memory instead. Their ids are prefixed with that
collection's name and a colon ("coco:COCO_train2014_000000000009.jpg"): two
collections may share file names (img_001.jpg), a memory row must never be taken
for an experiment image, and `get` must find which collection's file to open.
"""

from __future__ import annotations

import hashlib
import io
import logging
import numbers
import os
import warnings
from collections import defaultdict
from dataclasses import replace
from pathlib import Path
from typing import Any

from PIL import Image, ImageOps, UnidentifiedImageError

from collection_formats import Sample, load_local
from errors import UserError, hf_token, hub_errors, looks_like_path

__all__ = ["Collection", "Sample", "check_index", "collection_label", "load_and_split_dataset",
           "load_collection", "load_hub", "load_local", "open_image", "samples_from_table",
           "split_key", "to_rgb"]

log = logging.getLogger(__name__)

MAX_SIDE = 4096           # JPEGs larger than this are decoded at 1/2, 1/4 or 1/8 scale
MAX_PIXELS = 64_000_000  # other images larger than this are refused
# Hub columns that may hold captions, in order of preference.
CAPTION_LIST_COLUMNS = ("captions", "sentences", "raw", "sentences_raw")
CAPTION_COLUMNS = ("caption", "text", "sentence")
ID_COLUMNS = ("image_filename", "filename", "file_name", "image_name", "image_id", "img_id")

SPLITS = ("seeded", "karpathy", "all")   # SPLIT's fixed values; any other is a split's name
# The splits a collection's memory is built from: Karpathy's train and restval, and
# names that start with "train" (COCO's train2014, a hub table's train).
MEMORY_SPLITS = ("train", "restval")


def is_memory_split(name: str) -> bool:
    return name in MEMORY_SPLITS or name.startswith("train")


class Collection:
    """A loaded collection split into `experiment` images and the memory's `train`
    images (lists of Samples). `memory`: the (name, samples, hub rows) of another
    collection whose images are the memory, ids prefixed (memory_samples)."""

    def __init__(self, name: str, samples: list[Sample], experiment_samples: int, seed: int,
                 hub_rows: Any = None, *, split: str = "seeded",
                 memory: tuple[str, list[Sample], Any] | None = None):
        self.name = name
        self.seed = seed
        self.split = split
        self.memory_name = memory[0] if memory else ""
        self._hub_rows = hub_rows
        self._memory_rows = memory[2] if memory else None
        self.experiment, self.train = _split(name, samples, experiment_samples, seed, split,
                                             memory is not None)
        if memory:
            self.train = memory[1]
        self._by_id = {s.image_id: s for s in samples}
        self._memory_by_id = {s.image_id: s for s in memory[1]} if memory else {}

    def __repr__(self) -> str:
        memory = f", memory={self.memory_name!r}" if self.memory_name else ""
        return (f"Collection({self.name!r}, split={self.split!r}, experiment="
                f"{len(self.experiment)}, train={len(self.train)}, seed={self.seed}{memory})")

    @property
    def fingerprint(self) -> str:
        """Identifies the split: changes when the split, its seed (seeded), the memory's
        collection or any image id changes. The seeded split of one collection keeps
        the value it had before other splits existed."""
        if self.split == "seeded" and not self.memory_name:
            h = hashlib.sha256(f"{self.seed}|".encode())
        else:  # the memory by its ids' prefix: "coco/" and /data/coco are one collection
            seed = self.seed if self.split == "seeded" else ""
            memory = memory_prefix(self.memory_name) if self.memory_name else ""
            h = hashlib.sha256(f"{self.split}|{seed}|{memory}|".encode())
        for group in (self.experiment, self.train):
            h.update("\n".join(s.image_id for s in group).encode() + b"\x00")
        return h.hexdigest()[:16]

    @property
    def domains(self) -> list[str]:
        """The experiment images' domains, sorted ([] where the annotations give none)."""
        return sorted({s.domain for s in self.experiment if s.domain})

    def experiment_sample(self, index: int) -> Sample:
        """The experiment image at `index` (0 .. len(experiment)-1)."""
        check_index(index, len(self.experiment))
        return self.experiment[index]

    def get(self, image_id: str) -> Sample | None:
        """Any image of the collection, or of the memory's collection, by id."""
        return self._by_id.get(image_id) or self._memory_by_id.get(image_id)

    def load_image(self, sample: Sample) -> Image.Image:
        """The sample's image as RGB."""
        if isinstance(sample.source, int):
            rows = self._memory_rows if sample.image_id in self._memory_by_id else self._hub_rows
            cell = rows[sample.source]
            data = cell.get("bytes")
            return open_image(io.BytesIO(data) if data else cell["path"], name=sample.image_id)
        return open_image(sample.source)


def _split(name: str, samples: list[Sample], n: int, seed: int, split: str,
           other_memory: bool) -> tuple[list[Sample], list[Sample]]:
    """(experiment, train) of `samples` for SPLIT `split` (see the module's docstring)."""
    if split == "seeded":
        if n > len(samples) or n == len(samples) and not other_memory:
            raise UserError(
                f"--experiment-samples {n} leaves no training pool: "
                f"the data set {name!r} has only {len(samples)} images")
        order = sorted(samples, key=lambda s: split_key(s.image_id, seed))
        return order[:n], sorted(order[n:], key=lambda s: s.image_id)
    if split == "all":
        if not other_memory:
            raise UserError(f"--split all makes every image of {name!r} an experiment image: "
                            "give --memory-dataset NAME, the collection the memory is built from")
        return list(samples), []
    shipped = sorted({s.split for s in samples if s.split})
    wanted = "test" if split == "karpathy" else split
    experiment = [s for s in samples if s.split == wanted]
    if not experiment:
        names = ", ".join(shipped) if shipped else "none (use --split seeded or all)"
        raise UserError(f"--split {split}: the data set {name!r} has no {wanted!r} images; "
                        f"the splits it ships: {names}")
    train = [s for s in samples if s.split != wanted and is_memory_split(s.split)]
    if not train and not other_memory:
        raise UserError(f"--split {split}: the data set {name!r} has no training images "
                        f"({', '.join(MEMORY_SPLITS)}) for the memory; give --memory-dataset NAME")
    return experiment, train


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
                           seed: int | None = None, *, split: str | None = None,
                           memory_dataset: str | None = None) -> Collection:
    """Load a collection (DATASET_NAME: a local folder or caption file, or a hub id)
    and split it by SPLIT, with the memory from MEMORY_DATASET ("": the same
    collection); None takes config.py's setting."""
    import config
    name = config.DATASET_NAME if dataset_name is None else dataset_name
    n = config.EXPERIMENT_SAMPLES if experiment_samples is None else experiment_samples
    seed = config.RANDOM_SEED if seed is None else seed
    split = config.SPLIT if split is None else split
    memory_dataset = config.MEMORY_DATASET if memory_dataset is None else memory_dataset
    samples, rows = load_collection(name)
    memory = None
    if memory_dataset and collection_label(memory_dataset) != collection_label(name):
        memory = (memory_dataset, *memory_samples(memory_dataset))
    return Collection(name, samples, n, seed, rows, split=split, memory=memory)


def load_collection(name: str) -> tuple[list[Sample], Any]:
    """(samples in file order, the hub image column or None) of a local folder or
    caption file, or of a hub data set."""
    path = Path(name).expanduser()
    if path.exists():
        return load_local(path), None
    if looks_like_path(name):
        raise UserError(f"data set folder not found: {name}")
    return load_hub(name)


def collection_label(name: str) -> str:
    """A collection as databases record it: a local one by its absolute path (a later
    command from another folder finds it from the database alone), a hub id as it is."""
    local = Path(name).expanduser()
    return str(local.resolve()) if local.exists() else name


def memory_prefix(name: str) -> str:
    """What the ids of another collection's images start with in a memory:
    "coco:" for the folder coco/, "org--data:" for the hub id org/data."""
    local = Path(name).expanduser()
    short = local.resolve().name if local.exists() else name.replace("/", "--")
    return f"{short}:"


def memory_samples(name: str) -> tuple[list[Sample], Any]:
    """The memory images of collection `name` (its training splits, or every image
    where it names none), ids prefixed (memory_prefix), and its hub image column."""
    samples, rows = load_collection(name)
    train = [s for s in samples if is_memory_split(s.split)]
    if not train:
        if any(s.split for s in samples):
            log.info("memory data set %s has no training split (%s): all its %d images "
                     "are the memory", name, ", ".join(MEMORY_SPLITS), len(samples))
        train = samples
    prefix = memory_prefix(name)
    return [replace(s, image_id=prefix + s.image_id) for s in train], rows


# --- hub -----------------------------------------------------------------------

def load_hub(name: str) -> tuple[list[Sample], Any]:
    """Samples of a hub data set (all splits together, each sample knowing its split)
    and its undecoded image column."""
    import datasets
    with hub_errors("data set", name, "--dataset-name (a hub id, or a local folder or "
                    "caption file)"):
        loaded = datasets.load_dataset(name, token=hf_token())
    if not isinstance(loaded, datasets.DatasetDict):
        return samples_from_table(loaded, name)
    parts = list(loaded.values())
    table = datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0]
    splits = [split for split, part in loaded.items() for _ in range(len(part))]
    return samples_from_table(table, name, splits)


def samples_from_table(table: Any, name: str = "data set", splits: list[str] | None = None
                       ) -> tuple[list[Sample], Any]:
    """Samples from a `datasets.Dataset` in any of the common captioned-image schemas.

    Image column: the first of type Image (or one called image/img). Captions:
    caption_0..caption_N, a list column (captions, sentences) or one caption per
    row (caption, text), grouped by image. The id is a file-name column, else
    the image's file name, else a hash of its bytes. A sample's split is its
    row's in `splits` (the hub split it came from), else a "split" column's;
    its domain a "domain" column's.
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
    if splits is None and "split" in columns:
        splits = [str(v or "") for v in table["split"]]
    domains = [str(v or "") for v in table["domain"]] if "domain" in columns else None
    captions: dict[str, list[str]] = defaultdict(list)
    first_row: dict[str, int] = {}
    for row, (image_id, row_captions) in enumerate(zip(ids, rows)):
        image_id = str(image_id).strip()
        first_row.setdefault(image_id, row)
        for caption in row_captions:
            caption = " ".join(str(caption or "").split())
            if image_id and caption:
                captions[image_id].append(caption)
    samples = [Sample(i, tuple(captions[i]), row, splits[row] if splits else "",
                      domains[row] if domains else "")
               for i, row in first_row.items() if captions[i]]
    return samples, images


def _image_id(cell: dict) -> str:
    path = cell.get("path")
    if path:
        return os.path.basename(path)
    return hashlib.sha1(cell["bytes"]).hexdigest()[:20] + ".jpg"
