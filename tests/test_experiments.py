"""The experiment loop as a user drives it in the quick-start workspace (#15): `dvc exp run -S`, `dvc exp show`,
`dvc params diff`, `dvc metrics diff` in a git-backed smoke workspace; stable artifacts; operational keys."""

import json
import re
import shutil
import subprocess

import pytest
import yaml

from edgerlhf.config import deep_merge
from tests.conftest import tool_env

pytestmark = [pytest.mark.slow, pytest.mark.extra]  # ~2 min after the shared run: `make test-extra` (CI runs it)

PRECISIONS = ("bf16", "int8", "int4")


def sh(cwd, *cmd: str) -> str:
    proc = subprocess.run(list(cmd), cwd=cwd, capture_output=True, text=True, env=tool_env())
    assert proc.returncode == 0, (cmd, proc.stdout[-2000:], proc.stderr[-2000:])
    return proc.stdout + proc.stderr


def copy_run(pipeline_run, dest):
    shutil.copytree(pipeline_run, dest, symlinks=True)
    return dest


def headline_of(entry: dict) -> dict:
    """metrics/headline.json's data in one row of `dvc exp show --json`."""
    return entry["data"]["metrics"]["metrics/headline.json"]["data"]


def test_exp_run_reruns_ppo_and_what_follows_and_exp_show_holds_the_change(pipeline_run, tmp_path):
    repo = copy_run(pipeline_run, tmp_path / "exp")
    assert sh(repo, "git", "status", "--porcelain").strip() == ""  # the baseline is committed
    before = json.loads((repo / "metrics/headline.json").read_text())

    out = sh(repo, "dvc", "exp", "run", "-S", "ppo.init_kl_coef=0.05")
    ran = set(re.findall(r"Running stage '([^']+)'", out))
    assert ran == {*(f"ppo@{p}" for p in PRECISIONS), "evaluate", "report"}, out[-3000:]

    rows = json.loads(sh(repo, "dvc", "exp", "show", "--json"))
    baseline = next(r for r in rows if r["rev"] != "workspace")
    exps = [rev for group in baseline.get("experiments") or [] for rev in group["revs"]]
    assert len(exps) == 1
    exp = exps[0]
    assert exp["data"]["params"]["params.yaml"]["data"]["ppo"]["init_kl_coef"] == 0.05
    after = headline_of(exp)
    assert headline_of(baseline) == before
    # the PPO change moved the policies' KL to SFT, and the RMs (upstream of PPO) kept their accuracy
    assert any(after[p]["kl"] != before[p]["kl"] for p in PRECISIONS)
    assert all(after[p]["rm_acc"] == before[p]["rm_acc"] for p in PRECISIONS)

    pdiff = json.loads(sh(repo, "dvc", "params", "diff", "--json"))["params.yaml"]
    assert list(pdiff) == ["ppo.init_kl_coef"]
    assert (pdiff["ppo.init_kl_coef"]["old"], pdiff["ppo.init_kl_coef"]["new"]) == (0.1, 0.05)
    assert "metrics/headline.json" in sh(repo, "dvc", "metrics", "diff")

    # the readable views of one -S change in a 160-column terminal: `make exps` (edgerlhf.exps) shows the changed
    # param and every headline number; plain `dvc exp show --only-changed` puts the headline metrics first
    from edgerlhf import exps

    table = exps.experiments_table(exps.experiments(repo))
    assert max(len(line) for line in table.splitlines()) <= 160, table
    header = table.splitlines()[0]
    assert "ppo.init_kl_coef" in header and all(c in header for c in exps.COLUMNS), header
    assert "seed" not in header  # only the params that differ
    env = {**tool_env(), "COLUMNS": "160"}
    proc = subprocess.run(["dvc", "exp", "show", "--only-changed", "--no-pager"], cwd=repo, capture_output=True,
                          text=True, env=env)
    lines = proc.stdout.splitlines()
    assert max(len(line) for line in lines) <= 160
    shown = next(line for line in lines if "Experiment" in line).split()
    assert shown[1:4] == ["Created", "bf16.gold", "bf16.gold_gain"], shown


def test_a_rerun_that_changes_nothing_keeps_every_hash_and_operational_keys_rerun_nothing(pipeline_run, tmp_path):
    repo = copy_run(pipeline_run, tmp_path / "stable")
    lock = (repo / "dvc.lock").read_text()
    sh(repo, "dvc", "repro", "-f", "-s", "sft")
    sh(repo, "dvc", "repro", "-f", "-s", "reward@int4")

    def outs(text: str) -> dict:
        stages = yaml.safe_load(text)["stages"]
        return {f"{n}:{o['path']}": o.get("md5") for n, s in stages.items() for o in s.get("outs", [])
                if not o["path"].startswith("metrics/")}  # detail metrics hold wall times

    assert outs((repo / "dvc.lock").read_text()) == outs(lock)
    # nothing that uses the models is stale; only the report, which prints the stages' wall times
    stale = json.loads(sh(repo, "dvc", "status", "--json"))
    assert set(stale) <= {"report"}, stale

    from edgerlhf.config import OPERATIONAL_KEYS

    params = yaml.safe_load((repo / "params.yaml").read_text())
    edits: dict = {}
    for key in OPERATIONAL_KEYS:
        node, target = params, edits
        *parents, leaf = key.split(".")
        for part in parents:
            node, target = node[part], target.setdefault(part, {})
        value = node[leaf]
        target[leaf] = 1 if value in ("auto", 0) else (value + 1 if isinstance(value, int) else value * 2)
    (repo / "params.yaml").write_text(yaml.safe_dump(deep_merge(params, edits), sort_keys=False))
    assert json.loads(sh(repo, "dvc", "status", "--json")) == stale  # no stage more

