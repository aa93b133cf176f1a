"""Stage `reward@P`: reward model at precision P (bf16 / int8 / int4) trained from the merged SFT model."""

# ruff: noqa: E402 - loading() speaks before the imports below, which load torch/transformers (seconds)
from edgerlhf.runtime import loading, trainer_progress_bar

loading("reward")

from edgerlhf import data, distributed, live, modeling, paths, resume
from edgerlhf.config import load_precision_stage
from edgerlhf.reward import train_reward
from edgerlhf.runtime import Timer, log, run_stage, write_json


def main() -> None:
    precision, params = load_precision_stage(__doc__)
    # Inputs first (safetensors only, every split record): a bad one fails here and the previous outputs stay;
    # the new ones replace them only on success (distributed.output_dir, atomic write_json). The live curves
    # (dvclive/reward/P, edgerlhf.live) are written while it trains: emptied when training starts, then every log step.
    modeling.require_model(paths.SFT_MERGED, "sft")
    splits = data.read_labelled(params.data.sizes, "rm_train", "rm_test")  # data.labels applied by `judge`
    procs, device = distributed.start_stage(params)
    trainer_progress_bar()
    log.info("model %s, precision %s, device %s, %s", paths.SFT_MERGED, precision, device.describe(),
             procs.describe())
    timer = Timer()
    stage = f"reward@{precision}"
    inputs = [paths.SFT_MERGED, paths.labelled_split("rm_train"), paths.labelled_split("rm_test")]
    work = resume.claim(resume.work_dir(stage), resume.fingerprint(stage, params, inputs), procs)
    train, test = splits["rm_train"], splits["rm_test"]
    with distributed.output_dir(paths.reward_dir(precision), procs) as out:
        metrics, scores = train_reward(params, paths.SFT_MERGED, precision, train, test, out, work, device,
                                          callbacks=[live.trainer_callback(paths.live_dir("reward", precision))])
        write_json(out / "rm_test_scores.json", scores)
        distributed.check_replicas(out, out, procs)
    if procs.is_main:
        write_json(paths.reward_metrics(precision), {**metrics, "num_processes": procs.world_size,
                                                     **timer.metrics()})
    resume.release(work, procs)  # done: its checkpoints are no longer needed


if __name__ == "__main__":
    run_stage("reward", main)
