#!/bin/bash
# Rerun every committed result that depends on the full-preset model, in sequence, after the
# model was retrained (`sti finetune --preset full`). About 28 minutes on 2 cores; run it with
# nothing else on the machine. Results land in benchmarks/results/ and docs/timeline.png; the
# README's figures must then be updated from them.
set -euo pipefail
cd "$(dirname "$0")/.."
HOME_DIR=${STI_HOME:-$HOME/.cache/sti}
M=$HOME_DIR/models/minilm-l6-rt-elastic-full
S=$HOME_DIR/stores/minilm-l6-rt-elastic-full-linear
B=.venv/bin
R=benchmarks/results
SWEEP=(--storages cold,emulate:100MB/s --seq-modes own --requests 20 --ood-limit 100)
stamp() { echo "=== $(date -u +%H:%M:%S) $*"; }

stamp build;      rm -rf "$S"; $B/sti build "$M" "$S"
stamp importance; $B/sti profile importance "$S"
for st in warm cold emulate:100MB/s; do stamp "device $st"; $B/sti profile device "$S" --storage "$st"; done
stamp store;      $B/python benchmarks/bench_store.py
stamp sweep1;     $B/sti bench "$S" "$M" --out $R/pipeline "${SWEEP[@]}"
stamp sweep2;     $B/sti bench "$S" "$M" --out $R/pipeline-run2 "${SWEEP[@]}"
stamp pad128;     $B/sti bench "$S" "$M" --out $R/pipeline-pad128 --seq-modes pad128 --storages emulate:100MB/s \
                    --systems sti-joint,sti-paper,stdpl-4bit,load-exec,preload --requests 20 --ood-limit 100
stamp skew;       $B/sti bench "$S" "$M" --out $R/pipeline-skew --storages skew3.6 --seq-modes own --requests 20 --ood-limit 100
stamp timeline;   $B/sti run "$S" --latency-ms 37 --memory-mb 1.8 --storage emulate:100MB/s --timeline docs/timeline.png \
                    "a gripping, beautifully acted film" "tedious, overlong and utterly forgettable"
stamp done
