"""Recovery after pruning: LoRA fine-tuning on Alpaca, merged back into the pruned weights.

`recover=none` skips this stage; `recover=lora_alpaca` / `lora_alpaca_4k` run `run_recovery`, which
trains adapters on every decoder Linear, merges them in place (the pipeline's `model` object stays
valid and, with save_model=true, is saved by the pipeline in the safetensors format), and returns
the loss curve and timing for results.json.
"""
from __future__ import annotations

import logging
import os

from omegaconf import DictConfig

log = logging.getLogger(__name__)


def run_recovery(cfg: DictConfig, model, tokenizer, meter, out_dir: str) -> dict:
    from llmsp.recover.lora import attach_lora, merge, train_lora
    from llmsp.recover.prompting import IGNORE, encode, load_alpaca

    rc = cfg.recover
    if rc.name not in ("lora_alpaca", "lora_alpaca_4k"):
        raise ValueError(f"recover={rc.name}: expected none, lora_alpaca or lora_alpaca_4k")
    with meter.stage("recover", f"LoRA r={rc.lora.r} on {rc.data.local_file if cfg.data.root is not None else rc.data.hub}"
                     f" ({rc.data.n_samples or 'all'} rows), {rc.epochs} epochs, batch {rc.batch_size}"):
        rows = load_alpaca(rc.data.hub, rc.data.local_file, cfg.data.root, rc.data.n_samples, cfg.seed)
        examples = [encode(tokenizer, r, rc.cutoff_len) for r in rows]
        examples = [e for e in examples if any(l != IGNORE for l in e["labels"][1:])]  # drop: prompt filled the cutoff
        peft_model = attach_lora(model, rc.lora.r, rc.lora.alpha, rc.lora.dropout, rc.lora.target_modules)
        trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
        log.info("lora: %d examples, %d trainable parameters", len(examples), trainable)
        stats = train_lora(peft_model, examples, tokenizer, os.path.join(out_dir, "lora_trainer"), lr=rc.lr,
                           epochs=rc.epochs, batch_size=rc.batch_size, micro_batch_size=rc.micro_batch_size,
                           warmup_steps=rc.warmup_steps, seed=cfg.seed, log_every=rc.log_every,
                           grad_checkpointing=rc.gradient_checkpointing, lr_scheduler=rc.lr_scheduler,
                           mixed_precision=rc.mixed_precision)
        merged = merge(peft_model)
        if merged is not model:
            raise RuntimeError("merge_and_unload returned a new model object; the pipeline expects in-place recovery")
    curve = stats["loss_curve"]
    return {"name": rc.name, "examples": len(examples), "trainable_params": trainable, "steps": stats["steps"],
            "time_s": stats["time_s"], "loss_first": curve[0]["loss"] if curve else None,
            "loss_last": curve[-1]["loss"] if curve else None, "loss_curve": curve}
