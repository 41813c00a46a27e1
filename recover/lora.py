"""LoRA fine-tuning of a (pruned) model with peft and `transformers.Trainer`, then merge back into plain Linears.

peft's target_modules="all-linear" wraps every nn.Linear of the decoder except the output head,
whatever its width, so sliced layers of different sizes and HeadGather's inner `.proj` are adapted
like any other. `target_modules: null` is PEFT's own default for the architecture (q_proj/v_proj for
LLaMA, Mistral and OPT, query_key_value for BLOOM: the PG paper's "PEFT defaults", 003:602), and a list
names module leaves; both are resolved to the model's Linear modules (`lora_targets`), a pruned GQA k/v
projection (HeadGather) to its inner `.proj`, which peft can wrap where it cannot wrap HeadGather itself.
Adapter weights stay in float32 (peft's autocast_adapter_dtype) even on a bf16 base.

Training is `transformers.Trainer`, as LLM-Pruner's post-training uses, so mixed precision
(`recover.mixed_precision`), checkpointing and multi-GPU (accelerate / DeepSpeed launchers) come with it:
- batches: `DataCollatorForSeq2Seq` right-pads input_ids and pads labels with -100, so only the
  response tokens (prompt labels are -100 too, recover/prompting.py) carry loss;
- loss: the model's own causal-LM loss (fp32 logits). With gradient accumulation the Trainer passes
  the effective batch's token count (`num_items_in_batch`), so the loss is the token-weighted mean
  over the response tokens of the whole effective batch, as the earlier hand-written loop computed;
- optimiser: AdamW without weight decay, `recover.lr_scheduler` (cosine by default) with warm-up,
  gradient-norm clipping at 1.0 (the Trainer's default, kept as LLM-Pruner does);
- activation checkpointing through `activation_checkpointing` (transformers 5 renamed the
  `gradient_checkpointing_*` API; the old names warn).
Trainer checkpoints are off (`save_strategy="no"`): the pipeline saves the merged model itself.
"""
from __future__ import annotations

import logging
import math
import os
import time
import warnings

from peft import LoraConfig, get_peft_model
from torch import nn
from transformers import DataCollatorForSeq2Seq, Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from llmsp.recover.prompting import IGNORE

log = logging.getLogger(__name__)


def lora_targets(model, target_modules="all-linear"):
    """peft's target_modules for `model`: "all-linear" as it is; null (PEFT's default leaves for the architecture) or
    leaf names -> the full names of the matching Linear modules, a HeadGather's `.proj` for a wrapped k/v projection.
    A name that matches no Linear is a ValueError naming the model's Linear leaves."""
    if target_modules == "all-linear":
        return target_modules
    if target_modules is None:
        from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as DEFAULTS

        arch = model.config.model_type
        if arch not in DEFAULTS:
            raise ValueError(f"recover.lora.target_modules=null: PEFT has no default targets for {arch}; name them")
        target_modules = DEFAULTS[arch]
    leaves = {target_modules} if isinstance(target_modules, str) else set(target_modules)
    out, linear_leaves = [], set()
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        parts = name.split(".")
        linear_leaves.add(parts[-1])
        if parts[-1] in leaves or (parts[-1] == "proj" and len(parts) > 1 and parts[-2] in leaves):
            out.append(name)
    missing = sorted(t for t in leaves if not any(n.split(".")[-1] == t or n.endswith(f"{t}.proj") for n in out))
    if missing:
        raise ValueError(f"recover.lora.target_modules: {missing} name no Linear of this model; its Linear modules "
                         f"are {sorted(linear_leaves)}")
    return out


def attach_lora(model, r: int, alpha: float, dropout: float, target_modules="all-linear"):
    """Wrap `model` in place with LoRA adapters; returns the PeftModel. Only adapter weights train."""
    if target_modules is not None and not isinstance(target_modules, str):
        target_modules = list(target_modules)  # an OmegaConf ListConfig
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=lora_targets(model, target_modules),
                        bias="none", task_type="CAUSAL_LM")
    with warnings.catch_warnings():  # peft 0.21 still reads transformers' deprecated `is_gradient_checkpointing`
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        return get_peft_model(model, config)


def collator(tokenizer) -> DataCollatorForSeq2Seq:
    """Pads a micro-batch: input_ids with the pad token, attention_mask with 0, labels with -100.
    The tokenizer must pad on the right (train_lora sets it) so positions match unpadded training."""
    return DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE, return_tensors="pt")


def total_steps(n_examples: int, batch_size: int, epochs: int) -> int:
    """Optimiser steps of `epochs` passes; the last, partial effective batch of an epoch is a step too."""
    return math.ceil(n_examples / batch_size) * epochs


class _LossLog(TrainerCallback):
    """Collects the Trainer's per-step logs as the loss curve and writes them to the run log."""

    def __init__(self, total: int):
        self.total, self.curve = total, []

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.curve.append({"step": state.global_step, "epoch": state.epoch, "loss": logs["loss"],
                               "lr": logs.get("learning_rate")})
            log.info("lora step %d/%d epoch %.2f loss %.4f", state.global_step, self.total, state.epoch, logs["loss"])


def train_lora(peft_model, examples: list[dict], tokenizer, out_dir: str, *, lr: float, epochs: int,
               batch_size: int, micro_batch_size: int, warmup_steps: int = 0, seed: int = 0, log_every: int = 1,
               grad_checkpointing: bool = False, lr_scheduler: str = "cosine",
               mixed_precision: str | None = None) -> dict:
    """Train the adapters on `examples` ({"input_ids", "labels"} lists). Returns {"loss_curve": [{step, epoch,
    loss, lr}], "steps", "time_s"}. Warm-up longer than the run is cut to 10% of its steps (a few-hundred-row
    run cannot hold the paper's 100 warm-up steps)."""
    if batch_size % micro_batch_size:
        raise ValueError(f"recover.batch_size={batch_size} must be a multiple of micro_batch_size={micro_batch_size}")
    if mixed_precision not in (None, "bf16", "fp16"):
        raise ValueError(f"recover.mixed_precision={mixed_precision!r}: choose null, bf16 or fp16")
    total = total_steps(len(examples), batch_size, epochs)
    if warmup_steps >= total:
        log.warning("lora: warmup_steps=%d >= %d total steps; warming up over the first 10%% instead",
                    warmup_steps, total)
        warmup_steps = total // 10
    device = next(peft_model.parameters()).device
    args = TrainingArguments(
        output_dir=out_dir, per_device_train_batch_size=micro_batch_size,
        gradient_accumulation_steps=batch_size // micro_batch_size, num_train_epochs=epochs, learning_rate=lr,
        lr_scheduler_type=lr_scheduler, warmup_steps=warmup_steps, weight_decay=0.0, optim="adamw_torch",
        logging_strategy="steps", logging_steps=log_every, save_strategy="no", eval_strategy="no",
        report_to="none", seed=seed, data_seed=seed, bf16=mixed_precision == "bf16",
        fp16=mixed_precision == "fp16", activation_checkpointing=grad_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False} if grad_checkpointing else None,
        dataloader_pin_memory=device.type == "cuda", remove_unused_columns=False)
    losses = _LossLog(total)
    side, tokenizer.padding_side = tokenizer.padding_side, "right"
    rows = [{**e, "attention_mask": [1] * len(e["input_ids"])} for e in examples]
    t0 = time.perf_counter()
    try:
        trainer = Trainer(model=peft_model, args=args, train_dataset=rows, data_collator=collator(tokenizer),
                          callbacks=[losses])
        trainer.remove_callback(PrinterCallback)  # the per-step dicts it prints duplicate _LossLog's log lines
        trainer.remove_callback(ProgressCallback)
        trainer.train()
    finally:
        tokenizer.padding_side = side
        if os.path.isdir(out_dir) and not os.listdir(out_dir):  # Trainer makes output_dir; nothing is saved there
            os.rmdir(out_dir)
        if grad_checkpointing:
            peft_model.base_model.model.activation_checkpointing_disable()
        peft_model.eval()
    return {"loss_curve": losses.curve, "steps": trainer.state.global_step, "time_s": time.perf_counter() - t0}


def merge(peft_model):
    """Fold the adapters into the base weights and drop peft's wrappers; returns the (same) base model."""
    model = peft_model.merge_and_unload()
    model.eval().requires_grad_(False)
    return model
