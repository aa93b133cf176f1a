"""Shared fixtures. `pipeline_run`: ONE `dvc repro` of the offline smoke profile (all stages) per test session,
in a temporary scratch copy, shared by every end-to-end test so `make test` stays within minutes."""

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Tests never touch the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# Tiny models gain nothing from threads, and oversubscribed OpenMP threads (a stage subprocess next to the test
# process, or parallel jobs on 2 cores) slow their small matmuls by an order of magnitude. Set before torch loads.
os.environ.setdefault("OMP_NUM_THREADS", "1")


def tool_env() -> dict:
    """Environment for subprocesses: this interpreter's bin dir first (dvc, python), repo importable."""
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


@pytest.fixture(scope="session")
def pipeline_run(tmp_path_factory) -> Path:
    """A finished offline pipeline run (dvc repro of every stage) in a scratch DVC repo; returns its root."""
    from edgerlhf import smoke

    dest = smoke.prepare_workspace(ROOT, tmp_path_factory.mktemp("pipeline"), ROOT / "profiles/smoke.yaml")
    os.environ["PYTHONPATH"] = tool_env()["PYTHONPATH"]
    smoke.repro(dest)
    return dest
