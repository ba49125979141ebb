#!/usr/bin/env bash
# torchrun without DeepSpeed: megatron-core DDP (add --use-distributed-optimizer to shard the
# optimizer state as ZeRO-1 does). One node by default; for several, run it on each node with
# NNODES, NODE_RANK and MASTER_ADDR set (static rendezvous), or use pretrain_slurm.sbatch.
#   GPUS_PER_NODE=8 DATA_PATH=... bash examples/pretrain_torchrun.sh --use-distributed-optimizer
source "$(dirname "${BASH_SOURCE[0]}")/pretrain_common.sh"
EXTRA_ARGS=("$@")
run torchrun --nnodes "${NNODES:-1}" --node-rank "${NODE_RANK:-0}" --nproc-per-node "$GPUS_PER_NODE" \
    --master-addr "${MASTER_ADDR:-127.0.0.1}" --master-port "$MASTER_PORT"
