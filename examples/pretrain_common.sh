# Shared by the pretrain_* launch scripts (sourced, not run). Every setting is an environment
# variable with a default; extra pretrain_lcot.py flags are the scripts' arguments.
#   DATA_PATH, TOKENIZER_MODEL     preprocessed prefix (tools/preprocess_data.py) and its tokenizer
#   MODEL_ARGS, DATA_ARGS, TRAIN_ARGS, PARALLEL_ARGS   override whole flag groups
#   DS_CONFIG                      DeepSpeed config (default examples/ds_configs/zero2.json)
#   GPUS_PER_NODE (default 8), MASTER_PORT (default 29500)
#   DRY_RUN=1                      print the command instead of running it
# The environment: the repository's .venv (scripts/setup_venv.sh) when it exists, else the
# python, deepspeed and torchrun on PATH.
# Preemption: the launcher runs under megatron_lcot/launcher_supervisor.py and the ranks with
# --exit-signal-handler, so SIGTERM, SIGUSR1 or SIGINT sent to this script's process makes every
# rank finish its step, save and exit; relaunching the same command resumes (docs/training.md).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PRETRAIN="$ROOT/pretrain_lcot.py"
GPUS_PER_NODE="${GPUS_PER_NODE:-8}"
MASTER_PORT="${MASTER_PORT:-29500}"
DS_CONFIG="${DS_CONFIG:-$ROOT/examples/ds_configs/zero2.json}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"  # launchers leave it unset; one thread per rank
if [[ -x "$ROOT/.venv/bin/python" ]]; then
    export PATH="$ROOT/.venv/bin:$PATH"
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"  # for python -m megatron_lcot.launcher_supervisor
SUPERVISE=(python -m megatron_lcot.launcher_supervisor)

# NCCL failure handling (docs/training.md, "Faults"): a collective that fails or outlives
# --distributed-timeout-minutes is aborted by NCCL's watchdog and raised in the rank's Python
# thread (2 = clean up only, do not tear the process down), so the rank prints which rank
# failed first and exits 1, and the launcher stops the others. The heartbeat monitor kills a
# rank whose watchdog itself hangs (e.g. a stuck CUDA call) after the given seconds.
export TORCH_NCCL_ASYNC_ERROR_HANDLING="${TORCH_NCCL_ASYNC_ERROR_HANDLING:-2}"
export TORCH_NCCL_ENABLE_MONITORING="${TORCH_NCCL_ENABLE_MONITORING:-1}"
export TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC="${TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC:-600}"

# ~350M-parameter Llama with adaptive latent CoT (K = 2); see docs/scaling.md for sizing.
MODEL_ARGS="${MODEL_ARGS:---num-layers 24 --hidden-size 1024 --num-attention-heads 16 --num-query-groups 4 \
--ffn-hidden-size 2816 --seq-length 2048 --max-position-embeddings 2048 --bf16 \
--latent-steps 2 --latent-layout stepwise --halting adaptive}"
DATA_ARGS="${DATA_ARGS:---data-path ${DATA_PATH:-data/corpus_text_document} --split 969,30,1 \
--tokenizer-type SentencePieceTokenizer --tokenizer-model ${TOKENIZER_MODEL:-data/tokenizer.model}}"
TRAIN_ARGS="${TRAIN_ARGS:---micro-batch-size 4 --global-batch-size 512 --train-iters 20000 --lr 3e-4 \
--min-lr 3e-5 --lr-warmup-iters 500 --lr-decay-style cosine --clip-grad 1.0 --weight-decay 0.1 \
--save checkpoints/lcot --load checkpoints/lcot --save-interval 1000 --eval-interval 1000 --eval-iters 50 \
--log-interval 10 --metrics-file checkpoints/lcot/metrics.jsonl}"
PARALLEL_ARGS="${PARALLEL_ARGS:---tensor-model-parallel-size 1 --pipeline-model-parallel-size 1}"

# require_commands NAME...: fail naming the fix when a command is missing from the environment.
require_commands() {
    local name
    for name in "$@"; do
        if ! command -v "$name" >/dev/null; then
            echo "$(basename "$0"): error: '$name' not found: run scripts/setup_venv.sh" \
                 "(creates $ROOT/.venv, which these scripts use), or activate an environment" \
                 "that provides it" >&2
            exit 127
        fi
    done
}

# run LAUNCHER... : the launcher command under the supervisor, then pretrain_lcot.py with every
# flag group and --exit-signal-handler.
run() {
    # shellcheck disable=SC2086  # the *_ARGS groups are word lists on purpose
    local cmd=("${SUPERVISE[@]}" "$@" "$PRETRAIN" $MODEL_ARGS $DATA_ARGS $TRAIN_ARGS $PARALLEL_ARGS
               --exit-signal-handler)
    cmd+=("${EXTRA_ARGS[@]}")
    if [[ "${DRY_RUN:-0}" == 1 ]]; then
        printf '%q ' "${cmd[@]}"
        echo
    else
        require_commands python "$1"
        cd "$ROOT"
        exec "${cmd[@]}"
    fi
}
