#!/usr/bin/env bash
# The FSDP2-vs-DDP check on the 2-GPU machine (benchmarks/bench_fsdp.py); results into $OUT (and benchmarks/results).
set -o pipefail
OUT=${OUT:-/tmp/bench_fsdp_out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
for mode in ddp fsdp2; do
  accelerate launch --config_file "benchmarks/accelerate_$mode.yaml" benchmarks/bench_fsdp.py --out "$OUT/$mode.json" \
    2>&1 | tail -40 | tee "$OUT/$mode.log" || exit 1
done
python benchmarks/bench_fsdp.py --compare "$OUT/ddp.json" "$OUT/fsdp2.json" --results "$OUT/fsdp2_vs_ddp"
