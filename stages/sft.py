"""Stage `sft`: LoRA SFT of the base on prompt -> chosen; writes models/sft/{adapter,merged} and metrics/sft.json."""

# ruff: noqa: E402 - loading() speaks before the imports below, which load torch/transformers (seconds)
from edgerlhf.runtime import loading, trainer_progress_bar

loading("sft")

from edgerlhf import data, distributed, live, modeling, paths, resume
from edgerlhf.config import load_params
from edgerlhf.runtime import Timer, log, run_stage, write_json
from edgerlhf.sft import train_sft


def main() -> None:
    params = load_params()
    # Inputs first (safetensors only, every split record): a bad one fails here and the previous outputs stay;
    # the new ones replace them only on success (distributed.output_dir, atomic write_json). The live curves
    # (dvclive/sft, edgerlhf.live) are written while it trains: emptied when training starts, then every log step.
    modeling.require_model(paths.BASE, "base")
    splits = data.read_splits(params.data.sizes, "sft_train", "sft_eval")
    procs, device = distributed.start_stage(params)
    trainer_progress_bar()
    log.info("model %s, device %s, %s", paths.BASE, device.describe(), procs.describe())
    timer = Timer()
    inputs = [paths.BASE, paths.split_file("sft_train"), paths.split_file("sft_eval")]
    work = resume.claim(resume.work_dir("sft"), resume.fingerprint("sft", params, inputs), procs)
    train, evals = splits["sft_train"], splits["sft_eval"]
    with distributed.output_dir(paths.SFT, procs) as out:
        metrics = train_sft(params, paths.BASE, train, evals, out, work, device,
                               callbacks=[live.trainer_callback(paths.live_dir("sft"))])
        distributed.check_replicas(out / "adapter", out, procs)
    if procs.is_main:
        write_json(paths.METRICS / "sft.json", {**metrics, "num_processes": procs.world_size, **timer.metrics()})
    resume.release(work, procs)  # done: its checkpoints are no longer needed


if __name__ == "__main__":
    run_stage("sft", main)
