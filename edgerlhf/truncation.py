"""Prompt + response -> the token sequence a model trains on or is scored on, within a length budget, keeping the
whole response.

One rule for every place a prompt and its response(s) become tokens: the SFT examples (`sft.max_length`), the
reward model's training pairs and its rm_test scoring (`reward.max_length`), and the counts of the `check`
stage. Training and scoring therefore see the same tokens.

- A sequence is ``tokenizer(prompt + response + EOS)`` (EOS appended as text unless the response ends with it),
  exactly what TRL's SFTTrainer / RewardTrainer build from text. The response part starts where that sequence
  stops matching ``tokenizer(prompt)`` (TRL's `common_prefix_length`), so a token merged across the boundary
  belongs to the response and is kept.
- Too long: the prompt is cut from the LEFT (the end of the dialogue, the last "\\n\\nAssistant:" included, is
  kept); tokens the tokenizer puts before any text (a BOS) stay in front. The responses of one prompt (chosen and
  rejected) keep the same prompt tail, so a reward model never sees a length cue in the prompt.
- When a response (with EOS and the leading special tokens) is longer than the budget on its own, no cut of the
  prompt can keep it: the record is dropped (`fit` returns None) and the caller counts it. A response is never cut.

The stages hand these token ids to TRL (`input_ids` + `completion_mask`, `chosen_ids` / `rejected_ids`), which
then skips its own tokenization, and its max_length filter/truncation finds nothing to do.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


def common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading tokens `a` and `b` share."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def with_eos(response: str, eos: str | None) -> str:
    """The response text as trained and scored: EOS appended unless it is already there (as TRL does)."""
    return response if not eos or response.endswith(eos) else response + eos


@dataclass(frozen=True)
class Fit:
    """Token sequences within a budget: one per response, each = head + the same prompt tail + the response."""

    ids: tuple[list[int], ...]
    prompt_tokens: int  # tokens before the response part in each sequence (head + prompt tail)
    cut: int  # prompt tokens removed from the left (0: the whole prompt is there)

    @property
    def identical(self) -> bool:
        """Whether two responses became the same token sequence (no preference left to learn or measure)."""
        return len({tuple(x) for x in self.ids}) < len(self.ids)


@dataclass(frozen=True)
class Encoded:
    """A prompt and its responses as tokens, before any budget: `head` (special tokens the tokenizer puts before
    any text), the prompt after it, and each response with its EOS."""

    head: tuple[int, ...]
    prompt: tuple[int, ...]
    responses: tuple[tuple[int, ...], ...]

    @property
    def prompt_length(self) -> int:
        return len(self.head) + len(self.prompt)

    @property
    def longest_response(self) -> int:
        return max(len(r) for r in self.responses)

    @property
    def length(self) -> int:
        """The longest full sequence: head + prompt + the longest response."""
        return self.prompt_length + self.longest_response

    def fit(self, max_length: int) -> Fit | None:
        """The sequences within `max_length` tokens, the prompt cut from the left as needed; None when a response
        (with the head) does not fit on its own."""
        room = max_length - len(self.head) - self.longest_response
        if room < 0:
            return None
        keep = min(len(self.prompt), room)
        tail = list(self.prompt[len(self.prompt) - keep:])
        return Fit(ids=tuple(list(self.head) + tail + list(r) for r in self.responses),
                   prompt_tokens=len(self.head) + keep, cut=len(self.prompt) - keep)


def encode(tokenizer: Any, prompts: Sequence[str], responses: Sequence[Sequence[str]]) -> list[Encoded]:
    """Tokenize each prompt with its responses (`responses[i]`: one for SFT, chosen and rejected for a reward
    model), in two batched tokenizer calls."""
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} response lists")
    eos = tokenizer.eos_token
    empty = tokenizer("")["input_ids"]
    prompt_ids = tokenizer(list(prompts))["input_ids"] if prompts else []
    texts = [p + with_eos(r, eos) for p, rs in zip(prompts, responses) for r in rs]
    full = iter(tokenizer(texts)["input_ids"] if texts else [])
    out = []
    for p_ids, rs in zip(prompt_ids, responses):
        seqs = [next(full) for _ in rs]
        if not seqs:
            raise ValueError("every prompt needs at least one response")
        boundary = min(common_prefix_length(p_ids, s) for s in seqs)
        head = min(common_prefix_length(empty, p_ids), boundary)
        out.append(Encoded(head=tuple(p_ids[:head]), prompt=tuple(p_ids[head:boundary]),
                           responses=tuple(tuple(s[boundary:]) for s in seqs)))
    return out


def encode_records(tokenizer: Any, records: Sequence[dict], fields: Sequence[str]) -> list[Encoded]:
    """`encode` of split records: each record's prompt with its `fields` (("chosen",) for SFT, ("chosen",
    "rejected") for a reward model)."""
    return encode(tokenizer, [r["prompt"] for r in records], [[r[f] for f in fields] for r in records])


@dataclass
class FitCounts:
    """What fitting a split to a budget did: kept records, how many of them had their prompt cut, how many were
    dropped because a response alone is longer than the budget, and how many became identical pairs."""

    records: int = 0
    truncated: int = 0
    dropped_too_long: int = 0
    identical: int = 0


def fit_all(encoded: Sequence[Encoded], max_length: int) -> tuple[list[Fit | None], FitCounts]:
    """`Encoded.fit` of every record, with the counts (dropped records are None in the list, in place)."""
    fits = [e.fit(max_length) for e in encoded]
    counts = FitCounts(records=len(fits))
    for f in fits:
        if f is None:
            counts.dropped_too_long += 1
        else:
            counts.truncated += f.cut > 0
            counts.identical += f.identical
    return fits, counts
