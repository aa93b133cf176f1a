"""Resume after interruption: a long stage killed with SIGKILL mid-run continues from its last checkpoint in
.cache/work/<stage> and ends with the metrics of an uninterrupted run (exactly, on CPU); checkpoints made for
other params or inputs are discarded; the work folder is deleted when the stage completes."""

import json
import logging
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from edgerlhf import live, paths, ppo, resume
from edgerlhf.config import Params
from edgerlhf.runtime import TIMING_KEYS
from tests.conftest import tool_env
from tests.test_ppo_oracles import count_target, small_params, tiny_policy, tiny_tokenizer, toy_prompts

TIMING = set(TIMING_KEYS)


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _gold(prompts, responses):
    return [float(r.count("t3")) for r in responses]


class Interrupted(Exception):
    pass


def _run(params, checkpoint_dir=None, fingerprint="", stop_at=None) -> ppo.PPOResult:
    def on_log(update, stats):
        if update == stop_at:
            raise Interrupted

    tokenizer = tiny_tokenizer()
    return ppo.train_ppo(tiny_policy(params), tokenizer, toy_prompts(), count_target, params, device="cpu",
                         seed=0, progress=False, evaluator=ppo.Evaluator(_gold, toy_prompts(4, seed=1), tokenizer, 1),
                         on_log=on_log, checkpoint=ppo.Checkpointing(checkpoint_dir, fingerprint) if checkpoint_dir
                         else None)


def _same(a: ppo.PPOResult, b: ppo.PPOResult) -> None:
    assert [repr(h) for h in a.history] == [repr(h) for h in b.history]
    assert [repr(e) for e in a.evals] == [repr(e) for e in b.evals]
    assert (a.score_mean, a.score_std, a.episodes, a.updates) == (b.score_mean, b.score_std, b.episodes, b.updates)


def test_ppo_loop_resumes_exactly(tmp_path, caplog, one_thread):
    """Interrupted after update 3 of 5, restarted on a fresh policy: the same history, evals and score
    normalisation as a run that never stopped (and as one that never checkpointed)."""
    params = small_params(total_episodes=40, checkpoint_every=2, eval_every=2, kl_control="adaptive",
                          lr_schedule="linear")
    reference = _run(small_params(total_episodes=40, checkpoint_every=0, eval_every=2, kl_control="adaptive",
                                  lr_schedule="linear"))
    with pytest.raises(Interrupted):
        _run(params, tmp_path, "fp", stop_at=4)  # dies during update 4: the checkpoint is update 2's
    assert (tmp_path / ppo.CHECKPOINT_FILE).is_file()
    with caplog.at_level(logging.INFO, logger="edgerlhf"):
        resumed = _run(params, tmp_path, "fp")
    assert "resumed from update 2 of 5" in caplog.text
    _same(resumed, reference)

    # the checkpoint left (update 4's) was made for other work: discarded, said so, the run starts over
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="edgerlhf"):
        fresh = _run(params, tmp_path, "other inputs")
    assert "discarding the checkpoint" in caplog.text and "resumed" not in caplog.text
    _same(fresh, reference)


def test_prompt_order_is_a_function_of_the_episode_number():
    """Pass k over the prompts is a permutation seeded by (seed, k): any stretch of episodes can be recomputed."""
    whole = ppo.prompt_indices(10, 3, 0, 35)
    assert sorted(whole[:10]) == list(range(10)) and sorted(whole[10:20]) == list(range(10))
    assert whole[:10] != whole[10:20]
    assert ppo.prompt_indices(10, 3, 17, 11) == whole[17:28]
    assert ppo.prompt_indices(10, 4, 0, 10) != whole[:10]


def test_work_folder_belongs_to_one_fingerprint(tmp_path, caplog):
    data = tmp_path / "split.jsonl"
    data.write_text("a\n")
    params = Params()
    fp = resume.fingerprint("sft", params, [data])
    assert fp == resume.fingerprint("sft", params, [data])
    assert fp != resume.fingerprint("sft", params, [data, tmp_path / "missing"])
    assert fp != resume.fingerprint("reward@int4", params, [data])
    assert fp != resume.fingerprint("sft", Params(seed=1), [data])
    # an operational key (checkpoint interval, threads, VRAM cap) keeps the checkpoints; a result key does not
    import dataclasses

    hw = dataclasses.replace(params.hardware, cpu_threads=1, vram_budget_gb=4.0)
    sft = dataclasses.replace(params.sft, checkpoint_every=params.sft.checkpoint_every * 2)
    assert resume.fingerprint("sft", dataclasses.replace(params, hardware=hw, sft=sft), [data]) == fp
    lr = dataclasses.replace(params.sft, learning_rate=params.sft.learning_rate / 2)
    assert resume.fingerprint("sft", dataclasses.replace(params, sft=lr), [data]) != fp
    data.write_text("b\n")
    changed = resume.fingerprint("sft", params, [data])
    assert changed != fp

    work = resume.claim(tmp_path / "work", fp)
    (work / "checkpoint-10").mkdir()
    assert resume.claim(work, fp) == work and (work / "checkpoint-10").is_dir()  # same work: kept
    with caplog.at_level(logging.INFO, logger="edgerlhf"):
        resume.claim(work, changed)
    assert "discarding the checkpoints" in caplog.text and not (work / "checkpoint-10").exists()
    resume.release(work)
    assert not work.exists()


def test_last_trainer_checkpoint_skips_incomplete_ones(tmp_path):
    assert resume.last_trainer_checkpoint(tmp_path / "none") is None
    for step, state in ((10, "{}"), (20, "{}"), (30, None), (40, "{trunc")):
        (tmp_path / f"checkpoint-{step}").mkdir()
        if state is not None:
            (tmp_path / f"checkpoint-{step}" / "trainer_state.json").write_text(state)
    assert resume.last_trainer_checkpoint(tmp_path) == tmp_path / "checkpoint-20"
    history = [{"loss": 1.0, "step": 10}, {"eval_loss": 5.0, "step": 10}, {"loss": 2.0, "step": 20},
               {"loss": 4.0, "step": 25}]
    assert resume.train_loss(history) == pytest.approx((10 * 1.0 + 10 * 2.0 + 5 * 4.0) / 25)


# --------------------------------------------------------------------------- kill -9 a stage, rerun it


def _copy_with(pipeline_run: Path, dest: Path, section: str, checkpoint_every: int) -> Path:
    """A copy of the finished run with another checkpoint interval (which also keeps `dvc repro` from restoring
    the stage's outputs from DVC's run cache instead of running it)."""
    shutil.copytree(pipeline_run, dest, symlinks=True)
    params = yaml.safe_load((dest / "params.yaml").read_text())
    params[section]["checkpoint_every"] = checkpoint_every
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return dest


def _kill_when(cmd: list[str], cwd: Path, marker: Path, timeout: float = 600) -> None:
    """Run a stage script; SIGKILL it as soon as `marker` (a checkpoint file) exists."""
    log = cwd.parent / "killed.log"
    with log.open("w") as err:
        proc = subprocess.Popen(cmd, cwd=cwd, env=tool_env(), stdout=subprocess.DEVNULL, stderr=err)
    deadline = time.monotonic() + timeout
    try:
        while not marker.exists():
            assert proc.poll() is None, f"stage ended before its first checkpoint: {log.read_text()[-2000:]}"
            assert time.monotonic() < deadline, "no checkpoint appeared"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL


def _rerun(copy: Path, stage: str) -> str:
    """`dvc repro` of the one stage (DVC deletes its outs first; the work folder is no out) -> its log."""
    proc = subprocess.run(["dvc", "repro", "-s", stage], cwd=copy, capture_output=True, text=True, env=tool_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stderr


def _tree(root: Path) -> dict[str, bytes]:
    """Every file under `root` by relative path (a live folder: its curves and their summary)."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _assert_same_metrics(reference: Path, resumed: Path) -> None:
    ref, got = json.loads(reference.read_text()), json.loads(resumed.read_text())
    assert set(ref) == set(got)
    assert {k: got[k] for k in set(got) - TIMING} == {k: ref[k] for k in set(ref) - TIMING}


@pytest.mark.slow
@pytest.mark.extra  # 20 s of a stage run: make test-extra (the in-process resume tests above stay in make test)
def test_killed_ppo_stage_resumes_to_the_uninterrupted_metrics(pipeline_run, tmp_path):
    """ppo@int4 with a checkpoint every 2 updates (the finished run used 5: checkpointing never changes the
    trajectory), SIGKILLed after its first checkpoint, then `dvc repro`: same metrics and curves as the
    uninterrupted run of the session, work folder gone."""
    copy = _copy_with(pipeline_run, tmp_path / "run", "ppo", 2)
    work = copy / ".cache/work/ppo-int4"
    _kill_when([sys.executable, "stages/ppo.py", "int4"], copy, work / ppo.CHECKPOINT_FILE)
    # killed mid-run: the previous outputs are untouched (new ones replace them only on success); the live curves
    # are this run's own, up to where it died (written during the run by design)
    assert (copy / "metrics/ppo/int4.json").read_bytes() == (pipeline_run / "metrics/ppo/int4.json").read_bytes()
    updates = json.loads((pipeline_run / "metrics/ppo/int4.json").read_text())["updates"]
    died_at = sorted(live.read_metric(live.metric_file(copy / paths.live_dir("ppo", "int4"), "score")))
    assert died_at == list(range(1, len(died_at) + 1)) and 2 <= len(died_at) < updates, died_at

    log = _rerun(copy, "ppo@int4")
    match = re.search(rf"resumed from update (\d+) of {updates}", log)
    assert match and 0 < int(match.group(1)) < updates and int(match.group(1)) % 2 == 0, log[-3000:]
    _assert_same_metrics(pipeline_run / "metrics/ppo/int4.json", copy / "metrics/ppo/int4.json")
    assert _tree(copy / paths.live_dir("ppo", "int4")) == _tree(pipeline_run / paths.live_dir("ppo", "int4"))
    assert not work.exists() and not list((copy / "models/ppo").glob(".int4.tmp-*"))


@pytest.mark.slow
@pytest.mark.extra
def test_killed_sft_stage_resumes_to_the_uninterrupted_metrics(pipeline_run, tmp_path):
    """sft (HF Trainer: optimizer, scheduler, RNG and data position restored), checkpoint every 30 steps,
    SIGKILLed after the first: base_eval_loss, losses and the logged curve equal the uninterrupted run's."""
    copy = _copy_with(pipeline_run, tmp_path / "run", "sft", 30)
    work = copy / ".cache/work/sft"
    _kill_when([sys.executable, "stages/sft.py"], copy, work / "checkpoint-30" / "trainer_state.json")
    # killed mid-run: the previous outputs are untouched (new ones replace them only on success)
    assert (copy / "metrics/sft.json").read_bytes() == (pipeline_run / "metrics/sft.json").read_bytes()

    log = _rerun(copy, "sft")
    assert re.search(r"resuming from \S*checkpoint-(30|60|90|120)\b", log), log[-3000:]
    _assert_same_metrics(pipeline_run / "metrics/sft.json", copy / "metrics/sft.json")
    assert _tree(copy / paths.live_dir("sft")) == _tree(pipeline_run / paths.live_dir("sft"))  # each step once
    assert not work.exists() and not list((copy / "models").glob(".sft.tmp-*"))
