"""The `check` stage (edgerlhf/lengths.py, stages/check.py): shape errors before any training, in one line that
names the keys to fix and the numbers; metrics/lengths.json independent of the length params; the vocabulary
checks on every source."""

import json
import subprocess
import sys
from dataclasses import fields, is_dataclass
from pathlib import Path

import pytest
import yaml

from edgerlhf import data, lengths, modeling, synthetic
from edgerlhf.config import deep_merge, parse_params
from edgerlhf.errors import ArtifactError, ConfigError
from tests.conftest import ROOT, tool_env

SIZES = {"sft_train": 40, "sft_eval": 8, "rm_train": 40, "rm_test": 8, "ppo_prompts": 16, "eval_prompts": 8,
         "judge_train": 0}


def make_params(**override):
    base = yaml.safe_load((ROOT / "params.yaml").read_text())
    smoke = yaml.safe_load((ROOT / "profiles/smoke.yaml").read_text())
    return parse_params(deep_merge(deep_merge(deep_merge(base, smoke), {"data": {"sizes": SIZES}}), override))


def make_splits() -> dict[str, list[dict]]:
    return {n: synthetic.generate_split(SIZES[n], 42, n) for n in lengths.SPLITS}


def make_base(folder: Path, splits: dict, positions: int = 128) -> Path:
    """What `base` leaves for the check: a tokenizer and config.json (the check loads no weights)."""
    from transformers import GPT2Config

    corpus = [r["prompt"] + r[k] for recs in splits.values() for r in recs for k in ("chosen", "rejected")]
    tok = modeling.train_tokenizer(corpus, 300, folder)
    GPT2Config(n_positions=positions, vocab_size=len(tok), n_embd=16, n_layer=1, n_head=2,
               bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id).save_pretrained(folder)
    return folder


def long_prompt(turns: int) -> str:
    turns_text = "".join(f"\n\nHuman: What color is the sky on day {i}?\n\nAssistant: Blue, on day {i}."
                         for i in range(turns))
    return turns_text + "\n\nHuman: And today?\n\nAssistant:"


@pytest.fixture()
def setup(tmp_path):
    splits = make_splits()
    return splits, make_base(tmp_path / "base", splits)


def test_the_smoke_shapes_pass_and_the_statistics_ignore_the_length_params(setup):
    splits, base = setup
    stats = lengths.check(make_params(), base, splits)
    assert stats["model"]["positions"] == 128 and set(lengths.SPLITS) <= set(stats)
    rm = stats["rm_train"]
    assert rm["records"] == 40 and 0 < rm["prompt_tokens_mean"] <= rm["prompt_tokens_max"]
    assert rm["sequence_tokens_max"] <= rm["prompt_tokens_max"] + rm["response_tokens_max"]
    assert rm["unknown_token_fraction"] == 0 and rm["lossy_text_fraction"] == 0 and rm["empty_prompts"] == 0
    assert rm["truncated_at_positions"] == rm["dropped_at_positions"] == 0
    assert all(isinstance(v, (int, float)) for row in stats.values() for v in row.values())  # numbers only
    other = make_params(sft={"max_length": 64}, reward={"max_length": 80}, ppo={"response_length": 40},
                        eval={"max_new_tokens": 30})
    assert lengths.check(other, base, splits) == stats  # so the training stages after it do not rerun


def test_ppo_prompt_too_long_for_the_positions_names_the_keys_and_numbers(setup):
    splits, base = setup
    splits["ppo_prompts"][3] = {**splits["ppo_prompts"][3], "prompt": long_prompt(12)}
    longest = len(modeling.load_tokenizer(base)(long_prompt(12), add_special_tokens=False)["input_ids"])
    assert longest > 128 - 24
    with pytest.raises(ConfigError) as exc:
        lengths.check(make_params(), base, splits)
    msg = str(exc.value)
    assert "\n" not in msg
    assert msg.startswith(f"the longest ppo_prompts prompt ({longest} tokens) + ppo.response_length (24) = "
                          f"{longest + 24} exceeds the model's 128 positions (1 prompts too long): ")
    assert f"lower data.max_prompt_chars (now 1024) to <= {len(long_prompt(12)) - 1}" in msg
    assert f"raise model.tiny.n_positions to >= {longest + 24}" in msg
    if longest < 128:
        assert f"lower ppo.response_length to <= {128 - longest}" in msg
    hub = make_params(model={"source": "hub"})
    assert f"use a model with >= {longest + 24} positions (model.name)" in _problem(hub, base, splits)
    local = make_params(model={"source": "local"})
    assert f"use a model with >= {longest + 24} positions (model.local_path)" in _problem(local, base, splits)


def _problem(params, base, splits) -> str:
    with pytest.raises(ConfigError) as exc:
        lengths.check(params, base, splits)
    return str(exc.value)


def test_eval_prompt_and_max_new_tokens(setup):
    splits, base = setup
    msg = _problem(make_params(eval={"max_new_tokens": 120}), base, splits)
    assert "+ eval.max_new_tokens (120) = " in msg and "lower eval.max_new_tokens to <= " in msg
    assert "ppo.response_length" not in msg  # PPO's 24 new tokens still fit


def test_a_scored_pair_whose_response_cannot_fit_fails(setup):
    splits, base = setup
    tok = modeling.load_tokenizer(base)

    def need_of(text: str) -> int:
        return len(tok(text + tok.eos_token, add_special_tokens=False)["input_ids"])

    long = next(" Blue." * n for n in range(1, 100) if need_of(" Blue." * n) > 96)
    need = need_of(long)
    assert need <= 128  # within the positions: raising reward.max_length is the whole fix
    splits["rm_test"][0] = {**splits["rm_test"][0], "rejected": long}
    msg = _problem(make_params(), base, splits)
    assert msg == (f"1 of 8 rm_test responses are longer than reward.max_length (96 tokens) on their own, the "
                   f"longest {need} tokens with EOS, so no cut of the prompt can keep them and every pair of it is "
                   f"scored: raise reward.max_length to >= {need}")


def test_a_few_long_training_responses_are_dropped_many_fail(setup, caplog):
    splits, base = setup
    long = " Blue." * 40
    splits["sft_train"][0] = {**splits["sft_train"][0], "chosen": long}
    with caplog.at_level("INFO", logger="edgerlhf"):
        lengths.check(make_params(), base, splits)  # 1 of 40: dropped and counted by the stage, not an error
    assert "sft_train: 0 of 40 with the prompt cut from the left to fit sft.max_length=96, 1 dropped" in caplog.text
    for r in splits["sft_train"][:21]:
        r["chosen"] = long
    msg = _problem(make_params(), base, splits)
    assert msg.startswith("21 of 40 sft_train responses are longer than sft.max_length (96 tokens) on their own")
    assert "more than 50% of the split would be dropped: raise sft.max_length to >= " in msg


def test_max_length_beyond_the_positions(setup):
    splits, base = setup
    splits["rm_train"][0] = {**splits["rm_train"][0], "prompt": long_prompt(12)}
    msg = _problem(make_params(reward={"max_length": 512}), base, splits)
    assert msg == ("reward.max_length (512) exceeds the model's 128 positions and 1 rm_train sequences are longer "
                   "than 128 tokens: lower reward.max_length to <= 128")
    # within the positions the same prompt is cut from the left: no error
    lengths.check(make_params(reward={"max_length": 128}), base, splits)


def test_several_problems_in_one_line(setup):
    splits, base = setup
    msg = _problem(make_params(reward={"max_length": 8}, ppo={"response_length": 120}), base, splits)
    assert "\n" not in msg and "ppo.response_length (120)" in msg and "reward.max_length (8 tokens)" in msg


def test_a_tokenizer_that_reads_nothing_fails_for_any_source(setup, tmp_path):
    """A word-level vocabulary that knows none of the words: every prompt encodes to unknown tokens only."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, PreTrainedTokenizerFast

    splits, _ = setup
    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "</s>": 1, "zebra": 2}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    folder = tmp_path / "wordlevel"
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="</s>", pad_token="</s>") \
        .save_pretrained(folder)
    GPT2Config(n_positions=128, vocab_size=3, n_embd=16, n_layer=1, n_head=2).save_pretrained(folder)
    with pytest.raises(ArtifactError) as exc:
        lengths.check(make_params(), folder, splits)
    assert str(exc.value).startswith(f"the tokenizer of models/base encodes {sum(SIZES.values())} prompts to "
                                     "nothing (no tokens, or unknown tokens only; first: sft_train record 0)")
    measured = lengths.measure(modeling.load_tokenizer(folder), {"rm_test": splits["rm_test"]})
    assert measured["rm_test"].unknown_tokens == measured["rm_test"].tokens > 0


def test_unknown_tokens_and_lossy_texts_are_counted(setup, tmp_path):
    """A vocabulary with a few words: the share of unknown tokens and of texts it cannot write back."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    splits, _ = setup
    vocab = {"[UNK]": 0, "</s>": 1, "Human": 2, ":": 3, "Assistant": 4, "What": 5, "?": 6}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="</s>")
    rec = {"prompt": "\n\nHuman: What ?\n\nAssistant:", "chosen": " What ?", "rejected": " zebra ?"}
    (st,) = lengths.measure(fast, {"rm_test": [rec]}).values()
    assert (st.tokens, st.unknown_tokens) == (6 + 2 + 2, 1)  # Human : What ? Assistant :
    assert st.lossy_texts == 1 and st.empty_prompts == [] and st.empty_responses == 0


# --------------------------------------------------------------------------- the stage


def _workspace(tmp_path: Path, **override) -> Path:
    run = tmp_path / "run"
    splits = make_splits()
    for name, records in splits.items():
        data.write_jsonl(run / f"data/prepared/{name}.jsonl", records)
    make_base(run / "models/base", splits)
    raw = deep_merge(yaml.safe_load((ROOT / "params.yaml").read_text()),
                     yaml.safe_load((ROOT / "profiles/smoke.yaml").read_text()))
    (run / "params.yaml").write_text(yaml.safe_dump(deep_merge(deep_merge(raw, {"data": {"sizes": SIZES}}), override)))
    return run


def _check(run: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "stages/check.py")], cwd=run, capture_output=True, text=True,
                          env=tool_env(), timeout=120)


@pytest.mark.extra  # a stage subprocess (~8 s): `make test-extra`
def test_stage_fails_before_training_in_one_line_and_keeps_its_previous_output(tmp_path):
    run = _workspace(tmp_path)
    ok = _check(run)
    assert ok.returncode == 0, ok.stderr
    out = run / "metrics/lengths.json"
    before = out.read_bytes()
    assert json.loads(before)["ppo_prompts"]["records"] == SIZES["ppo_prompts"]
    prompts = data.read_split(run / "data/prepared/ppo_prompts.jsonl")
    prompts[5]["prompt"] = long_prompt(12)
    data.write_jsonl(run / "data/prepared/ppo_prompts.jsonl", prompts)
    bad = _check(run)
    assert bad.returncode == 2
    last = bad.stderr.strip().splitlines()[-1]
    assert last.startswith("error [check]: the longest ppo_prompts prompt (") and "Traceback" not in bad.stderr
    assert "data.max_prompt_chars" in last and "model.tiny.n_positions" in last
    assert out.read_bytes() == before  # the previous output untouched
    assert sorted(p.name for p in run.iterdir()) == ["data", "metrics", "models", "params.yaml"]
    assert sorted(p.name for p in (run / "models").iterdir()) == ["base"]  # nothing trained


# --------------------------------------------------------------------------- dvc.yaml


class Recorder:
    """Params that note every key read (for the `params:` of the check stage)."""

    def __init__(self, obj, prefix: str, seen: set):
        self._obj, self._prefix, self._seen = obj, prefix, seen

    def __getattr__(self, name):
        value = getattr(self._obj, name)
        key = self._prefix + name
        if is_dataclass(value):
            return Recorder(value, key + ".", self._seen)
        self._seen.add(key)
        return value


def test_check_stage_params_are_exactly_the_keys_it_reads(setup):
    splits, base = setup
    seen: set[str] = set()
    for params, bad in ((make_params(), False), (make_params(ppo={"response_length": 127}), True),
                        (make_params(model={"source": "hub"}, reward={"max_length": 8}), True)):
        rec = Recorder(params, "", seen)
        data_sizes = rec.data.sizes
        [getattr(data_sizes, f.name) for f in fields(params.data.sizes) if f.name in lengths.SPLITS]
        try:
            lengths.check(rec, base, splits)
        except ConfigError:
            assert bad
    listed = set(yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["check"]["params"])
    covered = {k for k in seen if not any(k.startswith(p + ".") for p in listed)}
    assert covered <= listed, f"dvc.yaml stage check: add to params: {sorted(covered - listed)}"
    unread = {p for p in listed if p not in seen and not any(k.startswith(p + ".") for k in seen)}
    assert not unread, f"dvc.yaml stage check: remove from params (never read): {sorted(unread)}"


def test_training_stages_wait_for_the_check():
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    for name in ("sft", "reward"):
        assert "metrics/lengths.json" in stages[name]["deps"], f"dvc.yaml stage {name}: add metrics/lengths.json"
    assert stages["check"]["outs"] == [{"metrics/lengths.json": {"cache": False}}]
