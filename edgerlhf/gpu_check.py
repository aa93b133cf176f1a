"""`make gpu-check`: the real pipeline stages at distilgpt2 shapes on HH-shaped text, under the 8 GB cap, in one go.

    python -m edgerlhf.gpu_check              # on a CUDA GPU: distilgpt2 shapes (<= 10 minutes on one GPU)
    python -m edgerlhf.gpu_check --reduced    # small shapes, few steps, on CPU (what runs where no CUDA exists)

It writes HH-RLHF-shaped preference data (multi-turn "\\n\\nHuman: ...\\n\\nAssistant: ..." dialogues of
realistic lengths, generated locally: `hh_records`) into a scratch workspace (.cache/gpu-check/), with params =
params.yaml + profiles/gpu-check.yaml (+ profiles/gpu-check-cpu.yaml in the reduced mode), and runs the commands
of dvc.yaml's stages there one at a time, in the map's order: prepare, base (a model random-initialised at the
distilgpt2 shape, its byte-level BPE trained on the generated text), check, judge, sft, reward@P and ppo@P for
every precision, evaluate; then ppo@int4 once more with hardware.dtype fp16 (the GradScaler path) on the same SFT
and reward model. No DVC is needed (the stage commands are the map's, run directly), no network, no download.

The gold judge is the default judge's shape (Skywork-Reward-V2-Qwen3-0.6B: edgerlhf.bench.JUDGE_SHAPE, reduced as
the benchmark reduces it in the CPU mode), random-initialised by edgerlhf.bench.build_judge into the workspace
folder eval.judge_path (the profile: eval.judge model, judge_source local), so the judge stage copies and scores
it, and PPO's periodic gold evaluation (ppo.eval_every) and evaluate load it for every scoring pass, as with the
hub judge. Its word-level tokenizer knows no word of the generated text: every word is one unknown token (the
ChatML markers are real tokens), which keeps the ids below the judge's vocabulary; the scores mean nothing, the
memory and time of the passes are what is measured.

After each stage it reads the stage's own metrics file (the one dvc.yaml names) and stops at the first stage
that fails, exceeds hardware.vram_budget_gb or diverges (a non-finite number in its metrics), or a PPO stage that
ran no gold evaluation, with one line naming the stage. metrics/gpu_check.json holds, per stage, the figures the
stage metrics files hold (peak_vram_gb, peak_vram_reserved_gb, wall_time_s; judge: rm_test_pairs,
accuracy_vs_human, tie_fraction, truncated_dialogues; PPO: episodes/s, rollout tokens/s, ratio_dev_first_max,
grad_norm_mean, vf_clipfrac_mean, skipped_steps, explained_variance_end, eval_gold_start / eval_gold_end; null
where a file lacks a key), copied, never recomputed. Without CUDA the reduced mode runs instead and says so in its
output and in the JSON (`"gpu": false`, `"note"`): its figures are not GPU figures.
"""

from __future__ import annotations

import argparse
import bisect
import itertools
import json
import math
import os
import random
import re
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
PROFILE = Path("profiles/gpu-check.yaml")
CPU_PROFILE = Path("profiles/gpu-check-cpu.yaml")
DEFAULT_DIR = Path(".cache/gpu-check")
DEFAULT_OUT = Path("metrics/gpu_check.json")
MARKER = ".gpu-check"  # a workspace this module made (only such a folder is ever wiped)
JSONL_NAME = "hh.jsonl"  # the generated preference data, data.jsonl_path of the profile

CPU_NOTE = "CPU reduced mode: not GPU figures"
GPU_NOTE = ("GPU figures: distilgpt2 shapes and the default judge's shape (random init) on HH-shaped synthetic "
            "text, under hardware.vram_budget_gb")

# The stages of dvc.yaml the check runs (report only renders; it is left out).
STAGES = ("prepare", "base", "check", "judge", "sft", "reward", "ppo", "evaluate")
FP16_PRECISION = "int4"
FP16_SUFFIX = "[fp16]"

# Copied from every stage metrics file; PPO and judge metrics files are also read for STAGE_KEYS (null where absent).
COMMON_KEYS = ("peak_vram_gb", "peak_vram_reserved_gb", "wall_time_s")
PPO_KEYS = ("episodes_per_s", "rollout_tokens_per_s", "ratio_dev_first_max", "ratio_dev_tolerance", "grad_norm_mean",
            "vf_clipfrac_mean", "skipped_steps", "explained_variance_end", "updates", "episodes", "eval_gold_start",
            "eval_gold_end")
JUDGE_KEYS = ("rm_test_pairs", "accuracy_vs_human", "tie_fraction", "truncated_dialogues")
STAGE_KEYS = {"ppo": PPO_KEYS, "judge": JUDGE_KEYS}  # read on top of COMMON_KEYS
# Metrics that are NaN by definition in some runs (no variance to explain), not a sign of divergence.
MAY_BE_NAN = frozenset({"explained_variance_end"})


# =========================================================================== HH-shaped text

# The most frequent words of English dialogue, in rank order; the rest of the lexicon is generated pseudo-words.
COMMON_WORDS = (
    "the to I you a and it of is that in do what for can be this have my are not with on how me if your so "
    "but there like they would get some or an about just was at as know think will from one all we it's good "
    "make could people want should more when any help them time way also out up need their which by no other "
    "sure use here then these well really much because many very something work find try thing things best "
    "question answer day home money food water house car friend family kids children job school book idea "
    "please thanks sorry yes okay why where who right wrong long short small big first last new old"
).split()
_ONSETS = ("b c d f g h j k l m n p r s t v w y z ch sh th st br tr pl gr cl fr sp dr sl bl cr pr sc".split()
           + [""] * 4)
_VOWELS = "a e i o u a e i o ai ea ou io ee oo au".split()
_CODAS = ("n r s t l m nd st ck ng rt ll ss nt".split() + [""] * 10)


def lexicon(size: int, seed: int) -> list[str]:
    """`size` distinct words in rank order: COMMON_WORDS, then pseudo-words of 1-4 syllables, shorter ones first
    (frequent words are short, as in natural text)."""
    rng = random.Random(f"{seed}/lexicon")
    words = list(dict.fromkeys(COMMON_WORDS))[:size]
    seen = set(words)
    extra: list[str] = []
    attempts = 0
    while len(words) + len(extra) < size:
        attempts += 1
        if attempts > 50 * size + 10_000:
            raise ValueError(f"cannot make {size} distinct pseudo-words")
        n = rng.choices((1, 2, 3, 4), weights=(2, 5, 4, 2))[0]
        word = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS) for _ in range(n))
        if len(word) >= 2 and word not in seen:
            seen.add(word)
            extra.append(word)
    extra.sort(key=len)  # stable: equal lengths keep their random order
    return words + extra


class _Sampler:
    """Zipf (s = 1) draws from a lexicon: rank r has probability proportional to 1 / (r + 2)."""

    def __init__(self, words: list[str], rng: random.Random) -> None:
        self.words, self.rng = words, rng
        self.cum = list(itertools.accumulate(1.0 / (r + 3) for r in range(len(words))))

    def words_(self, n: int) -> list[str]:
        total = self.cum[-1]
        return [self.words[min(bisect.bisect_left(self.cum, self.rng.random() * total), len(self.words) - 1)]
                for _ in range(n)]


def _length(rng: random.Random, median: float, sigma: float, lo: int, hi: int) -> int:
    """A word count drawn log-normally (the long right tail of real utterance lengths), clipped to [lo, hi]."""
    return max(lo, min(hi, round(rng.lognormvariate(math.log(median), sigma))))


def _utterance(sampler: _Sampler, n_words: int, question: bool) -> str:
    """Sentences of 4-18 words, capitalised, with commas now and then; a question ends with '?'."""
    rng = sampler.rng
    words = sampler.words_(n_words)
    sentences, i = [], 0
    while i < len(words):
        k = min(len(words) - i, rng.randint(4, 18))
        chunk = words[i:i + k]
        if k > 8 and rng.random() < 0.4:
            chunk[rng.randint(2, k - 3)] += ","
        i += k
        end = "?" if question and i >= len(words) else rng.choice(".....!")
        sentences.append(chunk[0][:1].upper() + chunk[0][1:] + "".join(" " + w for w in chunk[1:]) + end)
    return " ".join(sentences)


def hh_records(n: int, seed: int, lexicon_size: int, max_prompt_chars: int = 1024) -> list[dict[str, str]]:
    """`n` preference records in the shape of Anthropic HH-RLHF (data.py's record convention): 1-5 human turns
    (median 12 words) with the assistant's earlier replies (median 35 words) in the prompt, which ends with
    "\\n\\nAssistant:", and two final replies (median 40 words, a log-normal tail up to 300) as chosen/rejected.
    Earlier turns are dropped while the prompt is longer than `max_prompt_chars` (the prepare stage's filter).
    Words come from a Zipf-distributed lexicon of `lexicon_size` words, so a BPE trained on the text can reach a
    GPT-2-sized vocabulary. Deterministic for a seed."""
    rng = random.Random(f"{seed}/hh")
    sampler = _Sampler(lexicon(lexicon_size, seed), rng)
    records = []
    for _ in range(n):
        turns = rng.choices((1, 2, 3, 4, 5), weights=(40, 25, 17, 11, 7))[0]
        parts = []
        for t in range(turns):
            human = _utterance(sampler, _length(rng, 12, 0.6, 3, 60), question=True)
            parts.append(f"\n\nHuman: {human}\n\nAssistant:")
            if t < turns - 1:
                parts.append(" " + _utterance(sampler, _length(rng, 35, 0.6, 4, 120), question=False))
        while len("".join(parts)) > max_prompt_chars and len(parts) > 1:
            parts = parts[2:]  # drop the oldest human turn and the reply to it
        chosen, rejected = (" " + _utterance(sampler, _length(rng, 40, 0.8, 2, 300), question=False)
                            for _ in range(2))
        records.append({"prompt": "".join(parts), "chosen": chosen, "rejected": rejected})
    return records


def lexicon_size_for(vocab_size: int) -> int:
    """Lexicon size for a target vocabulary: 1.2 x the vocabulary (at least 2000 words), enough distinct words
    for the byte-level BPE to reach it (50257 at the distilgpt2 shape; the base stage's config.json says)."""
    return max(2000, round(1.2 * vocab_size))


# =========================================================================== the stages of dvc.yaml

_VAR = re.compile(r"\$\{\s*([\w.]+)\s*\}")


def _lookup(expr: str, params: dict, item: dict) -> Any:
    """The value of a dvc.yaml interpolation `${a.b}` (params) or `${item.k}` (the matrix item)."""
    node: Any = item if expr.startswith("item.") else params
    for part in expr.removeprefix("item.").split("."):
        if not isinstance(node, dict) or part not in node:
            raise KeyError(f"dvc.yaml: ${{{expr}}} is not defined in params.yaml or the matrix item")
        node = node[part]
    return node


def render(value: Any, params: dict, item: dict | None = None) -> Any:
    """A dvc.yaml value with its `${...}` filled in: a string that is one whole `${x}` becomes the value itself
    (a matrix's list), others are formatted into the string."""
    item = item or {}
    if isinstance(value, str):
        whole = _VAR.fullmatch(value.strip())
        if whole:
            return _lookup(whole.group(1), params, item)
        return _VAR.sub(lambda m: str(_lookup(m.group(1), params, item)), value)
    if isinstance(value, list):
        return [render(v, params, item) for v in value]
    if isinstance(value, dict):
        return {render(k, params, item): render(v, params, item) for k, v in value.items()}
    return value


@dataclass(frozen=True)
class StageRun:
    """One stage (or matrix item) of dvc.yaml as the check runs it."""

    name: str  # DVC's name: "sft", "reward@int4"
    stage: str  # the stage in dvc.yaml: "reward"
    argv: tuple[str, ...]  # its cmd, with `python` = this interpreter
    deps: tuple[str, ...]
    outs: tuple[str, ...]
    metrics: str | None  # the metrics file it writes, relative to the workspace


def _paths(entries: list | None) -> tuple[str, ...]:
    """Paths of a deps/outs/metrics list (entries are paths or {path: options})."""
    out = []
    for e in entries or []:
        out.extend(e) if isinstance(e, dict) else out.append(e)
    return tuple(str(p) for p in out)


def _under(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip("/") + "/")


def stage_runs(dvc: dict, params: dict, names: Sequence[str] = STAGES) -> list[StageRun]:
    """The stages `names` of a dvc.yaml (parsed) in the map's order, matrix stages expanded (`reward@int4`), cmds
    rendered with params. Raises ValueError when a stage would run before the stage whose output it reads."""
    runs: list[StageRun] = []
    for stage, spec in dvc["stages"].items():
        if stage not in names:
            continue
        matrix = render(spec.get("matrix") or {}, params)
        keys = list(matrix)
        for values in itertools.product(*(matrix[k] for k in keys)) if keys else [()]:
            item = dict(zip(keys, values))
            name = stage + ("@" + "-".join(str(v) for v in values) if values else "")
            argv = shlex.split(render(spec["cmd"], params, item))
            if argv and argv[0] == "python":
                argv[0] = sys.executable
            outs = _paths(render(spec.get("outs"), params, item))
            # the stage's detail metrics file: a plain output under metrics/ (metrics/headline.json, the one DVC
            # metric, is the report's, which the check does not run)
            metrics = [o for o in outs if o.startswith("metrics/") and o.endswith(".json")]
            runs.append(StageRun(name, stage, tuple(argv), _paths(render(spec.get("deps"), params, item)),
                                 outs, metrics[0] if metrics else None))
    missing = [n for n in names if not any(r.stage == n for r in runs)]
    if missing:
        raise ValueError(f"dvc.yaml has no stage {', '.join(missing)}")
    for i, run in enumerate(runs):
        for dep in run.deps:
            makers = [r for r in runs if any(_under(dep, o) or _under(o, dep) for o in r.outs)]
            late = [r.name for r in makers if runs.index(r) >= i]
            if late:
                raise ValueError(f"dvc.yaml: {run.name} reads {dep}, which {', '.join(late)} writes after it")
    return runs


# =========================================================================== checks on a finished stage


def _numbers(obj: Any, prefix: str = "") -> list[tuple[str, float]]:
    """(dotted key, value) of every number in a metrics object, nested objects flattened."""
    if isinstance(obj, dict):
        return [kv for k, v in obj.items() for kv in _numbers(v, f"{prefix}{k}.")]
    if isinstance(obj, (int, float)) and not isinstance(obj, bool):
        return [(prefix.rstrip("."), float(obj))]
    return []


def cap_problem(metrics: dict, budget_gb: float) -> str | None:
    """Why a stage's peak VRAM breaks the hardware.vram_budget_gb cap, or None (also when the budget is 0: off)."""
    if budget_gb <= 0:
        return None
    for key in ("peak_vram_gb", "peak_vram_reserved_gb"):
        value = metrics.get(key)
        if isinstance(value, (int, float)) and value > budget_gb:
            return f"exceeds the VRAM cap: {key} {value:.3f} GB > hardware.vram_budget_gb {budget_gb:g}"
    return None


def divergence_problem(metrics: dict) -> str | None:
    """Why a stage's metrics say it diverged (a NaN or infinite number, except where NaN is a defined value),
    or None."""
    bad = [f"{k} = {v}" for k, v in _numbers(metrics) if not math.isfinite(v) and k.split(".")[-1] not in MAY_BE_NAN]
    return f"diverged: {', '.join(bad[:4])}{' ...' if len(bad) > 4 else ''}" if bad else None


def optimizer_steps(metrics: dict, ppo: dict) -> int | None:
    """Optimizer steps a PPO run took or skipped: updates x ppo_epochs x minibatches per epoch (None without
    `updates` in its metrics)."""
    updates = metrics.get("updates")
    if not isinstance(updates, int):
        return None
    return updates * ppo["ppo_epochs"] * (ppo["batch_size"] // (ppo["mini_batch_size"]
                                                                 * ppo["gradient_accumulation_steps"]))


def skipped_problem(metrics: dict, ppo: dict) -> str | None:
    """A loss-scaled (fp16) PPO run whose GradScaler skipped every optimizer step never trained: divergence."""
    steps, skipped = optimizer_steps(metrics, ppo), metrics.get("skipped_steps")
    if steps and isinstance(skipped, (int, float)) and skipped >= steps:
        return f"diverged: the GradScaler skipped all {steps} optimizer steps (non-finite gradients)"
    return None


def gold_problem(metrics: dict) -> str | None:
    """A PPO run without a periodic gold evaluation (no eval_gold_* in its metrics) did not measure what the check
    is for: PPO's peak with the judge's scoring passes."""
    if "eval_gold_end" in metrics:
        return None
    return "ran no gold evaluation (no eval_gold_end in its metrics): set ppo.eval_every > 0 and a model judge"


def stage_problem(metrics: dict, budget_gb: float, ppo: dict | None = None) -> str | None:
    """The first thing wrong with a finished stage (over the VRAM cap, divergence, every PPO step skipped; `ppo`:
    the run's ppo params, given for a PPO stage), or None."""
    return (cap_problem(metrics, budget_gb) or divergence_problem(metrics)
            or (skipped_problem(metrics, ppo) if ppo else None))


_STAGE_ERROR = re.compile(r"^error \[[^\]]+\]: .+")
_EXCEPTION = re.compile(r"^[\w.]*(Error|Exception|Interrupt)\b.*")


def failure_line(output: str, returncode: int, limit: int = 400) -> str:
    """The one line that says why a stage process failed: its own `error [stage]: ...` line (runtime.run_stage),
    else the last exception line of a traceback, else the last line it printed, else its exit status."""
    lines = [ln.strip() for ln in output.replace("\r", "\n").splitlines() if ln.strip()]
    line = (next((ln for ln in reversed(lines) if _STAGE_ERROR.match(ln)), None)
            or next((ln for ln in reversed(lines) if _EXCEPTION.match(ln)), None)
            or (lines[-1] if lines else None))
    status = f"killed by signal {-returncode}" if returncode < 0 else f"exit code {returncode}"
    if line is None:
        return status
    line = line if len(line) <= limit else line[:limit - 3] + "..."
    return f"{line} ({status})"


# =========================================================================== the figures


def stage_figures(metrics: dict | None, stage: str) -> dict[str, Any]:
    """What metrics/gpu_check.json copies from one stage's metrics file (None: no file, or the key is absent)."""
    keys = COMMON_KEYS + STAGE_KEYS.get(stage, ())
    return {k: (metrics or {}).get(k) for k in keys}


def _max(values: list[Any]) -> float | None:
    numbers = [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
    return max(numbers) if numbers else None


TABLE_COLUMNS = (("stage", None), ("peak GB", "peak_vram_gb"), ("reserved GB", "peak_vram_reserved_gb"),
                 ("stage s", "wall_time_s"), ("process s", "process_s"), ("episodes/s", "episodes_per_s"),
                 ("rollout tok/s", "rollout_tokens_per_s"), ("ratio_dev_first", "ratio_dev_first_max"),
                 ("skipped steps", "skipped_steps"))


def _cell(value: Any) -> str:
    """A table cell: '-' for a figure the stage does not have, floats to 4 significant digits."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def summary_table(result: dict) -> str:
    """The figures of a check as a table, one row per stage that ran ('-': not measured by that stage)."""
    from tabulate import tabulate

    rows = [[name] + [_cell(fig.get(key)) for _, key in TABLE_COLUMNS[1:]] for name, fig in result["stages"].items()]
    return tabulate(rows, headers=[h for h, _ in TABLE_COLUMNS], tablefmt="github", disable_numparse=True,
                    colalign=("left",) + ("right",) * (len(TABLE_COLUMNS) - 1))


def judge_line(judge: dict | None) -> str:
    """One line naming the check's gold judge (gpu_check.json's `judge`)."""
    if not judge:
        return "judge: n/a"
    return (f"judge: {judge['shape']} shape{' (reduced)' if judge['reduced'] else ''}, random init, "
            f"{judge['arch']} {judge['n_layer']} layers x {judge['hidden']} dims, vocab {judge['vocab']}, "
            f"{judge['total_params'] / 1e6:.1f} M params, in {judge['folder']}/; every HH word is its tokenizer's "
            "unknown token")


def headline(result: dict) -> str:
    """The lines printed under the table: mode, device, shape, vocabulary, budget, verdict."""
    model = result.get("model") or {}
    shape = (f"{model.get('arch')} {model.get('n_layer')} layers x {model.get('n_embd')} dims, {model.get('n_head')} "
             f"heads, {model.get('n_positions')} positions, vocab {model.get('vocab_size')} "
             f"(asked {model.get('vocab_size_requested')})") if model else "n/a (the base stage did not run)"
    lines = [f"device: {result['device']}, compute dtype {result['dtype']}, "
             f"VRAM cap {result['vram_budget_gb']:g} GB" + ("" if result["gpu"] else " (no GPU: not applied)"),
             f"model: {shape}", judge_line(result.get("judge"))]
    fp16 = result.get("fp16")
    if fp16 and fp16.get("finite") is not None:
        lines.append(f"{fp16['stage']}: dtype {fp16['dtype']}, skipped steps {fp16['skipped_steps']} of "
                     f"{fp16['optimizer_steps']}, finished "
                     f"{'finite' if fp16['finite'] else 'NOT finite'}" + (f" ({fp16['note']})" if fp16.get("note")
                                                                          else ""))
    if not result["gpu"]:
        lines.append(f"{result['note']}: no CUDA device here, small shapes and few steps; the figures only show "
                     "that the check runs.")
    lines.append("gpu-check: OK" if result["ok"] else f"gpu-check: FAILED at {result['failed_stage']}: "
                                                      f"{result['error']}")
    return "\n".join(lines)


# =========================================================================== running


def stage_env(gpu: bool) -> dict[str, str]:
    """The environment of the stage processes: this interpreter's bin first, the repository importable, no
    network; on CPU one OpenMP thread (small matmuls on 2 cores) and no GPU visible."""
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("HF_DATASETS_OFFLINE", "1")
    if not gpu:
        env.setdefault("OMP_NUM_THREADS", "1")
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def run_process(argv: Sequence[str], cwd: Path, env: dict[str, str], log: Path, echo: bool = True,
                timeout: float | None = None) -> tuple[int, str, float]:
    """Run one stage command; its output goes to `log` (and this process's stdout); after `timeout` seconds it
    is terminated. Returns (exit code, the last 64 KB of its output, seconds)."""
    import codecs
    import threading

    log.parent.mkdir(parents=True, exist_ok=True)
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    tail = ""
    start = time.perf_counter()
    with log.open("wb") as fh:
        proc = subprocess.Popen(list(argv), cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        timer = threading.Timer(max(timeout, 0.0), proc.terminate) if timeout is not None else None
        if timer:
            timer.start()
        try:
            assert proc.stdout is not None
            while chunk := proc.stdout.read1(1 << 16):
                fh.write(chunk)
                text = decoder.decode(chunk)
                tail = (tail + text)[-(1 << 16):]
                if echo:
                    sys.stdout.write(text)
                    sys.stdout.flush()
            rc = proc.wait()
        finally:
            if timer:
                timer.cancel()
    return rc, tail, round(time.perf_counter() - start, 3)


def load_profile(root: Path, reduced: bool) -> dict:
    """params.yaml + profiles/gpu-check.yaml (+ profiles/gpu-check-cpu.yaml when reduced), validated."""
    from edgerlhf.config import deep_merge, parse_params

    raw = yaml.safe_load((root / "params.yaml").read_text())
    for profile in (PROFILE, CPU_PROFILE) if reduced else (PROFILE,):
        raw = deep_merge(raw, yaml.safe_load((root / profile).read_text()) or {})
    parse_params(raw)  # a bad key fails here, named, before any stage runs
    return raw


def _write_params(dest: Path, raw: dict, header: str) -> None:
    (dest / "params.yaml").write_text(f"# generated by edgerlhf.gpu_check: {header}\n"
                                      + yaml.safe_dump(raw, sort_keys=False))


JUDGE_TOKENIZER = ("edgerlhf.bench's word-level tokenizer (ChatML specials and chat template): every word of the "
                   "generated text is its unknown token, one token per word, ids below the judge's vocabulary")


def judge_folder(dest: Path, raw: dict) -> Path:
    """Where the check builds the gold judge: eval.judge_path inside the workspace. The profile must make the judge
    stage copy a local model judge from there (eval.judge model, judge_source local): the default, the hub judge,
    cannot be downloaded here."""
    ev = raw["eval"]
    path = Path(ev["judge_path"])
    if ev["judge"] != "model" or ev["judge_source"] != "local" or path.is_absolute() or ".." in path.parts:
        raise ValueError(f"{PROFILE}: the check builds the judge in the workspace: set eval.judge: model, "
                         f"eval.judge_source: local and eval.judge_path to a relative folder (now {ev['judge']}, "
                         f"{ev['judge_source']}, {ev['judge_path']})")
    return dest / path


def build_workspace_judge(dest: Path, raw: dict, reduced: bool) -> dict[str, Any]:
    """The gold judge of the check: edgerlhf.bench.build_judge at the default judge's shape (JUDGE_SHAPE; its
    reduced shape in the reduced mode), random-initialised with the run's seed, saved into `judge_folder` as the
    judge stage expects a local judge. Returns what gpu_check.json says of it."""
    import transformers

    from edgerlhf.bench import JUDGE_SHAPE, build_judge

    transformers.utils.logging.disable_progress_bar()
    spec = JUDGE_SHAPE.reduced() if reduced else JUDGE_SHAPE
    folder = judge_folder(dest, raw)
    start = time.perf_counter()
    total = build_judge(spec, folder, raw["seed"])
    return {"shape": spec.name, "arch": spec.arch, "reduced": reduced, **spec.numbers(), "total_params": total,
            "folder": str(folder.relative_to(dest)), "build_s": round(time.perf_counter() - start, 3),
            "init": "random", "tokenizer": JUDGE_TOKENIZER}


def prepare_workspace(root: Path, dest: Path, raw: dict, header: str, reduced: bool = False) -> dict[str, Any]:
    """A fresh scratch workspace: dvc.yaml and stages/ of `root`, params.yaml = `raw`, the HH-shaped data, the
    random-initialised gold judge (`build_workspace_judge`; reduced: its CPU shape), whose description it returns.
    Only a folder this module made (it holds MARKER) or an empty one is ever wiped."""
    if dest.exists() and any(dest.iterdir()):
        if not (dest / MARKER).is_file():
            raise SystemExit(f"gpu-check: {dest} exists and was not made by gpu-check; remove it or pass --dir")
        shutil.rmtree(dest)
    dest.mkdir(parents=True, exist_ok=True)
    (dest / MARKER).write_text("scratch workspace of edgerlhf.gpu_check: wiped at every run\n")
    shutil.copy2(root / "dvc.yaml", dest / "dvc.yaml")
    shutil.copytree(root / "stages", dest / "stages", ignore=shutil.ignore_patterns("__pycache__"))
    _write_params(dest, raw, header)
    from edgerlhf.data import write_jsonl

    d, tiny = raw["data"], raw["model"]["tiny"]
    write_jsonl(dest / d["jsonl_path"], hh_records(sum(d["sizes"].values()), raw["seed"],
                                                   lexicon_size_for(tiny["vocab_size"]), d["max_prompt_chars"]))
    return build_workspace_judge(dest, raw, reduced)


def prepare_fp16_workspace(dest: Path, raw: dict, dtype: str) -> Path:
    """`dest`/fp16: params with hardware.dtype = `dtype`, the main workspace's data, SFT, reward and judge models
    and stages linked in, so that ppo@P runs there on exactly the same inputs and writes only its own outputs."""
    from edgerlhf.config import deep_merge

    fp16 = dest / "fp16"
    fp16.mkdir()
    (fp16 / "models").mkdir()
    for link, target in (("data", "../data"), ("stages", "../stages"), ("models/sft", "../../models/sft"),
                         ("models/reward", "../../models/reward"), ("models/judge", "../../models/judge")):
        (fp16 / link).symlink_to(target, target_is_directory=True)
    _write_params(fp16, deep_merge(raw, {"hardware": {"dtype": dtype}}), f"the gpu-check params with "
                                                                          f"hardware.dtype {dtype}")
    return fp16


def read_metrics(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def device_info(gpu: bool, hardware: dict) -> tuple[str, str]:
    """(device description, compute dtype name) by the stages' own rule (modeling.choose_dtype)."""
    import torch

    from edgerlhf.modeling import DTYPES, choose_dtype

    names = {v: k for k, v in DTYPES.items()}
    if gpu:
        cap = torch.cuda.get_device_capability(0)
        return (f"{torch.cuda.get_device_name(0)} (compute capability {cap[0]}.{cap[1]})",
                names[choose_dtype("cuda", cap, hardware["dtype"])])
    return f"cpu ({os.cpu_count()} cores)", names[choose_dtype("cpu", None, hardware["dtype"])]


def model_shape(workspace: Path, requested_vocab: int) -> dict | None:
    """The base model's shape as its config.json (written by the base stage) says, or None before it exists."""
    config = read_metrics(workspace / "models" / "base" / "config.json")
    if config is None:
        return None
    keys = ("model_type", "n_layer", "n_embd", "n_head", "n_positions", "vocab_size")
    out = {("arch" if k == "model_type" else k): config.get(k) for k in keys}
    out["vocab_size_requested"] = requested_vocab
    return out


def run_check(root: Path, dest: Path, out: Path, reduced: bool, echo: bool = True,
              command: str = "python -m edgerlhf.gpu_check", time_limit: float | None = None) -> dict:
    """Run the check; write `out`; return its content. result['ok'] is False at the first failing stage, or
    at the stage running when `time_limit` seconds have passed (it is stopped; what ran is kept)."""
    started = time.perf_counter()
    import torch

    gpu = torch.cuda.is_available() and not reduced
    raw = load_profile(root, reduced=not gpu)
    budget = float(raw["hardware"]["vram_budget_gb"])
    profiles = [str(PROFILE)] + ([str(CPU_PROFILE)] if not gpu else [])
    judge = prepare_workspace(root, dest, raw, "params.yaml + " + " + ".join(profiles), reduced=not gpu)
    device, dtype = device_info(gpu, raw["hardware"])
    fp16_dtype = "fp16" if gpu else "fp32"
    result: dict[str, Any] = {
        "gpu": gpu, "mode": "gpu" if gpu else "cpu-reduced", "note": GPU_NOTE if gpu else CPU_NOTE,
        "ok": False, "failed_stage": None, "error": None,
        "device": device, "dtype": dtype, "vram_budget_gb": budget, "profiles": profiles,
        "workspace": str(dest), "command": command,
        "model": None, "judge": judge, "data": None, "stages": {},
        "fp16": {"stage": None, "precision": None, "dtype": fp16_dtype, "skipped_steps": None,
                 "optimizer_steps": None, "finite": None,
                 "note": None if gpu else "CPU: fp16 training is unsupported on CPU (modeling.choose_dtype), so this "
                                          "run is in fp32, without a GradScaler; it only exercises the path"},
        "peak_vram_gb_max": None, "peak_vram_reserved_gb_max": None, "wall_time_s": None,
    }
    print(f"gpu-check: {device}, compute dtype {dtype}; " + (
        f"distilgpt2 shapes under the {budget:g} GB VRAM cap" if gpu else
        f"no CUDA device (or --reduced): {CPU_NOTE} (small shapes, few steps)"), flush=True)
    print(f"gpu-check: {judge_line(judge)} (built in {judge['build_s']:g} s)", flush=True)
    env = stage_env(gpu)
    runs = stage_runs(yaml.safe_load((dest / "dvc.yaml").read_text()), raw)
    ppo_runs = [r for r in runs if r.stage == "ppo"]
    fp16_base = next((r for r in ppo_runs if r.name == f"ppo@{FP16_PRECISION}"), ppo_runs[-1])
    fp16_run = StageRun(fp16_base.name + FP16_SUFFIX, "ppo", fp16_base.argv, fp16_base.deps, fp16_base.outs,
                        fp16_base.metrics)
    result["fp16"].update(stage=fp16_run.name, precision=fp16_base.name.split("@", 1)[1])
    plan = [*runs, fp16_run]

    def finish() -> dict:
        figs = list(result["stages"].values())
        result["peak_vram_gb_max"] = _max([f["peak_vram_gb"] for f in figs])
        result["peak_vram_reserved_gb_max"] = _max([f["peak_vram_reserved_gb"] for f in figs])
        result["model"] = model_shape(dest, raw["model"]["tiny"]["vocab_size"])
        result["data"] = read_metrics(dest / "metrics" / "data.json")
        result["wall_time_s"] = round(time.perf_counter() - started, 3)
        from edgerlhf.runtime import write_json

        write_json(out, result)
        return result

    for i, run in enumerate(plan, 1):
        cwd = prepare_fp16_workspace(dest, raw, fp16_dtype) if run is fp16_run else dest
        print(f"\n=== gpu-check [{i}/{len(plan)}] {run.name}: {shlex.join(run.argv[1:])} "
              f"({'GPU' if gpu else CPU_NOTE}) ===", flush=True)
        left = None if time_limit is None else time_limit - (time.perf_counter() - started)
        rc, tail, seconds = run_process(run.argv, cwd, env, dest / "logs" / f"{run.name}.log", echo, left)
        metrics = read_metrics(cwd / run.metrics) if run.metrics and rc == 0 else None
        result["stages"][run.name] = {"process_s": seconds, **stage_figures(metrics, run.stage)}
        problem = (failure_line(tail, rc) if rc != 0 else
                   stage_problem(metrics or {}, budget, raw["ppo"] if run.stage == "ppo" else None)
                   or (gold_problem(metrics) if run.stage == "ppo" and metrics is not None else None))
        if rc != 0 and left is not None and seconds >= left:
            problem = f"stopped: --time-limit {time_limit:g} s reached during this stage"
        if rc == 0 and run.metrics and metrics is None:
            problem = f"{run.metrics} was not written"
        if run is fp16_run and metrics is not None:
            result["fp16"].update(skipped_steps=metrics.get("skipped_steps"),
                                  optimizer_steps=optimizer_steps(metrics, raw["ppo"]),
                                  finite=divergence_problem(metrics) is None)
        if problem:
            result.update(failed_stage=run.name, error=f"{problem} (log: {dest / 'logs' / (run.name + '.log')})")
            return finish()
    result["ok"] = True
    return finish()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reduced", action="store_true",
                        help="the CPU reduced mode even where CUDA exists (small shapes, few steps; not GPU figures)")
    parser.add_argument("--dir", type=Path, default=DEFAULT_DIR, help=f"scratch workspace (default {DEFAULT_DIR})")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"the figures (default {DEFAULT_OUT})")
    parser.add_argument("--quiet", action="store_true", help="stage output to the logs only, not to the terminal")
    parser.add_argument("--time-limit", type=float, default=None, metavar="SECONDS",
                        help="stop the stage running when this much time has passed, and fail there (the JSON keeps "
                             "what ran): for a machine lent for a fixed time")
    args = parser.parse_args(argv)
    root = Path.cwd()
    command = shlex.join(["python", "-m", "edgerlhf.gpu_check", *(sys.argv[1:] if argv is None else argv)])
    result = run_check(root, (root / args.dir).resolve(), root / args.out, args.reduced, echo=not args.quiet,
                       command=command, time_limit=args.time_limit)
    print(f"\ngpu-check figures ({args.out}):")
    print(summary_table(result))
    lines = headline(result).splitlines()
    print("\n".join(lines[:-1]), flush=True)
    if not result["ok"]:
        print(lines[-1], file=sys.stderr, flush=True)
        sys.exit(1)
    print(lines[-1], flush=True)


if __name__ == "__main__":
    main()
