"""Stage `evaluate`: SFT and every PPO policy on eval_prompts, scored by every proxy RM and the gold judge."""

# ruff: noqa: E402 - loading() speaks before the imports below, which load torch/transformers (seconds)
from edgerlhf.runtime import loading, set_threads

loading("evaluate")

from edgerlhf import data, modeling, paths
from edgerlhf.config import load_params
from edgerlhf.evaluation import check_inputs, run_evaluation
from edgerlhf.runtime import Timer, log, run_stage, seed_everything, write_json


def main() -> None:
    params = load_params()
    # Every input first (safetensors only, every split record); both outputs are written, each atomically, only
    # once the whole evaluation has succeeded, so a failure leaves the previous ones as they were.
    check_inputs(params)
    set_threads(params.hardware)
    seed_everything(params.seed)
    device = modeling.resolve_device(params.hardware)
    log.info("policies sft + ppo@{%s}, reward models %s, device %s", ",".join(params.reward.precisions),
             ",".join(params.reward.precisions), device.describe())
    timer = Timer()
    metrics, samples = run_evaluation(params, device)
    data.write_jsonl(paths.SAMPLES, samples)
    write_json(paths.EVAL_METRICS, {**metrics, **timer.metrics()})
    log.info("wrote %s and %s (%d rows)", paths.EVAL_METRICS, paths.SAMPLES, len(samples))


if __name__ == "__main__":
    run_stage("evaluate", main)
