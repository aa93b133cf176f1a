"""The report on hand-made metrics: the gold judge named with how far to trust it, the labels setup, no gold chart
without gold, the verdict's one sentence per policy worded from the paired interval of its gold gain, and the
reward-hacking flags that need no gold judge (length collapse, empty responses)."""

import json
import re
from pathlib import Path

import pytest

from edgerlhf import report as R
from edgerlhf.errors import ArtifactError, ConfigError
from tests.test_evaluation import _fake_run

HUB_JUDGE = {"kind": "model", "source": "hub", "name": "Skywork/Skywork-Reward-V2-Qwen3-0.6B", "revision": "main",
             "commit": "c0ffee1234abcd"}


def _edit_eval(tmp_path: Path, **policies: dict) -> None:
    """Update policies' objects in metrics/eval.json."""
    path = tmp_path / "metrics/eval.json"
    ev = json.loads(path.read_text())
    for name, values in policies.items():
        ev[name].update(values)
    path.write_text(json.dumps(ev))


def _reload(tmp_path: Path, gold: bool = True, labels: str = "human") -> R.RunMetrics:
    return R.load_run(tmp_path, ["bf16", "int8"], "synthetic" if gold else "hub", labels)


def _verdict(text: str) -> str:
    return text.split("## Verdict")[1].split("\n## ")[0]


def _traceable(text: str, tmp_path: Path) -> None:
    assert R.unsupported_numbers(text, R.metric_values(tmp_path / "metrics")) == []


# --------------------------------------------------------------------------- the verdict per policy vs SFT

# Phrases that would contradict each conclusion, in any verdict bullet naming the policy.
CONTRADICTS = {
    R.IMPROVED: ("did not beat", "no gold difference", "includes zero", "within the noise", "worse than SFT",
                 "below SFT", "clear", "mixed"),
    R.WORSE: ("improvement", "improved", "no gold difference", "includes zero", "within the noise", "clear", "mixed"),
    R.UNRESOLVED: ("improvement", "improved", "worse than SFT", "below SFT", "clear", "mixed"),
}
INT8_SMALL_GAIN = {"gold_reward": 1.031, "gold_reward_lo": 0.73, "gold_reward_hi": 1.33, "gold_gain_vs_sft": 0.031,
                   "gold_gain_vs_sft_lo": -0.05, "gold_gain_vs_sft_hi": 0.11, "gold_gain_per_kl": 0.0062,
                   "win_rate_vs_sft": 0.56, "win_rate_vs_sft_lo": 0.51, "win_rate_vs_sft_hi": 0.62}


def _bullets(verdict: str, p: str) -> list[str]:
    """The verdict bullets that name policy ppo_`p` (as ppo_p or as the bare precision; not "the p-RM policy")."""
    name = re.compile(rf"(?<![\w-])(?:ppo_)?{p}(?![\w-])")
    return [line for line in verdict.splitlines() if line.startswith("- ") and name.search(line)]


def _check_one_sentence_per_policy(text: str, run: R.RunMetrics, expected: dict[str, str]) -> None:
    """Each PPO policy has exactly one sentence against SFT, with the conclusion of its paired interval, and no
    other bullet naming it says otherwise."""
    verdict = _verdict(text)
    for p, outcome in expected.items():
        assert R.gain_outcome(run, p) == outcome
        bullets = _bullets(verdict, p)
        own = [b for b in bullets if b.startswith(f"- **ppo_{p}** vs SFT:")]
        assert len(own) == 1, bullets
        assert R.CONCLUSIONS[outcome] in own[0]
        for bullet in bullets:
            assert not [w for w in CONTRADICTS[outcome] if w in bullet], (p, bullet)


@pytest.mark.parametrize("bf16_gold", [1.2, 0.9])
def test_a_small_gain_whose_paired_interval_includes_zero_is_not_an_improvement(tmp_path, bf16_gold):
    # the case of issue #16: +0.031 with win-rate above even odds was once "a clear improvement"
    _fake_run(tmp_path, bf16_gold=bf16_gold)
    _edit_eval(tmp_path, ppo_int8=INT8_SMALL_GAIN)
    run = _reload(tmp_path)
    text = R.write_report(run, tmp_path / "metrics", tmp_path / "reports")
    _traceable(text, tmp_path)
    own = [b for b in _bullets(_verdict(text), "int8") if b.startswith("- **ppo_int8**")]
    assert own == ["- **ppo_int8** vs SFT: gold gain +0.031 [-0.050, 0.110] (paired over prompts), no gold "
                   "difference this eval set can resolve (the paired interval includes zero); gold 1.031 [0.730, "
                   "1.330] against SFT's 1.000 [0.700, 1.300], win-rate vs SFT 0.560 [0.510, 0.620] (ties half)."]
    bf16 = R.IMPROVED if bf16_gold > 1 else R.UNRESOLVED
    _check_one_sentence_per_policy(text, run, {"bf16": bf16, "int8": R.UNRESOLVED})
    verdict = _verdict(text)
    assert "**int8**" not in verdict  # never the best gold per KL: its gain is not resolved
    if bf16 == R.UNRESOLVED:
        assert "No PPO policy improved on SFT's gold reward by more than this eval set can resolve" in verdict
    # int8's periodic eval still shows proxy up, gold down: flagged as weak evidence, in the same terms
    weak = [b for b in _bullets(verdict, "int8") if "reward hacking" in b]
    assert weak == [b for b in weak if b.startswith("- Possible reward hacking at int8 (weak evidence): during PPO")]
    assert weak and weak[0].endswith("within the noise (the paired interval includes zero).")


def test_a_gain_whose_paired_interval_excludes_zero_is_an_improvement(tmp_path):
    run = _fake_run(tmp_path)  # bf16 +0.2 [0.05, 0.35] though its marginal gold interval overlaps SFT's
    text = R.write_report(run, tmp_path / "metrics", tmp_path / "reports")
    _traceable(text, tmp_path)
    verdict = _verdict(text)
    assert "- **ppo_bf16** vs SFT: gold gain +0.200 [0.050, 0.350] (paired over prompts), an improvement over SFT " \
        "(the paired interval excludes zero);" in verdict
    assert "- **ppo_int8** vs SFT: gold gain -0.800 [-1.100, -0.500] (paired over prompts), worse than SFT (the " \
        "paired interval excludes zero, below it);" in verdict
    assert "Best gold reward per unit of KL: the **bf16** reward model" in verdict
    assert "**Reward hacking at int8** (proxy up, gold down)" in verdict
    _check_one_sentence_per_policy(text, run, {"bf16": R.IMPROVED, "int8": R.WORSE})


def test_a_loss_beyond_the_noise_is_worse_even_when_the_win_rate_is_above_even_odds(tmp_path):
    # the other case of issue #16: bf16 was "mixed" in one bullet and "did not beat SFT" in the next
    _fake_run(tmp_path, bf16_gold=0.9)  # win-rate [0.53, 0.72]
    _edit_eval(tmp_path, ppo_bf16={"gold_gain_vs_sft_lo": -0.18, "gold_gain_vs_sft_hi": -0.02})
    run = _reload(tmp_path)
    text = R.write_report(run, tmp_path / "metrics", tmp_path / "reports")
    _traceable(text, tmp_path)
    _check_one_sentence_per_policy(text, run, {"bf16": R.WORSE, "int8": R.WORSE})
    verdict = _verdict(text)
    assert "**The bf16 PPO policy did not beat SFT on gold reward.** Why: its own reward model scores it above SFT " \
        "(proxy gain +0.500) while the gold judge scores it below SFT" in verdict
    assert "**Reward hacking at bf16** (proxy up, gold down)" in verdict  # now beyond the noise
    assert "win-rate vs SFT 0.625 [0.530, 0.720] (ties half)." in verdict  # reported, no conclusion of its own


def test_an_eval_json_without_the_paired_interval_asks_for_evaluate(tmp_path):
    _fake_run(tmp_path)
    path = tmp_path / "metrics/eval.json"
    ev = json.loads(path.read_text())
    for key in ("gold_gain_vs_sft_lo", "gold_gain_vs_sft_hi"):
        ev["ppo_int8"].pop(key)
    path.write_text(json.dumps(ev))
    run = _reload(tmp_path)
    with pytest.raises(ArtifactError, match=r"no paired interval of ppo_int8's gold gain.*rerun `dvc repro evaluate`"):
        R.write_report(run, tmp_path / "metrics", tmp_path / "reports")
    assert not (tmp_path / "reports/summary.md").exists()
    R.write_report(_fake_run(tmp_path, gold=False), tmp_path / "metrics", tmp_path / "reports")  # no gold: not needed


# --------------------------------------------------------------------------- reward hacking without gold


@pytest.mark.parametrize("gold", [True, False])
def test_summary_flags_a_collapsed_policy_and_empty_responses(tmp_path, gold):
    _fake_run(tmp_path, gold=gold)
    _edit_eval(tmp_path, sft={"response_tokens": 12.5, "empty_response_fraction": 0.0},
               ppo_bf16={"response_tokens": 13.0, "empty_response_fraction": 0.1},
               ppo_int8={"response_tokens": 5.0, "empty_response_fraction": 0.4})
    run = _reload(tmp_path, gold)
    text = R.write_report(run, tmp_path / "metrics", tmp_path / "reports")
    _traceable(text, tmp_path)
    verdict = _verdict(text)
    assert "**Length collapse at ppo_int8:** its responses average 5.000 tokens, under half of SFT's 12.500" \
        in verdict
    assert "**Empty responses at ppo_int8:** a share of 0.400 of its eval responses are empty (SFT: 0.000)" \
        in verdict
    assert "at ppo_bf16" not in verdict and "at sft" not in verdict  # 13 tokens, a share of 0.1 empty: no flag
    assert "| empty responses" in text and "0.400" in R.eval_table(run.eval, run.precisions)


def test_collapse_and_empty_flags_at_their_thresholds(tmp_path):
    assert R.LENGTH_COLLAPSE_RATIO == 0.5  # the summary words it "under half"
    _fake_run(tmp_path)
    # exactly half of SFT's length is not a collapse; a share at the threshold is flagged, also for SFT itself
    _edit_eval(tmp_path, sft={"response_tokens": 12.5, "empty_response_fraction": R.EMPTY_RESPONSE_FLAG},
               ppo_bf16={"response_tokens": 6.25, "empty_response_fraction": R.EMPTY_RESPONSE_FLAG - 0.01},
               ppo_int8={"response_tokens": 6.2})
    lines = R.degeneration_flags(_reload(tmp_path))
    assert [line.split(":**")[0] for line in lines] == ["**Empty responses at sft", "**Length collapse at ppo_int8"]
    assert "before any PPO" in lines[0] and "not reward hacking" in lines[0]


def test_no_flags_without_the_keys(tmp_path):
    run = _fake_run(tmp_path)  # older eval.json: no empty_response_fraction; int8 at 8 of SFT's 12.5 tokens
    assert R.degeneration_flags(run) == []
    assert "empty responses" not in R.eval_table(run.eval, run.precisions)


# --------------------------------------------------------------------------- no gold


def test_without_a_judge_no_gold_chart_and_the_summary_says_why(tmp_path):
    run = _fake_run(tmp_path, gold=False)
    stale = tmp_path / "reports/charts/gold_vs_kl.png"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"\x89PNG old")
    text = R.write_report(run, tmp_path / "metrics", tmp_path / "reports")
    _traceable(text, tmp_path)
    assert not stale.exists()
    assert (tmp_path / "reports/charts/eval_comparison.png").read_bytes()[:4] == b"\x89PNG"
    assert "](charts/eval_comparison.png)" in text and "gold_vs_kl" not in text
    setup = text.split("## Gold judge and labels")[1].split("## Verdict")[0]
    assert "**No gold judge: eval.judge none**" in setup and "**No gold judge" in _verdict(text)
    assert "eval.judge: model" in setup and "eval.judge: trained" in setup and "`Skywork/" in setup
    assert "gold judge: none." in text.split("## ")[0]
    assert "learned the human labels; with no gold judge there is no outside referee" in setup


def test_a_judge_without_gold_scores_asks_for_evaluate(tmp_path):
    run = _fake_run(tmp_path, gold=False, judge=HUB_JUDGE)  # judge built, eval.json from before it
    assert not run.has_gold
    text = R.write_report(run, tmp_path / "metrics", tmp_path / "reports")
    assert "**No gold scores in metrics/eval.json**" in _verdict(text) and "`dvc repro evaluate`" in text
    assert not (tmp_path / "reports/charts/gold_vs_kl.png").exists()


def test_judge_none_ignores_stale_gold_in_eval_json(tmp_path):
    run = _fake_run(tmp_path, gold=True, judge={"kind": "none"})
    assert not run.has_gold
    R.write_report(run, tmp_path / "metrics", tmp_path / "reports")
    assert not (tmp_path / "reports/charts/gold_vs_kl.png").exists()


# --------------------------------------------------------------------------- the judge and the labels


def test_summary_names_a_model_judge_and_its_accuracy(tmp_path):
    run = _fake_run(tmp_path, judge=HUB_JUDGE, judge_metrics={"rm_test_pairs": 500, "accuracy_vs_human": 0.712,
                                                              "tie_fraction": 0.004, "agreement_with_rules": 0.934})
    text = R.write_report(run, tmp_path / "metrics", tmp_path / "reports")
    _traceable(text, tmp_path)
    setup = text.split("## Gold judge and labels")[1].split("## Verdict")[0]
    assert "Gold judge: the reward model `Skywork/Skywork-Reward-V2-Qwen3-0.6B` from the hub at `c0ffee1234abcd`" \
        in setup
    assert "on 500 rm_test pairs it scores the human-chosen response higher in a share of 0.712" in setup
    assert "(ties: a share of 0.004)" in setup and "rule scorer on a share of 0.934" in setup
    assert "no better than chance" not in setup
    assert (tmp_path / "reports/charts/gold_vs_kl.png").read_bytes()[:4] == b"\x89PNG"


def test_a_judge_at_chance_is_called_weak_and_local_and_trained_judges_are_named(tmp_path):
    run = _fake_run(tmp_path, judge={"kind": "model", "source": "local", "name": "models/local"},
                    judge_metrics={"rm_test_pairs": 500, "accuracy_vs_human": 0.48})
    setup = R.setup_lines(run)[0]
    assert "the reward model in the local folder `models/local`" in setup and "no better than chance" in setup
    assert "rule scorer" not in setup
    run = _fake_run(tmp_path, judge={"kind": "trained", "base": "Qwen/Qwen2.5-1.5B"}, judge_metrics={})
    setup = R.setup_lines(run)[0]
    assert "trained here on the disjoint judge_train split from `Qwen/Qwen2.5-1.5B`" in setup
    assert "not measured" in setup
    text = R.build_summary(run)
    _traceable(text, tmp_path)  # 2.5 / 1.5 inside the model id are not numbers of the summary


def test_labels_human_and_judge_state_the_setup(tmp_path):
    text = R.build_summary(_fake_run(tmp_path))
    assert "the proxy reward models learned the human labels; the judge is an outside referee" in text
    assert "Gao et al" not in text
    run = _fake_run(tmp_path, labels="judge", judge=HUB_JUDGE,
                    judge_metrics={"rm_test_pairs": 500, "accuracy_vs_human": 0.712, "flipped_rm_train": 37,
                                   "flipped_rm_test": 41})
    text = R.write_report(run, tmp_path / "metrics", tmp_path / "reports")
    _traceable(text, tmp_path)
    assert "the proxies learned the judge's own preferences (the setup of Gao et al., *Scaling Laws" in text
    assert "37 of 400 rm_train pairs were flipped, and 41 of 500 rm_test pairs" in text
    assert "outside referee" not in text and "labels `judge`" in text


def test_labels_judge_without_flip_counts_says_so(tmp_path):
    run = _fake_run(tmp_path, labels="judge")
    assert "does not say how many rm_train pairs were flipped" in R.setup_lines(run)[-1]


def test_load_run_checks_labels_and_the_judge_files(tmp_path):
    _fake_run(tmp_path)
    with pytest.raises(ConfigError, match="data.labels"):
        _reload(tmp_path, labels="auto")
    info = tmp_path / "models/judge/judge.json"
    info.write_text(json.dumps({"kind": "oracle"}))
    with pytest.raises(ArtifactError, match="kind 'oracle'.*dvc repro -f judge"):
        _reload(tmp_path)
    info.unlink()
    with pytest.raises(ArtifactError, match="judge.json is missing: run `dvc repro judge`"):
        _reload(tmp_path)


def test_judge_kinds_match_the_judge_module():
    from edgerlhf import judge

    assert set(R.JUDGE_KINDS) == set(judge.KINDS)


def test_inline_code_holds_no_numbers():
    assert R.numbers_in("judge `org/model-2024` at `v2 1.5` scores 0.712") == ["0.712"]
