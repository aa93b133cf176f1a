"""Preference formats: recognise, per record, which form a dict is in and normalise it to the one internal record.

The internal record is data.py's convention: ``{"prompt": "\\n\\nHuman: ...\\n\\nAssistant:", "chosen": " ...",
"rejected": " ..."}`` (prompt = the whole dialogue up to and including the final marker, responses with their
leading space). Accepted forms (`FORMATS`), told apart by the types of the fields:

- ``hh_raw``: ``{"chosen": "\\n\\nHuman: ...\\n\\nAssistant: ...", "rejected": "..."}`` full transcripts, split at
  their LAST ``"\\n\\nAssistant:"``; both must share the dialogue before it.
- ``split``: ``{"prompt": str, "chosen": str, "rejected": str}``; the prompt with or without its leading
  ``"\\n\\n"`` and its trailing ``"\\n\\nAssistant:"``, responses with or without their leading space.
- ``conversational``: ``{"prompt": [messages], "chosen": [one assistant message], "rejected": [...]}`` (TRL).
- ``conversational_implicit``: ``{"chosen": [messages], "rejected": [messages]}``: the messages before the last
  one are the prompt and must be the same in both; the last one is the response. A ``prompt`` that is not a list
  beside message lists is ignored, as TRL's ``maybe_extract_prompt`` does (ultrafeedback_binarized ships one).

Messages are ``{"role", "content"}`` with roles user/assistant and an optional first system message; extra keys
are ignored. A user turn renders as ``"\\n\\nHuman: " + content``, an assistant turn as ``"\\n\\nAssistant: " +
content``. HH text has no system role, so a system message is put at the start of the first Human turn, followed
by a blank line: ``"\\n\\nHuman: {system}\\n\\n{first user message}"`` (an empty system message is dropped).

Rules common to every form: a prompt starts with a Human turn; a response is one assistant turn, so it is not
empty and holds no further ``"\\n\\nHuman:"`` or ``"\\n\\nAssistant:"`` (this is what catches transcripts joined
without their final marker, which a split at the last marker would cut at an earlier assistant turn). A response
gets a leading space unless it has one; nothing else is changed, so an internal record normalises to itself.
A record that breaks a rule raises `MalformedRecord` with `.reason` (a key of `REASONS`) and a one-line message.
Pairs whose chosen equals rejected are valid here; callers drop and count them (`is_identical`, `IDENTICAL`).
"""

from __future__ import annotations

from typing import Any, TypedDict

ASSISTANT_MARKER = "\n\nAssistant:"
HUMAN_MARKER = "\n\nHuman:"
FIELDS = ("prompt", "chosen", "rejected")


class Record(TypedDict):
    """One preference pair in the internal convention (a plain dict at runtime; see edgerlhf/data.py)."""

    prompt: str
    chosen: str
    rejected: str


HH_RAW = "hh_raw"
SPLIT = "split"
CONVERSATIONAL = "conversational"
CONVERSATIONAL_IMPLICIT = "conversational_implicit"
FORMATS = (HH_RAW, SPLIT, CONVERSATIONAL, CONVERSATIONAL_IMPLICIT)

REASON_NOT_OBJECT = "not_object"
REASON_MISSING_FIELD = "missing_field"
REASON_NOT_STRING = "non_string_field"
REASON_NO_MARKER = "no_assistant_marker"
REASON_EMPTY_RESPONSE = "empty_response"
REASON_PROMPT_MISMATCH = "prompt_mismatch"
REASON_MIXED_FORMS = "mixed_forms"
REASON_NO_HUMAN_TURN = "no_human_turn"
REASON_RESPONSE_HUMAN_TURN = "response_has_human_turn"
REASON_RESPONSE_ASSISTANT_TURN = "response_has_assistant_turn"
REASON_BAD_MESSAGE = "bad_message"
REASON_BAD_ROLE = "bad_role"
REASON_NOT_ONE_RESPONSE = "not_one_response"
REASON_MARKER_IN_MESSAGE = "message_has_turn_marker"
REASON_NOT_INTERNAL = "not_in_record_convention"
REASONS = (
    REASON_NOT_OBJECT, REASON_MISSING_FIELD, REASON_NOT_STRING, REASON_MIXED_FORMS, REASON_NO_MARKER,
    REASON_NO_HUMAN_TURN, REASON_EMPTY_RESPONSE, REASON_RESPONSE_HUMAN_TURN, REASON_RESPONSE_ASSISTANT_TURN,
    REASON_PROMPT_MISMATCH, REASON_BAD_MESSAGE, REASON_BAD_ROLE, REASON_NOT_ONE_RESPONSE, REASON_MARKER_IN_MESSAGE,
    REASON_NOT_INTERNAL,
)

IDENTICAL = "identical_pair"  # the count key of pairs dropped because chosen == rejected (not a malformation)


class MalformedRecord(Exception):
    """A record-level problem: `reason` is the count key (one of `REASONS`, or a reader's own), `detail` the
    human-readable one-line message."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


_TURN = {"user": HUMAN_MARKER, "assistant": ASSISTANT_MARKER}


def json_type(value: Any) -> str:
    """JSON name of a Python value's type, for error messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, (list, tuple)):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def split_at_last_turn(text: Any, what: str) -> tuple[str, str]:
    """Split one transcript (`what` names it in messages) at its last Assistant marker: (prompt incl. the marker,
    response after it); raises `MalformedRecord`."""
    if not isinstance(text, str):
        raise MalformedRecord(REASON_NOT_STRING, f"{what} must be a string (got {json_type(text)})")
    idx = text.rfind(ASSISTANT_MARKER)
    if idx < 0:
        raise MalformedRecord(REASON_NO_MARKER, f"{what} has no {ASSISTANT_MARKER!r} marker")
    cut = idx + len(ASSISTANT_MARKER)
    prompt, response = text[:cut], text[cut:]
    if not response.strip():
        raise MalformedRecord(REASON_EMPTY_RESPONSE, f"{what} has an empty response after the last "
                                                     f"{ASSISTANT_MARKER!r}")
    return prompt, response


def raw_pair(chosen: Any, rejected: Any) -> Record:
    """A record from two raw transcripts, split at their last Assistant marker; they must share their prompt."""
    prompt_c, resp_c = split_at_last_turn(chosen, "field 'chosen'")
    prompt_r, resp_r = split_at_last_turn(rejected, "field 'rejected'")
    if prompt_c != prompt_r:
        at = next((i for i, (a, b) in enumerate(zip(prompt_c, prompt_r)) if a != b), min(len(prompt_c), len(prompt_r)))
        raise MalformedRecord(REASON_PROMPT_MISMATCH, f"chosen and rejected have different prompts (first "
                                                      f"difference at character {at})")
    return {"prompt": prompt_c, "chosen": resp_c, "rejected": resp_r}


def check_internal(obj: Any) -> Record:
    """A record already in the internal convention (what prepare writes), checked as it stands: nothing may need
    completing or changing; raises `MalformedRecord`."""
    fmt, record = normalise(obj)
    if fmt != SPLIT or any(record[k] != obj[k] for k in FIELDS):
        raise MalformedRecord(REASON_NOT_INTERNAL, f"not in the record convention (a prompt from {HUMAN_MARKER!r} to "
                                                   f"a final {ASSISTANT_MARKER!r}, responses with their leading space)")
    return record


def _spaced(text: str) -> str:
    """Text with the single leading space HH-RLHF puts after a turn marker (added only when missing)."""
    return text if text.startswith(" ") else " " + text


def _prompt(text: str, what: str) -> str:
    """A text prompt in the record convention: leading "\\n\\n" and the final Assistant marker added if missing."""
    if text.startswith(HUMAN_MARKER[2:]):
        text = "\n\n" + text
    if not text.startswith(HUMAN_MARKER):
        raise MalformedRecord(REASON_NO_HUMAN_TURN, f"{what} must start with a Human turn ('Human:' or "
                                                    f"{HUMAN_MARKER!r}), not {text[:20]!r}")
    return text if text.endswith(ASSISTANT_MARKER) else text + ASSISTANT_MARKER


def _response(text: str, what: str) -> str:
    """A response in the record convention (leading space), or `MalformedRecord` if it is not one assistant turn."""
    text = _spaced(text)
    if not text.strip():
        raise MalformedRecord(REASON_EMPTY_RESPONSE, f"{what} is an empty response")
    if HUMAN_MARKER in text:
        raise MalformedRecord(REASON_RESPONSE_HUMAN_TURN, f"{what} holds a further {HUMAN_MARKER!r} turn after the "
                                                          f"last {ASSISTANT_MARKER!r}; a response is one assistant "
                                                          f"turn (was the final {ASSISTANT_MARKER!r} left out?)")
    if ASSISTANT_MARKER in text:
        raise MalformedRecord(REASON_RESPONSE_ASSISTANT_TURN, f"{what} holds a further {ASSISTANT_MARKER!r} turn; a "
                                                              f"response is one assistant turn")
    return text


def _record(prompt: str, chosen: str, rejected: str) -> Record:
    """The internal record (key order fixed, so JSONL bytes are the same whatever the input form)."""
    return {"prompt": prompt, "chosen": _response(chosen, "field 'chosen'"),
            "rejected": _response(rejected, "field 'rejected'")}


def _messages(value: list, what: str) -> list[tuple[str, str]]:
    """(role, content) of each {"role", "content"} message; a bad message or an unknown role raises."""
    out = []
    for i, msg in enumerate(value):
        where = f"{what} message {i}"
        if not isinstance(msg, dict):
            raise MalformedRecord(REASON_BAD_MESSAGE, f"{where} must be an object with 'role' and 'content' (got "
                                                      f"{json_type(msg)})")
        for key in ("role", "content"):
            if not isinstance(msg.get(key), str):
                got = json_type(msg[key]) if key in msg else "nothing"
                raise MalformedRecord(REASON_BAD_MESSAGE, f"{where} needs a string {key!r} (got {got})")
        if msg["role"] not in ("system", "user", "assistant"):
            raise MalformedRecord(REASON_BAD_ROLE, f"{where} has role {msg['role']!r}; roles are user, assistant "
                                                   f"and an optional first system")
        out.append((msg["role"], msg["content"]))
    return out


def _render(msgs: list[tuple[str, str]], what: str) -> str:
    """Prompt messages as HH text ending with the Assistant marker; the system message opens the first Human turn."""
    system = ""
    if msgs and msgs[0][0] == "system":
        system, msgs = msgs[0][1], msgs[1:]
    if not msgs or msgs[0][0] != "user":
        raise MalformedRecord(REASON_NO_HUMAN_TURN, f"{what} must start with a user message (after an optional "
                                                    f"system message)")
    if msgs[-1][0] != "user":
        raise MalformedRecord(REASON_BAD_ROLE, f"{what} must end with a user message (the response answers it)")
    parts = []
    for i, (role, content) in enumerate(msgs):
        if role == "system":
            raise MalformedRecord(REASON_BAD_ROLE, f"{what}: a system message may only come first")
        if i == 0 and system.strip():
            content = f"{system}\n\n{content}"
        if HUMAN_MARKER in content or ASSISTANT_MARKER in content:
            raise MalformedRecord(REASON_MARKER_IN_MESSAGE, f"{what}: a {role} message holds a turn marker "
                                                            f"({HUMAN_MARKER!r} or {ASSISTANT_MARKER!r})")
        parts.append(_TURN[role] + _spaced(content))
    return "".join(parts) + ASSISTANT_MARKER


def _reply(msg: tuple[str, str], what: str) -> str:
    """The content of the final message, which must be the assistant's."""
    if msg[0] != "assistant":
        raise MalformedRecord(REASON_BAD_ROLE, f"{what} must end with an assistant message (got {msg[0]!r})")
    return msg[1]


def _from_raw(chosen: Any, rejected: Any) -> Record:
    """hh_raw: split both transcripts at their last Assistant marker; the prompts must match."""
    rec = raw_pair(chosen, rejected)
    return _record(_prompt(rec["prompt"], "field 'chosen'"), rec["chosen"], rec["rejected"])


def _from_split(obj: dict) -> Record:
    """split: three strings, prompt and responses completed to the convention."""
    for key in ("prompt", "chosen", "rejected"):
        if not isinstance(obj[key], str):
            raise MalformedRecord(REASON_NOT_STRING, f"field {key!r} must be a string (got {json_type(obj[key])})")
    return _record(_prompt(obj["prompt"], "field 'prompt'"), obj["chosen"], obj["rejected"])


def _from_conversational(obj: dict) -> Record:
    """conversational: prompt messages plus exactly one assistant message each for chosen and rejected."""
    prompt = _render(_messages(obj["prompt"], "field 'prompt'"), "field 'prompt'")
    replies = []
    for key in ("chosen", "rejected"):
        msgs = _messages(obj[key], f"field {key!r}")
        if len(msgs) != 1:
            raise MalformedRecord(REASON_NOT_ONE_RESPONSE, f"field {key!r} must hold exactly one assistant message "
                                                           f"after the prompt (got {len(msgs)}); for whole "
                                                           f"dialogues leave 'prompt' out")
        replies.append(_reply(msgs[0], f"field {key!r}"))
    return _record(prompt, *replies)


def _from_implicit(obj: dict) -> Record:
    """conversational_implicit: the shared messages before the last are the prompt, the last ones the responses."""
    chosen, rejected = _messages(obj["chosen"], "field 'chosen'"), _messages(obj["rejected"], "field 'rejected'")
    for key, msgs in (("chosen", chosen), ("rejected", rejected)):
        if not msgs:
            raise MalformedRecord(REASON_BAD_MESSAGE, f"field {key!r} has no messages")
    if chosen[:-1] != rejected[:-1]:
        at = next((i for i, (a, b) in enumerate(zip(chosen, rejected)) if a != b), min(len(chosen), len(rejected)))
        raise MalformedRecord(REASON_PROMPT_MISMATCH, f"chosen and rejected differ before their last message (first "
                                                      f"difference at message {at})")
    prompt = _render(chosen[:-1], "the dialogue before the last message")
    return _record(prompt, _reply(chosen[-1], "field 'chosen'"), _reply(rejected[-1], "field 'rejected'"))


def detect(obj: Any) -> str:
    """The name (one of `FORMATS`) of the form `obj` is in, from its fields' types; raises `MalformedRecord`."""
    if not isinstance(obj, dict):
        raise MalformedRecord(REASON_NOT_OBJECT, f"expected a JSON object (got {json_type(obj)})")
    for key in ("chosen", "rejected"):
        if key not in obj:
            raise MalformedRecord(REASON_MISSING_FIELD, f"missing field {key!r} (every form needs chosen and "
                                                        f"rejected; the split form also prompt)")
    lists = [isinstance(obj[key], list) for key in ("chosen", "rejected")]
    if any(lists):
        if not all(lists):
            listed, other = ("chosen", "rejected") if lists[0] else ("rejected", "chosen")
            raise MalformedRecord(REASON_MIXED_FORMS, f"field {listed!r} is a list of messages but {other!r} is not "
                                                      f"(got {json_type(obj[other])}); use one form per record")
        return CONVERSATIONAL if isinstance(obj.get("prompt"), list) else CONVERSATIONAL_IMPLICIT
    if isinstance(obj.get("prompt"), list):
        raise MalformedRecord(REASON_MIXED_FORMS, "field 'prompt' is a list of messages but chosen and rejected are "
                                                  "not; use one form per record")
    return SPLIT if "prompt" in obj else HH_RAW


def normalise(obj: Any) -> tuple[str, Record]:
    """(format name, internal record) of one input record; raises `MalformedRecord` (reason + message) if bad."""
    fmt = detect(obj)
    if fmt == HH_RAW:
        return fmt, _from_raw(obj["chosen"], obj["rejected"])
    if fmt == SPLIT:
        return fmt, _from_split(obj)
    if fmt == CONVERSATIONAL:
        return fmt, _from_conversational(obj)
    return fmt, _from_implicit(obj)


def is_identical(record: Record) -> bool:
    """True when a normalised pair has the same chosen and rejected response (no preference to learn)."""
    return record["chosen"] == record["rejected"]
