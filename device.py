"""Pick the device and dtype once; every model is loaded with what this returns."""

from __future__ import annotations

import logging

import torch

from errors import UserError

log = logging.getLogger(__name__)


def resolve_device(name: str = "auto") -> tuple[torch.device, torch.dtype]:
    """CUDA, then MPS, then CPU for "auto"; bf16/fp16 on GPUs, fp32 on the CPU."""
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
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            raise UserError(f"--device {name}: MPS is not available on this machine")
        dtype = torch.float16
    else:
        dtype = torch.float32
    log.debug("device %s, dtype %s", device, dtype)
    return device, dtype
