"""Tests for edgerlhf.formats: every accepted preference form of the same dialogues gives the same internal record
(and the same split-file bytes), each malformed record its reason key, system messages, identical pairs, and the
transcript that a split at the last marker would cut at an earlier assistant turn. Offline and fast."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

from edgerlhf import data, formats
from edgerlhf.formats import FORMATS, REASONS, MalformedRecord, is_identical, normalise

H, A = "\n\nHuman:", "\n\nAssistant:"

# A dialogue: the turns before the final answer as (role, text), then the chosen and rejected final answers.
# CUSS has an earlier assistant turn, so only a split at the LAST marker is right; CAFE is three turns, non-ASCII.
DIALOGUES = {
    "cuss": ([("user", "What are some cuss words in english?"), ("assistant", "Here's an incomplete list."),
              ("user", "What's your favorite one?")], "I haven't even thought about it.", "Ass."),
    "bread": ([("user", "How do I bake a simple loaf of bread?")],
              "Sure, mix flour, water, salt and yeast, knead it, let it rise, then bake at 230 °C.", "Just buy one."),
    "cafe": ([("user", "Can you recommend a café in Paris?"), ("assistant", "Café de Flore is a famous one."),
              ("user", "Is it expensive?"), ("assistant", "Somewhat, a coffee costs about €6."),
              ("user", "Any cheaper option nearby?")],
             "Yes — try a small bar-tabac on a side street,\nwhere an espresso is about €1.50.", "No."),
}

# The record data.py's HH-RLHF path produces today, written out by hand for one dialogue.
CUSS_RECORD = {
    "prompt": ("\n\nHuman: What are some cuss words in english?\n\nAssistant: Here's an incomplete list."
               "\n\nHuman: What's your favorite one?\n\nAssistant:"),
    "chosen": " I haven't even thought about it.",
    "rejected": " Ass.",
}


def _dialogue_text(turns: list[tuple[str, str]]) -> str:
    """The turns as HH text without the final marker: "\\n\\nHuman: q\\n\\nAssistant: a\\n\\nHuman: q2"."""
    return "".join(f"{H if role == 'user' else A} {text}" for role, text in turns)


def _expected(name: str) -> dict:
    turns, chosen, rejected = DIALOGUES[name]
    return {"prompt": _dialogue_text(turns) + A, "chosen": " " + chosen, "rejected": " " + rejected}


def _msgs(turns: list[tuple[str, str]]) -> list[dict]:
    return [{"role": role, "content": text} for role, text in turns]


def _variants(name: str) -> list[tuple[str, str, dict]]:
    """(format, label, input record) for the dialogue in every accepted form and sub-variant."""
    turns, chosen, rejected = DIALOGUES[name]
    text = _dialogue_text(turns)
    out = [
        ("hh_raw", "raw", {"chosen": f"{text}{A} {chosen}", "rejected": f"{text}{A} {rejected}"}),
        ("hh_raw", "raw without leading newlines", {"chosen": f"{text[2:]}{A} {chosen}",
                                                    "rejected": f"{text[2:]}{A} {rejected}"}),
    ]
    for lead in (True, False):
        for marker in (True, False):
            for space in (True, False):
                prompt = (text if lead else text[2:]) + (A if marker else "")
                sp = " " if space else ""
                label = f"split lead={lead} marker={marker} space={space}"
                out.append(("split", label, {"prompt": prompt, "chosen": sp + chosen, "rejected": sp + rejected}))
    reply_c, reply_r = [{"role": "assistant", "content": chosen}], [{"role": "assistant", "content": rejected}]
    out += [
        ("conversational", "conversational", {"prompt": _msgs(turns), "chosen": reply_c, "rejected": reply_r}),
        ("conversational_implicit", "implicit", {"chosen": _msgs(turns) + reply_c, "rejected": _msgs(turns) + reply_r}),
        ("conversational_implicit", "implicit with a string prompt (ignored, as in TRL)",
         {"prompt": turns[-1][1], "chosen": _msgs(turns) + reply_c, "rejected": _msgs(turns) + reply_r}),
        ("conversational", "conversational with extra keys", {
            "id": 7, "prompt": [{**m, "name": "x"} for m in _msgs(turns)], "chosen": reply_c, "rejected": reply_r}),
    ]
    return out


# --------------------------------------------------------------------------- every form, one record


def test_expected_record_is_data_py_hh_form() -> None:
    """The target is exactly what data.py's HH-RLHF path produces today (hand-written for one dialogue)."""
    assert _expected("cuss") == CUSS_RECORD
    raw = _variants("cuss")[0][2]
    assert data.transcript_pair_to_record(raw["chosen"], raw["rejected"]) == CUSS_RECORD


@pytest.mark.parametrize("name", sorted(DIALOGUES))
def test_every_form_normalises_to_the_same_record(name: str) -> None:
    expected = _expected(name)
    seen = set()
    for fmt, label, obj in _variants(name):
        got_fmt, rec = normalise(json.loads(json.dumps(obj, ensure_ascii=False)))  # as read from a JSONL line
        assert (got_fmt, rec) == (fmt, expected), label
        assert list(rec) == ["prompt", "chosen", "rejected"], label
        seen.add(got_fmt)
    assert seen == set(FORMATS)


def test_every_form_gives_byte_identical_split_files(tmp_path: Path) -> None:
    """The same dialogues in each form, one input JSONL per form, through prepare's own path (build_splits, then
    write_jsonl of every split): byte-identical split files."""
    import dataclasses

    from edgerlhf.config import DataParams, SplitSizes

    by_label: dict[str, list[dict]] = {}
    for name in sorted(DIALOGUES):
        for _, label, obj in _variants(name):
            by_label.setdefault(label, []).append(obj)
    sizes = {"sft_train": 1, "sft_eval": 0, "rm_train": 1, "rm_test": 1, "ppo_prompts": 0, "eval_prompts": 0,
             "judge_train": 0}
    blobs = set()
    for i, (_, objs) in enumerate(sorted(by_label.items())):
        source = tmp_path / f"in{i}.jsonl"
        source.write_text("".join(json.dumps(o, ensure_ascii=False) + "\n" for o in objs), encoding="utf-8")
        # three dialogues: most splits empty (below params validation's minimum of 1, fine for the data path)
        params = DataParams(source="jsonl", jsonl_path=str(source), sizes=dataclasses.replace(SplitSizes(), **sizes))
        splits, counts = data.build_splits(params, seed=3)
        assert counts["input_records"] == len(DIALOGUES) and counts["skipped"] == 0
        out = tmp_path / f"out{i}"
        for split, records in splits.items():
            data.write_jsonl(out / f"{split}.jsonl", records)
        blobs.add(b"|".join((out / f"{split}.jsonl").read_bytes() for split in sorted(splits)))
    assert len(by_label) == len(_variants("cuss")) and len(blobs) == 1
    assert sorted(blobs.pop().replace(b"|", b"").splitlines()) == sorted(
        json.dumps(_expected(n), ensure_ascii=False).encode() for n in DIALOGUES)


@pytest.mark.parametrize("name", sorted(DIALOGUES))
def test_internal_record_is_a_fixed_point_and_round_trips(name: str, tmp_path: Path) -> None:
    """An internal record is the split form unchanged; prompt + response splits back at the last marker."""
    rec = _expected(name)
    assert normalise(rec) == ("split", rec)
    assert formats.check_internal(rec) == rec  # what read_split checks in the split files
    data.write_jsonl(tmp_path / "split.jsonl", [rec])
    assert data.read_split(tmp_path / "split.jsonl", 1) == [rec]
    for key in ("chosen", "rejected"):
        assert data.split_transcript(rec["prompt"] + rec[key]) == (rec["prompt"], rec[key])
    assert normalise({"chosen": rec["prompt"] + rec["chosen"], "rejected": rec["prompt"] + rec["rejected"]}) == \
        ("hh_raw", rec)


@pytest.mark.parametrize("name", sorted(DIALOGUES))
def test_check_internal_accepts_only_the_internal_record(name: str) -> None:
    """check_internal (read_split's check) takes a record only as prepare writes it: every other accepted form, and
    a split record that normalise would still complete, is rejected with one message."""
    expected = _expected(name)
    accepted = []
    for _, label, obj in _variants(name):
        if obj == expected:
            assert formats.check_internal(obj) == expected, label
            accepted.append(label)
            continue
        with pytest.raises(MalformedRecord) as info:
            formats.check_internal(obj)
        assert str(info.value) == ("not in the record convention (a prompt from '\\n\\nHuman:' to a final "
                                   "'\\n\\nAssistant:', responses with their leading space)"), label
        assert info.value.reason == formats.REASON_NOT_INTERNAL, label
    assert accepted == ["split lead=True marker=True space=True"]
    with pytest.raises(MalformedRecord) as info:  # a malformed record keeps its own reason and message
        formats.check_internal({**expected, "chosen": ""})
    assert (info.value.reason, str(info.value)) == ("empty_response", "field 'chosen' is an empty response")


def test_mixed_forms_per_record() -> None:
    """The form is recognised per record: a list of differently formed records normalises record by record."""
    objs = [_variants("cuss")[0][2], _variants("bread")[-3][2], _variants("cafe")[5][2]]
    assert [normalise(o) for o in objs] == [("hh_raw", _expected("cuss")), ("conversational_implicit",
                                            _expected("bread")), ("split", _expected("cafe"))]


# --------------------------------------------------------------------------- system messages


SYSTEM_PROMPT = "\n\nHuman: You are terse.\n\nHow do I bake bread?\n\nAssistant:"


@pytest.mark.parametrize("obj", [
    {"prompt": [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "How do I bake bread?"}],
     "chosen": [{"role": "assistant", "content": "Knead, rise, bake."}],
     "rejected": [{"role": "assistant", "content": "Buy it."}]},
    {"chosen": [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "How do I bake bread?"},
                {"role": "assistant", "content": "Knead, rise, bake."}],
     "rejected": [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "How do I bake bread?"},
                  {"role": "assistant", "content": "Buy it."}]},
], ids=["explicit", "implicit"])
def test_system_message_opens_the_first_human_turn(obj: dict) -> None:
    _, rec = normalise(obj)
    assert rec == {"prompt": SYSTEM_PROMPT, "chosen": " Knead, rise, bake.", "rejected": " Buy it."}
    # the same as the split form with the system text written into the first Human turn
    assert normalise({"prompt": "Human: You are terse.\n\nHow do I bake bread?", "chosen": "Knead, rise, bake.",
                      "rejected": "Buy it."})[1] == rec


def test_system_message_in_a_later_turn_only_first_human_turn_gets_it() -> None:
    turns = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi"},
             {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Bye"}]
    _, rec = normalise({"prompt": turns, "chosen": [{"role": "assistant", "content": "Bye!"}],
                        "rejected": [{"role": "assistant", "content": "Go."}]})
    assert rec["prompt"] == "\n\nHuman: Be kind.\n\nHi\n\nAssistant: Hello\n\nHuman: Bye\n\nAssistant:"


@pytest.mark.parametrize("system", ["", "  "])
def test_empty_system_message_is_dropped(system: str) -> None:
    obj = {"prompt": [{"role": "system", "content": system}, {"role": "user", "content": "Hi"}],
           "chosen": [{"role": "assistant", "content": "Hello."}],
           "rejected": [{"role": "assistant", "content": "No."}]}
    assert normalise(obj)[1]["prompt"] == "\n\nHuman: Hi\n\nAssistant:"


# --------------------------------------------------------------------------- identical pairs


@pytest.mark.parametrize("obj", [
    {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello.", "rejected": "\n\nHuman: Hi\n\nAssistant: Hello."},
    {"prompt": "Human: Hi", "chosen": "Hello.", "rejected": " Hello."},  # identical once normalised
    {"chosen": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}],
     "rejected": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": " Hello."}]},
], ids=["raw", "split", "implicit"])
def test_identical_pairs_are_valid_and_detected(obj: dict) -> None:
    _, rec = normalise(obj)
    assert rec == {"prompt": "\n\nHuman: Hi\n\nAssistant:", "chosen": " Hello.", "rejected": " Hello."}
    assert is_identical(rec)


def test_different_pairs_are_not_identical() -> None:
    assert not any(is_identical(_expected(n)) for n in DIALOGUES)
    assert not is_identical({"prompt": "\n\nHuman: Hi\n\nAssistant:", "chosen": " Hello.", "rejected": " Hello. "})
    assert formats.IDENTICAL not in REASONS  # a filter the caller counts, not a malformation


# --------------------------------------------------------------------------- the 698-of-700 bug


def test_transcripts_joined_without_final_marker_are_malformed() -> None:
    """Split-form prompts ("Human: ..." without "\\n\\nAssistant:") joined to their responses by plain
    concatenation: the last marker is an EARLIER assistant turn, and the would-be response holds a Human turn."""
    rows = []
    for name in sorted(DIALOGUES):
        turns, chosen, rejected = DIALOGUES[name]
        prompt = _dialogue_text(turns)[2:]  # the public split copy's prompt
        rows.append((name, {"chosen": prompt + " " + chosen, "rejected": prompt + " " + rejected}))
    reasons = {}
    for name, obj in rows:
        with pytest.raises(MalformedRecord) as info:
            normalise(obj)
        reasons[name] = info.value.reason
    # multi-turn: cut at an earlier assistant turn -> caught; single-turn: no marker at all
    assert reasons == {"cuss": "response_has_human_turn", "cafe": "response_has_human_turn",
                       "bread": "no_assistant_marker"}
    # data.py's splitter alone accepts the bad multi-turn row: the response it returns holds a Human turn
    _, response = data.split_transcript(rows[1][1]["chosen"])
    assert H in response


def test_no_accepted_record_has_a_turn_in_its_response() -> None:
    for name in DIALOGUES:
        for _, label, obj in _variants(name):
            rec = normalise(obj)[1]
            assert rec["prompt"].startswith(H) and rec["prompt"].endswith(A), label
            for key in ("chosen", "rejected"):
                assert H not in rec[key] and A not in rec[key] and rec[key].startswith(" "), label


# --------------------------------------------------------------------------- malformed records


U = {"role": "user", "content": "Hi"}
R1, R2 = {"role": "assistant", "content": "Hello."}, {"role": "assistant", "content": "Go away."}
RAW_OK = "\n\nHuman: Hi\n\nAssistant: Hello."

MALFORMED = [
    ("not an object", ["x"], "not_object"),
    ("no rejected", {"chosen": RAW_OK}, "missing_field"),
    ("no chosen", {"prompt": "Human: Hi", "rejected": "No."}, "missing_field"),
    ("raw null", {"chosen": RAW_OK, "rejected": None}, "non_string_field"),
    ("split number prompt", {"prompt": 3, "chosen": "a", "rejected": "b"}, "non_string_field"),
    ("split null response", {"prompt": "Human: Hi", "chosen": "a", "rejected": None}, "non_string_field"),
    ("list and string", {"chosen": [U, R1], "rejected": RAW_OK}, "mixed_forms"),
    ("string and list", {"chosen": RAW_OK, "rejected": [U, R1]}, "mixed_forms"),
    ("list prompt, string responses", {"prompt": [U], "chosen": "a", "rejected": "b"}, "mixed_forms"),
    ("raw no marker", {"chosen": "Human: hi\nAssistant: yo", "rejected": "Human: hi\nAssistant: no"},
     "no_assistant_marker"),
    ("raw not human", {"chosen": "\n\nAssistant: Hi\n\nAssistant: a", "rejected": "\n\nAssistant: Hi\n\nAssistant: b"},
     "no_human_turn"),
    ("split plain prompt", {"prompt": "What is bread?", "chosen": "a", "rejected": "b"}, "no_human_turn"),
    ("split empty prompt", {"prompt": "", "chosen": "a", "rejected": "b"}, "no_human_turn"),
    ("split lowercase human", {"prompt": "\n\nhuman: hi", "chosen": "a", "rejected": "b"}, "no_human_turn"),
    ("conversational starts with assistant", {"prompt": [R1, U], "chosen": [R1], "rejected": [R2]}, "no_human_turn"),
    ("conversational empty prompt", {"prompt": [], "chosen": [R1], "rejected": [R2]}, "no_human_turn"),
    ("implicit without prompt", {"chosen": [R1], "rejected": [R2]}, "no_human_turn"),
    ("raw empty response", {"chosen": RAW_OK, "rejected": "\n\nHuman: Hi\n\nAssistant:  "}, "empty_response"),
    ("split empty response", {"prompt": "Human: Hi", "chosen": "", "rejected": "b"}, "empty_response"),
    ("conversational empty reply", {"prompt": [U], "chosen": [R1], "rejected": [{**R2, "content": "\n"}]},
     "empty_response"),
    ("split response with human turn", {"prompt": "Human: Hi", "chosen": "Hello.\n\nHuman: and?", "rejected": "b"},
     "response_has_human_turn"),
    ("conversational reply with human turn",
     {"prompt": [U], "chosen": [R1], "rejected": [{**R2, "content": "No.\n\nHuman: why"}]}, "response_has_human_turn"),
    ("split response with assistant turn",
     {"prompt": "Human: Hi", "chosen": "Hello.", "rejected": "b\n\nAssistant: c"}, "response_has_assistant_turn"),
    ("raw diverges before last turn", {
        "chosen": "\n\nHuman: Hi\n\nAssistant: Hello.\n\nHuman: Bye\n\nAssistant: Bye!",
        "rejected": "\n\nHuman: Hi\n\nAssistant: Go away.\n\nHuman: Bye\n\nAssistant: Bye!"}, "prompt_mismatch"),
    ("raw different lengths", {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello.\n\nHuman: Bye\n\nAssistant: Bye!",
                               "rejected": RAW_OK}, "prompt_mismatch"),
    ("implicit diverges", {"chosen": [U, R1, U, R1], "rejected": [U, R2, U, R1]}, "prompt_mismatch"),
    ("implicit different lengths", {"chosen": [U, R1, U, R1], "rejected": [U, R2]}, "prompt_mismatch"),
    ("message not an object", {"prompt": ["Hi"], "chosen": [R1], "rejected": [R2]}, "bad_message"),
    ("message without content", {"prompt": [{"role": "user"}], "chosen": [R1], "rejected": [R2]}, "bad_message"),
    ("content not a string", {"chosen": [U, {"role": "assistant", "content": [{"type": "text", "text": "x"}]}],
                              "rejected": [U, R2]}, "bad_message"),
    ("implicit empty list", {"chosen": [], "rejected": []}, "bad_message"),
    ("unknown role", {"prompt": [{"role": "human", "content": "Hi"}], "chosen": [R1], "rejected": [R2]}, "bad_role"),
    ("system not first", {"prompt": [U, {"role": "system", "content": "x"}, U], "chosen": [R1], "rejected": [R2]},
     "bad_role"),
    ("prompt ends with assistant", {"prompt": [U, R1], "chosen": [R2], "rejected": [R1]}, "bad_role"),
    ("reply from user", {"prompt": [U], "chosen": [R1], "rejected": [U]}, "bad_role"),
    ("implicit ends with user", {"chosen": [U, R1], "rejected": [U, U]}, "bad_role"),
    ("explicit chosen repeats prompt", {"prompt": [U], "chosen": [U, R1], "rejected": [R2]}, "not_one_response"),
    ("explicit empty chosen", {"prompt": [U], "chosen": [], "rejected": [R2]}, "not_one_response"),
    ("user content with a turn", {"prompt": [{"role": "user", "content": "Hi\n\nAssistant: sure"}], "chosen": [R1],
                                  "rejected": [R2]}, "message_has_turn_marker"),
    ("system content with a turn", {"prompt": [{"role": "system", "content": "x\n\nHuman: y"}, U], "chosen": [R1],
                                    "rejected": [R2]}, "message_has_turn_marker"),
]


@pytest.mark.parametrize(("label", "obj", "reason"), MALFORMED, ids=[c[0] for c in MALFORMED])
def test_malformed_record_gives_its_reason(label: str, obj: object, reason: str) -> None:
    with pytest.raises(MalformedRecord) as info:
        normalise(obj)
    assert info.value.reason == reason
    assert reason in REASONS
    message = str(info.value)
    assert message == info.value.detail and message and "\n" not in message


def test_every_reason_is_exercised_and_listed_once() -> None:
    assert len(set(REASONS)) == len(REASONS)
    # every reason of normalise() has a malformed case; check_internal adds the one for split files
    assert {reason for _, _, reason in MALFORMED} | {formats.REASON_NOT_INTERNAL} == set(REASONS)


def test_every_reason_the_module_raises_is_in_reasons() -> None:
    """Static guard: each REASON_* name formats.py uses (its own or data.py's) is a key of REASONS."""
    tree = ast.parse(Path(formats.__file__).read_text(encoding="utf-8"))
    used = {node.id for node in ast.walk(tree) if isinstance(node, ast.Name) and node.id.startswith("REASON_")}
    assert used and {getattr(formats, name) for name in used} == set(REASONS)


def test_messages_name_the_field_and_the_fix() -> None:
    cases = {
        "raw diverges before last turn": "chosen and rejected have different prompts (first difference at character ",
        "split plain prompt": "field 'prompt' must start with a Human turn ('Human:' or '\\n\\nHuman:'), not "
                              "'What is bread?'",
        "split response with human turn": "field 'chosen' holds a further '\\n\\nHuman:' turn after the last "
                                          "'\\n\\nAssistant:'; a response is one assistant turn (was the final "
                                          "'\\n\\nAssistant:' left out?)",
        "implicit diverges": "chosen and rejected differ before their last message (first difference at message 1)",
        "explicit chosen repeats prompt": "field 'chosen' must hold exactly one assistant message after the prompt "
                                          "(got 2); for whole dialogues leave 'prompt' out",
        "list and string": "field 'chosen' is a list of messages but 'rejected' is not (got string); use one form per "
                           "record",
        "message without content": "field 'prompt' message 0 needs a string 'content' (got nothing)",
        "unknown role": "field 'prompt' message 0 has role 'human'; roles are user, assistant and an optional first "
                        "system",
    }
    by_label = {label: obj for label, obj, _ in MALFORMED}
    for label, start in cases.items():
        with pytest.raises(MalformedRecord) as info:
            normalise(by_label[label])
        assert str(info.value).startswith(start), label


def test_formats_are_listed_once() -> None:
    assert FORMATS == ("hh_raw", "split", "conversational", "conversational_implicit")
    assert formats.detect({"chosen": "x", "rejected": "y"}) == "hh_raw"
