# Sourced by the mpnet_*.sh device scripts: offline, unbuffered, the staged model, $OUT and an nvidia-smi trace.
set -o pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
OUT=${OUT:-/tmp/work/out}
MODEL=/tmp/models/all-mpnet-base-v2
mkdir -p /tmp/work "$OUT"
[ -f "$MODEL/config.json" ] || { echo "no $MODEL: stage the model first"; exit 3; }
nvidia-smi --query-gpu=timestamp,index,utilization.gpu,memory.used --format=csv -l 30 >"$OUT/smi.csv" 2>&1 &
SMI=$!
