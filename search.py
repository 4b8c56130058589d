"""Search the memory by image or by words, with a picture of the results.

    python search.py --query photo.jpg --topk 3                    # the pipeline's image database
    python search.py --query photo.jpg --images-dir my_photos/     # any folder (cached, incremental)
    python search.py --query photo.jpg --backbone dinov2           # clip (default), siglip, resnet50, dinov2
    python search.py --text "a dog running through water"         # caption database, best caption per image
    python search.py --text "a red car" --images-dir my_photos/    # any folder: its captions
                                                                   #   (main.py --caption-folder),
                                                                   #   else CLIP's text tower
    python search.py --text "a red car" --text-by both             # clip | captions | both (fused)
    python search.py --text "밝은 빨간색 미니 원피스"               # any language the models know

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
from typing import TYPE_CHECKING, Any, Callable

import availability
import config
from errors import UsageError, UserError, cli_failure

if TYPE_CHECKING:
    from db_manager import CaptionEntry

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
    found_by: str | None = None         # text search: "captions", "clip" or "captions+clip"
    ranks: dict[str, int] | None = None  # text search: the hit's rank in each ranking


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
    by: str | None = None      # text search: the ranking(s) used (see TEXT_BY)
    notes: list[str] = field(default_factory=list)  # warnings for the user (e.g. language)
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
        raise UsageError(f"--topk must be a positive integer, got {k!r}")


def fit_k(k: int, available: int, what: str, notes: list[str]) -> int:
    """`k`, or all `available` results when there are fewer (with a note saying so):
    asking for the top 5 of 3 photos gives the 3."""
    if k <= available:
        return k
    notes.append(f"top {k} asked, only {available} {what} searched: showing all {available}")
    return available


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
    settings = config.settings_of(settings, overrides, "search", folder=images_dir)
    query_image = open_image(query)
    if images_dir is not None:
        files = scan_folder(images_dir)  # before loading a model: a bad folder fails fast
        root = Path(images_dir).expanduser().resolve()
        availability.require(settings, (), [_image_need(settings, backbone)])
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
        db, dataset, settings = open_memory(
            settings, lambda settings, db: [_image_need(settings, backbone)])
        embedder = _image_embedder(settings, backbone)
        rows = db.image_rows()
        if embedder.name == db.describe().clip_model:
            ids, vectors, note = rows.ids, rows.vectors, ""
        else:  # another backbone: embed the database's images with it, cached
            known = {i: "dataset" for i in rows.ids if dataset.get(i) is not None}
            ids, vectors, update = update_index(
                index_path(settings.db_dir, "db", dataset.fingerprint, embedder.key), embedder,
                known, lambda image_id: dataset.load_image(dataset.get(image_id)))
            note = str(update)
        source = f"image database {Path(settings.db_dir).resolve()}"
        path_of = lambda image_id: memory_path(dataset, settings, image_id)  # noqa: E731
        load = lambda hit: memory_image(dataset, settings, hit.image_id)  # noqa: E731
    notes: list[str] = []
    k = fit_k(k, len(ids), "images", notes)
    search_index = SearchIndex.from_vectors(ids, vectors, backend=index)
    found = search_index.search(embedder.embed([query_image]), k)[0]
    hits = [Hit(n.rank, n.image_id, round(n.score, 6), path=path_of(n.image_id)) for n in found]
    return SearchResult("image", str(query), source, embedder.name, hits, len(ids), note,
                        notes=notes, _load=load)


def _image_need(settings: config.Settings, backbone: str) -> availability.Need:
    """The image model a search with `backbone` loads."""
    from image_embedder import backbone_model_name
    name = backbone_model_name(backbone, settings.clip_model_name)
    if name == settings.clip_model_name:
        return availability.needs(settings, ("image",))[0]
    return availability.Need("image model", name, "--backbone")


def _text_parts(by: str, captioned: bool) -> tuple[str, ...]:
    """The models (availability.PARTS) a text search `by` loads."""
    if by == "auto":
        by = "captions" if captioned else "clip"
    return {"captions": ("caption",), "clip": ("image",), "both": ("caption", "image"),
            "clip-captions": ("image",)}[by]


def _image_embedder(settings: config.Settings, backbone: str):
    """The pipeline's CLIP embedder, or another backbone's (loaded once per process)."""
    from models import cached, device_of, load_models
    from image_embedder import ImageEmbedder, backbone_model_name
    model_name = backbone_model_name(backbone, settings.clip_model_name)
    if model_name == settings.clip_model_name:
        return load_models(settings).image_embedder
    device, dtype = device_of(settings)
    key = (model_name, str(device), str(dtype), settings.batch_size)
    return cached("search_embedder", key, lambda: ImageEmbedder(
        model_name, device=device, dtype=dtype, batch_size=settings.batch_size,
        what="image model", setting="--backbone"))


TEXT_BY = ("auto", "captions", "clip", "both", "clip-captions")
# Reciprocal-rank fusion (Cormack et al., 2009): an image scores sum(1 / (RRF_K + rank))
# over the rankings; 60 is the paper's constant, which damps the top ranks' weight.
RRF_K = 60
# A query with words the caption model's tokenizer does not know is probably in a
# language it was not trained on: say so instead of returning poor matches silently.
# (all-MiniLM-L6-v2 knows no token of 15% of "밝은 빨간색 미니 원피스", and none of an
# English query.)
UNKNOWN_TOKENS_WARNING = 0.1


def search_text(text: str, k: int = 5, *, images_dir: str | None = None, by: str = "auto",
                index: str = "numpy", settings: config.Settings | None = None,
                **overrides: Any) -> SearchResult:
    """Images that match the words `text`, from the pipeline's memory or any folder.

    `by`: "captions" (the best caption per image, embedded with the caption model
    and query prompt the database records: the memory, or a folder captioned with
    `main.py --caption-folder`), "clip" (the CLIP/SigLIP text embedding of `text`
    against the image vectors, no captions needed), "both" (reciprocal-rank fusion
    of the two), or "auto": captions where the searched images have them, else clip;
    "clip-captions": the captions RETRIEVE "captions" retrieves from (the caption
    datastore: the memory's captions and/or CAPTION_DATASTORE's), ranked by CLIP
    text-text cosine, one hit per caption (a corpus caption's image_id is its FILE:LINE).
    Each hit says which ranking found it (`found_by`, `ranks`). `index` is the
    search backend of each ranking (INDEX_BACKENDS); "both" ranks every image,
    as the fusion needs.
    """
    from dataset_loader import open_image
    from db_manager import DbManager
    from folder_index import folder_db_dir

    from memory import caption_embedder_for, embed_missing_captions

    _check_k(k)
    if not text.strip():
        raise UsageError("--text is empty")
    if by not in TEXT_BY:
        raise UsageError(f"--text-by must be one of {', '.join(TEXT_BY)}, got {by!r}")
    settings = config.settings_of(settings, overrides, "search", folder=images_dir)
    if images_dir is not None:
        from folder_index import scan_folder
        root = Path(images_dir).expanduser().resolve()
        if not root.is_dir():
            raise UserError(f"image folder not found: {images_dir}")
        db = DbManager.open(folder_db_dir(settings.db_dir, root))
        captioned = db.describe().captions > 0
        if captioned:  # searched with the models it was captioned with
            db.check_models(settings.clip_model_name, settings.caption_embedding_model)
        availability.require(settings, _text_parts(by, captioned))
        source = f"{root}"
        path_of = lambda image_id: str(root / image_id)  # noqa: E731
        load = lambda hit: open_image(hit.path)  # noqa: E731

        def image_rows():
            from folder_index import index_path, update_index
            files = scan_folder(images_dir)
            embedder = _image_embedder(settings, "clip")
            ids, vectors, update = update_index(
                index_path(settings.db_dir, "folder", str(root), embedder.key), embedder, files,
                lambda image_id: open_image(root / image_id))
            return embedder, ids, vectors, str(update)
    else:
        db, dataset, settings = open_memory(settings, lambda settings, db: availability.needs(
            settings, _text_parts(by, db.describe().captions > 0)))
        captioned = db.describe().captions > 0
        source = f"memory {Path(settings.db_dir).resolve()}"
        path_of = lambda image_id: memory_path(dataset, settings, image_id)  # noqa: E731
        load = lambda hit: memory_image(dataset, settings, hit.image_id)  # noqa: E731

        def image_rows():
            rows = db.image_rows()
            return _image_embedder(settings, "clip"), rows.ids, rows.vectors, ""
    if by == "clip-captions":
        if images_dir is not None:
            raise UserError("--text-by clip-captions searches the caption datastore of the "
                            "memory (and --caption-datastore): leave out --images-dir")
        return _datastore_search(text, k, settings, db, source, path_of, load)
    if by == "auto":
        by = "captions" if captioned else "clip"
    if by in ("captions", "both") and not captioned:
        raise UserError(f"{images_dir} has no captions yet: run `python main.py "
                        f"--caption-folder {images_dir}` first, or search with --text-by clip")
    rankings: dict[str, list[tuple[str, float]]] = {}
    searched: dict[str, int] = {}  # images each ranking searched
    depth = None if by == "both" else k  # fusion needs every image's rank
    models, notes, note = [], [], ""
    best_caption: dict[str, CaptionEntry] = {}
    if by in ("captions", "both"):
        embedder = caption_embedder_for(settings, db)
        embed_missing_captions(embedder, db)  # a first search after a first run
        rankings["captions"], best_caption, searched["captions"] = _caption_ranking(
            db, embedder.embed_queries([text])[0], depth, index)
        models.append(embedder.name)
        unknown = embedder.unknown_fraction(text)
        if unknown >= UNKNOWN_TOKENS_WARNING:
            notes.append(f"{unknown:.0%} of the query's tokens are unknown to the caption "
                         f"model {embedder.name}: it may not have been trained on this "
                         "language; build the database with a multilingual one (e.g. "
                         "BAAI/bge-m3, intfloat/multilingual-e5-base, google/embeddinggemma-300m)")
    if by in ("clip", "both"):
        embedder, ids, vectors, note = image_rows()
        if not len(ids):
            raise UserError(f"no images to search in {source}")
        rankings["clip"] = _vector_ranking(ids, vectors, embedder.embed_texts([text])[0],
                                           depth, index)
        searched["clip"] = len(ids)
        models.append(embedder.name)
    for line in notes:
        log.warning("%s", line)
    fused = _fuse(rankings)
    indexed = searched[by] if by in searched else len(fused)
    k = fit_k(k, indexed, "captioned images" if by == "captions" else "images", notes)
    hits = []
    for rank, (image_id, score, ranks) in enumerate(fused[:k], start=1):
        entry = best_caption.get(image_id)
        hits.append(Hit(rank, image_id, round(score, 6), path=path_of(image_id),
                        caption=entry and entry.caption,
                        caption_source=entry and entry.source,
                        caption_model=entry and entry.model,
                        found_by="+".join(ranks), ranks=ranks))
    kind = {"captions": "captions of", "clip": "images of", "both": "images and captions of"}
    return SearchResult("text", text, f"{kind[by]} {source}", " + ".join(models), hits,
                        indexed, note, by=by, notes=notes, _load=load)


def _datastore_search(text: str, k: int, settings: config.Settings, db, source: str,
                      path_of: Callable[[str], str | None], load) -> SearchResult:
    """--text-by clip-captions: the captions of the caption datastore nearest to the
    CLIP text vector of `text` (caption_datastore.datastore_for over every memory row)."""
    from caption_datastore import datastore_for
    from memory import Memory
    from models import load_models
    models = load_models(settings)
    store = datastore_for(models, Memory.from_db(db, growing=True))
    query = models.image_embedder.embed_texts([text])[0]
    hits = []
    for found in store.search(query, k):
        entry = store.entry(found.image_id)
        where = entry.image_id or entry.source
        hits.append(Hit(found.rank, where, round(found.score, 6),
                        path=path_of(entry.image_id) if entry.image_id else None,
                        caption=entry.text, caption_source="corpus" if entry.file else "memory",
                        found_by="clip-captions", ranks={"clip-captions": found.rank}))
    corpus = f" and {settings.caption_datastore}" if settings.caption_datastore else ""
    what = f"{settings.caption_datastore} (a corpus)" if settings.caption_datastore_only \
        else f"captions of {source}{corpus}"
    return SearchResult("text", text, what, models.image_embedder.name, hits, len(store),
                        by="clip-captions",
                        _load=load)


def _caption_ranking(db, query, k: int | None, index: str
                     ) -> tuple[list[tuple[str, float]], dict[str, CaptionEntry], int]:
    """The `k` best captioned images (all when k is None) by their best caption's
    score (best first, ties by row), that caption's entry per image, and how many
    images have captions."""
    from similarity_search import SearchIndex
    rows = db.caption_rows()
    image_of = dict(zip(rows.ids, rows.image_ids))  # caption ids are unique in a database
    captioned = len(set(rows.image_ids))
    captions = SearchIndex.from_vectors(rows.ids, rows.vectors, backend=index)
    k = captioned if k is None else min(k, captioned)
    want = min(len(rows), k * -(-len(rows) // max(1, captioned)))  # captions per image
    while True:  # widen until the best captions hold k images
        ranking, best = [], {}
        for hit in captions.search(query, want)[0]:
            image_id = image_of[hit.image_id]
            if image_id not in best:
                best[image_id] = db.caption(hit.image_id)
                ranking.append((image_id, hit.score))
        if len(ranking) >= k or want >= len(rows):
            return ranking[:k], best, captioned
        want = min(len(rows), 2 * want)


def _vector_ranking(ids, vectors, query, k: int | None, index: str) -> list[tuple[str, float]]:
    """The `k` images (all when k is None) by the cosine of their vector with `query`
    (best first, ties by row)."""
    from similarity_search import SearchIndex
    hits = SearchIndex.from_vectors(ids, vectors, backend=index).search(
        query, len(ids) if k is None else k)[0]
    return [(hit.image_id, hit.score) for hit in hits]


def _fuse(rankings: dict[str, list[tuple[str, float]]]) -> list[tuple[str, float, dict]]:
    """[(image_id, score, {ranking: rank})] best first. One ranking: its own scores;
    several: reciprocal-rank fusion over every image any of them holds (ties: the
    best single rank, then the first ranking's order)."""
    if len(rankings) == 1:
        (name, ranking), = rankings.items()
        return [(image_id, score, {name: rank})
                for rank, (image_id, score) in enumerate(ranking, start=1)]
    ranks: dict[str, dict[str, int]] = {}
    for name, ranking in rankings.items():
        for rank, (image_id, _) in enumerate(ranking, start=1):
            ranks.setdefault(image_id, {})[name] = rank
    order = {image_id: n for n, image_id in enumerate(ranks)}
    fused = [(image_id, sum(1.0 / (RRF_K + r) for r in found.values()), found)
             for image_id, found in ranks.items()]
    fused.sort(key=lambda f: (-f[1], min(f[2].values()), order[f[0]]))
    return fused


def open_memory(settings: config.Settings, needs: Callable[[config.Settings, Any], list[
        availability.Need]] | None = None):
    """(db, dataset, settings) of the pipeline's memory in DB_DIR (settings resolved
    there use its models and data set where none were given). The data set and what
    `needs(settings, db)` lists must be available before the data set loads
    (availability.require)."""
    from models import load_dataset
    from db_manager import DbManager
    db = DbManager.open(settings.db_dir)
    if db.describe().empty:
        raise UserError(f"no database in {settings.db_dir}: run `python main.py` first, "
                        "or search a folder with --images-dir")
    db.check_models(settings.clip_model_name, settings.caption_embedding_model)
    availability.require(settings, ("dataset",), needs(settings, db) if needs else ())
    dataset = load_dataset(settings)  # loaded once per process
    if dataset.fingerprint != db.describe().split:
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
    by = f" by {result.by}" if result.by else ""
    lines = [f"{result.mode} search{by} for {result.query!r} in {result.source} "
             f"({result.indexed} searched, {result.model})"]
    if result.index_update:
        lines.append(f"index: {result.index_update}")
    lines += [f"note: {note}" for note in result.notes]
    found = result.by is not None
    lines.append(f"{'rank':>4}  {'score':>7}  " + ("found by       " if found else "") + "image")
    for hit in result.hits:
        where = f"{hit.found_by:<15}" if found else ""
        lines.append(f"{hit.rank:>4}  {hit.score:7.4f}  {where}{hit.path or hit.image_id}")
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

    _use_fonts_for(result.query + "".join(h.caption or "" for h in result.hits))
    panels = len(result.hits) + 1
    fig, axes = plt.subplots(1, panels, figsize=(3 * panels, 3.6), squeeze=False,
                             layout="constrained")  # titles and captions never overlap
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
            if hit.caption_source == "corpus":   # --text-by clip-captions: no picture
                ax.text(0.5, 0.5, "a corpus caption\n(no image)", ha="center", va="center")
            else:
                ax.imshow(result.load_image(hit))
        except UserError as exc:
            ax.text(0.5, 0.5, "unreadable", ha="center", va="center")
            log.warning("%s", exc)
        by = f" · {hit.found_by}" if hit.found_by and result.by == "both" else ""
        ax.set_title(f"#{hit.rank}  {hit.score:.3f}{by}\n{Path(hit.image_id).name[:28]}",
                     fontsize=9)
        if hit.caption:
            ax.set_xlabel("\n".join(textwrap.wrap(hit.caption, 32)[:3]), fontsize=8)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    if show:
        plt.show()
    plt.close(fig)
    return path


# Fonts tried, in order, for each character of a figure's text (matplotlib falls back
# glyph by glyph): DejaVu Sans has no Hangul, kana or Han characters.
FALLBACK_FONTS = ("DejaVu Sans", "Noto Sans CJK KR", "Noto Sans CJK JP", "Noto Sans CJK SC",
                  "NanumGothic", "Malgun Gothic", "AppleGothic", "Apple SD Gothic Neo",
                  "Yu Gothic", "MS Gothic", "Microsoft YaHei", "WenQuanYi Zen Hei",
                  "Arial Unicode MS")


def _use_fonts_for(text: str) -> None:
    """Point matplotlib at fonts that draw `text`; one warning (instead of one per
    glyph) naming what to install when none of them has every character."""
    import logging as logging_
    from matplotlib import font_manager, rcParams
    installed = {f.name for f in font_manager.fontManager.ttflist}
    families = [name for name in FALLBACK_FONTS if name in installed] or ["DejaVu Sans"]
    rcParams["font.family"] = "sans-serif"
    rcParams["font.sans-serif"] = families + [f for f in rcParams["font.sans-serif"]
                                              if f not in families]
    wide = {c for c in text if ord(c) > 0x2FF}
    if not wide:
        return
    from matplotlib.ft2font import FT2Font
    covered = set()
    for name in families:
        path = font_manager.findfont(font_manager.FontProperties(family=name),
                                     fallback_to_default=False)
        charmap = FT2Font(path).get_charmap()
        covered |= {c for c in wide if ord(c) in charmap}
    missing = wide - covered
    if missing:
        log.warning("no installed font draws %s in the figure (boxes instead): install one "
                    "such as Noto Sans CJK (Debian/Ubuntu: apt install fonts-noto-cjk)",
                    "".join(sorted(missing)[:8]))
        # matplotlib would warn once per missing glyph
        logging_.getLogger("matplotlib.font_manager").setLevel(logging_.ERROR)
        import warnings
        warnings.filterwarnings("ignore", message="Glyph .* missing from")


def _print(text: str) -> None:
    """Print to a terminal that may not encode every character of `text` (a Windows
    console and a Korean query): those become escapes, never an error."""
    try:
        print(text)
    except UnicodeEncodeError:
        encoding = sys.stdout.encoding or "ascii"
        print(text.encode(encoding, "backslashreplace").decode(encoding))


def main(argv: list[str] | None = None) -> int:
    parser = config.make_parser("search.py", __doc__.split("\n\n")[0] + "\n\n" +
                                __doc__.split("\n\n")[1] + "\n\nThe settings of config.py "
                                "are flags too (same as main.py).")
    what = parser.add_argument_group("search")
    query = what.add_mutually_exclusive_group()
    query.add_argument("--query", metavar="IMAGE", help="image file to search with")
    query.add_argument("--text", metavar="TEXT",
                       help="words to search with, in any language the models know")
    what.add_argument("--topk", metavar="N", default="5", help="results to show (default 5)")
    what.add_argument("--images-dir", metavar="DIR",
                      help="search this folder (recursively) instead of the pipeline's memory")
    what.add_argument("--text-by", choices=TEXT_BY, default="auto",
                      help="text search: captions (caption embeddings), clip (CLIP's text "
                           "tower against the image vectors, no captions needed), both "
                           "(reciprocal-rank fusion), auto (default: captions where the "
                           "searched images have them, else clip), clip-captions (the caption "
                           "datastore of --retrieve captions, by CLIP text vectors: the "
                           "memory's captions and/or --caption-datastore's)")
    what.add_argument("--backbone", default="clip", metavar="NAME",
                      help="image search: clip (CLIP_MODEL_NAME), siglip, resnet50, dinov2, or a "
                           "hub id / local path (default clip)")
    # similarity_search.BACKENDS, spelled out so that --help does not import numpy
    what.add_argument("--index", choices=INDEX_BACKENDS, default="numpy",
                      help="search backend of image and text search: numpy (default) "
                           "or faiss (exact, float32), "
                           "faiss-fp16 (float16 codes, faster on large indexes), ivfpq or "
                           "hnsw (approximate, for millions of images); all but numpy need "
                           "faiss-cpu")
    what.add_argument("--plot", metavar="PNG", help="figure file (default results/search_*.png)")
    what.add_argument("--show", action="store_true", help="also open the figure in a window")
    what.add_argument("--json", action="store_true", help="print the results as JSON")
    try:
        args, settings = config.parse_cli(parser, argv, "search",
                                          folder=lambda args: args.images_dir)
        if args.query is None and args.text is None:
            raise UsageError("give --query IMAGE or --text TEXT")
        if args.text is not None and not args.text.strip():
            raise UsageError("--text is empty: give the words to search for")
        try:
            k = int(args.topk)
        except ValueError:
            raise UsageError(f"--topk must be a positive integer, got {args.topk!r}") from None
    except UserError as exc:
        return cli_failure("search.py", exc, code=2)
    config.configure_logging(settings)
    try:
        if args.query:
            result = search_images(args.query, k, images_dir=args.images_dir,
                                   backbone=args.backbone, index=args.index, settings=settings)
        else:
            result = search_text(args.text, k, images_dir=args.images_dir, by=args.text_by,
                                 index=args.index, settings=settings)
        figure = args.plot or Path(settings.results_dir) / (
            f"search_{datetime.now():%Y%m%d_%H%M%S}.png")
        result.figure = str(plot_results(result, figure, show=args.show))
    except (UserError, OSError, KeyboardInterrupt) as exc:
        return cli_failure("search.py", exc)
    # JSON keeps non-ASCII queries and captions readable (valid JSON either way)
    _print(json.dumps(result.as_json(), indent=2, ensure_ascii=False) if args.json
           else format_table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
