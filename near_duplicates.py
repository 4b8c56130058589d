"""Leaks into the evaluation: experiment images with a near-duplicate in the training pool.

    python main.py --near-duplicates                      # at the batch runs' guard (0.95)
    python main.py --near-duplicates --threshold 0.9

    report = near_duplicates.find(settings, threshold=0.9)
    report.pairs[0].experiment_index, .image_id, .twin_id, .cosine

After a random split, an experiment image whose near-twin (a burst of one scene, a
re-encoded copy) sits in the training pool gets that twin's human captions in its
prompt, and its BLEU/CIDEr rise without the model seeing anything more. This lists
those images for the current split and CLIP model: a table (experiment index,
image, its twin, cosine) and a figure of the pairs, RESULTS_DIR/near_duplicates.png.
NEAR_DUPLICATE_THRESHOLD keeps such twins out of the prompts (retrieval.nearest);
batch runs count them in their summary (`count_in_db`).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import config
from atomic_files import atomic_writer
from errors import UsageError, UserError

if TYPE_CHECKING:
    import numpy as np

    from db_manager import DbManager

log = logging.getLogger("near_duplicates")

FIGURE_NAME = "near_duplicates.png"
FIGURE_PAIRS = 12          # pairs drawn in the figure (the most similar first)


@dataclass(frozen=True)
class Pair:
    """An experiment image and its most similar training image, at or above the threshold."""

    experiment_index: int
    image_id: str
    twin_id: str
    cosine: float

    def to_json(self) -> dict[str, Any]:
        return {"experiment_index": self.experiment_index, "image_id": self.image_id,
                "twin_id": self.twin_id, "cosine": round(self.cosine, 6)}


@dataclass(frozen=True)
class Report:
    """The near-duplicate pairs of a split, for one CLIP model and threshold."""

    threshold: float
    clip_model: str
    experiment_images: int
    training_images: int
    pairs: tuple[Pair, ...]
    figure: str | None = None

    def table(self) -> str:
        """The pairs as a plain-text table, with a line that sums them up."""
        lines = [f"{len(self.pairs)} of {self.experiment_images} experiment images have a "
                 f"near-duplicate (CLIP cosine >= {self.threshold:g}, {self.clip_model}) "
                 f"among the {self.training_images} training images"]
        if self.pairs:
            width = max(len(p.image_id) for p in self.pairs)
            lines.append(f"{'index':>5}  {'image':<{width}}  {'twin':<{width}}  cosine")
            lines += [f"{p.experiment_index:>5}  {p.image_id:<{width}}  {p.twin_id:<{width}}  "
                      f"{p.cosine:.4f}" for p in self.pairs]
        if self.figure:
            lines.append(f"figure: {self.figure}")
        return "\n".join(lines)


def pairs_of(experiment_ids: Sequence[str], experiment_vectors: "np.ndarray",
             pool_ids: Sequence[str], pool_vectors: "np.ndarray", threshold: float,
             indices: Sequence[int] | None = None) -> list[Pair]:
    """Each experiment image whose most similar pool image has a cosine of at least
    `threshold`; `indices` are their experiment indices (default 0, 1, ...)."""
    from neighbour_selection import near_duplicate_pairs
    indices = list(range(len(experiment_ids))) if indices is None else list(indices)
    return [Pair(indices[q], experiment_ids[q], pool_ids[p], cosine) for q, p, cosine
            in near_duplicate_pairs(experiment_vectors, pool_vectors, threshold)]


def check_threshold(threshold: float) -> float:
    """A cosine in (0, 1], else a one-line UsageError (a malformed option value)."""
    if not 0 < threshold <= 1:
        raise UsageError(f"--threshold must be a cosine above 0 and at most 1, got {threshold}")
    return float(threshold)


def find(settings: config.Settings | None = None, threshold: float | None = None,
         figure: bool = True, **overrides: Any) -> Report:
    """The near-duplicate pairs of the current split: every experiment image against
    the training pool in DB_DIR (built on a first run), by CLIP image cosine.

    `threshold` defaults to the guard of batch runs (NEAR_DUPLICATE_THRESHOLD,
    "auto" = 0.95; when that is 0, 0.95). `figure`: draw the pairs to
    RESULTS_DIR/near_duplicates.png. Experiment embeddings are cached in CACHE_DIR.
    """
    import numpy as np

    from memory import initialize
    from models import load_models
    from image_embedder import embed_pool
    settings = config.settings_of(settings, overrides, "batch")
    if threshold is None:
        threshold = settings.near_duplicate_threshold or config.AUTO_BATCH_THRESHOLD
    threshold = check_threshold(threshold)
    dataset, db = initialize(settings, captioner=False)
    models = load_models(settings)
    samples = list(dataset.experiment)
    index_of = {s.image_id: n for n, s in enumerate(samples)}
    by_id = {s.image_id: s for s in samples}
    ids, vectors = embed_pool(
        models.image_embedder, [s.image_id for s in samples],
        lambda image_id: dataset.load_image(by_id[image_id]), settings.cache_dir,
        cache_key=f"{settings.dataset_name}|{dataset.fingerprint}|experiment")
    pool = db.image_rows("train")
    pool_ids = list(pool.ids)
    pairs = pairs_of(ids, vectors, pool_ids, np.asarray(pool.vectors, np.float32),
                     threshold, [index_of[i] for i in ids])
    report = Report(threshold, settings.clip_model_name, len(samples), len(pool_ids),
                    tuple(pairs))
    if figure and pairs:
        path = plot_pairs(report, lambda image_id: dataset.load_image(dataset.get(image_id)),
                          Path(settings.results_dir) / FIGURE_NAME)
        report = Report(**{**report.__dict__, "figure": str(path)})
    return report


def plot_pairs(report: Report, load_image, path: str | os.PathLike) -> Path:
    """A figure of the most similar pairs: each experiment image beside its twin, with
    the cosine (matplotlib, Agg; written atomically)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = sorted(report.pairs, key=lambda p: -p.cosine)[:FIGURE_PAIRS]
    # constrained layout: the title and every image's label get their own room
    fig, axes = plt.subplots(len(shown), 2, figsize=(6, 2.6 * len(shown)), squeeze=False,
                             layout="constrained")
    for row, pair in zip(axes, shown):
        for ax, image_id, title in ((row[0], pair.image_id,
                                     f"experiment {pair.experiment_index}: {pair.image_id}"),
                                    (row[1], pair.twin_id,
                                     f"training: {pair.twin_id} (cos {pair.cosine:.3f})")):
            try:
                ax.imshow(load_image(image_id))
            except (UserError, OSError, AttributeError) as exc:  # drawn as missing, not fatal
                ax.text(0.5, 0.5, f"unreadable: {exc}", ha="center", va="center", fontsize=7,
                        wrap=True)
            ax.set_title(title, fontsize=7)
            ax.axis("off")
    fig.suptitle(f"{len(report.pairs)} near-duplicate pairs (CLIP cosine >= "
                 f"{report.threshold:g}), the {len(shown)} closest", fontsize=9)
    path = Path(path)
    try:
        with atomic_writer(path, suffix=".png") as out:
            fig.savefig(out, dpi=90, format="png")
    finally:
        plt.close(fig)
    return path


def count_in_db(db: "DbManager", image_ids: Sequence[str], threshold: float
                ) -> dict[str, Any]:
    """For a batch run's summary: how many of `image_ids` (experiment images stored in
    `db`) have a training image at or above `threshold`, and which."""
    import numpy as np
    stored = [i for i in image_ids if db.image_vector(i) is not None]
    queries = np.array([db.image_vector(i) for i in stored], np.float32).reshape(
        len(stored), db.describe().image_dim)
    pool = db.image_rows("train")
    pairs = pairs_of(stored, queries, list(pool.ids), np.asarray(pool.vectors, np.float32),
                     threshold)
    return {"threshold": threshold, "images": len(stored), "with_near_duplicate": len(pairs),
            "pairs": [{"image_id": p.image_id, "twin_id": p.twin_id,
                       "cosine": round(p.cosine, 6)} for p in pairs]}
