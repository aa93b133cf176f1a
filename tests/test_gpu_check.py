"""`make gpu-check` (edgerlhf/gpu_check.py): the stage plan read from dvc.yaml, the checks that stop it (VRAM cap,
divergence, a failing stage, PPO without a gold evaluation), the HH-shaped data, the workspace's random-init gold
judge, the table; and, marked extra, the CPU reduced mode end to end, whose metrics/gpu_check.json must hold exactly
what that run's stage metrics files hold (the judge stage's and PPO's gold evaluations included)."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from edgerlhf import bench, data, gpu_check, judge, live, paths
from edgerlhf.config import parse_params
from tests.conftest import tool_env

ROOT = Path(__file__).resolve().parents[1]


def dvc_map() -> dict:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())


# --------------------------------------------------------------------------- the plan


def test_the_plan_is_the_maps_stage_commands_in_order():
    raw = gpu_check.load_profile(ROOT, reduced=True)
    runs = gpu_check.stage_runs(dvc_map(), raw)
    precisions = raw["reward"]["precisions"]
    assert [r.name for r in runs] == (["prepare", "base", "check", "judge", "sft"]
                                      + [f"reward@{p}" for p in precisions] + [f"ppo@{p}" for p in precisions]
                                      + ["evaluate"])
    by_name = {r.name: r for r in runs}
    for r in runs:
        assert r.argv[0] == sys.executable  # dvc.yaml's `python` is this interpreter
    ppo = by_name[f"ppo@{precisions[-1]}"]
    assert ppo.argv[-2:] == ("stages/ppo.py", precisions[-1])
    assert ppo.metrics == f"metrics/ppo/{precisions[-1]}.json"
    assert by_name["sft"].metrics == "metrics/sft.json" and by_name["base"].metrics is None
    # the judge stage copies the workspace's judge folder (a dep, built before any stage) and writes judge.json
    assert by_name["judge"].metrics == "metrics/judge.json" and raw["eval"]["judge_path"] in by_name["judge"].deps
    assert "models/judge" in by_name["judge"].outs and "models/judge" in ppo.deps


def test_the_plan_refuses_a_stage_before_the_stage_it_reads_from():
    dvc = {"stages": {"b": {"cmd": "python b.py", "deps": ["out/a"], "outs": ["out/b"]},
                      "a": {"cmd": "python a.py", "outs": ["out/a"]}}}
    with pytest.raises(ValueError, match="b reads out/a, which a writes after it"):
        gpu_check.stage_runs(dvc, {}, names=("a", "b"))
    with pytest.raises(ValueError, match="no stage c"):
        gpu_check.stage_runs(dvc, {}, names=("a", "c"))


def test_render_fills_params_and_matrix_items():
    params = {"hardware": {"num_processes": 2}, "reward": {"precisions": ["bf16", "int4"]}}
    assert gpu_check.render("${reward.precisions}", params) == ["bf16", "int4"]
    assert (gpu_check.render("python -m x ${hardware.num_processes} s.py ${item.precision}", params,
                             {"precision": "int4"}) == "python -m x 2 s.py int4")
    with pytest.raises(KeyError, match="hardware.typo"):
        gpu_check.render("${hardware.typo}", params)


# --------------------------------------------------------------------------- what stops the check


def test_a_peak_above_the_budget_is_a_failure_naming_it():
    assert gpu_check.cap_problem({"peak_vram_gb": 7.9, "peak_vram_reserved_gb": 8.0}, 8.0) is None
    msg = gpu_check.cap_problem({"peak_vram_gb": 7.5, "peak_vram_reserved_gb": 8.25}, 8.0)
    assert msg == "exceeds the VRAM cap: peak_vram_reserved_gb 8.250 GB > hardware.vram_budget_gb 8"
    assert gpu_check.cap_problem({"peak_vram_gb": 9.0}, 0.0) is None  # budget 0: no cap
    assert gpu_check.cap_problem({"peak_vram_gb": 0.0, "peak_vram_reserved_gb": 0.0}, 8.0) is None  # CPU


def test_a_non_finite_metric_is_divergence_except_where_nan_is_defined():
    assert gpu_check.divergence_problem({"train_loss": 0.7, "sft": {"kl_to_sft": 0.1}}) is None
    assert gpu_check.divergence_problem({"explained_variance_end": math.nan}) is None
    msg = gpu_check.divergence_problem({"train_loss": math.nan, "ppo_int4": {"kl_to_sft": math.inf}})
    assert msg == "diverged: train_loss = nan, ppo_int4.kl_to_sft = inf"
    # the cap is checked first, then divergence
    assert gpu_check.stage_problem({"peak_vram_gb": 9.0, "train_loss": math.nan}, 8.0).startswith("exceeds")


def test_an_fp16_run_whose_scaler_skipped_every_step_diverged():
    ppo = {"ppo_epochs": 4, "batch_size": 32, "mini_batch_size": 2, "gradient_accumulation_steps": 4}
    assert gpu_check.optimizer_steps({"updates": 4}, ppo) == 64
    assert gpu_check.stage_problem({"updates": 4, "skipped_steps": 3}, 8.0, ppo) is None
    assert "skipped all 64" in gpu_check.stage_problem({"updates": 4, "skipped_steps": 64}, 8.0, ppo)
    assert gpu_check.stage_problem({"skipped_steps": 64}, 8.0, ppo) is None  # no `updates`: nothing to compare


def test_failure_line_is_the_stages_own_error_line():
    out = ("12:00:01 [ppo] PPO: 32 prompts\nppo:  25%|##5  | 1/4\r"
           "error [ppo]: CUDA out of memory in stage ppo (peak 7.98 GB allocated); lower ppo.mini_batch_size\n"
           "some trailing noise\n")
    assert gpu_check.failure_line(out, 5) == ("error [ppo]: CUDA out of memory in stage ppo (peak 7.98 GB "
                                              "allocated); lower ppo.mini_batch_size (exit code 5)")
    trace = "Traceback (most recent call last):\n  File \"x.py\", line 1\ntorch.OutOfMemoryError: CUDA out of memory\n"
    assert gpu_check.failure_line(trace, 1) == "torch.OutOfMemoryError: CUDA out of memory (exit code 1)"
    assert gpu_check.failure_line("", -9) == "killed by signal 9"
    assert len(gpu_check.failure_line("x" * 1000, 1, limit=50)) < 70


def test_the_check_stops_at_the_first_stage_over_the_cap(tmp_path, monkeypatch, capsys):
    """The run loop with the stage processes replaced: sft reports a peak over the budget, so the check ends
    there (exit 1, one line naming the stage), and gpu_check.json holds what ran, with the failure."""
    ran = []

    def fake_process(argv, cwd, env, log, echo=True, timeout=None):
        ran.append(argv[-1])
        if argv[-1] == "stages/prepare.py":
            write_metrics(cwd / "metrics" / "data.json", {"skipped": 0})
        if argv[-1] == "stages/check.py":
            write_metrics(cwd / "metrics" / "lengths.json", {"model": {"vocab_size": 512}})
        if argv[-1] == "stages/judge.py":
            write_metrics(cwd / "metrics" / "judge.json", {"peak_vram_gb": 1.5, "peak_vram_reserved_gb": 1.6,
                                                           "wall_time_s": 2.0, "accuracy_vs_human": 0.5})
        if argv[-1] == "stages/sft.py":
            write_metrics(cwd / "metrics" / "sft.json",
                          {"peak_vram_gb": 8.5, "peak_vram_reserved_gb": 8.6, "wall_time_s": 1.0, "train_loss": 0.5})
        return 0, "", 0.1

    monkeypatch.setattr(gpu_check, "run_process", fake_process)
    out = tmp_path / "gpu_check.json"
    with pytest.raises(SystemExit) as exc:
        gpu_check.main(["--reduced", "--dir", str(tmp_path / "ws"), "--out", str(out)])
    assert exc.value.code == 1
    assert ran == ["stages/prepare.py", "stages/base.py", "stages/check.py", "stages/judge.py", "stages/sft.py"]
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("gpu-check: FAILED at sft: exceeds the VRAM cap: peak_vram_gb 8.500")
    result = json.loads(out.read_text())
    assert result["ok"] is False and result["failed_stage"] == "sft"
    assert sorted(result["stages"]) == sorted(ran_names(ran))  # what ran, nothing after the failure
    assert result["stages"]["sft"]["peak_vram_gb"] == 8.5 and result["gpu"] is False
    assert result["stages"]["judge"]["peak_vram_gb"] == 1.5 and result["stages"]["judge"]["accuracy_vs_human"] == 0.5
    assert result["judge"]["reduced"] is True and result["judge"]["folder"] == "judge-model"


def write_metrics(path: Path, metrics: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(metrics))


def ran_names(scripts: list[str]) -> list[str]:
    return [Path(s).stem for s in scripts]


def test_a_ppo_stage_without_a_gold_evaluation_stops_the_check():
    assert gpu_check.gold_problem({"updates": 4, "eval_gold_start": 0.1, "eval_gold_end": 0.2}) is None
    assert "ran no gold evaluation" in gpu_check.gold_problem({"updates": 4})


def test_a_failing_stage_ends_the_check_with_its_error_line(tmp_path, monkeypatch, capsys):
    def fake_process(argv, cwd, env, log, echo=True, timeout=None):
        if argv[-1] == "stages/prepare.py":
            write_metrics(cwd / "metrics" / "data.json", {"skipped": 0})
        if argv[-1] == "stages/base.py":
            return 4, "error [base]: data/prepared/corpus.jsonl not found; run the prepare stage\n", 0.1
        return 0, "", 0.1

    monkeypatch.setattr(gpu_check, "run_process", fake_process)
    with pytest.raises(SystemExit):
        gpu_check.main(["--reduced", "--dir", str(tmp_path / "ws"), "--out", str(tmp_path / "o.json")])
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("gpu-check: FAILED at base: error [base]: data/prepared/corpus.jsonl not found")
    assert "(exit code 4)" in line


def test_a_stage_running_past_the_time_limit_is_stopped(tmp_path, monkeypatch, capsys):
    rc, tail, seconds = gpu_check.run_process(
        [sys.executable, "-c", "import time; print('started', flush=True); time.sleep(60)"], tmp_path,
        gpu_check.stage_env(False), tmp_path / "log", echo=False, timeout=0.5)
    assert rc < 0 and seconds < 30 and "started" in tail and "started" in (tmp_path / "log").read_text()

    def fake_process(argv, cwd, env, log, echo=True, timeout=None):
        if argv[-1] == "stages/prepare.py":
            write_metrics(cwd / "metrics" / "data.json", {"skipped": 0})
            return 0, "", 0.1
        return -15, "", 1e6  # terminated by the timer

    monkeypatch.setattr(gpu_check, "run_process", fake_process)
    with pytest.raises(SystemExit):
        gpu_check.main(["--reduced", "--dir", str(tmp_path / "ws"), "--out", str(tmp_path / "o.json"),
                        "--time-limit", "100"])
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("gpu-check: FAILED at base: stopped: --time-limit 100 s reached during this stage")


def test_a_foreign_folder_is_never_wiped(tmp_path):
    (tmp_path / "ws").mkdir()
    (tmp_path / "ws" / "precious.txt").write_text("keep")
    with pytest.raises(SystemExit, match="not made by gpu-check"):
        gpu_check.prepare_workspace(ROOT, tmp_path / "ws", gpu_check.load_profile(ROOT, reduced=True), "test")
    assert (tmp_path / "ws" / "precious.txt").read_text() == "keep"


# --------------------------------------------------------------------------- data, profiles, table


def test_hh_records_are_valid_hh_shaped_records(tmp_path):
    records = gpu_check.hh_records(300, seed=1, lexicon_size=3000)
    assert records == gpu_check.hh_records(300, seed=1, lexicon_size=3000)  # deterministic
    data.write_jsonl(tmp_path / "hh.jsonl", records)
    loaded = data.read_jsonl(tmp_path / "hh.jsonl", "error", max_prompt_chars=1024)
    assert loaded.records == records and loaded.skipped == 0  # the record convention, no prompt over the filter
    turns = [r["prompt"].count("\n\nHuman: ") for r in records]
    assert min(turns) == 1 and max(turns) >= 4  # single- and multi-turn dialogues
    assert all(r["prompt"].startswith("\n\nHuman: ") and r["prompt"].endswith("\n\nAssistant:") for r in records)
    assert all(r["chosen"].startswith(" ") and r["chosen"] != r["rejected"] for r in records)
    mean_prompt = sum(len(r["prompt"]) for r in records) / len(records)
    assert 250 < mean_prompt < 700  # HH-like lengths, not one-liners


def test_the_workspace_judge_is_the_default_judges_shape_and_reads_the_hh_text(tmp_path):
    """prepare_workspace builds the judge with edgerlhf.bench.build_judge into eval.judge_path (reduced shape in the
    reduced mode): a folder the judge stage accepts, of JUDGE_SHAPE's architecture, whose tokenizer turns the
    generated dialogues into ids below its vocabulary (every word is the unknown token; the ChatML markers and the
    role names are real tokens, and the classifier's last non-pad token is the final <|im_end|>)."""
    raw = gpu_check.load_profile(ROOT, reduced=True)
    info = gpu_check.prepare_workspace(ROOT, tmp_path / "ws", raw, "test", reduced=True)
    folder = tmp_path / "ws" / raw["eval"]["judge_path"]
    assert info["folder"] == raw["eval"]["judge_path"] and info["reduced"] is True and info["init"] == "random"
    judge.check_judge_folder(folder, "the check's judge")  # what the judge stage checks before copying it
    spec = bench.JUDGE_SHAPE.reduced()
    config = json.loads((folder / "config.json").read_text())
    assert (config["model_type"], config["num_hidden_layers"], config["hidden_size"], config["vocab_size"]) == (
        spec.arch, spec.n_layer, spec.hidden, spec.vocab)
    assert info["total_params"] > 0 and info["shape"] == spec.name and info["vocab"] == spec.vocab

    from edgerlhf.modeling import load_tokenizer

    tok = load_tokenizer(folder, False)
    records = data.read_jsonl(tmp_path / "ws" / raw["data"]["jsonl_path"], "error").records[:40]
    ids, cut = judge.encode(tok, [r["prompt"] for r in records], [r["chosen"] for r in records],
                            raw["eval"]["judge_max_length"])
    flat = [i for seq in ids for i in seq]
    assert cut == 0 and 0 <= min(flat) and max(flat) < config["vocab_size"]
    assert set(flat) <= {tok.unk_token_id, *tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>", "user",
                                                                       "assistant"])}
    assert flat.count(tok.unk_token_id) > len(flat) / 2  # the words: unknown, one token each
    assert all(seq[-1] == tok.eos_token_id != config["pad_token_id"] for seq in ids)


def test_the_profiles_use_a_local_judge_and_evaluate_between_ppo_updates():
    for reduced in (False, True):
        raw = gpu_check.load_profile(ROOT, reduced=reduced)
        assert (raw["eval"]["judge"], raw["eval"]["judge_source"]) == ("model", "local")
        assert gpu_check.judge_folder(Path("/ws"), raw) == Path("/ws") / raw["eval"]["judge_path"]
        ppo = raw["ppo"]
        updates = ppo["total_episodes"] // ppo["batch_size"]
        assert 0 < ppo["eval_every"] < updates, "a periodic gold evaluation must fall between PPO updates"
    raw["eval"]["judge_source"] = "hub"
    with pytest.raises(ValueError, match="judge_source: local"):
        gpu_check.judge_folder(Path("/ws"), raw)


def test_profiles_keep_the_real_settings_at_distilgpt2_shape():
    base = yaml.safe_load((ROOT / "params.yaml").read_text())
    full = gpu_check.load_profile(ROOT, reduced=False)
    parse_params(full)
    tiny = full["model"]["tiny"]
    assert (tiny["arch"], tiny["n_layer"], tiny["n_embd"], tiny["n_head"], tiny["n_positions"],
            tiny["vocab_size"]) == ("gpt2", 6, 768, 12, 1024, 50257)
    assert full["hardware"]["vram_budget_gb"] == base["hardware"]["vram_budget_gb"]
    for section, keys in {"sft": ("per_device_train_batch_size", "gradient_accumulation_steps", "max_length",
                                  "gradient_checkpointing"),
                          "reward": ("per_device_train_batch_size", "gradient_accumulation_steps", "max_length",
                                     "eval_batch_size", "gradient_checkpointing"),
                          "ppo": ("batch_size", "mini_batch_size", "gradient_accumulation_steps", "ppo_epochs",
                                  "response_length", "logprob_chunk_size", "gradient_checkpointing"),
                          "eval": ("batch_size", "max_new_tokens", "judge_batch_size", "judge_max_length")}.items():
        for key in keys:
            assert full[section][key] == base[section][key], f"{section}.{key}: the check must measure the real one"
    reduced = gpu_check.load_profile(ROOT, reduced=True)
    assert reduced["hardware"]["device"] == "cpu" and reduced["model"]["tiny"]["n_embd"] < 768


def test_summary_table_has_a_row_per_stage_and_dashes_for_missing_figures():
    result = {"stages": {"base": {"process_s": 3.0, **gpu_check.stage_figures(None, "base")},
                         "ppo@int4": {"process_s": 9.5, **gpu_check.stage_figures(
                             {"peak_vram_gb": 5.123456, "episodes_per_s": 2.0, "skipped_steps": 0}, "ppo")}}}
    lines = gpu_check.summary_table(result).splitlines()
    assert len(lines) == 4 and "rollout tok/s" in lines[0]
    assert lines[2].startswith("| base") and lines[2].count(" - ") == 7  # base measures none of them
    assert "5.123 |" in lines[3] and "5.1234" not in lines[3]  # 4 significant digits


# --------------------------------------------------------------------------- the CPU reduced mode, end to end


@pytest.mark.extra
def test_cpu_reduced_mode_records_the_runs_own_figures(tmp_path):
    ws, out = tmp_path / "ws", tmp_path / "gpu_check.json"
    proc = subprocess.run([sys.executable, "-m", "edgerlhf.gpu_check", "--reduced", "--quiet", "--dir", str(ws),
                           "--out", str(out)], cwd=ROOT, env=tool_env(), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    check_reduced_run(ws, json.loads(out.read_text()), proc.stdout)


def check_reduced_run(ws: Path, result: dict, stdout: str) -> None:
    """What a finished reduced-mode run must show: its workspace `ws`, its gpu_check.json `result`, its output."""
    assert "not GPU figures" in stdout and "gpu-check: OK" in stdout
    assert result["gpu"] is False and result["note"] == gpu_check.CPU_NOTE and result["ok"] is True

    raw = yaml.safe_load((ws / "params.yaml").read_text())
    runs = gpu_check.stage_runs(yaml.safe_load((ws / "dvc.yaml").read_text()), raw)
    fp16 = f"ppo@{gpu_check.FP16_PRECISION}{gpu_check.FP16_SUFFIX}"
    assert sorted(result["stages"]) == sorted([r.name for r in runs] + [fp16])  # gpu_check.json: keys sorted
    assert "judge" in result["stages"]
    fp16_metrics = f"fp16/metrics/ppo/{gpu_check.FP16_PRECISION}.json"
    for run in runs + [gpu_check.StageRun(fp16, "ppo", (), (), (), fp16_metrics)]:
        figures = result["stages"][run.name]
        assert figures["process_s"] > 0
        if run.metrics is None:
            continue
        stage_file = json.loads((ws / run.metrics).read_text())
        keys = set(figures) - {"process_s"}
        assert keys >= set(gpu_check.COMMON_KEYS) | set(gpu_check.STAGE_KEYS.get(run.stage, ()))
        for key in keys:
            assert figures[key] == stage_file.get(key), (run.name, key)
        if run.stage == "ppo":
            assert figures["episodes_per_s"] == stage_file["episodes_per_s"] > 0
            # PPO's periodic gold evaluation ran, with the judge: updates 0, eval_every, ..., the last
            assert isinstance(stage_file["eval_gold_start"], float) and isinstance(stage_file["eval_gold_end"], float)
            evals = live.read_eval_curve((ws / run.metrics).parents[2] / paths.live_dir("ppo", Path(run.metrics).stem))
            updates = stage_file["updates"]
            expected = {0, *range(raw["ppo"]["eval_every"], updates + 1, raw["ppo"]["eval_every"]), updates}
            assert [int(e["update"]) for e in evals] == sorted(expected) and len(expected) >= 3
    # the judge stage: the workspace's random-init judge, copied and scored on rm_test
    judge_file = json.loads((ws / "metrics" / "judge.json").read_text())
    assert result["stages"]["judge"]["rm_test_pairs"] == judge_file["rm_test_pairs"] == raw["data"]["sizes"]["rm_test"]
    assert 0.0 <= result["stages"]["judge"]["accuracy_vs_human"] <= 1.0
    info = json.loads((ws / "models" / "judge" / "judge.json").read_text())
    assert (info["kind"], info["source"], info["name"]) == ("model", "local", raw["eval"]["judge_path"])
    assert result["judge"]["folder"] == raw["eval"]["judge_path"] and result["judge"]["reduced"] is True
    assert result["judge"]["n_layer"] == bench.JUDGE_SHAPE.reduced().n_layer and result["judge"]["build_s"] > 0
    assert "judge: skywork-reward-v2-qwen3-0.6b shape (reduced), random init" in stdout
    assert '"gold_reward"' in (ws / "metrics" / "eval.json").read_text()  # evaluate scored with it too

    assert result["fp16"]["skipped_steps"] == result["stages"][fp16]["skipped_steps"]
    assert result["fp16"]["finite"] is True and result["fp16"]["dtype"] == "fp32"
    fp16_params = yaml.safe_load((ws / "fp16" / "params.yaml").read_text())
    assert fp16_params["hardware"]["dtype"] == "fp32"  # CPU stand-in; "fp16" on a GPU
    assert result["data"] == json.loads((ws / "metrics" / "data.json").read_text())
    config = json.loads((ws / "models" / "base" / "config.json").read_text())
    assert result["model"]["vocab_size"] == config["vocab_size"] and result["model"]["n_layer"] == config["n_layer"]
    assert result["peak_vram_gb_max"] == 0.0  # CPU: no allocator statistics
