"""Baselines and ablations: every variant over the same experiment images, scored with the
same metrics, in one table.

    python -m bench.ablation                                  # every variant, first 50 images
    python -m bench.ablation --indices 0-399                  # all 400 (hours on a CPU)
    python -m bench.ablation --all --batch-size 8             # the same, every experiment image
    python -m bench.ablation --variants baseline no-retrieval nn-copy k=1 k=3 --indices 0-49
    python -m bench.ablation --list-variants                  # names and definitions
    python -m bench.ablation --vlm-model-name HuggingFaceTB/SmolVLM-256M-Instruct --json

Writes OUT_DIR/ablation.md (the machine, the settings, one table row per variant:
BLEU-1, BLEU-4, METEOR, ROUGE-L, CIDEr-D, CLIPScore, RefCLIPScore, embedding similarity,
verbatim copies,
captions/s, s/caption), OUT_DIR/ablation.json (the raw numbers, and every variant's
prompts, neighbours, captions and per-image scores) and OUT_DIR/ablation.png (grouped
bars of CIDEr-D and BLEU-4 per variant). OUT_DIR is --out-dir, default RESULTS_DIR.
The three files are rewritten after each variant, so a long run that stops early
leaves the variants it finished (marked "in progress"). Every setting of config.py is
a flag too (--top-k-similar, --vlm-model-name, --batch-size, ...), as in main.py.

Variants (k = TOP_K_SIMILAR, cpn = CAPTIONS_PER_NEIGHBOUR, "training pool" = the
database rows of kind "train", "the prompt" = prompt_generator.build_prompt with
PROMPT_TEMPLATE / PROMPT_TEMPLATE_NO_CONTEXT, exactly as the pipeline builds it):

    baseline            the pipeline: the k most similar images by CLIP image-image cosine
                        (never the query itself), cpn human captions of each, most similar
                        first. Memory: MEMORY ("auto" means frozen, as in batch runs).
    no-retrieval        the VLM with the plain PROMPT_TEMPLATE_NO_CONTEXT (k = 0).
    nn-copy             no VLM: the first human caption of the nearest training image
                        (retrieval-only lower bound).
    random-neighbours   k training images drawn at random (never the query; numpy
                        default_rng seeded with RANDOM_SEED and the experiment index, so
                        an image gets the same draw whichever subset is run), cpn captions
                        each, in the order drawn: is it similarity that helps?
    oracle-references   the image's own references minus one held out, in the prompt
                        (upper-bound sanity check). Scoring: see below.
    k=0, k=1, k=3, k=5, k=10
                        baseline with that many neighbours (k=0 is no-retrieval).
    cpn=1, cpn=all      baseline with 1 / every human caption of each neighbour.
    memory=frozen       baseline retrieving from the training pool only.
    memory=growing      the seed's growing memory, simulated in this process: the images
                        are captioned in index order, and after each is captioned its CLIP
                        embedding and generated caption join an in-memory copy of the
                        training pool, so later images can retrieve it (with its generated
                        caption, as the pipeline's captions_of gives it). It starts from the
                        training pool, not from experiments stored in the database. Images
                        share a generate call only while none of them retrieves another of
                        the same batch: the batch is cut just before such an image, so every
                        image sees exactly the memory a one-at-a-time run would give it.
    retrieve-captions   SmallCap's retrieval, the pipeline's RETRIEVE "captions"
                        (retrieval.nearest_captions): the k training captions nearest to
                        the image by CLIP image-text cosine (the query's CLIP image
                        embedding against each caption's CLIP text embedding), chosen by
                        NEIGHBOUR_SELECTION over their text vectors, one per prompt line.
                        The captions' text vectors are made once and kept in
                        DB_DIR/clip_text_vectors (caption_datastore.py).
    retrieve-captions-corpus
                        the same from the corpus of --caption-datastore FILE alone (no
                        memory captions; CAPTION_DATASTORE_ONLY). Left out, with a
                        warning, when no --caption-datastore is given.
    image-to-caption    retrieve-captions with k x cpn captions: as many prompt lines as
                        the baseline's.
    sample-k            k of the 2k most similar images sampled at random (default_rng
                        seeded with RANDOM_SEED and the image id), kept in similarity order,
                        cpn captions each (reported to reduce copying of tokens most
                        retrieved captions share): NEIGHBOUR_SELECTION "sample".
    mmr                 baseline with NEIGHBOUR_SELECTION "mmr": maximal marginal relevance
                        over the image vectors (MMR_LAMBDA) among the 4k nearest.
    dedup               baseline with NEIGHBOUR_SELECTION "dedup": the nearest images,
                        skipping one within DEDUP_THRESHOLD (image or caption cosine) of
                        one already chosen.
    near-dup-guard      baseline with the leak guard: training images with a CLIP cosine of
                        at least 0.95 to the query (NEAR_DUPLICATE_THRESHOLD "auto" in a
                        batch run) are never retrieved. With NEAR_DUPLICATE_THRESHOLD
                        "auto" only this row is guarded, so it shows what near-twins in
                        the training pool do to the scores; a number guards every
                        image→image row.

Every image→image variant retrieves through the pipeline's one retrieval
(retrieval.nearest with a retrieval.Selection); the baseline follows NEIGHBOUR_SELECTION.
For every variant the table also gives the mean number of distinct scenes among an
image's neighbours (groups of neighbours linked by CLIP image cosines above
DEDUP_THRESHOLD, neighbour_selection.scene_count; for caption rows the memory images
whose captions were retrieved, none for a corpus's) and of distinct words in the
captions of its prompt, so the effect of a selection shows even where the caption
scores of the models cannot be trusted.

Variants whose resolved definition is identical (k=5 when TOP_K_SIMILAR is 5,
memory=frozen, k=0 and no-retrieval) are run once; the other rows say "= <variant>"
and repeat its numbers and time. Generation is deterministic (greedy, or sampling
seeded per generate call), so a second run would give the same captions.

Scoring: metrics.evaluate_captions (COCO caption evaluation, pycocoevalcap) on the
same experiment images for every variant, each generated caption against all of its
image's human references (5 in Flickr8K), corpus scores; embedding similarity is
the cosine to the best reference with CAPTION_EMBEDDING_MODEL; CLIPScore and
RefCLIPScore (clip_score.py) use METRIC_CLIP_MODEL, with the queries' retrieval image
vectors when it is CLIP_MODEL_NAME (skipped, "—", where that model is not available).
CIDEr-D takes its idf from the references of the images evaluated together, so only
rows over the same images compare. A caption that failed (empty, or generation raised) is not scored:
the "images" column counts the scored ones and the failures are listed. A metric
that could not be computed shows "—" with the reason from metrics' "skipped".
"copies" is the share of captions that repeat one of the captions in their prompt
verbatim (after lowercasing and punctuation removal).

Oracle scheme: prompting with references 1..4 and scoring against all 5 would score
the VLM partly against text it was shown, so the oracle holds out reference number
(experiment index mod 5) -- spreading the held-out position over the images -- puts
the other 4 in the prompt and scores the caption against the held-out reference
only. One reference gives lower BLEU/CIDEr-D than five, so the row is not comparable
with the others as is; when baseline runs too, its captions are also scored against
the same held-out references, and the table's footnote gives both numbers.

Time: each row's captions/s and s/caption are the wall time of the variant's own
work (retrieval, prompt, generation; for growing memory also the memory updates),
not of scoring. Work shared by all variants is done once, reported separately and
not in any row: reading the images, one CLIP embedding pass over them, and for the
caption rows building their caption datastore (the CLIP text vectors of its captions,
read from DB_DIR/clip_text_vectors or made once). Models are
loaded once (models.load_models) for the whole grid, and every VLM variant goes through
the pipeline's one caption step (pipeline.caption_batch) with its own retrieval.

Nothing is written to DB_DIR (but the CLIP text vectors of caption datastores, made
once) or to RESULTS_DIR/experiment_*: the data set and the training-pool memory come
from memory.initialize (which seeds DB_DIR on a first run, as any command would) and
are only read.

Only numbers from the real pretrained checkpoints mean anything. The test suite runs
this harness on tiny random-weight models and a generated data set: their numbers
are meaningless and only show that the mechanics work. With the real weights in the
Hugging Face cache: `python -m bench.ablation --indices 0-399` (hours on a CPU;
`--vlm-image-longest-edge 384` or a smaller VLM is much faster).

Exit status: 0 when every caption of every variant was made; 1 when some failed
(the files are still written, with the failures listed) or on an error a user can
fix (one `ablation: error:` line); 2 for a bad option, variant name or index spec;
130 when interrupted.
"""

from __future__ import annotations

import copy
import difflib
import json
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import config  # noqa: E402
import pipeline  # noqa: E402  (cheap: it imports torch only when a model is needed)
from batch_runner import indices_spec  # noqa: E402,F401  (also this module's, as before)
from memory import Memory, caption_vector_lookup, embed_missing_captions, initialize
from models import experiment_count, load_models, versions
from retrieval import Context, Neighbour, Retriever, Selection, nearest
from experiment import check_writable  # noqa: E402
from errors import UsageError, UserError, cli_failure  # noqa: E402

log = logging.getLogger("ablation")

PROG = "python -m bench.ablation"
DEFAULT_IMAGES = 50               # default subset: the first 50 experiment images
ALL = "all"                       # captions per neighbour: every caption
MD_NAME, JSON_NAME, PNG_NAME = "ablation.md", "ablation.json", "ablation.png"
REAL_COMMAND = "python -m bench.ablation --indices 0-399"
TABLE_METRICS = ("BLEU-1", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr-D", "CLIPScore",
                 "RefCLIPScore")
CHART_METRICS = ("CIDEr-D", "BLEU-4")
# Salts of the per-image random streams, so two variants never share a draw.
_SALT = {"random": 1}


# --- the variants ----------------------------------------------------------------------

@dataclass(frozen=True)
class Variant:
    """A named variant. None means "the setting's value" (TOP_K_SIMILAR, ...)."""

    name: str
    context: str                       # image | none | nn-copy | random | oracle | caption
    description: str
    k: int | None = None               # neighbours; None: TOP_K_SIMILAR
    per_neighbour: int | str | None = None   # captions per neighbour; None: CAPTIONS_PER_NEIGHBOUR
    memory: str | None = None          # frozen | growing; None: MEMORY (auto -> frozen)
    selection: str | None = None       # top | mmr | dedup | sample; None: NEIGHBOUR_SELECTION
    guard: bool = False                # the near-duplicate guard even when the setting is auto
    corpus: bool = False               # caption rows: CAPTION_DATASTORE alone, not the memory's


def _k_variant(k: int) -> Variant:
    return Variant(f"k={k}", "image", f"baseline with k={k} neighbours"
                   + (" (the plain prompt, as no-retrieval)" if k == 0 else ""), k=k)


VARIANTS: dict[str, Variant] = {v.name: v for v in (
    Variant("baseline", "image",
            "the pipeline: k nearest images by CLIP image-image cosine, cpn human captions "
            "of each in the prompt"),
    Variant("no-retrieval", "none", "the VLM with the plain describe-the-image prompt "
                                    "(PROMPT_TEMPLATE_NO_CONTEXT, k=0)", k=0),
    Variant("nn-copy", "nn-copy", "no VLM: the first caption of the nearest training image "
                                  "(retrieval-only lower bound)", k=1),
    Variant("random-neighbours", "random",
            "k random training images (seeded; never the query), cpn captions each"),
    Variant("oracle-references", "oracle",
            "the image's own references minus one held out (number index mod 5) in the "
            "prompt; scored against the held-out one (upper-bound sanity check)"),
    *(_k_variant(k) for k in (0, 1, 3, 5, 10)),
    Variant("cpn=1", "image", "baseline with 1 caption per neighbour", per_neighbour=1),
    Variant("cpn=all", "image", "baseline with every caption of each neighbour",
            per_neighbour=ALL),
    Variant("memory=frozen", "image", "baseline retrieving from the training pool only",
            memory="frozen"),
    Variant("memory=growing", "image",
            "baseline with the growing memory: earlier images of this variant (index order) "
            "join the memory with their generated captions (simulated in memory)",
            memory="growing"),
    Variant("retrieve-captions", "caption",
            "SmallCap's retrieval (RETRIEVE captions): the k training captions nearest to the "
            "image by CLIP image-text cosine"),
    Variant("retrieve-captions-corpus", "caption",
            "retrieve-captions from the --caption-datastore corpus alone (no images)",
            corpus=True),
    Variant("image-to-caption", "caption",
            "retrieve-captions with k x cpn captions (as many prompt lines as the baseline)",
            per_neighbour="lines"),
    Variant("sample-k", "image",
            "k of the 2k nearest images sampled at random (seeded), in similarity order, "
            "cpn captions each", selection="sample"),
    Variant("mmr", "image", "baseline choosing its neighbours by maximal marginal relevance "
                            "(MMR_LAMBDA) among the 4k nearest", selection="mmr"),
    Variant("dedup", "image", "baseline skipping a neighbour that is a near-duplicate "
                              "(DEDUP_THRESHOLD) of one already chosen", selection="dedup"),
    Variant("near-dup-guard", "image", "baseline never retrieving a training image this "
                                       "similar to the query (the leak guard, 0.95)",
            guard=True),
)}


@dataclass(frozen=True)
class Plan:
    """A variant resolved against the settings: what it does, exactly."""

    name: str
    context: str
    k: int | None
    per_neighbour: int | str | None
    memory: str | None
    selection: str | None = None       # image -> image: the pipeline's NEIGHBOUR_SELECTION
    near_duplicate_threshold: float | None = None   # image -> image: the guard, 0 = off
    corpus: str | None = None          # caption rows: the corpus read alone (else the memory's)

    @property
    def signature(self) -> tuple:
        """Equal for variants that make the same captions."""
        return (self.context, self.k, self.per_neighbour, self.memory, self.selection,
                self.near_duplicate_threshold, self.corpus)

    @property
    def uses_vlm(self) -> bool:
        return self.context != "nn-copy"

    def definition(self) -> dict[str, Any]:
        return {"context": self.context, "k": self.k, "captions_per_neighbour": self.per_neighbour,
                "memory": self.memory, "neighbour_selection": self.selection,
                "near_duplicate_threshold": self.near_duplicate_threshold,
                **({"caption_datastore": self.corpus or "memory"}
                   if self.context == "caption" else {})}

    def summary(self) -> str:
        """The resolved definition in a few words, for the report."""
        cpn = "every caption" if self.per_neighbour == ALL else (
            f"{self.per_neighbour} caption{'s' if self.per_neighbour != 1 else ''}")
        return {
            "none": "plain prompt, no retrieval",
            "nn-copy": "nearest training image's first caption, no VLM",
            "oracle": "own references minus the held-out one; scored against the held-out one",
            "image": f"image→image, k={self.k} ({self._selected()}), {cpn} per neighbour, "
                     f"{self.memory} memory" + (
                         f", no image with cosine >= {self.near_duplicate_threshold:g}"
                         if self.near_duplicate_threshold else ""),
            "random": f"{self.k} random training images, {cpn} per neighbour",
            "caption": f"image→caption (CLIP text), {self.k} captions ({self._selected()}) "
                       f"from {self.corpus or 'the training captions'}" + (
                           f", no image with cosine >= {self.near_duplicate_threshold:g}"
                           if self.near_duplicate_threshold else ""),
        }[self.context]


    def _selected(self) -> str:
        return {"top": "the nearest", "mmr": "by MMR among the nearest",
                "dedup": "the nearest, near-duplicates skipped",
                "sample": f"sampled from the top {2 * (self.k or 0)}"}[self.selection or "top"]

    def selection_for(self, settings: config.Settings) -> "Selection":
        """The pipeline's selection for this image -> image or image -> caption plan."""
        return Selection(self.k or 0, self.selection or "top", settings.mmr_lambda,
                                  settings.dedup_threshold, self.near_duplicate_threshold or 0.0,
                                  settings.random_seed)


def resolve_plan(variant: Variant, settings: config.Settings) -> Plan:
    """The variant with the settings filled in; the fields that do not matter are None."""
    k = settings.top_k_similar if variant.k is None else variant.k
    cpn = (settings.captions_per_neighbour if variant.per_neighbour is None
           else variant.per_neighbour)
    memory = variant.memory or settings.memory
    context = variant.context
    if context in ("image", "random", "caption") and (k == 0 or cpn == 0 or (
            variant.per_neighbour == "lines" and settings.captions_per_neighbour == 0)):
        context = "none"  # no captions to show: build_prompt gives the plain prompt
    if context == "none":
        return Plan(variant.name, "none", 0, None, None)
    if context == "nn-copy":
        return Plan(variant.name, "nn-copy", 1, None, "frozen")
    if context == "oracle":
        return Plan(variant.name, "oracle", None, None, None)
    if context == "random":
        return Plan(variant.name, "random", k, cpn, "frozen")
    # "auto" guards only the near-dup-guard row here, so it shows what the guard does;
    # a threshold given guards every image -> image and image -> caption row.
    given = "NEAR_DUPLICATE_THRESHOLD" in settings.given
    guard = settings.near_duplicate_threshold if given else 0.0
    if variant.guard:
        guard = guard or config.AUTO_BATCH_THRESHOLD
    if context == "caption":  # one caption per prompt line; image-to-caption: k x cpn lines
        lines = k * settings.captions_per_neighbour if variant.per_neighbour == "lines" else k
        corpus = settings.caption_datastore if variant.corpus else None
        return Plan(variant.name, "caption", lines, 1, "frozen",
                    variant.selection or settings.neighbour_selection, guard,
                    corpus=corpus or ("" if variant.corpus else None))
    return Plan(variant.name, context, k, cpn, memory,
                variant.selection or settings.neighbour_selection, guard)


def select_variants(names: Sequence[str] | None) -> list[str]:
    """Variant names (commas allowed, "all" = every variant), checked, in registry order."""
    if not names:
        return list(VARIANTS)
    wanted: list[str] = []
    for raw in names:
        for name in (n.strip() for n in str(raw).split(",")):
            if not name:
                continue
            if name.lower() == "all":
                wanted.extend(VARIANTS)
                continue
            if name not in VARIANTS:
                lower = {v.lower(): v for v in VARIANTS}
                if name.lower() in lower:
                    name = lower[name.lower()]
                else:
                    match = difflib.get_close_matches(name, list(VARIANTS), n=1, cutoff=0.4)
                    hint = (f"; did you mean {match[0]!r}?" if match else
                            f"; choose from {', '.join(VARIANTS)}")
                    raise UserError(f"unknown variant {name!r}{hint}")
            wanted.append(name)
    if not wanted:
        raise UserError(f"--variants is empty; choose from {', '.join(VARIANTS)}")
    chosen = set(wanted)
    return [name for name in VARIANTS if name in chosen]


def default_indices(samples: int) -> list[int]:
    return list(range(min(DEFAULT_IMAGES, samples)))


# --- the shared work: data, models, query images, training pool ---------------------------

@dataclass
class Query:
    index: int            # experiment index
    sample: Any           # dataset_loader.Sample
    image: Any            # PIL image
    vector: Any           # CLIP image embedding (D,)


class _Shared:
    """What every variant uses: settings, data, models, the queries and the training pool."""

    def __init__(self, settings: config.Settings, indices: Sequence[int],
                 progress: bool = False):
        import numpy as np

        self.settings = settings
        self.progress = progress
        self.seconds: dict[str, float] = {}
        self.dataset, self.db = initialize(settings)
        self.models = load_models(settings).load_all()
        self.image_embedder = self.models.image_embedder
        self.caption_embedder = self.models.caption_embedder
        self.captioner = self.models.captioner
        described = self.models.describe()  # the resolved device and dtype, for the report
        self.device = (described["resolved_device"], described["resolved_dtype"])

        start = time.perf_counter()
        self.queries: list[Query] = []
        self.unreadable: list[dict[str, Any]] = []
        images = []
        for index in indices:
            sample = self.dataset.experiment_sample(index)
            try:
                images.append((index, sample, self.dataset.load_image(sample)))
            except UserError as exc:   # the same images for every variant: leave it out of all
                log.warning("experiment %d (%s) left out: %s", index, sample.image_id, exc)
                self.unreadable.append({"experiment_index": index, "image_id": sample.image_id,
                                        "error": str(exc)})
        self.seconds["load_images"] = time.perf_counter() - start
        if not images:
            raise UserError("none of the chosen experiment images could be read")
        start = time.perf_counter()
        vectors = self.image_embedder.embed([image for _, _, image in images])
        self.seconds["embed_images"] = time.perf_counter() - start
        self.queries = [Query(i, s, im, v) for (i, s, im), v in zip(images, vectors)]

        train = self.db.image_rows("train")
        if not len(train):
            raise UserError(f"the memory in {settings.db_dir} has no training images")
        self.train_ids = list(train.ids)
        self.train_vectors = np.asarray(train.vectors, dtype=np.float32)
        self._caption_vector_of = caption_vector_lookup(self.db)
        self._clip_scorer = None

    def clip_scorer(self):
        """CLIPScore's scorer for every variant (items keyed by experiment index): the
        queries' images, and their retrieval vectors when METRIC_CLIP_MODEL is the CLIP."""
        if self._clip_scorer is None:
            import clip_score
            by_key = {str(q.index): q for q in self.queries}
            self._clip_scorer = clip_score.scorer_for(
                self.settings, retrieval=self.image_embedder,
                image_of=lambda key: by_key[key].image,
                known_vector=lambda key: by_key[key].vector)
        return self._clip_scorer

    def memory(self, growing: bool) -> Memory:
        """The training pool; growing: the images captioned join it (in this process only)."""
        return Memory(self.train_ids, self.train_vectors, self.db.captions_of,
                               ["train"] * len(self.train_ids), growing=growing,
                               caption_vector_of=self._caption_vector_of)

    def caption_models(self, plan: Plan):
        """The models with the settings of a caption row (RETRIEVE "captions", its
        datastore): the same loaded models, another view of the settings."""
        corpus = {"caption_datastore": plan.corpus, "caption_datastore_only": True} \
            if plan.corpus else {"caption_datastore": "", "caption_datastore_only": False}
        return load_models(self.settings.replace(retrieve="captions", **corpus))

    def caption_datastore(self, plan: Plan) -> None:
        """Build (or read) a caption row's datastore once, in the shared time."""
        from caption_datastore import datastore_for
        start = time.perf_counter()
        store = datastore_for(self.caption_models(plan), self.memory(growing=False))
        key = f"caption_datastore ({plan.corpus or 'training captions'}, {len(store)})"
        self.seconds[key] = self.seconds.get(key, 0.0) + time.perf_counter() - start


# --- running one variant ------------------------------------------------------------------

def _per(per_neighbour: int | str | None) -> int:
    return sys.maxsize if per_neighbour == ALL else int(per_neighbour or 0)


def _rng(settings: config.Settings, kind: str, index: int):
    import numpy as np
    return np.random.default_rng([settings.random_seed, _SALT[kind], index])


def _references(plan: Plan, query: Query) -> tuple[list[str], int | None]:
    """The references a caption is scored against, and the oracle's held-out number."""
    references = list(query.sample.captions)
    if plan.context == "oracle" and len(references) >= 2:
        held = query.index % len(references)
        return [references[held]], held
    return references, None


def retriever(plan: Plan, shared: _Shared, by_id: dict[str, Query]) -> Retriever:
    """How the variant's images find their context: the pipeline's retrieval
    (retrieval.nearest) or the variant's own, for the one caption step."""
    from retrieval import retriever as pipeline_retriever

    selection = plan.selection_for(shared.settings) \
        if plan.context in ("image", "caption") else None
    captions = pipeline_retriever(shared.caption_models(plan), selection, references=lambda
                                  image_id: by_id[image_id].sample.captions) \
        if plan.context == "caption" else None

    def neighbour(rank: int, image_id: str, score: float, captions) -> Neighbour:
        return Neighbour(rank, image_id, float(score), tuple(captions))

    def retrieve(memory: Memory, image_id: str, vector) -> Context:
        query = by_id[image_id]
        if plan.context == "none":
            return Context(())
        if plan.context == "oracle":
            references = list(query.sample.captions)
            if len(references) < 2:        # nothing is left to show once one is held out
                return Context(())
            held = query.index % len(references)
            shown = tuple(references[:held] + references[held + 1:])
            return Context((), captions=(shown,), per_neighbour=len(shown))
        if plan.context == "random":
            pool = [n for n, i in enumerate(shared.train_ids) if i != image_id]
            rows = _rng(shared.settings, "random", query.index).choice(
                len(pool), size=min(plan.k, len(pool)), replace=False)
            return Context(tuple(
                neighbour(r + 1, shared.train_ids[pool[n]],
                          shared.train_vectors[pool[n]] @ vector,
                          shared.db.captions_of(shared.train_ids[pool[n]]))
                for r, n in enumerate(rows)), per_neighbour=_per(plan.per_neighbour))
        if plan.context == "caption":    # the pipeline's retrieval of captions
            return captions(memory, image_id, vector)
        # image -> image: the pipeline's retrieval
        context = nearest(memory, image_id, vector, selection)
        return Context(context.neighbours, per_neighbour=_per(plan.per_neighbour))

    return retrieve


def _neighbour_record(plan: Plan, n: Neighbour, memory: Memory | None
                      ) -> dict[str, Any]:
    record = {"rank": n.rank, "image_id": n.image_id, "score": round(n.score, 6)}
    if plan.context in ("caption", "nn-copy"):
        record["caption"] = n.captions[0] if n.captions else None
    if n.source is not None:
        record["source"] = n.source
    if plan.memory == "growing" and memory is not None:
        record["generated"] = n.image_id in memory.added
    return record


def run_variant(plan: Plan, shared: _Shared, progress: bool = False) -> dict[str, Any]:
    """Captions of every query for one variant (the pipeline's caption step, with the
    variant's retrieval), with the time its own work took."""
    from tqdm.auto import tqdm

    settings = shared.settings
    items: list[dict[str, Any]] = []
    bar = tqdm(total=len(shared.queries), desc=plan.name, unit="img", disable=not progress)
    calls = 0
    start = time.perf_counter()
    if plan.context == "nn-copy":   # no VLM: the nearest training image's first caption
        memory = shared.memory(growing=False)
        for query in shared.queries:
            found = nearest(memory, query.sample.image_id, query.vector, 1).neighbours
            captions = found[0].captions if found else ()
            item = {"experiment_index": query.index, "image_id": query.sample.image_id,
                    "prompt": None, "neighbours": [_neighbour_record(plan, n, None)
                                                   for n in found],
                    "references": list(query.sample.captions),
                    "caption": captions[0] if captions else None}
            if not captions:
                item["error"] = "the nearest training image has no caption"
            items.append(item)
            bar.update()
    else:
        memory = shared.memory(growing=plan.memory == "growing")
        retrieve = retriever(plan, shared, {q.sample.image_id: q for q in shared.queries})
        for first in range(0, len(shared.queries), settings.batch_size):
            chunk = shared.queries[first:first + settings.batch_size]
            batch = pipeline.caption_batch(
                shared.models, [(q.sample.image_id, q.image) for q in chunk], memory,
                retrieve=retrieve, vectors=[q.vector for q in chunk], embed_captions=False)
            calls += batch.generate_calls
            for query, record in zip(chunk, batch.items):
                references, held = _references(plan, query)
                item = {"experiment_index": query.index, "image_id": query.sample.image_id,
                        "references": references}
                if held is not None:
                    item["held_out_reference"] = held
                if isinstance(record, pipeline.Failure):
                    item.update(prompt=None, prompt_captions=[], neighbours=[], caption=None,
                                error=record.error)
                    log.warning("%s: experiment %d (%s) failed: %s", plan.name, query.index,
                                query.sample.image_id, record.error)
                else:
                    item.update(prompt=record.prompt, prompt_captions=list(record.prompt_captions),
                                neighbours=[_neighbour_record(plan, n, memory)
                                            for n in record.neighbours],
                                caption=record.caption, context_used=record.context_used)
                    if record.identical_excluded:
                        item["identical_excluded"] = record.identical_excluded
                items.append(item)
            bar.update(len(chunk))
    seconds = time.perf_counter() - start
    bar.close()
    made = sum(1 for i in items if i["caption"])
    # false: no caption of the row read retrieved captions (nn-copy: no VLM at all)
    used = any(i.get("context_used") for i in items) if plan.context != "nn-copy" else None
    return {"items": items, "seconds": round(seconds, 4), "generate_calls": calls,
            **diversity(items, memory, settings.dedup_threshold),
            "context_used": used,
            "captions": made, "failed": len(items) - made,
            "captions_per_second": round(made / seconds, 4) if made and seconds > 0 else None,
            "seconds_per_caption": round(seconds / made, 4) if made else None}


def diversity(items: Sequence[dict[str, Any]], memory: Memory, threshold: float
              ) -> dict[str, float | None]:
    """Per item and on average: distinct scenes among its neighbours (groups linked by
    image cosines above `threshold`) and distinct words in its prompt's captions.
    Sets each item's "distinct_scenes" / "distinct_words" (None where it has none)."""
    from neighbour_selection import distinct_words, scene_count
    for item in items:   # caption rows: the memory images whose captions were retrieved
        ids = list(dict.fromkeys(n["image_id"] for n in item.get("neighbours") or []
                                 if n["image_id"]))
        item["distinct_scenes"] = scene_count(memory.vectors_of(ids), threshold) if ids \
            else None
        shown = item.get("prompt_captions")
        item["distinct_words"] = distinct_words(shown) if shown else None

    def mean(key: str) -> float | None:
        values = [i[key] for i in items if i[key] is not None]
        return round(sum(values) / len(values), 4) if values else None
    return {"distinct_scenes": mean("distinct_scenes"), "distinct_words": mean("distinct_words")}


# --- scoring ------------------------------------------------------------------------------

def score(items: Sequence[dict[str, Any]], caption_embedder, references_key: str = "references",
          clip_scorer=None) -> dict[str, Any]:
    """metrics.evaluate_captions over the items that have a caption; CLIPScore and
    RefCLIPScore with `clip_scorer` (_Shared.clip_scorer)."""
    import metrics
    ok = [i for i in items if i.get("caption")]
    return metrics.evaluate_captions(
        {str(i["experiment_index"]): i["caption"] for i in ok},
        {str(i["experiment_index"]): i[references_key] for i in ok},
        caption_embedder=caption_embedder, clip_scorer=clip_scorer)


def copied_prompt_caption(items: Sequence[dict[str, Any]]) -> float | None:
    """Share of captions that repeat a caption of their own prompt verbatim (lowercased,
    punctuation removed); None when no item had captions in its prompt."""
    from metrics import fallback_tokenize
    scored, copied = 0, 0
    for item in items:
        shown, caption = item.get("prompt_captions"), item.get("caption")
        if not shown or not caption:
            continue
        scored += 1
        copied += fallback_tokenize(caption) in {fallback_tokenize(c) for c in shown}
    return copied / scored if scored else None


def _metrics_record(result: dict[str, Any]) -> dict[str, Any]:
    """The corpus part of an evaluate_captions result (per-image scores go to the items)."""
    return {k: v for k, v in result.items() if k != "per_image"}


# --- the run ------------------------------------------------------------------------------

def run_ablation(variants: Sequence[str] | None = None, indices: Sequence[int] | None = None,
                 out_dir: str | os.PathLike | None = None, progress: bool = False,
                 settings: config.Settings | None = None, **overrides: Any) -> dict[str, Any]:
    """Run the variants over the experiment images `indices` and write ablation.md,
    ablation.json and ablation.png to `out_dir` (default RESULTS_DIR).

    `variants`: names of VARIANTS (default all); `indices`: experiment indices (default
    the first 50); `settings` (default config.resolve()) with keyword `overrides` on top.
    Returns the report (the content of ablation.json, plus "files").
    """
    from batch_runner import parse_indices

    settings = config.settings_of(settings, overrides, "batch")
    names = select_variants(variants)
    count = experiment_count(settings)
    if indices is None:
        indices = default_indices(count)
    if not indices:
        raise UserError("no experiment images chosen")
    # checked like --indices; index order (the growing memory depends on it)
    indices = sorted(parse_indices(",".join(str(int(i)) for i in indices), count))
    out = Path(settings.results_dir if out_dir is None else out_dir).expanduser()
    check_writable(out)
    plans = [resolve_plan(VARIANTS[n], settings) for n in names]
    if any(plan.corpus == "" for plan in plans):   # a corpus row without a corpus
        named = {n.strip().lower() for v in variants or () for n in str(v).split(",")}
        if "retrieve-captions-corpus" in named:
            raise UserError("retrieve-captions-corpus needs --caption-datastore FILE (a "
                            ".txt, .jsonl, .csv or .parquet of captions)")
        log.warning("leaving out retrieve-captions-corpus: no --caption-datastore FILE given")
        plans = [plan for plan in plans if plan.corpus != ""]
        names = [plan.name for plan in plans]

    overall = time.perf_counter()
    shared = _Shared(settings, indices, progress)
    if any(plan.selection == "dedup" for plan in plans):  # it compares caption vectors too
        embed_missing_captions(shared.caption_embedder, shared.db)
    report = _new_report(settings, shared, names, indices)
    files = {"md": out / MD_NAME, "json": out / JSON_NAME, "png": out / PNG_NAME}
    done: dict[tuple, dict[str, Any]] = {}
    for n, plan in enumerate(plans, start=1):
        same = done.get(plan.signature)
        if same is not None:
            record = copy.deepcopy(same)
            record.update(name=plan.name, description=VARIANTS[plan.name].description,
                          same_as=same["name"])
            log.info("variant %s (%d/%d) is the same as %s: not run again", plan.name, n,
                     len(plans), same["name"])
        else:
            log.info("variant %s (%d/%d): %s", plan.name, n, len(plans), plan.summary())
            if plan.context == "caption":
                shared.caption_datastore(plan)   # shared, once: not in the variant's own time
            record = {"name": plan.name, "description": VARIANTS[plan.name].description,
                      "definition": plan.definition(), "summary": plan.summary(),
                      "same_as": None, **run_variant(plan, shared, progress)}
            result = score(record["items"], shared.caption_embedder,
                           clip_scorer=shared.clip_scorer())
            per_image = result.get("per_image", {})
            for item in record["items"]:
                item["metrics"] = per_image.get(str(item["experiment_index"]), {})
            record["metrics"] = _metrics_record(result)
            record["images"] = result.get("images", 0)
            record["copied_prompt_caption"] = copied_prompt_caption(record["items"])
            done[plan.signature] = record
            log.info("variant %s: %d captions in %.1f s; %s", plan.name, record["captions"],
                     record["seconds"], ", ".join(f"{m} {record['metrics'][m]:.4f}"
                                                  for m in CHART_METRICS if m in record["metrics"]))
        report["variants"].append(record)
        report["shared_seconds"] = {k: round(v, 4) for k, v in shared.seconds.items()}
        report["total_seconds"] = round(time.perf_counter() - overall, 2)
        if plan.context == "oracle" or (plan.name == "baseline" and
                                        any(p.context == "oracle" for p in plans)):
            report["oracle_comparison"] = _oracle_comparison(report, shared.caption_embedder,
                                                             shared.clip_scorer())
        write_outputs(report, files)
    report["complete"] = True
    report["total_seconds"] = round(time.perf_counter() - overall, 2)
    write_outputs(report, files)
    report["files"] = {k: str(v) for k, v in files.items()}
    return report


def _new_report(settings: config.Settings, shared: _Shared, names: list[str],
                indices: list[int]) -> dict[str, Any]:
    from bench.common import machine_info
    found = versions()
    return {
        "title": "Baselines and ablations (bench/ablation.py)",
        "machine": machine_info(),
        "versions": found,
        "settings": settings.to_json(),
        "device": shared.device[0], "dtype": shared.device[1],
        "models": {"vlm": shared.captioner.name, "vlm_family": shared.captioner.family.name,
                   "vlm_uses_context": shared.captioner.uses_context,
                   "clip": shared.image_embedder.name,
                   "caption_embedding": shared.caption_embedder.name},
        "data": {"dataset": settings.dataset_name,
                 "experiment_images": len(shared.dataset.experiment),
                 "training_images": len(shared.train_ids)},
        "variants_requested": names,
        "indices": [q.index for q in shared.queries],
        "indices_requested": indices_spec(indices),
        "image_ids": [q.sample.image_id for q in shared.queries],
        "unreadable_images": shared.unreadable,
        "shared_seconds": {},
        "total_seconds": None,
        "complete": False,
        "oracle_comparison": None,
        "variants": [],
    }


def _oracle_comparison(report: dict[str, Any], caption_embedder, clip_scorer=None
                       ) -> dict[str, Any] | None:
    """Baseline's captions scored the oracle's way (against the held-out reference), so the
    oracle row has a like-for-like partner."""
    rows = {v["name"]: v for v in report["variants"]}
    oracle, baseline = rows.get("oracle-references"), rows.get("baseline")
    if oracle is None or baseline is None:
        return None
    held = {i["experiment_index"]: i["references"] for i in oracle["items"]}
    items = [{**i, "held_out": held[i["experiment_index"]]} for i in baseline["items"]
             if i["experiment_index"] in held]
    result = score(items, caption_embedder, references_key="held_out", clip_scorer=clip_scorer)
    return {"baseline_against_held_out_reference": _metrics_record(result)}


# --- output -------------------------------------------------------------------------------

_SUPERSCRIPT = str.maketrans("0123456789", "⁰¹²³⁴⁵⁶⁷⁸⁹")


def _fmt(value: float | None, digits: int = 4) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def _fmt_rate(value: float | None) -> str:
    if value is None:
        return "—"
    return f"{value:.3g}" if value < 1000 else f"{value:,.0f}"


def render_markdown(report: dict[str, Any]) -> str:
    """ablation.md: the machine, the settings, the table, its footnotes, the definitions."""
    s = report["settings"]
    notes: list[str] = []

    def note(text: str) -> str:
        if text not in notes:
            notes.append(text)
        return str(notes.index(text) + 1).translate(_SUPERSCRIPT)

    variants = report["variants"]
    done = len(variants)
    wanted = len(report["variants_requested"])
    shared = report.get("shared_seconds", {})
    images = len(report["indices"])
    lines = [f"# {report['title']}", "", report["machine"], ""]
    if not report.get("complete"):
        lines += [f"**In progress: {done} of {wanted} variants finished.**", ""]
    generation = ("greedy" if not s["do_sample"] else f"sampling at temperature {s['temperature']}"
                  ) + f", max_new_tokens {s['max_new_tokens']}, num_beams {s['num_beams']}"
    tiles = ("split into tiles, longest edge "
             f"{s['vlm_image_longest_edge'] or 'of the checkpoint'}"
             if s.get("vlm_image_splitting", True) else "one tile per image")
    unreadable = report.get("unreadable_images") or []
    lines += [
        f"- VLM `{report['models']['vlm']}`, CLIP `{report['models']['clip']}`, caption "
        f"embedder `{report['models']['caption_embedding']}` (embedding similarity)."
        + (f" Its family ({report['models']['vlm_family']}) captions the image without "
           "reading the retrieved captions (context_used false in every VLM row), so "
           "retrieval variants cannot change its captions."
           if report["models"].get("vlm_uses_context") is False else ""),
        f"- Data set `{s['dataset_name']}`: {report['data']['experiment_images']} experiment "
        f"images (seed {s['random_seed']}), {report['data']['training_images']} training images "
        f"in the memory.",
        f"- Images: {images} experiment images, indices {indices_spec(report['indices'])}"
        + (f" ({len(unreadable)} unreadable left out of every variant: "
           + ", ".join(f"{u['experiment_index']}" for u in unreadable) + ")" if unreadable else "")
        + ".",
        f"- TOP_K_SIMILAR {s['top_k_similar']}, CAPTIONS_PER_NEIGHBOUR "
        f"{s['captions_per_neighbour']}, MEMORY {s['memory']} (image→image variants other "
        f"than memory=*: {'growing' if s['memory'] == 'growing' else 'frozen'}); "
        f"generation {generation}; VLM "
        f"images {tiles}; batch size {s['batch_size']}; device {report['device']}"
        + (f" ({report['dtype']})" if report.get("dtype") else "") + ".",
        "- Shared work, done once and in no row's time: reading the images "
        f"{shared.get('load_images', 0):.1f} s, CLIP image embedding of the {images} images "
        f"{shared.get('embed_images', 0):.1f} s"
        + "".join(f", {name.replace('_', ' ')} {seconds:.1f} s" for name, seconds
                  in shared.items() if name.startswith("caption_datastore"))
        + f"; total wall time {report.get('total_seconds') or 0:.0f} s including scoring.",
        "",
        "> Only numbers from the real pretrained checkpoints mean anything. Numbers from "
        "random-weight models (such as the tiny models of the test suite) are meaningless: "
        "they only show that the harness works. With the real weights in the Hugging Face "
        f"cache, run `{REAL_COMMAND}` (hours on a CPU).",
        "",
    ]
    header = ["variant", "images", *TABLE_METRICS, "embedding similarity", "copies",
              "scenes", "words", "captions/s", "s/caption"]
    rows = []
    for v in variants:
        m = v["metrics"]
        skipped = m.get("skipped") or {}
        name = v["name"]
        if v.get("same_as"):
            name += f" (= {v['same_as']})"
        if v["definition"]["context"] == "oracle":
            name += " " + note(_oracle_note(report))
        cells = [name, str(v["images"]) + (" " + note(
            f"{v['name']}: {v['failed']} caption(s) failed: " + "; ".join(
                f"{i['experiment_index']}: {i['error']}" for i in v["items"] if i.get("error")))
            if v["failed"] else "")]
        for metric in TABLE_METRICS:
            if metric in m:
                cells.append(_fmt(m[metric]))
            else:
                reason = skipped.get(metric, "not computed")
                cells.append("— " + note(f"{metric}: {reason}"))
        emb = m.get("embedding_similarity")
        cells.append(_fmt(emb["max"]) if isinstance(emb, dict) else
                     "— " + note(f"embedding similarity: "
                                 f"{skipped.get('embedding_similarity', 'not computed')}"))
        copies = v.get("copied_prompt_caption")
        cells.append("—" if copies is None else f"{copies:.0%}")
        cells += [_fmt(v.get("distinct_scenes"), 2), _fmt(v.get("distinct_words"), 1)]
        cells += [_fmt_rate(v["captions_per_second"]), _fmt_rate(v["seconds_per_caption"])]
        rows.append(cells)
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|---|" + "---:|" * (len(header) - 1))
    lines += ["| " + " | ".join(c.replace("|", "/") for c in row) + " |" for row in rows]
    lines.append("")
    for n, text in enumerate(notes, start=1):
        lines.append(f"{str(n).translate(_SUPERSCRIPT)} {text}  ")
    if notes:
        lines.append("")
    emb_model = next((v["metrics"]["embedding_similarity"].get("model") for v in variants
                      if isinstance(v["metrics"].get("embedding_similarity"), dict)), None)
    tokenizer = next((v["metrics"].get("tokenizer") for v in variants
                      if v["metrics"].get("tokenizer")), None)
    clip = next((v["metrics"]["clip_score"] for v in variants
                 if isinstance(v["metrics"].get("clip_score"), dict)), None)
    lines += [
        "Scoring: metrics.evaluate_captions (pycocoevalcap), corpus scores over the images "
        "above, each caption against all of its image's references (the oracle: see its "
        "note). Embedding similarity: cosine to the best reference"
        + (f" with `{emb_model}`" if emb_model else "") + "."
        + (f" CLIPScore: 2.5 x max(cos, 0) of the image and the caption with `{clip['model']}` "
           f"({clip['precision']}), captions prefixed \"{clip['prefix']}\"; RefCLIPScore: its "
           "harmonic mean with the best caption-reference cosine." if clip else "")
        + " Copies: share of captions that "
        "repeat a caption of their own prompt verbatim (lowercased, punctuation removed). "
        f"Scenes: mean distinct scenes among an image's neighbours (neighbours linked by CLIP "
        f"image cosines above DEDUP_THRESHOLD {s['dedup_threshold']:g} are one scene). Words: "
        "mean distinct words in the captions of an image's prompt. "
        "captions/s and s/caption: wall time of the variant's own retrieval, prompt and "
        "generation, without scoring and shared work; a row marked (= other) is the same "
        "configuration as that row, run once."
        + (f" Tokenisation: {tokenizer}." if tokenizer else ""),
        "",
        "| variant | definition (resolved) |",
        "|---|---|",
    ]
    for v in variants:
        lines.append(f"| {v['name']} | {v['summary']} — {v['description']} |")
    return "\n".join(lines) + "\n"


def _oracle_note(report: dict[str, Any]) -> str:
    text = ("oracle-references: the prompt holds the image's references except number "
            "(experiment index mod the number of references, 5 in Flickr8K), which is held "
            "out; the caption is scored against that one reference only, not all of them, so "
            "its numbers are on another scale than the other rows (one reference usually "
            "gives lower scores).")
    comparison = report.get("oracle_comparison")
    if comparison:
        m = comparison["baseline_against_held_out_reference"]
        parts = [f"{k} {m[k]:.4f}" for k in TABLE_METRICS if k in m]
        text += (" The baseline's captions scored the same way (against the held-out "
                 "reference): " + (", ".join(parts) or "nothing could be computed") + ".")
    else:
        text += " Run it together with baseline for a like-for-like comparison."
    return text


def plot_chart(report: dict[str, Any], path: str | os.PathLike) -> Path:
    """Grouped bars: CIDEr-D and BLEU-4 per variant; a metric that was not computed is
    marked n/a, never drawn as a value."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from atomic_files import atomic_writer
    variants = report["variants"]
    names = [v["name"] for v in variants]
    x = np.arange(len(names))
    width = 0.8 / len(CHART_METRICS)
    fig, ax = plt.subplots(figsize=(max(7.0, 0.75 * len(names) + 2.5), 4.8),
                           layout="constrained")
    top = 0.0
    for n, metric in enumerate(CHART_METRICS):
        values = [v["metrics"].get(metric) for v in variants]
        pos = x - 0.4 + width * (n + 0.5)
        heights = [0.0 if val is None else val for val in values]
        bars = ax.bar(pos, heights, width, label=metric)
        top = max([top] + heights)
        for bar, val in zip(bars, values):
            ax.annotate("n/a" if val is None else f"{val:.3f}",
                        (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                        ha="center", va="bottom", fontsize=7, rotation=90,
                        xytext=(0, 2), textcoords="offset points")
    ax.set_xticks(x, names, rotation=35, ha="right")
    ax.set_ylim(0, (top or 1.0) * 1.35)
    ax.set_ylabel("score")
    title = f"CIDEr-D and BLEU-4 per variant ({len(report['indices'])} images)"
    if not report.get("complete"):
        title += " - in progress"
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=9, loc="upper right")
    path = Path(path)
    try:
        with atomic_writer(path, suffix=".png") as f:
            fig.savefig(f, dpi=100, format="png")
    finally:
        plt.close(fig)
    return path


def write_outputs(report: dict[str, Any], files: dict[str, Path]) -> None:
    from atomic_files import write_json_atomic, write_text_atomic
    write_json_atomic(files["json"], report)
    write_text_atomic(files["md"], render_markdown(report))
    plot_chart(report, files["png"])


# --- command line -------------------------------------------------------------------------

def _list_variants() -> str:
    width = max(len(n) for n in VARIANTS)
    return "\n".join(f"{name:<{width}}  {v.description}" for name, v in VARIANTS.items())


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit code."""
    parser = config.make_parser(
        PROG, __doc__.split("\n\n")[0] + "\n\n" + __doc__.split("\n\n")[1]
        + "\n\nVariants:\n" + _list_variants()
        + "\n\nEvery setting of config.py is a flag too (below).")
    group = parser.add_argument_group("ablation")
    group.add_argument("--variants", nargs="+", metavar="NAME",
                       help="variants to run (names or comma-separated; default: all)")
    group.add_argument("--indices", metavar="SPEC",
                       help="experiment images, e.g. 0-49,100 "
                            f"(default: the first {DEFAULT_IMAGES})")
    group.add_argument("--all", action="store_true", help="every experiment image")
    group.add_argument("--out-dir", metavar="DIR",
                       help="where ablation.md/.json/.png go (default: RESULTS_DIR)")
    group.add_argument("--json", action="store_true",
                       help="print the report as JSON on stdout (the table goes to stderr)")
    group.add_argument("--list-variants", action="store_true",
                       help="print the variants and their definitions, then exit")
    try:
        args, settings = config.parse_cli(parser, argv, "batch")
        if args.list_variants:
            print(_list_variants())
            return 0
        names = select_variants(args.variants)
        if args.all and args.indices:
            raise UsageError("give --all or --indices, not both")
    except UserError as exc:
        return cli_failure("ablation", exc, code=2)
    config.configure_logging(settings)
    try:
        # Out of the options' block: a missing model or data set (experiment_count names
        # it before loading anything) is no usage error, so it exits 1.
        from batch_runner import parse_indices
        count = experiment_count(settings)
        indices = (list(range(count)) if args.all else
                   parse_indices(args.indices, count) if args.indices
                   else default_indices(count))
        report = run_ablation(names, indices, out_dir=args.out_dir, progress=True,
                              settings=settings)
    except (UserError, OSError, KeyboardInterrupt) as exc:
        return cli_failure("ablation", exc,
                           interrupted="interrupted (the files hold the variants that finished)")
    text = render_markdown(report)
    files = report["files"]
    where = f"wrote {files['md']}, {files['json']} and {files['png']}"
    if args.json:
        print(text + "\n" + where, file=sys.stderr)
        print(json.dumps(report, indent=2, ensure_ascii=False, default=str))
    else:
        print(text + "\n" + where)
    return 1 if any(v["failed"] for v in report["variants"]) else 0


if __name__ == "__main__":
    sys.exit(main())
