"""Talk to the policies a pipeline run trained: `python -m edgerlhf.generate [PROMPT ...]`.

Policies: `sft` (models/sft/merged: the base with the SFT adapter merged in) and `ppo@P` for each P in
reward.precisions (the merged SFT model + the PPO LoRA in models/ppo/P), loaded with plain transformers +
peft. Prompts come from the arguments, `--file` (one per line, `-` = stdin) or stdin. A prompt without
"Assistant:" is wrapped in the dialogue format the models were trained on ("\\n\\nHuman: ...\\n\\nAssistant:");
one that contains it is used as given, with literal `\\n` turned into newlines (`--raw`: always as given).

Sampling settings come from params.yaml `eval.*` (what the evaluation uses), overridable by flags. Samples are
drawn exactly as PPO's rollouts are: left-padded prompts (`ppo.left_pad`), `model.generate` with the attention
mask (transformers derives position ids from it, as `ppo.position_ids_from_mask` does) under a fresh
GenerationConfig (`ppo.generation_config`, as PPO samples), responses cut after the
first EOS (`ppo.truncate_after_eos`) and decoded without the prompt. `--compare` answers every prompt with
every available policy (each from the same seed), scored by each proxy reward model (raw score, as PPO's
score_fn computes it) and, on the synthetic task, by the gold judge.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgerlhf import paths, precisions
from edgerlhf.config import Params, load_params
from edgerlhf.errors import ArtifactError, EdgeRLHFError
from edgerlhf.synthetic import format_prompt

log = logging.getLogger("edgerlhf")

SFT = "sft"


class UsageError(EdgeRLHFError):
    """A bad command line: unknown policy, empty prompt, out-of-range sampling flag."""

    exit_code = 2


# --------------------------------------------------------------------------- names, settings, prompts


def policy_names(params: Params) -> list[str]:
    """Every policy a run of these params trains: `sft` and `ppo@P` per reward precision."""
    return [SFT] + [f"ppo@{p}" for p in params.reward.precisions]


def check_policy(name: str, params: Params) -> str:
    """`name` if it is a policy of this run, else UsageError listing the valid names."""
    valid = policy_names(params)
    if name not in valid:
        raise UsageError(f"unknown policy {name!r}: choose one of {', '.join(valid)}")
    return name


def policy_dir(root: Path, name: str) -> Path:
    """Where a policy's weights live (the merged SFT model for `sft`, the PPO adapter for `ppo@P`)."""
    return root / (paths.SFT_MERGED if name == SFT else paths.ppo_dir(name.split("@", 1)[1]))


class MissingPolicy(ArtifactError):
    """A policy the run has not trained (yet): `--compare` skips it, a single --policy fails."""


def require_policy(root: Path, name: str) -> None:
    """ArtifactError naming the stage to run when a policy's weights are missing (MissingPolicy) or are not
    safetensors only (`modeling.require_model` / `require_policy`: a pickle file is refused, never skipped)."""
    from edgerlhf import modeling

    marker, stage = ("config.json", "sft") if name == SFT else ("adapter_config.json", name)
    if not (policy_dir(root, name) / marker).exists():
        raise MissingPolicy(f"policy {name}: {policy_dir(root, name) / marker} is missing: run `dvc repro {stage}` "
                            "first")
    if name == SFT:
        modeling.require_model(policy_dir(root, name), stage)
    else:
        modeling.require_policy(policy_dir(root, name), stage)


def reward_adapters(root: Path, params: Params) -> dict[str, Path]:
    """The reward models `--compare` scores with (precision -> adapter folder), each checked for safetensors
    before any model loads; a missing one is skipped with a warning."""
    from edgerlhf import modeling

    found = {}
    for p in params.reward.precisions:
        adapter = root / paths.reward_dir(p)
        if not (adapter / "adapter_config.json").exists():
            log.warning("skipping rm@%s: %s is missing: run `dvc repro reward@%s` first", p, adapter, p)
            continue
        found[p] = modeling.require_adapter(adapter, f"reward@{p}")
    return found


@dataclass(frozen=True)
class Sampling:
    """How responses are sampled (params `eval.*` unless overridden)."""

    temperature: float
    top_k: int
    top_p: float
    max_new_tokens: int
    seed: int

    @classmethod
    def from_params(cls, params: Params, **overrides: Any) -> Sampling:
        """params.eval's settings and params.seed, with the non-None `overrides` applied and range-checked."""
        e = params.eval
        values = {"temperature": e.temperature, "top_k": e.top_k, "top_p": e.top_p,
                  "max_new_tokens": e.max_new_tokens, "seed": params.seed}
        values.update({k: v for k, v in overrides.items() if v is not None})
        s = cls(**values)
        if not s.temperature > 0:
            raise UsageError(f"--temperature must be > 0 (got {s.temperature})")
        if s.top_k < 0:
            raise UsageError(f"--top-k must be >= 0, 0 = off (got {s.top_k})")
        if not 0 < s.top_p <= 1:
            raise UsageError(f"--top-p must be in (0, 1] (got {s.top_p})")
        if s.max_new_tokens < 1:
            raise UsageError(f"--max-new-tokens must be >= 1 (got {s.max_new_tokens})")
        if s.seed < 0:
            raise UsageError(f"--seed must be >= 0 (got {s.seed})")
        return s

    def generation_config(self, eos_token_id: int, pad_token_id: int) -> Any:
        """These settings as the project's one GenerationConfig (`ppo.generation_config`)."""
        from edgerlhf.ppo import generation_config

        return generation_config(self.temperature, self.top_k, self.top_p, self.max_new_tokens, eos_token_id,
                                 pad_token_id)


def to_dialogue(text: str, raw: bool = False) -> str:
    """The text the model is given: a plain question wrapped as "\\n\\nHuman: Q\\n\\nAssistant:"; text that already
    holds "Assistant:" as given (literal \\n become newlines, so one-line prompts can carry the format)."""
    if raw:
        return text
    if "Assistant:" in text:
        return text.replace("\\n", "\n")
    return format_prompt(text.strip())


def read_prompts(args: Sequence[str], file: str | None, stdin: Any = None) -> list[str]:
    """Prompts from the arguments and `file` (one per line, `-` = stdin; blank lines skipped), or from stdin
    when neither is given. An empty argument, or no prompt at all, is a UsageError."""
    prompts = []
    for i, text in enumerate(args, 1):
        if not text.strip():
            raise UsageError(f"prompt argument {i} is empty: give a question, e.g. \"What color is the sky?\"")
        prompts.append(text)
    stdin = stdin if stdin is not None else sys.stdin
    source = None
    if file == "-" or (file is None and not args):
        if file is None and stdin.isatty():
            raise UsageError("no prompt: give one as an argument, with --file FILE, or on stdin")
        source, lines = "stdin", stdin.read().splitlines()
    elif file is not None:
        try:
            lines = Path(file).read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise UsageError(f"cannot read prompts from {file}: {exc}") from exc
        source = file
    if source is not None:
        read = [line for line in lines if line.strip()]
        if len(read) < len(lines):
            log.info("%s: skipped %d blank line(s)", source, len(lines) - len(read))
        if not read:
            raise UsageError(f"no prompt in {source}: it is empty (one prompt per line)")
        prompts += read
    return prompts


# --------------------------------------------------------------------------- models and sampling


def _adapter_name(policy: str) -> str:
    return policy.replace("@", "_")  # peft adapter names become module keys


class PolicySet:
    """The merged SFT model once in memory; each PPO policy is a named LoRA adapter on it (plain peft) and `sft`
    is the same model with adapters off -- exactly the policy/reference pair PPO trained and sampled."""

    def __init__(self, root: Path, params: Params, names: Sequence[str], device: Any) -> None:
        from edgerlhf import modeling

        self.names = list(names)
        self.tokenizer = modeling.load_tokenizer(root / paths.SFT_MERGED, params.model.trust_remote_code)
        model = modeling.load_causal_lm(root / paths.SFT_MERGED, device,
                                        trust_remote_code=params.model.trust_remote_code)
        self.backbone = model
        adapters = [n for n in self.names if n != SFT]
        if adapters:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, str(policy_dir(root, adapters[0])),
                                              adapter_name=_adapter_name(adapters[0]), is_trainable=False)
            for name in adapters[1:]:
                model.load_adapter(str(policy_dir(root, name)), adapter_name=_adapter_name(name),
                                   is_trainable=False)
        self.model = model.eval()
        self.device = device.torch_device
        config = self.backbone.config
        self.max_positions = getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)

    @contextlib.contextmanager
    def active(self, name: str) -> Iterator[None]:
        """Run generate() as policy `name` inside the block."""
        if name == SFT:
            with self.model.disable_adapter() if self.model is not self.backbone else contextlib.nullcontext():
                yield
        else:
            self.model.set_adapter(_adapter_name(name))
            yield


def sample(model: Any, query_ids: Sequence[Sequence[int]], eos_token_id: int, pad_token_id: int,
           device: Any) -> Any:
    """One response per prompt, as PPO's rollouts (`ppo.generate_responses`): left-padded prompts, generate() with
    the model's generation_config, responses cut after the first EOS. Returns a `ppo.Rollout`."""
    import torch

    from edgerlhf import ppo

    with torch.no_grad():
        query, query_mask = ppo.left_pad(query_ids, pad_token_id, device)
        out = model.generate(input_ids=query, attention_mask=query_mask)
    response, response_mask, has_eos = ppo.truncate_after_eos(out[:, query.shape[1]:], eos_token_id, pad_token_id)
    return ppo.Rollout(query, query_mask, response, response_mask, has_eos)


@dataclass
class Answer:
    """One policy's response to one prompt, with its scores when compared."""

    policy: str
    prompt: str  # what the user gave
    dialogue: str  # the text the model saw
    response: str  # decoded response only (special tokens dropped)
    tokens: int  # response tokens including the EOS
    eos: bool  # False: cut at max_new_tokens
    scores: dict[str, float] = field(default_factory=dict)  # "rm@P" -> raw proxy reward
    gold: float | None = None

    def to_json(self) -> dict[str, Any]:
        return {"policy": self.policy, "prompt": self.prompt, "response": self.response, "tokens": self.tokens,
                "eos": self.eos, "scores": self.scores, "gold": self.gold}


def answer_all(policies: PolicySet, names: Sequence[str], prompts: Sequence[str], dialogues: Sequence[str],
               sampling: Sampling, batch_size: int, scorers: dict[str, Any] | None = None, gold: Any = None,
               progress: bool = False) -> list[list[Answer]]:
    """answers[i][j]: policy names[j] on prompt i. Each policy samples all prompts from the same seed, so a
    policy's answers do not depend on which other policies are compared."""
    import torch
    from tqdm.auto import tqdm

    tok = policies.tokenizer
    eos, pad = tok.eos_token_id, tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    ids = [tok(d, add_special_tokens=False)["input_ids"] for d in dialogues]
    for i, row in enumerate(ids):
        if policies.max_positions and len(row) + sampling.max_new_tokens > policies.max_positions:
            raise UsageError(f"prompt {i + 1} has {len(row)} tokens: with --max-new-tokens {sampling.max_new_tokens} "
                             f"it exceeds the model's {policies.max_positions} positions; shorten it or lower "
                             "--max-new-tokens")
    policies.backbone.generation_config = sampling.generation_config(eos, pad)
    answers: list[list[Answer]] = [[] for _ in prompts]
    bar = tqdm(total=len(prompts) * len(names), desc="generate", unit="answer", disable=not progress,
               file=sys.stderr)
    for name in names:
        torch.manual_seed(sampling.seed)
        with policies.active(name):
            for start in range(0, len(prompts), batch_size):
                ro = sample(policies.model, ids[start:start + batch_size], eos, pad, policies.device)
                rm_scores = {key: fn(ro.query, ro.query_mask, ro.response, ro.response_mask).tolist()
                             for key, fn in (scorers or {}).items()}
                for k in range(len(ro.response)):
                    i = start + k
                    mask = ro.response_mask[k].bool()
                    text = tok.decode(ro.response[k][mask].tolist(), skip_special_tokens=True)
                    scores = {key: round(v[k], 4) for key, v in rm_scores.items()}
                    answers[i].append(Answer(name, prompts[i], dialogues[i], text, int(mask.sum()),
                                             bool(ro.has_eos[k]), scores))
                bar.update(len(ro.response))
    bar.close()
    add_gold(gold, [a for row in answers for a in row])
    return answers


def add_gold(gold: Any, answers: Sequence[Answer]) -> None:
    """Each answer's gold score, in one judge pass (a model judge is loaded once); where that pass refuses a
    dialogue (a rules judge on a question outside its task, a --raw prompt that is not a dialogue), each answer is
    scored alone and the refused ones get None."""
    if gold is None or not answers:
        return
    try:
        scores: list[float | None] = [round(float(g), 4) for g in gold([a.dialogue for a in answers],
                                                                        [a.response for a in answers])]
    except ValueError:
        scores = [gold_score(gold, a.dialogue, a.response) for a in answers]
    for a, g in zip(answers, scores):
        a.gold = g


def gold_score(gold: Any, dialogue: str, response: str) -> float | None:
    """The gold judge's score, or None without a judge or for a prompt outside its task."""
    if gold is None:
        return None
    try:
        return round(float(gold([dialogue], [response])[0]), 4)
    except ValueError:  # e.g. a question the synthetic task does not know
        return None


# --------------------------------------------------------------------------- output


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def comparison_table(answers: Sequence[Answer], rm_keys: Sequence[str], with_gold: bool, width: int = 60) -> str:
    """The answers of every policy to one prompt side by side, with their scores (tabulate grid)."""
    from tabulate import tabulate

    headers = ["policy", "response", "tokens", *rm_keys, *(["gold"] if with_gold else [])]
    rows = []
    for a in answers:
        row = [a.policy, a.response.strip() or "(empty)", f"{a.tokens}" + ("" if a.eos else " (cut)"),
               *[_num(a.scores.get(k)) for k in rm_keys]]
        rows.append(row + ([_num(a.gold)] if with_gold else []))
    return tabulate(rows, headers=headers, tablefmt="grid", disable_numparse=True,
                    maxcolwidths=[None, width, *[None] * (len(headers) - 2)])


def print_answers(answers: list[list[Answer]], out: Any, jsonl: bool, compare: bool, rm_keys: Sequence[str],
                  with_gold: bool) -> None:
    """Write the answers: JSON lines, one comparison table per prompt, or prompt + response blocks."""
    for per_prompt in answers:
        if jsonl:
            for a in per_prompt:
                out.write(json.dumps(a.to_json()) + "\n")
        elif compare:
            out.write(f"Prompt: {per_prompt[0].prompt.strip()}\n")
            out.write(comparison_table(per_prompt, rm_keys, with_gold) + "\n\n")
        else:
            a = per_prompt[0]
            cut = "" if a.eos else "  [cut at --max-new-tokens, no EOS]"
            out.write(f">>> {a.prompt.strip()}\n{a.response.strip()}{cut}\n\n")
    if compare and not jsonl:
        legend = "rm@P: raw score of the proxy reward model trained at precision P (higher = preferred)"
        if with_gold:
            legend += "; gold: the synthetic task's rule scorer (edgerlhf/synthetic.py), - = not one of its questions"
        out.write(legend + "; tokens: response tokens incl. EOS, (cut) = stopped at max_new_tokens.\n")


# --------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m edgerlhf.generate", description="Sample responses from the policies a pipeline run trained.",
        epilog='example: python -m edgerlhf.generate --compare "What color is the sky?"')
    parser.add_argument("prompts", nargs="*", metavar="PROMPT",
                        help='a question ("What color is the sky?") or a full dialogue ending in "Assistant:"')
    parser.add_argument("--policy", help="sft | ppo@bf16 | ppo@int8 | ppo@int4 (default: ppo@ the first of "
                        "reward.precisions)")
    parser.add_argument("--compare", action="store_true",
                        help="every available policy side by side, with proxy RM and gold scores")
    parser.add_argument("--file", help="read prompts from FILE, one per line (- = stdin); shows a progress bar")
    parser.add_argument("--root", default=".", help="project root holding params.yaml and the run's outputs "
                        "(default: current directory; e.g. .smoke)")
    parser.add_argument("--temperature", type=float, help="default: eval.temperature")
    parser.add_argument("--top-k", type=int, help="default: eval.top_k (0 = off)")
    parser.add_argument("--top-p", type=float, help="default: eval.top_p")
    parser.add_argument("--max-new-tokens", type=int, help="default: eval.max_new_tokens")
    parser.add_argument("--seed", type=int, help="default: params seed")
    parser.add_argument("--batch-size", type=int, help="prompts per generate() call (default: eval.batch_size)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], help="default: hardware.device")
    parser.add_argument("--raw", action="store_true", help="give prompts to the model exactly as written")
    parser.add_argument("--jsonl", action="store_true", help="one JSON object per answer instead of text")
    return parser


def quiet_libraries() -> None:
    """No weight-loading progress bars or deprecation chatter between the answers (runtime.setup_logging already
    limits the libraries' loggers to errors)."""
    import warnings

    import transformers

    transformers.utils.logging.disable_progress_bar()
    for module in ("transformers", "peft", "bitsandbytes"):
        warnings.filterwarnings("ignore", category=FutureWarning, module=module)
        warnings.filterwarnings("ignore", category=UserWarning, module=module)


def main(argv: Sequence[str] | None = None) -> None:
    """Parse the command line, check it (cheaply, before any model loads), sample, print."""
    import dataclasses

    args = build_parser().parse_args(argv)
    root = Path(args.root)
    params = load_params(root / "params.yaml")
    if args.compare and args.policy:
        raise UsageError("--compare answers with every policy: drop --policy (or drop --compare)")
    default = f"ppo@{params.reward.precisions[0]}"
    names = policy_names(params) if args.compare else [check_policy(args.policy or default, params)]
    sampling = Sampling.from_params(params, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                                    max_new_tokens=args.max_new_tokens, seed=args.seed)
    batch_size = args.batch_size or params.eval.batch_size
    if batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1 (got {batch_size})")
    prompts = read_prompts(args.prompts, args.file)
    dialogues = [to_dialogue(p, args.raw) for p in prompts]

    require_policy(root, SFT)
    if args.compare:
        available = []
        for name in names:
            try:
                require_policy(root, name)
                available.append(name)
            except MissingPolicy as exc:
                log.warning("skipping %s", exc)
        names = available
    else:
        require_policy(root, names[0])
    adapters = reward_adapters(root, params) if args.compare else {}

    quiet_libraries()
    from edgerlhf import modeling, ppo
    from edgerlhf.judge import gold_judge

    hardware = params.hardware if args.device is None else dataclasses.replace(params.hardware, device=args.device)
    device = modeling.resolve_device(hardware)
    log.info("policies %s from %s on %s; sampling %s", ", ".join(names), root, device.describe(), sampling)
    policies = PolicySet(root, params, names, device)
    scorers: dict[str, Any] = {}
    gold = None
    if args.compare:
        pad = policies.tokenizer.pad_token_id
        for p, adapter in adapters.items():
            rm = precisions.load_reward_model(root / paths.SFT_MERGED, adapter, p, device,
                                            params.model.trust_remote_code)
            scorers[f"rm@{p}"] = ppo.reward_model_score_fn(rm, pad, batch_size)
        gold = gold_judge(params, device, root)
    answers = answer_all(policies, names, prompts, dialogues, sampling, batch_size, scorers, gold,
                         progress=args.file is not None)
    print_answers(answers, sys.stdout, args.jsonl, args.compare, list(scorers), gold is not None)


if __name__ == "__main__":
    from edgerlhf.runtime import run_stage

    run_stage("generate", main)
