"""The comparison of docs/results.md, reproducible: every mode at equal parameters and training tokens,
plus two vanilla yardsticks, over several seeds; writes a table and plots.

    bash examples/compare_small.sh [--seeds 3] [--jobs 2] [--scale cpu|gpu] [--train-iters N] [--models a,b]
        [--bigbench bigbench-1.0.0.tar.gz] [--task-items 200]
    bash examples/compare_small.sh --iso-flops [--budgets 1,2,4] [--seeds 3] [--jobs 2] [--scale cpu|gpu]
    bash examples/compare_small.sh --scale gpu --iso-flops --seeds 1 --budgets 1 --train-iters 500 [--dry-run]

Models (the model shape and data of the scale; the same seed list for each):
    vanilla            --latent-steps 0
    ponderlm2_k1       --latent-steps 1 --latent-layout interleaved (Jacobi, J in {2,3})
    stepwise_k2        --latent-steps 2 (fixed K, exact passes)
    adaptive_k3        --latent-steps 3 --halting adaptive + the recipe (runs.adaptive_recipe, docs/method.md)
    vanilla_eq_flops   vanilla trained on more tokens: the adaptive run's measured training FLOPs
    vanilla_2x         twice the layers (~2x the non-embedding parameters): about PonderLM-2 K=1's
                       inference FLOPs per token (PonderLM-2's "beats a 2x vanilla" claim)

Each run goes through pretrain_lcot.py (metrics file, checkpoint); held-out perplexity is the final
validation of the run; downstream accuracy is `tools/evaluate.py --task` on the files that
`tools/build_eval_tasks.py` builds (held-out cloze always, BIG-bench when --bigbench is given);
FLOPs come from `megatron_lcot.model.flops` (training: the run's logged `train_flops`;
inference: `tools/evaluate.py --input` on held-out documents, per token at the halting that
decoding does). Output under --out-dir:
`results.json` (every run), `summary.md` (mean +- std over seeds), `val_loss_vs_train_flops.png`,
and `tools/analyze_halting.py` plots for the first adaptive seed (against the first vanilla).

`--iso-flops` asks which model is better at equal training FLOPs: vanilla, PonderLM-2 K=1 and
adaptive K=3 (default --models) each train at `--budgets` B x the training FLOPs of the scale's
vanilla run. A model's iterations for budget B are B x iters x (vanilla's FLOPs / the model's
FLOPs), both measured by the model's own run at the scale's iterations (its "pilot", which is also
a point of the curve; a budget within 5% of the pilot's iterations reuses the pilot). The LR and
halting warm-ups scale with the iterations. The x axes are the FLOPs each run executed (logged
`train_flops`; inference FLOPs per token from tools/evaluate.py). Downstream tasks are skipped.
Output: `iso_flops.md` and `iso_flops_ppl_vs_{train,inference}_flops.png` under --out-dir.
`--dry-run` prints every model's command line at the scale's iterations, checked by
pretrain_lcot.py's argument validation, and trains nothing (how the "gpu" scale is checked on a CPU).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import math
import os
import shlex
import subprocess
import sys
import threading

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from megatron_lcot.arguments import parse_args  # noqa: E402
from megatron_lcot.data.default_corpus import default_corpus_files, prepare_default_corpus  # noqa: E402
from megatron_lcot.runs import adaptive_recipe, read_metrics, train_and_report  # noqa: E402

SCALES = {
    # Runs on a 2-core CPU in minutes per model (docs/results.md states the measured time).
    "cpu": dict(
        model="--num-layers 2 --hidden-size 256 --ffn-hidden-size 688 --num-attention-heads 4 "
        "--num-query-groups 2 --seq-length 128 --max-position-embeddings 128",
        layers=2,
        vocab=8192,
        iters=150,
        training="--micro-batch-size 8 --global-batch-size 8 --lr 2e-3 --min-lr 2e-4 "
        "--weight-decay 0.1 --clip-grad 1.0 --adam-beta1 0.9 --adam-beta2 0.95",
    ),
    # ~125M parameters (GPT-2 small shape, 32k vocab) on the whole default corpus; for a GPU.
    "gpu": dict(
        model="--num-layers 12 --hidden-size 768 --ffn-hidden-size 2048 --num-attention-heads 12 "
        "--seq-length 1024 --max-position-embeddings 1024 --bf16",
        layers=12,
        vocab=32768,
        iters=4000,
        training="--micro-batch-size 16 --global-batch-size 32 --lr 6e-4 --min-lr 6e-5 "
        "--weight-decay 0.1 --clip-grad 1.0 --adam-beta1 0.9 --adam-beta2 0.95",
    ),
}
MODES = {
    "vanilla": "--latent-steps 0",
    "ponderlm2_k1": "--latent-steps 1 --latent-layout interleaved",
    "stepwise_k2": "--latent-steps 2",
    "adaptive_k3": "--latent-steps 3 --halting adaptive {recipe}",  # runs.adaptive_recipe
    "vanilla_eq_flops": "--latent-steps 0",
    "vanilla_2x": "--latent-steps 0",
}


def _evaluate(checkpoint: str, flag: str, path: str, *extra: str) -> dict:
    """The last JSON line of tools/evaluate.py (a subprocess: this driver never initialises
    torch.distributed, so its children's rendezvous ports stay free)."""
    out = subprocess.run(
        [
            sys.executable,
            os.path.join(REPO, "tools", "evaluate.py"),
            "--load",
            checkpoint,
            flag,
            path,
            *extra,
        ],
        capture_output=True,
        text=True,
    )
    if out.returncode != 0:
        sys.exit(f"evaluate.py {flag} {path} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _evaluate_tasks(checkpoint: str, task_files: list) -> dict:
    scores = {}
    for path in task_files:
        result = _evaluate(checkpoint, "--task", path)
        scores[os.path.basename(path)[: -len(".jsonl")]] = result.get(
            "accuracy", result.get("cloze_accuracy")
        )
    return scores


def run_flags(name: str, seed: int, scale: dict, common: list, iters: int) -> list:
    """pretrain_lcot.py's flags for one run (less --save/--metrics-file, which train_and_report
    adds): the scale's `common` flags, the model's mode, and the schedule of `iters` iterations:
    LR warm-up iters // 15, validation every iters // 5, the adaptive recipe's halting warm-up
    16% of iters (runs.adaptive_recipe), so every schedule scales with the run's length."""
    flags = [
        *common,
        "--seed",
        str(seed),
        "--train-iters",
        str(iters),
        "--lr-warmup-iters",
        str(max(1, iters // 15)),
        "--eval-interval",
        str(max(1, iters // 5)),
        *MODES[name].format(recipe=adaptive_recipe(iters)).split(),
    ]
    if name == "vanilla_2x":
        flags += ["--num-layers", str(2 * scale["layers"])]  # argparse: the last value wins
    return flags


def run_dir_name(name: str, seed: int, iters: int, scale_iters: int) -> str:
    """A run's directory under --out-dir: `<model>_s<seed>` at the scale's iterations, with
    `_i<iters>` otherwise, so that runs of one model and seed at different budgets (which may run
    at the same time with --jobs) never share a metrics file or checkpoint."""
    return f"{name}_s{seed}" + ("" if iters == scale_iters else f"_i{iters}")


def run_model(
    name: str,
    seed: int,
    scale: dict,
    common: list,
    iters: int,
    out_dir: str,
    tasks: list,
    held_out: str,
    log_file: bool,
) -> dict:
    flags = run_flags(name, seed, scale, common, iters)
    run_name = run_dir_name(name, seed, iters, scale["iters"])
    record = train_and_report(run_name, "", flags, out_dir, log_file)
    checkpoint = os.path.join(out_dir, run_name, "checkpoints")
    metrics = read_metrics(os.path.join(out_dir, run_name, "metrics.jsonl"))
    train_records = {r["iteration"]: r for r in metrics if r["split"] == "train"}
    curve = [
        (train_records[r["iteration"]]["train_flops"], r["lm_loss"])
        for r in metrics
        if r["split"] == "valid" and r["iteration"] in train_records
    ]
    seq_length = int(common[common.index("--seq-length") + 1])  # windows overlapping by half: context for all
    inference = _evaluate(checkpoint, "--input", held_out, "--stride", str(seq_length // 2))
    return {
        "model": name,
        "seed": seed,
        "iters": iters,
        "ppl": record["ppl"],
        "lm_loss": record["lm_loss"],
        "mean_latent_steps": inference["mean_latent_steps"],
        "halted_share": inference["halted_share"],
        "train_flops": record["train_flops"],
        "inference_flops_per_token": inference["flops_per_token"],
        "wall_s": record["wall_s"],
        "tasks": _evaluate_tasks(checkpoint, tasks),
        "curve": curve,
        "checkpoint": checkpoint,
    }


ISO_FLOPS_MODELS = ("vanilla", "ponderlm2_k1", "adaptive_k3")


def budget_iters(budget: float, iters: int, vanilla_flops: float, model_flops: float) -> int:
    """Iterations giving a model `budget` x the vanilla run's training FLOPs, from the FLOPs of
    both at `iters` iterations (the model's pilot run); within 5% of `iters`, the pilot itself."""
    target = max(1, round(budget * iters * vanilla_flops / model_flops))
    return iters if abs(target - iters) <= 0.05 * iters else target


def iso_flops_points(runs: list, budgets: list, iters: int) -> list:
    """(model, seed, budget, run) for every budget point whose run is recorded in `runs`."""
    pilots = {(r["model"], r["seed"]): r for r in runs if r["iters"] == iters}
    by_key = {(r["model"], r["seed"], r["iters"]): r for r in runs}
    points = []
    for (name, seed), pilot in sorted(pilots.items(), key=lambda item: (item[0][1], item[0][0])):
        vanilla = pilots.get(("vanilla", seed))
        for budget in budgets if vanilla else ():
            key = (name, seed, budget_iters(budget, iters, vanilla["train_flops"], pilot["train_flops"]))
            if key in by_key:
                points.append((name, seed, budget, by_key[key]))
    return points


def run_all(
    models: list,
    seeds: int,
    scale: dict,
    common: list,
    out_dir: str,
    tasks: list,
    held_out: str,
    jobs: int,
    budgets: list | None = None,
) -> list:
    """Every (model, seed) run, `jobs` at a time; `results.json` is rewritten after each run, and
    a run already recorded there (same model, seed and iterations) is not repeated, so an
    interrupted comparison continues where it stopped. vanilla_eq_flops waits for its seed's
    adaptive_k3 and vanilla runs (it matches their FLOPs); it is queued after every other run,
    so the runs it waits for are already being worked on and a waiting worker cannot deadlock.
    With `budgets` (--iso-flops) every model's budget runs wait, the same way, for its own and
    vanilla's run at the scale's iterations (`budget_iters`)."""
    results_path = os.path.join(out_dir, "results.json")
    done = []
    if os.path.exists(results_path):
        with open(results_path) as f:
            done = json.load(f)
    lock = threading.Lock()
    runs = []

    claimed = {}  # (model, seed, iters) -> Future of its record: a run asked for twice runs once

    def one(name: str, seed: int, iters: int) -> dict:
        key = (name, seed, iters)
        with lock:
            first = key not in claimed
            if first:
                claimed[key] = concurrent.futures.Future()
        if not first:
            return claimed[key].result()
        record = next((r for r in done if (r["model"], r["seed"], r["iters"]) == key), None)
        try:
            record = record or run_model(
                name, seed, scale, common, iters, out_dir, tasks, held_out, log_file=jobs > 1
            )
        except BaseException as error:  # sys.exit included: whoever waits for this run fails too
            claimed[key].set_exception(error)
            raise
        with lock:
            runs.append(record)
            with open(results_path, "w") as f:
                json.dump(in_table_order(runs), f, indent=1)
        claimed[key].set_result(record)
        return record

    def budget_run(name: str, seed: int, budget: float, pilot, vanilla) -> dict:
        iters = budget_iters(
            budget, scale["iters"], vanilla.result()["train_flops"], pilot.result()["train_flops"]
        )
        return one(name, seed, iters)

    def equal_flops(seed: int, adaptive, vanilla) -> dict:
        iters = round(scale["iters"] * adaptive.result()["train_flops"] / vanilla.result()["train_flops"])
        return one("vanilla_eq_flops", seed, iters)

    if budgets and "vanilla" not in models:
        sys.exit("--iso-flops needs vanilla in --models (the budgets are multiples of its FLOPs)")
    if "vanilla_eq_flops" in models and not {"adaptive_k3", "vanilla"} <= set(models):
        sys.exit("vanilla_eq_flops needs adaptive_k3 and vanilla in --models (it matches their FLOPs)")
    with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = {
            (name, seed): pool.submit(one, name, seed, scale["iters"])
            for seed in range(1, seeds + 1)
            for name in models
            if name != "vanilla_eq_flops"
        }
        if "vanilla_eq_flops" in models:
            futures.update(
                {
                    ("vanilla_eq_flops", seed): pool.submit(
                        equal_flops, seed, futures["adaptive_k3", seed], futures["vanilla", seed]
                    )
                    for seed in range(1, seeds + 1)
                }
            )
        budget_futures = [
            pool.submit(budget_run, name, seed, budget, futures[name, seed], futures["vanilla", seed])
            for seed in range(1, seeds + 1)
            for name in models
            for budget in budgets or ()
            if name != "vanilla_eq_flops"
        ]
        for future in [*futures.values(), *budget_futures]:
            future.result()  # re-raises a failed run's error
    return in_table_order(runs)


def in_table_order(runs: list) -> list:
    return sorted(runs, key=lambda r: (r["seed"], list(MODES).index(r["model"]), r["iters"]))


def mean_std(values: list) -> str:
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return f"{mean:.4g} +- {std:.2g}"


def summary_table(runs: list) -> str:
    names = [n for n in MODES if any(r["model"] == n for r in runs)]
    task_names = sorted({t for r in runs for t in r["tasks"]})
    header = [
        "model",
        "seeds",
        "iters",
        "held-out ppl",
        "mean latent steps",
        "train FLOPs",
        "inference FLOPs/token",
        *[f"{t} acc" for t in task_names],
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name in names:
        group = [r for r in runs if r["model"] == name]
        cells = [
            name,
            str(len(group)),
            str(group[0]["iters"]),
            mean_std([r["ppl"] for r in group]),
            mean_std([r["mean_latent_steps"] for r in group]),
            mean_std([r["train_flops"] for r in group]),
            mean_std([r["inference_flops_per_token"] for r in group]),
            *[mean_std([r["tasks"][t] for r in group]) for t in task_names],
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def iso_flops_table(points: list, budgets: list) -> str:
    """Mean +- std over seeds per model and budget; FLOPs as executed, x the 1x vanilla run's."""
    vanilla_flops = [p[3]["train_flops"] for p in points if p[0] == "vanilla" and p[2] == 1]
    unit = sum(vanilla_flops) / len(vanilla_flops) if vanilla_flops else 1.0
    header = "| model | budget | seeds | iterations | held-out ppl | train FLOPs (x vanilla 1x) "
    header += "| inference FLOPs/token | latent steps |"
    lines = [header, "|" + "---|" * 8]
    for name in [n for n in MODES if any(p[0] == n for p in points)]:
        for budget in budgets:
            group = [p[3] for p in points if p[0] == name and p[2] == budget]
            if not group:
                continue
            flops = [r["train_flops"] for r in group]
            cells = [
                name,
                f"{budget:g}x",
                str(len(group)),
                ", ".join(str(r["iters"]) for r in group),
                mean_std([r["ppl"] for r in group]),
                f"{mean_std(flops)} ({sum(flops) / len(flops) / unit:.2f}x)",
                mean_std([r["inference_flops_per_token"] for r in group]),
                mean_std([r["mean_latent_steps"] for r in group]),
            ]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_iso_flops(points: list, budgets: list, path_prefix: str) -> None:
    """Held-out ppl against training FLOPs and against inference FLOPs per token: a dot per run,
    the mean over seeds per budget joined by a line per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in MODES if any(p[0] == n for p in points)]
    for axis, field in (("train", "train_flops"), ("inference", "inference_flops_per_token")):
        fig, ax = plt.subplots(figsize=(6.5, 4))
        for index, name in enumerate(names):
            runs = [p[3] for p in points if p[0] == name]
            ax.scatter([r[field] for r in runs], [r["ppl"] for r in runs], color=f"C{index}", s=10, alpha=0.5)
            means = []
            for budget in budgets:
                group = [p[3] for p in points if p[0] == name and p[2] == budget]
                if group:
                    means.append(
                        (sum(r[field] for r in group) / len(group), sum(r["ppl"] for r in group) / len(group))
                    )
            ax.plot(*zip(*means), color=f"C{index}", marker="o", label=name)
        ax.set(
            xscale="log",
            xlabel=f"{axis} FLOPs" + (" per token" if axis == "inference" else ""),
            ylabel="held-out perplexity",
            title=f"Held-out perplexity vs {axis} FLOPs at budgets {', '.join(f'{b:g}x' for b in budgets)}",
        )
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(f"{path_prefix}_ppl_vs_{axis}_flops.png", dpi=120)
        plt.close(fig)


def plot_curves(runs: list, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for index, name in enumerate(n for n in MODES if any(r["model"] == n for r in runs)):
        for j, run in enumerate(r for r in runs if r["model"] == name):
            xs, ys = zip(*run["curve"]) if run["curve"] else ((), ())
            ax.plot(xs, ys, color=f"C{index}", alpha=0.8, marker=".", label=name if j == 0 else None)
    ax.set(
        xscale="log",
        xlabel="training FLOPs",
        ylabel="validation LM loss",
        title="Validation loss vs training FLOPs",
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def common_flags(scale: dict, corpus) -> list:
    """The flags every run of a scale shares: model shape, optimiser, data split and corpus
    (`corpus` None: mock data of the scale's vocabulary, for checking flags without the corpus)."""
    data = (
        ["--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", str(scale["vocab"])]
        if corpus is None
        else corpus.flags()
    )
    return [
        *scale["model"].split(),
        *scale["training"].split(),
        "--split",
        "98,2,0",
        "--eval-iters",
        "16",
        "--log-interval",
        "10",
        *data,
    ]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--scale", choices=sorted(SCALES), default="cpu")
    parser.add_argument("--train-iters", type=int, default=None, help="default: the scale's")
    parser.add_argument("--models", default=None, help="subset of: " + ",".join(MODES))
    parser.add_argument(
        "--iso-flops",
        action="store_true",
        help="train each model at --budgets x vanilla's training FLOPs (default models: "
        + ",".join(ISO_FLOPS_MODELS)
        + ")",
    )
    parser.add_argument(
        "--budgets", default="1,2,4", help="--iso-flops budgets, multiples of vanilla's FLOPs"
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="print each model's run command at the scale's iterations, checked by pretrain_lcot.py's "
        "argument validation, and train nothing (the corpus is not built either)",
    )
    parser.add_argument("--bigbench", default=None, help="bigbench-1.0.0.tar.gz for BIG-bench task files")
    parser.add_argument(
        "--task-items",
        type=int,
        default=200,
        help="at most this many items per BIG-bench task (scoring is one window per choice)",
    )
    parser.add_argument("--out-dir", default=os.path.join(REPO, "runs", "compare_small"))
    parser.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="runs at a time, each with (cores / jobs) threads; their output goes to <run>/train.log",
    )
    args = parser.parse_args()
    scale = dict(SCALES[args.scale])
    if args.train_iters:
        scale["iters"] = args.train_iters
    default_models = ISO_FLOPS_MODELS if args.iso_flops else MODES
    models = [m for m in (args.models or ",".join(default_models)).split(",") if m]
    unknown = [m for m in models if m not in MODES]
    if unknown or args.seeds < 1 or args.jobs < 1:
        parser.error(
            f"--models: unknown {unknown}; choose from {','.join(MODES)}"
            if unknown
            else "--seeds and --jobs must be >= 1"
        )
    budgets = None
    if args.iso_flops:
        try:
            budgets = [float(b) for b in args.budgets.split(",")]
        except ValueError:
            budgets = []
        if not budgets or min(budgets) <= 0 or "vanilla_eq_flops" in models:
            parser.error(
                f"--budgets {args.budgets!r}: give positive multiples of vanilla's FLOPs, e.g. 1,2,4 "
                "(and no vanilla_eq_flops in --models: every budget is an equal-FLOPs comparison)"
            )
    if args.jobs > 1:
        os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // args.jobs))

    corpus_dir = os.path.join(REPO, "data", "default_corpus")
    if args.dry_run:
        corpus = default_corpus_files(corpus_dir, vocab_size=scale["vocab"])
        for name in models:
            for seed in range(1, args.seeds + 1):
                # checked on mock data of the same vocabulary: the scale's corpus may not be built yet
                parse_args(run_flags(name, seed, scale, common_flags(scale, None), scale["iters"]))
                flags = run_flags(name, seed, scale, common_flags(scale, corpus), scale["iters"])
                print(shlex.join(["pretrain_lcot.py", *flags]))
        return
    corpus = prepare_default_corpus(corpus_dir, vocab_size=scale["vocab"])
    task_dir = os.path.join(args.out_dir, "tasks")
    build = (
        []
        if args.iso_flops
        else [
            sys.executable,
            os.path.join(REPO, "tools", "build_eval_tasks.py"),
            "--output-dir",
            task_dir,
            "--max-items",
            str(args.task_items),
            *(["--bigbench", args.bigbench] if args.bigbench else []),
        ]
    )
    if build and subprocess.run(build).returncode != 0:
        sys.exit("build_eval_tasks.py failed (its error is printed above)")
    tasks = (
        sorted(os.path.join(task_dir, f) for f in os.listdir(task_dir) if f.endswith(".jsonl"))
        if build
        else []
    )
    from megatron_lcot.data.default_corpus import default_documents

    os.makedirs(args.out_dir, exist_ok=True)
    held_out = os.path.join(args.out_dir, "heldout.txt")
    with open(held_out, "w", encoding="utf-8") as f:  # the last 15 documents: inside the 2% validation share
        f.write("\n\n".join(default_documents()[-15:]))
    common = common_flags(scale, corpus)

    runs = run_all(models, args.seeds, scale, common, args.out_dir, tasks, held_out, args.jobs, budgets)
    if budgets:
        points = iso_flops_points(runs, budgets, scale["iters"])
        table = iso_flops_table(points, budgets)
        with open(os.path.join(args.out_dir, "iso_flops.md"), "w") as f:
            f.write(f"scale {args.scale}, {args.seeds} seeds, mean +- std over seeds\n\n{table}\n")
        plot_iso_flops(points, budgets, os.path.join(args.out_dir, "iso_flops"))
        print(f"\n{table}\n\nresults in {args.out_dir}")
        return

    table = summary_table(runs)
    with open(os.path.join(args.out_dir, "summary.md"), "w") as f:
        f.write(f"scale {args.scale}, {args.seeds} seeds, mean +- std (sample std over seeds)\n\n{table}\n")
    plot_curves(runs, os.path.join(args.out_dir, "val_loss_vs_train_flops.png"))
    first = {r["model"]: r for r in runs if r["seed"] == 1}
    if "adaptive_k3" in first:
        subprocess.run(
            [
                sys.executable,
                os.path.join(REPO, "tools", "analyze_halting.py"),
                "--load",
                first["adaptive_k3"]["checkpoint"],
                "--input",
                held_out,
                "--output",
                os.path.join(args.out_dir, "halting"),
                "--max-tokens",
                "20000",
                *(["--reference", first["vanilla"]["checkpoint"]] if "vanilla" in first else []),
            ],
            check=True,
        )
    print(f"\n{table}\n\nresults in {args.out_dir}")


if __name__ == "__main__":
    main()
