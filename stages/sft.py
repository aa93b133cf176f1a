"""Stage `sft`: LoRA SFT of the base on prompt -> chosen; writes models/sft/{adapter,merged} and metrics/sft.json."""

from edgerlhf import data, distributed, modeling, paths, resume
from edgerlhf.config import load_params
from edgerlhf.runtime import Timer, log, remove_outputs, run_stage, write_csv, write_json
from edgerlhf.sft import train_sft


def main() -> None:
    params = load_params()
    procs, device = distributed.start_stage(params)
    modeling.require_dir(paths.BASE, "base", "config.json")
    log.info("model %s, device %s, %s", paths.BASE, device.describe(), procs.describe())
    if procs.is_main:
        remove_outputs(paths.SFT, paths.METRICS / "sft.json", paths.PLOTS / "sft.csv")
    timer = Timer()
    inputs = [paths.BASE, paths.split_file("sft_train"), paths.split_file("sft_eval")]
    work = resume.claim(resume.work_dir("sft"), resume.fingerprint("sft", params, inputs), procs)
    train = data.read_split(paths.split_file("sft_train"))
    evals = data.read_split(paths.split_file("sft_eval"))
    with distributed.output_dir(paths.SFT, procs) as out:
        metrics, steps = train_sft(params, paths.BASE, train, evals, out, work, device)
        distributed.check_replicas(out / "adapter", out, procs)
    if procs.is_main:
        write_csv(paths.PLOTS / "sft.csv", steps)
        write_json(paths.METRICS / "sft.json", {**metrics, "num_processes": procs.world_size, **timer.metrics()})
    resume.release(work, procs)  # done: its checkpoints are no longer needed


if __name__ == "__main__":
    run_stage("sft", main)
