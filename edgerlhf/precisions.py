"""The reward-model precisions: one table that feeds loading (bitsandbytes settings), the config check, the
device check, export and the model card. A new precision is a new row here (plus its entry in
`reward.precisions` and its series in dvc.yaml's `plots:`, which tests/test_dvc_map.py checks)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


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
    # the 4-bit compute dtype is the run's compute dtype, added at load time (modeling.quantization_config)
    Precision("int4", "4-bit NF4 with double quantization, bitsandbytes",
              {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True}, "Linear4bit"),
)}
NAMES: tuple[str, ...] = tuple(PRECISIONS)


def get(name: str) -> Precision:
    """The table row of `name`; an unknown name is an error naming the choices."""
    from edgerlhf.errors import ConfigError

    if name not in PRECISIONS:
        raise ConfigError(f"unknown precision {name!r} (allowed: {', '.join(NAMES)})")
    return PRECISIONS[name]
