"""Training: the loop (loop.py), the optimizer seam and LR schedule (optimizer.py),
checkpoints (checkpointing.py), statistics and logging (metrics.py)."""
