"""Live metrics with dvclive: the training stages log while they run, so `dvc plots show` and the VS Code
extension's plots view show the curves of a stage that has not finished.

One folder per stage instance (`paths.live_dir`): dvclive/sft, dvclive/reward/<P>, dvclive/ppo/<P>. In it dvclive
writes `metrics.json` (the latest value of every curve, and `step`) and `plots/metrics/<name>.tsv` (one row per
logged step: step, value); the PPO stage adds `plots/custom/eval.json`, its periodic evaluations (update, kl, gold,
proxy), the data of the gold-vs-KL chart. dvc.yaml declares the folders as the stages' outputs and draws the
combined charts (`plots:`), one series per precision. The metrics.json files are no DVC metrics (`dvc exp show`
compares metrics/headline.json); read one to see where a running stage is.

- SFT and reward training report through transformers' dvclive integration (`trainer_callback`), with the
  optimizer step as dvclive's step; the PPO loop logs every update through `dvclive.Live` (`PPOLive`, the loop's
  `on_progress`), step = update.
- A run starts by deleting its own folder (`open_live`): a failed run leaves its own partial curves, never an old
  run's mixed with new steps. A resumed run (a stage checkpoint) logs the checkpoint's history first, from the
  Trainer's log history or the PPO loop's state, so the files hold each step once, as an uninterrupted run's.
- Non-finite values are left out of the logs (no row for that step): an undefined explained variance is a gap.
- Only the main process logs in a DDP run. No dvc.yaml and no DVC experiment of dvclive's own (dvcyaml=False,
  save_dvc_exp=False): dvc.yaml is the map, and the stage's headline numbers stay in metrics/.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

METRICS_DIR = Path("plots") / "metrics"  # under a live folder: <name>.tsv per logged curve (dvclive's layout)
EVAL_PLOT = "eval"  # the PPO stage's periodic evaluations: plots/custom/eval.json (Live.log_plot)
EVAL_FILE = Path("plots") / "custom" / f"{EVAL_PLOT}.json"
EVAL_KEYS = ("kl", "gold", "proxy")  # of each evaluation row (and `update`); also logged as eval/<key> per update


def metric_file(live_dir: str | Path, name: str) -> Path:
    """The tsv dvclive writes for metric `name` (e.g. `loss`, `score`, `eval/gold`) under `live_dir`."""
    return Path(live_dir) / METRICS_DIR / f"{name}.tsv"


def eval_file(live_dir: str | Path) -> Path:
    """The PPO stage's periodic evaluations under `live_dir`: a JSON list of {update, kl, gold, proxy}."""
    return Path(live_dir) / EVAL_FILE


def _finite(value: Any) -> float | None:
    """A loggable number, or None (not a number, a bool, NaN or infinite): left out of the logs."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def open_live(directory: str | Path):
    """A `dvclive.Live` writing into `directory`, emptied first. It opens no DVC repository: nothing here needs one
    (no dvc.yaml, no experiment of its own), and dvclive's lookup fails in a git repository without commits (a new
    project's first `dvc repro`) and `dvc init`s a git repository that is no DVC project. The VS Code extension's
    step signal (.dvc/tmp/exps/run) does not depend on it."""
    from dvclive import Live

    class _Live(Live):
        def _init_dvc(self) -> None:
            self._dvc_file = "dvc.yaml"

    directory = Path(directory)
    shutil.rmtree(directory, ignore_errors=True)
    directory.parent.mkdir(parents=True, exist_ok=True)
    return _Live(dir=str(directory), save_dvc_exp=False, dvcyaml=False)


# --------------------------------------------------------------------------- HF Trainer stages (sft, reward@P)


# Trainer log keys left out of the curves: TRL's running token count starts again from 0 when a run resumes from a
# checkpoint (TRL does not save it), so its curve would jump back mid-run.
TRAINER_KEYS_NOT_LOGGED = ("num_tokens",)


def trainer_callback(directory: str | Path):
    """A Trainer callback (transformers' `DVCLiveCallback`) logging every training log entry (loss, grad_norm,
    learning_rate, ...; not TRAINER_KEYS_NOT_LOGGED) into `directory` at its optimizer step. Only the main process
    logs; the entries of a checkpoint the Trainer resumes from are logged first; nothing after training (the
    stage's final evaluations go to metrics/, not into the curves); no params file (params.yaml is the project's)."""
    from dvclive.utils import standardize_metric_name
    from transformers.integrations import DVCLiveCallback

    class TrainerLive(DVCLiveCallback):
        def __init__(self) -> None:
            super().__init__(log_model=False)
            self.training = False

        def setup(self, args, state, model) -> None:
            self._initialized = True
            if state.is_world_process_zero:
                self.live = open_live(directory)

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            super().on_train_begin(args, state, control, model=model, **kwargs)
            self.training = True
            for entry in state.log_history:  # resumed: what the checkpoint logged, once
                self._log(entry.get("step", 0), entry)

        def on_log(self, args, state, control, model=None, logs=None, **kwargs):
            if self.training:
                self._log(state.global_step, logs or {})

        def on_train_end(self, args, state, control, **kwargs):
            self.training = False
            super().on_train_end(args, state, control, **kwargs)

        def _log(self, step: int, logs: dict) -> None:
            if self.live is None or "loss" not in logs:  # training entries only (not the run's summary)
                return
            self.live.step = int(step)
            for key in sorted(logs):  # sorted: a checkpoint's log history comes back with its keys sorted
                if key != "step" and key not in TRAINER_KEYS_NOT_LOGGED and (x := _finite(logs[key])) is not None:
                    self.live.log_metric(standardize_metric_name(key, "dvclive.huggingface"), x)
            self.live.next_step()

    return TrainerLive()


# --------------------------------------------------------------------------- the PPO loop


class PPOLive:
    """`ppo.train_ppo`'s on_progress(history, evals): logs the updates and evaluations it has not logged yet, so
    the loop hands over its whole state each time and a resumed run's restored history goes in once, in order.

    Every update: each of `keys` (the per-update stats) at step = update. Each periodic evaluation: eval/kl,
    eval/gold, eval/proxy at its update (update 0 = the SFT policy, KL 0), and the list of all evaluations so far
    as plots/custom/eval.json, the gold-vs-KL chart's data (dvc plots pair x and y within one file)."""

    def __init__(self, directory: str | Path, keys: Sequence[str]) -> None:
        self.live = open_live(directory)
        self.keys = [k for k in keys if k != "update"]
        self.updates, self.evaluations = 0, 0  # history rows and evaluations handed over so far
        self.evals: list[dict[str, float]] = []  # the evaluation rows logged (the finite ones)

    def __call__(self, history: Sequence[dict[str, float]], evals: Sequence[dict[str, float]]) -> None:
        rows = {int(r["update"]): r for r in history[self.updates:]}
        new_evals = {int(e["update"]): e for e in evals[self.evaluations:]}
        self.updates, self.evaluations = len(history), len(evals)
        for step in sorted(rows.keys() | new_evals.keys()):
            self.live.step = step
            row = rows.get(step, {})
            for key in self.keys:
                if (x := _finite(row.get(key))) is not None:
                    self.live.log_metric(key, x)
            if step in new_evals:
                self._log_eval(step, new_evals[step], 0.0 if step == 0 else row.get("kl"))
            self.live.next_step()

    def _log_eval(self, step: int, evaluation: dict[str, float], kl: float | None) -> None:
        values = {"kl": _finite(kl), "gold": _finite(evaluation.get("gold")), "proxy": _finite(evaluation.get("proxy"))}
        if any(v is None for v in values.values()):
            return  # one row in every eval file or none: the chart pairs them by update
        for key in EVAL_KEYS:
            self.live.log_metric(f"eval/{key}", values[key])
        self.evals.append({"update": step, **values})
        self.live.log_plot(EVAL_PLOT, list(self.evals), x="kl", y=["gold", "proxy"], template="linear",
                           title="gold and proxy reward vs KL to SFT")

    def end(self) -> None:
        self.live.end()


@contextlib.contextmanager
def ppo_logger(directory: str | Path | None, keys: Sequence[str]) -> Iterator[PPOLive | None]:
    """A `PPOLive` into `directory` (None: no logging, e.g. a DDP process other than the main one), ended after
    the block."""
    if directory is None:
        yield None
        return
    logger = PPOLive(directory, keys)
    try:
        yield logger
    finally:
        logger.end()


# --------------------------------------------------------------------------- reading the files back


def read_metric(path: str | Path) -> dict[int, float]:
    """step -> value of a dvclive metric tsv ({} when the file is absent)."""
    path = Path(path)
    if not path.is_file():
        return {}
    with path.open(newline="") as fh:
        rows = list(csv.DictReader(fh, delimiter="\t"))
    name = [k for k in (rows[0] if rows else {}) if k not in ("step", "timestamp")]
    return {int(r["step"]): float(r[name[0]]) for r in rows if name and r.get(name[0]) not in ("", None)}


def read_eval_curve(live_dir: str | Path) -> list[dict[str, float]]:
    """The PPO stage's periodic evaluations (update, kl, gold, proxy as floats) from its live folder; [] when it
    made none (no gold judge) or the file is absent."""
    path = eval_file(live_dir)
    if not path.is_file():
        return []
    return [{k: float(v) for k, v in row.items()} for row in json.loads(path.read_text())]
