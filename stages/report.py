"""Stage `report`: reports/summary.md (tabulate tables + a verdict from the numbers) and PNG charts in
reports/charts (gold_vs_kl.png only when there is a gold judge)."""

from pathlib import Path

from edgerlhf import paths
from edgerlhf.config import load_params
from edgerlhf.report import headline, load_run, write_report
from edgerlhf.runtime import log, run_stage, write_json


def main() -> None:
    params = load_params()
    log.info("report for precisions %s, data source %s, labels %s", ",".join(params.reward.precisions),
             params.data.source, params.data.labels)
    # Every metrics file (and the judge stage's judge.json) is read first; each output is then written atomically
    # (a failure keeps the old ones).
    run = load_run(Path("."), params.reward.precisions, params.data.source, params.data.labels)
    numbers = headline(run)
    write_report(run, paths.METRICS, paths.REPORTS)
    write_json(paths.HEADLINE_METRICS, numbers)  # what `dvc exp show` and `dvc metrics diff` compare
    charts = [paths.CHART_EVAL] + ([paths.CHART_GOLD_VS_KL] if run.has_gold else [])
    log.info("wrote %s, %s", paths.SUMMARY, ", ".join(str(c) for c in charts))


if __name__ == "__main__":
    run_stage("report", main)
