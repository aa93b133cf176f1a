"""Preference data in the formats people have, normalised to one `{"prompt", "chosen", "rejected"}` record.

Record convention (every split JSONL the pipeline writes, and every record these functions return):

- ``prompt``: the whole dialogue up to and INCLUDING the final ``"\\n\\nAssistant:"`` marker, as in HH-RLHF, so
  it starts with ``"\\n\\nHuman: ..."`` and ends with ``"\\n\\nAssistant:"`` (no trailing space).
- ``chosen`` / ``rejected``: the final assistant responses, i.e. the transcript text after that marker, with the
  leading space HH-RLHF puts there (``" Sure, ..."``).

Hence ``prompt + chosen`` is exactly HH-RLHF's raw ``chosen`` transcript. The accepted input forms (HH raw
transcripts, the split form with or without its markers, TRL's conversational form with or without an explicit
prompt) are recognised per record and normalised by `edgerlhf.formats`; every source (a local JSONL, any hub
dataset) goes through it, and `metrics/data.json` counts the records of each form.

Malformed input never disappears silently: with ``on_malformed="error"`` the first bad row raises `DataError`
with one line naming the file and line (or source and row) and the reason; with ``"skip"`` each bad row is
counted under its reason, logged, and returned in the skip counts. Pairs whose chosen equals rejected carry no
preference: they are dropped and counted (``identical_pair``) in both modes, as are prompts longer than
``max_prompt_chars`` (``prompt_too_long``): filters, not errors.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Literal, NamedTuple

from edgerlhf import formats, paths
from edgerlhf.config import TEST_SPLITS, TRAIN_SPLITS
from edgerlhf.errors import ArtifactError, DataError, HubError
from edgerlhf.formats import FIELDS, MalformedRecord, Record

REASON_INVALID_JSON = "invalid_json"
REASON_INVALID_UTF8 = "invalid_utf8"
REASON_TOO_LONG = "prompt_too_long"

OnMalformed = Literal["error", "skip"]
_SKIP_HINT = "set data.on_malformed: skip"


class LoadResult(NamedTuple):
    """Records kept, how many rows were dropped and why, and how many of each input form were read."""

    records: list[Record]
    skipped: int
    reasons: Counter[str]
    formats: Counter[str]


# --------------------------------------------------------------------------- splitting


def split_transcript(text: str) -> tuple[str, str]:
    """Split an HH-RLHF transcript into (prompt incl. the last "\\n\\nAssistant:", response after it).

    Raises DataError when there is no marker or the response is empty/whitespace.
    """
    try:
        return formats.split_at_last_turn(text, "transcript")
    except MalformedRecord as exc:
        raise DataError(exc.detail) from None


def transcript_pair_to_record(chosen_transcript: str, rejected_transcript: str) -> Record:
    """Turn an HH-RLHF (chosen, rejected) transcript pair into a (normalised) record; their prompts must be
    identical."""
    try:
        return formats.normalise({"chosen": chosen_transcript, "rejected": rejected_transcript})[1]
    except MalformedRecord as exc:
        raise DataError(exc.detail) from None


# --------------------------------------------------------------------------- policy


def _check_policy(on_malformed: str) -> None:
    """Reject an on_malformed value other than "error"/"skip" (config validation normally catches it)."""
    if on_malformed not in ("error", "skip"):
        raise ValueError(f"on_malformed must be 'error' or 'skip' (got {on_malformed!r})")


def _collect(rows: Iterable[tuple[str, Any]], on_malformed: OnMalformed, fix: str, source: str,
             max_prompt_chars: int | None) -> LoadResult:
    """Apply the error/skip policy and the two filters (identical pair, prompt length) to rows of (location,
    (format, record) or `MalformedRecord`).

    `fix` is the hint put in error messages before the on_malformed hint; `source` names the rows in the report.
    """
    _check_policy(on_malformed)
    log = logging.getLogger(__name__)
    records: list[Record] = []
    reasons: Counter[str] = Counter()
    forms: Counter[str] = Counter()
    seen = 0
    for where, result in rows:
        seen += 1
        if isinstance(result, MalformedRecord):
            if on_malformed == "error":
                raise DataError(f"{where}: {result.detail}; {fix} or {_SKIP_HINT}")
            reasons[result.reason] += 1
            log.warning("skipping %s: %s", where, result.detail)
            continue
        form, record = result
        forms[form] += 1
        if formats.is_identical(record):
            reasons[formats.IDENTICAL] += 1
            continue
        if max_prompt_chars is not None and len(record["prompt"]) > max_prompt_chars:
            reasons[REASON_TOO_LONG] += 1
            continue
        records.append(record)
    skipped = sum(reasons.values())
    if skipped:
        log.warning("%s", format_skip_report(source, seen, reasons, max_prompt_chars))
    return LoadResult(records, skipped, reasons, forms)


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
    """Decode and parse one JSONL line, raising `MalformedRecord` for bad UTF-8 or bad JSON."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise MalformedRecord(REASON_INVALID_UTF8, f"invalid UTF-8 (byte {exc.start})") from None
    try:
        return json.loads(text.rstrip("\r\n"))
    except json.JSONDecodeError as exc:
        msg = exc.msg.removesuffix(" at")  # "Unterminated string starting at" + " at column N"
        raise MalformedRecord(REASON_INVALID_JSON, f"invalid JSON ({msg} at column {exc.colno})") from None


def read_jsonl(path: str | Path, on_malformed: OnMalformed = "error", *,
               max_prompt_chars: int | None = None) -> LoadResult:
    """Read a local preference JSONL, each line in any accepted form (`edgerlhf.formats`).

    Blank lines are ignored. Malformed lines raise DataError "<path>:<line>: <what>" or, with
    on_malformed="skip", are counted by reason. Returns (records, skipped, reasons, formats).
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
                yield f"{path}:{lineno}", formats.normalise(_parse_line(line))
            except MalformedRecord as exc:
                yield f"{path}:{lineno}", exc

    try:
        return _collect(rows(), on_malformed, "fix the line", str(path), max_prompt_chars)
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror or exc}); check data.jsonl_path") from None


# --------------------------------------------------------------------------- a dataset from the hub


def load_hub_rows(hub_id: str, revision: str, split: str) -> list[dict[str, Any]]:
    """The rows of one split of a hub preference dataset (or of the HF cache when offline), as dicts of the
    columns the accepted forms use. Any hub failure becomes one HubError line saying how to run without it."""
    import datasets  # lazy: importing datasets is slow and only this source needs it

    try:
        ds = datasets.load_dataset(hub_id, revision=revision, split=split)
    except Exception as exc:  # every hub/cache failure ends the stage with the same advice
        cause = (str(exc).strip().splitlines() or [""])[0]
        cause = f"{type(exc).__name__}: {cause}" if cause else type(exc).__name__
        raise HubError(
            f"cannot load dataset {hub_id!r} (revision {revision!r}, split {split!r}) ({cause}); check "
            "data.hub_id / data.hub_revision / data.hub_train_split / data.hub_test_split, or to run offline use "
            "data.source: jsonl with data.jsonl_path pointing to a local file, or pre-download it into HF_HOME and "
            "set HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1"
        ) from exc
    columns = list(getattr(ds, "column_names", None) or [])
    missing = [c for c in ("chosen", "rejected") if c not in columns]
    if missing:
        raise DataError(f"dataset {hub_id!r} split {split!r} has no {' / '.join(missing)} column (columns: "
                        f"{', '.join(columns) or 'none'}); data.hub_id must name a preference dataset in an "
                        "accepted form (README: data formats)")
    keep = [c for c in FIELDS if c in columns]
    values = [ds[c] for c in keep]  # whole columns at once: row-by-row access is slow on 160k HH rows
    return [dict(zip(keep, row, strict=True)) for row in zip(*values, strict=True)]


def records_from_rows(rows: Iterable[Any], on_malformed: OnMalformed = "error", source_name: str = "data",
                      *, max_prompt_chars: int | None = None) -> LoadResult:
    """Normalise rows (dicts in any accepted form) with the same error/skip policy as read_jsonl.

    Errors name `source_name` and the 0-based row index. Returns (records, skipped, reasons, formats).
    """

    def located() -> Iterator[tuple[str, Any]]:
        for i, row in enumerate(rows):
            where = f"{source_name} row {i}"
            try:
                yield where, formats.normalise(row)
            except MalformedRecord as exc:
                yield where, exc

    return _collect(located(), on_malformed, "fix the source", source_name, max_prompt_chars)


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


def read_split(path: str | Path, expected: int | None = None, stage: str = "prepare") -> list[Record]:
    """Read a split JSONL written by the prepare stage, every line checked against the record convention.

    A missing file is an ArtifactError (run prepare); a truncated, empty or malformed one a DataError naming
    the file and line: invalid JSON (a line cut short), not an object, a field missing, not a string or not
    in the convention (empty response, prompt without the final marker). `expected`: the number of records
    the split must hold (data.sizes.<split>: prepare cuts exactly that many), so a file cut at a line
    boundary is caught too. `stage`: the stage that writes the file, named in the fix. Stages call this before
    any training and before touching their outputs."""
    p = Path(path)
    if not p.is_file():
        raise ArtifactError(f"{path} not found; run the {stage} stage (dvc repro {stage})")
    fix = f"re-run the {stage} stage (dvc repro {stage})"
    out: list[Record] = []
    try:
        for lineno, line in _iter_lines(p):
            if not line.strip():
                continue
            try:
                out.append(formats.check_internal(_parse_line(line)))
            except MalformedRecord as exc:
                raise DataError(f"{path}:{lineno}: {exc.detail}; {fix}") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror or exc}); {fix}") from None
    if expected is not None and len(out) != expected:
        raise DataError(f"{path}: {len(out)} records, but data.sizes.{p.stem} is {expected} (a truncated or stale "
                        f"file); {fix}")
    if not out and expected != 0:
        raise DataError(f"{path}: no records (an empty or truncated file); {fix}")
    return out


def read_splits(sizes: Any, *names: str) -> dict[str, list[Record]]:
    """Every named split, fully read and checked (`read_split`), each against its size in `sizes`
    (params.data.sizes): what a stage does first, before it loads a model or touches its outputs."""
    return {name: read_split(paths.split_file(name), getattr(sizes, name)) for name in names}


def read_labelled(sizes: Any, *names: str) -> dict[str, list[Record]]:
    """`read_splits` of rm_train / rm_test as the reward models learn them (the judge stage's data/labelled)."""
    return {name: read_split(paths.labelled_split(name), getattr(sizes, name), "judge") for name in names}


# --------------------------------------------------------------------------- the prepare stage's splits


def _allocate(pool: list[Record], names: tuple[str, ...], sizes: dict[str, int], source: str,
              dropped: Counter[str] | None = None) -> dict[str, list]:
    """Cut disjoint consecutive slices of a shuffled pool, one per split; too few records is a DataError that
    says which rows were dropped and why (`dropped`), since keeping them may be the fix."""
    need = sum(sizes[n] for n in names)
    if need > len(pool):
        wanted = ", ".join(f"{n}={sizes[n]}" for n in names)
        fix = "lower data.sizes.* in params.yaml"
        if dropped:
            reasons = ", ".join(f"{n} {r}" for r, n in sorted(dropped.items()))
            fix = (f"{sum(dropped.values())} rows were dropped ({reasons}): fix those rows (or raise "
                   f"data.max_prompt_chars for prompt_too_long), or {fix}")
        raise DataError(f"{source} has {len(pool)} usable records but the splits need {need} ({wanted}); {fix}")
    out, start = {}, 0
    for n in names:
        out[n] = pool[start:start + sizes[n]]
        start += sizes[n]
    return out


def build_splits(data_params: Any, seed: int) -> tuple[dict[str, list[Record]], dict[str, Any]]:
    """Every split of the pipeline as records, from the source params name, plus counts for metrics/data.json.

    Splits are disjoint: a hub dataset cuts the train splits from its `data.hub_train_split` and the test-side
    splits (rm_test, sft_eval, eval_prompts) from its `data.hub_test_split` (one shuffled pool when both name the
    same split); a local JSONL is shuffled and cut once; the synthetic task draws each split from its own seeded
    stream. The counts: rows read, rows of each input form, rows dropped per reason."""
    import random

    from edgerlhf import synthetic

    sizes = {k: getattr(data_params.sizes, k) for k in data_params.sizes.__dataclass_fields__}
    if data_params.source == "synthetic":
        splits = {n: synthetic.generate_split(sizes[n], seed, n) for n in TRAIN_SPLITS + TEST_SPLITS}
        return splits, {"skipped": 0, "input_records": sum(len(v) for v in splits.values())}

    results: dict[str, LoadResult] = {}
    if data_params.source == "hub":
        parts = dict.fromkeys((data_params.hub_train_split, data_params.hub_test_split))
        for part in parts:
            name = f"{data_params.hub_id}[{part}]"
            results[name] = records_from_rows(load_hub_rows(data_params.hub_id, data_params.hub_revision, part),
                                              data_params.on_malformed, name,
                                              max_prompt_chars=data_params.max_prompt_chars)
    else:
        results[str(data_params.jsonl_path)] = read_jsonl(data_params.jsonl_path, data_params.on_malformed,
                                                          max_prompt_chars=data_params.max_prompt_chars)
    skipped: Counter[str] = sum((r.reasons for r in results.values()), Counter())
    forms: Counter[str] = sum((r.formats for r in results.values()), Counter())
    counts = {"skipped": sum(skipped.values()), "input_records": sum(len(r.records) + r.skipped
                                                                     for r in results.values()),
              **{f"format_{f}": forms[f] for f in formats.FORMATS},
              **{f"skipped_{k}": v for k, v in sorted(skipped.items())}}
    pools = {name: list(r.records) for name, r in results.items()}
    if len(pools) == 1:  # one JSONL, or one hub split for both sides: shuffled and cut once
        (name, pool), = pools.items()
        random.Random(seed).shuffle(pool)
        return _allocate(pool, TEST_SPLITS + TRAIN_SPLITS, sizes, name, skipped), counts
    (train_name, train), (test_name, test) = pools.items()
    random.Random(f"{seed}/train").shuffle(train)
    random.Random(f"{seed}/test").shuffle(test)
    return {**_allocate(train, TRAIN_SPLITS, sizes, train_name, results[train_name].reasons),
            **_allocate(test, TEST_SPLITS, sizes, test_name, results[test_name].reasons)}, counts


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
    texts = []
    for lineno, line in _iter_lines(p):
        if not line.strip():
            continue
        try:
            obj = _parse_line(line)
            if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                raise MalformedRecord(formats.REASON_MISSING_FIELD, "expected an object with a string field 'text'")
        except MalformedRecord as exc:
            raise DataError(f"{path}:{lineno}: {exc.detail}; re-run the prepare stage (dvc repro prepare)") from None
        texts.append(obj["text"])
    if not texts:
        raise DataError(f"{path}: no texts (an empty or truncated file); re-run the prepare stage (dvc repro prepare)")
    return texts
