"""Pieces of ``run_glue_iw.py``, re-exported from the modules that hold them so ``from iwtrainer.cli import X`` works.

- :mod:`iwtrainer.arguments`: the argument dataclasses and config-file / command-line parsing.
- :mod:`iwtrainer.data`: loading, selecting and tokenizing the splits; labels, metrics and the collator.
- :mod:`iwtrainer.modeling`: loading the model and tokenizer; head and target module discovery.
- :mod:`iwtrainer.adapters`: building the adapter (LoRA / IW-LoRA, AdaLoRA, full, WSA) and rank allocation.
- :mod:`iwtrainer.schedule`: the run's optimizer steps and the gradnorm rank allocation's ema / calibration modes.
"""

from __future__ import annotations

from .adapters import (
    AdapterSetup,
    apply_rank_allocation,
    build_adalora,
    build_adapter,
    build_lora,
    build_wsa,
    count_trainable_parameters,
)
from .arguments import (
    ADAPTERS,
    CONFIG_SUFFIXES,
    NON_IW_ADAPTERS,
    RANK_ALLOCATION_MODES,
    RANK_ALLOCATIONS,
    USER_ERRORS,
    AdapterArguments,
    ArgsTuple,
    DataTrainingArguments,
    ModelArguments,
    build_parser,
    load_config_file,
    one_line,
    parse_args,
    resolve_iw_alpha,
    split_names,
)
from .data import (
    TaskData,
    data_collator_for,
    label_mapping,
    load_task_data,
    make_compute_metrics,
    select_splits,
    tokenize_splits,
)
from .modeling import (
    candidates_message,
    check_model_paths,
    discover_target_modules,
    find_head_modules,
    linear_module_names,
    load_model_and_tokenizer,
    match_target_modules,
    targets_regex,
)
from .schedule import RankCalibration, estimate_train_steps, optimizer_steps_per_epoch

__all__ = [
    "ADAPTERS",
    "CONFIG_SUFFIXES",
    "NON_IW_ADAPTERS",
    "RANK_ALLOCATIONS",
    "RANK_ALLOCATION_MODES",
    "USER_ERRORS",
    "AdapterArguments",
    "AdapterSetup",
    "ArgsTuple",
    "DataTrainingArguments",
    "ModelArguments",
    "RankCalibration",
    "TaskData",
    "apply_rank_allocation",
    "build_adalora",
    "build_adapter",
    "build_lora",
    "build_parser",
    "build_wsa",
    "candidates_message",
    "check_model_paths",
    "count_trainable_parameters",
    "data_collator_for",
    "discover_target_modules",
    "estimate_train_steps",
    "find_head_modules",
    "label_mapping",
    "linear_module_names",
    "load_config_file",
    "load_model_and_tokenizer",
    "load_task_data",
    "make_compute_metrics",
    "match_target_modules",
    "one_line",
    "optimizer_steps_per_epoch",
    "parse_args",
    "resolve_iw_alpha",
    "select_splits",
    "split_names",
    "targets_regex",
    "tokenize_splits",
]
