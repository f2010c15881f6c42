#!/usr/bin/env bash
# Demo: train the small GPT on 4 CPU pipeline stages with the stock deepspeed launcher, lose a stage, rebuild it
# from its neighbours and keep training. The same as `checkfree demo` (python -m deepspeed_checkfree.demo), with
# the configs of this clone.
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

ARGS=(--config "$CONFIG" --stages "$STAGES" --steps "$STEPS" --out "$OUT" --master-port "$MASTER_PORT"
      --timeout "$TIMEOUT_S")
if [ -n "$KILL_STAGE" ]; then ARGS+=(--kill-stage "$KILL_STAGE" --kill-step "$KILL_STEP"); fi
# (the demo ends everything it started after TIMEOUT_S; timeout(1) is the backstop for the demo itself)
timeout "$((${TIMEOUT_S%.*} + 60))" \
    "$PYTHON_BIN" -m deepspeed_checkfree.demo "${ARGS[@]}"
