"""Shared fixtures. `pipeline_run`: ONE `dvc repro` of the offline smoke profile (all stages) per test session,
in a temporary scratch copy, shared by every end-to-end test so `make test` stays within minutes."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Tests never touch the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# For the tests' own in-process torch work: tiny models gain nothing from threads, and oversubscribed OpenMP threads
# (a stage subprocess next to the test process, or parallel jobs on 2 cores) slow their small matmuls by an order of
# magnitude. Set before torch loads. Stage processes set their own from hardware.cpu_threads (runtime.set_threads).
os.environ.setdefault("OMP_NUM_THREADS", "1")
# Where pipeline_run writes everything its `dvc repro` printed (gitignored in the scratch repository).
REPRO_LOG = ".cache/repro.log"


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
    run_logged([smoke._dvc(), "repro"], dest, dest / REPRO_LOG, smoke.repro_env())
    smoke.commit_baseline(dest)  # as `make smoke` does: the baseline `dvc exp run` / `dvc params diff` compare to
    return dest


def run_logged(cmd: list[str], cwd: Path, log: Path, env: dict) -> str:
    """Run `cmd` with its stdout and stderr into the file `log` (tests grep it) and return that text; a non-zero
    exit raises with the command, the log's path and its last lines, so a failed run still fails loudly."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as out:
        code = subprocess.run(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT).returncode
    text = log.read_text(errors="replace")
    if code:
        tail = "\n".join(text.replace("\r", "\n").splitlines()[-60:])
        raise RuntimeError(f"{' '.join(map(str, cmd))} exited {code} in {cwd} (full output: {log}); "
                           f"last lines:\n{tail}")
    return text
