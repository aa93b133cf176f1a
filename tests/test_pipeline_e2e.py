"""End to end: the real dvc.yaml and stage scripts on the offline profile (the session's `pipeline_run`)."""

import json
import subprocess
from pathlib import Path

import pytest
import yaml

from edgerlhf import metrics as M
from tests.conftest import tool_env

ROOT = Path(__file__).resolve().parents[1]
PRECISIONS = ["bf16", "int8", "int4"]
pytestmark = pytest.mark.slow


def dvc(cwd: Path, *args: str) -> str:
    proc = subprocess.run(["dvc", *args], cwd=cwd, capture_output=True, text=True, env=tool_env())
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


@pytest.fixture()
def run(pipeline_run) -> Path:
    return pipeline_run


def load(run: Path, rel: str) -> dict:
    return json.loads((run / rel).read_text())


def test_sft_learns(run):
    m = load(run, "metrics/sft.json")
    assert m["eval_loss"] < m["base_eval_loss"]
    assert 0 < m["trainable_params"] < m["total_params"]
    assert m["peak_vram_gb"] == 0.0 and m["wall_time_s"] > 0
    assert (run / "models/sft/adapter/adapter_model.safetensors").exists()
    assert (run / "models/sft/merged/model.safetensors").exists()
    assert not list((run / "models").rglob("*.bin")), "weights must be safetensors only"


def test_reward_metrics_are_the_runs_own(run):
    """Each metrics file holds the values recomputed from the scores the stage saved."""
    for p in PRECISIONS:
        m = load(run, f"metrics/reward/{p}.json")
        scores = load(run, f"models/reward/{p}/rm_test_scores.json")
        again = M.reward_metrics(scores["chosen"], scores["rejected"])
        for key in ("accuracy", "auc", "ece", "mean_margin"):
            assert m[key] == pytest.approx(again[key], abs=1e-6), (p, key)
        assert m["accuracy"] > 0.7, (p, m["accuracy"])  # well above chance (0.5) on the synthetic rm_test
        assert all(isinstance(v, (int, float)) for v in m.values())
    mem = {p: load(run, f"metrics/reward/{p}.json")["model_memory_mb"] for p in PRECISIONS}
    assert mem["int4"] < mem["int8"] < mem["bf16"]


def test_reloaded_reward_model_gives_the_same_scores(run):
    """Plain transformers + peft (as docs/stages.md documents) reproduce the stage's rm_test scores."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, BitsAndBytesConfig

    from edgerlhf.data import read_split
    from edgerlhf.modeling import Device
    from edgerlhf.reward import score_pairs

    n = 96  # the first 6 batches of 16, exactly as the stage batched them (LLM.int8 outliers are per batch)
    records = read_split(run / "data/prepared/rm_test.jsonl")[:n]
    quant = {"bf16": None, "int8": BitsAndBytesConfig(load_in_8bit=True),
             "int4": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                        bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32)}
    for p in PRECISIONS:
        base = AutoModelForSequenceClassification.from_pretrained(
            run / "models/sft/merged", num_labels=1, dtype=torch.float32, quantization_config=quant[p],
            device_map={"": "cpu"})
        model = PeftModel.from_pretrained(base, run / f"models/reward/{p}")
        tok = AutoTokenizer.from_pretrained(run / f"models/reward/{p}")
        if p != "bf16":
            import bitsandbytes as bnb
            cls = bnb.nn.Linear8bitLt if p == "int8" else bnb.nn.Linear4bit
            assert sum(isinstance(m, cls) for m in model.modules()) >= 4, f"{p} model is not quantized"
        chosen, rejected = score_pairs(model, tok, records, 16, 96, Device("cpu", torch.float32, "cpu"))
        saved = load(run, f"models/reward/{p}/rm_test_scores.json")
        assert chosen == pytest.approx(saved["chosen"][:n], abs=1e-5)
        assert rejected == pytest.approx(saved["rejected"][:n], abs=1e-5)


def test_second_repro_reruns_nothing_and_params_change_flags_only_reward(run):
    out = dvc(run, "repro")
    assert "Running stage" not in out
    params = yaml.safe_load((run / "params.yaml").read_text())
    original = (run / "params.yaml").read_text()
    try:
        params["reward"]["learning_rate"] = params["reward"]["learning_rate"] * 2
        (run / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        status = json.loads(dvc(run, "status", "--json"))
        # DVC lists the directly changed stages; their dependents rerun on repro
        assert sorted(status) == sorted(f"reward@{p}" for p in PRECISIONS)
    finally:
        (run / "params.yaml").write_text(original)
    assert json.loads(dvc(run, "status", "--json")) == {}
