"""Seeded stages give identical metrics on CPU: rerun sft, reward@int4 and ppo@int4 from scratch (`dvc repro -f`)
in a copy of the session's pipeline run and compare every metric except wall-clock timings."""

import json
import shutil
import subprocess

import pytest

from edgerlhf.runtime import TIMING_KEYS
from tests.conftest import tool_env

TIMING = set(TIMING_KEYS)
STAGES = {"sft": "metrics/sft.json", "reward@int4": "metrics/reward/int4.json", "ppo@int4": "metrics/ppo/int4.json"}
pytestmark = [pytest.mark.slow, pytest.mark.extra]  # 60 s of reruns: make test-extra


def test_rerun_from_scratch_gives_identical_metrics(pipeline_run, tmp_path):
    copy = tmp_path / "rerun"
    shutil.copytree(pipeline_run, copy, symlinks=True)
    before = {s: json.loads((copy / f).read_text()) for s, f in STAGES.items()}
    for stage in STAGES:  # -f -s: force this one stage only, upstream outputs stay as they are
        proc = subprocess.run(["dvc", "repro", "-f", "-s", stage], cwd=copy, capture_output=True, text=True,
                              env=tool_env())
        assert proc.returncode == 0, proc.stderr[-2000:]
    for stage, f in STAGES.items():
        after = json.loads((copy / f).read_text())
        assert set(after) == set(before[stage])
        for key in set(after) - TIMING:
            assert after[key] == before[stage][key], (stage, key, before[stage][key], after[key])
