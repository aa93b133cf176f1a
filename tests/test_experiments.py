"""Comparing experiments as docs/experiments.md says: change a param, rerun, `dvc params diff` / `dvc metrics diff`."""

import shutil
import subprocess

import pytest
import yaml

from tests.conftest import tool_env

pytestmark = [pytest.mark.slow, pytest.mark.extra]  # ~30 s: `make test-extra` (CI runs it)


def sh(cwd, *cmd: str) -> str:
    proc = subprocess.run(list(cmd), cwd=cwd, capture_output=True, text=True, env=tool_env())
    assert proc.returncode == 0, (cmd, proc.stderr[-2000:])
    return proc.stdout


def test_params_and_metrics_diff_after_a_rerun(pipeline_run, tmp_path):
    repo = tmp_path / "exp"
    shutil.copytree(pipeline_run, repo, symlinks=True)
    sh(repo, "git", "init", "-q")
    sh(repo, "dvc", "config", "core.no_scm", "false")
    # git holds what DVC leaves to it (pipeline, lock, params, metrics); outputs stay DVC's
    sh(repo, "git", "add", "dvc.yaml", "dvc.lock", "params.yaml", "metrics")
    sh(repo, "git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "baseline")
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["reward"]["learning_rate"] = params["reward"]["learning_rate"] / 3
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    sh(repo, "dvc", "repro", "-s", "reward@int4")
    pdiff = sh(repo, "dvc", "params", "diff")
    assert "reward.learning_rate" in pdiff and "0.003" in pdiff and "0.001" in pdiff
    mdiff = sh(repo, "dvc", "metrics", "diff")  # changed metrics only: the training loss must be among them
    assert any(line.startswith("metrics/reward/int4.json") and " train_loss " in line for line in mdiff.splitlines())
    # the headline metric may come out equal on 500 test pairs; --all lists it either way
    assert "accuracy" in sh(repo, "dvc", "metrics", "diff", "--all")
