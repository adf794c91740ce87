"""Training: the jitted step, the loop, metrics and logging, checkpoints, early stopping."""
