#!/usr/bin/env bash
# One device call of the all-mpnet-base-v2 tuning grid (GLUE_MPNET_TUNING.md): resumable, ends by itself.
#   bash benchmarks/mpnet_tuning.sh [DEADLINE_S] [GPUS] [PARALLEL] [CELLS] [SEEDS]   (defaults 520, 0,1, 12, the
#   two-stage selection, 1,2). CELLS (TASK/NAME,...) runs those cells on the held-out split instead, e.g. the lr of
#   PiSSA without dropout: rte/pissa_d0_lr1e-4,rte/pissa_d0_lr5e-4,...
# Needs /tmp/models/all-mpnet-base-v2 (staged from .mp/), .gpu/code (the frozen run_glue_iw.py + iwtrainer),
# .gpu/tune_glue (benchmarks/tuning_split.py) and datasets/evaluate on PYTHONPATH. Results accumulate in
# /tmp/work/tuning.jsonl (seeded from benchmarks/results/glue_mpnet_tuning.jsonl on a fresh machine) and are copied
# to $OUT with the log and an nvidia-smi trace.
. "$(dirname "$0")/mpnet_env.sh"
if [ ! -s /tmp/work/tuning.jsonl ] && [ -s benchmarks/results/glue_mpnet_tuning.jsonl ]; then
  cp benchmarks/results/glue_mpnet_tuning.jsonl /tmp/work/tuning.jsonl
fi
if [ -n "${4:-}" ]; then  # explicit cells (e.g. another family's lr), with this checkout's code
  SELECT=(--cells "$4" --seeds "${5:-1,2}")
else  # the two-stage selection, with the frozen code it started with
  SELECT=(--tune --code_dir .gpu/code --tasks rte,mrpc,stsb,cola)
fi
python3 benchmarks/glue_table.py "${SELECT[@]}" --model "$MODEL" --glue_dir .gpu/tune_glue \
  --gpus "${2:-0,1}" --parallel "${3:-12}" --deadline_s "${1:-520}" \
  --results /tmp/work/tuning.jsonl --runs_dir /tmp/work/runs 2>&1 | tee "$OUT/log"
rc=$?
kill "$SMI" 2>/dev/null
[ -f /tmp/work/tuning.jsonl ] && cp /tmp/work/tuning.jsonl "$OUT/glue_mpnet_tuning.jsonl"
exit $rc
