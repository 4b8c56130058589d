"""Pick the device and dtype once; every model is loaded with what this returns.

Finishing "auto" needs torch only where the machine may have an accelerator:
importing torch costs seconds, and a command that ends early (a missing model,
`--check-db`) should not wait for it on a machine without one."""

from __future__ import annotations

import logging
import os
import platform
import sys
from typing import TYPE_CHECKING

from errors import UserError

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)


DTYPE_NAMES = ("float32", "bfloat16", "float16")
# What the NVIDIA (and WSL's) CUDA driver and ROCm's leave on a Linux machine with a GPU.
_GPU_DRIVER_FILES = ("/proc/driver/nvidia", "/dev/nvidiactl", "/dev/dxg", "/dev/kfd")


def resolve_names(name: str = "auto", dtype: str = "auto") -> tuple[str, str]:
    """("cuda", "bfloat16"), ("cpu", "float32"), ...: CUDA, then MPS, then CPU for
    "auto"; with dtype "auto", bf16/fp16 on GPUs and fp32 on the CPU, otherwise the
    dtype named (float32, bfloat16, float16). A UserError for what cannot be used."""
    if dtype != "auto" and dtype not in DTYPE_NAMES:
        raise UserError(f"--dtype must be auto, {', '.join(DTYPE_NAMES)}, got {dtype!r}")
    if name == "auto" and not may_have_accelerator():
        name = "cpu"
    found, auto = _ask_torch(name) if name != "cpu" else ("cpu", "float32")
    if dtype == "float16" and found.split(":")[0] not in ("cuda", "mps"):
        raise UserError("--dtype float16 is not supported on the CPU; use bfloat16 "
                        "(fast on CPUs with AVX512-BF16 or AMX) or float32")
    precision = auto if dtype == "auto" else dtype
    log.debug("device %s, dtype %s", found, precision)
    return found, precision


def resolve_device(name: str = "auto", dtype: str = "auto") -> tuple["torch.device", "torch.dtype"]:
    """resolve_names' answer as torch's objects."""
    import torch
    found, precision = resolve_names(name, dtype)
    return torch.device(found), getattr(torch, precision)


def may_have_accelerator() -> bool:
    """False only where there is surely no CUDA, ROCm or MPS device (a Linux machine
    without a GPU driver, an Intel Mac): told without importing torch."""
    if sys.platform.startswith("linux"):
        return any(os.path.exists(path) for path in _GPU_DRIVER_FILES)
    if sys.platform == "darwin":
        return platform.machine() == "arm64"
    return True  # Windows and the rest: ask torch


def _ask_torch(name: str) -> tuple[str, str]:
    """(device, its "auto" dtype) for a device name other than "cpu", from torch."""
    import torch
    if name == "auto":
        if torch.cuda.is_available():
            name = "cuda"
        elif getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            name = "mps"
        else:
            return "cpu", "float32"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device must be auto, cpu, cuda, cuda:N or mps, got {name!r}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {name}: CUDA is not available on this machine")
        if (device.index or 0) >= torch.cuda.device_count():
            raise UserError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s)")
        return str(device), "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    if device.type == "mps":
        if not torch.backends.mps.is_available():
            raise UserError(f"--device {name}: MPS is not available on this machine")
        return str(device), "float16"
    return str(device), "float32"
