"""Tests for edgerlhf.data: HH-RLHF splitting, local JSONL (every accepted form), error/skip policy, identical
pairs, hub rows and failures, build_splits (hub and JSONL), split-file checks, atomic IO.

No network: every hub call is replaced by a monkeypatched `datasets.load_dataset`. The record-level parsing itself
(every form, every malformation) is tested in test_formats.py; here, how the readers apply and count it.
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from pathlib import Path

import pytest

from edgerlhf import config, data, formats
from edgerlhf.data import (
    format_skip_report,
    load_hub_rows,
    read_jsonl,
    read_split,
    records_from_rows,
    split_transcript,
    transcript_pair_to_record,
    write_jsonl,
)
from edgerlhf.errors import ArtifactError, DataError, HubError

SKIP = "fix the line or set data.on_malformed: skip"

# Multi-turn: an earlier "\n\nAssistant:" turn, so only a split at the LAST marker is right.
# Chosen and rejected differ only in the final assistant turn, as in HH-RLHF.
CUSS_PROMPT = (
    "\n\nHuman: What are some cuss words in english?"
    "\n\nAssistant: Here's an incomplete list."
    "\n\nHuman: What's your favorite one?"
    "\n\nAssistant:"
)
CUSS_CHOSEN = CUSS_PROMPT + " I haven't even thought about it."
CUSS_REJECTED = CUSS_PROMPT + " Ass."

# Single turn.
BREAD_PROMPT = "\n\nHuman: How do I bake a simple loaf of bread?\n\nAssistant:"
BREAD_CHOSEN = BREAD_PROMPT + " Sure, mix flour, water, salt and yeast, knead it, let it rise, then bake at 230 °C."
BREAD_REJECTED = BREAD_PROMPT + " Just buy one."

# Three turns with non-ASCII text.
CAFE_PROMPT = (
    "\n\nHuman: Can you recommend a café in Paris?"
    "\n\nAssistant: Café de Flore is a famous one."
    "\n\nHuman: Is it expensive?"
    "\n\nAssistant: Somewhat, a coffee costs about €6."
    "\n\nHuman: Any cheaper option nearby?"
    "\n\nAssistant:"
)
CAFE_CHOSEN = CAFE_PROMPT + " Yes — try a small bar-tabac on a side street, where an espresso is about €1.50."
CAFE_REJECTED = CAFE_PROMPT + " No."

PAIRS = [(CUSS_CHOSEN, CUSS_REJECTED), (BREAD_CHOSEN, BREAD_REJECTED), (CAFE_CHOSEN, CAFE_REJECTED)]
RECORDS = [
    {"prompt": CUSS_PROMPT, "chosen": " I haven't even thought about it.", "rejected": " Ass."},
    {"prompt": BREAD_PROMPT, "chosen": BREAD_CHOSEN[len(BREAD_PROMPT):], "rejected": " Just buy one."},
    {"prompt": CAFE_PROMPT, "chosen": CAFE_CHOSEN[len(CAFE_PROMPT):], "rejected": " No."},
]


def _write_lines(path: Path, lines: list[str]) -> Path:
    path.write_bytes("".join(line + "\n" for line in lines).encode("utf-8"))
    return path


def _raw(chosen: str, rejected: str) -> str:
    return json.dumps({"chosen": chosen, "rejected": rejected}, ensure_ascii=False)


# --------------------------------------------------------------------------- splitting


def test_split_transcript_uses_last_assistant_marker() -> None:
    prompt, response = split_transcript(CUSS_CHOSEN)
    assert prompt == CUSS_PROMPT
    assert response == " I haven't even thought about it."
    assert prompt.startswith("\n\nHuman: What are some")
    assert prompt.count("\n\nAssistant:") == 2  # the earlier turn stays in the prompt


def test_split_transcript_single_turn_keeps_leading_space() -> None:
    assert split_transcript("\n\nHuman: Hi\n\nAssistant: Sure, hello.") == \
        ("\n\nHuman: Hi\n\nAssistant:", " Sure, hello.")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("\n\nHuman: Hi there", "transcript has no '\\n\\nAssistant:' marker"),
        ("Human: Hi\nAssistant: Hello", "transcript has no '\\n\\nAssistant:' marker"),
        ("\n\nHuman: Hi\n\nAssistant:", "transcript has an empty response after the last '\\n\\nAssistant:'"),
        ("\n\nHuman: Hi\n\nAssistant:  \n ", "transcript has an empty response after the last '\\n\\nAssistant:'"),
    ],
)
def test_split_transcript_rejects_malformed(text: str, message: str) -> None:
    with pytest.raises(DataError) as info:
        split_transcript(text)
    assert str(info.value) == message


def test_transcript_pair_to_record() -> None:
    rec = transcript_pair_to_record(CUSS_CHOSEN, CUSS_REJECTED)
    assert rec == RECORDS[0]
    assert list(rec) == ["prompt", "chosen", "rejected"]
    assert rec["prompt"] + rec["chosen"] == CUSS_CHOSEN
    assert rec["prompt"] + rec["rejected"] == CUSS_REJECTED


def test_transcript_pair_with_different_prompts_is_malformed() -> None:
    other = CUSS_REJECTED.replace("favorite", "favourite")
    with pytest.raises(DataError) as info:
        transcript_pair_to_record(CUSS_CHOSEN, other)
    first_diff = CUSS_CHOSEN.index("favorite") + len("favo")
    assert str(info.value) == f"chosen and rejected have different prompts (first difference at character {first_diff})"


# --------------------------------------------------------------------------- local JSONL


def test_read_jsonl_raw_form(tmp_path: Path) -> None:
    path = _write_lines(tmp_path / "raw.jsonl", [_raw(*PAIRS[0]), "", _raw(*PAIRS[1]), "   ", _raw(*PAIRS[2]), ""])
    records, skipped, reasons, forms = read_jsonl(path, "error")
    assert records == RECORDS
    assert skipped == 0
    assert reasons == Counter()
    assert forms == Counter({"hh_raw": 3})  # blank lines are not rows


def test_read_jsonl_split_and_raw_forms_mixed_per_line(tmp_path: Path) -> None:
    lines = [
        json.dumps(RECORDS[0]),
        _raw(*PAIRS[1]),
        json.dumps({**RECORDS[2], "id": 7}, ensure_ascii=False),  # extra keys are ignored
    ]
    path = _write_lines(tmp_path / "mixed.jsonl", lines)
    result = read_jsonl(path)
    assert result.records == RECORDS
    assert (result.skipped, result.reasons) == (0, Counter())
    assert result.formats == Counter({"split": 2, "hh_raw": 1})


def test_read_jsonl_crlf_and_bom(tmp_path: Path) -> None:
    path = tmp_path / "win.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + (_raw(*PAIRS[1]) + "\r\n" + _raw(*PAIRS[0]) + "\r\n").encode("utf-8"))
    assert read_jsonl(path).records == [RECORDS[1], RECORDS[0]]


def test_truncated_last_line_names_line_number(tmp_path: Path) -> None:
    good = _raw(*PAIRS[0])
    truncated = '{"chosen": "\\n\\nHuman: hi'
    path = _write_lines(tmp_path / "x.jsonl", [good, "", good, truncated])
    with pytest.raises(DataError) as info:
        read_jsonl(path, "error")
    assert str(info.value) == f"{path}:4: invalid JSON (Unterminated string starting at column 12); {SKIP}"


MISSING_REJECTED = "missing field 'rejected' (every form needs chosen and rejected; the split form also prompt)"
# A multi-turn transcript joined without its final marker (the public split copy's prompt + " " + response): the
# last marker is an EARLIER assistant turn, so the would-be response holds a further Human turn.
CUSS_JOINED = CUSS_PROMPT[2:-len("\n\nAssistant:")]
MALFORMED = [
    ('{"chosen": "a" "rejected": "b"}', "invalid JSON (Expecting ',' delimiter at column 16)", "invalid_json"),
    ('{"chosen": "a\tb"}', "invalid JSON (Invalid control character at column 14)", "invalid_json"),
    ('["\\n\\nHuman: a\\n\\nAssistant: b"]', "expected a JSON object (got array)", "not_object"),
    (json.dumps({"chosen": CUSS_CHOSEN}), MISSING_REJECTED, "missing_field"),
    (json.dumps({"prompt": CUSS_PROMPT, "chosen": " a"}), MISSING_REJECTED, "missing_field"),
    (json.dumps({"chosen": CUSS_CHOSEN, "rejected": None}), "field 'rejected' must be a string (got null)",
     "non_string_field"),
    (json.dumps({"prompt": CUSS_PROMPT, "chosen": 3, "rejected": " b"}), "field 'chosen' must be a string (got number)",
     "non_string_field"),
    (json.dumps({"chosen": CUSS_PROMPT, "rejected": CUSS_REJECTED}),
     "field 'chosen' has an empty response after the last '\\n\\nAssistant:'", "empty_response"),
    (json.dumps({"prompt": CUSS_PROMPT, "chosen": " a", "rejected": " \n"}), "field 'rejected' is an empty response",
     "empty_response"),
    (json.dumps({"chosen": "Human: hi\nAssistant: yo", "rejected": "Human: hi\nAssistant: no"}),
     "field 'chosen' has no '\\n\\nAssistant:' marker", "no_assistant_marker"),
    (json.dumps({"prompt": "What is bread?", "chosen": " a", "rejected": " b"}),
     "field 'prompt' must start with a Human turn ('Human:' or '\\n\\nHuman:'), not 'What is bread?'",
     "no_human_turn"),
    (json.dumps({"chosen": CUSS_CHOSEN, "rejected": BREAD_REJECTED}),
     "chosen and rejected have different prompts (first difference at character 9)", "prompt_mismatch"),
    (json.dumps({"chosen": CUSS_JOINED + " I haven't even thought about it.", "rejected": CUSS_JOINED + " Ass."}),
     "field 'chosen' holds a further '\\n\\nHuman:' turn after the last '\\n\\nAssistant:'; a response is one "
     "assistant turn (was the final '\\n\\nAssistant:' left out?)", "response_has_human_turn"),
    (json.dumps({"chosen": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}],
                 "rejected": BREAD_REJECTED}),
     "field 'chosen' is a list of messages but 'rejected' is not (got string); use one form per record", "mixed_forms"),
    (json.dumps({"prompt": [{"role": "user", "content": "Hi"}], "chosen": [{"role": "user", "content": "Hello."}],
                 "rejected": [{"role": "assistant", "content": "No."}]}),
     "field 'chosen' must end with an assistant message (got 'user')", "bad_role"),
]


@pytest.mark.parametrize(("line", "detail", "reason"), MALFORMED)
def test_malformed_line_raises_one_line_error(tmp_path: Path, line: str, detail: str, reason: str) -> None:
    path = _write_lines(tmp_path / "bad.jsonl", [_raw(*PAIRS[0]), line, _raw(*PAIRS[1])])
    with pytest.raises(DataError) as info:
        read_jsonl(path, "error")
    message = str(info.value)
    assert message == f"{path}:2: {detail}; {SKIP}"
    assert "\n" not in message


@pytest.mark.parametrize(("line", "detail", "reason"), MALFORMED)
def test_malformed_line_skipped_with_reason(tmp_path: Path, line: str, detail: str, reason: str) -> None:
    path = _write_lines(tmp_path / "bad.jsonl", [_raw(*PAIRS[0]), line, _raw(*PAIRS[1])])
    records, skipped, reasons, forms = read_jsonl(path, "skip")
    assert records == RECORDS[:2]
    assert skipped == 1
    assert reasons == Counter({reason: 1})
    assert reason in formats.REASONS or reason in (data.REASON_INVALID_JSON, data.REASON_INVALID_UTF8)
    assert forms == Counter({"hh_raw": 2})  # a malformed row has no form


HI = "\n\nHuman: hi\n\nAssistant:"


@pytest.mark.parametrize("obj", [
    {"prompt": "\n\nHuman: hi", "chosen": " a", "rejected": " b"},  # no final marker (malformed before formats.py)
    {"prompt": "Human: hi", "chosen": "a", "rejected": "b"},  # the public split copies' form: no markers, no spaces
    {"prompt": "Human: hi\n\nAssistant:", "chosen": " a", "rejected": "b"},
], ids=["no_final_marker", "no_markers_no_spaces", "no_leading_newlines"])
def test_split_form_without_its_markers_is_completed(tmp_path: Path, obj: dict) -> None:
    """A split-form prompt without its leading "\\n\\n" or trailing "\\n\\nAssistant:" (and responses without
    their leading space) is accepted in both modes and completed to the record convention."""
    path = _write_lines(tmp_path / "split.jsonl", [_raw(*PAIRS[0]), json.dumps(obj), _raw(*PAIRS[1])])
    for mode in ("error", "skip"):
        result = read_jsonl(path, mode)
        assert result.records == [RECORDS[0], {"prompt": HI, "chosen": " a", "rejected": " b"}, RECORDS[1]]
        assert (result.skipped, result.reasons) == (0, Counter())
        assert result.formats == Counter({"hh_raw": 2, "split": 1})


def test_invalid_utf8_line(tmp_path: Path) -> None:
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(_raw(*PAIRS[0]).encode() + b"\n" + '{"chosen": "caf\xe9"}'.encode("latin-1") + b"\n")
    with pytest.raises(DataError) as info:
        read_jsonl(path)
    assert str(info.value) == f"{path}:2: invalid UTF-8 (byte 15); {SKIP}"


def test_skip_mode_counts_every_reason_and_logs_it(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    lines = [
        _raw(*PAIRS[0]),                                        # 1 ok
        "",                                                     # 2 blank: ignored, not counted
        json.dumps({"chosen": CUSS_CHOSEN}),                    # 3 missing field
        _raw(BREAD_PROMPT + "  ", BREAD_REJECTED),              # 4 empty response
        _raw("\n\nHuman: hi", "\n\nHuman: hi"),                 # 5 no marker
        json.dumps(RECORDS[2], ensure_ascii=False),             # 6 ok (split form)
        '{"chosen": "\\n\\nHuman: hi',                          # 7 truncated
    ]
    path = _write_lines(tmp_path / "mixed.jsonl", lines)
    with caplog.at_level(logging.WARNING, logger="edgerlhf.data"):
        records, skipped, reasons, forms = read_jsonl(path, "skip")
    assert records == [RECORDS[0], RECORDS[2]]
    assert skipped == 4
    assert reasons == Counter({"missing_field": 1, "empty_response": 1, "no_assistant_marker": 1, "invalid_json": 1})
    assert forms == Counter({"hh_raw": 1, "split": 1})
    logged = [r.getMessage() for r in caplog.records]
    assert [m.split(": ")[0] for m in logged[:4]] == [f"skipping {path}:{n}" for n in (3, 4, 5, 7)]
    assert logged[-1] == (f"{path}: skipped 4 of 6 rows: 1 empty_response, 1 invalid_json, 1 missing_field, "
                          f"1 no_assistant_marker")


def test_prompt_too_long_is_counted_in_both_modes(tmp_path: Path) -> None:
    path = _write_lines(tmp_path / "raw.jsonl", [_raw(*p) for p in PAIRS])
    limit = len(CUSS_PROMPT)  # CUSS fits exactly; BREAD is shorter; CAFE is longer
    assert len(BREAD_PROMPT) < limit < len(CAFE_PROMPT)
    for mode in ("error", "skip"):
        records, skipped, reasons, forms = read_jsonl(path, mode, max_prompt_chars=limit)
        assert records == RECORDS[:2]
        assert skipped == 1
        assert reasons == Counter({"prompt_too_long": 1})
        assert forms == Counter({"hh_raw": 3})  # a filtered row was read in its form


def test_identical_pairs_are_dropped_and_counted_in_both_modes(tmp_path: Path,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    """chosen == rejected (after normalisation) carries no preference: dropped and counted as identical_pair, not
    an error even in error mode, and counted before the prompt-length filter."""
    hi = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]
    lines = [
        _raw(*PAIRS[0]),                                                         # 1 ok
        _raw(BREAD_CHOSEN, BREAD_CHOSEN),                                        # 2 identical (raw)
        json.dumps({"prompt": "Human: hi", "chosen": "a", "rejected": " a"}),    # 3 identical once normalised
        _raw(*PAIRS[1]),                                                         # 4 ok
        json.dumps({"chosen": hi, "rejected": hi}),                              # 5 identical (implicit)
        _raw(CAFE_CHOSEN, CAFE_CHOSEN),                                          # 6 identical AND too long
        _raw(*PAIRS[2]),                                                         # 7 too long
    ]
    path = _write_lines(tmp_path / "same.jsonl", lines)
    limit = len(CUSS_PROMPT)
    for mode in ("error", "skip"):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="edgerlhf.data"):
            records, skipped, reasons, forms = read_jsonl(path, mode, max_prompt_chars=limit)
        assert records == RECORDS[:2]
        assert skipped == 5
        assert reasons == Counter({formats.IDENTICAL: 4, "prompt_too_long": 1})
        assert forms == Counter({"hh_raw": 5, "split": 1, "conversational_implicit": 1})
        assert [r.getMessage() for r in caplog.records] == [
            f"{path}: skipped 5 of 7 rows: 4 identical_pair, 1 prompt_too_long (> {limit} chars)"]
    assert formats.IDENTICAL == "identical_pair"


def _reply(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


# One line per accepted form, with the record each normalises to.
CONV_PROMPT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Can you recommend a café?"}]
IMPLICIT_TURNS = [{"role": "user", "content": "Is it expensive?"}, {"role": "assistant", "content": "Somewhat."},
                  {"role": "user", "content": "Cheaper?"}]
FORM_LINES = {
    "hh_raw": (_raw(*PAIRS[0]), RECORDS[0]),
    "split": (json.dumps({"prompt": BREAD_PROMPT[2:-len("\n\nAssistant:")], "chosen": RECORDS[1]["chosen"][1:],
                          "rejected": "Just buy one."}, ensure_ascii=False), RECORDS[1]),
    "conversational": (json.dumps({"prompt": CONV_PROMPT, "chosen": _reply("Café de Flore."),
                                   "rejected": _reply("No.")}, ensure_ascii=False),
                       {"prompt": "\n\nHuman: Be brief.\n\nCan you recommend a café?\n\nAssistant:",
                        "chosen": " Café de Flore.", "rejected": " No."}),
    "conversational_implicit": (
        json.dumps({"chosen": IMPLICIT_TURNS + _reply("Try a bar-tabac."), "rejected": IMPLICIT_TURNS + _reply("No."),
                    "prompt": "Cheaper?"}),  # a string prompt beside message lists is ignored, as in TRL
        {"prompt": "\n\nHuman: Is it expensive?\n\nAssistant: Somewhat.\n\nHuman: Cheaper?\n\nAssistant:",
         "chosen": " Try a bar-tabac.", "rejected": " No."}),
}
FORM_ORDER = ["hh_raw", "conversational_implicit", "split", "hh_raw", "conversational", "conversational_implicit",
              "conversational_implicit", "hh_raw", "split", "conversational_implicit"]


def _four_forms_file(path: Path, extra: list[str] = ()) -> Path:
    return _write_lines(path, [FORM_LINES[f][0] for f in FORM_ORDER] + list(extra))


def test_read_jsonl_mixing_all_four_forms_counts_each_form(tmp_path: Path) -> None:
    assert set(FORM_LINES) == set(formats.FORMATS)
    path = _four_forms_file(tmp_path / "four.jsonl", ['{"chosen": 1}'])  # + a malformed line: no form
    records, skipped, reasons, forms = read_jsonl(path, "skip")
    assert records == [FORM_LINES[f][1] for f in FORM_ORDER]
    assert forms == Counter(FORM_ORDER) == Counter({"hh_raw": 3, "split": 2, "conversational": 1,
                                                    "conversational_implicit": 4})
    assert (skipped, reasons) == (1, Counter({"missing_field": 1}))


def test_missing_file_names_path_and_param(tmp_path: Path) -> None:
    path = tmp_path / "nope.jsonl"
    with pytest.raises(DataError) as info:
        read_jsonl(path)
    assert str(info.value) == f"{path}: not found; set data.jsonl_path to an existing JSONL file"
    with pytest.raises(DataError, match="is a directory"):
        read_jsonl(tmp_path)


def test_bad_policy_value_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="on_malformed"):
        read_jsonl(tmp_path / "x.jsonl", "ignore")  # type: ignore[arg-type]


def test_format_skip_report() -> None:
    reasons = Counter({"prompt_too_long": 3, "empty_response": 2})
    assert format_skip_report("hh", 100, reasons, 1024) == (
        "hh: skipped 5 of 100 rows: 2 empty_response, 3 prompt_too_long (> 1024 chars)")
    assert format_skip_report("hh", 10, Counter()) == "hh: skipped 0 of 10 rows"


# --------------------------------------------------------------------------- rows (what a hub split yields)


ROWS = [{"chosen": c, "rejected": r} for c, r in PAIRS]


def test_records_from_rows() -> None:
    records, skipped, reasons, forms = records_from_rows(ROWS, "error", "Anthropic/hh-rlhf[train]")
    assert records == RECORDS
    assert (skipped, reasons) == (0, Counter())
    assert forms == Counter({"hh_raw": 3})


def test_records_from_rows_error_names_source_and_row() -> None:
    rows = [ROWS[0], {"chosen": BREAD_CHOSEN, "rejected": BREAD_PROMPT}, ROWS[2]]
    with pytest.raises(DataError) as info:
        records_from_rows(rows, "error", "Anthropic/hh-rlhf[train]")
    assert str(info.value) == (
        "Anthropic/hh-rlhf[train] row 1: field 'rejected' has an empty response after the last '\\n\\nAssistant:'; "
        "fix the source or set data.on_malformed: skip")


def test_records_from_rows_non_dict_row_is_not_object() -> None:
    """A row is a dict in one of the accepted forms; a bare (chosen, rejected) pair is no longer one."""
    with pytest.raises(DataError) as info:
        records_from_rows([ROWS[0], PAIRS[1]], "error", "hh")
    assert str(info.value) == ("hh row 1: expected a JSON object (got array); fix the source or set "
                               "data.on_malformed: skip")


def test_records_from_rows_skip_mode() -> None:
    rows = [ROWS[0], {"chosen": BREAD_CHOSEN, "rejected": None}, ("only one",), {"chosen": CUSS_CHOSEN,
            "rejected": BREAD_REJECTED}, ROWS[2], {"chosen": BREAD_CHOSEN, "rejected": BREAD_CHOSEN}, ROWS[1], None]
    records, skipped, reasons, forms = records_from_rows(rows, "skip", "hh", max_prompt_chars=len(CUSS_PROMPT))
    assert records == [RECORDS[0], RECORDS[1]]
    assert skipped == 6
    assert reasons == Counter({"non_string_field": 1, "not_object": 2, "prompt_mismatch": 1, "prompt_too_long": 1,
                               "identical_pair": 1})
    assert forms == Counter({"hh_raw": 4})  # rows 0, 4 (too long), 5 (identical), 6


def test_records_from_rows_identical_pair_dropped_in_error_mode() -> None:
    rows = [ROWS[0], {"prompt": [{"role": "user", "content": "Hi"}], "chosen": _reply("Hello."),
                      "rejected": _reply(" Hello.")}]  # identical once the leading space is added
    result = records_from_rows(rows, "error", "hh")
    assert result.records == RECORDS[:1]
    assert (result.skipped, result.reasons) == (1, Counter({"identical_pair": 1}))
    assert result.formats == Counter({"hh_raw": 1, "conversational": 1})


# --------------------------------------------------------------------------- hub (monkeypatched, never the network)


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch):
    """Belt and braces: even an unpatched call could not reach the hub."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import datasets

    return datasets


def _hub_failures() -> list[Exception]:
    import datasets.exceptions

    return [
        ConnectionError("Couldn't reach 'Anthropic/hh-rlhf' on the Hub (LocalEntryNotFoundError)"),
        datasets.exceptions.DatasetNotFoundError("Dataset 'nobody/nothing' doesn't exist on the Hub\nor cannot be "
                                                 "accessed."),
        OSError(),
    ]


@pytest.mark.parametrize("exc", _hub_failures(), ids=["connection", "not_found", "bare_oserror"])
def test_hub_failure_becomes_one_line_hub_error(offline, monkeypatch: pytest.MonkeyPatch, exc: Exception) -> None:
    def boom(*args, **kwargs):
        raise exc

    monkeypatch.setattr(offline, "load_dataset", boom)
    with pytest.raises(HubError) as info:
        load_hub_rows("nobody/nothing", "main", "train")
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("cannot load dataset 'nobody/nothing' (revision 'main', split 'train') (")
    first_line = (str(exc).splitlines() or [""])[0]
    assert f"({type(exc).__name__}: {first_line})" in message if first_line else f"({type(exc).__name__})" in message
    assert "); check data.hub_id / data.hub_revision / " in message
    assert message.endswith(
        "or to run offline use data.source: jsonl with data.jsonl_path pointing to a local file, or pre-download it "
        "into HF_HOME and set HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1")
    assert info.value.__cause__ is exc


def test_hub_failure_hint_names_only_real_params_keys(offline, monkeypatch: pytest.MonkeyPatch) -> None:
    import re

    def boom(*args, **kwargs):
        raise ConnectionError("offline")

    monkeypatch.setattr(offline, "load_dataset", boom)
    with pytest.raises(HubError) as info:
        load_hub_rows("nobody/nothing", "main", "train")
    named = set(re.findall(r"\bdata\.[a-z_]+", str(info.value)))
    assert named and named <= set(config.all_keys())


def test_load_hub_rows_returns_rows_of_the_form_columns(offline, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def fake(path, **kwargs):
        calls.append((path, kwargs))
        return offline.Dataset.from_dict({"chosen": [p[0] for p in PAIRS], "rejected": [p[1] for p in PAIRS],
                                          "source": ["a", "b", "c"]})  # other columns are not read

    monkeypatch.setattr(offline, "load_dataset", fake)
    rows = load_hub_rows("Anthropic/hh-rlhf", "abc123", "test")
    assert calls == [("Anthropic/hh-rlhf", {"revision": "abc123", "split": "test"})]
    assert rows == ROWS
    assert records_from_rows(rows, "error", "hh").records == RECORDS


# TRL's conversational preference rows (e.g. trl-lib/ultrafeedback_binarized: messages, optional prompt column).
CONV_ROWS = {
    "conversational": (
        {"prompt": [[{"role": "user", "content": "How do I bake a simple loaf of bread?"}],
                    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a café."}]],
         "chosen": [_reply("Mix, knead, rise, bake."), _reply("Café de Flore.")],
         "rejected": [_reply("Just buy one."), _reply("No.")]},
        [{"prompt": "\n\nHuman: How do I bake a simple loaf of bread?\n\nAssistant:",
          "chosen": " Mix, knead, rise, bake.", "rejected": " Just buy one."},
         {"prompt": "\n\nHuman: Be brief.\n\nName a café.\n\nAssistant:", "chosen": " Café de Flore.",
          "rejected": " No."}]),
    "conversational_implicit": (
        {"chosen": [IMPLICIT_TURNS + _reply("Try a bar-tabac."), IMPLICIT_TURNS[:1] + _reply("Yes.")],
         "rejected": [IMPLICIT_TURNS + _reply("No."), IMPLICIT_TURNS[:1] + _reply("Yes.")]},  # row 1: identical
        [FORM_LINES["conversational_implicit"][1]]),
}


@pytest.mark.parametrize("form", sorted(CONV_ROWS))
def test_load_hub_rows_conversational_message_lists(offline, monkeypatch: pytest.MonkeyPatch, form: str) -> None:
    columns, expected = CONV_ROWS[form]
    monkeypatch.setattr(offline, "load_dataset",
                        lambda *a, **k: offline.Dataset.from_dict({**columns, "score_chosen": [8.0, 7.5]}))
    rows = load_hub_rows("trl-lib/prefs", "main", "train")
    assert rows == [{k: columns[k][i] for k in data.FIELDS if k in columns} for i in range(2)]  # message lists kept
    for mode in ("error", "skip"):
        result = records_from_rows(rows, mode, "trl-lib/prefs[train]")
        assert result.records == expected
        assert result.formats == Counter({form: 2})
        assert result.reasons == (Counter({"identical_pair": 1}) if form == "conversational_implicit" else Counter())


def test_load_hub_rows_wrong_columns(offline, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(offline, "load_dataset", lambda *a, **k: offline.Dataset.from_dict({"text": ["x"]}))
    with pytest.raises(DataError) as info:
        load_hub_rows("imdb", "main", "train")
    assert str(info.value) == ("dataset 'imdb' split 'train' has no chosen / rejected column (columns: text); "
                               "data.hub_id must name a preference dataset in an accepted form (README: data formats)")
    monkeypatch.setattr(offline, "load_dataset",
                        lambda *a, **k: offline.Dataset.from_dict({"prompt": ["x"], "chosen": ["y"]}))
    with pytest.raises(DataError) as info:
        load_hub_rows("x/y", "main", "test")
    assert str(info.value).startswith("dataset 'x/y' split 'test' has no rejected column (columns: prompt, chosen); ")


# --------------------------------------------------------------------------- split files


def test_write_then_read_split_round_trip(tmp_path: Path) -> None:
    tricky = {"prompt": "\n\nHuman: line\u2028sep \"quoted\" \\ ok\n\nAssistant:",
              "chosen": " ✓ 日本", "rejected": " x"}
    records = [*RECORDS, tricky]
    path = tmp_path / "splits" / "rm_train.jsonl"  # parent is created
    assert write_jsonl(path, records) == 4
    raw = path.read_bytes()
    assert raw.count(b"\n") == 4 and raw.endswith(b"\n")
    assert "café".encode() in raw and "日本".encode() in raw  # ensure_ascii=False
    assert json.loads(raw.split(b"\n")[0]) == RECORDS[0]
    assert read_split(path) == records


def test_write_jsonl_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "sft_train.jsonl"
    write_jsonl(path, RECORDS[:1])
    before = path.read_bytes()

    def failing():
        yield RECORDS[1]
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        write_jsonl(path, failing())
    assert path.read_bytes() == before  # old content intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sft_train.jsonl"]  # temp file removed

    replaced = []
    real_replace = os.replace

    def spy(src, dst):
        replaced.append((Path(src).parent, Path(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(data.os, "replace", spy)
    write_jsonl(path, RECORDS)
    assert replaced == [(tmp_path, path)]  # temp file lived in the same directory
    assert read_split(path) == RECORDS
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sft_train.jsonl"]


def test_read_split_missing_is_artifact_error_corrupt_is_data_error(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError) as info:
        read_split(tmp_path / "rm_test.jsonl")
    assert str(info.value) == f"{tmp_path / 'rm_test.jsonl'} not found; run the prepare stage (dvc repro prepare)"
    path = _write_lines(tmp_path / "rm_test.jsonl",
                        [json.dumps(RECORDS[0]), json.dumps({"prompt": "p", "chosen": "c"})])
    with pytest.raises(DataError) as info:
        read_split(path)
    assert str(info.value) == f"{path}:2: {MISSING_REJECTED}; re-run the prepare stage (dvc repro prepare)"


NOT_CONVENTION = ("not in the record convention (a prompt from '\\n\\nHuman:' to a final '\\n\\nAssistant:', "
                  "responses with their leading space)")


def _good(n: int) -> bytes:
    return "".join(json.dumps(RECORDS[i % len(RECORDS)]) + "\n" for i in range(n)).encode()


@pytest.mark.parametrize("content, expected, message", [
    (_good(3)[:-25], None, ":3: invalid JSON (Unterminated string starting at column "),  # last line cut short
    (b"", None, ": no records (an empty or truncated file)"),
    (b"\n\n", 0, None),  # an empty split of size 0 (judge_train by default) is fine
    (_good(1) + b"{}\n", None, ":2: missing field 'chosen' (every form needs chosen and rejected; the split form "
                               "also prompt)"),
    (_good(1) + b"[]\n", None, ":2: expected a JSON object (got array)"),
    (_good(1) + json.dumps({**RECORDS[0], "rejected": 1}).encode() + b"\n", None,
     ":2: field 'rejected' must be a string (got number)"),
    (_good(1) + json.dumps({**RECORDS[0], "chosen": "  "}).encode() + b"\n", None,
     ":2: field 'chosen' is an empty response"),
    (_good(1) + json.dumps({**RECORDS[0], "prompt": "no marker"}).encode() + b"\n", None,
     ":2: field 'prompt' must start with a Human turn ('Human:' or '\\n\\nHuman:'), not 'no marker'"),
    (_good(1) + json.dumps({**RECORDS[0], "chosen": " a\n\nHuman: b"}).encode() + b"\n", None,
     ":2: field 'chosen' holds a further '\\n\\nHuman:' turn"),
    # valid input in another form, or a split record not yet completed: prepare never writes these
    *[(_good(1) + json.dumps(obj).encode() + b"\n", None, f":2: {NOT_CONVENTION}") for obj in (
        {**RECORDS[0], "prompt": RECORDS[0]["prompt"][:-len("\n\nAssistant:")]},  # no final marker
        {**RECORDS[0], "prompt": RECORDS[0]["prompt"][2:]},                        # no leading "\n\n"
        {**RECORDS[0], "rejected": RECORDS[0]["rejected"].lstrip()},               # no leading space
        {"chosen": CUSS_CHOSEN, "rejected": CUSS_REJECTED},                        # hh_raw
        {"prompt": [{"role": "user", "content": "Hi"}], "chosen": [{"role": "assistant", "content": "a"}],
         "rejected": [{"role": "assistant", "content": "b"}]},                     # conversational
    )],
    (_good(2), 3, ": 2 records, but data.sizes.rm_train is 3 (a truncated or stale file)"),  # cut at a line end
    (_good(2), 2, None),
])
def test_read_split_names_file_and_line_of_a_bad_split(tmp_path: Path, content, expected, message) -> None:
    """Truncated, empty, empty or broken records, a file cut at a line boundary: one DataError line each."""
    path = tmp_path / "rm_train.jsonl"
    path.write_bytes(content)
    if message is None:
        assert len(read_split(path, expected)) == expected
        return
    with pytest.raises(DataError) as info:
        read_split(path, expected)
    text = str(info.value)
    assert text.startswith(f"{path}{message}") and "\n" not in text
    assert text.endswith("; re-run the prepare stage (dvc repro prepare)")


# --------------------------------------------------------------------------- build_splits (the prepare stage)


SIZES = {"sft_train": 2, "sft_eval": 1, "rm_train": 2, "rm_test": 1, "ppo_prompts": 1, "eval_prompts": 1,
         "judge_train": 1}  # 6 train-side + 3 test-side records
HUB_ID = "trl-lib/prefs"


def _data_params(**keys) -> config.DataParams:
    """params.data as the prepare stage gets it (validated by config.parse_params)."""
    return config.parse_params({"data": {"sizes": SIZES, **keys}}).data


def _conv_row(text: str, chosen: str = "Sure.", rejected: str = "No.") -> dict:
    return {"prompt": [{"role": "user", "content": text}], "chosen": _reply(chosen), "rejected": _reply(rejected)}


def _conv_record(text: str, chosen: str = "Sure.", rejected: str = "No.") -> dict:
    return {"prompt": f"\n\nHuman: {text}\n\nAssistant:", "chosen": " " + chosen, "rejected": " " + rejected}


def _raw_row(text: str) -> dict:
    return {"chosen": f"\n\nHuman: {text}\n\nAssistant: Sure.", "rejected": f"\n\nHuman: {text}\n\nAssistant: No."}


def _columns(rows: list[dict]) -> dict[str, list]:
    return {key: [row[key] for row in rows] for key in rows[0]}


@pytest.fixture
def fake_hub(offline, monkeypatch: pytest.MonkeyPatch):
    """`datasets.load_dataset` serving the rows put in `hub` ({split name: rows}); `calls` records (id, split)."""
    hub: dict[str, list[dict]] = {}
    calls: list[tuple[str, str]] = []

    def fake(path, **kwargs):
        calls.append((path, kwargs["split"]))
        return offline.Dataset.from_dict(_columns(hub[kwargs["split"]]))

    monkeypatch.setattr(offline, "load_dataset", fake)
    return hub, calls


def _prompts(splits: dict[str, list[dict]], names: tuple[str, ...]) -> list[str]:
    return [r["prompt"] for name in names for r in splits[name]]


def test_build_splits_hub_one_split_for_both_sides_is_one_pool(fake_hub) -> None:
    hub, calls = fake_hub
    good = [f"Question {i}?" for i in range(10)]
    hub["train"] = [*(_conv_row(q) for q in good[:5]),
                    _conv_row("Same?", "Yes.", "Yes."),                           # identical pair
                    *(_conv_row(q) for q in good[5:]),
                    {"prompt": [_reply("Hi")[0]], "chosen": _reply("a"), "rejected": _reply("b")}]  # malformed
    params = _data_params(source="hub", hub_id=HUB_ID, hub_train_split="train", hub_test_split="train",
                          on_malformed="skip")
    splits, counts = data.build_splits(params, 3)
    assert calls == [(HUB_ID, "train")]  # loaded once, shuffled and cut once
    assert counts == {"skipped": 2, "input_records": 12, "format_hh_raw": 0, "format_split": 0,
                      "format_conversational": 11, "format_conversational_implicit": 0,
                      "skipped_identical_pair": 1, "skipped_no_human_turn": 1}
    assert set(splits) == set(config.TRAIN_SPLITS + config.TEST_SPLITS)
    assert {name: len(recs) for name, recs in splits.items()} == SIZES
    prompts = _prompts(splits, config.TRAIN_SPLITS + config.TEST_SPLITS)
    assert len(prompts) == len(set(prompts)) == 9  # disjoint
    expected = [_conv_record(q) for q in good]
    assert all(r in expected for recs in splits.values() for r in recs)
    calls.clear()
    assert data.build_splits(params, 3) == (splits, counts)  # deterministic for a seed


def test_build_splits_hub_error_mode_names_the_split_and_row(fake_hub) -> None:
    hub, _ = fake_hub
    hub["train"] = [_conv_row(f"Question {i}?") for i in range(10)] + [_conv_row("Same?", "Yes.", "Yes.")]
    hub["train"].insert(4, {"prompt": [_reply("Hi")[0]], "chosen": _reply("a"), "rejected": _reply("b")})
    params = _data_params(source="hub", hub_id=HUB_ID, hub_train_split="train", hub_test_split="train")
    with pytest.raises(DataError) as info:
        data.build_splits(params, 0)
    assert str(info.value) == (f"{HUB_ID}[train] row 4: field 'prompt' must start with a user message (after an "
                               "optional system message); fix the source or set data.on_malformed: skip")
    del hub["train"][4]  # the identical pair alone is no error
    assert data.build_splits(params, 0)[1]["skipped_identical_pair"] == 1


def test_build_splits_hub_train_and_test_splits_feed_their_own_sides(fake_hub) -> None:
    hub, calls = fake_hub
    hub["train"] = [_conv_row(f"Train question {i}?") for i in range(6)] + [_conv_row("Same?", "Yes.", "Yes.")]
    hub["test"] = [_raw_row(f"Test question {i}?") for i in range(4)]
    params = _data_params(source="hub", hub_id=HUB_ID, hub_train_split="train", hub_test_split="test")
    splits, counts = data.build_splits(params, 3)
    assert calls == [(HUB_ID, "train"), (HUB_ID, "test")]
    assert counts == {"skipped": 1, "input_records": 11, "format_hh_raw": 4, "format_split": 0,
                      "format_conversational": 7, "format_conversational_implicit": 0, "skipped_identical_pair": 1}
    assert {name: len(recs) for name, recs in splits.items()} == SIZES
    train_side, test_side = _prompts(splits, config.TRAIN_SPLITS), _prompts(splits, config.TEST_SPLITS)
    assert len(set(train_side)) == len(train_side) == 6 and len(set(test_side)) == len(test_side) == 3
    assert all(p.startswith("\n\nHuman: Train question ") for p in train_side)  # only from the train rows
    assert all(p.startswith("\n\nHuman: Test question ") for p in test_side)    # only from the test rows

    hub["test"] = hub["test"][:2]  # a test split too small for the test side
    with pytest.raises(DataError) as info:
        data.build_splits(params, 3)
    assert str(info.value) == (f"{HUB_ID}[test] has 2 usable records but the splits need 3 (rm_test=1, sft_eval=1, "
                               "eval_prompts=1); lower data.sizes.* in params.yaml")


def test_build_splits_jsonl_counts_every_form(tmp_path: Path) -> None:
    path = _four_forms_file(tmp_path / "four.jsonl", ['{"chosen": 1}'])
    params = _data_params(source="jsonl", jsonl_path=str(path), on_malformed="skip")
    splits, counts = data.build_splits(params, 3)
    assert counts == {"skipped": 1, "input_records": 11, "format_hh_raw": 3, "format_split": 2,
                      "format_conversational": 1, "format_conversational_implicit": 4, "skipped_missing_field": 1}
    assert {f"format_{f}" for f in formats.FORMATS} <= set(counts)
    assert {name: len(recs) for name, recs in splits.items()} == SIZES
    drawn = Counter(json.dumps(r, sort_keys=True) for recs in splits.values() for r in recs)
    available = Counter(json.dumps(FORM_LINES[f][1], sort_keys=True) for f in FORM_ORDER)
    assert sum(drawn.values()) == 9 and not drawn - available  # each line used at most once


def test_too_few_records_says_which_rows_were_dropped(tmp_path: Path) -> None:
    """The #13 case: every row was dropped for a reason; lowering data.sizes alone cannot be the whole answer."""
    import dataclasses

    from edgerlhf.config import DataParams, SplitSizes

    same = json.dumps({"prompt": BREAD_PROMPT, "chosen": " Bake it.", "rejected": " Bake it."})
    path = _write_lines(tmp_path / "pairs.jsonl", [same, same, _raw(BREAD_CHOSEN, BREAD_REJECTED)])
    sizes = dataclasses.replace(SplitSizes(), **{n: 1 for n in SplitSizes.__dataclass_fields__})
    with pytest.raises(DataError) as info:
        data.build_splits(DataParams(source="jsonl", jsonl_path=str(path), sizes=sizes), seed=0)
    assert str(info.value).endswith("has 1 usable records but the splits need 7 (rm_test=1, sft_eval=1, "
                                    "eval_prompts=1, sft_train=1, rm_train=1, ppo_prompts=1, judge_train=1); 2 rows "
                                    "were dropped (2 identical_pair): fix those rows (or raise data.max_prompt_chars "
                                    "for prompt_too_long), or lower data.sizes.* in params.yaml")
