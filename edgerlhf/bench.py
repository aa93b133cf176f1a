"""Performance benchmark: speed and memory of every training stage at real model shapes (`make bench`).

    python -m edgerlhf.bench             # full size on a GPU (every stage under the 8 GB cap), reduced on CPU
    python -m edgerlhf.bench --reduced   # CPU-sized shapes and workloads (≤ 3 minutes on 2 cores)
    python -m edgerlhf.bench --full      # the real shapes even on CPU (slow)

Models are random-initialised from configs (no download) at the shapes of distilgpt2 and Qwen2.5-0.5B, saved
once to a temporary folder and loaded from there with the pipeline's own loaders (`edgerlhf.modeling`), so the
reward models are quantized by bitsandbytes exactly as the reward stage does. Per shape it measures:

- sft: LoRA training tokens/s (plain loop: the params' LoRA, batch size, accumulation, gradient checkpointing);
- reward@P: the sequence classifier at P (bf16 / int8 / int4), LoRA + score head, Bradley-Terry steps: tokens/s,
  and the loaded model's footprint (`get_memory_footprint`);
- ppo@P: the policy (shared backbone: policy = LoRA on, reference = LoRA off, value head) with the RM at P:
  rollout tokens/s and episodes/s (`ppo.generate_responses`), the scoring forwards (log-probs, reference
  log-probs, RM), one minibatch update with the clipped losses; the memory breakdown (base weights, adapters,
  optimizer state, gradients, activations, RM);
- the same PPO measurement with a separate full reference copy instead of the disabled adapter: the memory the
  shared-backbone design saves;
- ppo@P's periodic gold evaluation: with PPO's models still loaded (after the update, as in the real stage), one
  scoring pass of the gold judge through `edgerlhf.judge.ModelJudge` itself (load, tokenize with its chat
  template, score in batches of eval.judge_batch_size, free) on a random-initialised 1-logit Qwen3 sequence
  classifier of the default judge's shape (Skywork-Reward-V2-Qwen3-0.6B; reduced on CPU): its load+score time,
  the pass's peak VRAM and whether the stage's peak with it stays under hardware.vram_budget_gb.

Peak VRAM is `torch.cuda.max_memory_allocated` under the `hardware.vram_budget_gb` cap (0.0 on CPU). A
measurement that runs out of memory under the cap is recorded with `oom: 1` and the peak it reached; the run
goes on. Every number in metrics/bench.json is measured by this run, or computed from measured byte counts and
times; descriptive strings (device, versions, command) go to the info file next to it.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import logging
import math
import platform
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from edgerlhf import modeling, ppo, precisions, runtime
from edgerlhf.config import DEFAULT_JUDGE, PRECISIONS, HardwareParams, Params, load_params
from edgerlhf.modeling import Device

log = logging.getLogger("edgerlhf")

MIB = 2**20
GIB = 2**30
DEVICE_CODES = {"cpu": 0, "cuda": 1}


# =========================================================================== shapes and workloads


@dataclass(frozen=True)
class ShapeSpec:
    """A causal LM architecture at a given size (random-initialised: only the shape matters here)."""

    name: str
    arch: str  # "gpt2" or "qwen2"
    n_layer: int
    hidden: int
    n_head: int
    n_kv_head: int
    intermediate: int
    vocab: int
    max_positions: int
    eos_token_id: int
    head_dim: int = 0  # per attention head; 0: hidden / n_head (Qwen3 sets it apart: 16 x 128 > 1024 dims)

    @property
    def key(self) -> str:
        """The shape's key in bench.json (no dots: DVC flattens nested metrics with '.')."""
        return self.name.replace(".", "_")

    def reduced(self) -> ShapeSpec:
        """A CPU-sized model of the same architecture: 2 layers, 128 dims, 4 heads (grouped-query attention kept
        as 4 query / 2 key-value heads where the shape has it), the MLP/hidden ratio kept, a 4096-token vocabulary;
        an explicit head_dim keeps its ratio of attention width (heads x head_dim) to hidden size."""
        hidden, n_head = 128, 4
        n_kv = n_head if self.n_kv_head == self.n_head else 2
        inter = max(64, round(self.intermediate / self.hidden * hidden / 64) * 64)
        head_dim = round(self.head_dim * self.n_head / self.hidden * hidden / n_head) if self.head_dim else 0
        return replace(self, n_layer=2, hidden=hidden, n_head=n_head, n_kv_head=n_kv, intermediate=inter,
                       vocab=4096, max_positions=256, eos_token_id=4095, head_dim=head_dim)

    def config(self) -> Any:
        """The transformers config of this shape (pad = eos, as in the GPT-2 family and Qwen's base tokenizer)."""
        from transformers import GPT2Config, Qwen2Config, Qwen3Config

        ids = {"bos_token_id": self.eos_token_id, "eos_token_id": self.eos_token_id, "pad_token_id": self.eos_token_id}
        if self.arch == "gpt2":
            return GPT2Config(vocab_size=self.vocab, n_positions=self.max_positions, n_embd=self.hidden,
                              n_layer=self.n_layer, n_head=self.n_head, n_inner=self.intermediate, **ids)
        if self.arch == "qwen2":
            return Qwen2Config(vocab_size=self.vocab, hidden_size=self.hidden, intermediate_size=self.intermediate,
                               num_hidden_layers=self.n_layer, num_attention_heads=self.n_head,
                               num_key_value_heads=self.n_kv_head, max_position_embeddings=self.max_positions,
                               tie_word_embeddings=True, rope_theta=1e6, rms_norm_eps=1e-6, use_sliding_window=False,
                               **ids)
        if self.arch == "qwen3":
            return Qwen3Config(vocab_size=self.vocab, hidden_size=self.hidden, intermediate_size=self.intermediate,
                               num_hidden_layers=self.n_layer, num_attention_heads=self.n_head,
                               num_key_value_heads=self.n_kv_head, head_dim=self.head_dim or self.hidden // self.n_head,
                               max_position_embeddings=self.max_positions, tie_word_embeddings=True, rope_theta=1e6,
                               rms_norm_eps=1e-6, use_sliding_window=False, **ids)
        raise ValueError(f"unknown arch {self.arch!r}")

    def numbers(self) -> dict[str, int]:
        """The shape as numbers for bench.json."""
        return {"n_layer": self.n_layer, "hidden": self.hidden, "n_head": self.n_head, "n_kv_head": self.n_kv_head,
                "intermediate": self.intermediate, "vocab": self.vocab, "max_positions": self.max_positions,
                "head_dim": self.head_dim or self.hidden // self.n_head}


SHAPES: dict[str, ShapeSpec] = {
    # distilgpt2: GPT-2 with 6 layers (the MLP is 4 x n_embd)
    "distilgpt2": ShapeSpec("distilgpt2", "gpt2", n_layer=6, hidden=768, n_head=12, n_kv_head=12, intermediate=3072,
                            vocab=50257, max_positions=1024, eos_token_id=50256),
    # Qwen2.5-0.5B: 24 layers, GQA 14 query / 2 key-value heads, tied embeddings, <|endoftext|> = 151643
    "qwen2.5-0.5b": ShapeSpec("qwen2.5-0.5b", "qwen2", n_layer=24, hidden=896, n_head=14, n_kv_head=2,
                              intermediate=4864, vocab=151936, max_positions=32768, eos_token_id=151643),
}

# The default gold judge (eval.judge_model, Skywork/Skywork-Reward-V2-Qwen3-0.6B): a Qwen3ForSequenceClassification
# with one score output at the Qwen3-0.6B shape: 28 layers, 1024 dims, GQA 16 query / 8 key-value heads of 128
# dims, MLP 3072, tied embeddings, <|im_end|> = 151645. Random-initialised like the policy shapes.
JUDGE_SHAPE = ShapeSpec("skywork-reward-v2-qwen3-0.6b", "qwen3", n_layer=28, hidden=1024, n_head=16, n_kv_head=8,
                        intermediate=3072, vocab=151936, max_positions=40960, eos_token_id=151645, head_dim=128)


@dataclass(frozen=True)
class Workload:
    """Batch sizes and sequence lengths of the measurements. Full size: those of the params (params.yaml, the
    real profile: the seed's batch sizes, max_length 512, PPO batch 32 / micro-batch 2 / response 64) and a PPO
    prompt of 128 tokens (HH-RLHF prompts are capped at data.max_prompt_chars = 1024 characters, roughly 250
    tokens; most are far shorter). The gold-evaluation pass scores ppo.eval_prompts dialogues in batches of
    eval.judge_batch_size, cut to eval.judge_max_length, whose prompts spread from a quarter of judge_prompt_len up
    to it (data.max_prompt_chars / 4 tokens: the longest prompt the data keeps) and whose responses are
    response_len tokens. Reduced: small fixed sizes for CPU."""

    sft_batch: int
    sft_seq: int
    sft_accum: int
    rm_pairs: int
    rm_seq: int
    rm_accum: int
    ppo_batch: int
    prompt_len: int
    response_len: int
    ppo_mini_batch: int
    ppo_accum: int
    ppo_epochs: int
    logprob_chunk: int
    eval_prompts: int
    judge_prompt_len: int
    judge_batch: int
    judge_max_length: int

    @classmethod
    def full(cls, params: Params) -> Workload:
        return cls(sft_batch=params.sft.per_device_train_batch_size, sft_seq=params.sft.max_length,
                   sft_accum=params.sft.gradient_accumulation_steps, rm_pairs=params.reward.per_device_train_batch_size,
                   rm_seq=params.reward.max_length, rm_accum=params.reward.gradient_accumulation_steps,
                   ppo_batch=params.ppo.batch_size, prompt_len=128, response_len=params.ppo.response_length,
                   ppo_mini_batch=params.ppo.mini_batch_size, ppo_accum=params.ppo.gradient_accumulation_steps,
                   ppo_epochs=params.ppo.ppo_epochs, logprob_chunk=params.ppo.logprob_chunk_size,
                   eval_prompts=params.ppo.eval_prompts, judge_prompt_len=max(4, params.data.max_prompt_chars // 4),
                   judge_batch=params.eval.judge_batch_size, judge_max_length=params.eval.judge_max_length)

    @classmethod
    def reduced(cls, params: Params) -> Workload:
        return cls(sft_batch=2, sft_seq=64, sft_accum=1, rm_pairs=2, rm_seq=64, rm_accum=1, ppo_batch=8,
                   prompt_len=16, response_len=16, ppo_mini_batch=2, ppo_accum=2, ppo_epochs=params.ppo.ppo_epochs,
                   logprob_chunk=params.ppo.logprob_chunk_size, eval_prompts=8, judge_prompt_len=32, judge_batch=4,
                   judge_max_length=params.eval.judge_max_length)

    def ppo_params(self, params: Params) -> Any:
        """PPOParams of the benchmark: the real profile's, with this workload's batch and lengths."""
        return replace(params.ppo, batch_size=self.ppo_batch, mini_batch_size=self.ppo_mini_batch,
                       gradient_accumulation_steps=self.ppo_accum, response_length=self.response_len,
                       logprob_chunk_size=self.logprob_chunk, ppo_epochs=self.ppo_epochs)


# =========================================================================== memory and timing helpers


def sync(device: Device) -> None:
    """Wait for queued GPU work, so wall-clock times cover it."""
    if device.type == "cuda":
        torch.cuda.synchronize()


def reset_peak(device: Device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()


def peak_bytes(device: Device) -> int:
    """torch.cuda.max_memory_allocated since the last reset; 0 on CPU (no allocator statistics there)."""
    return int(torch.cuda.max_memory_allocated()) if device.type == "cuda" else 0


def peak_reserved_bytes(device: Device) -> int:
    return int(torch.cuda.max_memory_reserved()) if device.type == "cuda" else 0


def allocated_bytes(device: Device) -> int:
    """Bytes the CUDA caching allocator has handed out now; 0 on CPU."""
    return int(torch.cuda.memory_allocated()) if device.type == "cuda" else 0


def tensor_bytes(tensors: Iterator[Tensor] | Sequence[Tensor]) -> int:
    """Bytes of the distinct storages behind `tensors` (a tied or shared weight counts once)."""
    seen: dict[int, int] = {}
    for t in tensors:
        if t is None or t.device.type == "meta":
            continue
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def module_bytes(module: nn.Module, *, trainable: bool | None = None) -> int:
    """Bytes of a module's parameters (only the trainable or frozen ones when `trainable` is set) and, unless
    only trainable ones are asked for, its buffers."""
    tensors = [p for p in module.parameters() if trainable is None or p.requires_grad == trainable]
    if not trainable:
        tensors += list(module.buffers())
    return tensor_bytes(tensors)


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the optimizer's state tensors (AdamW: exp_avg and exp_avg_sq per trainable parameter)."""
    return tensor_bytes([v for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v)])


class PeakMeter:
    """The peak of CUDA memory over a measurement made of sections, each with its own peak above its start."""

    def __init__(self, device: Device) -> None:
        self.device, self.overall, self.overall_reserved = device, 0, 0
        reset_peak(device)

    def section(self) -> int:
        """Start a section: fold the running peak into the overall one, reset it; returns the bytes allocated now."""
        self.overall = max(self.overall, peak_bytes(self.device))
        self.overall_reserved = max(self.overall_reserved, peak_reserved_bytes(self.device))
        reset_peak(self.device)
        return allocated_bytes(self.device)

    def above(self, start: int) -> int:
        """How far this section's peak rose above `start` bytes (0 on CPU)."""
        return max(0, peak_bytes(self.device) - start)

    def peak(self) -> int:
        return max(self.overall, peak_bytes(self.device))

    def peak_reserved(self) -> int:
        return max(self.overall_reserved, peak_reserved_bytes(self.device))


def free_memory(device: Device) -> None:
    """Drop what the last measurement left: Python garbage and the CUDA allocator's cached blocks."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def timed(device: Device, fn: Callable[[], Any]) -> tuple[Any, float]:
    """(fn(), seconds), with the GPU synchronised before and after."""
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - start


def autocast(device: Device) -> contextlib.AbstractContextManager:
    """Mixed precision as the Trainer's bf16/fp16 flags give it (the dtype rule: on GPU; fp32 on CPU)."""
    if device.dtype != torch.float32:
        return torch.autocast(device.type, dtype=device.dtype)
    return contextlib.nullcontext()


def lora_config(model: nn.Module, task_type: str, params: Params, **extra: Any) -> Any:
    """params.lora (on the model's default targets) as the stages build it."""
    lp = params.lora
    return modeling.lora_config(model, task_type, lp.r, lp.alpha, lp.dropout,
                                modeling.lora_targets(model, lp.target_modules), **extra)


def random_ids(rows: int, length: int, spec: ShapeSpec, device: Device, generator: torch.Generator) -> Tensor:
    """Token ids below the EOS id (so no row ends early or looks padded)."""
    return torch.randint(0, spec.eos_token_id, (rows, length), generator=generator).to(device.torch_device)


def is_oom(exc: BaseException) -> bool:
    return type(exc).__name__ == "OutOfMemoryError" or "out of memory" in str(exc).lower()


def _round(x: float, digits: int = 4) -> float:
    return round(float(x), digits) if math.isfinite(x) else 0.0


def _vram(device: Device) -> dict[str, float]:
    return {"peak_vram_gb": _round(peak_bytes(device) / GIB), "peak_vram_reserved_gb":
            _round(peak_reserved_bytes(device) / GIB)}


# =========================================================================== measurements


@dataclass
class Context:
    """What every measurement of one shape needs."""

    spec: ShapeSpec
    base_dir: Path
    device: Device
    params: Params
    work: Workload
    steps: int
    seed: int
    judge_dir: Path | None = None  # the random-init judge folder (build_judge); None: no gold-evaluation pass

    def generator(self, salt: int) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed * 1000 + salt)


def _train_steps(ctx: Context, model: nn.Module, micro_batch: Callable[[], tuple[Tensor, int]], accum: int,
                 lr: float, weight_decay: float) -> dict[str, float]:
    """One untimed warm-up optimizer step, then ctx.steps timed ones. A step = `accum` micro-batches
    (`micro_batch()` runs a forward and returns its loss and token count; the loss is divided by `accum` and
    back-propagated, through a GradScaler in fp16), gradient clipping at 1.0 (the Trainer's default) and AdamW.
    Returns tokens/s, seconds per step and the optimizer's state bytes."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=weight_decay)
    scaler = torch.amp.GradScaler("cuda") if ctx.device.dtype == torch.float16 else None
    model.train()

    def step() -> int:
        tokens = 0
        for _ in range(accum):
            loss, n = micro_batch()
            loss = loss / accum
            (scaler.scale(loss) if scaler is not None else loss).backward()
            tokens += n
        if scaler is not None:
            scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return tokens

    step()  # warm-up: kernels, allocator, optimizer state
    seconds, tokens = 0.0, 0
    for _ in range(ctx.steps):
        n, dt = timed(ctx.device, step)
        tokens += n
        seconds += dt
    return {"tokens_per_s": _round(tokens / seconds, 2), "step_s": _round(seconds / ctx.steps),
            "optimizer_state_bytes": optimizer_state_bytes(optimizer)}


def measure_sft(ctx: Context) -> dict[str, float]:
    """LoRA SFT training throughput: the causal LM in the compute dtype, params.lora on the attention + MLP
    projections, params.sft gradient checkpointing, causal-LM loss on random tokens."""
    from peft import get_peft_model

    device, w, sp = ctx.device, ctx.work, ctx.params.sft
    reset_peak(device)
    model = modeling.load_causal_lm(ctx.base_dir, device)
    model.config.use_cache = False
    if sp.gradient_checkpointing:
        modeling.enable_checkpointing(model)
    model = get_peft_model(model, lora_config(model, "CAUSAL_LM", ctx.params))
    modeling.align_trainable_dtype(model, torch.float32)
    trainable, total = modeling.count_params(model)
    gen = ctx.generator(1)
    batches = [random_ids(w.sft_batch, w.sft_seq, ctx.spec, device, gen) for _ in range(4)]
    counter = iter(range(1 << 30))

    def micro_batch() -> tuple[Tensor, int]:
        ids = batches[next(counter) % len(batches)]
        with autocast(device):
            loss = model(input_ids=ids, labels=ids).loss
        return loss, ids.numel()

    out = _train_steps(ctx, model, micro_batch, w.sft_accum, sp.learning_rate, sp.weight_decay)
    result = {**out, **_vram(device), "trainable_params": trainable, "total_params": total,
              "tokens_per_step": w.sft_batch * w.sft_seq * w.sft_accum}
    return result


def load_reward_model(ctx: Context, precision: str, *, train: bool) -> tuple[nn.Module, int]:
    """The sequence classifier at `precision` (bitsandbytes quantizes it on load) with params.lora + a score head
    (SEQ_CLS, as the reward stage trains and PPO loads it), and its footprint in bytes before the adapter. `train`:
    trainable adapter and params.reward gradient checkpointing; else frozen and in eval mode."""
    from peft import get_peft_model

    rp = ctx.params.reward
    model = precisions.load_reward_base(ctx.base_dir, precision, ctx.device)
    if precision != "bf16" and not precisions.is_quantized(model, precision):
        raise RuntimeError(f"reward@{precision}: the loaded model has no bitsandbytes {precision} layers")
    footprint = int(model.get_memory_footprint())
    model.config.use_cache = False
    checkpointing = train and rp.gradient_checkpointing
    if checkpointing:
        modeling.enable_checkpointing(model)
    model = get_peft_model(model, lora_config(model, "SEQ_CLS", ctx.params, modules_to_save=["score"]))
    if not train:
        # frozen, as PPO loads the trained RM; the score head stays in the compute dtype (no autocast in PPO)
        model.eval()
        model.requires_grad_(False)
        return model, footprint
    if checkpointing:
        model.enable_input_require_grads()  # as TRL's RewardTrainer does for a PEFT model
    modeling.align_trainable_dtype(model, torch.float32)  # fp32 master weights, as the reward stage keeps them
    return model, footprint


def measure_reward(ctx: Context, precision: str) -> dict[str, float]:
    """Reward-model training throughput at `precision`: Bradley-Terry loss on (chosen, rejected) pairs of
    random tokens, LoRA + score head, as the reward stage trains (TRL's RewardTrainer) but in a plain loop."""
    device, w, rp = ctx.device, ctx.work, ctx.params.reward
    reset_peak(device)
    model, footprint = load_reward_model(ctx, precision, train=True)
    trainable, total = modeling.count_params(model)
    gen = ctx.generator(2)
    batches = [random_ids(2 * w.rm_pairs, w.rm_seq, ctx.spec, device, gen) for _ in range(4)]
    counter = iter(range(1 << 30))

    def micro_batch() -> tuple[Tensor, int]:
        ids = batches[next(counter) % len(batches)]
        with autocast(device):
            rewards = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.float().squeeze(-1)
        chosen, rejected = rewards[:w.rm_pairs], rewards[w.rm_pairs:]
        return -nn.functional.logsigmoid(chosen - rejected).mean(), ids.numel()

    out = _train_steps(ctx, model, micro_batch, w.rm_accum, rp.learning_rate, rp.weight_decay)
    result = {**out, **_vram(device), "footprint_bytes": footprint, "footprint_mb": _round(footprint / MIB, 3),
              "trainable_params": trainable, "tokens_per_step": 2 * w.rm_pairs * w.rm_seq * w.rm_accum}
    return result


@torch.no_grad()
def separate_reference_logprobs(reference: nn.Module, rollout: ppo.Rollout, temperature: float,
                                chunk_size: int) -> Tensor:
    """Reference log-probs [B, R] from a separate model copy (the benchmark-only variant), computed as
    `ppo.rollout_logprobs_values` does: `ppo.lm_forward` (fp32 head), logits / T, chunks of rows."""
    n = rollout.response.shape[1]
    input_ids, attention_mask = rollout.input_ids, rollout.attention_mask
    out = []
    for start in range(0, len(input_ids), chunk_size):
        rows = slice(start, start + chunk_size)
        logits, _ = ppo.lm_forward(reference, input_ids[rows], attention_mask[rows], n_last=n + 1)
        logits = logits[:, :-1] / temperature
        out.append(ppo.response_logprobs(logits, rollout.response[rows]))
        del logits
    return torch.cat(out)


def load_ppo_models(ctx: Context, precision: str, pp: Any, separate_reference: bool
                    ) -> tuple[ppo.PolicyWithValue, nn.Module | None, nn.Module, int, dict[str, int]]:
    """PPO's models as the ppo stage builds them (policy with value head, the frozen RM at `precision`), and
    optionally a separate reference copy; with the RM's footprint and the static memory breakdown."""
    base = modeling.load_causal_lm(ctx.base_dir, ctx.device)
    policy = ppo.build_policy(base, pp, modeling.lora_targets(base, ctx.params.lora.target_modules))
    reference = None
    if separate_reference:
        reference = modeling.load_causal_lm(ctx.base_dir, ctx.device)
        reference.eval()
        reference.requires_grad_(False)
    rm, rm_footprint = load_reward_model(ctx, precision, train=False)
    memory = {
        "base_weights_bytes": module_bytes(policy, trainable=False),
        "adapter_bytes": module_bytes(policy, trainable=True),
        "reference_copy_bytes": module_bytes(reference) if reference is not None else 0,
        "reward_model_bytes": int(rm.get_memory_footprint()),
    }
    memory["static_bytes"] = sum(memory.values())
    memory["static_allocated_bytes"] = allocated_bytes(ctx.device)
    return policy, reference, rm, rm_footprint, memory


def measure_ppo(ctx: Context, precision: str, *, separate_reference: bool = False) -> dict[str, Any]:
    """PPO at the RM `precision`, through the training loop's own steps: load the policy (shared backbone), the RM
    and optionally a separate reference copy; time `ppo.generate_responses` (the rollout) and `ppo.score_rollout`
    (log-prob/value, reference and RM forwards), then `ppo.compute_advantages` and `ppo.ppo_update` (untimed
    epochs over the batch until AdamW has its state, then timed epochs until at least ctx.steps minibatch steps
    are taken; `update_steps_timed` says how many). With ctx.judge_dir (shared backbone only), one periodic
    gold-evaluation pass follows with these models loaded (`measure_judge_pass`: `judge_pass`). Returns
    throughput, times and the memory breakdown."""
    device, w = ctx.device, ctx.work
    pp = w.ppo_params(ctx.params)
    eos = pad = ctx.spec.eos_token_id
    meter = PeakMeter(device)
    policy, reference, rm, rm_footprint, memory = load_ppo_models(ctx, precision, pp, separate_reference)
    score_fn = ppo.reward_model_score_fn(rm, pad, pp.logprob_chunk_size)

    # -- rollout: left-padded prompts of varied length, sampling as train_ppo configures it
    ppo.configure_sampling(policy, pp, eos, pad)
    gen = ctx.generator(3)
    lengths = torch.randint(max(1, w.prompt_len // 2), w.prompt_len + 1, (w.ppo_batch,), generator=gen).tolist()
    prompts = [torch.randint(0, eos, (n,), generator=gen).tolist() for n in lengths]
    query, query_mask = ppo.left_pad(prompts, pad, device.torch_device)
    torch.manual_seed(ctx.seed)
    before = meter.section()
    ro, gen_s = timed(device, lambda: ppo.generate_responses(policy, query, query_mask, eos, pad))

    def separate_ref(rollout: ppo.Rollout) -> Tensor:
        return separate_reference_logprobs(reference, rollout, pp.temperature, pp.logprob_chunk_size)

    # score statistics (0, 1): the normalisation is a scalar affine map, immaterial to time and memory
    batch, score_s = timed(device, lambda: ppo.score_rollout(policy, ro, score_fn, (0.0, 1.0), pp,
                                                             separate_ref if reference is not None else None))
    rollout_transient = meter.above(before)
    response_tokens = int(ro.response_mask.sum())
    adv = ppo.compute_advantages(batch, pp.init_kl_coef, pp)

    # -- update: ppo.ppo_update, one epoch (batch / minibatch optimizer steps) per call
    one_epoch = replace(pp, ppo_epochs=1)
    trainable = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=pp.learning_rate, eps=pp.adam_eps, weight_decay=0.0)
    scaler = torch.amp.GradScaler(device.type, enabled=device.dtype == torch.float16)
    shuffle = ctx.generator(4)
    minibatch = pp.mini_batch_size * pp.gradient_accumulation_steps
    per_epoch = w.ppo_batch // minibatch

    def epoch() -> None:
        ppo.ppo_update(policy, optimizer, scaler, batch, adv, one_epoch, shuffle)

    for _ in range(10):  # warm-up until AdamW has its state (under fp16 the GradScaler may skip the first steps)
        epoch()
        if optimizer.state:
            break
    gradients = memory["adapter_bytes"]  # not measured: every trainable (fp32) weight gets a gradient of its size
    update_s, activations, steps = 0.0, 0, 0
    while steps < ctx.steps:
        start = meter.section()
        _, dt = timed(device, epoch)
        update_s += dt
        steps += per_epoch
        # what the forward/backward held on top of weights, adapters and optimizer state, less the gradients
        activations = max(activations, meter.above(start) - gradients)
    update_s /= steps
    policy.eval()
    memory.update({
        "optimizer_state_bytes": optimizer_state_bytes(optimizer),
        "gradient_bytes": gradients,
        "activations_bytes": max(0, activations),
        "rollout_transient_bytes": rollout_transient,
        "activations_measured": 1 if device.type == "cuda" else 0,
    })
    peak = meter.peak()  # PPO's own steps; the gold-evaluation pass below is recorded apart, then combined
    update_est = gen_s + score_s + pp.ppo_epochs * per_epoch * update_s
    result = {
        "rollout_tokens_per_s": _round(response_tokens / gen_s, 2),
        "rollout_episodes_per_s": _round(w.ppo_batch / gen_s, 3),
        "rollout_s": _round(gen_s),
        "score_forward_s": _round(score_s),
        "update_minibatch_s": _round(update_s),
        "update_steps_timed": steps,
        "update_tokens_per_s": _round(minibatch * ro.input_ids.shape[1] / update_s, 2),
        # one PPO update (rollout + ppo_epochs passes over the batch), computed from the measured times
        "ppo_update_est_s": _round(update_est),
        "episodes_per_s_est": _round(w.ppo_batch / update_est, 3),
        "response_tokens": response_tokens,
        "peak_vram_gb": _round(peak / GIB),
        "peak_vram_reserved_gb": _round(meter.peak_reserved() / GIB),
        "rm_footprint_bytes": rm_footprint,
        "memory": memory,
    }
    if ctx.judge_dir is not None and not separate_reference:
        # the periodic gold evaluation happens between updates: policy, RM, AdamW state and the last batch stay
        result["judge_pass"] = measure_judge_pass(ctx, meter, peak)
    return result


JUDGE_WORDS = 4096  # the bench judge tokenizer's vocabulary (ids below every judge vocab: the reduced one is 4096)
JUDGE_TEMPLATE = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
                  "<|im_end|>\n{% endfor %}")  # ChatML, as Qwen3's template renders a finished dialogue


def build_judge_tokenizer(out_dir: Path) -> Any:
    """A word-level tokenizer with Qwen's ChatML specials and chat template, saved to `out_dir`: every word
    "w<i>" is one token, so a dialogue's length in judge tokens is exact (a byte-level BPE trained here would
    split random text unpredictably; the Qwen3 tokenizer cannot be downloaded). Ids stay below JUDGE_WORDS."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    words = [*specials, "system", "user", "assistant"]
    words += [f"w{i}" for i in range(JUDGE_WORDS - len(words))]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(specials)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   unk_token="<|endoftext|>")
    fast.chat_template = JUDGE_TEMPLATE
    fast.model_max_length = 1 << 20
    fast.save_pretrained(out_dir)
    return fast


def build_judge(spec: ShapeSpec, out_dir: Path, seed: int) -> int:
    """The gold judge at `spec`: a random-initialised (seeded) 1-logit sequence classifier saved as bf16
    safetensors (as the hub's Skywork judge ships) with `build_judge_tokenizer`'s tokenizer, its special ids in
    the config; checked as the judge stage checks a folder. Returns its parameter count."""
    from transformers import AutoModelForSequenceClassification

    from edgerlhf.judge import check_judge_folder

    tok = build_judge_tokenizer(out_dir)
    config = spec.config()
    config.num_labels = 1
    config.bos_token_id, config.eos_token_id, config.pad_token_id = None, tok.eos_token_id, tok.pad_token_id
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_config(config, dtype=torch.bfloat16)
    total = sum(p.numel() for p in model.parameters())
    model.save_pretrained(out_dir, safe_serialization=True)
    del model
    gc.collect()
    check_judge_folder(out_dir, "the benchmark's judge folder is incomplete")
    return total


def judge_dialogues(work: Workload, generator: torch.Generator) -> tuple[list[str], list[str]]:
    """work.eval_prompts HH-format dialogues of the judge tokenizer's words (one token each): one-turn prompts
    whose lengths spread evenly from a quarter of work.judge_prompt_len up to it, responses of work.response_len
    tokens (a response that ran to ppo.response_length)."""
    from edgerlhf.formats import ASSISTANT_MARKER, HUMAN_MARKER

    n, top = work.eval_prompts, work.judge_prompt_len
    low = max(1, top // 4)

    def words(k: int) -> str:
        return " ".join(f"w{i}" for i in torch.randint(0, JUDGE_WORDS - 8, (k,), generator=generator).tolist())

    prompts = [f"{HUMAN_MARKER} {words(low + round((top - low) * i / max(1, n - 1)))}{ASSISTANT_MARKER}"
               for i in range(n)]
    return prompts, [" " + words(work.response_len) for _ in range(n)]


def within_budget(peak: int, budget_gb: float, oom: int) -> int:
    """1 if a measurement that peaked at `peak` bytes stays under `budget_gb` (and did not run out of memory),
    0 if not; -1 when no cap applies (budget 0: CPU, or hardware.vram_budget_gb 0)."""
    if budget_gb <= 0:
        return -1
    return int(not oom and peak / GIB <= budget_gb)


def measure_judge_pass(ctx: Context, meter: PeakMeter, ppo_peak: int) -> dict[str, float]:
    """One periodic gold-evaluation pass with PPO's models loaded: `edgerlhf.judge.ModelJudge` (the stage's own
    judge: load from the folder in the judge dtype, encode with its chat template and left truncation, score in
    batches, free) on `judge_dialogues`. Records its time (load + tokenize + score), the pass's peak VRAM
    (everything allocated, PPO's models included), the stage's peak with it and whether that stays under
    hardware.vram_budget_gb (-1: no cap applies, on CPU or with budget 0). A pass that runs out of memory under
    the cap is recorded with oom 1 and does not fit."""
    from edgerlhf.judge import ModelJudge, encode

    device, w = ctx.device, ctx.work
    prompts, responses = judge_dialogues(w, ctx.generator(5))
    judge = ModelJudge(ctx.judge_dir, device, w.judge_batch, w.judge_max_length)
    ids, _ = encode(judge.tokenizer, prompts, responses, w.judge_max_length)
    meter.section()
    oom, scores, seconds = 0, [], 0.0
    try:
        scores, seconds = timed(device, lambda: judge(prompts, responses))
    except Exception as exc:  # noqa: BLE001 - only out-of-memory is recorded; anything else is re-raised
        if not is_oom(exc):
            raise
        oom = 1
        log.warning("bench: the gold-evaluation pass ran out of memory under the VRAM cap (peak %.2f GB)",
                    peak_bytes(device) / GIB)
    pass_peak = peak_bytes(device)
    if not oom and (len(scores) != len(prompts) or not all(math.isfinite(x) for x in scores)):
        raise RuntimeError(f"the judge returned {len(scores)} scores for {len(prompts)} dialogues, or non-finite ones")
    stage_peak = max(ppo_peak, pass_peak)
    within = within_budget(stage_peak, ctx.params.hardware.vram_budget_gb if device.type == "cuda" else 0.0, oom)
    free_memory(device)
    return {
        "load_score_s": _round(seconds),
        "dialogues": len(scores),
        "tokens": sum(len(x) for x in ids),
        "max_tokens": max(len(x) for x in ids),
        "truncated": judge.truncated,
        "pass_peak_vram_gb": _round(pass_peak / GIB),
        "stage_peak_vram_gb": _round(stage_peak / GIB),
        "within_budget": within,
        "oom": oom,
    }


# =========================================================================== the run


def build_base(spec: ShapeSpec, out_dir: Path, seed: int) -> int:
    """Random-initialise the shape's causal LM (seeded, fp32) and save it as safetensors; returns its size."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(spec.config(), dtype=torch.float32)
    total = sum(p.numel() for p in model.parameters())
    model.save_pretrained(out_dir, safe_serialization=True)
    del model
    gc.collect()
    return total


def _guard(device: Device, what: str, fn: Callable[[], dict]) -> dict:
    """Run one measurement. One that runs out of GPU memory under the cap is recorded (oom: 1 and its peak), one
    the GPU cannot run (int8 below compute capability 7.5) as unsupported: 1; anything else fails the run."""
    from edgerlhf.errors import HardwareError

    log.info("bench: %s ...", what)
    start = time.perf_counter()
    failed = {"oom": 0, "unsupported": 0}
    try:
        out = fn()
    except HardwareError as exc:
        log.warning("bench: %s skipped: %s", what, exc)
        out = {"unsupported": 1, "peak_vram_gb": 0.0}
    except Exception as exc:  # noqa: BLE001 - only out-of-memory is recorded; anything else is re-raised
        if not is_oom(exc):
            raise
        peak = peak_bytes(device) / GIB
        log.warning("bench: %s ran out of memory under the VRAM cap (peak %.2f GB)", what, peak)
        out = {"oom": 1, "peak_vram_gb": _round(peak)}
    out = {**failed, **out}
    free_memory(device)
    log.info("bench: %s done in %.1f s", what, time.perf_counter() - start)
    return out


def completed(result: dict) -> bool:
    """Whether a measurement ran (neither out of memory nor unsupported on this GPU)."""
    return not (result.get("oom") or result.get("unsupported"))


def bench_shape(spec: ShapeSpec, device: Device, params: Params, work: Workload, precisions: Sequence[str],
                steps: int, seed: int, workdir: Path, judge_dir: Path | None = None) -> dict[str, Any]:
    """Every measurement of one shape (see the module docstring); `judge_dir`: the judge (`build_judge`) whose
    gold-evaluation pass each shared-backbone PPO measurement includes."""
    base_dir = workdir / spec.key
    total = build_base(spec, base_dir, seed)
    log.info("bench: %s-shaped model, %.1f M params (%s)", spec.name, total / 1e6,
             ", ".join(f"{k}={v}" for k, v in spec.numbers().items()))
    ctx = Context(spec, base_dir, device, params, work, steps, seed, judge_dir)
    out: dict[str, Any] = {"shape": {**spec.numbers(), "total_params": total}, "workload": asdict(work)}
    out["sft"] = _guard(device, f"{spec.name} sft", lambda: measure_sft(ctx))
    out["reward"] = {p: _guard(device, f"{spec.name} reward@{p}", lambda p=p: measure_reward(ctx, p))
                     for p in precisions}
    out["ppo"] = {p: _guard(device, f"{spec.name} ppo@{p} (shared backbone)", lambda p=p: measure_ppo(ctx, p))
                  for p in precisions}
    out["ppo_separate_reference"] = {
        p: _guard(device, f"{spec.name} ppo@{p} (separate reference copy)",
                  lambda p=p: measure_ppo(ctx, p, separate_reference=True)) for p in precisions}
    out["reference_comparison"] = {p: compare_reference(out["ppo"][p], out["ppo_separate_reference"][p])
                                   for p in precisions}
    return out


def compare_reference(shared: dict, separate: dict) -> dict[str, float]:
    """Shared backbone (reference = adapter off) vs a separate full reference copy: static bytes, allocated
    bytes and peak VRAM of each, and what sharing saves."""
    if not (completed(shared) and completed(separate)):
        return {"shared_peak_vram_gb": shared["peak_vram_gb"], "separate_peak_vram_gb": separate["peak_vram_gb"],
                "complete": 0}
    s, d = shared["memory"], separate["memory"]
    return {
        "shared_static_bytes": s["static_bytes"], "separate_static_bytes": d["static_bytes"],
        "static_saving_bytes": d["static_bytes"] - s["static_bytes"],
        "shared_static_allocated_bytes": s["static_allocated_bytes"],
        "separate_static_allocated_bytes": d["static_allocated_bytes"],
        "shared_peak_vram_gb": shared["peak_vram_gb"], "separate_peak_vram_gb": separate["peak_vram_gb"],
        "peak_saving_gb": _round(separate["peak_vram_gb"] - shared["peak_vram_gb"]),
        "complete": 1,
    }


def _mib(x: float | None) -> str:
    return "-" if x is None else f"{x / MIB:.1f}"


def _num(x: Any, fmt: str = ".1f") -> str:
    return "-" if x is None else format(x, fmt)


def _peak(m: dict) -> str:
    status = " OOM" if m.get("oom") else " unsupported" if m.get("unsupported") else ""
    return _num(m.get("peak_vram_gb"), ".3f") + status


def _budget(within: int) -> str:
    return {1: "yes", 0: "NO", -1: "n/a (no cap)"}.get(within, "-")


def tables(results: dict[str, Any], shapes: Sequence[ShapeSpec]) -> str:
    """Three tabulate tables: throughput and peak VRAM per stage, the PPO memory breakdown, and PPO with its
    periodic gold evaluation (the judge pass)."""
    from tabulate import tabulate

    speed, memory, gold = [], [], []
    for spec in shapes:
        r = results["shapes"][spec.key]
        sft = r["sft"]
        speed.append([spec.name, "sft (LoRA)", "", _num(sft.get("tokens_per_s")), "", _num(sft.get("step_s"), ".3f"),
                      _peak(sft)])
        for p, m in r["reward"].items():
            speed.append([spec.name, "reward", p, _num(m.get("tokens_per_s")), "", _num(m.get("step_s"), ".3f"),
                          _peak(m)])
        for p, m in r["ppo"].items():
            speed.append([spec.name, "ppo rollout", p, _num(m.get("rollout_tokens_per_s")),
                          _num(m.get("rollout_episodes_per_s"), ".2f"), _num(m.get("rollout_s"), ".3f"), _peak(m)])
            speed.append([spec.name, "ppo update (minibatch)", p, _num(m.get("update_tokens_per_s")),
                          _num(m.get("episodes_per_s_est"), ".2f"), _num(m.get("update_minibatch_s"), ".3f"), ""])
        for p, m in r["ppo"].items():
            if not completed(m):
                continue
            mem, ref = m["memory"], r["reference_comparison"][p]
            sep = r["ppo_separate_reference"][p].get("memory", {})
            memory.append([spec.name, p, _mib(mem["base_weights_bytes"]), _mib(mem["adapter_bytes"]),
                           _mib(mem["optimizer_state_bytes"]), _mib(mem["gradient_bytes"]),
                           _mib(mem["activations_bytes"]) if mem["activations_measured"] else "n/a (CPU)",
                           _mib(mem["reward_model_bytes"]), _mib(mem["static_bytes"]), _mib(sep.get("static_bytes")),
                           f"{_num(ref.get('shared_peak_vram_gb'), '.3f')} / "
                           f"{_num(ref.get('separate_peak_vram_gb'), '.3f')}"])
        for p, m in r["ppo"].items():
            j = m.get("judge_pass")
            if j is None:
                continue
            gold.append([spec.name, p, _num(j["load_score_s"], ".3f"), j["dialogues"],
                         f"{j['tokens']} / {j['max_tokens']}", _num(j["pass_peak_vram_gb"], ".3f")
                         + (" OOM" if j["oom"] else ""), _peak(m), _num(j["stage_peak_vram_gb"], ".3f"),
                         _budget(j["within_budget"])])
    out = tabulate(speed, headers=["shape", "stage", "RM precision", "tokens/s", "episodes/s", "s/step",
                                   "peak VRAM (GB)"], tablefmt="github")
    out += ("\n\nPPO memory in MiB (static = base weights + adapters + RM [+ reference copy]; the update row's "
            "episodes/s is the estimate for whole PPO updates)\n")
    out += tabulate(memory, headers=["shape", "RM", "base weights", "adapters", "optimizer", "gradients",
                                     "activations", "RM (+LoRA)", "static, shared ref", "static, separate ref",
                                     "peak GB shared / separate"], tablefmt="github")
    if gold:
        judge = results.get("judge", {}).get("shape", {})
        size = _num(judge.get("total_params", 0) / 1e6)
        out += (f"\n\nPPO with one periodic gold evaluation: the judge (Qwen3 sequence classifier, "
                f"{judge.get('n_layer')} layers x {judge.get('hidden')} dims, {size} M params) loaded, "
                f"scoring and freed through ModelJudge with PPO's models in memory; budget "
                f"{results.get('vram_budget_gb', 0.0):g} GB (0: none)\n")
        out += tabulate(gold, headers=["shape", "RM", "judge load+score (s)", "dialogues", "tokens / longest",
                                       "judge pass peak (GB)", "PPO peak (GB)", "stage peak with judge (GB)",
                                       "under budget"], tablefmt="github")
    return out


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m edgerlhf.bench", description=__doc__.split("\n\n")[0])
    size = ap.add_mutually_exclusive_group()
    size.add_argument("--reduced", action="store_true", default=None,
                      help="CPU-sized shapes and workloads (≤ 3 minutes on 2 cores); the default without a GPU")
    size.add_argument("--full", dest="reduced", action="store_false",
                      help="the real shapes and the params' batch sizes even on CPU (slow); the default on a GPU")
    ap.add_argument("--shapes", default=",".join(SHAPES), help=f"comma-separated, of: {', '.join(SHAPES)}")
    ap.add_argument("--precisions", default=",".join(PRECISIONS), help="reward-model precisions: bf16,int8,int4")
    ap.add_argument("--out", default="metrics/bench.json", help="numbers (DVC metrics format)")
    ap.add_argument("--info", default=None, help="descriptive strings (default: <out stem>_info.json)")
    ap.add_argument("--steps", type=int, default=None, help="timed optimizer steps per measurement "
                                                             "(default 3)")
    ap.add_argument("--params", default="params.yaml",
                    help="hyperparameters (LoRA, batch sizes, lengths, hardware); the defaults if the file is absent")
    ap.add_argument("--device", default=None, choices=["auto", "cpu", "cuda"], help="default: hardware.device")
    ap.add_argument("--vram-budget-gb", type=float, default=None,
                    help=f"the VRAM cap on CUDA, 0: none (default: hardware.vram_budget_gb, "
                         f"{HardwareParams().vram_budget_gb:g} unless params say otherwise)")
    ap.add_argument("--seed", type=int, default=0)
    argv = list(sys.argv[1:] if argv is None else argv)
    args = ap.parse_args(argv)
    args.argv = argv
    args.shapes = [s.strip() for s in args.shapes.split(",") if s.strip()]
    args.precisions = [s.strip() for s in args.precisions.split(",") if s.strip()]
    for s in args.shapes:
        if s not in SHAPES:
            ap.error(f"unknown shape {s!r} (choose from {', '.join(SHAPES)})")
    for p in args.precisions:
        if p not in PRECISIONS:
            ap.error(f"unknown precision {p!r} (choose from {', '.join(PRECISIONS)})")
    if args.steps is None:
        args.steps = 3
    if args.steps < 1:
        ap.error("--steps must be >= 1")
    return args


def run(args: argparse.Namespace) -> dict[str, Any]:
    """The whole benchmark; writes the metrics and info files and returns the metrics."""
    import bitsandbytes
    import peft
    import transformers

    start = time.perf_counter()
    params = load_params(args.params) if Path(args.params).exists() else Params()
    log.info("bench: hyperparameters from %s", args.params if Path(args.params).exists() else "the defaults "
             "(the real profile)")
    hardware = replace(params.hardware, **{k: v for k, v in (("device", args.device),
                                                             ("vram_budget_gb", args.vram_budget_gb)) if v is not None})
    args.vram_budget_gb = hardware.vram_budget_gb
    params = replace(params, hardware=hardware)  # the measurements compare peaks with the budget in effect
    device = modeling.resolve_device(hardware)
    if args.reduced is None:
        args.reduced = device.type == "cpu"
        log.info("bench: %s, so %s size (--full / --reduced choose)", "no GPU" if args.reduced else "a GPU",
                 "reduced" if args.reduced else "full")
    log.info("bench: %s, %s run, shapes %s, reward precisions %s, %d timed step(s) per measurement",
             device.describe(), "reduced" if args.reduced else "full-size", ",".join(args.shapes),
             ",".join(args.precisions), args.steps)
    work = Workload.reduced(params) if args.reduced else Workload.full(params)
    specs = [SHAPES[s].reduced() if args.reduced else SHAPES[s] for s in args.shapes]
    judge_spec = JUDGE_SHAPE.reduced() if args.reduced else JUDGE_SHAPE
    runtime.seed_everything(args.seed)
    results: dict[str, Any] = {
        "device": DEVICE_CODES[device.type], "reduced": int(args.reduced), "steps": args.steps,
        "vram_budget_gb": args.vram_budget_gb if device.type == "cuda" else 0.0}
    with tempfile.TemporaryDirectory(prefix="edgerlhf-bench-") as tmp:
        judge_dir = Path(tmp) / "judge"
        judge_params = build_judge(judge_spec, judge_dir, args.seed)
        log.info("bench: gold judge of the %s shape, %.1f M params (%s)", judge_spec.name, judge_params / 1e6,
                 ", ".join(f"{k}={v}" for k, v in judge_spec.numbers().items()))
        results["judge"] = {"shape": {**judge_spec.numbers(), "total_params": judge_params}}
        results["shapes"] = {}
        for spec in specs:
            results["shapes"][spec.key] = bench_shape(spec, device, params, work, args.precisions, args.steps,
                                                      args.seed, Path(tmp), judge_dir)
    results["wall_time_s"] = _round(time.perf_counter() - start, 2)
    runtime.write_json(args.out, results)
    info_path = Path(args.info) if args.info else Path(args.out).with_name(Path(args.out).stem + "_info.json")
    runtime.write_json(info_path, {
        "command": " ".join(["python -m edgerlhf.bench", *args.argv]),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": device.describe(), "device_codes": DEVICE_CODES, "compute_dtype": device.dtype_name,
        "gpu_total_gb": round(torch.cuda.get_device_properties(0).total_memory / GIB, 2) if device.type == "cuda"
        else 0.0,
        "shapes": {spec.key: spec.name for spec in specs}, "precisions": args.precisions,
        "judge": f"random-initialised {DEFAULT_JUDGE} shape ({JUDGE_SHAPE.arch} sequence classifier, num_labels 1)"
                 + (", reduced for CPU" if args.reduced else "") + "; a word-level tokenizer with ChatML specials",
        "params": args.params if Path(args.params).exists() else "defaults",
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__, "peft": peft.__version__,
                     "bitsandbytes": bitsandbytes.__version__},
        "notes": [
            "random-initialised models at the named shapes" + (" (reduced for CPU)" if args.reduced else ""),
            "bf16 = the unquantized model in the compute dtype (fp32 on CPU); int8 = LLM.int8; int4 = nf4 + double "
            "quant (bitsandbytes)",
            "peak_vram_gb = torch.cuda.max_memory_allocated (0.0 on CPU); activations_measured 0: CPU has no "
            "allocator statistics, activations_bytes is then 0",
            "ppo_update_est_s / episodes_per_s_est: rollout + scoring + ppo_epochs x minibatches x the measured "
            "minibatch time",
            "ppo.P.judge_pass: one periodic gold-evaluation pass (edgerlhf.judge.ModelJudge: load + tokenize + "
            "score + free) with PPO's models loaded; stage_peak_vram_gb = max(ppo peak, pass peak); "
            "within_budget 1/0, -1 where no VRAM cap applies (CPU, or vram_budget_gb 0)",
        ],
    })
    log.info("bench: wrote %s and %s in %.1f s", args.out, info_path, results["wall_time_s"])
    print(tables(results, specs))
    return results


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Parse argv, run the benchmark, return its metrics (also written to --out)."""
    args = parse_args(argv)
    runtime.setup_logging("bench")
    import transformers

    transformers.utils.logging.disable_progress_bar()  # one "Loading weights" bar per model load otherwise
    try:
        return run(args)
    except Exception as exc:
        err = runtime.explain("bench", exc)
        if err is None:
            raise
        print(f"error [bench]: {err}", file=sys.stderr)
        sys.exit(err.exit_code)


if __name__ == "__main__":
    main()
