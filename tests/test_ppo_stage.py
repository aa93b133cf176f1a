"""The ppo@P stages on the offline pipeline run: learning, reload, reference = SFT, DVC granularity."""

import json
import math
import subprocess
from pathlib import Path

import pytest
import torch
import yaml

from edgerlhf import live, paths
from tests.conftest import tool_env

PRECISIONS = ["bf16", "int8", "int4"]
pytestmark = pytest.mark.slow


def test_each_ppo_raises_proxy_reward_with_finite_kl(pipeline_run):
    for p in PRECISIONS:
        m = json.loads((pipeline_run / f"metrics/ppo/{p}.json").read_text())
        assert m["proxy_reward_end"] > m["proxy_reward_start"], (p, m)
        assert math.isfinite(m["kl_end"]) and m["kl_end"] >= 0, (p, m)
        assert m["episodes"] == m["updates"] * 32 and m["episodes_per_s"] > 0
        folder = pipeline_run / paths.live_dir("ppo", p)  # the live curves: one row per update, step = update
        assert sorted(live.read_metric(live.metric_file(folder, "score"))) == list(range(1, m["updates"] + 1))
        evals = live.read_eval_curve(folder)
        assert len(evals) >= 3 and all(set(e) == {"update", *live.EVAL_KEYS} for e in evals)
        assert evals[-1]["gold"] == pytest.approx(m["eval_gold_end"])


def _load(run: Path, precision: str):
    from edgerlhf import modeling, ppo

    dev = modeling.Device("cpu", torch.float32, "cpu")
    base = modeling.load_causal_lm(run / "models/sft/merged", dev)
    policy = ppo.load_policy(base, run / f"models/ppo/{precision}")
    tok = modeling.load_tokenizer(run / "models/sft/merged")
    return policy, tok, dev


def test_reload_reproduces_policy_logprobs(pipeline_run):
    from edgerlhf.ppo_stage import PROBE_FILE, probe_logprobs

    for p in PRECISIONS:
        saved = json.loads((pipeline_run / f"models/ppo/{p}" / PROBE_FILE).read_text())
        policy, tok, _ = _load(pipeline_run, p)
        again = probe_logprobs(policy, tok, saved["records"], saved["temperature"])
        for a, b in zip(again, saved["logprobs"]):
            assert a == pytest.approx(b, abs=1e-5)
        # and training moved the policy away from the reference (the adapter is not a no-op)
        ref = probe_logprobs(policy, tok, saved["records"], saved["temperature"], reference=True)
        assert max(abs(x - y) for r, s in zip(ref, again) for x, y in zip(r, s)) > 1e-3


def test_reference_is_the_sft_policy(pipeline_run):
    """Adapter disabled == the merged SFT model itself, so KL is measured against SFT."""
    from edgerlhf import modeling, ppo
    from edgerlhf.ppo_stage import probe_logprobs

    saved = json.loads((pipeline_run / "models/ppo/int4/probe_logprobs.json").read_text())
    policy, tok, dev = _load(pipeline_run, "int4")
    ref = probe_logprobs(policy, tok, saved["records"], saved["temperature"], reference=True)
    sft = modeling.load_causal_lm(pipeline_run / "models/sft/merged", dev)
    plain = ppo.build_policy(sft, ppo_params(pipeline_run))  # fresh zero LoRA: identical to the SFT model
    direct = probe_logprobs(plain, tok, saved["records"], saved["temperature"], reference=True)
    for a, b in zip(ref, direct):
        assert a == pytest.approx(b, abs=1e-6)


def ppo_params(run: Path):
    from edgerlhf.config import load_params

    return load_params(run / "params.yaml").ppo


def test_ppo_learning_rate_flags_only_ppo_stages(pipeline_run):
    params_file = pipeline_run / "params.yaml"
    original = params_file.read_text()
    params = yaml.safe_load(original)
    try:
        params["ppo"]["learning_rate"] = params["ppo"]["learning_rate"] / 2
        params_file.write_text(yaml.safe_dump(params, sort_keys=False))
        out = subprocess.run(["dvc", "status", "--json"], cwd=pipeline_run, capture_output=True, text=True,
                             env=tool_env())
        assert out.returncode == 0, out.stderr
        flagged = set(json.loads(out.stdout))
        assert {f"ppo@{p}" for p in PRECISIONS} <= flagged
        assert not any(s.startswith(("sft", "reward", "prepare", "base")) for s in flagged), flagged
    finally:
        params_file.write_text(original)
