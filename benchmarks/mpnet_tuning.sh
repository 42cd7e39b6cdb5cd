#!/usr/bin/env bash
# One device call of the all-mpnet-base-v2 tuning grid (GLUE_MPNET_TUNING.md): resumable, ends by itself.
#   bash benchmarks/mpnet_tuning.sh [DEADLINE_S] [GPUS] [PARALLEL]     (defaults 520, 0,1, 12)
# Needs /tmp/models/all-mpnet-base-v2 (staged from .mp/), .gpu/code (the frozen run_glue_iw.py + iwtrainer),
# .gpu/tune_glue (benchmarks/tuning_split.py) and datasets/evaluate on PYTHONPATH. Results accumulate in
# /tmp/work/tuning.jsonl (seeded from benchmarks/results/glue_mpnet_tuning.jsonl on a fresh machine) and are copied
# to $OUT with the log and an nvidia-smi trace.
. "$(dirname "$0")/mpnet_env.sh"
if [ ! -s /tmp/work/tuning.jsonl ] && [ -s benchmarks/results/glue_mpnet_tuning.jsonl ]; then
  cp benchmarks/results/glue_mpnet_tuning.jsonl /tmp/work/tuning.jsonl
fi
python3 benchmarks/glue_table.py --tune --model "$MODEL" --glue_dir .gpu/tune_glue --code_dir .gpu/code \
  --tasks rte,mrpc,stsb,cola --gpus "${2:-0,1}" --parallel "${3:-12}" --deadline_s "${1:-520}" \
  --results /tmp/work/tuning.jsonl --runs_dir /tmp/work/runs 2>&1 | tee "$OUT/log"
rc=$?
kill "$SMI" 2>/dev/null
[ -f /tmp/work/tuning.jsonl ] && cp /tmp/work/tuning.jsonl "$OUT/glue_mpnet_tuning.jsonl"
exit $rc
