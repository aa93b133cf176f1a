"""Data parallelism (edgerlhf.distributed, edgerlhf.launch): the launcher's command line, the process-count check,
and, in two real gloo processes on CPU, the gradient all-reduce against a hand-computed oracle, the replica check,
checkpoint agreement and a two-process run of train_ppo."""

from __future__ import annotations

import os
import sys

import pytest
import torch

from edgerlhf import distributed, launch
from edgerlhf.config import HardwareParams
from edgerlhf.errors import ConfigError, EdgeRLHFError


def test_one_process_is_plain_python():
    assert launch.command(1, "stages/sft.py", [], python="py") == ["py", "stages/sft.py"]


def test_several_processes_go_through_accelerate_launch():
    cmd = launch.command(2, "stages/ppo.py", ["int4"], python="py", port=1234)
    assert cmd[:3] == ["py", "-m", "accelerate.commands.launch"]
    assert "--multi_gpu" in cmd and "--cpu" not in cmd  # --cpu would start ONE process (accelerate 1.x)
    assert cmd[cmd.index("--num_processes") + 1] == "2" and cmd[cmd.index("--main_process_port") + 1] == "1234"
    assert cmd[-2:] == ["stages/ppo.py", "int4"]


def test_launcher_rejects_a_bad_count(capsys):
    with pytest.raises(SystemExit, match="usage"):
        launch.main(["0", "stages/sft.py"])


def test_process_count_must_match_params(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert distributed.init_processes(HardwareParams()) is distributed.SINGLE
    with pytest.raises(ConfigError, match=r"runs in 1 process\(es\) but hardware.num_processes is 2"):
        distributed.init_processes(HardwareParams(num_processes=2))
    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(ConfigError, match="hardware.num_processes is 1.*accelerate launch --num_processes 1"):
        distributed.init_processes(HardwareParams())


def test_single_process_helpers_are_identities(tmp_path):
    procs = distributed.SINGLE
    x = torch.arange(3.0)
    assert procs.mean(x) is x and procs.gather(x) is x and procs.gather_object("a") == ["a"]
    (tmp_path / "w.safetensors").write_bytes(b"abc")
    digests = distributed.check_replicas(tmp_path, tmp_path, procs)
    assert digests == [distributed.weights_sha256(tmp_path)]
    assert '"num_processes": 1' in (tmp_path / distributed.REPLICAS_FILE).read_text()


# --------------------------------------------------------------------------- two real processes (gloo, CPU)

def _worker(rank: int, port: int, tmp: str, results) -> None:
    """One of two processes: joins the group the way a stage does (env + init_processes), then checks."""
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"})
    from pathlib import Path

    from edgerlhf import ppo

    procs = distributed.init_processes(HardwareParams(device="cpu", num_processes=2))
    out = {"rank": procs.rank, "world": procs.world_size, "device": str(procs.device)}
    # the device of every tensor that reaches the backend (NCCL would reject any but the GPU's)
    devices = set()

    def recording(real):
        def spy(*args, **kwargs):
            for a in args:
                devices.update(str(t.device) for t in (a if isinstance(a, list) else [a]) if torch.is_tensor(t))
            return real(*args, **kwargs)
        return spy

    for name in ("all_reduce", "all_gather", "all_gather_into_tensor", "broadcast"):
        setattr(torch.distributed, name, recording(getattr(torch.distributed, name)))

    # 1. all-reduce: loss_r = mean over rank r's half of (w.x - t)^2; dL/dw = 2/n sum (w.x - t) x. The mean of the
    #    two halves' gradients is the gradient of the whole batch (equal halves), the oracle computed by hand.
    x = torch.tensor([[1.0, 2.0], [0.5, -1.0], [2.0, 0.0], [-1.0, 1.0]])
    t = torch.tensor([1.0, 0.0, 2.0, -1.0])
    w = torch.nn.Parameter(torch.tensor([0.3, -0.2]) if rank == 0 else torch.tensor([9.0, 9.0]))
    procs.broadcast_parameters([w])  # rank 1 started elsewhere: broadcast makes it rank 0's
    out["w_after_broadcast"] = w.detach().tolist()
    mine = slice(2 * rank, 2 * rank + 2)
    ((x[mine] @ w - t[mine]) ** 2).mean().backward()
    procs.all_reduce_gradients([w])
    w0 = torch.tensor([0.3, -0.2])
    out["grad"] = w.grad.tolist()
    out["oracle"] = (2 / 4 * ((x @ w0 - t)[:, None] * x).sum(0)).tolist()
    out["mean"] = procs.mean(torch.tensor([float(rank)])).item()
    out["gather"] = procs.gather(torch.tensor([float(rank)])).tolist()

    # 2. the replica check: equal files pass; different files fail on every process.
    folder = Path(tmp) / f"rank{rank}"
    folder.mkdir()
    (folder / "a.safetensors").write_bytes(b"same")
    out["digests"] = distributed.check_replicas(folder, folder, procs)
    (folder / "a.safetensors").write_bytes(f"rank {rank}".encode())
    try:
        distributed.check_replicas(folder, folder, procs)
        out["mismatch"] = "not raised"
    except EdgeRLHFError as exc:
        out["mismatch"] = str(exc)

    # 3. checkpoints: only rank 0 has one (a kill between the two saves) -> nobody resumes, the stale file goes.
    ckpt = Path(tmp) / ppo.checkpoint_name(procs)
    if rank == 0:
        from safetensors.torch import save_file

        save_file({"x": torch.zeros(1)}, str(ckpt), metadata={"state": '{"run": "r", "update": 5}'})
    procs.barrier()
    out["resume"] = ppo.agree_on_checkpoint(ckpt, "r", procs)
    out["stale_left"] = ckpt.exists()

    # 4. PPO in two processes: each samples its own episodes, the replicas stay identical.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.test_ppo_behaviour import count_target, toy_setup

    policy, tokenizer, prompts, params = toy_setup(0.05, updates=2, batch=32)
    torch.manual_seed(100 + rank)  # replicas built differently: train_ppo must make them start alike
    for p in policy.parameters():
        if p.requires_grad:
            p.data.normal_()
    result = ppo.train_ppo(policy, tokenizer, prompts, count_target, params, device="cpu", seed=0, progress=False,
                           procs=procs)
    out["ppo_updates"] = result.updates
    out["ppo_episodes"] = [h["episodes"] for h in result.history]
    out["ppo_weights"] = torch.cat([p.detach().reshape(-1) for p in policy.parameters() if p.requires_grad]).tolist()
    out["ppo_kl"] = [h["kl"] for h in result.history]
    out["collective_devices"] = sorted(devices)
    results[rank] = out
    torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory) -> list[dict]:
    import torch.multiprocessing as mp

    manager = mp.Manager()
    results = manager.dict()
    mp.spawn(_worker, args=(launch.free_port(), str(tmp_path_factory.mktemp("ddp")), results), nprocs=2, join=True)
    return [results[0], results[1]]


def test_all_reduced_gradient_is_the_whole_batch_gradient(two_processes):
    for out in two_processes:
        assert out["w_after_broadcast"] == pytest.approx([0.3, -0.2])
        assert out["grad"] == pytest.approx(out["oracle"], abs=1e-6)
        assert out["mean"] == 0.5 and out["gather"] == [0.0, 1.0]


def test_replica_check_passes_equal_and_fails_different_weights(two_processes):
    for out in two_processes:
        assert len(out["digests"]) == 2 and len(set(out["digests"])) == 1
        assert "the 2 DDP processes ended with different weights" in out["mismatch"]


def test_processes_resume_only_from_the_same_update(two_processes):
    assert [out["resume"] for out in two_processes] == [False, False]
    assert not two_processes[0]["stale_left"]


def test_two_process_ppo_keeps_the_replicas_identical(two_processes):
    first, second = two_processes
    assert first["ppo_updates"] == second["ppo_updates"] == 1  # 64 episodes = 1 update of 32 per process x 2
    assert first["ppo_episodes"] == [64.0]
    assert first["ppo_weights"] == second["ppo_weights"]
    assert first["ppo_kl"] == second["ppo_kl"]  # logged stats are means over both processes


def test_collectives_reach_the_backend_on_its_device(two_processes):
    for out in two_processes:
        assert out["device"] == "cpu"  # gloo; under NCCL init_processes gives cuda:<local rank>
        assert out["collective_devices"] == [out["device"]]
