"""ImageEmbedder on the tiny random CLIP, and the training-pool embedding cache."""

from __future__ import annotations

import json
import logging
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import transformers

from errors import UserError
from fake_flickr import make_image
from image_embedder import ImageEmbedder, embed_pool, l2_normalise, prefetch

N_IMAGES = 7  # not a multiple of 3: the last batch is short


@pytest.fixture(scope="module")
def embedder(tiny_clip) -> ImageEmbedder:
    return ImageEmbedder(tiny_clip, device="cpu", batch_size=4)


@pytest.fixture(scope="module")
def images():
    return [make_image(i) for i in range(N_IMAGES)]


@pytest.fixture(scope="module")
def reference(embedder, images) -> np.ndarray:
    return embedder.embed(images)


# ------------------------------------------------------------------------------------ embed
def test_embed_returns_float32_rows_of_model_dim(reference, embedder):
    assert reference.dtype == np.float32
    assert reference.shape == (N_IMAGES, embedder.dim)


def test_dim_is_the_clip_projection_dim(embedder):
    assert embedder.dim == embedder.model.config.projection_dim == 16


def test_embed_rows_are_unit_norm(reference):
    np.testing.assert_allclose(np.linalg.norm(reference, axis=1), 1.0, atol=1e-5)


def test_different_images_get_different_embeddings(reference):
    cos = reference @ reference.T
    off_diagonal = cos[~np.eye(len(cos), dtype=bool)]
    assert off_diagonal.max() < 0.999


@pytest.mark.parametrize("batch_size", [1, 3, 8])
def test_embeddings_do_not_depend_on_batch_size(tiny_clip, images, reference, batch_size):
    got = ImageEmbedder(tiny_clip, device="cpu", batch_size=batch_size).embed(images)
    np.testing.assert_allclose(got, reference, atol=1e-5)


def test_embed_accepts_a_generator(embedder, reference):
    got = embedder.embed(make_image(i) for i in range(N_IMAGES))
    np.testing.assert_allclose(got, reference, atol=1e-5)


@pytest.mark.parametrize("overlap", [False, True])
def test_the_bar_counts_unreadable_images_and_ends_at_its_total(embedder, images, reference,
                                                                overlap, monkeypatch, capsys):
    # a folder of 6 where 2 cannot be read: the bar reads 6/6 (100%) with unreadable=2
    monkeypatch.setattr(embedder, "overlap", overlap)
    items = [images[0], None, *images[1:4], None]
    got = embedder.embed(iter(items), total=len(items), progress=True)
    np.testing.assert_allclose(got, reference[:4], atol=1e-5)
    final = capsys.readouterr().err.rstrip().split("\r")[-1]
    assert "100%" in final and "6/6" in final and "unreadable=2" in final, final


def test_embed_of_no_images_is_an_empty_model_dim_array(embedder):
    got = embedder.embed([])
    assert got.shape == (0, embedder.dim)
    assert got.dtype == np.float32


def test_embed_reads_the_next_batch_while_the_model_runs(embedder, monkeypatch):
    # The generator is read by the prefetch thread: the first image of batch 2 is
    # read before the model has finished batch 1 (decoding overlaps the forward).
    events = []
    original = embedder.model.get_image_features     # the model's forward (transformers' API)

    def slow_forward(**inputs):
        time.sleep(0.2)
        out = original(**inputs)
        events.append("encoded")
        return out

    def images():
        for i in range(N_IMAGES):
            events.append(f"read {i}")
            yield make_image(i)
    monkeypatch.setattr(embedder.model, "get_image_features", slow_forward)
    monkeypatch.setattr(embedder, "overlap", True)  # the default on GPUs
    embedder.embed(images())
    assert events.index(f"read {embedder.batch_size}") < events.index("encoded")


def test_overlap_is_off_on_the_cpu_and_gives_the_same_embeddings(embedder, images, reference,
                                                                  monkeypatch):
    assert embedder.overlap is False   # the forward already uses every core there
    monkeypatch.setattr(embedder, "overlap", True)
    np.testing.assert_array_equal(embedder.embed(images), reference)


@pytest.mark.parametrize("overlap", [False, True])
def test_embed_raises_an_error_of_the_image_source(embedder, monkeypatch, overlap):
    monkeypatch.setattr(embedder, "overlap", overlap)

    def images():
        yield make_image(0)
        raise UserError("image 1 could not be read")
    with pytest.raises(UserError, match="image 1"):
        embedder.embed(images())


def test_prefetch_keeps_order_and_stops_its_thread_when_the_consumer_stops():
    assert list(prefetch(iter(range(50)), depth=3)) == list(range(50))
    produced = []

    def numbers():
        for n in range(1000):
            produced.append(n)
            yield n
    before = threading.active_count()
    stream = prefetch(numbers(), depth=2)
    assert [next(stream) for _ in range(3)] == [0, 1, 2]
    stream.close()
    assert threading.active_count() == before
    assert len(produced) < 10  # it stopped, not ran to the end


def test_prefetch_reraises_the_producer_error_in_the_consumer():
    def broken():
        yield 1
        raise ValueError("boom")
    stream = prefetch(broken())
    assert next(stream) == 1
    with pytest.raises(ValueError, match="boom"):
        next(stream)


def test_loaded_model_and_processor_embed_like_the_path(tiny_clip, images, reference):
    model = transformers.CLIPModel.from_pretrained(tiny_clip)
    processor = transformers.CLIPProcessor.from_pretrained(tiny_clip)
    embedder = ImageEmbedder(model, processor, device="cpu", batch_size=4)
    assert embedder.name == tiny_clip
    np.testing.assert_allclose(embedder.embed(images), reference, atol=1e-5)


def test_loaded_model_without_processor_raises(tiny_clip):
    model = transformers.CLIPModel.from_pretrained(tiny_clip)
    with pytest.raises(ValueError, match="processor"):
        ImageEmbedder(model, device="cpu")


def _tiny_bert() -> transformers.BertModel:
    config = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
                                     num_attention_heads=2, intermediate_size=32)
    return transformers.BertModel(config)


def test_loaded_model_without_image_tower_is_a_user_error(tiny_clip):
    processor = transformers.AutoImageProcessor.from_pretrained(tiny_clip)
    with pytest.raises(UserError, match="no image tower"):
        ImageEmbedder(_tiny_bert(), processor, device="cpu")


def test_saved_non_clip_checkpoint_is_a_user_error(tiny_clip, tmp_path):
    folder = tmp_path / "bert-with-image-processor"
    _tiny_bert().save_pretrained(folder)
    transformers.AutoImageProcessor.from_pretrained(tiny_clip).save_pretrained(folder)
    with pytest.raises(UserError, match="no image tower"):
        ImageEmbedder(str(folder), device="cpu")


# ------------------------------------------------------------------------------- embed_texts
def test_embed_texts_gives_unit_rows_in_the_image_space(embedder):
    texts = ["a dog", "a red car on the road", "밝은 빨간색 미니 원피스", "a dog"]
    vectors = embedder.embed_texts(texts)
    assert vectors.shape == (4, embedder.dim) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(vectors[0], vectors[3], atol=1e-6)   # batch padding changes nothing
    assert not np.allclose(vectors[0], vectors[1], atol=1e-3)
    assert embedder.embed_texts([]).shape == (0, embedder.dim)


def test_embed_texts_of_a_loaded_model_uses_its_processor_tokenizer(tiny_clip, embedder):
    model = transformers.CLIPModel.from_pretrained(tiny_clip)
    loaded = ImageEmbedder(model, transformers.CLIPProcessor.from_pretrained(tiny_clip))
    np.testing.assert_allclose(loaded.embed_texts(["a dog"]), embedder.embed_texts(["a dog"]),
                               atol=1e-5)


def test_embed_texts_without_a_text_tower_is_one_line(tiny_resnet):
    resnet = ImageEmbedder(tiny_resnet, what="image model", setting="--backbone")
    assert not resnet.has_text_tower
    with pytest.raises(UserError, match="has no text tower.*CLIP or SigLIP") as caught:
        resnet.embed_texts(["a dog"])
    assert "\n" not in str(caught.value)


def test_l2_normalise_scales_rows_to_unit_length():
    got = l2_normalise(np.array([[3.0, 4.0], [0.0, -2.0]]))
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, [[0.6, 0.8], [0.0, -1.0]], atol=1e-7)


def test_l2_normalise_keeps_zero_rows_zero():
    got = l2_normalise(np.array([[0.0, 0.0, 0.0], [1.0, 2.0, 2.0]]))
    assert np.all(np.isfinite(got))
    np.testing.assert_array_equal(got[0], 0.0)
    np.testing.assert_allclose(got[1], [1 / 3, 2 / 3, 2 / 3], atol=1e-7)


# ------------------------------------------------------------------------------- embed_pool
IDS = [f"img{i}.jpg" for i in range(5)]


def load(image_id: str):
    """Like dataset_loader.open_image: UserError for a file that cannot be read."""
    if image_id.startswith("broken"):
        raise UserError(f"image {image_id} could not be read: cannot identify image file")
    return make_image(int(image_id[3:].split(".")[0]))


@pytest.fixture
def count_forward(monkeypatch):
    """Wrap an embedder's model forward (transformers' get_image_features for CLIP-like
    models, forward for plain backbones) so each test can see whether the model ran,
    and on how many images."""
    def wrap(embedder: ImageEmbedder) -> list[int]:
        calls = []
        name = _forward_of(embedder)
        original = getattr(embedder.model, name)

        def counting(*args, **inputs):
            calls.append(len(inputs["pixel_values"]))
            return original(*args, **inputs)
        monkeypatch.setattr(embedder.model, name, counting)
        return calls
    return wrap


def _forward_of(embedder: ImageEmbedder) -> str:
    return "get_image_features" if embedder.uses_image_features else "forward"


def _model_must_not_run(monkeypatch, embedder):
    def fail(*args, **inputs):
        raise AssertionError("the model ran although the cache should have been used")
    monkeypatch.setattr(embedder.model, _forward_of(embedder), fail)


def test_embed_pool_returns_ids_and_their_embeddings(embedder, tmp_path):
    ids, vectors = embed_pool(embedder, IDS, load, tmp_path, "flickr|split-a")
    assert ids == IDS
    np.testing.assert_allclose(vectors, embedder.embed(load(i) for i in IDS), atol=1e-5)


def test_embed_pool_first_call_writes_npy_and_json_cache(embedder, tmp_path):
    ids, vectors = embed_pool(embedder, IDS, load, tmp_path, "flickr|split-a")
    arrays = list((tmp_path / "image_embeddings").glob("*.npy"))
    sidecars = list((tmp_path / "image_embeddings").glob("*.json"))
    assert len(arrays) == len(sidecars) == 1
    assert arrays[0].stem == sidecars[0].stem
    np.testing.assert_array_equal(np.load(arrays[0]), vectors)
    meta = json.loads(sidecars[0].read_text())
    assert meta == {"model": embedder.name, "dim": embedder.dim, "ids": IDS}
    assert not list((tmp_path / "image_embeddings").glob("*.tmp*"))


def test_embed_pool_second_call_loads_from_cache_without_running_the_model(
        embedder, tmp_path, monkeypatch):
    first_ids, first = embed_pool(embedder, IDS, load, tmp_path, "flickr|split-a")
    _model_must_not_run(monkeypatch, embedder)
    ids, vectors = embed_pool(embedder, IDS, load, tmp_path, "flickr|split-a")
    assert ids == first_ids
    assert vectors.dtype == np.float32
    np.testing.assert_array_equal(vectors, first)


def test_embed_pool_other_cache_key_misses_the_cache(embedder, tmp_path, count_forward):
    embed_pool(embedder, IDS, load, tmp_path, "flickr|split-a")
    calls = count_forward(embedder)
    embed_pool(embedder, IDS, load, tmp_path, "flickr|split-b")
    assert sum(calls) == len(IDS)
    assert len(list((tmp_path / "image_embeddings").glob("*.npy"))) == 2


def test_embed_pool_other_ids_miss_the_cache(embedder, tmp_path, count_forward):
    embed_pool(embedder, IDS, load, tmp_path, "flickr|split-a")
    calls = count_forward(embedder)
    ids, vectors = embed_pool(embedder, IDS[:3], load, tmp_path, "flickr|split-a")
    assert sum(calls) == 3
    assert ids == IDS[:3] and vectors.shape == (3, embedder.dim)


def test_embed_pool_other_model_name_misses_the_cache(embedder, tiny_clip, tmp_path,
                                                      count_forward):
    embed_pool(embedder, IDS, load, tmp_path, "flickr|split-a")
    other = ImageEmbedder(str(shutil.copytree(tiny_clip, tmp_path / "other-clip")), device="cpu")
    assert other.name != embedder.name
    calls = count_forward(other)
    embed_pool(other, IDS, load, tmp_path, "flickr|split-a")
    assert sum(calls) == len(IDS)


def test_a_bfloat16_run_does_not_reuse_float32_cached_vectors(embedder, tiny_clip, tmp_path,
                                                             count_forward):
    import torch
    embed_pool(embedder, IDS, load, tmp_path, "flickr|split-a")          # float32
    bf16 = ImageEmbedder(tiny_clip, device="cpu", dtype=torch.bfloat16)
    assert bf16.key != embedder.key
    calls = count_forward(bf16)
    embed_pool(bf16, IDS, load, tmp_path, "flickr|split-a")
    assert sum(calls) == len(IDS)                                         # embedded again
    assert len(list((tmp_path / "image_embeddings").glob("*.npy"))) == 2


def test_embed_pool_model_name_with_a_dot_keeps_cache_keys_apart(tiny_clip, tmp_path,
                                                                 count_forward):
    # "clip-v1.5-<digest>".with_suffix(".npy") used to drop the digest, so every split
    # and id list of such a model shared one cache file.
    folder = shutil.copytree(tiny_clip, tmp_path / "models" / "clip-v1.5")
    embedder = ImageEmbedder(str(folder), device="cpu")
    embed_pool(embedder, IDS, load, tmp_path / "cache", "flickr|split-a")
    calls = count_forward(embedder)
    ids, _ = embed_pool(embedder, IDS[:2], load, tmp_path / "cache", "flickr|split-b")
    assert ids == IDS[:2]
    assert sum(calls) == 2


def test_embed_pool_skips_an_unreadable_image_with_a_warning(embedder, tmp_path, caplog):
    requested = [IDS[0], "broken.jpg", IDS[1]]
    with caplog.at_level(logging.WARNING, logger="image_embedder"):
        ids, vectors = embed_pool(embedder, requested, load, tmp_path, "flickr|split-a")
    assert ids == [IDS[0], IDS[1]]
    np.testing.assert_allclose(vectors, embedder.embed([load(IDS[0]), load(IDS[1])]), atol=1e-5)
    assert any("broken.jpg" in r.getMessage() for r in caplog.records
               if r.levelno == logging.WARNING)


def test_embed_pool_cache_keeps_only_the_readable_ids(embedder, tmp_path, monkeypatch):
    requested = [IDS[0], "broken.jpg", IDS[1]]
    embed_pool(embedder, requested, load, tmp_path, "flickr|split-a")
    _model_must_not_run(monkeypatch, embedder)
    ids, vectors = embed_pool(embedder, requested, load, tmp_path, "flickr|split-a")
    assert ids == [IDS[0], IDS[1]] and vectors.shape == (2, embedder.dim)


def _corrupt(folder: Path, how: str) -> None:
    array, = folder.glob("*.npy")
    sidecar, = folder.glob("*.json")
    if how == "garbage npy":
        array.write_bytes(b"not a numpy file")
    elif how == "empty npy":
        array.write_bytes(b"")
    elif how == "truncated npy":
        array.write_bytes(array.read_bytes()[:150])
    elif how == "bad json":
        sidecar.write_text("{not json")
    elif how == "json missing keys":
        sidecar.write_text("{}")
    elif how == "json not an object":
        sidecar.write_text("[1, 2]")
    elif how == "shape mismatch":
        np.save(array, np.ones((2, 3), dtype=np.float32))
    else:
        raise ValueError(how)


@pytest.mark.parametrize("how", ["garbage npy", "empty npy", "truncated npy", "bad json",
                                 "json missing keys", "json not an object", "shape mismatch"])
def test_embed_pool_recomputes_over_a_corrupt_cache_with_a_warning(embedder, tmp_path, caplog,
                                                                   how):
    _, expected = embed_pool(embedder, IDS, load, tmp_path, "flickr|split-a")
    _corrupt(tmp_path / "image_embeddings", how)
    with caplog.at_level(logging.WARNING, logger="image_embedder"):
        ids, vectors = embed_pool(embedder, IDS, load, tmp_path, "flickr|split-a")
    assert ids == IDS
    np.testing.assert_allclose(vectors, expected, atol=1e-5)
    assert any("ignoring unusable embedding cache" in r.getMessage() for r in caplog.records)


def test_embed_pool_rewrites_a_corrupt_cache(embedder, tmp_path, monkeypatch):
    _, expected = embed_pool(embedder, IDS, load, tmp_path, "flickr|split-a")
    _corrupt(tmp_path / "image_embeddings", "bad json")
    embed_pool(embedder, IDS, load, tmp_path, "flickr|split-a")
    _model_must_not_run(monkeypatch, embedder)
    _, vectors = embed_pool(embedder, IDS, load, tmp_path, "flickr|split-a")
    np.testing.assert_array_equal(vectors, expected)


def test_embed_pool_without_cache_dir_writes_nothing(embedder, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ids, vectors = embed_pool(embedder, IDS, load, None, "flickr|split-a")
    assert ids == IDS and vectors.shape == (len(IDS), embedder.dim)
    assert list(tmp_path.iterdir()) == []


def test_a_path_object_loads_like_its_string(tiny_clip):
    images = [make_image(i) for i in range(2)]
    np.testing.assert_allclose(ImageEmbedder(Path(tiny_clip)).embed(images),
                               ImageEmbedder(tiny_clip).embed(images), atol=1e-6)


# ------------------------------------------------------------------ other backbones
from image_embedder import BACKBONES, backbone_model_name  # noqa: E402

FAMILIES = ["clip", "siglip", "resnet", "dinov2"]
# embedding width of each tiny fixture, and where it comes from
EXPECTED_DIM = {
    "clip": lambda c: c.projection_dim,                   # projected image embedding
    "siglip": lambda c: c.vision_config.hidden_size,      # attention-pooled vision tower
    "resnet": lambda c: c.hidden_sizes[-1],               # globally pooled last stage
    "dinov2": lambda c: c.hidden_size,                    # layer-normed CLS token
}


@pytest.fixture(scope="module")
def family_paths(request) -> dict[str, str]:
    return {f: request.getfixturevalue(f"tiny_{f}") for f in FAMILIES}


@pytest.fixture(scope="module")
def family_embedders(family_paths) -> dict[str, ImageEmbedder]:
    return {f: ImageEmbedder(p, device="cpu", batch_size=4) for f, p in family_paths.items()}


@pytest.fixture(scope="module")
def family_references(family_embedders, images) -> dict[str, np.ndarray]:
    return {f: e.embed(images) for f, e in family_embedders.items()}


@pytest.mark.parametrize("family", FAMILIES)
def test_backbone_embeds_unit_float32_rows_of_its_dim(family, family_embedders,
                                                      family_references):
    embedder, got = family_embedders[family], family_references[family]
    assert got.dtype == np.float32
    assert got.shape == (N_IMAGES, embedder.dim)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_backbone_dim_comes_from_its_config(family, family_paths):
    embedder = ImageEmbedder(family_paths[family], device="cpu")   # no forward pass yet
    expected = EXPECTED_DIM[family](embedder.model.config)
    assert embedder.dim == expected
    assert embedder.embed([]).shape == (0, expected)


def test_backbones_use_image_features_only_for_clip_and_siglip(family_embedders):
    assert {f for f, e in family_embedders.items() if e.uses_image_features} == {"clip", "siglip"}


@pytest.mark.parametrize("family", FAMILIES)
def test_backbone_different_images_get_different_embeddings(family, family_references):
    ref = family_references[family]
    off_diagonal = (ref @ ref.T)[~np.eye(N_IMAGES, dtype=bool)]
    assert off_diagonal.max() < 0.99


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("batch_size", [1, 3])
def test_backbone_embeddings_do_not_depend_on_batch_size(family, batch_size, family_embedders,
                                                         family_references, images,
                                                         monkeypatch):
    embedder = family_embedders[family]
    monkeypatch.setattr(embedder, "batch_size", batch_size)
    np.testing.assert_allclose(embedder.embed(images), family_references[family], atol=1e-5)


def test_resnet_dim_is_the_pooled_width_of_the_last_stage(family_embedders, images):
    embedder = family_embedders["resnet"]
    config = embedder.model.config
    assert embedder.dim == config.hidden_sizes[-1] == 16
    pixels = embedder.processor(images=images[:2], return_tensors="pt")["pixel_values"]
    assert embedder.model(pixel_values=pixels).pooler_output.shape == (2, 16, 1, 1)


def test_resnet_embedding_is_its_normalised_pooler_output(family_embedders, family_references,
                                                          images):
    embedder = family_embedders["resnet"]
    pixels = embedder.processor(images=images, return_tensors="pt")["pixel_values"]
    pooled = embedder.model(pixel_values=pixels).pooler_output.detach().flatten(1).numpy()
    np.testing.assert_allclose(family_references["resnet"], l2_normalise(pooled), atol=1e-5)


def test_dinov2_embedding_is_its_layer_normed_cls_token(family_embedders, family_references,
                                                        images):
    embedder = family_embedders["dinov2"]
    pixels = embedder.processor(images=images, return_tensors="pt")["pixel_values"]
    out = embedder.model(pixel_values=pixels, output_hidden_states=True)
    cls = embedder.model.layernorm(out.hidden_states[-1][:, 0]).detach().numpy()
    np.testing.assert_allclose(family_references["dinov2"], l2_normalise(cls), atol=1e-5)


def test_siglip_embedding_is_its_image_features(family_embedders, family_references, images):
    embedder = family_embedders["siglip"]
    pixels = embedder.processor(images=images, return_tensors="pt")["pixel_values"]
    features = embedder.model.get_image_features(pixel_values=pixels).pooler_output
    np.testing.assert_allclose(family_references["siglip"],
                               l2_normalise(features.detach().numpy()), atol=1e-5)


def test_vision_model_without_pooler_embeds_its_cls_token(images):
    config = transformers.ViTConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                    intermediate_size=32, image_size=32, patch_size=8)
    model = transformers.ViTModel(config, add_pooling_layer=False).eval()
    processor = transformers.ViTImageProcessorPil(size={"height": 32, "width": 32})
    embedder = ImageEmbedder(model, processor, device="cpu")
    got = embedder.embed(images[:3])
    assert got.shape == (3, embedder.dim) and embedder.dim == 16
    pixels = processor(images=images[:3], return_tensors="pt")["pixel_values"]
    cls = model(pixel_values=pixels).last_hidden_state[:, 0].detach().numpy()
    np.testing.assert_allclose(got, l2_normalise(cls), atol=1e-5)


def test_dim_unknown_to_the_config_comes_from_one_forward_pass(tiny_resnet):
    model = transformers.AutoModel.from_pretrained(tiny_resnet)
    model.config.hidden_sizes = []          # the config no longer says how wide the output is
    embedder = ImageEmbedder(model, transformers.AutoImageProcessor.from_pretrained(tiny_resnet))
    assert embedder.dim == 16
    assert embedder.embed([]).shape == (0, 16)


def test_saved_text_only_checkpoint_without_image_processor_is_a_user_error(tmp_path):
    folder = tmp_path / "bert"
    _tiny_bert().save_pretrained(folder)
    with pytest.raises(UserError, match="is not a vision model") as info:
        ImageEmbedder(str(folder), device="cpu")
    assert "BertModel" in str(info.value) and "\n" not in str(info.value)


def test_vision_model_with_a_tokenizer_for_processor_is_a_user_error(tiny_clip):
    model = transformers.CLIPModel.from_pretrained(tiny_clip)
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_clip)
    with pytest.raises(UserError, match="no image processor"):
        ImageEmbedder(model, tokenizer, device="cpu")


def test_error_messages_name_the_model_and_setting_given():
    with pytest.raises(UserError) as info:
        ImageEmbedder("/nonexistent/backbone", what="image model", setting="--backbone")
    assert str(info.value).startswith("image model '/nonexistent/backbone': no such file")
    assert "--backbone" in str(info.value)


# ---------------------------------------------------------------- backbone_model_name
def test_backbones_table():
    assert BACKBONES == {"clip": None, "siglip": "google/siglip-base-patch16-224",
                         "resnet50": "microsoft/resnet-50", "dinov2": "facebook/dinov2-small"}


@pytest.mark.parametrize("backbone, expected", [
    ("clip", "openai/clip-vit-base-patch32"),
    ("siglip", "google/siglip-base-patch16-224"),
    ("resnet50", "microsoft/resnet-50"),
    ("dinov2", "facebook/dinov2-small"),
    ("ResNet50", "microsoft/resnet-50"),
    (" dinov2 ", "facebook/dinov2-small"),
    ("facebook/dinov2-base", "facebook/dinov2-base"),
    ("/models/my-vit", "/models/my-vit"),
    ("./clip", "./clip"),
])
def test_backbone_model_name(backbone, expected):
    assert backbone_model_name(backbone, "openai/clip-vit-base-patch32") == expected


def test_backbone_clip_is_the_configured_clip_model(tiny_clip):
    assert backbone_model_name("clip", tiny_clip) == tiny_clip


def test_empty_backbone_is_a_user_error():
    with pytest.raises(UserError, match="clip, siglip, resnet50, dinov2"):
        backbone_model_name("  ", "openai/clip-vit-base-patch32")


# ------------------------------------------------------------- embed_pool per backbone
def test_embed_pool_keeps_one_cache_file_per_backbone(family_embedders, tmp_path, monkeypatch):
    first = {}
    for family, embedder in family_embedders.items():
        first[family] = embed_pool(embedder, IDS, load, tmp_path, "flickr|split-a")[1]
        assert first[family].shape == (len(IDS), embedder.dim)
    arrays = sorted((tmp_path / "image_embeddings").glob("*.npy"))
    assert len(arrays) == len(FAMILIES)
    metas = [json.loads(a.with_suffix(".json").read_text()) for a in arrays]
    assert sorted(m["model"] for m in metas) == sorted(e.name for e in family_embedders.values())
    for family, embedder in family_embedders.items():     # each reads back its own file
        _model_must_not_run(monkeypatch, embedder)
        ids, vectors = embed_pool(embedder, IDS, load, tmp_path, "flickr|split-a")
        assert ids == IDS
        np.testing.assert_array_equal(vectors, first[family])
