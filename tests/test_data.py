"""Tests for edgerlhf.data: HH-RLHF splitting, local JSONL (raw/split), error/skip policy, hub failures, atomic IO.

No network: every hub call is replaced by a monkeypatched `datasets.load_dataset`.
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from pathlib import Path

import pytest

from edgerlhf import data
from edgerlhf.data import (
    format_skip_report,
    load_hh_rlhf,
    read_jsonl,
    read_split,
    records_from_transcripts,
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
    records, skipped, reasons = read_jsonl(path, "error")
    assert records == RECORDS
    assert skipped == 0
    assert reasons == Counter()


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


MALFORMED = [
    ('{"chosen": "a" "rejected": "b"}', "invalid JSON (Expecting ',' delimiter at column 16)", "invalid_json"),
    ('{"chosen": "a\tb"}', "invalid JSON (Invalid control character at column 14)", "invalid_json"),
    ('["\\n\\nHuman: a\\n\\nAssistant: b"]', "expected a JSON object (got array)", "not_object"),
    (json.dumps({"chosen": CUSS_CHOSEN}), ("missing field 'rejected' (raw form needs chosen, rejected; split "
                                           "form also prompt)"), "missing_field"),
    (json.dumps({"prompt": CUSS_PROMPT, "chosen": " a"}), ("missing field 'rejected' (split form needs prompt, "
                                                          "chosen, rejected)"), "missing_field"),
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
    (json.dumps({"prompt": "\n\nHuman: hi", "chosen": " a", "rejected": " b"}),
     "field 'prompt' must end with '\\n\\nAssistant:' (the record convention)", "no_assistant_marker"),
    (json.dumps({"chosen": CUSS_CHOSEN, "rejected": BREAD_REJECTED}),
     "chosen and rejected have different prompts (first difference at character 9)", "prompt_mismatch"),
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
    records, skipped, reasons = read_jsonl(path, "skip")
    assert records == RECORDS[:2]
    assert skipped == 1
    assert reasons == Counter({reason: 1})


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
        records, skipped, reasons = read_jsonl(path, "skip")
    assert records == [RECORDS[0], RECORDS[2]]
    assert skipped == 4
    assert reasons == Counter({"missing_field": 1, "empty_response": 1, "no_assistant_marker": 1, "invalid_json": 1})
    logged = [r.getMessage() for r in caplog.records]
    assert [m.split(": ")[0] for m in logged[:4]] == [f"skipping {path}:{n}" for n in (3, 4, 5, 7)]
    assert logged[-1] == (f"{path}: skipped 4 of 6 rows: 1 empty_response, 1 invalid_json, 1 missing_field, "
                          f"1 no_assistant_marker")


def test_prompt_too_long_is_counted_in_both_modes(tmp_path: Path) -> None:
    path = _write_lines(tmp_path / "raw.jsonl", [_raw(*p) for p in PAIRS])
    limit = len(CUSS_PROMPT)  # CUSS fits exactly; BREAD is shorter; CAFE is longer
    assert len(BREAD_PROMPT) < limit < len(CAFE_PROMPT)
    for mode in ("error", "skip"):
        records, skipped, reasons = read_jsonl(path, mode, max_prompt_chars=limit)
        assert records == RECORDS[:2]
        assert skipped == 1
        assert reasons == Counter({"prompt_too_long": 1})


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


# --------------------------------------------------------------------------- transcripts (hub rows)


def test_records_from_transcripts() -> None:
    records, skipped, reasons = records_from_transcripts(PAIRS, "error", "Anthropic/hh-rlhf[train]")
    assert records == RECORDS
    assert (skipped, reasons) == (0, Counter())


def test_records_from_transcripts_error_names_source_and_row() -> None:
    pairs = [PAIRS[0], (BREAD_CHOSEN, BREAD_PROMPT), PAIRS[2]]
    with pytest.raises(DataError) as info:
        records_from_transcripts(pairs, "error", "Anthropic/hh-rlhf[train]")
    assert str(info.value) == (
        "Anthropic/hh-rlhf[train] row 1: field 'rejected' has an empty response after the last '\\n\\nAssistant:'; "
        "fix the source or set data.on_malformed: skip")


def test_records_from_transcripts_skip_mode() -> None:
    pairs = [PAIRS[0], (BREAD_CHOSEN, None), ("only one",), (CUSS_CHOSEN, BREAD_REJECTED), PAIRS[2], PAIRS[1]]
    records, skipped, reasons = records_from_transcripts(pairs, "skip", "hh", max_prompt_chars=len(CUSS_PROMPT))
    assert records == [RECORDS[0], RECORDS[1]]
    assert skipped == 4
    assert reasons == Counter({"non_string_field": 1, "not_a_pair": 1, "prompt_mismatch": 1, "prompt_too_long": 1})


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
        load_hh_rlhf("nobody/nothing", "main", "train")
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("cannot load dataset 'nobody/nothing' (revision 'main', split 'train') (")
    first_line = (str(exc).splitlines() or [""])[0]
    assert f"({type(exc).__name__}: {first_line})" in message if first_line else f"({type(exc).__name__})" in message
    assert message.endswith(
        "to run offline use data.source: jsonl with data.jsonl_path pointing to a local file, or pre-download it into "
        "HF_HOME and set HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1")
    assert info.value.__cause__ is exc


def test_load_hh_rlhf_returns_transcript_pairs(offline, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def fake(path, **kwargs):
        calls.append((path, kwargs))
        return offline.Dataset.from_dict({"chosen": [p[0] for p in PAIRS], "rejected": [p[1] for p in PAIRS]})

    monkeypatch.setattr(offline, "load_dataset", fake)
    pairs = load_hh_rlhf("Anthropic/hh-rlhf", "abc123", "test")
    assert calls == [("Anthropic/hh-rlhf", {"revision": "abc123", "split": "test"})]
    assert pairs == PAIRS
    assert records_from_transcripts(pairs, "error", "hh").records == RECORDS


def test_load_hh_rlhf_wrong_columns(offline, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(offline, "load_dataset", lambda *a, **k: offline.Dataset.from_dict({"text": ["x"]}))
    with pytest.raises(DataError) as info:
        load_hh_rlhf("imdb", "main", "train")
    assert str(info.value) == ("dataset 'imdb' split 'train' has no chosen / rejected column (columns: text); "
                               "data.hub_id must name an HH-RLHF-style dataset")


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


def test_read_split_missing_or_corrupt_is_artifact_error(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError) as info:
        read_split(tmp_path / "rm_test.jsonl")
    assert str(info.value) == f"{tmp_path / 'rm_test.jsonl'} not found; run the prepare stage (dvc repro prepare)"
    path = _write_lines(tmp_path / "rm_test.jsonl",
                        [json.dumps(RECORDS[0]), json.dumps({"prompt": "p", "chosen": "c"})])
    with pytest.raises(ArtifactError) as info:
        read_split(path)
    assert str(info.value) == (f"{path}:2: field 'rejected' missing or not a string; re-run the prepare stage "
                               f"(dvc repro prepare)")
