"""Stage `judge`: the gold judge into models/judge (eval.judge), its accuracy on rm_test into metrics/judge.json, and
rm_train / rm_test as the reward models learn them (data.labels: human copies them, judge orders them by the judge)."""

# ruff: noqa: E402 - loading() speaks before the imports below, which load torch/transformers (seconds)
from edgerlhf.runtime import loading, set_threads, trainer_progress_bar

loading("judge")

from edgerlhf import data, judge, paths, resume
from edgerlhf import metrics as M
from edgerlhf.config import load_params
from edgerlhf.modeling import require_model, resolve_device
from edgerlhf.runtime import Timer, atomic_dir, log, run_stage, seed_everything, write_json


def main() -> None:
    params = load_params()
    kind = judge.judge_kind(params)
    if kind == judge.TRAINED:
        trainer_progress_bar()
    # Inputs first (every split record, the base model for a trained judge); outputs are replaced only on success.
    names = ["rm_train", "rm_test"] + (["judge_train"] if kind == judge.TRAINED else [])
    splits = data.read_splits(params.data.sizes, *names)
    if kind == judge.TRAINED and not params.eval.judge_base:
        require_model(paths.BASE, "base")
    set_threads(params.hardware)
    seed_everything(params.seed)
    device = resolve_device(params.hardware)
    log.info("judge %s (eval.judge %s), labels %s, device %s", kind, params.eval.judge, params.data.labels,
             device.describe())
    timer = Timer()
    metrics: dict[str, float] = {}
    work = None
    with atomic_dir(paths.JUDGE) as out:
        if kind == judge.MODEL and params.eval.judge_source == "hub":
            info = judge.snapshot_hub_judge(params.eval.judge_model, params.eval.judge_revision, out)
        elif kind == judge.MODEL:
            info = judge.copy_local_judge(params.eval.judge_path, out)
        elif kind == judge.TRAINED:
            inputs = [paths.BASE, paths.split_file("judge_train"), paths.split_file("rm_test")]
            work = resume.claim(resume.work_dir("judge"), resume.fingerprint("judge", params, inputs))
            info, metrics = judge.train_judge(params, device, splits["judge_train"], splits["rm_test"], out, work)
        else:
            info = {"kind": kind}
        info["description"] = judge.describe(info)  # what the report says (it does not load this module)
        write_json(out / judge.INFO_FILE, info)
        log.info("judge: %s", info["description"])

        gold = (judge.rules_judge() if kind == judge.RULES else None if kind == judge.NONE else
                judge.ModelJudge(judge.check_judge_folder(out, "rerun `dvc repro -f judge`"), device,
                                 params.eval.judge_batch_size, params.eval.judge_max_length,
                                 params.eval.judge_trust_remote_code and kind == judge.MODEL))
        test = splits["rm_test"]
        metrics["rm_test_pairs"] = len(test)
        labelled = {"rm_train": splits["rm_train"], "rm_test": test}
        if gold is not None:
            to_score = ["rm_train", "rm_test"] if params.data.labels == "judge" else ["rm_test"]
            scores = {name: judge.pair_scores(gold, splits[name]) for name in to_score}
            chosen, rejected = scores["rm_test"]
            metrics["accuracy_vs_human"] = round(M.pairwise_accuracy(chosen, rejected), 6)
            metrics["tie_fraction"] = round(M.tie_fraction(chosen, rejected), 6)
            if params.data.source == "synthetic" and kind != judge.RULES:
                rules = judge.pair_scores(judge.rules_judge(), test)
                metrics["agreement_with_rules"] = round(M.choice_agreement(chosen, rejected, *rules), 6)
            if isinstance(gold, judge.ModelJudge):
                metrics["truncated_dialogues"] = gold.truncated
            if params.data.labels == "judge":
                for name in to_score:
                    labelled[name], flipped, ties = judge.relabel(splits[name], *scores[name])
                    metrics[f"flipped_{name}"], metrics[f"ties_{name}"] = flipped, ties
        with atomic_dir(paths.LABELLED) as folder:
            for name, records in labelled.items():
                data.write_jsonl(folder / f"{name}.jsonl", records)
    write_json(paths.JUDGE_METRICS, {**metrics, **timer.metrics()})
    if work is not None:
        resume.release(work)
    log.info("judge: %s", ", ".join(f"{k} {v}" for k, v in metrics.items()))


if __name__ == "__main__":
    run_stage("judge", main)
