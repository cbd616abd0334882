#!/bin/bash
# Rerun every committed result that depends on the full-preset model, in sequence, after the
# model was retrained (`sti finetune --preset full`). About an hour on 2 cores; run it with
# nothing else on the machine. Results land in benchmarks/results/, docs/RESULTS.md and
# docs/timeline.png; the README's headline table is then copied from docs/RESULTS.md.
set -euo pipefail
cd "$(dirname "$0")/.."
HOME_DIR=${STI_HOME:-$HOME/.cache/sti}
M=$HOME_DIR/models/minilm-l6-rt-elastic-full
S=$HOME_DIR/stores/minilm-l6-rt-elastic-full-linear
B=.venv/bin
R=benchmarks/results
SWEEP=(--storages cold,emulate:100MB/s --seq-modes own)  # every test request served at every point
stamp() { echo "=== $(date -u +%H:%M:%S) $*"; }

stamp build;      rm -rf "$S"; $B/sti build "$M" "$S"
stamp importance; $B/sti profile importance "$S"
for st in warm cold emulate:100MB/s; do stamp "device $st"; $B/sti profile device "$S" --storage "$st"; done
stamp store;      $B/python benchmarks/bench_store.py
stamp compute;    $B/python benchmarks/bench_engine_compute.py
stamp sweep;      $B/sti bench "$S" "$M" --out $R/pipeline "${SWEEP[@]}"
stamp report;     $B/sti report $R/pipeline --out docs/RESULTS.md
stamp timeline;   $B/sti run "$S" --latency-ms 37 --memory-mb 1.8 --storage emulate:100MB/s --timeline docs/timeline.png \
                    "a gripping, beautifully acted film" "tedious, overlong and utterly forgettable"
stamp done
