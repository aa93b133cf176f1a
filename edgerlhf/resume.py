"""Resumable long stages (sft, reward@P, ppo@P): where their checkpoints live, whose they are, when they go.

A stage checkpoints into its work folder `.cache/work/<stage>` (paths.WORK), which is no DVC output: neither
`dvc repro` (it deletes a stage's outs before running it) nor the stage's output replacement touch it. After an
interruption (`kill -9`, a crash, a power cut) the rerun continues from the last checkpoint, and because the
checkpoint holds the optimizer, the schedule, the data position and every RNG state, the final metrics equal
those of an uninterrupted run (exactly on CPU).

A checkpoint is only reused for the same work: the folder carries a fingerprint (sha256 of the stage name, the
full validated params and the contents of the stage's input files). A folder with another fingerprint is
discarded, and the log says so. The stage deletes its work folder once its outputs are written.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from edgerlhf import paths
from edgerlhf.config import OPERATIONAL_KEYS, Params, to_dict
from edgerlhf.distributed import SINGLE, Processes

log = logging.getLogger("edgerlhf")

FINGERPRINT_FILE = "fingerprint.json"
_TRAINER_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def work_dir(stage: str) -> Path:
    """The work folder of a stage: `sft`, `reward-int4`, `ppo-int4` (the DVC name with @ -> -)."""
    return paths.WORK / stage.replace("@", "-")


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fingerprint(stage: str, params: Params, inputs: Iterable[str | Path]) -> str:
    """sha256 over the stage name, the params (as JSON, without OPERATIONAL_KEYS: a new checkpoint interval or
    thread count keeps the checkpoints) and every input file (folders: every file in them, by relative path). Any
    other change makes an old checkpoint someone else's."""
    digest = hashlib.sha256()
    values = to_dict(params)
    for key in OPERATIONAL_KEYS:
        *parents, leaf = key.split(".")
        node = values
        for part in parents:
            node = node.get(part, {})
        node.pop(leaf, None)
    digest.update(json.dumps({"stage": stage, "params": values}, sort_keys=True).encode())
    for item in map(Path, inputs):
        if item.is_dir():
            for f in sorted(p for p in item.rglob("*") if p.is_file()):
                digest.update(f"\n{item.name}/{f.relative_to(item)}={_sha256_file(f)}".encode())
        else:
            digest.update(f"\n{item.name}={_sha256_file(item) if item.exists() else 'missing'}".encode())
    return digest.hexdigest()


def claim(folder: str | Path, fp: str, procs: Processes = SINGLE) -> Path:
    """Make `folder` the work folder of the work `fp` names. A folder left by other work (other params or
    inputs, or no fingerprint) is discarded, with a log line; one with the same fingerprint is kept to resume.
    In a DDP run the main process does it while the others wait."""
    folder = Path(folder)
    if procs.is_main:
        _claim(folder, fp)
    procs.barrier()
    return folder


def _claim(folder: Path, fp: str) -> None:
    marker = folder / FINGERPRINT_FILE
    if folder.exists():
        try:
            old = json.loads(marker.read_text())["fingerprint"]
        except (OSError, ValueError, KeyError, TypeError):
            old = None
        if old != fp:
            if any(p.name != FINGERPRINT_FILE for p in folder.iterdir()):
                log.info("discarding the checkpoints in %s: they were made for other params or inputs "
                         "(fingerprint %s, now %s)", folder, (old or "none")[:12], fp[:12])
            shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if not marker.exists():
        tmp = marker.with_name(f".{marker.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps({"fingerprint": fp}) + "\n")
        os.replace(tmp, marker)


def release(folder: str | Path, procs: Processes = SINGLE) -> None:
    """Delete a work folder and its checkpoints: the stage completed (in a DDP run: once every process is done)."""
    procs.barrier()
    if procs.is_main:
        shutil.rmtree(folder, ignore_errors=True)


# --------------------------------------------------------------------------- HF Trainer stages (sft, reward)


def trainer_save_args(checkpoint_every: int) -> dict[str, Any]:
    """TrainingArguments for a checkpoint every `checkpoint_every` optimizer steps (0: none). The Trainer saves
    model, optimizer, scheduler, RNG states and its state; only the newest checkpoint is kept."""
    if checkpoint_every <= 0:
        return {"save_strategy": "no"}
    return {"save_strategy": "steps", "save_steps": checkpoint_every, "save_total_limit": 1,
            "save_only_model": False}


def last_trainer_checkpoint(folder: str | Path) -> Path | None:
    """The newest complete `checkpoint-<step>` in `folder`: its trainer_state.json (written last) is readable."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    found = sorted(((int(m.group(1)), p) for p in folder.iterdir()
                    if p.is_dir() and (m := _TRAINER_CHECKPOINT.match(p.name))), reverse=True)
    for _, path in found:
        try:
            json.loads((path / "trainer_state.json").read_text())
        except (OSError, ValueError):
            log.info("ignoring the incomplete checkpoint %s", path)
            continue
        return path
    return None


def trainer_callbacks() -> list:
    """Callbacks that make a Trainer's logged curve cover every step (see `train_loss`)."""
    from transformers import TrainerCallback

    class LogLastStep(TrainerCallback):
        """Log at the last optimizer step too, so the loss of the steps after the last logging step is kept."""

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step >= state.max_steps:
                control.should_log = True
            return control

    return [LogLastStep()]


def train_loss(log_history: list[dict]) -> float:
    """Mean training loss over all optimizer steps, from the logged windows (each entry's `loss` is the mean
    over the steps since the previous one). Trainer's own `training_loss` only covers the steps of the last
    `train()` call, so after a resume it would differ from an uninterrupted run; the log history does not."""
    total, last_step = 0.0, 0
    for entry in log_history:
        if "loss" in entry:
            total += entry["loss"] * (entry["step"] - last_step)
            last_step = entry["step"]
    return total / last_step if last_step else float("nan")
