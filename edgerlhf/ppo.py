"""PPO for RLHF on one small GPU, readable top to bottom (in the spirit of CleanRL's ppo.py).

Layout of this file:
  1. masked statistics and whitening
  2. the RL pieces: KL estimators, per-token rewards, GAE, the two clipped losses, explained variance,
     the KL-coefficient controllers
  3. sequences: left-padded prompts, response masks after the first EOS, re-packing for the reward model
  4. the policy-with-value model (one base model = policy, reference and value) and its save/load
  5. sampling: generation config, log-probs/values by a chunked no-grad forward, score normalisation
  6. the three steps of an update: `collect_rollouts` -> `compute_advantages` -> `ppo_update`
  7. the training loop `train_ppo`: those steps, plus evaluation, logging and checkpoints around them
  8. resumable checkpoints: the loop's whole state in one safetensors file

Every hyperparameter comes from `edgerlhf.config.PPOParams`; docs/ppo.md has the algorithm, its formulas,
the implementation details with their sources and the provenance of the test oracles. Tensor shapes: B episodes,
P prompt tokens (left-padded), R response tokens (right-padded after the first EOS), V vocabulary.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from edgerlhf import modeling, runtime
from edgerlhf.config import PPOParams
from edgerlhf.distributed import SINGLE, Processes
from edgerlhf.errors import ArtifactError, ConfigError, EdgeRLHFError
from edgerlhf.judge import GoldFn

VALUE_HEAD_FILE = "value_head.safetensors"
SCORE_NORM_FILE = "score_norm.json"
CHECKPOINT_FILE = "checkpoint.safetensors"

log = logging.getLogger("edgerlhf")

# score_fn(query, query_mask, response, response_mask) -> raw scores [B] (float). The query is the
# left-padded prompt [B, P]; the response is [B, R] with response_mask 1 up to and including the first EOS.
ScoreFn = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]


# =========================================================================== 1. masked statistics


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of `x` over positions where `mask` is 1 (over all, or along `dim`)."""
    mask = mask.to(torch.bool)
    # `where`, not `x * mask`: a non-finite value at a padded position must not turn the mean into NaN.
    total = torch.where(mask, x, torch.zeros_like(x))
    if dim is None:
        return total.sum() / mask.sum().clamp(min=1)
    return total.sum(dim) / mask.sum(dim).clamp(min=1)


def masked_var(x: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """Variance of `x` over the masked positions (Bessel-corrected when `unbiased` and n > 1)."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    n = mask.to(torch.bool).sum()
    if unbiased and n > 1:
        var = var * n / (n - 1)
    return var


def masked_whiten(x: Tensor, mask: Tensor, shift_mean: bool = True, unbiased: bool = True) -> Tensor:
    """(x - mean) / std over the masked positions; without `shift_mean` the mean is added back
    (only the scale changes, used for rewards). Padded positions come out as 0."""
    mean, var = masked_mean(x, mask), masked_var(x, mask, unbiased)
    whitened = (x - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(mask.to(torch.bool), whitened, torch.zeros_like(whitened))


# =========================================================================== 2. the RL pieces


def kl_penalty(logp: Tensor, ref_logp: Tensor, estimator: str = "k1") -> Tensor:
    """Per-token estimate of KL(pi || pi_ref) from tokens sampled from pi (Schulman's k1 / k3)."""
    log_ratio = logp - ref_logp
    if estimator == "k1":
        # unbiased, low bias per token but can be negative on a single sample
        return log_ratio
    if estimator == "k3":
        # r = pi_ref / pi; (r - 1) - log r is unbiased (E_pi[r] = 1) and never negative
        return torch.expm1(-log_ratio) + log_ratio
    raise ConfigError(f"ppo.kl_estimator must be 'k1' or 'k3' (got {estimator!r})")


def per_token_rewards(score: Tensor, kl: Tensor, mask: Tensor, beta: float) -> Tensor:
    """r_t = -beta * k_t * m_t, plus the sequence score at the LAST VALID response token (TRL put it one
    position late, on the first pad: issues #1893/#3750)."""
    rewards = -beta * kl * mask
    rows = torch.arange(len(score), device=score.device)
    return rewards.index_put((rows, last_valid_index(mask)), score.to(rewards.dtype), accumulate=True)


def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation over the response tokens; returns (advantages, returns).

    delta_t = r_t + gamma V_{t+1} - V_t with V = 0 past the last valid token, A_t = delta_t + gamma lam A_{t+1},
    returns G = A + V. Padded positions get A = G = 0, so a padded row equals the unpadded row.
    """
    mask = mask.to(rewards.dtype)
    rewards, values = rewards * mask, values * mask  # nothing is earned or worth anything after the episode
    advantages_reversed, next_advantage = [], torch.zeros_like(rewards[:, 0])
    length = rewards.shape[1]
    for t in reversed(range(length)):
        next_value = values[:, t + 1] if t + 1 < length else torch.zeros_like(values[:, t])
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_advantage = delta + gamma * lam * next_advantage
        advantages_reversed.append(next_advantage)
    advantages = torch.stack(advantages_reversed[::-1], dim=1) * mask
    returns = (advantages + values) * mask
    return advantages, returns


def clipped_policy_loss(logp_new: Tensor, logp_old: Tensor, advantages: Tensor, mask: Tensor,
                        cliprange: float) -> tuple[Tensor, Tensor, Tensor]:
    """PPO clipped surrogate: masked_mean(max(-A rho, -A clip(rho, 1-eps, 1+eps)));
    returns (loss, clip fraction, approx KL = masked_mean((rho - 1) - log rho))."""
    # Zero the log-ratio on padded tokens BEFORE exp: a huge ratio there would give inf * 0 = NaN gradients.
    log_ratio = torch.where(mask.to(torch.bool), logp_new - logp_old, torch.zeros_like(logp_new))
    ratio = torch.exp(log_ratio)
    loss_unclipped = -advantages * ratio
    loss_clipped = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    loss = masked_mean(torch.max(loss_unclipped, loss_clipped), mask)
    with torch.no_grad():
        clipfrac = masked_mean((loss_clipped > loss_unclipped).float(), mask)
        approx_kl = masked_mean((ratio - 1.0) - log_ratio, mask)
    return loss, clipfrac, approx_kl


def clipped_value_loss(v_new: Tensor, v_old: Tensor, returns: Tensor, mask: Tensor,
                       cliprange_value: float) -> tuple[Tensor, Tensor]:
    """0.5 * masked_mean(max((V - G)^2, (V_clipped - G)^2)) with V_clipped = V_old + clip(V - V_old, +-eps_v);
    returns (loss, value clip fraction)."""
    v_clipped = v_old + torch.clamp(v_new - v_old, -cliprange_value, cliprange_value)
    loss_unclipped = (v_new - returns) ** 2
    loss_clipped = (v_clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.max(loss_unclipped, loss_clipped), mask)
    with torch.no_grad():
        vf_clipfrac = masked_mean((loss_clipped > loss_unclipped).float(), mask)
    return loss, vf_clipfrac


def explained_variance(returns: Tensor, values: Tensor, mask: Tensor | None = None) -> float:
    """1 - Var(G - V) / Var(G) over the masked positions: 1 = perfect critic, 0 = no better than a constant."""
    if mask is None:
        mask = torch.ones_like(returns)
    var_returns = masked_var(returns, mask, unbiased=False)
    if var_returns.item() == 0.0:
        return float("nan")
    return float(1.0 - masked_var(returns - values, mask, unbiased=False) / var_returns)


class FixedKLController:
    """A constant KL coefficient beta."""

    def __init__(self, beta: float) -> None:
        self.value = beta

    def update(self, current_kl: float, n_steps: int) -> None:
        """No-op: beta stays fixed."""


class AdaptiveKLController:
    """Ziegler et al. (2019)'s proportional controller in multiplicative form:
    beta <- beta * exp(clip(KL / target - 1, +-0.2) * n / horizon). Their factor 1 + x to first order; unlike it,
    beta never reaches 0 or below however few updates share the horizon, and over a run it moves by at most
    exp(+-0.2 * total / horizon)."""

    def __init__(self, init_beta: float, target: float, horizon: float) -> None:
        self.value, self.target, self.horizon = init_beta, target, horizon

    def update(self, current_kl: float, n_steps: int) -> None:
        """Move beta towards the coefficient that keeps the KL at `target`; `n_steps` episodes were seen."""
        proportional_error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= math.exp(proportional_error * n_steps / self.horizon)


def make_kl_controller(params: PPOParams) -> FixedKLController | AdaptiveKLController:
    """The KL controller that params.kl_control names, starting at init_kl_coef. The adaptive one's horizon is
    kl_horizon_fraction * total_episodes: over a whole run beta can then move by up to exp(+-0.2 / fraction)
    (x/ 7.4 at 0.1) at any run length, where a horizon in episodes (lm-human-preferences' 10000, made for
    millions of episodes) would leave beta within +-8 % over the real profile's 4096."""
    if params.kl_control == "fixed":
        return FixedKLController(params.init_kl_coef)
    return AdaptiveKLController(params.init_kl_coef, params.target_kl,
                                params.kl_horizon_fraction * params.total_episodes)


# =========================================================================== 3. sequences


def left_pad(sequences: Sequence[Sequence[int]], pad_token_id: int, device: torch.device | str = "cpu"
             ) -> tuple[Tensor, Tensor]:
    """Left-pad token-id lists into (ids [B, P], attention mask [B, P]); generation appends on the right."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, seq in enumerate(sequences):
        if len(seq) == 0:
            raise ConfigError("PPO got an empty prompt: every prompt needs at least one token")
        ids[i, width - len(seq):] = torch.tensor(list(seq), dtype=torch.long)
        mask[i, width - len(seq):] = 1
    return ids.to(device), mask.to(device)


def position_ids_from_mask(attention_mask: Tensor) -> Tensor:
    """Positions counted over real tokens only (cumsum - 1, clamped at 0), so a left-padded row sees the same
    positions as the unpadded row. Without it GPT-2 log-probs shift by up to 0.59 nats (docs/ppo.md)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def last_valid_index(mask: Tensor) -> Tensor:
    """Index of the last 1 in each row of `mask` (0 for an all-zero row)."""
    positions = torch.arange(mask.shape[-1], device=mask.device)
    return (positions * mask.to(torch.bool)).argmax(-1)


def truncate_after_eos(response: Tensor, eos_token_id: int, pad_token_id: int) -> tuple[Tensor, Tensor, Tensor]:
    """Cut each response after its first EOS; returns (response with pads after it, mask, has_eos).

    The mask is 1 up to and INCLUDING the first EOS. It comes from positions, never from `ids != pad`:
    in the GPT-2 family pad == eos and that test would drop the real EOS.
    """
    is_eos = response == eos_token_id
    has_eos = is_eos.any(-1)
    no_eos_last = torch.full_like(has_eos, response.shape[-1] - 1, dtype=torch.long)
    first_eos = torch.where(has_eos, is_eos.int().argmax(-1), no_eos_last)
    positions = torch.arange(response.shape[-1], device=response.device)
    mask = (positions[None, :] <= first_eos[:, None]).long()
    return torch.where(mask.bool(), response, torch.full_like(response, pad_token_id)), mask, has_eos


def repack_right_padded(query: Tensor, query_mask: Tensor, response: Tensor, response_mask: Tensor,
                        pad_token_id: int) -> tuple[Tensor, Tensor]:
    """[left pads][prompt][response][pads] -> [prompt][response][pads]: the right-padded layout the reward
    model was trained on (default position ids then start at the first real token)."""
    ids = torch.cat([query, response], dim=1)
    mask = torch.cat([query_mask, response_mask], dim=1).to(torch.bool)
    # a stable sort on "is padding" moves the valid tokens to the front, keeping their order
    order = torch.sort((~mask).int(), dim=1, stable=True).indices
    packed_ids = torch.gather(ids, 1, order)
    packed_mask = torch.gather(mask, 1, order)
    width = int(packed_mask.sum(1).max())
    packed_ids = torch.where(packed_mask, packed_ids, torch.full_like(packed_ids, pad_token_id))
    return packed_ids[:, :width], packed_mask[:, :width].long()


@torch.no_grad()
def reward_model_scores(reward_model: nn.Module, input_ids: Tensor, attention_mask: Tensor,
                        chunk_size: int | None = None) -> Tensor:
    """Scores [B] (fp32) of a sequence-classification RM whose `.logits` are [B, 1] or [B]. The RM is
    never moved (bitsandbytes models refuse .to()); inputs go to its device."""
    device = getattr(reward_model, "device", input_ids.device)
    chunk_size = chunk_size or len(input_ids)
    scores = []
    for start in range(0, len(input_ids), chunk_size):
        ids = input_ids[start:start + chunk_size].to(device)
        logits = reward_model(input_ids=ids, attention_mask=attention_mask[start:start + chunk_size].to(device)).logits
        if logits.dim() == 2 and logits.shape[1] == 1:
            logits = logits[:, 0]
        if logits.dim() != 1:
            raise ArtifactError(f"the reward model must return one logit per sequence (got logits of shape "
                                f"{tuple(logits.shape)}): retrain it with num_labels=1 (stage reward)")
        scores.append(logits.float())
    return torch.cat(scores).to(input_ids.device)


def reward_model_score_fn(reward_model: nn.Module, pad_token_id: int, chunk_size: int | None = None) -> ScoreFn:
    """A ScoreFn that re-packs [prompt][response] right-padded and returns the RM score at its last valid token."""

    def score(query: Tensor, query_mask: Tensor, response: Tensor, response_mask: Tensor) -> Tensor:
        ids, mask = repack_right_padded(query, query_mask, response, response_mask, pad_token_id)
        return reward_model_scores(reward_model, ids, mask, chunk_size)

    return score


# =========================================================================== 4. the policy-with-value model


def disable_dropout(model: nn.Module) -> None:
    """Turn every dropout off: PPO's ratio rho must be exactly 1 before the first step, and train-mode forwards
    (needed for gradient checkpointing) must equal the eval-mode rollout forward."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        for name in ("attention_dropout", "dropout_p"):  # attention modules that keep the rate as a float
            if isinstance(getattr(module, name, None), float):
                setattr(module, name, 0.0)
    config = getattr(model, "config", None)
    if config is not None:
        for name, value in list(vars(config).items()):
            if isinstance(value, float) and ("dropout" in name or name.endswith("pdrop")):
                setattr(config, name, 0.0)


class PolicyWithValue(nn.Module):
    """One causal LM with a LoRA adapter = the policy; the same LM with the adapter disabled = the reference;
    a zero-initialised fp32 linear head on the policy's last hidden state = the value.

    Why a shared backbone on an 8 GB GPU (docs/ppo.md): one set of base weights in memory, no
    second model (TRL kept a whole value model) and no second adapter; one forward gives logits and values, so
    rollouts and updates cost one pass instead of two. The price: value-loss gradients also move the policy
    LoRA. vf_coef (0.1) keeps that small, and the zero-initialised head sends no value gradient into the
    backbone at the start (dL/dh = w = 0), so the first updates are driven by the policy loss alone.
    """

    def __init__(self, model: nn.Module, value_head: nn.Linear) -> None:
        super().__init__()
        self.model = model  # a peft PeftModel
        self.value_head = value_head

    @property
    def device(self) -> torch.device:
        return self.value_head.weight.device

    def reference(self) -> Any:
        """Context manager under which forward/generate run the reference (= SFT) model: adapter disabled."""
        return self.model.disable_adapter()

    def forward(self, input_ids: Tensor, attention_mask: Tensor, n_last: int = 0) -> tuple[Tensor, Tensor]:
        """(logits fp32 [B, n, V], values fp32 [B, n]) at the last `n_last` positions (0: all); position ids come
        from the attention mask. Logits from `lm_forward` (the LM head in fp32); the value head reads the same
        final hidden state."""
        logits, hidden = lm_forward(causal_lm(self.model), input_ids, attention_mask, n_last)
        return logits, self.value_head(hidden).squeeze(-1)


def lm_forward(lm: nn.Module, input_ids: Tensor, attention_mask: Tensor, n_last: int = 0) -> tuple[Tensor, Tensor]:
    """(logits fp32 [B, n, V], final hidden state fp32 [B, n, H]) of a causal LM at the last `n_last` positions.

    The body (with its LoRA layers) runs as the model's own forward does; the output layer is applied here, in fp32,
    to the upcast hidden state: bf16 logits are rounded by 0.125-0.5 at |logit| 16-128 (GPT-2's range), and that
    error would go straight into log rho, the KL and the ratio. The price is a transient fp32 copy of the head's
    weight (vocab x hidden x 4 bytes: 0.15 GB for GPT-2, 0.55 GB for Qwen2.5-0.5B)."""
    out = lm.base_model(input_ids=input_ids, attention_mask=attention_mask,
                        position_ids=position_ids_from_mask(attention_mask), use_cache=False, return_dict=True)
    hidden = out.last_hidden_state
    if n_last:
        hidden = hidden[:, -n_last:]
    hidden = hidden.float()
    head = lm.get_output_embeddings()
    bias = head.bias.float() if getattr(head, "bias", None) is not None else None
    return nn.functional.linear(hidden, head.weight.float(), bias), hidden


def causal_lm(model: nn.Module) -> nn.Module:
    """The causal LM inside a peft model (LoRA layers in place), or the model itself."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def check_fp32_head(lm: nn.Module) -> None:
    """PolicyWithValue computes the LM head itself (in fp32): refuse models whose head is more than one linear
    layer over the body's last hidden state (a LoRA on the head, logit scaling or soft-capping), checked by
    comparing with the model's own logits on a few tokens."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    head = lm.get_output_embeddings()
    if isinstance(head, BaseTunerLayer) or not isinstance(getattr(head, "weight", None), Tensor):
        raise ConfigError("PPO computes the LM head in fp32 itself: leave the output layer (lm_head) out of "
                          "lora.target_modules")
    config = getattr(lm, "config", None)
    scaled = [k for k in ("final_logit_softcapping", "logit_scale", "logits_scaling")
              if getattr(config, k, None) not in (None, 1, 1.0)]
    if scaled:
        raise ConfigError(f"{type(lm).__name__} scales its logits ({', '.join(scaled)}): PPO's fp32 head is one "
                          "linear layer over the last hidden state and cannot reproduce them")
    device = head.weight.device
    ids = torch.arange(8, device=device).remainder(head.weight.shape[0]).unsqueeze(0)
    mask = torch.ones_like(ids)
    was_training = lm.training
    lm.eval()
    try:
        with torch.no_grad():
            mine = lm_forward(lm, ids, mask)[0]
            theirs = lm(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask),
                        use_cache=False).logits.float()
    except (AttributeError, TypeError, ValueError) as exc:
        raise ConfigError(f"{type(lm).__name__} does not expose the standard causal-LM layout PPO needs (a body "
                          f"`base_model` returning `last_hidden_state`, an output layer): {exc}") from exc
    finally:
        lm.train(was_training)
    tol = 1e-4 if head.weight.dtype == torch.float32 else 0.05 * (1.0 + theirs.abs().max().item())
    if (mine - theirs).abs().max().item() > tol:
        raise ConfigError(f"{type(lm).__name__}'s logits are not a linear head over its last hidden state "
                          "(logit scaling or soft-capping?): PPO's fp32 head cannot reproduce them")


def _hidden_size(base_model: nn.Module) -> int:
    config = base_model.config
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    return int(config.hidden_size)


def build_policy(base_model: nn.Module, params: PPOParams, target_modules: Sequence[str] | None = None
                 ) -> PolicyWithValue:
    """Wrap a causal LM (the SFT adapter already merged into it) as policy + reference + value: a fresh LoRA
    (r=lora_r, alpha=lora_alpha, dropout 0) and a zero fp32 value head; dropout off; checkpointing per params."""
    from peft import get_peft_model

    disable_dropout(base_model)
    if params.gradient_checkpointing:
        # only active in train mode, so eval-mode rollouts run the plain forward
        modeling.enable_checkpointing(base_model)
    # LoRA B starts at zero, so with or without the adapter the logits are identical: reference == policy at init.
    # peft keeps the adapter in fp32 on a bf16/fp16 base (autocast_adapter_dtype), as are head and logits.
    # lora_dropout 0: the training forward must equal the rollout forward (see disable_dropout)
    peft_model = get_peft_model(base_model, modeling.lora_config(base_model, "CAUSAL_LM", params.lora_r,
                                                                 params.lora_alpha, 0.0, target_modules))
    check_fp32_head(peft_model.get_base_model())
    device = next(base_model.parameters()).device
    value_head = nn.Linear(_hidden_size(base_model), 1, device=device, dtype=torch.float32)
    nn.init.zeros_(value_head.weight)
    nn.init.zeros_(value_head.bias)
    return PolicyWithValue(peft_model, value_head)


def save_policy(policy: PolicyWithValue, out_dir: str | Path, score_stats: tuple[float, float] | None = None
                ) -> None:
    """Write the policy LoRA (peft, safetensors), `value_head.safetensors` and, if given, the score mean/std
    used for normalisation (`score_norm.json`) so evaluation can reuse them."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    modeling.save_model(policy.model, out_dir)
    head = {name: t.detach().float().cpu().contiguous() for name, t in policy.value_head.state_dict().items()}
    save_file(head, str(out_dir / VALUE_HEAD_FILE))
    if score_stats is not None:
        (out_dir / SCORE_NORM_FILE).write_text(json.dumps({"mean": score_stats[0], "std": score_stats[1]}))


def load_policy(base_model: nn.Module, path: str | Path, *, trainable: bool = False) -> PolicyWithValue:
    """Rebuild a saved PolicyWithValue on `base_model` (adapter + value head; safetensors only, no pickle)."""
    from peft import PeftModel
    from safetensors.torch import load_file

    path = Path(path)
    modeling.require_policy(path, f"ppo@{path.name}")  # safetensors only: one line, before peft unpickles anything
    if not (path / "adapter_config.json").exists() or not (path / VALUE_HEAD_FILE).exists():
        raise ArtifactError(f"{path} holds no saved PPO policy (adapter_config.json + {VALUE_HEAD_FILE}): "
                            "run the ppo stage first")
    disable_dropout(base_model)
    peft_model = PeftModel.from_pretrained(base_model, str(path), is_trainable=trainable)
    check_fp32_head(peft_model.get_base_model())
    state = load_file(str(path / VALUE_HEAD_FILE))
    device = next(base_model.parameters()).device
    value_head = nn.Linear(state["weight"].shape[1], 1, device=device, dtype=torch.float32)
    value_head.load_state_dict(state)
    value_head.requires_grad_(trainable)
    return PolicyWithValue(peft_model, value_head)


def load_score_stats(path: str | Path) -> tuple[float, float]:
    """The (mean, std) that `save_policy` stored next to a policy."""
    data = json.loads((Path(path) / SCORE_NORM_FILE).read_text())
    return float(data["mean"]), float(data["std"])


# =========================================================================== 5. sampling


@dataclass
class Rollout:
    """A batch of episodes: left-padded prompts and responses cut after their first EOS."""

    query: Tensor  # [B, P] left-padded prompt ids
    query_mask: Tensor  # [B, P]
    response: Tensor  # [B, R] pad after the first EOS
    response_mask: Tensor  # [B, R] 1 up to and including the first EOS
    has_eos: Tensor  # [B] bool

    @property
    def input_ids(self) -> Tensor:
        return torch.cat([self.query, self.response], dim=1)

    @property
    def attention_mask(self) -> Tensor:
        return torch.cat([self.query_mask, self.response_mask], dim=1)


def generation_config(temperature: float, top_k: int, top_p: float, max_new_tokens: int, eos_token_id: int,
                      pad_token_id: int) -> Any:
    """The one GenerationConfig of the project (PPO rollouts, evaluation, generate, export). A fresh config drops
    any hub defaults (repetition penalty, top_k=50, ...): samples come from softmax(logits / T), the distribution
    whose log-probs PPO computes (top_k > 0 or top_p < 1 truncate it; PPO then treats them as off-policy noise,
    as TRL did)."""
    from transformers import GenerationConfig

    return GenerationConfig(do_sample=True, temperature=temperature, top_k=top_k, top_p=top_p,
                            max_new_tokens=max_new_tokens, min_new_tokens=0, num_beams=1, eos_token_id=eos_token_id,
                            pad_token_id=pad_token_id, use_cache=True)


def configure_sampling(policy: PolicyWithValue, params: PPOParams, eos_token_id: int, pad_token_id: int) -> None:
    """Put PPO's sampling settings on the model's own generation_config (a config passed to generate() is
    merged with it, and e.g. eos_token_id=None there is silently ignored)."""
    policy.model.get_base_model().generation_config = generation_config(
        params.temperature, params.top_k, params.top_p, params.response_length, eos_token_id, pad_token_id)


@torch.no_grad()
def generate_responses(policy: PolicyWithValue, query: Tensor, query_mask: Tensor, eos_token_id: int,
                       pad_token_id: int, *, reference: bool = False) -> Rollout:
    """Sample one response per left-padded prompt (eval mode, no grad; `reference` samples the SFT policy)."""
    policy.eval()
    with policy.reference() if reference else contextlib.nullcontext():
        out = policy.model.generate(input_ids=query, attention_mask=query_mask)
    response, response_mask, has_eos = truncate_after_eos(out[:, query.shape[1]:], eos_token_id, pad_token_id)
    return Rollout(query, query_mask, response, response_mask, has_eos)


def response_logprobs(logits: Tensor, response: Tensor) -> Tensor:
    """log softmax(logits)[token] without materialising the full log-softmax (B*R*V is the memory hog)."""
    return torch.gather(logits, -1, response.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Per-position entropy of softmax(logits): logsumexp(l) - sum p l."""
    return torch.logsumexp(logits, dim=-1) - (torch.softmax(logits, dim=-1) * logits).sum(-1)


def forward_response(policy: PolicyWithValue, input_ids: Tensor, attention_mask: Tensor, response: Tensor,
                     temperature: float) -> tuple[Tensor, Tensor, Tensor]:
    """One forward over [prompt][response]: (logits / T [B, R, V], log-probs of the response [B, R],
    values [B, R]). Position t's logits and value are read at the token BEFORE response token t."""
    n = response.shape[1]
    logits, values = policy(input_ids, attention_mask, n_last=n + 1)
    logits = logits[:, :-1] / temperature
    return logits, response_logprobs(logits, response), values[:, :-1]


@torch.no_grad()
def rollout_logprobs_values(policy: PolicyWithValue, rollout: Rollout, temperature: float, chunk_size: int,
                            *, reference: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """(log-probs, values, entropy) [B, R] of the response by a no-grad forward in chunks of `chunk_size` rows
    (not from generate()'s scores: those come from a different, KV-cached computation)."""
    policy.eval()
    logps, values, entropies = [], [], []
    input_ids, attention_mask = rollout.input_ids, rollout.attention_mask
    with policy.reference() if reference else contextlib.nullcontext():
        for start in range(0, len(input_ids), chunk_size):
            rows = slice(start, start + chunk_size)
            logits, logp, value = forward_response(policy, input_ids[rows], attention_mask[rows],
                                                   rollout.response[rows], temperature)
            logps.append(logp)
            values.append(value)
            entropies.append(entropy_from_logits(logits))
            del logits
    return torch.cat(logps), torch.cat(values), torch.cat(entropies)


def sample_and_score(policy: PolicyWithValue, prompts: Sequence[Sequence[int]], score_fn: ScoreFn,
                     eos_token_id: int, pad_token_id: int, batch_size: int, device: torch.device | str, *,
                     reference: bool = False) -> tuple[list[Rollout], Tensor]:
    """Sample one response per prompt in batches; returns the rollouts and the raw scores [N]."""
    rollouts, scores = [], []
    for start in range(0, len(prompts), batch_size):
        query, query_mask = left_pad(prompts[start:start + batch_size], pad_token_id, device)
        rollout = generate_responses(policy, query, query_mask, eos_token_id, pad_token_id, reference=reference)
        rollouts.append(rollout)
        scores.append(score_fn(rollout.query, rollout.query_mask, rollout.response, rollout.response_mask).float())
    return rollouts, torch.cat(scores)


def measure_score_stats(policy: PolicyWithValue, prompts: Sequence[Sequence[int]], score_fn: ScoreFn,
                        params: PPOParams, eos_token_id: int, pad_token_id: int, device: torch.device | str,
                        generator: torch.Generator, procs: Processes = SINGLE) -> tuple[float, float]:
    """Mean and std of the raw score over `score_norm_samples` samples of the SFT policy (adapter off).
    Normalising by them puts RMs of different precision (and scale) on one footing. In a DDP run every process
    draws its own samples and the statistics are taken over all of them, so every process uses the same."""
    order = torch.randperm(len(prompts), generator=generator).tolist()
    chosen = [prompts[order[i % len(order)]] for i in range(params.score_norm_samples)]
    _, scores = sample_and_score(policy, chosen, score_fn, eos_token_id, pad_token_id, params.batch_size, device,
                                 reference=True)
    scores = procs.gather(scores)
    std = scores.std().item()
    # a constant score (std 0) would blow the normalised score up; keep its scale instead
    return scores.mean().item(), std if std > 1e-8 else 1.0


# =========================================================================== 6. the three steps of an update


@dataclass
class Batch:
    """One update's episodes as `collect_rollouts` leaves them: everything the losses need. [B, R] unless noted."""

    rollout: Rollout
    mask: Tensor  # the response mask as floats
    logp_old: Tensor  # log pi_old of each response token: the sampling policy's (a no-grad forward)
    ref_logp: Tensor  # log pi_ref: the same forward with the adapter off (the SFT policy)
    values_old: Tensor  # V_old, 0 after the episode
    entropy: Tensor  # per-token entropy of pi_old
    raw_score: Tensor  # [B] the reward model's score
    score: Tensor  # [B] the score PPO maximises: (raw - mean) / std - missing_eos_penalty * [no EOS]
    generation_s: float = 0.0  # wall time of generate() for this batch (rollout tokens/s)


@dataclass
class Advantages:
    """What `compute_advantages` derives from a Batch at the current KL coefficient."""

    kl: Tensor  # per-token KL estimate k_t (0 on padding)
    rewards: Tensor  # per-token rewards r_t
    advantages: Tensor  # whitened A_t
    returns: Tensor  # value targets G_t = A_t + V_t (from the advantages BEFORE whitening)


ADVANTAGE_ESTIMATORS = ("gae",)


def collect_rollouts(policy: PolicyWithValue, prompts: Sequence[Sequence[int]], score_fn: ScoreFn,
                     score_stats: tuple[float, float], params: PPOParams, eos_token_id: int, pad_token_id: int,
                     device: torch.device) -> Batch:
    """Step 1: sample one response per prompt, then score it (`score_rollout`)."""
    query, query_mask = left_pad(prompts, pad_token_id, device)
    start = time.perf_counter()
    rollout = generate_responses(policy, query, query_mask, eos_token_id, pad_token_id)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    generation_s = time.perf_counter() - start
    return dataclasses.replace(score_rollout(policy, rollout, score_fn, score_stats, params),
                               generation_s=generation_s)


@torch.no_grad()
def score_rollout(policy: PolicyWithValue, rollout: Rollout, score_fn: ScoreFn, score_stats: tuple[float, float],
                  params: PPOParams, reference_logprobs: Callable[[Rollout], Tensor] | None = None) -> Batch:
    """Log-probs, values and entropy of the sampled responses (a no-grad forward, not generate()'s scores), the
    reference log-probs (adapter off, or `reference_logprobs(rollout)` from a separate model) and the normalised
    score; a response cut off before its EOS is penalised in normalised units."""
    mask = rollout.response_mask.float()
    logp, values, entropy = rollout_logprobs_values(policy, rollout, params.temperature, params.logprob_chunk_size)
    if reference_logprobs is None:
        ref_logp, _, _ = rollout_logprobs_values(policy, rollout, params.temperature, params.logprob_chunk_size,
                                                 reference=True)
    else:
        ref_logp = reference_logprobs(rollout)
    raw = score_fn(rollout.query, rollout.query_mask, rollout.response, rollout.response_mask).float()
    raw = raw.to(mask.device)
    mean, std = score_stats
    score = (raw - mean) / std - params.missing_eos_penalty * (~rollout.has_eos).float()
    return Batch(rollout, mask, logp, ref_logp, values * mask, entropy, raw, score)


@torch.no_grad()
def compute_advantages(batch: Batch, beta: float, params: PPOParams, estimator: str = "gae") -> Advantages:
    """Step 2, the one place where score, KL and values meet: per-token rewards r_t = -beta k_t (+ the score at
    the last response token), optionally whitened, then advantages and returns by `estimator`; the advantages
    are whitened over the batch."""
    mask = batch.mask
    kl = kl_penalty(batch.logp_old, batch.ref_logp, params.kl_estimator) * mask
    rewards = per_token_rewards(batch.score, kl, mask, beta)
    if params.whiten_rewards:
        rewards = masked_whiten(rewards, mask, shift_mean=False)
    if estimator == "gae":
        advantages, returns = gae(rewards, batch.values_old, mask, params.gamma, params.lam)
    else:  # the place for RLOO-style baselines (several samples per prompt, no critic)
        raise ConfigError(f"unknown advantage estimator {estimator!r}; choose one of {list(ADVANTAGE_ESTIMATORS)}")
    return Advantages(kl, rewards, masked_whiten(advantages, mask), returns)


# Per-update diagnostics of `ppo_update`, averaged over micro-batches (grad_norm: over the optimizer steps taken).
UPDATE_STATS = ("policy_loss", "value_loss", "approx_kl", "clipfrac", "vf_clipfrac", "grad_norm")


def ppo_update(policy: PolicyWithValue, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
               batch: Batch, adv: Advantages, params: PPOParams, shuffle_rng: torch.Generator,
               procs: Processes = SINGLE) -> dict[str, float]:
    """Step 3: ppo_epochs passes over the batch in shuffled minibatches of mini_batch_size *
    gradient_accumulation_steps episodes (micro-batches of mini_batch_size, gradients accumulated), one optimizer
    step per minibatch on the clipped policy loss + vf_coef * clipped value loss (- ent_coef * entropy).
    Returns the diagnostics UPDATE_STATS, ratio_dev_first and skipped_steps."""
    policy.train()  # dropout is off; train mode only switches gradient checkpointing on
    trainable = [p for group in optimizer.param_groups for p in group["params"]]
    ro, n_episodes = batch.rollout, len(batch.score)
    input_ids, attention_mask = ro.input_ids, ro.attention_mask
    minibatch_episodes = params.mini_batch_size * params.gradient_accumulation_steps
    sums = dict.fromkeys(UPDATE_STATS, 0.0)
    n_micro, n_steps, n_skipped, ratio_dev_first, diverged = 0, 0, 0, 0.0, False
    for _epoch in range(params.ppo_epochs):
        perm = torch.randperm(n_episodes, generator=shuffle_rng).to(input_ids.device)
        for mb_start in range(0, n_episodes, minibatch_episodes):
            optimizer.zero_grad(set_to_none=True)
            for micro_start in range(mb_start, mb_start + minibatch_episodes, params.mini_batch_size):
                idx = perm[micro_start:micro_start + params.mini_batch_size]
                m = batch.mask[idx]
                logits, logp_new, values_new = forward_response(policy, input_ids[idx], attention_mask[idx],
                                                                ro.response[idx], params.temperature)
                pg_loss, clipfrac, approx_kl = clipped_policy_loss(logp_new, batch.logp_old[idx],
                                                                   adv.advantages[idx], m, params.cliprange)
                vf_loss, vf_clipfrac = clipped_value_loss(values_new, batch.values_old[idx], adv.returns[idx], m,
                                                          params.cliprange_value)
                loss = pg_loss + params.vf_coef * vf_loss
                if params.ent_coef > 0:
                    loss = loss - params.ent_coef * masked_mean(entropy_from_logits(logits), m)
                del logits
                if not torch.isfinite(loss):  # stop, but with the other processes (a lone raise would hang them)
                    diverged = True
                    continue
                scaler.scale(loss / params.gradient_accumulation_steps).backward()
                if n_steps == 0:  # before the first optimizer step the policy IS the sampling policy
                    with torch.no_grad():
                        log_ratio = (logp_new - batch.logp_old[idx]).abs() * m
                        ratio_dev_first = max(ratio_dev_first, log_ratio.max().item())
                for key, value in (("policy_loss", pg_loss), ("value_loss", vf_loss), ("approx_kl", approx_kl),
                                   ("clipfrac", clipfrac), ("vf_clipfrac", vf_clipfrac)):
                    sums[key] += value.item()
                n_micro += 1
            if procs.max(torch.tensor([float(diverged)])).item():
                raise EdgeRLHFError(f"PPO diverged: non-finite loss in optimizer step {n_steps + 1} of the update; "
                                    "lower ppo.learning_rate or ppo.max_grad_norm")
            # every process now holds the gradient of its share of the minibatch: average them (DDP)
            procs.all_reduce_gradients(trainable)
            scaler.unscale_(optimizer)  # clip the true gradient, not the scaled one
            grad_norm = float(torch.nn.utils.clip_grad_norm_(trainable, params.max_grad_norm))
            if scaler.is_enabled() and not math.isfinite(grad_norm):
                n_skipped += 1  # fp16 overflow: the scaler skips this step and lowers its scale
            else:
                sums["grad_norm"] += grad_norm
            scaler.step(optimizer)
            scaler.update()
            n_steps += 1
    optimizer.zero_grad(set_to_none=True)
    stats = {k: v / (max(n_steps - n_skipped, 1) if k == "grad_norm" else n_micro) for k, v in sums.items()}
    # max |log rho| before the first optimizer step: 0 unless the training forward differs from the rollout
    # forward (dropout, position ids, precision) -- PPO's clipping would then be biased
    return {**stats, "ratio_dev_first": ratio_dev_first, "skipped_steps": float(n_skipped)}


@torch.no_grad()
def rollout_stats(batch: Batch, adv: Advantages, beta: float) -> dict[str, float]:
    """Per-update diagnostics of the sampled batch: scores, sequence KL (sum over tokens), the KL-penalised
    reward, entropy, the critic's explained variance, response length and the share cut off before EOS."""
    kl_sum = adv.kl.sum(1)
    return {
        "score": batch.raw_score.mean().item(),
        "score_norm": batch.score.mean().item(),
        "kl": kl_sum.mean().item(),
        "rlhf_reward": (batch.score - beta * kl_sum).mean().item(),
        "entropy": masked_mean(batch.entropy, batch.mask).item(),
        "explained_variance": explained_variance(adv.returns, batch.values_old, batch.mask),
        "response_tokens": batch.mask.sum(1).mean().item(),
        "no_eos_fraction": (~batch.rollout.has_eos).float().mean().item(),
    }


# =========================================================================== 7. the training loop


@dataclass
class PPOResult:
    """What a PPO run produced: per-update stats, the score normalisation used, throughput."""

    history: list[dict[str, float]]
    score_mean: float
    score_std: float
    episodes: int
    updates: int
    wall_time_s: float
    episodes_per_s: float
    evals: list[dict[str, float]] = field(default_factory=list)
    rollout_tokens_per_s: float = 0.0  # response tokens (up to EOS) sampled per second of generate(), this process
    ratio_dev_tolerance: float = 0.0  # what ratio_dev_first was checked against (RATIO_DEV_TOLERANCE of the dtype)


@dataclass
class Evaluator:
    """PPO's periodic evaluation: the first ppo.eval_prompts of `prompts` sampled with a fixed seed, scored by the
    gold judge and the proxy."""

    gold_fn: GoldFn
    prompts: Sequence[Sequence[int]]
    tokenizer: Any
    seed: int

    def __call__(self, policy: PolicyWithValue, score_fn: ScoreFn, params: PPOParams, device: torch.device
                 ) -> dict[str, float]:
        """Gold and proxy (raw) score of the current policy, sampled in a forked RNG so that evaluating never
        changes the training trajectory."""
        tok = self.tokenizer
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(self.seed)
            rollouts, proxy = sample_and_score(policy, self.prompts[:params.eval_prompts], score_fn,
                                               tok.eos_token_id, _pad_id(tok), params.batch_size, device)
        prompt_texts, response_texts = [], []
        for r in rollouts:
            prompt_texts += _decode(tok, r.query, r.query_mask)
            response_texts += _decode(tok, r.response, r.response_mask)
        gold = torch.tensor([float(g) for g in self.gold_fn(prompt_texts, response_texts)])
        return {"gold": gold.mean().item(), "proxy": proxy.mean().item()}


@dataclass
class LoopState:
    """What the loop carries from one update to the next; a checkpoint saves exactly this (and the RNGs)."""

    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    kl_ctl: FixedKLController | AdaptiveKLController
    shuffle_rng: torch.Generator
    score_stats: tuple[float, float] = (0.0, 1.0)
    history: list[dict[str, float]] = field(default_factory=list)
    evals: list[dict[str, float]] = field(default_factory=list)
    update: int = 0  # updates done


def derived_seed(seed: int, *keys: object) -> int:
    """A 64-bit seed for the RNG stream that `keys` name under `seed` (stable across runs and platforms)."""
    text = "/".join(map(str, (seed, *keys)))
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")


def prompt_indices(n_prompts: int, seed: int, first: int, count: int) -> list[int]:
    """Prompt indices of episodes first .. first + count - 1. Pass k over the prompts is a shuffle seeded by
    (seed, k): episode i gets prompt perm_k[i % n] with k = i // n, so its prompt follows from its number
    alone and a resumed run needs no saved position in the stream."""
    shuffles: dict[int, list[int]] = {}
    indices = []
    for episode in range(first, first + count):
        k, i = divmod(episode, n_prompts)
        if k not in shuffles:
            generator = torch.Generator().manual_seed(derived_seed(seed, "prompts", k))
            shuffles[k] = torch.randperm(n_prompts, generator=generator).tolist()
        indices.append(shuffles[k][i])
    return indices


def _decode(tokenizer: Any, ids: Tensor, mask: Tensor) -> list[str]:
    rows = zip(ids, mask, strict=True)
    return [tokenizer.decode(row[m.bool()].tolist(), skip_special_tokens=True) for row, m in rows]


def _pad_id(tokenizer: Any) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def _check_params(params: PPOParams, n_prompts: int, world_size: int = 1) -> None:
    step = params.mini_batch_size * params.gradient_accumulation_steps
    if params.batch_size % step:
        raise ConfigError(f"ppo.batch_size ({params.batch_size}) must be a multiple of ppo.mini_batch_size * "
                          f"ppo.gradient_accumulation_steps ({step})")
    if params.total_episodes < params.batch_size * world_size:
        raise ConfigError(f"ppo.total_episodes ({params.total_episodes}) must be >= ppo.batch_size "
                          f"({params.batch_size}) * hardware.num_processes ({world_size})")
    if n_prompts == 0:
        raise ConfigError("PPO got no prompts: check the ppo_prompts split")


def _check_length(policy: PolicyWithValue, prompts: Sequence[Sequence[int]], params: PPOParams) -> None:
    config = policy.model.get_base_model().config
    limit = getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)
    longest = max(len(p) for p in prompts)
    if limit and longest + params.response_length > limit:
        also = f" or lower ppo.response_length to <= {limit - longest}" if longest < limit else ""
        raise ConfigError(f"ppo.response_length ({params.response_length}) + the longest prompt ({longest} tokens) "
                          f"exceeds the model's {limit} positions: lower data.max_prompt_chars or use a model with "
                          f"more positions (model.tiny.n_positions, model.name){also}")


# The largest max |log rho| before an update's first optimizer step that a correct run shows, by the backbone's
# dtype. The rollout forward and the training forward see the same weights and tokens; they differ only by the
# rounding of kernels picked for other batch shapes (and, in half precision, by the bf16/fp16 body: the head is
# fp32). Gross mismatches -- dropout left on, another attention path -- give nats; in fp32 the check also
# catches subtle ones (0.59 for GPT-2's position ids under left padding). Measured figures: docs/ppo.md.
RATIO_DEV_TOLERANCE = {torch.float32: 1e-3, torch.float16: 0.1, torch.bfloat16: 0.5}


def check_first_ratio(ratio_dev_first: float, dtype: torch.dtype, update: int) -> None:
    """Fail when the training forward does not reproduce the rollout's log-probs before the first step: PPO's
    ratio and clipping would then measure the mismatch, not the policy's change."""
    tolerance = RATIO_DEV_TOLERANCE[dtype]
    if ratio_dev_first > tolerance:
        raise EdgeRLHFError(
            f"PPO's training forward differs from its rollout forward at update {update}: max |log ratio| before "
            f"the first step is {ratio_dev_first:.3g} > {tolerance:g} (tolerance for {str(dtype).split('.')[-1]}); "
            "dropout, position ids or the attention implementation differ between model.eval() and model.train()"
            " -- report this with the model name")


# Stats that are the same in every process (the rest are averaged over the processes' episodes).
SHARED_STATS = ("update", "episodes", "beta", "lr")
# Stats whose worst process matters: the maximum over the processes, not the mean.
MAX_STATS = ("ratio_dev_first",)


def mean_over_processes(stats: dict[str, float], procs: Processes) -> dict[str, float]:
    """An update's stats over the episodes of all processes: each process's batch mean, averaged (equal batches);
    ratio_dev_first is the maximum over the processes. With one process the stats are returned as they are."""
    if procs.world_size == 1:
        return stats
    mean_keys = [k for k in stats if k not in SHARED_STATS and k not in MAX_STATS]
    max_keys = [k for k in stats if k in MAX_STATS]
    means = procs.mean(torch.tensor([stats[k] for k in mean_keys], dtype=torch.float64)).tolist()
    maxima = procs.max(torch.tensor([stats[k] for k in max_keys], dtype=torch.float64)).tolist()
    return {**stats, **dict(zip(mean_keys, means, strict=True)), **dict(zip(max_keys, maxima, strict=True))}


def init_loop(policy: PolicyWithValue, params: PPOParams, seed: int, procs: Processes, device: torch.device,
              loss_scaling: bool | None) -> LoopState:
    """Seed this process, make every replica's trainable weights identical, build AdamW, the loss scaler and the
    KL controller."""
    runtime.seed_everything(seed + procs.rank)  # each process samples its own episodes (process 0 as a single run)
    shuffle_rng = torch.Generator().manual_seed(seed + procs.rank)  # minibatch shuffles, score-norm sample
    trainable = [p for p in policy.parameters() if p.requires_grad]
    procs.broadcast_parameters(trainable)  # the replicas were built alike; make certain they start identical
    # weight_decay 0 as in TRL's PPO: decaying LoRA weights would pull the policy towards SFT behind beta's back
    optimizer = torch.optim.AdamW(trainable, lr=params.learning_rate, eps=params.adam_eps, weight_decay=0.0)
    if loss_scaling is None:  # fp16's small gradients would underflow to zero without it
        loss_scaling = next(policy.model.get_base_model().parameters()).dtype == torch.float16
    # Disabled, the scaler is the identity: scale() returns the loss, step() is optimizer.step().
    scaler = torch.amp.GradScaler(device.type, enabled=loss_scaling)
    return LoopState(optimizer, scaler, make_kl_controller(params), shuffle_rng)


def set_learning_rate(optimizer: torch.optim.Optimizer, params: PPOParams, update: int, num_updates: int) -> float:
    """The learning rate of `update` (1-based): constant, or linear decay to 0 over the run."""
    lr = params.learning_rate
    if params.lr_schedule == "linear":
        lr *= 1.0 - (update - 1) / num_updates
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr


def train_ppo(policy: PolicyWithValue, tokenizer: Any, prompts: Sequence[Sequence[int]], score_fn: ScoreFn,
              params: PPOParams, *, device: torch.device | str, seed: int,
              on_log: Callable[[int, dict[str, float]], None] | None = None, progress: bool = True,
              evaluator: Evaluator | None = None, score_stats: tuple[float, float] | None = None,
              checkpoint: Checkpointing | None = None, procs: Processes = SINGLE,
              loss_scaling: bool | None = None,
              on_progress: Callable[[list[dict[str, float]], list[dict[str, float]]], None] | None = None
              ) -> PPOResult:
    """Run PPO on `policy` for total_episodes // (batch_size * processes) updates; returns the per-update stats.

    prompts: token-id lists (formatted and tokenized). score_fn: raw scores of a batch (see ScoreFn;
    `reward_model_score_fn` wraps an RM). tokenizer: pad/eos ids. score_stats: a known (mean, std) of the raw
    score; by default measured on SFT samples when normalize_score (else (0, 1)). evaluator: run before the first
    update, every eval_every updates and after the last (update 0 = the SFT policy); its gold/proxy go into that
    update's stats and into PPOResult.evals. on_log(update, stats) every log_every updates. on_progress(history,
    evals): the whole history and evaluations so far, once before the first update (a resumed run's restored ones
    included) and after every update; a live logger logs what it has not seen (edgerlhf.live.PPOLive).
    checkpoint: the loop's state every checkpoint_every updates; a run that finds a checkpoint of the same run
    continues from it and ends as an uninterrupted run would. procs: in a DDP run each process samples its own
    batch_size episodes per update, gradients are averaged before every optimizer step and the stats are means over
    all processes.
    loss_scaling: a GradScaler on the backward pass (default: when the backbone is fp16).
    """
    from tqdm.auto import tqdm

    _check_params(params, len(prompts), procs.world_size)
    _check_length(policy, prompts, params)
    device = torch.device(device)
    eos_id, pad_id = tokenizer.eos_token_id, _pad_id(tokenizer)
    configure_sampling(policy, params, eos_id, pad_id)
    start_time = time.perf_counter()
    state = init_loop(policy, params, seed, procs, device, loss_scaling)
    per_update = params.batch_size * procs.world_size
    num_updates = params.total_episodes // per_update
    evaluate = evaluator if (evaluator is not None and evaluator.prompts and params.eval_every) else None
    dtype = causal_lm(policy.model).get_output_embeddings().weight.dtype
    generated_tokens, generation_s = 0.0, 0.0
    run_id = checkpoint_identity(checkpoint.fingerprint if checkpoint else "", params, seed, len(prompts))
    ckpt = checkpoint.file(procs) if checkpoint and params.checkpoint_every else None
    if ckpt is not None and agree_on_checkpoint(ckpt, run_id, procs):
        load_checkpoint(ckpt, policy, state)  # policy, optimizer, beta and every RNG as after update state.update
        log.info("PPO: resumed from update %d of %d (%s)", state.update, num_updates, ckpt)
    else:  # the score normalisation is measured once, on the SFT policy, before any update
        state.score_stats = score_stats or ((0.0, 1.0) if not params.normalize_score else measure_score_stats(
            policy, prompts, score_fn, params, eos_id, pad_id, device, state.shuffle_rng, procs))
        if evaluate:
            state.evals.append({"update": 0.0, **evaluate(policy, score_fn, params, device)})
    if on_progress is not None:
        on_progress(state.history, state.evals)
    start = state.update
    bar = tqdm(range(start + 1, num_updates + 1), initial=state.update, total=num_updates, desc="ppo",
               unit="update", disable=not progress)
    for update in bar:
        lr = set_learning_rate(state.optimizer, params, update, num_updates)
        first = (update - 1) * per_update + procs.rank * params.batch_size  # this process's first episode
        batch_prompts = [prompts[i] for i in prompt_indices(len(prompts), seed, first, params.batch_size)]
        batch = collect_rollouts(policy, batch_prompts, score_fn, state.score_stats, params, eos_id, pad_id, device)
        generated_tokens += batch.mask.sum().item()
        generation_s += batch.generation_s
        beta = state.kl_ctl.value
        adv = compute_advantages(batch, beta, params)
        update_stats = ppo_update(policy, state.optimizer, state.scaler, batch, adv, params, state.shuffle_rng, procs)
        stats = mean_over_processes({"update": float(update), "episodes": float(update * per_update),
                                     **rollout_stats(batch, adv, beta), **update_stats, "beta": beta, "lr": lr}, procs)
        check_first_ratio(stats["ratio_dev_first"], dtype, update)
        state.kl_ctl.update(stats["kl"], per_update)
        if evaluate and (update % params.eval_every == 0 or update == num_updates):
            stats.update(evaluate(policy, score_fn, params, device))
            state.evals.append({"update": float(update), "gold": stats["gold"], "proxy": stats["proxy"]})
        state.history.append(stats)
        state.update = update
        bar.set_postfix(score=f"{stats['score']:.3f}", kl=f"{stats['kl']:.3f}")
        if on_log is not None and update % params.log_every == 0:
            on_log(update, stats)
        if on_progress is not None:
            on_progress(state.history, state.evals)
        if not all(math.isfinite(v) for k, v in stats.items() if k != "explained_variance"):
            raise EdgeRLHFError(f"PPO diverged at update {update} (non-finite stats); lower ppo.learning_rate")
        if ckpt is not None and update % params.checkpoint_every == 0 and update < num_updates:
            save_checkpoint(ckpt, run_id, policy, state)  # not after the last: the caller saves the result
    policy.eval()
    wall = time.perf_counter() - start_time
    episodes_run = (num_updates - start) * per_update  # by this call: a resumed run's throughput is its own
    return PPOResult(history=state.history, score_mean=state.score_stats[0], score_std=state.score_stats[1],
                     episodes=num_updates * per_update, updates=num_updates, wall_time_s=wall,
                     episodes_per_s=episodes_run / wall if wall > 0 else 0.0, evals=state.evals,
                     rollout_tokens_per_s=generated_tokens / generation_s if generation_s > 0 else 0.0,
                     ratio_dev_tolerance=RATIO_DEV_TOLERANCE[dtype])


# =========================================================================== 8. resumable checkpoints


@dataclass
class Checkpointing:
    """Where the loop keeps its checkpoints, and the caller's fingerprint (stage, all params, input files) that a
    checkpoint must carry to be resumed."""

    dir: str | Path
    fingerprint: str = ""

    def file(self, procs: Processes) -> Path:
        """This process's checkpoint file: in a DDP run each process keeps its own (its RNG states differ)."""
        return Path(self.dir) / checkpoint_name(procs)


def checkpoint_identity(fingerprint: str, params: PPOParams, seed: int, n_prompts: int) -> str:
    """What a checkpoint must have been made for to be resumed: the caller's fingerprint (stage, all params, input
    files) and, for callers without one, the PPO params, seed and number of prompts."""
    return json.dumps({"fingerprint": fingerprint, "ppo": dataclasses.asdict(params), "seed": seed,
                       "prompts": n_prompts}, sort_keys=True)


def checkpoint_name(procs: Processes) -> str:
    """The checkpoint file of this process: in a DDP run each process keeps its own (its RNG states differ)."""
    return CHECKPOINT_FILE if procs.world_size == 1 else f"checkpoint-rank{procs.rank}.safetensors"


def checkpoint_update(path: Path, run_id: str) -> int | None:
    """The update a readable checkpoint of this run was saved after; None if there is none (or not ours)."""
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads(f.metadata()["state"])
    except (OSError, ValueError, KeyError, TypeError, SafetensorError):
        return None
    return int(meta["update"]) if meta.get("run") == run_id else None


def agree_on_checkpoint(path: Path, run_id: str, procs: Processes) -> bool:
    """Whether every process has a checkpoint of the same update to resume from. A kill between two processes'
    saves leaves them at different updates; then none resumes (and the stale files go) rather than diverge."""
    updates = procs.gather_object(checkpoint_update(path, run_id))
    if updates[0] is not None and len(set(updates)) == 1:
        return True
    if procs.world_size > 1 and any(u is not None for u in updates):
        log.info("PPO: the processes' checkpoints are of different updates (%s); starting afresh", updates)
    if path.is_file():
        log.info("PPO: discarding the checkpoint %s: unreadable, or made for other params or inputs", path)
        path.unlink()
    return False




def save_checkpoint(path: Path, run_id: str, policy: PolicyWithValue, state: LoopState) -> None:
    """Everything the loop carries from one update to the next, in one safetensors file (no pickle): trainable
    weights (LoRA + value head), AdamW moments, every RNG state as tensors; beta, score normalisation, loss scale,
    history and evaluations as JSON metadata. Written to a temporary file and renamed, so a kill never leaves half
    a one."""
    import numpy as np
    from safetensors.torch import save_file

    tensors = {f"param.{n}": p.detach().cpu().contiguous() for n, p in policy.named_parameters() if p.requires_grad}
    optim = state.optimizer.state_dict()
    for index, opt_state in optim["state"].items():
        for key, value in opt_state.items():
            tensors[f"optim.{index}.{key}"] = torch.as_tensor(value).detach().cpu().contiguous()
    tensors["rng.torch"] = torch.get_rng_state()
    tensors["rng.shuffle"] = state.shuffle_rng.get_state()
    if torch.cuda.is_available():
        for i, rng in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = rng
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    tensors["rng.numpy"] = torch.from_numpy(np_keys.astype(np.int64))
    meta = {"run": run_id, "update": state.update, "beta": state.kl_ctl.value, "score_stats": list(state.score_stats),
            "grad_scaler": state.scaler.state_dict(), "history": state.history, "evals": state.evals,
            "optim_param_groups": optim["param_groups"], "python_random": random.getstate(),
            "numpy_random": [np_kind, np_pos, np_has_gauss, np_gauss]}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    save_file(tensors, str(tmp), metadata={"state": json.dumps(meta)})
    os.replace(tmp, path)


def load_checkpoint(path: Path, policy: PolicyWithValue, state: LoopState) -> None:
    """Restore `save_checkpoint`'s state into the policy, `state` and the RNGs. Only for a checkpoint that
    `agree_on_checkpoint` accepted (ours, readable header)."""
    import numpy as np
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads(f.metadata()["state"])
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except (OSError, ValueError, KeyError, TypeError, SafetensorError) as exc:
        raise ArtifactError(f"the PPO checkpoint {path} is corrupted ({exc}); delete it to start the stage "
                            "afresh") from exc
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if p.requires_grad:
                p.copy_(tensors[f"param.{name}"])
    optim_state: dict[int, dict[str, Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, index, name = key.split(".", 2)
            optim_state.setdefault(int(index), {})[name] = value
    groups = [{**g, "betas": tuple(g["betas"])} for g in meta["optim_param_groups"]]
    state.optimizer.load_state_dict({"state": optim_state, "param_groups": groups})
    state.kl_ctl.value = meta["beta"]
    if meta.get("grad_scaler"):
        state.scaler.load_state_dict(meta["grad_scaler"])
    torch.set_rng_state(tensors["rng.torch"])
    state.shuffle_rng.set_state(tensors["rng.shuffle"])
    if torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensors[f"rng.cuda.{i}"] for i in range(torch.cuda.device_count())
                                      if f"rng.cuda.{i}" in tensors])
    version, internal, gauss = meta["python_random"]
    random.setstate((version, tuple(internal), gauss))
    np_kind, np_pos, np_has_gauss, np_gauss = meta["numpy_random"]
    np.random.set_state((np_kind, tensors["rng.numpy"].numpy().astype(np.uint32), np_pos, np_has_gauss, np_gauss))
    state.update, state.history, state.evals = meta["update"], meta["history"], meta["evals"]
    state.score_stats = tuple(meta["score_stats"])
