"""Per-GPU memory of a training configuration: model states, saved activations, transients.

    python -m megatron_lcot.training.memory_estimate --example [--gpus 8]   # examples/pretrain_common.sh
    python -m megatron_lcot.training.memory_estimate --gpus 1 [--vocab-size 32000] <pretrain_lcot.py flags>

Model states follow the ZeRO paper's accounting (Rajbhandari et al. 2020) for the layout the
flags select: megatron-core DDP (bf16 weight 2 + fp32 gradient buffer 4 + fp32 master weight 4
+ Adam moments 8 bytes per parameter, the last 12 sharded by `--use-distributed-optimizer`)
or DeepSpeed ZeRO stage 0-3 (bf16 gradients of 2 bytes unless fp32 accumulation is asked for).

Activations are what autograd keeps for backward, counted tensor by tensor from the layers as
they run (the megatron-core local Llama layer with this repository's core attention): per
layer and query row of a pass, the norm inputs, normalised values and rms, the SwiGLU input
(2f) and its three f-wide intermediates, query, attention output and log-sum-exp, the
projection input; then what the pass's attention call keeps, read from attention.py's
`attention_call` for the device: a causal pass keeps the QKV output and the rotated keys; a
later stepwise pass the keys/values of steps 0..k concatenated (its KV store); the expanded-
head memory-efficient call the expanded keys/values and the mask as a float bias; CPU SDPA the
mask as a float tensor. Per pass, the final norm; once, the logits (and their fp32 copy in the
loss under bf16). `tests/unit/test_memory_model.py` checks these counts against the bytes
saved_tensors_hooks sees on CPU. Halting only removes work, so the stepwise estimate is the
all-live bound. Peak = states + activations of the micro-batches in flight + the largest
transient of backward (the fp32 logits gradient and one layer's gradients of its inputs).
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron_lcot.model.attention import attention_call
from megatron_lcot.model.attention_pass import AttentionPass

FP32 = 4
DEFAULT_VOCAB_SIZE = 32000  # the example's SentencePiece tokenizer (--vocab-size overrides)


@dataclass(frozen=True)
class TrainingShape:
    """Everything memory depends on. Sizes as the flags give them (whole model, before TP)."""

    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    seq_length: int
    micro_batch_size: int
    vocab_size: int
    latent_steps: int = 0
    latent_layout: str = "stepwise"
    halting: str = "none"
    jacobi_iters: int = 3  # the most Jacobi iterations drawn (interleaved layout)
    bf16: bool = False  # bf16 (or fp16) weights and activations
    tensor_parallel: int = 1
    pipeline_parallel: int = 1
    data_parallel: int = 1
    num_microbatches: int = 1  # gradient accumulation steps per optimizer step
    zero_stage: int | None = None  # DeepSpeed ZeRO stage; None = megatron-core DDP
    distributed_optimizer: bool = False
    grad_accum_fp32: bool = False  # DeepSpeed data_types.grad_accum_dtype = fp32
    recompute: str | None = None  # None, 'selective', 'full' (--recompute-granularity)
    attention_backend: str = "auto"
    device: str = "cuda"

    @property
    def kv_channels(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def activation_bytes(self) -> int:
        return 2 if self.bf16 else FP32


def parameter_count(shape: TrainingShape) -> dict:
    """Parameters of one layer, of the embedding + output layer (untied) and of the router."""
    h, d = shape.hidden_size, shape.kv_channels
    qkv = h * d * (shape.num_attention_heads + 2 * shape.num_query_groups)
    layer = qkv + shape.num_attention_heads * d * h + 3 * h * shape.ffn_hidden_size + 2 * h
    router = shape.latent_steps * (h + 1) if shape.halting == "adaptive" else 0  # fp32, one gate per step
    return {
        "layer": layer,
        "layers": shape.num_layers * layer,
        "embedding": 2 * shape.vocab_size * h + h,
        "router": router,
    }


def model_state_bytes(shape: TrainingShape) -> dict:
    """Weights, gradients and optimizer state on the most loaded GPU (the first pipeline stage
    holds its layers and, with PP, the embedding; the last stage the output layer)."""
    counts = parameter_count(shape)
    pp, tp, dp = shape.pipeline_parallel, shape.tensor_parallel, shape.data_parallel
    stage_layers = counts["layer"] * -(-shape.num_layers // pp)
    embedding = counts["embedding"] if pp == 1 else counts["embedding"] // 2
    params = (stage_layers + embedding + counts["router"]) / tp
    weight = shape.activation_bytes
    master = FP32 if shape.bf16 else 0
    if shape.zero_stage is None:  # megatron-core DDP: fp32 gradient buffer (grad_reduce_in_fp32)
        shard = dp if shape.distributed_optimizer else 1
        per = {"weights": weight, "gradients": FP32, "optimizer": (master + 2 * FP32) / shard}
    else:
        grad = FP32 if (shape.grad_accum_fp32 or not shape.bf16) else weight
        stage = shape.zero_stage
        per = {
            "weights": weight / (dp if stage == 3 else 1),
            "gradients": grad / (dp if stage >= 2 else 1),
            "optimizer": (master + 2 * FP32) / (dp if stage >= 1 else 1),
        }
    return {name: params * bytes_per for name, bytes_per in per.items()} | {"parameters": params}


def latent_passes(shape: TrainingShape) -> list:
    """(AttentionPass, query rows per sequence) of every decoder pass of one forward."""
    tokens, steps = shape.seq_length, shape.latent_steps
    if steps == 0:
        return [(AttentionPass("causal"), tokens)]
    if shape.latent_layout == "interleaved":  # warm-up over 1..K slots, J Jacobi passes, the last pass
        slots = list(range(1, steps + 1)) + [steps + 1] * (shape.jacobi_iters + 1)
        return [(AttentionPass("causal"), tokens * n) for n in slots]
    return [(AttentionPass("causal"), tokens)] + [
        (AttentionPass("step_blocks", k + 1), tokens) for k in range(1, steps + 1)
    ]


def layer_activation_bytes(shape: TrainingShape, described: AttentionPass, rows: int) -> float:
    """Bytes one layer keeps for backward in one pass, for one micro-batch on one GPU.

    rows: query rows per sequence; the keys are `described.blocks` blocks of rows (stepwise)."""
    e, tp = shape.activation_bytes, shape.tensor_parallel
    h, f, d = shape.hidden_size, shape.ffn_hidden_size / tp, shape.kv_channels
    heads, groups = shape.num_attention_heads / tp, shape.num_query_groups / tp
    n = rows * shape.micro_batch_size
    rotary = 4 * rows * d * FP32  # cos/sin of queries and keys
    call = attention_call(shape.attention_backend, shape.device, described, _torch_dtype(shape.bf16))
    keys = described.blocks * rows * shape.micro_batch_size  # key rows of the call
    if shape.recompute == "full":  # only the pass input and this step's K/V stay
        return n * h * e + 2 * n * groups * d * e
    # layer input, norms (normalised, output, rms) x 2, projection input, SwiGLU 2f + 3f, query, output, lse
    body = n * (e * (6 * h + 5 * f + 2 * heads * d) + FP32 * (2 + heads)) + rotary
    if shape.recompute == "selective":  # the attention call is rebuilt: q/k/v stay, not its outputs
        return body - n * (e * heads * d + FP32 * heads) + n * e * (heads + 2 * groups) * d
    if described.kind in ("causal", "full") and call != "masked_expanded":
        return body + n * e * (heads + 3 * groups) * d  # QKV output (V's storage), rotated K
    if call in ("causal_blocks", "masked_gqa", "flex"):
        kv = 2 * keys * groups * d * e  # K/V of steps 0..k concatenated
    else:  # expanded-head memory-efficient attention (or the dense reference)
        kv = 2 * keys * heads * d * e
    mask = rows * described.blocks * rows * (FP32 if shape.device != "cuda" else e)
    if call in ("masked_gqa", "masked_expanded"):
        kv += mask * (shape.micro_batch_size if call == "masked_expanded" else 1)
    if call == "dense":  # scores and probabilities [b, np, sq, sk]
        kv += 2 * heads * n * keys / shape.micro_batch_size * e
    return body + kv


def activation_bytes(shape: TrainingShape) -> dict:
    """Saved activations of one micro-batch: the layers of every pass, the final norms, the
    logits, and the micro-batches 1F1B keeps in flight on the first pipeline stage."""
    e, h, b = shape.activation_bytes, shape.hidden_size, shape.micro_batch_size
    stage_layers = -(-shape.num_layers // shape.pipeline_parallel)
    passes = latent_passes(shape)
    layers = sum(stage_layers * layer_activation_bytes(shape, described, rows) for described, rows in passes)
    final_norms = sum(rows * b * (3 * h * e + FP32) for _, rows in passes)
    tokens = shape.seq_length * b
    logits = tokens * shape.vocab_size / shape.tensor_parallel * (e + (FP32 if e != FP32 else 0))
    mixture = (shape.latent_steps + 1) * tokens * h * FP32 if shape.latent_steps else 0
    in_flight = min(shape.pipeline_parallel, shape.num_microbatches)
    return {
        "layers": layers * in_flight,
        "final_norms": final_norms,
        "logits": logits,
        "mixture": mixture,
        "total": layers * in_flight + final_norms + logits + mixture,
    }


def transient_bytes(shape: TrainingShape) -> float:
    """The largest short-lived allocation of backward: the fp32 logits gradient plus the
    gradient of one layer's widest pass (its saved activations again, as input gradients)."""
    tokens = shape.seq_length * shape.micro_batch_size
    widest = max(layer_activation_bytes(shape, described, rows) for described, rows in latent_passes(shape))
    return tokens * shape.vocab_size / shape.tensor_parallel * FP32 + widest


def memory_estimate(shape: TrainingShape) -> dict:
    """Bytes per GPU: model states, activations, transient, and the peak they sum to."""
    states = model_state_bytes(shape)
    activations = activation_bytes(shape)
    transient = transient_bytes(shape)
    peak = states["weights"] + states["gradients"] + states["optimizer"] + activations["total"] + transient
    return {
        "parameters": states["parameters"],
        "weights": states["weights"],
        "gradients": states["gradients"],
        "optimizer": states["optimizer"],
        "activations": activations["total"],
        "activation_parts": activations,
        "transient": transient,
        "peak": peak,
    }


def _torch_dtype(bf16: bool):
    import torch

    return torch.bfloat16 if bf16 else torch.float32
