"""Reward models: the merged SFT model at a precision (bf16 / LLM.int8 / nf4) + LoRA and a score head,
trained with TRL's RewardTrainer (Bradley-Terry loss on chosen vs rejected)."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from edgerlhf import metrics as M
from edgerlhf import modeling, precisions, resume, truncation
from edgerlhf.config import LoraParams, Params, RewardTraining
from edgerlhf.errors import DataError
from edgerlhf.modeling import Device

log = logging.getLogger("edgerlhf")


def fit_pairs(tokenizer, records: list[dict], max_length: int) -> tuple[list[truncation.Fit | None],
                                                                         truncation.FitCounts]:
    """Both sides of each preference pair as the token ids a reward model trains on and is scored on: prompt +
    response + EOS, the prompt cut from the left (the same tail for chosen and rejected) to fit `max_length`, the
    responses whole (`edgerlhf.truncation`); None where a response alone is longer than `max_length`."""
    return truncation.fit_all(truncation.encode_records(tokenizer, records, ("chosen", "rejected")), max_length)


def require_scorable(fits: list[truncation.Fit | None], split: str, max_length: int) -> list[truncation.Fit]:
    """Every pair of an evaluation split must be scored (the same pairs at every precision): one that cannot fit
    `reward.max_length` is a DataError naming it, raised before any training."""
    missing = [i for i, f in enumerate(fits) if f is None]
    if missing:
        raise DataError(f"{len(missing)} of {len(fits)} {split} pairs (first: record {missing[0]}) have a response "
                        f"longer than reward.max_length={max_length} tokens on its own, so no left-truncation of the "
                        "prompt can keep it: raise reward.max_length (dvc repro check names the length needed)")
    return [f for f in fits if f is not None]


@torch.no_grad()
def score_sequences(model: torch.nn.Module, tokenizer, sequences: list[list[int]], batch_size: int,
                    device: Device) -> list[float]:
    """Reward-model scores of token sequences, right-padded in batches; the model reads its last non-pad token."""
    tokenizer.padding_side = "right"
    scores: list[float] = []
    model.eval()
    for i in range(0, len(sequences), batch_size):
        enc = tokenizer.pad({"input_ids": sequences[i:i + batch_size]}, padding=True, return_tensors="pt")
        out = model(input_ids=enc["input_ids"].to(device.torch_device),
                    attention_mask=enc["attention_mask"].to(device.torch_device)).logits.squeeze(-1).float()
        scores.extend(out.cpu().tolist())
    return scores


def score_fits(model: torch.nn.Module, tokenizer, fits: list[truncation.Fit], batch_size: int,
               device: Device) -> tuple[list[float], list[float]]:
    """(chosen scores, rejected scores) of fitted pairs (`fit_pairs`)."""
    chosen = score_sequences(model, tokenizer, [f.ids[0] for f in fits], batch_size, device)
    rejected = score_sequences(model, tokenizer, [f.ids[1] for f in fits], batch_size, device)
    return chosen, rejected


def score_pairs(model: torch.nn.Module, tokenizer, records: list[dict], batch_size: int, max_length: int,
                device: Device) -> tuple[list[float], list[float]]:
    """(chosen scores, rejected scores) of preference records, on exactly the tokens the reward model trained on
    (`fit_pairs`); a pair that cannot fit `max_length` is a DataError."""
    fits, _ = fit_pairs(tokenizer, records, max_length)
    return score_fits(model, tokenizer, require_scorable(fits, "scored", max_length), batch_size, device)


def adapter_size_mb(adapter_dir: Path) -> float:
    """Size on disk of the saved adapter weights (LoRA + score head), in MiB."""
    return round(sum(f.stat().st_size for f in adapter_dir.glob("*.safetensors")) / 2**20, 4)


def train_reward(params: Params, sft_dir: Path, precision: str, train_records: list[dict],
                 test_records: list[dict], out_dir: Path, work_dir: Path, device: Device, name: str = "",
                 training: RewardTraining | None = None, lora: LoraParams | None = None,
                 callbacks: list | None = None) -> tuple[dict, list[dict], dict]:
    """Train the reward model at `precision`; save its adapter (+ score head) and tokenizer into `out_dir`.

    Returns (metrics, rm_test scores); the per-step curves go to dvclive. Pairs too long for reward.max_length are
    dropped and counted (`train_pairs_too_long`), never silently. Checkpoints every reward.checkpoint_every steps into
    `work_dir` and resumes from the newest one found there (the caller claims it: `resume.claim`). `name`: what
    the logs call the model (default reward@<precision>); `training` / `lora`: another recipe than params.reward /
    params.lora (the trained gold judge's); `callbacks`: more Trainer callbacks (the stage's live curves:
    edgerlhf.live.trainer_callback)."""
    from datasets import Dataset
    from trl import RewardConfig, RewardTrainer

    rp = training or params.reward
    lp = lora or params.lora
    name = name or f"reward@{precision}"
    trust = params.model.trust_remote_code
    tokenizer = modeling.load_tokenizer(sft_dir, trust)
    # Token ids first (cheap): the same fitting for training and scoring; an rm_test pair that cannot be scored
    # fails here, before any training.
    train_fits, train_counts = fit_pairs(tokenizer, train_records, rp.max_length)
    test_fits, test_counts = fit_pairs(tokenizer, test_records, rp.max_length)
    test_fitted = require_scorable(test_fits, "rm_test", rp.max_length)
    # A pair whose two sequences are the same tokens carries no preference (its loss has no gradient): left out.
    kept = [{"chosen_ids": f.ids[0], "rejected_ids": f.ids[1]} for f in train_fits if f is not None and not f.identical]
    if not kept:
        raise DataError(f"no rm_train pair fits reward.max_length={rp.max_length} tokens with two different "
                        "responses: raise reward.max_length (dvc repro check names the length needed)")
    if train_counts.truncated or train_counts.dropped_too_long or train_counts.identical:
        log.warning("%s: of %d training pairs, %d had the prompt cut from the left to fit reward.max_length=%d, "
                    "%d were dropped (a response alone is longer), %d were dropped as identical after truncation",
                    name, train_counts.records, train_counts.truncated, rp.max_length,
                    train_counts.dropped_too_long, train_counts.identical)
    if test_counts.identical:
        log.warning("%s: %d of %d rm_test pairs are identical token sequences after truncation to "
                    "reward.max_length=%d (a data problem: they can only tie)", name, test_counts.identical,
                    test_counts.records, rp.max_length)
    model = precisions.load_reward_base(sft_dir, precision, device, trust)
    quantized = precisions.is_quantized(model, precision)
    if precision != "bf16" and not quantized:
        raise RuntimeError(f"{name}: the loaded model has no bitsandbytes {precision} layers")
    memory_mb = modeling.model_memory_mb(model)
    log.info("%s: %s, quantized=%s, footprint %.1f MiB", name, device.describe(), quantized, memory_mb)
    targets = modeling.lora_targets(model, lp.target_modules)
    peft_config = modeling.lora_config(model, "SEQ_CLS", lp.r, lp.alpha, lp.dropout, targets,
                                modules_to_save=["score"])
    args = RewardConfig(
        output_dir=str(work_dir), seed=params.seed, data_seed=params.seed,
        learning_rate=rp.learning_rate, per_device_train_batch_size=rp.per_device_train_batch_size,
        gradient_accumulation_steps=rp.gradient_accumulation_steps, num_train_epochs=rp.num_train_epochs,
        max_steps=rp.max_steps, max_length=rp.max_length, warmup_steps=rp.warmup_ratio,
        lr_scheduler_type=rp.lr_scheduler_type, weight_decay=rp.weight_decay,
        center_rewards_coefficient=rp.center_rewards_coefficient or None,
        activation_checkpointing=rp.gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False} if rp.gradient_checkpointing else None,
        disable_tqdm=False,  # the step bar with its ETA (runtime.trainer_progress_bar)
        logging_steps=rp.logging_steps, eval_strategy="no", report_to=[], dataloader_num_workers=0,
        **resume.trainer_save_args(rp.checkpoint_every), **modeling.trainer_precision_kwargs(device))
    trainer = RewardTrainer(model=model, args=args, processing_class=tokenizer, peft_config=peft_config,
                            train_dataset=Dataset.from_list(kept),
                            callbacks=resume.trainer_callbacks() + list(callbacks or []))
    modeling.align_trainable_dtype(trainer.model, torch.float32)
    trainable, total = modeling.count_params(trainer.model)
    log.info("%s: %d pairs, LoRA r=%d + score head, %d of %d params trainable",
             name, len(kept), lp.r, trainable, total)
    checkpoint = resume.last_trainer_checkpoint(work_dir) if rp.checkpoint_every else None
    if checkpoint is not None:
        log.info("%s: resuming from %s", name, checkpoint)
    trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)

    chosen, rejected = score_fits(trainer.model, tokenizer, test_fitted, rp.eval_batch_size, device)
    modeling.save_model(trainer.model, out_dir)
    modeling.save_tokenizer(tokenizer, out_dir)
    metrics = {
        **M.reward_metrics(chosen, rejected, rp.ece_bins),
        "train_loss": round(resume.train_loss(trainer.state.log_history), 6),
        "model_memory_mb": memory_mb,
        "adapter_size_mb": adapter_size_mb(out_dir),
        "trainable_params": trainable,
        "train_pairs": len(kept),
        "train_truncated": train_counts.truncated,
        "train_dropped_too_long": train_counts.dropped_too_long,
        "train_identical_after_truncation": train_counts.identical,
        "test_pairs": len(test_records),
        "test_truncated": test_counts.truncated,
        "identical_after_truncation": test_counts.identical,
    }
    log.info("%s: rm_test accuracy %.3f, auc %.3f, ece %.3f", name, metrics["accuracy"],
             metrics["auc"], metrics["ece"])
    return metrics, {"chosen": chosen, "rejected": rejected}
