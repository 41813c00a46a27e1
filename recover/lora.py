"""LoRA fine-tuning of a (pruned) model with peft, then merge back into plain Linear weights.

peft's target_modules="all-linear" wraps every nn.Linear of the decoder except the output head,
whatever its width, so sliced layers of different sizes and HeadGather's inner `.proj` are adapted
like any other. Adapter weights stay in float32 (peft's autocast_adapter_dtype) even on a bf16 base.
The loss is a token-weighted mean over the response tokens of the whole effective batch, computed
in float32; gradient accumulation splits that batch into micro-batches.
"""
from __future__ import annotations

import logging
import math
import random
import time

import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from tqdm import tqdm
from transformers import get_cosine_schedule_with_warmup

from recover.prompting import IGNORE, collate

log = logging.getLogger(__name__)


def attach_lora(model, r: int, alpha: float, dropout: float, target_modules="all-linear"):
    """Wrap `model` in place with LoRA adapters; returns the PeftModel. Only adapter weights train."""
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules,
                        bias="none", task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def response_loss(model, batch: dict, n_tokens: int) -> torch.Tensor:
    """Sum of fp32 next-token NLL over labelled tokens, divided by `n_tokens` (the effective batch's count)."""
    device = next(model.parameters()).device
    logits = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)).logits
    labels = batch["labels"][:, 1:].to(device)
    nll = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), labels, ignore_index=IGNORE, reduction="sum")
    return nll / n_tokens


def train_step(model, optimizer, micro_batches: list[dict]) -> float:
    """One optimiser step over micro-batches that form one effective batch; returns its mean token loss."""
    n_tokens = sum(int((b["labels"][:, 1:] != IGNORE).sum()) for b in micro_batches)
    total = 0.0
    for b in micro_batches:
        loss = response_loss(model, b, max(n_tokens, 1))
        loss.backward()
        total += loss.item()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return total


def train_lora(peft_model, examples: list[dict], pad_id: int, *, lr: float, epochs: int, batch_size: int,
               micro_batch_size: int, warmup_steps: int = 0, seed: int = 0, log_every: int = 1,
               grad_checkpointing: bool = False) -> dict:
    """Adam (no weight decay) + cosine decay over `epochs` passes of `examples`, shuffled per epoch.

    Returns {"loss_curve": [{step, epoch, loss, lr}], "steps", "time_s"}.
    """
    if batch_size % micro_batch_size:
        raise ValueError(f"recover.batch_size={batch_size} must be a multiple of micro_batch_size={micro_batch_size}")
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=lr, weight_decay=0.0)
    steps_per_epoch = math.ceil(len(examples) / batch_size)
    total = steps_per_epoch * epochs
    if warmup_steps >= total:  # e.g. the paper's 100 warm-up steps on a few-hundred-sample run
        log.warning("lora: warmup_steps=%d >= %d total steps; warming up over the first 10%% instead",
                    warmup_steps, total)
        warmup_steps = total // 10
    scheduler = get_cosine_schedule_with_warmup(optimizer, warmup_steps, total)
    if grad_checkpointing:
        peft_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    peft_model.train()
    rng = random.Random(seed)
    curve, step, t0 = [], 0, time.perf_counter()
    bar = tqdm(total=total, desc="lora", leave=False)
    try:
        for epoch in range(epochs):
            order = list(range(len(examples)))
            rng.shuffle(order)
            for s in range(0, len(order), batch_size):
                idx = order[s:s + batch_size]
                micro = [collate([examples[i] for i in idx[m:m + micro_batch_size]], pad_id)
                         for m in range(0, len(idx), micro_batch_size)]
                loss = train_step(peft_model, optimizer, micro)
                scheduler.step()
                step += 1
                curve.append({"step": step, "epoch": epoch + (s + len(idx)) / len(order), "loss": loss,
                              "lr": scheduler.get_last_lr()[0]})
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}")
                if step % log_every == 0 or step == total:
                    log.info("lora step %d/%d epoch %.2f loss %.4f", step, total, curve[-1]["epoch"], loss)
    finally:
        bar.close()
        if grad_checkpointing:
            peft_model.gradient_checkpointing_disable()
        peft_model.eval()
    return {"loss_curve": curve, "steps": step, "time_s": time.perf_counter() - t0}


def merge(peft_model):
    """Fold the adapters into the base weights and drop peft's wrappers; returns the (same) base model."""
    model = peft_model.merge_and_unload()
    model.eval().requires_grad_(False)
    return model
