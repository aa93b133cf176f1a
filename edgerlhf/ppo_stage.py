"""The PPO stage's glue: load policy (merged SFT + fresh LoRA + value head) and the quantized RM, run
`ppo.train_ppo`, save the policy, and turn its history into metrics (the curves are logged live: edgerlhf.live)."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from pathlib import Path

import torch
import yaml

from edgerlhf import modeling, paths, ppo, precisions
from edgerlhf.config import Params, to_dict
from edgerlhf.distributed import SINGLE, Processes
from edgerlhf.judge import describe, gold_judge, read_info
from edgerlhf.modeling import Device

log = logging.getLogger("edgerlhf")

# Every per-update stat of train_ppo (ppo.rollout_stats, ppo.UPDATE_STATS and the first-step checks) is a curve,
# logged live at step = update (dvclive/ppo/<P>/plots/metrics/<key>.tsv; "update" is the step itself);
# tests/test_ppo_trust.py guards that none is left out.
PLOT_KEYS = ("update", "episodes", "score", "score_norm", "kl", "beta", "rlhf_reward", "entropy", "clipfrac",
             "approx_kl", "value_loss", "policy_loss", "vf_clipfrac", "grad_norm", "ratio_dev_first",
             "skipped_steps", "explained_variance", "lr", "response_tokens", "no_eos_fraction")


def tokenize_prompts(tokenizer, records: list[dict]) -> list[list[int]]:
    """Prompt token ids (no special tokens added: the prompt text already carries the dialogue markers)."""
    return [tokenizer(r["prompt"], add_special_tokens=False)["input_ids"] for r in records]


def load_policy_base(params: Params, device: Device) -> torch.nn.Module:
    """The merged SFT model in the compute dtype: the policy's backbone and, adapter off, the reference."""
    return modeling.load_causal_lm(paths.SFT_MERGED, device, trust_remote_code=params.model.trust_remote_code)


PROBE_FILE = "probe_logprobs.json"


@torch.no_grad()
def probe_logprobs(policy: ppo.PolicyWithValue, tokenizer, records: list[dict], temperature: float,
                   reference: bool = False) -> list[list[float]]:
    """Per-token log-probs (and the same forward's values) of fixed prompt -> chosen pairs: a fingerprint of
    the trained policy that a reload must reproduce exactly."""
    query, query_mask = ppo.left_pad(tokenize_prompts(tokenizer, records), tokenizer.pad_token_id, policy.device)
    responses = [tokenizer(r["chosen"], add_special_tokens=False)["input_ids"] for r in records]
    width = max(len(x) for x in responses)
    response = torch.full((len(records), width), tokenizer.pad_token_id, dtype=torch.long, device=policy.device)
    response_mask = torch.zeros_like(response)
    for i, ids in enumerate(responses):
        response[i, :len(ids)] = torch.tensor(ids)
        response_mask[i, :len(ids)] = 1
    rollout = ppo.Rollout(query=query, query_mask=query_mask, response=response, response_mask=response_mask,
                          has_eos=torch.ones(len(records), dtype=torch.bool, device=policy.device))
    logp, _, _ = ppo.rollout_logprobs_values(policy, rollout, temperature, len(records), reference=reference)
    return [row[m.bool()].tolist() for row, m in zip(logp.cpu(), response_mask.cpu())]


def _finite(x: float) -> float:
    """A stat that train_ppo guarantees finite (it stops on a non-finite one), rounded for stable diffs."""
    if not math.isfinite(x):
        raise ValueError(f"non-finite PPO stat {x}")
    return round(x, 6)


def explained_variance_summary(history: list[dict]) -> dict[str, float | int]:
    """Mean and last of the explained variance over the updates where it is defined, and how many were not."""
    defined = [row["explained_variance"] for row in history if math.isfinite(row["explained_variance"])]
    summary: dict[str, float | int] = {"explained_variance_undefined_updates": len(history) - len(defined)}
    if defined:
        summary.update({"explained_variance_mean": _finite(sum(defined) / len(defined)),
                        "explained_variance_end": _finite(defined[-1])})
    return summary


def run_ppo(params: Params, precision: str, device: Device, out_dir: Path, splits: dict[str, list[dict]], *,
            checkpoint_dir: Path | None = None, fingerprint: str = "", procs: Processes = SINGLE,
            on_progress: Callable[[list[dict], list[dict]], None] | None = None) -> dict:
    """Train the PPO policy against reward@precision; save it to `out_dir`. Returns the stage's metrics.
    splits: ppo_prompts and eval_prompts as the stage read and checked them (data.read_splits).
    checkpoint_dir / fingerprint: resumable checkpoints every ppo.checkpoint_every updates (see train_ppo).
    procs: this process's place in a DDP run (each process samples its own episodes; see train_ppo).
    on_progress: train_ppo's live logging hook (edgerlhf.live.PPOLive; None in the processes that do not log)."""
    tokenizer = modeling.load_tokenizer(paths.SFT_MERGED, params.model.trust_remote_code)
    base = load_policy_base(params, device)
    policy = ppo.build_policy(base, params.ppo, modeling.lora_targets(base, params.lora.target_modules))
    rm = precisions.load_reward_model(paths.SFT_MERGED, paths.reward_dir(precision), precision, device,
                                    params.model.trust_remote_code)
    log.info("reward model at %s: quantized=%s, footprint %.1f MiB", precision,
             precisions.is_quantized(rm, precision), modeling.model_memory_mb(rm))
    score_fn = ppo.reward_model_score_fn(rm, tokenizer.pad_token_id, params.ppo.logprob_chunk_size)
    prompts = tokenize_prompts(tokenizer, splits["ppo_prompts"])
    eval_records = splits["eval_prompts"]
    gold = gold_judge(params, device)  # a model judge is loaded only for each evaluation pass
    trainable, total = modeling.count_params(policy)
    per_update = params.ppo.batch_size * procs.world_size
    log.info("PPO: %d prompts, %d updates of %d episodes (%s), %d trainable params (LoRA r=%d + value head), "
             "gold judge: %s", len(prompts), params.ppo.total_episodes // per_update, per_update, procs.describe(),
             trainable, params.ppo.lora_r, describe(read_info()))
    evaluator = (ppo.Evaluator(gold, tokenize_prompts(tokenizer, eval_records), tokenizer, params.seed + 1)
                 if gold else None)
    result = ppo.train_ppo(policy, tokenizer, prompts, score_fn, params.ppo, device=device.torch_device,
                           seed=params.seed, evaluator=evaluator, procs=procs, progress=procs.is_main,
                           checkpoint=ppo.Checkpointing(checkpoint_dir, fingerprint) if checkpoint_dir else None,
                           on_progress=on_progress)

    ppo.save_policy(policy, out_dir, (result.score_mean, result.score_std))
    modeling.save_tokenizer(tokenizer, out_dir)
    probe = eval_records[:8]
    (out_dir / PROBE_FILE).write_text(json.dumps({
        "records": probe, "temperature": params.ppo.temperature,
        "logprobs": probe_logprobs(policy, tokenizer, probe, params.ppo.temperature)}))
    (out_dir / "params_used.yaml").write_text(yaml.safe_dump(
        {"precision": precision, "seed": params.seed, "ppo": to_dict(params.ppo), "lora": to_dict(params.lora)},
        sort_keys=False))

    h = result.history
    kl_at = {int(row["update"]): row["kl"] for row in h}
    evals = [{"update": int(e["update"]), "kl": _finite(kl_at.get(int(e["update"]), 0.0)),
              "gold": _finite(e["gold"]), "proxy": _finite(e["proxy"])} for e in result.evals]
    metrics = {
        "proxy_reward_start": _finite(h[0]["score"]),
        "proxy_reward_end": _finite(h[-1]["score"]),
        "kl_end": _finite(h[-1]["kl"]),
        "entropy_end": _finite(h[-1]["entropy"]),
        "clipfrac_mean": _finite(sum(r["clipfrac"] for r in h) / len(h)),
        "vf_clipfrac_mean": _finite(sum(r["vf_clipfrac"] for r in h) / len(h)),
        "grad_norm_mean": _finite(sum(r["grad_norm"] for r in h) / len(h)),
        "ratio_dev_first_max": _finite(max(r["ratio_dev_first"] for r in h)),
        "ratio_dev_tolerance": result.ratio_dev_tolerance,
        "skipped_steps": int(sum(r["skipped_steps"] for r in h)),
        "value_loss_end": _finite(h[-1]["value_loss"]),
        **explained_variance_summary(h),
        "beta_end": _finite(h[-1]["beta"]),
        "episodes": result.episodes,
        "updates": result.updates,
        "episodes_per_s": _finite(result.episodes_per_s),
        "rollout_tokens_per_s": _finite(result.rollout_tokens_per_s),
        "score_norm_mean": _finite(result.score_mean),
        "score_norm_std": _finite(result.score_std),
        "trainable_params": trainable,
    }
    if evals:
        metrics.update({"eval_gold_start": evals[0]["gold"], "eval_gold_end": evals[-1]["gold"],
                        "eval_proxy_start": evals[0]["proxy"], "eval_proxy_end": evals[-1]["proxy"]})
    log.info("PPO@%s: proxy reward %.3f -> %.3f, KL %.3f, %.2f episodes/s", precision,
             metrics["proxy_reward_start"], metrics["proxy_reward_end"], metrics["kl_end"],
             metrics["episodes_per_s"])
    return metrics
