"""The device/dtype rule and precision checks, with faked GPU capabilities."""

import pytest
import torch

from edgerlhf import modeling, precisions
from edgerlhf.config import HardwareParams
from edgerlhf.errors import HardwareError


@pytest.mark.parametrize("device, cap, requested, expected", [
    ("cpu", None, "auto", torch.float32),
    ("cuda", (8, 9), "auto", torch.bfloat16),   # RTX 4060
    ("cuda", (8, 0), "auto", torch.bfloat16),   # A100
    ("cuda", (7, 5), "auto", torch.float16),    # RTX 2070 / T4
    ("cuda", (6, 1), "auto", torch.float16),    # GTX 1080
    ("cuda", (7, 5), "fp32", torch.float32),
    ("cpu", None, "bf16", torch.bfloat16),
])
def test_dtype_rule(device, cap, requested, expected):
    assert modeling.choose_dtype(device, cap, requested) == expected


def test_explicit_unsupported_dtypes_fail_loudly():
    with pytest.raises(HardwareError, match="bf16 needs compute capability >= 8.0"):
        modeling.choose_dtype("cuda", (7, 5), "bf16")
    with pytest.raises(HardwareError, match="fp16 is not supported for training on CPU"):
        modeling.choose_dtype("cpu", None, "fp16")


def test_int8_needs_turing():
    old = modeling.Device("cuda", torch.float16, "GTX 1080", (6, 1))
    with pytest.raises(HardwareError, match="int8.*needs compute capability >= 7.5.*6.1"):
        precisions.check_precision_supported("int8", old)
    precisions.check_precision_supported("int4", old)
    precisions.check_precision_supported("int8", modeling.Device("cuda", torch.float16, "T4", (7, 5)))
    precisions.check_precision_supported("int8", modeling.Device("cpu", torch.float32, "cpu"))


def test_resolve_device_on_this_machine():
    if torch.cuda.is_available():
        pytest.skip("CPU-only check")
    dev = modeling.resolve_device(HardwareParams())
    assert dev.type == "cpu" and dev.dtype == torch.float32
    with pytest.raises(HardwareError, match="no CUDA GPU is visible"):
        modeling.resolve_device(HardwareParams(device="cuda"))


def test_vram_budget_fraction():
    assert modeling.vram_fraction(8.0, 141.0) == pytest.approx(8.0 / 141.0)
    assert modeling.vram_fraction(0.0, 141.0) is None
    assert modeling.vram_fraction(8.0, 7.996) is None  # an RTX 4060 reports 7.996 GiB: it is its own cap


def test_cpu_budget_is_logged_not_applied(caplog):
    import logging

    with caplog.at_level(logging.INFO, logger="edgerlhf"):
        modeling.apply_vram_budget(8.0, modeling.Device("cpu", torch.float32, "cpu"))
    assert "the VRAM cap does not apply" in caplog.text
