"""Recovery after pruning (LoRA fine-tuning). `recover=none` skips this stage."""
