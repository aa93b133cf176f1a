"""Sampling from and exporting the trained policies (edgerlhf.generate, edgerlhf.export) on the session's offline
pipeline run (`pipeline_run`)."""

from __future__ import annotations

import dataclasses
import io
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from edgerlhf import export as E
from edgerlhf import generate as G
from edgerlhf.synthetic import format_prompt, gold_score
from tests.conftest import tool_env


def parse_metrics_tables(card: str) -> list[tuple[str, str, Any]]:
    """Every `file | key | value` row of a card, parsed back (the inverse of `metrics_table`)."""
    rows = []
    for line in card.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 3 and cells[0].startswith("`") and cells[1].startswith("`"):
            rows.append((cells[0].strip("`"), cells[1].strip("`"), json.loads(cells[2])))
    return rows

POLICIES = ["sft", "ppo@bf16", "ppo@int8", "ppo@int4"]
RMS = ["rm@bf16", "rm@int8", "rm@int4"]
REPO = Path(__file__).resolve().parents[1]
NUMBER = re.compile(r"^-?\d+\.\d{3}$")


def cli(module: str, *args: str, root: Path) -> subprocess.Popen:
    """Start `python -m module --root ROOT args` from this checkout (a run's root may hold an older copy of the
    package), stdin empty and not a terminal; `.communicate()` gives (stdout, stderr)."""
    return subprocess.Popen([sys.executable, "-m", module, "--root", str(root), *args], cwd=REPO, env=tool_env(),
                            text=True, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


# --------------------------------------------------------------------------- fast, no pipeline


def test_plain_questions_are_wrapped_in_the_training_dialogue():
    assert G.to_dialogue("What color is the sky? ") == "\n\nHuman: What color is the sky?\n\nAssistant:"
    full = "\\n\\nHuman: What does a cow say?\\n\\nAssistant:"
    assert G.to_dialogue(full) == format_prompt("What does a cow say?")
    assert G.to_dialogue("Assistant: hi", raw=True) == "Assistant: hi"


def test_prompts_come_from_arguments_files_and_stdin(tmp_path):
    f = tmp_path / "prompts.txt"
    f.write_text("What color is the sky?\n\nWhat does a dog say?\n")
    assert G.read_prompts(["a"], str(f)) == ["a", "What color is the sky?", "What does a dog say?"]
    assert G.read_prompts([], None, io.StringIO("q1\nq2\n")) == ["q1", "q2"]
    with pytest.raises(G.UsageError, match="empty"):
        G.read_prompts(["ok", "  "], None)
    with pytest.raises(G.UsageError, match="no prompt in stdin"):
        G.read_prompts([], None, io.StringIO("\n\n"))


# --------------------------------------------------------------------------- on the pipeline run


@pytest.mark.slow
@pytest.mark.extra  # a generate subprocess over every policy (~8 s): `make test-extra`
def test_compare_prints_every_policy_with_proxy_and_gold_scores(pipeline_run):
    proc = cli("edgerlhf.generate", "--compare", "What color is the sky?", root=pipeline_run)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    lines = out.splitlines()
    assert lines[0] == "Prompt: What color is the sky?"
    header = [c.strip() for c in next(line for line in lines if line.startswith("| policy")).strip("|").split("|")]
    assert header == ["policy", "response", "tokens", *RMS, "gold"]
    rows = {}
    for line in lines:
        cells = [c.strip() for c in line.strip("|").split("|")]
        if line.startswith("| ") and cells[0] in POLICIES:
            rows[cells[0]] = dict(zip(header, cells))
    assert sorted(rows) == sorted(POLICIES), out
    for policy, row in rows.items():
        assert row["response"], policy
        assert re.fullmatch(r"\d+( \(cut\))?", row["tokens"]), row
        for key in [*RMS, "gold"]:
            assert NUMBER.match(row[key]), (policy, key, row[key])
        if len(row["response"]) < 60:  # not wrapped: the gold column is the rule scorer of the shown response
            assert float(row["gold"]) == pytest.approx(gold_score(format_prompt("What color is the sky?"),
                                                                  row["response"]), abs=1e-3)


@pytest.mark.slow
def test_bad_input_gives_one_line_and_a_nonzero_exit(pipeline_run, tmp_path):
    """Unknown policy, empty prompt, missing artifacts (naming the stage to run); no traceback. (No prompt at all
    and an unknown export precision: see the fast tests above and the card test.)"""
    partial = tmp_path / "partial"  # a run that has its SFT model but no PPO policies
    (partial / "models").mkdir(parents=True)
    shutil.copy(pipeline_run / "params.yaml", partial / "params.yaml")
    (partial / "models" / "sft").symlink_to(pipeline_run / "models" / "sft")
    cases = {
        "unknown policy": (("edgerlhf.generate", "--policy", "ppo@fp8", "hi"), pipeline_run,
                           "unknown policy 'ppo@fp8': choose one of sft, ppo@bf16, ppo@int8, ppo@int4"),
        "empty prompt": (("edgerlhf.generate", ""), pipeline_run, "prompt argument 1 is empty"),
        "missing policy": (("edgerlhf.generate", "--policy", "ppo@int4", "hi"), partial, "`dvc repro ppo@int4`"),
        "missing export input": (("edgerlhf.export", "--precision", "int8"), partial, "`dvc repro ppo@int8`"),
    }
    procs = {name: cli(*args, root=root) for name, (args, root, _) in cases.items()}  # concurrently: ~2 s each
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=120)
        assert proc.returncode != 0, name
        assert len(err.strip().splitlines()) == 1, (name, err)
        assert err.startswith("error [") and cases[name][2] in err, (name, err)
        assert out == "", (name, out)


@pytest.mark.slow
def test_samples_follow_the_ppo_rollout_path(pipeline_run):
    """Same seed, same prompts: generate's sampler gives the very tokens of ppo.generate_responses (the PPO and
    evaluation rollout path), for a PPO policy and for SFT (= the reference, adapter off)."""
    import torch

    from edgerlhf import data, modeling, paths, ppo
    from edgerlhf.config import load_params

    params = load_params(pipeline_run / "params.yaml")
    device = modeling.resolve_device(params.hardware)
    sampling = G.Sampling.from_params(params)
    records = data.read_split(pipeline_run / paths.split_file("eval_prompts"))[:12]
    dialogues = [r["prompt"] for r in records]

    policies = G.PolicySet(pipeline_run, params, ["sft", "ppo@bf16"], device)
    answers = G.answer_all(policies, ["sft", "ppo@bf16"], dialogues, dialogues, sampling, batch_size=12)

    tok = modeling.load_tokenizer(pipeline_run / paths.SFT_MERGED)
    ids = [tok(d, add_special_tokens=False)["input_ids"] for d in dialogues]
    base = modeling.load_causal_lm(pipeline_run / paths.SFT_MERGED, device)
    policy = ppo.load_policy(base, pipeline_run / paths.ppo_dir("bf16"))
    ppo_sampling = dataclasses.replace(params.ppo, temperature=sampling.temperature, top_k=sampling.top_k,
                                       top_p=sampling.top_p, response_length=sampling.max_new_tokens)
    ppo.configure_sampling(policy, ppo_sampling, tok.eos_token_id, tok.pad_token_id)
    for j, reference in enumerate([True, False]):
        torch.manual_seed(sampling.seed)
        query, mask = ppo.left_pad(ids, tok.pad_token_id)
        ro = ppo.generate_responses(policy, query, mask, tok.eos_token_id, tok.pad_token_id, reference=reference)
        expected = [tok.decode(r[m.bool()].tolist(), skip_special_tokens=True)
                    for r, m in zip(ro.response, ro.response_mask)]
        assert [a[j].response for a in answers] == expected, ("sft", "ppo@bf16")[j]
        assert [a[j].tokens for a in answers] == ro.response_mask.sum(1).tolist()


@pytest.fixture(scope="module")
def exported(pipeline_run, tmp_path_factory) -> Path:
    """ppo@int4 exported from the pipeline run (in process: the CLI's start-up is covered above)."""
    out = tmp_path_factory.mktemp("exports")
    E.main(["--root", str(pipeline_run), "--precision", "int4", "--out", str(out)])
    return out / "ppo-int4"


@pytest.mark.slow
def test_exported_model_equals_the_adapter_model(pipeline_run, exported):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from edgerlhf.config import load_params

    assert (exported / "model.safetensors").exists() and not (exported / "adapter_config.json").exists()
    assert not list(exported.glob("*.bin"))
    model = AutoModelForCausalLM.from_pretrained(exported).eval()  # plain transformers, no peft
    tok = AutoTokenizer.from_pretrained(exported)
    sft_dir = pipeline_run / "models/sft/merged"
    sft = AutoModelForCausalLM.from_pretrained(sft_dir, dtype=torch.float32).eval()
    adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(sft_dir, dtype=torch.float32),
                                        pipeline_run / "models/ppo/int4").eval()
    texts = [format_prompt(q) + " The sky is blue." for q in ("What color is the sky?", "What does a dog say?")]
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.no_grad():
        got, want, before = (m(**enc).logits for m in (model, adapter, sft))
    mask = enc["attention_mask"].bool()
    assert (got - want)[mask].abs().max().item() <= 1e-4
    assert (want - before)[mask].abs().max().item() > 1e-3, "the PPO adapter changed nothing: vacuous check"

    params = load_params(pipeline_run / "params.yaml")
    gen = GenerationConfig.from_pretrained(exported)
    assert (gen.do_sample, gen.temperature, gen.top_k, gen.top_p, gen.max_new_tokens) == (
        True, params.eval.temperature, params.eval.top_k, params.eval.top_p, params.eval.max_new_tokens)
    assert gen.eos_token_id == tok.eos_token_id and gen.pad_token_id == tok.pad_token_id


@pytest.mark.slow
def test_model_card_numbers_match_the_metrics_files(pipeline_run, exported):
    card = (exported / "README.md").read_text()
    rows = parse_metrics_tables(card)
    seen: dict[str, set] = {}
    for file, key, value in rows:
        metrics = E.flatten(json.loads((pipeline_run / file).read_text()))
        assert metrics[key] == value, (file, key)
        seen.setdefault(file, set()).add(key)
    for file in ("metrics/sft.json", "metrics/reward/int4.json", "metrics/ppo/int4.json"):
        assert seen[file] == set(E.flatten(json.loads((pipeline_run / file).read_text()))), file
    if (pipeline_run / "metrics/eval.json").exists():
        assert seen["metrics/eval.json"]
    assert {"metrics/data.json", "metrics/reward/bf16.json"} & set(seen) == {"metrics/data.json"}

    block = re.search(r"```yaml\n(.*?)```", card, re.S).group(1)
    assert yaml.safe_load(block) == yaml.safe_load((pipeline_run / "params.yaml").read_text())
    assert "dvc repro ppo@int4" in card and "python -m edgerlhf.export --precision int4" in card


@pytest.mark.slow
def test_export_names_what_is_missing(pipeline_run):
    from edgerlhf.config import load_params

    params = load_params(pipeline_run / "params.yaml")
    with pytest.raises(G.UsageError, match="unknown precision 'fp8': choose from bf16, int8, int4"):
        E.check_inputs(pipeline_run, params, "fp8")
    E.check_inputs(pipeline_run, params, "bf16")  # a finished run has everything


@pytest.mark.slow
def test_export_is_published_the_hugging_face_way(pipeline_run, exported):
    """The exported tokenizer's chat template gives the training prompt (and its tokens), the card's front matter
    is ModelCardData (license and its source, eval results from metrics/eval.json), every file is 0644."""
    import stat

    from huggingface_hub import ModelCard
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(exported)
    for q in ("What color is the sky?", "What does a dog say?"):
        msgs = [{"role": "user", "content": q}]
        assert tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == format_prompt(q)
        ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_dict=True)["input_ids"]
        assert list(ids) == tok(format_prompt(q), add_special_tokens=False)["input_ids"]

    card = ModelCard.load(exported / "README.md")
    assert card.data.license == "unknown" and "built from scratch by this run" in card.text  # tiny base
    assert card.data.library_name == "transformers" and card.data.base_model is None
    if (pipeline_run / "metrics/eval.json").exists():
        evals = json.loads((pipeline_run / "metrics/eval.json").read_text())["ppo_int4"]
        results = {r.metric_type: r.metric_value for r in card.data.eval_results}
        assert results == {k: evals[k] for k in ("gold_reward", "win_rate_vs_sft", "kl_to_sft")}

    files = sorted(p.name for p in exported.iterdir())
    assert {"README.md", "model.safetensors", "config.json", "generation_config.json"} <= set(files), files
    for path in exported.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path


@pytest.mark.slow
def test_push_to_hub_uploads_the_export(pipeline_run, tmp_path, monkeypatch, capsys):
    """--push-to-hub REPO: the export is written, then create_repo + upload_folder of that folder (a fake HfApi:
    no network); the uploaded card names the repo and the --license."""
    import huggingface_hub

    from tests.test_export_hub import FakeApi

    FakeApi.calls, FakeApi.fail = [], None
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_TOKEN", "hf_fake_token_for_tests")
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    E.main(["--root", str(pipeline_run), "--precision", "int4", "--out", str(tmp_path), "--license", "mit",
            "--push-to-hub", "someone/edgerlhf-ppo-int4"])
    folder = tmp_path / "ppo-int4"
    assert capsys.readouterr().out.split() == [str(folder),
                                               "https://huggingface.co/someone/edgerlhf-ppo-int4/commit/abc"]
    (create, c_args), (upload, u_args) = FakeApi.calls
    assert (create, c_args["repo_id"], c_args["exist_ok"], c_args["private"]) == (
        "create_repo", "someone/edgerlhf-ppo-int4", True, False)
    assert upload == "upload_folder" and Path(u_args["folder_path"]) == folder
    assert {"README.md", "model.safetensors", "tokenizer_config.json"} <= set(u_args["files"])
    card = u_args["files"]["README.md"]
    assert yaml.safe_load(card.split("---\n", 2)[1])["license"] == "mit"
    assert 'from_pretrained("someone/edgerlhf-ppo-int4")' in card and "`mit`: set with `--license`" in card
