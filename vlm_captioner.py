"""Caption images with a vision-language model (SmolVLM by default).

A captioner's family is recognised from its checkpoint (the config's model type,
and the processor's chat template), and each family is prompted the way it was
trained (FAMILIES):
  chat models (SmolVLM, Idefics3, Qwen2-VL, LLaVA, ...)  the prompt as one user turn of
                                                       the chat template
  blip-2 (OPT / Flan-T5)           "Question: <prompt on one line> Answer:"
  instructblip                     the prompt as the instruction
  paligemma, florence-2            their captioning task prompt ("caption en",
                                   "<CAPTION>"): they take no free-form context
  blip, git                        the image alone, after an optional caption prefix
                                   (VLM_CAPTION_PREFIX, e.g. "a picture of")
`uses_context` says whether the retrieved captions reach the model. Only the
newly generated tokens are decoded (for blip/git: the prefix and its
continuation), then cleaned into a single caption line.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import time
from pathlib import Path
from typing import Any, Sequence

import torch
from PIL import Image

from errors import UserError, hf_token, hub_errors

log = logging.getLogger(__name__)

_ROLE_PREFIX = re.compile(r"^\s*(assistant|user|caption|answer)\s*:\s*", re.IGNORECASE)


@dataclasses.dataclass(frozen=True)
class Family:
    """How one kind of captioner is prompted."""

    name: str
    model_types: tuple[str, ...]   # config.json "model_type" values of the family
    style: str                     # chat | question | instruction | task | prefix
    uses_context: bool             # whether the retrieved captions reach the model
    example: str                   # a checkpoint of the family on the hub
    task: str = ""                 # the task prompt of a "task" family

    def text(self, prompt: str, caption_prefix: str = "") -> str:
        """The text part of the model's input for `prompt` (chat: before the template)."""
        if self.style == "question":
            return f"Question: {' '.join(prompt.split())} Answer:"
        if self.style == "task":
            return self.task
        if self.style == "prefix":
            return caption_prefix
        return prompt


FAMILIES: tuple[Family, ...] = (
    Family("chat", ("idefics2", "idefics3", "smolvlm", "qwen2_vl", "qwen2_5_vl", "qwen3_vl",
                    "llava", "llava_next", "llava_onevision"), "chat", True,
           "HuggingFaceTB/SmolVLM-Instruct"),
    Family("blip-2", ("blip-2",), "question", True, "Salesforce/blip2-opt-2.7b"),
    Family("instructblip", ("instructblip",), "instruction", True,
           "Salesforce/instructblip-flan-t5-xl"),
    Family("paligemma", ("paligemma",), "task", False, "google/paligemma-3b-mix-224",
           task="caption en"),
    Family("florence-2", ("florence2",), "task", False, "florence-community/Florence-2-base",
           task="<CAPTION>"),
    Family("blip", ("blip",), "prefix", False, "Salesforce/blip-image-captioning-large"),
    Family("git", ("git",), "prefix", False, "microsoft/git-large-coco"),
)


def family_of(name: str, model_type: str, chat_template: bool) -> Family:
    """The family of a checkpoint (`name` for the error) from its config's model type;
    an unlisted model type with a chat template is a chat model. UserError if none."""
    for family in FAMILIES:
        if model_type in family.model_types:
            if family.style == "chat" and not chat_template:
                raise UserError(f"VLM {name!r} has no chat template; use an instruction-tuned "
                                "image-text-to-text model such as "
                                "HuggingFaceTB/SmolVLM-Instruct")
            return family
    if chat_template:
        return FAMILIES[0]
    raise UserError(f"VLM {name!r} (model type {model_type or 'unknown'!r}) is of no supported "
                    f"captioner family: {family_names()}")


def family_names() -> str:
    """The families, for messages: "chat models (SmolVLM, ...), blip-2, ..."."""
    return ("chat models with a chat template (SmolVLM, Idefics3, Qwen2-VL, LLaVA, ...), "
            + ", ".join(f.name for f in FAMILIES[1:]))


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
    """Image + prompt -> caption. `model` is a name/path, or a loaded model with its `processor`.

    `family` is recognised from the checkpoint (FAMILIES); `uses_context` says whether
    the prompt's retrieved captions reach the model. `device_map` "auto" places the
    model over the GPU, the CPU and disk (accelerate) within `max_memory`
    ({0: "20GiB", "cpu": "60GiB"}), offloading to `offload_folder`, instead of putting
    all of it on `device`.
    """

    def __init__(self, model: str | os.PathLike | torch.nn.Module, processor=None, *,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 max_new_tokens: int = 64, num_beams: int = 1, do_sample: bool = False,
                 temperature: float = 1.0, image_longest_edge: int = 0,
                 image_splitting: bool | None = None, attn_implementation: str = "",
                 seed: int = 0, caption_prefix: str = "", device_map: str = "",
                 max_memory: dict[int | str, int | str] | None = None,
                 offload_folder: str | os.PathLike | None = None):
        import transformers
        self.device = torch.device(device)
        if isinstance(model, (str, os.PathLike)):
            model = self.name = str(model)
            with hub_errors("VLM", model, "--vlm-model-name"):
                processor = transformers.AutoProcessor.from_pretrained(model, token=hf_token())
                model_type = getattr(transformers.AutoConfig.from_pretrained(
                    model, token=hf_token()), "model_type", "")
            # before the weights load: a checkpoint of no family costs no time
            self.family = family_of(self.name, model_type, _chat_template(processor))
            model = _load(model, dtype, attn_implementation, device_map,
                          _max_memory(max_memory, self.device) if device_map else None,
                          offload_folder)
        else:
            self.name = getattr(model.config, "_name_or_path", type(model).__name__)
            if processor is None:
                raise ValueError("pass the processor along with a loaded model")
            self.family = family_of(self.name, getattr(model.config, "model_type", ""),
                                    _chat_template(processor))
        self.uses_context = self.family.uses_context
        self.caption_prefix = caption_prefix
        self.encoder_decoder = _is_encoder_decoder(model.config)
        tokenizer = processor.tokenizer
        # Decoder-only models: left padding, so every row of a batch ends where
        # generation starts; encoder-decoder models read a right-padded prompt.
        tokenizer.padding_side = "right" if self.encoder_decoder else "left"
        if image_longest_edge:
            _set_longest_edge(processor, image_longest_edge)
        if image_splitting is not None:
            _set_image_splitting(processor, image_splitting)
        if getattr(model, "hf_device_map", None) is None:
            model = model.to(device)
        self.model = model.eval()
        self.processor = processor
        self.dtype = dtype
        self.generation = dict(max_new_tokens=max_new_tokens, num_beams=num_beams,
                               do_sample=do_sample)
        if do_sample:
            self.generation["temperature"] = temperature
        self.seed = seed
        # Seconds from the start of the last generate call to its first new token.
        self.last_first_token: float | None = None

    @classmethod
    def from_settings(cls, settings, device: torch.device, dtype: torch.dtype
                      ) -> "VLMCaptioner":
        """The captioner `settings` name (VLM_MODEL_NAME, the VLM_* and generation
        settings), on `device` in `dtype`."""
        from config import parse_max_memory
        s = settings
        return cls(s.vlm_model_name, device=device, dtype=dtype,
                   max_new_tokens=s.max_new_tokens, num_beams=s.num_beams,
                   do_sample=s.do_sample, temperature=s.temperature,
                   image_longest_edge=s.vlm_image_longest_edge,
                   image_splitting=s.vlm_image_splitting,
                   attn_implementation=s.vlm_attn_implementation, seed=s.random_seed,
                   caption_prefix=s.vlm_caption_prefix, device_map=s.vlm_device_map,
                   max_memory=parse_max_memory(s.vlm_max_memory),
                   offload_folder=os.path.join(os.path.expanduser(s.cache_dir), "offload"))

    @property
    def placement(self) -> dict[str, str] | None:
        """Where each part of the model is (device_map "auto"): module -> device or "disk"."""
        placed = getattr(self.model, "hf_device_map", None)
        return None if placed is None else {k: str(v) for k, v in placed.items()}

    def chat_text(self, prompt: str) -> str:
        """The prompt in the model's chat format, ending where the answer starts."""
        messages = [{"role": "user", "content": [{"type": "image"},
                                                 {"type": "text", "text": prompt}]}]
        return self.processor.apply_chat_template(messages, add_generation_prompt=True)

    def model_prompt(self, prompt: str) -> str:
        """The text the model is given for `prompt`, in its family's form (the chat
        template, "Question: ... Answer:", a task prompt or the caption prefix)."""
        if self.family.style == "chat":
            return self.chat_text(prompt)
        return self.family.text(prompt, self.caption_prefix)

    def _inputs(self, images: list[Image.Image], prompts: Sequence[str]) -> dict[str, Any]:
        style = self.family.style
        if style == "chat":
            inputs = self.processor(text=[self.chat_text(p) for p in prompts],
                                    images=[[im] for im in images], padding=True,
                                    return_tensors="pt")
        elif style == "prefix" and self.family.name == "git":
            inputs = dict(self.processor(images=images, return_tensors="pt"))
            if self.caption_prefix:  # GIT continues [CLS] + prefix, with no [SEP]
                tokenizer = self.processor.tokenizer
                ids = [tokenizer.cls_token_id] + tokenizer(
                    self.caption_prefix, add_special_tokens=False)["input_ids"]
                inputs["input_ids"] = torch.tensor([ids] * len(images))
        elif style == "prefix" and not self.caption_prefix:
            inputs = self.processor(images=images, return_tensors="pt")
        else:
            texts = [self.family.text(p, self.caption_prefix) for p in prompts]
            if self.family.name == "paligemma":  # its processor wants the image token first
                texts = [self.processor.image_token + t for t in texts]
            inputs = self.processor(images=images, text=texts, padding=True,
                                    return_tensors="pt")
        inputs = {k: v for k, v in dict(inputs).items() if k != "labels"}
        return {k: (v.to(self.device, self.dtype) if v.is_floating_point() else v.to(self.device))
                for k, v in inputs.items()}

    @torch.inference_mode()
    def caption_batch(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> list[str]:
        """One cleaned caption per (image, prompt) pair, generated in one call."""
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images for {len(prompts)} prompts")
        images = [im.convert("RGB") if im.mode != "RGB" else im for im in images]
        inputs = self._inputs(images, prompts)
        if self.generation["do_sample"]:
            torch.manual_seed(self.seed)
        clock = _FirstTokenClock()
        out = self.model.generate(**inputs, **self.generation, logits_processor=[clock])
        self.last_first_token = clock.seconds
        if not self.encoder_decoder and self.family.style != "prefix":
            out = out[:, inputs["input_ids"].shape[1]:]   # the new tokens only
        texts = self.processor.batch_decode(out, skip_special_tokens=True)
        style = self.family.style
        echoes = [p if style == "chat" else "" if style == "prefix" else
                  self.family.text(p, self.caption_prefix) for p in prompts]
        return [clean_caption(t, p) for t, p in zip(texts, echoes)]

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


def _chat_template(processor) -> bool:
    return getattr(processor, "chat_template", None) is not None


def _is_encoder_decoder(model_config) -> bool:
    """Florence-2, BLIP-2/InstructBLIP with Flan-T5: generate returns new tokens only."""
    text = getattr(model_config, "text_config", None)
    return bool(getattr(model_config, "is_encoder_decoder", False)
                or getattr(text, "is_encoder_decoder", False))


def _max_memory(given: dict[int | str, int | str] | None, device: torch.device
                ) -> dict[int | str, int | str]:
    """The memory accelerate may fill: `given`, else DEVICE's GPU (if any) and the CPU,
    as much as they have free (never another GPU: DEVICE says where to run)."""
    if given:
        return dict(given)
    from accelerate.utils import get_max_memory
    free = get_max_memory()
    keep = {"cuda": [device.index or 0, "cpu"], "mps": ["mps", "cpu"]}.get(device.type, ["cpu"])
    return {k: free[k] for k in keep if k in free}


def _load(name: str, dtype: torch.dtype, attn_implementation: str, device_map: str,
          max_memory: dict | None, offload_folder: str | os.PathLike | None):
    import transformers
    # "" lets transformers choose (sdpa where the model supports it)
    options: dict[str, Any] = {"attn_implementation": attn_implementation} \
        if attn_implementation else {}
    if device_map:
        options.update(device_map=device_map, max_memory=max_memory)
        if offload_folder is not None:
            Path(offload_folder).mkdir(parents=True, exist_ok=True)
            options["offload_folder"] = str(offload_folder)
    with hub_errors("VLM", name, "--vlm-model-name"):
        try:
            model = transformers.AutoModelForImageTextToText.from_pretrained(
                name, dtype=dtype, token=hf_token(), **options)
        except (ImportError, ValueError) as exc:
            if attn_implementation and ("attn" in str(exc) or "attention" in str(exc).lower()):
                raise UserError(f"--vlm-attn-implementation {attn_implementation!r}: "
                                f"{str(exc).splitlines()[0][:300]}") from None
            raise
    placed = set(map(str, (getattr(model, "hf_device_map", None) or {}).values()))
    if placed and placed <= {"disk"}:
        raise UserError(f"--vlm-max-memory {_memory_text(max_memory)} leaves no room for any "
                        f"part of VLM {name!r} outside the disk; allow more memory")
    if len(placed) > 1:
        log.info("VLM %s placed over %s (VLM_DEVICE_MAP auto)", name, ", ".join(sorted(placed)))
    return model


def _memory_text(max_memory: dict | None) -> str:
    return ",".join(f"{k}={v}" for k, v in (max_memory or {}).items()) or "''"


class _FirstTokenClock:
    """A no-op logits processor: generate() calls it once the prompt (image tiles
    included) has gone through the model and the first new token is being chosen."""

    def __init__(self):
        self.start = time.perf_counter()
        self.seconds: float | None = None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.seconds is None:
            if scores.is_cuda:  # the prefill's kernels may still be running: count them
                torch.cuda.synchronize(scores.device)
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
