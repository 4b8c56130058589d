"""VLMCaptioner on the tiny random SmolVLM (Idefics3), caption cleaning, and the real
checkpoints when they are in the local Hugging Face cache."""

from __future__ import annotations

import logging
import re
import time

import numpy as np
import pytest
import transformers

from errors import UserError
from fake_flickr import make_image
from vlm_captioner import EmptyCaptionError, VLMCaptioner, clean_caption

PROMPT = "Describe the image in one sentence."
PROMPTS = ["Describe the image.",
           "Similar images were captioned: a dog runs on the grass. a cat sits. Caption this one.",
           "Caption?"]
ROLE_PREFIX = re.compile(r"^\s*(assistant|user)\s*:", re.IGNORECASE)


# ---------------------------------------------------------------------------- clean_caption
@pytest.mark.parametrize("raw, expected", [
    ("Assistant: A dog runs.", "A dog runs."),
    ("assistant:A dog runs.", "A dog runs."),
    ("Assistant: Caption: A dog runs.", "A dog runs."),
    ("Answer: Assistant: caption : A dog runs.", "A dog runs."),
    ('"A dog runs."', "A dog runs."),
    ("Assistant: 'A dog runs.'", "A dog runs."),
    ('Caption: "`A dog runs.`"', "A dog runs."),
    ("  A dog\n runs\tthrough   the\n\ngrass.  ", "A dog runs through the grass."),
    ("", ""),
    ("   \n ", ""),
    ("Assistant:", ""),
])
def test_clean_caption(raw, expected):
    assert clean_caption(raw) == expected


def test_clean_caption_removes_an_echoed_prompt():
    assert clean_caption(f"{PROMPT} A dog runs.", PROMPT) == "A dog runs."


def test_clean_caption_removes_an_echoed_prompt_then_the_role():
    assert clean_caption(f"{PROMPT}\nAssistant: A dog runs.", PROMPT + " ") == "A dog runs."


def test_clean_caption_keeps_text_that_only_mentions_the_prompt():
    assert clean_caption("A dog runs.", PROMPT) == "A dog runs."


def test_clean_caption_keeps_inner_quotes():
    assert clean_caption('A sign that says "stop".') == 'A sign that says "stop".'


# ------------------------------------------------------------------------- tiny SmolVLM
@pytest.fixture(scope="module")
def captioner(tiny_vlm) -> VLMCaptioner:
    return VLMCaptioner(tiny_vlm, device="cpu", max_new_tokens=8)


@pytest.fixture(scope="module")
def images():
    # different sizes and aspect ratios: different numbers of tiles within one batch
    return [make_image(0), make_image(1, size=(60, 160)), make_image(2, size=(200, 50))]


def test_caption_is_a_non_empty_single_line_without_role_prefix(captioner, images):
    caption = captioner.caption(images[0], PROMPT)
    assert isinstance(caption, str) and caption
    assert "\n" not in caption
    assert caption == caption.strip()
    assert not ROLE_PREFIX.match(caption)
    assert "<" not in caption  # no special tokens such as <end_of_utterance>


def test_caption_is_deterministic(captioner, images):
    assert captioner.caption(images[0], PROMPT) == captioner.caption(images[0], PROMPT)


def test_caption_depends_on_the_image(captioner, images):
    captions = {captioner.caption(image, PROMPT) for image in images}
    assert len(captions) > 1


def test_caption_batch_equals_unbatched_captions(captioner, images):
    batched = captioner.caption_batch(images, PROMPTS)
    assert batched == [captioner.caption(image, p) for image, p in zip(images, PROMPTS)]
    assert all(batched)


def test_caption_batch_rejects_mismatched_lengths(captioner, images):
    with pytest.raises(ValueError):
        captioner.caption_batch(images, PROMPTS[:2])


def test_beam_search_gives_captions(tiny_vlm, images):
    beams = VLMCaptioner(tiny_vlm, device="cpu", max_new_tokens=8, num_beams=2)
    captions = beams.caption_batch(images, PROMPTS)
    assert len(captions) == 3 and all(isinstance(c, str) and c for c in captions)
    assert captions == [beams.caption(image, p) for image, p in zip(images, PROMPTS)]


def test_max_new_tokens_bounds_the_caption_length(tiny_vlm, images):
    short = VLMCaptioner(tiny_vlm, device="cpu", max_new_tokens=2).caption(images[0], PROMPT)
    # every token the tiny model may generate is one whole word
    assert 1 <= len(short.split()) <= 2


def test_chat_text_renders_the_smolvlm_chat_format(captioner):
    assert captioner.chat_text("Describe it.") == (
        "<|im_start|>User:<image>Describe it.<end_of_utterance>\nAssistant:")


def test_tokenizer_pads_on_the_left_after_init(tiny_vlm):
    model = transformers.AutoModelForImageTextToText.from_pretrained(tiny_vlm)
    processor = transformers.AutoProcessor.from_pretrained(tiny_vlm)
    processor.tokenizer.padding_side = "right"
    captioner = VLMCaptioner(model, processor, device="cpu")
    assert captioner.processor.tokenizer.padding_side == "left"


def test_loaded_model_and_processor_caption_like_the_path(tiny_vlm, captioner, images):
    model = transformers.AutoModelForImageTextToText.from_pretrained(tiny_vlm)
    processor = transformers.AutoProcessor.from_pretrained(tiny_vlm)
    loaded = VLMCaptioner(model, processor, device="cpu", max_new_tokens=8)
    assert loaded.caption(images[0], PROMPT) == captioner.caption(images[0], PROMPT)


def test_loaded_model_without_processor_raises(tiny_vlm):
    model = transformers.AutoModelForImageTextToText.from_pretrained(tiny_vlm)
    with pytest.raises(ValueError, match="processor"):
        VLMCaptioner(model, device="cpu")


def test_processor_without_chat_template_is_a_user_error(tiny_vlm):
    model = transformers.AutoModelForImageTextToText.from_pretrained(tiny_vlm)
    processor = transformers.AutoProcessor.from_pretrained(tiny_vlm)
    processor.chat_template = None
    with pytest.raises(UserError, match="chat template"):
        VLMCaptioner(model, processor, device="cpu")


def test_empty_caption_error_is_a_user_error():
    assert issubclass(EmptyCaptionError, UserError)


def test_empty_generation_raises_empty_caption_error(captioner, images, monkeypatch):
    monkeypatch.setattr(captioner.processor, "batch_decode",
                        lambda tokens, **kwargs: [""] * len(tokens))
    with pytest.raises(EmptyCaptionError, match="empty caption"):
        captioner.caption(images[0], PROMPT)


def test_generation_of_only_a_role_prefix_raises_empty_caption_error(captioner, images,
                                                                     monkeypatch):
    monkeypatch.setattr(captioner.processor, "batch_decode",
                        lambda tokens, **kwargs: [" Assistant: \n"] * len(tokens))
    with pytest.raises(EmptyCaptionError):
        captioner.caption(images[0], PROMPT)


def _tiles(captioner: VLMCaptioner, image) -> int:
    inputs = captioner.processor(text=[captioner.chat_text(PROMPT)], images=[[image]],
                                 return_tensors="pt")
    return inputs["pixel_values"].shape[1]


def test_image_longest_edge_sets_the_image_processor_size(tiny_vlm, caplog):
    with caplog.at_level(logging.WARNING, logger="vlm_captioner"):
        captioner = VLMCaptioner(tiny_vlm, device="cpu", max_new_tokens=8, image_longest_edge=32)
    assert captioner.processor.image_processor.size["longest_edge"] == 32
    assert not [r for r in caplog.records if "ignored" in r.getMessage()]


def test_image_longest_edge_of_one_tile_gives_one_tile(tiny_vlm, captioner, images):
    # the tiny model's tiles are 32 px; its default longest edge of 64 px splits into 2x2 + 1
    assert _tiles(captioner, images[0]) > 1
    one_tile = VLMCaptioner(tiny_vlm, device="cpu", max_new_tokens=8, image_longest_edge=32)
    assert _tiles(one_tile, images[0]) == 1


def test_captioning_works_with_image_longest_edge(tiny_vlm, images):
    one_tile = VLMCaptioner(tiny_vlm, device="cpu", max_new_tokens=8, image_longest_edge=32)
    captions = one_tile.caption_batch(images, PROMPTS)
    assert all(isinstance(c, str) and c for c in captions)


def test_image_splitting_off_gives_one_tile_at_any_longest_edge(tiny_vlm, captioner, images):
    assert captioner.processor.image_processor.do_image_splitting  # the checkpoint's default
    whole = VLMCaptioner(tiny_vlm, device="cpu", max_new_tokens=8, image_splitting=False)
    assert [_tiles(whole, im) for im in images] == [1, 1, 1]
    assert [_tiles(captioner, im) for im in images] != [1, 1, 1]
    assert all(whole.caption_batch(images, PROMPTS))


def test_image_splitting_on_keeps_the_checkpoint_tiles(tiny_vlm, captioner, images):
    split = VLMCaptioner(tiny_vlm, device="cpu", max_new_tokens=8, image_splitting=True)
    assert [_tiles(split, im) for im in images] == [_tiles(captioner, im) for im in images]


def test_attn_implementation_is_passed_to_the_model(tiny_vlm):
    captioner = VLMCaptioner(tiny_vlm, device="cpu", max_new_tokens=8,
                             attn_implementation="eager")
    assert captioner.model.config._attn_implementation == "eager"


@pytest.mark.parametrize("kernel", ["bogus", "flash_attention_2"])  # no flash-attn package here
def test_unusable_attn_implementation_is_a_user_error(tiny_vlm, kernel):
    with pytest.raises(UserError, match=f"--vlm-attn-implementation '{kernel}'"):
        VLMCaptioner(tiny_vlm, device="cpu", attn_implementation=kernel)


def test_time_to_first_token_is_measured_within_the_generate_call(captioner, images):
    start = time.perf_counter()
    captioner.caption_batch(images[:1], PROMPTS[:1])
    elapsed = time.perf_counter() - start
    assert 0 < captioner.last_first_token < elapsed


# ------------------------------------------------------------------- real checkpoints
REAL_MODELS = {"clip": "openai/clip-vit-base-patch32", "vlm": "HuggingFaceTB/SmolVLM-Instruct",
               "bge": "BAAI/bge-base-en-v1.5"}


def _cached(repo: str) -> bool:
    from huggingface_hub import try_to_load_from_cache
    return isinstance(try_to_load_from_cache(repo, "config.json"), str)


@pytest.mark.real_models
def test_real_default_checkpoints_caption_and_embed():
    missing = [repo for repo in REAL_MODELS.values() if not _cached(repo)]
    if missing:
        pytest.skip(f"not in the local Hugging Face cache: {', '.join(missing)} "
                    f"(download with `hf download REPO` to run this test)")
    from caption_embedder import CaptionEmbedder
    from image_embedder import ImageEmbedder

    image = make_image(0, size=(384, 288))
    captioner = VLMCaptioner(REAL_MODELS["vlm"], device="cpu", max_new_tokens=24,
                             image_longest_edge=384)
    caption = captioner.caption(image, "Describe this image in one short sentence.")
    words = re.findall(r"[A-Za-z]+", caption)
    assert len(words) >= 2 and "\n" not in caption
    assert sum(map(len, words)) >= 0.6 * len(caption.replace(" ", ""))  # mostly Latin letters

    image_vectors = ImageEmbedder(REAL_MODELS["clip"], device="cpu").embed([image])
    assert image_vectors.shape == (1, 512)
    caption_vectors = CaptionEmbedder(REAL_MODELS["bge"], device="cpu").embed_captions([caption])
    assert caption_vectors.shape == (1, 768)
    np.testing.assert_allclose(np.linalg.norm(caption_vectors, axis=1), 1.0, atol=1e-4)


# ------------------------------------------------------------------ captioner families
FAMILY_NAMES = ["smolvlm", "blip", "git", "blip-2", "instructblip", "florence-2", "paligemma"]
# family -> (the text the model is given for PROMPTS[1], whether it reads the prompt)
MODEL_PROMPTS = {
    "blip-2": ("Question: Similar images were captioned: a dog runs on the grass. a cat sits. "
               "Caption this one. Answer:", True),
    "instructblip": (PROMPTS[1], True),
    "florence-2": ("<CAPTION>", False),
    "paligemma": ("caption en", False),
    "blip": ("", False),
    "git": ("", False),
}


@pytest.fixture(scope="module", params=FAMILY_NAMES)
def family_captioner(request, tiny_captioner) -> VLMCaptioner:
    return VLMCaptioner(tiny_captioner(request.param), device="cpu", max_new_tokens=6)


def test_each_family_batched_greedy_captions_equal_single_ones(family_captioner, images):
    batched = family_captioner.caption_batch(images, PROMPTS)
    assert all(batched) and all("<" not in c and "\n" not in c for c in batched)
    assert batched == [family_captioner.caption(im, p) for im, p in zip(images, PROMPTS)]
    assert len(set(batched)) > 1   # the captions depend on the image


def test_each_family_is_recognised_from_its_checkpoint(family_captioner, request):
    name = request.node.callspec.params["family_captioner"]
    family = family_captioner.family
    assert family.name == ("chat" if name == "smolvlm" else name)
    if name == "smolvlm":
        assert family_captioner.uses_context
        assert family_captioner.model_prompt(PROMPTS[1]) == family_captioner.chat_text(PROMPTS[1])
    else:
        text, reads = MODEL_PROMPTS[name]
        assert family_captioner.model_prompt(PROMPTS[1]) == text
        assert family_captioner.uses_context is reads


def test_families_that_read_the_prompt_caption_by_it(family_captioner, images):
    captions = family_captioner.caption_batch([images[0]] * 3, PROMPTS)
    if family_captioner.uses_context:
        assert len(set(captions)) > 1
    else:  # the image alone (or a fixed task prompt): any prompt, one caption
        assert len(set(captions)) == 1


def test_blip2_question_is_one_line():
    from vlm_captioner import FAMILIES
    [blip2] = [f for f in FAMILIES if f.name == "blip-2"]
    assert blip2.text("Captions of similar images:\n- a dog\nWrite one sentence.") == (
        "Question: Captions of similar images: - a dog Write one sentence. Answer:")


@pytest.mark.parametrize("name", ["blip", "git"])
def test_caption_prefix_starts_an_image_only_caption(tiny_captioner, images, name):
    captioner = VLMCaptioner(tiny_captioner(name), device="cpu", max_new_tokens=4,
                             caption_prefix="a picture of")
    captions = captioner.caption_batch(images, PROMPTS)
    assert all(c.startswith("a picture of ") and len(c.split()) == 7 for c in captions)
    assert captions == [captioner.caption(im, p) for im, p in zip(images, PROMPTS)]
    assert captioner.model_prompt(PROMPTS[0]) == "a picture of"


def test_caption_prefix_is_ignored_by_models_that_read_the_prompt(tiny_vlm, captioner, images):
    prefixed = VLMCaptioner(tiny_vlm, device="cpu", max_new_tokens=8, caption_prefix="a picture of")
    assert prefixed.caption(images[0], PROMPT) == captioner.caption(images[0], PROMPT)


def test_a_checkpoint_of_no_family_is_one_line_naming_the_families(tiny_clip):
    with pytest.raises(UserError) as caught:
        VLMCaptioner(tiny_clip, device="cpu")
    message = str(caught.value)
    assert "\n" not in message and "model type 'clip'" in message
    for family in ("chat models", "SmolVLM", "Qwen2-VL", "blip-2", "instructblip", "paligemma",
                   "florence-2", "blip", "git"):
        assert family in message


# ---------------------------------------------------------------- VLM_DEVICE_MAP auto
def test_device_map_auto_offloads_to_disk_under_a_memory_cap_and_captions_the_same(
        tiny_vlm, captioner, images, tmp_path):
    from pathlib import Path
    weights = sum(f.stat().st_size for f in Path(tiny_vlm).glob("*.safetensors"))
    capped = VLMCaptioner(tiny_vlm, device="cpu", max_new_tokens=8, device_map="auto",
                          max_memory={"cpu": weights // 2}, offload_folder=tmp_path / "offload")
    places = set(capped.placement.values())
    assert places == {"cpu", "disk"}   # part on the device, the rest read from disk
    assert captioner.placement is None  # the default: all of it on DEVICE
    assert capped.caption_batch(images, PROMPTS) == captioner.caption_batch(images, PROMPTS)


def test_a_memory_cap_that_leaves_nothing_on_a_device_is_a_user_error(tiny_vlm, tmp_path):
    with pytest.raises(UserError, match="--vlm-max-memory cpu=1000 leaves no room"):
        VLMCaptioner(tiny_vlm, device="cpu", device_map="auto", max_memory={"cpu": 1000},
                     offload_folder=tmp_path / "offload")
