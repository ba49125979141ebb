"""Where does an adaptive checkpoint spend its latent steps? Per-token steps against difficulty.

    python tools/analyze_halting.py --load CKPT --input FILE --output DIR [--reference VANILLA_CKPT]
                                    [--max-tokens 20000] [--seq-length N] [--sample-tokens 400]

FILE is plain text (one document) or JSON lines with a "text" field (--json-key). It is
tokenized as training data (eod after each document) and cut into windows of --seq-length
tokens (default: the checkpoint's); each window is one forward of the model in eval mode, so
the halting decisions are exactly those of inference. Every predicted token gets:

    latent_steps      executed latent steps (0..K) of the token it is predicted from
    nll               -log p(token) under the model's output (the exit-mass mixture)
    first_step_nll    -log p(token) under the model's own step-0 output (its difficulty
                      before thinking: what the router could see)
    reference_nll     -log p(token) under --reference (e.g. a vanilla model), if given

DIR receives `tokens.jsonl` (one record per predicted token), `summary.json` (means, halting
shares, Spearman rank correlations of steps with each NLL, mean steps per NLL decile, the share
of latent steps spent on the hardest NLL quintile),
`steps_histogram.png`, `steps_by_nll_decile.png` and `sample.html` (the first --sample-tokens
tokens, each shaded by its latent steps, NLLs in the tooltip). User mistakes print
`analyze_halting.py: error: ...` and exit 2.
"""

from __future__ import annotations

import argparse
import html
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="analyze_halting.py", description=__doc__.splitlines()[0], allow_abbrev=False
    )
    parser.add_argument(
        "--load", required=True, help="adaptive checkpoint directory (pretrain_lcot.py --save)"
    )
    parser.add_argument("--input", required=True, help="text or JSON-lines file to analyse")
    parser.add_argument(
        "--output", required=True, help="directory for tokens.jsonl, summary.json, plots, HTML"
    )
    parser.add_argument(
        "--reference", default=None, help="checkpoint whose per-token NLL ranks difficulty too"
    )
    parser.add_argument(
        "--json-key", default=None, help="field holding the text in JSON lines (default: text)"
    )
    parser.add_argument(
        "--seq-length", type=int, default=None, help="window length (default: the checkpoint's)"
    )
    parser.add_argument("--max-tokens", type=int, default=20000, help="analyse at most this many tokens")
    parser.add_argument("--sample-tokens", type=int, default=400, help="tokens shown in sample.html")
    return parser


@torch.no_grad()
def token_nll(model, window: torch.Tensor, vocab_size: int) -> tuple:
    """One forward of `window` [1, s]: (nll [s-1], first_step_nll [s-1] or None, latent_steps
    [s-1] or None) for the targets window[1:], over the real vocabulary (`vocab_size`, padded
    rows excluded). The step-0 output is read from the thoughts the forward returns when asked
    (`return_thoughts`), so the model runs exactly as at inference."""
    positions = torch.arange(window.shape[1], device=window.device)[None]
    output = model(window, positions, return_thoughts=True)
    logits = output.logits[0].float()  # [s, vocab]
    targets = window[0, 1:]

    def nll_of(step_logits):  # [s, vocab] -> [s-1]
        logprobs = torch.log_softmax(step_logits[:-1, :vocab_size], dim=-1)
        return -logprobs.gather(-1, targets[:, None])[:, 0]

    if output.thoughts is None:
        return nll_of(logits), None, None
    thoughts = output.thoughts
    first_logits, _ = model.output_layer(thoughts.step_states[0])  # [s, 1, vocab]
    steps = thoughts.latent_steps()[:-1, 0]
    return nll_of(logits), nll_of(first_logits[:, 0].float()), steps


def _token_text(tokenizer, previous: int | None, token: int) -> str:
    """The token's text with its leading space (sentencepiece drops it from a lone piece)."""
    if previous is None:
        return tokenizer.detokenize([token])
    return tokenizer.detokenize([previous, token])[len(tokenizer.detokenize([previous])) :]


def spearman(x: torch.Tensor, y: torch.Tensor) -> float | None:
    """Spearman's rank correlation with average ranks for ties (latent steps are mostly ties);
    None when one side is constant (e.g. every token ran every step), so summary.json stays JSON."""

    def ranks(v: torch.Tensor) -> torch.Tensor:
        v = v.double()
        order = torch.argsort(v)
        sorted_v = v[order]
        rank = torch.empty_like(v)
        rank[order] = torch.arange(len(v), dtype=torch.float64)
        _, inverse, counts = torch.unique(sorted_v, return_inverse=True, return_counts=True)
        first = torch.cumsum(counts, 0) - counts
        mean_rank = first.double() + (counts.double() - 1) / 2
        rank[order] = mean_rank[inverse]
        return rank

    rx, ry = ranks(x), ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denominator = (rx.norm() * ry.norm()).item()
    return float((rx @ ry).item() / denominator) if denominator > 0 else None


def steps_by_decile(steps: torch.Tensor, nll: torch.Tensor) -> list:
    """Mean latent steps of the tokens in each NLL decile (easiest first)."""
    order = torch.argsort(nll)
    return [float(chunk.float().mean()) for chunk in torch.tensor_split(steps[order], 10)]


def hardest_quintile_share(steps: torch.Tensor, nll: torch.Tensor) -> float | None:
    """Share of all latent steps spent on the fifth of tokens with the highest NLL (0.2 when
    spending ignores difficulty, 1 when only the hardest fifth thinks); None without steps."""
    total = steps.float().sum()
    if total == 0:
        return None
    hardest = torch.argsort(nll, descending=True)[: max(1, len(nll) // 5)]
    return float(steps[hardest].float().sum() / total)


def _plots(output: str, steps: torch.Tensor, max_steps: int, deciles: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    counts = torch.bincount(steps.long(), minlength=max_steps + 1)
    ax.bar(range(max_steps + 1), (counts / counts.sum()).tolist(), color="#4477aa")
    ax.set(
        xlabel="latent steps executed",
        ylabel="share of tokens",
        title="Latent steps per token",
        xticks=range(max_steps + 1),
    )
    fig.tight_layout()
    fig.savefig(os.path.join(output, "steps_histogram.png"), dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    for label, values in deciles.items():
        ax.plot(range(1, 11), values, marker="o", label=label)
    ax.set(
        xlabel="NLL decile (1 = easiest)",
        ylabel="mean latent steps",
        title="Steps by token difficulty",
        xticks=range(1, 11),
        ylim=(0, max_steps),
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(output, "steps_by_nll_decile.png"), dpi=120)
    plt.close(fig)


def _sample_html(records: list, max_steps: int) -> str:
    spans = []
    for record in records:
        shade = 0.85 * record["latent_steps"] / max(max_steps, 1)
        tip = f"steps {record['latent_steps']} | nll {record['nll']:.2f} | step-0 nll {record['first_step_nll']:.2f}"
        spans.append(
            f'<span title="{tip}" style="background: rgba(200, 60, 30, {shade:.2f})">'
            f"{html.escape(record['text'])}</span>"
        )
    legend = " ".join(
        f'<span style="background: rgba(200, 60, 30, {0.85 * k / max(max_steps, 1):.2f})">'
        f"&nbsp;{k} steps&nbsp;</span>"
        for k in range(max_steps + 1)
    )
    return (
        "<!doctype html><meta charset='utf-8'><title>latent steps per token</title>"
        "<body style='font-family: serif; max-width: 50em; line-height: 1.7'>"
        f"<p>Each token is shaded by the latent steps the model took before predicting it: {legend}</p>"
        f"<p style='white-space: pre-wrap'>{''.join(spans)}</p></body>"
    )


def analyze(args) -> dict:
    from megatron_lcot.data.documents import read_documents, token_stream
    from megatron_lcot.inference.loading import load_trained_model

    trained = load_trained_model(args.load)
    if not trained.model.config.adaptive:
        raise ValueError(
            f"--load {args.load!r}: trained with --halting {trained.config.model.halting} and "
            f"--latent-steps {trained.config.model.latent_steps}; pass an adaptive checkpoint "
            "(--halting adaptive), whose per-token steps vary."
        )
    reference = load_trained_model(args.reference) if args.reference else None
    tokenizer = trained.tokenizer
    seq_length = args.seq_length or trained.config.model.seq_length
    stream = token_stream(read_documents(args.input, args.json_key), tokenizer.tokenize, tokenizer.eod)
    stream = stream[: args.max_tokens + 1]
    if len(stream) < 2:
        raise ValueError(f"--input {args.input!r} has fewer than 2 tokens: nothing to analyse.")

    columns = {"latent_steps": [], "nll": [], "first_step_nll": [], "reference_nll": [], "target": []}
    device = next(trained.model.parameters()).device
    for begin in range(0, len(stream) - 1, seq_length):
        window = torch.tensor(stream[begin : begin + seq_length + 1], device=device)[None]
        if window.shape[1] < 2:
            break
        nll, first_nll, steps = token_nll(trained.model, window, trained.vocab_size)
        columns["nll"].append(nll.cpu())
        columns["first_step_nll"].append(first_nll.cpu())
        columns["latent_steps"].append(steps.cpu())
        columns["target"].append(window[0, 1:].cpu())
        if reference is not None:
            columns["reference_nll"].append(token_nll(reference.model, window, reference.vocab_size)[0].cpu())
    data = {name: torch.cat(values) for name, values in columns.items() if values}
    steps = data["latent_steps"]

    os.makedirs(args.output, exist_ok=True)
    records = []
    with open(os.path.join(args.output, "tokens.jsonl"), "w", encoding="utf-8") as f:
        targets = data["target"].tolist()
        for i in range(len(steps)):
            text = _token_text(tokenizer, targets[i - 1] if i else None, targets[i])
            record = {
                "index": i,
                "token": targets[i],
                "text": text,
                "latent_steps": int(steps[i]),
                "nll": round(float(data["nll"][i]), 5),
                "first_step_nll": round(float(data["first_step_nll"][i]), 5),
            }
            if "reference_nll" in data:
                record["reference_nll"] = round(float(data["reference_nll"][i]), 5)
            records.append(record)
            f.write(json.dumps(record) + "\n")

    max_steps = trained.config.model.latent_steps
    difficulty = {"own step-0 NLL": data["first_step_nll"], "final NLL": data["nll"]}
    if "reference_nll" in data:
        difficulty["reference NLL"] = data["reference_nll"]
    deciles = {label: steps_by_decile(steps, nll) for label, nll in difficulty.items()}
    counts = torch.bincount(steps.long(), minlength=max_steps + 1).double()
    summary = {
        "checkpoint": args.load,
        "reference": args.reference,
        "input": args.input,
        "tokens": len(steps),
        "seq_length": seq_length,
        "mean_latent_steps": float(steps.float().mean()),
        "halted_share": (counts / counts.sum()).tolist(),
        "mean_nll": float(data["nll"].mean()),
        "spearman_steps_vs_first_step_nll": spearman(steps, data["first_step_nll"]),
        "spearman_steps_vs_nll": spearman(steps, data["nll"]),
        "mean_steps_by_nll_decile": deciles,
        "hardest_quintile_step_share_by_first_step_nll": hardest_quintile_share(
            steps, data["first_step_nll"]
        ),
        "hardest_quintile_step_share_by_nll": hardest_quintile_share(steps, data["nll"]),
    }
    if "reference_nll" in data:
        summary["spearman_steps_vs_reference_nll"] = spearman(steps, data["reference_nll"])
        summary["hardest_quintile_step_share_by_reference_nll"] = hardest_quintile_share(
            steps, data["reference_nll"]
        )
        summary["mean_reference_nll"] = float(data["reference_nll"].mean())
    with open(os.path.join(args.output, "summary.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=1)
    with open(os.path.join(args.output, "sample.html"), "w", encoding="utf-8") as f:
        f.write(_sample_html(records[: args.sample_tokens], max_steps))
    _plots(args.output, steps, max_steps, deciles)
    return summary


def main(argv: list | None = None) -> dict:
    args = build_parser().parse_args(argv)
    from megatron_lcot.inference.loading import USER_ERRORS

    if args.max_tokens < 1 or (args.seq_length is not None and args.seq_length < 2):
        print("analyze_halting.py: error: --max-tokens must be >= 1 and --seq-length >= 2.", file=sys.stderr)
        sys.exit(2)
    try:
        summary = analyze(args)
    except (ValueError, *USER_ERRORS) as error:
        print(f"analyze_halting.py: error: {error}", file=sys.stderr)
        sys.exit(2)
    print(json.dumps({k: v for k, v in summary.items() if k != "mean_steps_by_nll_decile"}))
    return summary


if __name__ == "__main__":
    main()
