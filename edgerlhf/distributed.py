"""Data-parallel training stages (DDP): which process this is, what the processes exchange, that they agree.

sft, reward@P and ppo@P run in `hardware.num_processes` processes when started through `edgerlhf.launch` (what
dvc.yaml's cmd does) or by hand with `accelerate launch`. Each process holds a full replica of the model and
trains on its own share of the data; gradients are averaged over the processes before every optimizer step
(by the HF Trainer for sft/reward, by `Processes.all_reduce_gradients` in our PPO), so every replica takes the
same step and ends with the same weights. `check_replicas` verifies exactly that on the saved files, and only
the main process publishes outputs; the others write theirs into a scratch folder that is then deleted.

With one process (the default) every method below is a no-op, so a single-process run is unchanged.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from edgerlhf import modeling
from edgerlhf.config import HardwareParams, Params
from edgerlhf.errors import ConfigError, EdgeRLHFError
from edgerlhf.runtime import atomic_dir, seed_everything, set_threads

log = logging.getLogger("edgerlhf")

REPLICAS_FILE = "replicas.json"


@dataclass(frozen=True)
class Processes:
    """This process's place among the stage's processes (rank 0 is the main process) and the device its
    collectives run on.

    Every collective of the project goes through these methods: they move their tensors to `device` and the
    result back to where the caller's tensor was. NCCL (several GPUs) accepts only CUDA tensors, gloo (CPU) only
    CPU ones, so a statistic built on the CPU next to a model on a GPU must not reach the backend as it is."""

    rank: int = 0
    local_rank: int = 0  # index of this process's GPU on its machine
    world_size: int = 1
    device: torch.device = torch.device("cpu")  # the backend's device: cuda:local_rank under NCCL, cpu under gloo

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def describe(self) -> str:
        return "1 process" if self.world_size == 1 else f"process {self.rank} of {self.world_size} (DDP)"

    def barrier(self) -> None:
        """Wait until every process gets here."""
        if self.world_size > 1:
            torch.distributed.barrier()

    def mean(self, values: torch.Tensor) -> torch.Tensor:
        """Element-wise mean of `values` over the processes (every process gets the result)."""
        if self.world_size == 1:
            return values
        from accelerate.utils import reduce

        return reduce(values.to(self.device).clone(), reduction="mean").to(values.device)

    def max(self, values: torch.Tensor) -> torch.Tensor:
        """Element-wise maximum of `values` over the processes."""
        if self.world_size == 1:
            return values
        return self.gather(values.unsqueeze(0)).amax(0)

    def gather(self, values: torch.Tensor) -> torch.Tensor:
        """Concatenation of every process's `values` along dim 0, in rank order."""
        if self.world_size == 1:
            return values
        from accelerate.utils import gather

        return gather(values.to(self.device).contiguous()).to(values.device)

    def gather_object(self, obj: Any) -> list[Any]:
        """Every process's `obj` (picklable, from our own processes), in rank order."""
        if self.world_size == 1:
            return [obj]
        from accelerate.utils import gather_object

        return gather_object([obj])

    def all_reduce_gradients(self, params: Sequence[torch.nn.Parameter]) -> None:
        """Replace each gradient by its mean over the processes: the gradient of the union of their batches.

        DDP by hand, as in CleanRL's multi-GPU PPO: one flat all-reduce per optimizer step, after gradient
        accumulation (the trainable LoRA + value-head gradients are a few MB)."""
        if self.world_size == 1:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = self.mean(torch.cat([g.reshape(-1).float() for g in grads]))
        offset = 0
        for p, g in zip(params, grads, strict=True):
            n = g.numel()
            p.grad = flat[offset:offset + n].view_as(g).to(g.dtype)
            offset += n

    def broadcast_parameters(self, params: Sequence[torch.nn.Parameter]) -> None:
        """Copy the main process's values of `params` into every process (the replicas start identical)."""
        if self.world_size == 1:
            return
        from accelerate.utils import broadcast

        with torch.no_grad():
            for p in params:
                p.copy_(broadcast(p.detach().to(self.device).clone(), from_process=0).to(p.device))


SINGLE = Processes()


def init_processes(hw: HardwareParams) -> Processes:
    """Join the stage's process group (gloo on CPU, NCCL on GPUs) when started as one of several processes.

    The number of processes must be hardware.num_processes: metrics recorded under other settings than
    params.yaml says would make `dvc params diff` lie."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world != hw.num_processes:
        how = ("`python -m edgerlhf.launch N stages/<stage>.py` (or dvc repro)" if world == 1 else
               f"accelerate launch --num_processes {hw.num_processes}")
        raise ConfigError(f"this stage runs in {world} process(es) but hardware.num_processes is "
                          f"{hw.num_processes}: start it with {how}, or set hardware.num_processes: {world}")
    if world == 1:
        return SINGLE
    from accelerate import PartialState

    cpu = hw.device == "cpu" or not torch.cuda.is_available()
    state = PartialState(cpu=cpu)
    procs = Processes(rank=state.process_index, local_rank=state.local_process_index, world_size=state.num_processes,
                      device=torch.device("cpu") if cpu else torch.device(state.device))
    log.info("%s, backend %s, collectives on %s", procs.describe(), state.backend, procs.device)
    return procs


def start_stage(params: Params) -> tuple[Processes, modeling.Device]:
    """What a training stage does first: set its torch threads (hardware.cpu_threads, shared by its processes),
    join its processes, seed, pick this process's device (under DDP its own GPU) with the VRAM cap applied."""
    set_threads(params.hardware)
    procs = init_processes(params.hardware)
    seed_everything(params.seed)
    return procs, modeling.resolve_device(params.hardware, procs.local_rank)


@contextlib.contextmanager
def output_dir(final: str | Path, procs: Processes) -> Iterator[Path]:
    """Where a process writes a stage's output folder: on the main process a temporary folder that replaces
    `final` when the block succeeds (runtime.atomic_dir); on the others a scratch folder deleted afterwards.
    Every process saves its replica, so `check_replicas` can compare the saved files."""
    if procs.is_main:
        with atomic_dir(final) as tmp:
            yield tmp
        return
    scratch = Path(tempfile.mkdtemp(prefix=f"edgerlhf-rank{procs.rank}-"))
    try:
        yield scratch
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def weights_sha256(folder: str | Path) -> str:
    """sha256 over the safetensors files of `folder` (names and bytes, sorted): equal weights, equal digest."""
    digest = hashlib.sha256()
    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        raise EdgeRLHFError(f"no .safetensors weights in {folder}")
    for f in files:
        digest.update(f.name.encode())
        digest.update(f.read_bytes())
    return digest.hexdigest()


def check_replicas(weights_dir: str | Path, out_dir: str | Path, procs: Processes) -> list[str]:
    """Compare the weights every process saved; write `replicas.json` (number of processes, each one's digest)
    into `out_dir`. Data parallelism is only correct if the replicas end identical: if they do not, the
    gradients were not averaged and the stage fails rather than publish one arbitrary replica."""
    digests = procs.gather_object(weights_sha256(weights_dir))
    if len(set(digests)) != 1:
        raise EdgeRLHFError(f"the {procs.world_size} DDP processes ended with different weights "
                            f"({', '.join(d[:12] for d in digests)}): their gradients were not averaged; "
                            "rerun with hardware.num_processes: 1 and report this as a bug")
    (Path(out_dir) / REPLICAS_FILE).write_text(json.dumps(
        {"num_processes": procs.world_size, "weights_sha256": digests}, indent=2) + "\n")
    return digests
