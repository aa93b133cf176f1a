"""The gold judge (edgerlhf/judge.py): dialogue -> chat messages -> the judge's text and tokens, a model judge's
scores (batching, order and padding must not change them), the checks on a judge folder, and models/judge/judge.json.
Fast: the model judge is the random tiny one of tests/judge_fixture.py."""

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from edgerlhf import paths, synthetic
from edgerlhf.config import DataParams, EvalParams, Params
from edgerlhf.errors import ArtifactError
from edgerlhf.judge import (
    ModelJudge,
    check_judge_folder,
    describe,
    encode,
    gold_judge,
    judge_kind,
    read_info,
    render,
    to_messages,
)
from edgerlhf.modeling import Device, load_tokenizer
from tests.judge_fixture import build_tiny_judge, synthetic_texts

CPU = Device("cpu", torch.float32, "cpu")
FIX = "point eval.judge_path at a judge folder"

# Three Human turns, two earlier Assistant turns, then the response: the record convention (edgerlhf/formats.py).
PROMPT = ("\n\nHuman: What color is the sky?\n\nAssistant: The sky is blue.\n\nHuman: And the grass?"
          "\n\nAssistant: Glad to help! The grass is green.\n\nHuman: What does a cat say?\n\nAssistant:")
RESPONSE = " A cat says meow."
MESSAGES = [
    {"role": "user", "content": "What color is the sky?"},
    {"role": "assistant", "content": "The sky is blue."},
    {"role": "user", "content": "And the grass?"},
    {"role": "assistant", "content": "Glad to help! The grass is green."},
    {"role": "user", "content": "What does a cat say?"},
    {"role": "assistant", "content": "A cat says meow."},
]


@pytest.fixture(scope="module")
def judges(tmp_path_factory) -> dict[str, Path]:
    """Tiny judge folders: `chat` (Qwen3, ChatML template), `plain` (Qwen2, no template: transcript + EOS),
    `two` (Qwen3 with num_labels 2: not a reward model)."""
    root, texts = tmp_path_factory.mktemp("judges"), synthetic_texts()
    return {"chat": build_tiny_judge(root / "chat", texts),
            "plain": build_tiny_judge(root / "plain", texts, arch="qwen2", chat_template=False, seed=1),
            "two": build_tiny_judge(root / "two", texts, num_labels=2)}


def dialogues() -> tuple[list[str], list[str]]:
    """Prompts and responses of very different lengths (so batches pad), the multi-turn one included."""
    records = synthetic.generate_split(3, 3, "judge-test")
    prompts = [PROMPT] + [r["prompt"] for r in records] + [records[0]["prompt"]]
    responses = [RESPONSE] + [r["chosen"] for r in records] + [" Ugh, fine. " + "I like trains. " * 6]
    return prompts, responses


# --------------------------------------------------------------------------- dialogue -> messages -> text


def test_to_messages_multi_turn():
    assert to_messages(PROMPT, RESPONSE) == MESSAGES
    assert to_messages("\n\nHuman: Hi\n\nAssistant:", " Hello.") == [
        {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]


@pytest.mark.parametrize("prompt", [
    "What color is the sky?",  # no markers at all
    "Tell me.\n\nHuman: What color is the sky?\n\nAssistant:",  # text before the first turn
    "\n\nAssistant: Hi.\n\nHuman: What color is the sky?\n\nAssistant:",  # starts with an Assistant turn
    "\n\nHuman: What color is the sky?",  # does not end with the Assistant marker
    "\n\nHuman: What color is the sky?\n\nAssistant: Blue.",  # already answered
    "",
])
def test_to_messages_rejects_a_prompt_outside_the_convention(prompt):
    with pytest.raises(ValueError, match="not a dialogue prompt"):
        to_messages(prompt, " Blue.")


def test_render_with_the_chat_template(judges):
    tok = load_tokenizer(judges["chat"])
    text, chat = render(tok, PROMPT, RESPONSE)
    assert chat is True
    assert text == ("<|im_start|>user\nWhat color is the sky?<|im_end|>\n"
                    "<|im_start|>assistant\nThe sky is blue.<|im_end|>\n"
                    "<|im_start|>user\nAnd the grass?<|im_end|>\n"
                    "<|im_start|>assistant\nGlad to help! The grass is green.<|im_end|>\n"
                    "<|im_start|>user\nWhat does a cat say?<|im_end|>\n"
                    "<|im_start|>assistant\nA cat says meow.<|im_end|>\n")


def test_render_without_a_chat_template_is_the_transcript_and_eos(judges):
    tok = load_tokenizer(judges["plain"])
    assert not tok.chat_template and tok.eos_token == "<|endoftext|>"
    assert render(tok, PROMPT, RESPONSE) == (PROMPT + RESPONSE + "<|endoftext|>", False)
    # a response that already ends with EOS does not get a second one
    assert render(tok, PROMPT, RESPONSE + "<|endoftext|>") == (PROMPT + RESPONSE + "<|endoftext|>", False)


@pytest.mark.parametrize("kind", ["chat", "plain"])
def test_encode_cuts_from_the_left_and_counts(judges, kind):
    tok = load_tokenizer(judges[kind])
    short_prompt, short_response = "\n\nHuman: Hi\n\nAssistant:", " Hello."
    (full, short), cut = encode(tok, [PROMPT, short_prompt], [RESPONSE, short_response], 10_000)
    assert cut == 0
    assert tok.decode(full) == render(tok, PROMPT, RESPONSE)[0]  # chat: no special tokens added twice
    limit = len(short) + 2
    assert len(full) > limit
    (kept, kept_short), cut = encode(tok, [PROMPT, short_prompt], [RESPONSE, short_response], limit)
    assert cut == 1 and kept_short == short
    assert kept == full[-limit:]  # the start of the dialogue goes, its end stays
    assert tok.decode(kept).endswith("A cat says meow.<|im_end|>\n" if kind == "chat" else
                                     "A cat says meow.<|endoftext|>")
    _, cut = encode(tok, [PROMPT, short_prompt, PROMPT], [RESPONSE, short_response, RESPONSE], len(short) - 1)
    assert cut == 3


# --------------------------------------------------------------------------- the model judge


@pytest.mark.parametrize("kind", ["chat", "plain"])
def test_model_judge_scores_do_not_depend_on_batching_order_or_padding(judges, kind):
    prompts, responses = dialogues()
    judge = ModelJudge(judges[kind], CPU, batch_size=3, max_length=512)
    scores = judge(prompts, responses)
    assert len(scores) == len(prompts) and all(math.isfinite(s) for s in scores)
    assert judge.truncated == 0
    assert len(set(scores)) == len(scores)  # distinct dialogues, distinct scores: a mix-up would show
    assert ModelJudge(judges[kind], CPU, batch_size=len(prompts), max_length=512)(prompts, responses) == \
        pytest.approx(scores, abs=1e-5)
    assert judge(prompts[::-1], responses[::-1]) == pytest.approx(scores[::-1], abs=1e-5)
    alone = [judge([p], [r])[0] for p, r in zip(prompts, responses)]
    assert alone == pytest.approx(scores, abs=1e-5)


def test_model_judge_pads_with_the_id_the_model_reads(judges, tmp_path):
    """A judge whose config names another pad token than its tokenizer (hub models do): batches are padded with the
    tokenizer's pad, so the model must look for that one, or a short row is read at a padding position."""
    folder = tmp_path / "judge"
    shutil.copytree(judges["chat"], folder)
    config = json.loads((folder / "config.json").read_text())
    from transformers import AutoTokenizer

    config["pad_token_id"] = AutoTokenizer.from_pretrained(folder).convert_tokens_to_ids("<|im_end|>")
    (folder / "config.json").write_text(json.dumps(config))
    prompts, responses = dialogues()
    judge = ModelJudge(folder, CPU, batch_size=len(prompts), max_length=512)
    alone = [judge([p], [r])[0] for p, r in zip(prompts, responses)]
    assert judge(prompts, responses) == pytest.approx(alone, abs=1e-5)


def test_model_judge_tells_responses_apart_and_counts_truncation(judges):
    judge = ModelJudge(judges["chat"], CPU, batch_size=4, max_length=512)
    prompt = synthetic.format_prompt("What color is the sky?")
    right, wrong = judge([prompt, prompt], [" The sky is blue.", " The sky is green."])
    assert abs(right - wrong) > 1e-4
    short = ModelJudge(judges["chat"], CPU, batch_size=4, max_length=16)
    scores = short([PROMPT, prompt], [RESPONSE, " The sky is blue."])
    assert all(math.isfinite(s) for s in scores)
    assert short.truncated == 2  # both render to more than 16 tokens
    short([PROMPT], [RESPONSE])
    assert short.truncated == 3  # counted over all passes


# --------------------------------------------------------------------------- a judge folder


def test_check_judge_folder_accepts_the_tiny_judge(judges):
    assert check_judge_folder(judges["chat"], FIX) == judges["chat"]
    assert check_judge_folder(str(judges["plain"]), FIX) == judges["plain"]


def _broken(judges, tmp_path, how: str) -> Path:
    if how == "missing":
        return tmp_path / "no-such-judge"
    if how == "two_labels":
        return judges["two"]
    folder = tmp_path / how
    shutil.copytree(judges["chat"], folder)
    if how == "pickle":
        (folder / "pytorch_model.bin").write_bytes(b"not loaded")
    elif how == "no_tokenizer":
        for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
            (folder / name).unlink()
    elif how == "tokenizer_config_only":  # a config without the vocabulary cannot be loaded
        (folder / "tokenizer.json").unlink()
    elif how == "no_weights":
        (folder / "model.safetensors").unlink()
    elif how == "no_config":
        (folder / "config.json").unlink()
    return folder


@pytest.mark.parametrize("how, message", [
    ("missing", "does not exist"),
    ("two_labels", "is a classifier with 2 outputs, not a reward model"),
    ("pickle", "holds pickle weights (pytorch_model.bin)"),
    ("no_tokenizer", "has no tokenizer files"),
    ("tokenizer_config_only", "has no tokenizer files"),
    ("no_weights", "has no *.safetensors weights"),
    ("no_config", "has no config.json"),
])
def test_check_judge_folder_refuses_with_one_line_naming_the_fix(judges, tmp_path, how, message):
    folder = _broken(judges, tmp_path, how)
    with pytest.raises(ArtifactError) as exc:
        check_judge_folder(folder, FIX)
    text = str(exc.value)
    assert message in text and str(folder) in text
    assert text.endswith(": " + FIX) and "\n" not in text


# --------------------------------------------------------------------------- models/judge/judge.json


def _built(root: Path, info: dict, model: Path | None = None) -> Path:
    """`root` as the judge stage leaves it: models/judge (a copy of `model`, if any) with judge.json."""
    judge_dir = root / paths.JUDGE
    if model is not None:
        shutil.copytree(model, judge_dir)
    judge_dir.mkdir(parents=True, exist_ok=True)
    (root / paths.JUDGE_INFO).write_text(json.dumps(info))
    return root


def test_gold_judge_rules_scores_like_the_synthetic_scorer(tmp_path):
    root = _built(tmp_path, {"kind": "rules"})
    assert read_info(root) == {"kind": "rules"}
    gold = gold_judge(Params(), CPU, root)
    records = synthetic.generate_split(20, 0, "judge-rules")
    prompts = [r["prompt"] for r in records] * 2
    responses = [r["chosen"] for r in records] + [r["rejected"] for r in records]
    scores = gold(prompts, responses)
    assert scores == [synthetic.gold_score(p, r) for p, r in zip(prompts, responses)]
    assert all(c > r for c, r in zip(scores[:20], scores[20:]))  # the task's pairs are ordered by it


def test_gold_judge_none_is_none(tmp_path):
    assert gold_judge(Params(), CPU, _built(tmp_path, {"kind": "none"})) is None


def test_read_info_refuses_a_missing_file_or_an_unknown_kind(tmp_path):
    with pytest.raises(ArtifactError, match=r"judge\.json is missing: run `dvc repro judge`"):
        read_info(tmp_path)
    _built(tmp_path, {"kind": "oracle"})
    with pytest.raises(ArtifactError, match="is not a judge description") as exc:
        gold_judge(Params(), CPU, tmp_path)
    assert "dvc repro -f judge" in str(exc.value) and "\n" not in str(exc.value)
    for broken in ("{not json", "[1, 2]"):  # a cut or foreign file: the same one line, no traceback
        (tmp_path / paths.JUDGE_INFO).write_text(broken)
        with pytest.raises(ArtifactError, match="is not a judge description"):
            read_info(tmp_path)


def test_gold_judge_model_is_a_model_judge_over_models_judge(judges, tmp_path):
    info = {"kind": "model", "source": "local", "name": str(judges["chat"])}
    root = _built(tmp_path, info, judges["chat"])
    params = Params(eval=EvalParams(judge="model", judge_batch_size=3, judge_max_length=77))
    gold = gold_judge(params, CPU, root)
    assert isinstance(gold, ModelJudge)
    assert gold.path == root / paths.JUDGE and (gold.batch_size, gold.max_length) == (3, 77)
    assert gold.trust is False
    prompts, responses = dialogues()
    direct = ModelJudge(judges["chat"], CPU, batch_size=3, max_length=77)(prompts, responses)
    assert gold(prompts, responses) == pytest.approx(direct, abs=1e-5)  # the copy scores as the original


def test_gold_judge_model_without_its_folder_says_rerun(tmp_path):
    root = _built(tmp_path, {"kind": "trained"})  # judge.json but no model files next to it
    with pytest.raises(ArtifactError, match=r"no config\.json.*rerun `dvc repro -f judge`"):
        gold_judge(Params(eval=EvalParams(judge="trained")), CPU, root)


def test_describe_names_the_judge():
    assert describe({"kind": "rules"}) == "the synthetic task's rule scorer (eval.judge rules)"
    assert describe({"kind": "none"}) == "none"
    assert describe({"kind": "model", "source": "hub", "name": "org/rm", "revision": "main", "commit": "abc123"}) \
        == "the reward model `org/rm` from the hub at `abc123`"
    assert describe({"kind": "model", "source": "local", "name": "models/local/rm"}) == \
        "the reward model in the local folder `models/local/rm`"
    assert describe({"kind": "trained", "base": "models/base (tiny)"}) == \
        "a reward model trained here on the disjoint judge_train split from `models/base (tiny)`"


@pytest.mark.parametrize("source, judge, kind", [
    ("synthetic", "auto", "rules"),
    ("hub", "auto", "model"),
    ("jsonl", "auto", "model"),
    ("synthetic", "model", "model"),
    ("synthetic", "trained", "trained"),
    ("hub", "none", "none"),
])
def test_judge_kind_resolves_auto(source, judge, kind):
    params = Params(data=DataParams(source=source), eval=EvalParams(judge=judge))
    assert judge_kind(params) == kind
