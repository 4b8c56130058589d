"""CLIP-family image embeddings: batched, float32, L2-normalised (N, D) arrays.

Works with any checkpoint whose model has `get_image_features` (CLIP, SigLIP,
SigLIP 2, ...). Training-pool embeddings are cached on disk under CACHE_DIR,
keyed by model, data set and split, so a second run does not recompute them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from errors import UserError, hf_token, hub_errors

log = logging.getLogger(__name__)


def l2_normalise(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length, as float32 (zero rows stay zero)."""
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


class ImageEmbedder:
    """Embeds PIL images with a CLIP-family image tower.

    `model` is a hub id / local path, or an already loaded model; then pass its
    `processor` too.
    """

    def __init__(self, model: str | os.PathLike | torch.nn.Module, processor=None, *,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 batch_size: int = 32):
        import transformers
        if isinstance(model, (str, os.PathLike)):
            model = self.name = str(model)
            with hub_errors("CLIP model", model, "--clip-model-name"):
                processor = transformers.AutoImageProcessor.from_pretrained(model, token=hf_token())
                model = transformers.AutoModel.from_pretrained(model, dtype=dtype, token=hf_token())
        else:
            self.name = getattr(model.config, "_name_or_path", type(model).__name__)
            if processor is None:
                raise ValueError("pass the image processor along with a loaded model")
        if not hasattr(model, "get_image_features"):
            raise UserError(f"CLIP model {self.name!r} ({type(model).__name__}) has no image "
                            "tower; use a CLIP or SigLIP checkpoint")
        self.model = model.to(device).eval()
        self.processor = getattr(processor, "image_processor", processor)
        self.device = torch.device(device)
        self.dtype = dtype
        self.batch_size = batch_size

    @torch.inference_mode()
    def _forward(self, images: Sequence[Image.Image]) -> np.ndarray:
        pixels = self.processor(images=list(images), return_tensors="pt")["pixel_values"]
        out = self.model.get_image_features(pixel_values=pixels.to(self.device, self.dtype))
        # transformers 5.x returns an output object; 4.x returned the tensor itself
        if not isinstance(out, torch.Tensor):
            out = out.pooler_output if getattr(out, "pooler_output", None) is not None else out[0]
        return l2_normalise(out.float().cpu().numpy())

    def embed(self, images: Iterable[Image.Image], total: int | None = None,
              progress: bool = False) -> np.ndarray:
        """(N, D) float32 unit vectors for `images`, batch_size at a time."""
        chunks, batch = [], []
        bar = tqdm(total=total, desc="embedding images", unit="img", disable=not progress)
        for image in images:
            batch.append(image)
            if len(batch) == self.batch_size:
                chunks.append(self._forward(batch))
                bar.update(len(batch))
                batch = []
        if batch:
            chunks.append(self._forward(batch))
            bar.update(len(batch))
        bar.close()
        if not chunks:
            return np.zeros((0, self.dim), dtype=np.float32)
        return np.concatenate(chunks)

    @property
    def dim(self) -> int:
        config = self.model.config
        for attr in ("projection_dim", "hidden_size"):
            for part in (config, getattr(config, "vision_config", None)):
                if part is not None and getattr(part, attr, None):
                    return int(getattr(part, attr))
        raise AttributeError("embedding dimension unknown")


def embed_pool(embedder: ImageEmbedder, ids: Sequence[str], load: Callable[[str], Image.Image],
               cache_dir: str | os.PathLike | None, cache_key: str
               ) -> tuple[list[str], np.ndarray]:
    """Embed the images `ids` (opened with `load`), cached under `cache_dir`.

    Returns the ids that could be read and their (N, D) embeddings; unreadable
    images are skipped with a warning. The cache file is named by a hash of
    model name, `cache_key` (data set + split) and the ids, so any change to
    them misses the cache and recomputes.
    """
    digest = hashlib.sha256("\n".join([embedder.name, cache_key, *ids]).encode()).hexdigest()[:16]
    # No dots in the slug: with_suffix() below would cut the digest off "model-v1.5-<digest>".
    slug = re.sub(r"[^A-Za-z0-9_-]+", "_", embedder.name.strip("/"))[-60:]
    path = Path(cache_dir) / "image_embeddings" / f"{slug}-{digest}" if cache_dir else None
    if path is not None:
        cached = _read_cache(path, embedder.name)
        if cached is not None:
            log.info("training-pool image embeddings loaded from cache %s", path.with_suffix(".npy"))
            return cached

    kept, skipped = [], []

    def images():
        for image_id in ids:
            try:
                image = load(image_id)
            except UserError as exc:
                skipped.append(image_id)
                log.warning("skipping unreadable training image: %s", exc)
                continue
            kept.append(image_id)
            yield image

    vectors = embedder.embed(images(), total=len(ids), progress=True)
    if skipped:
        log.warning("%d training images could not be read and are left out", len(skipped))
    if path is not None:
        _write_cache(path, embedder.name, kept, vectors)
    return kept, vectors


def _read_cache(path: Path, model: str) -> tuple[list[str], np.ndarray] | None:
    meta_file, array_file = path.with_suffix(".json"), path.with_suffix(".npy")
    if not (meta_file.is_file() and array_file.is_file()):
        return None
    try:
        meta = json.loads(meta_file.read_text())
        vectors = np.load(array_file)
        if meta["model"] != model or vectors.shape != (len(meta["ids"]), meta["dim"]):
            raise ValueError("cache does not match its sidecar")
    except (OSError, EOFError, ValueError, KeyError, TypeError) as exc:  # EOFError: empty .npy
        log.warning("ignoring unusable embedding cache %s: %s", path, exc)
        return None
    return list(meta["ids"]), vectors.astype(np.float32, copy=False)


def _write_cache(path: Path, model: str, ids: list[str], vectors: np.ndarray) -> None:
    # A cache, not a database: write-then-rename is enough to never read half a file.
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp.npy")
    np.save(tmp, vectors)
    os.replace(tmp, path.with_suffix(".npy"))
    meta = {"model": model, "dim": int(vectors.shape[1]), "ids": ids}
    tmp_meta = path.with_name(path.name + f".{os.getpid()}.tmp.json")
    tmp_meta.write_text(json.dumps(meta))
    os.replace(tmp_meta, path.with_suffix(".json"))
