"""params.yaml: one typed, validated source of every hyperparameter.

Each section of params.yaml is a frozen dataclass below. Field metadata
carries the allowed range or choices, so the schema, the defaults and the
validation live in one place. `load_params` rejects unknown keys, wrong
types and out-of-range values with one line that names the key, before any
stage does work (see `errors.ConfigError`, exit code 2).
"""

from __future__ import annotations

import dataclasses
import difflib
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from edgerlhf.errors import ConfigError

# The names of edgerlhf/precisions.py's table (tests/test_dvc_map.py checks they agree). Kept here as a list,
# not imported: every stage depends on this file, and a new row in the table must not rerun prepare/base/sft.
PRECISIONS = ("bf16", "int8", "int4")
SPLITS = ("sft_train", "sft_eval", "rm_train", "rm_test", "ppo_prompts", "eval_prompts", "judge_train")
# Where `prepare` draws each split from: the source's train part or its test part (in this order of allocation).
TRAIN_SPLITS = ("sft_train", "rm_train", "ppo_prompts", "judge_train")
TEST_SPLITS = ("rm_test", "sft_eval", "eval_prompts")
# Committed folders (each holds only a README.md): the defaults of model.local_path and data.jsonl_path. dvc.yaml
# lists both params as deps of `base` / `prepare` whatever the source, and DVC fails on a dep that does not exist.
LOCAL_MODEL_DIR = "models/local"
LOCAL_DATA_DIR = "data/local"
# Keys that change how a stage runs, not what it produces (resumable checkpoints, memory caps, threads, batch sizes
# of pure scoring passes, logging cadence): not DVC params deps in dvc.yaml, so editing one reruns nothing.
# tests/test_dvc_map.py checks that no stage tracks one; README "The experiment loop" names them.
OPERATIONAL_KEYS = (
    "hardware.vram_budget_gb", "hardware.cpu_threads",
    "sft.checkpoint_every", "reward.checkpoint_every", "ppo.checkpoint_every", "eval.judge_training.checkpoint_every",
    "ppo.logprob_chunk_size", "ppo.log_every", "reward.eval_batch_size", "eval.judge_training.eval_batch_size",
    "eval.judge_batch_size",
)
DEFAULT_JUDGE = "Skywork/Skywork-Reward-V2-Qwen3-0.6B"  # Apache-2.0, 0.6 B parameters
# Folders under models/ the pipeline writes (DVC outs): a local model there would be a cycle in the map.
PIPELINE_MODEL_DIRS = ("models/base", "models/sft", "models/reward", "models/ppo")


def _f(default: Any, *, lo: float | None = None, hi: float | None = None, lo_open: bool = False,
       doc: str = "") -> Any:
    """A dataclass field with an optional numeric range [lo, hi] (or (lo, hi] when lo_open)."""
    return field(default=default, metadata={"lo": lo, "hi": hi, "lo_open": lo_open, "doc": doc})


def _lst(default: list, **kw: Any) -> Any:
    return field(default_factory=lambda: list(default), metadata=kw)


@dataclass(frozen=True)
class TinyModelParams:
    """Shape of the offline model built from a config (no download)."""

    arch: Literal["gpt2", "llama"] = "gpt2"
    n_layer: int = _f(2, lo=1)
    n_embd: int = _f(64, lo=8)
    n_head: int = _f(4, lo=1)
    n_positions: int = _f(256, lo=16)
    vocab_size: int = _f(512, lo=64, doc="size of the byte-level BPE trained on the corpus")
    initializer_range: float = _f(0.02, lo=0.0, lo_open=True)
    pretrain_steps: int = _f(500, lo=0, doc="full-parameter LM steps on the training corpus, so LoRA starts from an LM")
    pretrain_batch_size: int = _f(32, lo=1)
    pretrain_lr: float = _f(3e-3, lo=0.0, lo_open=True)


@dataclass(frozen=True)
class ModelParams:
    source: Literal["hub", "local", "tiny"] = _f("hub", doc="hub: model.name@revision | local: the folder "
                                                          "model.local_path | tiny: built from model.tiny (offline)")
    name: str = "distilgpt2"
    revision: str = "main"
    local_path: str = _f(LOCAL_MODEL_DIR, doc="model.source local: the model folder (safetensors + config + "
                                              "tokenizer); always a DVC dep of `base`, so it must exist")
    trust_remote_code: bool = False
    tiny: TinyModelParams = field(default_factory=TinyModelParams)


@dataclass(frozen=True)
class SplitSizes:
    sft_train: int = _f(5000, lo=1)
    sft_eval: int = _f(200, lo=1)
    rm_train: int = _f(5000, lo=1)
    rm_test: int = _f(1000, lo=1)
    ppo_prompts: int = _f(1024, lo=1)
    eval_prompts: int = _f(200, lo=1)
    judge_train: int = _f(0, lo=0, doc="0 disables the trained-judge split")


@dataclass(frozen=True)
class DataParams:
    source: Literal["hub", "jsonl", "synthetic"] = _f("hub", doc="hub: data.hub_id | jsonl: data.jsonl_path | "
                                                             "synthetic: the offline task")
    hub_id: str = "Anthropic/hh-rlhf"
    hub_revision: str = "main"
    hub_train_split: str = _f("train", doc="the hub split the train-side splits are cut from")
    hub_test_split: str = _f("test", doc="the hub split the test-side splits are cut from (the same name: one pool)")
    jsonl_path: str = _f(LOCAL_DATA_DIR, doc="data.source jsonl: the JSONL file; always a DVC dep of `prepare`, "
                                             "so it must exist (the default is an empty folder)")
    on_malformed: Literal["error", "skip"] = "error"
    labels: Literal["human", "judge"] = _f("human", doc="what the reward models learn: human: the data's labels | "
                                                      "judge: each rm pair ordered by the gold judge (Gao et al. 2022)")
    max_prompt_chars: int = _f(1024, lo=16, doc="longer prompts are skipped and counted")
    knowledge_repeats: int = _f(200, lo=0, doc="synthetic task: copies of its fact statements in the corpus")
    sizes: SplitSizes = field(default_factory=SplitSizes)


@dataclass(frozen=True)
class HardwareParams:
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    vram_budget_gb: float = _f(8.0, lo=0.0)
    num_processes: int = _f(1, lo=1, doc="processes (DDP) of the training stages sft, reward@P, ppo@P; one per GPU")
    cpu_threads: int | str = _f("auto", doc="torch threads per stage process: auto = usable cores // num_processes "
                                            "(at least 1), or an integer >= 1 (runtime.set_threads); operational")

    def __post_init__(self) -> None:
        # `int | str` passes _coerce unchecked: the one key whose value is a word or a number is checked here.
        value = self.cpu_threads
        if value != "auto" and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ConfigError(f"hardware.cpu_threads must be auto or an integer >= 1 (got {value!r})")


@dataclass(frozen=True)
class LoraParams:
    r: int = _f(16, lo=1)
    alpha: int = _f(32, lo=1)
    dropout: float = _f(0.05, lo=0.0, hi=0.9)
    target_modules: list[str] = _lst([], doc="empty: the attention + MLP projections of the arch")


@dataclass(frozen=True)
class SFTParams:
    learning_rate: float = _f(2e-4, lo=0.0, lo_open=True)
    per_device_train_batch_size: int = _f(1, lo=1)
    gradient_accumulation_steps: int = _f(8, lo=1)
    num_train_epochs: float = _f(1.0, lo=0.0, lo_open=True)
    max_steps: int = _f(-1, lo=-1, doc="-1: run num_train_epochs")
    max_length: int = _f(512, lo=8)
    warmup_ratio: float = _f(0.0, lo=0.0, hi=0.99, doc="fraction of steps for linear warmup")
    lr_scheduler_type: Literal["linear", "cosine", "constant"] = "linear"
    weight_decay: float = _f(0.0, lo=0.0)
    gradient_checkpointing: bool = True
    logging_steps: int = _f(10, lo=1)
    checkpoint_every: int = _f(200, lo=0, doc="optimizer steps between resumable checkpoints in .cache/work/sft "
                                              "(kept only until the stage succeeds); 0 off")


@dataclass(frozen=True)
class RewardTraining:
    """How a reward model is trained (TRL RewardTrainer): the proxies' recipe (`reward`) and, separately, a trained
    gold judge's (`eval.judge_training`), so tuning the proxies never changes the judge they are measured by."""

    learning_rate: float = _f(2e-4, lo=0.0, lo_open=True)
    per_device_train_batch_size: int = _f(4, lo=1)
    gradient_accumulation_steps: int = _f(4, lo=1)
    num_train_epochs: float = _f(1.0, lo=0.0, lo_open=True)
    max_steps: int = _f(-1, lo=-1)
    max_length: int = _f(512, lo=8)
    warmup_ratio: float = _f(0.0, lo=0.0, hi=0.99, doc="fraction of steps for linear warmup")
    lr_scheduler_type: Literal["linear", "cosine", "constant"] = "linear"
    weight_decay: float = _f(0.0, lo=0.0)
    center_rewards_coefficient: float = _f(0.0, lo=0.0)
    gradient_checkpointing: bool = True
    logging_steps: int = _f(10, lo=1)
    eval_batch_size: int = _f(16, lo=1)
    ece_bins: int = _f(10, lo=2)
    checkpoint_every: int = _f(200, lo=0, doc="optimizer steps between resumable checkpoints in "
                                              ".cache/work/reward-<precision> (or judge); 0 off")


@dataclass(frozen=True)
class RewardParams(RewardTraining):
    precisions: list[str] = _lst(list(PRECISIONS))


@dataclass(frozen=True)
class JudgeTraining(RewardTraining):
    """eval.judge: trained: the reward-model recipe plus its own LoRA (lora.target_modules is shared)."""

    lora_r: int = _f(16, lo=1)
    lora_alpha: int = _f(32, lo=1)
    lora_dropout: float = _f(0.05, lo=0.0, hi=0.9)


@dataclass(frozen=True)
class PPOParams:
    """PPO hyperparameters (see docs/ppo.md): one optimizer step sees
    mini_batch_size * gradient_accumulation_steps episodes; each update runs
    ppo_epochs passes over batch_size fresh episodes."""

    total_episodes: int = _f(4096, lo=1)
    batch_size: int = _f(32, lo=1, doc="episodes sampled per PPO update")
    mini_batch_size: int = _f(2, lo=1, doc="episodes per forward/backward")
    gradient_accumulation_steps: int = _f(4, lo=1)
    ppo_epochs: int = _f(4, lo=1)
    learning_rate: float = _f(1.41e-5, lo=0.0)
    lr_schedule: Literal["constant", "linear"] = "linear"
    adam_eps: float = _f(1e-5, lo=0.0, lo_open=True)
    max_grad_norm: float = _f(0.5, lo=0.0, lo_open=True)
    cliprange: float = _f(0.2, lo=0.0, lo_open=True)
    cliprange_value: float = _f(0.2, lo=0.0, lo_open=True)
    vf_coef: float = _f(0.1, lo=0.0)
    ent_coef: float = _f(0.0, lo=0.0)
    gamma: float = _f(1.0, lo=0.0, hi=1.0)
    lam: float = _f(0.95, lo=0.0, hi=1.0)
    response_length: int = _f(64, lo=1)
    temperature: float = _f(0.7, lo=0.0, lo_open=True)
    top_k: int = _f(0, lo=0)
    top_p: float = _f(1.0, lo=0.0, hi=1.0, lo_open=True)
    missing_eos_penalty: float = _f(1.0, lo=0.0)
    kl_estimator: Literal["k1", "k3"] = "k1"
    kl_control: Literal["adaptive", "fixed"] = "adaptive"
    init_kl_coef: float = _f(0.1, lo=0.0)
    target_kl: float = _f(6.0, lo=0.0, lo_open=True)
    kl_horizon_fraction: float = _f(0.1, lo=0.0, lo_open=True, doc="adaptive KL horizon as a fraction of "
                                    "total_episodes: beta can move by up to exp(+-0.2 / fraction) over a run")
    whiten_rewards: bool = False
    normalize_score: bool = True
    score_norm_samples: int = _f(64, lo=2, doc="SFT samples used to measure the score mean/std")
    lora_r: int = _f(16, lo=1)
    lora_alpha: int = _f(32, lo=1)
    gradient_checkpointing: bool = True
    logprob_chunk_size: int = _f(4, lo=1, doc="rows per chunk when computing log-probs")
    eval_every: int = _f(10, lo=0, doc="updates between gold/proxy checks on a fixed prompt set; 0 off")
    eval_prompts: int = _f(32, lo=1)
    log_every: int = _f(1, lo=1)
    checkpoint_every: int = _f(10, lo=0, doc="PPO updates between resumable checkpoints in "
                                             ".cache/work/ppo-<precision>; 0 off")


@dataclass(frozen=True)
class EvalParams:
    judge: Literal["auto", "rules", "model", "trained", "none"] = _f(
        "auto", doc="the gold judge (stage `judge`): rules: the synthetic task's scorer | model: a reward model "
                    "from the hub or a folder | trained: one trained here on judge_train | auto: rules on the "
                    "synthetic task, model elsewhere | none: no gold")
    judge_source: Literal["hub", "local"] = _f("hub", doc="judge model: hub: eval.judge_model@judge_revision | "
                                                         "local: the folder eval.judge_path")
    judge_model: str = _f(DEFAULT_JUDGE, doc="hub id of the judge (a 1-logit sequence classifier)")
    judge_revision: str = _f("main", doc="hub revision; metrics name the commit it resolved to: pin that")
    judge_path: str = _f(LOCAL_MODEL_DIR, doc="judge_source local: the judge folder; always a DVC dep of `judge`, "
                                              "so it must exist")
    judge_trust_remote_code: bool = _f(False, doc="only ever true for a judge whose code you have read")
    judge_base: str = _f("", doc="trained judge: empty = models/base (model.name), else a hub id of a larger base")
    judge_base_revision: str = "main"
    judge_training: JudgeTraining = field(default_factory=JudgeTraining)
    judge_batch_size: int = _f(8, lo=1)
    judge_max_length: int = _f(1024, lo=16, doc="tokens per dialogue; longer ones lose the start of the prompt")
    max_new_tokens: int = _f(64, lo=1)
    temperature: float = _f(0.7, lo=0.0, lo_open=True)
    top_k: int = _f(0, lo=0)
    top_p: float = _f(1.0, lo=0.0, hi=1.0, lo_open=True)
    batch_size: int = _f(16, lo=1)
    bootstrap_samples: int = _f(1000, lo=10)


@dataclass(frozen=True)
class Params:
    seed: int = _f(42, lo=0)
    model: ModelParams = field(default_factory=ModelParams)
    data: DataParams = field(default_factory=DataParams)
    hardware: HardwareParams = field(default_factory=HardwareParams)
    lora: LoraParams = field(default_factory=LoraParams)
    sft: SFTParams = field(default_factory=SFTParams)
    reward: RewardParams = field(default_factory=RewardParams)
    ppo: PPOParams = field(default_factory=PPOParams)
    eval: EvalParams = field(default_factory=EvalParams)


# --------------------------------------------------------------------------- validation


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) is list:
        return f"a list of {typing.get_args(tp)[0].__name__}"
    return getattr(tp, "__name__", str(tp))


def _coerce(key: str, value: Any, tp: Any, meta: dict) -> Any:
    """Check `value` against the field type `tp` and range in `meta`; return it typed."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping (got {type(value).__name__})")
        return _build(tp, value, key + ".")
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{key} must be {_type_name(tp)} (got {value!r})")
        return value
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list) or not all(isinstance(v, item_tp) for v in value):
            raise ConfigError(f"{key} must be {_type_name(tp)} (got {value!r})")
        return list(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false (got {value!r})")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} must be an integer (got {value!r})")
    elif tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} must be a number (got {value!r})")
        value = float(value)
        if value != value or value in (float("inf"), float("-inf")):
            raise ConfigError(f"{key} must be finite (got {value!r})")
    elif tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key} must be a string (got {value!r})")
        return value
    lo, hi, lo_open = meta.get("lo"), meta.get("hi"), meta.get("lo_open", False)
    if lo is not None and (value <= lo if lo_open else value < lo):
        raise ConfigError(f"{key} must be {'>' if lo_open else '>='} {lo} (got {value!r})")
    if hi is not None and value > hi:
        raise ConfigError(f"{key} must be <= {hi} (got {value!r})")
    return value


def _build(cls: type, raw: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in names:
            close = suggest_key(f"{prefix}{key}")
            hint = f"did you mean {close}?" if close else f"allowed here: {', '.join(names)}"
            raise ConfigError(f"unknown key {prefix}{key} ({hint})")
    kwargs = {}
    for name, f in names.items():
        if name in raw:
            kwargs[name] = _coerce(prefix + name, raw[name], hints[name], dict(f.metadata))
    return cls(**kwargs)


def all_keys(cls: type | None = None, prefix: str = "") -> list[str]:
    """Every valid params key, dotted (sections and their keys): `reward`, `reward.learning_rate`, ..."""
    cls = cls or Params
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        out.append(prefix + f.name)
        if dataclasses.is_dataclass(hints[f.name]):
            out += all_keys(hints[f.name], f"{prefix}{f.name}.")
    return out


def suggest_key(key: str) -> str | None:
    """The valid key closest to a misspelled dotted `key` (difflib), e.g. reward.learnin_rate ->
    reward.learning_rate, sft.target_kl -> ppo.target_kl; None when nothing is close."""
    match = difflib.get_close_matches(key, all_keys(), n=1, cutoff=0.6)
    return match[0] if match else None


def _check_cross_field(p: Params) -> None:
    """Rules that span several keys."""
    for prec in p.reward.precisions:
        if prec not in PRECISIONS:
            raise ConfigError(f"reward.precisions has unknown precision {prec!r} (allowed: {', '.join(PRECISIONS)})")
    if not p.reward.precisions:
        raise ConfigError("reward.precisions must name at least one of " + ", ".join(PRECISIONS))
    if len(set(p.reward.precisions)) != len(p.reward.precisions):
        raise ConfigError(f"reward.precisions has duplicates ({p.reward.precisions})")
    for name, section in (("sft", p.sft), ("reward", p.reward), ("eval.judge_training", p.eval.judge_training)):
        # a resumed Trainer starts a fresh logging window at its checkpoint: aligned, the logged curve is the same
        if section.checkpoint_every % section.logging_steps:
            raise ConfigError(f"{name}.checkpoint_every ({section.checkpoint_every}) must be a multiple of "
                              f"{name}.logging_steps ({section.logging_steps}), so a resumed run logs the same curve")
    step = p.ppo.mini_batch_size * p.ppo.gradient_accumulation_steps
    if p.ppo.batch_size % step:
        raise ConfigError(
            f"ppo.batch_size ({p.ppo.batch_size}) must be a multiple of ppo.mini_batch_size * "
            f"ppo.gradient_accumulation_steps ({step})")
    if p.ppo.total_episodes < p.ppo.batch_size:
        raise ConfigError(f"ppo.total_episodes ({p.ppo.total_episodes}) must be >= ppo.batch_size ({p.ppo.batch_size})")
    if p.model.tiny.n_embd % p.model.tiny.n_head:
        raise ConfigError(f"model.tiny.n_embd ({p.model.tiny.n_embd}) must be divisible by model.tiny.n_head")
    # Both paths are deps of dvc.yaml whatever the source (DVC deps cannot be conditional): never empty.
    if p.eval.judge == "rules" and p.data.source != "synthetic":
        raise ConfigError(f"eval.judge: rules is the synthetic task's scorer; data.source {p.data.source} has no "
                          "rules: set eval.judge: auto, model, trained or none")
    if p.eval.judge == "trained" and p.data.sizes.judge_train < 2:
        raise ConfigError("eval.judge: trained learns from the judge_train split: set data.sizes.judge_train "
                          f"(now {p.data.sizes.judge_train}) to the number of pairs, e.g. 5000")
    if p.data.labels == "judge" and p.eval.judge == "none":
        raise ConfigError("data.labels: judge orders the reward-model pairs by the gold judge, and eval.judge is "
                          "none: set eval.judge (auto, rules, model or trained) or data.labels: human")
    if not p.eval.judge_path.strip():
        raise ConfigError(f"eval.judge_path must be set (a judge folder for eval.judge_source local; else keep the "
                          f"default {LOCAL_MODEL_DIR}): dvc.yaml's judge stage depends on it")
    if not p.data.jsonl_path.strip():
        raise ConfigError(f"data.jsonl_path must be set (a JSONL file for data.source jsonl; else keep the default "
                          f"{LOCAL_DATA_DIR}): dvc.yaml's prepare stage depends on it")
    if not p.model.local_path.strip():
        raise ConfigError(f"model.local_path must be set (a model folder for model.source local; else keep the "
                          f"default {LOCAL_MODEL_DIR}): dvc.yaml's base stage depends on it")
    local = Path(p.model.local_path)
    if not local.is_absolute() and any(local == Path(d) or Path(d) in local.parents for d in PIPELINE_MODEL_DIRS):
        raise ConfigError(f"model.local_path ({p.model.local_path}) is inside a folder the pipeline writes; copy "
                          f"the model to {LOCAL_MODEL_DIR}/<name> and point model.local_path there")
    if p.model.source == "tiny" and p.data.source != "synthetic" and p.model.tiny.vocab_size < 256:
        raise ConfigError(f"model.tiny.vocab_size must be >= 256 for real text (data.source: {p.data.source}); "
                          "the byte-level tokenizer needs 256 symbols before any merge")


def parse_params(raw: Any) -> Params:
    """Validate a params mapping (as loaded from YAML) and return typed Params."""
    if not isinstance(raw, dict):
        raise ConfigError(f"params must be a mapping at the top level (got {type(raw).__name__})")
    params = _build(Params, raw)
    _check_cross_field(params)
    return params


def load_params(path: str | Path = "params.yaml", overrides: dict | None = None) -> Params:
    """Read, merge `overrides` into, and validate params.yaml."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path} not found: run from the project root (or the .smoke copy)")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {str(exc).splitlines()[0]}") from exc
    if overrides:
        raw = deep_merge(raw, overrides)
    return parse_params(raw)


def load_precision_stage(description: str, argv: list[str] | None = None) -> tuple[str, Params]:
    """For the per-precision stages (reward@P, ppo@P): the precision argument and the validated params;
    a precision not in reward.precisions is a ConfigError."""
    import argparse

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("precision")
    precision = parser.parse_args(argv).precision
    params = load_params()
    if precision not in PRECISIONS or precision not in params.reward.precisions:
        raise ConfigError(f"precision {precision!r} is not in reward.precisions "
                          f"({', '.join(params.reward.precisions)})")
    return precision, params


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """{"ppo": {"init_kl_coef": 0.1}} -> {"ppo.init_kl_coef": 0.1}: params or metrics as dotted keys; lists stay
    values."""
    if not isinstance(obj, dict):
        return {prefix: obj}
    return {k: v for key, value in obj.items() for k, v in flatten(value, f"{prefix}.{key}" if prefix else key).items()}


def deep_merge(base: dict, override: dict) -> dict:
    """Return `base` with `override` merged in, recursively for mappings."""
    out = dict(base)
    for key, val in override.items():
        if isinstance(val, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], val)
        else:
            out[key] = val
    return out


def to_dict(params: Any) -> dict:
    """Params (or a section) as plain YAML-able dicts, e.g. for model cards and saved runs."""
    return dataclasses.asdict(params)


def check_main(argv: list[str] | None = None) -> int:
    """`python -m edgerlhf.config check [params.yaml]`: the preflight `make all` runs before `dvc repro`.

    DVC reads the params each stage lists before any stage runs, so a misspelled key there surfaces as DVC's
    "Parameters 'reward.learning_rate' are missing", which names the key it looked for, not the typo. This
    validates the whole file as every stage does (`load_params`) and names the typo and the closest valid key:
    one line on stderr and exit code 2 (ConfigError), or "<file>: valid" and 0."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m edgerlhf.config",
                                     description="Validate params.yaml before DVC runs (unknown keys, types, ranges).")
    parser.add_argument("command", choices=["check"])
    parser.add_argument("path", nargs="?", default="params.yaml")
    args = parser.parse_args(argv)
    try:
        load_params(args.path)
    except ConfigError as exc:
        where = "" if str(exc).startswith(str(args.path)) else f"{args.path}: "
        print(f"error [params]: {where}{exc}", file=sys.stderr)
        return exc.exit_code
    print(f"{args.path}: valid")
    return 0


if __name__ == "__main__":
    sys.exit(check_main())
