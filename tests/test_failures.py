"""Every failure a user can hit on CPU ends with one line naming cause and fix, exit != 0, no metrics written."""

import errno
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from edgerlhf import modeling, precisions, runtime
from edgerlhf.config import ModelParams
from edgerlhf.errors import ArtifactError, HubError
from tests.conftest import ROOT, tool_env


def run_main(stage: str, main, capsys) -> tuple[int, list[str]]:
    """Run `main` through the stage runner; return (exit code, stderr lines)."""
    with pytest.raises(SystemExit) as exc:
        runtime.run_stage(stage, main)
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    return exc.value.code, err


def test_oom_names_stage_and_params(capsys, tmp_path):
    def main():
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    code, err = run_main("ppo", main, capsys)
    assert code == 5
    assert err[-1].startswith("error [ppo]: CUDA out of memory in stage ppo (peak 0.00 GB allocated); lower ")
    assert "ppo.mini_batch_size" in err[-1] and "Traceback" not in "\n".join(err)


def test_disk_full_is_one_line(capsys, tmp_path):
    def main():
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "metrics/sft.json"))

    code, err = run_main("sft", main, capsys)
    assert code == 1 and len([e for e in err if e.startswith("error")]) == 1
    assert "disk full while writing" in err[-1] and "metrics/sft.json" in err[-1]


def test_unknown_exception_still_fails_loudly(capsys):
    def main():
        raise ValueError("a bug")

    with pytest.raises(ValueError):
        runtime.run_stage("sft", main)


def test_debug_env_shows_traceback(capsys, monkeypatch):
    monkeypatch.setenv("EDGERLHF_DEBUG", "1")

    def main():
        raise ArtifactError("models/base is missing")

    code, err = run_main("sft", main, capsys)
    assert code == 4
    assert err[0] == "Traceback (most recent call last):"
    assert err[-1] == "error [sft]: models/base is missing"


def test_hub_unreachable_says_how_to_run_offline(monkeypatch, tmp_path):
    import transformers

    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", offline)
    with pytest.raises(HubError) as exc:
        modeling.snapshot_hub_model(ModelParams(name="distilgpt2"), tmp_path)
    msg = str(exc.value)
    assert "cannot load distilgpt2@main from the hub" in msg and "HF_HUB_OFFLINE=1" in msg
    assert "model.source: tiny" in msg and "\n" not in msg


def _write_params(d: Path, **override) -> None:
    from edgerlhf.config import deep_merge

    base = yaml.safe_load((ROOT / "params.yaml").read_text())
    smoke = yaml.safe_load((ROOT / "profiles/smoke.yaml").read_text())
    (d / "params.yaml").write_text(yaml.safe_dump(deep_merge(deep_merge(base, smoke), override)))


def test_missing_upstream_artifact_names_the_stage(tmp_path):
    _write_params(tmp_path)
    proc = subprocess.run([sys.executable, str(ROOT / "stages/sft.py")], cwd=tmp_path, capture_output=True,
                          text=True, env=tool_env(), timeout=120)
    assert proc.returncode == 4
    assert proc.stderr.strip().splitlines()[-1] == \
        "error [sft]: models/base/config.json is missing: run `dvc repro base` first"
    assert not (tmp_path / "metrics").exists() and not (tmp_path / "models").exists()


def test_truncated_jsonl_line_is_one_line(tmp_path):
    good = '{"prompt": "\\n\\nHuman: hi\\n\\nAssistant:", "chosen": " a", "rejected": " b"}'
    (tmp_path / "pairs.jsonl").write_text(good + "\n" + good[:30] + "\n")
    _write_params(tmp_path, data={"source": "jsonl", "jsonl_path": "pairs.jsonl"})
    proc = subprocess.run([sys.executable, str(ROOT / "stages/prepare.py")], cwd=tmp_path, capture_output=True,
                          text=True, env=tool_env(), timeout=120)
    assert proc.returncode == 3
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("error [prepare]: pairs.jsonl:2: invalid JSON") and "data.on_malformed: skip" in line
    assert not (tmp_path / "metrics").exists() and not (tmp_path / "data/prepared/sft_train.jsonl").exists()


def test_corrupted_and_pickled_adapters_are_refused(tmp_path, capsys):
    dev = modeling.Device("cpu", torch.float32, "cpu")
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    (adapter / "adapter_model.bin").write_bytes(b"\x80\x04pickle")
    with pytest.raises(ArtifactError, match="only pickled weights .*adapter_model.bin.*refusing to unpickle"):
        precisions.load_reward_model(tmp_path, adapter, "bf16", dev)

    from safetensors.torch import load_file

    (adapter / "adapter_model.safetensors").write_bytes(b"garbage, not a safetensors header")

    def main():
        load_file(str(adapter / "adapter_model.safetensors"))

    code, err = run_main("ppo", main, capsys)
    assert code == 4 and "a weights file is corrupted" in err[-1] and "dvc repro -f" in err[-1]
