"""Training throughput of every mode against megatron-core's own GPTModel, in one run.

One forward + backward of one micro-batch per step (random weights, random token ids: only
shapes matter for time; the optimizer step is the same for every mode and left out) for:

* `baseline`: megatron-core's GPTModel, local spec (RMSNorm, SwiGLU, RoPE, GQA, its own
  DotProductAttention), same config;
* `vanilla`: our model with latent_steps = 0;
* stepwise K=1, K=2; interleaved K=1 with J=2 Jacobi iterations;
* adaptive K=2 and K=3 with the halting settings the training loop hands after the warm-up and
  the correctness penalty on every executed token (`--halting-penalty-fraction 0.25` measures
  the shipped recipe's sample), at forced halting profiles: `all` continue; `50%` / `80%` of
  the tokens (a fixed random subset) halted after step 0; and `router`, a linear router with
  random weights whose data-dependent decisions give a mix of steps (a stand-in for a learned
  router: its measured step shares enter the FLOPs, as a learned router's would).

Modes are timed round-robin `--repeats` times and the median counts, so a load change on a
shared machine hits every mode alike; on a crowded CPU machine `--clock cpu --threads 1` times
CPU seconds instead of wall seconds. Columns: step time, tokens/s, model TFLOP/s and MFU
(training FLOPs per token from `megatron_lcot.model.flops`: executed slots only, backward = 2x
forward; recompute is not counted), time / ideal where ideal = baseline time x FLOPs ratio, and
memory: on CUDA the peak allocated during the step above what was allocated before it; on CPU
(no allocator statistics) the bytes of activations saved for backward (unique storages,
parameters excluded), measured in a separate untimed step. MFU's peak: the device's bf16/fp32
dense peak on CUDA (table below), on CPU the best GEMM rate measured in this run.

The last line is one JSON object with every ratio of the throughput targets (docs/benchmarks.md):
`vanilla_vs_baseline` (tokens/s ratio), `fixed_k_vs_ideal` {mode: time / ideal},
`adaptive_all_vs_ideal` {mode: time / ideal} (every token continuing),
`adaptive_saving_vs_flop_saving` {mode: (1 - t_adaptive / t_fixed) / (1 - F_adaptive / F_fixed)}
(against the `all` profile of the same K), `mfu` {mode: MFU}, `counted_vs_logged_flops` {adaptive
mode: FlopCounterMode's count of one step / the FLOPs flops.py logs for it} (CPU: the fused
attention op gets a formula at its mask-allowed pairs, which FlopCounterMode lacks), and the raw rows.

    .venv/bin/python benchmarks/train_throughput.py --device cpu --size tiny --threads 2
    .venv/bin/python benchmarks/train_throughput.py --device cuda --size 1b --bf16
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings

import torch
from torch.utils.flop_counter import FlopCounterMode

warnings.filterwarnings("ignore")

from megatron.core.models.gpt import GPTModel  # noqa: E402
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec  # noqa: E402
from megatron.core.transformer.spec_utils import ModuleSpec, build_module  # noqa: E402

from megatron_lcot import parallel  # noqa: E402
from megatron_lcot.model import get_lcot_model_spec, llama_config  # noqa: E402
from megatron_lcot.model.flops import training_flops_per_token  # noqa: E402
from megatron_lcot.model.halting import LinearHaltingRouter  # noqa: E402
from megatron_lcot.model.halting_schedule import HaltingSchedule  # noqa: E402
from megatron_lcot.runs import RECIPE_PENALTY_FRACTION  # noqa: E402

# name -> (layers, hidden, heads, query groups, ffn, vocab, seq, micro batch)
SIZES = {
    "tiny": (2, 128, 4, 2, 344, 8192, 128, 8),
    "125m": (12, 768, 12, 12, 2048, 50304, 2048, 4),
    "1b": (24, 2048, 32, 32, 5504, 50304, 2048, 2),
}

# dense peak TFLOP/s by device-name substring: (bf16, fp32 without TF32)
CUDA_PEAK_TFLOPS = {"H200": (989.0, 67.0), "H100": (989.0, 67.0), "A100": (312.0, 19.5)}

FORCED_PROFILES = {"all": 0.0, "50%": 0.5, "80%": 0.8}


class ForcedHaltingRouter(LinearHaltingRouter):
    """The linear router, with a fixed random `halted_fraction` of the tokens forced to halt
    after step 0 (their gate times 0); the other tokens keep the router's own gates (0.9 at
    init: they run every step). The router's compute and gradients stay as in training."""

    def __init__(self, config, halted_fraction: float):
        super().__init__(config)
        self.halted_fraction = halted_fraction

    def forward(self, step_state: torch.Tensor, step: int) -> torch.Tensor:
        gate = super().forward(step_state, step)
        if step == 0 and self.halted_fraction > 0:
            gen = torch.Generator().manual_seed(1234)
            keep = torch.rand(step_state.shape[:-1], generator=gen) >= self.halted_fraction
            gate = gate * keep.to(gate.device, gate.dtype)
        return gate


def build_modes(args, size) -> dict:
    """name -> (builder, config fields, jacobi_iters for the FLOPs count)."""
    modes = {
        "baseline": ("baseline", {}, None),
        "vanilla": ("lcot", {}, None),
        "stepwise K=1": ("lcot", {"latent_steps": 1}, None),
        "stepwise K=2": ("lcot", {"latent_steps": 2}, None),
        "interleaved K=1 J=2": (
            "lcot",
            {"latent_steps": 1, "latent_layout": "interleaved", "jacobi_iters": (2,)},
            2,
        ),
    }
    for k in (2, 3):
        for profile in (*FORCED_PROFILES, "router"):
            modes[f"adaptive K={k} {profile}"] = (
                "lcot",
                {
                    "latent_steps": k,
                    "halting": "adaptive",
                    "halting_penalty_fraction": args.halting_penalty_fraction,
                },
                None,
            )
    if args.modes:
        wanted = set(args.modes.split(","))
        unknown = wanted - set(modes)
        if unknown:
            sys.exit(
                f"train_throughput.py: error: unknown --modes {sorted(unknown)}; choose from {list(modes)}"
            )
        modes = {name: spec for name, spec in modes.items() if name in wanted | {"baseline"}}
    return modes


def build_model(name, builder, fields, args, size, extra_fields):
    layers, hidden, heads, groups, ffn, vocab, seq, _ = size
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    config = llama_config(
        layers,
        hidden,
        heads,
        ffn_hidden_size=ffn,
        num_query_groups=groups,
        bf16=args.bf16,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        **({**fields, **extra_fields} if builder == "lcot" else {}),
    )
    if builder == "baseline":
        model = GPTModel(
            config,
            get_gpt_layer_local_spec(normalization="RMSNorm"),
            vocab_size=vocab,
            max_sequence_length=seq,
            position_embedding_type="rope",
            share_embeddings_and_output_weights=False,
        )
    else:
        spec = get_lcot_model_spec(config)
        if name.startswith("adaptive"):
            profile = name.rsplit(" ", 1)[1]
            if profile == "router":  # random weights: data-dependent halting after every step
                spec.submodules.halting_router = LinearHaltingRouter
            else:
                spec.submodules.halting_router = ModuleSpec(
                    ForcedHaltingRouter, params={"halted_fraction": FORCED_PROFILES[profile]}
                )
        model = build_module(spec, config=config, vocab_size=vocab, max_sequence_length=seq)
        if name.endswith("router"):
            with torch.no_grad():
                gen = torch.Generator().manual_seed(7)
                model.halting_router.weight.copy_(
                    torch.randn(model.halting_router.weight.shape, generator=gen)
                )
                model.halting_router.bias.fill_(0.5)
    model = model.to(parallel.device())
    if args.bf16:
        model = model.bfloat16()
    return model, config


def step_shares(name, config, output) -> list | None:
    """Fraction of tokens executing step k = 0..K (None: every token runs every step)."""
    if not name.startswith("adaptive"):
        return None
    steps = output.latent_steps.flatten()
    return [1.0] + [(steps >= k).float().mean().item() for k in range(1, config.latent_steps + 1)]


def _attention_flops(
    query, key, value, dropout_p=0.0, is_causal=False, *rest, attn_mask=None, backward=False, **kwargs
) -> int:
    """FLOPs of one fused attention call at its mask-allowed query-key pairs (QK^T and AV,
    2 x 2 x pairs x head_dim; backward 2 x forward), flops.py's convention. query [b, np, sq, hn],
    key [b, ng, sk, hn]; attn_mask additive (0 = allowed) broadcastable to [b, np, sq, sk]."""
    batch, heads, sq, hn = query.shape
    sk = key.shape[2]
    if attn_mask is not None:
        allowed = attn_mask == 0
        pairs = int(allowed.sum()) * (batch * heads * sq * sk // allowed.numel())
    elif is_causal:
        pairs = batch * heads * sum(min(i + 1, sk) for i in range(sq))
    else:
        pairs = batch * heads * sq * sk
    return 4 * pairs * hn * (2 if backward else 1)


def _attention_backward_flops(
    grad_out,
    query,
    key,
    value,
    out,
    logsumexp,
    dropout_p=0.0,
    is_causal=False,
    *rest,
    attn_mask=None,
    **kwargs,
) -> int:
    return _attention_flops(query, key, value, dropout_p, is_causal, attn_mask=attn_mask, backward=True)


_attention_flops._get_raw = True  # the formula reads the mask's values, not only shapes
_attention_backward_flops._get_raw = True
ATTENTION_FLOP_FORMULAS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _attention_flops,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _attention_backward_flops,
}


def counted_flops(run) -> float:
    """FlopCounterMode's count of one training step: every matmul as executed (padding rows
    included), and the fused CPU attention, which it cannot see, at its mask-allowed pairs."""
    counter = FlopCounterMode(display=False, custom_mapping=ATTENTION_FLOP_FORMULAS)
    with counter:
        output = run()
    return counter.get_total_flops(), output


def device_peak_tflops(args) -> float:
    """Dense peak of the device for the benchmark's dtype (CUDA: table; CPU: measured GEMM)."""
    device = parallel.device()
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, (bf16, fp32) in CUDA_PEAK_TFLOPS.items():
            if key in name:
                return bf16 if args.bf16 else fp32
        return float("nan")
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    a = torch.randn(1024, 1024, dtype=dtype)
    best = min(
        _timed(lambda: a @ a, time.process_time if args.clock == "cpu" else time.perf_counter)
        for _ in range(20)
    )
    return 2 * 1024**3 / best / 1e12


def _timed(fn, clock=time.perf_counter) -> float:
    start = clock()
    fn()
    if parallel.device().type == "cuda":
        torch.cuda.synchronize()
    return clock() - start


def step_memory_mib(model, run) -> float:
    """CUDA: peak allocated during one step above what was allocated before it. CPU: bytes of
    the activations saved for backward (unique storages, parameters excluded)."""
    model.zero_grad(set_to_none=True)
    if parallel.device().type == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        run()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        run()
    return sum(saved.values()) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--size", choices=tuple(SIZES), default="tiny")
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--num-layers", type=int, default=None, help="override the size's layer count")
    parser.add_argument("--seq-length", type=int, default=None, help="override the size's sequence length")
    parser.add_argument("--micro-batch-size", type=int, default=None, help="override the size's micro batch")
    parser.add_argument(
        "--attention-backend",
        choices=("auto", "sdpa", "flex", "dense"),
        default="auto",
        help="our modes' core attention (the baseline keeps megatron-core's)",
    )
    parser.add_argument(
        "--recompute-granularity",
        choices=("selective", "full"),
        default=None,
        help="our modes' activation recompute (the baseline runs without)",
    )
    parser.add_argument(
        "--halting-penalty-fraction",
        type=float,
        default=1.0,
        help="the adaptive modes' correctness-penalty sample (default: the flag's default, every "
        f"executed token; the shipped recipe, runs.adaptive_recipe, samples {RECIPE_PENALTY_FRACTION})",
    )
    parser.add_argument("--modes", default=None, help="comma-separated subset (baseline always runs)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="cpu: CPU seconds of this process per step (robust to other jobs on a shared "
        "CPU machine; use with --threads 1, where no thread spins)",
    )
    args = parser.parse_args()

    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("train_throughput.py: error: --device cuda but CUDA is not available; use --device cpu")
    if args.device == "cpu" and torch.cuda.is_available():
        sys.exit(
            "train_throughput.py: error: --device cpu on a CUDA machine is not supported "
            "(parallel.device() picks CUDA); use --device cuda"
        )
    if not 0.0 < args.halting_penalty_fraction <= 1.0:
        sys.exit(
            f"train_throughput.py: error: --halting-penalty-fraction {args.halting_penalty_fraction} "
            "is not in (0, 1]"
        )
    torch.set_num_threads(args.threads)
    parallel.initialize(seed=0)
    layers, hidden, heads, groups, ffn, vocab, seq, batch = SIZES[args.size]
    size = (
        args.num_layers or layers,
        hidden,
        heads,
        groups,
        ffn,
        vocab,
        args.seq_length or seq,
        args.micro_batch_size or batch,
    )
    seq, batch = size[6], size[7]
    device = parallel.device()
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (batch, seq), generator=gen).to(device)
    labels = torch.randint(0, vocab, (batch, seq), generator=gen).to(device)
    positions = torch.arange(seq, device=device).expand(batch, -1)

    if args.clock == "cpu" and args.device == "cuda":
        sys.exit(
            "train_throughput.py: error: --clock cpu measures CPU work; use --clock wall with --device cuda"
        )
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    modes = build_modes(args, size)
    models, configs, runs, memory, shares = {}, {}, {}, {}, {}
    for name, (builder, fields, _) in modes.items():
        ours = {
            "core_attention_backend": args.attention_backend,
            "latent_recompute": args.recompute_granularity,
        }
        models[name], configs[name] = build_model(name, builder, fields, args, size, ours)

        # what the training loop hands the forward after the halting warm-up (the penalty sample)
        after_warmup = (
            {}
            if builder == "baseline"
            else {"halting": HaltingSchedule(configs[name]).at(configs[name].halting_warmup_iters)}
        )

        def run(model=models[name], name=name, halting=after_warmup):
            output = model(ids, positions, attention_mask=None, labels=labels, **halting)
            loss = output if name == "baseline" else output.loss
            loss.float().mean().backward()
            return output

        runs[name] = run
        output = run()  # warm-up
        shares[name] = step_shares(name, configs[name], output)
        memory[name] = step_memory_mib(models[name], run)

    times = {name: [] for name in modes}
    for _ in range(args.repeats):
        for name, model in models.items():
            model.zero_grad(set_to_none=True)
            times[name].append(_timed(runs[name], clock))

    counted_vs_logged = {}
    if device.type == "cpu":  # FlopCounterMode's formulas for the fused attention are CPU ops here
        for name in modes:
            if name.startswith("adaptive"):
                models[name].zero_grad(set_to_none=True)
                counted, output = counted_flops(runs[name])
                logged = training_flops_per_token(
                    configs[name], seq, vocab, step_shares=step_shares(name, configs[name], output)
                )
                counted_vs_logged[name] = counted / (logged * batch * seq)

    peak = device_peak_tflops(args)
    tokens = batch * seq
    base_time = statistics.median(times["baseline"])
    base_flops = training_flops_per_token(configs["baseline"], seq, vocab)
    rows = {}
    for name, (_, _, jacobi) in modes.items():
        t = statistics.median(times[name])
        flops = training_flops_per_token(
            configs[name], seq, vocab, step_shares=shares[name], jacobi_iters=jacobi
        )
        rows[name] = {
            "step_s": t,
            "tokens_per_s": tokens / t,
            "tflops": flops * tokens / t / 1e12,
            "mfu": flops * tokens / t / 1e12 / peak,
            "flops_per_token": flops,
            "vs_ideal": t / (base_time * flops / base_flops),
            "memory_mib": memory[name],
            "step_shares": shares[name],
        }

    memory_kind = "peak MiB" if device.type == "cuda" else "saved MiB"
    print(
        f"device {device} threads {args.threads} {'bf16' if args.bf16 else 'fp32'} | size {args.size}: "
        f"{size[0]} layers h {hidden} heads {heads}/{groups} ffn {ffn} vocab {vocab} | batch {batch} x seq {seq} "
        f"| attention {args.attention_backend}, recompute {args.recompute_granularity} "
        f"| median of {args.repeats}, {args.clock} clock | peak {peak:.2f} TFLOP/s"
    )
    print(
        f"{'mode':<24} {'s/step':>8} {'tokens/s':>9} {'TFLOP/s':>8} {'MFU':>6} {'x ideal':>8} {memory_kind:>10}  step shares"
    )
    for name, row in rows.items():
        share_text = "" if row["step_shares"] is None else " ".join(f"{s:.2f}" for s in row["step_shares"])
        print(
            f"{name:<24} {row['step_s']:>8.4f} {row['tokens_per_s']:>9.0f} {row['tflops']:>8.3f} "
            f"{row['mfu']:>6.1%} {row['vs_ideal']:>8.2f} {row['memory_mib']:>10.1f}  {share_text}"
        )

    summary = {
        "vanilla_vs_baseline": rows["vanilla"]["tokens_per_s"] / rows["baseline"]["tokens_per_s"]
        if "vanilla" in rows
        else None,
        "fixed_k_vs_ideal": {
            name: row["vs_ideal"]
            for name, row in rows.items()
            if name.startswith(("stepwise", "interleaved"))
        },
        "adaptive_all_vs_ideal": {
            name: row["vs_ideal"]
            for name, row in rows.items()
            if name.startswith("adaptive") and name.endswith(" all")
        },
        "adaptive_saving_vs_flop_saving": {},
        "mfu": {name: row["mfu"] for name, row in rows.items()},
        "counted_vs_logged_flops": counted_vs_logged,
        "rows": rows,
    }
    for name, row in rows.items():
        fixed = rows.get(name.rsplit(" ", 1)[0] + " all")
        if name.startswith("adaptive") and fixed is not None and row is not fixed:
            flop_saving = 1 - row["flops_per_token"] / fixed["flops_per_token"]
            time_saving = 1 - row["step_s"] / fixed["step_s"]
            summary["adaptive_saving_vs_flop_saving"][name] = (
                time_saving / flop_saving if flop_saving > 0 else None
            )
    print(json.dumps(summary))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
