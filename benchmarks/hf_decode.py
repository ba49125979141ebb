"""Decode speed of the Hugging Face export with and without its latent KV cache, and ours beside it.

    python benchmarks/hf_decode.py --load CKPT_DIR [--totals 64 512 2048] [--new-tokens 16]
        [--repeats 2] [--decisive-router] [--uncached-max-total 2048]

The checkpoint is exported to a temporary directory and loaded through transformers
(`trust_remote_code`). For each total length T the prompt is the first T - new tokens of real
text (State of the Union addresses), decoded greedily by:

* `hf_cached`: `model.generate(use_cache=True)` (the export's LcotLatentCache);
* `hf_uncached`: `model.generate(use_cache=False)` (the whole sequence recomputed per token;
  skipped above --uncached-max-total, e.g. for the interleaved layout, whose uncached generate
  iterates Jacobi to its fixed point);
* `ours`: `megatron_lcot.inference.generation.generate_ids` (our decoder, latent KV cache).

Per-token decode time: the median interval between successive decoding steps (timestamps
from a logits processor in transformers, from a hook on our output layer), i.e. one forward of
the new token plus choosing it, in CPU seconds of the (single, OMP_NUM_THREADS=1) thread and in
wall seconds; prefill: start to the first step. Best of --repeats by CPU time, alternating.
One JSON line per (decoder, T), then a summary with the per-token time ratio
T_max / T_min of each decoder (CPU time; flat = 1). --decisive-router: as decode_halting.py,
so that tokens of a briefly trained adaptive checkpoint halt.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class _Stamps:
    """Wall-clock and CPU times of successive decoding steps. Per-token time = the median
    interval between them (one forward + choosing the token); the CPU time of this (single)
    thread is what other jobs on a shared machine disturb least, the wall time is printed too."""

    def __init__(self):
        self.times = []

    def stamp(self, *args):
        self.times.append((time.perf_counter(), time.thread_time()))
        return args[1] if len(args) == 2 else None  # as a LogitsProcessor: the scores unchanged

    def record(self, start: tuple) -> dict:
        def median_interval(clock):
            intervals = sorted(b[clock] - a[clock] for a, b in zip(self.times, self.times[1:]))
            return intervals[len(intervals) // 2]

        return {
            "prefill_cpu_s": self.times[0][1] - start[1],
            "per_token_cpu_s": median_interval(1),
            "per_token_wall_s": median_interval(0),
        }


def _now() -> tuple:
    return time.perf_counter(), time.thread_time()


def _hf_record(model, prompt, new_tokens: int, use_cache: bool) -> dict:
    import torch
    from transformers import LogitsProcessorList

    ids, stamps = torch.tensor([prompt]), _Stamps()
    start = _now()
    with torch.no_grad():
        model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            use_cache=use_cache,
            pad_token_id=0,
            logits_processor=LogitsProcessorList([stamps.stamp]),
        )
    return stamps.record(start)


def _our_record(trained, prompt, new_tokens: int) -> dict:
    from megatron_lcot.inference.generation import generate_ids
    from megatron_lcot.inference.sampling import SamplingParams

    stamps = _Stamps()
    hook = trained.model.output_layer.register_forward_hook(lambda *args: stamps.stamp())
    start = _now()
    result = generate_ids(trained, [prompt], new_tokens, SamplingParams(greedy=True), stop_at_eod=False)
    hook.remove()
    return {**stamps.record(start), "mean_latent_steps": result.mean_latent_steps}


def main(argv: list | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--load", required=True)
    parser.add_argument("--totals", type=int, nargs="+", default=[64, 512, 2048])
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--decisive-router", action="store_true")
    parser.add_argument("--uncached-max-total", type=int, default=2048)
    args = parser.parse_args(argv)
    if args.new_tokens < 2:
        parser.error(f"--new-tokens {args.new_tokens}: at least 2 (the first step is the prefill).")
    if min(args.totals) <= args.new_tokens:
        parser.error(f"--totals {min(args.totals)}: every total must exceed --new-tokens {args.new_tokens}.")

    import torch
    from transformers import AutoModelForCausalLM

    from benchmarks.decode_halting import make_router_decisive
    from megatron_lcot.checkpoint.checkpointing import save_weights_only
    from megatron_lcot.data.default_corpus import sotu_speeches
    from megatron_lcot.hf.export import export
    from megatron_lcot.inference.loading import load_trained_model

    torch.set_num_threads(1)  # the CPU time of this thread is the measure
    trained = load_trained_model(args.load)
    work = tempfile.mkdtemp(prefix="hf_decode_")
    source = args.load
    if args.decisive_router:
        make_router_decisive(trained.model)
        source = os.path.join(work, "decisive")
        save_weights_only(source, trained.iteration, trained.model, trained.config, sharded=True)
    export(source, os.path.join(work, "hf"))
    model = AutoModelForCausalLM.from_pretrained(
        os.path.join(work, "hf"), trust_remote_code=True, dtype=torch.float32
    ).eval()
    shutil.rmtree(work)  # everything is in memory now
    text = [trained.tokenizer.tokenize(t) for t in itertools.islice(sotu_speeches(), 4)]
    stream = [token for document in text for token in document]

    records = {}
    for total in args.totals:
        prompt = stream[: total - args.new_tokens]
        decoders = {
            "hf_cached": lambda: _hf_record(model, prompt, args.new_tokens, True),
            "ours": lambda: _our_record(trained, prompt, args.new_tokens),
        }
        if total <= args.uncached_max_total:
            decoders["hf_uncached"] = lambda: _hf_record(model, prompt, args.new_tokens, False)
        for _ in range(args.repeats):
            for name, measure in decoders.items():
                record = measure()
                best = records.get((name, total))
                if best is None or record["per_token_cpu_s"] < best["per_token_cpu_s"]:
                    records[(name, total)] = {
                        "decoder": name,
                        "total_positions": total,
                        **record,
                        "decode_tokens_per_cpu_s": 1.0 / record["per_token_cpu_s"],
                    }
    for record in records.values():
        print(json.dumps(record))
    low, high = min(args.totals), max(args.totals)
    summary = {
        "per_token_time_ratio_%d_vs_%d" % (high, low): {
            name: records[(name, high)]["per_token_cpu_s"] / records[(name, low)]["per_token_cpu_s"]
            for name in ("hf_cached", "hf_uncached", "ours")
            if (name, high) in records and (name, low) in records
        },
        "mode": {
            "latent_steps": trained.config.model.latent_steps,
            "layout": trained.config.model.latent_layout,
            "halting": trained.config.model.halting,
        },
        "new_tokens": args.new_tokens,
        "decisive_router": args.decisive_router,
    }
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
