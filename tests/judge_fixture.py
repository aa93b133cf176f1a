"""A tiny model judge for tests: a Qwen3- (or Qwen2-) shaped sequence classifier with one score output, a byte-level
BPE trained here on the given texts and (by default) a ChatML chat template like Qwen's, saved as a judge folder
(safetensors, config.json with pad_token_id, tokenizer). Random weights: its scores mean nothing, but they are
deterministic for (texts, arch, seed) and depend on every token, which is what the judge's plumbing is tested with.

Used by tests/test_judge.py and by end-to-end runs with `eval.judge: model, eval.judge_source: local,
eval.judge_path: <folder>` on the synthetic task (pass `synthetic_texts()` so the vocabulary fits its text).
"""

from __future__ import annotations

from pathlib import Path

# Qwen's ChatML, without the tool / thinking branches: one `<|im_start|>role\ncontent<|im_end|>\n` per message.
CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
VOCAB_SIZE = 512


def synthetic_texts(n: int = 64, seed: int = 0) -> list[str]:
    """A corpus of the synthetic task's text (dialogues with both responses, and its fact statements)."""
    from edgerlhf import synthetic

    records = synthetic.generate_split(n, seed, "judge-fixture")
    return [r["prompt"] + r[k] for r in records for k in ("chosen", "rejected")] + synthetic.knowledge_corpus()


def build_tiny_judge(folder: Path, texts: list[str], *, arch: str = "qwen3", num_labels: int = 1,
                     chat_template: bool = True, seed: int = 0) -> Path:
    """Save a tiny `arch` (qwen3 | qwen2) sequence classifier with `num_labels` outputs and its tokenizer into
    `folder`; returns `folder`. With `chat_template`, eos is <|im_end|> and pad <|endoftext|> (as Qwen's instruct
    models); without, eos = pad = <|endoftext|> (GPT-2 style, as the pipeline's own models)."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoModelForSequenceClassification, PreTrainedTokenizerFast, Qwen2Config, Qwen3Config

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=[ENDOFTEXT, IM_START, IM_END],
                                  show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(list(texts), trainer=trainer)
    eos = IM_END if chat_template else ENDOFTEXT
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=eos, pad_token=ENDOFTEXT,
                                  additional_special_tokens=[IM_START, IM_END])
    tok.model_max_length = 1 << 20
    if chat_template:
        tok.chat_template = CHATML_TEMPLATE

    shape = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, initializer_range=0.1,
                 num_labels=num_labels, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                 bos_token_id=None, tie_word_embeddings=False)
    if arch == "qwen3":
        config = Qwen3Config(head_dim=16, **shape)
    elif arch == "qwen2":
        config = Qwen2Config(**shape)
    else:
        raise ValueError(f"arch must be qwen3 or qwen2, not {arch!r}")
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_config(config)
    model.config.pad_token_id = tok.pad_token_id
    model.save_pretrained(folder)  # safetensors
    tok.save_pretrained(folder)
    return folder
