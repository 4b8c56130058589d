"""Caption every image of a folder, so that words find them:

    python main.py --caption-folder photos/              # neighbours' captions in the prompt
    python main.py --caption-folder photos/ --no-retrieval
    python search.py --text "a dog on a beach" --images-dir photos/

The folder gets a database of its own under DB_DIR/folders/ (the experiment
memory is only read): each image's CLIP embedding, its generated caption and
the caption's embedding, written through db_manager. Images this VLM captioned
before are skipped, so an interrupted run continues where it stopped; the
result-changing settings are kept beside the database (settings.json) and a
rerun with other values is refused. Beside it too, captions.csv lists every image
this VLM captioned (columns image_id, caption, model), rewritten after each run.
Folder images carry no experiment index: they are no experiments.
"""

from __future__ import annotations

import csv
import io
import json
import logging
from pathlib import Path
from typing import Any

import availability
import config
import pipeline
from memory import Memory, initialize, save_caption
from models import load_models

log = logging.getLogger("caption_folder")

SETTINGS_FILE = "settings.json"
CAPTIONS_FILE = "captions.csv"


def caption_folder(folder: str, settings: config.Settings, retrieval: bool = True
                   ) -> dict[str, Any]:
    """Caption every image under `folder` (BATCH_SIZE per generate call).

    With `retrieval`, each prompt holds the captions of the image's neighbours in
    the pipeline's memory (MEMORY "auto" means the training pool only); without,
    the plain PROMPT_TEMPLATE_NO_CONTEXT. Returns {"folder", "database", "images",
    "captioned", "already_captioned", "failed" (ids), "retrieval", "captions" (this
    run's, as (image id, caption) pairs in the folder's order), "csv" (the path of
    captions.csv, every caption of this VLM in the folder)}.
    """
    import numpy as np
    from tqdm.auto import tqdm

    from atomic_files import write_json_atomic, write_text_atomic
    from dataset_loader import open_image
    from db_manager import DbIdentity, DbManager, generated_caption_id
    from folder_index import folder_db_dir, scan_folder
    from retrieval import no_retrieval

    files = scan_folder(folder)  # before any model loads: a bad folder fails at once
    root = Path(folder).expanduser().resolve()
    availability.require(settings, availability.PARTS[0 if retrieval else 1:])
    models = load_models(settings)
    if retrieval:
        _, memory_db = initialize(settings)
        memory = Memory.from_db(memory_db, growing=settings.memory == "growing"
                                         ).read_only()
    else:
        memory = Memory.empty()
    prompts = models.caption_embedder.prompts  # recorded, so searches embed queries alike
    db = DbManager.open(folder_db_dir(settings.db_dir, root), DbIdentity(
        clip_model=settings.clip_model_name, caption_model=settings.caption_embedding_model,
        dataset=str(root), split=f"folder:{root}", query_prompt=prompts.query,
        document_prompt=prompts.document))
    wanted = {**settings.results(data_set=False), "retrieval": retrieval}
    manifest = db.db_dir / SETTINGS_FILE
    if manifest.exists():
        config.check_same_results(json.loads(manifest.read_text()), wanted,
                                  f"folder {root} was captioned",
                                  "use the same settings, or another --db-dir")
    image_embedder, caption_embedder, captioner = (models.image_embedder,
                                                   models.caption_embedder, models.captioner)
    if db.describe().empty:
        db.seed([], np.zeros((0, image_embedder.dim), np.float32), [],
                np.zeros((0, caption_embedder.dim), np.float32))
    write_json_atomic(manifest, wanted)
    todo = [f for f in files if not db.has_caption(generated_caption_id(f, captioner.name))]
    new: list[tuple[str, str]] = []
    failed: list[str] = []
    # the bar counts this run's images; those captioned before and those that
    # failed are shown beside it
    bar = tqdm(total=len(todo), desc="captioning", unit="img")
    counts = {"done_before": len(files) - len(todo), "failed": 0}
    bar.set_postfix(counts, refresh=False)
    for start in range(0, len(todo), settings.batch_size):
        chunk = todo[start:start + settings.batch_size]
        batch = pipeline.caption_batch(
            models, [(i, lambda i=i: open_image(root / i)) for i in chunk], memory,
            retrieve=None if retrieval else no_retrieval)
        for record in batch.items:
            if isinstance(record, pipeline.Failure):  # unreadable, empty caption: go on
                log.warning("skipping %s: %s", record.image_id, record.error)
                failed.append(record.image_id)
                counts["failed"] = len(failed)
                bar.set_postfix(counts, refresh=False)
                continue
            save_caption(db, record, captioner.name)  # no experiment index: no experiment
            new.append((record.image_id, record.caption))
        bar.update(len(chunk))
    bar.close()
    listed = {c.image_id: c.caption for c in db.entries()
              if c.id == generated_caption_id(c.image_id, captioner.name)}
    table = db.db_dir / CAPTIONS_FILE
    write_text_atomic(table, captions_csv([(i, listed[i]) for i in files if i in listed],
                                          captioner.name))
    return {"folder": str(root), "database": str(db.db_dir), "images": len(files),
            "captioned": len(new), "already_captioned": len(files) - len(todo),
            "failed": failed, "retrieval": retrieval, "captions": new, "csv": str(table)}


def captions_csv(captions: list[tuple[str, str]], model: str) -> str:
    """captions.csv: a header, then one (image_id, caption, model) row per caption."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["image_id", "caption", "model"])
    writer.writerows((image_id, caption, model) for image_id, caption in captions)
    return out.getvalue()


def format_captions(captions: list[tuple[str, str]], width: int = 100) -> str:
    """New captions for the terminal: one per line, image ids in a column."""
    if not captions:
        return ""
    column = min(max(len(i) for i, _ in captions), 40)
    return "\n".join(f"{i:<{column}}  {c if len(c) <= width else c[:width - 1] + '…'}"
                     for i, c in captions)
