#!/usr/bin/env bash
# Several nodes listed in a DeepSpeed hostfile ("node1 slots=8" per line), started from the
# first one (the launcher reaches the others over passwordless ssh with pdsh):
#   HOSTFILE=hostfile MASTER_ADDR=node1 DATA_PATH=... bash examples/pretrain_multi_node.sh [flags]
# Without ssh (a scheduler starts this script once per node): also set NODE_RANK (this node's
# line in the hostfile, from 0); each node's launcher then starts its own ranks only
# (deepspeed --no_ssh --node_rank).
# Settings: examples/pretrain_common.sh; NUM_NODES defaults to the hostfile's line count.
source "$(dirname "${BASH_SOURCE[0]}")/pretrain_common.sh"
HOSTFILE="${HOSTFILE:?set HOSTFILE to a DeepSpeed hostfile (one 'host slots=N' line per node)}"
HOSTFILE="$(realpath "$HOSTFILE")"  # run() works from the repository root
NUM_NODES="${NUM_NODES:-$(grep -cv '^\s*\(#\|$\)' "$HOSTFILE")}"
MASTER_ADDR="${MASTER_ADDR:-$(awk 'NF && $1 !~ /^#/ {print $1; exit}' "$HOSTFILE")}"
NO_SSH=()
if [[ -n "${NODE_RANK:-}" ]]; then
    NO_SSH=(--no_ssh --node_rank "$NODE_RANK")
fi
EXTRA_ARGS=(--deepspeed --deepspeed_config "$DS_CONFIG" "$@")
run deepspeed --hostfile "$HOSTFILE" --num_nodes "$NUM_NODES" --num_gpus "$GPUS_PER_NODE" \
    --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" "${NO_SSH[@]}"
