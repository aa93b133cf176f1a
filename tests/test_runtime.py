"""What every stage does at its start (#15): torch threads from hardware.cpu_threads whatever started the stage, and
quiet, useful output (no warning from our own code, non-actionable library warnings filtered, a progress bar)."""

import json
import logging
import os
import re
import shutil
import warnings

import pytest
import torch
import yaml

from edgerlhf import runtime
from edgerlhf.config import HardwareParams, parse_params
from edgerlhf.errors import ConfigError
from tests.conftest import REPRO_LOG, ROOT, run_logged, tool_env

# A Python warning as it is printed ("path/file.py:12: FutureWarning: ..."), issued from our code.
OWN_WARNING = re.compile(r"(?:^|/)(?:edgerlhf|stages)/[\w/]+\.py:\d+: \w*Warning")
ANY_WARNING = re.compile(r"\.py:\d+: \w*Warning|^WARNING", re.M)


@pytest.mark.parametrize(("setting", "procs", "cores", "want"), [
    ("auto", 1, 2, 2), ("auto", 2, 2, 1), ("auto", 3, 2, 1), ("auto", 4, 16, 4), (1, 1, 8, 1), (6, 2, 2, 6)])
def test_cpu_threads_resolve_auto_as_usable_cores_per_process(setting, procs, cores, want):
    assert runtime.resolve_cpu_threads(setting, procs, cores) == want


def test_usable_cores_is_the_affinity_mask():
    assert 1 <= runtime.usable_cores() <= (os.cpu_count() or 1)


@pytest.mark.parametrize("value", ["fast", "Auto", 0, -1, 1.5, True, None])
def test_cpu_threads_rejects_anything_but_auto_or_a_positive_integer(value):
    with pytest.raises(ConfigError, match=r"hardware\.cpu_threads must be auto or an integer >= 1"):
        parse_params({"hardware": {"cpu_threads": value}})


def test_cpu_threads_accepts_auto_and_integers():
    assert parse_params({}).hardware.cpu_threads == "auto"
    assert parse_params({"hardware": {"cpu_threads": 3}}).hardware.cpu_threads == 3


def test_set_threads_sets_torch_and_logs_the_setting(caplog):
    before = torch.get_num_threads()
    try:
        with caplog.at_level(logging.INFO, logger="edgerlhf"):
            assert runtime.set_threads(HardwareParams(cpu_threads=3)) == 3
            assert torch.get_num_threads() == 3
            n = runtime.set_threads(HardwareParams(num_processes=2))
        assert n == max(1, runtime.usable_cores() // 2) == torch.get_num_threads()
    finally:
        torch.set_num_threads(before)
    lines = [r.getMessage() for r in caplog.records]
    assert "threads 3 (hardware.cpu_threads 3)" in lines
    assert any(m.startswith(f"threads {n} (hardware.cpu_threads auto: ") for m in lines), lines


def test_library_warning_filters_never_hide_our_own():
    def shown(module: str, category: type, message: str) -> bool:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            runtime.quiet_library_warnings()
            warnings.warn_explicit(message, category, f"{module.replace('.', '/')}.py", 1, module=module)
        return bool(caught)

    for *_, module in runtime.LIBRARY_WARNINGS:
        assert not re.match(module, "edgerlhf.ppo") and not re.match(module, "stages")
    gc = "`is_gradient_checkpointing` is deprecated and will be removed in v6."
    assert not shown("transformers.modeling_utils", FutureWarning, gc)
    assert not shown("torch.jit._script", DeprecationWarning, "`torch.jit.script_method` is deprecated.")
    assert shown("edgerlhf.sft", FutureWarning, gc)  # the same message from our code shows
    assert shown("transformers.training_args", FutureWarning, "`gradient_checkpointing` is deprecated")


def test_trainer_progress_bar_shows_the_loss_on_the_bar_not_a_printed_dict():
    import transformers.trainer
    from transformers.trainer_callback import ProgressCallback, TrainerControl, TrainerState

    class Bar:  # stands in for the tqdm bar: what was put on it, what was printed through it
        def __init__(self):
            self.postfix, self.written = None, []

        def set_postfix(self, values, refresh=True):
            self.postfix = values

        def write(self, text):
            self.written.append(text)

    def log_through(callback) -> Bar:
        callback.training_bar = Bar()
        callback.on_log(None, TrainerState(is_world_process_zero=True), TrainerControl(),
                        logs={"loss": 0.5, "learning_rate": 1e-3, "accuracy": 0.75})
        return callback.training_bar

    saved = transformers.trainer.DEFAULT_PROGRESS_CALLBACK
    try:
        runtime.trainer_progress_bar()
        ours = transformers.trainer.DEFAULT_PROGRESS_CALLBACK
    finally:
        transformers.trainer.DEFAULT_PROGRESS_CALLBACK = saved
    assert issubclass(ours, ProgressCallback) and ours is not ProgressCallback
    assert log_through(ProgressCallback()).written  # transformers' own bar prints the dict...
    bar = log_through(ours())
    assert bar.written == [] and bar.postfix == {"loss": "0.5", "accuracy": "0.75"}  # ...ours shows it on the bar


@pytest.mark.slow
def test_smoke_log_has_no_warning_from_our_code(pipeline_run):
    text = (pipeline_run / REPRO_LOG).read_text(errors="replace").replace("\r", "\n")
    ours = [line for line in text.splitlines() if OWN_WARNING.search(line)]
    assert ours == [], "\n".join(ours)
    # the Trainer shows its bar, not a dict per logging step; each stage says what it loads and its threads
    assert not re.search(r"^\{'(?:eval_)?loss'", text, re.M), "raw Trainer log dicts in the output"
    for stage in ("sft", "reward", "ppo", "judge", "evaluate", "base"):
        assert f"[{stage}] loading torch/transformers" in text, stage
        assert f"[{stage}] threads 1 (hardware.cpu_threads 1)" in text, stage
    print(f"warnings left in the smoke log: {len(ANY_WARNING.findall(text))}")  # pytest -s shows the count


@pytest.mark.slow
@pytest.mark.extra  # one stage through dvc repro (~9 s): `make test-extra`
def test_a_stage_started_by_dvc_repro_without_omp_env_uses_the_params_threads(pipeline_run, tmp_path):
    """`dvc repro` typed by hand (no OMP_NUM_THREADS, no make wrapper): the stage sets the threads params ask for.
    3 is neither torch's default on a 2-core machine nor the smoke profile's 1, so only params can have set it."""
    repo = tmp_path / "run"
    shutil.copytree(pipeline_run, repo, symlinks=True)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["hardware"]["cpu_threads"] = 3
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {k: v for k, v in tool_env().items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    text = run_logged(["dvc", "repro", "-s", "-f", "judge"], repo, repo / ".cache" / "judge.log", env)
    assert "[judge] threads 3 (hardware.cpu_threads 3)" in text, text[-3000:]
    assert json.loads((repo / "metrics" / "judge.json").read_text())["cpu_threads"] == 3
    assert not OWN_WARNING.search(text.replace("\r", "\n"))


def test_smoke_repro_leaves_threads_to_the_params(monkeypatch):
    from edgerlhf import smoke

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert "OMP_NUM_THREADS" not in smoke.repro_env()
    assert yaml.safe_load((ROOT / "profiles" / "smoke.yaml").read_text())["hardware"]["cpu_threads"] == 1


def test_stage_scripts_announce_the_slow_imports_and_set_threads():
    """Every stage that loads torch prints a line before its imports, and sets its threads through runtime."""
    for name in ("base", "judge", "sft", "reward", "ppo", "evaluate"):
        src = (ROOT / "stages" / f"{name}.py").read_text()
        first_code = src.split('"""', 2)[2]
        assert first_code.index(f'loading("{name}")') < first_code.index("from edgerlhf import "), name
        assert "set_threads(params.hardware)" in src or "distributed.start_stage(params)" in src, name
