"""The artifact layout every stage, test and report agrees on (relative to the project root)."""

from __future__ import annotations

from pathlib import Path

DATA = Path("data/prepared")
LABELLED = Path("data/labelled")  # the judge stage: rm_train / rm_test with the labels the reward models learn
MODELS = Path("models")
METRICS = Path("metrics")
LIVE = Path("dvclive")  # live curves of the training stages, one folder per stage instance (edgerlhf/live.py)
REPORTS = Path("reports")
WORK = Path(".cache/work")  # trainer scratch space and resumable checkpoints: not a DVC output

CORPUS = DATA / "corpus.jsonl"
BASE = MODELS / "base"
SFT = MODELS / "sft"
SFT_ADAPTER = SFT / "adapter"
SFT_MERGED = SFT / "merged"
JUDGE = MODELS / "judge"  # the gold judge: JUDGE_INFO, plus a sequence classifier for kinds model / trained
JUDGE_INFO = JUDGE / "judge.json"


def split_file(name: str) -> Path:
    return DATA / f"{name}.jsonl"


def labelled_split(name: str) -> Path:
    """rm_train / rm_test as the reward models learn them (data.labels: human copies, judge reorders)."""
    return LABELLED / f"{name}.jsonl"


def reward_dir(precision: str) -> Path:
    return MODELS / "reward" / precision


def ppo_dir(precision: str) -> Path:
    return MODELS / "ppo" / precision


def reward_metrics(precision: str) -> Path:
    return METRICS / "reward" / f"{precision}.json"


def ppo_metrics(precision: str) -> Path:
    return METRICS / "ppo" / f"{precision}.json"


LENGTHS_METRICS = METRICS / "lengths.json"  # the check stage: token statistics of the splits
JUDGE_METRICS = METRICS / "judge.json"
HEADLINE_METRICS = METRICS / "headline.json"  # the one DVC metrics file: per precision, what dvc exp show compares
EVAL_METRICS = METRICS / "eval.json"
SAMPLES = REPORTS / "samples.jsonl"
SUMMARY = REPORTS / "summary.md"
CHARTS = REPORTS / "charts"  # one DVC out: gold_vs_kl.png is drawn only when there is a gold judge
CHART_GOLD_VS_KL = CHARTS / "gold_vs_kl.png"
CHART_EVAL = CHARTS / "eval_comparison.png"


def live_dir(stage: str, precision: str = "") -> Path:
    """The dvclive folder of a training stage instance: dvclive/sft, dvclive/reward/<P>, dvclive/ppo/<P>."""
    return LIVE / stage / precision if precision else LIVE / stage
