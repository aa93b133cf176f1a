"""dvc.yaml is the map, and its hand-kept lists must not drift from the code: each stage's `deps` cover every
`edgerlhf` module it runs (imports followed transitively, lazy ones included), the reward stage's `params`
name every reward.* key that shapes a reward model, and the combined `plots:` show every precision. Each
failure says what to add where."""

import ast
import re
from dataclasses import fields
from pathlib import Path

import pytest
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
    RewardParams field must be listed by hand; `precisions` is the matrix itself, operational keys stay out."""
    from edgerlhf.config import OPERATIONAL_KEYS

    listed = {p for p in stages()["reward"]["params"] if isinstance(p, str) and p.startswith("reward.")}
    fields_ = {f"reward.{f.name}" for f in fields(RewardParams) if f.name != "precisions"} - set(OPERATIONAL_KEYS)
    assert not fields_ - listed, f"dvc.yaml stage reward: add to params: {', '.join(sorted(fields_ - listed))}"
    assert not listed - fields_, f"dvc.yaml stage reward: no such reward params: {', '.join(sorted(listed - fields_))}"


# A file of a stage instance's live folder (edgerlhf/live.py): dvclive/<stage>[/<P>]/plots/... ; group 1 the folder.
LIVE_FILE = re.compile(r"(dvclive/(sft|reward|ppo)(?:/(\w+))?)/plots/(metrics/(.+)\.tsv|custom/eval\.json)")


def plot_sources(spec: dict) -> dict[str, str]:
    """file -> field of every file a plot definition reads (its y and, when it names files, its x)."""
    return {**(spec["y"] if isinstance(spec.get("y"), dict) else {}),
            **(spec["x"] if isinstance(spec.get("x"), dict) else {})}


def test_combined_plots_show_every_precision():
    precisions = set(load_params(ROOT / "params.yaml").reward.precisions)
    problems = []
    for plot in yaml.safe_load((ROOT / "dvc.yaml").read_text())["plots"]:
        (title, spec), = plot.items()
        series: dict[tuple[str, str, str], set[str]] = {}  # (stage, file below the precision, field) -> precisions
        for f, field in (spec["y"] if isinstance(spec.get("y"), dict) else {}).items():
            m = LIVE_FILE.fullmatch(f)
            if m and m.group(3):
                series.setdefault((m.group(2), f[len(m.group(1)) + 1:], field), set()).add(m.group(3))
        for (stage, rest, field), shown in sorted(series.items()):
            if precisions - shown:
                problems.append(f"dvc.yaml plots.{title}: add " + ", ".join(
                    f"`dvclive/{stage}/{p}/{rest}: {field}`" for p in sorted(precisions - shown)) + " to y")
            if shown - precisions:
                problems.append(f"dvc.yaml plots.{title}: remove {', '.join(sorted(shown - precisions))} "
                                "(not in reward.precisions)")
    assert not problems, "\n".join(problems)


def test_plots_read_what_the_stages_log():
    """Every file a plot reads is a live file a stage writes: in a live folder the stage declares as an output,
    a curve it logs (PPO: ppo_stage.PLOT_KEYS and eval/<key>; Trainer stages: the Trainer's log keys), read by the
    column dvclive names after the metric; the gold-vs-KL data (eval.json) by its keys with x: kl. No stage keeps
    a plot of its own that repeats the combined ones."""
    from edgerlhf import live
    from edgerlhf.ppo_stage import PLOT_KEYS

    precisions = load_params(ROOT / "params.yaml").reward.precisions
    logged = {"ppo": set(PLOT_KEYS) - {"update"} | {f"eval/{k}" for k in live.EVAL_KEYS},
              "sft": {"loss", "grad_norm", "learning_rate", "epoch"}, "reward": {"loss", "grad_norm", "learning_rate",
                                                                                 "epoch", "accuracy"}}
    outs = {name: {next(iter(o)) if isinstance(o, dict) else o for o in stage.get("outs", [])}
            for name, stage in stages().items()}
    problems = [f"dvc.yaml stage {name}: remove its `plots:` (the combined `plots:` draw its live files)"
                for name, stage in stages().items() if stage.get("plots")]
    for plot in yaml.safe_load((ROOT / "dvc.yaml").read_text())["plots"]:
        (title, spec), = plot.items()
        for f, field in plot_sources(spec).items():
            m = LIVE_FILE.fullmatch(f)
            if not m:
                problems.append(f"dvc.yaml plots.{title}: {f} is no live file (dvclive/<stage>[/<P>]/plots/...)")
                continue
            stage, precision, name = m.group(2), m.group(3), m.group(5)
            folder = f"dvclive/{stage}" + ("/${item.precision}" if precision else "")
            if folder not in outs[stage] or (precision or "") not in ((*precisions,) if stage != "sft" else ("",)):
                problems.append(f"dvc.yaml plots.{title}: {f} is in no stage's live folder ({folder} in its outs)")
            if name is None:  # eval.json
                if stage != "ppo" or field not in live.EVAL_KEYS or spec.get("x") != "kl":
                    problems.append(f"dvc.yaml plots.{title}: {f} holds {', '.join(live.EVAL_KEYS)} (x: kl)")
            elif name not in logged[stage] or field != name.rsplit("/", 1)[-1]:
                problems.append(f"dvc.yaml plots.{title}: {f}: {field} is no curve the {stage} stage logs there")
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


def _leaf_keys(prefix: str, obj) -> list[str]:
    if not isinstance(obj, dict):
        return [prefix]
    return [k for key, value in obj.items() for k in _leaf_keys(f"{prefix}.{key}" if prefix else key, value)]


def tracked_params(stage: dict) -> set[str]:
    """Every params.yaml leaf key a stage's `params:` makes DVC track (a section tracks all its keys)."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    out: set[str] = set()
    for entry in stage.get("params", []):
        node = params
        for part in entry.split("."):
            node = node[part]
        out.update(_leaf_keys(entry, node))
    return out


def test_operational_keys_are_no_stage_dependency():
    """Editing a key that changes how a stage runs, not what it produces, must rerun nothing (#15)."""
    from edgerlhf.config import OPERATIONAL_KEYS

    flat = set(_leaf_keys("", yaml.safe_load((ROOT / "params.yaml").read_text())))
    assert set(OPERATIONAL_KEYS) <= flat, f"not in params.yaml: {sorted(set(OPERATIONAL_KEYS) - flat)}"
    problems = [f"dvc.yaml stage {name} tracks operational {key}" for name, stage in stages().items()
                for key in sorted(tracked_params(stage) & set(OPERATIONAL_KEYS))]
    assert not problems, "\n".join(problems)
    readme = (ROOT / "README.md").read_text()
    assert [k for k in OPERATIONAL_KEYS if f"`{k}`" not in readme] == [], "README must name every operational key"


@pytest.mark.parametrize("stage, section", [("sft", "sft"), ("ppo", "ppo"), ("reward", "reward"),
                                            ("judge", "eval.judge_training")])
def test_a_training_stage_tracks_every_result_key_of_its_section(stage, section):
    """Listing keys one by one (to leave out the operational ones) must not drop a key that changes results."""
    from edgerlhf.config import OPERATIONAL_KEYS

    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    node = params
    for part in section.split("."):
        node = node[part]
    wanted = set(_leaf_keys(section, node)) - set(OPERATIONAL_KEYS) - {"reward.precisions"}
    missing = wanted - tracked_params(stages()[stage])
    assert not missing, f"dvc.yaml stage {stage}: add to params: {', '.join(sorted(missing))}"
