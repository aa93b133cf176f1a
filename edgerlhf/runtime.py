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


def setup_logging(stage: str) -> None:
    """Log lines say which stage they come from; quiet the libraries' chatter. In a DDP run (edgerlhf.launch)
    the lines name the process, and only the main process logs progress: the others log warnings and errors."""
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    where = stage if world == 1 else f"{stage} rank {rank}/{world}"
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"%(asctime)s [{where}] %(message)s", datefmt="%H:%M:%S", stream=sys.stderr,
                        force=True)
    for name in ("transformers", "datasets", "peft", "trl", "accelerate", "bitsandbytes"):
        logging.getLogger(name).setLevel(logging.ERROR)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        import datasets
        import transformers

        transformers.utils.logging.set_verbosity_error()
        datasets.utils.logging.set_verbosity_error()
        datasets.disable_progress_bars()
    except ImportError:  # pragma: no cover - both are hard dependencies
        pass


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


# Metrics that measure speed: they differ between otherwise identical runs (determinism and resume checks skip them).
TIMING_KEYS = ("wall_time_s", "episodes_per_s", "rollout_tokens_per_s")


class Timer:
    """Wall-clock and peak-VRAM bookkeeping for a stage's metrics."""

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
                "peak_vram_reserved_gb": round(reserved, 4)}


def write_csv(path: str | Path, rows: list[dict[str, Any]]) -> None:
    """Per-step curves for `dvc plots` (header from the first row), written atomically."""
    import csv
    import io

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.StringIO()
    fields = list(rows[0]) if rows else ["step"]
    writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(buf.getvalue())
    os.replace(tmp, path)
