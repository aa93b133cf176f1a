"""Models: the device/dtype rule, the base model (hub snapshot, local folder or tiny offline build), loading.

Every stage after `base` loads only local folders written by earlier stages,
with safetensors and `trust_remote_code` only when params say so.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from edgerlhf.config import LOCAL_MODEL_DIR, HardwareParams, ModelParams, TinyModelParams
from edgerlhf.errors import ArtifactError, ConfigError, HardwareError, HubError

log = logging.getLogger("edgerlhf")

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
BF16_MIN_CAPABILITY = (8, 0)

LORA_TARGETS = {
    "gpt2": ["c_attn", "c_proj", "c_fc"],
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
}


@dataclass(frozen=True)
class Device:
    """Where a stage runs and the floating-point dtype it computes in."""

    type: str  # "cpu" or "cuda"
    dtype: torch.dtype
    name: str
    capability: tuple[int, int] | None = None
    index: int = 0  # the GPU's index (a DDP process uses the GPU of its local rank)

    @property
    def torch_device(self) -> torch.device:
        return torch.device(f"cuda:{self.index}" if self.type == "cuda" else "cpu")

    @property
    def dtype_name(self) -> str:
        return {v: k for k, v in DTYPES.items()}[self.dtype]

    def describe(self) -> str:
        cap = f", compute capability {self.capability[0]}.{self.capability[1]}" if self.capability else ""
        return f"{self.type} ({self.name}{cap}), compute dtype {self.dtype_name}"


def choose_dtype(device_type: str, capability: tuple[int, int] | None, requested: str) -> torch.dtype:
    """The dtype rule: bf16 on CUDA >= 8.0, fp16 on older CUDA, fp32 on CPU; an explicit request is checked."""
    if requested == "auto":
        if device_type == "cpu":
            # CPU bf16 matmuls are emulated on most CPUs (slow) and fp16 training is unsupported.
            return torch.float32
        return torch.bfloat16 if capability >= BF16_MIN_CAPABILITY else torch.float16
    if requested == "bf16" and device_type == "cuda" and capability < BF16_MIN_CAPABILITY:
        raise HardwareError(
            f"hardware.dtype bf16 needs compute capability >= 8.0, this GPU has {capability[0]}.{capability[1]}; "
            "set hardware.dtype: auto (fp16) or fp16")
    if requested == "fp16" and device_type == "cpu":
        raise HardwareError(
            "hardware.dtype fp16 is not supported for training on CPU; set hardware.dtype: auto or fp32")
    return DTYPES[requested]


def resolve_device(hw: HardwareParams, local_rank: int = 0) -> Device:
    """Pick CUDA when present (or as params say), else CPU, the compute dtype by `choose_dtype`, and cap this
    process's GPU memory to hardware.vram_budget_gb (see `apply_vram_budget`). `local_rank`: which GPU a DDP
    process uses (edgerlhf.distributed)."""
    want = hw.device
    if want == "cuda" and not torch.cuda.is_available():
        raise HardwareError("hardware.device is cuda but no CUDA GPU is visible; set hardware.device: auto or cpu")
    if want == "cuda" or (want == "auto" and torch.cuda.is_available()):
        if local_rank >= torch.cuda.device_count():
            raise HardwareError(f"process {local_rank} needs GPU {local_rank} but {torch.cuda.device_count()} are "
                                "visible; lower hardware.num_processes to the number of GPUs")
        torch.cuda.set_device(local_rank)
        cap = torch.cuda.get_device_capability(local_rank)
        device = Device("cuda", choose_dtype("cuda", cap, hw.dtype), torch.cuda.get_device_name(local_rank), cap,
                        local_rank)
    else:
        device = Device("cpu", choose_dtype("cpu", None, hw.dtype), "cpu")
    apply_vram_budget(hw.vram_budget_gb, device)
    return device


def vram_fraction(budget_gb: float, total_gb: float) -> float | None:
    """Fraction of the GPU a budget allows; None when there is nothing to cap (budget 0, or a budget at least
    the GPU's size: an "8 GB" card reports slightly under 8 GiB and is its own cap)."""
    if budget_gb == 0 or budget_gb >= total_gb:
        return None
    return budget_gb / total_gb


def apply_vram_budget(budget_gb: float, device: Device) -> None:
    """On CUDA, cap the process's allocator at hardware.vram_budget_gb so any larger GPU proves the 8 GB promise:
    exceeding it raises CUDA OOM, which the stage runner reports with the params to lower."""
    if device.type != "cuda":
        log.info("hardware.vram_budget_gb=%g: no GPU, the VRAM cap does not apply (peak_vram_gb recorded as 0.0)",
                 budget_gb)
        return
    total = torch.cuda.get_device_properties(device.index).total_memory / 2**30
    fraction = vram_fraction(budget_gb, total)
    if fraction is None:
        log.info("hardware.vram_budget_gb=%g: no VRAM cap needed on this %.1f GB GPU", budget_gb, total)
        return
    torch.cuda.set_per_process_memory_fraction(fraction, device.index)
    log.info("VRAM capped at %.2f GB of %.1f GB (hardware.vram_budget_gb)", budget_gb, total)


def lora_targets(model: torch.nn.Module, configured: list[str]) -> list[str]:
    """LoRA target modules: as configured, else the attention + MLP projections of the model's architecture."""
    if configured:
        return list(configured)
    arch = model.config.model_type
    if arch not in LORA_TARGETS:
        raise HardwareError(f"no default LoRA targets for model type {arch!r}; set lora.target_modules in params.yaml "
                            f"(its linear layers: {', '.join(linear_layer_names(model)) or 'none found'})")
    return LORA_TARGETS[arch]


def linear_layer_names(model: torch.nn.Module) -> list[str]:
    """The distinct names (last component) of the model's linear layers a LoRA can target, output heads left out."""
    from transformers.pytorch_utils import Conv1D

    heads = {"lm_head", "score", "embed_out", "output"}
    return sorted({n.split(".")[-1] for n, m in model.named_modules()
                   if isinstance(m, (torch.nn.Linear, Conv1D)) and n and n.split(".")[-1] not in heads})


def check_lora_targets(model: torch.nn.Module, configured: Sequence[str], where: str) -> list[str]:
    """At `base`, before any training: the LoRA targets the training stages will use (`lora_targets`) exist in
    `model`, so an architecture without defaults or a misspelt target fails here, not in SFT. peft matches a
    target by the last components of a module's name."""
    targets = lora_targets(model, list(configured))
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    head_names = {n.split(".")[-1] for n, m in model.named_modules() if head is not None and m is head}
    if head_names & set(targets):
        raise ConfigError(f"lora.target_modules names the output layer ({', '.join(sorted(head_names & set(targets)))})"
                          ": PPO computes it in fp32 itself; leave it out")
    names = [n for n, _ in model.named_modules()]
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        raise ConfigError(f"lora.target_modules names {', '.join(missing)}, which {where} does not have; set it to "
                          f"some of its linear layers: {', '.join(linear_layer_names(model)) or 'none found'}")
    return targets


def lora_config(model: torch.nn.Module, task_type: str, r: int, alpha: int, dropout: float,
                target_modules: Sequence[str] | None, **extra: Any) -> Any:
    """The project's one LoRA config (SFT, reward, PPO, bench): `target_modules` (see `lora_targets`; None: peft's
    default), no bias, and fan_in_fan_out where a target is GPT-2's Conv1D (weight stored transposed), so peft
    need not fix it with a warning. bitsandbytes replaces Conv1D by Linear layers when it quantizes."""
    from peft import LoraConfig
    from transformers.pytorch_utils import Conv1D

    targets = list(target_modules) if target_modules else None
    fan_in_fan_out = any(isinstance(m, Conv1D) and (targets is None or n.split(".")[-1] in targets)
                         for n, m in model.named_modules())
    return LoraConfig(task_type=task_type, r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets,
                      fan_in_fan_out=fan_in_fan_out, bias="none", **extra)


def enable_checkpointing(model: torch.nn.Module) -> None:
    """Non-reentrant gradient checkpointing, so gradients reach the LoRA weights although the frozen inputs need
    no grad (transformers >= 5.2x calls it activation checkpointing)."""
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable({"use_reentrant": False})
    else:  # pragma: no cover - older transformers
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def count_params(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; 4-bit packed weights count as stored elements x 2."""
    trainable = total = 0
    for p in model.parameters():
        n = p.numel() * (2 if p.dtype == torch.uint8 and getattr(p, "quant_state", None) is not None else 1)
        total += n
        if p.requires_grad:
            trainable += n
    return trainable, total


def model_memory_mb(model: torch.nn.Module) -> float:
    """Bytes held by the model's parameters and buffers (its loaded, possibly quantized footprint), in MiB."""
    return round(model.get_memory_footprint() / 2**20, 3)


# --------------------------------------------------------------------------- base model


def train_tokenizer(texts: list[str], vocab_size: int, out_dir: Path):
    """Train a byte-level BPE (GPT-2 style, pad = eos) on `texts`; deterministic for the same texts."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    eos = "<|endoftext|>"
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[eos], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=eos, eos_token=eos, unk_token=eos, pad_token=eos)
    fast.model_max_length = 1 << 20
    save_tokenizer(fast, out_dir)
    return fast


def build_tiny_model(tiny: TinyModelParams, tokenizer, seed: int) -> torch.nn.Module:
    """A random-initialised causal LM of the configured shape (GPT-2 or Llama), seeded."""
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

    vocab = len(tokenizer)
    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
           "pad_token_id": tokenizer.pad_token_id}
    if tiny.arch == "gpt2":
        config = GPT2Config(vocab_size=vocab, n_positions=tiny.n_positions, n_embd=tiny.n_embd, n_layer=tiny.n_layer,
                            n_head=tiny.n_head, initializer_range=tiny.initializer_range, **ids)
    else:
        config = LlamaConfig(vocab_size=vocab, hidden_size=tiny.n_embd, intermediate_size=4 * tiny.n_embd,
                             num_hidden_layers=tiny.n_layer, num_attention_heads=tiny.n_head,
                             num_key_value_heads=tiny.n_head, max_position_embeddings=tiny.n_positions,
                             initializer_range=tiny.initializer_range, tie_word_embeddings=True, **ids)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config)


def snapshot_hub_model(model: ModelParams, out_dir: Path, lora_target_modules: Sequence[str] = ()) -> None:
    """Download `model.name` at `model.revision` (safetensors only), check its tokenizer (`check_tokenizer`) and
    LoRA targets (`check_lora_targets`), and save model + tokenizer to `out_dir`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if Path(model.name).is_dir():  # transformers would load the folder and the log would say "from the hub"
        raise ConfigError(f"model.name {model.name} is a local folder: set model.source: local and model.local_path: "
                          f"{model.name} (then DVC tracks the folder as a dependency of base)")
    try:
        tok = AutoTokenizer.from_pretrained(model.name, revision=model.revision,
                                            trust_remote_code=model.trust_remote_code)
        lm = AutoModelForCausalLM.from_pretrained(model.name, revision=model.revision, use_safetensors=True,
                                                  trust_remote_code=model.trust_remote_code, dtype=torch.float32)
    except OSError as exc:
        raise HubError(
            f"cannot load {model.name}@{model.revision} from the hub ({str(exc).splitlines()[0][:160]}); "
            "offline: pre-download it into HF_HOME and set HF_HUB_OFFLINE=1, or set model.source: tiny") from exc
    where = f"the hub model {model.name}@{model.revision}"
    check_tokenizer(tok, where, "pick a model with a working tokenizer, or save one into a local folder "
                                "(model.source: local)")
    check_lora_targets(lm, lora_target_modules, where)
    save_base(tok, lm, out_dir)


# Keys a library writes into a saved config that depend on how it was called, not on the model (transformers
# records local_files_only, i.e. whether HF_HUB_OFFLINE was set): dropped, so equal models are equal bytes.
VOLATILE_CONFIG_KEYS = {"tokenizer_config.json": ("local_files_only",)}


def stable_files(folder: str | Path) -> None:
    """Make a saved folder's JSON byte-stable: an adapter's target_modules sorted (PEFT writes a set, in a random
    order per process) and VOLATILE_CONFIG_KEYS dropped. Equal weights then give equal DVC hashes, so a rerun that
    changes nothing does not rerun what depends on it."""
    folder = Path(folder)
    adapter = folder / "adapter_config.json"
    if adapter.is_file():
        cfg = json.loads(adapter.read_text())
        if isinstance(cfg.get("target_modules"), list):
            cfg["target_modules"] = sorted(cfg["target_modules"])
            adapter.write_text(json.dumps(cfg, indent=2, sort_keys=True))
    for name, keys in VOLATILE_CONFIG_KEYS.items():
        path = folder / name
        if path.is_file():
            cfg = json.loads(path.read_text())
            if any(k in cfg for k in keys):
                for k in keys:
                    cfg.pop(k, None)
                path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")


def save_model(model: torch.nn.Module, out_dir: str | Path) -> None:
    """`save_pretrained` as safetensors, byte-stable (`stable_files`): a model or a PEFT adapter."""
    model.save_pretrained(str(out_dir), safe_serialization=True)
    stable_files(out_dir)


def save_tokenizer(tok: Any, out_dir: str | Path) -> None:
    """`save_pretrained` of a tokenizer, byte-stable (`stable_files`)."""
    tok.save_pretrained(str(out_dir))
    stable_files(out_dir)


def save_base(tok, lm: torch.nn.Module, out_dir: Path) -> None:
    """models/base as every later stage reads it: safetensors weights, config (pad token set), tokenizer."""
    if tok.pad_token is None:
        # GPT-2 family has no pad token: reuse EOS (masks are derived from positions, never from ids != pad).
        tok.pad_token = tok.eos_token
    lm.config.pad_token_id = tok.pad_token_id
    save_model(lm, out_dir)
    save_tokenizer(tok, out_dir)


# An HH-style prompt every usable tokenizer turns into tokens (an empty or unfit vocabulary gives none).
SAMPLE_PROMPT = "\n\nHuman: What color is the sky?\n\nAssistant:"
# A folder holds a tokenizer when it has tokenizer.json or a vocabulary file next to tokenizer_config.json
# (vocab.json + merges.txt, vocab.txt, a sentencepiece *.model, a tiktoken file).
TOKENIZER_FILE_PATTERNS = ("tokenizer.json", "vocab.json", "vocab.txt", "*.model", "*.tiktoken")


def check_tokenizer(tok, where: str, fix: str) -> None:
    """A tokenizer that encodes SAMPLE_PROMPT to at least one known token and has an EOS token; else one
    ArtifactError line naming `where` and `fix`. Without this an empty tokenizer trains on nothing, silently."""
    ids = tok(SAMPLE_PROMPT, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ArtifactError(f"the tokenizer of {where} encodes the sample prompt {SAMPLE_PROMPT!r} to nothing "
                            f"(an empty or unfit vocabulary: {len(tok)} entries); {fix}")
    if tok.unk_token_id is not None and all(i == tok.unk_token_id for i in ids):
        raise ArtifactError(f"the tokenizer of {where} encodes the sample prompt {SAMPLE_PROMPT!r} to unknown "
                            f"tokens only; {fix}")
    if tok.eos_token is None:
        raise ArtifactError(f"the tokenizer of {where} has no eos_token (needed to end responses and to pad); set "
                            "eos_token in its tokenizer_config.json")


def _load_error(exc: Exception) -> str:
    return str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__


def load_local_model(model: ModelParams, lora_target_modules: Sequence[str] = ()) -> tuple[Any, torch.nn.Module]:
    """The tokenizer and causal LM of the folder `model.local_path` (model.source: local), checked before
    anything is written: a folder with config.json, `*.safetensors` weights (pickle-only weights: how to convert),
    tokenizer files and a tokenizer that encodes SAMPLE_PROMPT (`check_tokenizer`), weights that fill the
    architecture, and LoRA targets the architecture has (`check_lora_targets`). Each failure is one
    ArtifactError/ConfigError line naming the fix. Custom model code runs only with model.trust_remote_code."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(model.local_path)
    key = f"model.local_path ({model.local_path})"
    if not path.exists():
        raise ArtifactError(f"{key} does not exist: put (or symlink) your model folder there, or point "
                            "model.local_path at it")
    if not path.is_dir():
        raise ArtifactError(f"{key} is a file, not a model folder: point model.local_path at the folder holding "
                            "config.json, the *.safetensors weights and the tokenizer files")
    if not (path / "config.json").is_file():
        inner = sorted(p.parent for p in path.glob("*/config.json"))
        if len(inner) == 1:
            hint = f"did you mean model.local_path: {inner[0]}?"
        elif path == Path(LOCAL_MODEL_DIR):
            hint = (f"put your model folder in {LOCAL_MODEL_DIR}/<name> (or symlink it there) and set "
                    f"model.local_path: {LOCAL_MODEL_DIR}/<name>")
        else:
            hint = ("point model.local_path at the folder holding config.json, the *.safetensors weights and the "
                    "tokenizer files (what save_pretrained writes)")
        raise ArtifactError(f"{key} has no config.json, so it is not a model folder; {hint}")
    if not any(path.glob("*.safetensors")):
        pickles = sorted(p.name for p in path.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
        if pickles:
            raise ArtifactError(
                f"{key} has its weights only as pickle ({', '.join(pickles[:3])}), which is never loaded here; "
                "convert them once to safetensors (this unpickles: only a file you trust) with "
                f"`python -c \"from transformers import AutoModelForCausalLM as M; M.from_pretrained('{path}')"
                f".save_pretrained('{path}', safe_serialization=True)\"`, then delete the pickle files")
        raise ArtifactError(f"{key} has no *.safetensors weights: save the model into it with "
                            "save_pretrained(folder, safe_serialization=True)")
    if not any(any(path.glob(pattern)) for pattern in TOKENIZER_FILE_PATTERNS):
        raise ArtifactError(
            f"{key} has no tokenizer files (tokenizer.json, or tokenizer_config.json with its vocabulary such as "
            "vocab.json + merges.txt or tokenizer.model); save the model's tokenizer into it with "
            f"`python -c \"from transformers import AutoTokenizer; AutoTokenizer.from_pretrained('<its hub id>')"
            f".save_pretrained('{path}')\"`")
    trust = model.trust_remote_code
    trust_hint = "" if trust else " (a model with its own code needs model.trust_remote_code: true, after reading it)"
    try:
        tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ArtifactError(f"cannot load the tokenizer of {key}: {_load_error(exc)}{trust_hint}") from None
    check_tokenizer(tok, key, "save the model's own tokenizer into the folder (tokenizer.save_pretrained)")
    try:
        lm, info = AutoModelForCausalLM.from_pretrained(str(path), use_safetensors=True, trust_remote_code=trust,
                                                        dtype=torch.float32, output_loading_info=True)
    except RuntimeError as exc:  # transformers: tensor shapes that differ from what config.json says
        if "mismatched" not in str(exc):
            raise
        raise ArtifactError(f"the weights in {key} do not fit its config.json (tensor shapes differ): save config and "
                            "weights together with save_pretrained") from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ArtifactError(f"cannot load {key} as a causal language model: {_load_error(exc)}{trust_hint}") from None
    missing = list(info.get("missing_keys") or [])
    if missing:
        raise ArtifactError(f"the weights in {key} do not fit its config.json: {len(missing)} of its tensors missing "
                            f"(e.g. {sorted(missing)[0]}); save the whole model with save_pretrained")
    check_lora_targets(lm, lora_target_modules, f"model type {lm.config.model_type!r} of {key}")
    return tok, lm


# --------------------------------------------------------------------------- loading


def require_dir(path: str | Path, stage: str, marker: str = "") -> Path:
    """An upstream artifact folder, or ArtifactError naming the stage that makes it."""
    path = Path(path)
    if not path.is_dir() or (marker and not (path / marker).exists()):
        what = f"{path}/{marker}" if marker else str(path)
        raise ArtifactError(f"{what} is missing: run `dvc repro {stage}` first")
    return path


# Pickle formats torch / transformers / peft can load: unpickling runs whatever code the file names.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
ADAPTER_WEIGHTS = "adapter_model.safetensors"
VALUE_HEAD_WEIGHTS = "value_head.safetensors"  # = ppo.VALUE_HEAD_FILE (tests/test_failures.py checks they agree)


def require_safetensors(path: str | Path, stage: str, weights: Sequence[str] = ("*.safetensors",),
                        marker: str = "") -> Path:
    """An upstream artifact folder that may be loaded: present (with `marker`, e.g. config.json), holding its
    safetensors `weights` (file names or glob patterns) and no pickle file (PICKLE_SUFFIXES) anywhere in it.
    Otherwise one ArtifactError line naming the file and the stage to rerun; called before any work is done."""
    path = require_dir(path, stage, marker)
    pickles = sorted(p for p in path.rglob("*") if p.suffix.lower() in PICKLE_SUFFIXES and p.is_file())
    if pickles:
        more = f" (and {len(pickles) - 1} more)" if len(pickles) > 1 else ""
        raise ArtifactError(f"{pickles[0]}{more} is a pickle file ({pickles[0].suffix}): refusing to load it, "
                            f"unpickling can run arbitrary code; delete it and rerun `dvc repro -f {stage}` "
                            "(weights must be .safetensors)")
    for pattern in weights:
        if not any(f.is_file() for f in path.glob(pattern)):
            raise ArtifactError(f"{path} has no {pattern} weights: rerun `dvc repro -f {stage}`")
    return path


def require_model(path: str | Path, stage: str) -> Path:
    """A full model folder (models/base, models/sft/merged): config.json + *.safetensors, no pickle."""
    return require_safetensors(path, stage, ("*.safetensors",), "config.json")


def require_adapter(path: str | Path, stage: str, *extra_weights: str) -> Path:
    """A LoRA adapter folder (models/sft/adapter, models/reward/P; models/ppo/P with its value head):
    adapter_config.json + adapter_model.safetensors (+ `extra_weights`), no pickle."""
    return require_safetensors(path, stage, (ADAPTER_WEIGHTS, *extra_weights), "adapter_config.json")


def require_policy(path: str | Path, stage: str) -> Path:
    """A saved PPO policy (models/ppo/P): the LoRA adapter and the value head, as safetensors, no pickle."""
    return require_adapter(path, stage, VALUE_HEAD_WEIGHTS)


def load_tokenizer(path: str | Path, trust_remote_code: bool = False):
    """Tokenizer from a local folder, left padding for generation (callers re-pad where needed)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_causal_lm(path: str | Path, device: Device, dtype: torch.dtype | None = None,
                   trust_remote_code: bool = False) -> torch.nn.Module:
    """A causal LM from a local safetensors folder on `device` in `dtype` (default: the compute dtype)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype or device.dtype, use_safetensors=True,
                                                trust_remote_code=trust_remote_code,
                                                device_map={"": device.torch_device})


def trainer_precision_kwargs(device: Device) -> dict:
    """transformers.TrainingArguments flags that apply the dtype rule (mixed precision on GPU, fp32 on CPU)."""
    return {"use_cpu": device.type == "cpu", "bf16": device.dtype == torch.bfloat16,
            "fp16": device.dtype == torch.float16}


def align_trainable_dtype(model: torch.nn.Module, dtype: torch.dtype = torch.float32) -> int:
    """Cast every trainable parameter (LoRA, score head) to `dtype`; return how many were cast.

    TRL casts QLoRA adapters of a quantized model to bf16 unconditionally. On CPU (fp32 compute) that gives
    "expected m1 and m2 to have the same dtype", and on fp16 GPUs bf16 weights break loss scaling. Keeping
    trainable weights in fp32 (master weights; autocast does the low-precision math on GPU) is right on every
    device. Must run before the optimizer is created (Trainer creates it in train())."""
    n = 0
    for p in model.parameters():
        if p.requires_grad and p.dtype != dtype:
            p.data = p.data.to(dtype)
            n += 1
    return n


def pretrain_tiny(model: torch.nn.Module, tokenizer, texts: list[str], steps: int, batch_size: int, lr: float,
                  seed: int) -> list[float]:
    """Full-parameter causal-LM training of the tiny base on the training corpus; returns the loss per step.

    A random model is no stand-in for distilgpt2: LoRA on random weights barely moves. A short pretraining
    makes the offline base a real (if small) language model, so SFT and reward LoRAs behave as on the hub
    model. Seeded, fp32, CPU-friendly."""
    from tqdm.auto import tqdm

    gen = torch.Generator().manual_seed(seed)
    max_len = getattr(model.config, "n_positions", None) or model.config.max_position_embeddings
    eos = tokenizer.eos_token
    tokenizer.padding_side = "right"
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 - s / max(steps, 1))
    model.train()
    losses = []
    for _ in tqdm(range(steps), desc="pretrain tiny base", mininterval=2):
        idx = torch.randint(len(texts), (batch_size,), generator=gen).tolist()
        enc = tokenizer([texts[i] + eos for i in idx], return_tensors="pt", padding=True, truncation=True,
                        max_length=max_len)
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        # pad == eos: the first eos of each row is real and must be learned (it is what stops generation).
        lengths = enc["attention_mask"].sum(1)
        labels[torch.arange(len(idx)), lengths - 1] = enc["input_ids"][torch.arange(len(idx)), lengths - 1]
        loss = model(**enc, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    model.eval()
    return losses
