"""#16's acceptance: a 2-seed study of a reduced smoke profile as DVC experiments, aggregated into
metrics/study.json that matches the experiments' own metrics; a third seed added later reuses the first two."""

import statistics

import pytest
import yaml

from edgerlhf import exps, smoke, study
from edgerlhf.config import deep_merge
from tests.conftest import ROOT

pytestmark = [pytest.mark.slow, pytest.mark.extra]  # ~8 min: three reduced pipeline runs through DVC's queue

# The smoke profile, smaller: each seed reruns every stage (seed is a param of all of them).
REDUCED = {"data": {"sizes": {"sft_train": 400, "rm_train": 1500, "rm_test": 200, "ppo_prompts": 128,
                              "eval_prompts": 32}},
           "model": {"tiny": {"pretrain_steps": 200}},
           "ppo": {"total_episodes": 192, "eval_every": 3}}


def test_a_two_seed_study_matches_its_experiments_and_a_third_seed_reuses_them(tmp_path):
    profile = tmp_path / "study.yaml"
    profile.write_text(yaml.safe_dump(deep_merge(yaml.safe_load((ROOT / "profiles/smoke.yaml").read_text()),
                                                 REDUCED)))
    ws = smoke.prepare_workspace(ROOT, tmp_path / "ws", profile)
    smoke.commit_baseline(ws)

    lines: list[str] = []
    result = study.study(ws, seeds=[1, 2], poll_s=3, out=lines.append)
    assert sum("done (" in line for line in lines) == 2, lines

    # the experiments' own metrics, read back through dvc exp show
    runs = {e.params["seed"]: e.headline for e in exps.experiments(ws) if e.name in ("seed-1", "seed-2")}
    assert sorted(runs) == [1, 2]
    for p in ("bf16", "int8", "int4"):
        for key in ("gold_gain", "win_rate", "kl", "proxy_gain", "rm_acc"):
            mean = statistics.mean(runs[s][p][key] for s in (1, 2))
            assert result["precisions"][p][key]["mean"] == pytest.approx(mean, abs=1e-6), (p, key)
        if p != "bf16":
            diffs = [runs[s][p]["gold_gain"] - runs[s]["bf16"]["gold_gain"] for s in (1, 2)]
            paired = result["paired"][f"{p}-bf16"]["gold_gain"]
            assert paired["mean"] == pytest.approx(statistics.mean(diffs), abs=1e-6)
            assert paired["n"] == 2
    assert (ws / "reports/study.md").is_file() and (ws / "reports/study.png").is_file()

    # a third seed later: the first two are reused, only seed 3 runs
    lines = []
    result = study.study(ws, seeds=[1, 2, 3], poll_s=3, out=lines.append)
    assert any("already done, reused: seed 1 (seed-1), seed 2 (seed-2)" in line for line in lines), lines
    assert [line for line in lines if "done (" in line] == [next(x for x in lines if "seed 3 done" in x)]
    assert result["seeds"] == [1, 2, 3]
