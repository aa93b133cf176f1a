"""Supervised fine-tuning: LoRA on prompt -> chosen with TRL's SFTTrainer, loss on the completion only."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch

from edgerlhf import modeling, resume, truncation
from edgerlhf.config import Params
from edgerlhf.errors import DataError
from edgerlhf.modeling import Device

log = logging.getLogger("edgerlhf")


def sft_examples(tokenizer, records: list[dict], max_length: int) -> tuple[list[dict], truncation.FitCounts]:
    """SFT examples as token ids: the dialogue up to the Assistant marker is the prompt, the chosen response (+ EOS)
    the completion, fitted to `max_length` by `truncation` (the prompt cut from the left, the completion whole;
    an example whose completion alone is too long is dropped and counted). `completion_mask` marks the tokens
    the loss is computed on; TRL's SFTTrainer takes such rows as they are (no tokenization, no truncation)."""
    fits, counts = truncation.fit_all(truncation.encode_records(tokenizer, records, ("chosen",)), max_length)
    rows = []
    for f in fits:
        if f is not None:
            ids = f.ids[0]
            mask = [0] * f.prompt_tokens + [1] * (len(ids) - f.prompt_tokens)
            rows.append({"input_ids": ids, "completion_mask": mask})
    return rows, counts


def train_sft(params: Params, base_dir: Path, train_records: list[dict], eval_records: list[dict],
              out_dir: Path, work_dir: Path, device: Device, callbacks: list | None = None
              ) -> tuple[dict, list[dict]]:
    """Train the SFT LoRA; write `adapter/` and `merged/` (SFT weights merged into the base) into `out_dir`.

    Returns the metrics (the per-step curves go to dvclive). `base_eval_loss` is the eval loss of the base model
    (the adapter switched off), which makes "SFT beats the base" checkable from the metrics file.
    Checkpoints every sft.checkpoint_every steps into `work_dir` and resumes from the newest one found there
    (the caller makes sure it belongs to this work: `resume.claim`). `callbacks`: more Trainer callbacks (the
    stage's live curves: edgerlhf.live.trainer_callback)."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    sp = params.sft
    tokenizer = modeling.load_tokenizer(base_dir, params.model.trust_remote_code)
    # Token ids first (cheap): an example set that cannot fit fails before the model is loaded.
    train_rows, train_counts = sft_examples(tokenizer, train_records, sp.max_length)
    eval_rows, eval_counts = sft_examples(tokenizer, eval_records, sp.max_length)
    for name, counts in (("train", train_counts), ("eval", eval_counts)):
        if counts.truncated or counts.dropped_too_long:
            log.warning("SFT %s: %d of %d examples longer than sft.max_length=%d: %d with the prompt cut from the "
                        "left, %d dropped (the response alone is longer)", name,
                        counts.truncated + counts.dropped_too_long, counts.records, sp.max_length, counts.truncated,
                        counts.dropped_too_long)
    if not train_rows or not eval_rows:
        raise DataError(f"no SFT example fits sft.max_length={sp.max_length} tokens (every response alone is "
                        "longer): raise sft.max_length (the check stage names the length needed)")
    model = modeling.load_causal_lm(base_dir, device, trust_remote_code=params.model.trust_remote_code)
    targets = modeling.lora_targets(model, params.lora.target_modules)
    lora = modeling.lora_config(model, "CAUSAL_LM", params.lora.r, params.lora.alpha, params.lora.dropout, targets)
    args = SFTConfig(
        output_dir=str(work_dir), seed=params.seed, data_seed=params.seed,
        learning_rate=sp.learning_rate, per_device_train_batch_size=sp.per_device_train_batch_size,
        per_device_eval_batch_size=max(sp.per_device_train_batch_size, 8),
        gradient_accumulation_steps=sp.gradient_accumulation_steps, num_train_epochs=sp.num_train_epochs,
        max_steps=sp.max_steps, max_length=sp.max_length, warmup_steps=sp.warmup_ratio,
        lr_scheduler_type=sp.lr_scheduler_type, weight_decay=sp.weight_decay,
        activation_checkpointing=sp.gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False} if sp.gradient_checkpointing else None,
        disable_tqdm=False,  # the step bar with its ETA (runtime.trainer_progress_bar)
        logging_steps=sp.logging_steps, eval_strategy="no", report_to=[], completion_only_loss=True, packing=False,
        dataloader_num_workers=0, dataset_num_proc=None, **resume.trainer_save_args(sp.checkpoint_every),
        **modeling.trainer_precision_kwargs(device))
    trainer = SFTTrainer(model=model, args=args, processing_class=tokenizer, peft_config=lora,
                         train_dataset=Dataset.from_list(train_rows), eval_dataset=Dataset.from_list(eval_rows),
                         callbacks=resume.trainer_callbacks() + list(callbacks or []))
    trainable, total = modeling.count_params(trainer.model)
    log.info("SFT: %d train / %d eval examples, LoRA r=%d on %s, %d of %d params trainable",
             len(train_rows), len(eval_rows), params.lora.r, ",".join(targets), trainable, total)

    checkpoint = resume.last_trainer_checkpoint(work_dir) if sp.checkpoint_every else None
    if checkpoint is not None:
        log.info("SFT: resuming from %s", checkpoint)
    trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    train_loss = resume.train_loss(trainer.state.log_history)
    eval_loss = trainer.evaluate()["eval_loss"]
    # The base model is the trained model with its adapter switched off. Evaluated after training, not before:
    # an evaluate() before train() marks the model as prepared, and accelerate then skips the DDP wrapper, so in a
    # multi-process run the gradients would never be averaged (distributed.check_replicas caught it).
    with trainer.model.disable_adapter():
        base_eval = trainer.evaluate()["eval_loss"]
    log.info("SFT: eval loss %.4f (base %.4f), train loss %.4f", eval_loss, base_eval, train_loss)

    adapter_dir = out_dir / "adapter"
    modeling.save_model(trainer.model, adapter_dir)
    modeling.save_tokenizer(tokenizer, adapter_dir)
    merge_adapter(base_dir, adapter_dir, out_dir / "merged", params.model.trust_remote_code)

    metrics = {
        "train_loss": round(float(train_loss), 6),
        "eval_loss": round(float(eval_loss), 6),
        "eval_perplexity": round(math.exp(eval_loss), 6),
        "base_eval_loss": round(float(base_eval), 6),
        "trainable_params": trainable,
        "total_params": total,
        "train_examples": len(train_rows),
        "train_truncated": train_counts.truncated,
        "train_dropped_too_long": train_counts.dropped_too_long,
        "eval_examples": len(eval_rows),
        "eval_truncated": eval_counts.truncated,
        "eval_dropped_too_long": eval_counts.dropped_too_long,
        "optimizer_steps": int(trainer.state.global_step),
    }
    return metrics


def merge_adapter(base_dir: Path, adapter_dir: Path, out_dir: Path, trust_remote_code: bool = False) -> None:
    """Merge a LoRA adapter into the base in fp32 on CPU (exact, precision-independent) and save safetensors.

    Every later stage starts from this merged SFT model: the reward models (as the seed did), the PPO policy
    (whose reference is this model, adapter off), and the SFT baseline of the evaluation."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32, use_safetensors=True,
                                                trust_remote_code=trust_remote_code)
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    modeling.save_model(merged, out_dir)
    modeling.save_tokenizer(modeling.load_tokenizer(base_dir, trust_remote_code), out_dir)
