"""Fine-tuning a pruned model (train) and atomic checkpoints (checkpoint)."""
