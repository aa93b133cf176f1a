"""Stage `check`: the prepared splits against the base model's tokenizer and positions and the length params,
before any training (edgerlhf/lengths.py); writes metrics/lengths.json, or fails with one line and writes nothing."""

from edgerlhf import data, lengths, paths
from edgerlhf.config import load_params
from edgerlhf.runtime import run_stage, write_json


def main() -> None:
    params = load_params()
    splits = data.read_splits(params.data.sizes, *lengths.SPLITS)
    stats = lengths.check(params, paths.BASE, splits)
    write_json(paths.LENGTHS_METRICS, stats)


if __name__ == "__main__":
    run_stage("check", main)
