"""Command-line flags (Megatron-LM names plus ours) and their validation.

`parse_args(argv)` returns an `argparse.Namespace` whose fields are the flags with `_`
(`--latent-steps` -> `args.latent_steps`) plus a few derived values (`world_size`,
`data_parallel_size`, `num_microbatches`, `data_blend`, `jacobi_iters` as a tuple).

Every invalid configuration is refused here, before any process group, model or dataset is
built, with an `ArgumentError` whose message names the flag and the fix. Entry points print
that message and exit with status 2 (argparse's convention) instead of a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import os

from megatron_lcot.data.tokenizers import TOKENIZER_TYPES
from megatron_lcot.model.attention import ATTENTION_BACKENDS
from megatron_lcot.model.config import HALTING_ROUTERS, HALTING_RULES, LATENT_LAYOUTS, RECOMPUTE_GRANULARITIES
from megatron_lcot.run_config import (
    LR_DECAY_STYLES,
    SECTIONS,
    TRANSFORMER_IMPLS,
    WANDB_MODES,
    ZERO_STAGES,
    RunConfig,
    field_default,
)

USAGE_ERROR_EXIT_CODE = 2


class ArgumentError(ValueError):
    """A user mistake in the flags; the message names the flag and how to fix it."""


def _add(group, flag: str, *aliases: str, dest: str | None = None, **options) -> None:
    """`group.add_argument` for a flag that fills the RunConfig field `dest` (default: the flag's
    name with `_`), with that field's default: one default per field, written in run_config.py."""
    dest = dest or flag.lstrip("-").replace("-", "_")
    group.add_argument(flag, *aliases, dest=dest, default=field_default(dest), **options)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pretrain_lcot.py",
        description="Pretrain a GPT with latent thoughts before each token (megatron-core).",
        allow_abbrev=False,
    )
    model = parser.add_argument_group("model")
    model.add_argument("--num-layers", type=int, required=True)
    model.add_argument("--hidden-size", type=int, required=True)
    _add(model, "--ffn-hidden-size", type=int, help="default: 4 x hidden size")
    model.add_argument("--num-attention-heads", type=int, required=True)
    _add(model, "--num-query-groups", type=int, help="GQA groups; default: one per head")
    model.add_argument("--seq-length", type=int, required=True)
    _add(model, "--max-position-embeddings", type=int, help="default: --seq-length")
    _add(model, "--init-method-std", type=float, help="default: PonderLM-2's sqrt(2/(5h))")
    _add(model, "--make-vocab-size-divisible-by", type=int)
    _add(
        model,
        "--use-cpu-initialization",
        action="store_true",
        help="initialise each full weight, then shard it: tensor-parallel runs start from "
        "the weights of the one-process run",
    )
    _add(model, "--transformer-impl", choices=TRANSFORMER_IMPLS)
    _add(
        model,
        "--bf16",
        action="store_true",
        help="bf16 weights and activations; fp32 main weights in the optimizer",
    )
    _add(
        model,
        "--fp16",
        action="store_true",
        help="fp16 weights and activations with dynamic loss scaling; fp32 main weights",
    )
    _add(
        model,
        "--attention-backend",
        dest="core_attention_backend",
        choices=ATTENTION_BACKENDS,
        help="core attention kernel (auto = sdpa: per pass and device a fused call, on CUDA "
        "flash / LSE-merged causal blocks / memory-efficient, never the math kernel; flex: "
        "compiled FlexAttention block masks, CUDA for training; dense: the materialised-mask "
        "reference)",
    )
    _add(
        model,
        "--recompute-granularity",
        dest="latent_recompute",
        choices=RECOMPUTE_GRANULARITIES[1:],
        help="activation recompute: selective = each core attention (the per-pass KV concatenation is "
        "rebuilt in backward); full = each latent pass (every layer in vanilla mode)",
    )

    latent = parser.add_argument_group("latent thoughts")
    _add(latent, "--latent-steps", type=int, help="K latent thoughts per token (0 = vanilla GPT)")
    _add(latent, "--latent-layout", choices=LATENT_LAYOUTS)
    _add(latent, "--halting", choices=HALTING_RULES)
    _add(
        latent,
        "--halting-router",
        choices=HALTING_ROUTERS,
        help="adaptive halting's router: linear (reads the step's state) or entropy (also the entropy "
        "of the step's own prediction, at one forward-only LM head per gated token)",
    )
    _add(latent, "--halting-threshold", type=float)
    _add(latent, "--halting-loss-weight", type=float)
    _add(latent, "--halting-correctness-exponent", type=float)
    _add(
        latent,
        "--halting-warmup-iters",
        type=int,
        help="halting warm-up W: the halting loss weight ramps from 0 to lambda over W iterations, "
        "without pruning (or see --halting-warmup-ramp-threshold)",
    )
    _add(
        latent,
        "--halting-warmup-ramp-threshold",
        action="store_true",
        help="during the warm-up, prune at tau x i / W instead of not pruning (cheaper warm-up)",
    )
    _add(
        latent,
        "--halting-penalty-fraction",
        type=float,
        help="share of executed tokens whose correctness penalty is computed per gated step in "
        "training (seeded sample, reweighted: same expectation, that share of the penalty's LM head)",
    )
    _add(
        latent,
        "--halting-router-lr-mult",
        type=float,
        help="router learning rate = --lr x this (its own param group, no weight decay)",
    )
    latent.add_argument(
        "--jacobi-iters",
        default=",".join(map(str, field_default("jacobi_iters"))),
        help="Jacobi iterations drawn per training step, e.g. 2,3",
    )
    _add(latent, "--jacobi-eval-iters", type=int)

    parallel = parser.add_argument_group("parallelism")
    _add(parallel, "--tensor-model-parallel-size", type=int)
    _add(parallel, "--pipeline-model-parallel-size", type=int)
    parallel.add_argument(
        "--local_rank",
        "--local-rank",
        dest="local_rank",
        type=int,
        default=None,
        help="set by the deepspeed launcher; the rank is read from the environment",
    )
    _add(
        parallel,
        "--use-distributed-optimizer",
        action="store_true",
        help="shard the optimizer state over data-parallel ranks (megatron-core, as ZeRO-1)",
    )
    _add(
        parallel,
        "--no-overlap-grad-reduce",
        dest="overlap_grad_reduce",
        action="store_false",
        help="megatron-core DDP: reduce gradients after backward instead of bucket by bucket "
        "during it (overlapped by default)",
    )
    _add(
        parallel,
        "--no-overlap-param-gather",
        dest="overlap_param_gather",
        action="store_false",
        help="--use-distributed-optimizer: all-gather the updated weights right after the step "
        "instead of bucket by bucket in the next forward (overlapped by default)",
    )
    _add(parallel, "--deepspeed", action="store_true", help="train with a DeepSpeed ZeRO engine")
    _add(
        parallel,
        "--deepspeed_config",
        "--deepspeed-config",
        help="DeepSpeed JSON config (e.g. examples/ds_configs/zero2.json); batch sizes, "
        "clipping and precision come from our flags",
    )
    _add(
        parallel,
        "--zero-stage",
        type=int,
        choices=ZERO_STAGES,
        help="override zero_optimization.stage of --deepspeed_config",
    )

    training = parser.add_argument_group("training")
    _add(training, "--micro-batch-size", type=int)
    _add(
        training,
        "--global-batch-size",
        type=int,
        help="default: micro batch x data-parallel size (no accumulation)",
    )
    training.add_argument("--train-iters", type=int, required=True)
    _add(training, "--lr", type=float)
    _add(training, "--min-lr", type=float)
    _add(training, "--lr-decay-style", choices=LR_DECAY_STYLES)
    _add(training, "--lr-warmup-iters", type=int)
    _add(training, "--weight-decay", type=float)
    _add(training, "--clip-grad", type=float, help="0 disables clipping")
    _add(training, "--adam-beta1", type=float)
    _add(training, "--adam-beta2", type=float)
    _add(training, "--adam-eps", type=float)
    _add(training, "--seed", type=int)
    _add(
        training,
        "--torch-compile",
        action="store_true",
        help="compile each decoder layer with torch.compile (dynamic shapes: one graph serves every "
        "packed width of the latent passes); single stage, megatron DDP, --attention-backend sdpa|dense",
    )
    _add(training, "--loss-scale", type=float, help="static fp16 loss scale; default: dynamic")
    _add(training, "--initial-loss-scale", type=float, help="first dynamic fp16 loss scale")

    checkpoint = parser.add_argument_group("checkpointing")
    _add(checkpoint, "--save", help="checkpoint directory to write")
    _add(checkpoint, "--load", help="checkpoint directory to resume from")
    _add(checkpoint, "--save-interval", type=int)
    _add(
        checkpoint,
        "--keep-last",
        type=int,
        help="keep only the N newest iterations in --save (never the one the marker names)",
    )
    _add(
        checkpoint,
        "--skip-train",
        action="store_true",
        help="load the weights of --load (any parallel layout), evaluate, print the validation line, exit",
    )

    faults = parser.add_argument_group("exits and faults")
    _add(
        faults,
        "--exit-signal-handler",
        action="store_true",
        help="on SIGTERM or SIGUSR1 every rank finishes the step, saves and exits 0",
    )
    _add(
        faults,
        "--exit-duration-in-mins",
        type=float,
        help="finish the step, save and exit 0 after training this many minutes",
    )
    _add(
        faults,
        "--exit-interval",
        type=int,
        help="finish the step, save and exit 0 at the first iteration divisible by N",
    )
    _add(
        faults,
        "--max-skipped-steps-in-a-row",
        type=int,
        help="steps with a NaN/inf loss or grad norm apply no update; after N in a row "
        "the run saves and stops with an error (0: never stop)",
    )
    _add(
        faults,
        "--distributed-timeout-minutes",
        type=float,
        help="a collective waiting this long for a dead or frozen rank fails the run",
    )

    data = parser.add_argument_group("data")
    _add(
        data,
        "--data-path",
        nargs="+",
        help="indexed dataset prefixes, optionally weighted: '0.3 a 0.7 b' or 'a b'",
    )
    _add(data, "--split", help="train,valid,test proportions of --data-path")
    _add(data, "--data-cache-path", help="where GPTDataset caches its indices")
    _add(data, "--mock-data", action="store_true", help="synthetic token data for smoke runs")
    _add(
        data,
        "--num-workers",
        type=int,
        help="data loader worker processes (0: load in the training process); batches are "
        "pinned in host memory when training on CUDA",
    )
    _add(data, "--tokenizer-type", choices=TOKENIZER_TYPES)
    _add(data, "--tokenizer-model")
    _add(data, "--vocab-file")
    _add(data, "--merge-file")
    _add(data, "--vocab-size", type=int, help="NullTokenizer vocabulary size")

    logging = parser.add_argument_group("evaluation and logging")
    _add(logging, "--eval-interval", type=int)
    _add(logging, "--eval-iters", type=int)
    _add(logging, "--log-interval", type=int)
    _add(logging, "--metrics-file", help="append one JSON object per log line here")
    _add(logging, "--tensorboard-dir")
    _add(logging, "--wandb-project")
    _add(logging, "--wandb-exp-name")
    _add(logging, "--wandb-mode", choices=WANDB_MODES)
    return parser


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ArgumentError(message)


def _parse_jacobi_iters(text: str) -> tuple:
    try:
        iters = tuple(int(item) for item in text.split(","))
    except ValueError:
        iters = ()
    _require(
        len(iters) > 0 and all(i >= 1 for i in iters),
        f"--jacobi-iters {text!r}: give positive integers separated by commas, e.g. --jacobi-iters 2,3.",
    )
    return iters


def _parse_blend(items: list) -> tuple:
    """'a b' -> ([a, b], None); '0.3 a 0.7 b' -> ([a, b], [0.3, 0.7])."""

    def is_number(text: str) -> bool:
        try:
            float(text)
            return True
        except ValueError:
            return False

    if len(items) % 2 == 0 and all(is_number(w) for w in items[0::2]):
        prefixes, weights = list(items[1::2]), [float(w) for w in items[0::2]]
        _require(
            all(w >= 0 for w in weights) and sum(weights) > 0,
            f"--data-path: blend weights {weights} must be non-negative with a positive sum.",
        )
    else:
        prefixes, weights = list(items), None
    for prefix in prefixes:
        _require(
            not is_number(prefix),
            f"--data-path: {prefix!r} looks like a weight without a dataset; "
            "write weights and prefixes in pairs, e.g. --data-path 0.3 a 0.7 b.",
        )
        missing = [ext for ext in (".bin", ".idx") if not os.path.isfile(prefix + ext)]
        if missing:
            stem, ext = os.path.splitext(prefix)
            hint = (
                f"drop the extension (--data-path {stem})"
                if ext in (".bin", ".idx")
                else "pass the output prefix of tools/preprocess_data.py (the path without .bin/.idx)"
            )
            raise ArgumentError(
                f"--data-path {prefix!r}: {' and '.join(prefix + e for e in missing)} not found; {hint}."
            )
    return prefixes, weights


def _parse_split(text: str) -> str:
    parts = text.replace("/", ",").split(",")
    try:
        values = [float(p) for p in parts]
    except ValueError:
        values = []
    _require(
        0 < len(values) <= 3
        and all(v >= 0 for v in values)
        and sum(values) > 0
        and (len(values) < 2 or values[1] > 0),
        f"--split {text!r}: give train,valid,test proportions with a non-zero validation share, "
        "e.g. --split 969,30,1.",
    )
    return text


def _validate_model(args) -> None:
    for flag in ("num_layers", "hidden_size", "num_attention_heads", "seq_length"):
        _require(getattr(args, flag) > 0, f"--{flag.replace('_', '-')} must be positive.")
    if args.num_query_groups is None:
        args.num_query_groups = args.num_attention_heads
    _require(
        args.num_query_groups > 0 and args.num_attention_heads % args.num_query_groups == 0,
        f"--num-attention-heads {args.num_attention_heads} is not divisible by --num-query-groups "
        f"{args.num_query_groups}; choose a --num-query-groups that divides the number of heads.",
    )
    _require(
        args.hidden_size % args.num_attention_heads == 0,
        f"--hidden-size {args.hidden_size} is not divisible by --num-attention-heads "
        f"{args.num_attention_heads}; choose sizes so that each head has hidden/heads channels.",
    )
    if args.max_position_embeddings is None:
        args.max_position_embeddings = args.seq_length
    _require(
        args.seq_length <= args.max_position_embeddings,
        f"--seq-length {args.seq_length} is above --max-position-embeddings "
        f"{args.max_position_embeddings}; lower --seq-length or raise --max-position-embeddings.",
    )
    _require(args.make_vocab_size_divisible_by > 0, "--make-vocab-size-divisible-by must be positive.")
    if args.transformer_impl == "transformer_engine":
        _require(
            importlib.util.find_spec("transformer_engine") is not None,
            "--transformer-impl transformer_engine: Transformer Engine is not installed; "
            "install it (GPU machines) or use --transformer-impl local.",
        )


def _validate_latent(args) -> None:
    _require(
        args.latent_steps >= 0,
        f"--latent-steps {args.latent_steps} is negative; use 0 (vanilla GPT) or a positive "
        "number of latent thoughts per token.",
    )
    if args.halting == "adaptive":
        _require(
            args.latent_steps > 0,
            "--halting adaptive needs latent steps to halt: set --latent-steps K with K >= 1 "
            "(or use --halting none).",
        )
        _require(
            args.latent_layout == "stepwise",
            "--halting adaptive requires --latent-layout stepwise (the interleaved layout has "
            "no per-step exit); use --latent-layout stepwise or --halting none.",
        )
    _require(
        args.halting_router == "linear" or args.halting == "adaptive",
        f"--halting-router {args.halting_router} needs --halting adaptive (without it no router runs).",
    )
    _require(
        0.0 <= args.halting_threshold < 1.0,
        f"--halting-threshold {args.halting_threshold} must be in [0, 1), e.g. 0.05.",
    )
    _require(args.halting_loss_weight >= 0, "--halting-loss-weight must be >= 0.")
    _require(args.halting_correctness_exponent > 0, "--halting-correctness-exponent must be > 0.")
    _require(
        args.halting_warmup_iters >= 0,
        f"--halting-warmup-iters {args.halting_warmup_iters} is negative; use 0 (no warm-up) or more.",
    )
    _require(
        0.0 < args.halting_penalty_fraction <= 1.0,
        f"--halting-penalty-fraction {args.halting_penalty_fraction} must be in (0, 1], e.g. 0.25 "
        "(1 = the penalty on every executed token).",
    )
    _require(
        args.halting_router_lr_mult > 0,
        f"--halting-router-lr-mult {args.halting_router_lr_mult} must be > 0, e.g. 0.1.",
    )
    args.jacobi_iters = _parse_jacobi_iters(args.jacobi_iters)
    _require(args.jacobi_eval_iters >= 1, "--jacobi-eval-iters must be >= 1.")


def _validate_parallel(args) -> None:
    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    _require(tp >= 1, "--tensor-model-parallel-size must be >= 1.")
    _require(pp >= 1, "--pipeline-model-parallel-size must be >= 1.")
    args.world_size = int(os.environ.get("WORLD_SIZE", "1"))
    _require(
        args.world_size % (tp * pp) == 0,
        f"the world size {args.world_size} is not divisible by --tensor-model-parallel-size {tp} x "
        f"--pipeline-model-parallel-size {pp}; launch a multiple of {tp * pp} processes.",
    )
    args.data_parallel_size = args.world_size // (tp * pp)
    _require(
        args.num_attention_heads % tp == 0 and args.num_query_groups % tp == 0,
        f"--tensor-model-parallel-size {tp} must divide --num-attention-heads "
        f"{args.num_attention_heads} and --num-query-groups {args.num_query_groups}.",
    )
    _require(
        args.num_layers % pp == 0,
        f"--num-layers {args.num_layers} is not divisible by --pipeline-model-parallel-size {pp}.",
    )
    _require(
        not (pp > 1 and args.latent_steps > 0 and args.latent_recompute is not None),
        f"--recompute-granularity {args.latent_recompute} is not supported yet with latent thoughts across "
        "pipeline stages (--pipeline-model-parallel-size > 1: untested with the stage hand-over of the "
        "KV store); drop --recompute-granularity or use --pipeline-model-parallel-size 1.",
    )


def _validate_precision_and_optimizer(args) -> None:
    _require(not (args.bf16 and args.fp16), "--bf16 and --fp16 are exclusive; pick one.")
    if not args.deepspeed:
        _require(
            args.deepspeed_config is None and args.zero_stage is None,
            "--deepspeed_config and --zero-stage need --deepspeed; add --deepspeed or drop them.",
        )
        return
    _require(
        not args.use_distributed_optimizer,
        "--use-distributed-optimizer is megatron-core's sharded optimizer; with --deepspeed use "
        "--zero-stage 1 (or zero_optimization.stage in --deepspeed_config) instead.",
    )
    _require(
        args.deepspeed_config is not None,
        "--deepspeed needs --deepspeed_config FILE, e.g. --deepspeed_config examples/ds_configs/zero2.json.",
    )
    _require(
        os.path.isfile(args.deepspeed_config),
        f"--deepspeed_config {args.deepspeed_config!r}: no such file; pass a DeepSpeed JSON config "
        "such as examples/ds_configs/zero2.json.",
    )
    from megatron_lcot.parallel.deepspeed_config import DeepSpeedConfigError, effective_config

    try:
        stage = effective_config(RunConfig.from_values(args))["zero_optimization"]["stage"]
    except DeepSpeedConfigError as error:
        raise ArgumentError(str(error)) from error
    _require(
        stage >= 1,
        "ZeRO stage 0 (--zero-stage / --deepspeed_config) cannot run under megatron-core's schedule "
        "(DeepSpeed 0.19.8 refuses tensor.backward() at stage 0); for unsharded data parallelism drop "
        "--deepspeed (megatron-core DDP), or use --zero-stage 1.",
    )
    _require(
        args.pipeline_model_parallel_size == 1 or args.latent_steps == 0,
        "--deepspeed with --pipeline-model-parallel-size > 1 runs vanilla models only (--latent-steps 0): "
        "latent passes cross the stages as virtual chunks that bypass the engine; use megatron-core's "
        "--use-distributed-optimizer without --deepspeed, or --pipeline-model-parallel-size 1.",
    )
    _require(
        stage < 2 or args.pipeline_model_parallel_size == 1,
        f"ZeRO stage {stage} (--zero-stage / --deepspeed_config) shards gradients, which pipeline "
        f"parallelism (--pipeline-model-parallel-size {args.pipeline_model_parallel_size}) accumulates "
        "across micro-batches; use --zero-stage 1 (or megatron-core's --use-distributed-optimizer "
        "without --deepspeed), or --pipeline-model-parallel-size 1.",
    )


def _validate_batch(args) -> None:
    _require(args.micro_batch_size > 0, "--micro-batch-size must be positive.")
    per_step = args.micro_batch_size * args.data_parallel_size
    if args.global_batch_size is None:
        args.global_batch_size = per_step
    _require(
        args.global_batch_size > 0 and args.global_batch_size % per_step == 0,
        f"--global-batch-size {args.global_batch_size} is not a multiple of --micro-batch-size "
        f"{args.micro_batch_size} x data-parallel size {args.data_parallel_size} = {per_step}; "
        f"use a multiple of {per_step}, e.g. --global-batch-size {per_step * max(1, args.global_batch_size // per_step)}.",
    )
    args.num_microbatches = args.global_batch_size // per_step
    pp = args.pipeline_model_parallel_size
    if pp > 1 and args.latent_steps > 0:  # latent passes run as virtual pipeline chunks
        _require(
            args.num_microbatches % pp == 0,
            f"--pipeline-model-parallel-size {pp} with latent thoughts runs each latent pass as a "
            f"virtual pipeline chunk, which needs a multiple of {pp} micro-batches per step; got "
            f"{args.num_microbatches} (--global-batch-size {args.global_batch_size} / (--micro-batch-size {args.micro_batch_size} x data-parallel size "
            f"{args.data_parallel_size})); use --global-batch-size "
            f"{per_step * pp * max(1, args.num_microbatches // pp)}.",
        )


def _validate_schedule(args) -> None:
    _require(args.train_iters > 0, "--train-iters must be positive.")
    _require(args.lr > 0, "--lr must be positive.")
    _require(0 <= args.min_lr <= args.lr, f"--min-lr {args.min_lr} must be between 0 and --lr {args.lr}.")
    _require(
        0 <= args.lr_warmup_iters < args.train_iters,
        f"--lr-warmup-iters {args.lr_warmup_iters} must be below --train-iters {args.train_iters}.",
    )
    _require(args.weight_decay >= 0, "--weight-decay must be >= 0.")
    _require(args.clip_grad >= 0, "--clip-grad must be >= 0 (0 disables clipping).")
    for flag in ("adam_beta1", "adam_beta2"):
        _require(0 <= getattr(args, flag) < 1, f"--{flag.replace('_', '-')} must be in [0, 1).")
    for flag in ("log_interval", "eval_interval", "eval_iters"):
        _require(getattr(args, flag) > 0, f"--{flag.replace('_', '-')} must be positive.")
    _validate_exits(args)
    if args.save_interval is not None:
        _require(args.save_interval > 0, "--save-interval must be positive.")
        _require(args.save is not None, "--save-interval needs a directory to write to: add --save DIR.")


def _validate_exits(args) -> None:
    for flag in ("keep_last", "exit_interval"):
        value = getattr(args, flag)
        _require(value is None or value > 0, f"--{flag.replace('_', '-')} must be positive.")
    _require(
        args.exit_duration_in_mins is None or args.exit_duration_in_mins > 0,
        "--exit-duration-in-mins must be positive.",
    )
    _require(
        args.max_skipped_steps_in_a_row >= 0,
        "--max-skipped-steps-in-a-row must be >= 0 (0: never stop for skipped steps).",
    )
    _require(args.distributed_timeout_minutes > 0, "--distributed-timeout-minutes must be positive.")
    _require(args.keep_last is None or args.save is not None, "--keep-last prunes --save: add --save DIR.")
    _require(
        not args.skip_train or args.load is not None, "--skip-train evaluates a checkpoint: add --load DIR."
    )


def _validate_data(args) -> None:
    _require(
        args.mock_data or args.data_path,
        "no training data: pass --data-path PREFIX (from tools/preprocess_data.py) or --mock-data.",
    )
    _require(
        not (args.mock_data and args.data_path),
        "--mock-data and --data-path are exclusive; drop one of them.",
    )
    args.data_blend = _parse_blend(args.data_path) if args.data_path else None
    _parse_split(args.split)
    if args.tokenizer_type is None:
        _require(
            args.mock_data,
            "--tokenizer-type is required with --data-path: use the tokenizer the data was "
            f"preprocessed with ({', '.join(TOKENIZER_TYPES)}).",
        )
        args.tokenizer_type = "NullTokenizer"
    if args.tokenizer_type == "NullTokenizer":
        _require(
            args.vocab_size is not None and args.vocab_size > 0,
            "--vocab-size is required with --tokenizer-type NullTokenizer (and with --mock-data "
            "without a --tokenizer-type), e.g. --vocab-size 1024.",
        )
    _require(args.num_workers >= 0, "--num-workers must be >= 0.")


def _validate_torch_compile(args) -> None:
    """--torch-compile is tested on one stage with megatron DDP and the sdpa/dense attention."""
    if not args.torch_compile:
        return
    unsupported = [
        (args.deepspeed, "--deepspeed", "use megatron-core DDP (drop --deepspeed)"),
        (
            args.latent_recompute is not None,
            f"--recompute-granularity {args.latent_recompute}",
            "drop --recompute-granularity",
        ),
        (
            args.pipeline_model_parallel_size > 1,
            f"--pipeline-model-parallel-size {args.pipeline_model_parallel_size}",
            "use --pipeline-model-parallel-size 1",
        ),
        (
            args.core_attention_backend == "flex",
            "--attention-backend flex",
            "use --attention-backend sdpa (flex attention is compiled on its own)",
        ),
    ]
    for combined, flag, fix in unsupported:
        _require(
            not combined, f"--torch-compile is not supported with {flag}; {fix}, or drop --torch-compile."
        )


def validate_args(args: argparse.Namespace) -> argparse.Namespace:
    """Check every flag and fill the derived fields; raises `ArgumentError` naming the flag."""
    _validate_model(args)
    _validate_latent(args)
    _validate_parallel(args)
    _validate_torch_compile(args)
    _validate_batch(args)
    _validate_schedule(args)
    _validate_precision_and_optimizer(args)
    _validate_data(args)
    return args


def parse_args(argv: list | None = None) -> argparse.Namespace:
    """Parse and validate; argparse itself exits with status 2 on unknown or malformed flags."""
    return validate_args(build_parser().parse_args(argv))


def run_config_from_fields(tokenizer_vocab_size: int, **fields) -> RunConfig:
    """The RunConfig of a run given as field values instead of a command line (a tool that writes
    a checkpoint for `pretrain_lcot.py --load`, as the Hugging Face import): every other field
    at its flag's default, all checked as the flags are (ArgumentError naming the flag)."""
    parser = build_parser()
    names = [f.name for section in SECTIONS.values() for f in dataclasses.fields(section)]
    args = argparse.Namespace(**{name: parser.get_default(name) for name in names}, local_rank=None)
    for name, value in fields.items():
        if not hasattr(args, name):
            raise KeyError(f"no RunConfig field named {name!r}")
        setattr(args, name, value)
    validate_args(args)
    set_padded_vocab_size(args, tokenizer_vocab_size)
    return RunConfig.from_values(args)


def set_padded_vocab_size(args: argparse.Namespace, tokenizer_vocab_size: int) -> None:
    """`args.padded_vocab_size`: the tokenizer's id space rounded up to a multiple of
    --make-vocab-size-divisible-by x tensor-parallel size (Megatron-LM's padding), so the
    embedding splits evenly over tensor-parallel ranks."""
    multiple = args.make_vocab_size_divisible_by * args.tensor_model_parallel_size
    args.padded_vocab_size = -(-tokenizer_vocab_size // multiple) * multiple
