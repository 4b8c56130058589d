"""Caption metrics, computed the way the COCO caption evaluation does (pycocoevalcap 1.2).

`evaluate_captions(generated, references)` scores one generated caption per image
against that image's human references; `format_report(result)` renders the result
as markdown.

The metrics (corpus scores; the per-image scores are the same scorers' per-image
outputs: sentence-level BLEU-4 with pycocoevalcap's tiny smoothing constants, METEOR per
segment -- the corpus METEOR pools the statistics, so it is not their mean):

* BLEU-1..4 -- modified n-gram precision (n = 1..4, geometric mean) with a brevity
  penalty against the closest reference length, pooled over the corpus.
* METEOR -- unigram alignment with exact, stem, synonym and paraphrase matches,
  recall-weighted F-mean with a fragmentation penalty (METEOR 1.5 jar, java).
* ROUGE-L -- F-measure (beta = 1.2) of the longest common subsequence, taking the
  best precision and the best recall over the references; mean over images.
* CIDEr-D -- tf-idf weighted 1..4-gram cosine similarity to the consensus of the
  references, with clipping and a length penalty (details below); mean over images.
* SPICE -- F-score of scene-graph tuples (objects, attributes, relations); it needs
  Stanford CoreNLP 3.6.0's two jars in pycocoevalcap's spice/lib folder (README,
  "Comparing with published numbers"): by default it runs when they are there and is
  skipped, saying where to put them, when they are not; `spice=True` tries anyway
  (pycocoevalcap then downloads them, which needs a network), `spice=False` never.
* CLIPScore, RefCLIPScore -- CLIP image-caption and caption-reference similarity
  (clip_score.py), with `clip_scorer`; mean over images.
* embedding similarity -- cosine between the generated caption's sentence embedding
  and each reference's, best and mean over the references; mean over images.

About CIDEr-D: pycocoevalcap 1.2 names its scorer `Cider` / "CIDEr", but its code is
CIDEr-D (Vedantam et al. 2015): the hypothesis tf-idf vector is clipped to the
reference's (min), each reference similarity is multiplied by the Gaussian length
penalty exp(-(l_hyp - l_ref)^2 / (2 * 6^2)) (lengths in words; the code counts bigrams,
i.e. words - 1, which gives the same difference), the scores are averaged over n = 1..4
and over the references and multiplied by 10 (so a score can exceed 1). There is no
stemming, and the idf comes from the references of the images being evaluated
(pycocoevalcap's "corpus" mode), so a score depends on which images are evaluated
together, and with a single image every n-gram has idf 0: CIDEr-D is then skipped.

Tokenisation: both sides are tokenised like the COCO evaluation, by the Stanford PTB
tokenizer shipped in pycocoevalcap (CoreNLP 3.4.1, `-preserveLines -lowerCase`, run
with java) followed by pycocoevalcap's punctuation removal. The same command as
`pycocoevalcap.tokenizer.ptbtokenizer.PTBTokenizer`, with these safety changes: text
goes through stdin (as UTF-8, `-encoding utf-8`) instead of a temporary file that
PTBTokenizer writes into the package folder (which fails on a read-only install);
every caption is first collapsed onto one line (a "\\r" or U+2028 inside a caption
makes the java tokenizer emit an extra line and shifts every later caption onto the
wrong image); and a failed or misaligned run is detected instead of scored. As in the
COCO evaluation, parentheses and brackets survive as "-lrb-"/"-rrb-" tokens (the
punctuation list has them in upper case, the tokenizer writes them in lower case).

Without java on PATH (or if the java tokenizer fails), a pure-Python fallback is used
and the result says so: lowercase, PTB-style splitting of clitics ("dog 's", "do
n't"), brackets as "-lrb-" etc., and removal of the same punctuation. It matches the
PTB output on ordinary captions but not on every edge case, so do not compare numbers
across the two. METEOR is then skipped (it is a java program).

Images in `generated` without references, or with an empty caption, are not scored;
they are listed in result["not_evaluated"] (so an empty caption is not averaged in as a
zero: check that list). Empty references are ignored. A metric that was not computed is
absent from the result and listed with its reason in result["skipped"]: no number is
made up. Embedding similarity uses the captions as written (not tokenised); length and
vocabulary count tokens as the metrics see them.

SPICE runs pycocoevalcap's Spice in a child process (killed with its JVM after
SPICE_TIMEOUT_S). With `spice=True` and no jars, its first use downloads Stanford CoreNLP
3.6.0 (no timeout) into pycocoevalcap's package folder, which fails offline; it keeps
temporary files and an LMDB cache in that folder too (spice/tmp, spice/cache), so the
folder must be writable. SPICE 1.0 is built for Java 8 (Java 17+ fails in its parser).

pycocoevalcap is imported lazily, so importing this module does no work. Nothing is
printed: the Python scorers run silently (no stdout redirection, which would not be
thread-safe) and the java programs' output is captured. Calls are independent (METEOR
starts its own JVM per call, ~6 s, and is always shut down); they can run in parallel
threads.
"""

from __future__ import annotations

import atexit
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from errors import UserError

if TYPE_CHECKING:
    from clip_score import ClipScorer, Unavailable

BLEU_METRICS = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4")
CLIP_METRICS = ("CLIPScore", "RefCLIPScore")   # clip_score.NAMES (kept here: no import)
CORPUS_METRICS = BLEU_METRICS + ("METEOR", "ROUGE-L", "CIDEr-D", "SPICE") + CLIP_METRICS

PTB_TIMEOUT_S = 600.0
METEOR_TIMEOUT_S = 900.0
SPICE_TIMEOUT_S = 3600.0

# pycocoevalcap.tokenizer.ptbtokenizer.PUNCTUATIONS (copied so the fallback works without it).
PTB_PUNCTUATIONS = frozenset(["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-",
                              ".", "?", "!", ",", ":", "-", "--", "...", ";"])


# --------------------------------------------------------------------------- public API

def evaluate_captions(generated: Mapping[Any, str], references: Mapping[Any, Sequence[str]], *,
                      caption_embedder=None, spice: bool | None = None,
                      clip_scorer: "ClipScorer | Unavailable | None" = None) -> dict:
    """Score `generated` ({image_id: caption}) against `references` ({image_id: [captions]}).

    Returns a dict with the corpus scores present among CORPUS_METRICS ("BLEU-1".."BLEU-4",
    "METEOR", "ROUGE-L", "CIDEr-D", "SPICE", "CLIPScore", "RefCLIPScore"), and
    "per_image" {id: {"BLEU-4", "METEOR", "ROUGE-L", "CIDEr-D", "SPICE", "CLIPScore",
    "RefCLIPScore", "embedding_similarity" (best reference), "embedding_similarity_mean"}}
    (floats, for whichever were computed),
    "embedding_similarity" {"max", "mean", "model"} when `caption_embedder` is given,
    "clip_score" {"model", "prefix", "weight", "precision", "image_vectors"} (what
    CLIPScore was computed with) when `clip_scorer` scored,
    "length", "vocabulary", "skipped" {metric: reason}, "images" (number scored),
    "not_evaluated" {"no_references": [ids], "empty_caption": [ids]},
    "references_without_caption" (reference images with no generated caption),
    "tokenizer" (which tokenisation was used) and "seconds" (time per stage).

    `caption_embedder` is anything with `embed_captions(list[str]) -> (N, D)` unit vectors
    (e.g. caption_embedder.CaptionEmbedder). `spice`: None runs SPICE when Stanford
    CoreNLP's jars are installed, True tries it anyway, False skips it; a failure is
    reported, not raised. `clip_scorer` (clip_score.scorer_for) gives CLIPScore and
    RefCLIPScore; a clip_score.Unavailable says why they are skipped.
    """
    gen, refs = _check_inputs(generated, references)
    timings: dict[str, float] = {}
    result: dict[str, Any] = {}
    skipped: dict[str, str] = {}

    ids, no_refs, empty = [], [], []
    for image_id, caption in gen.items():
        if not caption.strip():
            empty.append(image_id)
        elif not refs.get(image_id):
            no_refs.append(image_id)
        else:
            ids.append(image_id)
    result["images"] = len(ids)
    result["not_evaluated"] = {"no_references": no_refs, "empty_caption": empty}
    result["references_without_caption"] = sum(1 for k in refs if k not in gen)

    if not ids:
        reason = "no image has both a non-empty generated caption and references"
        for name in CORPUS_METRICS + ("embedding_similarity",):
            skipped[name] = reason
        result.update(per_image={}, skipped=skipped, tokenizer="none (nothing to score)",
                      seconds=timings)
        return result

    # ---- tokenisation (one call for both sides)
    _package_dir()  # pycocoevalcap is installed, or a UserError that says how
    java = shutil.which("java")
    hyp_raw = [_one_line(gen[i]) for i in ids]
    ref_raw = [[_one_line(r) for r in refs[i]] for i in ids]
    flat = hyp_raw + [r for rs in ref_raw for r in rs]
    t0 = time.perf_counter()
    tokens, result["tokenizer"] = _tokenize_all(flat, java)
    timings["tokenize"] = time.perf_counter() - t0
    hyp_tok = tokens[:len(ids)]
    ref_tok, pos = [], len(ids)
    for rs in ref_raw:
        ref_tok.append(tokens[pos:pos + len(rs)])
        pos += len(rs)
    # pycocoevalcap's input format: {key: [caption]} and {key: [references]}
    res = {k: [hyp_tok[k]] for k in range(len(ids))}
    gts = {k: ref_tok[k] for k in range(len(ids))}
    per_image: dict[Any, dict[str, Any]] = {image_id: {} for image_id in ids}

    def store(name: str, corpus: float, scores: Sequence[float]) -> None:
        result[name] = float(corpus)
        for k, image_id in enumerate(ids):
            per_image[image_id][name] = float(scores[k])

    # ---- BLEU, ROUGE-L, CIDEr-D (pure Python)
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    t0 = time.perf_counter()
    bleu, bleu_per_image = Bleu(4).compute_score(gts, res, verbose=0)
    for n, name in enumerate(BLEU_METRICS):
        result[name] = float(bleu[n])
    for k, image_id in enumerate(ids):
        per_image[image_id]["BLEU-4"] = float(bleu_per_image[3][k])
    timings["BLEU"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    store("ROUGE-L", *Rouge().compute_score(gts, res))
    timings["ROUGE-L"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    if len(ids) < 2:
        skipped["CIDEr-D"] = ("needs at least 2 images: its idf comes from the evaluated "
                              "images' references, so with 1 image every n-gram weighs 0")
    elif not any(r.split() for rs in ref_tok for r in rs):
        skipped["CIDEr-D"] = "every reference is empty after tokenisation"
    else:
        store("CIDEr-D", *Cider().compute_score(gts, res))
    timings["CIDEr-D"] = time.perf_counter() - t0

    # ---- METEOR (java)
    if java is None:
        skipped["METEOR"] = "java is not on PATH (METEOR 1.5 is a java program)"
    else:
        t0 = time.perf_counter()
        try:
            store("METEOR", *_meteor(gts, res))
        except Exception as exc:  # the JVM can fail in many ways; report, don't raise
            skipped["METEOR"] = f"METEOR failed: {type(exc).__name__}: {_first_line(str(exc))}"
        timings["METEOR"] = time.perf_counter() - t0

    # ---- SPICE (java + Stanford CoreNLP, which pycocoevalcap downloads on first use)
    missing_jars = spice is None and _spice_jars_missing()
    if spice is False:
        skipped["SPICE"] = "not requested (spice=False)"
    elif missing_jars:
        skipped["SPICE"] = missing_jars
    elif java is None:
        skipped["SPICE"] = "java is not on PATH (SPICE is a java program)"
    else:
        t0 = time.perf_counter()
        try:
            corpus, scores = _spice(gts, res)
        except Exception as exc:
            skipped["SPICE"] = str(exc) if isinstance(exc, _SpiceError) else \
                f"SPICE failed: {type(exc).__name__}: {_first_line(str(exc))}"
        else:
            if corpus != corpus:  # NaN: pycocoevalcap averages per-image NaNs into NaN
                skipped["SPICE"] = "SPICE returned no score for some images (NaN)"
            else:
                store("SPICE", corpus, scores)
        timings["SPICE"] = time.perf_counter() - t0

    # ---- embedding similarity (raw captions: sentence encoders want natural text)
    if caption_embedder is None:
        skipped["embedding_similarity"] = "no caption_embedder given"
    else:
        t0 = time.perf_counter()
        result["embedding_similarity"] = _embedding_similarity(
            caption_embedder, ids, [gen[i] for i in ids], [refs[i] for i in ids], per_image)
        timings["embedding_similarity"] = time.perf_counter() - t0

    # ---- CLIPScore, RefCLIPScore (raw captions, as the reference code embeds them)
    if clip_scorer is None:
        skipped["CLIPScore"] = skipped["RefCLIPScore"] = "no CLIP model given (clip_scorer)"
    elif not hasattr(clip_scorer, "score"):   # clip_score.Unavailable
        skipped["CLIPScore"] = skipped["RefCLIPScore"] = (
            f"METRIC_CLIP_MODEL {clip_scorer.model!r} is not available: {clip_scorer.reason}")
    else:
        t0 = time.perf_counter()
        try:
            scores = clip_scorer.score(ids, [gen[i] for i in ids], [refs[i] for i in ids])
        except UserError as exc:   # e.g. an image that cannot be opened any more
            skipped["CLIPScore"] = skipped["RefCLIPScore"] = f"CLIPScore failed: {exc}"
        else:
            store("CLIPScore", scores.clip_score.mean(), scores.clip_score)
            store("RefCLIPScore", scores.ref_clip_score.mean(), scores.ref_clip_score)
            result["clip_score"] = clip_scorer.describe(scores.reused, len(ids))
        timings["CLIPScore"] = time.perf_counter() - t0

    result["length"] = _length_stats(hyp_tok, ref_tok)
    result["vocabulary"] = _vocabulary_stats(ids, gen, refs, hyp_tok, ref_tok)
    result["per_image"] = per_image
    result["skipped"] = skipped
    result["seconds"] = {k: round(v, 3) for k, v in timings.items()}
    return result


def format_report(result: dict) -> str:
    """A markdown report of `evaluate_captions`' result: corpus metrics, then what was skipped."""
    lines = [f"### Caption metrics ({result.get('images', 0)} images)", "",
             "| metric | score |", "|---|---:|"]
    for name in CORPUS_METRICS:
        if name in result:
            lines.append(f"| {name} | {result[name]:.4f} |")
    emb = result.get("embedding_similarity")
    if emb:
        lines.append(f"| embedding similarity, best reference ({emb.get('model', '?')}) "
                     f"| {emb['max']:.4f} |")
        lines.append(f"| embedding similarity, mean over references | {emb['mean']:.4f} |")
    lines.append("")
    clip = result.get("clip_score")
    if clip:
        lines.append(f"CLIPScore, RefCLIPScore: {clip['model']} ({clip['precision']}), "
                     f"captions prefixed \"{clip['prefix']}\", w = {clip['weight']:g}; image "
                     f"vectors: {clip['image_vectors']}.")
    if result.get("tokenizer"):
        lines.append(f"Tokenisation: {result['tokenizer']}.")
    length = result.get("length")
    if length:
        g, r = length["generated"], length["references"]
        lines.append(f"Length (tokens): generated mean {g['mean']:.1f}, median {g['median']:g}; "
                     f"references mean {r['mean']:.1f}, median {r['median']:g}.")
    vocab = result.get("vocabulary")
    if vocab:
        lines.append(f"Vocabulary: {vocab['generated_words']} distinct words in the generated "
                     f"captions, {vocab['reference_words']} in their references; "
                     f"{vocab['copied_own_reference']:.1%} of generated captions repeat one of "
                     f"their image's references verbatim, {vocab['copied_any_reference']:.1%} "
                     f"repeat some reference.")
    missing = result.get("not_evaluated") or {}
    parts = []
    if missing.get("no_references"):
        parts.append(f"{len(missing['no_references'])} without references "
                     f"({_some(missing['no_references'])})")
    if missing.get("empty_caption"):
        parts.append(f"{len(missing['empty_caption'])} with an empty caption "
                     f"({_some(missing['empty_caption'])})")
    if parts:
        lines.append("Not evaluated: " + "; ".join(parts) + ".")
    skipped = result.get("skipped") or {}
    if skipped:
        lines += ["", "| skipped | reason |", "|---|---|"]
        for name, reason in skipped.items():
            lines.append(f"| {name} | {reason.replace('|', '/')} |")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- inputs

def _check_inputs(generated, references) -> tuple[dict, dict]:
    if not isinstance(generated, Mapping):
        raise TypeError(f"generated must be a dict {{image_id: caption}}, got {type(generated).__name__}")
    if not isinstance(references, Mapping):
        raise TypeError(f"references must be a dict {{image_id: [captions]}}, "
                        f"got {type(references).__name__}")
    gen = {}
    for image_id, caption in generated.items():
        if caption is None:
            caption = ""
        if not isinstance(caption, str):
            raise TypeError(f"generated[{image_id!r}] must be a string, got {type(caption).__name__}")
        gen[image_id] = caption
    refs = {}
    for image_id, captions in references.items():
        if isinstance(captions, str):  # one reference given as a bare string
            captions = [captions]
        if captions is None:
            captions = []
        captions = list(captions)
        for c in captions:
            if not isinstance(c, str):
                raise TypeError(f"references[{image_id!r}] must hold strings, "
                                f"got {type(c).__name__}")
        refs[image_id] = [c for c in captions if c.strip()]  # empty references carry nothing
    return gen, refs


def _one_line(text: str) -> str:
    """Collapse all whitespace, including \\r, U+2028 and other line breaks, to single spaces."""
    return " ".join(text.split())


# --------------------------------------------------------------------------- tokenisation

def _tokenize_all(sentences: list[str], java: str | None) -> tuple[list[str], str]:
    """Tokenised sentences and a description of the tokenisation used."""
    if java is not None:
        try:
            return ptb_tokenize(sentences, java), \
                "PTB tokenizer (Stanford CoreNLP 3.4.1, java) + COCO punctuation removal"
        except Exception as exc:
            why = f"the java PTB tokenizer failed ({type(exc).__name__}: {_first_line(str(exc))})"
    else:
        why = "java is not on PATH"
    return [fallback_tokenize(s) for s in sentences], \
        f"python fallback ({why}): lowercase, PTB-style clitics, punctuation removed"


def _package_dir() -> str:
    import importlib.util
    spec = importlib.util.find_spec("pycocoevalcap")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("the caption metrics need pycocoevalcap: pip install pycocoevalcap==1.2 "
                        "(or pip install -r requirements.txt)")
    return list(spec.submodule_search_locations)[0]


def ptb_tokenize(sentences: list[str], java: str) -> list[str]:
    """pycocoevalcap's PTBTokenizer command, fed through stdin, with its output checked."""
    from pycocoevalcap.tokenizer import ptbtokenizer
    jar = os.path.join(_package_dir(), "tokenizer", ptbtokenizer.STANFORD_CORENLP_3_4_1_JAR)
    cmd = [java, "-cp", jar, "edu.stanford.nlp.process.PTBTokenizer",
           "-preserveLines", "-lowerCase", "-encoding", "utf-8"]
    text = "".join(s + "\n" for s in sentences)
    proc = subprocess.run(cmd, input=text.encode("utf-8"), capture_output=True,
                          timeout=PTB_TIMEOUT_S)
    if proc.returncode != 0:
        raise RuntimeError(f"exit status {proc.returncode}: "
                           f"{_last_line(proc.stderr.decode('utf-8', 'replace'))}")
    lines = proc.stdout.decode("utf-8", "replace").split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if len(lines) != len(sentences):
        raise RuntimeError(f"{len(lines)} lines out for {len(sentences)} captions in")
    punct = set(ptbtokenizer.PUNCTUATIONS)
    return [" ".join(w for w in line.rstrip().split(" ") if w not in punct) for line in lines]


_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}
_SPLIT_WORDS = {"cannot": "can not", "gonna": "gon na", "wanna": "wan na", "gotta": "got ta"}
_ABBREVIATIONS = {"mr.", "mrs.", "ms.", "dr.", "st.", "jr.", "sr.", "vs.", "etc.", "inc.", "co."}
_CLITIC = re.compile(r"^(.+?)('s|'re|'ve|'ll|'d|'m)$")
_EDGE_PUNCT = ".,;:!?\"'`"


def fallback_tokenize(text: str) -> str:
    """Approximate the PTB tokenizer + COCO punctuation removal in pure Python.

    Lowercase; curly quotes made straight; brackets become -lrb-/-rrb-/... tokens as
    in PTB; punctuation at word edges is split off and removed (".", ",", ";", ":",
    "!", "?", quotes, "-", "--", "..."); clitics are split like PTB ("dog 's",
    "do n't", "ca n't", "they 're"); in-word hyphens, periods and apostrophes stay
    ("t-shirt", "3.5", "u.s.", "o'clock").
    """
    text = text.lower()
    for a, b in (("\u2019", "'"), ("\u2018", "'"), ("\u201c", '"'), ("\u201d", '"'),
                 ("\u2014", " -- "), ("\u2013", " -- "), ("\u2026", " ... ")):
        text = text.replace(a, b)
    for a, b in _BRACKETS.items():
        text = text.replace(a, f" {b} ")
    out: list[str] = []
    for chunk in text.split():
        if chunk in _BRACKETS.values():
            out.append(chunk)
            continue
        word = chunk.lstrip(_EDGE_PUNCT)
        if word.startswith("$") and len(word) > 1:  # PTB: "$5" -> "$ 5"
            out.append("$")
            word = word[1:]
        # trailing punctuation, except the period of an abbreviation ("u.s.", "mr.")
        while word and word[-1] in _EDGE_PUNCT:
            if word[-1] == "." and (word in _ABBREVIATIONS or re.fullmatch(r"(?:[a-z]\.){2,}", word)):
                break
            word = word[:-1]
        if not word or word.strip("-") == "":
            continue
        percent = word.endswith("%") and len(word) > 1  # PTB: "50%" -> "50 %"
        if percent:
            word = word[:-1]
        if word in _SPLIT_WORDS:
            out.extend(_SPLIT_WORDS[word].split())
        elif word.endswith("n't") and len(word) > 3:
            out.extend([word[:-3], "n't"])  # "can't" -> "ca n't", like PTB
        elif (m := _CLITIC.match(word)) is not None:
            out.extend([m.group(1), m.group(2)])
        else:
            out.append(word)
        if percent:
            out.append("%")
    return " ".join(w for w in out if w not in PTB_PUNCTUATIONS)


# --------------------------------------------------------------------------- java scorers

# One METEOR JVM per process, started by the first call and kept: its start (loading
# the paraphrase tables) costs ~9 s, a later call milliseconds, so a batch summary after
# an ablation's dozen variants pays it once. A JVM that failed is closed, not reused.
_meteor_lock = threading.Lock()
_meteor_jvm = None


def _meteor(gts: dict, res: dict) -> tuple[float, list[float]]:
    """pycocoevalcap's Meteor on the process's JVM, killed by a watchdog if it hangs."""
    global _meteor_jvm
    # "|||" separates fields in METEOR's protocol; pycocoevalcap strips it from the
    # hypothesis only.
    gts = {k: [r.replace("|||", "") for r in v] for k, v in gts.items()}
    with _meteor_lock:
        if _meteor_jvm is not None and _meteor_jvm.meteor_p.poll() is not None:
            _close_meteor()                    # it died since the last call
        if _meteor_jvm is None:
            from pycocoevalcap.meteor.meteor import Meteor
            _meteor_jvm = Meteor()
            atexit.unregister(_close_meteor)   # registered once, however often restarted
            atexit.register(_close_meteor)
        meteor = _meteor_jvm
        proc = meteor.meteor_p
        timed_out = threading.Event()

        def kill() -> None:
            timed_out.set()
            proc.kill()

        watchdog = threading.Timer(METEOR_TIMEOUT_S, kill)
        watchdog.daemon = True
        watchdog.start()
        try:
            return meteor.compute_score(gts, res)
        except Exception:
            # the JVM died by itself? (its stdout closes just before it is reaped)
            died = not timed_out.is_set() and _exits_within(proc, 5.0)
            err = proc.stderr.read().decode("utf-8", "replace") if died and proc.stderr else ""
            _close_meteor()
            if timed_out.is_set():
                raise RuntimeError(f"no answer from the METEOR JVM in {METEOR_TIMEOUT_S:.0f} s"
                                   ) from None
            if died:
                raise RuntimeError(f"the METEOR JVM exited ({proc.returncode}): "
                                   f"{_last_line(err) or 'no message'}") from None
            raise
        finally:
            watchdog.cancel()


def _close_meteor() -> None:
    """Close the process's METEOR JVM (at exit, or after a failure)."""
    global _meteor_jvm
    meteor, _meteor_jvm = _meteor_jvm, None
    if meteor is None:
        return
    # Meteor.compute_score holds its lock without try/finally, and Meteor.__del__
    # takes the same lock: after a failure, garbage collection would hang forever.
    meteor.lock = threading.Lock()
    proc = meteor.meteor_p
    for stream in (proc.stdin, proc.stdout):
        try:
            stream.close()
        except Exception:
            pass
    proc.kill()
    proc.wait()


def _exits_within(proc: subprocess.Popen, seconds: float) -> bool:
    try:
        proc.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        return False
    return True


class _SpiceError(RuntimeError):
    pass


_SPICE_SCRIPT = r"""
import json, sys
from pycocoevalcap.spice.spice import Spice
with open(sys.argv[1]) as f:
    data = json.load(f)
gts = {int(k): v for k, v in data["gts"].items()}
res = {int(k): v for k, v in data["res"].items()}
score, scores = Spice().compute_score(gts, res)
with open(sys.argv[2], "w") as f:
    json.dump({"score": float(score), "scores": [s["All"]["f"] for s in scores]}, f)
"""


SPICE_JARS = ("stanford-corenlp-3.6.0.jar", "stanford-corenlp-3.6.0-models.jar")


def spice_lib_dir() -> str:
    """The folder where pycocoevalcap's SPICE looks for Stanford CoreNLP's jars."""
    return os.path.join(_package_dir(), "spice", "lib")


def _spice_jars_missing() -> str:
    """Why SPICE cannot run by default (its jars are not installed), or ""."""
    lib = spice_lib_dir()
    missing = [jar for jar in SPICE_JARS if not os.path.isfile(os.path.join(lib, jar))]
    if not missing:
        return ""
    return (f"Stanford CoreNLP 3.6.0 is not installed: put {' and '.join(missing)} in {lib} "
            "(README, 'Comparing with published numbers')")


def _spice(gts: dict, res: dict) -> tuple[float, list[float]]:
    """pycocoevalcap's Spice in a child process (its CoreNLP download has no timeout and
    it prints), killed with its JVM after SPICE_TIMEOUT_S."""
    import json
    corenlp = os.path.join(spice_lib_dir(), SPICE_JARS[0])
    hint = "" if os.path.exists(corenlp) else (
        " (SPICE needs Stanford CoreNLP 3.6.0, which pycocoevalcap downloads into its package "
        "folder on first use; that needs network access to nlp.stanford.edu)")
    with tempfile.TemporaryDirectory(prefix="spice_") as tmp:
        src, dst = os.path.join(tmp, "in.json"), os.path.join(tmp, "out.json")
        with open(src, "w") as f:
            json.dump({"gts": gts, "res": res}, f)
        proc = subprocess.Popen([sys.executable, "-c", _SPICE_SCRIPT, src, dst], cwd=tmp,
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, start_new_session=True)
        try:
            out, err = proc.communicate(timeout=SPICE_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            proc.communicate()
            raise _SpiceError(f"SPICE did not finish in {SPICE_TIMEOUT_S:.0f} s{hint}") from None
        if proc.returncode != 0 or not os.path.exists(dst):
            text = err.decode("utf-8", "replace") or out.decode("utf-8", "replace")
            raise _SpiceError(f"SPICE failed: {_last_line(text) or f'exit status {proc.returncode}'}"
                              f"{hint}")
        with open(dst) as f:
            data = json.load(f)
    scores = [float("nan") if s is None else float(s) for s in data["scores"]]
    return float(data["score"]), scores


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        if hasattr(os, "killpg"):
            os.killpg(proc.pid, signal.SIGKILL)
        else:
            proc.kill()
    except ProcessLookupError:
        pass


# --------------------------------------------------------------------------- other statistics

def _embedding_similarity(embedder, ids, hyps, refs, per_image) -> dict:
    import numpy as np

    unique = list(dict.fromkeys(hyps + [r for rs in refs for r in rs]))
    vectors = np.asarray(embedder.embed_captions(unique), dtype=np.float64)
    if vectors.ndim != 2 or vectors.shape[0] != len(unique):
        raise ValueError(f"caption_embedder.embed_captions returned shape {vectors.shape} "
                         f"for {len(unique)} captions; expected ({len(unique)}, D)")
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    vectors = vectors / np.where(norms > 0, norms, 1.0)  # cosine even if not unit vectors
    row = {text: i for i, text in enumerate(unique)}
    best, mean = [], []
    for image_id, hyp, rs in zip(ids, hyps, refs):
        sims = vectors[[row[r] for r in rs]] @ vectors[row[hyp]]
        best.append(float(sims.max()))
        mean.append(float(sims.mean()))
        per_image[image_id]["embedding_similarity"] = best[-1]
        per_image[image_id]["embedding_similarity_mean"] = mean[-1]
    name = getattr(embedder, "name", None) or type(embedder).__name__
    return {"max": float(np.mean(best)), "mean": float(np.mean(mean)), "model": str(name)}


def _length_stats(hyp_tok: list[str], ref_tok: list[list[str]]) -> dict:
    """Tokens per caption, as the metrics see them."""
    def stats(lengths: list[int]) -> dict:
        return {"mean": float(statistics.fmean(lengths)), "median": float(statistics.median(lengths))}
    return {"generated": stats([len(h.split()) for h in hyp_tok]),
            "references": stats([len(r.split()) for rs in ref_tok for r in rs])}


def _vocabulary_stats(ids, gen, refs, hyp_tok, ref_tok) -> dict:
    """Distinct tokens, and how often a generated caption repeats a reference verbatim
    (compared after lowercasing and punctuation removal)."""
    gen_words = {w for h in hyp_tok for w in h.split()}
    ref_words = {w for rs in ref_tok for r in rs for w in r.split()}
    norm = fallback_tokenize
    any_ref = {norm(r) for rs in refs.values() for r in rs}
    hyps = [norm(gen[i]) for i in ids]
    own = sum(h != "" and h in {norm(r) for r in refs[i]} for h, i in zip(hyps, ids))
    anywhere = sum(h != "" and h in any_ref for h in hyps)
    return {"generated_words": len(gen_words), "reference_words": len(ref_words),
            "generated_words_not_in_references": len(gen_words - ref_words),
            "copied_own_reference": own / len(ids), "copied_any_reference": anywhere / len(ids)}


def _first_line(text: str) -> str:
    text = text.strip()
    return text.splitlines()[0] if text else "(no message)"


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""


def _some(ids: list, limit: int = 5) -> str:
    shown = ", ".join(str(i) for i in ids[:limit])
    return shown + (f", ... {len(ids) - limit} more" if len(ids) > limit else "")
