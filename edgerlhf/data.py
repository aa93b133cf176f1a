"""Preference data: HH-RLHF transcripts and local JSONL into `{"prompt", "chosen", "rejected"}` records.

Record convention (every split JSONL the pipeline writes, and every record these functions return):

- ``prompt``: the whole dialogue up to and INCLUDING the final ``"\\n\\nAssistant:"`` marker, kept
  exactly as in HH-RLHF, so it starts with ``"\\n\\nHuman: ..."`` (leading newlines are not stripped)
  and ends with ``"\\n\\nAssistant:"`` (no trailing space).
- ``chosen`` / ``rejected``: the final assistant responses, i.e. the transcript text after that marker,
  kept verbatim with the leading space HH-RLHF puts there (``" Sure, ..."``).

Hence ``prompt + chosen`` is exactly HH-RLHF's raw ``chosen`` transcript. A raw transcript is split at the
LAST ``"\\n\\nAssistant:"``, so earlier assistant turns stay in the prompt. No normalisation is applied.

Malformed input never disappears silently: with ``on_malformed="error"`` the first bad row raises
`DataError` with one line naming the file and line (or source and row); with ``"skip"`` each bad row is
counted under a reason (see ``REASON_*``), logged, and returned in the skip counts. Prompts longer than
``max_prompt_chars`` are dropped under ``"prompt_too_long"`` in both modes (a filter, not an error).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Literal, NamedTuple, TypedDict

from edgerlhf.config import TEST_SPLITS, TRAIN_SPLITS
from edgerlhf.errors import ArtifactError, DataError, HubError

ASSISTANT_MARKER = "\n\nAssistant:"
FIELDS = ("prompt", "chosen", "rejected")

REASON_INVALID_JSON = "invalid_json"
REASON_INVALID_UTF8 = "invalid_utf8"
REASON_NOT_OBJECT = "not_object"
REASON_MISSING_FIELD = "missing_field"
REASON_NOT_STRING = "non_string_field"
REASON_NO_MARKER = "no_assistant_marker"
REASON_EMPTY_RESPONSE = "empty_response"
REASON_PROMPT_MISMATCH = "prompt_mismatch"
REASON_NOT_PAIR = "not_a_pair"
REASON_TOO_LONG = "prompt_too_long"

OnMalformed = Literal["error", "skip"]
_SKIP_HINT = "set data.on_malformed: skip"


class Record(TypedDict):
    """One preference pair in the convention of the module docstring (a plain dict at runtime)."""

    prompt: str
    chosen: str
    rejected: str


class LoadResult(NamedTuple):
    """Records kept plus how many rows were dropped and why; unpacks as (records, skipped, reasons)."""

    records: list[Record]
    skipped: int
    reasons: Counter[str]


class _Malformed(Exception):
    """A row-level problem: `reason` is the skip-count key, the message the human-readable detail."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


# --------------------------------------------------------------------------- splitting


def _split(text: Any, what: str) -> tuple[str, str]:
    """Split one transcript (`what` names it in messages) at its last Assistant marker, or raise `_Malformed`."""
    if not isinstance(text, str):
        raise _Malformed(REASON_NOT_STRING, f"{what} must be a string (got {_json_type(text)})")
    idx = text.rfind(ASSISTANT_MARKER)
    if idx < 0:
        raise _Malformed(REASON_NO_MARKER, f"{what} has no {ASSISTANT_MARKER!r} marker")
    cut = idx + len(ASSISTANT_MARKER)
    prompt, response = text[:cut], text[cut:]
    if not response.strip():
        raise _Malformed(REASON_EMPTY_RESPONSE, f"{what} has an empty response after the last "
                                                f"{ASSISTANT_MARKER!r}")
    return prompt, response


def _pair(chosen: Any, rejected: Any) -> Record:
    """Build a record from two raw transcripts that must share their prompt."""
    prompt_c, resp_c = _split(chosen, "field 'chosen'")
    prompt_r, resp_r = _split(rejected, "field 'rejected'")
    if prompt_c != prompt_r:
        at = next((i for i, (a, b) in enumerate(zip(prompt_c, prompt_r)) if a != b), min(len(prompt_c), len(prompt_r)))
        raise _Malformed(REASON_PROMPT_MISMATCH, f"chosen and rejected have different prompts (first difference "
                                                 f"at character {at})")
    return {"prompt": prompt_c, "chosen": resp_c, "rejected": resp_r}


def split_transcript(text: str) -> tuple[str, str]:
    """Split an HH-RLHF transcript into (prompt incl. the last "\\n\\nAssistant:", response after it).

    Raises DataError when there is no marker or the response is empty/whitespace.
    """
    try:
        return _split(text, "transcript")
    except _Malformed as exc:
        raise DataError(exc.detail) from None


def transcript_pair_to_record(chosen_transcript: str, rejected_transcript: str) -> Record:
    """Turn an HH-RLHF (chosen, rejected) transcript pair into a record; their prompts must be identical."""
    try:
        return _pair(chosen_transcript, rejected_transcript)
    except _Malformed as exc:
        raise DataError(exc.detail) from None


def _split_record(obj: dict) -> Record:
    """Validate a SPLIT-form object ({"prompt", "chosen", "rejected"}) against the record convention."""
    for key in FIELDS:
        if key not in obj:
            raise _Malformed(REASON_MISSING_FIELD, f"missing field {key!r} (split form needs prompt, chosen, rejected)")
        if not isinstance(obj[key], str):
            raise _Malformed(REASON_NOT_STRING, f"field {key!r} must be a string (got {_json_type(obj[key])})")
    if not obj["prompt"].endswith(ASSISTANT_MARKER):
        raise _Malformed(REASON_NO_MARKER, f"field 'prompt' must end with {ASSISTANT_MARKER!r} (the record "
                                           f"convention)")
    for key in ("chosen", "rejected"):
        if not obj[key].strip():
            raise _Malformed(REASON_EMPTY_RESPONSE, f"field {key!r} is an empty response")
    return {"prompt": obj["prompt"], "chosen": obj["chosen"], "rejected": obj["rejected"]}


def _object_to_record(obj: Any) -> Record:
    """Detect the form of one JSON value: SPLIT if it has "prompt", else RAW transcripts."""
    if not isinstance(obj, dict):
        raise _Malformed(REASON_NOT_OBJECT, f"expected a JSON object (got {_json_type(obj)})")
    if "prompt" in obj:
        return _split_record(obj)
    for key in ("chosen", "rejected"):
        if key not in obj:
            raise _Malformed(REASON_MISSING_FIELD, f"missing field {key!r} (raw form needs chosen, rejected; "
                                                   f"split form also prompt)")
    return _pair(obj["chosen"], obj["rejected"])


def _json_type(value: Any) -> str:
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


# --------------------------------------------------------------------------- policy


def _check_policy(on_malformed: str) -> None:
    """Reject an on_malformed value other than "error"/"skip" (config validation normally catches it)."""
    if on_malformed not in ("error", "skip"):
        raise ValueError(f"on_malformed must be 'error' or 'skip' (got {on_malformed!r})")


def _collect(rows: Iterable[tuple[str, Any]], on_malformed: OnMalformed, fix: str, source: str,
             max_prompt_chars: int | None) -> LoadResult:
    """Apply the error/skip policy and the prompt-length filter to rows of (location, record or `_Malformed`).

    `fix` is the hint put in error messages before the on_malformed hint; `source` names the rows in the report.
    """
    _check_policy(on_malformed)
    log = logging.getLogger(__name__)
    records: list[Record] = []
    reasons: Counter[str] = Counter()
    seen = 0
    for where, result in rows:
        seen += 1
        if isinstance(result, _Malformed):
            if on_malformed == "error":
                raise DataError(f"{where}: {result.detail}; {fix} or {_SKIP_HINT}")
            reasons[result.reason] += 1
            log.warning("skipping %s: %s", where, result.detail)
            continue
        if max_prompt_chars is not None and len(result["prompt"]) > max_prompt_chars:
            reasons[REASON_TOO_LONG] += 1
            continue
        records.append(result)
    skipped = sum(reasons.values())
    if skipped:
        log.warning("%s", format_skip_report(source, seen, reasons, max_prompt_chars))
    return LoadResult(records, skipped, reasons)


def format_skip_report(source: str, total: int, reasons: Counter[str] | dict[str, int],
                       max_prompt_chars: int | None = None) -> str:
    """One line saying how many of `total` rows from `source` were skipped and why (for logs and reports)."""
    skipped = sum(reasons.values())
    parts = []
    for reason, n in sorted(reasons.items()):
        label = f"{reason} (> {max_prompt_chars} chars)" if reason == REASON_TOO_LONG and max_prompt_chars else reason
        parts.append(f"{n} {label}")
    detail = ": " + ", ".join(parts) if parts else ""
    return f"{source}: skipped {skipped} of {total} rows{detail}"


# --------------------------------------------------------------------------- local JSONL


def _iter_lines(path: Path) -> Iterator[tuple[int, bytes]]:
    """Yield (1-based line number, raw line) splitting on b"\\n" only, so U+2028 inside text is safe."""
    with path.open("rb") as fh:
        for lineno, line in enumerate(fh, start=1):
            if lineno == 1 and line.startswith(b"\xef\xbb\xbf"):
                line = line[3:]
            yield lineno, line


def _parse_line(line: bytes) -> Any:
    """Decode and parse one JSONL line, raising `_Malformed` for bad UTF-8 or bad JSON."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _Malformed(REASON_INVALID_UTF8, f"invalid UTF-8 (byte {exc.start})") from None
    try:
        return json.loads(text.rstrip("\r\n"))
    except json.JSONDecodeError as exc:
        msg = exc.msg.removesuffix(" at")  # "Unterminated string starting at" + " at column N"
        raise _Malformed(REASON_INVALID_JSON, f"invalid JSON ({msg} at column {exc.colno})") from None


def read_jsonl(path: str | Path, on_malformed: OnMalformed = "error", *,
               max_prompt_chars: int | None = None) -> LoadResult:
    """Read a local preference JSONL (RAW {"chosen","rejected"} transcripts or SPLIT records, per line).

    Blank lines are ignored. Malformed lines raise DataError "<path>:<line>: <what>" or, with
    on_malformed="skip", are counted by reason. Returns (records, skipped, reasons).
    """
    _check_policy(on_malformed)
    p = Path(path)
    if not p.is_file():
        what = "is a directory, not a file" if p.is_dir() else "not found"
        raise DataError(f"{path}: {what}; set data.jsonl_path to an existing JSONL file")

    def rows() -> Iterator[tuple[str, Any]]:
        for lineno, line in _iter_lines(p):
            if not line.strip():
                continue
            try:
                yield f"{path}:{lineno}", _object_to_record(_parse_line(line))
            except _Malformed as exc:
                yield f"{path}:{lineno}", exc

    try:
        return _collect(rows(), on_malformed, "fix the line", str(path), max_prompt_chars)
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror or exc}); check data.jsonl_path") from None


# --------------------------------------------------------------------------- HH-RLHF from the hub


def load_hh_rlhf(hub_id: str, revision: str, split: str) -> list[tuple[str, str]]:
    """Load (chosen, rejected) raw transcripts of one split from the hub (or the HF cache when offline).

    Any hub failure becomes one HubError line saying how to run without the network.
    """
    import datasets  # lazy: importing datasets is slow and only this source needs it

    try:
        ds = datasets.load_dataset(hub_id, revision=revision, split=split)
    except Exception as exc:  # every hub/cache failure ends the stage with the same advice
        cause = (str(exc).strip().splitlines() or [""])[0]
        cause = f"{type(exc).__name__}: {cause}" if cause else type(exc).__name__
        raise HubError(
            f"cannot load dataset {hub_id!r} (revision {revision!r}, split {split!r}) ({cause}); to run offline "
            f"use data.source: jsonl with data.jsonl_path pointing to a local file, or pre-download it into "
            f"HF_HOME and set HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1"
        ) from exc
    columns = list(getattr(ds, "column_names", None) or [])
    missing = [c for c in ("chosen", "rejected") if c not in columns]
    if missing:
        raise DataError(f"dataset {hub_id!r} split {split!r} has no {' / '.join(missing)} column (columns: "
                        f"{', '.join(columns) or 'none'}); data.hub_id must name an HH-RLHF-style dataset")
    return list(zip(ds["chosen"], ds["rejected"]))


def records_from_transcripts(pairs: Iterable[Any], on_malformed: OnMalformed = "error", source_name: str = "data",
                             *, max_prompt_chars: int | None = None) -> LoadResult:
    """Split (chosen, rejected) transcript pairs into records with the same error/skip policy as read_jsonl.

    Errors name `source_name` and the 0-based row index. Returns (records, skipped, reasons).
    """

    def rows() -> Iterator[tuple[str, Any]]:
        for i, pair in enumerate(pairs):
            where = f"{source_name} row {i}"
            try:
                if not isinstance(pair, (tuple, list)) or len(pair) != 2:
                    raise _Malformed(REASON_NOT_PAIR, f"expected a (chosen, rejected) pair (got {_json_type(pair)})")
                yield where, _pair(pair[0], pair[1])
            except _Malformed as exc:
                yield where, exc

    return _collect(rows(), on_malformed, "fix the source", source_name, max_prompt_chars)


# --------------------------------------------------------------------------- split files


def write_jsonl(path: str | Path, records: Iterable[dict[str, Any]]) -> int:
    """Atomically write records as UTF-8 JSONL (one object per line); returns the number written.

    Writes a temp file in the same directory and os.replace()s it, so readers never see a partial file.
    """
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=f".{p.name}.", suffix=".tmp")
    n = 0
    try:
        with os.fdopen(fd, "wb") as fh:
            for rec in records:
                fh.write(json.dumps(rec, ensure_ascii=False).encode("utf-8") + b"\n")
                n += 1
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, p)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return n


def read_split(path: str | Path) -> list[Record]:
    """Read a split JSONL written by the prepare stage; a missing or corrupt file is an ArtifactError."""
    p = Path(path)
    if not p.is_file():
        raise ArtifactError(f"{path} not found; run the prepare stage (dvc repro prepare)")
    out: list[Record] = []
    for lineno, line in _iter_lines(p):
        if not line.strip():
            continue
        try:
            obj = _parse_line(line)
            if not isinstance(obj, dict):
                raise _Malformed(REASON_NOT_OBJECT, f"expected a JSON object (got {_json_type(obj)})")
            for key in FIELDS:
                if not isinstance(obj.get(key), str):
                    raise _Malformed(REASON_MISSING_FIELD, f"field {key!r} missing or not a string")
        except _Malformed as exc:
            raise ArtifactError(
                f"{path}:{lineno}: {exc.detail}; re-run the prepare stage (dvc repro prepare)") from None
        out.append(obj)  # type: ignore[arg-type]
    return out


# --------------------------------------------------------------------------- the prepare stage's splits


def _allocate(pool: list[Record], names: tuple[str, ...], sizes: dict[str, int], source: str) -> dict[str, list]:
    """Cut disjoint consecutive slices of a shuffled pool, one per split; too few records is a DataError."""
    need = sum(sizes[n] for n in names)
    if need > len(pool):
        wanted = ", ".join(f"{n}={sizes[n]}" for n in names)
        raise DataError(f"{source} has {len(pool)} usable records but the splits need {need} ({wanted}); "
                        "lower data.sizes.* in params.yaml")
    out, start = {}, 0
    for n in names:
        out[n] = pool[start:start + sizes[n]]
        start += sizes[n]
    return out


def build_splits(data_params: Any, seed: int) -> tuple[dict[str, list[Record]], dict[str, Any]]:
    """Every split of the pipeline as records, from the source params name, plus counts for metrics/data.json.

    Splits are disjoint: hh-rlhf cuts the train splits from its `train` set and the test-side splits
    (rm_test, sft_eval, eval_prompts) from its `test` set; a local JSONL is shuffled and cut once; the
    synthetic task draws each split from its own seeded stream."""
    import random

    from edgerlhf import synthetic

    sizes = {k: getattr(data_params.sizes, k) for k in data_params.sizes.__dataclass_fields__}
    skipped: Counter[str] = Counter()
    total_in = 0
    if data_params.source == "synthetic":
        splits = {n: synthetic.generate_split(sizes[n], seed, n) for n in TRAIN_SPLITS + TEST_SPLITS}
        return splits, {"skipped": 0, "input_records": sum(len(v) for v in splits.values())}

    pools: dict[str, list[Record]] = {}
    if data_params.source == "hh-rlhf":
        for part in ("train", "test"):
            pairs = load_hh_rlhf(data_params.hub_id, data_params.hub_revision, part)
            total_in += len(pairs)
            res = records_from_transcripts(pairs, data_params.on_malformed, f"{data_params.hub_id}[{part}]",
                                           max_prompt_chars=data_params.max_prompt_chars)
            skipped.update(res.reasons)
            pools[part] = res.records
    else:
        res = read_jsonl(data_params.jsonl_path, data_params.on_malformed,
                         max_prompt_chars=data_params.max_prompt_chars)
        total_in = len(res.records) + res.skipped
        skipped.update(res.reasons)
        pool = list(res.records)
        random.Random(seed).shuffle(pool)
        splits = _allocate(pool, TEST_SPLITS + TRAIN_SPLITS, sizes, str(data_params.jsonl_path))
        return splits, {"skipped": sum(skipped.values()), "input_records": total_in,
                        **{f"skipped_{k}": v for k, v in sorted(skipped.items())}}
    for part in pools:
        random.Random(f"{seed}/{part}").shuffle(pools[part])
    splits = {**_allocate(pools["train"], TRAIN_SPLITS, sizes, f"{data_params.hub_id}[train]"),
              **_allocate(pools["test"], TEST_SPLITS, sizes, f"{data_params.hub_id}[test]")}
    return splits, {"skipped": sum(skipped.values()), "input_records": total_in,
                    **{f"skipped_{k}": v for k, v in sorted(skipped.items())}}


def pretraining_corpus(source: str, splits: dict[str, list[Record]], knowledge_repeats: int) -> list[str]:
    """Texts the offline (tiny) base is pretrained and its tokenizer trained on: the training dialogues
    (both responses of each pair, never test-side splits) plus, for the synthetic task, its fact
    statements repeated `knowledge_repeats` times. Unused by the hub model, which is already pretrained."""
    from edgerlhf import synthetic

    texts = [r["prompt"] + r[k] for name in TRAIN_SPLITS for r in splits[name] for k in ("chosen", "rejected")]
    if source == "synthetic":
        texts += [" " + fact for fact in synthetic.knowledge_corpus()] * knowledge_repeats
    return texts


def split_stats(splits: dict[str, list[Record]]) -> dict[str, float]:
    """Counts and mean character lengths per split, for metrics/data.json (numbers only)."""
    out: dict[str, float] = {}
    for name, recs in splits.items():
        out[f"{name}_count"] = len(recs)
        for key in FIELDS:
            if recs:
                out[f"{name}_mean_{key}_chars"] = round(sum(len(r[key]) for r in recs) / len(recs), 3)
    return out


def read_corpus(path: str | Path) -> list[str]:
    """The pretraining corpus written by the prepare stage (JSONL of {"text"})."""
    p = Path(path)
    if not p.is_file():
        raise ArtifactError(f"{path} not found; run the prepare stage (dvc repro prepare)")
    return [json.loads(line)["text"] for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
