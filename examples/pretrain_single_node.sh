#!/usr/bin/env bash
# One node, DeepSpeed ZeRO through the deepspeed launcher:
#   GPUS_PER_NODE=8 DATA_PATH=... TOKENIZER_MODEL=... bash examples/pretrain_single_node.sh [flags]
# Settings: examples/pretrain_common.sh. On a CPU-only machine the launcher needs --num_gpus too.
source "$(dirname "${BASH_SOURCE[0]}")/pretrain_common.sh"
EXTRA_ARGS=(--deepspeed --deepspeed_config "$DS_CONFIG" "$@")
run deepspeed --num_gpus "$GPUS_PER_NODE" --master_port "$MASTER_PORT"
