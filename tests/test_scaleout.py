"""Scale-out: the training stages in two DDP processes on CPU, started the way dvc.yaml starts them
(`python -m edgerlhf.launch ${hardware.num_processes} stages/...`, i.e. `accelerate launch` underneath). Both
processes must finish, agree on the saved weights (replicas.json, checked against the published files), and
have split the work: half the SFT optimizer steps, PPO updates of 2 x ppo.batch_size episodes."""

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from edgerlhf import distributed, live, paths
from tests.conftest import tool_env

pytestmark = pytest.mark.extra

SFT_EPOCHS = 0.5
PPO_EPISODES = 128


@pytest.fixture(scope="module")
def ddp_run(pipeline_run, tmp_path_factory) -> Path:
    copy = tmp_path_factory.mktemp("scaleout") / "run"
    shutil.copytree(pipeline_run, copy, symlinks=True)
    params = yaml.safe_load((copy / "params.yaml").read_text())
    params["hardware"]["num_processes"] = 2
    params["sft"]["num_train_epochs"] = SFT_EPOCHS
    params["ppo"]["total_episodes"] = PPO_EPISODES
    (copy / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    scratch = tmp_path_factory.mktemp("tmpdir")
    env = {**tool_env(), "TMPDIR": str(scratch)}  # where the non-main processes keep their scratch outputs
    for stage in (["stages/sft.py"], ["stages/reward.py", "int4"], ["stages/ppo.py", "int4"]):
        done = subprocess.run([sys.executable, "-m", "edgerlhf.launch", "2", *stage], cwd=copy, env=env,
                              capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, done.stderr[-3000:]
    assert not [p for p in scratch.iterdir() if p.name.startswith("edgerlhf-rank")], "scratch outputs left behind"
    return copy


@pytest.mark.parametrize("weights, replicas", [
    (paths.SFT_ADAPTER, paths.SFT / distributed.REPLICAS_FILE),
    (paths.reward_dir("int4"), paths.reward_dir("int4") / distributed.REPLICAS_FILE),
    (paths.ppo_dir("int4"), paths.ppo_dir("int4") / distributed.REPLICAS_FILE),
])
def test_both_processes_saved_the_published_weights(ddp_run, weights, replicas):
    record = json.loads((ddp_run / replicas).read_text())
    assert record["num_processes"] == 2
    assert record["weights_sha256"] == [distributed.weights_sha256(ddp_run / weights)] * 2


def test_sft_split_its_epoch_over_the_processes(ddp_run):
    metrics = json.loads((ddp_run / paths.METRICS / "sft.json").read_text())
    params = yaml.safe_load((ddp_run / "params.yaml").read_text())["sft"]
    examples = sum(1 for _ in (ddp_run / paths.split_file("sft_train")).open())
    per_process = math.ceil(examples / 2)  # the distributed sampler gives each process half
    steps_per_epoch = math.ceil(per_process / params["per_device_train_batch_size"]) // params[
        "gradient_accumulation_steps"]
    assert metrics["num_processes"] == 2
    assert metrics["optimizer_steps"] == math.ceil(SFT_EPOCHS * steps_per_epoch)
    assert metrics["eval_loss"] > 0 and math.isfinite(metrics["eval_loss"])


def test_ppo_updates_hold_both_processes_episodes(ddp_run):
    metrics = json.loads((ddp_run / paths.ppo_metrics("int4")).read_text())
    batch = yaml.safe_load((ddp_run / "params.yaml").read_text())["ppo"]["batch_size"]
    assert metrics["num_processes"] == 2
    assert metrics["updates"] == PPO_EPISODES // (2 * batch)
    assert metrics["episodes"] == PPO_EPISODES
    curve = live.read_metric(live.metric_file(ddp_run / paths.live_dir("ppo", "int4"), "score"))
    assert sorted(curve) == list(range(1, metrics["updates"] + 1))  # logged once per update, by the main process


def test_reward_model_trained_in_two_processes(ddp_run):
    metrics = json.loads((ddp_run / paths.reward_metrics("int4")).read_text())
    assert metrics["num_processes"] == 2 and metrics["accuracy"] > 0.6


def test_no_work_folders_left(ddp_run):
    work = ddp_run / paths.WORK
    assert not work.exists() or not any(work.iterdir())
