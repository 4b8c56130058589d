"""Caption images with a vision-language model (SmolVLM by default).

Any image-text-to-text checkpoint that loads with AutoProcessor +
AutoModelForImageTextToText and has a chat template works. The prompt goes in
as one user turn holding the image and the text; only the newly generated
tokens are decoded, then cleaned into a single caption line.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import time
from typing import Sequence

import torch
from PIL import Image

from errors import UserError, hf_token, hub_errors

log = logging.getLogger(__name__)

_ROLE_PREFIX = re.compile(r"^\s*(assistant|user|caption|answer)\s*:\s*", re.IGNORECASE)


class EmptyCaptionError(UserError):
    """The model generated no text for an image."""


def clean_caption(text: str, prompt: str = "") -> str:
    """One caption line: no role prefix, no echoed prompt, no wrapping quotes,
    whitespace collapsed."""
    text = text.strip()
    if prompt and text.startswith(prompt.strip()):
        text = text[len(prompt.strip()):]
    previous = None
    while previous != text:
        previous = text
        text = _ROLE_PREFIX.sub("", text).strip()
        if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'`":
            text = text[1:-1].strip()
    return " ".join(text.split())


class VLMCaptioner:
    """Image + prompt -> caption. `model` is a name/path, or a loaded model with its `processor`."""

    def __init__(self, model: str | os.PathLike | torch.nn.Module, processor=None, *,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 max_new_tokens: int = 64, num_beams: int = 1, do_sample: bool = False,
                 temperature: float = 1.0, image_longest_edge: int = 0,
                 image_splitting: bool | None = None, attn_implementation: str = "",
                 seed: int = 0):
        import transformers
        if isinstance(model, (str, os.PathLike)):
            model = self.name = str(model)
            # "" lets transformers choose (sdpa where the model supports it)
            attention = {"attn_implementation": attn_implementation} if attn_implementation else {}
            with hub_errors("VLM", model, "--vlm-model-name"):
                processor = transformers.AutoProcessor.from_pretrained(model, token=hf_token())
                try:
                    model = transformers.AutoModelForImageTextToText.from_pretrained(
                        model, dtype=dtype, token=hf_token(), **attention)
                except (ImportError, ValueError) as exc:
                    if attention and ("attn" in str(exc) or "attention" in str(exc).lower()):
                        raise UserError(f"--vlm-attn-implementation {attn_implementation!r}: "
                                        f"{str(exc).splitlines()[0][:300]}") from None
                    raise
        else:
            self.name = getattr(model.config, "_name_or_path", type(model).__name__)
            if processor is None:
                raise ValueError("pass the processor along with a loaded model")
        if getattr(processor, "chat_template", None) is None:
            raise UserError(f"VLM {self.name!r} has no chat template; use an instruction-tuned "
                            "image-text-to-text model such as HuggingFaceTB/SmolVLM-Instruct")
        # Left padding so every row of a batch ends where generation starts.
        processor.tokenizer.padding_side = "left"
        if image_longest_edge:
            _set_longest_edge(processor, image_longest_edge)
        if image_splitting is not None:
            _set_image_splitting(processor, image_splitting)
        self.model = model.to(device).eval()
        self.processor = processor
        self.device = torch.device(device)
        self.dtype = dtype
        self.generation = dict(max_new_tokens=max_new_tokens, num_beams=num_beams,
                               do_sample=do_sample)
        if do_sample:
            self.generation["temperature"] = temperature
        self.seed = seed
        # Seconds from the start of the last generate call to its first new token.
        self.last_first_token: float | None = None

    def chat_text(self, prompt: str) -> str:
        """The prompt in the model's chat format, ending where the answer starts."""
        messages = [{"role": "user", "content": [{"type": "image"},
                                                 {"type": "text", "text": prompt}]}]
        return self.processor.apply_chat_template(messages, add_generation_prompt=True)

    @torch.inference_mode()
    def caption_batch(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> list[str]:
        """One cleaned caption per (image, prompt) pair, generated in one call."""
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images for {len(prompts)} prompts")
        inputs = self.processor(text=[self.chat_text(p) for p in prompts],
                                images=[[im] for im in images], padding=True, return_tensors="pt")
        inputs = {k: (v.to(self.device, self.dtype) if v.is_floating_point() else v.to(self.device))
                  for k, v in inputs.items()}
        if self.generation["do_sample"]:
            torch.manual_seed(self.seed)
        clock = _FirstTokenClock()
        out = self.model.generate(**inputs, **self.generation, logits_processor=[clock])
        self.last_first_token = clock.seconds
        new_tokens = out[:, inputs["input_ids"].shape[1]:]
        texts = self.processor.batch_decode(new_tokens, skip_special_tokens=True)
        return [clean_caption(t, p) for t, p in zip(texts, prompts)]

    def caption(self, image: Image.Image, prompt: str) -> str:
        """The caption of one image; EmptyCaptionError if the model says nothing."""
        text = self.caption_batch([image], [prompt])[0]
        if not text:
            raise self.empty_caption_error()
        return text

    def empty_caption_error(self) -> EmptyCaptionError:
        """The error for an image the model said nothing about."""
        return EmptyCaptionError(
            f"VLM {self.name!r} generated an empty caption; try a larger --max-new-tokens, "
            "--num-beams 3 or another --vlm-model-name")


class _FirstTokenClock:
    """A no-op logits processor: generate() calls it once the prompt (image tiles
    included) has gone through the model and the first new token is being chosen."""

    def __init__(self):
        self.start = time.perf_counter()
        self.seconds: float | None = None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.seconds is None:
            self.seconds = time.perf_counter() - self.start
        return scores


def _set_image_splitting(processor, splitting: bool) -> None:
    image_processor = processor.image_processor
    if hasattr(image_processor, "do_image_splitting"):
        image_processor.do_image_splitting = splitting
    elif splitting:
        log.warning("--vlm-image-splitting ignored: %s does not split images",
                    type(image_processor).__name__)


def _set_longest_edge(processor, edge: int) -> None:
    image_processor = processor.image_processor
    size = getattr(image_processor, "size", None)
    if isinstance(size, dict) and "longest_edge" in size:
        image_processor.size = {**size, "longest_edge": edge}
    elif dataclasses.is_dataclass(size) and getattr(size, "longest_edge", None):
        # transformers 5.x keeps sizes in a SizeDict dataclass, not a dict
        image_processor.size = dataclasses.replace(size, longest_edge=edge)
    else:
        log.warning("--vlm-image-longest-edge ignored: %s has no longest_edge size",
                    type(image_processor).__name__)
