"""A study across seeds (#16): the pipeline once per seed as DVC experiments, then means, intervals and paired tests.

`python -m edgerlhf.study [--dir D] [--seeds 1 2 3] [--jobs 1]` (what `make study` runs) queues one experiment per
seed not yet completed (`dvc exp run --queue -S seed=S --name seed-S`), starts the queue (`dvc queue start -j J`)
and waits for it; then it reads every completed seed's metrics/headline.json from `dvc exp show --json` and writes
metrics/study.json (numbers only), reports/study.md and reports/study.png in D. A seed counts as completed when an
experiment of D's baseline commit ran with the workspace's params except `seed=S` and finished (so an interrupted
study continues and an added seed runs alone). The statistics are small pure functions below; docs/study.md says
how to read them.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from edgerlhf import exps, paths
from edgerlhf.config import PRECISIONS, flatten
from edgerlhf.errors import EdgeRLHFError
from edgerlhf.report import fmt, unsupported_numbers

STUDY_METRICS = paths.METRICS / "study.json"
STUDY_REPORT = paths.REPORTS / "study.md"
STUDY_CHART = paths.REPORTS / "study.png"

CONFIDENCE = 0.95  # two-sided t-intervals
POWER = 0.80  # of the minimum detectable difference (MDD)
REFERENCE = "bf16"  # paired differences are precision - REFERENCE, seed by seed
METRICS = ("gold_gain", "win_rate", "kl", "proxy_gain", "rm_acc", "rm_agree")  # per precision, over seeds
PAIRED_METRICS = ("gold_gain", "win_rate")  # paired differences against REFERENCE
CHART_METRICS = ("gold_gain", "win_rate", "kl")
JSON_DECIMALS = 6
P_DECIMALS = 4  # p-values of the exact tests (multiples of 1/2^n: 0.0625 stays 0.0625)
EXACT_PERMUTATION_MAX = 20  # 2^20 sign patterns; above, a fixed-seed Monte Carlo sample of MC_PERMUTATIONS
MC_PERMUTATIONS = 200_000
DEFAULT_POLL_S = 15.0
MISSING_POLLS = 2  # polls in a row a waited-for seed may be absent (between its task and its result) before it fails

DONE, QUEUED, RUNNING, FAILED, MISSING = "done", "queued", "running", "failed", "missing"


class StudyError(EdgeRLHFError):
    """A seed failed, or the run folder holds an experiment that blocks the study."""


# --------------------------------------------------------------------------- statistics (pure)


@dataclass(frozen=True)
class Interval:
    """Mean of n values with its two-sided t-interval; sd, lo, hi are None for n < 2."""

    n: int
    mean: float | None
    sd: float | None = None
    lo: float | None = None
    hi: float | None = None

    @property
    def half_width(self) -> float | None:
        """hi - mean (None without an interval)."""
        return None if self.hi is None or self.mean is None else self.hi - self.mean

    def excludes_zero(self) -> bool:
        """True when the interval lies entirely above or below 0."""
        return self.lo is not None and self.hi is not None and (self.lo > 0 or self.hi < 0)


def t_interval(values: Sequence[float], confidence: float = CONFIDENCE) -> Interval:
    """Mean and mean ± t_{(1+c)/2, n-1} · s/√n (s: sample SD, n-1 denominator); no interval for n < 2."""
    from scipy import stats

    n = len(values)
    if n == 0:
        return Interval(0, None)
    mean = sum(values) / n
    if n < 2:
        return Interval(1, mean)
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = float(stats.t.ppf((1 + confidence) / 2, n - 1)) * sd / math.sqrt(n)
    return Interval(n, mean, sd, mean - half, mean + half)


def min_detectable(sd: float | None, n: int, confidence: float = CONFIDENCE, power: float = POWER) -> float | None:
    """MDD = (t_{(1+c)/2, n-1} + t_{power, n-1}) · sd/√n, the difference n seeds detect with probability `power`."""
    # two-sided level 1 - c; the normal-approximation form with t quantiles (docs/study.md)
    from scipy import stats

    if sd is None or n < 2:
        return None
    return (float(stats.t.ppf((1 + confidence) / 2, n - 1)) + float(stats.t.ppf(power, n - 1))) * sd / math.sqrt(n)


def paired_differences(a: dict[int, float], b: dict[int, float]) -> dict[int, float]:
    """b[s] - a[s] for every seed s present in both, by seed."""
    return {s: b[s] - a[s] for s in sorted(set(a) & set(b))}


def sign_test(diffs: Iterable[float]) -> float:
    """Exact two-sided sign test (binomial, p = 1/2) of the nonzero differences; 1.0 when none is nonzero."""
    nonzero = [d for d in diffs if d != 0]
    n = len(nonzero)
    if n == 0:
        return 1.0
    k = min(sum(d > 0 for d in nonzero), sum(d < 0 for d in nonzero))
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2**n)


def permutation_test(diffs: Sequence[float]) -> float:
    """Two-sided paired permutation p: the share of the 2^n sign flips whose |mean| reaches the observed one."""
    # exact up to EXACT_PERMUTATION_MAX differences, else a fixed-seed Monte Carlo sample ((hits + 1) / (N + 1))
    import numpy as np

    d = np.asarray(diffs, dtype=float)
    n = len(d)
    if n == 0:
        return 1.0
    observed = abs(d.sum())
    tol = 1e-12 * max(1.0, float(np.abs(d).sum()))  # the same sum added in another order
    if n > EXACT_PERMUTATION_MAX:
        signs = np.random.default_rng(0).choice((1.0, -1.0), size=(MC_PERMUTATIONS, n))
        return (int(np.sum(np.abs(signs @ d) >= observed - tol)) + 1) / (MC_PERMUTATIONS + 1)
    hits, total, chunk = 0, 2**n, 1 << 16
    for start in range(0, total, chunk):  # pattern i flips difference j when bit j of i is set
        idx = np.arange(start, min(total, start + chunk))
        signs = 1.0 - 2.0 * ((idx[:, None] >> np.arange(n)) & 1)
        hits += int(np.sum(np.abs(signs @ d) >= observed - tol))
    return hits / total


def compare(diffs: dict[int, float], confidence: float = CONFIDENCE, power: float = POWER) -> dict[str, Any]:
    """The paired summary of differences by seed: n, mean, t-interval, MDD, signs, exact sign and permutation p."""
    values = list(diffs.values())
    ci = t_interval(values, confidence)
    out: dict[str, Any] = {"n": ci.n, "n_pos": sum(v > 0 for v in values), "n_neg": sum(v < 0 for v in values),
                           "n_zero": sum(v == 0 for v in values), "differences": {str(s): v for s, v in diffs.items()}}
    if ci.n:
        out.update(mean=ci.mean, sign_p=sign_test(values), permutation_p=permutation_test(values),
                   min_exact_p=min(1.0, 2 / 2**ci.n))
    if ci.sd is not None:
        out.update(sd=ci.sd, lo=ci.lo, hi=ci.hi, half_width=ci.half_width, mdd=min_detectable(ci.sd, ci.n, confidence,
                                                                                                   power))
    return out


def fmt_p(p: float) -> str:
    """A p-value at P_DECIMALS decimals."""
    return f"{p:.{P_DECIMALS}f}"


def fmt_interval(stats: dict[str, Any]) -> str:
    """'mean [lo, hi]', 'mean (one seed, no interval)' or '-'."""
    if "mean" not in stats:
        return "-"
    if "lo" not in stats:
        return f"{fmt(stats['mean'])} (one seed, no interval)"
    return f"{fmt(stats['mean'])} [{fmt(stats['lo'])}, {fmt(stats['hi'])}]"


# Two seeds whose differences happen to agree give a t-interval on one degree of freedom that can exclude zero by
# luck (the exact tests then cannot go below p = 0.5): a claim needs at least this many seeds.
MIN_SEEDS_FOR_CLAIM = 3


def verdict(precision: str, metric: str, stats: dict[str, Any], reference: str = REFERENCE) -> str:
    """One sentence on precision - reference: a claim only when the t-interval excludes zero, else the MDD."""
    # n < 2: no interval, no claim; n = 0: nothing to compare (e.g. no gold judge)
    head = f"{precision} − {reference}, {metric}:"
    n = stats.get("n", 0)
    if n == 0:
        return f"{head} no seed has both values (a run without a gold judge has no {metric}): no comparison."
    if "lo" not in stats:
        return (f"{head} one seed only (difference {fmt(stats['mean'])}): no interval, so no claim; run more seeds "
                "(`--seeds 1 2 3`).")
    ci = f"95 % t-interval [{fmt(stats['lo'])}, {fmt(stats['hi'])}]"
    tests = f"sign test p = {fmt_p(stats['sign_p'])}, permutation p = {fmt_p(stats['permutation_p'])}"
    if (stats["lo"] > 0 or stats["hi"] < 0) and n < MIN_SEEDS_FOR_CLAIM:
        return (f"{head} the interval excludes zero ({ci}, mean difference {fmt(stats['mean'])}), but {n} seeds give "
                f"a t-interval with a single degree of freedom and exact tests that cannot go below p = "
                f"{fmt_p(stats['min_exact_p'])}: no claim; add seeds.")
    if stats["lo"] > 0 or stats["hi"] < 0:
        direction = "higher" if stats["mean"] > 0 else "lower"
        return (f"{head} {precision} is {direction} than {reference}: mean difference {fmt(stats['mean'])} over "
                f"{n} seeds ({ci} excludes zero; {tests}; with {n} seeds these exact tests cannot go below "
                f"p = {fmt_p(stats['min_exact_p'])}).")
    return (f"{head} the {n} seeds do not separate {precision} from {reference}: mean difference "
            f"{fmt(stats['mean'])}, {ci} covers zero ({tests}). With this spread (SD of the differences "
            f"{fmt(stats['sd'])}) a difference would need to be about {fmt(stats['mdd'])} to be detected at 80 % "
            "power (MDD); more seeds narrow it.")


# --------------------------------------------------------------------------- aggregation


def _r(value: float) -> float:
    return round(float(value), JSON_DECIMALS)


def _rounded(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _rounded(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_rounded(v) for v in obj]
    if isinstance(obj, float):
        return _r(obj)
    return obj


def _summary(by_seed: dict[int, float]) -> dict[str, Any]:
    ci = t_interval(list(by_seed.values()))
    out: dict[str, Any] = {"n": ci.n, "values": {str(s): v for s, v in by_seed.items()}}
    if ci.n:
        out["mean"] = ci.mean
    if ci.sd is not None:
        out.update(sd=ci.sd, lo=ci.lo, hi=ci.hi, half_width=ci.half_width)
    return out


def precisions_of(headlines: dict[int, dict[str, dict[str, float]]]) -> list[str]:
    """The precisions of the headlines (sft left out): bf16, int8, int4 first (`dvc exp show` sorts the keys)."""
    found = {p for head in headlines.values() for p in head if p != "sft"}
    return sorted(found, key=lambda p: (PRECISIONS.index(p) if p in PRECISIONS else len(PRECISIONS), p))


def aggregate(headlines: dict[int, dict[str, dict[str, float]]]) -> dict[str, Any]:
    """metrics/study.json (numbers only) from the seeds' headlines: per precision and paired against bf16."""
    seeds = sorted(headlines)
    precisions = precisions_of(headlines)

    def values(p: str, key: str) -> dict[int, float]:
        return {s: float(headlines[s][p][key]) for s in seeds
                if isinstance(headlines[s].get(p, {}).get(key), (int, float))}

    study: dict[str, Any] = {"seeds": seeds, "confidence_pct": round(CONFIDENCE * 100),
                             "power_pct": round(POWER * 100), "precisions": {}, "paired": {}}
    for p in precisions:
        study["precisions"][p] = {"n_seeds": sum(p in headlines[s] for s in seeds)}
        for key in METRICS:
            if values(p, key):
                study["precisions"][p][key] = _summary(values(p, key))
    if any("gold" in headlines[s].get("sft", {}) for s in seeds):
        study["sft"] = {"gold": _summary(values("sft", "gold"))}
    if REFERENCE in precisions:
        for p in precisions:
            if p != REFERENCE:
                study["paired"][f"{p}-{REFERENCE}"] = {
                    key: compare(paired_differences(values(REFERENCE, key), values(p, key))) for key in PAIRED_METRICS}
    return _rounded(study)


def numbers_of(obj: Any) -> list[float]:
    """Every number in a JSON-like object (nested dicts and lists included)."""
    if isinstance(obj, dict):
        return [v for x in obj.values() for v in numbers_of(x)]
    if isinstance(obj, list):
        return [v for x in obj for v in numbers_of(x)]
    return [obj] if isinstance(obj, (int, float)) and not isinstance(obj, bool) else []


def markdown(study: dict[str, Any], run_dir: str, baseline: str = "", names: dict[int, str] | None = None) -> str:
    """reports/study.md: every number printed (fmt, fmt_p) from `study` (metrics/study.json)."""
    from tabulate import tabulate

    names = names or {}
    seeds = study["seeds"]
    lines = ["# A study across seeds", ""]
    where = f"Run folder `{run_dir}`" + (f", baseline commit `{baseline[:7]}`" if baseline else "")
    exp_names = ", ".join(f"`{names[s]}`" for s in seeds if s in names)
    lines += [f"{where}; seeds {', '.join(str(s) for s in seeds)}" + (f" (experiments {exp_names})" if exp_names
                                                                        else "") + ".",
              "Each seed is one draw of the whole pipeline, data splits included (`seed` is a param of every stage). "
              "Numbers: `metrics/study.json`; how to read them: `docs/study.md`.", ""]
    lines += ["## Per precision: mean [95 % t-interval] over seeds", ""]
    rows = [[p, str(v["n_seeds"]), *(fmt_interval(v.get(k, {})) for k in METRICS)]
            for p, v in study["precisions"].items()]
    if "sft" in study:
        rows.append(["sft (gold)", str(study["sft"]["gold"]["n"]), fmt_interval(study["sft"]["gold"]),
                     *["-"] * (len(METRICS) - 1)])
    lines += [tabulate(rows, headers=["policy", "seeds", *METRICS], tablefmt="github", disable_numparse=True), ""]
    if study["paired"]:
        lines += [f"## Paired differences against {REFERENCE} (same seed)", ""]
        rows = []
        for comp, per_metric in study["paired"].items():
            for key, st in per_metric.items():
                rows.append([comp.replace("-", " − "), key, str(st["n"]), fmt_interval(st),
                             fmt(st.get("mdd")), f"{st['n_pos']} / {st['n_neg']}",
                             fmt_p(st["sign_p"]) if "sign_p" in st else "-",
                             fmt_p(st["permutation_p"]) if "permutation_p" in st else "-"])
        lines += [tabulate(rows, headers=["comparison", "metric", "seeds", "mean [95 % t-interval]",
                                          "MDD (80 % power)", "seeds + / −", "sign test p", "permutation p"],
                           tablefmt="github", disable_numparse=True), ""]
        lines += ["## Verdicts", ""]
        for comp, per_metric in study["paired"].items():
            for key, st in per_metric.items():
                lines.append(f"- {verdict(comp.split('-')[0], key, st)}")
        lines.append("")
    lines += ["## Per seed", ""]
    rows = []
    for s in seeds:
        for p, v in study["precisions"].items():
            if any(str(s) in v.get(k, {}).get("values", {}) for k in METRICS):
                rows.append([str(s), p, *(fmt(v.get(k, {}).get("values", {}).get(str(s))) for k in CHART_METRICS)])
    lines += [tabulate(rows, headers=["seed", "policy", *CHART_METRICS], tablefmt="github", disable_numparse=True),
              "", "![each seed and the mean with its 95 % t-interval, per precision](study.png)", ""]
    return "\n".join(lines)


def chart(study: dict[str, Any], path: Path) -> None:
    """reports/study.png: per precision each seed's point and the mean with its t-interval, for CHART_METRICS."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    precisions = list(study["precisions"])
    seeds = study["seeds"]
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    fig, axes = plt.subplots(1, len(CHART_METRICS), figsize=(4.5 * len(CHART_METRICS), 4), squeeze=False)
    for ax, key in zip(axes[0], CHART_METRICS, strict=True):
        drawn = False
        for i, p in enumerate(precisions):
            st = study["precisions"][p].get(key)
            if not st:
                continue
            drawn = True
            for j, s in enumerate(seeds):
                if str(s) in st["values"]:
                    offset = (j - (len(seeds) - 1) / 2) * 0.25 / max(1, len(seeds))
                    ax.plot(i - 0.15 + offset, st["values"][str(s)], "o", color=colors[j % len(colors)], alpha=0.8,
                            label=f"seed {s}")
            if "lo" in st:
                ax.errorbar([i + 0.15], [st["mean"]], yerr=[[st["mean"] - st["lo"]], [st["hi"] - st["mean"]]],
                            fmt="D", color="black", capsize=5, label="mean, 95 % t-interval")
            else:
                ax.plot([i + 0.15], [st["mean"]], "D", color="black", label="mean (one seed)")
        ax.set_xticks(range(len(precisions)), precisions)
        ax.set_xlim(-0.6, len(precisions) - 0.4)
        ax.set_title(f"{key} over {len(seeds)} seeds")
        ax.grid(alpha=0.3)
        if key in ("gold_gain", "win_rate") and drawn:
            ax.axhline(0.0 if key == "gold_gain" else 0.5, color="gray", lw=0.8, ls="--")
        if not drawn:
            ax.text(0.5, 0.5, "no values (no gold judge?)", ha="center", va="center", transform=ax.transAxes)
    legend: dict[str, Any] = {}  # one legend for the three panels, below them (seeds keep one colour throughout)
    for ax in axes[0]:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(label, handle)
    if legend:
        fig.legend(list(legend.values()), list(legend), loc="upper center", bbox_to_anchor=(0.5, 0.0),
                   ncol=min(len(legend), 8), fontsize=8, frameon=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")
    fig.savefig(tmp, dpi=110, bbox_inches="tight", metadata={"Software": None})
    os.replace(tmp, path)
    plt.close(fig)


def write_study(run_dir: str | Path, headlines: dict[int, dict[str, dict[str, float]]], baseline: str = "",
                names: dict[int, str] | None = None) -> dict[str, Any]:
    """Aggregate the seeds' headlines and write metrics/study.json, reports/study.md and reports/study.png."""
    root = Path(run_dir)
    study = aggregate(headlines)
    text = markdown(study, str(run_dir), baseline, names)
    bad = unsupported_numbers(text, numbers_of(study))
    if bad:  # a bug here, never a user error: the report would print numbers that are not in study.json
        raise StudyError(f"study.md would contain numbers not in study.json: {sorted(set(bad))}")
    for rel, content in ((STUDY_METRICS, json.dumps(study, indent=2, sort_keys=True) + "\n"), (STUDY_REPORT, text)):
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_text(content)
        os.replace(tmp, path)
    chart(study, root / STUDY_CHART)
    return study


# --------------------------------------------------------------------------- experiments of the run folder


def exp_name(seed: int) -> str:
    """The experiment name of a seed: stable, so a rerun finds it."""
    return f"seed-{seed}"


@dataclass
class SeedStatus:
    """Where one seed stands in the run folder: done / queued / running / failed / missing."""

    seed: int
    state: str
    experiment: exps.Experiment | None = None
    task: str | None = None  # the queue task of a failed experiment (to remove before queueing it again)


def exp_states(rows: list[dict]) -> dict[str, str | None]:
    """Experiment rev -> its queue state in `dvc exp show --json` (success, queued, running, failed or None)."""
    # None: no queue record (a workspace `dvc exp run`, a cleaned queue). A rev with an error is failed; a rev listed
    # twice (a running task's result next to its record) counts as finished when either says so.
    states: dict[str, str | None] = {}
    for row in rows:
        for group in row.get("experiments") or []:
            state = (group.get("executor") or {}).get("state")
            for rev in group.get("revs") or []:
                key = rev.get("rev", "")
                this = FAILED if rev.get("error") else state
                if key not in states or this in (None, "success"):
                    states[key] = this
    return states


def _tasks(rows: list[dict]) -> dict[str, str]:
    """Experiment rev -> the queue task id of its record (for `dvc queue remove`)."""
    out = {}
    for row in rows:
        for group in row.get("experiments") or []:
            task = ((group.get("executor") or {}).get("local") or {}).get("task_id")
            for rev in group.get("revs") or []:
                if task:
                    out[rev.get("rev", "")] = task
    return out


def _other_params(params: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in params.items() if k != "seed"}


def param_changes(params: dict[str, Any], reference: dict[str, Any]) -> list[str]:
    """'key value (workspace: value)' for every param other than seed that differs from the reference."""
    a, b = _other_params(params), _other_params(reference)
    return [f"{k} {a.get(k, '(unset)')} (workspace: {b.get(k, '(unset)')})" for k in sorted(set(a) | set(b))
            if a.get(k) != b.get(k)]


def seed_status(rows: list[dict], seeds: Sequence[int]) -> dict[int, SeedStatus]:
    """Each seed's status among the baseline's experiments in `rows` (`dvc exp show --json`)."""
    # done: an experiment with the workspace's params except seed=S that finished with a metrics/headline.json (a
    # failed one shows the baseline's headline, so the queue state decides); else running, queued or failed as the
    # queue says, or missing. An experiment named seed-S with other params would be mistaken for it: an error.
    parsed = exps.parse_exp_show(rows)
    workspace = next((e for e in parsed if e.name == "workspace"), None)
    reference = workspace.params if workspace else {}
    states, tasks = exp_states(rows), _tasks(rows)
    baselines = {row.get("rev") for row in rows}
    experiments = [e for e in parsed if e.rev not in baselines and e.rev in states]
    out = {}
    for seed in seeds:
        name = exp_name(seed)
        mine = [e for e in experiments if e.params.get("seed") == seed and not param_changes(e.params, reference)]
        for e in experiments:
            if e.name == name and e not in mine and states[e.rev] != FAILED:
                changes = "; ".join(param_changes(e.params, reference)[:3])
                raise StudyError(
                    f"experiment {name} of this baseline ran with other params ({changes}"
                    f"): remove it (dvc exp remove {name}, or dvc queue kill/remove {name} if it is queued) or "
                    "commit the params change (a new baseline starts a new study)")
        done = [e for e in mine if states[e.rev] in (None, "success") and any(p != "sft" for p in e.headline)]
        if done:
            done.sort(key=lambda e: (e.name != name, e.name))
            out[seed] = SeedStatus(seed, DONE, done[0])
            continue
        for state in (RUNNING, QUEUED, FAILED):
            hit = [e for e in mine if states[e.rev] == state] or (
                [e for e in experiments if e.name == name and states[e.rev] == FAILED] if state == FAILED else [])
            if hit:
                out[seed] = SeedStatus(seed, state, hit[0], tasks.get(hit[0].rev) or hit[0].rev)
                break
        else:
            out[seed] = SeedStatus(seed, MISSING)
    return out


def stage_env(run_dir: str | Path) -> dict[str, str]:
    """The queue worker's environment: this venv first on PATH, and the hub off for the offline profile, as `make
    smoke` sets it (threads come from hardware.cpu_threads in every stage)."""
    # model.source tiny + data.source synthetic: nothing to download, so the hub is off
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    try:
        raw = yaml.safe_load((Path(run_dir) / "params.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError):
        raw = {}
    flat = flatten(raw) if isinstance(raw, dict) else {}
    if flat.get("model.source") == "tiny" and flat.get("data.source") == "synthetic":
        env.setdefault("HF_HUB_OFFLINE", "1")
        env.setdefault("HF_DATASETS_OFFLINE", "1")
    return env


class Dvc:
    """The DVC commands of a study, run in the run folder (a fake with the same methods drives the tests)."""

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = Path(run_dir)
        self.env = stage_env(run_dir)
        local = Path(sys.executable).parent / "dvc"
        self.dvc = str(local) if local.exists() else "dvc"

    def _run(self, *args: str) -> str:
        proc = subprocess.run([self.dvc, *args], cwd=self.run_dir, env=self.env, capture_output=True, text=True)
        if proc.returncode != 0:
            last = (proc.stderr.strip().splitlines() or proc.stdout.strip().splitlines() or ["?"])
            raise StudyError(f"`dvc {' '.join(args)}` failed in {self.run_dir}: {' '.join(last[-3:])}")
        return proc.stdout

    def show(self) -> list[dict]:
        """`dvc exp show --json`: the workspace, the baseline and its experiments."""
        return json.loads(self._run("exp", "show", "--json"))

    def baseline(self) -> str:
        """The baseline commit (HEAD of the run folder's git repository)."""
        proc = subprocess.run(["git", "rev-parse", "HEAD"], cwd=self.run_dir, capture_output=True, text=True)
        return proc.stdout.strip() if proc.returncode == 0 else ""

    def queue(self, seed: int) -> None:
        """`dvc exp run --queue -S seed=S --name seed-S`."""
        self._run("exp", "run", "--queue", "-S", f"seed={seed}", "--name", exp_name(seed))

    def remove(self, task: str) -> None:
        """`dvc queue remove TASK` (a failed task's record, so its name is free for the retry)."""
        self._run("queue", "remove", task)

    def start(self, jobs: int) -> None:
        """`dvc queue start -j JOBS` (starts only the workers that are not running already)."""
        # output to a file, not a pipe: the worker it spawns inherits the descriptors, and a pipe would block until
        # the worker exits (when the queue is empty)
        import tempfile

        with tempfile.TemporaryFile("w+") as log:
            proc = subprocess.run([self.dvc, "queue", "start", "-j", str(jobs)], cwd=self.run_dir, env=self.env,
                                  stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
            if proc.returncode != 0:
                log.seek(0)
                last = log.read().strip().splitlines() or ["?"]
                raise StudyError(f"`dvc queue start -j {jobs}` failed in {self.run_dir}: {' '.join(last[-3:])}")


def _logs_hint(run_dir: str | Path, seed: int) -> str:
    where = "" if str(run_dir) in ("", ".") else f"cd {run_dir} && "
    return f"`{where}dvc queue logs {exp_name(seed)}`"


def _seeds(n: int) -> str:
    return f"{n} seed" if n == 1 else f"{n} seeds"


def _duration(seconds: float) -> str:
    m, s = divmod(round(seconds), 60)
    return f"{m} min {s:02d} s" if m else f"{s} s"


def run_seeds(run_dir: str | Path, seeds: Sequence[int], jobs: int = 1, poll_s: float = DEFAULT_POLL_S,
              dvc: Any = None, out: Callable[[str], None] = print,
              sleep: Callable[[float], None] = time.sleep) -> dict[int, exps.Experiment]:
    """Queue the seeds not yet completed, run the queue with `jobs` workers, wait; the completed experiment per seed."""
    # one line per finished seed; a failed one is named with the command to inspect it, then StudyError
    dvc = dvc or Dvc(run_dir)
    seeds = list(dict.fromkeys(seeds))
    status = seed_status(dvc.show(), seeds)
    done = {s: st.experiment for s, st in status.items() if st.state == DONE and st.experiment}
    if done:
        out(f"study: already done, reused: {', '.join(f'seed {s} ({e.name})' for s, e in done.items())}")
    queued = 0
    for s, st in status.items():
        if st.state == FAILED and st.task:
            dvc.remove(st.task)
        if st.state in (FAILED, MISSING):
            dvc.queue(s)
            queued += 1
    pending = [s for s in seeds if s not in done]
    if not pending:
        return done
    waiting = [s for s in pending if status[s].state in (QUEUED, RUNNING)]
    out(f"study: running seeds {' '.join(str(s) for s in pending)} in {run_dir} ({queued} queued now"
        + (f", {len(waiting)} already in the queue" if waiting else "") + f"; {jobs} worker(s); follow them with "
        f"`dvc queue status`)")
    start, failed, unseen = time.monotonic(), [], dict.fromkeys(pending, 0)
    dvc.start(jobs)
    while pending:
        sleep(poll_s)
        status = seed_status(dvc.show(), pending)
        for s in list(pending):
            st = status[s]
            unseen[s] = unseen[s] + 1 if st.state == MISSING else 0
            if st.state == DONE and st.experiment:
                done[s] = st.experiment
                pending.remove(s)
                out(f"study: seed {s} done ({st.experiment.name}; {len(done)} of {_seeds(len(seeds))}, "
                    f"{_duration(time.monotonic() - start)} so far)")
            elif st.state == FAILED or unseen[s] >= MISSING_POLLS:
                failed.append(s)
                pending.remove(s)
                why = "failed" if st.state == FAILED else "left the queue without a result (removed or killed?)"
                out(f"study: seed {s} {why}: see {_logs_hint(run_dir, s)}")
        if pending and not any(status[s].state == RUNNING for s in pending):
            dvc.start(jobs)  # queued tasks and no worker on them (e.g. a worker that stopped): start it again
    if failed:
        raise StudyError(f"{len(failed)} of {_seeds(len(seeds))} failed (seeds {' '.join(str(s) for s in failed)}); "
                         "rerun the study to retry them (completed seeds are reused)")
    return done


def completed(run_dir: str | Path, seeds: Sequence[int], dvc: Any = None) -> dict[int, exps.Experiment]:
    """The completed experiment of each seed that has one (nothing is run)."""
    dvc = dvc or Dvc(run_dir)
    return {s: st.experiment for s, st in seed_status(dvc.show(), seeds).items()
            if st.state == DONE and st.experiment}


def study(run_dir: str | Path = ".", seeds: Sequence[int] = (1, 2, 3), jobs: int = 1, run: bool = True,
          poll_s: float = DEFAULT_POLL_S, dvc: Any = None, out: Callable[[str], None] = print) -> dict[str, Any]:
    """Run (unless `run` is False) and aggregate a study; returns metrics/study.json's content."""
    dvc = dvc or Dvc(run_dir)
    found = run_seeds(run_dir, seeds, jobs, poll_s, dvc, out) if run else completed(run_dir, seeds, dvc)
    if not found:
        raise StudyError(f"no seed of {' '.join(str(s) for s in seeds)} has a completed experiment in {run_dir}")
    missing = [s for s in seeds if s not in found]
    if missing:
        out(f"study: seeds {' '.join(str(s) for s in missing)} have no completed experiment: left out")
    result = write_study(run_dir, {s: e.headline for s, e in sorted(found.items())}, dvc.baseline(),
                         {s: e.name for s, e in found.items()})
    root = Path(run_dir)
    out(f"study: {_seeds(len(found))} -> {root / STUDY_METRICS}, {root / STUDY_REPORT}, {root / STUDY_CHART}")
    return result


def main(argv: list[str] | None = None) -> None:
    """`python -m edgerlhf.study`: run (unless --no-run) and aggregate a study of --dir over --seeds."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default=".", help="the run folder, a DVC project (e.g. .smoke); default: here")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3], help="default: 1 2 3")
    parser.add_argument("--jobs", type=int, default=1, help="queue workers (default 1: one run needs the whole GPU)")
    parser.add_argument("--poll", type=float, default=DEFAULT_POLL_S, help="seconds between queue checks")
    parser.add_argument("--no-run", action="store_true", help="only aggregate the seeds already completed")
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error("--jobs must be >= 1")
    if not args.no_run:
        from edgerlhf.config import load_params

        for s in args.seeds:  # a params error named now (exit 2), before any experiment is queued
            load_params(Path(args.dir) / "params.yaml", {"seed": s})
    try:
        study(args.dir, args.seeds, args.jobs, run=not args.no_run, poll_s=args.poll)
    except KeyboardInterrupt:
        print("\nstudy: interrupted. Queued seeds stay in the DVC queue and a started worker keeps running them "
              "(`dvc queue status`; stop them: `dvc queue stop --kill`); run the study again to wait for them.",
              file=sys.stderr)
        sys.exit(130)
    sys.stdout.flush()


if __name__ == "__main__":
    from edgerlhf.runtime import run_stage

    run_stage("study", main)
