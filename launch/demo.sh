#!/usr/bin/env bash
# Demo: train the small GPT on 4 CPU pipeline stages with the stock deepspeed launcher, lose a stage, rebuild it
# from its neighbours and keep training.
#
#   bash launch/demo.sh                                   # CheckFree: stage 2 loses its state at step 30 (injected)
#   CONFIG=configs/checkfree_plus_first.json bash launch/demo.sh   # CheckFree+: the FIRST stage is lost
#   CONFIG=configs/baseline.json bash launch/demo.sh      # no CheckFree, for comparison
#   KILL_STAGE=2 KILL_STEP=20 bash launch/demo.sh         # a real `kill -9` of stage 2's process at step 20
#   KILL_STAGE=0 KILL_STEP=20 CONFIG=configs/checkfree_plus_no_failure.json bash launch/demo.sh
#
# With KILL_STAGE set, every rank runs under the CheckFree supervisor (python -m deepspeed_checkfree.supervisor),
# which starts a replacement for the killed trainer; the survivors keep their state in memory, the replacement
# rebuilds its stage over the network, and the interrupted step is replayed. No checkpoint is read or written.
# Prints the loss per step; writes OUT/metrics.csv and OUT/events.jsonl (one JSON record per event).
set -euo pipefail
cd "$(dirname "$0")/.."

STAGES=${STAGES:-4}
STEPS=${STEPS:-60}
KILL_STAGE=${KILL_STAGE:-}
KILL_STEP=${KILL_STEP:-20}
if [ -n "$KILL_STAGE" ]; then DEFAULT_CONFIG=configs/checkfree_no_failure.json; else DEFAULT_CONFIG=configs/checkfree_middle.json; fi
CONFIG=${CONFIG:-$DEFAULT_CONFIG}
OUT=${OUT:-runs/demo}
MASTER_PORT=${MASTER_PORT:-29650}
PYTHON_BIN=${PYTHON_BIN:-$(command -v python)}
TIMEOUT_S=${TIMEOUT_S:-900}

# CPU: one thread per rank (2 cores are shared by all ranks; without this a step is ~30x slower).
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}
# Every rank, and any machine that joins later, must present the job's token.
export CHECKFREE_JOB_TOKEN=${CHECKFREE_JOB_TOKEN:-$("$PYTHON_BIN" -c 'import secrets; print(secrets.token_hex(16))')}

mkdir -p "$OUT"
rm -f "$OUT/events.jsonl" "$OUT/metrics.csv"
DEEPSPEED="$(dirname "$PYTHON_BIN")/deepspeed"
# On CPU DeepSpeed counts one device, so --num_gpus is what starts STAGES ranks.
LAUNCH=("$DEEPSPEED" --num_gpus "$STAGES" --master_port "$MASTER_PORT")
TRAIN=(launch/train.py --deepspeed_config "$CONFIG" --steps "$STEPS" --stages "$STAGES" --out "$OUT")

if [ -z "$KILL_STAGE" ]; then
    timeout "$TIMEOUT_S" "${LAUNCH[@]}" "${TRAIN[@]}"
else
    timeout "$TIMEOUT_S" "${LAUNCH[@]}" --module deepspeed_checkfree.supervisor --pid-dir "$OUT/pids" "${TRAIN[@]}" &
    JOB=$!
    # Wait until rank 0 has logged KILL_STEP steps, then kill the trainer of KILL_STAGE (rank = stage here). The
    # supervisor writes that pid to --pid-dir as rank<R>.pid (pid_file in deepspeed_checkfree/resilience/contract.py).
    until [ -f "$OUT/metrics.csv" ] && [ "$(tail -n +2 "$OUT/metrics.csv" | wc -l)" -ge "$KILL_STEP" ]; do
        kill -0 "$JOB" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$JOB" 2>/dev/null; then
        echo ">>> kill -9 of stage $KILL_STAGE's trainer (pid $(cat "$OUT/pids/rank$KILL_STAGE.pid")) after step $((KILL_STEP - 1))"
        kill -9 "$(cat "$OUT/pids/rank$KILL_STAGE.pid")"
    fi
    wait "$JOB"
fi

if [ -s "$OUT/events.jsonl" ]; then
    echo "--- events ($OUT/events.jsonl) ---"
    cat "$OUT/events.jsonl"
fi
