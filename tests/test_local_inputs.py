"""Local inputs: a local model folder is a model source of its own (`model.source: local`), checked at `base` before
anything is written, and the local JSONL / model folder are DVC deps of the stages that read them.

Models are built from configs and saved with save_pretrained, tokenizers trained locally (modeling.train_tokenizer):
no hub, no download."""

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from edgerlhf import modeling, runtime
from edgerlhf.config import deep_merge
from tests.conftest import ROOT, tool_env

# HH-shaped text for the tokenizers: the sample prompt of modeling.check_tokenizer must find its words here.
TEXTS = [f"\n\nHuman: What color is the {w}?\n\nAssistant: The {w} is {c}." for w, c in
         [("sky", "blue"), ("grass", "green"), ("sun", "yellow"), ("snow", "white"), ("night", "dark")]] * 4
VOCAB = 300  # byte-level BPE: 256 bytes + eos + a few merges


def tokenizer_into(folder: Path):
    return modeling.train_tokenizer(TEXTS, VOCAB, folder)


def save_model(folder: Path, arch: str = "gpt2", tokenizer: bool = True) -> Path:
    """A tiny causal LM saved with save_pretrained (safetensors), with its trained tokenizer unless told not to."""
    from transformers import AutoModelForCausalLM, BloomConfig, GPT2Config

    folder.mkdir(parents=True, exist_ok=True)
    if tokenizer:
        tokenizer_into(folder)
    ids = {"bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 0}  # train_tokenizer: <|endoftext|> is id 0
    config = (GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=16, n_layer=1, n_head=2, **ids) if arch == "gpt2"
              else BloomConfig(vocab_size=VOCAB, hidden_size=16, n_layer=1, n_head=2, **ids))
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder, safe_serialization=True)
    return folder


def write_params(d: Path, **override) -> None:
    base = yaml.safe_load((ROOT / "params.yaml").read_text())
    smoke = yaml.safe_load((ROOT / "profiles/smoke.yaml").read_text())
    (d / "params.yaml").write_text(yaml.safe_dump(deep_merge(deep_merge(base, smoke), override)))


def old_base(d: Path) -> Path:
    """A models/base of an earlier good run: a failed base must leave it as it was."""
    (d / "models/base").mkdir(parents=True)
    (d / "models/base/config.json").write_text('{"earlier": true}')
    return d / "models/base/config.json"


def run_base(d: Path, monkeypatch, capsys) -> tuple[int, str]:
    """stages/base.py's main through the stage runner, in `d` (as `python stages/base.py` runs it): (exit code,
    stderr). In-process: the subprocess variant below shows the exit code is the process's."""
    spec = importlib.util.spec_from_file_location("base_stage", ROOT / "stages/base.py")
    stage = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(stage)
    monkeypatch.chdir(d)
    code = 0
    try:
        runtime.run_stage("base", stage.main)
    except SystemExit as exc:
        code = exc.code
    return code, capsys.readouterr().err


def _no_tokenizer(d: Path) -> None:
    save_model(d / "m", tokenizer=False)


def _empty_tokenizer(d: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    save_model(d / "m", tokenizer=False)
    empty = Tokenizer(models.BPE())  # no vocabulary: every text encodes to no token at all
    empty.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    PreTrainedTokenizerFast(tokenizer_object=empty, eos_token="<|endoftext|>").save_pretrained(d / "m")


def _pickle_only(d: Path) -> None:
    from safetensors.torch import load_file

    save_model(d / "m")
    torch.save(load_file(d / "m/model.safetensors"), d / "m/pytorch_model.bin")
    (d / "m/model.safetensors").unlink()


def _unknown_arch(d: Path) -> None:
    save_model(d / "m", arch="bloom")


def _config_off(d: Path) -> None:
    save_model(d / "m")
    config = json.loads((d / "m/config.json").read_text())
    (d / "m/config.json").write_text(json.dumps({**config, "n_positions": 48}))  # the weights hold 64 positions


def _tensor_missing(d: Path) -> None:
    from safetensors.torch import load_file, save_file

    save_model(d / "m")
    weights = load_file(d / "m/model.safetensors")
    del weights["transformer.h.0.mlp.c_fc.weight"]
    save_file(weights, d / "m/model.safetensors", metadata={"format": "pt"})


def _nested(d: Path) -> None:
    save_model(d / "m/inner")


BAD_FOLDERS = [
    # (what, how to make it, model params, the line's cause, its fix)
    ("missing", lambda d: None, {}, "model.local_path (m) does not exist", "put (or symlink) your model folder there"),
    ("a file", lambda d: (d / "m").write_text("x"), {}, "is a file, not a model folder", "point model.local_path at"),
    ("the README-only default", lambda d: None, {"local_path": "models/local"},
     "model.local_path (models/local) has no config.json", "put your model folder in models/local/<name> (or "
     "symlink it there) and set model.local_path: models/local/<name>"),
    ("a folder above the model", _nested, {}, "has no config.json", "did you mean model.local_path: m/inner?"),
    ("no tokenizer files", _no_tokenizer, {}, "has no tokenizer files", "AutoTokenizer.from_pretrained('<its hub id>')"
     ".save_pretrained('m')"),
    ("an empty tokenizer", _empty_tokenizer, {}, "encodes the sample prompt '\\n\\nHuman: What color is the sky?"
     "\\n\\nAssistant:' to nothing", "save the model's own tokenizer into the folder"),
    ("pickle weights only", _pickle_only, {}, "has its weights only as pickle (pytorch_model.bin)",
     ".save_pretrained('m', safe_serialization=True)\"`, then delete the pickle files"),
    ("weights that do not fit config.json", _config_off, {}, "the weights in model.local_path (m) do not fit its "
     "config.json (tensor shapes differ)", "save config and weights together with save_pretrained"),
    ("a tensor missing", _tensor_missing, {}, "the weights in model.local_path (m) do not fit its config.json: "
     "1 of its tensors missing (e.g. transformer.h.0.mlp.c_fc.weight)", "save the whole model with save_pretrained"),
    ("an architecture without LoRA defaults", _unknown_arch, {}, "no default LoRA targets for model type 'bloom'",
     "set lora.target_modules in params.yaml (its linear layers: dense, dense_4h_to_h, dense_h_to_4h, "
     "query_key_value)"),
]


@pytest.mark.parametrize("what, make, model, cause, fix", BAD_FOLDERS, ids=[b[0] for b in BAD_FOLDERS])
def test_a_bad_model_folder_fails_at_base_with_one_line(tmp_path, monkeypatch, capsys, what, make, model, cause,
                                                        fix):
    make(tmp_path)
    write_params(tmp_path, model={"source": "local", "local_path": "m", **model})
    (tmp_path / "models/local").mkdir(parents=True)
    (tmp_path / "models/local/README.md").write_text("put your model folder here\n")
    kept = old_base(tmp_path)
    code, err = run_base(tmp_path, monkeypatch, capsys)
    errors = [ln for ln in err.splitlines() if ln.startswith("error")]
    assert code != 0 and len(errors) == 1, err
    assert errors[0].startswith("error [base]: ") and cause in errors[0] and fix in errors[0], errors[0]
    assert kept.read_text() == '{"earlier": true}' and sorted(p.name for p in (tmp_path / "models").iterdir()) == \
        ["base", "local"]  # untouched, and no temporary sibling left


def test_the_printed_conversion_turns_pickle_weights_into_a_usable_folder(tmp_path, monkeypatch, capsys):
    _pickle_only(tmp_path)
    write_params(tmp_path, model={"source": "local", "local_path": "m"})
    code, err = run_base(tmp_path, monkeypatch, capsys)
    assert code == 4, err
    command = re.search(r'`python -c "(.+?)"`', err).group(1)
    exec(command, {})  # the printed command as a user runs it (in-process: the cwd is tmp_path, as in run_base)
    for pickle in (tmp_path / "m").glob("*.bin"):
        pickle.unlink()
    code, err = run_base(tmp_path, monkeypatch, capsys)
    assert code == 0, err
    assert modeling.require_model(tmp_path / "models/base", "base")


def test_lora_targets_set_by_hand_admit_an_unknown_architecture_and_are_checked(tmp_path, monkeypatch, capsys):
    _unknown_arch(tmp_path)
    write_params(tmp_path, model={"source": "local", "local_path": "m"}, lora={"target_modules": ["query_kv"]})
    code, err = run_base(tmp_path, monkeypatch, capsys)
    assert code == 2 and err.strip().splitlines()[-1] == (
        "error [base]: lora.target_modules names query_kv, which model type 'bloom' of model.local_path (m) does not "
        "have; set it to some of its linear layers: dense, dense_4h_to_h, dense_h_to_4h, query_key_value")
    write_params(tmp_path, model={"source": "local", "local_path": "m"},
                 lora={"target_modules": ["query_key_value"]})
    code, err = run_base(tmp_path, monkeypatch, capsys)
    assert code == 0, err
    assert json.loads((tmp_path / "models/base/config.json").read_text())["model_type"] == "bloom"


def test_a_good_local_folder_becomes_models_base_and_the_log_says_local(tmp_path, monkeypatch, capsys):
    save_model(tmp_path / "m")
    write_params(tmp_path, model={"source": "local", "local_path": "m"})
    old_base(tmp_path)
    code, err = run_base(tmp_path, monkeypatch, capsys)
    assert code == 0, err
    assert re.search(r"\[base\] local model folder m \(gpt2, GPT2LMHeadModel, \d+ params\)", err), err
    assert "hub" not in err
    base = modeling.require_model(tmp_path / "models/base", "base")
    tok = modeling.load_tokenizer(base)
    assert tok(TEXTS[0])["input_ids"] == modeling.load_tokenizer(tmp_path / "m")(TEXTS[0])["input_ids"]
    from safetensors.torch import load_file

    src, dst = load_file(tmp_path / "m/model.safetensors"), load_file(base / "model.safetensors")
    assert set(dst) <= set(src) and all(torch.equal(src[k], dst[k]) for k in dst)


def test_the_stage_process_exits_non_zero_with_the_line_and_keeps_models_base(tmp_path):
    """The issue's case as a user meets it: weights without tokenizer files, `python stages/base.py`."""
    _no_tokenizer(tmp_path)
    write_params(tmp_path, model={"source": "local", "local_path": "m"})
    kept = old_base(tmp_path)
    proc = subprocess.run([sys.executable, str(ROOT / "stages/base.py")], cwd=tmp_path, capture_output=True,
                          text=True, env=tool_env(), timeout=180)
    assert proc.returncode == 4
    assert proc.stderr.strip().splitlines()[-1].startswith("error [base]: model.local_path (m) has no tokenizer files")
    assert "Traceback" not in proc.stderr and kept.read_text() == '{"earlier": true}'


def test_a_hub_source_naming_a_local_folder_says_to_use_the_local_source(tmp_path, monkeypatch):
    from edgerlhf.config import ModelParams
    from edgerlhf.errors import ConfigError

    save_model(tmp_path / "m")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=r"^model.name m is a local folder: set model.source: local and "
                                          r"model.local_path: m"):
        modeling.snapshot_hub_model(ModelParams(name="m"), tmp_path / "out")


def test_a_hub_model_with_an_empty_tokenizer_fails_before_models_base_is_written(tmp_path, monkeypatch):
    """The same tokenizer check on the hub path (the download replaced by the folders' contents: no network)."""
    import transformers

    from edgerlhf.config import ModelParams
    from edgerlhf.errors import ArtifactError

    _empty_tokenizer(tmp_path)
    for cls in (transformers.AutoTokenizer, transformers.AutoModelForCausalLM):
        real = cls.from_pretrained.__func__
        monkeypatch.setattr(cls, "from_pretrained", classmethod(
            lambda c, name, *a, _real=real, **kw: _real(c, str(tmp_path / "m"), *a, **kw)))
    with pytest.raises(ArtifactError) as exc:
        modeling.snapshot_hub_model(ModelParams(name="org/empty-tokenizer"), tmp_path / "out")
    assert str(exc.value).startswith("the tokenizer of the hub model org/empty-tokenizer@main encodes the sample "
                                     "prompt '\\n\\nHuman: What color is the sky?\\n\\nAssistant:' to nothing")
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- the inputs are DVC deps


def dvc(cwd: Path, *args: str) -> str:
    proc = subprocess.run(["dvc", *args], cwd=cwd, capture_output=True, text=True, env=tool_env(), timeout=300)
    assert proc.returncode == 0, (args, proc.stdout[-2000:], proc.stderr[-2000:])
    return proc.stdout + proc.stderr


def changed(cwd: Path) -> set[str]:
    """The stages `dvc status prepare base` lists as changed."""
    return {ln[:-1] for ln in dvc(cwd, "status", "prepare", "base").splitlines()
            if ln.endswith(":") and not ln.startswith((" ", "\t"))}


def ran(log: str) -> set[str]:
    return set(re.findall(r"Running stage '([\w@]+)'", log))


PAIRS = [{"prompt": f"\n\nHuman: What color is the {w}?\n\nAssistant:", "chosen": f" The {w} is {c}.",
          "rejected": f" I do not know {i}."} for i, (w, c) in enumerate([("sky", "blue"), ("grass", "green"),
                                                                       ("sun", "yellow"), ("snow", "white")] * 5)]


def local_workspace(tmp_path: Path, model_outside: bool = False) -> tuple[Path, Path, Path]:
    """A scratch DVC workspace (smoke.prepare_workspace, as `make smoke` makes it) with data.source jsonl
    (data/local/pairs.jsonl) and model.source local (models/local/tiny, or an absolute path outside the workspace):
    (workspace, the JSONL, the model folder)."""
    from edgerlhf import smoke

    model = tmp_path / "elsewhere/tiny" if model_outside else tmp_path / "ws/models/local/tiny"
    override = tmp_path / "local.yaml"
    override.write_text(yaml.safe_dump({
        "model": {"source": "local", "local_path": str(model) if model_outside else "models/local/tiny"},
        "data": {"source": "jsonl", "jsonl_path": "data/local/pairs.jsonl",
                 "sizes": {"sft_train": 4, "sft_eval": 2, "rm_train": 4, "rm_test": 2, "ppo_prompts": 4,
                           "eval_prompts": 2, "judge_train": 0}}}))
    ws = smoke.prepare_workspace(ROOT, tmp_path / "ws", override)
    assert (ws / "models/local/README.md").is_file() and (ws / "data/local/README.md").is_file()
    jsonl = ws / "data/local/pairs.jsonl"
    jsonl.write_text("".join(json.dumps(p) + "\n" for p in PAIRS))
    return ws, jsonl, save_model(model)


@pytest.mark.extra  # dvc in a scratch workspace (~6 s): `make test-extra`
def test_dvc_status_names_the_stage_whose_local_input_changed(tmp_path):
    """dvc.yaml's templated deps resolve to the files params name: with the stages' outputs recorded as they are
    (`dvc commit`, no stage run), an edited JSONL makes `dvc status` list prepare, an edited model file base. The
    model folder lies outside the workspace (an absolute path): DVC hashes it all the same."""
    ws, jsonl, model = local_workspace(tmp_path, model_outside=True)
    for out in ("data/prepared/corpus.jsonl", "metrics/data.json", "models/base/config.json"):
        (ws / out).parent.mkdir(parents=True, exist_ok=True)
        (ws / out).write_text("{}\n")
    dvc(ws, "commit", "-f", "prepare", "base")
    assert changed(ws) == set()
    jsonl.write_text(jsonl.read_text() + "\n")
    assert changed(ws) == {"prepare"}
    dvc(ws, "commit", "-f", "prepare")
    (model / "tokenizer.json").write_text((model / "tokenizer.json").read_text() + " ")
    assert changed(ws) == {"base"}


@pytest.mark.slow
@pytest.mark.extra  # ~30 s on 2 busy cores: five stage processes
def test_editing_the_jsonl_or_the_model_folder_reruns_exactly_what_reads_it(tmp_path):
    """`dvc repro base` runs prepare + base on the local JSONL and model folder; then an edited JSONL reruns prepare
    (and base, whose corpus changed), an edited file of the model folder reruns base only. `dvc status` names the
    stage whose input changed, before any rerun."""
    ws, jsonl, _ = local_workspace(tmp_path)
    assert ran(dvc(ws, "repro", "base")) == {"prepare", "base"}
    assert changed(ws) == set()
    lock = yaml.safe_load((ws / "dvc.lock").read_text())["stages"]
    assert "data/local/pairs.jsonl" in [d["path"] for d in lock["prepare"]["deps"]]
    assert "models/local/tiny" in [d["path"] for d in lock["base"]["deps"]]

    jsonl.write_text("".join(json.dumps(p) + "\n" for p in PAIRS[:-1]))  # one pair less
    assert changed(ws) == {"prepare"}  # base's own deps change once prepare has rewritten the corpus
    assert ran(dvc(ws, "repro", "base")) == {"prepare", "base"}

    config = ws / "models/local/tiny/config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "layer_norm_epsilon": 1e-6}))
    assert changed(ws) == {"base"}
    assert ran(dvc(ws, "repro", "base")) == {"base"}
    assert json.loads((ws / "models/base/config.json").read_text())["layer_norm_epsilon"] == 1e-6
