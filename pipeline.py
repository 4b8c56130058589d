"""The caption step every entry point calls, and the records it returns.

    from memory import Memory, initialize
    from models import load_models
    from pipeline import caption_batch
    dataset, db = initialize(settings)               # data set, memory (built on a first run)
    models = load_models(settings)                   # loaded once per process
    batch = caption_batch(models, [("a.jpg", image)], Memory.from_db(db, growing=False))
    batch.items[0].caption, batch.items[0].neighbours

The caption step, for a batch of images: read each image -> embed it (CLIP) ->
its neighbours in the memory (retrieval.py) -> the prompt with their captions ->
the VLM's caption -> the caption's embedding. An image that fails at any stage
becomes a `Failure` and the others go on. main.py (one experiment and --all),
--caption-folder, the web page, bench/ablation.py and the Ray actors of scale/ all
call it (Ray runs its stages in separate actor pools: the embedders' `embed`
methods and `caption_batch` with vectors given). Nothing is saved here: the
callers write.

Importing this module loads nothing; torch comes with the first model.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Sequence

import config
from errors import UserError
from retrieval import Context, Neighbour, Retriever, Selection, nearest, retriever  # noqa: F401

if TYPE_CHECKING:
    from PIL import Image

    from memory import Memory
    from models import Models


# --- records --------------------------------------------------------------------------------

@dataclass(frozen=True)
class Failure:
    """An image the caption step could not caption, and why."""

    image_id: str
    error: str                                   # one line for people
    stage: str                                   # load_image | embed_image | generate | ...
    experiment_index: int | None = None
    exception: BaseException | None = field(default=None, compare=False, repr=False)

    def to_json(self) -> dict[str, Any]:
        record = {"image_id": self.image_id, "error": self.error, "stage": self.stage}
        if self.experiment_index is not None:
            record = {"experiment_index": self.experiment_index, **record}
        return record

    def raise_it(self) -> None:
        """Raise the error this failure records (a UserError for a user's mistake)."""
        raise self.exception if self.exception is not None else UserError(self.error)


@dataclass(frozen=True)
class Captioned:
    """One image through the caption step."""

    image_id: str
    vector: Any                          # (D,) float32 unit CLIP embedding
    neighbours: tuple[Neighbour, ...]
    prompt: str                          # built from the context (recorded even when unused)
    prompt_captions: tuple[str, ...]     # the captions the prompt holds, in order
    caption: str
    caption_vector: Any = None           # (D',) float32 unit vector, None when not embedded
    # Whether the retrieved captions reached the captioner: False for a captioner of
    # the image alone or of a fixed task prompt (BLIP, GIT, PaliGemma, Florence-2),
    # and for a prompt that holds no captions.
    context_used: bool = True
    model_prompt: str | None = None      # the text the captioner was given, in its form
    # RETRIEVE "captions" under the leak guard: corpus captions left out as identical
    # to one of the image's references (retrieval.Context.identical_excluded)
    identical_excluded: int = 0


@dataclass(frozen=True)
class CaptionBatch:
    """What `caption_batch` returns: one record per input, in order, and its cost."""

    items: list[Captioned | Failure]
    seconds: dict[str, float]            # per stage, for the whole batch
    first_token: float | None = None     # start of the last generate call to its first token
    generate_calls: int = 0


# --- retrieval and prompt -------------------------------------------------------------------


def build_prompt(settings: config.Settings, context: Context) -> tuple[str, tuple[str, ...]]:
    """(prompt, the captions it holds) for `context` with the settings' templates."""
    from prompt_generator import build_prompt as fill, select_captions
    per = settings.captions_per_neighbour if context.per_neighbour is None \
        else context.per_neighbour
    captions = context.prompt_captions
    prompt = fill(captions, settings.prompt_template, settings.prompt_template_no_context, per)
    return prompt, tuple(select_captions(captions, per))


def generate_captions(captioner, images: Sequence["Image.Image"], prompts: Sequence[str]
                      ) -> list[str | UserError]:
    """Captions for a batch in one generate call; if the batch fails, image by image,
    so one bad image costs only its own caption. Failures come back as UserErrors."""
    if not images:
        return []
    try:
        captions = captioner.caption_batch(list(images), list(prompts))
    except Exception as exc:  # noqa: BLE001 - isolate the image that breaks the batch
        if len(images) == 1:
            return [exc if isinstance(exc, UserError) else UserError(
                f"caption generation failed: {type(exc).__name__}: {exc}")]
        return [item for image, prompt in zip(images, prompts)
                for item in generate_captions(captioner, [image], [prompt])]
    return [c or captioner.empty_caption_error() for c in captions]


class _Stopwatch:
    def __init__(self):
        self.seconds: dict[str, float] = {}
        self._clock = time.perf_counter()

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        self.seconds[stage] = self.seconds.get(stage, 0.0) + now - self._clock
        self._clock = now


def caption_batch(models: Models, items: Sequence[tuple[str, Any]], memory: Memory, *,
                  retrieve: Retriever | None = None, vectors: Sequence[Any] | None = None,
                  embed_captions: bool = True, selection: Selection | None = None,
                  references: Callable[[str], Sequence[str]] | None = None
                  ) -> CaptionBatch:
    """The caption step for a batch: one record per (image_id, image or opener) of
    `items`, in order, a `Captioned` or a `Failure`.

    `retrieve` finds each image's context (default: `retrieval.retriever`, as
    RETRIEVE says: images or captions, with `selection`, which defaults to the
    settings' for one experiment: TOP_K_SIMILAR by NEIGHBOUR_SELECTION, never the
    image itself; batch evaluation runs pass `Selection.of(settings)` of settings
    resolved for "batch", and `references`, an image id's human captions, which the
    leak guard keeps out of retrieved corpus captions). With a growing memory each captioned image joins
    it, and an image is generated only after every earlier image it retrieves,
    so a batch gives exactly the neighbours one image at a time would.
    `vectors` (one per item) skips the image embedding (computed elsewhere);
    `embed_captions=False` leaves `caption_vector` None.
    """
    import numpy as np
    settings = models.settings
    if retrieve is None:
        retrieve = retriever(models, selection, references)
    clock = _Stopwatch()
    records: list[Captioned | Failure | None] = [None] * len(items)
    images: dict[int, Any] = {}
    for n, (image_id, source) in enumerate(items):
        try:
            images[n] = source() if callable(source) else source
        except UserError as exc:
            records[n] = Failure(image_id, str(exc), "load_image", exception=exc)
    clock.lap("load_image")
    rows = list(images)
    if vectors is not None:
        queries = {n: np.asarray(vectors[n], np.float32).reshape(-1) for n in rows}
    elif rows:
        embedded = models.image_embedder.embed([images[n] for n in rows])
        queries = dict(zip(rows, embedded))
    else:
        queries = {}
    clock.lap("embed_image")

    waiting: list[tuple[int, Context, str, tuple[str, ...]]] = []
    calls = 0
    first_token = None

    def flush() -> None:
        nonlocal calls, first_token
        if not waiting:
            return
        captioner = models.captioner
        made = generate_captions(captioner, [images[n] for n, *_ in waiting],
                                 [prompt for _, _, prompt, _ in waiting])
        calls += 1
        first_token = getattr(captioner, "last_first_token", None)
        clock.lap("generate")
        for (n, context, prompt, shown), caption in zip(waiting, made):
            image_id = items[n][0]
            if isinstance(caption, str):
                records[n] = Captioned(
                    image_id, queries[n], context.neighbours, prompt, shown, caption,
                    context_used=bool(shown) and captioner.uses_context,
                    model_prompt=captioner.model_prompt(prompt),
                    identical_excluded=context.identical_excluded)
                if memory.growing:
                    memory.set_caption(image_id, caption)
            else:
                records[n] = Failure(image_id, str(caption), "generate", exception=caption)
                if memory.growing:
                    memory.remove(image_id)
        waiting.clear()

    for n in rows:
        image_id = items[n][0]
        context = retrieve(memory, image_id, queries[n])
        if memory.growing and memory.pending & set(context.read_ids):
            clock.lap("search")
            flush()  # it retrieves an image of this batch: caption that one first
            context = retrieve(memory, image_id, queries[n])
        clock.lap("search")
        prompt, shown = build_prompt(settings, context)
        clock.lap("prompt")
        waiting.append((n, context, prompt, shown))
        if memory.growing:
            memory.add(image_id, queries[n])  # pending: later images may retrieve it
    flush()

    done = [n for n, r in enumerate(records) if isinstance(r, Captioned)]
    if embed_captions and done:
        caption_vectors = models.caption_embedder.embed_captions([records[n].caption
                                                                 for n in done])
        for n, vector in zip(done, caption_vectors):
            records[n] = _with_caption_vector(records[n], vector)
        clock.lap("embed_caption")
    return CaptionBatch(records, {k: round(v, 4) for k, v in clock.seconds.items()},
                        first_token, calls)


def _with_caption_vector(record: Captioned, vector) -> Captioned:
    from dataclasses import replace
    return replace(record, caption_vector=vector)
