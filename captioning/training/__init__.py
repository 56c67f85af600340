"""The training loop, objectives, checkpoints."""
