"""Training: the loop, checkpoints, history, diagnosis and the run report."""
