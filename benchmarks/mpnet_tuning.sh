#!/usr/bin/env bash
# One device call of the all-mpnet-base-v2 tuning grid (GLUE_MPNET_TUNING.md): resumable, ends by itself.
#   bash benchmarks/mpnet_tuning.sh [DEADLINE_S] [GPUS] [PARALLEL] [CELLS] [SEEDS]   (defaults 520, 0,1, 12, the
#   two-stage selection, 1,2). CELLS (TASK/NAME,...) runs those cells on the held-out split instead, e.g. the lr of
#   PiSSA without dropout: rte/pissa_d0_lr1e-4,rte/pissa_d0_lr5e-4,...
#   CELLS = TASK:STAGES (e.g. sst2:1,3, then sst2:2,4) runs those selection stages' cells of TASK, listed from the runs
#   so far (glue_table.py --tune_stage_cells; stages 2 and 4 need stage 1's lr), at the stages' seeds unless SEEDS.
# Needs /tmp/models/all-mpnet-base-v2 (staged from .mp/), .gpu/code (the frozen run_glue_iw.py + iwtrainer),
# .gpu/tune_glue (benchmarks/tuning_split.py) and datasets/evaluate on PYTHONPATH. Results accumulate in
# /tmp/work/tuning.jsonl (seeded from benchmarks/results/glue_mpnet_tuning.jsonl on a fresh machine) and are copied
# to $OUT with the log and an nvidia-smi trace. Every run here is a held-out run (--heldout: SST-2 trains 3 epochs on
# its 8,500-row subsample, glue_table.TUNE_PROTOCOL; the small tasks' flags are their dev protocol either way).
. "$(dirname "$0")/mpnet_env.sh"
if [ ! -s /tmp/work/tuning.jsonl ] && [ -s benchmarks/results/glue_mpnet_tuning.jsonl ]; then
  cp benchmarks/results/glue_mpnet_tuning.jsonl /tmp/work/tuning.jsonl
fi
CELLS=${4:-}
SEEDS=${5:-1,2}
if [[ "$CELLS" =~ ^([a-z0-9]+):([0-9,]+)$ ]]; then  # TASK:STAGES: the stages' cells from the runs so far
  TASK=${BASH_REMATCH[1]} STAGES=${BASH_REMATCH[2]}
  CELLS=$(python3 benchmarks/glue_table.py --tune_stage_cells "$STAGES" --tasks "$TASK" \
    --results /tmp/work/tuning.jsonl) || { kill "$SMI" 2>/dev/null; exit 4; }
  SEEDS=${5:-$(python3 benchmarks/glue_table.py --tune_stage_seeds "$STAGES")}
  echo "$TASK stages $STAGES, seeds $SEEDS: $CELLS"
fi
if [ -n "$CELLS" ]; then  # explicit cells (e.g. another family's lr), with this checkout's code
  SELECT=(--cells "$CELLS" --seeds "$SEEDS")
else  # the two-stage selection, with the frozen code it started with
  SELECT=(--tune --code_dir .gpu/code --tasks rte,mrpc,stsb,cola)
fi
python3 benchmarks/glue_table.py "${SELECT[@]}" --heldout --model "$MODEL" --glue_dir .gpu/tune_glue \
  --gpus "${2:-0,1}" --parallel "${3:-12}" --deadline_s "${1:-520}" \
  --results /tmp/work/tuning.jsonl --runs_dir /tmp/work/runs 2>&1 | tee "$OUT/log"
rc=$?
kill "$SMI" 2>/dev/null
[ -f /tmp/work/tuning.jsonl ] && cp /tmp/work/tuning.jsonl "$OUT/glue_mpnet_tuning.jsonl"
exit $rc
