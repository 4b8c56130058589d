"""Checks that the tiny test models load through the Auto* APIs and behave like the real ones."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

from tiny_models import CAPTION_WORDS, make_tiny_clip, make_tiny_smolvlm  # noqa: E402

TESTS_DIR = Path(__file__).resolve().parent
PROMPT = "Describe the image briefly."


# ------------------------------------------------------------------------------------- helpers
def _images() -> list[Image.Image]:
    """A handful of clearly different 120x90 RGB images (+ one odd aspect ratio)."""
    ims = [Image.new("RGB", (120, 90), c) for c in [(220, 30, 30), (20, 180, 40), (30, 40, 220)]]
    grad = np.zeros((90, 120, 3), np.uint8)
    grad[..., 0] = np.linspace(0, 255, 120, dtype=np.uint8)[None, :]
    grad[..., 2] = np.linspace(255, 0, 90, dtype=np.uint8)[:, None]
    ims.append(Image.fromarray(grad))
    shapes = Image.new("RGB", (120, 90), (255, 255, 255))
    draw = ImageDraw.Draw(shapes)
    draw.ellipse((10, 10, 60, 60), fill=(0, 0, 0))
    draw.rectangle((70, 30, 110, 80), fill=(250, 200, 0))
    ims.append(shapes)
    noise = np.random.default_rng(0).integers(0, 256, (90, 120, 3), dtype=np.uint8)
    ims.append(Image.fromarray(noise))
    ims.append(Image.new("RGB", (40, 200), (10, 200, 90)))  # tall image -> different tiling
    return ims


def _files_digest(folder: Path) -> dict[str, str]:
    return {
        str(f.relative_to(folder)): hashlib.sha256(f.read_bytes()).hexdigest()
        for f in sorted(folder.rglob("*"))
        if f.is_file()
    }


def _chat_text(processor, prompt: str = PROMPT) -> str:
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True)


def _caption(model, processor, image, prompt=PROMPT, **gen_kwargs) -> str:
    text = _chat_text(processor, prompt)
    inputs = processor(text=[text], images=[[image]], return_tensors="pt")
    kwargs = dict(max_new_tokens=12, do_sample=False, num_beams=1)
    kwargs.update(gen_kwargs)
    with torch.no_grad():
        out = model.generate(**inputs, **kwargs)
    return processor.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)[0].strip()


def _embed(out) -> torch.Tensor:
    """``get_image_features`` returns BaseModelOutputWithPooling in transformers 5.x (tensor in 4.x)."""
    if isinstance(out, torch.Tensor):
        return out
    return out.pooler_output


# ------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory) -> Path:
    return make_tiny_clip(tmp_path_factory.mktemp("tiny_clip"))


@pytest.fixture(scope="module")
def vlm_dir(tmp_path_factory) -> Path:
    return make_tiny_smolvlm(tmp_path_factory.mktemp("tiny_smolvlm"))


@pytest.fixture(scope="module")
def vlm(vlm_dir):
    processor = transformers.AutoProcessor.from_pretrained(vlm_dir)
    model = transformers.AutoModelForImageTextToText.from_pretrained(vlm_dir).eval()
    return model, processor


# ------------------------------------------------------------------------------------- CLIP
def test_clip_roundtrip_and_embeddings(clip_dir):
    assert isinstance(clip_dir, Path)
    size_mb = sum(f.stat().st_size for f in clip_dir.rglob("*") if f.is_file()) / 1e6
    assert size_mb < 5

    model = transformers.AutoModel.from_pretrained(clip_dir, dtype=torch.float32).eval()
    processor = transformers.AutoProcessor.from_pretrained(clip_dir)
    image_processor = transformers.AutoImageProcessor.from_pretrained(clip_dir)
    assert type(model).__name__ == "CLIPModel"
    assert type(processor).__name__ == "CLIPProcessor"
    assert "CLIPImageProcessor" in type(image_processor).__name__

    ims = _images()
    pixels = image_processor(images=ims, return_tensors="pt")["pixel_values"]
    assert tuple(pixels.shape) == (len(ims), 3, 32, 32)
    with torch.no_grad():
        emb = _embed(model.get_image_features(pixel_values=pixels))
        emb_again = _embed(model.get_image_features(pixel_values=pixels))
    assert emb.shape == (len(ims), 16)
    assert torch.equal(emb, emb_again)
    assert torch.isfinite(emb).all()

    emb = torch.nn.functional.normalize(emb, dim=-1)
    sims = emb @ emb.T
    off_diag = sims[~torch.eye(len(ims), dtype=torch.bool)]
    assert (off_diag < 0.99).all(), sims
    assert off_diag.min() < 0.9, sims

    # the processor's image half and AutoImageProcessor agree; text side works too
    assert torch.equal(processor(images=ims, return_tensors="pt")["pixel_values"], pixels)
    text = processor(text=["a photo of a red cat", "Hello, World! 123"], padding=True, return_tensors="pt")
    with torch.no_grad():
        temb = _embed(model.get_text_features(**text))
    assert temb.shape == (2, 16)
    assert processor.tokenizer.decode(text["input_ids"][0], skip_special_tokens=True) == "a photo of a red cat"


# ------------------------------------------------------------------------------------- SmolVLM
def test_smolvlm_roundtrip_and_template(vlm, vlm_dir):
    model, processor = vlm
    size_mb = sum(f.stat().st_size for f in vlm_dir.rglob("*") if f.is_file()) / 1e6
    assert size_mb < 5
    assert type(model).__name__ == "Idefics3ForConditionalGeneration"
    assert type(processor).__name__ == "Idefics3Processor"
    assert "Idefics3ImageProcessor" in type(processor.image_processor).__name__

    text = _chat_text(processor, "What is this?")
    assert text == "<|im_start|>User:<image>What is this?<end_of_utterance>\nAssistant:"

    # image_seq_len in the processor matches the model's vision tower / connector
    vc = model.config.vision_config
    expected = (vc.image_size // vc.patch_size) ** 2 // model.config.scale_factor**2
    assert processor.image_seq_len == expected == model.model.image_seq_len
    inputs = processor(text=[text], images=[[_images()[0]]], return_tensors="pt")
    n_image_tokens = int((inputs["input_ids"] == model.config.image_token_id).sum())
    assert n_image_tokens == inputs["pixel_values"].shape[1] * processor.image_seq_len
    tokens = processor.tokenizer.convert_ids_to_tokens(inputs["input_ids"][0])
    for special in ("<|im_start|>", "<fake_token_around_image>", "<global-img>", "<end_of_utterance>"):
        assert special in tokens
    # arbitrary English round-trips through the byte-level tokenizer
    s = "Héllo, wörld! 42 cats & dogs."
    ids = processor.tokenizer(s, add_special_tokens=False)["input_ids"]
    assert processor.tokenizer.decode(ids) == s


def test_smolvlm_captions_are_words_and_image_dependent(vlm):
    model, processor = vlm
    captions = [_caption(model, processor, im) for im in _images()]
    vocab = set(CAPTION_WORDS)
    for cap in captions:
        assert cap, captions
        assert all(w in vocab for w in cap.split()), cap
    assert len(set(captions)) >= len(captions) - 1, captions
    # same input -> same caption
    assert _caption(model, processor, _images()[0]) == captions[0]
    # the prompt matters too, and beam search works
    assert _caption(model, processor, _images()[0], num_beams=2)


def test_smolvlm_batched_equals_unbatched(vlm):
    model, processor = vlm
    ims = _images()
    prompts = [PROMPT, "What is in this picture?", "Caption:", "Write one short sentence about this photo."]
    pairs = [(ims[i], prompts[i % len(prompts)]) for i in range(len(ims))]
    single = [_caption(model, processor, im, p) for im, p in pairs]

    old_side = processor.tokenizer.padding_side
    processor.tokenizer.padding_side = "left"
    try:
        texts = [_chat_text(processor, p) for _, p in pairs]
        inputs = processor(text=texts, images=[[im] for im, _ in pairs], padding=True, return_tensors="pt")
        assert (inputs["attention_mask"] == 0).any()  # really padded
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=12, do_sample=False, num_beams=1)
        batched = [
            c.strip()
            for c in processor.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        ]
        with torch.no_grad():
            out2 = model.generate(**inputs, max_new_tokens=12, do_sample=False, num_beams=2)
        beams = processor.batch_decode(out2[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    finally:
        processor.tokenizer.padding_side = old_side
    assert batched == single
    assert all(b.strip() for b in beams)


def test_deterministic_across_processes(tmp_path, clip_dir, vlm_dir, vlm):
    """A fresh process (different hash seed) builds byte-identical folders and the same captions."""
    model, processor = vlm
    expected_caption = _caption(model, processor, _images()[3])
    script = f"""
import json, os
os.environ["HF_HUB_OFFLINE"] = "1"
import torch, transformers
from tiny_models import make_tiny_clip, make_tiny_smolvlm
from test_tiny_models import _caption, _images
make_tiny_clip({str(tmp_path / "clip")!r})
vlm_dir = make_tiny_smolvlm({str(tmp_path / "vlm")!r})
proc = transformers.AutoProcessor.from_pretrained(vlm_dir)
model = transformers.AutoModelForImageTextToText.from_pretrained(vlm_dir).eval()
print(json.dumps(_caption(model, proc, _images()[3])))
"""
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONHASHSEED="12345")
    # Run in tests/ (the working directory is on a `-c` script's path) to import its helpers.
    res = subprocess.run([sys.executable, "-c", script], cwd=TESTS_DIR, capture_output=True,
                         text=True, env=env, timeout=120)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout.strip().splitlines()[-1]) == expected_caption
    assert _files_digest(tmp_path / "clip") == _files_digest(clip_dir)
    assert _files_digest(tmp_path / "vlm") == _files_digest(vlm_dir)


def test_the_instruct_size_is_smolvlm_instructs_architecture():
    # bench/generate.py measures the default captioner at this size: 81 image tokens per
    # 384-px tile and SmolVLM-Instruct's 2.25 B parameters (built on the meta device: no
    # memory, no weights)
    import torch
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration

    from tiny_models import SMOLVLM_SIZES
    real = SMOLVLM_SIZES["instruct"]
    vision = real["vision"]
    assert (vision["image_size"] // vision["patch_size"]) ** 2 // real["scale_factor"] ** 2 == 81
    config = Idefics3Config(vision_config=vision, text_config={**real["text"],
                                                               "model_type": "llama"},
                            scale_factor=real["scale_factor"], tie_word_embeddings=False)
    with torch.device("meta"):
        model = Idefics3ForConditionalGeneration(config)
    assert 2.2e9 < sum(p.numel() for p in model.parameters()) < 2.3e9
