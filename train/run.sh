#!/usr/bin/env bash
# Start a training run: one process per GPU through torchrun, or CPU processes (gloo, dali-cpu) without GPU.
#
#   train/run.sh RECIPE [--data DATA] [--out RUN] [--nproc N] [section.key=value ...]
#
# RECIPE: a name in train/configs/ (resnet50, demo, ...) or a path to a YAML. RUN defaults to runs/RECIPE;
# running the same command again with an existing RUN/last.pt resumes where it stopped.
# --nproc: processes on this node (default: the number of visible GPUs, 1 without GPU).
# Several nodes (run the same command on each), either static rendezvous:
#   NNODES=2 NODE_RANK=0|1 MASTER_ADDR=host0 MASTER_PORT=29500 train/run.sh resnet50 ...
# or c10d rendezvous (elastic, node ranks assigned at start):
#   NNODES=2 RDZV_ENDPOINT=host0:29500 RDZV_ID=job42 train/run.sh resnet50 ...
# PYTHON selects the interpreter (default: python).
set -euo pipefail

usage() {
    sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'
    exit "${1:-2}"
}

[ $# -ge 1 ] || usage
case "$1" in -h|--help) usage 0 ;; esac
recipe=$1
shift
args=()       # --data/--out, then the overrides (train.train reads options before its positionals)
overrides=()
nproc=""
while [ $# -gt 0 ]; do
    case "$1" in
        --data|--out)
            [ $# -ge 2 ] || { echo "run.sh: $1 needs a value" >&2; exit 2; }
            args+=("$1" "$2"); shift 2 ;;
        --data=*|--out=*) args+=("$1"); shift ;;
        --nproc) [ $# -ge 2 ] || { echo "run.sh: --nproc needs a value" >&2; exit 2; }
            nproc=$2; shift 2 ;;
        --nproc=*) nproc=${1#*=}; shift ;;
        -h|--help) usage 0 ;;
        -*) echo "run.sh: unknown option $1 (overrides are written section.key=value)" >&2; exit 2 ;;
        *) overrides+=("$1"); shift ;;
    esac
done
args+=(${overrides[@]+"${overrides[@]}"})

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
py=${PYTHON:-python}

# Visible GPUs, without paying for a torch import: CUDA_VISIBLE_DEVICES if set, else nvidia-smi, else the
# driver's /proc entries.
if [ -n "${CUDA_VISIBLE_DEVICES+set}" ]; then
    gpus=$(printf '%s' "$CUDA_VISIBLE_DEVICES" | tr ',' '\n' | grep -c '[^[:space:]]' || true)
elif command -v nvidia-smi >/dev/null 2>&1; then
    gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
elif [ -d /proc/driver/nvidia/gpus ]; then
    gpus=$(find /proc/driver/nvidia/gpus -mindepth 1 -maxdepth 1 | wc -l)
else
    gpus=0
fi
if [ -z "$nproc" ]; then
    nproc=$(( gpus > 0 ? gpus : 1 ))
fi
case "$nproc" in ''|*[!0-9]*|0) echo "run.sh: --nproc must be a positive integer, not '$nproc'" >&2; exit 2 ;; esac
if [ "$gpus" -gt 0 ] && [ "$nproc" -gt "$gpus" ]; then
    echo "run.sh: --nproc $nproc but only $gpus GPU(s) are visible" >&2
    exit 2
fi
if [ "$gpus" -eq 0 ] && [ -z "${OMP_NUM_THREADS:-}" ]; then
    # CPU processes share the cores; torchrun would give each one thread only
    cores=$(nproc)
    export OMP_NUM_THREADS=$(( cores / nproc > 0 ? cores / nproc : 1 ))
fi

nnodes=${NNODES:-1}
if [ "$nnodes" -gt 1 ]; then
    if [ -n "${RDZV_ENDPOINT:-}" ]; then
        rdzv=(--nnodes="$nnodes" --rdzv_backend=c10d --rdzv_endpoint="$RDZV_ENDPOINT" --rdzv_id="${RDZV_ID:-cdiscount}")
    else
        : "${NODE_RANK:?set NODE_RANK (0..NNODES-1) on each node, or RDZV_ENDPOINT for c10d rendezvous}"
        : "${MASTER_ADDR:?set MASTER_ADDR to the host of node 0}"
        rdzv=(--nnodes="$nnodes" --node_rank="$NODE_RANK" --master_addr="$MASTER_ADDR"
              --master_port="${MASTER_PORT:-29500}")
    fi
else
    rdzv=(--standalone)
fi
# RUN/.lock is taken by the node that hosts rank 0 (static rendezvous: node 0); with c10d rendezvous node
# ranks are only known once torchrun has started, and the trainer's rank 0 takes it.
lock=()
if [ "$nnodes" -gt 1 ] && { [ -n "${RDZV_ENDPOINT:-}" ] || [ "${NODE_RANK:-0}" != 0 ]; }; then
    lock=(--no-lock)
fi

# torchrun exits 1 whatever status a worker had, and reports it as a failure with a traceback. The trainer
# leaves its own status (see train/train.py) in this file for run.sh to return; after an early stop (3) or a
# stop on a signal (5), designed ends, the workers exit 0 so that torchrun stays quiet.
status_file=$(mktemp)
trap 'rm -f "$status_file"' EXIT
export TRAIN_STATUS_FILE=$status_file

# train.launch checks the recipe, the overrides and the data directory, takes RUN/.lock and becomes torchrun,
# in one process before any worker starts: a mistake or a RUN in use prints one line and exits 2 (inside
# torchrun it would come with a failure report per worker), and nothing is written. It runs in the
# background so that this shell can pass SIGTERM and SIGUSR1 on (as a container's PID 1 too, which has no
# default action for them); it keeps Ctrl-C's SIGINT (a background job would ignore it).
( trap - INT; exec "$py" -m train.launch "$recipe" ${args[@]+"${args[@]}"} ${lock[@]+"${lock[@]}"} -- \
    "${rdzv[@]}" --nproc_per_node="$nproc" -m train.train --config "$recipe" "${args[@]}" ) &
launcher=$!

# SIGTERM / SIGUSR1 (docker stop, a scheduler's preemption or time limit) go to the workers themselves:
# each notes it, the ranks agree on a step to stop after, rank 0 writes RUN/last.pt and they exit (status
# 5). torchrun is left alone: it would pass the signal on too, and a second one arriving while it waits for
# its workers ends it and them (a scheduler that signals every process of the job sends it one).
stop() {
    local workers=() f stat
    for f in /proc/[0-9]*/stat; do  # torchrun's children (no ps in slim images)
        { read -r stat < "$f"; } 2>/dev/null || continue  # a process that ended meanwhile
        stat=${stat##*) }
        set -- $stat
        [ "$2" = "$launcher" ] && workers+=("${f//[!0-9]/}")
    done
    if [ ${#workers[@]} -gt 0 ]; then
        kill -s "$sig" "${workers[@]}" 2>/dev/null || true
    else  # no worker yet (still checking or in rendezvous): nothing to save
        kill -s TERM "$launcher" 2>/dev/null || true
    fi
}
trap 'sig=TERM stop' TERM
trap 'sig=USR1 stop' USR1
trap ':' INT  # torchrun (same process group) gets Ctrl-C itself; keep waiting for its status
rc=0
while :; do
    rc=0
    wait "$launcher" || rc=$?
    kill -0 "$launcher" 2>/dev/null || break  # wait returns early when a trap ran
done
status=$(cat "$status_file")
exit "${status:-$rc}"
