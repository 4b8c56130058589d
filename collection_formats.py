"""The on-disk layouts of captioned image collections: find a collection's caption
file(s) in a folder, or take the file given, and read them into Samples.

Layouts, recognised by file name (in the folder given, else in its subfolders):

  Kaggle Flickr8K     captions.txt (CSV, header ``image,caption``) + Images/
  original Flickr8K   Flickr8k.token.txt (lines ``NAME.jpg#N<TAB>caption``) +
                      Flicker8k_Dataset/; the split lists Flickr_8k.trainImages.txt,
                      .devImages.txt, .testImages.txt beside it give train/val/test
  Karpathy            dataset_coco.json, dataset_flickr30k.json, dataset_flickr8k.json
                      ({"images": [{"filename", "split", "sentences": [{"raw"}],
                      "filepath" (COCO: train2014/val2014)}]}) + a folder of the images
  COCO annotations    captions_*.json or *_captions.json, in the folder or its
                      annotations/ ({"images": [{"id", "file_name", "domain"?}],
                      "annotations": [{"image_id", "caption"}]}); each file is a split
                      named after it (captions_val2014.json: "val2014"). NoCaps
                      validation ships this way, with each image's domain.
  plain folder        captions.jsonl (one {"image", "caption"} per line) or captions.csv
                      (header with image and caption): one or many rows per image;
                      optional "split" and "domain" columns

A JSON file given by path is read by its content (Karpathy or COCO shape). Images
are looked for beside the caption file (Images/, images/, a folder named after the
split, ...). Image ids are the image's path under its folder (the file name for a
flat folder); Karpathy files keep the file name (COCO's names carry their folder).
"""

from __future__ import annotations

import csv
import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from errors import UserError

log = logging.getLogger("dataset_loader")

IMAGE_DIRS = ("Images", "images", "Flicker8k_Dataset", "Flickr8k_Dataset", "Flickr8k_Images", ".")
KAGGLE_CAPTIONS = "captions.txt"
ORIGINAL_CAPTIONS = "Flickr8k.token.txt"
KARPATHY_CAPTIONS = "dataset_flickr8k.json"     # the Flickr8K one; any dataset_*.json is read
KARPATHY_PATTERN = "dataset_*.json"
COCO_PATTERNS = ("captions_*.json", "*_captions.json")
PLAIN_CAPTIONS = ("captions.jsonl", "captions.csv")
ORIGINAL_SPLITS = {"Flickr_8k.trainImages.txt": "train", "Flickr_8k.devImages.txt": "val",
                   "Flickr_8k.testImages.txt": "test"}


@dataclass(frozen=True)
class Sample:
    """One image and all its human captions. `source` is a file path or a hub row;
    `split` the split its collection puts it in ("" where none is named); `domain`
    its domain where the annotations give one (NoCaps: in-domain, near-domain,
    out-domain)."""

    image_id: str
    captions: tuple[str, ...]
    source: str | int
    split: str = ""
    domain: str = ""


@dataclass
class Entry:
    """An image as a reader finds it: its file under the image folder, its captions
    in file order, its split and domain."""

    file: str
    captions: list[str] = field(default_factory=list)
    split: str = ""
    domain: str = ""


def load_local(path: Path) -> list[Sample]:
    """Samples of a collection folder (or caption file) in any layout above, in file order."""
    kind, files = find_caption_files(path)
    root = path if path.is_dir() else path.parent
    samples, missing, total = [], 0, 0
    for file in files:
        try:
            entries = READERS[kind](file)
        except UnicodeDecodeError as exc:
            raise UserError(f"{file} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
        entries = {i: e for i, e in entries.items() if e.captions}
        if not entries:
            raise UserError(f"{file} holds no usable captions")
        hints = tuple(dict.fromkeys(e.split for e in entries.values() if e.split))
        image_dir = find_image_dir(root, file.parent, [e.file for e in entries.values()], hints)
        total += len(entries)
        folder = str(image_dir)
        for image_id, entry in entries.items():
            image = os.path.join(folder, entry.file)  # os.path: 3x pathlib at COCO's 123k
            if not os.path.isfile(image):
                missing += 1
                continue
            samples.append(Sample(image_id, tuple(entry.captions), image, entry.split,
                                  entry.domain))
    if missing:
        log.warning("%d of %d captioned images are missing from their folder and were "
                    "skipped", missing, total)
    if not samples:
        raise UserError(f"none of the images named in {files[0]} are in its image folder")
    log.info("loaded %d images with %d captions from %s (%s layout)", len(samples),
             sum(len(s.captions) for s in samples), path, kind)
    return samples


def find_caption_files(path: Path) -> tuple[str, list[Path]]:
    """(layout, its caption files) of a folder or of the caption file given."""
    if path.is_file():
        if path.suffix == ".json":
            return "json", [path]
        if path.name in PLAIN_CAPTIONS:
            return "plain", [path]
        raise UserError(f"data set {str(path)!r} is a file; point --dataset-name at the folder "
                        "holding it (or at a .json, captions.jsonl or captions.csv caption file)")
    for folder in [path] + sorted(p for p in path.iterdir() if p.is_dir()):
        found = _caption_files_in(folder)
        if found:
            return found
    raise UserError(
        f"no captions in {path}: expected {KAGGLE_CAPTIONS} (Kaggle Flickr8K), "
        f"{ORIGINAL_CAPTIONS} (original Flickr8K), {KARPATHY_PATTERN} (Karpathy: "
        f"dataset_coco.json, dataset_flickr30k.json, {KARPATHY_CAPTIONS}), "
        f"{' or '.join(COCO_PATTERNS)} (COCO or NoCaps annotations) or "
        f"{' or '.join(PLAIN_CAPTIONS)} (image, caption)")


def _caption_files_in(folder: Path) -> tuple[str, list[Path]] | None:
    for kind, name in (("kaggle", KAGGLE_CAPTIONS), ("original", ORIGINAL_CAPTIONS)):
        if (folder / name).is_file():
            return kind, [folder / name]
    karpathy = sorted(folder.glob(KARPATHY_PATTERN))
    if len(karpathy) > 1:
        # caption_datasets.zip unzipped whole: the file named after its folder (coco/)
        named = [f for f in karpathy if f.stem.removeprefix("dataset_") in folder.name.lower()]
        if len(named) != 1:
            raise UserError(f"{folder} holds {len(karpathy)} Karpathy split files ("
                            + ", ".join(f.name for f in karpathy) + "): point --dataset-name "
                            "at the one to use")
        karpathy = named
    if karpathy:
        return "json", karpathy
    coco = sorted({f for pattern in COCO_PATTERNS for f in folder.glob(pattern)})
    if coco:
        return "json", coco
    for name in PLAIN_CAPTIONS:
        if (folder / name).is_file():
            return "plain", [folder / name]
    return None


def find_image_dir(root: Path, caption_dir: Path, files: list[str],
                   hints: tuple[str, ...] = ()) -> Path:
    """The first candidate folder holding any of the captioned images (some may be
    missing): beside the caption file, in Images/, images/, a folder named after a
    split (val2014/), ..., else any folder directly under the collection or the
    caption file's folder (flickr30k-images/, NoCaps' val/), in name order."""
    names = [*hints, *(f"images/{h}" for h in hints), *IMAGE_DIRS]
    bases = list(dict.fromkeys((root, caption_dir, caption_dir.parent, root.parent)))
    for base in bases:
        for name in names:
            # the original Flickr8K zip nests Flicker8k_Dataset/ once more
            for folder in (base / name, base / name / name):
                if _holds_any(folder, files):
                    return folder.resolve()
    for base in dict.fromkeys((root, caption_dir)):
        for folder in sorted(p for p in base.iterdir() if p.is_dir()):
            if _holds_any(folder, files):
                return folder.resolve()
    raise UserError(f"image folder not found in {root}: looked for {files[0]} and the other "
                    f"{len(files) - 1} captioned images in "
                    + ", ".join(n for n in names if n != ".")
                    + " and every folder directly under it")


def _holds_any(folder: Path, files: list[str]) -> bool:
    """Whether `folder` (if one) holds any of `files`, from one directory listing: a
    stat per file would cost seconds for each wrong folder at COCO's 123k names."""
    try:
        listed = set(os.listdir(folder))
    except OSError:
        return False
    return any(f in listed if "/" not in f else (folder / f).is_file() for f in files)


def _add(entries: dict[str, Entry], image_id: str, caption: str, file: str | None = None,
         split: str = "", domain: str = "") -> None:
    caption = " ".join(str(caption or "").split())
    image_id = str(image_id).strip()
    if not image_id:
        return
    entry = entries.get(image_id)
    if entry is None:
        entry = entries[image_id] = Entry(file or image_id, [], split, domain)
    if caption:
        entry.captions.append(caption)


def _warn_skipped(file: Path, bad_lines: list[int], expected: str = "") -> None:
    """Malformed lines are skipped and counted; the rest of the file is still used."""
    if bad_lines:
        shown = ", ".join(map(str, bad_lines[:5])) + (", ..." if len(bad_lines) > 5 else "")
        log.warning("%s: skipped %d malformed line(s) (line %s)%s", file, len(bad_lines), shown,
                    f"; {expected}" if expected else "")


# --- Flickr8K: Kaggle and original -------------------------------------------------------

def read_kaggle(file: Path) -> dict[str, Entry]:
    entries: dict[str, Entry] = {}
    with open(file, newline="", encoding="utf-8-sig") as f:
        rows = csv.reader(f)
        header = [h.strip().lower() for h in next(rows, [])]
        if header[:2] != ["image", "caption"]:
            raise UserError(f"{file}: expected the header 'image,caption', got {','.join(header)!r}")
        bad = []
        for row in rows:
            if len(row) >= 2 and row[0].strip() and ",".join(row[1:]).strip():
                _add(entries, row[0], ",".join(row[1:]))  # an unquoted comma stays in
            elif row:
                bad.append(rows.line_num)
    _warn_skipped(file, bad)
    return entries


def read_original(file: Path) -> dict[str, Entry]:
    splits = {}
    for name, split in ORIGINAL_SPLITS.items():
        if (file.parent / name).is_file():
            for line in (file.parent / name).read_text(encoding="utf-8-sig").split():
                splits[line] = split
    entries: dict[str, Entry] = {}
    bad = []
    with open(file, encoding="utf-8-sig") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            key, sep, caption = line.partition("\t")
            if not sep or "#" not in key or not caption.strip():
                bad.append(line_no)
                continue
            image_id = key.rsplit("#", 1)[0].strip()
            _add(entries, image_id, caption, split=splits.get(image_id, ""))
    _warn_skipped(file, bad, "expected 'NAME.jpg#N<TAB>caption'")
    return entries


# --- JSON: Karpathy split files and COCO-style annotations -------------------------------

# A Karpathy sentence's "tokens" list and one comma beside it. Karpathy's COCO file has
# 6.2M tokens the loader never reads (it reads "raw"): parsing without them takes a
# quarter of the time and memory. Tokens with a "]" in them break the JSON: then the
# file is parsed whole, as it is when a sentence has no "raw".
_TOKENS = re.compile(rb'"tokens":\s*\[[^\]]*\]\s*,\s*|,\s*"tokens":\s*\[[^\]]*\]')


class _NeedTokens(Exception):
    """A sentence without "raw": its tokens are its caption."""


def read_json(file: Path) -> dict[str, Entry]:
    """A Karpathy split file or COCO-style caption annotations, told apart by content."""
    import orjson  # 3-4x faster than json on the 100+ MB COCO files
    blob = file.read_bytes()
    for text, tokens in ((_TOKENS.sub(b"", blob), False), (blob, True)):
        try:
            data = orjson.loads(text)
        except orjson.JSONDecodeError as exc:
            if tokens:
                raise UserError(f"{file} is not a Karpathy split file or COCO caption "
                                f"annotations: not JSON ({exc})") from None
            continue
        try:
            if isinstance(data, dict) and "annotations" in data:
                return _coco_entries(data, _split_of_annotation_file(file))
            return _karpathy_entries(data, tokens)
        except _NeedTokens:
            continue
        except (KeyError, TypeError, AttributeError, ValueError) as exc:
            raise UserError(f"{file} is not a Karpathy split file or COCO caption annotations: "
                            f"{type(exc).__name__}: {exc}") from None
    raise AssertionError("unreachable: the second pass reads the file whole")


def _karpathy_entries(data: dict, tokens: bool = True) -> dict[str, Entry]:
    images = data["images"]
    # The file name is the id (COCO's names carry their folder: COCO_val2014_...); only
    # if one name is in two folders do the ids become folder/name.
    names = [(image.get("filepath") or "", image["filename"]) for image in images]
    by_folder = len({n for _, n in names}) == len(set(names))
    entries: dict[str, Entry] = {}
    for image, (folder, name) in zip(images, names):
        file = f"{folder}/{name}" if folder else name
        image_id = name if by_folder else file
        captions = []
        for sentence in image.get("sentences", []):
            raw = sentence.get("raw")
            if not raw:
                if not tokens:
                    raise _NeedTokens
                raw = " ".join(sentence.get("tokens", []))
            captions.append(" ".join(raw.split()))
        entry = entries.get(image_id)
        if entry is None:
            entry = entries[image_id] = Entry(file, [], image.get("split", ""))
        entry.captions += filter(None, captions)
    return entries


def _coco_entries(data: dict, split: str) -> dict[str, Entry]:
    entries: dict[str, Entry] = {}
    by_number = {}
    for image in data["images"]:
        name = image["file_name"]
        by_number[image["id"]] = name
        _add(entries, name, "", name, split, image.get("domain") or "")
    for annotation in data["annotations"]:
        _add(entries, by_number[annotation["image_id"]], annotation["caption"])
    return entries


def _split_of_annotation_file(file: Path) -> str:
    """captions_val2014.json -> "val2014"; nocaps_val_4500_captions.json -> "nocaps_val_4500"."""
    stem = file.stem
    for cut in ("captions_", "_captions"):
        stem = stem.replace(cut, "")
    return stem or file.stem


# --- a plain folder: captions.jsonl / captions.csv ---------------------------------------

def read_plain(file: Path) -> dict[str, Entry]:
    entries: dict[str, Entry] = {}
    bad: list[int] = []
    with open(file, newline="", encoding="utf-8-sig") as f:
        rows = _jsonl_rows(f, bad) if file.suffix == ".jsonl" else _csv_rows(f, file, bad)
        for row in rows:
            image, captions = row.get("image"), row.get("captions", row.get("caption"))
            if not isinstance(image, str) or not image.strip() or not captions:
                bad.append(row["_line"])
                continue
            for caption in [captions] if isinstance(captions, str) else captions:
                _add(entries, image.strip().replace("\\", "/"), caption,
                     split=str(row.get("split") or ""), domain=str(row.get("domain") or ""))
    _warn_skipped(file, bad, "expected an image and a caption on each")
    return entries


def _jsonl_rows(f, bad: list[int]):
    for line_no, line in enumerate(f, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        if not isinstance(row, dict):
            bad.append(line_no)
            continue
        yield {**row, "_line": line_no}


def _csv_rows(f, file: Path, bad: list[int]):
    rows = csv.reader(f)
    header = [h.strip().lower() for h in next(rows, [])]
    if "image" not in header or "caption" not in header:
        raise UserError(f"{file}: expected a header with image and caption columns, got "
                        f"{','.join(header)!r}")
    last = header.index("caption") == len(header) - 1
    for row in rows:
        if not row:
            continue
        if len(row) > len(header) and last:  # an unquoted comma in the caption
            row = row[:len(header) - 1] + [",".join(row[len(header) - 1:])]
        if len(row) < len(header):
            bad.append(rows.line_num)
            continue
        yield {**dict(zip(header, row)), "_line": rows.line_num}


READERS = {"kaggle": read_kaggle, "original": read_original, "json": read_json,
           "plain": read_plain}
