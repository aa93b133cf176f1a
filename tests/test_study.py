"""A study across seeds (#16): the statistics on hand-computed numbers, the verdict wording, which experiments count
as a completed seed in `dvc exp show --json`, the queue driver against a fake DVC, and the aggregation end to end."""

import json
import math
import statistics
import subprocess

import pytest

from edgerlhf import study as S
from edgerlhf.report import unsupported_numbers
from tests.conftest import ROOT

# t quantiles from a t table: t_{0.975} and t_{0.80} at df = 3, t_{0.975} at df = 2
T975_3, T80_3 = 3.182446305284263, 0.9784723123633045
T975_2 = 4.302652729911275


# --------------------------------------------------------------------------- statistics


def test_t_interval_of_1_2_3_4_by_hand():
    ci = S.t_interval([1, 2, 3, 4])
    sd = math.sqrt(5 / 3)  # squared deviations 2.25 + 0.25 + 0.25 + 2.25 = 5, over n - 1 = 3
    assert ci.n == 4 and ci.mean == 2.5 and ci.sd == pytest.approx(sd)
    assert ci.lo == pytest.approx(2.5 - T975_3 * sd / 2) and ci.lo == pytest.approx(0.445740, abs=1e-6)
    assert ci.hi == pytest.approx(4.554260, abs=1e-6) and ci.half_width == pytest.approx(2.054260, abs=1e-6)
    assert ci.excludes_zero()
    assert not S.t_interval([-1, 1, 2]).excludes_zero()


def test_t_interval_needs_two_values():
    one = S.t_interval([0.3])
    assert (one.n, one.mean, one.sd, one.lo, one.hi, one.half_width) == (1, 0.3, None, None, None, None)
    assert not one.excludes_zero()
    assert S.t_interval([]).mean is None
    same = S.t_interval([0.2, 0.2, 0.2])  # no spread: a zero-width interval
    assert same.lo == pytest.approx(0.2) and same.hi == pytest.approx(0.2)


def test_min_detectable_difference_at_80_percent_power():
    assert S.min_detectable(1.0, 4) == pytest.approx((T975_3 + T80_3) / 2)
    assert S.min_detectable(1.0, 4) == pytest.approx(2.080459, abs=1e-6)
    assert S.min_detectable(None, 1) is None and S.min_detectable(1.0, 1) is None


def test_sign_test_exact_binomial_p_values():
    assert S.sign_test([0.1] * 5) == 0.0625  # 2 · (1/2)^5
    assert S.sign_test([-1, -2, -3, -4, -5]) == 0.0625
    assert S.sign_test([1, 1, 1, 1, -1]) == 0.375  # 2 · (C(5,0) + C(5,1)) / 32
    assert S.sign_test([1, 1, 1]) == 0.25
    assert S.sign_test([1, -1]) == 1.0  # 2 · (1 + 2) / 4, capped
    assert S.sign_test([1, 0, 2]) == 0.5  # zeros dropped: 2 of 2 positive
    assert S.sign_test([0, 0]) == 1.0 and S.sign_test([]) == 1.0


def test_permutation_test_enumerates_every_sign_flip():
    # [1, 2, 3]: the 8 sums ±1 ±2 ±3 are 6 4 2 0 0 -2 -4 -6; |sum| >= 6 twice -> 2/8
    assert S.permutation_test([1, 2, 3]) == 0.25
    # [2, 1, -1]: sums ±2 ±1 ±1 are 4 2 2 0 0 -2 -2 -4; |sum| >= 2 six times -> 6/8
    assert S.permutation_test([2, 1, -1]) == 0.75
    assert S.permutation_test([0.1, 0.2, 0.3]) == 0.25  # the observed sum counts despite float rounding
    assert S.permutation_test([1] * 5) == 0.0625  # only all-plus and all-minus: 2/32
    assert S.permutation_test([1, -1]) == 1.0
    assert S.permutation_test([]) == 1.0


def test_paired_differences_are_by_seed_and_only_for_shared_seeds():
    bf16 = {1: 0.5, 2: 0.25, 3: 1.0}
    int8 = {1: 0.75, 3: 0.5, 4: 2.0}
    assert S.paired_differences(bf16, int8) == {1: 0.25, 3: -0.5}


def test_compare_of_one_seed_has_no_interval():
    one = S.compare({7: 0.1})
    assert one["n"] == 1 and one["mean"] == 0.1 and "lo" not in one and "mdd" not in one
    three = S.compare({1: 0.1, 2: 0.2, 3: 0.3})
    assert three["n_pos"] == 3 and three["sign_p"] == 0.25 and three["permutation_p"] == 0.25
    assert three["min_exact_p"] == 0.25 and three["lo"] < 0 < three["hi"]


# --------------------------------------------------------------------------- verdicts


def test_verdict_makes_no_claim_when_the_interval_covers_zero():
    st = S.compare({1: 0.1, 2: -0.05, 3: 0.2})
    text = S.verdict("int8", "gold_gain", st)
    assert text.startswith("int8 − bf16, gold_gain: the 3 seeds do not separate int8 from bf16")
    assert "covers zero" in text and f"about {S.fmt(st['mdd'])}" in text and "80 % power (MDD)" in text
    assert "higher" not in text and "lower" not in text


def test_verdict_claims_a_difference_only_when_the_interval_excludes_zero():
    st = S.compare({1: -0.3, 2: -0.25, 3: -0.35, 4: -0.3})
    assert st["hi"] < 0
    text = S.verdict("int4", "win_rate", st)
    assert text.startswith("int4 − bf16, win_rate: int4 is lower than bf16: mean difference -0.300 over 4 seeds")
    assert "excludes zero" in text and "cannot go below p = 0.1250" in text
    up = S.verdict("int8", "gold_gain", S.compare({1: 1.0, 2: 2.0, 3: 3.0, 4: 4.0}))
    assert "int8 is higher than bf16" in up


def test_verdict_with_one_seed_or_none_makes_no_claim():
    one = S.verdict("int8", "gold_gain", S.compare({3: 0.4}))
    assert "one seed only (difference 0.400): no interval, so no claim" in one
    none = S.verdict("int8", "gold_gain", S.compare({}))
    assert "no comparison" in none and "higher" not in none and "lower" not in none


# --------------------------------------------------------------------------- dvc exp show --json


BASELINE = "b" * 40


def _data(rev: str, seed: int, headline: dict | None, lr: float = 0.1) -> dict:
    data = {"rev": rev, "params": {"params.yaml": {"data": {"seed": seed, "ppo": {"learning_rate": lr}}}}}
    if headline is not None:
        data["metrics"] = {"metrics/headline.json": {"data": headline}}
    return data


def _group(rev: str, name: str, seed: int, headline: dict | None, state: str | None = "success",
           lr: float = 0.1, error: bool = False) -> dict:
    executor = None if state is None else {"state": state, "name": "dvc-task",
                                           "local": {"task_id": rev, "returncode": 1 if error else 0}}
    return {"name": name, "executor": executor,
            "revs": [{"rev": rev, "name": name, "data": _data(rev, seed, headline, lr),
                      "error": {"msg": "Experiment run failed", "type": ""} if error else None,
                      "experiments": None}]}


def _headline(seed: int) -> dict:
    """Fixed numbers per seed: int8 gains 0.1·seed over bf16, int4 loses a little on win-rate."""
    out = {"sft": {"gold": -1.0 + 0.01 * seed}}
    for i, p in enumerate(("bf16", "int8", "int4")):
        out[p] = {"gold": 0.5 + 0.1 * seed, "gold_gain": 0.3 + 0.05 * seed + (0.1 * seed if p == "int8" else 0.0)
                  - (0.02 * seed * seed if p == "int4" else 0.0),
                  "win_rate": 0.6 - 0.01 * i * seed, "kl": 1.0 + 0.2 * i + 0.03 * seed, "proxy_gain": 0.4 + 0.01 * i,
                  "rm_acc": 0.8 - 0.01 * i + 0.001 * seed}
        if p != "bf16":
            out[p]["rm_agree"] = 0.95 - 0.01 * seed
    return out


def _rows(extra: list[dict] | None = None) -> list[dict]:
    """workspace + baseline with: seeds 1-3 done (one without a queue record), a failed seed 4 carrying the
    baseline's headline (as DVC shows it), a queued seed 5, a running seed 6 with a partial headline, and a seed-2
    experiment with another learning rate (not part of this study)."""
    base = _headline(42)
    groups = [_group("1" * 40, "seed-1", 1, _headline(1)),
              _group("2" * 40, "seed-2", 2, _headline(2), state=None),
              _group("3" * 40, "seed-3", 3, _headline(3)),
              _group("4" * 40, "seed-4", 4, base, state="failed", error=True),
              _group("5" * 40, "seed-5", 5, None, state="queued"),
              _group("6" * 40, "seed-6", 6, base, state="running"),
              _group("9" * 40, "exp-lr", 2, _headline(9), lr=0.05), *(extra or [])]
    return [{"rev": "workspace", "name": None, "data": _data("workspace", 42, base), "error": None,
             "experiments": None},
            {"rev": BASELINE, "name": "main", "data": _data(BASELINE, 42, base), "error": None,
             "experiments": groups}]


def test_seed_status_counts_only_finished_experiments_with_the_workspace_params():
    status = S.seed_status(_rows(), [1, 2, 3, 4, 5, 6, 7, 42])
    assert {s: st.state for s, st in status.items()} == {1: "done", 2: "done", 3: "done", 4: "failed", 5: "queued",
                                                         6: "running", 7: "missing", 42: "missing"}
    assert status[2].experiment.name == "seed-2"  # not exp-lr (other params), nor the baseline or the workspace
    assert status[4].task == "4" * 40 and status[4].experiment.headline  # failed, though DVC shows a headline


def test_an_experiment_named_like_a_seed_with_other_params_stops_the_study():
    rows = _rows([_group("8" * 40, "seed-8", 8, _headline(8), lr=0.05)])
    with pytest.raises(S.StudyError, match=r"seed-8 of this baseline ran with other params \(ppo.learning_rate "
                                           r"0.05 \(workspace: 0.1\)\)"):
        S.seed_status(rows, [8])


class FakeDvc:
    """The Dvc methods over a script of `dvc exp show --json` answers (the last one repeats)."""

    def __init__(self, answers: list[list[dict]]) -> None:
        self.answers, self.calls = answers, []

    def show(self) -> list[dict]:
        return self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]

    def baseline(self) -> str:
        return BASELINE

    def queue(self, seed: int) -> None:
        self.calls.append(("queue", seed))

    def remove(self, task: str) -> None:
        self.calls.append(("remove", task))

    def start(self, jobs: int) -> None:
        self.calls.append(("start", jobs))


def test_run_seeds_queues_what_is_not_done_and_names_a_failure():
    running = _rows([_group("7" * 40, "seed-7", 7, None, state="running")])
    running[1]["experiments"][3] = _group("a" * 40, "seed-4", 4, None, state="queued")  # the retry of seed 4
    finished = _rows([_group("7" * 40, "seed-7", 7, _headline(7))])
    finished[1]["experiments"][3] = _group("a" * 40, "seed-4", 4, _headline(4), state="failed", error=True)
    dvc, lines = FakeDvc([_rows(), running, finished]), []
    with pytest.raises(S.StudyError, match=r"1 of 4 seeds failed \(seeds 4\)") as err:
        S.run_seeds("runs/x", [1, 2, 4, 7], poll_s=0, dvc=dvc, out=lines.append, sleep=lambda s: None)
    assert err.value.exit_code != 0
    assert dvc.calls == [("remove", "4" * 40), ("queue", 4), ("queue", 7), ("start", 1)]
    assert lines[0] == "study: already done, reused: seed 1 (seed-1), seed 2 (seed-2)"
    assert any(line.startswith("study: seed 7 done (seed-7; 3 of 4 seeds") for line in lines)
    assert "study: seed 4 failed: see `cd runs/x && dvc queue logs seed-4`" in lines


def test_run_seeds_reuses_completed_seeds_and_runs_nothing():
    dvc = FakeDvc([_rows()])
    done = S.run_seeds(".", [3, 1], dvc=dvc, out=lambda line: None, sleep=lambda s: None)
    assert sorted(done) == [1, 3] and dvc.calls == []


def test_a_seed_that_leaves_the_queue_without_a_result_fails():
    gone = _rows()
    del gone[1]["experiments"][4]  # seed 5's queued task removed behind the study's back
    dvc, lines = FakeDvc([_rows(), gone]), []
    with pytest.raises(S.StudyError):
        S.run_seeds(".", [5], dvc=dvc, out=lines.append, sleep=lambda s: None)
    assert dvc.calls[0] == ("start", 1)
    assert any("seed 5 left the queue without a result" in line and "`dvc queue logs seed-5`" in line
               for line in lines)


# --------------------------------------------------------------------------- aggregation end to end


def test_study_from_exp_show_json_writes_the_numbers_recomputed_here(tmp_path):
    lines = []
    study = S.study(tmp_path, [1, 2, 3, 4], run=False, dvc=FakeDvc([_rows()]), out=lines.append)
    saved = json.loads((tmp_path / "metrics/study.json").read_text())
    assert saved == study and saved["seeds"] == [1, 2, 3]  # seed 4 failed: left out, and said so
    assert any("seeds 4 have no completed experiment" in line for line in lines)
    assert all(isinstance(v, (int, float)) for v in S.numbers_of(saved)) and not _strings(saved)
    heads = {s: _headline(s) for s in (1, 2, 3)}
    for p in ("bf16", "int8", "int4"):
        for key in ("gold_gain", "win_rate", "kl", "proxy_gain", "rm_acc"):
            vals = [heads[s][p][key] for s in (1, 2, 3)]
            st = saved["precisions"][p][key]
            half = T975_2 * statistics.stdev(vals) / math.sqrt(3)
            assert st["n"] == 3 and st["mean"] == pytest.approx(statistics.mean(vals), abs=1e-6)
            assert st["lo"] == pytest.approx(statistics.mean(vals) - half, abs=1e-5)
    assert "rm_agree" not in saved["precisions"]["bf16"] and saved["precisions"]["int4"]["rm_agree"]["n"] == 3
    assert saved["sft"]["gold"]["mean"] == pytest.approx(-0.98)
    for p in ("int8", "int4"):
        for key in ("gold_gain", "win_rate"):
            diffs = [heads[s][p][key] - heads[s]["bf16"][key] for s in (1, 2, 3)]
            st = saved["paired"][f"{p}-bf16"][key]
            assert st["differences"] == {str(s): pytest.approx(d, abs=1e-6) for s, d in zip((1, 2, 3), diffs)}
            assert st["mean"] == pytest.approx(statistics.mean(diffs), abs=1e-6)
            assert st["sd"] == pytest.approx(statistics.stdev(diffs), abs=1e-6)
    gain8 = saved["paired"]["int8-bf16"]["gold_gain"]  # +0.1, +0.2, +0.3: all positive
    assert gain8["n_pos"] == 3 and gain8["sign_p"] == 0.25 and gain8["permutation_p"] == 0.25
    text = (tmp_path / "reports/study.md").read_text()
    assert unsupported_numbers(text, S.numbers_of(saved)) == []  # every number printed comes from study.json
    assert "`seed-1`, `seed-2`, `seed-3`" in text
    assert any("int8 − bf16" in line and "gold_gain" in line and "0.2500" in line for line in text.splitlines())
    assert f"int8 − bf16, gold_gain: the 3 seeds do not separate int8 from bf16: mean difference " \
           f"{S.fmt(gain8['mean'])}" in text
    assert (tmp_path / "reports/study.png").stat().st_size > 10_000


def _strings(obj) -> list:
    if isinstance(obj, dict):
        return [x for v in obj.values() for x in _strings(v)]
    if isinstance(obj, list):
        return [x for v in obj for x in _strings(v)]
    return [obj] if isinstance(obj, str) else []


def test_one_seed_study_says_no_interval_and_claims_nothing(tmp_path):
    study = S.study(tmp_path, [1], run=False, dvc=FakeDvc([_rows()]), out=lambda line: None)
    assert "lo" not in study["precisions"]["bf16"]["gold_gain"]
    text = (tmp_path / "reports/study.md").read_text()
    assert "(one seed, no interval)" in text and "no interval, so no claim" in text
    assert "excludes zero" not in text and "do not separate" not in text


def test_a_study_without_completed_seeds_is_an_error(tmp_path):
    with pytest.raises(S.StudyError, match="no seed of 7 8 has a completed experiment"):
        S.study(tmp_path, [7, 8], run=False, dvc=FakeDvc([_rows()]))


def test_cli_aggregates_without_running(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(S, "Dvc", lambda run_dir: FakeDvc([_rows()]))
    S.main(["--dir", str(tmp_path), "--seeds", "1", "2", "3", "--no-run"])
    assert "study: 3 seeds ->" in capsys.readouterr().out
    assert json.loads((tmp_path / "metrics/study.json").read_text())["seeds"] == [1, 2, 3]


def test_stage_env_puts_this_venv_first_and_runs_the_offline_profile_offline(tmp_path, monkeypatch):
    for key in ("OMP_NUM_THREADS", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(key, raising=False)
    (tmp_path / "params.yaml").write_text("seed: 1\nhardware: {device: cpu}\nmodel: {source: tiny}\n"
                                          "data: {source: synthetic}\n")
    env = S.stage_env(tmp_path)
    assert env["PATH"].split(":")[0].endswith("bin") and "OMP_NUM_THREADS" not in env  # params set threads
    assert env["HF_HUB_OFFLINE"] == "1" and env["HF_DATASETS_OFFLINE"] == "1"
    (tmp_path / "params.yaml").write_text("seed: 1\nhardware: {device: auto}\nmodel: {source: hub}\n")
    env = S.stage_env(tmp_path)
    assert "OMP_NUM_THREADS" not in env and "HF_HUB_OFFLINE" not in env


def test_make_study_passes_run_dir_seeds_and_args():
    out = subprocess.run(["make", "-n", "study", "RUN_DIR=.smoke", "SEEDS=4 5", "STUDY_ARGS=--jobs 2"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    assert 'python -m edgerlhf.study --dir ".smoke" --seeds 4 5 --jobs 2' in out


def test_two_seeds_that_agree_by_luck_make_no_claim():
    stats = S.compare({1: -0.0625, 2: -0.0626})
    assert stats["lo"] < stats["hi"] < 0  # the interval excludes zero ...
    text = S.verdict("int8", "win_rate", stats)
    assert "no claim" in text and "lower than" not in text  # ... but two seeds are not evidence
