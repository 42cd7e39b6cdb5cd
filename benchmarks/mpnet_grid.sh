#!/usr/bin/env bash
# One device call of the all-mpnet-base-v2 evidence grid (GLUE_MPNET.md): every TASK/METHOD of
# `glue_table.py --grid_cells benchmarks/results/glue_mpnet_tuning.json` (LoRA and the three penalties at their
# held-out-selected α — already in glue_mpnet_dev.jsonl, so skipped — then gradnorm, PiSSA, DoRA, EVA at the family's
# lr, AdaLoRA's paper recipe, full fine-tuning and the WSA sweep) × seeds, trained on .gpu/glue's full train.tsv and
# scored on the GLUE dev set, with this checkout's code. Resumable; stops by itself at the deadline.
#   bash benchmarks/mpnet_grid.sh [DEADLINE_S] [SEEDS] [GPUS] [PARALLEL] [TASKS] [METHODS]
#   (defaults 520, 1,2,3,4,5, 0,1, 12, all tasks, all methods; TASKS and METHODS are comma lists of name prefixes)
# SST-2 (3 seeds, once its held-out selection is in glue_mpnet_tuning.json): one 1-epoch run is ~2,105 steps; 11
# runs a GPU fit one call (AdaLoRA, the slowest, took 523 s), e.g. `bash benchmarks/mpnet_grid.sh 575 1,2,3 0,1 11
# sst2 gradnorm,pissa,full,dora,adalora,eva,wsa` (the calls that ran: GLUE_MPNET_TUNING.md, section SST-2).
. "$(dirname "$0")/mpnet_env.sh"
if [ ! -s /tmp/work/grid.jsonl ]; then  # start from the committed runs (same cells are skipped)
  cat benchmarks/results/glue_mpnet_dev.jsonl benchmarks/results/glue_mpnet_grid.jsonl 2>/dev/null >/tmp/work/grid.jsonl
fi
CELLS=$(python3 benchmarks/glue_table.py --grid_cells benchmarks/results/glue_mpnet_tuning.json)
if [ -n "${5:-}" ]; then CELLS=$(echo "$CELLS" | tr ',' '\n' | grep -E "^(${5//,/|})/" | paste -sd,); fi
if [ -n "${6:-}" ]; then CELLS=$(echo "$CELLS" | tr ',' '\n' | grep -E "/(${6//,/|})" | paste -sd,); fi
python3 benchmarks/glue_table.py --cells "$CELLS" --seeds "${2:-1,2,3,4,5}" --model "$MODEL" --glue_dir .gpu/glue \
  --gpus "${3:-0,1}" --parallel "${4:-12}" --deadline_s "${1:-520}" \
  --est_results benchmarks/results/glue_mpnet_dev.jsonl --est_scale 1.3 \
  --results /tmp/work/grid.jsonl --runs_dir /tmp/work/runs 2>&1 | tee "$OUT/log"
rc=$?
kill "$SMI" 2>/dev/null
# Only the new lines go back (the dev runs stay in their own file).
python3 - "$OUT" <<'PY'
import json, sys
seen = {json.loads(l)["key"] for l in open("benchmarks/results/glue_mpnet_dev.jsonl") if l.strip()}
new = [l for l in open("/tmp/work/grid.jsonl") if l.strip() and json.loads(l)["key"] not in seen]
open(sys.argv[1] + "/glue_mpnet_grid.jsonl", "w").writelines(new)
PY
exit $rc
