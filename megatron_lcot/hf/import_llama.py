"""`convert_checkpoint.py from-hf`: start a (latent) checkpoint from a Hugging Face Llama.

    python tools/convert_checkpoint.py from-hf --load HF_DIR --save CKPT_DIR \
        [--latent-steps K --latent-layout stepwise --halting adaptive --halting-threshold 0.05]
    torchrun --nproc-per-node 2 tools/convert_checkpoint.py from-hf --load HF_DIR --save CKPT_DIR \
        --target-tensor-parallel-size 2 [--target-pipeline-parallel-size 1]

Reads `config.json`, the safetensors weights and `tokenizer.json` of a `LlamaForCausalLM` (or of
one of our latent exports), and writes iteration 0 of a training checkpoint (fresh optimizer)
plus the tokenizer under `CKPT_DIR/tokenizer/`, so `pretrain_lcot.py --load CKPT_DIR` continues
with the same model flags (printed as `pretrain_flags`). With a target layout the checkpoint is
written at that tensor/pipeline layout (vocabulary padded for its TP, its flags recorded), through
the same dist_checkpointing load as `convert_checkpoint.py reshard`.

Choices (docs/hf.md):
* the router of adaptive halting starts as in training from scratch (weights 0, every gate at
  `halting_init_continue_prob`): most tokens think at first, the router learns when to stop;
* embedding scale: latent modes multiply token embeddings by sqrt(2.5 h) (PonderLM-2's init has
  embeddings of RMS ~1/sqrt(2.5 h)). A pretrained Llama's layers expect its raw embeddings, so
  the import stores them divided by that scale: step 0 of the imported model is exactly the
  Llama, and no flag has to be remembered when training continues;
* anything the model cannot represent is refused with the field that differs: rope scaling or
  another RoPE base, biases, tied embeddings, another activation or norm epsilon, a head size
  other than hidden/heads, a vocabulary that differs from the tokenizer's.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil

from megatron_lcot.hf.errors import ConversionError
from megatron_lcot.hf.state_dict import ROTARY_BASE, Shapes, hf_to_megatron, unexpected_hf_tensors
from megatron_lcot.model.config import HALTING_RULES, LATENT_LAYOUTS
from megatron_lcot.run_config import field_default

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "LcotForCausalLM")
NORM_EPSILON = 1e-5  # llama_config's RMSNorm epsilon (no flag changes it)
STAGING_DIRNAME = ".one_process"  # inside --save while a TP/PP import is resharded


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--load",
        required=True,
        help="Hugging Face model directory (config.json, safetensors, tokenizer.json)",
    )
    parser.add_argument("--save", required=True, help="new checkpoint directory to write")
    parser.add_argument("--latent-steps", type=int, default=None, help="default: the model's (0 for a Llama)")
    parser.add_argument("--latent-layout", choices=LATENT_LAYOUTS, default=None)
    parser.add_argument("--halting", choices=HALTING_RULES, default=None)
    parser.add_argument("--halting-threshold", type=float, default=None)
    parser.add_argument(
        "--seq-length", type=int, default=None, help="default: min(max_position_embeddings, 2048)"
    )
    parser.add_argument(
        "--target-tensor-parallel-size",
        type=int,
        default=1,
        help="write the checkpoint at this TP (launch TP x PP processes with torchrun)",
    )
    parser.add_argument(
        "--target-pipeline-parallel-size",
        "--target-pipeline-model-parallel-size",
        dest="target_pipeline_model_parallel_size",
        type=int,
        default=1,
        help="write the checkpoint at this PP (launch TP x PP processes with torchrun)",
    )


def read_hf_config(hf_dir: str) -> dict:
    path = os.path.join(hf_dir, "config.json")
    if not os.path.isfile(path):
        raise ConversionError(
            f"--load {hf_dir!r}: no config.json there; pass a Hugging Face model directory."
        )
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def check_supported(config: dict, hf_dir: str) -> None:
    """Refuse what LcotGPTModel cannot represent, naming the config.json field."""
    where = f"--load {hf_dir!r}: config.json"
    architectures = config.get("architectures") or []
    if not any(a in SUPPORTED_ARCHITECTURES for a in architectures):
        raise ConversionError(
            f"{where} has architectures {architectures} (model_type {config.get('model_type')!r}); "
            f"only {' and '.join(SUPPORTED_ARCHITECTURES)} can be imported."
        )
    rope = config.get("rope_parameters") or {}
    theta = rope.get("rope_theta", config.get("rope_theta", ROTARY_BASE))
    rope_type = rope.get("rope_type", "default")
    scaling = config.get("rope_scaling")
    differences = []
    if rope_type != "default" or scaling:
        differences.append(f"rope scaling {scaling or rope} (megatron_lcot uses plain RoPE)")
    if float(theta) != ROTARY_BASE:
        differences.append(f"rope_theta {theta} (megatron_lcot's RoPE base is {ROTARY_BASE:g})")
    for field in ("attention_bias", "mlp_bias"):
        if config.get(field):
            differences.append(f"{field} true (megatron_lcot has no biases)")
    if config.get("tie_word_embeddings", False):
        differences.append(
            "tie_word_embeddings true (megatron_lcot trains untied input and output embeddings)"
        )
    if config.get("hidden_act", "silu") != "silu":
        differences.append(f"hidden_act {config['hidden_act']!r} (megatron_lcot uses SwiGLU with silu)")
    if not math.isclose(config.get("rms_norm_eps", NORM_EPSILON), NORM_EPSILON, rel_tol=1e-9):
        differences.append(
            f"rms_norm_eps {config['rms_norm_eps']} (megatron_lcot's RMSNorm epsilon is {NORM_EPSILON})"
        )
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    if head_dim * config["num_attention_heads"] != config["hidden_size"]:
        differences.append(
            f"head_dim {head_dim} x {config['num_attention_heads']} heads != hidden_size "
            f"{config['hidden_size']}"
        )
    if differences:
        raise ConversionError(
            f"{where} describes a model megatron_lcot cannot represent: {'; '.join(differences)}."
        )


def read_hf_weights(hf_dir: str) -> dict:
    """All tensors of model.safetensors or its shards."""
    from safetensors.torch import load_file

    files = sorted(name for name in os.listdir(hf_dir) if name.endswith(".safetensors"))
    if not files:
        raise ConversionError(
            f"--load {hf_dir!r}: no .safetensors weights there (pytorch_model.bin is not read: "
            "re-save the model with save_pretrained(safe_serialization=True))."
        )
    index = os.path.join(hf_dir, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    weights = {}
    for name in files:
        path = os.path.join(hf_dir, name)
        if not os.path.isfile(path):
            raise ConversionError(
                f"--load {hf_dir!r}: the weight index names {name}, which is missing; "
                "copy the whole model directory."
            )
        weights.update(load_file(path))
    return weights


def check_weight_shapes(weights: dict, config: dict, hf_dir: str) -> None:
    """The tensors must have the shapes config.json promises (a mismatch names the field)."""
    h, vocab, layers = config["hidden_size"], config["vocab_size"], config["num_hidden_layers"]
    heads, groups = (
        config["num_attention_heads"],
        config.get("num_key_value_heads") or config["num_attention_heads"],
    )
    head_dim = h // heads
    expected = {
        "model.embed_tokens.weight": ((vocab, h), "vocab_size/hidden_size"),
        "lm_head.weight": ((vocab, h), "vocab_size/hidden_size"),
    }
    for n in range(layers):
        p = f"model.layers.{n}."
        expected.update(
            {
                p + "self_attn.q_proj.weight": ((heads * head_dim, h), "num_attention_heads/hidden_size"),
                p + "self_attn.k_proj.weight": ((groups * head_dim, h), "num_key_value_heads"),
                p + "mlp.gate_proj.weight": ((config["intermediate_size"], h), "intermediate_size"),
            }
        )
    for name, (shape, fields) in expected.items():
        if name not in weights:
            raise ConversionError(
                f"--load {hf_dir!r}: the weights have no {name} although config.json has "
                f"num_hidden_layers {layers}; the directory is incomplete or not a Llama."
            )
        if tuple(weights[name].shape) != shape:
            raise ConversionError(
                f"--load {hf_dir!r}: {name} has shape {tuple(weights[name].shape)} but config.json "
                f"({fields}) implies {shape}; config.json does not match the weights."
            )
    unexpected = unexpected_hf_tensors(weights, layers)
    if unexpected:
        raise ConversionError(
            f"--load {hf_dir!r}: tensors megatron_lcot has no place for: {unexpected[:5]} "
            "(biases or extra layers?)."
        )


def run_fields(config: dict, options: argparse.Namespace, tokenizer_path: str) -> dict:
    """The RunConfig fields of this model (one default per field: an option the user left unset
    takes config.json's value, else the field's own default)."""

    def chosen(name: str):
        given = getattr(options, name)
        return given if given is not None else config.get(name, field_default(name))

    seq_length = options.seq_length or min(config.get("max_position_embeddings", 2048), 2048)
    latent = ("latent_steps", "latent_layout", "halting", "halting_threshold")
    return {
        "num_layers": config["num_hidden_layers"],
        "hidden_size": config["hidden_size"],
        "ffn_hidden_size": config["intermediate_size"],
        "num_attention_heads": config["num_attention_heads"],
        "num_query_groups": config.get("num_key_value_heads") or config["num_attention_heads"],
        "seq_length": seq_length,
        "max_position_embeddings": config.get("max_position_embeddings", seq_length),
        "tokenizer_type": "HuggingFaceTokenizer",
        "tokenizer_model": tokenizer_path,
        **{name: chosen(name) for name in latent},
    }


def pretrain_flags(fields: dict) -> str:
    """The model flags of pretrain_lcot.py for these fields (what the continuing run passes too)."""
    return " ".join(f"--{name.replace('_', '-')} {value}" for name, value in fields.items())


def _copy_tokenizer(hf_dir: str, save: str) -> None:
    target = os.path.join(save, "tokenizer")
    os.makedirs(target, exist_ok=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if os.path.isfile(os.path.join(hf_dir, name)):
            shutil.copyfile(os.path.join(hf_dir, name), os.path.join(target, name))


def _check_layout(options: argparse.Namespace) -> tuple:
    """The target (TP, PP), checked against the process count before anything is read."""
    tp, pp = options.target_tensor_parallel_size, options.target_pipeline_model_parallel_size
    if tp < 1 or pp < 1:
        raise ConversionError(
            "--target-tensor-parallel-size and --target-pipeline-parallel-size must be >= 1."
        )
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size != tp * pp:
        raise ConversionError(
            f"--target-tensor-parallel-size {tp} x --target-pipeline-parallel-size {pp} needs "
            f"{tp * pp} processes, this run has {world_size}; launch with "
            f"torchrun --nproc-per-node {tp * pp} tools/convert_checkpoint.py from-hf ..."
        )
    return tp, pp


def import_llama(hf_dir: str, save: str, options: argparse.Namespace) -> dict | None:
    """Write iteration 0 of a checkpoint under `save` at the target layout; returns {"save",
    "pretrain_flags", "embedding_scale", "embedding_fold", ...} on global rank 0 (None elsewhere).

    The HF weights fill a one-process model on every rank. At TP = PP = 1 it is saved as is;
    otherwise it is saved to a staging checkpoint inside `save`, which `checkpoint/reshard.py`
    loads into the target layout through dist_checkpointing (the `reshard` path) and writes.
    Collective over the TP x PP processes."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    from megatron_lcot import parallel
    from megatron_lcot.arguments import run_config_from_fields
    from megatron_lcot.checkpoint.checkpointing import latest_iteration, save_weights_only
    from megatron_lcot.checkpoint.reshard import reshard, target_config
    from megatron_lcot.data.tokenizers import build_tokenizer
    from megatron_lcot.model.building import build_model

    tp, pp = _check_layout(options)
    if os.path.isdir(save) and (latest_iteration(save) is not None or os.listdir(save)):
        raise ConversionError(f"--save {save!r} is not empty; pass a new directory.")
    config = read_hf_config(hf_dir)
    check_supported(config, hf_dir)
    weights = read_hf_weights(hf_dir)
    check_weight_shapes(weights, config, hf_dir)
    if not os.path.isfile(os.path.join(hf_dir, "tokenizer.json")):
        raise ConversionError(
            f"--load {hf_dir!r}: no tokenizer.json there; save the tokenizer with the model "
            "(tokenizer.save_pretrained(HF_DIR)) so training reads the same ids."
        )
    parallel.initialize()  # one-process model parallelism (every rank a data-parallel replica)
    dist.barrier()  # every rank has seen `save` empty before rank 0 writes there
    tokenizer_path = os.path.join(os.path.abspath(save), "tokenizer", "tokenizer.json")
    try:
        if dist.get_rank() == 0:
            _copy_tokenizer(hf_dir, save)
        dist.barrier()
        tokenizer = build_tokenizer("HuggingFaceTokenizer", tokenizer_path)
        if tokenizer.vocab_size != config["vocab_size"]:
            raise ConversionError(
                f"--load {hf_dir!r}: tokenizer.json has {tokenizer.vocab_size} ids but config.json "
                f"vocab_size is {config['vocab_size']}; they must agree."
            )
        fields = run_fields(config, options, tokenizer_path)
        if tp * pp > 1:
            fields.update(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
        # the target TP's vocabulary padding
        run_config = run_config_from_fields(
            tokenizer.vocab_size, **fields, mock_data=True, train_iters=1, save=save
        )
        if tp * pp > 1:  # refuses a layout the model cannot take, before any work
            target_config(run_config, tp, pp)
        one_process = run_config.for_one_process()
        model = build_model(one_process.model)
        m = run_config.model
        shapes = Shapes(
            m.num_layers,
            m.num_attention_heads,
            m.num_query_groups,
            m.hidden_size // m.num_attention_heads,
            tokenizer.vocab_size,
            m.padded_vocab_size,
        )
        state = model.state_dict()
        converted = hf_to_megatron(weights, shapes)
        if "halting_router.weight" in converted and "halting_router.weight" not in state:
            del converted["halting_router.weight"], converted["halting_router.bias"]
        fold = config.get("embedding_scale", 1.0) / model.config.embedding_scale
        if fold != 1.0:  # keep the HF model's effective token inputs (see the module docstring)
            converted["embedding.word_embeddings.weight"] *= fold
        state.update(converted)
        model.load_state_dict(state)
        if tp * pp == 1:  # a starting point for pretrain_lcot.py --load
            save_weights_only(save, 0, model, run_config, sharded=True)
        else:
            staging = os.path.join(save, STAGING_DIRNAME)
            save_weights_only(staging, 0, model, one_process, sharded=True)
            parallel_state.destroy_model_parallel()
            reshard(staging, save, tp, pp, sharded=True)
            if dist.get_rank() == 0:
                shutil.rmtree(staging)
            dist.barrier()
    except BaseException:
        if latest_iteration(save) is None and dist.get_rank() == 0:
            shutil.rmtree(save, ignore_errors=True)
        raise
    if dist.get_rank() != 0:
        return None
    return {
        "save": save,
        "tensor_model_parallel_size": tp,
        "pipeline_model_parallel_size": pp,
        "padded_vocab_size": m.padded_vocab_size,
        "embedding_scale": model.config.embedding_scale,
        "embedding_fold": fold,
        "pretrain_flags": pretrain_flags(fields),
    }


def run(args: argparse.Namespace) -> dict:
    return import_llama(args.load, args.save, args)
