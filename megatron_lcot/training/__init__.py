"""Training: the run's state and components (state.py), what entry points supply
(providers.py), the loop (loop.py), the optimizer seam and LR schedule (optimizer.py),
checkpoints (checkpointing.py), statistics and logging (metrics.py)."""
