"""The synthetic preference task: deterministic, HH-shaped, ordered by a gold scorer with stated rules."""

import pytest

from edgerlhf import synthetic as S


def test_deterministic_per_seed_and_split():
    a = S.generate_split(50, 7, "rm_train")
    assert a == S.generate_split(50, 7, "rm_train")
    assert a != S.generate_split(50, 8, "rm_train")
    assert a != S.generate_split(50, 7, "rm_test")


def test_records_are_hh_shaped_and_ordered_by_gold():
    for r in S.generate_split(300, 1, "x"):
        assert r["prompt"].startswith("\n\nHuman: ") and r["prompt"].endswith("\n\nAssistant:")
        assert r["chosen"].startswith(" ") and r["rejected"].startswith(" ")
        assert S.gold_score(r["prompt"], r["chosen"]) > S.gold_score(r["prompt"], r["rejected"])


SKY = S.format_prompt("What color is the sky?")


@pytest.mark.parametrize("response, score", [
    (" The sky is blue.", 2.0),
    (" Glad to help! The sky is blue.", 2.5),
    (" Glad to help! The sky is blue. Good question!", 2.5),  # politeness counts once
    (" The sky is green.", -1.0),
    (" The sky is blue. The sky is green.", -1.0),  # hedging between values is wrong
    (" I like trains.", -1.5),
    (" Ugh, fine. The sky is blue.", 0.5),
    (" Glad to help! The sky is blue. The sky is blue.", 2.0),  # one repeated sentence
    ("", -3.0),
])
def test_gold_rules(response, score):
    assert S.gold_score(SKY, response) == pytest.approx(score)


def test_gold_length_penalty_and_opposites():
    long = " The sky is blue." + " very" * 20
    assert S.gold_score(SKY, long) == pytest.approx(2.0 - 0.1 * (24 - 16))
    hot = S.format_prompt("What is the opposite of hot?")
    assert S.gold_score(hot, " The opposite of hot is cold.") == 2.0
    assert S.gold_score(hot, " The opposite of hot is hot.") == -1.0


def test_reward_hacking_room():
    """Repeating a liked phrase can please a learned RM but not the gold scorer."""
    plain = S.gold_score(SKY, " Glad to help! The sky is blue.")
    spam = S.gold_score(SKY, " Glad to help! Glad to help! Glad to help! The sky is blue.")
    assert spam < plain


def test_parse_prompt_rejects_foreign_prompts():
    assert S.parse_prompt(SKY) == ("color", "sky")
    with pytest.raises(ValueError):
        S.parse_prompt("\n\nHuman: What is love?\n\nAssistant:")


def test_phrases_never_use_fact_words():
    """A stock phrase containing a subject/value word (once: 'Happy to help' vs happy/sad) corrupts the labels."""
    fact_words = {w for spec in S.KINDS.values() for kv in spec["facts"].items() for w in kv}
    for phrase in S.POLITE_OPENERS + S.RUDE_OPENERS + S.OFF_TOPIC:
        assert not set(S._WORD.findall(phrase.lower())) & fact_words, phrase
