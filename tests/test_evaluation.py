"""Evaluation and report: unit tests on tiny models and hand values, then checks of the session's pipeline run
(`pipeline_run`): eval.json recomputable from reports/samples.jsonl, summary numbers traceable to metrics."""

import copy
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from edgerlhf import evaluation as E
from edgerlhf import live, paths, ppo
from edgerlhf import metrics as M
from edgerlhf import report as R
from edgerlhf.config import PPOParams, parse_params
from edgerlhf.judge import KINDS, describe

PRECISIONS = ["bf16", "int8", "int4"]


# --------------------------------------------------------------------------- generation on a tiny model


class FakeTokenizer:
    eos_token_id = 1
    pad_token_id = 0

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(str(i) for i in ids if not (skip_special_tokens and i in (0, 1)))


def _tiny_policy(seed: int, lora_std: float) -> ppo.PolicyWithValue:
    from transformers import AutoModelForCausalLM, GPT2Config

    torch.manual_seed(0)  # the same base weights for every policy (= one SFT model)
    base = AutoModelForCausalLM.from_config(GPT2Config(vocab_size=16, n_positions=32, n_embd=32, n_layer=1,
                                                       n_head=2, bos_token_id=1, eos_token_id=1, pad_token_id=0))
    policy = ppo.build_policy(copy.deepcopy(base), PPOParams(lora_r=4, lora_alpha=8, gradient_checkpointing=False),
                              ["c_attn", "c_proj", "c_fc"])
    gen = torch.Generator().manual_seed(seed)
    for name, p in policy.model.named_parameters():
        if "lora_B" in name:  # a trained adapter: B away from zero, different per policy
            p.data = torch.randn(p.shape, generator=gen) * lora_std
    return policy.eval()


PROMPTS = [[4, 5, 6], [7, 8], [9, 10, 11, 12], [13, 14], [15, 4, 6], [5, 7]]


def test_sft_samples_are_the_same_from_any_policys_reference():
    torch.set_num_threads(1)
    sampling = PPOParams(temperature=0.7, response_length=6)
    a, b = _tiny_policy(1, 0.5), _tiny_policy(2, 0.5)
    ref_a = E.generate(a, FakeTokenizer(), PROMPTS, sampling, 4, seed=3, reference=True, progress=False)
    ref_b = E.generate(b, FakeTokenizer(), PROMPTS, sampling, 4, seed=3, reference=True, progress=False)
    assert ref_a.responses == ref_b.responses and ref_a.kl == [0.0] * len(PROMPTS)
    for ra, rb in zip(ref_a.rollouts, ref_b.rollouts):
        assert torch.equal(ra.response, rb.response) and torch.equal(ra.response_mask, rb.response_mask)
    # the same seed reproduces a policy's samples; the adapter changes them
    pol1 = E.generate(a, FakeTokenizer(), PROMPTS, sampling, 4, seed=3, progress=False)
    pol2 = E.generate(a, FakeTokenizer(), PROMPTS, sampling, 4, seed=3, progress=False)
    assert pol1.responses == pol2.responses and pol1.kl == pol2.kl
    assert pol1.responses != ref_a.responses
    assert len(pol1.tokens) == len(PROMPTS) and all(1 <= t <= 6 for t in pol1.tokens)


def test_sequence_kl_is_the_summed_log_ratio_at_the_sampling_temperature():
    torch.set_num_threads(1)
    sampling = PPOParams(temperature=0.7, response_length=6)
    policy = _tiny_policy(1, 0.5)
    gens = E.generate(policy, FakeTokenizer(), PROMPTS, sampling, 4, seed=0, progress=False)
    expected = []
    for ro in gens.rollouts:
        ids, mask = ro.input_ids, ro.attention_mask
        with torch.no_grad():
            logits, _ = policy(ids, mask)
            with policy.reference():
                ref_logits, _ = policy(ids, mask)
        n = ro.response.shape[1]
        lp = torch.log_softmax(logits[:, -n - 1:-1] / 0.7, -1).gather(-1, ro.response[..., None])[..., 0]
        rp = torch.log_softmax(ref_logits[:, -n - 1:-1] / 0.7, -1).gather(-1, ro.response[..., None])[..., 0]
        expected += ((lp - rp) * ro.response_mask).sum(1).tolist()
    assert gens.kl == pytest.approx(expected, abs=1e-4)
    assert np.mean(gens.kl) > 0  # a policy that moved away from SFT


def test_sampling_params_take_the_eval_settings():
    params = parse_params({"eval": {"temperature": 0.9, "top_k": 5, "top_p": 0.8, "max_new_tokens": 7},
                           "ppo": {"temperature": 0.5}})
    s = E.sampling_params(params)
    assert (s.temperature, s.top_k, s.top_p, s.response_length) == (0.9, 5, 0.8, 7)
    assert s.batch_size == params.ppo.batch_size


# --------------------------------------------------------------------------- metric assembly, hand values


def test_choice_agreement_hand_values():
    # pairs: bf16 prefers c, c, r, tie; int8 prefers c, r, r, c -> agree on pairs 1 and 3 -> 0.5
    assert M.choice_agreement([2, 2, 0, 1], [1, 1, 1, 1], [3, 0, 0, 2], [1, 1, 1, 1]) == 0.5
    assert M.choice_agreement([1, 1], [1, 0], [5, 5], [5, 0]) == 1.0  # a tie agrees with a tie


def test_rm_agreement_hand_values_and_constant_scores():
    scores = {"bf16": {"chosen": [1, 2, 3], "rejected": [0, 5, 1]},
              "int8": {"chosen": [10, 20, 30], "rejected": [0, 50, 10]},
              "int4": {"chosen": [1, 1, 1], "rejected": [1, 1, 1]}}
    out = E.rm_agreement(scores, {"bf16": [1, 2, 3, 4], "int8": [4, 3, 2, 1], "int4": [1, 2, 3, 4]})
    assert out["rm_int8"] == {"spearman_vs_bf16": 1.0, "choice_agreement_vs_bf16": 1.0,
                              "spearman_vs_bf16_eval": -1.0}
    # constant int4 scores: no rank correlation on rm_test (key left out); every pair a tie -> bf16 never ties
    assert "spearman_vs_bf16" not in out["rm_int4"]
    assert out["rm_int4"]["choice_agreement_vs_bf16"] == 0.0
    assert out["rm_int4"]["spearman_vs_bf16_eval"] == 1.0
    assert E.rm_agreement({"int8": scores["int8"]}) == {}


def test_policy_metrics_hand_values():
    gens = E.Generations(rollouts=[], responses=["a", "b", "c", "d"], tokens=[2, 4, 6, 8],
                         has_eos=[True, True, False, True], kl=[1.0, 2.0, 3.0, 2.0])
    proxy = {"bf16": [1.0, 2.0, 3.0, 4.0], "int8": [0.0, 0.0, 1.0, 1.0]}
    gold, sft_gold = [2.0, 1.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0]
    m = E.policy_metrics("ppo_int8", gens, proxy, "int8", gold, sft_gold, [0.0, 0.0, 0.0, 0.0], 200, 0)
    assert m["proxy_reward"] == 0.5 and m["proxy_bf16"] == 2.5 and m["proxy_int8"] == 0.5
    assert m["kl_to_sft"] == 2.0 and m["response_tokens"] == 5.0 and m["no_eos_fraction"] == 0.25
    assert m["gold_reward"] == 1.0 and m["win_rate_vs_sft"] == 0.5  # win, tie, loss, tie
    assert m["gold_reward_lo"] <= 1.0 <= m["gold_reward_hi"]
    assert 0.0 <= m["win_rate_vs_sft_lo"] <= 0.5 <= m["win_rate_vs_sft_hi"] <= 1.0
    assert m["gold_gain_vs_sft"] == 0.0 and m["gold_gain_per_kl"] == 0.0 and m["proxy_gain_vs_sft"] == 0.5
    # paired differences 1, 0, -1, 0: the gain's interval is the bootstrap of their mean
    assert (m["gold_gain_vs_sft_lo"], m["gold_gain_vs_sft_hi"]) == pytest.approx(
        M.bootstrap_ci([1.0, 0.0, -1.0, 0.0], 200, 0, level=E.INTERVAL_LEVEL), abs=1e-6)
    assert m["gold_gain_vs_sft_lo"] < 0.0 < m["gold_gain_vs_sft_hi"]
    no_gold = E.policy_metrics("sft", gens, proxy, "bf16", None, None, proxy["bf16"], 200, 0)
    assert not any(k.startswith(("gold", "win")) for k in no_gold)
    assert m["empty_response_fraction"] == 0.0 == no_gold["empty_response_fraction"]
    sft = E.policy_metrics("sft", gens, proxy, "bf16", sft_gold, sft_gold, proxy["bf16"], 200, 0)
    assert not any(k.startswith("gold_gain") for k in sft)  # SFT has no gain over itself


def test_gold_gain_interval_is_a_paired_bootstrap_over_prompts():
    n = 40
    gens = E.Generations(rollouts=[], responses=["x"] * n, tokens=[3] * n, has_eos=[True] * n, kl=[1.0] * n)
    proxy = {"bf16": [0.0] * n}
    sft_gold = np.random.default_rng(0).normal(0.0, 1.0, n)  # prompts of very different difficulty

    def ppo_metrics(gold):
        return E.policy_metrics("ppo_bf16", gens, proxy, "bf16", list(gold), list(sft_gold), proxy["bf16"], 500, 3)

    # the same gain on every prompt: every resample has that mean difference, a zero-width interval at it
    const = ppo_metrics(sft_gold + 0.25)
    assert const["gold_gain_vs_sft"] == const["gold_gain_vs_sft_lo"] == const["gold_gain_vs_sft_hi"] == 0.25
    # responses that follow SFT's per prompt, a small gain and noise: the paired interval is far narrower than the
    # marginal ones (which overlap SFT's) and lies above zero; it is the bootstrap of the differences
    gold = sft_gold + 0.1 + np.random.default_rng(1).normal(0.0, 0.05, n)
    m = ppo_metrics(gold)
    sft_lo, sft_hi = M.bootstrap_ci(sft_gold, 500, 3, level=E.INTERVAL_LEVEL)
    assert m["gold_gain_vs_sft"] == pytest.approx(np.mean(gold - sft_gold), abs=1e-6)
    assert m["gold_gain_vs_sft"] == pytest.approx(m["gold_reward"] - np.mean(sft_gold), abs=2e-6)
    assert (m["gold_gain_vs_sft_lo"], m["gold_gain_vs_sft_hi"]) == pytest.approx(
        M.bootstrap_ci(gold - sft_gold, 500, 3, level=E.INTERVAL_LEVEL), abs=1e-6)
    assert 0.0 < m["gold_gain_vs_sft_lo"] <= m["gold_gain_vs_sft"] <= m["gold_gain_vs_sft_hi"]
    paired = m["gold_gain_vs_sft_hi"] - m["gold_gain_vs_sft_lo"]
    assert paired < 0.2 * (m["gold_reward_hi"] - m["gold_reward_lo"]) and paired < 0.2 * (sft_hi - sft_lo)
    assert m["gold_reward_lo"] < sft_hi  # the marginal intervals overlap: they could not resolve this gain


def test_empty_response_fraction_counts_empty_and_whitespace_responses():
    # an EOS alone decodes to "" (1 token); whitespace-only text is empty too; a lone "0" is not
    gens = E.Generations(rollouts=[], responses=["", "  \n\t", "ok", " 0 ", ""], tokens=[1, 3, 2, 3, 1],
                         has_eos=[True] * 5, kl=[0.0] * 5)
    m = E.policy_metrics("sft", gens, {"bf16": [0.0] * 5}, "bf16", None, None, None, 10, 0)
    assert m["empty_response_fraction"] == 0.6
    assert E.empty_response_fraction(["a", "b"]) == 0.0 and E.empty_response_fraction([" "]) == 1.0
    assert E.empty_response_fraction([]) == 0.0


# --------------------------------------------------------------------------- report, hand-made metrics


def _fake_run(tmp_path: Path, gold: bool = True, bf16_gold: float = 1.2, labels: str = "human",
              judge: dict | None = None, judge_metrics: dict | None = None) -> R.RunMetrics:
    """A metrics/ tree of a made-up run: bf16 PPO at `bf16_gold`, int8 hacks its RM (proxy up, gold down). The judge
    stage's files: `judge` (models/judge/judge.json; rules with gold, none without) and `judge_metrics`. Gold gains
    carry a paired interval of ±0.15 (bf16: above zero at the default 1.2, includes zero at 0.9) and int8's
    [-1.1, -0.5] lies below zero."""
    ev = {"prompts": 64, "bootstrap_samples": 1000, "interval_level_pct": 95, "wall_time_s": 3.5,
          "peak_vram_gb": 0.0}
    sft = {"proxy_reward": 1.9, "proxy_bf16": 1.9, "proxy_int8": 2.2, "kl_to_sft": 0.0, "response_tokens": 12.5}
    bf = {"proxy_reward": 2.4, "proxy_bf16": 2.4, "proxy_int8": 2.5, "kl_to_sft": 2.0, "response_tokens": 13.0,
          "proxy_gain_vs_sft": 0.5}
    i8 = {"proxy_reward": 3.6, "proxy_bf16": 3.0, "proxy_int8": 3.6, "kl_to_sft": 5.0, "response_tokens": 8.0,
          "proxy_gain_vs_sft": 1.4}
    if gold:
        sft.update(gold_reward=1.0, gold_reward_lo=0.7, gold_reward_hi=1.3, win_rate_vs_sft=0.5,
                   win_rate_vs_sft_lo=0.5, win_rate_vs_sft_hi=0.5)
        bf.update(gold_reward=bf16_gold, gold_reward_lo=bf16_gold - 0.3, gold_reward_hi=bf16_gold + 0.3,
                  win_rate_vs_sft=0.625, win_rate_vs_sft_lo=0.53, win_rate_vs_sft_hi=0.72,
                  gold_gain_vs_sft=round(bf16_gold - 1.0, 6), gold_gain_vs_sft_lo=round(bf16_gold - 1.15, 6),
                  gold_gain_vs_sft_hi=round(bf16_gold - 0.85, 6), gold_gain_per_kl=round((bf16_gold - 1.0) / 2.0, 6))
        i8.update(gold_reward=0.2, gold_reward_lo=-0.1, gold_reward_hi=0.5, win_rate_vs_sft=0.3,
                  win_rate_vs_sft_lo=0.2, win_rate_vs_sft_hi=0.4, gold_gain_vs_sft=-0.8, gold_gain_vs_sft_lo=-1.1,
                  gold_gain_vs_sft_hi=-0.5, gold_gain_per_kl=-0.16)
    ev.update(sft=sft, ppo_bf16=bf, ppo_int8=i8,
              rm_int8={"spearman_vs_bf16": 0.88, "choice_agreement_vs_bf16": 0.92, "spearman_vs_bf16_eval": 0.69})
    m = tmp_path / "metrics"
    files = {
        "data.json": {"sft_train_count": 1000, "rm_train_count": 400, "rm_test_count": 500,
                      "sft_train_mean_prompt_chars": 48.1,
                      "sft_train_mean_chosen_chars": 34.7, "sft_train_mean_rejected_chars": 34.4,
                      "rm_test_mean_prompt_chars": 48.2, "rm_test_mean_chosen_chars": 34.2,
                      "rm_test_mean_rejected_chars": 35.0, "skipped": 0},
        "sft.json": {"base_eval_loss": 0.29, "eval_loss": 0.28, "eval_perplexity": 1.33, "train_loss": 0.31,
                     "trainable_params": 32768, "total_params": 165632, "optimizer_steps": 126, "wall_time_s": 5.2,
                     "peak_vram_gb": 0.0},
        "eval.json": ev,
    }
    for p, acc in (("bf16", 0.914), ("int8", 0.906)):
        files[f"reward/{p}.json"] = {"accuracy": acc, "auc": 0.82, "ece": 0.035, "mean_margin": 2.9,
                                     "model_memory_mb": 0.5 if p == "bf16" else 0.226, "adapter_size_mb": 0.1272,
                                     "wall_time_s": 17.0, "peak_vram_gb": 0.0}
    files["ppo/bf16.json"] = {"proxy_reward_start": 1.7, "proxy_reward_end": 2.8, "kl_end": 1.57,
                              "entropy_end": 0.19, "episodes": 640, "episodes_per_s": 184.6, "wall_time_s": 3.6,
                              "peak_vram_gb": 0.0}
    files["ppo/int8.json"] = {"proxy_reward_start": 1.9, "proxy_reward_end": 3.2, "kl_end": 4.5, "entropy_end": 0.23,
                              "episodes": 640, "episodes_per_s": 177.7, "wall_time_s": 3.8, "peak_vram_gb": 0.0}
    if gold:
        files["ppo/bf16.json"].update(eval_gold_start=1.33, eval_gold_end=1.69, eval_proxy_start=1.83,
                                      eval_proxy_end=2.48)
        files["ppo/int8.json"].update(eval_gold_start=1.33, eval_gold_end=-0.17, eval_proxy_start=2.37,
                                      eval_proxy_end=3.69)
    if judge_metrics is None:
        judge_metrics = {"rm_test_pairs": 500, "accuracy_vs_human": 1.0, "tie_fraction": 0.0} if gold else \
            {"rm_test_pairs": 500}
    files["judge.json"] = {**judge_metrics, "wall_time_s": 0.4}
    for rel, obj in files.items():
        (m / rel).parent.mkdir(parents=True, exist_ok=True)
        (m / rel).write_text(json.dumps(obj))
    info = tmp_path / "models/judge/judge.json"
    info.parent.mkdir(parents=True, exist_ok=True)
    judge = judge if judge is not None else {"kind": "rules" if gold else "none"}
    # as the judge stage writes it: with the description the report prints (judge.describe)
    info.write_text(json.dumps({**judge, "description": describe(judge)} if judge.get("kind") in KINDS else judge))
    for p, rows in (("bf16", [(0, 0.0, 1.33, 1.83), (20, 1.57, 1.69, 2.48)]),
                    ("int8", [(0, 0.0, 1.33, 2.37), (20, 4.5, -0.17, 3.69)])):  # as the PPO stage logs them
        curve = live.eval_file(tmp_path / paths.live_dir("ppo", p))
        curve.parent.mkdir(parents=True, exist_ok=True)
        curve.write_text(json.dumps([dict(zip(("update", *live.EVAL_KEYS), r)) for r in rows]))
    return R.load_run(tmp_path, ["bf16", "int8"], "synthetic" if gold else "hub", labels)


def test_number_tokens_skip_identifiers():
    text = "ppo_bf16 at int8: gold 1.250 [-0.125, 2.000] over 64 prompts, bf16 16. Done 3.5."
    assert R.numbers_in(text) == ["1.250", "-0.125", "2.000", "64", "16", "3.5"]
    assert R.unsupported_numbers("gold 1.250, n 64, x 0.000", [1.2501, 64, -0.0001]) == []
    assert R.unsupported_numbers("gold 1.260 and 7", [1.2501, 64]) == ["1.260", "7"]
    assert R.fmt(0.1234567) == "0.123" and R.fmt(640) == "640" and R.fmt(-0.0001) == "0.000"
    assert R.fmt(None) == "-" and R.fmt(float("nan")) == "-"


def test_summary_numbers_come_from_metrics_and_verdict_flags_hacking(tmp_path):
    run = _fake_run(tmp_path, bf16_gold=1.2)
    text = R.write_report(run, tmp_path / "metrics", tmp_path / "reports")
    assert R.unsupported_numbers(text, R.metric_values(tmp_path / "metrics")) == []
    assert "**Reward hacking at int8** (proxy up, gold down): during PPO" in text
    assert "No reward hacking (proxy up while gold down) at: bf16" in text
    assert "Best gold reward per unit of KL: the **bf16**" in text
    assert "**ppo_bf16** vs SFT: gold gain +0.200 [0.050, 0.350] (paired over prompts), an improvement over SFT " \
        "(the paired interval excludes zero)" in text and "did not beat" not in text and "clear" not in text
    assert "**ppo_int8** vs SFT: gold gain -0.800 [-1.100, -0.500] (paired over prompts), worse than SFT" in text
    assert (tmp_path / "reports/charts/gold_vs_kl.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "reports/charts/eval_comparison.png").read_bytes()[:4] == b"\x89PNG"
    assert "](charts/gold_vs_kl.png)" in text and "](charts/eval_comparison.png)" in text
    assert "Gold judge: the synthetic task's rule scorer" in text and "outside referee" in text


def test_verdict_says_plainly_when_bf16_does_not_beat_sft(tmp_path):
    run = _fake_run(tmp_path, bf16_gold=0.9)  # gain -0.1, paired interval [-0.25, 0.05]; yet wins more prompts
    lines = R.verdict(run)
    assert "gold gain -0.100 [-0.250, 0.050] (paired over prompts), no gold difference this eval set can resolve " \
        "(the paired interval includes zero)" in lines[0]
    assert "mixed" not in lines[0] and "win-rate vs SFT 0.625 [0.530, 0.720] (ties half)" in lines[0]
    plain = [line for line in lines if "did not beat SFT on gold reward" in line]
    assert plain and "proxy gain +0.500" in plain[0] and "finds no gain this eval set can resolve" in plain[0]
    assert "within the sampling noise of 64 eval prompts (the paired interval includes zero)" in plain[0]
    assert any("No PPO policy improved on SFT's gold reward" in line for line in lines)
    weak = [line for line in lines if line.startswith("Possible reward hacking at bf16 (weak evidence)")]
    assert weak and "on eval_prompts proxy +0.500 vs SFT while gold -0.100" in weak[0]
    assert "within the noise (the paired interval includes zero)" in weak[0]
    text = R.build_summary(run)
    assert R.unsupported_numbers(text, R.metric_values(tmp_path / "metrics")) == []


def test_report_without_gold_judge_says_so(tmp_path):
    run = _fake_run(tmp_path, gold=False)
    text = R.write_report(run, tmp_path / "metrics", tmp_path / "reports")
    assert "**No gold judge: eval.judge none**" in text and "eval.judge: model" in text
    assert "gold reward [lo, hi]" not in R.eval_table(run.eval, run.precisions)
    assert not (tmp_path / "reports/charts/gold_vs_kl.png").exists() and "gold_vs_kl" not in text
    assert R.unsupported_numbers(text, R.metric_values(tmp_path / "metrics")) == []


def test_report_refuses_an_untraceable_number(tmp_path, monkeypatch):
    from edgerlhf.errors import EdgeRLHFError

    run = _fake_run(tmp_path)
    monkeypatch.setattr(R, "build_summary", lambda run: "made up 0.777")
    with pytest.raises(EdgeRLHFError, match="0.777"):
        R.write_report(run, tmp_path / "metrics", tmp_path / "reports")


# --------------------------------------------------------------------------- the session's pipeline run


@pytest.fixture()
def run(pipeline_run) -> Path:
    return pipeline_run


def _load(run: Path, rel: str):
    return json.loads((run / rel).read_text())


def _samples(run: Path) -> tuple[list[dict], list[dict]]:
    rows = [json.loads(line) for line in (run / "reports/samples.jsonl").read_text().splitlines()]
    return [r for r in rows if r["split"] == "eval_prompts"], [r for r in rows if r["split"] == "rm_test"]


def _flat(obj) -> list:
    if isinstance(obj, dict):
        return [x for v in obj.values() for x in _flat(v)]
    return [obj]


@pytest.mark.slow
def test_eval_metrics_shape(run):
    ev = _load(run, "metrics/eval.json")
    assert all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in _flat(ev))
    for name in ["sft"] + [f"ppo_{p}" for p in PRECISIONS]:
        m = ev[name]
        for key in ("gold_reward", "proxy_reward", "kl_to_sft", "win_rate_vs_sft", "response_tokens"):
            assert key in m, (name, key)
        assert m["gold_reward_lo"] <= m["gold_reward"] <= m["gold_reward_hi"], name
        assert m["win_rate_vs_sft_lo"] <= m["win_rate_vs_sft"] <= m["win_rate_vs_sft_hi"], name
        assert all(f"proxy_{p}" in m for p in PRECISIONS)
    assert ev["sft"]["kl_to_sft"] == 0.0 and ev["sft"]["win_rate_vs_sft"] == 0.5
    assert ev["sft"]["proxy_reward"] == ev["sft"]["proxy_bf16"]
    for p in PRECISIONS:
        assert ev[f"ppo_{p}"]["proxy_reward"] == ev[f"ppo_{p}"][f"proxy_{p}"]
        assert ev[f"ppo_{p}"]["kl_to_sft"] > 0
    for p in ("int8", "int4"):
        assert -1 <= ev[f"rm_{p}"]["spearman_vs_bf16"] <= 1 and 0 <= ev[f"rm_{p}"]["choice_agreement_vs_bf16"] <= 1
    assert ev["prompts"] == _load(run, "metrics/data.json")["eval_prompts_count"]


@pytest.mark.slow
def test_eval_metrics_recompute_from_samples(run):
    """win-rate, Spearman and every mean in eval.json follow from reports/samples.jsonl."""
    import yaml

    ev = _load(run, "metrics/eval.json")
    seed = yaml.safe_load((run / "params.yaml").read_text())["seed"]
    rows, test_rows = _samples(run)
    assert len(rows) == ev["prompts"]
    names = ["sft"] + [f"ppo_{p}" for p in PRECISIONS]
    col = {n: {k: [r[k][n] for r in rows] for k in ("gold", "kl_to_sft", "response_tokens")} for n in names}
    for n in names:
        m = ev[n]
        assert m["win_rate_vs_sft"] == pytest.approx(M.win_rate(col[n]["gold"], col["sft"]["gold"]), abs=1e-6)
        assert m["gold_reward"] == pytest.approx(np.mean(col[n]["gold"]), abs=1e-6)
        assert (m["gold_reward_lo"], m["gold_reward_hi"]) == pytest.approx(
            M.bootstrap_ci(col[n]["gold"], ev["bootstrap_samples"], seed), abs=1e-6)
        assert m["kl_to_sft"] == pytest.approx(np.mean(col[n]["kl_to_sft"]), abs=1e-6)
        assert m["response_tokens"] == pytest.approx(np.mean(col[n]["response_tokens"]), abs=1e-6)
        assert m["empty_response_fraction"] == pytest.approx(
            np.mean([not r["responses"][n].strip() for r in rows]), abs=1e-6)
        for p in PRECISIONS:
            assert m[f"proxy_{p}"] == pytest.approx(np.mean([r["proxy"][p][n] for r in rows]), abs=1e-6)
    # the gold judge on the stored texts gives the stored gold scores
    from edgerlhf.synthetic import gold_score

    assert all(r["gold"][n] == gold_score(r["prompt"], r["responses"][n]) for r in rows for n in names)
    # RM agreement from the rm_test rows (the reward stages' saved scores)
    for p in ("int8", "int4"):
        ref = [r["proxy"]["bf16"]["chosen"] for r in test_rows] + [r["proxy"]["bf16"]["rejected"] for r in test_rows]
        q = [r["proxy"][p]["chosen"] for r in test_rows] + [r["proxy"][p]["rejected"] for r in test_rows]
        assert ev[f"rm_{p}"]["spearman_vs_bf16"] == pytest.approx(M.spearman(ref, q), abs=1e-6)
        same = np.mean([np.sign(r["proxy"][p]["chosen"] - r["proxy"][p]["rejected"])
                        == np.sign(r["proxy"]["bf16"]["chosen"] - r["proxy"]["bf16"]["rejected"]) for r in test_rows])
        assert ev[f"rm_{p}"]["choice_agreement_vs_bf16"] == pytest.approx(same, abs=1e-6)
        saved = _load(run, f"models/reward/{p}/rm_test_scores.json")
        assert [r["proxy"][p]["chosen"] for r in test_rows] == saved["chosen"]
        eval_ref = [r["proxy"]["bf16"][n] for n in names for r in rows]
        eval_q = [r["proxy"][p][n] for n in names for r in rows]
        assert ev[f"rm_{p}"]["spearman_vs_bf16_eval"] == pytest.approx(M.spearman(eval_ref, eval_q), abs=1e-6)


@pytest.mark.slow
def test_summary_has_only_metrics_numbers_and_answers_the_question(run):
    text = (run / "reports/summary.md").read_text()
    values = [v for path in (run / "metrics").rglob("*.json") for v in _flat(json.loads(path.read_text()))]
    tokens = R.numbers_in(text)
    assert len(tokens) > 50
    for token in tokens:  # an independent check of every number at the rounding it is printed with
        decimals = len(token.split(".")[1]) if "." in token else 0
        assert any(f"{v:.{decimals}f}".replace("-0.000", "0.000") == token for v in values), token
    ev = _load(run, "metrics/eval.json")
    for name in ["sft"] + [f"ppo_{p}" for p in PRECISIONS]:
        m = ev[name]
        assert f"{R.fmt(m['gold_reward'])} [{R.fmt(m['gold_reward_lo'])}, {R.fmt(m['gold_reward_hi'])}]" in text
    beats = ev["ppo_bf16"]["gold_reward"] > ev["sft"]["gold_reward"]
    assert beats or "**The bf16 PPO policy did not beat SFT on gold reward.** Why:" in text
    for section in ("## Verdict", "## Evaluation", "## Reward-model agreement", "## Data", "## SFT",
                    "## Reward models", "## PPO runs"):
        assert section in text
    for png in ("gold_vs_kl.png", "eval_comparison.png"):
        assert f"](charts/{png})" in text and (run / "reports/charts" / png).read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_dvc_plots_show_renders_the_precisions_side_by_side(run, tmp_path):
    env_path = str(Path(sys.executable).parent)
    import os

    proc = subprocess.run(["dvc", "plots", "show", "-o", str(tmp_path / "plots")], cwd=run, capture_output=True,
                          text=True, env={**os.environ, "PATH": env_path + ":" + os.environ["PATH"]})
    assert proc.returncode == 0, proc.stderr
    html = (tmp_path / "plots/index.html").read_text()
    for plot_id in ("gold_vs_kl", "proxy_vs_kl", "ppo_reward", "ppo_kl", "reward_loss", "sft_loss"):
        assert f'id = "{plot_id}"' in html
    # from the PPO stages' live files, one series per precision, named by it
    spec = html.split('id = "gold_vs_kl"')[1].split("</script>")[0]
    assert all(f'"filename": "{p}/plots/custom/eval.json"' in spec for p in PRECISIONS)
    spec = html.split('id = "ppo_reward"')[1].split("</script>")[0]
    assert all(f'"filename": "{p}/plots/metrics/score.tsv"' in spec for p in PRECISIONS)

