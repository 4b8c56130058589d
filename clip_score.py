"""CLIPScore and RefCLIPScore (Hessel et al., EMNLP 2021), computed as the reference
implementation (jmhessel/clipscore) does.

    scorer = clip_score.scorer_for(settings, retrieval=models.image_embedder,
                                   image_of=open_image, known_vector=vector_of)
    scores = scorer.score(ids, candidates, references)   # or a clip_score.Unavailable
    scores.clip_score.mean(), scores.ref_clip_score

* Every caption, the candidate and each reference, is prefixed "A photo depicts "
  and embedded with the CLIP text tower; the image with the image tower of the same
  checkpoint (METRIC_CLIP_MODEL; the paper's is openai/clip-vit-base-patch32); all
  features are L2-normalised.
* CLIPScore = 2.5 * max(cos(image, candidate), 0), per image; the corpus score is
  the mean over images. Reference-free.
* RefCLIPScore = the harmonic mean 2 * c * r / (c + r) of c = CLIPScore and r = the
  highest cosine between the candidate and one of the image's references (not
  clipped, not weighted). Where c + r = 0 (c clipped to 0 and r exactly 0, or r = -c)
  the reference code divides by zero; it is 0 here (the harmonic mean's limit at 0).

The reported values are on the reference code's scale (CLIPScore between 0 and
2.5, typically 0.6-0.9 for good captions); tables in papers often show them x100.
The paper computed in float16 on a GPU; float32 on a CPU differs slightly (the
reference README's note); the scores record the precision used.

When METRIC_CLIP_MODEL is the retrieval CLIP (CLIP_MODEL_NAME), the image vectors
the pipeline already computed for retrieval are reused (`known_vector`), and the
loaded retrieval model gives the text features: nothing is loaded or embedded twice.
A model that cannot be loaded (offline and not in the Hugging Face cache, no text
tower) gives an `Unavailable` with the reason, and the scores are skipped.

Importing this module does no work: numpy, torch and the model come with the first call.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Protocol, Sequence

from errors import UserError

if TYPE_CHECKING:
    import numpy as np
    from PIL import Image

    import config

log = logging.getLogger(__name__)

PREFIX = "A photo depicts "   # the reference code's CLIPCapDataset prefix (with its space)
WEIGHT = 2.5                  # w in CLIP-S = w * max(cos, 0)
NAMES = ("CLIPScore", "RefCLIPScore")


class ClipEmbedder(Protocol):
    """What the scores need of a CLIP: image_embedder.ImageEmbedder is one."""

    name: str

    def embed(self, images: Sequence["Image.Image"]) -> "np.ndarray": ...

    def embed_texts(self, texts: Sequence[str]) -> "np.ndarray": ...


@dataclass(frozen=True)
class Scores:
    """Per-image scores, in the order of the ids given to `ClipScorer.score`."""

    clip_score: "np.ndarray"                 # (N,) CLIPScore
    ref_clip_score: "np.ndarray | None"      # (N,) RefCLIPScore; None without references
    reused: int = 0                          # image vectors taken from retrieval


@dataclass(frozen=True)
class Unavailable:
    """A METRIC_CLIP_MODEL that cannot score here, and why (the skip line)."""

    model: str
    reason: str


def compute(image_vectors: "np.ndarray", candidates: Sequence[str], embedder: ClipEmbedder,
            references: Sequence[Sequence[str]] | None = None) -> Scores:
    """CLIPScore (and RefCLIPScore with `references`) of each candidate caption.

    `image_vectors` (N, D): the images' CLIP image features, row i for candidates[i]
    (normalised here again, so unnormalised features work too); `references[i]`: the
    human captions of image i, at least one each. Texts get the PREFIX and are embedded
    once each (a caption repeated among candidates and references is embedded once).
    """
    import numpy as np

    images = np.asarray(image_vectors, dtype=np.float64)
    if images.ndim != 2 or images.shape[0] != len(candidates):
        raise ValueError(f"image_vectors has shape {images.shape}; expected "
                         f"({len(candidates)}, D), one row per candidate")
    if references is not None:
        if len(references) != len(candidates):
            raise ValueError(f"{len(references)} reference lists for {len(candidates)} "
                             "candidates")
        empty = [i for i, refs in enumerate(references) if not refs]
        if empty:
            raise ValueError(f"RefCLIPScore needs references: image {empty[0]} has none")
    texts = list(dict.fromkeys([*candidates, *(r for refs in references or () for r in refs)]))
    vectors = _unit(np.asarray(embedder.embed_texts([PREFIX + t for t in texts]),
                               dtype=np.float64))
    if vectors.shape[0] != len(texts) or vectors.shape[1] != images.shape[1]:
        raise ValueError(f"the text features have shape {vectors.shape}; expected "
                         f"({len(texts)}, {images.shape[1]}) to match the image features")
    row = {text: n for n, text in enumerate(texts)}
    cand = vectors[[row[c] for c in candidates]]
    clip_s = WEIGHT * np.clip(np.sum(_unit(images) * cand, axis=1), 0, None)
    if references is None:
        return Scores(clip_s, None)
    best = np.array([float(np.max(vectors[[row[r] for r in refs]] @ cand[i]))
                     for i, refs in enumerate(references)])
    total = clip_s + best
    safe = np.where(total == 0, 1.0, total)
    ref_clip_s = np.where(total == 0, 0.0, 2 * clip_s * best / safe)
    return Scores(clip_s, ref_clip_s)


def _unit(x: "np.ndarray") -> "np.ndarray":
    import numpy as np
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norms > 0, norms, 1.0)


@dataclass(frozen=True)
class ClipScorer:
    """A loaded METRIC_CLIP_MODEL and where the images of the ids being scored come from.

    `known_vector(id)`: the retrieval's image vector of that id (same model), or None
    where it has none; `image_of(id)`: the image, opened, for the others.
    """

    embedder: ClipEmbedder
    image_of: Callable[[Any], "Image.Image"] | None = None
    known_vector: Callable[[Any], "np.ndarray | None"] | None = None
    precision: str = "float32"

    @property
    def model(self) -> str:
        return self.embedder.name

    def image_vectors(self, ids: Sequence[Any]) -> tuple["np.ndarray", int]:
        """(N, D) image features of `ids`, and how many came from retrieval: only the
        images without a known vector are opened and embedded."""
        import numpy as np
        known = [self.known_vector(i) if self.known_vector else None for i in ids]
        missing = [n for n, v in enumerate(known) if v is None]
        if missing:
            if self.image_of is None:
                raise UserError(f"no image vectors for {len(missing)} images and no way to "
                                "open them")
            computed = self.embedder.embed([self.image_of(ids[n]) for n in missing])
            for n, vector in zip(missing, computed):
                known[n] = vector
        rows = np.stack([np.asarray(v, dtype=np.float32).reshape(-1) for v in known]) if ids \
            else np.zeros((0, 0), np.float32)
        return rows, len(ids) - len(missing)

    def score(self, ids: Sequence[Any], candidates: Sequence[str],
              references: Sequence[Sequence[str]] | None = None) -> Scores:
        """CLIPScore (and RefCLIPScore) of candidates[i] for image ids[i]."""
        vectors, reused = self.image_vectors(ids)
        scores = compute(vectors, candidates, self.embedder, references)
        return Scores(scores.clip_score, scores.ref_clip_score, reused)

    def describe(self, reused: int, images: int) -> dict[str, Any]:
        """What the scores were computed with, recorded beside them."""
        return {"model": self.model, "prefix": PREFIX, "weight": WEIGHT,
                "precision": self.precision,
                "image_vectors": f"{reused} of {images} reused from retrieval"}


def scorer_for(settings: "config.Settings", *, retrieval: ClipEmbedder | None = None,
               image_of: Callable[[Any], "Image.Image"] | None = None,
               known_vector: Callable[[Any], "np.ndarray | None"] | None = None
               ) -> ClipScorer | Unavailable:
    """The scorer of METRIC_CLIP_MODEL, or why there is none.

    `retrieval`: the loaded retrieval CLIP; when it is METRIC_CLIP_MODEL it scores,
    and `known_vector` (its image vectors by id) is used; otherwise METRIC_CLIP_MODEL
    is loaded (once per process, on DEVICE in DTYPE) and `known_vector` is ignored.
    """
    from models import cached, device_of, dtype_name

    name = settings.metric_clip_model
    device, dtype = device_of(settings)
    if retrieval is not None and retrieval.name == name:
        embedder: Any = retrieval
        dtype = getattr(retrieval, "dtype", dtype)
    else:
        known_vector = None   # another model's vectors: not comparable
        try:
            embedder = cached("metric_clip", (name, str(device), str(dtype), settings.batch_size),
                              lambda: _load(name, device, dtype, settings.batch_size))
        except UserError as exc:
            return Unavailable(name, str(exc))
    if not getattr(embedder, "has_text_tower", True):
        return Unavailable(name, f"{name!r} has no text tower (use a CLIP checkpoint)")
    return ClipScorer(embedder, image_of, known_vector, dtype_name(dtype))


def _load(name: str, device: Any, dtype: Any, batch_size: int) -> ClipEmbedder:
    from image_embedder import ImageEmbedder
    return ImageEmbedder(name, device=device, dtype=dtype, batch_size=batch_size,
                         what="CLIPScore model", setting="--metric-clip-model")
