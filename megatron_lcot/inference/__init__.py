"""Inference with the training model: checkpoint loading, latent KV cache, halting, sampling."""
