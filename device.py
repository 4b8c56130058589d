"""Pick the device and dtype once; every model is loaded with what this returns."""

from __future__ import annotations

import logging

import torch

from errors import UserError

log = logging.getLogger(__name__)


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str = "auto", dtype: str = "auto") -> tuple[torch.device, torch.dtype]:
    """CUDA, then MPS, then CPU for "auto"; with dtype "auto", bf16/fp16 on GPUs and
    fp32 on the CPU, otherwise the dtype named (float32, bfloat16, float16)."""
    if dtype != "auto" and dtype not in DTYPES:
        raise UserError(f"--dtype must be auto, {', '.join(DTYPES)}, got {dtype!r}")
    if name == "auto":
        if torch.cuda.is_available():
            name = "cuda"
        elif getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            name = "mps"
        else:
            name = "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device must be auto, cpu, cuda, cuda:N or mps, got {name!r}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {name}: CUDA is not available on this machine")
        index = device.index or 0
        if index >= torch.cuda.device_count():
            raise UserError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s)")
        auto = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            raise UserError(f"--device {name}: MPS is not available on this machine")
        auto = torch.float16
    else:
        if dtype == "float16":
            raise UserError("--dtype float16 is not supported on the CPU; use bfloat16 "
                            "(fast on CPUs with AVX512-BF16 or AMX) or float32")
        auto = torch.float32
    if dtype != "auto":
        auto = DTYPES[dtype]
    log.debug("device %s, dtype %s", device, auto)
    return device, auto
