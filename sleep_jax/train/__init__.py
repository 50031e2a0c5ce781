"""Training: state, optimizers, steps, the loop, checkpoints."""
