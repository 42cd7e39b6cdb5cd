#!/usr/bin/env bash
# The FSDP2-vs-DDP check on the 2-GPU machine (benchmarks/bench_fsdp.py); results into $OUT (and benchmarks/results).
#   PYTHONPATH=$PWD bash benchmarks/bench_fsdp.sh
set -o pipefail
OUT=${OUT:-/tmp/bench_fsdp_out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
for mode in ddp fsdp2; do
  if ! accelerate launch --config_file "benchmarks/accelerate_$mode.yaml" benchmarks/bench_fsdp.py \
      --out "$OUT/$mode.json" >"$OUT/$mode.log" 2>&1; then
    grep -v "\[W" "$OUT/$mode.log" | tail -30; exit 1  # the whole log stays in $OUT
  fi
done
python benchmarks/bench_fsdp.py --compare "$OUT/ddp.json" "$OUT/fsdp2.json" --results "$OUT/fsdp2_vs_ddp"
