"""Training statistics and where they go: a readable line, JSON lines, TensorBoard, wandb.

Per-micro-batch statistics are one flat float64 vector of sums (`token_statistics`), so the
schedules' per-micro-batch outputs, gradient accumulation and data-parallel ranks combine by
plain addition; `summarize` turns the total into means:

    [loss_sum, lm_loss_sum, tokens, latent_steps_sum, expected_latent_steps_sum, halted_0 .. halted_K]

`halted_k` counts the loss tokens that executed exactly k latent steps, so `halted_share` is
the share of tokens halted at each step (all at step K without adaptive halting; all at 0 in
vanilla mode).

`MetricsLogger` writes on the one rank that holds the losses (the last pipeline stage's last
rank, as Megatron-LM); other ranks get a logger that drops everything.
"""

from __future__ import annotations

import json
import math
import os
import sys

import torch

from megatron_lcot import parallel

_LOSS, _LM_LOSS, _TOKENS, _LATENT, _EXPECTED = range(5)
_HISTOGRAM = 5


def token_statistics(output, loss_mask: torch.Tensor, max_latent_steps: int) -> torch.Tensor:
    """Sums over the loss tokens of one micro-batch.

    output: LcotOutput with `loss`, `lm_loss`, `latent_steps`, `expected_latent_steps`
    ([batch, seq] each; the last two may be None). loss_mask: [batch, seq], 1 = counted.
    Returns a float64 vector of length 5 + max_latent_steps + 1 (layout in the module doc).
    """
    mask = loss_mask.detach().double()
    stats = torch.zeros(_HISTOGRAM + max_latent_steps + 1, dtype=torch.float64, device=output.loss.device)
    stats[_LOSS] = (output.loss.detach().double() * mask).sum()
    stats[_LM_LOSS] = (output.lm_loss.detach().double() * mask).sum()
    stats[_TOKENS] = mask.sum()
    if output.latent_steps is None:
        stats[_HISTOGRAM] = stats[_TOKENS]
    else:
        steps = output.latent_steps.detach()
        stats[_LATENT] = (steps.double() * mask).sum()
        stats[_HISTOGRAM:] = torch.zeros_like(stats[_HISTOGRAM:]).index_add_(
            0, steps.round().long().flatten(), mask.flatten()
        )
    if output.expected_latent_steps is None:
        stats[_EXPECTED] = math.nan
    else:
        stats[_EXPECTED] = (output.expected_latent_steps.detach().double() * mask).sum()
    return stats


def reduce_statistics(per_microbatch: list, group=None) -> torch.Tensor:
    """Sum the statistics of this rank's micro-batches and of all ranks in `group`
    (data-parallel). The vectors live where the loss was computed (`parallel.device()`)."""
    total = torch.stack([entry["stats"] for entry in per_microbatch]).sum(dim=0)
    return parallel.all_reduce(total, group)


def summarize(total: torch.Tensor) -> dict:
    """Means per loss token from summed statistics."""
    tokens = max(total[_TOKENS].item(), 1.0)
    expected = total[_EXPECTED].item()
    return {
        "loss": total[_LOSS].item() / tokens,
        "lm_loss": total[_LM_LOSS].item() / tokens,
        "mean_latent_steps": total[_LATENT].item() / tokens,
        "expected_latent_steps": None if math.isnan(expected) else expected / tokens,
        "halted_share": [round(count / tokens, 6) for count in total[_HISTOGRAM:].tolist()],
    }


def format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def perplexity(lm_loss: float) -> float:
    return math.exp(min(lm_loss, 700.0))


class MetricsLogger:
    """Fans each record out to stdout, `--metrics-file` (JSON lines), TensorBoard and wandb."""

    def __init__(
        self,
        logging,
        train_iters: int,
        enabled: bool,
        wandb_dir: str | None = None,
        wandb_config: dict | None = None,
    ) -> None:
        """logging: the RunConfig's logging section; wandb_config: the run's settings, stored
        with the wandb run (in `wandb_dir`, default the TensorBoard directory)."""
        self.enabled = enabled
        self.train_iters = train_iters
        self.metrics_file = self.tensorboard = self.wandb_run = None
        if not enabled:
            return
        if logging.metrics_file:
            os.makedirs(os.path.dirname(os.path.abspath(logging.metrics_file)), exist_ok=True)
            self.metrics_file = open(logging.metrics_file, "a", encoding="utf-8")
        if logging.tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(log_dir=logging.tensorboard_dir)
        if logging.wandb_project:
            import wandb

            self.wandb_run = wandb.init(
                project=logging.wandb_project,
                name=logging.wandb_exp_name,
                mode=logging.wandb_mode,
                dir=logging.tensorboard_dir or wandb_dir or None,
                config=wandb_config,
            )

    def _emit(self, line: str, record: dict) -> None:
        print(line, flush=True)
        if self.metrics_file:
            self.metrics_file.write(json.dumps(record) + "\n")
            self.metrics_file.flush()
        scalars = {
            f"{record['split']}/{k}": v
            for k, v in record.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "iteration"
        }
        if self.tensorboard:
            for tag, value in scalars.items():
                self.tensorboard.add_scalar(tag, value, record["iteration"])
            self.tensorboard.flush()
        if self.wandb_run:
            self.wandb_run.log(scalars, step=record["iteration"])

    def log_train(
        self,
        iteration: int,
        consumed_tokens: int,
        lr: float,
        grad_norm: float,
        summary: dict,
        tokens_per_sec: float,
        seconds_per_iter: float,
        elapsed: float,
    ) -> None:
        if not self.enabled:
            return
        eta = (self.train_iters - iteration) * seconds_per_iter
        record = {
            "split": "train",
            "iteration": iteration,
            "consumed_tokens": consumed_tokens,
            "lr": lr,
            **summary,
            "grad_norm": grad_norm,
            "tokens_per_sec": tokens_per_sec,
            "elapsed_s": round(elapsed, 3),
            "eta_s": round(eta, 3),
        }
        width = len(str(self.train_iters))
        halted = " ".join(f"{k}:{share:.2f}" for k, share in enumerate(summary["halted_share"]))
        line = (
            f"[{iteration:>{width}}/{self.train_iters} {100 * iteration / self.train_iters:3.0f}%] "
            f"iter {iteration} | tokens {consumed_tokens} | lr {lr:.3e} | loss {summary['loss']:.4f} | "
            f"grad norm {grad_norm:.3f} | tok/s {tokens_per_sec:,.0f} | "
            f"latent steps {summary['mean_latent_steps']:.2f} | halted@k {halted} | "
            f"flops/tok {summary.get('flops_per_token', float('nan')):.3g} | "
            f"elapsed {format_duration(elapsed)} | eta {format_duration(eta)}"
        )
        self._emit(line, record)

    def log_eval(self, iteration: int, summary: dict, final: bool) -> None:
        if not self.enabled:
            return
        ppl = perplexity(summary["lm_loss"])
        record = {"split": "valid", "iteration": iteration, **summary, "ppl": ppl, "final": final}
        prefix = "final: " if final else ""
        line = (
            f"{prefix}validation at iteration {iteration} | lm loss {summary['lm_loss']:.4f} | "
            f"ppl {ppl:.3f} | latent steps {summary['mean_latent_steps']:.2f}"
        )
        self._emit(line, record)

    def close(self) -> None:
        if self.metrics_file:
            self.metrics_file.close()
        if self.tensorboard:
            self.tensorboard.close()
        if self.wandb_run:
            self.wandb_run.finish()
        sys.stdout.flush()
