"""A local web page over the pipeline: caption an image and see why, search the memory.

    python app.py                                   # http://127.0.0.1:7860
    python app.py --port 8080 --top-k-similar 3     # every setting of config.py is a flag ...
    RECAP_DB_DIR=memory/ python app.py              # ... and a RECAP_* variable, as for main.py

Tabs: Caption (upload an image or pick an experiment image: its top-k
neighbours with scores and captions, the exact prompt, the generated caption,
the reference captions, timings per stage; "save to memory" appends it to the
databases), Search by image and Search by text (search.py), and Runs (the run
directories of batch_runner.py: metrics, ablation chart, generated vs reference
captions).

The handlers (caption_tab, search_image_tab, search_text_tab, list_runs,
runs_tab) are plain functions that return plain data; build_ui() lays them out
with Gradio. They call the pipeline's caption step and search, and its model cache, so
models load once per process. Model calls are serialised by MODEL_LOCK. The
pictures go to Gradio as files of THUMBNAILS (thumbnails.py), each written once,
never as PIL images. Nothing is written to the databases unless "save to memory"
is ticked. Importing this
module loads nothing and starts nothing.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import numbers
import os
import signal
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import config
import thumbnails
from errors import UserError, cli_failure
from search import UPLOADS  # DB_DIR/uploads/: images saved to the memory from the page

if TYPE_CHECKING:
    from PIL import Image

log = logging.getLogger("app")

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7860
DEFAULT_QUEUE_SIZE = 64               # requests waiting at most; more are told to retry
MAX_UPLOAD_BYTES = 20 * 1024 * 1024   # larger uploads are refused before decoding
THUMBNAIL = 320                       # longest side of the pictures sent to the browser
RUN_PAGE = 12                         # images per page in the Runs tab
MAX_K = 50                            # the search tabs' largest k

# One model call at a time, whoever asks: the page's events, the start-up
# warm-up and direct Python callers. Each request still gets its own result,
# since the handlers keep no per-user state.
MODEL_LOCK = threading.Lock()

# Every picture the page shows goes to Gradio as a file from here, written once
# (Gradio rewrites PIL images in place per request, which tears concurrent downloads).
THUMBNAILS = thumbnails.ThumbnailCache()

Progress = Callable[[float, str], None]

# Markdown tables (metrics, neighbours): Gradio lets their text break anywhere, so a
# column squeezed by a long path beside it read "sc/or/e", "0.0/00/0". Headers and
# right-aligned numbers never wrap; text (a long path too) still wraps in its column.
PAGE_CSS = """
.prose table th, .prose table td[align="right"], .prose table td[style*="right"] {
  white-space: nowrap;
}
"""


# --- shared helpers ----------------------------------------------------------------

def _resolve(settings: config.Settings | None) -> config.Settings:
    return config.resolve("experiment") if settings is None else settings


def _step(progress: Progress | None, fraction: float, text: str) -> None:
    if progress is not None:
        progress(fraction, text)


def _system(settings: config.Settings):
    """(dataset, db) from the pipeline's cache: the first call loads the data set and
    the models and opens (on a first run, builds) the memory. Call under MODEL_LOCK."""
    from memory import initialize
    from models import load_models
    dataset, db = initialize(settings)
    load_models(settings).load_all()
    return dataset, db


@dataclass(frozen=True)
class Upload:
    """An uploaded image, checked: its file name, bytes and decoded RGB image."""

    name: str
    data: bytes
    image: "Image.Image"

    @property
    def image_id(self) -> str:
        """Its id in the memory: the same bytes always get the same id."""
        return upload_id(self.data)


def upload_id(data: bytes) -> str:
    return f"upload-{hashlib.sha1(data).hexdigest()}.png"


def read_upload(upload: "str | os.PathLike | bytes | Image.Image | None") -> Upload:
    """Check and decode an upload (a file path, bytes or a PIL image).

    UserError with a readable message for no file, an empty or too large file,
    a file that is not an image, a corrupt image, or one with too many pixels.
    """
    from PIL import Image

    from dataset_loader import open_image
    if upload is None or (isinstance(upload, str) and not upload.strip()):
        raise UserError("no image: upload one first")
    if isinstance(upload, Image.Image):
        buffer = io.BytesIO()
        upload.save(buffer, format="PNG")
        data, name = buffer.getvalue(), "image"
    elif isinstance(upload, (bytes, bytearray)):
        data, name = bytes(upload), "upload"
    else:
        path = Path(upload)
        name = path.name
        try:
            size = path.stat().st_size
            _check_size(size, name)
            data = path.read_bytes()
        except FileNotFoundError:
            raise UserError(f"the uploaded file {name} is gone; upload it again") from None
        except IsADirectoryError:
            raise UserError(f"{name} is a folder, not an image") from None
    _check_size(len(data), name)
    if not data:
        raise UserError(f"{name} is empty")
    return Upload(name, data, open_image(io.BytesIO(data), name=name))


def _check_size(size: int, name: str) -> None:
    if size > MAX_UPLOAD_BYTES:
        raise UserError(f"{name} is {size / 2**20:.1f} MB; the limit is "
                        f"{MAX_UPLOAD_BYTES / 2**20:.0f} MB: downscale it first")


def _shrunk(image: "Image.Image") -> "Image.Image":
    image = image.copy()
    image.thumbnail((THUMBNAIL, THUMBNAIL))
    return image


def _thumbnail(image: "Image.Image") -> str:
    """The file of `image` shrunk to THUMBNAIL pixels (from THUMBNAILS: made once
    per distinct picture)."""
    return THUMBNAILS.file_for(thumbnails.pixels_key(image, THUMBNAIL), lambda: _shrunk(image))


def _placeholder(text: str = "no image") -> str:
    """The file of a grey picture saying `text`."""
    def draw() -> "Image.Image":
        from PIL import Image, ImageDraw
        image = Image.new("RGB", (THUMBNAIL, THUMBNAIL * 3 // 4), (225, 225, 225))
        ImageDraw.Draw(image).text((12, THUMBNAIL * 3 // 8 - 6), text, fill=(90, 90, 90))
        return image
    return THUMBNAILS.file_for(thumbnails.source_key("placeholder", text, THUMBNAIL), draw)


def thumbnail_of(image_id: str, settings: config.Settings, dataset=None,
              load: Callable[[], "Image.Image"] | None = None, path: str | None = None) -> str:
    """The thumbnail file of an image of the memory: drawn from `load`, else from
    the data set or the uploads saved from this page (search.memory_image); a grey
    placeholder if there is none. Cached by the image's id, data set and file
    (`path`, else search.memory_path), so a cached one is neither read nor encoded."""
    import search
    try:
        if path is None and dataset is not None:
            path = search.memory_path(dataset, settings, image_id)
        key = thumbnails.source_key(settings.dataset_name, image_id, path, THUMBNAIL)
        return THUMBNAILS.file_for(key, lambda: _shrunk(
            load() if load is not None else search.memory_image(dataset, settings, image_id)))
    except Exception as exc:  # noqa: BLE001 - a picture that cannot be shown is not an error
        log.debug("cannot show %s: %s", image_id, exc)
    return _placeholder(f"{Path(image_id).name[:40]}: no image file")


def _whole_number(value: Any, what: str, low: int = 1, high: int | None = None) -> int:
    """A whole number from a form field (which may send a float or text)."""
    if isinstance(value, bool) or value is None or value == "":
        raise UserError(f"{what}: enter a whole number")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise UserError(f"{what} must be a whole number, got {value!r}") from None
    if not number.is_integer():
        raise UserError(f"{what} must be a whole number, got {value!r}")
    number = int(number)
    if number < low or (high is not None and number > high):
        bounds = f"{low} to {high}" if high is not None else f"at least {low}"
        raise UserError(f"{what} must be {bounds}, got {number}")
    return number


# --- Caption ---------------------------------------------------------------------

def caption_tab(image_or_index: "int | str | os.PathLike | bytes | Image.Image | None",
                save_to_memory: bool = False, settings: config.Settings | None = None,
                progress: Progress | None = None) -> dict[str, Any]:
    """Caption an uploaded image (a path, bytes or PIL image) or the experiment
    image at an index, through the pipeline's caption step (pipeline.caption_batch).

    Returns {"image_id", "source" ("upload" or "experiment"), "experiment_index"
    (None for an upload), "query" (a thumbnail file), "neighbours" [(thumbnail
    file, "score · caption")], "similar_images" [{"rank", "image_id", "score",
    "captions"}], "prompt",
    "caption", "references" (empty for an upload), "timings" {stage: seconds},
    "memory" ("growing" or "frozen"), "model", "saved"}.

    Retrieval excludes the query's own id only: an experiment image, or an upload
    saved to memory earlier. With `save_to_memory` the image's embedding and
    caption are appended through db_manager (uploads as "upload-<sha1>.png" with
    experiment_index -1, their image kept in DB_DIR/uploads/); without it nothing
    is written. A bad upload or index raises UserError before anything loads.
    """
    import pipeline
    from memory import Memory, save_caption
    from models import experiment_count, load_models

    settings = _resolve(settings)
    upload: Upload | None = None
    index: int | None = None
    if isinstance(image_or_index, numbers.Number) and not isinstance(image_or_index, bool):
        index = _whole_number(image_or_index, "experiment image index", 0,
                              experiment_count(settings) - 1)
    else:
        upload = read_upload(image_or_index)
    start = time.perf_counter()
    _step(progress, 0.0, "waiting for the model")
    with MODEL_LOCK:
        _step(progress, 0.05, "loading models and memory")
        dataset, db = _system(settings)
        models = load_models(settings).load_all()
        timings = {"load": round(time.perf_counter() - start, 4)}
        if upload is None:
            sample = dataset.experiment_sample(index)
            image_id, references = sample.image_id, list(sample.captions)
            image = dataset.load_image(sample)
        else:
            image_id, references, image = upload.image_id, [], upload.image
        growing = settings.memory == "growing"
        _step(progress, 0.15, f"captioning with {Path(models.captioner.name).name}")
        batch = pipeline.caption_batch(models, [(image_id, image)],
                                       Memory.from_db(db, growing),
                                       embed_captions=bool(save_to_memory))
        [record] = batch.items
        if isinstance(record, pipeline.Failure):
            record.raise_it()
        timings.update(batch.seconds)
        if save_to_memory:
            _step(progress, 0.85, "saving to memory")
            clock = time.perf_counter()
            if upload is not None:
                _keep_upload(settings, upload)
            save_caption(db, record, models.captioner.name, experiment_index=index)
            timings["save_to_db"] = round(time.perf_counter() - clock, 4)
        _step(progress, 0.95, "loading the neighbours' pictures")
        gallery = [(thumbnail_of(n.image_id, settings, dataset) if n.image_id else
                    _placeholder(f"{Path(n.label).name[:40]}: a corpus caption"),
                    f"{n.score:.3f} · {n.captions[0] if n.captions else '(no caption)'}")
                   for n in record.neighbours]
    timings["total"] = round(time.perf_counter() - start, 4)
    return {"image_id": image_id, "source": "upload" if upload is not None else "experiment",
            "experiment_index": index, "query": _thumbnail(image), "neighbours": gallery,
            "similar_images": [n.to_json() for n in record.neighbours],
            "prompt": record.prompt, "context_used": record.context_used,
            "caption": record.caption, "references": references,
            "timings": timings, "memory": "growing" if growing else "frozen",
            "model": models.captioner.name, "saved": bool(save_to_memory)}


def _keep_upload(settings: config.Settings, upload: Upload) -> None:
    """Keep a saved upload's picture beside the databases, so that later
    neighbours and search results can show it."""
    folder = Path(settings.db_dir) / UPLOADS
    path = folder / upload.image_id
    if path.exists():
        return
    from atomic_files import atomic_writer
    with atomic_writer(path) as f:
        upload.image.save(f, format="PNG")


# --- Search ----------------------------------------------------------------------

def search_image_tab(upload: "str | os.PathLike | bytes | Image.Image | None", k: int = 5,
                     settings: config.Settings | None = None,
                     progress: Progress | None = None) -> dict[str, Any]:
    """Images of the memory most similar to an uploaded image (search.search_images).

    Returns {"query" (a thumbnail file), "hits" [(thumbnail file, "#rank · score
    · image")], "rows" [[rank, score, image_id]], "source", "model", "indexed", "notes"}.
    """
    import search
    settings = _resolve(settings)
    k = _whole_number(k, "k", 1, MAX_K)
    checked = read_upload(upload)
    _step(progress, 0.0, "waiting for the model")
    with tempfile.TemporaryDirectory(prefix="recap-query-") as tmp:
        if isinstance(upload, (str, os.PathLike)):
            path = str(upload)
        else:
            path = str(Path(tmp) / "query.png")
            checked.image.save(path)
        with MODEL_LOCK:
            _step(progress, 0.2, "searching the image database")
            result = search.search_images(path, k, settings=settings)
            hits = [(thumbnail_of(h.image_id, settings, load=lambda h=h: result.load_image(h),
                               path=h.path),
                     f"#{h.rank} · {h.score:.3f} · {Path(h.image_id).name}")
                    for h in result.hits]
    return {"query": _thumbnail(checked.image), "hits": hits,
            "rows": [[h.rank, round(h.score, 4), h.image_id] for h in result.hits],
            "source": result.source, "model": result.model, "indexed": result.indexed,
            "notes": result.notes}


def search_text_tab(query: str | None, k: int = 5, settings: config.Settings | None = None,
                    progress: Progress | None = None, by: str | None = "auto"
                    ) -> dict[str, Any]:
    """Images that match the words `query` (search.search_text; `by`: auto, captions,
    clip or both, as search.py --text-by), each with the ranking that found it, the
    matching caption and whether a person or a VLM wrote it.

    Returns {"hits" [(thumbnail file, "#rank · score · found by · who: caption")], "rows" [[rank,
    score, image_id, who, caption, found by]], "source", "model", "indexed", "by",
    "notes"}.
    """
    import search
    settings = _resolve(settings)
    k = _whole_number(k, "k", 1, MAX_K)
    if not query or not query.strip():
        raise UserError("type a few words to search for")
    _step(progress, 0.0, "waiting for the model")
    with MODEL_LOCK:
        _step(progress, 0.2, "searching")
        result = search.search_text(query.strip(), k, by=by or "auto", settings=settings)
        hits, rows = [], []
        for h in result.hits:
            who = (None if h.caption is None else "human" if h.caption_source == "human" else
                   f"generated by {Path(h.caption_model or 'a VLM').name}")
            label = f"#{h.rank} · {h.score:.3f} · {h.found_by}" + (
                f" · {who}: {h.caption}" if who else "")
            hits.append((thumbnail_of(h.image_id, settings, load=lambda h=h: result.load_image(h),
                                   path=h.path),
                         label))
            rows.append([h.rank, round(h.score, 4), h.image_id, who or "", h.caption or "",
                         h.found_by])
    return {"hits": hits, "rows": rows, "source": result.source, "model": result.model,
            "indexed": result.indexed, "by": result.by, "notes": result.notes}


# --- Runs ------------------------------------------------------------------------

RUN_METRICS = ("BLEU-4", "CIDEr-D", "CLIPScore", "RefCLIPScore")   # per image, in the table
RUN_COLUMNS = ["#", "image", "status", "generated caption", "reference captions",
               *RUN_METRICS]


def list_runs(settings: config.Settings | None = None) -> list[str]:
    """Names of the run directories under RESULTS_DIR/runs, newest first."""
    settings = _resolve(settings)
    root = Path(settings.results_dir) / "runs"
    if not root.is_dir():
        return []
    runs = [d for d in root.iterdir() if d.is_dir() and (d / "manifest.json").exists()]
    return [d.name for d in sorted(runs, key=lambda d: (-d.stat().st_mtime, d.name))]


def runs_tab(run_dir: str | os.PathLike | None, settings: config.Settings | None = None,
             page: int = 1, per_page: int = RUN_PAGE) -> dict[str, Any]:
    """A run directory (a name under RESULTS_DIR/runs, or a path) for the page.

    Returns {"run", "path", "header" (markdown), "metrics" (markdown, from
    metrics.format_report), "ablation" (a file or None), "ablation_table" (markdown or
    None) and "ablation_note" (markdown or None): see run_ablation; "columns", "rows"
    (one per experiment: generated vs reference captions), "gallery" [(thumbnail file,
    "#index generated … / reference …")] for `page`, "page", "pages"}.
    """
    import metrics

    settings = _resolve(settings)
    if not run_dir:
        raise UserError("choose a run (make one with `python main.py --all` or --indices)")
    named = Path(settings.results_dir) / "runs" / str(run_dir)
    path = named if named.is_dir() else Path(run_dir)
    summary_file = path / "summary.json"
    if not summary_file.exists():
        if (path / "manifest.json").exists():
            raise UserError(f"run {path.name} has no summary yet: finish it, or run "
                            f"`python main.py --evaluate {path}`")
        raise UserError(f"{run_dir} is not a run directory (no manifest.json)")
    try:
        summary = json.loads(summary_file.read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"{summary_file} is unreadable: {exc}") from None
    items = summary.get("items", [])
    run_settings = summary.get("settings", {})
    per_caption = summary.get("seconds_per_caption")
    header = (f"**{summary.get('run', path.name)}**: {summary.get('finished', 0)} finished, "
              f"{summary.get('failed', 0)} failed"
              + (f", {per_caption:.2f} s per caption" if per_caption else "")
              + f" · VLM `{_model_label(run_settings.get('vlm_model_name', '?'))}`, "
                f"k={run_settings.get('top_k_similar', '?')}, "
                f"memory {run_settings.get('memory', '?')} · `{path}`")
    ablation = run_ablation(path, settings, items, run_settings.get("vlm_model_name"))
    rows = []
    for item in items:
        scores = item.get("metrics") or {}
        rows.append([item.get("experiment_index"), item.get("image_id"), item.get("status"),
                     item.get("generated_caption") or f"(failed: {item.get('error', '?')})",
                     " | ".join(item.get("original_captions", [])),
                     *(round(scores[m], 4) if isinstance(scores.get(m), (int, float)) else ""
                       for m in RUN_METRICS)])
    pages = max(1, math.ceil(len(items) / per_page))
    page = min(max(1, _whole_number(page, "page")), pages)
    shown = items[(page - 1) * per_page:page * per_page]
    dataset = None
    if shown:
        from models import load_dataset
        try:
            with MODEL_LOCK:
                dataset = load_dataset(settings)
        except UserError as exc:  # the pictures are optional; the captions are not
            log.warning("cannot load the data set for the run's pictures: %s", exc)
    gallery = []
    for item in shown:
        references = item.get("original_captions") or ["?"]
        text = (f"#{item.get('experiment_index')} generated: "
                f"{item.get('generated_caption') or '(failed)'} / reference: {references[0]}")
        gallery.append((thumbnail_of(item.get("image_id", "?"), settings, dataset), text))
    return {"run": summary.get("run", path.name), "path": str(path), "header": header,
            "metrics": metrics.format_report(summary.get("metrics") or {}),
            **ablation, "columns": RUN_COLUMNS, "rows": rows, "gallery": gallery,
            "page": page, "pages": pages}


def run_ablation(run_path: Path, settings: config.Settings, items: list[dict[str, Any]],
                 vlm: str | None) -> dict[str, Any]:
    """The ablation chart of a run, if there is one: `python -m bench.ablation` output
    (ablation.png, .md, .json) in the run's folder or in RESULTS_DIR whose ablation.json
    lists exactly the run's images and VLM, never another run's. Returns {"ablation"
    (the chart, a file or None), "ablation_table" (markdown or None), "ablation_note"
    (markdown: the chart's heading, or why an ablation found is not this run's, or
    None when there is none)}."""
    from PIL import Image

    from batch_runner import indices_spec
    image_ids = {item.get("image_id") for item in items}
    indices = sorted(i for i in (item.get("experiment_index") for item in items)
                     if isinstance(i, int))
    found = {"ablation": None, "ablation_table": None, "ablation_note": None}
    for folder in dict.fromkeys([run_path, Path(settings.results_dir)]):
        png, report = folder / "ablation.png", None
        if not png.is_file():
            continue
        try:
            report = json.loads((folder / "ablation.json").read_text())
        except (OSError, ValueError):
            pass
        ids = (report or {}).get("image_ids")
        its_vlm = ((report or {}).get("models") or {}).get("vlm")
        if ids is not None and set(ids) == image_ids and its_vlm == vlm:
            def chart() -> "Image.Image":
                with Image.open(png) as opened:
                    return opened.convert("RGB")
            try:  # a copy in THUMBNAILS: bench.ablation may rewrite the file while shown
                found["ablation"] = THUMBNAILS.file_for(
                    thumbnails.source_key("ablation", str(png)), chart)
            except OSError as exc:
                log.warning("cannot show %s: %s", png, exc)
                continue
            try:
                table = folder / "ablation.md"
                found["ablation_table"] = table.read_text() if table.exists() else None
            except (OSError, UnicodeDecodeError) as exc:
                log.warning("cannot show %s: %s", table, exc)
            found["ablation_note"] = (
                f"**Ablations over this run's {len(image_ids)} images** "
                + ("" if report.get("complete") else "(in progress) ")
                + f"· `{png}`")
            return found
        if found["ablation_note"] is None:
            what = ("images it does not list (no readable ablation.json)" if ids is None else
                    f"{len(ids)} images ({report.get('indices_requested', '?')})"
                    + (f" with VLM `{_model_label(str(its_vlm))}`" if its_vlm != vlm else ""))
            found["ablation_note"] = (
                f"`{png}` is an ablation over {what}, not this run's {len(image_ids)} "
                f"images: `python -m bench.ablation --indices {indices_spec(indices)} "
                f"--out-dir {run_path}` charts this run's.")
    return found


# --- the page --------------------------------------------------------------------

def error_text(exc: BaseException) -> str:
    """What the page says about a failure: the message of a UserError, else a
    short description; the traceback goes to the server log, never to the page."""
    if isinstance(exc, UserError):
        return f"**Error:** {exc}"
    log.error("unexpected error in a page request", exc_info=exc)
    first = (str(exc).strip().splitlines() or [""])[0][:300]
    return (f"**Error:** unexpected {type(exc).__name__}"
            + (f": {first}" if first else "") + " (details in the server's log)")


def _model_label(name: str) -> str:
    """A hub id as it is; a local model folder by its last part."""
    from errors import looks_like_path
    return Path(name.rstrip("/")).name if looks_like_path(name) else name


def _markdown_list(lines: list[str], empty: str) -> str:
    return "\n".join(f"- {line}" for line in lines) if lines else empty


def _timings_text(timings: dict[str, float]) -> str:
    """One row: seconds per stage."""
    return ("**Seconds per stage**\n\n| " + " | ".join(s.replace("_", " ") for s in timings)
            + " |\n|" + "---:|" * len(timings) + "\n| "
            + " | ".join(f"{seconds:.3f}" for seconds in timings.values()) + " |")


def _neighbours_text(similar: list[dict[str, Any]], per_neighbour: int) -> str:
    """The neighbours as a table: rank, score, image, the captions the prompt took."""
    if not similar:
        return "**Neighbours**: none (TOP_K_SIMILAR is 0): the prompt has no captions"
    if any("source" in n for n in similar):     # RETRIEVE "captions": one caption each
        rows = [f"| {n['rank']} | {n['score']:.3f} | `{n['image_id'] or n['source']}` | "
                + n["captions"][0].replace("|", "/") + " |" for n in similar]
        return ("**Retrieved captions** (CLIP image-text cosine)\n\n| # | score | from "
                "(memory image, or corpus file:line) | caption |\n|---:|---:|---|---|\n"
                + "\n".join(rows))
    rows = [f"| {n['rank']} | {n['score']:.3f} | `{n['image_id']}` | "
            + " / ".join(c.replace("|", "/") for c in n["captions"][:per_neighbour]) + " |"
            for n in similar]
    return ("**Neighbours**\n\n| # | score | image | captions (first "
            f"{per_neighbour}) |\n|---:|---:|---|---|\n" + "\n".join(rows))


def build_ui(settings: config.Settings | None = None):
    """The Gradio page (gr.Blocks) over the handlers, for `settings`."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    import gradio as gr

    settings = _resolve(settings)
    k = settings.top_k_similar
    from models import experiment_count
    last_index = experiment_count(settings) - 1

    def progress_of(progress) -> Progress:
        return lambda fraction, text: progress(fraction, desc=text)

    caption_outputs_count = 7

    def on_caption(source, save, progress):
        try:
            r = caption_tab(source, bool(save), settings, progress_of(progress))
        except Exception as exc:  # noqa: BLE001 - shown in the page
            return (error_text(exc),) + (None,) * (caption_outputs_count - 1)
        where = (f"experiment image {r['experiment_index']}" if r["source"] == "experiment"
                 else "the uploaded image")
        status = (f"Captioned {where} (`{r['image_id']}`) in {r['timings']['total']:.2f} s "
                  f"with `{_model_label(r['model'])}`, {r['memory']} memory · "
                  + ("**saved to memory**" if r["saved"] else "not saved"))
        references = ("**Reference captions**\n\n" + _markdown_list(
            r["references"], "none: an uploaded image has no reference captions") + "\n\n"
            + _neighbours_text(r["similar_images"], settings.captions_per_neighbour))
        return (status, r["query"], r["caption"], r["neighbours"], references, r["prompt"],
                _timings_text(r["timings"]))

    def on_caption_upload(upload, save, progress=gr.Progress()):
        return on_caption(upload, save, progress)

    def on_caption_index(index, save, progress=gr.Progress()):
        if index is None:
            return (error_text(UserError("enter an experiment image index")),) + (None,) * (
                caption_outputs_count - 1)
        return on_caption(float(index), save, progress)

    def on_search_image(upload, top, progress=gr.Progress()):
        try:
            r = search_image_tab(upload, top, settings, progress_of(progress))
        except Exception as exc:  # noqa: BLE001
            return error_text(exc), None, None, None
        notes = "".join(f"\n\n**Note:** {note}" for note in r["notes"])
        return (f"{len(r['hits'])} of {r['indexed']} images in {r['source']} "
                f"(`{_model_label(r['model'])}`){notes}"), r["query"], r["hits"], r["rows"]

    # track_tqdm: the first text search after a first run embeds the memory's
    # captions (minutes on a CPU); its progress bar shows on the page
    def on_search_text(query, top, by, progress=gr.Progress(track_tqdm=True)):
        try:
            r = search_text_tab(query, top, settings, progress_of(progress), by=by)
        except Exception as exc:  # noqa: BLE001
            return error_text(exc), None, None
        notes = "".join(f"\n\n**Note:** {note}" for note in r["notes"])
        return (f"{len(r['hits'])} of {r['indexed']} images, by {r['by']}, in {r['source']} "
                f"(`{_model_label(r['model'])}`){notes}"), r["hits"], r["rows"]

    def on_run(run, page):
        try:
            r = runs_tab(run, settings, page or 1)
        except Exception as exc:  # noqa: BLE001
            return (error_text(exc), None, gr.Markdown(visible=False),
                    gr.Image(value=None, visible=False), gr.Markdown(visible=False), None,
                    None, gr.Number(value=1))
        return (r["header"], r["metrics"],
                gr.Markdown(value=r["ablation_note"], visible=r["ablation_note"] is not None),
                gr.Image(value=r["ablation"], visible=r["ablation"] is not None),
                gr.Markdown(value=r["ablation_table"], visible=r["ablation_table"] is not None),
                r["rows"], r["gallery"],
                gr.Number(value=r["page"], maximum=r["pages"],
                          label=f"page (of {r['pages']})"))

    def refresh_runs(current):
        runs = list_runs(settings)
        return gr.Dropdown(choices=runs, value=current if current in runs else
                           (runs[0] if runs else None))

    def first_run():
        """On page load: the list of runs, and the newest one shown."""
        runs = list_runs(settings)
        if not runs:
            empty = (f"No runs yet in `{Path(settings.results_dir) / 'runs'}`: make one with "
                     "`python main.py --all` or `python main.py --indices 0-49`.")
            return (gr.Dropdown(choices=[], value=None), empty, None,
                    gr.Markdown(visible=False), gr.Image(value=None, visible=False),
                    gr.Markdown(visible=False), None, None, gr.Number(value=1))
        return (gr.Dropdown(choices=runs, value=runs[0]), *on_run(runs[0], 1))

    models = dict(concurrency_id="models", concurrency_limit=1)
    # delete_cache: uploads and pictures older than a day go, checked hourly
    with gr.Blocks(title="Retrieval-augmented captioning", analytics_enabled=False,
                   delete_cache=(3600, 86400)) as page:
        gr.Markdown("## Retrieval-augmented captioning\n"
                    f"`{_model_label(settings.clip_model_name)}` finds similar images in the "
                    "memory, their captions go into the prompt, "
                    f"`{_model_label(settings.vlm_model_name)}` writes the caption. Memory: "
                    f"`{settings.db_dir}`, runs: `{Path(settings.results_dir) / 'runs'}`.")
        with gr.Tab("Caption", id="caption"):
            with gr.Row():
                with gr.Column(scale=1, min_width=280):
                    upload = gr.File(label="Upload an image", file_types=["image"],
                                     type="filepath", elem_id="caption-upload")
                    go_upload = gr.Button("Caption the upload", variant="primary",
                                          elem_id="caption-upload-button")
                    index = gr.Number(label=f"… or an experiment image (0–{last_index})",
                                      value=settings.experiment_image_index, precision=0,
                                      minimum=0, maximum=last_index, elem_id="caption-index")
                    go_index = gr.Button("Caption the experiment image",
                                         elem_id="caption-index-button")
                    save = gr.Checkbox(label="save to memory (appends the image and its caption "
                                             "to the databases)", value=False,
                                       elem_id="caption-save")
                    query = gr.Image(label="Query", interactive=False, height=220,
                                     elem_id="caption-query")
                with gr.Column(scale=3):
                    status = gr.Markdown("Upload an image or choose an experiment image.",
                                         elem_id="caption-status")
                    caption = gr.Textbox(label="Generated caption", interactive=False,
                                         elem_id="caption-output")
                    neighbours = gr.Gallery(label=f"Top-{k} neighbours (score · caption)",
                                            columns=5, height=240, object_fit="contain",
                                            fit_columns=False, elem_id="caption-neighbours")
                    references = gr.Markdown(elem_id="caption-references")
                    prompt = gr.Textbox(label="Prompt given to the VLM", lines=6,
                                        interactive=False, elem_id="caption-prompt")
                    timings = gr.Markdown(elem_id="caption-timings")
            outputs = [status, query, caption, neighbours, references, prompt, timings]
            go_upload.click(on_caption_upload, [upload, save], outputs, **models)
            go_index.click(on_caption_index, [index, save], outputs, **models)

        with gr.Tab("Search by image", id="search-image"):
            with gr.Row():
                with gr.Column(scale=1, min_width=280):
                    image_query = gr.File(label="Upload an image", file_types=["image"],
                                          type="filepath", elem_id="search-image-upload")
                    image_k = gr.Slider(1, MAX_K, value=5, step=1, label="results",
                                        elem_id="search-image-k")
                    go_image = gr.Button("Search", variant="primary",
                                         elem_id="search-image-button")
                    image_shown = gr.Image(label="Query", interactive=False, height=220,
                                           elem_id="search-image-query")
                with gr.Column(scale=3):
                    image_status = gr.Markdown("Images of the memory, most similar first "
                                               "(cosine similarity of CLIP embeddings).",
                                               elem_id="search-image-status")
                    image_hits = gr.Gallery(label="Results (rank · score · image)", columns=5,
                                            height=300, object_fit="contain", fit_columns=False,
                                            elem_id="search-image-results")
                    image_rows = gr.Dataframe(headers=["rank", "score", "image"],
                                              interactive=False, elem_id="search-image-table")
            go_image.click(on_search_image, [image_query, image_k],
                           [image_status, image_shown, image_hits, image_rows], **models)

        with gr.Tab("Search by text", id="search-text"):
            with gr.Row():
                text_query = gr.Textbox(label="Words", placeholder="a dog running through water",
                                        scale=4, elem_id="search-text-query")
                text_k = gr.Slider(1, MAX_K, value=5, step=1, label="results", scale=1,
                                   elem_id="search-text-k")
                go_text = gr.Button("Search", variant="primary", scale=1,
                                    elem_id="search-text-button")
            text_by = gr.Radio(["auto", "captions", "clip", "both"], value="auto",
                               label="rank by", elem_id="search-text-by",
                               info="captions: the best caption per image; clip: CLIP's text "
                                    "embedding against the images, no captions needed; both: "
                                    "the two rankings fused; auto: captions where there are any")
            text_status = gr.Markdown("Images that match the words, in any language the models "
                                      "know; each says which ranking found it and whether a "
                                      "person or the VLM wrote its caption.",
                                      elem_id="search-text-status")
            text_hits = gr.Gallery(label="Results (rank · score · found by · who: caption)",
                                   columns=5, height=300, object_fit="contain",
                                   fit_columns=False, elem_id="search-text-results")
            # fixed widths for the short columns: numbers and names never wrap, the
            # caption takes the rest and wraps between words
            text_rows = gr.Dataframe(headers=["rank", "score", "image", "caption by", "caption",
                                              "found by"],
                                     interactive=False, wrap=True, elem_id="search-text-table",
                                     column_widths=["64px", "80px", "220px", "110px", "46%",
                                                    "140px"])
            for trigger in (go_text.click, text_query.submit):
                trigger(on_search_text, [text_query, text_k, text_by],
                        [text_status, text_hits, text_rows], **models)

        with gr.Tab("Runs", id="runs"):
            with gr.Row():
                run = gr.Dropdown(choices=list_runs(settings), label="Run (RESULTS_DIR/runs)",
                                  scale=3, elem_id="runs-choice")
                refresh = gr.Button("Refresh list", scale=1)
                run_page = gr.Number(value=1, precision=0, minimum=1, label="page", scale=1,
                                     elem_id="runs-page")
            run_header = gr.Markdown("Choose a run made with `python main.py --all` "
                                     "or `--indices`.", elem_id="runs-header")
            with gr.Row():
                run_metrics = gr.Markdown(elem_id="runs-metrics", scale=3)
                with gr.Column(scale=2):
                    # the chart's heading above it, not a label laid over its title
                    ablation_note = gr.Markdown(visible=False, elem_id="runs-ablation-note")
                    ablation = gr.Image(show_label=False, interactive=False, visible=False,
                                        elem_id="runs-ablation")
            ablation_table = gr.Markdown(visible=False, elem_id="runs-ablation-table")
            run_gallery = gr.Gallery(label="Generated vs reference captions", columns=6,
                                     height=320, object_fit="contain", fit_columns=False,
                                     elem_id="runs-gallery")
            run_rows = gr.Dataframe(headers=RUN_COLUMNS, interactive=False, wrap=True,
                                    max_height=480, elem_id="runs-table",
                                    # a metric column as wide as its header
                                    column_widths=["48px", "220px", "72px", "17%", "21%",
                                                   *(f"{round(8.5 * len(m) + 30)}px"
                                                     for m in RUN_METRICS)])
            run_outputs = [run_header, run_metrics, ablation_note, ablation, ablation_table,
                           run_rows, run_gallery, run_page]
            run.input(lambda name: on_run(name, 1), run, run_outputs)
            for trigger in (run_page.submit, run_page.input):
                trigger(on_run, [run, run_page], run_outputs)
            refresh.click(refresh_runs, run, run)
        page.load(first_run, None, [run, *run_outputs])
    return page


def _theme():
    import gradio as gr
    # System fonts: the default theme would fetch web fonts, and the page works offline.
    return gr.themes.Default(font=["ui-sans-serif", "system-ui", "Helvetica", "Arial",
                                   "sans-serif"],
                             font_mono=["ui-monospace", "DejaVu Sans Mono", "monospace"])


def _warm_up(settings: config.Settings) -> None:
    """Load the data set, the models and the memory before the first request."""
    try:
        with MODEL_LOCK:
            _system(settings)
        log.info("models and memory loaded")
    except Exception as exc:  # noqa: BLE001 - the page shows it again on first use
        log.error("loading failed (the page will show this on first use): %s", exc)


def _stop(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def serve(settings: config.Settings, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT,
          preload: bool = True, queue_size: int = DEFAULT_QUEUE_SIZE) -> None:
    """Build the page and serve it until interrupted; no network use beyond `host`.

    Requests wait in Gradio's queue, at most `queue_size` of them (a visitor
    beyond that is told the queue is full); model calls leave it one at a time."""
    for name, value in (("GRADIO_ANALYTICS_ENABLED", "False"), ("HF_HUB_DISABLE_TELEMETRY", "1"),
                        ("GRADIO_SHARE", "False")):
        os.environ[name] = value
    page = build_ui(settings)
    if preload:
        threading.Thread(target=_warm_up, args=(settings,), name="warm-up", daemon=True).start()
    logging.getLogger("httpx").setLevel(logging.WARNING)  # Gradio's own requests to itself
    # One at a time per event, and one model call at a time across events
    # (concurrency_id "models"): the models are shared and MODEL_LOCK serialises them anyway.
    page.queue(default_concurrency_limit=1, max_size=queue_size)
    try:
        page.launch(server_name=host, server_port=port, share=False, inbrowser=False,
                    show_error=False, ssr_mode=False, max_file_size=MAX_UPLOAD_BYTES,
                    theme=_theme(), css=PAGE_CSS, footer_links=[], mcp_server=False, pwa=False, quiet=True,
                    prevent_thread_lock=True)
    except OSError:
        raise UserError(f"cannot listen on {host}:{port} (in use, or not an address of this "
                        "machine): choose another --port or --host") from None
    if threading.current_thread() is threading.main_thread():
        # SIGTERM (systemd, docker stop) ends the server as Ctrl-C does, so that
        # exit handlers run (the picture cache's folder is removed).
        signal.signal(signal.SIGTERM, _stop)
    shown = "127.0.0.1" if host in ("0.0.0.0", "") else host
    print(f"app.py: serving http://{shown}:{port}/ (Ctrl-C to stop)", flush=True)
    page.block_thread()


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit code."""
    parser = config.make_parser("app.py", __doc__.split("\n\n")[0] + "\n\n"
                                + __doc__.split("\n\n")[1] + "\n\nEvery setting of config.py "
                                "is a flag below (same as main.py).")
    web = parser.add_argument_group("web server")
    web.add_argument("--host", default=DEFAULT_HOST,
                     help=f"address to listen on (default {DEFAULT_HOST}: this machine only; "
                          "the page has no login, so think twice before 0.0.0.0)")
    web.add_argument("--port", default=str(DEFAULT_PORT), metavar="N",
                     help=f"port (default {DEFAULT_PORT})")
    web.add_argument("--queue-size", default=str(DEFAULT_QUEUE_SIZE), metavar="N",
                     help=f"requests that may wait for the models (default {DEFAULT_QUEUE_SIZE}); "
                          "beyond that a visitor is told the queue is full and to try again")
    web.add_argument("--lazy", action="store_true",
                     help="load models and memory on the first request, not at start")
    try:
        args, settings = config.parse_cli(parser, argv)
        port = _whole_number(args.port, "--port", 1, 65535)
        queue_size = _whole_number(args.queue_size, "--queue-size", 1)
    except UserError as exc:
        return cli_failure("app.py", exc, code=2)
    config.configure_logging(settings)
    try:
        serve(settings, args.host, port,
              preload=not args.lazy, queue_size=queue_size)
    except (UserError, OSError, KeyboardInterrupt) as exc:  # e.g. the port is taken
        return cli_failure("app.py", exc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
