"""metrics.py: COCO caption metrics (pycocoevalcap) checked against the scorers themselves,
by hand, and on the no-java fallback; embedding similarity with the real MiniLM."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import metrics

JAVA = shutil.which("java")
needs_java = pytest.mark.needs_java  # conftest.py skips these, saying why, without java

# Four Flickr8K-style images with 3-4 references each.
GEN = {
    "1000268201.jpg": "A child in a pink dress is climbing up stairs.",
    "1001773457.jpg": "Two dogs are playing on the road.",
    "1002674143.jpg": "A little girl is sitting in front of a painted rainbow.",
    "1003163366.jpg": "A man is lying on a bench with his dog.",
}
REFS = {
    "1000268201.jpg": ["A child in a pink dress is climbing up a set of stairs in an entry way .",
                       "A girl going into a wooden building .",
                       "A little girl climbing into a wooden playhouse .",
                       "A little girl in a pink dress going into a wooden cabin ."],
    "1001773457.jpg": ["A black dog and a spotted dog are fighting",
                       "A black dog and a tri-colored dog playing with each other on the road .",
                       "Two dogs of different breeds looking at each other on the road ."],
    "1002674143.jpg": ["A little girl covered in paint sits in front of a painted rainbow with her "
                       "hands in a bowl .",
                       "A small girl in the grass plays with fingerpaints in front of a white canvas "
                       "with a rainbow on it .",
                       "There is a girl with pigtails sitting in front of a rainbow painting ."],
    "1003163366.jpg": ["A man lays on a bench while his dog sits by him .",
                       "A man lays on the bench to which a white dog is also tied .",
                       "a man sleeping on a bench outside with a white and black dog sitting next "
                       "to him ."],
}
# pycocoevalcap 1.2's Cider on REFS/GEN after PTB tokenisation (computed once, see
# test_cider_d_equals_pycocoevalcaps_own_scorer).
PINNED_CIDER_D = 1.5175617013389608
PINNED_CIDER_D_PER_IMAGE = [1.5373652855844937, 0.9693189188558331, 2.0561134329189636,
                            1.5074491679965525]

ORDINARY_CAPTIONS = [
    "A black dog is running through the water .",
    "Two young girls are playing on the beach, near the waves.",
    "A man in a red shirt climbs a rock wall!",
    "The boy's bike is leaning against a tree.",
    "A woman isn't smiling; she's looking at the camera.",
    "Children in blue t-shirts play soccer on a grassy field",
    "A brown and white dog jumps over a hurdle ...",
    "Is that a cyclist riding down a dirt path?",
    "A group of people stand outside a building: some hold umbrellas.",
    "Dogs' toys lie on the floor -- a ball and a rope.",
    "A skier in mid-air above the snow (with poles).",
    "They're walking their dog; it's a sunny day.",
]


def _scores(result: dict) -> dict:
    return {k: result[k] for k in metrics.CORPUS_METRICS if k in result}


@pytest.fixture
def no_java(monkeypatch):
    real_which = shutil.which
    monkeypatch.setattr(metrics.shutil, "which",
                        lambda name, *a, **k: None if name == "java" else real_which(name, *a, **k))


@pytest.fixture(scope="module")
def corpus_result() -> dict:
    """The fixed corpus with everything that runs here (METEOR too when java is there)."""
    return metrics.evaluate_captions(GEN, REFS)


@pytest.fixture(scope="module")
def identical_result() -> dict:
    refs = {k: [v] + REFS[k][1:] for k, v in GEN.items()}  # the caption is one of the refs
    return metrics.evaluate_captions(GEN, refs)


# --------------------------------------------------------------------------- module

def test_import_does_no_work():
    code = ("import sys, metrics; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('pycocoevalcap', 'numpy', 'torch')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=Path(metrics.__file__).parent,
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_nothing_is_printed(capfd):
    metrics.evaluate_captions(GEN, REFS)
    out, err = capfd.readouterr()
    assert out == "" and err == ""


# --------------------------------------------------------------------------- BLEU / CIDEr-D / ROUGE-L

def test_identical_captions_score_bleu_1(identical_result):
    for name in metrics.BLEU_METRICS:
        assert identical_result[name] == pytest.approx(1.0, abs=1e-6), name
    assert identical_result["ROUGE-L"] == pytest.approx(1.0)
    for scores in identical_result["per_image"].values():
        assert scores["BLEU-4"] == pytest.approx(1.0, abs=1e-6)


def test_identical_caption_scores_higher_cider_than_the_paraphrases(identical_result, corpus_result):
    assert identical_result["CIDEr-D"] > corpus_result["CIDEr-D"] > 0


def test_disjoint_captions_score_zero():
    gen = {"a": "purple elephants juggle", "b": "seven violins hum quietly tonight",
           "c": "quantum soup evaporates"}
    refs = {"a": ["a dog runs on the grass", "the dog is running"],
            "b": ["two children play at the beach"], "c": ["a man rides a bike down a hill"]}
    result = metrics.evaluate_captions(gen, refs)
    assert result["BLEU-4"] == pytest.approx(0.0, abs=1e-6)
    assert result["BLEU-1"] == pytest.approx(0.0, abs=1e-6)
    assert result["CIDEr-D"] == 0.0
    assert result["ROUGE-L"] == 0.0
    assert all(s["CIDEr-D"] == 0.0 for s in result["per_image"].values())


@needs_java
def test_cider_d_equals_pycocoevalcaps_own_scorer(corpus_result):
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    tokenizer = PTBTokenizer()  # pycocoevalcap's own wrapper, as the COCO evaluation runs it
    gts = tokenizer.tokenize({k: [{"caption": c} for c in v] for k, v in REFS.items()})
    res = tokenizer.tokenize({k: [{"caption": v}] for k, v in GEN.items()})

    cider, cider_per_image = Cider().compute_score(gts, res)
    assert corpus_result["CIDEr-D"] == pytest.approx(cider, rel=1e-12)
    assert [corpus_result["per_image"][k]["CIDEr-D"] for k in GEN] == \
        pytest.approx(list(cider_per_image), rel=1e-12)
    assert cider == pytest.approx(PINNED_CIDER_D, rel=1e-9)
    assert list(cider_per_image) == pytest.approx(PINNED_CIDER_D_PER_IMAGE, rel=1e-9)

    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    assert [corpus_result[n] for n in metrics.BLEU_METRICS] == pytest.approx(bleu, rel=1e-12)
    rouge, _ = Rouge().compute_score(gts, res)
    assert corpus_result["ROUGE-L"] == pytest.approx(rouge, rel=1e-12)


def test_cider_d_pinned_value_also_without_java(no_java):
    """The fallback tokenisation equals PTB's on these ordinary captions, so the numbers agree."""
    result = metrics.evaluate_captions(GEN, REFS)
    assert result["CIDEr-D"] == pytest.approx(PINNED_CIDER_D, rel=1e-9)


def test_rouge_l_by_hand():
    # hypothesis: 6 tokens. ref 1: 8 tokens, LCS "a dog runs the grass" = 5 -> P 5/6, R 5/8.
    # ref 2: 3 tokens, LCS "a dog" = 2 -> P 2/6, R 2/3. pycocoevalcap takes the best
    # precision (5/6) and the best recall (2/3) separately, with beta = 1.2.
    result = metrics.evaluate_captions(
        {"img": "A dog runs on the grass."},
        {"img": ["A brown dog runs across the green grass.", "A dog sleeps."]})
    p, r, beta = 5 / 6, 2 / 3, 1.2
    expected = (1 + beta ** 2) * p * r / (r + beta ** 2 * p)
    assert expected == pytest.approx(0.7261904761904762)
    assert result["ROUGE-L"] == pytest.approx(expected, rel=1e-12)
    assert result["per_image"]["img"]["ROUGE-L"] == pytest.approx(expected, rel=1e-12)


def test_cider_d_is_skipped_for_a_single_image():
    result = metrics.evaluate_captions({"img": "a dog runs"}, {"img": ["a dog runs fast"]})
    assert "CIDEr-D" not in result
    assert "idf" in result["skipped"]["CIDEr-D"]
    assert "BLEU-1" in result and "ROUGE-L" in result


# --------------------------------------------------------------------------- METEOR, java, fallback

@needs_java
def test_meteor_is_present_and_in_unit_interval(corpus_result, identical_result):
    assert 0.0 <= corpus_result["METEOR"] <= 1.0
    assert corpus_result["METEOR"] > 0.1
    assert all(0.0 <= s["METEOR"] <= 1.0 for s in corpus_result["per_image"].values())
    assert identical_result["METEOR"] > corpus_result["METEOR"]
    assert "METEOR" not in corpus_result["skipped"]
    assert corpus_result["tokenizer"].startswith("PTB tokenizer")


def test_without_java_falls_back_and_skips_meteor(no_java):
    result = metrics.evaluate_captions(GEN, REFS, spice=True)
    for name in metrics.BLEU_METRICS + ("ROUGE-L", "CIDEr-D"):
        assert 0.0 < result[name], name
    assert "METEOR" not in result
    assert "java" in result["skipped"]["METEOR"]
    assert "java" in result["skipped"]["SPICE"]
    assert result["tokenizer"].startswith("python fallback (java is not on PATH)")
    assert all("METEOR" not in s for s in result["per_image"].values())


@needs_java
def test_a_failing_java_tokenizer_falls_back_and_says_so(monkeypatch):
    def broken(sentences, java):
        raise RuntimeError("exit status 1: Error: could not find main class")
    monkeypatch.setattr(metrics, "ptb_tokenize", broken)
    result = metrics.evaluate_captions(GEN, REFS)
    assert "the java PTB tokenizer failed" in result["tokenizer"]
    assert "could not find main class" in result["tokenizer"]
    assert result["CIDEr-D"] == pytest.approx(PINNED_CIDER_D, rel=1e-9)


@needs_java
def test_our_ptb_call_tokenizes_like_pycocoevalcaps_ptbtokenizer():
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
    theirs = PTBTokenizer().tokenize({i: [{"caption": c}] for i, c in enumerate(ORDINARY_CAPTIONS)})
    ours = metrics.ptb_tokenize(ORDINARY_CAPTIONS, JAVA)
    assert ours == [theirs[i][0] for i in range(len(ORDINARY_CAPTIONS))]
    # The fallback agrees on ordinary captions.
    assert [metrics.fallback_tokenize(c) for c in ORDINARY_CAPTIONS] == ours


def test_fallback_tokenize():
    assert metrics.fallback_tokenize("A dog's toy (red), isn't it?") == \
        "a dog 's toy -lrb- red -rrb- is n't it"
    assert metrics.fallback_tokenize("The U.S. flag -- Mr. Smith can't; they're here...") == \
        "the u.s. flag mr. smith ca n't they 're here"
    assert metrics.fallback_tokenize("A child in a black t-shirt, 3.5 meters away!") == \
        "a child in a black t-shirt 3.5 meters away"
    assert metrics.fallback_tokenize("“Curly” quotes don’t matter") == "curly quotes do n't matter"
    assert metrics.fallback_tokenize(" ... ") == ""


@needs_java
def test_line_breaks_inside_a_caption_do_not_shift_the_others():
    # The java tokenizer treats \r and U+2028 as line ends; unguarded, every later caption
    # would be scored against the wrong image.
    gen = {"a": "A dog\rruns on the grass", "b": "A man\u2028rides a bike", "c": "Two kids swim"}
    refs = {"a": ["a dog runs on the grass"], "b": ["a man rides a bike"], "c": ["two kids swim"]}
    result = metrics.evaluate_captions(gen, refs)
    assert result["tokenizer"].startswith("PTB tokenizer")
    for image_id in gen:
        assert result["per_image"][image_id]["ROUGE-L"] == pytest.approx(1.0), image_id


# --------------------------------------------------------------------------- SPICE

def test_spice_without_its_jars_is_skipped_saying_where_they_go(monkeypatch,
                                                                 tmp_path):
    # pycocoevalcap's wheel ships no Stanford CoreNLP: by default SPICE then says where
    # the two jars go, and does not try the download (which fails offline)
    monkeypatch.setattr(metrics, "spice_lib_dir", lambda: str(tmp_path))
    monkeypatch.setattr(metrics, "_spice", lambda gts, res: pytest.fail("SPICE was run"))
    result = metrics.evaluate_captions(GEN, REFS)
    assert "SPICE" not in result
    assert result["skipped"]["SPICE"] == (
        "Stanford CoreNLP 3.6.0 is not installed: put stanford-corenlp-3.6.0.jar and "
        f"stanford-corenlp-3.6.0-models.jar in {tmp_path} (README, 'Comparing with published "
        "numbers')")
    assert metrics.evaluate_captions(GEN, REFS, spice=False)["skipped"]["SPICE"] == \
        "not requested (spice=False)"


@needs_java
def test_spice_runs_by_default_when_its_jars_are_there(monkeypatch, tmp_path):
    for jar in metrics.SPICE_JARS:
        (tmp_path / jar).write_bytes(b"")
    monkeypatch.setattr(metrics, "spice_lib_dir", lambda: str(tmp_path))
    monkeypatch.setattr(metrics, "_spice", lambda gts, res: (0.5, [0.5] * len(res)))
    assert metrics.evaluate_captions(GEN, REFS)["SPICE"] == 0.5


@needs_java
def test_a_failing_spice_is_reported_not_raised(monkeypatch):
    # SPICE's first use downloads Stanford CoreNLP; the child process that runs it fails
    # offline. Replace it by one that fails the same way, without touching the network.
    monkeypatch.setattr(metrics, "_SPICE_SCRIPT",
                        "raise OSError('<urlopen error [Errno -2] Name or service not known>')")
    result = metrics.evaluate_captions(GEN, REFS, spice=True)
    assert "SPICE" not in result
    assert "Name or service not known" in result["skipped"]["SPICE"]
    assert result["CIDEr-D"] == pytest.approx(PINNED_CIDER_D, rel=1e-9)


@needs_java
def test_a_hanging_spice_is_killed_and_reported(monkeypatch):
    monkeypatch.setattr(metrics, "_SPICE_SCRIPT", "import time; time.sleep(60)")
    monkeypatch.setattr(metrics, "SPICE_TIMEOUT_S", 1.0)
    result = metrics.evaluate_captions(GEN, REFS, spice=True)
    assert "did not finish in 1 s" in result["skipped"]["SPICE"]


@needs_java
def test_spice_scores_are_read_back(monkeypatch):
    fake = ("import json, sys\n"
            "d = json.load(open(sys.argv[1]))\n"
            "n = len(d['res'])\n"
            "json.dump({'score': 0.25, 'scores': [0.25] * n}, open(sys.argv[2], 'w'))\n")
    monkeypatch.setattr(metrics, "_SPICE_SCRIPT", fake)
    result = metrics.evaluate_captions(GEN, REFS, spice=True)
    assert result["SPICE"] == 0.25
    assert all(s["SPICE"] == 0.25 for s in result["per_image"].values())


# --------------------------------------------------------------------------- embedding similarity

def test_embedding_similarity_with_minilm_prefers_a_paraphrase(minilm):
    from caption_embedder import CaptionEmbedder
    embedder = CaptionEmbedder(minilm)
    reference = ["A dog is running through the grass.", "A brown dog runs across a field."]
    gen = {"paraphrase": "A puppy sprints across the lawn.",
           "unrelated": "A plate of pasta on a wooden table."}
    result = metrics.evaluate_captions(gen, {"paraphrase": reference, "unrelated": reference},
                                       caption_embedder=embedder)
    para = {"max": result["per_image"]["paraphrase"]["embedding_similarity"],
            "mean": result["per_image"]["paraphrase"]["embedding_similarity_mean"]}
    other = {"max": result["per_image"]["unrelated"]["embedding_similarity"],
             "mean": result["per_image"]["unrelated"]["embedding_similarity_mean"]}
    assert para["max"] > other["max"] + 0.2
    assert para["mean"] > other["mean"]
    assert para["max"] >= para["mean"]
    corpus = result["embedding_similarity"]
    assert corpus["max"] == pytest.approx((para["max"] + other["max"]) / 2)
    assert corpus["mean"] == pytest.approx((para["mean"] + other["mean"]) / 2)
    assert corpus["model"] == minilm
    assert "embedding_similarity" not in result["skipped"]


class _Fixed:
    """An embedder with known vectors."""
    name = "fixed"

    def __init__(self, table):
        self.table = table

    def embed_captions(self, captions):
        return np.array([self.table[c] for c in captions], dtype=np.float32)


def test_embedding_similarity_max_and_mean_are_cosines():
    s = np.sqrt(0.5)
    embedder = _Fixed({"hyp": [1, 0], "r1": [1, 0], "r2": [s, s], "r3": [0, 1]})
    result = metrics.evaluate_captions({"x": "hyp"}, {"x": ["r1", "r2", "r3"]},
                                       caption_embedder=embedder)
    assert result["embedding_similarity"]["max"] == pytest.approx(1.0)
    assert result["embedding_similarity"]["mean"] == pytest.approx((1 + s + 0) / 3)
    assert result["embedding_similarity"]["model"] == "fixed"
    assert result["per_image"]["x"]["embedding_similarity"] == pytest.approx(1.0)
    assert result["per_image"]["x"]["embedding_similarity_mean"] == pytest.approx((1 + s) / 3)


def test_embedding_similarity_is_skipped_without_an_embedder():
    result = metrics.evaluate_captions(GEN, REFS)
    assert "embedding_similarity" not in result
    assert "caption_embedder" in result["skipped"]["embedding_similarity"]


def test_an_embedder_returning_the_wrong_shape_is_an_error():
    class Bad:
        def embed_captions(self, captions):
            return np.zeros((1, 4), dtype=np.float32)
    with pytest.raises(ValueError, match="expected"):
        metrics.evaluate_captions(GEN, REFS, caption_embedder=Bad())


# --------------------------------------------------------------------------- coverage of the input

def test_images_without_references_or_caption_are_reported():
    gen = dict(GEN, **{"lonely.jpg": "a cat on a mat", "blank.jpg": "   ",
                       "empty_refs.jpg": "a bird"})
    refs = dict(REFS, **{"blank.jpg": ["a bird flies"], "empty_refs.jpg": ["", "  "],
                         "unused.jpg": ["a horse"]})
    result = metrics.evaluate_captions(gen, refs)
    assert result["images"] == len(GEN)
    assert result["not_evaluated"] == {"no_references": ["lonely.jpg", "empty_refs.jpg"],
                                       "empty_caption": ["blank.jpg"]}
    assert result["references_without_caption"] == 1
    assert set(result["per_image"]) == set(GEN)
    # the unscored images change nothing
    assert result["CIDEr-D"] == pytest.approx(PINNED_CIDER_D, rel=1e-9)
    report = metrics.format_report(result)
    assert "2 without references (lonely.jpg, empty_refs.jpg)" in report
    assert "1 with an empty caption (blank.jpg)" in report


def test_nothing_to_score_gives_no_numbers():
    result = metrics.evaluate_captions({"a": "a dog"}, {"b": ["a dog"]})
    assert result["images"] == 0
    assert not _scores(result)
    assert set(result["skipped"]) == set(metrics.CORPUS_METRICS) | {"embedding_similarity"}
    assert result["not_evaluated"]["no_references"] == ["a"]
    assert "0 images" in metrics.format_report(result)


def test_bad_input_types_are_rejected():
    with pytest.raises(TypeError, match="generated"):
        metrics.evaluate_captions([("a", "b")], {})
    with pytest.raises(TypeError, match="string"):
        metrics.evaluate_captions({"a": 3}, {"a": ["x"]})
    with pytest.raises(TypeError, match="strings"):
        metrics.evaluate_captions({"a": "x"}, {"a": [None]})


def test_missing_pycocoevalcap_is_a_user_error(monkeypatch):
    import importlib.util
    from errors import UserError
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "pycocoevalcap" else real_find_spec(name, *a))
    with pytest.raises(UserError, match="pip install pycocoevalcap==1.2"):
        metrics.evaluate_captions(GEN, REFS)


def test_length_and_vocabulary():
    gen = {"a": "A dog runs.", "b": "A man in a red shirt.", "c": "Two kids swim"}
    refs = {"a": ["A dog runs .", "A brown dog runs on grass"],
            "b": ["A man wears a red shirt"], "c": ["Children swim in a lake"],
            "pool.jpg": ["Two kids swim"]}
    result = metrics.evaluate_captions(gen, refs)
    # tokens: generated 3, 6, 3; references of the scored images 3, 6, 6, 5 (not pool.jpg's)
    assert result["length"]["generated"] == {"mean": pytest.approx(12 / 3), "median": 3.0}
    assert result["length"]["references"] == {"mean": pytest.approx(20 / 4), "median": 5.5}
    vocab = result["vocabulary"]
    assert vocab["generated_words"] == len({"a", "dog", "runs", "man", "in", "red", "shirt",
                                            "two", "kids", "swim"})
    assert vocab["generated_words_not_in_references"] == len({"two", "kids"})
    assert vocab["copied_own_reference"] == pytest.approx(1 / 3)   # "a dog runs"
    assert vocab["copied_any_reference"] == pytest.approx(2 / 3)   # + "two kids swim" (pool.jpg)


def test_format_report(corpus_result):
    report = metrics.format_report(corpus_result)
    assert report.startswith("### Caption metrics (4 images)")
    assert f"| CIDEr-D | {corpus_result['CIDEr-D']:.4f} |" in report
    assert "| BLEU-4 |" in report and "| ROUGE-L |" in report
    if "SPICE" not in corpus_result:   # skipped (no CoreNLP jars here): the reason, no number
        assert f"| SPICE | {corpus_result['skipped']['SPICE']} |" in report
        assert "| SPICE |" not in report.split("| skipped |")[0]
    assert "| CLIPScore | no CLIP model given (clip_scorer) |" in report
    assert "Tokenisation:" in report and "Length (tokens)" in report


_BROKEN_METEOR = r"""
import subprocess, sys, threading
import metrics
from pycocoevalcap.meteor import meteor

CMD = {"exit": [sys.executable, "-c",
                "import sys; sys.stderr.write('Error: Unable to access jarfile\\n'); sys.exit(1)"],
       "hang": [sys.executable, "-c", "import time; time.sleep(60)"]}[sys.argv[1]]

def init(self):  # a METEOR whose JVM dies at once, or never answers
    self.lock = threading.Lock()
    self.meteor_p = subprocess.Popen(CMD, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE)

meteor.Meteor.__init__ = init
metrics.shutil.which = lambda name, *a, **k: sys.executable  # "java is there"
metrics.ptb_tokenize = lambda sentences, java: [s.lower() for s in sentences]
metrics.METEOR_TIMEOUT_S = 1.0
result = metrics.evaluate_captions({"a": "a dog", "b": "a cat"},
                                   {"a": ["a dog runs"], "b": ["a cat sits"]})
import gc; gc.collect()  # Meteor.__del__ must not wait forever for the lock
print("METEOR" in result, result["skipped"]["METEOR"])
"""


@pytest.mark.parametrize("mode, reason", [
    ("exit", "the METEOR JVM exited (1): Error: Unable to access jarfile"),
    ("hang", "no answer from the METEOR JVM in 1 s"),
])
def test_a_failing_meteor_is_reported_and_cleaned_up(mode, reason):
    # In a child process: a regression here would hang at garbage collection.
    out = subprocess.run([sys.executable, "-c", _BROKEN_METEOR, mode],
                         cwd=Path(metrics.__file__).parent, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"False METEOR failed: RuntimeError: {reason}"
