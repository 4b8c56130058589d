"""The models of a process: each loaded on first use and kept, so a long session
(the web page, a notebook, a batch run) loads a model once.

    from models import load_models
    models = load_models(settings)     # nothing loaded yet
    models.image_embedder.embed(images)  # CLIP loads now, once per process

Asking for another model (another checkpoint, another precision) replaces the one
held, so a session that compares VLMs does not keep them all in memory.
Importing this module loads nothing; torch comes with the first model.
"""

from __future__ import annotations

import platform
from importlib import metadata
from typing import TYPE_CHECKING, Any, Callable

import config

if TYPE_CHECKING:
    from dataset_loader import Collection


# One object of each kind, reused by later calls in the same process. Asking for
# another (another model, another precision) replaces the previous one, so a
# long session that compares VLMs does not keep them all in memory.
_loaded: dict[str, tuple[Any, Any]] = {}


def cached(kind: str, key: Any, load: Callable[[], Any]) -> Any:
    """The object cached for `kind` if it was made with `key`, else `load()` (kept)."""
    held = _loaded.get(kind)
    if held is not None and held[0] == key:
        return held[1]
    _loaded.pop(kind, None)  # free the old one before loading its replacement
    value = load()
    _loaded[kind] = (key, value)
    return value


def loaded(kind: str) -> Any:
    """The object of `kind` this process holds (None if none): for tests and tools."""
    held = _loaded.get(kind)
    return None if held is None else held[1]


def device_of(settings: config.Settings):
    """(torch.device, torch.dtype) of the settings' DEVICE and DTYPE (finished by
    config.resolve: "cuda", "bfloat16", ...)."""
    import torch
    return torch.device(settings.device), getattr(torch, settings.dtype)


def dtype_name(dtype: Any) -> str:
    """torch.bfloat16 -> "bfloat16"."""
    return str(dtype).replace("torch.", "")


class Models:
    """The models `settings` name, each loaded on first use and kept for the process.

    Carries its settings: the caption step reads k, the prompt templates and the
    generation settings from `models.settings`.
    """

    def __init__(self, settings: config.Settings):
        self.settings = settings
        self.device, self.dtype = device_of(settings)

    def _model(self, kind: str, make: Callable[[], Any], *extra: Any) -> Any:
        """The model of `kind`, cached under the values of the settings it is built from
        (config.model_settings) and `extra`: another value loads another model."""
        key = tuple(getattr(self.settings, name.lower()) for name in config.model_settings(kind))
        return cached(kind, key + extra, make)

    @property
    def image_embedder(self):
        from image_embedder import ImageEmbedder
        return self._model("image_embedder", lambda: ImageEmbedder.from_settings(
            self.settings, self.device, self.dtype))

    @property
    def caption_embedder(self):
        from caption_embedder import CaptionEmbedder
        return self._model("caption_embedder", lambda: CaptionEmbedder.from_settings(
            self.settings, self.device))

    @property
    def captioner(self):
        from vlm_captioner import VLMCaptioner
        s = self.settings
        return self._model("captioner", lambda: VLMCaptioner.from_settings(
            s, self.device, self.dtype), s.cache_dir if s.vlm_device_map else "")  # offload

    def load_all(self) -> "Models":
        """Load every model now (a command's start, a web server's warm-up)."""
        self.image_embedder, self.caption_embedder, self.captioner  # noqa: B018
        return self

    def describe(self) -> dict[str, str]:
        """The resolved device and dtype, for result files."""
        return {"resolved_device": str(self.device), "resolved_dtype": dtype_name(self.dtype)}


def load_models(settings: config.Settings) -> Models:
    """The models of `settings` (each loaded on first use, once per process)."""
    return Models(settings)


def load_dataset(settings: config.Settings) -> "Collection":
    """DATASET_NAME split by SPLIT (EXPERIMENT_SAMPLES, RANDOM_SEED), the memory from
    MEMORY_DATASET, once per process."""
    from dataset_loader import load_and_split_dataset
    key = (settings.dataset_name, settings.experiment_samples, settings.random_seed,
           settings.split, settings.memory_dataset)
    return cached("dataset", key, lambda: load_and_split_dataset(
        *key[:3], split=settings.split, memory_dataset=settings.memory_dataset))


def experiment_count(settings: config.Settings) -> int:
    """How many experiment images the settings' split has (--all runs them all):
    EXPERIMENT_SAMPLES for the seeded split, without loading anything; else the
    collection's (loaded once per process), after every model and the data set were
    found available (the callers caption next: one line names all that are missing)."""
    if settings.split == "seeded":
        return settings.experiment_samples
    import availability
    availability.require(settings)
    return len(load_dataset(settings).experiment)


def versions() -> dict[str, str]:
    """Python's and the main packages' versions, for result files and manifests."""
    found = {"python": platform.python_version()}
    for package in ("torch", "transformers", "sentence-transformers", "numpy", "datasets"):
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[package] = "not installed"
    return found
