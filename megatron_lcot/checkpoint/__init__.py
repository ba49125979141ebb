"""Checkpoints, readable by training, inference and Hugging Face conversion alike: the
directory format with layout-free weights and per-rank training state (checkpointing.py), and
rewriting a checkpoint's weights at another tensor/pipeline layout (reshard.py)."""
