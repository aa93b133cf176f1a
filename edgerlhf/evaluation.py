"""The evaluate stage: SFT and every PPO policy on held-out `eval_prompts`, scored by every proxy RM and the gold
judge, plus the agreement of the quantized RMs with the bf16 one on `rm_test`.

Generation takes the PPO rollout code path (`ppo.configure_sampling` + `ppo.generate_responses` on left-padded
prompts) with the eval.* sampling settings, and every policy starts from the same torch seed, so the policies
differ only by their weights, not by sampling noise. The SFT policy is the PPO reference: a PPO policy with its
adapter disabled, which is exactly models/sft/merged.

Metric keys (metrics/eval.json, numbers only): one object per policy (`sft`, `ppo_<P>`) and per quantized RM
(`rm_int8`, `rm_int4`); see `policy_metrics` and `rm_agreement`. reports/samples.jsonl holds every response and
score, so each aggregate can be recomputed from it (tests/test_evaluation.py does).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from edgerlhf import data, modeling, paths, ppo, runtime
from edgerlhf import metrics as M
from edgerlhf.config import Params, PPOParams
from edgerlhf.errors import ArtifactError, ConfigError
from edgerlhf.judge import describe, free_memory, gold_judge, read_info, require_judge
from edgerlhf.modeling import Device
from edgerlhf.ppo_stage import load_policy_base, tokenize_prompts
from edgerlhf.precisions import is_quantized, load_reward_model

log = logging.getLogger("edgerlhf")

SFT = "sft"
INTERVAL_LEVEL = 0.95


def policy_name(precision: str) -> str:
    """The eval.json / samples.jsonl key of the PPO policy trained against reward@precision."""
    return f"ppo_{precision}"


def rm_name(precision: str) -> str:
    return f"rm_{precision}"


def sampling_params(params: Params) -> PPOParams:
    """PPOParams carrying the eval.* sampling settings (what `ppo.configure_sampling` reads)."""
    e = params.eval
    return dataclasses.replace(params.ppo, temperature=e.temperature, top_k=e.top_k, top_p=e.top_p,
                               response_length=e.max_new_tokens)


@dataclass
class Generations:
    """One policy's samples on the eval prompts (CPU tensors, one Rollout per batch)."""

    rollouts: list[ppo.Rollout]
    responses: list[str]
    tokens: list[int]
    has_eos: list[bool]
    kl: list[float] = field(default_factory=list)  # sequence-level log pi - log pi_sft, summed over the response


def _cpu(r: ppo.Rollout) -> ppo.Rollout:
    return ppo.Rollout(r.query.cpu(), r.query_mask.cpu(), r.response.cpu(), r.response_mask.cpu(), r.has_eos.cpu())


def decode_responses(tokenizer: Any, rollout: ppo.Rollout) -> list[str]:
    """Response texts up to and including the first EOS, special tokens dropped (as the PPO stage decodes)."""
    return [tokenizer.decode(row[m.bool()].tolist(), skip_special_tokens=True)
            for row, m in zip(rollout.response, rollout.response_mask, strict=True)]


@torch.no_grad()
def generate(policy: ppo.PolicyWithValue, tokenizer: Any, prompts: Sequence[Sequence[int]], sampling: PPOParams,
             batch_size: int, seed: int, *, reference: bool = False, kl_chunk_size: int = 16,
             desc: str = "generate", progress: bool = True) -> Generations:
    """Sample one response per prompt in batches of `batch_size`, from a fresh torch seed (so two policies see the
    same sampling noise). With `reference` the adapter is off (= the SFT policy) and the KL to SFT is 0 by
    definition; otherwise the sequence KL sum_t (log pi - log pi_sft)(y_t) is computed at the sampling temperature
    from a no-grad forward with position ids (`ppo.rollout_logprobs_values`)."""
    from tqdm.auto import tqdm

    eos_id, pad_id = tokenizer.eos_token_id, ppo._pad_id(tokenizer)
    ppo.configure_sampling(policy, sampling, eos_id, pad_id)
    runtime.seed_everything(seed)  # python + torch (CPU and CUDA): identical noise for every policy
    out = Generations([], [], [], [])
    starts = range(0, len(prompts), batch_size)
    for start in tqdm(starts, desc=desc, unit="batch", disable=not progress, leave=False):
        query, query_mask = ppo.left_pad(prompts[start:start + batch_size], pad_id, policy.device)
        ro = ppo.generate_responses(policy, query, query_mask, eos_id, pad_id, reference=reference)
        if reference:
            out.kl += [0.0] * len(query)
        else:
            logp, _, _ = ppo.rollout_logprobs_values(policy, ro, sampling.temperature, kl_chunk_size)
            ref, _, _ = ppo.rollout_logprobs_values(policy, ro, sampling.temperature, kl_chunk_size, reference=True)
            out.kl += ((logp - ref) * ro.response_mask).sum(1).float().cpu().tolist()
        ro = _cpu(ro)
        out.rollouts.append(ro)
        out.responses += decode_responses(tokenizer, ro)
        out.tokens += ro.response_mask.sum(1).tolist()
        out.has_eos += ro.has_eos.tolist()
    return out


@torch.no_grad()
def rm_scores(reward_model: torch.nn.Module, gens: Generations, pad_token_id: int, chunk_size: int) -> list[float]:
    """Raw scores of a policy's samples under a reward model: [prompt][response] re-packed right-padded, read at
    the last valid token (as PPO scored its rollouts)."""
    score = ppo.reward_model_score_fn(reward_model, pad_token_id, chunk_size)
    out: list[float] = []
    for ro in gens.rollouts:
        out += score(ro.query, ro.query_mask, ro.response, ro.response_mask).float().cpu().tolist()
    return out


def _r(x: float) -> float:
    return round(float(x), 6)


def empty_response_fraction(responses: Sequence[str]) -> float:
    """Share of responses that are empty or only whitespace once decoded (an EOS alone decodes to '')."""
    return float(np.mean([not r.strip() for r in responses])) if responses else 0.0


def policy_metrics(name: str, gens: Generations, proxy: dict[str, list[float]], own_rm: str,
                   gold: list[float] | None, sft_gold: list[float] | None, sft_proxy_own: list[float] | None,
                   n_boot: int, seed: int) -> dict[str, float]:
    """eval.json object of one policy.

    gold_reward (+_lo/_hi): mean gold score with a percentile bootstrap interval over prompts; win_rate_vs_sft
    (+_lo/_hi): P(gold > SFT's gold on the same prompt), ties half; proxy_reward: mean raw score under its own RM
    (`own_rm`; bf16 for SFT), proxy_<P>: under every RM; kl_to_sft: mean sequence KL; response_tokens: mean
    response length in tokens (EOS included); no_eos_fraction: share cut off at max_new_tokens;
    empty_response_fraction: share empty or whitespace after decoding; gold/proxy_gain_vs_sft and gold_gain_per_kl
    for PPO policies, with gold_gain_vs_sft_lo/_hi: the percentile bootstrap interval of the mean of the per-prompt
    paired differences gold[i] - sft_gold[i] (same resamples, seed and level as gold_reward's), the interval the
    report words its verdict from."""
    out: dict[str, float] = {
        "proxy_reward": _r(np.mean(proxy[own_rm])),
        **{f"proxy_{p}": _r(np.mean(s)) for p, s in proxy.items()},
        "kl_to_sft": _r(np.mean(gens.kl)),
        "response_tokens": _r(np.mean(gens.tokens)),
        "no_eos_fraction": _r(1.0 - np.mean(gens.has_eos)),
        "empty_response_fraction": _r(empty_response_fraction(gens.responses)),
    }
    if gold is not None and sft_gold is not None:
        lo, hi = M.bootstrap_ci(gold, n_boot, seed, level=INTERVAL_LEVEL)
        wins = np.asarray(gold) > np.asarray(sft_gold)
        ties = np.asarray(gold) == np.asarray(sft_gold)
        wlo, whi = M.bootstrap_ci(wins + 0.5 * ties, n_boot, seed, level=INTERVAL_LEVEL)
        out.update({"gold_reward": _r(np.mean(gold)), "gold_reward_lo": _r(lo), "gold_reward_hi": _r(hi),
                    "win_rate_vs_sft": _r(M.win_rate(gold, sft_gold)), "win_rate_vs_sft_lo": _r(wlo),
                    "win_rate_vs_sft_hi": _r(whi)})
    if name != SFT:
        if sft_proxy_own is not None:
            out["proxy_gain_vs_sft"] = _r(np.mean(proxy[own_rm]) - np.mean(sft_proxy_own))
        if gold is not None and sft_gold is not None:
            diffs = np.asarray(gold, float) - np.asarray(sft_gold, float)  # paired: the same prompt
            gain = float(np.mean(diffs))
            glo, ghi = M.bootstrap_ci(diffs, n_boot, seed, level=INTERVAL_LEVEL)
            out.update({"gold_gain_vs_sft": _r(gain), "gold_gain_vs_sft_lo": _r(glo), "gold_gain_vs_sft_hi": _r(ghi)})
            kl = float(np.mean(gens.kl))
            if kl > 0:
                out["gold_gain_per_kl"] = _r(gain / kl)
    return out


def rm_agreement(test_scores: dict[str, dict[str, list[float]]], eval_scores: dict[str, list[float]] | None = None
                 ) -> dict[str, dict[str, float]]:
    """Per quantized RM vs bf16: spearman_vs_bf16 (over every rm_test response, chosen and rejected),
    choice_agreement_vs_bf16 (same preferred response on rm_test pairs) and, given `eval_scores` (all policies'
    eval samples per RM), spearman_vs_bf16_eval on the responses the policies actually produce."""
    out: dict[str, dict[str, float]] = {}
    if "bf16" not in test_scores:
        return out
    ref = test_scores["bf16"]
    for p, s in test_scores.items():
        if p == "bf16":
            continue
        row = {"spearman_vs_bf16": M.spearman(ref["chosen"] + ref["rejected"], s["chosen"] + s["rejected"]),
               "choice_agreement_vs_bf16": M.choice_agreement(ref["chosen"], ref["rejected"], s["chosen"],
                                                            s["rejected"])}
        if eval_scores is not None:
            row["spearman_vs_bf16_eval"] = M.spearman(eval_scores["bf16"], eval_scores[p])
        for key, value in list(row.items()):
            if not math.isfinite(value):  # a constant-score RM: no rank correlation exists; leave the key out
                log.warning("%s: %s is undefined (constant scores); left out of eval.json", rm_name(p), key)
                del row[key]
        out[rm_name(p)] = {k: _r(v) for k, v in row.items()}
    return out


def read_rm_test_scores(precision: str, n_pairs: int) -> dict[str, list[float]]:
    """The rm_test scores the reward stage saved (chosen and rejected lists), checked against the split size."""
    path = paths.reward_dir(precision) / "rm_test_scores.json"
    if not path.is_file():
        raise ArtifactError(f"{path} is missing: run `dvc repro reward@{precision}` first")
    try:
        scores = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"{path} is not valid JSON ({exc}): rerun `dvc repro reward@{precision}`") from None
    if not isinstance(scores, dict) or len(scores.get("chosen", [])) != n_pairs \
            or len(scores.get("rejected", [])) != n_pairs:
        raise ArtifactError(f"{path} does not hold {n_pairs} chosen/rejected scores (one per rm_test pair): "
                            f"rerun `dvc repro reward@{precision}`")
    return {"chosen": [float(x) for x in scores["chosen"]], "rejected": [float(x) for x in scores["rejected"]]}


def check_inputs(params: Params) -> None:
    """Everything the evaluate stage will load or read, checked before any model is loaded: the merged SFT model,
    each PPO policy (adapter + value head) and reward model as safetensors without pickle files, the eval_prompts
    and rm_test splits record by record, and each reward model's rm_test scores. One ArtifactError/DataError line
    otherwise, and the previous metrics/eval.json and reports/samples.jsonl stay as they are."""
    modeling.require_model(paths.SFT_MERGED, "sft")
    for p in params.reward.precisions:
        modeling.require_policy(paths.ppo_dir(p), f"ppo@{p}")
        modeling.require_adapter(paths.reward_dir(p), f"reward@{p}")
    data.read_splits(params.data.sizes, "eval_prompts")
    test = data.read_labelled(params.data.sizes, "rm_test")["rm_test"]
    for p in params.reward.precisions:
        read_rm_test_scores(p, len(test))
    require_judge()


def _check_length(max_positions: int | None, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> None:
    longest = max(len(p) for p in prompts)
    if max_positions and longest + max_new_tokens > max_positions:
        also = f" or lower eval.max_new_tokens to <= {max_positions - longest}" if longest < max_positions else ""
        raise ConfigError(f"eval.max_new_tokens ({max_new_tokens}) + the longest eval prompt ({longest} tokens) "
                          f"exceeds the model's {max_positions} positions: lower data.max_prompt_chars or use a "
                          f"model with more positions (model.tiny.n_positions, model.name){also}")


def generate_all(params: Params, device: Device, tokenizer: Any, prompts: Sequence[Sequence[int]],
                 sampling: PPOParams, progress: bool) -> dict[str, Generations]:
    """Samples of SFT (the reference of the first PPO policy, adapter off) and of every PPO policy, one model in
    memory at a time, each from the same seed."""
    chunk = params.ppo.logprob_chunk_size
    gens: dict[str, Generations] = {}
    for i, p in enumerate(params.reward.precisions):
        base = load_policy_base(params, device)  # the folders were checked by check_inputs (and load_policy)
        if i == 0:
            config = base.config
            _check_length(getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None),
                          prompts, sampling.response_length)
        policy = ppo.load_policy(base, paths.ppo_dir(p))
        if i == 0:  # the reference of any PPO policy is the merged SFT model, bit for bit
            log.info("policy sft: %s (= the PPO reference, adapter disabled), device %s", paths.SFT_MERGED,
                     device.describe())
            gens[SFT] = generate(policy, tokenizer, prompts, sampling, params.eval.batch_size, params.seed,
                                 reference=True, kl_chunk_size=chunk, desc="generate sft", progress=progress)
        log.info("policy %s: %s + %s, device %s", policy_name(p), paths.SFT_MERGED, paths.ppo_dir(p),
                 device.describe())
        gens[policy_name(p)] = generate(policy, tokenizer, prompts, sampling, params.eval.batch_size, params.seed,
                                        kl_chunk_size=chunk, desc=f"generate {policy_name(p)}", progress=progress)
        del policy, base
        free_memory()
    return gens


def sample_rows(prompt_texts: list[str], gens: dict[str, Generations], proxy: dict[str, dict[str, list[float]]],
                gold: dict[str, list[float]] | None, test_records: list[dict],
                test_scores: dict[str, dict[str, list[float]]]) -> list[dict]:
    """reports/samples.jsonl: every eval prompt with each policy's response and scores, then every rm_test pair
    with each RM's scores."""
    names, precisions = list(gens), list(proxy)
    samples: list[dict] = []
    for i, text in enumerate(prompt_texts):
        row: dict[str, Any] = {"split": "eval_prompts", "index": i, "prompt": text,
                               "responses": {n: gens[n].responses[i] for n in names}}
        if gold:
            row["gold"] = {n: gold[n][i] for n in names}
        row["proxy"] = {p: {n: proxy[p][n][i] for n in names} for p in precisions}
        row["kl_to_sft"] = {n: gens[n].kl[i] for n in names}
        row["response_tokens"] = {n: gens[n].tokens[i] for n in names}
        row["has_eos"] = {n: gens[n].has_eos[i] for n in names}
        samples.append(row)
    for i, rec in enumerate(test_records):
        samples.append({"split": "rm_test", "index": i, "prompt": rec["prompt"], "chosen": rec["chosen"],
                        "rejected": rec["rejected"],
                        "proxy": {p: {"chosen": test_scores[p]["chosen"][i], "rejected": test_scores[p]["rejected"][i]}
                                  for p in precisions}})
    return samples


def run_evaluation(params: Params, device: Device, *, progress: bool = True) -> tuple[dict, list[dict]]:
    """Generate, score and compare; returns (eval.json content without timing, samples.jsonl rows)."""
    precisions = list(params.reward.precisions)
    trust = params.model.trust_remote_code
    tokenizer = modeling.load_tokenizer(paths.SFT_MERGED, trust)
    pad_id = ppo._pad_id(tokenizer)
    records = data.read_split(paths.split_file("eval_prompts"))
    prompt_texts = [r["prompt"] for r in records]
    prompts = tokenize_prompts(tokenizer, records)
    sampling = sampling_params(params)
    chunk = params.ppo.logprob_chunk_size
    gold_fn = gold_judge(params, device)
    log.info("evaluate: %d eval prompts, sampling T=%g top_k=%d top_p=%g, %d new tokens, seed %d; gold judge: %s",
             len(prompts), sampling.temperature, sampling.top_k, sampling.top_p, sampling.response_length,
             params.seed, describe(read_info()))

    gens = generate_all(params, device, tokenizer, prompts, sampling, progress)
    names = list(gens)

    # every response under every proxy RM (one RM in memory at a time)
    proxy: dict[str, dict[str, list[float]]] = {}  # precision -> policy -> scores
    for p in precisions:
        rm = load_reward_model(paths.SFT_MERGED, paths.reward_dir(p), p, device, trust)
        log.info("reward model %s at %s: quantized=%s, footprint %.1f MiB, device %s", paths.reward_dir(p), p,
                 is_quantized(rm, p), modeling.model_memory_mb(rm), device.describe())
        proxy[p] = {n: rm_scores(rm, gens[n], pad_id, chunk) for n in names}
        del rm
        free_memory()

    gold = None
    if gold_fn is not None:  # one pass over every policy's responses: a model judge is loaded once, then freed
        flat = [float(g) for g in gold_fn(prompt_texts * len(names), [r for n in names for r in gens[n].responses])]
        gold = {n: flat[i * len(prompts):(i + 1) * len(prompts)] for i, n in enumerate(names)}
    sft_rm = "bf16" if "bf16" in precisions else precisions[0]
    result: dict[str, Any] = {}
    for n in names:
        own = sft_rm if n == SFT else n.removeprefix("ppo_")
        result[n] = policy_metrics(n, gens[n], {p: proxy[p][n] for p in precisions}, own,
                                   gold[n] if gold else None, gold[SFT] if gold else None,
                                   proxy[own][SFT], params.eval.bootstrap_samples, params.seed)

    test_records = data.read_labelled(params.data.sizes, "rm_test")["rm_test"]
    test_scores = {p: read_rm_test_scores(p, len(test_records)) for p in precisions}
    eval_scores = {p: [s for n in names for s in proxy[p][n]] for p in precisions}
    result.update(rm_agreement(test_scores, eval_scores))
    result["prompts"] = len(prompts)
    result["bootstrap_samples"] = params.eval.bootstrap_samples
    result["interval_level_pct"] = round(100 * INTERVAL_LEVEL)

    samples = sample_rows(prompt_texts, gens, proxy, gold, test_records, test_scores)
    for n in names:
        m = result[n]
        log.info("%-9s gold %s, proxy %.3f, KL %.3f, win-rate vs SFT %s, %.1f tokens", n,
                 f"{m['gold_reward']:.3f} [{m['gold_reward_lo']:.3f}, {m['gold_reward_hi']:.3f}]"
                 if "gold_reward" in m else "n/a", m["proxy_reward"], m["kl_to_sft"],
                 f"{m['win_rate_vs_sft']:.3f}" if "win_rate_vs_sft" in m else "n/a", m["response_tokens"])
    return result, samples

