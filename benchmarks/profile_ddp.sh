#!/usr/bin/env bash
# Profiles of compiled (reduce-overhead) LoRA / IW-LoRA Trainer steps on 1 and on 2 GPUs, per-device batch 32, the
# flags bench_ddp.py gives its per-device pairs (ddp_per_device_reduce_overhead.md), each with and without the
# sync-free recipe: where the Trainer's step goes beyond the bare compiled step, and what DDP adds.
#   bash benchmarks/profile_ddp.sh MODEL GLUE_DIR OUT [METHOD=lora] [STEPS=130]
# Each run: 130 optimizer steps, steps 100-109 profiled on every rank (benchmarks/profile_run.py) ->
# OUT/profile_<method>_n<procs>_<plain|nosync>/rank<R>.{json,md}. Four runs; the first compiles (~120 s), the rest
# find most graphs in inductor's cache. PROCS="2" runs the 2-process pair alone, VARIANTS="nosync" the sync-free runs
# alone. A device call brings back at most 8 files: pack OUT into one archive (tar czf) when every run's rank files
# are wanted.
set -o pipefail
MODEL=$1 GLUE=$2 OUT=$3 METHOD=${4:-lora} STEPS=${5:-130}
[ -n "$OUT" ] || { echo "usage: bash benchmarks/profile_ddp.sh MODEL GLUE_DIR OUT [lora|iw] [STEPS]"; exit 2; }
case $METHOD in
  lora) IW=(--iw_alpha 0) ;;
  iw) IW=(--iw_alpha 1e-4 --iw_normalize sum --iw_calib_steps 50) ;;
  *) echo "METHOD: expected lora or iw, got $METHOD"; exit 2 ;;
esac
FLAGS=(--model_name_or_path "$MODEL" --glue_dir "$GLUE" --task_name sst2 --max_seq_length 64 --do_train
  --per_device_train_batch_size 32 --max_steps "$STEPS" --learning_rate 5e-4 --warmup_steps 0.06 --weight_decay 0.01
  --adapter lora "${IW[@]}" --logging_steps 20 --save_strategy no --eval_strategy no --report_to none
  --disable_tqdm true --seed 1 --dataloader_num_workers 0 --bf16 true --ddp_find_unused_parameters false
  --torch_compile true --torch_compile_mode reduce-overhead)
NOSYNC=(--logging_nan_inf_filter false --accelerator_config '{"non_blocking": true}')  # bench_ddp.SYNC_FREE_FLAGS
export OMP_NUM_THREADS=4
PY=${PY:-python3}  # PY=echo prints the four commands
for procs in ${PROCS:-1 2}; do
  for variant in ${VARIANTS:-plain nosync}; do
    extra=(); [ $variant = nosync ] && extra=("${NOSYNC[@]}")
    name=profile_${METHOD}_n${procs}_${variant}
    multi=(); [ $procs = 2 ] && multi=(--multi_gpu)
    # exactly $procs GPUs visible: one process that sees two gets transformers' nn.DataParallel over both
    CUDA_VISIBLE_DEVICES=$(seq -s, 0 $((procs - 1))) $PY -m accelerate.commands.launch --num_processes $procs --num_machines 1 --dynamo_backend no "${multi[@]}" \
      benchmarks/profile_run.py --profile_dir "$OUT/$name" --profile_start 100 --profile_steps 10 -- \
      "${FLAGS[@]}" "${extra[@]}" --output_dir "/tmp/$name" 2>&1 | tail -5 | tee "$OUT/$name.log"
  done
done
