"""Reward models: the merged SFT model at a precision (bf16 / LLM.int8 / nf4) + LoRA and a score head,
trained with TRL's RewardTrainer (Bradley-Terry loss on chosen vs rejected)."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from edgerlhf import metrics as M
from edgerlhf import modeling, precisions, resume
from edgerlhf.config import Params
from edgerlhf.modeling import Device

log = logging.getLogger("edgerlhf")


def sequence_texts(prompts: list[str], responses: list[str], eos: str) -> list[str]:
    """The exact text a reward model scores: prompt + response + EOS (as RewardTrainer builds it)."""
    return [p + r + ("" if r.endswith(eos) else eos) for p, r in zip(prompts, responses)]


@torch.no_grad()
def score_texts(model: torch.nn.Module, tokenizer, texts: list[str], batch_size: int, max_length: int,
                device: Device) -> list[float]:
    """Reward-model scores of full texts, right-padded in batches; the model reads its last non-pad token."""
    tokenizer.padding_side = "right"
    scores: list[float] = []
    model.eval()
    for i in range(0, len(texts), batch_size):
        enc = tokenizer(texts[i:i + batch_size], return_tensors="pt", padding=True, truncation=True,
                        max_length=max_length).to(device.torch_device)
        out = model(**enc).logits.squeeze(-1).float()
        scores.extend(out.cpu().tolist())
    return scores


def score_pairs(model: torch.nn.Module, tokenizer, records: list[dict], batch_size: int, max_length: int,
                device: Device) -> tuple[list[float], list[float]]:
    """(chosen scores, rejected scores) of preference records."""
    prompts = [r["prompt"] for r in records]
    chosen = score_texts(model, tokenizer, sequence_texts(prompts, [r["chosen"] for r in records],
                                                          tokenizer.eos_token), batch_size, max_length, device)
    rejected = score_texts(model, tokenizer, sequence_texts(prompts, [r["rejected"] for r in records],
                                                            tokenizer.eos_token), batch_size, max_length, device)
    return chosen, rejected


def fits(tokenizer, record: dict, max_length: int) -> bool:
    """Whether both sides of a pair fit in `max_length` tokens (RewardTrainer would drop the pair otherwise)."""
    texts = sequence_texts([record["prompt"]] * 2, [record["chosen"], record["rejected"]], tokenizer.eos_token)
    return all(len(ids) <= max_length for ids in tokenizer(texts)["input_ids"])


def adapter_size_mb(adapter_dir: Path) -> float:
    """Size on disk of the saved adapter weights (LoRA + score head), in MiB."""
    return round(sum(f.stat().st_size for f in adapter_dir.glob("*.safetensors")) / 2**20, 4)


def train_reward(params: Params, sft_dir: Path, precision: str, train_records: list[dict],
                 test_records: list[dict], out_dir: Path, work_dir: Path, device: Device) -> tuple[dict, list[dict],
                                                                                                      dict]:
    """Train the reward model at `precision`; save its adapter (+ score head) and tokenizer into `out_dir`.

    Returns (metrics, per-step log, rm_test scores). Pairs too long for reward.max_length are dropped and
    counted (`train_pairs_too_long`), never silently. Checkpoints every reward.checkpoint_every steps into
    `work_dir` and resumes from the newest one found there (the caller claims it: `resume.claim`)."""
    from datasets import Dataset
    from trl import RewardConfig, RewardTrainer

    rp = params.reward
    trust = params.model.trust_remote_code
    tokenizer = modeling.load_tokenizer(sft_dir, trust)
    model = precisions.load_reward_base(sft_dir, precision, device, trust)
    quantized = precisions.is_quantized(model, precision)
    if precision != "bf16" and not quantized:
        raise RuntimeError(f"reward@{precision}: the loaded model has no bitsandbytes {precision} layers")
    memory_mb = modeling.model_memory_mb(model)
    log.info("reward@%s: %s, quantized=%s, footprint %.1f MiB", precision, device.describe(), quantized, memory_mb)

    kept = [r for r in train_records if fits(tokenizer, r, rp.max_length)]
    too_long = len(train_records) - len(kept)
    if too_long:
        log.info("reward@%s: dropped %d of %d training pairs longer than reward.max_length=%d tokens",
                 precision, too_long, len(train_records), rp.max_length)
    targets = modeling.lora_targets(model, params.lora.target_modules)
    lora = modeling.lora_config(model, "SEQ_CLS", params.lora.r, params.lora.alpha, params.lora.dropout, targets,
                                modules_to_save=["score"])
    args = RewardConfig(
        output_dir=str(work_dir), seed=params.seed, data_seed=params.seed,
        learning_rate=rp.learning_rate, per_device_train_batch_size=rp.per_device_train_batch_size,
        gradient_accumulation_steps=rp.gradient_accumulation_steps, num_train_epochs=rp.num_train_epochs,
        max_steps=rp.max_steps, max_length=rp.max_length, warmup_steps=rp.warmup_ratio,
        lr_scheduler_type=rp.lr_scheduler_type, weight_decay=rp.weight_decay,
        center_rewards_coefficient=rp.center_rewards_coefficient or None,
        gradient_checkpointing=rp.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False} if rp.gradient_checkpointing else None,
        logging_steps=rp.logging_steps, eval_strategy="no", report_to=[], dataloader_num_workers=0,
        **resume.trainer_save_args(rp.checkpoint_every), **modeling.trainer_precision_kwargs(device))
    trainer = RewardTrainer(model=model, args=args, processing_class=tokenizer, peft_config=lora,
                            train_dataset=Dataset.from_list(kept), callbacks=resume.trainer_callbacks())
    modeling.align_trainable_dtype(trainer.model, torch.float32)
    trainable, total = modeling.count_params(trainer.model)
    log.info("reward@%s: %d pairs, LoRA r=%d + score head, %d of %d params trainable",
             precision, len(kept), params.lora.r, trainable, total)
    checkpoint = resume.last_trainer_checkpoint(work_dir) if rp.checkpoint_every else None
    if checkpoint is not None:
        log.info("reward@%s: resuming from %s", precision, checkpoint)
    trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)

    chosen, rejected = score_pairs(trainer.model, tokenizer, test_records, rp.eval_batch_size, rp.max_length, device)
    trainer.model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    metrics = {
        **M.reward_metrics(chosen, rejected, rp.ece_bins),
        "train_loss": round(resume.train_loss(trainer.state.log_history), 6),
        "model_memory_mb": memory_mb,
        "adapter_size_mb": adapter_size_mb(out_dir),
        "trainable_params": trainable,
        "train_pairs": len(kept),
        "train_pairs_too_long": too_long,
        "test_pairs": len(test_records),
    }
    steps = [{"step": e["step"], "loss": e["loss"], "accuracy": e.get("accuracy", 0.0)}
             for e in trainer.state.log_history if "loss" in e]
    log.info("reward@%s: rm_test accuracy %.3f, auc %.3f, ece %.3f", precision, metrics["accuracy"],
             metrics["auc"], metrics["ece"])
    return metrics, steps, {"chosen": chosen, "rejected": rejected}
