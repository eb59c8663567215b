"""Training: loss, loop, checkpoints."""
