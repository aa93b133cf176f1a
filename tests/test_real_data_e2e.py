"""Issue 13's acceptance on real-shaped data: a smoke-sized `dvc repro` of every stage on HH-style multi-turn
dialogues given as a conversational JSONL (TRL's implicit-prompt form, generated here: no network). Long
dialogues meet small max_lengths, so the prompts are cut from the left; the reward metrics report accuracy over
decided pairs and the tie fraction. The gold judge is a model judge from a local folder (a tiny Qwen3 classifier
with a ChatML template, #14), so real-shaped multi-turn dialogues go through its chat template. Slow (a whole
pipeline): `make test-extra`."""

import json
import random
import time
from pathlib import Path

import pytest
import yaml

from edgerlhf import metrics as M
from edgerlhf import smoke, synthetic
from edgerlhf.config import deep_merge
from tests.conftest import ROOT
from tests.judge_fixture import build_tiny_judge

pytestmark = pytest.mark.extra

PRECISIONS = ["bf16", "int4"]
SIZES = {"sft_train": 300, "sft_eval": 50, "rm_train": 600, "rm_test": 100, "ppo_prompts": 64, "eval_prompts": 32,
         "judge_train": 0}
MAX_LENGTH = 64  # below the longest dialogues: prompts get cut from the left, responses stay whole
STAGES = {"prepare", "base", "check", "judge", "sft", *(f"reward@{p}" for p in PRECISIONS),
          *(f"ppo@{p}" for p in PRECISIONS), "evaluate", "report"}


def _question(record: dict) -> str:
    return record["prompt"].removeprefix("\n\nHuman: ").removesuffix("\n\nAssistant:")


def conversational_jsonl(path: Path, n: int, seed: int = 0) -> None:
    """n HH-style dialogues of 1 to 5 user turns as {"chosen": [messages], "rejected": [messages]}: the shared
    earlier turns, then the last question answered well (chosen) or badly (rejected) by the synthetic task."""
    rng = random.Random(seed)
    pairs = synthetic.generate_split(n, seed, "e2e")
    filler = synthetic.generate_split(200, seed + 1, "e2e-history")
    with path.open("w") as fh:
        for rec in pairs:
            history = []
            for past in rng.sample(filler, rng.randrange(5)):
                history += [{"role": "user", "content": _question(past)},
                            {"role": "assistant", "content": past["chosen"].strip()}]
            last = [{"role": "user", "content": _question(rec)}]
            fh.write(json.dumps({
                "chosen": history + last + [{"role": "assistant", "content": rec["chosen"].strip()}],
                "rejected": history + last + [{"role": "assistant", "content": rec["rejected"].strip()}],
            }) + "\n")


def override(jsonl: str) -> dict:
    profile = yaml.safe_load((ROOT / "profiles/smoke.yaml").read_text())
    return deep_merge(profile, {
        "model": {"tiny": {"n_positions": 256, "vocab_size": 384, "pretrain_steps": 150}},
        "data": {"source": "jsonl", "jsonl_path": jsonl, "sizes": SIZES},
        "sft": {"num_train_epochs": 1.0, "max_length": MAX_LENGTH, "checkpoint_every": 0},
        "reward": {"precisions": PRECISIONS, "max_length": MAX_LENGTH, "checkpoint_every": 0},
        "ppo": {"total_episodes": 64, "batch_size": 32, "mini_batch_size": 8, "gradient_accumulation_steps": 2,
                "ppo_epochs": 1, "score_norm_samples": 32, "eval_prompts": 16, "checkpoint_every": 0},
        "eval": {"max_new_tokens": 24, "bootstrap_samples": 100, "judge": "model", "judge_source": "local",
                 "judge_path": "judge"},
    })


def test_multi_turn_conversational_jsonl_runs_every_stage(tmp_path):
    dest = tmp_path / "run"
    dest.mkdir()
    conversational_jsonl(dest / "pairs.jsonl", sum(SIZES.values()) + 20)
    records = [json.loads(line) for line in (dest / "pairs.jsonl").read_text().splitlines()]
    build_tiny_judge(dest / "judge", [m["content"] for r in records for m in r["chosen"] + r["rejected"]])
    profile = tmp_path / "real-data.yaml"
    profile.write_text(yaml.safe_dump(override("pairs.jsonl")))
    smoke.prepare_workspace(ROOT, dest, profile)
    start = time.perf_counter()
    smoke.repro(dest)
    print(f"\nreal-data e2e: dvc repro of every stage in {time.perf_counter() - start:.0f} s")

    lock = yaml.safe_load((dest / "dvc.lock").read_text())["stages"]
    assert STAGES <= set(lock), f"stages that did not run: {sorted(STAGES - set(lock))}"

    def load(rel: str) -> dict:
        return json.loads((dest / rel).read_text())

    data = load("metrics/data.json")
    assert data["format_conversational_implicit"] == data["input_records"] == sum(SIZES.values()) + 20
    assert data["skipped"] == 0

    lengths = load("metrics/lengths.json")
    assert lengths["model"]["positions"] == 256
    assert lengths["rm_train"]["sequence_tokens_max"] > MAX_LENGTH  # multi-turn dialogues longer than the budget
    assert lengths["rm_train"]["response_tokens_max"] <= MAX_LENGTH  # ... whose answers fit on their own
    assert lengths["rm_train"]["unknown_token_fraction"] == 0 and lengths["rm_train"]["empty_prompts"] == 0

    sft = load("metrics/sft.json")
    assert sft["train_truncated"] > 0 and sft["train_dropped_too_long"] == 0
    assert sft["train_examples"] == SIZES["sft_train"]

    for p in PRECISIONS:
        m = load(f"metrics/reward/{p}.json")
        for key in ("accuracy", "accuracy_decided", "tie_fraction"):
            assert key in m, (p, key)
        assert 0 <= m["tie_fraction"] <= 1 and 0 <= m["accuracy_decided"] <= 1
        assert m["accuracy"] == pytest.approx(m["accuracy_decided"] * (1 - m["tie_fraction"]), abs=1e-5)
        scores = load(f"models/reward/{p}/rm_test_scores.json")
        again = M.reward_metrics(scores["chosen"], scores["rejected"])
        for key in ("accuracy", "accuracy_decided", "tie_fraction", "auc"):
            assert m[key] == pytest.approx(again[key], abs=1e-6), (p, key)
        assert m["train_truncated"] > 0 and m["test_truncated"] > 0
        assert m["train_dropped_too_long"] == 0 and m["identical_after_truncation"] == 0
        assert m["test_pairs"] == SIZES["rm_test"] and m["train_pairs"] == SIZES["rm_train"]
        print(f"reward@{p}: " + ", ".join(f"{k} {m[k]}" for k in (
            "accuracy", "accuracy_decided", "tie_fraction", "auc", "train_truncated", "test_truncated",
            "identical_after_truncation")))

    ev = load("metrics/eval.json")
    assert {f"ppo_{p}" for p in PRECISIONS} <= set(ev) and "gold_reward" in ev["sft"]  # the local model judge
    trust = load("metrics/judge.json")
    assert trust["rm_test_pairs"] == SIZES["rm_test"] and 0 <= trust["accuracy_vs_human"] <= 1
    assert "agreement_with_rules" not in trust  # no rules for jsonl data
    summary = (dest / "reports/summary.md").read_text()
    assert "accuracy (decided pairs)" in summary and "the prompt was cut from the left" in summary
    assert "the reward model in the local folder `judge`" in summary
