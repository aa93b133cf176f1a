"""Stage `ppo@P`: PPO of the SFT policy against the reward model of precision P (our own PPO, edgerlhf.ppo)."""

# ruff: noqa: E402 - loading() speaks before the imports below, which load torch/transformers (seconds)
from edgerlhf.runtime import loading

loading("ppo")

from edgerlhf import data, distributed, judge, live, modeling, paths, resume
from edgerlhf.config import load_precision_stage
from edgerlhf.ppo_stage import PLOT_KEYS, run_ppo
from edgerlhf.runtime import Timer, log, run_stage, write_json


def main() -> None:
    precision, params = load_precision_stage(__doc__)
    # Inputs first (safetensors only, every split record): a bad one fails here and the previous outputs stay;
    # the new ones replace them only on success (distributed.output_dir, atomic write_json). The live curves
    # (dvclive/ppo/P, edgerlhf.live) are written while it runs: emptied when training starts, then every update.
    modeling.require_model(paths.SFT_MERGED, "sft")
    modeling.require_adapter(paths.reward_dir(precision), f"reward@{precision}")
    splits = data.read_splits(params.data.sizes, "ppo_prompts", "eval_prompts")
    judge.require_judge()  # the periodic gold evaluation's judge
    procs, device = distributed.start_stage(params)
    log.info("policy %s, reward model %s at %s, device %s, %s", paths.SFT_MERGED, paths.reward_dir(precision),
             precision, device.describe(), procs.describe())
    timer = Timer()
    stage = f"ppo@{precision}"
    inputs = [paths.SFT_MERGED, paths.reward_dir(precision), paths.JUDGE, paths.split_file("ppo_prompts"),
              paths.split_file("eval_prompts")]
    fp = resume.fingerprint(stage, params, inputs)
    work = resume.claim(resume.work_dir(stage), fp, procs)
    curves = paths.live_dir("ppo", precision) if procs.is_main else None  # only the main process logs
    with distributed.output_dir(paths.ppo_dir(precision), procs) as out, live.ppo_logger(curves, PLOT_KEYS) as logger:
        metrics = run_ppo(params, precision, device, out, splits, checkpoint_dir=work, fingerprint=fp, procs=procs,
                          on_progress=logger)
        distributed.check_replicas(out, out, procs)
    if procs.is_main:
        write_json(paths.ppo_metrics(precision), {**metrics, "num_processes": procs.world_size, **timer.metrics()})
    resume.release(work, procs)  # done: its checkpoints are no longer needed


if __name__ == "__main__":
    run_stage("ppo", main)
