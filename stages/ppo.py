"""Stage `ppo@P`: PPO of the SFT policy against the reward model of precision P (our own PPO, edgerlhf.ppo)."""

from edgerlhf import data, distributed, judge, modeling, paths, resume
from edgerlhf.config import load_precision_stage
from edgerlhf.ppo_stage import run_ppo
from edgerlhf.runtime import Timer, log, run_stage, write_csv, write_json


def main() -> None:
    precision, params = load_precision_stage(__doc__)
    # Inputs first (safetensors only, every split record): a bad one fails here and the previous outputs stay;
    # the new ones replace them only on success (distributed.output_dir, atomic write_json/write_csv).
    modeling.require_model(paths.SFT_MERGED, "sft")
    modeling.require_adapter(paths.reward_dir(precision), f"reward@{precision}")
    splits = data.read_splits(params.data.sizes, "ppo_prompts", "eval_prompts")
    judge.require_judge()  # the periodic gold evaluation's judge
    procs, device = distributed.start_stage(params)
    log.info("policy %s, reward model %s at %s, device %s, %s", paths.SFT_MERGED, paths.reward_dir(precision),
             precision, device.describe(), procs.describe())
    curves, eval_curves = paths.PLOTS / "ppo" / f"{precision}.csv", paths.PLOTS / "ppo_eval" / f"{precision}.csv"
    timer = Timer()
    stage = f"ppo@{precision}"
    inputs = [paths.SFT_MERGED, paths.reward_dir(precision), paths.JUDGE, paths.split_file("ppo_prompts"),
              paths.split_file("eval_prompts")]
    fp = resume.fingerprint(stage, params, inputs)
    work = resume.claim(resume.work_dir(stage), fp, procs)
    with distributed.output_dir(paths.ppo_dir(precision), procs) as out:
        metrics, history, evals = run_ppo(params, precision, device, out, splits, checkpoint_dir=work,
                                          fingerprint=fp, procs=procs)
        distributed.check_replicas(out, out, procs)
    if procs.is_main:
        write_csv(curves, history)
        # Gold vs proxy reward against KL at the periodic evaluations (Gao et al. 2022 style over-optimisation view).
        write_csv(eval_curves, evals)
        write_json(paths.ppo_metrics(precision), {**metrics, "num_processes": procs.world_size, **timer.metrics()})
    resume.release(work, procs)  # done: its checkpoints are no longer needed


if __name__ == "__main__":
    run_stage("ppo", main)
