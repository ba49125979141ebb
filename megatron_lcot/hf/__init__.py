"""Hugging Face in and out: the shipped configuration/modeling code, the state-dict adapter,
export (`tools/convert_checkpoint.py to-hf`) and import (`from-hf`)."""
