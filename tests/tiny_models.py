"""Tiny, deterministic, random-weight models of the real architectures used by the pipeline.

Builders provided for tests (no network access needed):

* :func:`make_tiny_clip` -- a ``CLIPModel`` + ``CLIPProcessor`` (image retriever / embedder).
* :func:`fit_tiny_clip` -- that CLIP trained contrastively on given image-caption pairs, so
  its text tower finds the images of the captions (CLIP text -> image search).
* :func:`make_tiny_siglip` -- a ``SiglipModel`` + ``SiglipImageProcessor`` (like
  google/siglip-base-patch16-224; no tokenizer, which would need sentencepiece).
* :func:`make_tiny_resnet` -- a ``ResNetModel`` + ``ConvNextImageProcessor`` (like
  microsoft/resnet-50).
* :func:`make_tiny_dinov2` -- a ``Dinov2Model`` + ``BitImageProcessor`` (like
  facebook/dinov2-small).
* :func:`make_tiny_smolvlm` -- an ``Idefics3ForConditionalGeneration`` + ``Idefics3Processor``
  (SmolVLM v1 layout, captioner).
* :func:`make_tiny_blip`, :func:`make_tiny_git`, :func:`make_tiny_blip2` (OPT),
  :func:`make_tiny_instructblip` (OPT), :func:`make_tiny_florence2`, :func:`make_tiny_paligemma` -- captioners of the other
  families (vlm_captioner.FAMILIES), each with its real processor class; their output layers
  choose only whole words of CAPTION_WORDS.

All save everything with ``save_pretrained`` so the folders load back through
``AutoModel`` / ``AutoModelForImageTextToText`` / ``AutoProcessor`` / ``AutoImageProcessor``.
Weights are seeded and tokenizers are built without the (hash-order dependent) trainer, so the
saved folders are identical across runs and processes.
"""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

__all__ = ["make_tiny_clip", "fit_tiny_clip", "make_tiny_siglip", "make_tiny_resnet", "make_tiny_dinov2",
           "make_tiny_smolvlm", "make_tiny_blip", "make_tiny_git", "make_tiny_blip2",
           "make_tiny_instructblip", "make_tiny_florence2", "make_tiny_paligemma",
           "make_bert_tokenizer", "CAPTIONER_BUILDERS", "SMOLVLM_CHAT_TEMPLATE", "CAPTION_WORDS"]

# The real chat template shipped with HuggingFaceTB/SmolVLM-Instruct (v1).
# Renders: "<|im_start|>User:<image>PROMPT<end_of_utterance>\nAssistant:"
SMOLVLM_CHAT_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}"
    "<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)

# Whole-word tokens added (via deterministic BPE merges) to the tiny vocabularies.  The tiny SmolVLM
# may only *generate* these words (as " word" tokens), so its captions are readable English words.
CAPTION_WORDS = (
    "a", "an", "and", "animal", "at", "background", "ball", "beach", "bird", "black", "blue",
    "boat", "bright", "brown", "building", "car", "cat", "city", "close", "cloud", "dark",
    "dog", "field", "flower", "food", "forest", "green", "grey", "house", "in", "lake", "large",
    "light", "man", "mountain", "near", "night", "of", "on", "orange", "park", "people",
    "person", "photo", "picture", "pink", "plate", "purple", "red", "river", "road", "room",
    "sea", "shape", "sign", "sitting", "sky", "small", "snow", "square", "standing", "street",
    "sun", "table", "the", "tree", "two", "under", "view", "wall", "water", "white", "window",
    "with", "woman", "wooden", "yellow",
)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2 byte -> printable unicode char mapping (same as used by ByteLevel pre-tokenizers)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def _init_(model: torch.nn.Module, seed: int, std: float) -> None:
    """Deterministically re-initialise every weight matrix / embedding with N(0, std)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=gen) * std)
            elif name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=gen) * std * 0.1)


# --------------------------------------------------------------------------------------------
# CLIP
# --------------------------------------------------------------------------------------------

CLIP_IMAGE_SIZE = 32
CLIP_PATCH_SIZE = 8


def make_clip_tokenizer():
    """A small deterministic CLIP tokenizer (byte-level BPE over the caption words)."""
    from transformers import CLIPTokenizer

    byte_chars = [c for _, c in sorted(_bytes_to_unicode().items())]
    vocab: dict[str, int] = {}
    for c in byte_chars:
        vocab[c] = len(vocab)
    for c in byte_chars:
        vocab[c + "</w>"] = len(vocab)
    # deterministic whole-word tokens for a handful of common words
    merges: list[tuple[str, str]] = []
    for word in sorted(set(CAPTION_WORDS)):
        if len(word) < 2:
            continue
        cur = word[0]
        for i, ch in enumerate(word[1:], start=1):
            nxt = ch + ("</w>" if i == len(word) - 1 else "")
            new = cur + nxt
            if (cur, nxt) not in merges:
                merges.append((cur, nxt))
            if new not in vocab:
                vocab[new] = len(vocab)
            cur = new
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    tok = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)
    return tok


def make_tiny_clip(path: str | Path) -> Path:
    """Build and save a tiny random ``CLIPModel`` + ``CLIPProcessor`` in ``path``; return ``path``."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)

    tokenizer = make_clip_tokenizer()
    text_config = dict(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        projection_dim=16,
    )
    vision_config = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=CLIP_IMAGE_SIZE,
        patch_size=CLIP_PATCH_SIZE,
        projection_dim=16,
    )
    config = CLIPConfig(text_config=text_config, vision_config=vision_config, projection_dim=16)

    torch.manual_seed(0)
    model = CLIPModel(config).eval()
    _init_(model, seed=0, std=0.2)

    image_processor = CLIPImageProcessor(
        size={"shortest_edge": CLIP_IMAGE_SIZE},
        crop_size={"height": CLIP_IMAGE_SIZE, "width": CLIP_IMAGE_SIZE},
    )
    processor = CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)

    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def fit_tiny_clip(path: str | Path, images, captions, steps: int = 300, seed: int = 0
                  ) -> Path:
    """Train the CLIP saved in `path` (e.g. make_tiny_clip's) on `images` (PIL) and their
    `captions` (a list of captions per image) with CLIP's contrastive loss, one random
    caption per image and step, and save it back; return `path`. Deterministic."""
    import random

    from transformers import CLIPModel, CLIPProcessor

    path = Path(path)
    torch.manual_seed(seed)
    rng = random.Random(seed)
    model = CLIPModel.from_pretrained(path).train()
    processor = CLIPProcessor.from_pretrained(path)
    pixels = processor(images=list(images), return_tensors="pt")["pixel_values"]
    # every caption tokenized once, padded alike; a step picks one row per image
    flat = [c for cs in captions for c in cs]
    tokens = processor.tokenizer(flat, padding=True, return_tensors="pt")
    starts = [sum(len(c) for c in captions[:n]) for n in range(len(captions))]
    optimiser = torch.optim.Adam(model.parameters(), lr=5e-3)
    labels = torch.arange(len(pixels))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a model this small: 7x faster than on 2 busy cores
    try:
        for _ in range(steps):
            rows = torch.tensor([start + rng.randrange(len(c))
                                 for start, c in zip(starts, captions)])
            out = model(pixel_values=pixels, **{k: v[rows] for k, v in tokens.items()})
            loss = (torch.nn.functional.cross_entropy(out.logits_per_image, labels) +
                    torch.nn.functional.cross_entropy(out.logits_per_text, labels)) / 2
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
    finally:
        torch.set_num_threads(threads)
    model.eval().save_pretrained(path)
    return path


# --------------------------------------------------------------------------------------------
# Other image-embedding backbones (search tool --backbone siglip|resnet50|dinov2)
# --------------------------------------------------------------------------------------------

BACKBONE_IMAGE_SIZE = 32
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


def make_tiny_siglip(path: str | Path) -> Path:
    """Build and save a tiny random ``SiglipModel`` + ``SiglipImageProcessor`` in ``path``.

    The image embedding is the vision tower's attention-pooled output, ``vision_config.hidden_size``
    (24) wide. Only the image processor is saved (a ``SiglipProcessor`` needs a sentencepiece
    tokenizer); ``AutoImageProcessor`` loads it.
    """
    from transformers import SiglipConfig, SiglipImageProcessorPil, SiglipModel

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    text_config = dict(vocab_size=64, hidden_size=24, intermediate_size=48, num_hidden_layers=1,
                       num_attention_heads=4, max_position_embeddings=16,
                       pad_token_id=1, bos_token_id=2, eos_token_id=3)
    vision_config = dict(hidden_size=24, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, image_size=BACKBONE_IMAGE_SIZE, patch_size=8)
    config = SiglipConfig(text_config=text_config, vision_config=vision_config)
    torch.manual_seed(0)
    model = SiglipModel(config).eval()
    _init_(model, seed=1, std=0.2)
    # as google/siglip-base-patch16-224: squash to the square input, mean/std 0.5, bicubic
    image_processor = SiglipImageProcessorPil(
        size={"height": BACKBONE_IMAGE_SIZE, "width": BACKBONE_IMAGE_SIZE},
        image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5], resample=3)
    # transformers 5.x: save_pretrained diffs against a default SiglipTextConfig(), whose own
    # bos/eos ids (49406/49407) fail its vocabulary check (32000) -- a harmless warning, hidden.
    from transformers.utils import logging as hf_logging
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        model.save_pretrained(path)
    finally:
        hf_logging.set_verbosity(verbosity)
    image_processor.save_pretrained(path)
    return path


def make_tiny_resnet(path: str | Path) -> Path:
    """Build and save a tiny random ``ResNetModel`` + ``ConvNextImageProcessor`` in ``path``.

    Two stages of one bottleneck layer each, ``hidden_sizes=[8, 16]``: the pooler output is
    (N, 16, 1, 1), i.e. 16-d embeddings (2048-d for ResNet-50).
    """
    from transformers import ConvNextImageProcessorPil, ResNetConfig, ResNetModel

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = ResNetConfig(num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                          layer_type="bottleneck", hidden_act="relu")
    torch.manual_seed(0)
    model = ResNetModel(config).eval()
    # std 0.3: ReLU + global average pooling make all-positive features; at this std different
    # images still differ (mean cosine ~0.65, vs ~0.95 with std 0.5-2 or basic blocks).
    _init_(model, seed=2, std=0.3)
    # as microsoft/resnet-50: shortest edge to size / crop_pct, centre crop, ImageNet mean/std
    image_processor = ConvNextImageProcessorPil(
        size={"shortest_edge": BACKBONE_IMAGE_SIZE}, crop_pct=0.875, resample=3,
        image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD)
    model.save_pretrained(path)
    image_processor.save_pretrained(path)
    return path


def make_tiny_dinov2(path: str | Path) -> Path:
    """Build and save a tiny random ``Dinov2Model`` + ``BitImageProcessor`` in ``path``.

    ``hidden_size=32`` (384 for dinov2-small); the pooler output is the layer-normed CLS token.
    """
    from transformers import BitImageProcessorPil, Dinov2Config, Dinov2Model

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, mlp_ratio=2,
                          image_size=BACKBONE_IMAGE_SIZE, patch_size=8)
    torch.manual_seed(0)
    model = Dinov2Model(config).eval()
    _init_(model, seed=3, std=0.2)
    # as facebook/dinov2-small: shortest edge 256 -> centre crop 224, scaled down to 36 -> 32
    image_processor = BitImageProcessorPil(
        size={"shortest_edge": BACKBONE_IMAGE_SIZE + 4},
        crop_size={"height": BACKBONE_IMAGE_SIZE, "width": BACKBONE_IMAGE_SIZE},
        do_center_crop=True, resample=3, image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD)
    model.save_pretrained(path)
    image_processor.save_pretrained(path)
    return path


# --------------------------------------------------------------------------------------------
# SmolVLM (Idefics3)
# --------------------------------------------------------------------------------------------

SMOLVLM_TILE = 32  # vision encoder input size == max_image_size["longest_edge"]
SMOLVLM_PATCH = 8
SMOLVLM_SCALE_FACTOR = 2
SMOLVLM_IMAGE_SEQ_LEN = (SMOLVLM_TILE // SMOLVLM_PATCH) ** 2 // SMOLVLM_SCALE_FACTOR**2  # 4


def _make_smolvlm_tokenizer():
    from transformers import GPT2Tokenizer

    b2u = _bytes_to_unicode()
    vocab: dict[str, int] = {}
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    for s in specials:
        vocab[s] = len(vocab)
    for _, c in sorted(b2u.items()):
        vocab[c] = len(vocab)
    space = b2u[ord(" ")]  # "Ġ"
    merges: list[tuple[str, str]] = []
    for word in sorted(set(CAPTION_WORDS)):
        cur = space
        for ch in word:
            new = cur + ch
            if (cur, ch) not in merges:
                merges.append((cur, ch))
            if new not in vocab:
                vocab[new] = len(vocab)
            cur = new
    tile_tokens = [f"<row_{i + 1}_col_{j + 1}>" for i in range(6) for j in range(6)]
    added = ["<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>", *tile_tokens]
    for s in added:
        vocab[s] = len(vocab)

    tok = GPT2Tokenizer(
        vocab=vocab,
        merges=merges,
        unk_token="<|endoftext|>",
        bos_token="<|im_start|>",
        eos_token="<end_of_utterance>",
        pad_token="<|im_end|>",
        model_max_length=8192,
    )
    tok.add_special_tokens(
        {"additional_special_tokens": ["<fake_token_around_image>", "<image>", "<end_of_utterance>"]}
    )
    tok.add_tokens(["<|im_start|>", "<|im_end|>", "<global-img>", *tile_tokens], special_tokens=True)
    return tok


# Sizes of the published SmolVLM v1 checkpoints (their config.json), for the benchmarks:
# SigLIP base-patch16/512 vision (64 tokens per 512-px tile after the 4x pixel shuffle)
# with SmolLM2-135M (256M) or SmolLM2-360M (500M) text; images resized to 4 tiles wide.
SMOLVLM_SIZES = {
    "256m": dict(
        vision=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                    num_attention_heads=12, image_size=512, patch_size=16),
        text=dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                  num_attention_heads=9, num_key_value_heads=3, vocab_size=49280),
        scale_factor=4, longest_edge=2048),
    "500m": dict(
        vision=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                    num_attention_heads=12, image_size=512, patch_size=16),
        text=dict(hidden_size=960, intermediate_size=2560, num_hidden_layers=32,
                  num_attention_heads=15, num_key_value_heads=5, vocab_size=49280),
        scale_factor=4, longest_edge=2048),
    # SmolVLM-Instruct (2B): SigLIP so400m/384 (patch 14: 27x27 patches, 81 tokens per tile
    # after the 3x pixel shuffle) + SmolLM2-1.7B; images resized to 4 tiles wide.
    "instruct": dict(
        vision=dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27,
                    num_attention_heads=16, image_size=384, patch_size=14),
        text=dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=24,
                  num_attention_heads=32, num_key_value_heads=32, vocab_size=49155),
        scale_factor=3, longest_edge=1536),
}


def make_tiny_smolvlm(path: str | Path, size: str = "tiny",
                      dtype: torch.dtype = torch.float32) -> Path:
    """Build and save a random SmolVLM-v1-style Idefics3 model + processor in ``path``.

    ``size`` "tiny" (the tests' model) or a key of SMOLVLM_SIZES (real-size layers, for
    benchmarks: the cost of a forward pass does not depend on the weights). The weights
    are drawn in float32 and saved in ``dtype``.
    """
    from transformers import (
        GenerationConfig,
        Idefics3Config,
        Idefics3ForConditionalGeneration,
        Idefics3ImageProcessor,
        Idefics3Processor,
    )

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)

    tokenizer = _make_smolvlm_tokenizer()
    image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    eou_id = tokenizer.convert_tokens_to_ids("<end_of_utterance>")
    pad_id = tokenizer.pad_token_id
    bos_id = tokenizer.bos_token_id

    vision_config = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=SMOLVLM_TILE,
        patch_size=SMOLVLM_PATCH,
        initializer_range=0.5,
    )
    text_config = dict(
        model_type="llama",
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        rms_norm_eps=1e-5,
        bos_token_id=bos_id,
        eos_token_id=eou_id,
        pad_token_id=pad_id,
        tie_word_embeddings=False,
        initializer_range=0.5,
    )
    scale_factor, tile, longest_edge, std = SMOLVLM_SCALE_FACTOR, SMOLVLM_TILE, 2 * SMOLVLM_TILE, 0.5
    if size != "tiny":
        real = SMOLVLM_SIZES[size]
        vision_config.update(real["vision"], initializer_range=0.02)
        text_config.update(real["text"], initializer_range=0.02, max_position_embeddings=8192)
        scale_factor, tile, longest_edge, std = (real["scale_factor"], real["vision"]["image_size"],
                                                 real["longest_edge"], 0.02)
    config = Idefics3Config(
        vision_config=vision_config,
        text_config=text_config,
        scale_factor=scale_factor,
        image_token_id=image_token_id,
        pad_token_id=pad_id,
        tie_word_embeddings=False,
    )

    torch.manual_seed(0)
    model = Idefics3ForConditionalGeneration(config).eval()
    _init_(model, seed=0, std=std)

    # A random LM head happily emits EOS / <image> / control bytes.  Zero every lm_head row except
    # the whole-word tokens (" cat", " red", ...) so greedy/beam decoding always yields a caption made
    # of real English words, e.g. "snow yellow food near street water".
    b2u = _bytes_to_unicode()
    vocab = tokenizer.get_vocab()
    allowed = {vocab[b2u[ord(" ")] + w] for w in CAPTION_WORDS}
    with torch.no_grad():
        w = model.lm_head.weight
        mask = torch.ones(w.shape[0], dtype=torch.bool)
        mask[sorted(allowed)] = False
        w[mask] = 0.0

    model.generation_config = GenerationConfig(
        bos_token_id=bos_id,
        eos_token_id=eou_id,
        pad_token_id=pad_id,
    )

    image_processor = Idefics3ImageProcessor(
        do_image_splitting=True,
        size={"longest_edge": longest_edge},
        max_image_size={"longest_edge": tile},
    )
    processor = Idefics3Processor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        image_seq_len=(tile // vision_config["patch_size"]) ** 2 // scale_factor**2,
        chat_template=SMOLVLM_CHAT_TEMPLATE,
    )

    model.to(dtype).save_pretrained(path)
    processor.save_pretrained(path)
    return path


# --------------------------------------------------------------------------------------------
# Captioners of other families: BLIP, GIT, BLIP-2 (OPT), Florence-2, PaliGemma
# --------------------------------------------------------------------------------------------

CAPTIONER_IMAGE = 32   # their vision towers' input size (Florence-2: 64, its strides make 2x2)
_PUNCTUATION = ".,:;!?'\"-()"


def make_bert_tokenizer():
    """A WordPiece BertTokenizer (BLIP's and GIT's) over CAPTION_WORDS + single characters,
    so that any prompt tokenizes without [UNK]."""
    from transformers import BertTokenizer

    chars = list("abcdefghijklmnopqrstuvwxyz0123456789" + _PUNCTUATION)
    vocab: dict[str, int] = {}
    for token in ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *sorted(set(CAPTION_WORDS)),
                  *chars, *("##" + c for c in chars if c.isalnum())]:
        vocab.setdefault(token, len(vocab))
    return BertTokenizer(vocab=vocab)


def _byte_bpe(specials: list[str], space: str | None = None) -> tuple[dict[str, int], list]:
    """vocab + merges of a byte-level BPE with whole-word tokens `space + word` for
    CAPTION_WORDS (built without the trainer: identical on every run)."""
    b2u = _bytes_to_unicode()
    vocab = {s: n for n, s in enumerate(specials)}
    for _, c in sorted(b2u.items()):
        vocab.setdefault(c, len(vocab))
    space = b2u[ord(" ")] if space is None else space
    vocab.setdefault(space, len(vocab))
    merges: list[tuple[str, str]] = []
    for word in sorted(set(CAPTION_WORDS)):
        cur = space
        for ch in word:
            if (cur, ch) not in merges:
                merges.append((cur, ch))
            cur += ch
            vocab.setdefault(cur, len(vocab))
    return vocab, merges


def _only_words(head: torch.nn.Module, allowed: set[int], bias: torch.Tensor | None = None) -> None:
    """Let the output layer `head` choose only the `allowed` (whole-word) tokens, so that
    greedy captions are readable words: every other row's bias (when given) goes to -1e4,
    else its weights to 0 (the word rows' random logits are then the highest)."""
    with torch.no_grad():
        mask = torch.ones(head.weight.shape[0], dtype=torch.bool)
        mask[sorted(allowed)] = False
        if bias is not None:
            bias[mask] = -1e4
        else:
            head.weight[mask] = 0.0


def _word_ids(tokenizer, prefix: str = "") -> set[int]:
    vocab = tokenizer.get_vocab()
    return {vocab[prefix + w] for w in CAPTION_WORDS if prefix + w in vocab}


def _vision(**extra) -> dict:
    return dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                image_size=CAPTIONER_IMAGE, patch_size=8, initializer_range=0.5, **extra)


def _save(model, processor, path: Path) -> Path:
    from transformers.utils import logging as hf_logging
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # default-config diffs warn about unused token ids
    try:
        model.save_pretrained(path)
        processor.save_pretrained(path)
    finally:
        hf_logging.set_verbosity(verbosity)
    return path


def make_tiny_blip(path: str | Path) -> Path:
    """A random ``BlipForConditionalGeneration`` + ``BlipProcessor`` (like
    Salesforce/blip-image-captioning-large): captions from the image alone."""
    from transformers import BlipConfig, BlipForConditionalGeneration, BlipImageProcessorPil, BlipProcessor

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok = make_bert_tokenizer()
    config = BlipConfig(
        vision_config=_vision(),
        text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=128,
                         bos_token_id=tok.cls_token_id, sep_token_id=tok.sep_token_id,
                         eos_token_id=tok.sep_token_id, pad_token_id=tok.pad_token_id,
                         initializer_range=0.5),
        projection_dim=16)
    torch.manual_seed(0)
    model = BlipForConditionalGeneration(config).eval()
    _init_(model, seed=10, std=0.5)
    predictions = model.text_decoder.cls.predictions  # its decoder weight is the word embeddings
    _only_words(predictions.decoder, _word_ids(tok), bias=predictions.bias)
    processor = BlipProcessor(
        image_processor=BlipImageProcessorPil(size={"height": CAPTIONER_IMAGE,
                                                    "width": CAPTIONER_IMAGE}),
        tokenizer=tok)
    return _save(model, processor, path)


def make_tiny_git(path: str | Path) -> Path:
    """A random ``GitForCausalLM`` + ``GitProcessor`` (like microsoft/git-large-coco)."""
    from transformers import CLIPImageProcessorPil, GitConfig, GitForCausalLM, GitProcessor

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok = make_bert_tokenizer()
    config = GitConfig(vision_config=_vision(), vocab_size=len(tok), hidden_size=32,
                       intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                       max_position_embeddings=128, bos_token_id=tok.cls_token_id,
                       eos_token_id=tok.sep_token_id, pad_token_id=tok.pad_token_id,
                       initializer_range=0.5)
    torch.manual_seed(0)
    model = GitForCausalLM(config).eval()
    _init_(model, seed=11, std=0.5)
    _only_words(model.output, _word_ids(tok))
    processor = GitProcessor(
        image_processor=CLIPImageProcessorPil(
            size={"shortest_edge": CAPTIONER_IMAGE},
            crop_size={"height": CAPTIONER_IMAGE, "width": CAPTIONER_IMAGE}),
        tokenizer=tok)
    return _save(model, processor, path)


def _opt_tokenizer():
    """A byte-level BPE tokenizer like OPT's (BLIP-2 / InstructBLIP's decoders)."""
    from transformers import GPT2Tokenizer
    vocab, merges = _byte_bpe(["<pad>", "</s>", "<unk>"])
    return GPT2Tokenizer(vocab=vocab, merges=merges, bos_token="</s>", eos_token="</s>",
                         pad_token="<pad>", unk_token="<unk>")


def _opt_text_config(tok) -> dict:
    """A tiny OPT decoder for `tok`, as BLIP-2 / InstructBLIP's text_config."""
    return dict(model_type="opt", vocab_size=len(tok), hidden_size=32, ffn_dim=64,
                num_hidden_layers=2, num_attention_heads=4, word_embed_proj_dim=32,
                max_position_embeddings=512, bos_token_id=tok.bos_token_id,
                eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                tie_word_embeddings=False)


def _qformer_config(vocab_size: int, **extra) -> dict:
    """A tiny Q-Former over the tiny vision tower (hidden size 32)."""
    return dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64,
                num_hidden_layers=2, num_attention_heads=4, encoder_hidden_size=32,
                cross_attention_frequency=1, **extra)


def make_tiny_blip2(path: str | Path) -> Path:
    """A random ``Blip2ForConditionalGeneration`` with an OPT decoder + ``Blip2Processor``
    (like Salesforce/blip2-opt-2.7b): prompted "Question: ... Answer:"."""
    from transformers import (Blip2Config, Blip2ForConditionalGeneration, Blip2Processor,
                              BlipImageProcessorPil)

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok = _opt_tokenizer()
    queries = 4
    processor = Blip2Processor(  # adds the <image> token to the tokenizer
        image_processor=BlipImageProcessorPil(size={"height": CAPTIONER_IMAGE,
                                                    "width": CAPTIONER_IMAGE}),
        tokenizer=tok, num_query_tokens=queries)
    config = Blip2Config(
        vision_config=_vision(),
        qformer_config=_qformer_config(len(tok)),
        text_config=_opt_text_config(tok),
        num_query_tokens=queries, image_token_id=tok.convert_tokens_to_ids("<image>"),
        tie_word_embeddings=False)
    torch.manual_seed(0)
    model = Blip2ForConditionalGeneration(config).eval()
    _init_(model, seed=12, std=0.5)
    _only_words(model.get_output_embeddings(), _word_ids(tok, _bytes_to_unicode()[ord(" ")]))
    return _save(model, processor, path)


FLORENCE2_IMAGE = 64


def make_tiny_florence2(path: str | Path) -> Path:
    """A random ``Florence2ForConditionalGeneration`` (DaViT vision, BART text) +
    ``Florence2Processor`` (like florence-community/Florence-2-base): task tokens."""
    from transformers import (BartTokenizer, CLIPImageProcessorPil, Florence2Config,
                              Florence2ForConditionalGeneration, Florence2Processor)

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    vocab, merges = _byte_bpe(["<s>", "<pad>", "</s>", "<unk>"])
    tok = BartTokenizer(vocab=vocab, merges=merges, extra_special_tokens={"image_token": "<image>"})
    # strides 4*2*2*2: a 64-px image is 2x2 visual tokens, plus their mean
    image_tokens = (FLORENCE2_IMAGE // 32) ** 2 + 1
    image_processor = CLIPImageProcessorPil(
        size={"height": FLORENCE2_IMAGE, "width": FLORENCE2_IMAGE}, do_center_crop=False,
        crop_size={"height": FLORENCE2_IMAGE, "width": FLORENCE2_IMAGE},
        image_seq_length=image_tokens)
    processor = Florence2Processor(image_processor=image_processor, tokenizer=tok)
    config = Florence2Config(
        vision_config=dict(depths=[1, 1, 1, 1], embed_dim=[16, 16, 32, 32], num_heads=[2, 2, 4, 4],
                           num_groups=[2, 2, 4, 4], window_size=2, projection_dim=32,
                           drop_path_rate=0.0, initializer_range=0.5),
        text_config=dict(model_type="bart", vocab_size=len(tok), d_model=32, encoder_layers=1,
                         decoder_layers=1, encoder_attention_heads=4, decoder_attention_heads=4,
                         encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=128,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id, decoder_start_token_id=tok.eos_token_id,
                         forced_eos_token_id=None, tie_word_embeddings=False),
        image_token_id=tok.image_token_id, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = Florence2ForConditionalGeneration(config).eval()
    _init_(model, seed=13, std=0.5)
    _only_words(model.get_output_embeddings(), _word_ids(tok, _bytes_to_unicode()[ord(" ")]))
    return _save(model, processor, path)


def make_tiny_paligemma(path: str | Path) -> Path:
    """A random ``PaliGemmaForConditionalGeneration`` (SigLIP + Gemma) + ``PaliGemmaProcessor``
    (like google/paligemma-3b-mix-224): the task prefix "caption en"."""
    from transformers import (GemmaTokenizer, PaliGemmaConfig, PaliGemmaForConditionalGeneration,
                              PaliGemmaProcessor, SiglipImageProcessorPil)

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    vocab = {s: n for n, s in enumerate(["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<image>"])}
    for c in sorted(set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789\n▁"
                        + _PUNCTUATION)):
        vocab.setdefault(c, len(vocab))
    merges: list[tuple[str, str]] = []
    for word in sorted(set(CAPTION_WORDS)):  # sentencepiece-style "▁word" tokens
        cur = "▁"
        for ch in word:
            if (cur, ch) not in merges:
                merges.append((cur, ch))
            cur += ch
            vocab.setdefault(cur, len(vocab))
    tok = GemmaTokenizer(vocab=vocab, merges=merges)
    patches = (CAPTIONER_IMAGE // 8) ** 2
    processor = PaliGemmaProcessor(  # adds Gemma's <loc>/<seg> tokens
        image_processor=SiglipImageProcessorPil(
            size={"height": CAPTIONER_IMAGE, "width": CAPTIONER_IMAGE},
            image_seq_length=patches, image_mean=[0.5] * 3, image_std=[0.5] * 3),
        tokenizer=tok)
    tok = processor.tokenizer
    config = PaliGemmaConfig(
        vision_config=dict(model_type="siglip_vision_model", projection_dim=32, **_vision()),
        text_config=dict(model_type="gemma", vocab_size=len(tok), hidden_size=32,
                         intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=1, head_dim=8, max_position_embeddings=256,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id, tie_word_embeddings=False),
        image_token_id=vocab["<image>"], projection_dim=32, hidden_size=32,
        tie_word_embeddings=False)
    torch.manual_seed(0)
    model = PaliGemmaForConditionalGeneration(config).eval()
    _init_(model, seed=14, std=0.5)
    _only_words(model.get_output_embeddings(), _word_ids(tok, "▁"))
    return _save(model, processor, path)


def make_tiny_instructblip(path: str | Path) -> Path:
    """A random ``InstructBlipForConditionalGeneration`` with an OPT decoder (the real ones
    use Vicuna or Flan-T5) + ``InstructBlipProcessor``: the prompt is its instruction, read
    by the Q-Former (BERT tokenizer) and the language model."""
    from transformers import (BlipImageProcessorPil, InstructBlipConfig,
                              InstructBlipForConditionalGeneration, InstructBlipProcessor)

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok = _opt_tokenizer()
    qformer_tok = make_bert_tokenizer()
    queries = 4
    processor = InstructBlipProcessor(
        image_processor=BlipImageProcessorPil(size={"height": CAPTIONER_IMAGE,
                                                    "width": CAPTIONER_IMAGE}),
        tokenizer=tok, qformer_tokenizer=qformer_tok, num_query_tokens=queries)
    config = InstructBlipConfig(
        vision_config=_vision(),
        qformer_config=_qformer_config(len(qformer_tok), pad_token_id=qformer_tok.pad_token_id),
        text_config=_opt_text_config(tok),
        num_query_tokens=queries, image_token_id=tok.convert_tokens_to_ids("<image>"),
        tie_word_embeddings=False)
    torch.manual_seed(0)
    model = InstructBlipForConditionalGeneration(config).eval()
    _init_(model, seed=15, std=0.5)
    _only_words(model.get_output_embeddings(), _word_ids(tok, _bytes_to_unicode()[ord(" ")]))
    return _save(model, processor, path)


# name -> builder, for tests that run every captioner family
CAPTIONER_BUILDERS = {"smolvlm": make_tiny_smolvlm, "blip": make_tiny_blip, "git": make_tiny_git,
                      "blip-2": make_tiny_blip2, "instructblip": make_tiny_instructblip,
                      "florence-2": make_tiny_florence2,
                      "paligemma": make_tiny_paligemma}
