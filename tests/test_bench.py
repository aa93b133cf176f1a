"""`python -m edgerlhf.bench --reduced` (make bench on CPU): every field, plausible numbers, the memory orderings,
the gold-evaluation pass (judge) inside PPO."""

import json
import subprocess
import sys

import pytest
import torch

from tests.conftest import ROOT, tool_env

PRECISIONS = ["bf16", "int8", "int4"]
MEMORY_KEYS = ["base_weights_bytes", "adapter_bytes", "optimizer_state_bytes", "gradient_bytes", "activations_bytes",
               "activations_measured", "reward_model_bytes", "reference_copy_bytes", "static_bytes",
               "static_allocated_bytes", "rollout_transient_bytes"]
JUDGE_PASS_KEYS = {"load_score_s", "dialogues", "tokens", "max_tokens", "truncated", "pass_peak_vram_gb",
                   "stage_peak_vram_gb", "within_budget", "oom"}
CHATML_TOKENS = 6  # <|im_start|> role ... <|im_end|> around each of the two messages
pytestmark = [pytest.mark.slow, pytest.mark.extra]  # one reduced benchmark run (~45 s on 2 cores)


@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> dict:
    """One reduced run on CPU, distilgpt2 shapes, every RM precision, one timed step per measurement."""
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    cmd = [sys.executable, "-m", "edgerlhf.bench", "--reduced", "--device", "cpu", "--shapes", "distilgpt2",
           "--precisions", ",".join(PRECISIONS), "--steps", "1", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env={**tool_env(), "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "peak VRAM (GB)" in proc.stdout and "PPO memory" in proc.stdout  # the printed tables
    info = json.loads(out.with_name("bench_info.json").read_text())
    assert info["device"].startswith("cpu") and info["precisions"] == PRECISIONS
    return json.loads(out.read_text())


def _numbers_only(node) -> None:
    if isinstance(node, dict):
        for value in node.values():
            _numbers_only(value)
    else:
        assert isinstance(node, (int, float)) and not isinstance(node, bool), node


def test_metrics_are_numbers_only_with_the_run_settings(bench):
    _numbers_only(bench)  # strings would become columns in `dvc metrics show`
    assert bench["device"] == 0 and bench["reduced"] == 1 and bench["steps"] == 1
    assert bench["vram_budget_gb"] == 0.0 and bench["wall_time_s"] > 0
    assert list(bench["shapes"]) == ["distilgpt2"]


def test_shapes_and_every_stage_have_positive_throughput(bench):
    r = bench["shapes"]["distilgpt2"]
    assert r["shape"]["n_layer"] == 2 and r["shape"]["vocab"] == 4096 and r["shape"]["total_params"] > 0
    assert r["sft"]["oom"] == 0 and r["sft"]["tokens_per_s"] > 0 and r["sft"]["trainable_params"] > 0
    for p in PRECISIONS:
        rm = r["reward"][p]
        assert rm["oom"] == 0 and rm["unsupported"] == 0
        assert rm["tokens_per_s"] > 0 and rm["step_s"] > 0 and rm["footprint_bytes"] > 0
        for key in ("ppo", "ppo_separate_reference"):
            m = r[key][p]
            assert m["oom"] == 0 and m["response_tokens"] > 0
            for field in ("rollout_tokens_per_s", "rollout_episodes_per_s", "score_forward_s", "update_minibatch_s",
                          "update_tokens_per_s", "ppo_update_est_s", "episodes_per_s_est"):
                assert m[field] > 0, (key, p, field)
            assert set(MEMORY_KEYS) <= set(m["memory"])


def test_peak_vram_is_zero_on_cpu(bench):
    r = bench["shapes"]["distilgpt2"]
    peaks = [r["sft"]["peak_vram_gb"]] + [r[k][p]["peak_vram_gb"] for k in ("reward", "ppo", "ppo_separate_reference")
                                         for p in PRECISIONS]
    assert peaks == [0.0] * len(peaks)
    for p in PRECISIONS:
        mem = r["ppo"][p]["memory"]
        assert mem["activations_measured"] == 0 and mem["activations_bytes"] == 0
        assert mem["static_allocated_bytes"] == 0


def test_gold_evaluation_pass_runs_with_ppo_loaded(bench):
    """Each shared-backbone PPO measurement includes one gold-evaluation pass through ModelJudge on the reduced
    default-judge shape: every dialogue scored, at the workload's lengths, timed; no VRAM figures on CPU."""
    from edgerlhf.bench import JUDGE_SHAPE

    judge = bench["judge"]["shape"]
    small = JUDGE_SHAPE.reduced()
    assert {k: judge[k] for k in small.numbers()} == small.numbers()
    assert judge["head_dim"] * judge["n_head"] == 2 * judge["hidden"] and judge["n_kv_head"] < judge["n_head"]
    assert 0 < judge["total_params"] < 2_000_000
    r = bench["shapes"]["distilgpt2"]
    w = r["workload"]
    longest = w["judge_prompt_len"] + w["response_len"] + CHATML_TOKENS
    shortest = w["judge_prompt_len"] // 4 + w["response_len"] + CHATML_TOKENS
    for p in PRECISIONS:
        j = r["ppo"][p]["judge_pass"]
        assert set(j) == JUDGE_PASS_KEYS, (p, set(j) ^ JUDGE_PASS_KEYS)
        assert j["oom"] == 0 and j["load_score_s"] > 0, (p, j)
        assert j["dialogues"] == w["eval_prompts"] and j["truncated"] == 0, (p, j)
        assert j["max_tokens"] == longest <= w["judge_max_length"], (p, j, longest)
        assert w["eval_prompts"] * shortest < j["tokens"] < w["eval_prompts"] * longest, (p, j)
        assert j["pass_peak_vram_gb"] == j["stage_peak_vram_gb"] == 0.0  # CPU: no allocator statistics
        assert j["within_budget"] == -1  # no VRAM cap on CPU
        assert "judge_pass" not in r["ppo_separate_reference"][p]  # the benchmark-only variant has none


def test_within_budget_compares_the_peak_with_the_cap():
    from edgerlhf.bench import GIB, within_budget

    assert within_budget(7 * GIB, 8.0, oom=0) == 1
    assert within_budget(8 * GIB, 8.0, oom=0) == 1
    assert within_budget(8 * GIB + 1, 8.0, oom=0) == 0
    assert within_budget(2 * GIB, 8.0, oom=1) == 0  # ran out of memory under the cap: does not fit
    assert within_budget(9 * GIB, 0.0, oom=0) == -1  # no cap (CPU, or vram_budget_gb 0)


def test_bench_judge_folder_is_a_model_judge(tmp_path):
    """The benchmark's judge folder passes the judge stage's folder check, has the reduced default-judge shape,
    and its tokenizer gives each word of a dialogue one token inside the ChatML template."""
    import json as _json

    from edgerlhf import bench
    from edgerlhf.config import Params
    from edgerlhf.judge import check_judge_folder, encode
    from edgerlhf.modeling import load_tokenizer

    spec = bench.JUDGE_SHAPE.reduced()
    total = bench.build_judge(spec, tmp_path / "judge", seed=0)
    check_judge_folder(tmp_path / "judge", "unused")
    cfg = _json.loads((tmp_path / "judge" / "config.json").read_text())
    assert cfg["model_type"] == "qwen3" and cfg["architectures"] == ["Qwen3ForSequenceClassification"]
    assert cfg["head_dim"] == spec.head_dim and cfg["vocab_size"] == spec.vocab and 0 < total < 2_000_000
    tok = load_tokenizer(tmp_path / "judge")
    assert tok.chat_template and cfg["pad_token_id"] == tok.pad_token_id
    work = bench.Workload.reduced(Params())
    prompts, responses = bench.judge_dialogues(work, torch.Generator().manual_seed(0))
    ids, cut = encode(tok, prompts, responses, work.judge_max_length)
    assert cut == 0 and len(ids) == work.eval_prompts
    assert [len(x) for x in ids] == [len(p.split()) - 2 + len(r.split()) + CHATML_TOKENS  # - "Human:", "Assistant:"
                                     for p, r in zip(prompts, responses)]
    assert max(len(x) for x in ids) == work.judge_prompt_len + work.response_len + CHATML_TOKENS
    assert max(max(x) for x in ids) < spec.vocab


def test_quantized_reward_models_are_smaller(bench):
    r = bench["shapes"]["distilgpt2"]
    footprint = {p: r["reward"][p]["footprint_bytes"] for p in PRECISIONS}
    assert footprint["int4"] < footprint["int8"] < footprint["bf16"], footprint
    ppo_rm = {p: r["ppo"][p]["memory"]["reward_model_bytes"] for p in PRECISIONS}
    assert ppo_rm["int4"] < ppo_rm["int8"] < ppo_rm["bf16"], ppo_rm


def test_memory_breakdown_adds_up(bench):
    r = bench["shapes"]["distilgpt2"]
    for p in PRECISIONS:
        mem = r["ppo"][p]["memory"]
        assert mem["base_weights_bytes"] > mem["adapter_bytes"] > 0
        # AdamW: two fp32 moments per trainable parameter (plus a step counter per tensor)
        assert 2 * mem["adapter_bytes"] <= mem["optimizer_state_bytes"] <= 2 * mem["adapter_bytes"] + 4096
        assert r["ppo"][p]["update_steps_timed"] >= 1
        assert mem["reference_copy_bytes"] == 0
        assert mem["static_bytes"] == mem["base_weights_bytes"] + mem["adapter_bytes"] + mem["reward_model_bytes"]


def test_separate_reference_copy_costs_a_second_model(bench):
    r = bench["shapes"]["distilgpt2"]
    for p in PRECISIONS:
        shared, separate = r["ppo"][p]["memory"], r["ppo_separate_reference"][p]["memory"]
        cmp = r["reference_comparison"][p]
        assert cmp["complete"] == 1
        assert separate["static_bytes"] > shared["static_bytes"]
        assert cmp["separate_static_bytes"] - cmp["shared_static_bytes"] == cmp["static_saving_bytes"]
        # the copy is a whole base model: the saving is its size
        assert separate["reference_copy_bytes"] == shared["base_weights_bytes"] == cmp["static_saving_bytes"]


def test_full_shapes_match_the_real_models():
    """The full-size configs have exactly the parameter counts of distilgpt2 and Qwen2.5-0.5B (built on the meta
    device: no memory, no download); the reduced ones keep the architecture (GQA for Qwen)."""
    from transformers import AutoModelForCausalLM

    from edgerlhf.bench import SHAPES

    expected = {"distilgpt2": 81_912_576, "qwen2.5-0.5b": 494_032_768}
    for name, spec in SHAPES.items():
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(spec.config())
        assert sum(p.numel() for p in model.parameters()) == expected[name], name
        small = spec.reduced()
        assert small.arch == spec.arch and small.config().model_type == spec.config().model_type
    qwen = SHAPES["qwen2.5-0.5b"].reduced()
    assert qwen.n_kv_head < qwen.n_head and qwen.config().tie_word_embeddings


def test_judge_shape_matches_the_default_judge():
    """The default judge's shape (Skywork-Reward-V2-Qwen3-0.6B): Qwen3-0.6B's 596,049,920 parameters (tied
    embeddings) with a one-output score head (1024 weights) instead of the LM head; built on the meta device."""
    from transformers import AutoModelForSequenceClassification

    from edgerlhf.bench import JUDGE_SHAPE
    from edgerlhf.config import DEFAULT_JUDGE

    assert DEFAULT_JUDGE == "Skywork/Skywork-Reward-V2-Qwen3-0.6B"
    config = JUDGE_SHAPE.config()
    assert (config.model_type, config.hidden_size, config.intermediate_size, config.num_hidden_layers,
            config.num_attention_heads, config.num_key_value_heads, config.head_dim, config.vocab_size,
            config.max_position_embeddings, config.rms_norm_eps, config.tie_word_embeddings) == (
        "qwen3", 1024, 3072, 28, 16, 8, 128, 151936, 40960, 1e-6, True)
    assert config.rope_parameters["rope_theta"] == 1e6
    config.num_labels = 1
    with torch.device("meta"):
        model = AutoModelForSequenceClassification.from_config(config)
    assert sum(p.numel() for p in model.parameters()) == 596_049_920 + 1024
    small = JUDGE_SHAPE.reduced()
    assert small.config().model_type == "qwen3" and small.n_kv_head < small.n_head
    assert small.head_dim * small.n_head == 2 * small.hidden  # Qwen3-0.6B: 16 x 128 = 2 x 1024


def test_sixteen_bit_compute_path_runs(tmp_path):
    """The GPU's dtype mix (16-bit base weights and compute, fp32 LoRA / score / value heads, autocast in the
    training loops), run on CPU in bf16: a dtype mismatch there would otherwise only show on a GPU."""
    from edgerlhf import bench
    from edgerlhf.config import Params
    from edgerlhf.modeling import Device

    device = Device("cpu", torch.bfloat16, "cpu")
    spec, params = bench.SHAPES["distilgpt2"].reduced(), Params()
    bench.build_base(spec, tmp_path / "base", seed=0)
    bench.build_judge(bench.JUDGE_SHAPE.reduced(), tmp_path / "judge", seed=0)
    ctx = bench.Context(spec, tmp_path / "base", device, params, bench.Workload.reduced(params), steps=1, seed=0,
                        judge_dir=tmp_path / "judge")
    assert bench.measure_sft(ctx)["tokens_per_s"] > 0
    rm = bench.measure_reward(ctx, "bf16")
    assert rm["tokens_per_s"] > 0
    # the "bf16" reward model really is 16-bit here: its weights take about half the fp32 bytes
    fp32_bytes = sum(p.numel() * 4 for p in bench.load_reward_model(
        bench.Context(spec, tmp_path / "base", Device("cpu", torch.float32, "cpu"), params, ctx.work, 1, 0),
        "bf16", train=False)[0].get_base_model().parameters())
    assert rm["footprint_bytes"] < 0.6 * fp32_bytes
    for precision in ("bf16", "int4"):
        m = bench.measure_ppo(ctx, precision)
        assert m["rollout_tokens_per_s"] > 0 and m["update_minibatch_s"] > 0
        # the gold-evaluation pass next to 16-bit PPO models (the judge itself loads in fp32 on CPU)
        assert m["judge_pass"]["dialogues"] == ctx.work.eval_prompts and m["judge_pass"]["load_score_s"] > 0
