"""What every stage shares: logging, seeding, one-line failures, all-or-nothing outputs, timing and VRAM."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import shutil
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from edgerlhf.errors import EdgeRLHFError

log = logging.getLogger("edgerlhf")


def _log_format(stage: str) -> None:
    """The stage's log lines (cheap: no library is imported). In a DDP run (edgerlhf.launch) the lines name the
    process, and only the main process logs progress: the others log warnings and errors."""
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    where = stage if world == 1 else f"{stage} rank {rank}/{world}"
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"%(asctime)s [{where}] %(message)s", datefmt="%H:%M:%S", stream=sys.stderr,
                        force=True)
    for name in ("transformers", "datasets", "peft", "trl", "accelerate", "bitsandbytes"):
        logging.getLogger(name).setLevel(logging.ERROR)


def loading(stage: str) -> None:
    """One line before a stage imports torch/transformers, which takes seconds: the pause after DVC's "Running
    stage" is explained. Stage scripts call it first, above their other imports."""
    _log_format(stage)
    log.info("loading torch/transformers...")


# Library warnings that nothing in this project or its params can act on, filtered at every stage start by message
# and by the library module that issues them. None matches a module of edgerlhf: our own warnings always show
# (tests/test_runtime.py checks the smoke log has none).
LIBRARY_WARNINGS = (
    # transformers 5 renamed the property to is_activation_checkpointing; peft (PeftModel.__init__) and trl
    # (models/utils.py) still read the old name on every model they wrap. Their code, fixed by their next release.
    (FutureWarning, r"`is_gradient_checkpointing` is deprecated", r"transformers\.modeling_utils"),
    # torch 2.13 deprecates TorchScript; libraries decorate with torch.jit.script_method when imported (hidden by
    # Python's default filters, shown under pytest or -W). We never call torch.jit.
    (DeprecationWarning, r"`torch\.jit\.\w+` is deprecated", r"torch\.jit\."),
)


def quiet_library_warnings() -> None:
    """Filter LIBRARY_WARNINGS (each one by message, category and issuing module)."""
    import warnings

    for category, message, module in LIBRARY_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)


def setup_logging(stage: str) -> None:
    """Log lines say which stage they come from; quiet the libraries' chatter (loggers at errors, the
    non-actionable warnings of LIBRARY_WARNINGS)."""
    _log_format(stage)
    quiet_library_warnings()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        import datasets
        import transformers

        # Also makes TrainingArguments.disable_tqdm default to True: sft/reward set it False (trainer_progress_bar).
        transformers.utils.logging.set_verbosity_error()
        datasets.utils.logging.set_verbosity_error()
        datasets.disable_progress_bars()
    except ImportError:  # pragma: no cover - both are hard dependencies
        pass


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask: a container's or taskset's limit, not the machine's)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - macOS, Windows
        return os.cpu_count() or 1


def resolve_cpu_threads(setting: int | str, num_processes: int, cores: int | None = None) -> int:
    """hardware.cpu_threads as a number: auto = usable cores shared by the stage's processes, at least 1."""
    if setting == "auto":
        return max(1, (usable_cores() if cores is None else cores) // max(1, num_processes))
    return int(setting)


def set_threads(hardware: Any) -> int:
    """What every computing stage does first: torch's intra-op (OpenMP) and inter-op threads from
    hardware.cpu_threads, whatever started the stage (dvc repro, make smoke, python stages/x.py) and whatever
    OMP_NUM_THREADS says. Logs one line; returns the number (Timer.metrics records it as cpu_threads)."""
    import torch

    n = resolve_cpu_threads(hardware.cpu_threads, hardware.num_processes)
    torch.set_num_threads(n)
    with contextlib.suppress(RuntimeError):  # settable once per process, before any inter-op work: else kept
        torch.set_num_interop_threads(n)
    how = (f"auto: {usable_cores()} usable cores / {hardware.num_processes} process(es)"
           if hardware.cpu_threads == "auto" else str(hardware.cpu_threads))
    log.info("threads %d (hardware.cpu_threads %s)", n, how)
    return n


def trainer_progress_bar() -> None:
    """The HF Trainer's progress bar (steps done, rate, ETA) with the latest loss on it, for the stages that train
    with a Trainer (sft, reward@P, a trained judge; their configs set disable_tqdm=False).

    transformers' own bar (ProgressCallback) prints every logged dict on a line of its own; this one puts loss
    (and accuracy) on the bar instead; the logged values stay in trainer.state.log_history and the live curves.
    The Trainer adds the class transformers.trainer.DEFAULT_PROGRESS_CALLBACK itself, so that is where it goes."""
    import transformers.trainer
    from transformers.trainer_callback import ProgressCallback

    class ProgressBar(ProgressCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if state.is_world_process_zero and self.training_bar is not None and logs:
                shown = {k: f"{logs[k]:.4g}" for k in ("loss", "accuracy") if isinstance(logs.get(k), (int, float))}
                if shown:
                    self.training_bar.set_postfix(shown, refresh=False)

    transformers.trainer.DEFAULT_PROGRESS_CALLBACK = ProgressBar


def seed_everything(seed: int) -> None:
    """Seed python, numpy, torch (and CUDA) and make CPU kernels deterministic."""
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)
    try:
        from transformers import set_seed

        set_seed(seed)
    except ImportError:  # pragma: no cover
        pass


# What to lower when a stage runs out of GPU memory.
OOM_HINTS = {
    "sft": "sft.per_device_train_batch_size, sft.max_length (or set sft.gradient_checkpointing: true)",
    "reward": "reward.per_device_train_batch_size, reward.max_length, reward.eval_batch_size",
    "ppo": "ppo.mini_batch_size, ppo.logprob_chunk_size, ppo.response_length (or ppo.gradient_checkpointing: true)",
    "evaluate": "eval.batch_size, eval.max_new_tokens",
    "base": "model.tiny.pretrain_batch_size",
}


def explain(stage: str, exc: BaseException) -> EdgeRLHFError | None:
    """Map a known low-level failure to the one-line error a user can act on; None if it is not one."""
    import errno

    from edgerlhf.errors import ArtifactError, HardwareError

    if type(exc).__name__ == "OutOfMemoryError" or "CUDA out of memory" in str(exc):
        import torch

        peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0
        return HardwareError(f"CUDA out of memory in stage {stage} (peak {peak:.2f} GB allocated); lower "
                             f"{OOM_HINTS.get(stage, 'the batch sizes of this stage')} in params.yaml")
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        where = getattr(exc, "filename", None) or "the output folder"
        return EdgeRLHFError(f"disk full while writing {where}; free space (dvc gc, rm -rf .smoke) or move the "
                             "DVC cache (dvc cache dir PATH)")
    if type(exc).__name__ == "SafetensorError" or "safetensors" in type(exc).__module__:
        return ArtifactError(f"a weights file is corrupted ({str(exc).splitlines()[0][:120]}); rerun the stage "
                             "that wrote it with `dvc repro -f <stage>`")
    return None


def run_stage(stage: str, main: Callable[[], None]) -> None:
    """Run a stage's main: an EdgeRLHFError (or a known failure `explain` maps to one) becomes one line on
    stderr and a non-zero exit code, traceback only with EDGERLHF_DEBUG=1; anything else fails loudly with its
    traceback. Stages check their inputs first and write their outputs atomically (temporary sibling +
    rename), so a failed stage leaves the previous outputs as they were and none that look complete."""
    setup_logging(stage)
    try:
        main()
    except Exception as exc:  # noqa: BLE001 - re-raised below unless it is a known, explainable failure
        err = exc if isinstance(exc, EdgeRLHFError) else explain(stage, exc)
        if err is None:
            raise
        if os.environ.get("EDGERLHF_DEBUG") == "1":
            traceback.print_exc()
        print(f"error [{stage}]: {err}", file=sys.stderr)
        sys.exit(err.exit_code)


@contextlib.contextmanager
def atomic_dir(final: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling folder; it replaces `final` only when the block succeeds.

    A failed stage therefore never leaves a folder that looks complete."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    for stale in final.parent.glob(f".{final.name}.tmp-*"):  # left by a killed run (kill -9 skips the cleanup)
        shutil.rmtree(stale, ignore_errors=True)
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)


def write_json(path: str | Path, data: Any) -> None:
    """Write JSON atomically (temp file + rename), sorted keys, so diffs stay stable."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


# Metrics of how a run ran, not what it computed (speed, threads): they may differ between otherwise identical runs
# (determinism and resume checks skip them).
TIMING_KEYS = ("wall_time_s", "episodes_per_s", "rollout_tokens_per_s", "cpu_threads")


class Timer:
    """Wall-clock, peak-VRAM and thread-count bookkeeping for a stage's metrics."""

    def __init__(self) -> None:
        import torch

        self.start = time.perf_counter()
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()

    def metrics(self) -> dict[str, float]:
        import torch

        cuda = torch.cuda.is_available()
        peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0
        reserved = torch.cuda.max_memory_reserved() / 2**30 if cuda else 0.0
        return {"wall_time_s": round(time.perf_counter() - self.start, 3), "peak_vram_gb": round(peak, 4),
                "peak_vram_reserved_gb": round(reserved, 4), "cpu_threads": torch.get_num_threads()}

