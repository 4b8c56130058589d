"""Image embeddings: batched, float32, L2-normalised (N, D) arrays.

`ImageEmbedder` takes any image model the Hugging Face `AutoModel` loads, behind
one interface (`embed()`, `dim`, `name`, batching, inference mode):

* Models with `get_image_features` (CLIP, SigLIP, SigLIP 2, ...): the projected
  image embedding (CLIP: `projection_dim` wide; SigLIP: the vision tower's
  pooled `hidden_size`).
* Plain vision backbones (ResNet, DINOv2, ViT, ConvNeXt, ...): the forward pass's
  `pooler_output`, flattened to (N, D) -- ResNet's globally pooled last stage
  (`hidden_sizes[-1]`, 2048 for ResNet-50), DINOv2's layer-normed CLS token
  (`hidden_size`) -- or, without a pooler, the CLS token of `last_hidden_state`.

CLIP and SigLIP also have a text tower in the same space: `embed_texts()` gives
the (N, D) unit vectors of texts that score against the image embeddings (text
-> image search, search.py --text-by clip; the image-to-caption ablation).

A model whose forward pass takes no `pixel_values` (a text-only BERT, ...) or a
checkpoint without an image processor is a `UserError`.

`BACKBONES` maps the short names a search tool offers (`--backbone clip|siglip|
resnet50|dinov2`) to checkpoints; "clip" means the configured CLIP_MODEL_NAME.
`backbone_model_name(backbone, clip_model_name)` resolves an alias, and passes
any other hub id or local path through unchanged.

Training-pool embeddings are cached on disk under CACHE_DIR, keyed by model, data
set and split (so every backbone has its own cache file), and a second run does
not recompute them.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import logging
import os
import re
import threading
from pathlib import Path
from queue import Empty, Queue
from typing import Callable, Iterable, Iterator, Sequence, TypeVar

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from errors import UserError, hf_token, hub_errors

log = logging.getLogger(__name__)

T = TypeVar("T")

# Short backbone names -> checkpoints. None: the configured CLIP_MODEL_NAME.
BACKBONES: dict[str, str | None] = {
    "clip": None,
    "siglip": "google/siglip-base-patch16-224",
    "resnet50": "microsoft/resnet-50",
    "dinov2": "facebook/dinov2-small",
}


def backbone_model_name(backbone: str, clip_model_name: str) -> str:
    """The checkpoint for `backbone`: an alias of BACKBONES (any case; "clip" is
    `clip_model_name`), or else the hub id / local path itself."""
    name = str(backbone).strip()
    if not name:
        raise UserError(f"the backbone is empty: use one of {', '.join(BACKBONES)}, "
                        "a hub id or a local path")
    if name.lower() in BACKBONES:
        return BACKBONES[name.lower()] or clip_model_name
    return name


def l2_normalise(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length, as float32 (zero rows stay zero)."""
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


def _takes_pixels(model) -> bool:
    """Whether `model` (a class or an instance) is an image model we can embed with."""
    if hasattr(model, "get_image_features"):
        return True
    try:
        return "pixel_values" in inspect.signature(model.forward).parameters
    except (AttributeError, TypeError, ValueError):
        return False


def _auto_model_class(config):
    """The class AutoModel would build for `config`, without loading weights (None if unknown)."""
    import transformers
    try:
        cls = transformers.MODEL_MAPPING[type(config)]
    except (KeyError, ValueError, AttributeError, ImportError):
        return None
    return cls[0] if isinstance(cls, (tuple, list)) else cls


class ImageEmbedder:
    """Embeds PIL images with a CLIP-family image tower or a plain vision backbone.

    `model` is a hub id / local path, or an already loaded model; then pass its
    `processor` (image processor, or a processor holding one) too. `what` and
    `setting` name the model and the option that selects it in error messages.
    """

    @classmethod
    def from_settings(cls, settings, device: torch.device, dtype: torch.dtype
                      ) -> "ImageEmbedder":
        """The image model `settings` name (CLIP_MODEL_NAME), batched by BATCH_SIZE."""
        return cls(settings.clip_model_name, device=device, dtype=dtype,
                   batch_size=settings.batch_size)

    def __init__(self, model: str | os.PathLike | torch.nn.Module, processor=None, *,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 batch_size: int = 32, what: str = "CLIP model",
                 setting: str = "--clip-model-name"):
        import transformers
        self._what = what
        if isinstance(model, (str, os.PathLike)):
            name = self.name = str(model)
            # The config first: a text-only checkpoint is refused before its weights load.
            with hub_errors(what, name, setting):
                config = transformers.AutoConfig.from_pretrained(name, token=hf_token())
            model_class = _auto_model_class(config)
            if model_class is not None:
                self._require_vision(model_class)
            with hub_errors(what, name, setting):
                processor = transformers.AutoImageProcessor.from_pretrained(name, token=hf_token())
                model = transformers.AutoModel.from_pretrained(name, config=config, dtype=dtype,
                                                               token=hf_token())
        else:
            self.name = getattr(model.config, "_name_or_path", type(model).__name__)
            if processor is None:
                raise ValueError("pass the image processor along with a loaded model")
        self._require_vision(model)
        # a processor's tokenizer, for embed_texts; else loaded from `name` on first use
        self._tokenizer = getattr(processor, "tokenizer", None)
        self.processor = getattr(processor, "image_processor", processor)
        if (isinstance(self.processor, (transformers.PreTrainedTokenizerBase,
                                        transformers.ProcessorMixin))
                or not callable(self.processor)):
            raise UserError(f"{what} {self.name!r} has no image processor "
                            f"({type(processor).__name__} cannot prepare images)")
        self.model = model.to(device).eval()
        self.device = torch.device(device)
        self.dtype = dtype
        self.batch_size = batch_size
        # Read and preprocess the next batch in a background thread while the model
        # runs: on a GPU the CPU is otherwise idle meanwhile. On the CPU the forward
        # already uses every core and the thread only competes with it (bench/embed.py
        # on 2 cores: 0.79-0.92x of the forward alone with it, 0.89-0.91x without).
        self.overlap = self.device.type != "cpu"
        # CLIP/SigLIP: the projected image embedding; other backbones: the pooled forward pass.
        self.uses_image_features = hasattr(model, "get_image_features")
        self._dim = self._config_dim()

    def _require_vision(self, model) -> None:
        if not _takes_pixels(model):
            kind = model.__name__ if isinstance(model, type) else type(model).__name__
            raise UserError(f"{self._what} {self.name!r} ({kind}) is not a vision model: it has "
                            "no image tower (its forward pass takes no pixel_values); use a "
                            "CLIP, SigLIP, ResNet, DINOv2 or other image checkpoint")

    def _config_dim(self) -> int | None:
        """The embedding width the config promises, or None if it does not say."""
        config = self.model.config
        vision = getattr(config, "vision_config", None)
        if self.uses_image_features:
            for attr in ("projection_dim", "hidden_size"):
                for part in (config, vision):
                    if part is not None and getattr(part, attr, None):
                        return int(getattr(part, attr))
            return None
        for part in (config, vision):
            if part is None:
                continue
            sizes = getattr(part, "hidden_sizes", None)   # ResNet, ConvNeXt: the last stage
            if sizes:
                return int(sizes[-1])
            if getattr(part, "hidden_size", None):        # ViT, DINOv2: the CLS token
                return int(part.hidden_size)
        return None

    def pixels(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """Preprocessed pixel values of `images` (resized, cropped, normalised), on the CPU."""
        return self.processor(images=list(images), return_tensors="pt")["pixel_values"]

    def _pooled(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """The model's (N, D) image embeddings, before normalisation."""
        return self.encode(self.pixels(images))

    @torch.inference_mode()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """(N, D) embeddings of preprocessed `pixels`, before normalisation."""
        pixels = pixels.to(self.device, self.dtype)
        if self.uses_image_features:
            out = self.model.get_image_features(pixel_values=pixels)
            # transformers 5.x returns an output object; 4.x returned the tensor itself
            if not isinstance(out, torch.Tensor):
                out = (out.pooler_output if getattr(out, "pooler_output", None) is not None
                       else out[0])
        else:
            out = self.model(pixel_values=pixels)
            pooled = getattr(out, "pooler_output", None)
            if pooled is not None:
                out = pooled                                # ResNet: (N, C, 1, 1)
            else:
                hidden = getattr(out, "last_hidden_state", None)
                hidden = out[0] if hidden is None else hidden
                # tokens (N, T, D): the CLS token; a conv feature map (N, C, H, W): its mean
                out = hidden.mean(dim=(2, 3)) if hidden.ndim == 4 else hidden[:, 0]
        out = out.reshape(len(out), -1)
        if self._dim is not None and out.shape[1] != self._dim:
            log.warning("%s %r gives %d-d embeddings, not the %d its config suggests",
                        self._what, self.name, out.shape[1], self._dim)
        self._dim = int(out.shape[1])
        return out

    def embed(self, images: Iterable[Image.Image], total: int | None = None,
              progress: bool = False) -> np.ndarray:
        """(N, D) float32 unit vectors for `images`, batch_size at a time.

        `images` may be a generator that decodes files, and may hold None for an
        image that could not be read: not embedded, but counted on the bar (shown
        as unreadable), which so ends at `total`. With `overlap` (on GPUs),
        reading and preprocessing run in a background thread one batch ahead, so
        they overlap the forward pass (PIL and the tensor ops release the GIL).
        """
        chunks = []
        batches = self._pixel_batches(images)
        unreadable = 0
        with tqdm(total=total, desc="embedding images", unit="img",
                  disable=not progress) as bar:
            for pixels, count, missing in (prefetch(batches, depth=2) if self.overlap
                                           else batches):
                if pixels is not None:
                    chunks.append(l2_normalise(self.encode(pixels).float().cpu().numpy()))
                if missing:
                    unreadable += missing
                    bar.set_postfix(unreadable=unreadable, refresh=False)
                bar.update(count)
        if not chunks:
            return np.zeros((0, self.dim), dtype=np.float32)
        return np.concatenate(chunks)

    @property
    def has_text_tower(self) -> bool:
        """Whether `embed_texts` works: a CLIP-like model with a text tower."""
        return hasattr(self.model, "get_text_features")

    def text_tokenizer(self):
        """The text tower's tokenizer (loaded on first use); a UserError for a model
        without a text tower."""
        import transformers
        if not self.has_text_tower:
            raise UserError(f"{self._what} {self.name!r} ({type(self.model).__name__}) has no "
                            "text tower: searching images by words with it, or the "
                            "image-to-caption ablation, needs a CLIP or SigLIP checkpoint "
                            "(set --clip-model-name)")
        if self._tokenizer is None:
            with hub_errors(f"{self._what} tokenizer", self.name, "--clip-model-name"):
                self._tokenizer = transformers.AutoTokenizer.from_pretrained(
                    self.name, token=hf_token())
        return self._tokenizer

    def embed_texts(self, texts: Sequence[str], progress: bool = False) -> np.ndarray:
        """(N, D) float32 unit vectors of `texts` from the model's text tower, in the
        space of its image embeddings (CLIP, SigLIP); batch_size at a time."""
        tokenizer = self.text_tokenizer()
        text_config = getattr(self.model.config, "text_config", None)
        limit = getattr(text_config, "max_position_embeddings", None) or 77
        max_length = min(int(tokenizer.model_max_length), int(limit))
        # SigLIP was trained on text padded to its full length; CLIP pads to the batch
        siglip = "siglip" in str(getattr(self.model.config, "model_type", ""))
        chunks = []
        with torch.inference_mode(), tqdm(total=len(texts), desc="embedding texts",
                                          unit="text", disable=not progress) as bar:
            for start in range(0, len(texts), self.batch_size):
                batch = list(texts[start:start + self.batch_size])
                encoded = tokenizer(batch, padding="max_length" if siglip else True,
                                    truncation=True, max_length=max_length, return_tensors="pt")
                encoded = {k: v.to(self.device) for k, v in encoded.items()}
                out = self.model.get_text_features(**encoded)
                # transformers 5.x returns an output object; 4.x returned the tensor itself
                if not isinstance(out, torch.Tensor):
                    out = (out.pooler_output if getattr(out, "pooler_output", None) is not None
                           else out[0])
                chunks.append(l2_normalise(out.float().cpu().numpy().reshape(len(batch), -1)))
                bar.update(len(batch))
        if not chunks:
            return np.zeros((0, self.dim), dtype=np.float32)
        return np.concatenate(chunks)

    def _pixel_batches(self, images: Iterable[Image.Image | None]
                       ) -> Iterator[tuple[torch.Tensor | None, int, int]]:
        """(pixels of up to batch_size images, items consumed, of them None)."""
        batch, missing = [], 0
        for image in images:
            if image is None:
                missing += 1
                continue
            batch.append(image)
            if len(batch) == self.batch_size:
                yield self.pixels(batch), len(batch) + missing, missing
                batch, missing = [], 0
        if batch or missing:
            yield self.pixels(batch) if batch else None, len(batch) + missing, missing

    @property
    def key(self) -> str:
        """What its vectors depend on, for cache keys: the model, and the precision
        when it is not float32 (bfloat16 vectors differ slightly)."""
        precision = str(self.dtype).replace("torch.", "")
        return self.name if precision == "float32" else f"{self.name}@{precision}"

    @property
    def dim(self) -> int:
        """Embedding width: from the config, else from one forward pass of a blank image."""
        if self._dim is None:
            self._pooled([Image.new("RGB", (224, 224), (127, 127, 127))])
        return self._dim


def prefetch(items: Iterable[T], depth: int = 2) -> Iterator[T]:
    """Yield `items`, produced by a background thread up to `depth` ahead.

    An exception in the producer is raised here, in the consumer; if the
    consumer stops early, the producer stops after its current item.
    """
    done = object()
    queue: Queue = Queue(maxsize=depth)
    stop = threading.Event()

    def produce() -> None:
        try:
            for item in items:
                if stop.is_set():
                    return
                queue.put((item, None))
            queue.put((done, None))
        except BaseException as exc:  # handed to the consumer, which re-raises it
            queue.put((done, exc))

    thread = threading.Thread(target=produce, name="prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item, error = queue.get()
            if error is not None:
                raise error
            if item is done:
                return
            yield item
    finally:
        stop.set()
        while thread.is_alive():  # unblock a producer waiting on a full queue
            with contextlib.suppress(Empty):
                queue.get(timeout=0.05)
        thread.join()


def embed_pool(embedder: ImageEmbedder, ids: Sequence[str], load: Callable[[str], Image.Image],
               cache_dir: str | os.PathLike | None, cache_key: str
               ) -> tuple[list[str], np.ndarray]:
    """Embed the images `ids` (opened with `load`), cached under `cache_dir`.

    Returns the ids that could be read and their (N, D) embeddings; unreadable
    images are skipped with a warning. The cache file is named by a hash of
    model and precision (`embedder.key`), `cache_key` (data set + split) and
    the ids, so any change to them misses the cache and recomputes.
    """
    digest = hashlib.sha256("\n".join([embedder.key, cache_key, *ids]).encode()).hexdigest()[:16]
    # No dots in the slug: with_suffix() below would cut the digest off "model-v1.5-<digest>".
    slug = re.sub(r"[^A-Za-z0-9_-]+", "_", embedder.name.strip("/"))[-60:]
    path = Path(cache_dir) / "image_embeddings" / f"{slug}-{digest}" if cache_dir else None
    if path is not None:
        cached = _read_cache(path, embedder.key)
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
                yield None  # counted on the bar, not embedded
                continue
            kept.append(image_id)
            yield image

    vectors = embedder.embed(images(), total=len(ids), progress=True)
    if skipped:
        log.warning("%d training images could not be read and are left out", len(skipped))
    if path is not None:
        _write_cache(path, embedder.key, kept, vectors)
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
    # A cache, not a database: each file atomic is enough to never read half a file.
    from atomic_files import atomic_writer, write_text_atomic
    with atomic_writer(path.with_suffix(".npy")) as f:
        np.save(f, vectors)
    meta = {"model": model, "dim": int(vectors.shape[1]), "ids": ids}
    write_text_atomic(path.with_suffix(".json"), json.dumps(meta))
