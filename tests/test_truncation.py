"""Truncation that keeps the answer (edgerlhf/truncation.py) and where it is used: SFT examples, reward-model
training pairs and rm_test scoring see the same tokens; the prompt is cut from the left, a response never; ties
and pairs identical after truncation are reported."""

import json
import random

import pytest
import torch

from edgerlhf import modeling, truncation
from edgerlhf.truncation import Encoded

EOS = "<|endoftext|>"


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    """A byte-level BPE like the tiny base's, trained on HH-shaped text (no download)."""
    texts = [f"\n\nHuman: tell me about item {i} please\n\nAssistant: Item {i} is a thing." for i in range(200)]
    folder = tmp_path_factory.mktemp("tok")
    modeling.train_tokenizer(texts, 320, folder)
    return modeling.load_tokenizer(folder)  # as the stages load it


def _turns(n: int) -> str:
    return "".join(f"\n\nHuman: question number {i} about the weather\n\nAssistant: answer {i}." for i in range(n)) \
        + "\n\nHuman: and the last one?\n\nAssistant:"


# --------------------------------------------------------------------------- the rule, on hand-made tokens


def test_short_enough_is_left_alone():
    e = Encoded(head=(), prompt=(1, 2, 3), responses=((7, 8, 0),))
    f = e.fit(10)
    assert f.ids == ([1, 2, 3, 7, 8, 0],) and f.cut == 0 and f.prompt_tokens == 3


def test_prompt_is_cut_from_the_left_and_the_response_kept_whole():
    e = Encoded(head=(), prompt=tuple(range(1, 11)), responses=((20, 21, 22),))
    f = e.fit(8)
    assert f.ids == ([6, 7, 8, 9, 10, 20, 21, 22],)  # the END of the dialogue stays, next to the response
    assert f.cut == 5 and f.prompt_tokens == 5


def test_leading_special_tokens_stay_in_front():
    e = Encoded(head=(99,), prompt=(1, 2, 3, 4, 5), responses=((20, 21, 0),))
    f = e.fit(6)
    assert f.ids == ([99, 4, 5, 20, 21, 0],) and f.prompt_tokens == 3 and f.cut == 3


def test_a_response_longer_than_the_budget_on_its_own_is_dropped():
    e = Encoded(head=(99,), prompt=(1, 2), responses=((20, 21, 22, 0),))
    assert e.fit(5).ids == ([99, 20, 21, 22, 0],)  # the whole prompt cut away, the response whole
    assert e.fit(4) is None  # head + response = 5 > 4: no cut of the prompt can keep the response


def test_both_sides_of_a_pair_keep_the_same_prompt_tail():
    e = Encoded(head=(), prompt=tuple(range(1, 11)), responses=((20, 0), (30, 31, 32, 33, 0)))
    f = e.fit(8)  # room for the prompt: 8 - 5 (the longer response) = 3
    assert f.ids == ([8, 9, 10, 20, 0], [8, 9, 10, 30, 31, 32, 33, 0]) and f.cut == 7
    assert not f.identical
    assert Encoded(head=(), prompt=(1, 2), responses=((5, 0), (5, 0))).fit(8).identical


def test_random_cases_keep_every_invariant():
    rng = random.Random(0)
    for _ in range(500):
        head = tuple(rng.randrange(90, 99) for _ in range(rng.randrange(2)))
        prompt = tuple(rng.randrange(1, 50) for _ in range(rng.randrange(0, 30)))
        responses = tuple(tuple(rng.randrange(50, 80) for _ in range(rng.randrange(1, 15))) for _ in range(2))
        e = Encoded(head, prompt, responses)
        max_length = rng.randrange(1, 50)
        f = e.fit(max_length)
        if len(head) + max(len(r) for r in responses) > max_length:
            assert f is None
            continue
        for ids, r in zip(f.ids, responses):
            assert len(ids) <= max_length
            assert tuple(ids[:len(head)]) == head  # special tokens in front
            assert tuple(ids[len(ids) - len(r):]) == r  # the whole response, at the end
            kept = tuple(ids[len(head):len(ids) - len(r)])
            assert kept == prompt[len(prompt) - len(kept):]  # a suffix of the prompt
        assert f.cut == len(prompt) - (f.prompt_tokens - len(head))
        # as much prompt as fits: either all of it, or the longer sequence fills the budget exactly
        assert f.cut == 0 or max(len(x) for x in f.ids) == max_length


def test_fit_all_counts():
    encoded = [Encoded((), (1, 2, 3, 4), ((5, 0),)), Encoded((), (1,), ((5, 0),)),
               Encoded((), (1,), ((5, 6, 7, 8, 9, 0),)), Encoded((), (1,), ((5, 0), (5, 0)))]
    fits, counts = truncation.fit_all(encoded, 4)
    assert fits[2] is None and fits[0].ids == ([3, 4, 5, 0],)
    assert (counts.records, counts.truncated, counts.dropped_too_long, counts.identical) == (4, 1, 1, 1)


# --------------------------------------------------------------------------- on a real tokenizer


def test_encode_is_what_trl_tokenizes_and_truncation_keeps_the_end_of_the_dialogue(tokenizer):
    prompt, response = _turns(6), " The sun is out all day."
    (e,) = truncation.encode(tokenizer, [prompt], [[response]])
    full = tokenizer(prompt + response + EOS)["input_ids"]
    assert list(e.head + e.prompt) + list(e.responses[0]) == full  # untruncated: exactly tokenizer(text + EOS)
    assert tokenizer.decode(list(e.responses[0])) == response + EOS
    budget = len(e.responses[0]) + 30
    f = e.fit(budget)
    assert len(f.ids[0]) == budget and f.cut == len(e.prompt) - 30 > 0
    text = tokenizer.decode(f.ids[0])
    assert text.endswith("\n\nHuman: and the last one?\n\nAssistant:" + response + EOS)
    assert prompt.endswith(text[:-len(response + EOS)])  # what is left of the prompt is its end
    assert truncation.encode(tokenizer, [prompt], [[response]])[0].fit(len(e.responses[0]) - 1) is None


def test_reward_pairs_and_sft_examples_use_the_same_tokens(tokenizer):
    from edgerlhf.reward import fit_pairs
    from edgerlhf.sft import sft_examples

    records = [{"prompt": _turns(n), "chosen": " Sunny and warm.", "rejected": " I do not know, maybe rain."}
               for n in (0, 3, 8)]
    fits, counts = fit_pairs(tokenizer, records, 60)
    rows, sft_counts = sft_examples(tokenizer, records, 60)
    assert counts.truncated == sft_counts.truncated >= 1 and counts.dropped_too_long == 0
    for f, row in zip(fits, rows):
        # SFT fits one response, the RM the longer of two: the chosen side ends the same way in both
        assert tokenizer.decode(row["input_ids"]).endswith("Assistant: Sunny and warm." + EOS)
        assert tokenizer.decode(f.ids[0]).endswith("Assistant: Sunny and warm." + EOS)
        assert tokenizer.decode(f.ids[1]).endswith("Assistant: I do not know, maybe rain." + EOS)
        assert len(f.ids[0]) <= 60 and len(f.ids[1]) <= 60 and len(row["input_ids"]) <= 60
        mask = row["completion_mask"]
        assert len(mask) == len(row["input_ids"]) and mask == sorted(mask)  # 0 ... 0 1 ... 1
        completion = [t for t, m in zip(row["input_ids"], mask) if m]
        assert tokenizer.decode(completion) == " Sunny and warm." + EOS
    fits, counts = fit_pairs(tokenizer, records, 8)  # " I do not know, maybe rain." + EOS is longer than 8
    assert fits == [None] * 3 and counts.dropped_too_long == 3


def test_trl_trainers_take_the_token_ids_as_they_are(tokenizer, tmp_path):
    """SFTTrainer / RewardTrainer skip their own tokenization and truncation for these rows (the answer stays)."""
    from datasets import Dataset
    from transformers import GPT2Config, GPT2ForSequenceClassification, GPT2LMHeadModel
    from trl import RewardConfig, RewardTrainer, SFTConfig, SFTTrainer

    from edgerlhf.reward import fit_pairs
    from edgerlhf.sft import sft_examples

    records = [{"prompt": _turns(n), "chosen": " Sunny and warm.", "rejected": " Rain."} for n in (1, 9)]
    config = dict(vocab_size=len(tokenizer), n_positions=128, n_embd=16, n_layer=1, n_head=2,
                  pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    common = dict(output_dir=str(tmp_path), report_to=[], use_cpu=True, max_length=40)
    rows, _ = sft_examples(tokenizer, records, 40)
    sft = SFTTrainer(model=GPT2LMHeadModel(GPT2Config(**config)), args=SFTConfig(**common, completion_only_loss=True),
                     processing_class=tokenizer, train_dataset=Dataset.from_list(rows))
    for row, prepared in zip(rows, sft.train_dataset):
        assert prepared["input_ids"] == row["input_ids"]
        assert [t for t, lab in zip(row["input_ids"], prepared["labels"]) if lab != -100] == \
            [t for t, m in zip(row["input_ids"], row["completion_mask"]) if m]
    fits, _ = fit_pairs(tokenizer, records, 40)
    pairs = [{"chosen_ids": f.ids[0], "rejected_ids": f.ids[1]} for f in fits]
    rm = RewardTrainer(model=GPT2ForSequenceClassification(GPT2Config(**config, num_labels=1)),
                       args=RewardConfig(**common), processing_class=tokenizer, train_dataset=Dataset.from_list(pairs))
    assert [(p["chosen_ids"], p["rejected_ids"]) for p in rm.train_dataset] == \
        [(p["chosen_ids"], p["rejected_ids"]) for p in pairs]


def test_scoring_sees_the_trained_tokens_and_refuses_a_pair_it_cannot_keep(tokenizer):
    from transformers import GPT2Config, GPT2ForSequenceClassification

    from edgerlhf.errors import DataError
    from edgerlhf.reward import fit_pairs, score_pairs, score_sequences

    torch.manual_seed(0)
    model = GPT2ForSequenceClassification(GPT2Config(vocab_size=len(tokenizer), n_positions=64, n_embd=16,
                                                     n_layer=1, n_head=2, num_labels=1,
                                                     pad_token_id=tokenizer.pad_token_id))
    dev = modeling.Device("cpu", torch.float32, "cpu")
    records = [{"prompt": _turns(n), "chosen": " Sunny.", "rejected": " Cold rain all day long."} for n in (0, 5)]
    chosen, rejected = score_pairs(model, tokenizer, records, 2, 40, dev)
    fits, _ = fit_pairs(tokenizer, records, 40)
    one_by_one = [score_sequences(model, tokenizer, [ids], 1, dev)[0] for f in fits for ids in f.ids]
    assert chosen + rejected == pytest.approx(one_by_one[0::2] + one_by_one[1::2], abs=1e-5)
    # the long dialogue was cut on the left: the sequence scored is the end of it, the response whole
    assert tokenizer.decode(fits[1].ids[0]).endswith("Assistant: Sunny." + EOS) and fits[1].cut > 0
    with pytest.raises(DataError, match=r"longer than reward.max_length=5 tokens on its own"):
        score_pairs(model, tokenizer, records, 2, 5, dev)


# --------------------------------------------------------------------------- reported, not hidden


def test_summary_reports_ties_and_identical_pairs(tmp_path):
    from edgerlhf import report as R
    from tests.test_evaluation import _fake_run

    run = _fake_run(tmp_path)
    path = tmp_path / "metrics/reward/int8.json"
    m = json.loads(path.read_text())
    m.update(accuracy=0.22, accuracy_decided=0.58, tie_fraction=0.62, identical_after_truncation=62,
             test_pairs=100, train_truncated=288, test_truncated=97, train_dropped_too_long=3,
             train_identical_after_truncation=5)
    path.write_text(json.dumps(m))
    run = R.load_run(tmp_path, ["bf16", "int8"], "synthetic", "human")
    text = R.write_report(run, tmp_path / "metrics", tmp_path / "reports")
    assert R.unsupported_numbers(text, R.metric_values(tmp_path / "metrics")) == []
    verdict = text.split("## Verdict")[1].split("##")[0]
    assert "**Data problem at int8:** 62 of 100 rm_test pairs are the same tokens" in verdict
    assert "int8: a share of 0.620 of rm_test pairs tie" in text and "accuracy over decided pairs is 0.580" in text
    assert "288 rm_train and 97 rm_test pairs" in text and "3 were dropped" in text
    assert "accuracy (decided pairs)" in R.reward_table(run) and "0.580" in R.reward_table(run)
    assert "Data problem at bf16" not in text and "bf16: a share" not in text  # nothing to say when zero
