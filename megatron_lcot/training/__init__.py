"""Training: the run's state and components (state.py), what entry points supply
(providers.py), the loop (loop.py), skipped steps and exits (faults.py), statistics and
logging (metrics.py), FLOPs accounting (flops_meter.py). The optimizer seams live in
`megatron_lcot.parallel`, checkpoints in `megatron_lcot.checkpoint`."""
