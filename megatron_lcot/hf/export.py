"""`convert_checkpoint.py to-hf`: one of our checkpoints as a self-contained Hugging Face directory.

    config.json                 LlamaConfig (vanilla) or LcotLlamaConfig with auto_map (latent)
    model*.safetensors          Llama-named weights, sharded above --max-shard-size
    generation_config.json      eos = the tokenizer's eod
    tokenizer.json, tokenizer_config.json
    configuration_lcot.py, modeling_lcot.py      (latent modes: the remote code)
    README.md                   the model card (model_card.py)

A vanilla model (`--latent-steps 0`) is a plain `LlamaForCausalLM`. The directory is written
under a temporary name beside `--output` and renamed into place at the end, so a failure leaves
nothing half-written.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import tempfile

import torch

from megatron_lcot.hf.errors import ConversionError
from megatron_lcot.hf.model_card import last_validation, model_card, read_eval_result, training_record
from megatron_lcot.hf.state_dict import ROTARY_BASE, Shapes, megatron_to_hf
from megatron_lcot.hf.tokenizer_files import NoHFTokenizer, hf_tokenizer
from megatron_lcot.inference.loading import TrainedModel, load_trained_model

HF_DIR = os.path.dirname(os.path.abspath(__file__))
REMOTE_CODE = ("configuration_lcot.py", "modeling_lcot.py")
MODEL_FILES = ("config.json", "model.safetensors", "model.safetensors.index.json")
SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}  # as transformers


def shard_size(text: str) -> int:
    """--max-shard-size: bytes, or a number with KB/MB/GB/TB (powers of 10, as transformers)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?B?)\s*", text.upper())
    if match is None or float(match.group(1)) <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size; give bytes or e.g. 200MB, 5GB")
    return int(float(match.group(1)) * SIZE_UNITS[match.group(2)])


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--load", required=True, help="checkpoint directory (pretrain_lcot.py --save)")
    parser.add_argument("--output", required=True, help="new Hugging Face directory to write")
    parser.add_argument("--iteration", type=int, default=None, help="default: the latest")
    parser.add_argument(
        "--max-shard-size",
        type=shard_size,
        default="5GB",
        help="largest safetensors file, e.g. 5GB or 200MB: a bigger model is written as shards "
        "model-0000i-of-0000n.safetensors with model.safetensors.index.json",
    )
    parser.add_argument(
        "--tokenizer-model",
        default=None,
        help="the tokenizer file, when the path stored in the checkpoint no longer exists",
    )
    parser.add_argument(
        "--eval-result",
        default=None,
        help="saved output of tools/evaluate.py --input: its perplexity goes in the model card",
    )
    parser.add_argument(
        "--metrics-file",
        default=None,
        help="the run's --metrics-file, for the model card's last validation (default: the "
        "path the checkpoint's run wrote to)",
    )


def shapes_of(trained: TrainedModel) -> Shapes:
    args = trained.config.model
    return Shapes(
        num_layers=args.num_layers,
        num_heads=args.num_attention_heads,
        num_query_groups=args.num_query_groups,
        head_dim=args.hidden_size // args.num_attention_heads,
        vocab_size=trained.vocab_size,
        padded_vocab_size=args.padded_vocab_size,
    )


def hf_config(trained: TrainedModel):
    """The transformers config of the checkpoint's model (LlamaConfig when vanilla)."""
    from transformers import LlamaConfig

    from megatron_lcot.hf.configuration_lcot import LcotLlamaConfig

    args, config = trained.config.model, trained.model.config
    if args.halting_router != "linear":
        raise ConversionError(
            f"the checkpoint's model uses --halting-router {args.halting_router}, which the "
            "Hugging Face model (modeling_lcot.py: the linear router) does not implement; export a "
            "model trained with --halting-router linear, or run this one with tools/generate.py."
        )
    tokenizer = trained.tokenizer
    bos = getattr(tokenizer, "bos", None) if tokenizer is not None else None
    common = dict(
        vocab_size=trained.vocab_size,
        hidden_size=args.hidden_size,
        intermediate_size=config.ffn_hidden_size,
        num_hidden_layers=args.num_layers,
        num_attention_heads=args.num_attention_heads,
        num_key_value_heads=args.num_query_groups,
        head_dim=config.kv_channels,
        max_position_embeddings=args.max_position_embeddings,
        rms_norm_eps=config.layernorm_epsilon,
        rope_parameters={"rope_type": "default", "rope_theta": ROTARY_BASE},
        initializer_range=config.init_method_std,
        tie_word_embeddings=False,
        attention_bias=False,
        mlp_bias=False,
        bos_token_id=bos if bos is not None and bos >= 0 else None,
        eos_token_id=tokenizer.eod if tokenizer is not None else None,
        pad_token_id=None,
        dtype=str(config.params_dtype).removeprefix("torch."),
    )
    if args.latent_steps == 0:
        return LlamaConfig(architectures=["LlamaForCausalLM"], **common)
    hf = LcotLlamaConfig(
        latent_steps=args.latent_steps,
        latent_layout=args.latent_layout,
        halting=args.halting,
        halting_threshold=args.halting_threshold,
        embedding_scale=config.embedding_scale,
        jacobi_eval_iters=args.jacobi_eval_iters,
        architectures=["LcotForCausalLM"],
        **common,
    )
    hf.auto_map = {
        "AutoConfig": "configuration_lcot.LcotLlamaConfig",
        "AutoModelForCausalLM": "modeling_lcot.LcotForCausalLM",
    }
    return hf


def hf_model(trained: TrainedModel):
    """The transformers model (LlamaForCausalLM or LcotForCausalLM) holding the checkpoint's weights."""
    from transformers import LlamaForCausalLM

    from megatron_lcot.hf.modeling_lcot import LcotForCausalLM

    config = hf_config(trained)
    model_class = LlamaForCausalLM if trained.config.model.latent_steps == 0 else LcotForCausalLM
    with torch.device("meta"):
        model = model_class(config)
    state = megatron_to_hf(trained.model.state_dict(), shapes_of(trained))
    model.load_state_dict(state, strict=True, assign=True)
    if trained.config.model.latent_steps == 0:
        model.model.rotary_emb = type(model.model.rotary_emb)(config=config)  # rebuilt off the meta device
    return model.eval()


def check_output_dir(path: str) -> None:
    """Refuse an --output that already holds a model (nothing is overwritten)."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise ConversionError(f"--output {path!r} is a file; pass a new directory.")
    held = [name for name in MODEL_FILES if os.path.exists(os.path.join(path, name))]
    if held:
        raise ConversionError(
            f"--output {path!r} already holds a model ({', '.join(held)}); pass a new directory or "
            "remove it first."
        )


def export(
    load: str,
    output: str,
    iteration: int | None = None,
    max_shard_size: int | str = "5GB",
    tokenizer_model: str | None = None,
    eval_result: str | None = None,
    metrics_file: str | None = None,
) -> dict:
    """Write the Hugging Face directory; returns {"output", "iteration", "architecture", "tokenizer",
    "shards"}."""
    from transformers import GenerationConfig

    check_output_dir(output)
    evaluation = read_eval_result(eval_result) if eval_result else None
    trained = load_trained_model(load, iteration, tokenizer_model)
    model = hf_model(trained)
    validation = last_validation(metrics_file or trained.config.logging.metrics_file, trained.iteration)
    card = model_card(
        trained,
        os.path.basename(os.path.abspath(output)),
        model.num_parameters(),
        training_record(load, trained.iteration),
        validation,
        evaluation,
    )
    parent = os.path.dirname(os.path.abspath(output))
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(os.path.abspath(output))}.tmp-", dir=parent)
    try:
        model.generation_config = GenerationConfig(
            eos_token_id=model.config.eos_token_id, bos_token_id=model.config.bos_token_id
        )
        model.save_pretrained(staging, max_shard_size=max_shard_size)
        with open(os.path.join(staging, "README.md"), "w", encoding="utf-8") as f:
            f.write(card)
        shards = sum(name.endswith(".safetensors") for name in os.listdir(staging))
        tokenizer_note = "tokenizer.json"
        try:
            hf_tokenizer(trained.tokenizer).save_pretrained(staging)
        except NoHFTokenizer as error:
            tokenizer_note = str(error)
        if trained.config.model.latent_steps > 0:
            for name in REMOTE_CODE:
                shutil.copyfile(os.path.join(HF_DIR, name), os.path.join(staging, name))
        if os.path.isdir(output):  # an empty or model-free directory (checked above)
            for name in os.listdir(staging):
                os.replace(os.path.join(staging, name), os.path.join(output, name))
            os.rmdir(staging)
        else:
            os.rename(staging, output)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return {
        "output": output,
        "iteration": trained.iteration,
        "architecture": model.config.architectures[0],
        "tokenizer": tokenizer_note,
        "shards": shards,
    }


def run(args: argparse.Namespace) -> dict:
    return export(
        args.load,
        args.output,
        args.iteration,
        args.max_shard_size,
        args.tokenizer_model,
        args.eval_result,
        args.metrics_file,
    )
