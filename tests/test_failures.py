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
    with pytest.raises(ArtifactError, match=r"adapter_model.bin is a pickle file \(.bin\): refusing to load it"):
        precisions.load_reward_model(tmp_path, adapter, "bf16", dev)

    from safetensors.torch import load_file

    (adapter / "adapter_model.safetensors").write_bytes(b"garbage, not a safetensors header")

    def main():
        load_file(str(adapter / "adapter_model.safetensors"))

    code, err = run_main("ppo", main, capsys)
    assert code == 4 and "a weights file is corrupted" in err[-1] and "dvc repro -f" in err[-1]



# --------------------------------------------------------------------------- safetensors only, checked up front

def _artifact(folder: Path, *files: str) -> Path:
    """A folder holding `files` (contents irrelevant: the check looks at names only, before anything loads)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in files:
        (folder / name).write_bytes(b"x")
    return folder


MODEL = ("config.json", "model.safetensors", "tokenizer.json")
POLICY = ("adapter_config.json", "adapter_model.safetensors", "value_head.safetensors", "tokenizer.json")


def test_complete_safetensors_folders_pass(tmp_path):
    modeling.require_model(_artifact(tmp_path / "merged", *MODEL), "sft")
    modeling.require_adapter(_artifact(tmp_path / "rm", *POLICY[:2]), "reward@int4")
    modeling.require_policy(_artifact(tmp_path / "ppo", *POLICY), "ppo@int4")


def test_value_head_file_name_is_the_ppo_module_s():
    from edgerlhf import ppo

    assert modeling.VALUE_HEAD_WEIGHTS == ppo.VALUE_HEAD_FILE


@pytest.mark.parametrize("suffix", [*modeling.PICKLE_SUFFIXES, ".BIN"])
@pytest.mark.parametrize("check, files, stage", [
    (modeling.require_model, MODEL, "sft"),
    (modeling.require_policy, POLICY, "ppo@int4"),
])
def test_every_pickle_suffix_is_refused_next_to_safetensors(tmp_path, check, files, stage, suffix):
    folder = _artifact(tmp_path / "artifact", *files, f"weights{suffix}")
    with pytest.raises(ArtifactError) as exc:
        check(folder, stage)
    msg = str(exc.value)
    assert msg.startswith(f"{folder / f'weights{suffix}'} is a pickle file ({suffix}): refusing to load it")
    assert f"`dvc repro -f {stage}`" in msg and "\n" not in msg


def test_a_pickle_in_a_subfolder_is_refused(tmp_path):
    folder = _artifact(tmp_path / "merged", *MODEL)
    _artifact(folder / "nested", "optimizer.pt")
    with pytest.raises(ArtifactError, match=r"nested/optimizer.pt is a pickle file"):
        modeling.require_model(folder, "sft")


@pytest.mark.parametrize("check, files, drop, message", [
    (modeling.require_model, MODEL, "model.safetensors", "has no *.safetensors weights: rerun `dvc repro -f sft`"),
    (modeling.require_model, MODEL, "config.json", "config.json is missing: run `dvc repro sft` first"),
    (modeling.require_policy, POLICY, "adapter_model.safetensors",
     "has no adapter_model.safetensors weights: rerun `dvc repro -f sft`"),
    (modeling.require_policy, POLICY, "value_head.safetensors",
     "has no value_head.safetensors weights: rerun `dvc repro -f sft`"),
    (modeling.require_policy, POLICY, "adapter_config.json", "adapter_config.json is missing"),
])
def test_missing_weights_are_refused(tmp_path, check, files, drop, message):
    folder = _artifact(tmp_path / "artifact", *[f for f in files if f != drop])
    with pytest.raises(ArtifactError) as exc:
        check(folder, "sft")
    assert message in str(exc.value) and "\n" not in str(exc.value)


def test_pickled_weights_instead_of_safetensors_are_refused(tmp_path):
    """adapter_model.bin in place of the safetensors: named as a pickle, not as 'no weights'."""
    folder = _artifact(tmp_path / "int4", "adapter_config.json", "adapter_model.bin", "value_head.safetensors")
    with pytest.raises(ArtifactError, match=r"int4/adapter_model.bin is a pickle file \(.bin\)"):
        modeling.require_policy(folder, "ppo@int4")


def test_load_policy_refuses_a_pickle_before_peft_sees_it(tmp_path):
    from edgerlhf import ppo

    folder = _artifact(tmp_path / "int4", *POLICY, "adapter_model.bin")
    with pytest.raises(ArtifactError, match=r"int4/adapter_model.bin is a pickle file .*`dvc repro -f ppo@int4`"):
        ppo.load_policy(torch.nn.Linear(2, 2), folder)


def test_generate_skips_a_missing_policy_but_refuses_a_pickled_one(tmp_path):
    from edgerlhf import generate

    _artifact(tmp_path / "models/sft/merged", *MODEL)
    generate.require_policy(tmp_path, "sft")
    with pytest.raises(generate.MissingPolicy, match="run `dvc repro ppo@int4` first"):
        generate.require_policy(tmp_path, "ppo@int4")
    _artifact(tmp_path / "models/ppo/int4", *POLICY, "adapter_model.pkl")
    with pytest.raises(ArtifactError) as exc:
        generate.require_policy(tmp_path, "ppo@int4")
    assert not isinstance(exc.value, generate.MissingPolicy) and "adapter_model.pkl is a pickle file" in str(exc.value)


# --------------------------------------------------------------------------- the params.yaml preflight

@pytest.mark.parametrize("typo, suggestion", [
    ("reward.learnin_rate", "reward.learning_rate"),
    ("rewards", "reward"),
    ("model.tiny.n_layr", "model.tiny.n_layer"),
    ("sft.target_kl", "ppo.target_kl"),  # the right key in the wrong section
    ("ppo.minibatch_size", "ppo.mini_batch_size"),
])
def test_unknown_key_names_the_closest_valid_key(typo, suggestion):
    from edgerlhf.config import ConfigError, parse_params

    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    *sections, key = typo.split(".")
    node = raw
    for section in sections:
        node = node[section]
    node[key] = 1
    with pytest.raises(ConfigError) as exc:
        parse_params(raw)
    assert str(exc.value) == f"unknown key {typo} (did you mean {suggestion}?)"


def test_unknown_key_without_a_close_match_lists_the_section(tmp_path):
    from edgerlhf.config import ConfigError, parse_params

    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["sft"]["zzzz"] = 1
    with pytest.raises(ConfigError, match=r"^unknown key sft.zzzz \(allowed here: learning_rate, "):
        parse_params(raw)


def test_preflight_names_the_typo_in_one_line_exit_2(tmp_path):
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["reward"]["learnin_rate"] = raw["reward"].pop("learning_rate")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    proc = subprocess.run([sys.executable, "-m", "edgerlhf.config", "check", "params.yaml"], cwd=tmp_path,
                          capture_output=True, text=True, env=tool_env(), timeout=60)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr == ("error [params]: params.yaml: unknown key reward.learnin_rate (did you mean "
                           "reward.learning_rate?)\n")
    ok = subprocess.run([sys.executable, "-m", "edgerlhf.config", "check", str(ROOT / "params.yaml")],
                        capture_output=True, text=True, env=tool_env(), timeout=60)
    assert ok.returncode == 0 and ok.stdout.strip() == f"{ROOT / 'params.yaml'}: valid" and ok.stderr == ""


def test_make_all_runs_the_preflight_before_dvc():
    recipe = (ROOT / "Makefile").read_text().split("\nall:", 1)[1].split("\n\n", 1)[0].splitlines()[1:]
    commands = [line.strip() for line in recipe]
    assert commands.index("$(BIN)/python -m edgerlhf.config check params.yaml") < commands.index("dvc repro")
