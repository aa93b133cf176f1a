"""The export the Hugging Face way, without a pipeline run or the network: the tokenizer's chat template renders
the training text (checked against formats.py), the card's ModelCardData front matter, the license's source,
--push-to-hub through a fake HfApi and its one-line errors, and the files' modes."""

from __future__ import annotations

import json
import shutil
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from edgerlhf import export as E
from edgerlhf import formats, modeling
from edgerlhf.config import load_params
from edgerlhf.errors import HubError
from edgerlhf.generate import Sampling, UsageError
from tests.conftest import tool_env

REPO = Path(__file__).resolve().parents[1]
EOS = "<eos>"

DIALOGUES = {
    "one question": [{"role": "user", "content": "What color is the sky?"}],
    "multi-turn": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"},
                   {"role": "user", "content": "What does a dog say?"}],
    "system": [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "What is 2+2?"},
               {"role": "assistant", "content": " 4."}, {"role": "user", "content": "And 3+3?"}],
    "empty system": [{"role": "system", "content": "  "}, {"role": "user", "content": "Name a fruit."}],
    "spaces and newlines": [{"role": "user", "content": " already spaced\nline two"},
                            {"role": "user", "content": "a second user turn\n\nwith a blank line"}],
    "extra keys": [{"role": "user", "content": "x", "name": "ignored"}],
}
BAD_DIALOGUES = {
    "starts with assistant": [{"role": "assistant", "content": "hi"}, {"role": "user", "content": "x"}],
    "late system": [{"role": "user", "content": "x"}, {"role": "system", "content": "s"},
                    {"role": "user", "content": "y"}],
    "marker in a message": [{"role": "user", "content": "x\n\nAssistant: y"}],
    "unknown role": [{"role": "tool", "content": "x"}],
}


def record(prompt: list[dict], chosen: str = "yes", rejected: str = "no") -> dict:
    """A conversational preference record (TRL form) whose prompt is `prompt`."""
    return {"prompt": prompt, "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": rejected}]}


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> Any:
    """A tiny fast tokenizer with the export's chat template, saved the way the export saves and loaded back
    with plain AutoTokenizer (the template must survive the files)."""
    from tokenizers import Tokenizer, models
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({EOS: 0}, unk_token=EOS)),
                                  eos_token=EOS)
    E.set_chat_template(tok)
    folder = tmp_path_factory.mktemp("tokenizer")
    modeling.save_tokenizer(tok, folder)
    return AutoTokenizer.from_pretrained(folder)


# --------------------------------------------------------------------------- chat template


@pytest.mark.parametrize("name", DIALOGUES)
def test_chat_template_renders_the_training_prompt(tokenizer, name):
    """apply_chat_template(..., add_generation_prompt=True) is the prompt formats.normalise makes of the same
    conversation (the text the policy was trained on)."""
    msgs = DIALOGUES[name]
    _, expected = formats.normalise(record(msgs))
    assert tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == expected["prompt"]


@pytest.mark.parametrize("name", DIALOGUES)
def test_chat_template_renders_the_sft_example_with_eos(tokenizer, name):
    """A dialogue ending with the assistant's reply renders as SFT's training text: prompt + response + EOS
    (the prompt's earlier assistant turns carry no EOS, as in the records)."""
    msgs = DIALOGUES[name]
    _, expected = formats.normalise(record(msgs, chosen="The answer."))
    reply = [*msgs, {"role": "assistant", "content": "The answer."}]
    assert tokenizer.apply_chat_template(reply, tokenize=False) == expected["prompt"] + expected["chosen"] + EOS


@pytest.mark.parametrize("name", BAD_DIALOGUES)
def test_chat_template_refuses_what_formats_refuses(tokenizer, name):
    from jinja2 import TemplateError

    msgs = BAD_DIALOGUES[name]
    with pytest.raises(formats.MalformedRecord):
        formats.normalise(record(msgs))
    with pytest.raises(TemplateError):
        tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)


def test_chat_template_replaces_a_base_template():
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({EOS: 0}, unk_token=EOS)),
                                  eos_token=EOS)
    tok.chat_template = "{% for m in messages %}<|im_start|>{{ m['content'] }}{% endfor %}"
    E.set_chat_template(tok)
    assert tok.chat_template == E.CHAT_TEMPLATE


# --------------------------------------------------------------------------- card metadata


EVAL = {"prompts": 64, "interval_level_pct": 95, "sft": {"gold_reward": 1.39},
        "ppo_int4": {"gold_reward": 1.25, "gold_reward_lo": 0.8, "gold_reward_hi": 1.6, "win_rate_vs_sft": 0.56,
                     "win_rate_vs_sft_lo": 0.47, "win_rate_vs_sft_hi": 0.65, "kl_to_sft": 3.2,
                     "proxy_reward": 2.5}}


def fake_run(root: Path, eval_metrics: bool = True) -> Path:
    """A run root with the files a card reads: the real profile's params.yaml (hub model, hub data), metrics files
    and the SFT tokenizer config."""
    root.mkdir(parents=True, exist_ok=True)
    shutil.copy(REPO / "params.yaml", root / "params.yaml")
    files = {"metrics/data.json": {"sft_train_count": 10, "input_records": 12, "skipped": 0},
             "metrics/sft.json": {"eval_loss": 1.5}, "metrics/reward/int4.json": {"accuracy": 0.7},
             "metrics/ppo/int4.json": {"kl_end": 2.0}, "models/sft/merged/tokenizer_config.json": {"eos_token": EOS}}
    if eval_metrics:
        files["metrics/eval.json"] = EVAL
    for rel, content in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(json.dumps(content))
    return root


def front_matter(card: str) -> dict:
    """The YAML between a card's leading `---` lines, parsed."""
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n", 2)[1])


def card_of(root: Path, **kwargs: Any) -> str:
    params = load_params(root / "params.yaml")
    return E.model_card(root, params, "int4", Sampling.from_params(params), 1e-6, 1234, **kwargs)


@pytest.fixture
def base_card(tmp_path, monkeypatch) -> Path:
    """distilgpt2's model card as the hub would serve it, without the network."""
    import huggingface_hub

    readme = tmp_path / "base-README.md"
    readme.write_text("---\nlicense: apache-2.0\ntags:\n- exbert\n---\n\n# DistilGPT2\n")
    calls = []

    def fake_download(repo_id: str, filename: str, revision: str | None = None, **_: Any) -> str:
        calls.append((repo_id, filename, revision))
        return str(readme)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    return readme


def test_card_metadata_is_model_card_data(tmp_path, base_card):
    """Front matter through ModelCardData: license from the base model's card, base_model, datasets (data.hub_id),
    eval results of the exported policy from metrics/eval.json; it parses as YAML and back into ModelCard."""
    from huggingface_hub import ModelCard

    root = fake_run(tmp_path / "run")
    card = card_of(root)
    meta = front_matter(card)
    assert meta["license"] == "apache-2.0"
    assert meta["base_model"] == "distilgpt2" and meta["datasets"] == ["Anthropic/hh-rlhf"]
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "text-generation"
    assert "reward-model-int4" in meta["tags"]
    [entry] = meta["model-index"]
    assert entry["name"] == "edgerlhf-ppo-int4"
    [result] = entry["results"]
    assert result["task"]["type"] == "text-generation"
    assert result["dataset"]["type"] == "Anthropic/hh-rlhf" and result["dataset"]["split"] == "test"
    metrics = {m["type"]: m for m in result["metrics"]}
    assert {k: m["value"] for k, m in metrics.items()} == {"gold_reward": 1.25, "win_rate_vs_sft": 0.56,
                                                          "kl_to_sft": 3.2}
    assert metrics["gold_reward"]["args"] == {"interval_level_pct": 95, "lo": 0.8, "hi": 1.6}
    assert "the license of the base model `distilgpt2` (its model card)" in card

    loaded = ModelCard(card)
    assert loaded.data.license == "apache-2.0" and loaded.data.base_model == "distilgpt2"
    assert {r.metric_type: r.metric_value for r in loaded.data.eval_results} == {
        "gold_reward": 1.25, "win_rate_vs_sft": 0.56, "kl_to_sft": 3.2}
    assert "# EdgeRLHF PPO policy (reward model at int4)" in loaded.text


def test_card_without_eval_has_no_model_index_and_names_the_pushed_repo(tmp_path, base_card):
    root = fake_run(tmp_path / "run", eval_metrics=False)
    card = card_of(root, license=E.License("mit", "set with `--license`"), repo_id="someone/edgerlhf-ppo")
    meta = front_matter(card)
    assert meta["license"] == "mit" and "model-index" not in meta and "model_name" not in meta
    assert 'from_pretrained("someone/edgerlhf-ppo")' in card and "`mit`: set with `--license`" in card


def test_license_comes_from_the_flag_or_the_base_model(tmp_path, base_card, monkeypatch):
    import huggingface_hub

    root = fake_run(tmp_path / "run")
    params = load_params(root / "params.yaml")
    assert E.base_license(root, params).id == "apache-2.0"
    assert E.base_license(root, params, "mit") == E.License("mit", "set with `--license`")

    def offline(*_: Any, **__: Any) -> str:
        raise huggingface_hub.errors.LocalEntryNotFoundError("not in the cache")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    lic = E.base_license(root, params)
    assert lic.id == "unknown" and "--license" in lic.source

    local = tmp_path / "my-model"
    local.mkdir()
    (local / "README.md").write_text("---\nlicense: other\nlicense_name: my-license\nlicense_link: LICENSE\n---\n")
    spec = yaml.safe_load((root / "params.yaml").read_text())
    spec["model"].update(source="local", local_path=str(local))
    (root / "params.yaml").write_text(yaml.safe_dump(spec))
    lic = E.base_license(root, load_params(root / "params.yaml"))
    assert (lic.id, lic.name, lic.link) == ("other", "my-license", "LICENSE")
    assert front_matter(card_of(root))["license_name"] == "my-license"

    spec["model"]["source"] = "tiny"
    spec["data"]["source"] = "synthetic"
    (root / "params.yaml").write_text(yaml.safe_dump(spec))
    tiny = load_params(root / "params.yaml")
    assert E.base_license(root, tiny).id == "unknown"
    meta = front_matter(card_of(root))
    assert "base_model" not in meta and "datasets" not in meta
    assert meta["model-index"][0]["results"][0]["dataset"]["type"] == "synthetic"


# --------------------------------------------------------------------------- push to the hub


class FakeApi:
    """HfApi stand-in: records create_repo/upload_folder calls (and what the folder held at upload time)."""

    calls: list[tuple[str, dict]] = []
    fail: Exception | None = None

    def create_repo(self, repo_id: str, **kwargs: Any) -> str:
        FakeApi.calls.append(("create_repo", {"repo_id": repo_id, **kwargs}))
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, **kwargs: Any) -> Any:
        if FakeApi.fail:
            raise FakeApi.fail
        folder = Path(kwargs["folder_path"])
        files = {p.name: p.read_text() if p.suffix == ".md" else p.stat().st_size for p in folder.iterdir()}
        FakeApi.calls.append(("upload_folder", {**kwargs, "files": files}))

        class Commit:
            commit_url = f"https://huggingface.co/{kwargs['repo_id']}/commit/abc"

        return Commit()


@pytest.fixture
def fake_hub(monkeypatch) -> type[FakeApi]:
    """Online as far as the export can tell (HF_HUB_OFFLINE unset, a token), with FakeApi as HfApi."""
    import huggingface_hub

    FakeApi.calls, FakeApi.fail = [], None
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_TOKEN", "hf_fake_token_for_tests")
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    return FakeApi


def test_push_uploads_the_folder_with_its_card(tmp_path, fake_hub):
    folder = tmp_path / "ppo-int4"
    folder.mkdir()
    (folder / "README.md").write_text("---\nlicense: mit\n---\n\n# card\n")
    (folder / "model.safetensors").write_bytes(b"0" * 8)
    E.check_push("someone/edgerlhf-ppo-int4")
    url = E.push_to_hub(folder, "someone/edgerlhf-ppo-int4", private=True)
    assert url == "https://huggingface.co/someone/edgerlhf-ppo-int4/commit/abc"
    (create, c_args), (upload, u_args) = fake_hub.calls
    assert create == "create_repo" and c_args == {"repo_id": "someone/edgerlhf-ppo-int4", "repo_type": "model",
                                                  "private": True, "exist_ok": True}
    assert upload == "upload_folder" and u_args["repo_id"] == "someone/edgerlhf-ppo-int4"
    assert Path(u_args["folder_path"]) == folder and u_args["repo_type"] == "model"
    assert u_args["files"]["README.md"].startswith("---\nlicense: mit")


@pytest.mark.parametrize("status, fix", [(401, "hf auth login"), (403, "write access"), (None, "check the network")])
def test_push_failure_is_one_hub_error_line(tmp_path, fake_hub, status, fix):
    class Response:
        status_code = status

    err = ConnectionError("upstream said no\nsecond line")
    err.response = Response() if status else None
    fake_hub.fail = err
    with pytest.raises(HubError) as info:
        E.push_to_hub(tmp_path, "someone/repo")
    msg = str(info.value)
    assert "\n" not in msg and "someone/repo" in msg and fix in msg and "hf upload someone/repo" in msg


def test_push_checks_come_before_any_work(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with pytest.raises(UsageError, match="not a Hub repo id"):
        E.check_push("not a/valid/repo id")
    monkeypatch.setattr("huggingface_hub.get_token", lambda: None)  # not logged in
    with pytest.raises(HubError, match="no Hugging Face token; log in with `hf auth login`"):
        E.check_push("someone/repo")
    with pytest.raises(UsageError, match="--private only applies with --push-to-hub"):
        E.main(["--root", str(tmp_path), "--private"])


def test_offline_push_is_one_line_and_a_nonzero_exit(tmp_path):
    """With HF_HUB_OFFLINE=1 the CLI stops before loading anything: one line naming the cause and the fix."""
    env = {**tool_env(), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "edgerlhf.export", "--root", str(tmp_path), "--precision", "int4",
                           "--push-to-hub", "someone/edgerlhf-ppo-int4"], cwd=REPO, env=env, text=True,
                          capture_output=True, stdin=subprocess.DEVNULL, timeout=120)
    assert proc.returncode == HubError.exit_code, proc.stderr
    assert proc.stdout == ""
    [line] = proc.stderr.strip().splitlines()
    assert line.startswith("error [export]: cannot push to someone/edgerlhf-ppo-int4: HF_HUB_OFFLINE=1"), line
    assert "unset it" in line


# --------------------------------------------------------------------------- file modes


def test_published_files_are_0644(tmp_path):
    """safetensors writes weights 0600; the export opens every file to others (0644, folders 0755)."""
    import torch
    from safetensors.torch import save_file

    folder = tmp_path / "export"
    (folder / "sub").mkdir(parents=True)
    save_file({"w": torch.zeros(2)}, str(folder / "model.safetensors"))
    (folder / "sub" / "x.json").write_text("{}")
    (folder / "sub" / "x.json").chmod(0o600)
    E.publish_modes(folder)
    for path in [folder, *folder.rglob("*")]:
        want = E.DIR_MODE if path.is_dir() else E.FILE_MODE
        assert stat.S_IMODE(path.stat().st_mode) == want, path


def test_push_takes_one_precision(tmp_path, fake_hub):
    root = fake_run(tmp_path / "run")
    with pytest.raises(UsageError, match="--push-to-hub publishes one export: add --precision"):
        E.main(["--root", str(root), "--push-to-hub", "someone/repo"])
    assert fake_hub.calls == []
