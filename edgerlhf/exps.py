"""The headline numbers of runs and experiments, as tables (`make metrics`, `make exps`, the end of `make smoke`).

`python -m edgerlhf.exps metrics [--dir D]`: the workspace's metrics/headline.json, one row per precision.
`python -m edgerlhf.exps show [--dir D]`: every DVC experiment of D (`dvc exp show --json`), one row per experiment
and precision, with the params that differ between them first. Both read only what DVC and the report stage wrote.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgerlhf import paths
from edgerlhf.config import PRECISIONS, flatten
from edgerlhf.errors import ArtifactError, EdgeRLHFError
from edgerlhf.report import HEADLINE_KEYS

COLUMNS = tuple(name for name, _, _ in HEADLINE_KEYS)


@dataclass
class Experiment:
    """One row of `dvc exp show --json`: its name, the params (flattened keys) and metrics/headline.json."""

    name: str
    rev: str
    params: dict[str, Any]
    headline: dict[str, dict[str, float]]


def _experiment(entry: dict, name: str) -> Experiment:
    data = entry.get("data") or {}
    params = flatten(((data.get("params") or {}).get("params.yaml") or {}).get("data") or {})
    headline = ((data.get("metrics") or {}).get(str(paths.HEADLINE_METRICS)) or {}).get("data") or {}
    return Experiment(name=name, rev=entry.get("rev", ""), params=params, headline=headline)


def parse_exp_show(rows: list[dict]) -> list[Experiment]:
    """The workspace, each baseline commit and its experiments from `dvc exp show --json` (DVC 3 layout)."""
    out = []
    for row in rows:
        out.append(_experiment(row, "workspace" if row.get("rev") == "workspace" else row.get("name") or
                               row.get("rev", "")[:7]))
        for group in row.get("experiments") or []:
            for rev in group.get("revs") or []:
                out.append(_experiment(rev, rev.get("name") or rev.get("rev", "")[:7]))
    return out


def experiments(run_dir: str | Path = ".") -> list[Experiment]:
    """Every experiment of the DVC project at `run_dir`, from `dvc exp show --json`."""
    proc = subprocess.run(["dvc", "exp", "show", "--json"], cwd=run_dir, capture_output=True, text=True)
    if proc.returncode != 0:
        raise EdgeRLHFError(f"`dvc exp show` failed in {run_dir}: {(proc.stderr.strip().splitlines() or ['?'])[-1]}")
    return parse_exp_show(json.loads(proc.stdout))


def _fmt(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, float) else "-" if value is None else str(value)


def headline_rows(headline: dict[str, dict[str, float]]) -> list[list[str]]:
    """[precision, gold, gold_gain, …] per precision, SFT's gold first when there is one."""
    rows = []
    if "sft" in headline:
        rows.append(["sft", _fmt(headline["sft"].get("gold"))] + ["-"] * (len(COLUMNS) - 1))
    # the precisions in the table's order (bf16, int8, int4), whatever order the JSON keys came in
    order = {p: i for i, p in enumerate(PRECISIONS)}
    for p in sorted((p for p in headline if p != "sft"), key=lambda p: (order.get(p, len(order)), p)):
        rows.append([p] + [_fmt(headline[p].get(c)) for c in COLUMNS])
    return rows


def headline_table(headline: dict[str, dict[str, float]]) -> str:
    """metrics/headline.json as a table, one row per precision."""
    from tabulate import tabulate

    return tabulate(headline_rows(headline), headers=["policy", *COLUMNS], tablefmt="github", disable_numparse=True)


def experiments_table(exps: list[Experiment]) -> str:
    """One row per experiment and precision: the params that differ between the experiments, then the headline."""
    from tabulate import tabulate

    keys = sorted({k for e in exps for k in e.params})
    varying = [k for k in keys if len({json.dumps(e.params.get(k), sort_keys=True) for e in exps}) > 1]
    rows = []
    for e in exps:
        for row in headline_rows(e.headline) or [["-"] + ["-"] * len(COLUMNS)]:
            rows.append([e.name, *(_fmt(e.params.get(k)) for k in varying), *row])
    return tabulate(rows, headers=["experiment", *varying, "policy", *COLUMNS], tablefmt="github",
                    disable_numparse=True)


def read_headline(run_dir: str | Path = ".") -> dict[str, dict[str, float]]:
    """metrics/headline.json of the run at `run_dir`."""
    path = Path(run_dir) / paths.HEADLINE_METRICS
    if not path.is_file():
        raise ArtifactError(f"{path} is missing: run the pipeline there first (`dvc repro` or `make smoke`)")
    return json.loads(path.read_text())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["metrics", "show"], help="metrics: this run | show: every experiment")
    parser.add_argument("--dir", default=".", help="the DVC project (e.g. .smoke); default: here")
    args = parser.parse_args(argv)
    if args.what == "metrics":
        print(f"Headline numbers of {args.dir} ({paths.HEADLINE_METRICS}; details: {paths.METRICS}/, "
              "reports/summary.md):")
        print(headline_table(read_headline(args.dir)))
    else:
        print(experiments_table(experiments(args.dir)))
    sys.stdout.flush()


if __name__ == "__main__":
    from edgerlhf.runtime import run_stage

    run_stage("exps", main)
