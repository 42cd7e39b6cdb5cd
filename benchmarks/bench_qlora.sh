#!/usr/bin/env bash
# QLoRA numbers on one GPU (benchmarks/bench_qlora.py): installs the carried bitsandbytes wheel (.whl_bnb) when
# bitsandbytes is missing, then writes $OUT/qlora.{json,md} and the log. Needs the model staged (default
# /tmp/models/all-mpnet-base-v2) and GLUE_DIR/SST-2/train.tsv (default .gpu/glue).
#   bash benchmarks/bench_qlora.sh [MODEL] [GLUE_DIR] [more bench_qlora.py flags]
set -o pipefail
OUT=${OUT:-/tmp/bench_qlora_out}; mkdir -p "$OUT"
MODEL=${1:-/tmp/models/all-mpnet-base-v2}; GLUE_DIR=${2:-.gpu/glue}; shift 2 2>/dev/null || shift $#
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
if ! python3 -c "import bitsandbytes" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl_bnb/*.whl || exit 1
fi
export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
[ -f "$MODEL/config.json" ] || { echo "no $MODEL: stage all-mpnet-base-v2 first (.mp/reassemble.sh)"; exit 3; }
python3 benchmarks/bench_qlora.py --model "$MODEL" --glue_dir "$GLUE_DIR" --out "$OUT/qlora" "$@" 2>&1 | tee "$OUT/qlora.log"
