#!/usr/bin/env python
"""Fine-tune a sequence classifier on GLUE with IW-LoRA, LoRA or a sibling method (transformers' run_glue.py).

    python run_glue_iw.py configs/quickstart.yaml --model_name_or_path MODEL_DIR --glue_dir GLUE_DIR
    python run_glue_iw.py --model_name_or_path microsoft/deberta-v3-base --task_name mnli --do_train --do_eval \\
        --output_dir out --iw_alpha 1e-4
    accelerate launch run_glue_iw.py configs/deberta_rte_iwlora.yaml

The same program is installed as the console command ``iwtrainer-glue``; it lives in :mod:`iwtrainer.glue.run`.
A YAML/JSON file as first argument gives the flags' values; flags after it override them. Outputs are those of
run_glue.py (all_results.json, train/eval_results.json, trainer_state.json, predict_results_<task>.txt) plus
iw_importance.json (IW calibration), the method's own record (rank_allocation.json, adalora_ranks.json,
wsa_ranks.json) and, in all_results.json: adapter, trainable_params, train_ms_per_step and, on CUDA,
peak_gpu_memory_mb. Bad input exits non-zero with one line on stderr, before anything is written.
"""

from iwtrainer.glue.run import main


def _mp_fn(index: int) -> None:
    """For xla_spawn (TPUs), as run_glue.py."""
    main()


if __name__ == "__main__":
    main()
