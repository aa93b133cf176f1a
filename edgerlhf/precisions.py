"""The reward-model precisions: one table, and loading a reward model at a precision from it (bitsandbytes
settings, the device check, the check that it really is quantized); export and the model card read its labels.
A new precision is a new row here, plus its name in config.PRECISIONS, its entry in `reward.precisions` and its
series in dvc.yaml's `plots:` (tests/test_dvc_map.py checks all three). Only the stages that load reward models
depend on this file, so a new row reruns reward@P, ppo@P and evaluate, not prepare/base/sft."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgerlhf.errors import ConfigError, HardwareError

if TYPE_CHECKING:  # torch and the loaders only where a model is loaded: `generate --help` and export stay light
    import torch

    from edgerlhf.modeling import Device


@dataclass(frozen=True)
class Precision:
    """How a reward model of this precision is loaded, and what it needs."""

    name: str
    label: str  # what the model card and logs call it
    bnb: dict[str, Any] | None  # BitsAndBytesConfig arguments; None: unquantized (the compute dtype)
    bnb_layer: str | None  # the bitsandbytes layer class (bnb.nn.<name>) that proves the model is quantized
    min_capability: tuple[int, int] | None = None  # the CUDA compute capability its kernels need

    @property
    def quantized(self) -> bool:
        return self.bnb is not None


PRECISIONS: dict[str, Precision] = {p.name: p for p in (
    Precision("bf16", "unquantized (16-bit weights on GPU, fp32 on CPU)", None, None),
    # bitsandbytes' LLM.int8 kernels need Turing (sm_75) or newer
    Precision("int8", "LLM.int8, bitsandbytes", {"load_in_8bit": True}, "Linear8bitLt", (7, 5)),
    # the 4-bit compute dtype is the run's compute dtype, added at load time (quantization_config)
    Precision("int4", "4-bit NF4 with double quantization, bitsandbytes",
              {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True}, "Linear4bit"),
)}
NAMES: tuple[str, ...] = tuple(PRECISIONS)


def get(name: str) -> Precision:
    """The table row of `name`; an unknown name is an error naming the choices."""
    if name not in PRECISIONS:
        raise ConfigError(f"unknown precision {name!r} (allowed: {', '.join(NAMES)})")
    return PRECISIONS[name]


def check_precision_supported(precision: str, device: Device) -> None:
    """Fail loudly where a quantized precision cannot run, never fall back to another precision."""
    need = get(precision).min_capability
    if need and device.type == "cuda" and device.capability < need:
        cap = f"{device.capability[0]}.{device.capability[1]}"
        raise HardwareError(
            f"precision {precision} ({get(precision).label}) needs compute capability >= "
            f"{need[0]}.{need[1]}, this GPU has {cap}; remove {precision} from reward.precisions")


def quantization_config(precision: str, device: Device):
    """The BitsAndBytesConfig of `precision` (the precision table's settings; 4-bit computes in the run's dtype);
    None when unquantized."""
    from transformers import BitsAndBytesConfig

    bnb = get(precision).bnb
    if bnb is None:
        return None
    extra = {"bnb_4bit_compute_dtype": device.dtype} if bnb.get("load_in_4bit") else {}
    return BitsAndBytesConfig(**bnb, **extra)


def load_reward_base(path: str | Path, precision: str, device: Device, trust_remote_code: bool = False):
    """A 1-logit sequence classifier from `path` at `precision`, placed with device_map (never .to() under bnb)."""
    from transformers import AutoModelForSequenceClassification

    check_precision_supported(precision, device)
    model = AutoModelForSequenceClassification.from_pretrained(
        str(path), num_labels=1, dtype=device.dtype, use_safetensors=True, trust_remote_code=trust_remote_code,
        quantization_config=quantization_config(precision, device), device_map={"": device.torch_device})
    model.config.pad_token_id = model.config.pad_token_id if model.config.pad_token_id is not None \
        else model.config.eos_token_id
    return model


def load_reward_model(base_path: str | Path, adapter_path: str | Path, precision: str, device: Device,
                      trust_remote_code: bool = False):
    """A trained reward model: merged SFT base at `precision` + its LoRA/score adapter, eval mode, frozen."""
    from peft import PeftModel

    from edgerlhf.modeling import require_adapter

    require_adapter(adapter_path, f"reward@{precision}")  # the stages check it up front too: no pickle, ever
    model = load_reward_base(base_path, precision, device, trust_remote_code)
    model = PeftModel.from_pretrained(model, str(adapter_path), is_trainable=False)
    model.eval()
    model.requires_grad_(False)
    return model


def is_quantized(model: torch.nn.Module, precision: str) -> bool:
    """True when the model's linear layers really are bitsandbytes modules of `precision`."""
    import bitsandbytes as bnb

    layer = get(precision).bnb_layer
    return layer is not None and any(isinstance(m, getattr(bnb.nn, layer)) for m in model.modules())
