"""Pretrain a latent-thought GPT (megatron-core), shaped as Megatron-LM's pretrain_gpt.py.

    python pretrain_lcot.py --num-layers 2 --hidden-size 64 --num-attention-heads 4 \
        --seq-length 64 --micro-batch-size 4 --train-iters 50 --mock-data --vocab-size 1024 \
        --latent-steps 2 --halting adaptive --log-interval 10 --metrics-file metrics.jsonl

Also runs under `torchrun --nproc-per-node N` and the `deepspeed` launcher. See
docs/training.md for every flag.
"""

from __future__ import annotations

import sys
import warnings
from functools import partial

# megatron-core warns that the optional Apex / Transformer Engine kernels are absent (the local
# implementations are what we use on purpose) and that its own default CUDA-graph scope is
# deprecated (we use no CUDA graphs).
warnings.filterwarnings("ignore", message=r".*(Apex|Transformer Engine).* not installed")
warnings.filterwarnings("ignore", message="full scope is deprecated")

import torch  # noqa: E402

from megatron_lcot import parallel  # noqa: E402
from megatron_lcot.arguments import USAGE_ERROR_EXIT_CODE, ArgumentError, parse_args, set_padded_vocab_size  # noqa: E402
from megatron_lcot.data.datasets import build_gpt_datasets  # noqa: E402
from megatron_lcot.data.tokenizers import TokenizerError, build_tokenizer  # noqa: E402
from megatron_lcot.model import build_lcot_model, llama_config  # noqa: E402
from megatron_lcot.training.checkpointing import CheckpointError  # noqa: E402
from megatron_lcot.training.loop import pretrain  # noqa: E402
from megatron_lcot.training.metrics import token_statistics  # noqa: E402


def model_provider(args, pre_process: bool = True, post_process: bool = True):
    """One pipeline stage of the model that the flags describe (bf16 weights with --bf16; the
    optimizer keeps fp32 main copies)."""
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    config = llama_config(
        args.num_layers, args.hidden_size, args.num_attention_heads,
        ffn_hidden_size=args.ffn_hidden_size, num_query_groups=args.num_query_groups,
        init_method_std=args.init_method_std,
        latent_steps=args.latent_steps, latent_layout=args.latent_layout, halting=args.halting,
        halting_threshold=args.halting_threshold, halting_loss_weight=args.halting_loss_weight,
        halting_correctness_exponent=args.halting_correctness_exponent,
        jacobi_iters=args.jacobi_iters, jacobi_eval_iters=args.jacobi_eval_iters,
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        bf16=args.bf16,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        use_cpu_initialization=args.use_cpu_initialization,
        batch_p2p_comm=parallel.backend() != "gloo",  # batched p2p is wrong on gloo (PLATFORM.md)
    )
    return build_lcot_model(config, vocab_size=args.padded_vocab_size, max_sequence_length=args.max_position_embeddings,
                            pre_process=pre_process, post_process=post_process,
                            use_te=args.transformer_impl == "transformer_engine")


def train_valid_test_datasets_provider(args, tokenizer, num_samples: list):
    """GPTDataset splits of --data-path (or mock data) with at least `num_samples` samples each."""
    return build_gpt_datasets(args, tokenizer, num_samples)


def loss_func(max_latent_steps: int, loss_mask: torch.Tensor, output):
    """Sum of the per-token training loss over the loss tokens, their count, and statistics.

    output: LcotOutput ([batch, seq] fields). The schedule divides the sum by the count and
    the number of micro-batches before backward.
    """
    mask = loss_mask.to(output.loss.dtype)
    loss_sum = (output.loss.float() * mask).sum()
    num_tokens = loss_mask.sum().to(torch.int)
    return loss_sum, num_tokens, {"stats": token_statistics(output, loss_mask, max_latent_steps)}


def forward_step(args, data_iterator, model):
    """Run one micro-batch: (LcotOutput or stage output, loss_func)."""
    batch = {key: value.to(parallel.device()) for key, value in next(data_iterator).items()}
    output = model(batch["tokens"], batch["position_ids"], attention_mask=None, labels=batch["labels"])
    return output, partial(loss_func, args.latent_steps, batch["loss_mask"])


def main(argv: list | None = None) -> dict | None:
    try:
        args = parse_args(argv)
        tokenizer = build_tokenizer(args.tokenizer_type, args.tokenizer_model, args.vocab_file, args.merge_file,
                                    args.vocab_size)
        set_padded_vocab_size(args, tokenizer.vocab_size)
        return pretrain(args, partial(train_valid_test_datasets_provider, args, tokenizer),
                        partial(model_provider, args), partial(forward_step, args))
    except (ArgumentError, TokenizerError, CheckpointError) as error:
        print(f"pretrain_lcot.py: error: {error}", file=sys.stderr)
        sys.exit(USAGE_ERROR_EXIT_CODE)


if __name__ == "__main__":
    main()
