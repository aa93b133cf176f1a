"""Stage `report`: reports/summary.md (tabulate tables + a verdict from the numbers) and PNG charts."""

from pathlib import Path

from edgerlhf import paths
from edgerlhf.config import load_params
from edgerlhf.report import load_run, write_report
from edgerlhf.runtime import log, run_stage


def main() -> None:
    params = load_params()
    log.info("report for precisions %s, data source %s", ",".join(params.reward.precisions), params.data.source)
    # Every metrics file is read first; each output is then written atomically (a failure keeps the old ones).
    run = load_run(Path("."), params.reward.precisions, params.data.source, params.eval.judge)
    write_report(run, paths.METRICS, paths.REPORTS)
    log.info("wrote %s, %s, %s", paths.SUMMARY, paths.CHART_GOLD_VS_KL, paths.CHART_EVAL)


if __name__ == "__main__":
    run_stage("report", main)
