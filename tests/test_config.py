"""params.yaml validation: every bad value is one line naming the key; the stage exits 2 before any work."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from edgerlhf.config import Params, deep_merge, load_params, parse_params
from edgerlhf.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def committed() -> dict:
    return yaml.safe_load((ROOT / "params.yaml").read_text())


def test_committed_params_and_smoke_profile_are_valid():
    p = load_params(ROOT / "params.yaml")
    assert isinstance(p, Params)
    assert p.model.name == "distilgpt2" and p.data.source == "hub"
    assert (p.lora.r, p.lora.alpha, p.lora.dropout) == (16, 32, 0.05)
    assert (p.ppo.batch_size, p.ppo.mini_batch_size, p.ppo.gradient_accumulation_steps) == (32, 2, 4)
    assert p.ppo.learning_rate == 1.41e-5 and p.ppo.init_kl_coef == 0.1 and p.ppo.target_kl == 6.0
    smoke = load_params(ROOT / "params.yaml", yaml.safe_load((ROOT / "profiles/smoke.yaml").read_text()))
    assert smoke.model.source == "tiny" and smoke.data.source == "synthetic"


def test_defaults_equal_committed_file():
    """The dataclass defaults document the real profile: params.yaml must not drift from them silently."""
    assert parse_params(committed()) == Params()


@pytest.mark.parametrize("override, message", [
    ({"sft": {"learning_rte": 1e-4}}, "unknown key sft.learning_rte"),
    ({"bogus": 1}, "unknown key bogus"),
    ({"sft": {"learning_rate": -1.0}}, "sft.learning_rate must be > 0.0 (got -1.0)"),
    ({"reward": {"learning_rate": 0}}, "reward.learning_rate must be > 0.0"),
    ({"reward": {"precisions": ["bf16", "int3"]}}, "reward.precisions has unknown precision 'int3'"),
    ({"reward": {"precisions": []}}, "reward.precisions must name at least one"),
    ({"sft": {"per_device_train_batch_size": 2.5}}, "sft.per_device_train_batch_size must be an integer"),
    ({"sft": {"gradient_checkpointing": "yes"}}, "sft.gradient_checkpointing must be true or false"),
    ({"ppo": {"gamma": 1.5}}, "ppo.gamma must be <= 1.0"),
    ({"ppo": {"kl_estimator": "k2"}}, "ppo.kl_estimator must be one of 'k1', 'k3'"),
    ({"ppo": {"batch_size": 30}}, "ppo.batch_size (30) must be a multiple of"),
    ({"model": {"tiny": {"n_embd": 65}}}, "model.tiny.n_embd (65) must be divisible"),
    ({"model": "distilgpt2"}, "model must be a mapping"),
    ({"data": {"source": "jsonl", "jsonl_path": ""}}, "data.jsonl_path must be set"),
    ({"data": {"jsonl_path": " "}}, "dvc.yaml's prepare stage depends on it"),
    ({"model": {"local_path": ""}}, "model.local_path must be set"),
    ({"model": {"source": "local", "local_path": "models/sft/merged"}},
     "model.local_path (models/sft/merged) is inside a folder the pipeline writes"),
    ({"model": {"source": "lokal"}}, "model.source must be one of 'hub', 'local', 'tiny'"),
    ({"hardware": {"vram_budget_gb": float("nan")}}, "hardware.vram_budget_gb must be finite"),
    ({"sft": {"checkpoint_every": 25}}, "sft.checkpoint_every (25) must be a multiple of sft.logging_steps (10)"),
    ({"ppo": {"checkpoint_every": -1}}, "ppo.checkpoint_every must be >= 0"),
    ({"eval": {"judge": "nonsense"}}, "eval.judge must be one of 'auto', 'rules', 'model', 'trained', 'none'"),
    ({"eval": {"judge": "rules"}}, "eval.judge: rules is the synthetic task's scorer; data.source hub has no rules"),
    ({"eval": {"judge": "rules"}, "data": {"source": "jsonl"}}, "data.source jsonl has no rules"),
    ({"eval": {"judge": "trained"}}, "set data.sizes.judge_train (now 0)"),
    ({"eval": {"judge": "trained"}, "data": {"sizes": {"judge_train": 1}}}, "set data.sizes.judge_train (now 1)"),
    ({"data": {"labels": "judge"}, "eval": {"judge": "none"}},
     "data.labels: judge orders the reward-model pairs by the gold judge, and eval.judge is none"),
    ({"data": {"labels": "gold"}}, "data.labels must be one of 'human', 'judge'"),
    ({"eval": {"judge_source": "web"}}, "eval.judge_source must be one of 'hub', 'local'"),
    ({"eval": {"judge_path": " "}}, "eval.judge_path must be set"),
    ({"eval": {"judge_max_length": 8}}, "eval.judge_max_length must be >= 16"),
    ({"eval": {"judge_batch_size": 0}}, "eval.judge_batch_size must be >= 1"),
    ({"eval": {"judge_trust_remote_code": "no"}}, "eval.judge_trust_remote_code must be true or false"),
])
def test_bad_values_name_the_key(override, message):
    with pytest.raises(ConfigError) as exc:
        parse_params(deep_merge(committed(), override))
    assert message in str(exc.value)
    assert "\n" not in str(exc.value)


@pytest.mark.parametrize("override", [
    {"eval": {"judge": "rules"}, "data": {"source": "synthetic", "labels": "judge"}},
    {"eval": {"judge": "model", "judge_source": "local", "judge_path": "models/local/judge"},
     "data": {"labels": "judge"}},
    {"eval": {"judge": "trained"}, "data": {"sizes": {"judge_train": 2}}},
    {"eval": {"judge": "auto"}, "data": {"labels": "judge"}},
    {"eval": {"judge": "none"}},
])
def test_judge_settings_that_are_valid(override):
    p = parse_params(deep_merge(committed(), override))
    assert p.eval.judge == override["eval"]["judge"]
    assert p.data.labels == override.get("data", {}).get("labels", "human")


def test_stage_exits_2_with_one_line_and_writes_nothing(tmp_path):
    bad = deep_merge(committed(), {"reward": {"precisions": ["int3"]}})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(bad))
    proc = subprocess.run([sys.executable, str(ROOT / "stages/prepare.py")], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error")]
    assert lines == ["error [prepare]: reward.precisions has unknown precision 'int3' (allowed: bf16, int8, int4)"]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "metrics").exists() and not (tmp_path / "data").exists()


def test_invalid_yaml_is_one_line(tmp_path):
    (tmp_path / "params.yaml").write_text("seed: [1,\n")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        load_params(tmp_path / "params.yaml")
