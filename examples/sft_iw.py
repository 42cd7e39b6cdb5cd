"""Supervised fine-tuning of a causal LM with IW-LoRA: trl's SFT script with ``IWSFTTrainer`` and the ``iw_*`` flags.

Online, as trl's own ``trl/scripts/sft.py`` (a chat dataset, LoRA on every linear layer, IW-LoRA at α = 1e-4):

    python examples/sft_iw.py --model_name_or_path Qwen/Qwen2.5-0.5B --dataset_name trl-lib/Capybara \
        --output_dir Qwen2.5-0.5B-IW-SFT --learning_rate 2e-4 --per_device_train_batch_size 8 \
        --gradient_accumulation_steps 2 --lora_r 16 --lora_alpha 32 --iw_alpha 1e-4 --iw_calib_steps 150

Every ``SFTConfig`` and ``ModelConfig`` flag works (``--load_in_4bit`` for QLoRA, ``--config sft.yaml`` for a config
file whose values the flags override); ``--dataset_name`` also takes a local ``.json``/``.jsonl``/``.csv`` file. LoRA
is on by default (``--use_peft``; target modules ``all-linear`` unless ``--lora_target_modules`` names others).
``--iw_alpha 0`` is plain SFT with LoRA.
"""

from __future__ import annotations

import os
import sys

from datasets import load_dataset
from trl import ModelConfig, ScriptArguments, TrlParser, get_peft_config, get_quantization_config

from iwtrainer import IWSFTConfig, IWSFTTrainer
from iwtrainer.errors import one_line, one_line_errors

LOCAL_FORMATS = {".json": "json", ".jsonl": "json", ".csv": "csv"}


def make_parser() -> TrlParser:
    parser = TrlParser((ScriptArguments, IWSFTConfig, ModelConfig), prog="sft_iw.py")
    parser.set_defaults(use_peft=True)  # IW-LoRA penalises LoRA updates: without LoRA there is nothing to weigh
    return one_line_errors(parser)


def load(script_args: ScriptArguments, parser: TrlParser):
    name = script_args.dataset_name
    if not name:
        parser.error("--dataset_name is required: a hub dataset id or a local .json/.jsonl/.csv file")
    extension = os.path.splitext(name)[1].lower()
    if extension in LOCAL_FORMATS:
        if not os.path.isfile(name):
            parser.error(f"--dataset_name {name}: no such file")
        return load_dataset(LOCAL_FORMATS[extension], data_files={script_args.dataset_train_split: name})
    return load_dataset(name, name=script_args.dataset_config)


def main(argv: list[str] | None = None) -> None:
    parser = make_parser()
    try:
        script_args, training_args, model_args = parser.parse_args_and_config(args=argv)
    except ValueError as exc:  # a value the argument dataclasses refuse (e.g. --iw_alpha -1)
        parser.error(one_line(exc))
    if model_args.model_name_or_path is None:
        parser.error("--model_name_or_path is required: a hub model id or a local model folder")
    if model_args.use_peft and not model_args.lora_target_modules:
        model_args.lora_target_modules = "all-linear"
    training_args.model_init_kwargs = {
        "revision": model_args.model_revision,
        "trust_remote_code": training_args.trust_remote_code,
        "attn_implementation": model_args.attn_implementation,
        "dtype": model_args.dtype,
        **(training_args.model_init_kwargs or {}),
    }
    dataset = load(script_args, parser)
    split = script_args.dataset_test_split
    trainer = IWSFTTrainer(
        model=model_args.model_name_or_path,
        args=training_args,
        train_dataset=dataset[script_args.dataset_train_split],
        eval_dataset=dataset[split] if training_args.eval_strategy != "no" and split in dataset else None,
        quantization_config=get_quantization_config(model_args),
        peft_config=get_peft_config(model_args),
    )
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)
    trainer.accelerator.print(f"IW-LoRA SFT adapter saved to {training_args.output_dir}")


if __name__ == "__main__":
    main(sys.argv[1:])
