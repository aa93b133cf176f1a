"""The headline numbers (#15): report.headline from the metrics files, the tables of `make metrics` / `make exps`
and the parsing of `dvc exp show --json`."""

from edgerlhf import exps
from edgerlhf import report as R
from tests.test_evaluation import _fake_run


def test_headline_holds_the_run_numbers_per_precision(tmp_path):
    _fake_run(tmp_path, gold=True)
    run = R.load_run(tmp_path, ["bf16", "int8"], "synthetic", "human")
    head = R.headline(run)
    assert head["sft"] == {"gold": round(run.eval["sft"]["gold_reward"], 4)}
    for p in ("bf16", "int8"):
        ev = run.eval[f"ppo_{p}"]
        assert head[p]["gold_gain"] == round(ev["gold_gain_vs_sft"], 4)
        assert head[p]["win_rate"] == round(ev["win_rate_vs_sft"], 4)
        assert head[p]["kl"] == round(ev["kl_to_sft"], 4)
        assert head[p]["rm_acc"] == round(run.reward[p]["accuracy"], 4)
    assert "rm_agree" not in head["bf16"]  # bf16 is the reference of the agreement
    assert head["int8"]["rm_agree"] == round(run.eval["rm_int8"]["choice_agreement_vs_bf16"], 4)


def test_headline_without_gold_has_no_gold_keys(tmp_path):
    _fake_run(tmp_path, gold=False)
    head = R.headline(R.load_run(tmp_path, ["bf16", "int8"], "synthetic", "human"))
    assert "sft" not in head and all("gold" not in v and "win_rate" not in v for v in head.values())
    assert all("kl" in head[p] and "rm_acc" in head[p] for p in ("bf16", "int8"))


def _row(rev: str, name: str | None, kl_coef: float, gain: float, experiments=None) -> dict:
    data = {"rev": rev, "params": {"params.yaml": {"data": {"seed": 42, "ppo": {"init_kl_coef": kl_coef}}}},
            "metrics": {"metrics/headline.json": {"data": {"bf16": {"gold_gain": gain, "kl": 1.5}}}}}
    return {"rev": rev, "name": name, "data": data, "error": None, "experiments": experiments}


def test_exp_show_json_parses_into_experiments_and_a_table_of_what_differs():
    exp = _row("d" * 40, "exp-1a2b3", 0.05, 0.25)
    rows = [_row("workspace", None, 0.05, 0.25),
            _row("a" * 40, "main", 0.1, -0.125, [{"revs": [exp], "name": "exp-1a2b3", "executor": None}])]
    parsed = exps.parse_exp_show(rows)
    assert [e.name for e in parsed] == ["workspace", "main", "exp-1a2b3"]
    assert parsed[2].params["ppo.init_kl_coef"] == 0.05 and parsed[1].headline["bf16"]["gold_gain"] == -0.125
    table = exps.experiments_table(parsed)
    header = table.splitlines()[0]
    assert "ppo.init_kl_coef" in header and "seed" not in header  # only the params that differ
    assert "gold_gain" in header
    assert any("exp-1a2b3" in line and "0.050" in line and "0.250" in line for line in table.splitlines())
    assert max(len(line) for line in table.splitlines()) <= 160
