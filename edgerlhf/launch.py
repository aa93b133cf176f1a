"""`python -m edgerlhf.launch N stages/<stage>.py [args]`: run a training stage in N processes (DDP).

dvc.yaml's cmd of sft, reward@P and ppo@P is `python -m edgerlhf.launch ${hardware.num_processes} stages/...`.
N = 1 runs the script in this process's place (plain python, no process group). N > 1 hands it to
`accelerate launch` (torchrun underneath), one process per GPU; on a machine without a GPU the processes train on
CPU over gloo. The stage finds out how many processes it is part of (edgerlhf.distributed), so the same script runs
either way, and `accelerate launch --num_processes N stages/sft.py` by hand works as well.
"""

from __future__ import annotations

import os
import socket
import sys


def free_port() -> int:
    """A TCP port nobody listens on now, for the processes' rendezvous (two runs at once must not share one)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def command(num_processes: int, script: str, args: list[str], python: str = sys.executable,
            port: int | None = None) -> list[str]:
    """The command line that runs `script args` in `num_processes` processes."""
    if num_processes < 1:
        raise ValueError(f"num_processes must be >= 1 (got {num_processes})")
    if num_processes == 1:
        return [python, script, *args]
    # `--multi_gpu` selects accelerate's torchrun launcher, which starts N processes; `--cpu` would not (it runs
    # one process), and the stage picks gloo itself when it trains on CPU. The other flags are accelerate's
    # defaults, given so that no `accelerate config` file is needed or read.
    return [python, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(num_processes),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", str(port or free_port()), script, *args]


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) < 2 or not argv[0].isdigit() or int(argv[0]) < 1:
        sys.exit("usage: python -m edgerlhf.launch NUM_PROCESSES SCRIPT [ARGS...]")
    cmd = command(int(argv[0]), argv[1], argv[2:])
    sys.stdout.flush()
    os.execv(cmd[0], cmd)  # the stage replaces this process: its exit code and signals are the stage's own


if __name__ == "__main__":
    main()
