"""The built-in synthetic preference task and its gold scorer.

A closed world of simple facts asked in HH-RLHF shape
("\\n\\nHuman: What color is the sky?\\n\\nAssistant:"). A response is an
optional opener and an answer sentence (sometimes repeated). The answer ends the response, so the
decisive tokens sit next to the last token a reward model reads. The gold scorer
states the preference rules, and every chosen/rejected pair is ordered by it:

    answer   +2.0  on topic and correct (names the subject and only the right value)
             -1.0  on topic but wrong (another value of the same kind, or none)
             -1.5  off topic (does not name the subject)
    tone     +0.5  at least one polite phrase (counted once)
             -1.5  any rude phrase
    waste    -0.5  for every repeated sentence
             -0.1  for every word beyond 16
    empty    -3.0  no words at all

It is learnable by a tiny model in minutes (24 facts, short texts), and it
leaves room for reward hacking: a learned reward model that merely likes
polite words or the value vocabulary can be pleased by repetition or
hedging ("blue. green.") that the gold scorer punishes.
"""

from __future__ import annotations

import random
import re

# Each kind: question templates, answer template, and subject -> value facts.
KINDS: dict[str, dict] = {
    "color": {
        "questions": ["What color is the {s}?", "Which color is the {s}?"],
        "answer": "The {s} is {v}.",
        "facts": {"sky": "blue", "grass": "green", "snow": "white", "banana": "yellow",
                  "coal": "black", "cherry": "red", "carrot": "orange", "plum": "purple"},
    },
    "sound": {
        "questions": ["What sound does a {s} make?", "What does a {s} say?"],
        "answer": "A {s} says {v}.",
        "facts": {"dog": "woof", "cat": "meow", "cow": "moo", "duck": "quack",
                  "sheep": "baa", "owl": "hoot", "lion": "roar", "snake": "hiss"},
    },
    "opposite": {
        "questions": ["What is the opposite of {s}?", "What word means the opposite of {s}?"],
        "answer": "The opposite of {s} is {v}.",
        "facts": {"hot": "cold", "big": "small", "up": "down", "fast": "slow",
                  "happy": "sad", "light": "dark", "early": "late", "open": "closed"},
    },
}

POLITE_OPENERS = ["Glad to help!", "Good question!", "Sure thing!"]
RUDE_OPENERS = ["Ugh, fine.", "What a dumb question."]
OFF_TOPIC = ["I like trains.", "It might rain today.", "Let us talk about cars."]

_WORD = re.compile(r"[a-z]+")
# Phrases are matched on the response's lower-cased words joined by single spaces (punctuation ignored).
POLITE_PHRASES = [" ".join(_WORD.findall(p.lower())) for p in POLITE_OPENERS]
RUDE_PHRASES = [" ".join(_WORD.findall(p.lower())) for p in RUDE_OPENERS]

SCORE_CORRECT, SCORE_WRONG, SCORE_OFF_TOPIC = 2.0, -1.0, -1.5
SCORE_POLITE, SCORE_RUDE, SCORE_REPEAT, SCORE_PER_EXTRA_WORD, SCORE_EMPTY = 0.5, -1.5, -0.5, -0.1, -3.0
FREE_WORDS = 16

# Component mix: chosen responses (the max of two draws) stay imperfect, so an
# SFT policy copies some wrong, rude and off-topic answers and PPO has room.
P_ANSWER = {"correct": 0.4, "wrong": 0.35, "off": 0.25}
P_OPENER = {"polite": 0.4, "none": 0.3, "rude": 0.3}
P_REPEAT = 0.1

_QUESTION_RES = [
    (kind, re.compile("^" + re.escape(q).replace(re.escape("{s}"), r"(?P<s>[a-z]+)") + "$"))
    for kind, spec in KINDS.items() for q in spec["questions"]
]


def format_prompt(question: str) -> str:
    """Wrap a question in the HH-RLHF dialogue shape, ending with the Assistant marker."""
    return f"\n\nHuman: {question}\n\nAssistant:"


def parse_prompt(prompt: str) -> tuple[str, str]:
    """Return (kind, subject) of a synthetic prompt; ValueError if it is not one."""
    m = re.search(r"Human: (.*?)\n\nAssistant:\s*$", prompt, flags=re.S)
    if m:
        question = m.group(1).strip()
        for kind, rx in _QUESTION_RES:
            q = rx.match(question)
            if q and q.group("s") in KINDS[kind]["facts"]:
                return kind, q.group("s")
    raise ValueError(f"not a synthetic-task prompt: {prompt!r}")


def _sentences(text: str) -> list[str]:
    return [s.strip().lower() for s in re.split(r"[.!?]+", text) if s.strip()]


def gold_score(prompt: str, response: str) -> float:
    """Score any response to a synthetic prompt by the module's stated rules."""
    kind, subject = parse_prompt(prompt)
    facts = KINDS[kind]["facts"]
    words = _WORD.findall(response.lower())
    if not words:
        return SCORE_EMPTY
    text = " ".join(words)
    # Values this response commits to: every value word of this kind except the subject itself
    # (opposites use one vocabulary for subjects and values).
    vocabulary = (set(facts.values()) | set(facts)) - {subject}
    named = {w for w in words if w in vocabulary}
    if subject not in words:
        score = SCORE_OFF_TOPIC
    elif named == {facts[subject]}:
        score = SCORE_CORRECT
    else:
        score = SCORE_WRONG
    if any(re.search(rf"\b{re.escape(p)}\b", text) for p in POLITE_PHRASES):
        score += SCORE_POLITE
    if any(re.search(rf"\b{re.escape(p)}\b", text) for p in RUDE_PHRASES):
        score += SCORE_RUDE
    sentences = _sentences(response)
    score += SCORE_REPEAT * (len(sentences) - len(set(sentences)))
    score += SCORE_PER_EXTRA_WORD * max(0, len(words) - FREE_WORDS)
    return round(score, 6)


def _pick(rng: random.Random, probs: dict[str, float]) -> str:
    return rng.choices(list(probs), weights=list(probs.values()))[0]


def sample_prompt(rng: random.Random) -> tuple[str, str, str]:
    """Draw (prompt, kind, subject) uniformly over kinds, subjects and question templates."""
    kind = rng.choice(sorted(KINDS))
    spec = KINDS[kind]
    subject = rng.choice(sorted(spec["facts"]))
    question = rng.choice(spec["questions"]).format(s=subject)
    return format_prompt(question), kind, subject


def sample_response(rng: random.Random, kind: str, subject: str) -> str:
    """Draw one response: opener, answer (correct, wrong or off topic), maybe the answer again."""
    spec = KINDS[kind]
    answer_kind = _pick(rng, P_ANSWER)
    if answer_kind == "correct":
        answer = spec["answer"].format(s=subject, v=spec["facts"][subject])
    elif answer_kind == "wrong":
        wrong = sorted(set(spec["facts"].values()) - {spec["facts"][subject], subject})
        answer = spec["answer"].format(s=subject, v=rng.choice(wrong))
    else:
        answer = rng.choice(OFF_TOPIC)
    parts = []
    opener = _pick(rng, P_OPENER)
    if opener != "none":
        parts.append(rng.choice(POLITE_OPENERS if opener == "polite" else RUDE_OPENERS))
    parts.append(answer)
    if rng.random() < P_REPEAT:
        parts.append(answer)
    return " " + " ".join(parts)


def sample_pair(rng: random.Random) -> dict[str, str]:
    """One preference record: two responses with different gold scores, the better one chosen."""
    prompt, kind, subject = sample_prompt(rng)
    while True:
        a, b = sample_response(rng, kind, subject), sample_response(rng, kind, subject)
        sa, sb = gold_score(prompt, a), gold_score(prompt, b)
        if sa != sb:
            chosen, rejected = (a, b) if sa > sb else (b, a)
            return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def generate_split(n: int, seed: int, split: str) -> list[dict[str, str]]:
    """`n` records for `split`, deterministic for (seed, split) and independent across splits."""
    rng = random.Random(f"edgerlhf-synthetic/{seed}/{split}")
    return [sample_pair(rng) for _ in range(n)]


def knowledge_corpus() -> list[str]:
    """Plain statements of every fact ("The sky is blue."): the world knowledge a pretrained LM brings.

    The offline base is pretrained on these plus the training dialogues, as distilgpt2 was pretrained on
    web text that says the sky is blue. Without it a tiny base sees right and wrong answers equally often
    and no reward model on top of it can learn which is correct."""
    return [spec["answer"].format(s=s, v=v) for spec in KINDS.values() for s, v in spec["facts"].items()]
