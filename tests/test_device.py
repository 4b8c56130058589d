"""resolve_device / resolve_names: the device and dtype every model is loaded with."""

from __future__ import annotations

import sys

import pytest
import torch

import device
from device import resolve_device, resolve_names
from errors import UserError

HAS_CUDA = torch.cuda.is_available()
HAS_MPS = bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())


def test_cpu_is_float32():
    assert resolve_device("cpu") == (torch.device("cpu"), torch.float32)


@pytest.mark.skipif(HAS_CUDA or HAS_MPS, reason="this machine has a GPU")
def test_auto_without_a_gpu_is_cpu_float32():
    assert resolve_device("auto") == (torch.device("cpu"), torch.float32)


def test_auto_is_the_default():
    assert resolve_device() == resolve_device("auto")


def test_auto_falls_back_to_cpu_when_no_gpu_is_available(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert resolve_device("auto") == (torch.device("cpu"), torch.float32)


@pytest.mark.skipif(HAS_CUDA, reason="this machine has CUDA")
@pytest.mark.parametrize("name", ["cuda", "cuda:0", "cuda:1"])
def test_cuda_without_cuda_is_a_user_error(name):
    with pytest.raises(UserError, match="CUDA is not available"):
        resolve_device(name)


@pytest.mark.skipif(HAS_MPS, reason="this machine has MPS")
def test_mps_without_mps_is_a_user_error():
    with pytest.raises(UserError, match="MPS is not available"):
        resolve_device("mps")


def test_unknown_device_name_is_a_user_error():
    with pytest.raises(UserError, match="--device must be"):
        resolve_device("gpu")


def test_dtype_auto_is_float32_on_the_cpu_and_can_be_chosen():
    assert resolve_device("cpu", "auto")[1] == torch.float32
    assert resolve_device("cpu", "bfloat16") == (torch.device("cpu"), torch.bfloat16)
    assert resolve_device("cpu", "float32")[1] == torch.float32


def test_float16_on_the_cpu_is_a_user_error():
    with pytest.raises(UserError, match="--dtype float16 is not supported on the CPU"):
        resolve_device("cpu", "float16")


def test_unknown_dtype_is_a_user_error():
    with pytest.raises(UserError, match="--dtype must be auto, float32, bfloat16, float16"):
        resolve_device("cpu", "fp8")


def test_auto_without_a_gpu_driver_is_the_cpu_without_asking_torch(monkeypatch):
    monkeypatch.setattr(device, "may_have_accelerator", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: pytest.fail("torch was asked"))
    assert resolve_names("auto") == ("cpu", "float32")
    assert resolve_names("auto", "bfloat16") == ("cpu", "bfloat16")
    with pytest.raises(UserError, match="--dtype float16 is not supported on the CPU"):
        resolve_names("auto", "float16")


def test_where_a_gpu_may_be_torch_is_asked(monkeypatch):
    monkeypatch.setattr(device, "may_have_accelerator", lambda: True)
    asked = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: asked.append("cuda") or False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert resolve_names("auto") == ("cpu", "float32") and asked == ["cuda"]
    with pytest.raises(UserError, match="--dtype float16 is not supported on the CPU"):
        resolve_names("auto", "float16")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux's GPU driver files")
def test_a_linux_machine_may_have_a_gpu_where_its_driver_is(monkeypatch):
    monkeypatch.setattr(device.os.path, "exists", lambda path: path == "/proc/driver/nvidia")
    assert device.may_have_accelerator()
    monkeypatch.setattr(device.os.path, "exists", lambda path: False)
    assert not device.may_have_accelerator()


def test_resolve_device_gives_resolve_names_answer_as_torch_objects():
    assert resolve_device("cpu", "bfloat16") == (torch.device("cpu"), torch.bfloat16)
    assert resolve_names("cpu", "bfloat16") == ("cpu", "bfloat16")
