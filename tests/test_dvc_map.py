"""dvc.yaml is the map, and its hand-kept lists must not drift from the code: each stage's `deps` cover every
`edgerlhf` module it runs (imports followed transitively, lazy ones included), the reward stage's `params`
name every reward.* key that shapes a reward model, and the combined `plots:` show every precision. Each
failure says what to add where."""

import ast
import re
from dataclasses import fields
from pathlib import Path

import yaml

from edgerlhf.config import RewardParams, load_params

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "edgerlhf"


def imported_modules(path: Path) -> set[str]:
    """The `edgerlhf` modules a file imports anywhere in it (top level, in functions, under TYPE_CHECKING)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith(PACKAGE + ".")}
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level == 1 and path.parent.name == PACKAGE:  # from . import x / from .x import y
                module = PACKAGE + ("." + module if module else "")
            elif node.level:
                continue
            if module == PACKAGE:
                found |= {f"{PACKAGE}.{a.name}" for a in node.names}
            elif module.startswith(PACKAGE + "."):
                found.add(module)
    if found:
        found.add(f"{PACKAGE}.__init__")  # importing any module of the package runs its __init__ first
    return {m for m in found if (ROOT / (m.replace(".", "/") + ".py")).is_file()}


def module_closure(entry: list[Path]) -> set[str]:
    """Repository paths of every package module reachable from the entry files."""
    seen: set[str] = set()
    todo = list(entry)
    while todo:
        for module in imported_modules(todo.pop()):
            path = module.replace(".", "/") + ".py"
            if path not in seen:
                seen.add(path)
                todo.append(ROOT / path)
    return seen


def entry_files(cmd: str) -> list[Path]:
    """The files a stage command runs: its stages/*.py script and any `python -m edgerlhf.X` wrapper."""
    files = [ROOT / p for p in re.findall(r"stages/\w+\.py", cmd)]
    files += [ROOT / (m.replace(".", "/") + ".py") for m in re.findall(rf"-m ({PACKAGE}\.\w+)", cmd)]
    return files


def stages() -> dict[str, dict]:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def test_every_stage_depends_on_the_code_it_runs():
    problems = []
    for name, stage in stages().items():
        entry = entry_files(stage["cmd"])
        assert entry, f"stage {name}: no stages/*.py script in its cmd"
        needed = {p.relative_to(ROOT).as_posix() for p in entry} | module_closure(entry)
        listed = {d for d in stage["deps"] if d.endswith(".py")}
        if needed - listed:
            problems.append(f"dvc.yaml stage {name}: add to deps: {', '.join(sorted(needed - listed))}")
        if listed - needed:
            problems.append(f"dvc.yaml stage {name}: remove from deps (not run by it): "
                            f"{', '.join(sorted(listed - needed))}")
    assert not problems, "\n".join(problems)


def test_reward_stage_params_are_the_reward_fields():
    """Single keys, not the whole section (adding a precision must not retrain the others), so every new
    RewardParams field must be listed by hand; `precisions` is the matrix itself."""
    listed = {p for p in stages()["reward"]["params"] if isinstance(p, str) and p.startswith("reward.")}
    fields_ = {f"reward.{f.name}" for f in fields(RewardParams) if f.name != "precisions"}
    assert not fields_ - listed, f"dvc.yaml stage reward: add to params: {', '.join(sorted(fields_ - listed))}"
    assert not listed - fields_, f"dvc.yaml stage reward: no such reward params: {', '.join(sorted(listed - fields_))}"


def test_combined_plots_show_every_precision():
    precisions = set(load_params(ROOT / "params.yaml").reward.precisions)
    problems = []
    for plot in yaml.safe_load((ROOT / "dvc.yaml").read_text())["plots"]:
        (title, spec), = plot.items()
        files = list(spec["y"]) if isinstance(spec.get("y"), dict) else []
        per_precision = [f for f in files if re.fullmatch(r"plots/[\w/]+/\w+\.csv", f)]
        shown = {Path(f).stem for f in per_precision}
        for folder in sorted({Path(f).parent.as_posix() for f in per_precision}):
            missing = precisions - {Path(f).stem for f in per_precision if Path(f).parent.as_posix() == folder}
            if missing:
                column = spec["y"][per_precision[0]]
                problems.append(f"dvc.yaml plots.{title}: add " + ", ".join(
                    f"`{folder}/{p}.csv: {column}`" for p in sorted(missing)) + " to y")
        if shown - precisions:
            problems.append(f"dvc.yaml plots.{title}: remove {', '.join(sorted(shown - precisions))} "
                            "(not in reward.precisions)")
    assert not problems, "\n".join(problems)


def test_config_knows_every_precision_of_the_table():
    from edgerlhf import config, precisions

    assert config.PRECISIONS == precisions.NAMES, (
        f"edgerlhf/config.py PRECISIONS {config.PRECISIONS} != the table in edgerlhf/precisions.py "
        f"{precisions.NAMES}: add the new name to config.PRECISIONS")


def test_split_lists_partition_the_splits():
    from edgerlhf.config import SPLITS, TEST_SPLITS, TRAIN_SPLITS

    assert sorted(TRAIN_SPLITS + TEST_SPLITS) == sorted(SPLITS) and not set(TRAIN_SPLITS) & set(TEST_SPLITS)


# The inputs a stage reads from outside the pipeline, as dvc.yaml templates them from params: editing the file or
# folder reruns exactly the stage that reads it (and what follows). No other stage lists them.
INPUT_DEPS = {"prepare": "${data.jsonl_path}", "base": "${model.local_path}", "judge": "${eval.judge_path}"}


def test_local_inputs_are_deps_of_exactly_the_stages_that_read_them():
    problems = []
    for name, stage in stages().items():
        templated = {d for d in stage["deps"] if "${" in d and "${item." not in d}
        wanted = {INPUT_DEPS[name]} if name in INPUT_DEPS else set()
        if wanted - templated:
            problems.append(f"dvc.yaml stage {name}: add to deps: {', '.join(sorted(wanted - templated))}")
        if templated - wanted:
            problems.append(f"dvc.yaml stage {name}: templated deps only for the local inputs, remove: "
                            f"{', '.join(sorted(templated - wanted))}")
    assert not problems, "\n".join(problems)


def test_the_default_input_paths_exist():
    """DVC fails on a dep that does not exist, and the input deps are listed whatever the source: their defaults
    are committed folders (holding a README), and `make smoke`'s scratch copy makes them too (edgerlhf.smoke)."""
    from edgerlhf import smoke
    from edgerlhf.config import LOCAL_DATA_DIR, LOCAL_MODEL_DIR, Params

    defaults = Params()
    assert (defaults.data.jsonl_path, defaults.model.local_path) == (LOCAL_DATA_DIR, LOCAL_MODEL_DIR)
    for folder in (LOCAL_DATA_DIR, LOCAL_MODEL_DIR):
        assert (ROOT / folder / "README.md").is_file(), f"{folder}/README.md is missing: it keeps the folder in git"
    assert set(smoke.INPUT_DIRS) == {LOCAL_DATA_DIR, LOCAL_MODEL_DIR}
