"""Fault injection on a copy of a finished run (the session's `pipeline_run`): a truncated split, a pickled weights
file, an empty or broken record, a key typo. Each stage (and generate/export) must refuse in one line, exit != 0,
before any heavy work, and leave every previous output byte-identical (validate first, replace only on success)."""

from __future__ import annotations

import hashlib
import json
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT, tool_env

pytestmark = pytest.mark.extra

OUTPUTS = ("params.yaml", "data", "models", "metrics", "dvclive", "reports")


@pytest.fixture
def run(pipeline_run: Path, tmp_path: Path) -> Path:
    """A private copy of the finished run's params and outputs (no DVC), to break things in."""
    dest = tmp_path / "run"
    dest.mkdir()
    for name in OUTPUTS:
        src = pipeline_run / name
        if src.is_dir():
            shutil.copytree(src, dest / name)
        else:
            shutil.copy2(src, dest / name)
    return dest


def tree_digest(root: Path) -> dict[str, str]:
    """sha256 of every file under `root`, by relative path (a new, removed or changed file changes it)."""
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def stage(run: Path, script: str, *args: str) -> subprocess.CompletedProcess:
    """Run stages/<script>.py of this checkout in `run` (as dvc.yaml's cmd does, without DVC)."""
    return subprocess.run([sys.executable, str(ROOT / "stages" / f"{script}.py"), *args], cwd=run,
                          capture_output=True, text=True, env=tool_env(), timeout=300)


def module(run: Path, name: str, *args: str) -> subprocess.CompletedProcess:
    """`python -m edgerlhf.<name> --root RUN args` from this checkout."""
    return subprocess.run([sys.executable, "-m", f"edgerlhf.{name}", "--root", str(run), *args], cwd=ROOT,
                          capture_output=True, text=True, env=tool_env(), timeout=300,
                          stdin=subprocess.DEVNULL)


def assert_refused(proc: subprocess.CompletedProcess, code: int, tag: str, *needles: str,
                   only_line: bool = True) -> str:
    """Exit `code`, no traceback, exactly one error line (the last; with `only_line` the whole of stderr) holding
    every needle; returns it."""
    assert proc.returncode == code, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    # the line every torch stage prints before its imports (runtime.loading) is not work: it comes first by design
    lines = [line for line in proc.stderr.strip().splitlines() if not line.endswith("loading torch/transformers...")]
    errors = [line for line in lines if line.startswith("error [")]
    assert len(errors) == 1 and lines[-1] == errors[0], proc.stderr
    if only_line:
        assert lines == errors, proc.stderr  # refused before any work: not even a progress line
    assert errors[0].startswith(f"error [{tag}]: "), errors[0]
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])
    return errors[0]


def line_offsets(path: Path) -> list[int]:
    """Byte offset of the start of every line."""
    offsets, pos = [], 0
    for line in path.read_bytes().splitlines(keepends=True):
        offsets.append(pos)
        pos += len(line)
    return offsets


# --------------------------------------------------------------------------- (a) truncated split file


@pytest.mark.parametrize("cut", ["mid-line", "at a line end"])
@pytest.mark.parametrize("folder, script, args, writer", [("data/prepared", "judge", (), "prepare"),
                                                          ("data/labelled", "reward", ("int4",), "judge")])
def test_truncated_split_keeps_the_stage_outputs(run, cut, folder, script, args, writer):
    split = run / folder / "rm_train.jsonl"
    starts = line_offsets(split)
    n = len(starts) // 2
    keep = starts[n] + 40 if cut == "mid-line" else starts[n]  # line n + 1 cut after 40 bytes, or n whole lines
    split.write_bytes(split.read_bytes()[:keep])
    before = tree_digest(run)
    proc = stage(run, script, *args)
    if cut == "mid-line":
        assert_refused(proc, 3, script, f"{folder}/rm_train.jsonl:{n + 1}: invalid JSON", f"dvc repro {writer}")
    else:
        size = yaml.safe_load((run / "params.yaml").read_text())["data"]["sizes"]["rm_train"]
        assert_refused(proc, 3, script, f"rm_train.jsonl: {n} records, but data.sizes.rm_train is {size}",
                       f"dvc repro {writer}")
    assert tree_digest(run) == before  # models/judge, data/labelled, models/reward/int4, dvclive: byte-identical


# --------------------------------------------------------------------------- (b) pickled weights


class _Trap:
    """Unpickling this creates a file: proof that nothing unpickled it."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def _plant_pickle(run: Path, where: str, name: str, *, instead_of: str = "") -> Path:
    folder = run / where
    if instead_of:
        (folder / instead_of).unlink()
    marker = run.parent / "unpickled"
    (folder / name).write_bytes(pickle.dumps(_Trap(marker)))
    return marker


@pytest.mark.parametrize("instead", [False, True], ids=["next to the safetensors", "instead of the safetensors"])
def test_pickled_ppo_adapter_is_refused_before_any_generation(run, instead):
    marker = _plant_pickle(run, "models/ppo/int4", "adapter_model.bin",
                           instead_of="adapter_model.safetensors" if instead else "")
    before = tree_digest(run)
    needles = ("models/ppo/int4/adapter_model.bin is a pickle file (.bin): refusing to load it",
               "`dvc repro -f ppo@int4`")
    assert_refused(stage(run, "evaluate"), 4, "evaluate", *needles)
    for args in (["--policy", "ppo@int4", "What color is the sky?"], ["--compare", "What color is the sky?"]):
        proc = module(run, "generate", *args)
        assert_refused(proc, 4, "generate", *needles)
        assert proc.stdout == ""
    assert_refused(module(run, "export", "--precision", "int4"), 4, "export", *needles)
    assert tree_digest(run) == before  # metrics/eval.json, reports/samples.jsonl, ...: byte-identical
    assert not (run / "exports").exists() and not marker.exists()


@pytest.mark.parametrize("where, name, script, args, owner", [
    ("models/base", "pytorch_model.bin", "sft", (), "base"),
    ("models/sft/merged", "model.pt", "reward", ("int8",), "sft"),
    ("models/sft/merged", "model.ckpt", "evaluate", (), "sft"),
    ("models/reward/int8", "adapter_model.pth", "ppo", ("int8",), "reward@int8"),
    ("models/reward/bf16", "scores.pkl", "evaluate", (), "reward@bf16"),
])
def test_every_stage_refuses_a_pickle_in_what_it_loads(run, where, name, script, args, owner):
    marker = _plant_pickle(run, where, name)
    before = tree_digest(run)
    assert_refused(stage(run, script, *args), 4, script, f"{where}/{name} is a pickle file",
                   f"`dvc repro -f {owner}`")
    assert tree_digest(run) == before and not marker.exists()


# --------------------------------------------------------------------------- (c) empty or bad records


def _append(path: Path, text: str) -> str:
    """Append a line; returns '<file>:<its line number>'."""
    n = len(path.read_bytes().splitlines())
    with path.open("a") as fh:
        fh.write(text + "\n")
    return f"{path.name}:{n + 1}"


def _replace_line(path: Path, index: int, text: str) -> str:
    lines = path.read_text().splitlines()
    lines[index] = text
    path.write_text("\n".join(lines) + "\n")
    return f"{path.name}:{index + 1}"


@pytest.mark.parametrize("script, args, split, fault, message", [
    ("sft", (), "sft_train", "empty record", "missing field 'chosen'"),
    ("reward", ("int4",), "labelled/rm_test", "empty response", "field 'chosen' is an empty response"),
    ("judge", (), "rm_test", "empty response", "field 'chosen' is an empty response"),
    ("ppo", ("int4",), "ppo_prompts", "empty file", "0 records, but data.sizes.ppo_prompts is"),
    ("evaluate", (), "eval_prompts", "bad JSON", "invalid JSON"),
    ("evaluate", (), "labelled/rm_test", "not an object", "expected a JSON object (got array)"),
    ("base", (), "corpus", "bad JSON", "invalid JSON"),
])
def test_bad_record_keeps_the_stage_outputs(run, script, args, split, fault, message):
    folder, _, name = split.rpartition("/")  # labelled/<split>: the judge stage's copy the reward models learn
    path = run / "data" / (folder or "prepared") / f"{name}.jsonl"
    where = path.name
    if fault == "empty record":
        where = _append(path, "{}")
    elif fault == "empty response":
        record = json.loads(path.read_text().splitlines()[4])
        where = _replace_line(path, 4, json.dumps({**record, "chosen": " "}))
    elif fault == "empty file":
        path.write_bytes(b"")
    elif fault == "bad JSON":
        where = _replace_line(path, 2, '{"prompt": "\\n\\nHuman: hi\\n\\nAssistant:", "chosen": ')
    else:
        where = _replace_line(path, 0, "[]")
    before = tree_digest(run)
    proc = stage(run, script, *args)
    assert_refused(proc, 3, script, f"data/{folder or 'prepared'}/{where}", message,
                   "dvc repro judge" if folder else "dvc repro prepare")
    assert tree_digest(run) == before


def test_prepare_with_a_bad_input_keeps_data_prepared(run):
    (run / "pairs.jsonl").write_text(json.dumps({"prompt": "\n\nHuman: hi\n\nAssistant:", "chosen": " a",
                                                 "rejected": " b"}) + "\n" + '{"chosen": "\\n\\nHuman: x' + "\n")
    params = yaml.safe_load((run / "params.yaml").read_text())
    params["data"].update(source="jsonl", jsonl_path="pairs.jsonl")
    (run / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    before = tree_digest(run)
    assert_refused(stage(run, "prepare"), 3, "prepare", "pairs.jsonl:2: invalid JSON", only_line=False)
    assert tree_digest(run) == before  # all of data/prepared and metrics/data.json


def test_report_with_a_broken_metrics_file_keeps_the_report(run):
    eval_json = run / "metrics/eval.json"
    eval_json.write_bytes(eval_json.read_bytes()[:100])
    before = tree_digest(run)
    assert_refused(stage(run, "report"), 4, "report", "metrics/eval.json is not valid JSON",
                   "`dvc repro evaluate`", only_line=False)
    assert tree_digest(run) == before


# --------------------------------------------------------------------------- (d) a key typo


@pytest.mark.parametrize("script, args", [("reward", ("int4",)), ("evaluate", ())])
def test_key_typo_is_named_by_the_stage_and_the_preflight(run, script, args):
    params = yaml.safe_load((run / "params.yaml").read_text())
    params["reward"]["learnin_rate"] = params["reward"].pop("learning_rate")
    (run / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    before = tree_digest(run)
    typo = "unknown key reward.learnin_rate (did you mean reward.learning_rate?)"
    assert_refused(stage(run, script, *args), 2, script, typo)
    preflight = subprocess.run([sys.executable, "-m", "edgerlhf.config", "check", "params.yaml"], cwd=run,
                               capture_output=True, text=True, env=tool_env(), timeout=60)
    assert_refused(preflight, 2, "params", f"params.yaml: {typo}")
    assert tree_digest(run) == before
