"""Flickr8K-shaped folders with real JPEG files, in the three on-disk layouts."""

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
