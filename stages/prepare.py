"""Stage `prepare`: build the disjoint splits as JSONL {prompt, chosen, rejected} and metrics/data.json."""

from edgerlhf import data, paths
from edgerlhf.config import load_params
from edgerlhf.runtime import atomic_dir, log, run_stage, write_json


def main() -> None:
    params = load_params()
    log.info("source %s, seed %d", params.data.source, params.seed)
    # Every input row is read and checked first; data/prepared is built in a temporary folder that replaces the
    # previous one only when every file is written (a bad input leaves the previous splits untouched).
    splits, counts = data.build_splits(params.data, params.seed)
    corpus = data.pretraining_corpus(params.data.source, splits, params.data.knowledge_repeats)
    with atomic_dir(paths.DATA) as out:
        for name, records in splits.items():
            data.write_jsonl(out / paths.split_file(name).name, records)
            log.info("%-13s %6d records -> %s", name, len(records), paths.split_file(name))
        data.write_jsonl(out / paths.CORPUS.name, [{"text": t} for t in corpus])
        log.info("corpus        %6d texts   -> %s (tokenizer + pretraining of an offline base)", len(corpus),
                 paths.CORPUS)
    write_json(paths.METRICS / "data.json", {**counts, **data.split_stats(splits), "corpus_count": len(corpus)})


if __name__ == "__main__":
    run_stage("prepare", main)
