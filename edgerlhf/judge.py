"""The gold judge: an independent scorer that tells real alignment gains from reward hacking (Gao et al. 2022).

`eval.judge` picks it (the `judge` stage builds it into models/judge, whose judge.json says which one it is):

- ``rules``: the synthetic task's rule scorer (the proxy reward models never see it);
- ``model``: a public 1-logit sequence classifier, from the hub (eval.judge_model@judge_revision) or a folder
  (eval.judge_path), copied into models/judge and never quantized: it is the reference;
- ``trained``: a reward model trained here, unquantized, on the disjoint judge_train split;
- ``auto``: rules on the synthetic task, model elsewhere; ``none``: no gold, and the report says so.

A model judge reads each dialogue as chat messages (the HH transcript's Human/Assistant turns, the response as the
last assistant turn) rendered with the judge's own chat template; a judge without one reads the plain transcript
with EOS, as the pipeline's reward models are trained. It is loaded for each scoring pass and freed afterwards,
so on an 8 GB card it never sits next to PPO's models between evaluations.
"""

from __future__ import annotations

import gc
import json
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from edgerlhf import paths
from edgerlhf.config import Params
from edgerlhf.errors import ArtifactError
from edgerlhf.formats import ASSISTANT_MARKER, HUMAN_MARKER
from edgerlhf.modeling import PICKLE_SUFFIXES, TOKENIZER_FILE_PATTERNS, Device, choose_dtype

GoldFn = Callable[[Sequence[str], Sequence[str]], list[float]]

RULES, MODEL, TRAINED, NONE = "rules", "model", "trained", "none"
KINDS = (RULES, MODEL, TRAINED, NONE)  # what models/judge/judge.json can say; eval.judge adds "auto"
INFO_FILE = "judge.json"
_TURN = re.compile(r"\n\n(Human|Assistant):")
_ROLE = {"Human": "user", "Assistant": "assistant"}


def judge_kind(params: Params) -> str:
    """The judge this run uses: eval.judge with `auto` resolved (rules on the synthetic task, model elsewhere)."""
    if params.eval.judge == "auto":
        return RULES if params.data.source == "synthetic" else MODEL
    return params.eval.judge


# --------------------------------------------------------------------------- dialogue -> judge input


def to_messages(prompt: str, response: str) -> list[dict[str, str]]:
    """The dialogue `prompt` (the record convention: ``"\\n\\nHuman: ...\\n\\nAssistant:"``) answered by `response`,
    as chat messages: one per turn, role user/assistant, content without the marker's space; the response is the
    last assistant message."""
    parts = _TURN.split(prompt)
    if parts[0].strip() or len(parts) < 3 or parts[1] != "Human" or parts[-2] != "Assistant" or parts[-1].strip():
        raise ValueError(f"not a dialogue prompt (it must start with {HUMAN_MARKER!r} and end with "
                         f"{ASSISTANT_MARKER!r}): {prompt[:80]!r}")
    turns = [{"role": _ROLE[parts[i]], "content": parts[i + 1].strip()} for i in range(1, len(parts) - 2, 2)]
    return [*turns, {"role": "assistant", "content": response.strip()}]


def render(tokenizer: Any, prompt: str, response: str) -> tuple[str, bool]:
    """The text the judge reads and whether it is a chat rendering (True: tokenize it without adding special
    tokens, the template has them; False: the plain transcript with EOS, tokenized as usual)."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(to_messages(prompt, response), tokenize=False), True
    eos = tokenizer.eos_token or ""
    return prompt + (response if response.endswith(eos) else response + eos), False


def encode(tokenizer: Any, prompts: Sequence[str], responses: Sequence[str], max_length: int
           ) -> tuple[list[list[int]], int]:
    """Token ids of each rendered dialogue, cut from the LEFT to `max_length` (the end of the dialogue and the
    whole response are what the judge scores); returns (ids, how many were cut)."""
    ids, cut = [], 0
    for p, r in zip(prompts, responses, strict=True):
        text, chat = render(tokenizer, p, r)
        seq = tokenizer(text, add_special_tokens=not chat)["input_ids"]
        cut += len(seq) > max_length
        ids.append(seq[-max_length:])
    return ids, cut


# --------------------------------------------------------------------------- a judge model folder


def check_judge_folder(path: str | Path, fix: str) -> Path:
    """A folder that can serve as a model judge: safetensors weights (no pickle), a config with one score output
    (num_labels 1) and a tokenizer. Otherwise one ArtifactError line ending in `fix`."""
    path = Path(path)
    if not path.is_dir():
        raise ArtifactError(f"judge folder {path} does not exist: {fix}")
    config = path / "config.json"
    if not config.is_file():
        raise ArtifactError(f"{path} has no config.json, so it is not a model folder: {fix}")
    pickles = sorted(f.name for f in path.rglob("*") if f.suffix.lower() in PICKLE_SUFFIXES and f.is_file())
    if pickles:
        raise ArtifactError(f"{path} holds pickle weights ({pickles[0]}): refusing to load them, unpickling can run "
                            f"arbitrary code; use a judge saved as safetensors: {fix}")
    if not any(path.glob("*.safetensors")):
        raise ArtifactError(f"{path} has no *.safetensors weights: {fix}")
    cfg = json.loads(config.read_text())
    labels = cfg.get("num_labels", len(cfg.get("id2label") or {}) or 2)
    if labels != 1:
        raise ArtifactError(f"{path} is a classifier with {labels} outputs, not a reward model (a judge needs "
                            f"one score, num_labels 1): {fix}")
    if not any(any(path.glob(pattern)) for pattern in TOKENIZER_FILE_PATTERNS):
        raise ArtifactError(f"{path} has no tokenizer files: {fix}")
    return path


def load_judge_model(path: str | Path, device: Device, trust_remote_code: bool = False):
    """The judge at full quality: 16-bit on a GPU (bf16 from compute capability 8.0, else fp16), fp32 on CPU;
    never quantized. Eval mode, frozen."""
    from transformers import AutoModelForSequenceClassification

    dtype = choose_dtype(device.type, device.capability if device.type == "cuda" else None, "auto")
    model = AutoModelForSequenceClassification.from_pretrained(
        str(path), dtype=dtype, use_safetensors=True, trust_remote_code=trust_remote_code,
        device_map={"": device.torch_device})
    model.eval()
    model.requires_grad_(False)
    return model


class ModelJudge:
    """A GoldFn over a judge model folder: loads the model for a scoring pass, scores in batches, frees it."""

    def __init__(self, path: str | Path, device: Device, batch_size: int, max_length: int,
                 trust_remote_code: bool = False) -> None:
        from edgerlhf.modeling import load_tokenizer

        self.path, self.device = Path(path), device
        self.batch_size, self.max_length, self.trust = batch_size, max_length, trust_remote_code
        self.tokenizer = load_tokenizer(self.path, trust_remote_code)
        self.truncated = 0  # dialogues cut to max_length over all passes so far

    def __call__(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        from edgerlhf.reward import score_sequences

        ids, cut = encode(self.tokenizer, prompts, responses, self.max_length)
        self.truncated += cut
        model = load_judge_model(self.path, self.device, self.trust)
        # the classifier finds each row's last token through the pad id: the one the batches are padded with
        model.config.pad_token_id = self.tokenizer.pad_token_id
        try:
            # longest first: batches of similar lengths pad little; scores go back to the input order
            order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
            scores = score_sequences(model, self.tokenizer, [ids[i] for i in order], self.batch_size, self.device)
        finally:
            del model
            free_memory()
        out = [0.0] * len(ids)
        for i, s in zip(order, scores):
            out[i] = s
        return out


def free_memory() -> None:
    """Give a freed model's memory back (the GPU cache too), so the next model has the card."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def rules_judge() -> GoldFn:
    """The synthetic task's rule scorer as a GoldFn."""
    from edgerlhf.synthetic import gold_score

    def judge(prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        return [gold_score(p, r) for p, r in zip(prompts, responses)]

    return judge


# --------------------------------------------------------------------------- the built judge (models/judge)


def read_info(root: str | Path = ".") -> dict[str, Any]:
    """models/judge/judge.json: which judge the judge stage built (`kind` in KINDS, and where it came from)."""
    path = Path(root) / paths.JUDGE_INFO
    if not path.is_file():
        raise ArtifactError(f"{path} is missing: run `dvc repro judge`")
    try:
        info = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError):
        info = None
    if not isinstance(info, dict) or info.get("kind") not in KINDS:
        raise ArtifactError(f"{path} is not a judge description (JSON with kind: {', '.join(KINDS)}): "
                            "rerun `dvc repro -f judge`")
    return info


def require_judge(root: str | Path = ".") -> dict[str, Any]:
    """What a stage scoring with the judge checks first: judge.json, and for a model judge its folder (safetensors,
    one score output, tokenizer). Returns the info."""
    info = read_info(root)
    if info["kind"] in (MODEL, TRAINED):
        check_judge_folder(Path(root) / paths.JUDGE, "rerun `dvc repro -f judge`")
    return info


def describe(info: dict[str, Any]) -> str:
    """One phrase naming the judge, for logs and the report (names and ids in backticks: they hold no metric)."""
    kind = info["kind"]
    if kind == RULES:
        return "the synthetic task's rule scorer (eval.judge rules)"
    if kind == NONE:
        return "none"
    if kind == TRAINED:
        return f"a reward model trained here on the disjoint judge_train split from `{info.get('base', '?')}`"
    if info.get("source") == "hub":
        return f"the reward model `{info.get('name')}` from the hub at `{info.get('commit') or info.get('revision')}`"
    return f"the reward model in the local folder `{info.get('name')}`"


def gold_judge(params: Params, device: Device, root: str | Path = ".") -> GoldFn | None:
    """The gold scorer the judge stage built under `root`, or None for kind none."""
    kind = require_judge(root)["kind"]
    if kind == NONE:
        return None
    if kind == RULES:
        return rules_judge()
    return ModelJudge(Path(root) / paths.JUDGE, device, params.eval.judge_batch_size, params.eval.judge_max_length,
                      params.eval.judge_trust_remote_code and kind == MODEL)



# --------------------------------------------------------------------------- the judge stage: build, score, relabel

# What a hub snapshot of a judge needs (weights, configs, tokenizer, chat template); never pickle weights.
HUB_FILES = ("*.safetensors", "*.json", "*.txt", "*.model", "*.jinja", "*.tiktoken")


def snapshot_hub_judge(name: str, revision: str, out: Path) -> dict[str, Any]:
    """Copy the hub judge `name`@`revision` (safetensors, config, tokenizer) into `out`; the info names the commit
    the revision resolved to."""
    import shutil

    from huggingface_hub import snapshot_download

    from edgerlhf.errors import HubError

    try:
        folder = Path(snapshot_download(name, revision=revision, allow_patterns=list(HUB_FILES)))
    except Exception as exc:  # network, auth, unknown repo or revision: all one line with the way out
        raise HubError(f"cannot download the judge {name}@{revision} ({str(exc).splitlines()[0][:160]}); offline: "
                       "pre-download it into HF_HOME and set HF_HUB_OFFLINE=1, or use eval.judge_source: local, "
                       "eval.judge: trained or none") from exc
    check_judge_folder(folder, "pick a reward model with one score output as eval.judge_model")
    shutil.copytree(folder, out, dirs_exist_ok=True)
    return {"kind": MODEL, "source": "hub", "name": name, "revision": revision, "commit": folder.name}


def copy_local_judge(path: str, out: Path) -> dict[str, Any]:
    """Copy the judge folder `path` into `out` after checking it can serve as a judge."""
    import shutil

    folder = check_judge_folder(path, "point eval.judge_path at a reward-model folder (safetensors weights, "
                                      "config with num_labels 1, tokenizer)")
    shutil.copytree(folder, out, dirs_exist_ok=True)
    return {"kind": MODEL, "source": "local", "name": str(path)}


def train_judge(params: Params, device: Device, train: list[dict], test: list[dict], out: Path, work: Path
                ) -> tuple[dict[str, Any], dict[str, float]]:
    """A judge reward model trained here, unquantized, on judge_train with its own recipe (eval.judge_training),
    from models/base or the larger hub base eval.judge_base; its LoRA merged, saved as a plain sequence classifier
    in `out`."""
    import dataclasses

    from edgerlhf import modeling, precisions, reward

    ep = params.eval
    base: Path = paths.BASE
    if ep.judge_base:
        base = work / "base"
        if not (base / "config.json").is_file():
            hub = dataclasses.replace(params.model, source="hub", name=ep.judge_base, revision=ep.judge_base_revision)
            base.mkdir(parents=True, exist_ok=True)
            modeling.snapshot_hub_model(hub, base, params.lora.target_modules)
    adapter = work / "adapter"
    jt = ep.judge_training
    lora = dataclasses.replace(params.lora, r=jt.lora_r, alpha=jt.lora_alpha, dropout=jt.lora_dropout)
    metrics, _ = reward.train_reward(params, base, "bf16", train, test, adapter, work / "trainer", device,
                                        name="judge", training=jt, lora=lora)
    model = precisions.load_reward_model(base, adapter, "bf16", device, params.model.trust_remote_code)
    merged = model.merge_and_unload()
    modeling.save_model(merged, out)
    modeling.save_tokenizer(modeling.load_tokenizer(base, params.model.trust_remote_code), out)
    del model, merged
    free_memory()
    origin = params.model.name if params.model.source == "hub" else params.model.source
    info = {"kind": TRAINED, "base": ep.judge_base or f"models/base ({origin})"}
    return info, {"judge_train_pairs": metrics["train_pairs"], "judge_train_loss": metrics["train_loss"]}


def pair_scores(gold: GoldFn, records: Sequence[dict]) -> tuple[list[float], list[float]]:
    """(chosen scores, rejected scores) of preference records under the judge, in one scoring pass."""
    prompts = [r["prompt"] for r in records]
    scores = [float(s) for s in gold(prompts + prompts, [r["chosen"] for r in records] +
                                     [r["rejected"] for r in records])]
    return scores[:len(records)], scores[len(records):]


def relabel(records: Sequence[dict], chosen: Sequence[float], rejected: Sequence[float]
            ) -> tuple[list[dict], int, int]:
    """Each pair ordered by the judge: swapped where it scores the rejected response higher; a tie keeps the data's
    order. Returns (records, flipped, ties)."""
    out, flipped, ties = [], 0, 0
    for rec, c, r in zip(records, chosen, rejected, strict=True):
        if r > c:
            rec = {**rec, "chosen": rec["rejected"], "rejected": rec["chosen"]}
            flipped += 1
        ties += r == c
        out.append(rec)
    return out, flipped, ties
