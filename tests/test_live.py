"""Live metrics (edgerlhf/live.py, dvclive): the PPO loop's files exist and grow while it runs (read back from disk
after every update, and from a second process during a real ppo@P stage), a resumed run holds each update once,
non-finite values are gaps, the Trainer callback logs training steps only and only in the main process, and
`dvc plots show` renders every plot dvc.yaml declares from these files, one series per precision."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from edgerlhf import live, paths, ppo
from edgerlhf.ppo_stage import PLOT_KEYS
from tests.conftest import ROOT, tool_env
from tests.test_ppo_oracles import count_target, small_params, tiny_policy, tiny_tokenizer, toy_prompts

PRECISIONS = ("bf16", "int8", "int4")


@pytest.fixture(autouse=True)
def outside_any_project(tmp_path, monkeypatch):
    """Every test writes relative to a scratch folder (no DVC project, no git repository)."""
    monkeypatch.chdir(tmp_path)


def tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _gold(prompts, responses):
    return [float(r.count("t3")) for r in responses]


class Interrupted(Exception):
    pass


def _train(params, logger, checkpoint_dir=None, stop_at=None) -> ppo.PPOResult:
    def on_log(update, stats):
        if update == stop_at:
            raise Interrupted

    tokenizer = tiny_tokenizer()
    return ppo.train_ppo(tiny_policy(params), tokenizer, toy_prompts(), count_target, params, device="cpu", seed=0,
                         progress=False, evaluator=ppo.Evaluator(_gold, toy_prompts(4, seed=1), tokenizer, 1),
                         on_log=on_log, on_progress=logger,
                         checkpoint=ppo.Checkpointing(checkpoint_dir, "fp") if checkpoint_dir else None)


def test_ppo_loop_files_grow_with_every_update(tmp_path):
    """After each update the files on disk hold every update so far (step = update) and every evaluation so far
    (update 0 = SFT, KL 0): what `dvc plots show` or the VS Code extension reads while the stage runs."""
    params = small_params(total_episodes=40, eval_every=2)
    folder = tmp_path / "dvclive/ppo/int4"
    seen = []

    with live.ppo_logger(folder, PLOT_KEYS) as logger:
        def spy(history, evals):
            logger(history, evals)
            seen.append((len(history), sorted(live.read_metric(live.metric_file(folder, "score"))),
                         [int(r["update"]) for r in live.read_eval_curve(folder)],
                         json.loads((folder / "metrics.json").read_text())["step"]))

        result = _train(params, spy)

    assert [s[0] for s in seen] == list(range(6))  # before the first update, then after each of the 5
    for n, score_steps, eval_updates, step in seen:
        assert score_steps == list(range(1, n + 1))
        assert eval_updates == [u for u in (0, 2, 4, 5) if u <= n]
        assert step == n
    for key in PLOT_KEYS[1:]:  # every per-update stat is a curve at step = update, with the loop's values
        logged = live.read_metric(live.metric_file(folder, key))
        want = {int(r["update"]): r[key] for r in result.history if math.isfinite(r[key])}
        assert logged == pytest.approx(want), key
    kl_at = {0: 0.0, **{int(r["update"]): r["kl"] for r in result.history}}
    curve = live.read_eval_curve(folder)
    assert curve == [pytest.approx({"update": e["update"], "kl": kl_at[int(e["update"])], "gold": e["gold"],
                                    "proxy": e["proxy"]}) for e in result.evals]
    for key in live.EVAL_KEYS:  # the evaluations as metrics of their own too, at their update
        assert sorted(live.read_metric(live.metric_file(folder, f"eval/{key}"))) == [0, 2, 4, 5]
    assert not (folder / "dvc.yaml").exists() and not (folder / "params.yaml").exists()
    assert not (tmp_path / "dvclive" / "metrics.json").exists()  # nothing at dvclive's default root folder


def test_resumed_ppo_run_logs_each_update_once(tmp_path):
    """Killed during update 4 (checkpoint of update 2), rerun: the folder ends as the uninterrupted run's, byte
    for byte (the rerun starts a fresh folder and logs the checkpoint's history first)."""
    params = small_params(total_episodes=40, checkpoint_every=2, eval_every=2)
    with live.ppo_logger(tmp_path / "reference", PLOT_KEYS) as logger:
        _train(small_params(total_episodes=40, checkpoint_every=0, eval_every=2), logger)
    folder = tmp_path / "resumed"
    with pytest.raises(Interrupted), live.ppo_logger(folder, PLOT_KEYS) as logger:
        _train(params, logger, tmp_path / "work", stop_at=4)
    assert sorted(live.read_metric(live.metric_file(folder, "score"))) == [1, 2, 3]  # update 4 died before its log
    with live.ppo_logger(folder, PLOT_KEYS) as logger:
        _train(params, logger, tmp_path / "work")
    assert tree(folder) == tree(tmp_path / "reference")


def test_non_finite_values_are_gaps_and_evaluations_stay_paired(tmp_path):
    folder = tmp_path / "run"
    row = {k: 1.0 for k in PLOT_KEYS}
    history = [{**row, "update": 1.0}, {**row, "update": 2.0, "explained_variance": math.nan},
               {**row, "update": 3.0, "kl": math.inf}]
    evals = [{"update": 0.0, "gold": 0.5, "proxy": 1.0}, {"update": 1.0, "gold": math.nan, "proxy": 2.0},
             {"update": 2.0, "gold": 0.7, "proxy": 3.0}, {"update": 3.0, "gold": 0.8, "proxy": 4.0}]
    with live.ppo_logger(folder, PLOT_KEYS) as logger:
        logger(history, evals)
        logger(history, evals)  # handed over again: nothing new, nothing logged twice
    assert sorted(live.read_metric(live.metric_file(folder, "explained_variance"))) == [1, 3]
    assert sorted(live.read_metric(live.metric_file(folder, "kl"))) == [1, 2]
    assert "nan" not in (folder / "plots/metrics/explained_variance.tsv").read_text().lower()
    # an evaluation with a non-finite gold or KL is left out whole: eval.json and eval/*.tsv keep one row each
    assert [r["update"] for r in live.read_eval_curve(folder)] == [0, 2]
    for key in live.EVAL_KEYS:
        assert sorted(live.read_metric(live.metric_file(folder, f"eval/{key}"))) == [0, 2]


def test_a_new_run_starts_from_an_empty_folder(tmp_path):
    folder = tmp_path / "run"
    (folder / "plots/metrics").mkdir(parents=True)
    (folder / "plots/metrics/old_curve.tsv").write_text("step\told_curve\n1\t5\n")
    (folder / "plots/metrics/score.tsv").write_text("step\tscore\n1\t9\n2\t9\n")
    with live.ppo_logger(folder, PLOT_KEYS) as logger:
        logger([{**dict.fromkeys(PLOT_KEYS, 0.25), "update": 1.0}], [])
    assert not (folder / "plots/metrics/old_curve.tsv").exists()
    assert live.read_metric(live.metric_file(folder, "score")) == {1: 0.25}


def test_logging_needs_no_dvc_repository_and_makes_none(tmp_path):
    """A git repository that is no DVC project stays one (dvclive alone would `dvc init` it); a new project's
    first run, in a git repository without commits, logs (dvclive alone fails there looking up a revision)."""
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    row = [{**dict.fromkeys(PLOT_KEYS, 0.5), "update": 1.0}]
    with live.ppo_logger(tmp_path / "dvclive/ppo/int4", PLOT_KEYS) as logger:
        logger(row, [])
    assert not (tmp_path / ".dvc").exists() and not (tmp_path / "dvc.yaml").exists()
    subprocess.run([str(Path(sys.executable).parent / "dvc"), "init", "-q"], cwd=tmp_path, check=True)
    with live.ppo_logger(tmp_path / "dvclive/ppo/int4", PLOT_KEYS) as logger:
        logger(row, [])
    assert live.read_metric(live.metric_file(tmp_path / "dvclive/ppo/int4", "score")) == {1: 0.5}


# --------------------------------------------------------------------------- the Trainer stages


def _trainer_run(folder: Path, main: bool = True, resumed_from: list[dict] | None = None) -> None:
    """What the HF Trainer calls on the callback: train begin (with a resumed checkpoint's log history), a log
    entry per logging step, the run's summary entry, train end, then the stage's own evaluations."""
    from transformers import TrainerState

    callback = live.trainer_callback(folder)
    state = TrainerState(is_world_process_zero=main, log_history=list(resumed_from or []))
    state.global_step = max((e["step"] for e in state.log_history), default=0)
    callback.on_train_begin(None, state, None)
    for step in (10, 20, 30):
        if step <= state.global_step:
            continue
        state.global_step = step
        logs = {"loss": 1.0 / step, "grad_norm": math.nan if step == 20 else 0.5, "learning_rate": 1e-3,
                "epoch": step / 30, "num_tokens": 100.0 * step}
        state.log_history.append({**logs, "step": step})
        callback.on_log(None, state, None, logs=logs)
    callback.on_log(None, state, None, logs={"train_loss": 0.05, "train_runtime": 2.0})  # the run's summary
    callback.on_train_end(None, state, None)
    callback.on_log(None, state, None, logs={"eval_loss": 0.3})  # the stage's evaluate() after training


def test_trainer_callback_logs_training_steps_once_and_only_in_the_main_process(tmp_path):
    _trainer_run(tmp_path / "sft")
    assert live.read_metric(live.metric_file(tmp_path / "sft", "loss")) == {10: 0.1, 20: 0.05, 30: 1 / 30}
    assert sorted(live.read_metric(live.metric_file(tmp_path / "sft", "grad_norm"))) == [10, 30]  # NaN: a gap
    # no summary entry, no evaluation after training, no token count (TRL restarts it on resume)
    assert sorted(p.name for p in (tmp_path / "sft/plots/metrics").iterdir()) == [
        "epoch.tsv", "grad_norm.tsv", "learning_rate.tsv", "loss.tsv"]
    summary = json.loads((tmp_path / "sft/metrics.json").read_text())
    assert summary["step"] == 30 and "train" not in summary and "eval" not in summary
    assert not (tmp_path / "sft/params.yaml").exists()

    # resumed from the checkpoint of step 20: its logged entries first (as trainer_state.json holds them: keys
    # sorted), then the rest; the files equal the uninterrupted run's
    history = [{"loss": 0.1, "grad_norm": 0.5, "learning_rate": 1e-3, "epoch": 10 / 30, "num_tokens": 1e3, "step": 10},
               {"loss": 0.05, "grad_norm": math.nan, "learning_rate": 1e-3, "epoch": 20 / 30, "num_tokens": 2e3,
                "step": 20}]
    _trainer_run(tmp_path / "resumed", resumed_from=[json.loads(json.dumps(e, sort_keys=True)) for e in history])
    assert tree(tmp_path / "resumed") == tree(tmp_path / "sft")

    _trainer_run(tmp_path / "rank1", main=False)
    assert not (tmp_path / "rank1").exists()


# --------------------------------------------------------------------------- dvc plots show


def write_live_run(root: Path, updates: int = 6) -> None:
    """Live folders of every training stage instance, written by the project's own loggers."""
    for i, p in enumerate(PRECISIONS):
        history, evals = [], [{"update": 0.0, "gold": 1.0, "proxy": 2.0}]
        with live.ppo_logger(root / paths.live_dir("ppo", p), PLOT_KEYS) as logger:
            logger(history, evals)
            for u in range(1, updates + 1):
                history.append({**{k: float(u + i) for k in PLOT_KEYS}, "update": float(u)})
                if u % 3 == 0:
                    evals.append({"update": float(u), "gold": 1.0 + 0.1 * u - i, "proxy": 2.0 + u})
                logger(history, evals)
        _trainer_run(root / paths.live_dir("reward", p))
    _trainer_run(root / paths.live_dir("sft"))


def declared_sources(spec: dict) -> list[str]:
    files = list(spec["y"]) if isinstance(spec.get("y"), dict) else []
    return files + (list(spec["x"]) if isinstance(spec.get("x"), dict) else [])


def test_dvc_plots_show_renders_every_declared_plot_from_the_live_files(tmp_path):
    """dvc.yaml's own `plots:` against files the loggers wrote: every chart has every declared series, named by the
    precision (DVC colours a chart's series by file)."""
    dvc = str(Path(sys.executable).parent / "dvc")
    subprocess.run([dvc, "init", "--no-scm", "-q"], cwd=tmp_path, check=True)
    plots = yaml.safe_load((ROOT / "dvc.yaml").read_text())["plots"]
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"plots": plots}, sort_keys=False))
    write_live_run(tmp_path)
    proc = subprocess.run([dvc, "plots", "show", "--json"], cwd=tmp_path, capture_output=True, text=True,
                          env=tool_env())
    assert proc.returncode == 0, proc.stderr
    shown = json.loads(proc.stdout)
    assert not shown.get("errors"), shown["errors"]
    for plot in plots:
        (plot_id, spec), = plot.items()
        files = declared_sources(spec)
        assert files and all((tmp_path / f).is_file() for f in files), plot_id
        (rendered,) = shown["data"][plot_id]
        values = rendered["content"]["data"]["values"]
        series = {v.get("filename") for v in values}
        if len(spec["y"]) > 1:  # the combined charts: one series per precision, named by it
            assert sorted(s.split("/")[0] for s in series) == sorted(PRECISIONS), (plot_id, series)
        rows = sum(len(live.read_eval_curve((tmp_path / f).parents[2])) if f.endswith(".json")
                   else len(live.read_metric(tmp_path / f)) for f in spec["y"])
        assert len(values) == rows > 0, plot_id


# --------------------------------------------------------------------------- a real stage, read from outside


@pytest.mark.slow
@pytest.mark.extra  # a whole PPO stage in a second process (~13 s): `make test-extra`
def test_ppo_stage_files_grow_while_it_runs(pipeline_run, tmp_path):
    """ppo@int4 rerun in a copy of the session's finished run: a second process (this test) reads its live files
    while it runs and sees them grow; at the end they equal the finished run's (same params, same trajectory)."""
    copy = tmp_path / "run"
    shutil.copytree(pipeline_run, copy, symlinks=True)
    folder = copy / paths.live_dir("ppo", "int4")
    score = live.metric_file(folder, "score")
    updates = json.loads((pipeline_run / paths.ppo_metrics("int4")).read_text())["updates"]
    log = tmp_path / "ppo.log"
    with log.open("w") as err:
        proc = subprocess.Popen([sys.executable, "stages/ppo.py", "int4"], cwd=copy, env=tool_env(),
                                stdout=subprocess.DEVNULL, stderr=err)
    seen: list[int] = []
    deadline = time.monotonic() + 600
    while proc.poll() is None and time.monotonic() < deadline:
        rows = len(live.read_metric(score)) if score.is_file() else 0
        if rows and (not seen or rows != seen[-1]):
            seen.append(rows)
        time.sleep(0.05)
    proc.kill()
    assert proc.wait() == 0, log.read_text()[-3000:]
    mid_run = [n for n in seen if n < updates]
    assert len(mid_run) >= 2 and mid_run == sorted(mid_run), seen  # read during the run, and growing
    assert sorted(live.read_metric(score)) == list(range(1, updates + 1))
    assert tree(folder) == tree(pipeline_run / paths.live_dir("ppo", "int4"))
