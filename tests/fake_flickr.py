"""Captioned-image folders with real image files: Flickr8K in its three layouts, Karpathy
split files (COCO with its train2014/val2014 folders), COCO/NoCaps caption annotations
and plain folders with captions.jsonl or captions.csv."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Sequence

from PIL import Image, ImageDraw

SUBJECTS = ("dog", "cat", "child", "man", "woman", "bird", "horse", "boy", "girl", "cyclist")
ACTIONS = ("runs through the grass", "jumps over a log", "sits on a bench", "plays in the snow",
           "swims in a lake", "walks down the street", "climbs a rock", "rides a bike")
COLOURS = ((200, 40, 40), (40, 160, 60), (40, 80, 200), (230, 200, 40), (150, 60, 170),
           (30, 30, 30), (240, 240, 240), (240, 140, 30))


def image_name(i: int) -> str:
    return f"{1000000 + i * 7919}_{i:04x}ab.jpg"


def make_image(i: int, size: tuple[int, int] = (120, 90)) -> Image.Image:
    """A distinct picture per index: a coloured background and shapes."""
    rng = random.Random(i)
    img = Image.new("RGB", size, COLOURS[i % len(COLOURS)])
    draw = ImageDraw.Draw(img)
    for _ in range(3):
        x0, y0 = rng.randrange(size[0] - 20), rng.randrange(size[1] - 20)
        box = (x0, y0, x0 + rng.randrange(10, 40), y0 + rng.randrange(10, 40))
        colour = COLOURS[rng.randrange(len(COLOURS))]
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=colour)
    return img


def captions_for(i: int) -> list[str]:
    rng = random.Random(1000 + i)
    subject = SUBJECTS[i % len(SUBJECTS)]
    return [f"A {subject} {ACTIONS[rng.randrange(len(ACTIONS))]} ." if n else
            f"A {subject}, seen from far away, {ACTIONS[i % len(ACTIONS)]} ." for n in range(5)]


def make_flickr(root: str | Path, layout: str = "kaggle", n_images: int = 16,
                image_size: tuple[int, int] = (120, 90)) -> Path:
    """Write a Flickr8K-like folder with `n_images` JPEGs and 5 captions each.

    layout: "kaggle" (Images/ + captions.txt), "original" (Flicker8k_Dataset/ +
    Flickr8k_text/Flickr8k.token.txt) or "karpathy" (images/ + dataset_flickr8k.json).
    """
    root = Path(root)
    image_dir = root / {"kaggle": "Images", "original": "Flicker8k_Dataset",
                        "karpathy": "images"}[layout]
    image_dir.mkdir(parents=True, exist_ok=True)
    for i in range(n_images):
        make_image(i, image_size).save(image_dir / image_name(i), quality=90)
    if layout == "kaggle":
        lines = ["image,caption"]
        for i in range(n_images):
            # captions with commas are quoted, as in the real file
            lines += [f'{image_name(i)},"{c}"' if "," in c else f"{image_name(i)},{c}"
                      for c in captions_for(i)]
        (root / "captions.txt").write_text("\n".join(lines) + "\n")
    elif layout == "original":
        text = root / "Flickr8k_text"
        text.mkdir(exist_ok=True)
        lines = [f"{image_name(i)}#{n}\t{c}" for i in range(n_images)
                 for n, c in enumerate(captions_for(i))]
        (text / "Flickr8k.token.txt").write_text("\n".join(lines) + "\n")
    elif layout == "karpathy":
        images, sid = [], 0
        for i in range(n_images):
            sentences = []
            for c in captions_for(i):
                sentences.append({"tokens": c.lower().replace(",", "").split(), "raw": c,
                                  "imgid": i, "sentid": sid})
                sid += 1
            images.append({"filename": image_name(i), "imgid": i, "split": "train",
                           "sentids": [s["sentid"] for s in sentences], "sentences": sentences})
        (root / "dataset_flickr8k.json").write_text(json.dumps(
            {"images": images, "dataset": "flickr8k"}))
    else:
        raise ValueError(layout)
    return root


def make_view(scene: int, view: int, size: tuple[int, int] = (120, 90)) -> Image.Image:
    """View `view` of scene `scene`, as a burst or an edited copy would give it:
    0 the picture, 1 a slight crop, 2 a little brighter, 3 a resized copy. Scenes
    0-7 differ in background colour, so the tests' tiny CLIP tells them apart (saved
    as JPEG: the views of a scene >= 0.99 cosine, two scenes <= 0.96)."""
    from PIL import ImageEnhance
    img = make_image(scene, size)
    w, h = size
    if view % 4 == 1:
        img = img.crop((2, 1, w - 2, h - 1)).resize(size)
    elif view % 4 == 2:
        img = ImageEnhance.Brightness(img).enhance(1.05)
    elif view % 4 == 3:
        img = img.resize((w // 2, h // 2)).resize(size)
    return img


def scene_name(scene: int, view: int) -> str:
    return f"{2000000 + scene * 7919}_s{scene:02d}v{view}.jpg"


def make_scenes_flickr(root: str | Path, views: Sequence[int]) -> Path:
    """A Kaggle-layout Flickr8K whose scenes come in several views: scene s has
    views[s] images (scene_name(s, v)), near-duplicates of one another, with the
    scene's captions in other words for each view."""
    root = Path(root)
    image_dir = root / "Images"
    image_dir.mkdir(parents=True, exist_ok=True)
    lines = ["image,caption"]
    for scene, count in enumerate(views):
        for view in range(count):
            make_view(scene, view).save(image_dir / scene_name(scene, view), quality=90)
            words = captions_for(scene)
            lines += [f'{scene_name(scene, view)},"{c}"' if "," in c else
                      f"{scene_name(scene, view)},{c}" for c in words[view:] + words[:view]]
    (root / "captions.txt").write_text("\n".join(lines) + "\n")
    return root


# --- other collections: Karpathy split files, COCO/NoCaps annotations, plain folders -------

def coco_name(i: int, folder: str = "train2014") -> str:
    return f"COCO_{folder}_{i:012d}.jpg"


def make_karpathy(root: str | Path, splits: Sequence[str], dataset: str = "coco",
                  image_size: tuple[int, int] = (120, 90)) -> Path:
    """A Karpathy split file dataset_{dataset}.json beside its images: image i is in
    split splits[i]. COCO's images are in train2014/ (train, restval) and val2014/ (val,
    test), named by `filepath`, as Karpathy's file does; the others in images/."""
    root = Path(root)
    images, sid = [], 0
    for i, split in enumerate(splits):
        entry: dict = {"split": split, "imgid": i, "sentids": list(range(sid, sid + 5))}
        if dataset == "coco":
            folder = "train2014" if split in ("train", "restval") else "val2014"
            entry.update(filepath=folder, filename=coco_name(i, folder), cocoid=i)
            file = root / folder / entry["filename"]
        else:
            entry["filename"] = image_name(i)
            file = root / "images" / image_name(i)
        entry["sentences"] = [{"raw": c, "tokens": c.lower().split(), "imgid": i,
                               "sentid": sid + n} for n, c in enumerate(captions_for(i))]
        sid += 5
        file.parent.mkdir(parents=True, exist_ok=True)
        make_image(i, image_size).save(file, quality=90)
        images.append(entry)
    (root / f"dataset_{dataset}.json").write_text(json.dumps({"images": images,
                                                              "dataset": dataset}))
    return root


NOCAPS_DOMAINS = ("in-domain", "near-domain", "out-domain")


def nocaps_name(i: int) -> str:
    return f"{i * 2654435761 % 2**32:08x}{i:08x}.jpg"


def make_coco_captions(root: str | Path, n_images: int, file: str = "nocaps_val_4500_captions.json",
                       domains: bool = True, image_dir: str = "images", first: int = 100,
                       captions_per_image: int = 10, image_size: tuple[int, int] = (120, 90)
                       ) -> Path:
    """COCO-style caption annotations (`file`) beside `image_dir`/: NoCaps validation's
    shape by default (10 captions per image, each image's domain in turn in-, near-,
    out-domain). Image k is make_image(first + k), with ids from 1000."""
    root = Path(root)
    (root / image_dir).mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for k in range(n_images):
        i = first + k
        entry = {"id": 1000 + k, "file_name": nocaps_name(i), "height": image_size[1],
                 "width": image_size[0]}
        if domains:
            entry["domain"] = NOCAPS_DOMAINS[k % 3]
        images.append(entry)
        make_image(i, image_size).save(root / image_dir / entry["file_name"], quality=90)
        words = captions_for(i)
        annotations += [{"id": len(annotations), "image_id": 1000 + k,
                         "caption": words[n % 5] + ("" if n < 5 else " again")}
                        for n in range(captions_per_image)]
    (root / file).parent.mkdir(parents=True, exist_ok=True)
    (root / file).write_text(json.dumps({"images": images, "annotations": annotations}))
    return root


def make_plain(root: str | Path, n_images: int, kind: str = "jsonl", first: int = 200,
               splits: Sequence[str] | None = None, image_size: tuple[int, int] = (120, 90)
               ) -> Path:
    """A plain folder: photos/ (image k = make_image(first + k), some in a subfolder)
    and captions.jsonl or captions.csv with one row per caption (5 per image), the
    image's path relative to the folder, and a split column when `splits` is given."""
    import csv
    root = Path(root)
    rows = []
    for k in range(n_images):
        i = first + k
        name = f"photos/{'more/' if k % 2 else ''}pic_{k:03d}.png"
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        make_image(i, image_size).save(root / name)
        rows += [{"image": name, "caption": c, **({"split": splits[k]} if splits else {})}
                 for c in captions_for(i)]
    if kind == "jsonl":
        (root / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        with open(root / "captions.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    return root
