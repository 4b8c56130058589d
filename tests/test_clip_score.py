"""clip_score.py: CLIPScore and RefCLIPScore against a direct computation with a tiny CLIP
(the fixture's, trained on the fixture photos so its cosines are not all clipped), the
reference code's edge cases, the skip line of a model that is not there, and the reuse of
retrieval's image vectors."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

import clip_score
import config
import metrics
from fake_flickr import captions_for, make_image

IDS = ["0", "1", "2", "3"]


@pytest.fixture
def no_java(monkeypatch):
    """The metrics without their JVMs (tokenizer, METEOR: seconds each); not about them."""
    real_which = shutil.which
    monkeypatch.setattr(metrics.shutil, "which",
                        lambda name, *a, **k: None if name == "java" else real_which(name, *a, **k))
CANDIDATES = [captions_for(0)[0], captions_for(1)[2], captions_for(0)[1], "a photo"]
REFERENCES = [captions_for(0)[1:], captions_for(1), captions_for(2), captions_for(3)[:1]]


def _direct(path: str) -> tuple[np.ndarray, np.ndarray]:
    """CLIP-S and RefCLIP-S computed from the model itself, as jmhessel/clipscore does."""
    import torch
    from transformers import CLIPModel, CLIPProcessor
    model = CLIPModel.from_pretrained(path).eval()
    processor = CLIPProcessor.from_pretrained(path)

    def unit(x):
        x = x.pooler_output.double().numpy()
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    def texts(captions):
        tokens = processor.tokenizer(["A photo depicts " + c for c in captions], padding=True,
                                     truncation=True, max_length=77, return_tensors="pt")
        with torch.no_grad():
            return unit(model.get_text_features(**tokens))

    with torch.no_grad():
        images = unit(model.get_image_features(**processor(
            images=[make_image(int(i)) for i in IDS], return_tensors="pt")))
    cand = texts(CANDIDATES)
    clip_s = 2.5 * np.clip(np.sum(images * cand, axis=1), 0, None)
    best = np.array([np.max(texts(refs) @ c) for refs, c in zip(REFERENCES, cand)])
    return clip_s, 2 * clip_s * best / (clip_s + best)


def test_scores_equal_a_direct_computation(fitted_clip, no_java):
    settings = config.resolve(metric_clip_model=fitted_clip, device="cpu")
    scorer = clip_score.scorer_for(settings, image_of=lambda key: make_image(int(key)))
    assert isinstance(scorer, clip_score.ClipScorer) and scorer.model == fitted_clip
    scores = scorer.score(IDS, CANDIDATES, REFERENCES)
    clip_s, ref_clip_s = _direct(fitted_clip)
    assert (clip_s > 0).sum() >= 2  # the comparison is not of clipped zeros only
    np.testing.assert_allclose(scores.clip_score, clip_s, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(scores.ref_clip_score, ref_clip_s, rtol=1e-5, atol=1e-6)

    # in evaluate_captions: corpus means, per image, and the model beside them
    result = metrics.evaluate_captions(dict(zip(IDS, CANDIDATES)), dict(zip(IDS, REFERENCES)),
                                       clip_scorer=scorer, spice=False)
    assert result["CLIPScore"] == pytest.approx(clip_s.mean(), rel=1e-5)
    assert result["RefCLIPScore"] == pytest.approx(ref_clip_s.mean(), rel=1e-5)
    assert result["per_image"]["1"]["CLIPScore"] == pytest.approx(clip_s[1], rel=1e-5, abs=1e-6)
    assert result["clip_score"] == {"model": fitted_clip, "prefix": "A photo depicts ",
                                    "weight": 2.5, "precision": "float32",
                                    "image_vectors": "0 of 4 reused from retrieval"}
    report = metrics.format_report(result)
    assert f"| CLIPScore | {result['CLIPScore']:.4f} |" in report
    assert f"CLIPScore, RefCLIPScore: {fitted_clip} (float32)" in report


class _Texts:
    """A text tower that returns fixed vectors, for the reference code's edge cases."""

    name = "fixed"

    def __init__(self, vectors: dict[str, list[float]]):
        self.vectors = vectors

    def embed_texts(self, texts):
        return np.array([self.vectors[t.removeprefix(clip_score.PREFIX)] for t in texts])


def test_clipping_and_the_harmonic_mean_follow_the_reference_code():
    texts = _Texts({"cand": [1.0, 0.0], "near": [0.6, 0.8], "far": [-0.6, 0.8],
                    "away": [-1.0, 0.0], "side": [0.0, 1.0]})
    images = np.array([[0.6, 0.8], [-1.0, 0.0], [-1.0, 0.0]])
    scores = clip_score.compute(images, ["cand", "cand", "cand"], texts,
                                [["near", "far"], ["far"], ["side"]])
    # CLIP-S = 2.5 max(cos, 0): 2.5 * 0.6, and 0 for a negative cosine
    np.testing.assert_allclose(scores.clip_score, [1.5, 0.0, 0.0])
    # RefCLIP-S: harmonic mean with the best reference cosine (0.6), never clipped; with
    # CLIP-S 0 it is 0, and where both are 0 (0/0 in the reference code) 0 too
    np.testing.assert_allclose(scores.ref_clip_score, [2 * 1.5 * 0.6 / 2.1, 0.0, 0.0])
    assert clip_score.compute(images[:1], ["cand"], texts, [["away"]]).ref_clip_score[0] == \
        pytest.approx(2 * 1.5 * -1.0 / 0.5)   # a negative best cosine is kept, as there
    with pytest.raises(ValueError, match="image 0 has none"):
        clip_score.compute(images[:1], ["cand"], texts, [[]])


def test_an_unavailable_model_is_skipped_with_one_line(tmp_path, no_java):
    settings = config.resolve(metric_clip_model=str(tmp_path / "no-clip"), device="cpu")
    scorer = clip_score.scorer_for(settings)
    assert isinstance(scorer, clip_score.Unavailable)
    result = metrics.evaluate_captions({"a": "a dog", "b": "a cat"},
                                       {"a": ["a dog runs"], "b": ["a cat sits"]},
                                       clip_scorer=scorer, spice=False)
    assert "CLIPScore" not in result and "clip_score" not in result
    reason = result["skipped"]["CLIPScore"]
    assert reason.startswith(f"METRIC_CLIP_MODEL '{tmp_path / 'no-clip'}' is not available: ")
    assert "\n" not in reason and result["skipped"]["RefCLIPScore"] == reason
    assert f"| CLIPScore | {reason} |" in metrics.format_report(result)


def test_retrieval_vectors_are_reused_and_only_the_others_embedded(tiny_clip, monkeypatch):
    from image_embedder import ImageEmbedder
    retrieval = ImageEmbedder(tiny_clip)
    stored = dict(zip(IDS[:3], retrieval.embed([make_image(i) for i in range(3)])))
    embedded = []
    real = ImageEmbedder.embed
    monkeypatch.setattr(ImageEmbedder, "embed",
                        lambda self, images, *a, **k: embedded.append(len(images))
                        or real(self, images, *a, **k))
    settings = config.resolve(clip_model_name=tiny_clip, metric_clip_model=tiny_clip,
                              device="cpu")
    scorer = clip_score.scorer_for(settings, retrieval=retrieval, known_vector=stored.get,
                                   image_of=lambda key: make_image(int(key)))
    assert scorer.embedder is retrieval           # the loaded model, not a second copy
    scores = scorer.score(IDS, CANDIDATES, REFERENCES)
    assert embedded == [1] and scores.reused == 3  # only image 3 had no stored vector
    fresh = clip_score.compute(retrieval.embed([make_image(i) for i in range(4)]), CANDIDATES,
                               retrieval, REFERENCES)
    np.testing.assert_allclose(scores.clip_score, fresh.clip_score, atol=1e-6)

    # another metric model: the retrieval vectors are not comparable and are not used
    other = clip_score.scorer_for(settings.replace(metric_clip_model=tiny_clip + "/"),
                                  retrieval=retrieval, known_vector=stored.get,
                                  image_of=lambda key: make_image(int(key)))
    embedded.clear()
    assert other.score(IDS, CANDIDATES).reused == 0 and embedded == [4]
