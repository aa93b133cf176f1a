"""The report on hand-made metrics: the gold judge named with how far to trust it, the labels setup, no gold chart
without gold, and the reward-hacking flags that need no gold judge (length collapse, empty responses)."""

import json
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
