"""Search the memory by image or by words, with a picture of the results.

    python search.py --query photo.jpg --topk 3                    # the pipeline's image database
    python search.py --query photo.jpg --images-dir my_photos/     # any folder (cached, incremental)
    python search.py --query photo.jpg --backbone dinov2           # clip (default), siglip, resnet50, dinov2
    python search.py --text "a dog running through water"         # caption database, best caption per image
    python search.py --text "a red car" --images-dir my_photos/    # a folder captioned with
                                                                   #   python main.py --caption-folder my_photos/

Prints a ranked table (or --json) and writes a figure: the query on the left,
the results to its right, each titled with its score.
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Callable

import config
from errors import UserError, cli_failure

log = logging.getLogger("search")


@dataclass
class Hit:
    rank: int
    image_id: str
    score: float
    path: str | None = None             # the image file, when it has one
    caption: str | None = None          # text search: the caption that matched
    caption_source: str | None = None   # "human" or "generated"
    caption_model: str | None = None    # the VLM of a generated caption


@dataclass
class SearchResult:
    mode: str                  # "image" or "text"
    query: str                 # the query file or text
    source: str                # what was searched
    model: str                 # the embedding model
    hits: list[Hit]
    indexed: int               # how many images (or captions) were searched
    index_update: str = ""     # folder searches: what the incremental update did
    figure: str | None = None
    _load: Callable[[Hit], Any] | None = field(default=None, repr=False)

    def as_json(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("_load")
        return data

    def load_image(self, hit: Hit):
        """The PIL image of a hit (for figures and pages)."""
        return self._load(hit)


def _check_k(k: int) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise UserError(f"--topk must be a positive integer, got {k!r}")


def _check_k_fits(k: int, available: int, what: str) -> None:
    if k > available:
        raise UserError(f"--topk {k} is more than the {available} {what} searched; "
                        f"choose 1 to {available}")


def search_images(query: str, k: int = 5, *, images_dir: str | None = None,
                  backbone: str = "clip", index: str = "numpy",
                  settings: config.Settings | None = None, **overrides: Any) -> SearchResult:
    """Images most similar to the image file `query`, from `images_dir` or the
    pipeline's image database (whose CLIP model and data set are used unless
    others are given). `settings` (default config.resolve()) with `overrides` on top."""
    from dataset_loader import open_image
    from folder_index import index_path, scan_folder, update_index
    from similarity_search import SearchIndex

    _check_k(k)
    settings = config.settings_of(settings, overrides)
    query_image = open_image(query)
    if images_dir is not None:
        files = scan_folder(images_dir)  # before loading a model: a bad folder fails fast
        root = Path(images_dir).expanduser().resolve()
        embedder = _image_embedder(settings, backbone)
        ids, vectors, update = update_index(
            index_path(settings.db_dir, "folder", str(root), embedder.key), embedder, files,
            lambda image_id: open_image(root / image_id))
        if not ids:
            raise UserError(f"none of the images in {images_dir} could be read")
        source, note = str(root), str(update)
        path_of = lambda image_id: str(root / image_id)  # noqa: E731
        load = lambda hit: open_image(hit.path)  # noqa: E731
    else:
        db, dataset, settings = open_memory(settings)
        embedder = _image_embedder(settings, backbone)
        if embedder.name == db.state.clip_model:
            ids, vectors, note = db.image_ids, db.image_vectors, ""
        else:  # another backbone: embed the database's images with it, cached
            known = {i: "dataset" for i in db.image_ids if dataset.get(i) is not None}
            ids, vectors, update = update_index(
                index_path(settings.db_dir, "db", dataset.fingerprint, embedder.key), embedder,
                known, lambda image_id: dataset.load_image(dataset.get(image_id)))
            note = str(update)
        source = f"image database {Path(settings.db_dir).resolve()}"
        path_of = lambda image_id: memory_path(dataset, settings, image_id)  # noqa: E731
        load = lambda hit: memory_image(dataset, settings, hit.image_id)  # noqa: E731
    _check_k_fits(k, len(ids), "images")
    search_index = SearchIndex.from_vectors(ids, vectors, backend=index)
    found = search_index.search(embedder.embed([query_image]), k)[0]
    hits = [Hit(n.rank, n.image_id, round(n.score, 6), path=path_of(n.image_id)) for n in found]
    return SearchResult("image", str(query), source, embedder.name, hits, len(ids), note,
                        _load=load)


def _image_embedder(settings: config.Settings, backbone: str):
    """The pipeline's CLIP embedder, or another backbone's (loaded once per process)."""
    import pipeline
    from image_embedder import ImageEmbedder, backbone_model_name
    model_name = backbone_model_name(backbone, settings.clip_model_name)
    if model_name == settings.clip_model_name:
        return pipeline.load_models(settings).image_embedder
    device, dtype = pipeline.device_of(settings)
    key = (model_name, str(device), str(dtype), settings.batch_size)
    return pipeline.cached("search_embedder", key, lambda: ImageEmbedder(
        model_name, device=device, dtype=dtype, batch_size=settings.batch_size,
        what="image model", setting="--backbone"))


def search_text(text: str, k: int = 5, *, images_dir: str | None = None,
                settings: config.Settings | None = None, **overrides: Any) -> SearchResult:
    """Images whose captions best match `text` (best caption per image), from the
    caption database or a folder captioned with `main.py --caption-folder`; the
    query is embedded with the caption model the database records."""
    import numpy as np

    import pipeline
    from dataset_loader import open_image
    from db_manager import DbManager
    from folder_index import folder_db_dir

    _check_k(k)
    if not text.strip():
        raise UserError("--text is empty")
    settings = config.settings_of(settings, overrides)
    if images_dir is not None:
        root = Path(images_dir).expanduser().resolve()
        if not root.is_dir():
            raise UserError(f"image folder not found: {images_dir}")
        db = DbManager.open(folder_db_dir(settings.db_dir, root))
        if db.needs_seed or not db.captions:
            raise UserError(f"{images_dir} has no captions yet: run "
                            f"`python main.py --caption-folder {images_dir}` first")
        settings = pipeline.for_database(settings, db)
        source = f"captions of {root}"
        path_of = lambda image_id: str(root / image_id)  # noqa: E731
        load = lambda hit: open_image(hit.path)  # noqa: E731
    else:
        db, dataset, settings = open_memory(settings)
        source = f"caption database {Path(settings.db_dir).resolve()}"
        path_of = lambda image_id: memory_path(dataset, settings, image_id)  # noqa: E731
        load = lambda hit: memory_image(dataset, settings, hit.image_id)  # noqa: E731
    embedder = pipeline.load_models(settings).caption_embedder  # the pipeline's, loaded once
    query = embedder.embed_queries([text])[0]
    scores = np.asarray(db.caption_vectors @ query, dtype=np.float32)
    images = len(set(c["image_id"] for c in db.captions))
    _check_k_fits(k, images, "captioned images")
    hits: list[Hit] = []
    seen: set[str] = set()
    for row in np.lexsort((np.arange(len(scores)), -scores)):  # best first, ties by row
        entry = db.captions[row]
        if entry["image_id"] in seen:
            continue
        seen.add(entry["image_id"])
        hits.append(Hit(len(hits) + 1, entry["image_id"], round(float(scores[row]), 6),
                        path=path_of(entry["image_id"]), caption=entry["caption"],
                        caption_source=entry["source"], caption_model=entry.get("model")))
        if len(hits) == k:
            break
    return SearchResult("text", text, source, embedder.name, hits, images, _load=load)


def open_memory(settings: config.Settings):
    """(db, dataset, settings) of the pipeline's memory in DB_DIR: the settings with
    the database's models and data set filled in where none were given."""
    import pipeline
    from db_manager import DbManager
    db = DbManager.open(settings.db_dir)
    if db.needs_seed:
        raise UserError(f"no database in {settings.db_dir}: run `python main.py` first, "
                        "or search a folder with --images-dir")
    settings = pipeline.for_database(settings, db)
    dataset = pipeline.load_dataset(settings)  # loaded once per process
    if dataset.fingerprint != db.state.split:
        raise UserError(f"the database in {settings.db_dir} was built from another data set or "
                        "split; use the same --dataset-name, --random-seed and "
                        "--experiment-samples as main.py")
    return db, dataset, settings


INDEX_BACKENDS = ("numpy", "faiss", "faiss-fp16", "ivfpq", "hnsw")
UPLOADS = "uploads"  # DB_DIR/uploads/: images saved to the memory from the web page


def memory_path(dataset, settings: config.Settings, image_id: str) -> str | None:
    """The file of an image in the memory: the data set's, a saved upload, or (for
    images imported with --import-parquet, whose ids are their paths) the file itself."""
    sample = dataset.get(image_id)
    if sample is not None:
        return sample.source if isinstance(sample.source, str) else None
    saved = Path(settings.db_dir) / UPLOADS / Path(image_id).name
    if saved.is_file():
        return str(saved)
    own = Path(image_id.removeprefix("file://"))
    return str(own) if own.is_absolute() and own.is_file() else None


def memory_image(dataset, settings: config.Settings, image_id: str):
    """The image of an id of the memory: from the data set, or a saved upload."""
    from dataset_loader import open_image
    sample = dataset.get(image_id)
    if sample is not None:
        return dataset.load_image(sample)
    path = memory_path(dataset, settings, image_id)
    if path is None:
        raise UserError(f"no image file for {image_id!r} in the data set, {UPLOADS}/ or on disk")
    return open_image(path)


# --- output -------------------------------------------------------------------------

def format_table(result: SearchResult) -> str:
    """The ranked results as a text table."""
    lines = [f"{result.mode} search for {result.query!r} in {result.source} "
             f"({result.indexed} searched, {result.model})"]
    if result.index_update:
        lines.append(f"index: {result.index_update}")
    lines.append(f"{'rank':>4}  {'score':>7}  image")
    for hit in result.hits:
        lines.append(f"{hit.rank:>4}  {hit.score:7.4f}  {hit.path or hit.image_id}")
        if hit.caption is not None:
            who = hit.caption_source + (f" by {hit.caption_model}" if hit.caption_model else "")
            lines.append(f"{'':>15}{who}: {hit.caption}")
    if result.figure:
        lines.append(f"figure: {result.figure}")
    return "\n".join(lines)


def plot_results(result: SearchResult, path: str | Path, show: bool = False) -> Path:
    """The query on the left, the results to its right, each titled with its score."""
    import matplotlib
    if not show:
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import textwrap

    panels = len(result.hits) + 1
    fig, axes = plt.subplots(1, panels, figsize=(3 * panels, 3.6), squeeze=False)
    axes = axes[0]
    if result.mode == "image":
        from dataset_loader import open_image
        axes[0].imshow(open_image(result.query))
        axes[0].set_title("query", fontsize=10)
    else:
        axes[0].text(0.5, 0.5, "\n".join(textwrap.wrap(result.query, 22)), ha="center",
                     va="center", fontsize=11, wrap=True)
        axes[0].set_title("text query", fontsize=10)
    for ax, hit in zip(axes[1:], result.hits):
        try:
            ax.imshow(result.load_image(hit))
        except UserError as exc:
            ax.text(0.5, 0.5, "unreadable", ha="center", va="center")
            log.warning("%s", exc)
        ax.set_title(f"#{hit.rank}  {hit.score:.3f}\n{Path(hit.image_id).name[:28]}", fontsize=9)
        if hit.caption:
            ax.set_xlabel("\n".join(textwrap.wrap(hit.caption, 32)[:3]), fontsize=8)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    if show:
        plt.show()
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = config.make_parser("search.py", __doc__.split("\n\n")[0] + "\n\n" +
                                __doc__.split("\n\n")[1] + "\n\nThe settings of config.py "
                                "are flags too (same as main.py).")
    what = parser.add_argument_group("search")
    query = what.add_mutually_exclusive_group()
    query.add_argument("--query", metavar="IMAGE", help="image file to search with")
    query.add_argument("--text", metavar="TEXT", help="words to search captions with")
    what.add_argument("--topk", metavar="N", default="5", help="results to show (default 5)")
    what.add_argument("--images-dir", metavar="DIR",
                      help="search this folder (recursively) instead of the pipeline's memory")
    what.add_argument("--backbone", default="clip", metavar="NAME",
                      help="image search: clip (CLIP_MODEL_NAME), siglip, resnet50, dinov2, or a "
                           "hub id / local path (default clip)")
    # similarity_search.BACKENDS, spelled out so that --help does not import numpy
    what.add_argument("--index", choices=INDEX_BACKENDS, default="numpy",
                      help="search backend: numpy (default) or faiss (exact, float32), "
                           "faiss-fp16 (float16 codes, faster on large indexes), ivfpq or "
                           "hnsw (approximate, for millions of images); all but numpy need "
                           "faiss-cpu")
    what.add_argument("--plot", metavar="PNG", help="figure file (default results/search_*.png)")
    what.add_argument("--show", action="store_true", help="also open the figure in a window")
    what.add_argument("--json", action="store_true", help="print the results as JSON")
    try:
        args, settings = config.parse_cli(parser, argv)
        if not (args.query or args.text):
            raise UserError("give --query IMAGE or --text TEXT")
        try:
            k = int(args.topk)
        except ValueError:
            raise UserError(f"--topk must be a positive integer, got {args.topk!r}") from None
    except UserError as exc:
        return cli_failure("search.py", exc, code=2)
    config.configure_logging(settings)
    try:
        if args.query:
            result = search_images(args.query, k, images_dir=args.images_dir,
                                   backbone=args.backbone, index=args.index, settings=settings)
        else:
            result = search_text(args.text, k, images_dir=args.images_dir, settings=settings)
        figure = args.plot or Path(settings.results_dir) / (
            f"search_{datetime.now():%Y%m%d_%H%M%S}.png")
        result.figure = str(plot_results(result, figure, show=args.show))
    except (UserError, OSError, KeyboardInterrupt) as exc:
        return cli_failure("search.py", exc)
    print(json.dumps(result.as_json(), indent=2) if args.json else format_table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
