"""Multi-node launches on one machine: two launch-script processes act as two nodes that meet
over 127.0.0.1, and their training equals one process on the same global batch (losses and
grad norms).

* torchrun (`examples/pretrain_torchrun.sh` with NNODES=2, NODE_RANK=0/1, 2 ranks per node):
  data x pipeline parallel, DP=2 x PP=2, megatron-core DDP, adaptive halting; each pipeline
  crosses the two nodes.
* DeepSpeed without ssh (`examples/pretrain_multi_node.sh` with NODE_RANK=0/1, i.e.
  `deepspeed --no_ssh --node_rank i`, a hostfile naming the two nodes `localhost` and
  `127.0.0.1`, one rank per node): DP=2 across the nodes, ZeRO-1.
"""

from __future__ import annotations

import os
import subprocess

import pytest

from megatron_lcot.parallel import free_port
from tests.conftest import TINY_MODEL_FLAGS, read_metrics, run_pretrain
from tests.e2e.test_launch_scripts import EXAMPLES, script_env

pytestmark = pytest.mark.slow

MODEL = [*TINY_MODEL_FLAGS, "--latent-steps", "2", "--latent-layout", "stepwise", "--halting", "adaptive"]
DATA = ["--mock-data", "--vocab-size", "200"]
TRAIN = [
    "--micro-batch-size",
    "2",
    "--global-batch-size",
    "8",
    "--train-iters",
    "6",
    "--log-interval",
    "1",
    "--eval-interval",
    "100",
    "--eval-iters",
    "1",
    "--clip-grad",
    "0",
    "--lr",
    "1e-2",
    "--use-cpu-initialization",
]


def _train(records_path) -> list:
    return [r for r in read_metrics(records_path) if r["split"] == "train"]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> list:
    tmp_path = tmp_path_factory.mktemp("one_process")
    result = run_pretrain(
        [*MODEL, *DATA, *TRAIN, "--metrics-file", str(tmp_path / "one.jsonl")], cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return _train(tmp_path / "one.jsonl")


def _two_nodes(script: str, tmp_path, settings: dict) -> str:
    """Starts the script twice (NODE_RANK 0 and 1) and waits for both; their joint output."""
    env = {
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
        "MODEL_ARGS": " ".join(MODEL),
        "DATA_ARGS": " ".join(DATA),
        "TRAIN_ARGS": " ".join([*TRAIN, "--metrics-file", str(tmp_path / "m.jsonl")]),
        "DS_CONFIG": os.path.join(EXAMPLES, "ds_configs", "zero1.json"),
        **settings,
    }
    nodes = [
        subprocess.Popen(
            ["bash", os.path.join(EXAMPLES, script)],
            env=script_env({**env, "NODE_RANK": str(rank)}),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in (0, 1)
    ]
    try:
        outputs = [node.communicate(timeout=900)[0] for node in nodes]
    finally:
        for node in nodes:
            node.kill()
    for node, output in zip(nodes, outputs):
        assert node.returncode == 0, output[-3000:]
    return "\n".join(outputs)


def _assert_matches(records: list, reference: list) -> None:
    assert len(records) == len(reference) == 6
    for got, want in zip(records, reference):
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-5)
        assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-4)
        assert got["mean_latent_steps"] == want["mean_latent_steps"]
    assert reference[-1]["loss"] < reference[0]["loss"]


def test_two_torchrun_nodes_train_data_x_pipeline_parallel_as_one_process(tmp_path, one_process):
    output = _two_nodes(
        "pretrain_torchrun.sh",
        tmp_path,
        {
            "NNODES": "2",
            "GPUS_PER_NODE": "2",
            "PARALLEL_ARGS": "--tensor-model-parallel-size 1 --pipeline-model-parallel-size 2",
        },
    )
    assert "dp 2 tp 1 pp 2" in output
    _assert_matches(_train(tmp_path / "m.jsonl"), one_process)


def test_two_deepspeed_nodes_without_ssh_train_data_parallel_as_one_process(tmp_path, one_process):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=1\n127.0.0.1 slots=1\n")
    output = _two_nodes("pretrain_multi_node.sh", tmp_path, {"HOSTFILE": str(hostfile), "GPUS_PER_NODE": "1"})
    assert "dp 2 tp 1 pp 1" in output and "nnodes=2, num_local_procs=1, node_rank=1" in output
    _assert_matches(_train(tmp_path / "m.jsonl"), one_process)
