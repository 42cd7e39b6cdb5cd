#!/usr/bin/env bash
# One device call of the all-mpnet-base-v2 dev-set runs (GLUE_MPNET_TUNING.md): the selected configurations
# (dev_cells of benchmarks/results/glue_mpnet_tuning.json) × seeds, trained on the full train.tsv of .gpu/glue (a copy
# of ../shared/data/glue's RTE/MRPC/STS-B/CoLA train.tsv + dev.tsv) and scored on the GLUE dev set. Resumable.
#   bash benchmarks/mpnet_dev.sh [DEADLINE_S] [SEEDS] [GPUS] [PARALLEL]     (defaults 520, 1,2,3, 0,1, 12)
. "$(dirname "$0")/mpnet_env.sh"
if [ ! -s /tmp/work/dev.jsonl ] && [ -s benchmarks/results/glue_mpnet_dev.jsonl ]; then
  cp benchmarks/results/glue_mpnet_dev.jsonl /tmp/work/dev.jsonl
fi
CELLS=$(python3 -c 'import json; print(",".join(json.load(open("benchmarks/results/glue_mpnet_tuning.json"))["dev_cells"]))')
# First wall-time estimates: the tuning runs (85 % of the rows) × 1.2.
python3 benchmarks/glue_table.py --cells "$CELLS" --seeds "${2:-1,2,3}" --model "$MODEL" --glue_dir .gpu/glue \
  --code_dir .gpu/code --gpus "${3:-0,1}" --parallel "${4:-12}" --deadline_s "${1:-520}" \
  --est_results benchmarks/results/glue_mpnet_tuning.jsonl --est_scale 1.2 \
  --results /tmp/work/dev.jsonl --runs_dir /tmp/work/runs 2>&1 | tee "$OUT/log"
rc=$?
kill "$SMI" 2>/dev/null
[ -f /tmp/work/dev.jsonl ] && cp /tmp/work/dev.jsonl "$OUT/glue_mpnet_dev.jsonl"
exit $rc
