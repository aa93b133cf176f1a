"""Stage `base`: materialise the base model + tokenizer into models/base (hub snapshot, local folder or tiny build)."""

# ruff: noqa: E402 - loading() speaks before the imports below, which load torch/transformers (seconds)
from edgerlhf.runtime import loading, set_threads

loading("base")

from edgerlhf import data, modeling, paths
from edgerlhf.config import load_params
from edgerlhf.runtime import atomic_dir, log, run_stage, seed_everything


def main() -> None:
    params = load_params()
    seed_everything(params.seed)
    source = params.model.source
    # Inputs are read and checked before any work; models/base is replaced only when the new one is complete.
    if source == "local":
        # The folder is checked and loaded before anything is written (each bad folder: one line naming the fix).
        tokenizer, model = modeling.load_local_model(params.model, params.lora.target_modules)
        log.info("local model folder %s (%s, %s, %d params)", params.model.local_path, model.config.model_type,
                 type(model).__name__, modeling.count_params(model)[1])
    # Training text only (see data.pretraining_corpus): no evaluation text shapes the vocabulary or weights.
    texts = data.read_corpus(paths.CORPUS) if source == "tiny" else []
    set_threads(params.hardware)
    with atomic_dir(paths.BASE) as out:
        if source == "local":
            modeling.save_base(tokenizer, model, out)
        elif source == "hub":
            log.info("snapshot of %s@%s from the hub", params.model.name, params.model.revision)
            modeling.snapshot_hub_model(params.model, out, params.lora.target_modules)
        else:
            tiny = params.model.tiny
            tokenizer = modeling.train_tokenizer(texts, tiny.vocab_size, out)
            model = modeling.build_tiny_model(tiny, tokenizer, params.seed)
            trainable, total = modeling.count_params(model)
            log.info("tiny %s: %d layers x %d dims, vocab %d, %d params (tokenizer trained on %d texts)",
                     tiny.arch, tiny.n_layer, tiny.n_embd, len(tokenizer), total, len(texts))
            losses = modeling.pretrain_tiny(model, tokenizer, texts, tiny.pretrain_steps, tiny.pretrain_batch_size,
                                            tiny.pretrain_lr, params.seed)
            if losses:
                log.info("pretrained %d steps: LM loss %.3f -> %.3f", len(losses), losses[0], losses[-1])
            modeling.save_model(model, out)


if __name__ == "__main__":
    run_stage("base", main)
