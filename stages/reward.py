"""Stage `reward@P`: reward model at precision P (bf16 / int8 / int4) trained from the merged SFT model."""

from edgerlhf import data, distributed, modeling, paths, resume
from edgerlhf.config import load_precision_stage
from edgerlhf.reward import train_reward
from edgerlhf.runtime import Timer, log, remove_outputs, run_stage, write_csv, write_json


def main() -> None:
    precision, params = load_precision_stage(__doc__)
    procs, device = distributed.start_stage(params)
    modeling.require_dir(paths.SFT_MERGED, "sft", "config.json")
    log.info("model %s, precision %s, device %s, %s", paths.SFT_MERGED, precision, device.describe(),
             procs.describe())
    if procs.is_main:
        remove_outputs(paths.reward_dir(precision), paths.reward_metrics(precision),
                       paths.PLOTS / "reward" / f"{precision}.csv")
    timer = Timer()
    stage = f"reward@{precision}"
    inputs = [paths.SFT_MERGED, paths.split_file("rm_train"), paths.split_file("rm_test")]
    work = resume.claim(resume.work_dir(stage), resume.fingerprint(stage, params, inputs), procs)
    train = data.read_split(paths.split_file("rm_train"))
    test = data.read_split(paths.split_file("rm_test"))
    with distributed.output_dir(paths.reward_dir(precision), procs) as out:
        metrics, steps, scores = train_reward(params, paths.SFT_MERGED, precision, train, test, out, work, device)
        write_json(out / "rm_test_scores.json", scores)
        distributed.check_replicas(out, out, procs)
    if procs.is_main:
        write_csv(paths.PLOTS / "reward" / f"{precision}.csv", steps)
        write_json(paths.reward_metrics(precision), {**metrics, "num_processes": procs.world_size,
                                                     **timer.metrics()})
    resume.release(work, procs)  # done: its checkpoints are no longer needed


if __name__ == "__main__":
    run_stage("reward", main)
