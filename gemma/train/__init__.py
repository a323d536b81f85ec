"""Post-training: data, losses, LoRA, sharding, the fine-tuning trainer (and later distillation, RL)."""
