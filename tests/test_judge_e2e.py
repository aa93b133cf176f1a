"""The gold judge end to end (#14) on copies of the smoke run: a model judge from a local folder scores every gold
number; a judge trained here agrees with the synthetic task's rules; `data.labels: judge` orders the reward
models' pairs by it, and the reward stages rerun when those labels change and not otherwise."""

import json
import math
import shutil
import subprocess

import pytest
import torch
import yaml

from edgerlhf import data, live, paths
from edgerlhf import metrics as M
from edgerlhf.config import deep_merge
from edgerlhf.judge import ModelJudge, pair_scores, rules_judge
from edgerlhf.modeling import Device
from tests.conftest import tool_env
from tests.judge_fixture import build_tiny_judge, synthetic_texts

pytestmark = [pytest.mark.slow, pytest.mark.extra]  # ~4 min after the shared run: `make test-extra` (CI runs it)

PRECISIONS = ("bf16", "int8", "int4")
CPU = Device("cpu", torch.float32, "cpu")


def run(cwd, *cmd: str, ok: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(list(cmd), cwd=cwd, capture_output=True, text=True, env=tool_env())
    if ok:
        assert proc.returncode == 0, (cmd, proc.stdout[-3000:], proc.stderr[-3000:])
    return proc


def copy_run(pipeline_run, dest, changes: dict):
    shutil.copytree(pipeline_run, dest, symlinks=True)
    set_params(dest, changes)
    return dest


def set_params(repo, changes: dict) -> None:
    params = deep_merge(yaml.safe_load((repo / "params.yaml").read_text()), changes)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def lock_hashes(repo) -> dict[str, str]:
    """path -> md5 of every stage's deps and outs in dvc.lock."""
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    return {f"{name}:{e['path']}": e.get("md5", "") for name, stage in lock["stages"].items()
            for e in stage.get("deps", []) + stage.get("outs", [])}


def read_json(path):
    return json.loads(path.read_text())


def test_model_judge_from_a_folder_scores_every_gold_number(pipeline_run, tmp_path):
    repo = copy_run(pipeline_run, tmp_path / "run", {})
    before = read_json(repo / paths.JUDGE_INFO)
    assert before["kind"] == "rules"
    baseline_curves = {p: live.read_eval_curve(repo / paths.live_dir("ppo", p)) for p in PRECISIONS}

    # a folder that cannot serve as a judge: one line naming the fix, the previous judge untouched
    build_tiny_judge(repo / "models/local/two_labels", synthetic_texts(64), num_labels=2)
    for folder, says in (("models/local/absent", "does not exist"),
                         ("models/local/two_labels", "num_labels 1")):
        set_params(repo, {"eval": {"judge": "model", "judge_source": "local", "judge_path": folder}})
        proc = run(repo, "python", "stages/judge.py", ok=False)
        assert proc.returncode != 0
        last = proc.stderr.strip().splitlines()[-1]
        assert says in last and "eval.judge_path" in last and "Traceback" not in proc.stderr
        assert read_json(repo / paths.JUDGE_INFO) == before

    build_tiny_judge(repo / "models/local/judge", synthetic_texts(256))
    set_params(repo, {"eval": {"judge_path": "models/local/judge"}})
    out = run(repo, "dvc", "repro").stdout
    assert "Running stage 'judge'" in out
    for p in PRECISIONS:
        # labels human: the labelled splits are the same bytes, so the reward models stay; PPO's judge changed
        assert f"Stage 'reward@{p}' didn't change, skipping" in out
        assert f"Running stage 'ppo@{p}'" in out

    info = read_json(repo / paths.JUDGE_INFO)
    assert (info["kind"], info["source"], info["name"]) == ("model", "local", "models/local/judge")
    trust = read_json(repo / paths.JUDGE_METRICS)
    assert trust["rm_test_pairs"] == 500 and 0 <= trust["accuracy_vs_human"] <= 1
    assert 0 <= trust["agreement_with_rules"] <= 1

    # every gold number of evaluate is the judge's own score of that response
    ev = read_json(repo / paths.EVAL_METRICS)
    names = ["sft", *(f"ppo_{p}" for p in PRECISIONS)]
    for n in names:
        assert math.isfinite(ev[n]["gold_reward"]) and "win_rate_vs_sft" in ev[n]
    rows = [r for r in map(json.loads, (repo / paths.SAMPLES).read_text().splitlines()) if "responses" in r]
    judge = ModelJudge(repo / paths.JUDGE, CPU, batch_size=16, max_length=1024)
    prompts = [r["prompt"] for r in rows for _ in names]
    scores = judge(prompts, [r["responses"][n] for r in rows for n in names])
    assert [r["gold"][n] for r in rows for n in names] == pytest.approx(scores, abs=1e-4)
    assert ev["sft"]["gold_reward"] == pytest.approx(sum(r["gold"]["sft"] for r in rows) / len(rows), abs=1e-3)

    # PPO's periodic evaluation used the judge too: its gold curve is new, and the stage metrics agree with it
    for p in PRECISIONS:
        curve = live.read_eval_curve(repo / paths.live_dir("ppo", p))
        assert len(curve) >= 2 and all(math.isfinite(float(row["gold"])) for row in curve)
        assert curve != baseline_curves[p]
        # the stage metric is rounded to 6 decimals
        assert read_json(repo / paths.ppo_metrics(p))["eval_gold_end"] == pytest.approx(float(curve[-1]["gold"]),
                                                                                        abs=1e-6)
    summary = (repo / paths.SUMMARY).read_text()
    assert "the reward model in the local folder `models/local/judge`" in summary
    assert (repo / paths.CHART_GOLD_VS_KL).read_bytes()[:4] == b"\x89PNG"


def test_trained_judge_agrees_with_the_rules_and_orders_the_reward_pairs(pipeline_run, tmp_path):
    repo = copy_run(pipeline_run, tmp_path / "run", {"data": {"labels": "judge", "sizes": {"judge_train": 6000}},
                                                      "eval": {"judge": "trained"}})
    run(repo, "dvc", "repro", "judge")
    info = read_json(repo / paths.JUDGE_INFO)
    assert info["kind"] == "trained"
    trust = read_json(repo / paths.JUDGE_METRICS)
    judge = ModelJudge(repo / paths.JUDGE, CPU, batch_size=32, max_length=1024)

    # agreement with the rules on rm_test, recomputed here from the saved judge
    test = data.read_split(repo / paths.split_file("rm_test"))
    chosen, rejected = pair_scores(judge, test)
    agreement = M.choice_agreement(chosen, rejected, *pair_scores(rules_judge(), test))
    assert agreement == pytest.approx(trust["agreement_with_rules"], abs=1e-6)
    assert agreement >= 0.85, f"the trained judge agrees with the rules on only {agreement:.3f} of rm_test"

    # relabelled: every pair's chosen has the higher judge score; the flips are the pairs that changed
    for split in ("rm_train", "rm_test"):
        original = data.read_split(repo / paths.split_file(split))
        labelled = data.read_split(repo / paths.labelled_split(split))
        c, r = pair_scores(judge, labelled)
        assert all(x >= y for x, y in zip(c, r))
        flipped = sum(a != b for a, b in zip(original, labelled))
        assert flipped == trust[f"flipped_{split}"] > 0
        assert all(a["prompt"] == b["prompt"] and {a["chosen"], a["rejected"]} == {b["chosen"], b["rejected"]}
                   for a, b in zip(original, labelled))

    # the reward stages rerun when the labels change ...
    status = run(repo, "dvc", "status", *(f"reward@{p}" for p in PRECISIONS)).stdout
    assert "data/labelled/rm_train.jsonl" in status and "modified" in status
    # ... and not otherwise: a judge setting that changes no label reruns the judge, not what follows it
    hashes = lock_hashes(repo)
    set_params(repo, {"eval": {"judge_batch_size": 5}})
    run(repo, "dvc", "repro", "judge")
    assert lock_hashes(repo)["judge:data/labelled"] == hashes["judge:data/labelled"]
