"""`make smoke`'s workspace is a DVC project in its own git repository (#15): `dvc exp` works there, and preparing
it again never silently discards a change the user made in it."""

import subprocess

import pytest

from edgerlhf import smoke
from tests.conftest import ROOT, tool_env

PROFILE = ROOT / "profiles/smoke.yaml"


def test_make_smoke_refuses_to_discard_an_uncommitted_params_change(tmp_path):
    profile = PROFILE
    ws = smoke.prepare_workspace(ROOT, tmp_path / "ws", profile)
    smoke.commit_baseline(ws)
    text = (ws / "params.yaml").read_text()
    (ws / "params.yaml").write_text(text.replace("init_kl_coef: 0.1", "init_kl_coef: 0.05"))
    with pytest.raises(smoke.WorkspaceChanged, match=r"ppo.init_kl_coef 0.05 -> 0.1.*--reset"):
        smoke.prepare_workspace(ROOT, ws, profile)
    assert "init_kl_coef: 0.05" in (ws / "params.yaml").read_text()  # untouched
    smoke.prepare_workspace(ROOT, ws, profile, reset=True)
    assert (ws / "params.yaml").read_text() == text


def test_the_workspace_is_a_git_backed_dvc_project_with_a_baseline(tmp_path):
    ws = smoke.prepare_workspace(ROOT, tmp_path / "ws", PROFILE)
    assert smoke.commit_baseline(ws) is True
    assert smoke.commit_baseline(ws) is False  # nothing new to commit
    run = subprocess.run(["dvc", "config", "core.no_scm"], cwd=ws, capture_output=True, text=True, env=tool_env())
    assert run.stdout.strip() != "true"
    tracked = subprocess.run(["git", "ls-files"], cwd=ws, capture_output=True, text=True).stdout.split()
    assert {"params.yaml", "dvc.yaml", ".gitignore", ".dvc/config"} <= set(tracked)
    assert not any(p.startswith(".cache/") or "__pycache__" in p for p in tracked)
    # a committed change the new params replace is named, not refused
    (ws / "params.yaml").write_text((ws / "params.yaml").read_text().replace("init_kl_coef: 0.1", "init_kl_coef: 0.2"))
    smoke.commit_baseline(ws, "my experiment")
    smoke.prepare_workspace(ROOT, ws, PROFILE)
    assert "init_kl_coef: 0.1" in (ws / "params.yaml").read_text()


def test_a_workspace_made_without_git_is_taken_over(tmp_path):
    ws = tmp_path / "old"
    ws.mkdir()
    subprocess.run(["dvc", "init", "--no-scm", "-q"], cwd=ws, check=True, env=tool_env())
    smoke.prepare_workspace(ROOT, ws, PROFILE)
    assert (ws / ".git").is_dir()
    run = subprocess.run(["dvc", "config", "core.no_scm"], cwd=ws, capture_output=True, text=True, env=tool_env())
    assert run.stdout.strip() != "true"
