"""Experiments: experiment images through the caption step, each kept as a result
file and in the memory.

    settings = config.resolve()
    dataset, db = memory.initialize(settings)
    [result] = experiment.run_experiments(dataset, db, [42], settings)
    result.generated_caption, result.to_json()

A result file, RESULTS_DIR/experiment_{index}_{timestamp}.json, holds
ExperimentResult.to_json():
  experiment_index, image_id      which image (index into the experiment split)
  generated_caption               the VLM's caption
  original_caption(s)             its human references (the first, and all)
  similar_images                  [{rank, image_id, score, captions}] the neighbours;
                                  RETRIEVE "captions": one per retrieved caption, with
                                  "source": "memory" (a caption of image_id) or "FILE:LINE"
                                  of a corpus (image_id "")
  prompt                          the prompt built from the neighbours' captions
  model_prompt                    the text the VLM was given: the prompt in its family's
                                  form (chat template, "Question: ... Answer:", a task
                                  prompt such as "<CAPTION>", BLIP/GIT's caption prefix)
  context_used                    false when the retrieved captions did not reach the
                                  VLM (BLIP, GIT, PaliGemma, Florence-2; no neighbours)
  domain                          the image's domain, where its collection gives one
                                  (NoCaps: in-domain, near-domain, out-domain)
  config                          every setting (lower-case), the memory policy and
                                  near-duplicate threshold used (the cosine, 0 = off),
                                  resolved_device, resolved_dtype
  versions                        python and the main packages
  timings                         seconds per stage (the batch's, per image), total,
                                  first_token (not per image)
  batch_size, timestamp, result_path
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Mapping, Sequence

import config
import pipeline
from memory import Memory, save_caption
from models import Models, load_models, versions
from retrieval import Neighbour, Selection
from errors import UserError

if TYPE_CHECKING:
    from dataset_loader import Collection
    from db_manager import DbManager


@dataclass(frozen=True)
class ExperimentResult(Mapping[str, Any]):
    """One captioned experiment image: a read-only mapping with the result file's keys
    (`r["generated_caption"]`, `r.get(...)`, `dict(r)`, `json.dumps(dict(r))`, as the
    seed's dict), and the same values as attributes."""

    experiment_index: int
    image_id: str
    generated_caption: str
    original_captions: tuple[str, ...]
    similar_images: tuple[Neighbour, ...]
    prompt: str
    config: Mapping[str, Any]
    versions: Mapping[str, str]
    timings: Mapping[str, float]
    batch_size: int
    timestamp: str
    result_path: str | None = None
    context_used: bool = True
    model_prompt: str | None = None
    domain: str = ""                     # the image's domain where its collection gives one
    # RETRIEVE "captions" under the leak guard: corpus captions left out as identical
    # to one of the references (recorded only where some were)
    identical_excluded: int = 0

    @property
    def original_caption(self) -> str:
        return self.original_captions[0]

    def to_json(self) -> dict[str, Any]:
        record = {
            "experiment_index": self.experiment_index, "image_id": self.image_id,
            "generated_caption": self.generated_caption,
            "original_caption": self.original_caption,
            "original_captions": list(self.original_captions),
            "similar_images": [n.to_json() for n in self.similar_images],
            "prompt": self.prompt, "model_prompt": self.model_prompt,
            "context_used": self.context_used,
            "config": dict(self.config), "versions": dict(self.versions),
            "timings": dict(self.timings), "batch_size": self.batch_size,
            "timestamp": self.timestamp}
        if self.domain:
            record["domain"] = self.domain
        if self.identical_excluded:
            record["identical_excluded"] = self.identical_excluded
        if self.result_path is not None:
            record["result_path"] = self.result_path
        return record

    # the Mapping: the result file's keys and values (JSON-ready)
    def __getitem__(self, key: str) -> Any:
        return self.to_json()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.to_json())

    def __len__(self) -> int:
        return len(self.to_json())


def run_experiments(dataset: "Collection", db: "DbManager", indices: Sequence[int],
                    settings: config.Settings, memory: Memory | None = None,
                    load_seconds: float = 0.0, models: Models | None = None
                    ) -> list[ExperimentResult | pipeline.Failure]:
    """Caption the experiment images `indices` as one batch (pipeline.caption_batch),
    then save each: its row in the databases, then its result file in RESULTS_DIR.

    `memory` (default: the database's rows, as MEMORY says) is shared across
    calls by batch runs, so a growing memory sees every image captioned before.
    `models`: the settings' models (load_models), loaded by the caller once.
    Returns one record per index: an ExperimentResult, or a pipeline.Failure
    (unreadable image, empty caption) while the others go on. Timings are the
    batch's seconds per stage divided by its size. Settings resolved for "batch"
    guard against near-duplicates (NEAR_DUPLICATE_THRESHOLD "auto").
    """
    clock = time.perf_counter()
    models = (models or load_models(settings)).load_all()
    if memory is None:
        memory = Memory.from_db(db, settings.memory == "growing")
    load = round(load_seconds + time.perf_counter() - clock, 4)
    samples = [dataset.experiment_sample(i) for i in indices]
    selection = Selection.of(settings)
    references = {s.image_id: s.captions for s in samples}   # the leak guard's, for corpora
    captioned = pipeline.caption_batch(
        models, [(s.image_id, lambda s=s: dataset.load_image(s)) for s in samples], memory,
        selection=selection, references=lambda image_id: references.get(image_id, ()))
    timings = {"load": load, **{stage: round(seconds / len(indices), 4)
                                for stage, seconds in captioned.seconds.items()}}
    if captioned.first_token is not None:
        timings["first_token"] = round(captioned.first_token, 4)  # per generate call
    shared = {"config": {**settings.to_json(), **models.describe()}, "versions": versions()}
    results: list[ExperimentResult | pipeline.Failure] = []
    for index, sample, record in zip(indices, samples, captioned.items):
        if isinstance(record, pipeline.Failure):
            results.append(replace(record, experiment_index=index))
            continue
        result = ExperimentResult(index, sample.image_id, record.caption, tuple(sample.captions),
                                  record.neighbours, record.prompt, shared["config"],
                                  shared["versions"], dict(timings), len(indices), "",
                                  context_used=record.context_used,
                                  model_prompt=record.model_prompt, domain=sample.domain,
                                  identical_excluded=record.identical_excluded)
        results.append(save(result, db, record, models.captioner.name,
                            Path(settings.results_dir)))
    return results


def save(result: ExperimentResult, db: "DbManager", record: pipeline.Captioned, vlm_model: str,
         results_dir: Path) -> ExperimentResult:
    """The databases first (memory.save_caption), then the result file, written once
    with the time the save took: results/ never shows an experiment the databases
    do not hold."""
    from atomic_files import write_json_atomic
    start = time.perf_counter()
    stamp = save_caption(db, record, vlm_model, experiment_index=result.experiment_index)
    timings = dict(result.timings)
    timings["save_to_db"] = round(time.perf_counter() - start, 4)
    timings["total"] = round(sum(v for k, v in timings.items()
                                 if k not in ("total", "first_token")), 4)
    path = result_path(results_dir, result.experiment_index, datetime.fromisoformat(stamp))
    result = replace(result, timings=timings, timestamp=stamp, result_path=str(path))
    write_json_atomic(path, result.to_json())
    return result


def check_writable(folder: Path) -> None:
    """UserError unless files can be created in `folder` (made if missing)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        raise UserError(f"cannot write to {folder}: {exc.strerror}") from None


def result_path(results_dir: Path, index: int, now: datetime) -> Path:
    """RESULTS_DIR/experiment_{index}_{timestamp}.json, never an existing file's name."""
    stamp = now.strftime("%Y%m%d_%H%M%S")
    path = results_dir / f"experiment_{index}_{stamp}.json"
    n = 1
    while path.exists():  # two runs of one index within a second keep both files
        path = results_dir / f"experiment_{index}_{stamp}_{n}.json"
        n += 1
    return path
