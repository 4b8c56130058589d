"""Settings for the retrieval-augmented captioning pipeline.

Every UPPER_CASE constant below is a default. Each one can be overridden, from
lowest to highest precedence, by
  1. an environment variable   RECAP_<NAME>            (RECAP_TOP_K_SIMILAR=3)
  2. a command-line flag       --<name-in-kebab-case>  (--top-k-similar 3)
  3. a keyword argument        run_experiment(top_k_similar=3)
Values are parsed to the type of the default; an unknown name or a value of
the wrong type is a one-line error (with the closest name). Importing this
module does no work.

Each entry point resolves its settings once, `config.resolve(context, **given)`,
into a typed frozen `Settings` (one field per constant below, lower-case) with
every "auto" made a value for that entry point (CONTEXTS) and, where DB_DIR
already holds a database, what it records used for the settings not given.
The objects made from them (models.Models, retrieval.Selection, ...) carry them;
no code asks "is this auto?" later.
"""

from __future__ import annotations

import argparse
import difflib
import functools
import logging
import os
import re
from pathlib import Path
from types import MappingProxyType
from typing import Any, Callable, Mapping

from errors import UserError

log = logging.getLogger("config")

# Settings annotated `Changes` change what an experiment produces (its neighbours,
# prompt, caption or vectors). They are the one list that batch resume,
# --caption-folder, scale/ manifests and the embedding caches compare
# (config.result_settings()): a run resumed with another value is refused.
Changes = Any

# --- data --------------------------------------------------------------------
# The captioned image collection: a Hugging Face hub id (a table with an image
# column and caption columns), or a local folder or caption file in one of the
# layouts collection_formats.py reads: Flickr8K's Kaggle (Images/ + captions.txt)
# and original (Flicker8k_Dataset/ + Flickr8k.token.txt), Karpathy's split files
# (dataset_coco.json, dataset_flickr30k.json, dataset_flickr8k.json + images),
# COCO-style caption annotations (captions_*.json, NoCaps' *_captions.json +
# images) or a plain folder of images with captions.jsonl or captions.csv.
DATASET_NAME: Changes = "jxie/flickr8k"
# Images held out for experiments under SPLIT "seeded"; the rest of the collection
# is the training pool (the memory).
EXPERIMENT_SAMPLES: Changes = 400
# Which experiment image `python main.py` captions (0 .. the split's experiment images - 1).
EXPERIMENT_IMAGE_INDEX = 0
# Seed of the "seeded" split. That split depends on this alone.
RANDOM_SEED: Changes = 42
# Which images are experiment images and which the memory: "seeded" (EXPERIMENT_SAMPLES
# images drawn by RANDOM_SEED, the rest the memory), "karpathy" (the collection's
# test split in file order; the memory its train + restval, val in neither: the
# benchmarks' standard split), "all" (every image, in file order; the memory comes
# from MEMORY_DATASET) or the name of a split the collection ships (val, validation,
# val2014, ...; the memory its training splits).
SPLIT: Changes = "seeded"
# Another collection whose training images (train + restval; all of them where it
# names no split) and captions are the memory, e.g. coco/ for NoCaps; "" = the
# memory comes from DATASET_NAME. Its ids are prefixed with its name ("coco:...").
MEMORY_DATASET: Changes = ""

# --- models ------------------------------------------------------------------
# Image embedder for retrieval: any CLIP or SigLIP checkpoint (hub id or path).
CLIP_MODEL_NAME: Changes = "openai/clip-vit-base-patch32"
# CLIP checkpoint of the CLIPScore and RefCLIPScore metrics (clip_score.py); the
# default is the paper's. When it is CLIP_MODEL_NAME, retrieval's image vectors are
# reused. Not a `Changes` setting: it changes no caption, only scores, and every
# summary computes all its scores with one model, recorded beside them ("clip_score").
METRIC_CLIP_MODEL = "openai/clip-vit-base-patch32"
# Captioner (hub id or path), of one of the families vlm_captioner.FAMILIES knows
# from its config's model type (README, "Captioners"): chat models with a chat
# template (SmolVLM, SmolVLM2, Idefics3, Qwen2-VL / Qwen2.5-VL, LLaVA) get the
# retrieved captions in a user turn; BLIP-2 as "Question: ... Answer:";
# InstructBLIP as its instruction; PaliGemma and Florence-2 get their captioning
# task prompt and BLIP and GIT the image alone: those do not use the retrieved
# captions (results say context_used: false).
VLM_MODEL_NAME: Changes = "HuggingFaceTB/SmolVLM-Instruct"
# Sentence-transformers model for caption embeddings (text search).
CAPTION_EMBEDDING_MODEL: Changes = "BAAI/bge-base-en-v1.5"
# Text put before search queries when they are embedded: "auto" = the model's own
# (its sentence-transformers prompts, e.g. EmbeddingGemma's; else BGE's query
# instruction or E5's "query: " by name), "" = none, anything else is used as it is.
# A database records the prompts it was built with and refuses others (like
# another model).
CAPTION_QUERY_PROMPT: Changes = "auto"
# Text put before captions when they are embedded: "auto" = the model's own (its
# "document" prompt, E5's "passage: "), "" = none, anything else as it is.
CAPTION_DOCUMENT_PROMPT: Changes = "auto"
# Where the models run ("auto": CUDA, then MPS, then CPU; "cuda:1": the second GPU).
# One of "auto", "cpu", "cuda", "cuda:N" or "mps".
DEVICE = "auto"
# Model precision: "auto" = bfloat16 (float16 where unsupported) on GPUs, float32 on
# the CPU; or "float32", "bfloat16" (about 2x faster on CPUs with AVX512-BF16 or
# AMX, see BENCHMARKS.md), "float16" (GPUs only).
DTYPE: Changes = "auto"

# --- retrieval and prompt ----------------------------------------------------
# Neighbours retrieved from the image database for each experiment image.
TOP_K_SIMILAR: Changes = 5
# Human captions taken from each neighbour. Two of five keeps the prompt short
# (10 captions for k=5) while still showing how different people describe a
# scene; small VLMs copy from long contexts instead of looking at the image.
CAPTIONS_PER_NEIGHBOUR: Changes = 2
# How the TOP_K_SIMILAR neighbours are chosen among the nearest memory rows. The
# nearest images are often several views of one scene, so the prompt repeats one
# description k times, and captioners copy what most retrieved captions share
# (Li et al. 2024, arXiv 2406.02265):
#   "top"    the k most similar images (the original design);
#   "mmr"    maximal marginal relevance over the image vectors: each next neighbour
#            maximises MMR_LAMBDA * similarity to the query - (1 - MMR_LAMBDA) *
#            similarity to the neighbours already chosen (similar and varied);
#   "dedup"  the nearest images in order, skipping one whose image vector or
#            caption vector has a cosine above DEDUP_THRESHOLD to one already
#            chosen (one neighbour per scene);
#   "sample" k of the 2k most similar, drawn at random (seeded by RANDOM_SEED and
#            the image), in similarity order (less copying of shared tokens).
NEIGHBOUR_SELECTION: Changes = "top"
# "mmr": weight of similarity to the query against similarity to the chosen ones
# (1 = "top"). At 0.5 a second view of the first neighbour's scene (cosine ~0.95 to
# both) gains 0.5 * (0.95 - 0.95) = 0 and loses to any image more similar to the
# query than to that neighbour; above ~0.57 it would win against an image of
# similarity 0.8 (0.75 to the first), and the prompt would repeat the scene again.
MMR_LAMBDA: Changes = 0.5
# "dedup": two neighbours with a CLIP image cosine, or a cosine of their captions'
# mean CAPTION_EMBEDDING_MODEL vectors, above this show one scene. 0.92: views of one
# scene (bursts, crops, copies) score above it on CLIP image vectors, different
# photos of one kind of scene (two dogs on grass) mostly below. Not yet measured on
# Flickr8K: bench/ablation.py's "scenes" column shows what it removes.
DEDUP_THRESHOLD: Changes = 0.92
# The leak guard: memory rows with an image cosine of at least this to the query
# image are never retrieved, so a near-twin of an experiment image in the training
# pool (Flickr8K has bursts of one scene) cannot hand the VLM its own scene's human
# captions and inflate BLEU/CIDEr. 0 = off. "auto": 0.95 for batch evaluation runs
# (--all / --indices, bench/ablation.py) and off for single experiments, the web
# page, --caption-folder and scale/, where a twin's captions are a fair hint.
# 0.95: above two different scenes, below re-encoded, resized or slightly cropped
# copies; `python main.py --near-duplicates` lists the pairs it catches. Result
# files record the value used (config.near_duplicate_threshold).
NEAR_DUPLICATE_THRESHOLD: Changes = "auto"

# What the prompt's captions are retrieved as:
#   "images"   the TOP_K_SIMILAR memory images nearest to the image (CLIP image-image
#              cosine), CAPTIONS_PER_NEIGHBOUR captions of each (the original design);
#   "captions" the TOP_K_SIMILAR captions nearest to the image by CLIP image-text cosine
#              (SmallCap's retrieval, Ramos et al. CVPR 2023), from the caption datastore:
#              the memory's captions (human and generated) and/or CAPTION_DATASTORE's.
#              A caption needs no image, so a corpus of captions alone can inform the
#              captioner (another domain's descriptions, with no training).
# NEIGHBOUR_SELECTION applies to both (over caption vectors for "captions"); so does the
# leak guard: in batch runs the captions of the query and of its near-duplicate images
# are never retrieved, nor a corpus caption identical to one of its references.
RETRIEVE: Changes = "images"
# A corpus of captions without images for RETRIEVE "captions": a .txt (one caption per
# line), .jsonl or .csv (a "caption" column) or .parquet file; "" = none. Each
# caption's CLIP text vector is made once and kept in DB_DIR/clip_text_vectors.
CAPTION_DATASTORE: Changes = ""
# RETRIEVE "captions" from CAPTION_DATASTORE alone, not the memory's captions too.
CAPTION_DATASTORE_ONLY: Changes = False
# How the caption datastore is searched: "numpy" (exact; right up to about a million
# captions), "faiss" / "faiss-fp16" (exact / float16, pip install faiss-cpu), or the
# approximate "ivfpq" / "hnsw" for corpora of millions (similarity_search.py).
CAPTION_DATASTORE_INDEX: Changes = "numpy"

# Prompt given to the VLM with the image. {context} is replaced by one
# "- caption" line per retrieved caption.
PROMPT_TEMPLATE: Changes = (
    "Captions of similar images:\n{context}\n"
    "Using them only as hints, write one short sentence that describes this image."
)
# Prompt used when no neighbours are retrieved (TOP_K_SIMILAR=0).
PROMPT_TEMPLATE_NO_CONTEXT: Changes = "Write one short sentence that describes this image."

# Which memory experiments retrieve from: "growing" (everything in the image
# database, including experiment images earlier runs appended: the original
# design), "frozen" (only the human-captioned training pool, so results do not
# depend on run order) or "auto" (growing for single experiments, frozen for
# batch runs such as --all).
MEMORY: Changes = "auto"

# --- generation (greedy by default, so results are reproducible) ------------
# Most tokens generated for one caption.
MAX_NEW_TOKENS: Changes = 64
# Beams of beam search; 1 decodes greedily.
NUM_BEAMS: Changes = 1
# Sample the caption's tokens instead of taking the most likely one.
DO_SAMPLE: Changes = False
# Sampling temperature (with DO_SAMPLE).
TEMPERATURE: Changes = 1.0
# Image splitting: SmolVLM can enlarge an image and cut it into tiles (384 px for
# SmolVLM-Instruct, 512 px for the 256M/500M models) plus a global view. A 500x375
# Flickr8K photo becomes 13 tiles, enlarged 3-4x, so no detail is gained over
# the photo itself, and on the CPU a caption takes 7-9x as long as with one
# tile (BENCHMARKS.md, "Caption generation"). False: one tile per image; true: the
# checkpoint's splitting (worth it for large, detailed images).
VLM_IMAGE_SPLITTING: Changes = False
# With splitting on: the longest side the image is enlarged/reduced to before it is
# cut into tiles; 0 keeps the checkpoint's default (4 tiles wide for SmolVLM).
VLM_IMAGE_LONGEST_EDGE: Changes = 0
# The VLM's attention kernel: "" lets transformers choose (sdpa where supported);
# "flash_attention_2" on a GPU with the flash-attn package; "eager" for debugging.
VLM_ATTN_IMPLEMENTATION: Changes = ""
# BLIP and GIT (captioners of the image alone): text the caption starts with and
# the model continues, e.g. "a picture of"; "" = none. Other families ignore it.
VLM_CAPTION_PREFIX: Changes = ""
# Where the VLM's weights go: "" = all of it on DEVICE; "auto" = accelerate places
# it over DEVICE's GPU, the CPU and then disk (CACHE_DIR/offload), so a captioner
# bigger than the GPU runs (slower) instead of failing with out-of-memory.
VLM_DEVICE_MAP = ""
# With VLM_DEVICE_MAP auto: the most memory each device may hold, as comma-separated
# DEVICE=SIZE, DEVICE a GPU index or "cpu", SIZE a number of bytes or a number
# with KB, MB, GB, KiB, MiB or GiB: "0=20GiB,cpu=60GiB". "" = what DEVICE's GPU
# and the CPU have free. What does not fit goes to disk.
VLM_MAX_MEMORY = ""

# --- throughput --------------------------------------------------------------
# Images or captions per forward pass: embeddings, and caption generation in
# batch runs (--all: BATCH_SIZE experiment images per generate call).
BATCH_SIZE = 8

# --- storage -----------------------------------------------------------------
# The three JSON databases (image_embeddings.json, captions.json,
# caption_embeddings.json) live here.
DB_DIR = "db"
# One JSON file per experiment.
RESULTS_DIR = "results"
# Training-pool embedding cache; hub models and datasets use the HF cache.
CACHE_DIR = "cache"
# Logging level: DEBUG, INFO, WARNING or ERROR.
LOG_LEVEL = "INFO"


ENV_PREFIX = "RECAP_"

# The values of the settings that take one of a fixed set, checked by _check and listed
# by --help ("cuda:N": cuda with a device number). Not settings themselves: defaults()
# skips names that start with an underscore.
_CHOICES: Mapping[str, tuple[str, ...]] = MappingProxyType({
    "DEVICE": ("auto", "cpu", "cuda", "cuda:N", "mps"),
    "DTYPE": ("auto", "float32", "bfloat16", "float16"),
    "MEMORY": ("auto", "frozen", "growing"),
    "NEIGHBOUR_SELECTION": ("top", "mmr", "dedup", "sample"),
    "RETRIEVE": ("images", "captions"),
    "CAPTION_DATASTORE_INDEX": ("numpy", "faiss", "faiss-fp16", "ivfpq", "hnsw"),
    "LOG_LEVEL": ("DEBUG", "INFO", "WARNING", "ERROR"),
})
# The corpus files CAPTION_DATASTORE reads (caption_datastore.read_corpus); no setting.
CORPUS_SUFFIXES = (".txt", ".jsonl", ".csv", ".parquet")


_NOT_SETTINGS = ("ENV_PREFIX", "CONTEXTS", "CORPUS_SUFFIXES")   # upper-case, yet no setting


def defaults() -> dict[str, Any]:
    """Every setting with its default value, keyed by UPPER_CASE name."""
    return {k: v for k, v in globals().items()
            if k.isupper() and k not in _NOT_SETTINGS and not k.startswith("_")}


# Where a command runs, as config.resolve's `context`: what an "auto" setting becomes.
#   experiment  one experiment: python main.py, run_experiment, the web page's captions
#   batch       a batch evaluation: --all, --indices, --evaluate, bench/ablation.py
#   collection  images outside the data set: --caption-folder, scale/
#   search      no captioning: search.py, the web page's searches, --embed-captions
CONTEXTS = ("experiment", "batch", "collection", "search")


class _SettingsMethods:
    """What every Settings object can do besides holding its fields."""

    __slots__ = ()

    @property
    def values(self) -> Mapping[str, Any]:
        """Every setting by UPPER_CASE name (as config.py spells them)."""
        return MappingProxyType({name: getattr(self, name.lower()) for name in defaults()})

    def as_dict(self) -> dict[str, Any]:
        return dict(self.values)

    def replace(self, **overrides: Any) -> "Settings":
        """These settings with keyword overrides (by lower-case name) applied and
        finished again in the same context ("auto" becomes a value again)."""
        if not overrides:
            return self
        values = _merge(dict(self.raw), overrides, "keyword")
        return _finish(values, self.context, self.given | {k.upper() for k in overrides},
                       self.recorded)

    def in_context(self, context: str) -> "Settings":
        """The same settings finished for another entry point (`CONTEXTS`)."""
        if context == self.context:
            return self
        return _finish(dict(self.raw), context, self.given, self.recorded)

    def to_json(self) -> dict[str, Any]:
        """Every setting by lower-case name, as result files and manifests record them."""
        return {name.lower(): value for name, value in self.values.items()}

    def results(self, data_set: bool = True) -> dict[str, Any]:
        """The settings that change results (see `Changes`), by lower-case name;
        without the data set's (DATASET_NAME, EXPERIMENT_SAMPLES, SPLIT, MEMORY_DATASET)
        for collections, which caption their own images (their memory is the
        database's, checked there). EXPERIMENT_SAMPLES sizes the seeded split only:
        another split's images are the collection's."""
        skip = () if data_set else ("DATASET_NAME", "EXPERIMENT_SAMPLES", "SPLIT",
                                    "MEMORY_DATASET")
        if self.split != "seeded":
            skip += ("EXPERIMENT_SAMPLES",)
        return {name.lower(): getattr(self, name.lower()) for name in result_settings()
                if name not in skip}


# What each finished setting holds, where that is not its default's type.
_FINISHED_TYPES = MappingProxyType({"NEAR_DUPLICATE_THRESHOLD": float})


def _settings_class() -> type:
    """The Settings dataclass: one typed field per constant above (lower-case), plus
    where it was resolved. Built from the constants, so they stay the one source."""
    from dataclasses import field, make_dataclass
    fields = [(name.lower(), _FINISHED_TYPES.get(name, type(default)))
              for name, default in defaults().items()]
    fields += [("context", str),
               # the settings set by an environment variable, a flag or a keyword
               ("given", frozenset, field(default=frozenset(), compare=False)),
               # the values before "auto" was finished (replace and in_context start there)
               ("raw", Mapping, field(default_factory=dict, compare=False, repr=False)),
               # what the database (or captioned folder) recorded, by setting name
               ("recorded", Mapping, field(default_factory=dict, compare=False,
                                           repr=False)),
               # the database (or captioned folder's) that recorded them, "" if none
               ("source", str, field(default="", compare=False))]
    cls = make_dataclass("Settings", fields, bases=(_SettingsMethods,), frozen=True)
    cls.__module__, cls.__qualname__ = __name__, "Settings"
    cls.__doc__ = """Finished settings of one entry point: a typed field per setting of
    config.py (lower-case), every "auto" already a value (config.resolve)."""
    return cls


@functools.lru_cache(maxsize=None)  # read from this file once per process
def model_settings(kind: str) -> tuple[str, ...]:
    """The settings a model of `kind` ("image_embedder", "caption_embedder", "captioner")
    is built from: those named for it (CLIP_*, CAPTION_EMBEDDING_* and the caption
    prompts, VLM_*; the captioner's
    also the generation section's and RANDOM_SEED), and where it runs. A setting
    added under such a name reaches its model's cache key with no other edit."""
    prefixes, common = {
        "image_embedder": (("CLIP_",), ("DEVICE", "DTYPE", "BATCH_SIZE")),
        "caption_embedder": (("CAPTION_EMBEDDING_", "CAPTION_QUERY_", "CAPTION_DOCUMENT_"),
                             ("DEVICE", "BATCH_SIZE")),
        "captioner": (("VLM_",), ("DEVICE", "DTYPE"))}[kind]
    names = [*common, *(n for n in defaults() if n.startswith(prefixes))]
    if kind == "captioner":
        names += [*_section("generation"), "RANDOM_SEED"]
    return tuple(dict.fromkeys(names))


def _section(title: str) -> list[str]:
    """The settings under "# --- title" in this file, in order."""
    names, inside = [], False
    with open(__file__, encoding="utf-8") as source:
        for line in source:
            if line.startswith("# ---"):
                inside = line[5:].strip().startswith(title)
            elif inside and (name := re.match(r"([A-Z][A-Z0-9_]*)\s*[:=]", line)):
                names.append(name.group(1))
    return names


def result_settings() -> tuple[str, ...]:
    """Names of the settings annotated `Changes`, in config.py order."""
    return tuple(name for name, kind in __annotations__.items()
                 if kind == "Changes" and name.isupper())


def settings_of(settings: Settings | None, overrides: Mapping[str, Any],
                context: str = "experiment", folder: str | None = None) -> Settings:
    """What a public function given `settings=` and/or keyword overrides runs with:
    the settings with the keywords on top, or the settings resolved for `context`
    (and captioned `folder`, whose database's models are used)."""
    if settings is not None:
        return settings.in_context(context).replace(**overrides)
    return resolve(context, folder=folder, **overrides)


def check_same_results(recorded: Mapping[str, Any], wanted: Mapping[str, Any],
                       what: str, advice: str, context: str = "batch") -> None:
    """UserError naming the first result-changing setting whose value in `wanted`
    differs from the one `what` ("run 'k3' was started") was made with (`recorded`,
    by lower-case name). A recorded "auto" (runs made before settings were finished
    once) is what "auto" means in `context` now; a recorded "auto" caption prompt is
    the prompt the recorded caption model gives it."""
    recorded = _prompts_finished(recorded, wanted)
    for name, value in wanted.items():
        if name in recorded:
            was = recorded[name]
        elif name in _BEFORE_IT_EXISTED:
            was = _BEFORE_IT_EXISTED[name]
        elif name.upper() in defaults():
            was = defaults()[name.upper()]  # recorded before it was compared: its default
        else:
            continue
        if name.upper() in _AUTO_FINISHED:  # both sides as this context finishes them
            was, value = (finish_value(name.upper(), v, context) for v in (was, value))
        if was != value:
            raise UserError(f"{what} with {name}={was!r}, not {value!r}; {advice}")


def _prompts_finished(recorded: Mapping[str, Any], wanted: Mapping[str, Any]
                      ) -> Mapping[str, Any]:
    """`recorded` with "auto" caption prompts (runs made before prompts were finished
    once) made the text they stood for, with the caption model the run recorded."""
    names = ("caption_query_prompt", "caption_document_prompt")
    model = recorded.get("caption_embedding_model", wanted.get("caption_embedding_model"))
    if model is None or "auto" not in (recorded.get(n) for n in names):
        return recorded
    from caption_embedder import finish_prompts
    prompts = (recorded.get(n, defaults()[n.upper()]) for n in names)
    return {**recorded, **dict(zip(names, finish_prompts(model, *prompts)))}


# What a run recorded before a setting existed did, where not its default: no
# near-duplicate guard (NEAR_DUPLICATE_THRESHOLD "auto" now guards batch runs).
_BEFORE_IT_EXISTED = MappingProxyType({"near_duplicate_threshold": 0.0})


def choices(name: str) -> tuple[str, ...]:
    """The values setting `name` can take, or () where it takes any value of its type."""
    return _CHOICES.get(name.upper(), ())


def _one_of(name: str) -> str:
    """DTYPE -> "auto, float32, bfloat16 or float16", for error messages."""
    *first, last = _CHOICES[name]
    return f"{', '.join(first)} or {last}"


def flag(name: str) -> str:
    """TOP_K_SIMILAR -> --top-k-similar"""
    return "--" + name.lower().replace("_", "-")


def _closest(name: str, spell) -> str:
    names = [spell(n) for n in defaults()]
    match = difflib.get_close_matches(spell(name), names, n=1, cutoff=0.5)
    return f"; did you mean {match[0]}?" if match else ""


def parse_value(name: str, raw: Any, source: str) -> Any:
    """Parse `raw` to the type of setting `name`'s default; UserError if it does not fit."""
    default = defaults()[name]
    where = {"env": ENV_PREFIX + name, "cli": flag(name)}.get(source, name.lower())
    kind = type(default)
    if isinstance(raw, kind) and not (kind is int and isinstance(raw, bool)):
        return raw
    if kind is float and isinstance(raw, int) and not isinstance(raw, bool):
        return float(raw)
    if kind is str and isinstance(raw, (int, float)) and not isinstance(raw, bool):
        return str(raw)  # near_duplicate_threshold=0.9: a number where a word may go too
    if not isinstance(raw, str):
        raise UserError(f"{where}: expected {kind.__name__}, got {type(raw).__name__} {raw!r}")
    text = raw.strip()
    if kind is bool:
        low = text.lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise UserError(f"{where}: expected true or false, got {raw!r}")
    if kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            noun = "an integer" if kind is int else "a number"
            raise UserError(f"{where}: expected {noun}, got {raw!r}") from None
    return raw


_SIZE = re.compile(r"\d+(\.\d+)?\s*([KMG]i?B)?", re.IGNORECASE)


def parse_max_memory(text: str) -> dict[int | str, int | str]:
    """VLM_MAX_MEMORY "0=20GiB,cpu=60GiB" -> {0: "20GiB", "cpu": "60GiB"} (accelerate's
    max_memory); {} for "". UserError for another form."""
    limits: dict[int | str, int | str] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, _, size = (s.strip() for s in part.partition("="))
        if not (key.isdigit() or key.lower() == "cpu") or not _SIZE.fullmatch(size):
            raise UserError(f"--vlm-max-memory: {part!r} is not DEVICE=SIZE with DEVICE a GPU "
                            "index or cpu and SIZE like 20GiB (e.g. 0=20GiB,cpu=60GiB)")
        limits[int(key) if key.isdigit() else "cpu"] = int(size) if size.isdigit() else \
            size.replace(" ", "").upper().replace("IB", "iB")
    return limits


def _check(values: dict[str, Any]) -> None:
    """Range checks that do not need the data set."""
    for name in ("EXPERIMENT_SAMPLES", "MAX_NEW_TOKENS", "NUM_BEAMS", "BATCH_SIZE"):
        if values[name] < 1:
            raise UserError(f"{flag(name)} must be at least 1, got {values[name]}")
    for name in ("TOP_K_SIMILAR", "CAPTIONS_PER_NEIGHBOUR", "VLM_IMAGE_LONGEST_EDGE"):
        if values[name] < 0:
            raise UserError(f"{flag(name)} must be 0 or more, got {values[name]}")
    if not values["SPLIT"].strip():
        raise UserError("--split must be seeded, karpathy, all or the name of a split the "
                        "data set ships (e.g. test)")
    if values["TEMPERATURE"] <= 0:
        raise UserError(f"--temperature must be positive, got {values['TEMPERATURE']}")
    device = values["DEVICE"]
    if not (device in _CHOICES["DEVICE"] and device != "cuda:N"
            or device.startswith("cuda:") and device[5:].isdigit()):
        raise UserError(f"--device must be {_one_of('DEVICE')}, got {device!r}")
    for name, value in (("DTYPE", values["DTYPE"]), ("MEMORY", values["MEMORY"]),
                        ("NEIGHBOUR_SELECTION", values["NEIGHBOUR_SELECTION"]),
                        ("RETRIEVE", values["RETRIEVE"]),
                        ("CAPTION_DATASTORE_INDEX", values["CAPTION_DATASTORE_INDEX"]),
                        ("LOG_LEVEL", values["LOG_LEVEL"].upper())):
        if value not in _CHOICES[name]:
            raise UserError(f"{flag(name)} must be {_one_of(name)}, got {values[name]!r}")
    if values["VLM_DEVICE_MAP"] not in ("", "auto"):
        raise UserError(f"--vlm-device-map must be '' (all on --device) or auto, got "
                        f"{values['VLM_DEVICE_MAP']!r}")
    if parse_max_memory(values["VLM_MAX_MEMORY"]) and not values["VLM_DEVICE_MAP"]:
        raise UserError("--vlm-max-memory needs --vlm-device-map auto")
    if "{context}" not in values["PROMPT_TEMPLATE"]:
        raise UserError("--prompt-template must contain {context}")
    for name in ("MMR_LAMBDA", "DEDUP_THRESHOLD"):
        if not 0 <= values[name] <= 1:
            raise UserError(f"{flag(name)} must be between 0 and 1, got {values[name]}")
    if values["CAPTION_DATASTORE_ONLY"] and not values["CAPTION_DATASTORE"]:
        raise UserError("--caption-datastore-only needs --caption-datastore FILE")
    if values["CAPTION_DATASTORE"]:  # a missing corpus before any model loads
        path = Path(values["CAPTION_DATASTORE"]).expanduser()
        if path.suffix.lower() not in CORPUS_SUFFIXES:
            raise UserError(f"--caption-datastore {path}: expected a .txt, .jsonl, .csv or "
                            ".parquet file")
        if not path.is_file():
            raise UserError(f"--caption-datastore {path}: no such file")
    threshold = values["NEAR_DUPLICATE_THRESHOLD"]
    if threshold != "auto" and _unit_number(threshold) is None:
        raise UserError("--near-duplicate-threshold must be auto or a cosine between 0 (off) "
                        f"and 1, got {threshold!r}")


def _unit_number(text: str) -> float | None:
    try:
        number = float(text)
    except ValueError:
        return None
    return number if 0 <= number <= 1 else None


# NEAR_DUPLICATE_THRESHOLD "auto" in batch evaluation runs (see its comment above).
AUTO_BATCH_THRESHOLD = 0.95


def _merge(values: dict[str, Any], overrides: Mapping[str, Any], source: str) -> dict[str, Any]:
    """`values` with `overrides` (by any-case name, from `source`) parsed and checked."""
    values = dict(values)
    for key, raw in overrides.items():
        name = key.upper()
        if name not in values:
            if source == "env":
                hint = _closest(name, lambda n: ENV_PREFIX + n)
                raise UserError(f"unknown setting {ENV_PREFIX}{name}{hint}")
            hint = _closest(name, str.lower)
            raise UserError(f"unknown setting {key!r}{hint}")
        values[name] = parse_value(name, raw, source)
    _check(values)
    return values


# The settings whose "auto" _finish_one turns into a value (the caption prompts are
# finished from the caption model or the database: _finish).
_AUTO_FINISHED = ("MEMORY", "NEAR_DUPLICATE_THRESHOLD", "DEVICE", "DTYPE")


def finish_value(name: str, value: Any, context: str) -> Any:
    """What setting `name` holds in `context`: "auto" made a value (see each setting's
    comment above), a number given as text made a number."""
    if name == "MEMORY":
        return ("growing" if context == "experiment" else "frozen") if value == "auto" else value
    if name == "NEAR_DUPLICATE_THRESHOLD":
        if value == "auto":
            return AUTO_BATCH_THRESHOLD if context == "batch" else 0.0
        return float(value)
    if name == "DEVICE":
        return _device_and_dtype(value, "auto")[0]
    if name == "DTYPE":  # on the device "auto" chooses
        return _device_and_dtype("auto", value)[1]
    return value


def _device_and_dtype(device: str, dtype: str) -> tuple[str, str]:
    """DEVICE and DTYPE finished: ("cuda", "bfloat16"), ("cpu", "float32"), ... (asked
    once per process; torch only where the machine may have a GPU)."""
    key = (device, dtype)
    if key not in _DEVICES:
        from device import resolve_names
        _DEVICES[key] = resolve_names(device, dtype)
    return _DEVICES[key]


_DEVICES: dict[tuple[str, str], tuple[str, str]] = {}


def _finish(values: dict[str, Any], context: str, given: frozenset[str],
            recorded: Mapping[str, Any]) -> "Settings":
    """Settings with every "auto" made a value for `context`; `recorded` (what a
    database or captioned folder holds, by setting name) fills what was not given."""
    if context not in CONTEXTS:
        raise ValueError(f"context must be one of {CONTEXTS}, got {context!r}")
    raw = dict(values)
    finished = dict(values)
    recorded = dict(recorded)
    source = recorded.pop("", "")
    for name, value in recorded.items():
        if name not in given:
            finished[name] = value
    finished["DEVICE"], finished["DTYPE"] = _device_and_dtype(finished["DEVICE"],
                                                              finished["DTYPE"])
    for name in ("MEMORY", "NEAR_DUPLICATE_THRESHOLD"):
        finished[name] = finish_value(name, finished[name], context)
    from caption_embedder import finish_prompts
    finished["CAPTION_QUERY_PROMPT"], finished["CAPTION_DOCUMENT_PROMPT"] = finish_prompts(
        finished["CAPTION_EMBEDDING_MODEL"], finished["CAPTION_QUERY_PROMPT"],
        finished["CAPTION_DOCUMENT_PROMPT"])
    return Settings(**{name.lower(): value for name, value in finished.items()},
                    context=context, given=frozenset(given), raw=raw,
                    recorded=recorded, source=source)


def env_overrides(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """RECAP_* variables of `env` (default os.environ), keyed by setting name."""
    env = os.environ if env is None else env
    return {k[len(ENV_PREFIX):]: v for k, v in env.items() if k.startswith(ENV_PREFIX)}


def resolve(context: str = "experiment", cli: Mapping[str, Any] | None = None,
            env: Mapping[str, str] | None = None, *, folder: str | None = None,
            **overrides: Any) -> Settings:
    """The finished settings of an entry point (`context`, one of CONTEXTS):
    defaults < RECAP_* environment < CLI values < keyword arguments, then every
    "auto" made a value. Where DB_DIR holds a database (or `folder`, a captioned
    folder, has one), what it records (its models, data set, caption prompts, the
    captioner of its last caption) fills the settings not given, logged in two
    lines; a given model that differs is one line naming both."""
    values = _merge(defaults(), env_overrides(env), "env")
    given = set(env_overrides(env).keys())
    for source, more in (("cli", cli or {}), ("keyword", overrides)):
        values = _merge(values, more, source)
        given |= {k.upper() for k in more}
    from db_manager import recorded_settings
    recorded = recorded_settings(values, frozenset(given), folder)
    settings = _finish(values, context, frozenset(given), recorded)
    log_adopted(settings)
    return settings


def log_adopted(settings: Settings) -> None:
    """Two lines saying which settings came from the database, where any did (resolve
    logs them; a command line logs them again once its logging is set up)."""
    shown = {name: value for name, value in settings.recorded.items()
             if value != settings.raw.get(name)}
    if shown:
        log.info("using the database's settings: %s",
                 ", ".join(f"{k.lower()}={v!r}" for k, v in shown.items()))
        log.info("(%s records them; name a setting to use another value, and another "
                 "--db-dir for other models)", settings.source)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, not usage + traceback
        raise UserError(message)


def make_parser(prog: str, description: str) -> argparse.ArgumentParser:
    """An argument parser with every setting as a flag; errors raise UserError."""
    parser = _Parser(prog=prog, description=description, allow_abbrev=False,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_setting_flags(parser)
    return parser


def configure_logging(settings: Settings) -> None:
    """The command-line programs' logging: LOG_LEVEL, time, level, module, message."""
    logging.basicConfig(level=settings.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    log_adopted(settings)


def add_setting_flags(parser: argparse.ArgumentParser) -> None:
    """One --kebab-case flag per setting; its help is the setting's meaning (the first
    sentence of its comment in this file), its choices and its default (no torch import)."""
    group = parser.add_argument_group("settings (also RECAP_<NAME> environment variables)")
    meanings = _meanings()
    for name, default in defaults().items():
        kind = "true|false" if isinstance(default, bool) else type(default).__name__.upper()
        values = f"choices: {', '.join(choices(name))}; " if choices(name) else ""
        text = f"{meanings.get(name, '').rstrip('.')} ({values}default: {default!r})".strip()
        group.add_argument(flag(name), dest=f"setting_{name}", metavar=kind, default=None,
                           help=text.replace("%", "%%"))


def _meanings() -> dict[str, str]:
    """Each setting's meaning: the first sentence of the comment right above its
    constant in this file (section rules "# --- ..." left out)."""
    meanings: dict[str, str] = {}
    comment: list[str] = []
    with open(__file__, encoding="utf-8") as source:
        for line in source:
            if line.startswith("#"):
                if not line.startswith("# ---"):
                    comment.append(line[1:].strip())
                continue
            name = re.match(r"([A-Z][A-Z0-9_]*)\s*[:=]", line)
            if name and comment:
                meanings[name.group(1)] = _first_sentence(" ".join(comment))
            comment = []
    return meanings


def _first_sentence(text: str) -> str:
    # A full stop after a word, a number, a bracket or a quote, followed by a space
    # ("0 .. N" and "e.g. x" are no sentence ends).
    for end in re.finditer(r"(?<=[\w)\]\"'`])\.(?=\s|$)", text):
        if not re.search(r"\b(e\.g|i\.e|etc|vs)$", text[:end.start()]):
            return text[:end.end()]
    return text


def parse_cli(parser: argparse.ArgumentParser, argv: list[str] | None = None,
              context: str | Callable[[argparse.Namespace], str] = "experiment",
              folder: Callable[[argparse.Namespace], str | None] | None = None
              ) -> tuple[argparse.Namespace, Settings]:
    """Parse `argv`; return the namespace and the settings resolved for `context` (an
    entry point's name, or a function of the parsed options that gives it) and the
    captioned folder `folder` gives, if any.

    An unknown option raises UserError naming the closest valid option.
    """
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        name = unknown[0].split("=", 1)[0]
        options = [o for a in parser._actions for o in a.option_strings]
        match = difflib.get_close_matches(name, options, n=1, cutoff=0.5)
        hint = f"; did you mean {match[0]}?" if match else f" (see {parser.prog} --help)"
        what = "option" if name.startswith("-") else "argument"
        raise UserError(f"unknown {what} {name}{hint}")
    cli = {k[len("setting_"):]: v for k, v in vars(args).items()
           if k.startswith("setting_") and v is not None}
    where = context(args) if callable(context) else context
    return args, resolve(where, cli=cli, folder=folder(args) if folder else None)


Settings = _settings_class()
