"""The `check` stage: the prepared splits against the base model's tokenizer and positions and the length params,
before any training, so a run never trains SFT and reward models for an hour to fail at PPO.

It loads only the tokenizer and config.json of models/base, tokenizes every split and

- writes `metrics/lengths.json`: token statistics per split (prompt / response / sequence tokens, how many
  sequences exceed the model's positions, the share of unknown tokens and of texts the tokenizer cannot write
  back). Numbers that do not depend on any length param, so editing one (ppo.response_length, sft.max_length,
  reward.max_length, eval.max_new_tokens) reruns this stage but leaves the file, and so the training stages after
  it, as they were;
- fails with one line naming the keys that fix it and the numbers, writing nothing, when the params cannot work:
  the longest PPO / eval prompt + ppo.response_length (eval.max_new_tokens) exceeds the model's positions;
  responses longer than sft.max_length / reward.max_length on their own (no left-truncation of the prompt can
  keep them: `edgerlhf.truncation`) in every rm_test pair that must be scored, or in more than MAX_DROPPED_FRACTION
  of a training split; a max_length above the positions for sequences that long; a tokenizer that encodes a
  prompt to nothing (every source: hub, jsonl, synthetic).

What the length params do to each split (prompts cut, records dropped) is logged; the training stages write the
same counts into metrics/sft.json and metrics/reward/P.json.
"""

from __future__ import annotations

import logging
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgerlhf import truncation
from edgerlhf.config import Params
from edgerlhf.errors import ArtifactError, ConfigError

log = logging.getLogger("edgerlhf")

# The splits a stage turns into sequences: (params section whose max_length applies, response fields).
PAIR_SPLITS = {"sft_train": ("sft", ("chosen",)), "sft_eval": ("sft", ("chosen",)),
               "rm_train": ("reward", ("chosen", "rejected")), "rm_test": ("reward", ("chosen", "rejected"))}
# Prompts the policies generate from (tokenized as PPO and the evaluation do: no special tokens added).
PROMPT_SPLITS = ("ppo_prompts", "eval_prompts")
SPLITS = (*PAIR_SPLITS, *PROMPT_SPLITS)
# Splits whose every pair is scored (the same pairs at every precision): none may be dropped.
SCORED_SPLITS = ("rm_test",)
# A training split losing more than this share of its records to a too-small max_length is a params error.
MAX_DROPPED_FRACTION = 0.5
# Above this share of unknown tokens or of texts the tokenizer cannot write back, the check warns.
WARN_UNKNOWN_FRACTION = 0.01


@dataclass
class SplitTokens:
    """One split as the tokenizer sees it."""

    name: str
    records: int
    prompt_tokens: list[int]  # per record; pair splits: as trained (special tokens included), else as PPO sees them
    prompt_chars: list[int]
    encoded: list[truncation.Encoded] = field(default_factory=list)  # pair splits only
    tokens: int = 0  # text tokens of every prompt and response, for the unknown-token share
    unknown_tokens: int = 0
    texts: int = 0
    lossy_texts: int = 0  # texts that do not decode back to themselves (whitespace aside)
    empty_prompts: list[int] = field(default_factory=list)  # records whose prompt encodes to nothing readable
    empty_responses: int = 0


def model_positions(config: Any) -> int | None:
    """The longest sequence the model takes (n_positions / max_position_embeddings), None when it states none."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return getattr(text, "n_positions", None) or getattr(text, "max_position_embeddings", None)


def load_base(base_dir: str | Path, trust_remote_code: bool = False) -> tuple[Any, int | None]:
    """The tokenizer and the positions of the base model (config.json only: no weights are loaded)."""
    from transformers import AutoConfig, AutoTokenizer

    base_dir = Path(base_dir)
    if not (base_dir / "config.json").is_file():
        raise ArtifactError(f"{base_dir / 'config.json'} is missing: run `dvc repro base` first")
    tokenizer = AutoTokenizer.from_pretrained(str(base_dir), trust_remote_code=trust_remote_code)
    config = AutoConfig.from_pretrained(str(base_dir), trust_remote_code=trust_remote_code)
    return tokenizer, model_positions(config)


def _squash(text: str) -> str:
    return "".join(text.split())


def measure(tokenizer: Any, splits: dict[str, list[dict]]) -> dict[str, SplitTokens]:
    """Tokenize every split: prompt lengths, the pair splits' sequences (`truncation.encode`), and the vocabulary
    figures (unknown tokens, texts that do not survive encode + decode, texts encoded to nothing)."""
    unk = tokenizer.unk_token_id
    out = {}
    for name, records in splits.items():
        fields = ("prompt", "chosen", "rejected")
        texts = [r[f] for r in records for f in fields]
        ids = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
        decoded = tokenizer.batch_decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        st = SplitTokens(name=name, records=len(records), prompt_tokens=[], prompt_chars=[len(r["prompt"])
                                                                                         for r in records])
        for i, (text, tok, back) in enumerate(zip(texts, ids, decoded)):
            readable = [t for t in tok if t != unk]
            st.tokens += len(tok)
            st.unknown_tokens += len(tok) - len(readable)
            st.texts += 1
            st.lossy_texts += _squash(back) != _squash(text)
            if text.strip() and not readable:
                if i % len(fields) == 0:
                    st.empty_prompts.append(i // len(fields))
                else:
                    st.empty_responses += 1
        if name in PAIR_SPLITS:
            st.encoded = truncation.encode_records(tokenizer, records, PAIR_SPLITS[name][1])
            st.prompt_tokens = [e.prompt_length for e in st.encoded]
        else:
            st.prompt_tokens = [len(tok) for tok in ids[::len(fields)]]
        out[name] = st
    return out


def _r(x: float) -> float:
    return round(float(x), 4)


def _percentile(values: Sequence[int], q: float) -> int:
    """The nearest-rank percentile (a value of the data, so an integer token count)."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def statistics_of(measured: dict[str, SplitTokens], positions: int | None, vocab_size: int) -> dict:
    """The content of metrics/lengths.json: numbers only, none of them depending on a length param."""
    out: dict[str, Any] = {"model": {"vocab_size": vocab_size, **({"positions": positions} if positions else {})}}
    for name, st in measured.items():
        if not st.records:
            continue
        row: dict[str, float] = {
            "records": st.records,
            "prompt_tokens_max": max(st.prompt_tokens),
            "prompt_tokens_mean": _r(statistics.fmean(st.prompt_tokens)),
            "unknown_token_fraction": _r(st.unknown_tokens / max(st.tokens, 1)),
            "lossy_text_fraction": _r(st.lossy_texts / max(st.texts, 1)),
            "empty_prompts": len(st.empty_prompts),
            "empty_responses": st.empty_responses,
        }
        if st.encoded:
            responses = [len(r) for e in st.encoded for r in e.responses]
            lengths = [e.length for e in st.encoded]
            row.update({"response_tokens_max": max(responses),
                        "response_tokens_mean": _r(statistics.fmean(responses)),
                        "sequence_tokens_max": max(lengths), "sequence_tokens_p95": _percentile(lengths, 95),
                        "sequence_tokens_mean": _r(statistics.fmean(lengths))})
            if positions:
                # what a max_length equal to the model's positions would do: the most any length param allows
                _, counts = truncation.fit_all(st.encoded, positions)
                row.update({"truncated_at_positions": counts.truncated,
                            "dropped_at_positions": counts.dropped_too_long})
        out[name] = row
    return out


# --------------------------------------------------------------------------- what the params need


# The key that names the model, per model.source ("tiny" is sized by model.tiny.n_positions instead).
MODEL_KEY = {"hub": "model.name", "local": "model.local_path"}


def _positions_fix(params: Params, need: int) -> str:
    if params.model.source == "tiny":
        return f"raise model.tiny.n_positions to >= {need}"
    return f"use a model with >= {need} positions ({MODEL_KEY.get(params.model.source, 'model.name')})"


def _prompt_problem(st_list: list[SplitTokens], key: str, new_tokens: int, positions: int,
                    params: Params) -> str | None:
    """The longest prompt of the splits + `new_tokens` generated must fit the positions."""
    longest = max(max(st.prompt_tokens) for st in st_list if st.records)
    if longest + new_tokens <= positions:
        return None
    where = max((st for st in st_list if st.records), key=lambda st: max(st.prompt_tokens)).name
    # the shortest prompt (in characters) that does not fit: data.max_prompt_chars below it drops every such one
    too_long = [c for st in st_list for t, c in zip(st.prompt_tokens, st.prompt_chars) if t + new_tokens > positions]
    fixes = []
    if min(too_long) - 1 >= 16:
        fixes.append(f"lower data.max_prompt_chars (now {params.data.max_prompt_chars}) to <= {min(too_long) - 1}")
    fixes.append(_positions_fix(params, longest + new_tokens))
    if positions - longest >= 1:
        fixes.append(f"lower {key} to <= {positions - longest}")
    return (f"the longest {where} prompt ({longest} tokens) + {key} ({new_tokens}) = {longest + new_tokens} exceeds "
            f"the model's {positions} positions ({len(too_long)} prompts too long): " + " or ".join(fixes))


def _max_length_problems(st: SplitTokens, section: str, max_length: int, positions: int | None,
                         params: Params) -> list[str]:
    key = f"{section}.max_length"
    problems = []
    fits, counts = truncation.fit_all(st.encoded, max_length)
    if counts.dropped_too_long:
        need = max(len(e.head) + e.longest_response for e in st.encoded)
        if st.name in SCORED_SPLITS or counts.dropped_too_long > MAX_DROPPED_FRACTION * st.records:
            why = ("every pair of it is scored" if st.name in SCORED_SPLITS
                   else f"more than {MAX_DROPPED_FRACTION:.0%} of the split would be dropped")
            fix = f"raise {key} to >= {need}"
            if positions and need > positions:
                fix += f" (beyond the model's {positions} positions: {_positions_fix(params, need)})"
            problems.append(f"{counts.dropped_too_long} of {st.records} {st.name} responses are longer than {key} "
                            f"({max_length} tokens) on their own, the longest {need} tokens with EOS, so no cut of the "
                            f"prompt can keep them and {why}: {fix}")
    if positions and max_length > positions:
        over = sum(1 for f in fits if f is not None and max(len(x) for x in f.ids) > positions)
        if over:
            problems.append(f"{key} ({max_length}) exceeds the model's {positions} positions and {over} {st.name} "
                            f"sequences are longer than {positions} tokens: lower {key} to <= {positions}")
    return problems


def problems_of(measured: dict[str, SplitTokens], positions: int | None, params: Params) -> list[str]:
    """Every way the length params cannot work with these splits and this model (empty: they can)."""
    problems = []
    if positions:
        prompt_splits = [measured[n] for n in PROMPT_SPLITS if n in measured]
        if prompt_splits:
            ppo = _prompt_problem(prompt_splits, "ppo.response_length", params.ppo.response_length, positions, params)
            problems += [ppo] if ppo else []
        if "eval_prompts" in measured and measured["eval_prompts"].records:
            ev = _prompt_problem([measured["eval_prompts"]], "eval.max_new_tokens", params.eval.max_new_tokens,
                                 positions, params)
            problems += [ev] if ev else []
    for name, (section, _) in PAIR_SPLITS.items():
        if name in measured and measured[name].records:
            max_length = getattr(params, section).max_length
            problems += _max_length_problems(measured[name], section, max_length, positions, params)
    return problems


def tokenizer_problem(measured: dict[str, SplitTokens], params: Params) -> str | None:
    """A tokenizer that encodes a prompt to nothing (no tokens, or unknown tokens only) cannot train anything."""
    bad = [(st.name, st.empty_prompts) for st in measured.values() if st.empty_prompts]
    if not bad:
        return None
    total = sum(len(idx) for _, idx in bad)
    name, idx = bad[0]
    key = MODEL_KEY.get(params.model.source, "model.tiny.vocab_size")
    return (f"the tokenizer of models/base encodes {total} prompts to nothing (no tokens, or unknown tokens only; "
            f"first: {name} record {idx[0]}): its vocabulary cannot read this text; use a model whose tokenizer "
            f"covers it ({key}), or model.source: tiny to train one on the data")


def fit_summary(measured: dict[str, SplitTokens], params: Params) -> list[str]:
    """Log lines: what the current max_length params do to each pair split."""
    lines = []
    for name, (section, _) in PAIR_SPLITS.items():
        st = measured.get(name)
        if st is None or not st.records:
            continue
        max_length = getattr(params, section).max_length
        _, c = truncation.fit_all(st.encoded, max_length)
        identical = f", {c.identical} pairs identical after truncation" if len(PAIR_SPLITS[name][1]) > 1 else ""
        lines.append(f"{name}: {c.truncated} of {c.records} with the prompt cut from the left to fit "
                     f"{section}.max_length={max_length}, {c.dropped_too_long} dropped (a response alone is longer)"
                     + identical)
    return lines


def check(params: Params, base_dir: str | Path, splits: dict[str, list[dict]]) -> dict:
    """Measure the splits with the base model's tokenizer; raise one ArtifactError / ConfigError line when the
    tokenizer or the params cannot work; else return the statistics for metrics/lengths.json."""
    tokenizer, positions = load_base(base_dir, params.model.trust_remote_code)
    measured = measure(tokenizer, splits)
    bad_tokenizer = tokenizer_problem(measured, params)
    if bad_tokenizer:
        raise ArtifactError(bad_tokenizer)
    for st in measured.values():
        unknown = st.unknown_tokens / max(st.tokens, 1)
        lossy = st.lossy_texts / max(st.texts, 1)
        if unknown > WARN_UNKNOWN_FRACTION or lossy > WARN_UNKNOWN_FRACTION or st.empty_responses:
            log.warning("%s: %.1f %% unknown tokens, %.1f %% of texts the tokenizer cannot write back, %d responses "
                        "encoded to nothing: the tokenizer of models/base covers this text poorly", st.name,
                        100 * unknown, 100 * lossy, st.empty_responses)
    problems = problems_of(measured, positions, params)
    if problems:
        raise ConfigError("; ".join(problems))
    for line in fit_summary(measured, params):
        log.info("%s", line)
    stats = statistics_of(measured, positions, len(tokenizer))
    prompts = [stats[n]["prompt_tokens_max"] for n in PROMPT_SPLITS if n in stats]
    sequences = [stats[n]["sequence_tokens_max"] for n in PAIR_SPLITS if n in stats]
    log.info("model positions %s; longest PPO/eval prompt %s tokens, longest SFT/RM sequence %s tokens",
             positions or "unlimited", max(prompts, default="-"), max(sequences, default="-"))
    return stats
