"""Never continue someone else's run: which checkpoint a run resumes, and whether it belongs to this run.

Every checkpoint gets ``run_settings.json``: the settings that define the run (model, data, method and its flags,
IW settings, the optimisation and its length). A run resumes ``--resume_from_checkpoint`` or, as run_glue.py, the
last checkpoint in ``--output_dir``; before anything is loaded or written the checkpoint's settings are compared
with this run's, and any difference is one line naming the settings and how to start fresh
(``--overwrite_output_dir`` or another ``--output_dir``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import TYPE_CHECKING, Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

from ..files import write_json
from ..importance import IMPORTANCE_FILE
from ..methods import get_method
from ..online import PARTIAL_FILE
from ..settings import IWSettings

if TYPE_CHECKING:
    from .arguments import ParsedArgs

logger = logging.getLogger(__name__)

RUN_SETTINGS_FILE = "run_settings.json"
_TRAINING_KEYS = (
    "seed", "data_seed", "learning_rate", "weight_decay", "adam_beta1", "adam_beta2", "adam_epsilon", "max_grad_norm",
    "lr_scheduler_type", "warmup_steps", "warmup_ratio", "per_device_train_batch_size", "gradient_accumulation_steps",
    "num_train_epochs", "max_steps", "optim", "bf16", "fp16", "iw_alpha", "iw_beta", "iw_calib_steps",
    "iw_normalize", "iw_penalty", "iw_calibration",
)  # fmt: skip
# Settings added after run_settings.json first shipped: a file without one was written with its default.
_LATER_DEFAULTS = {"iw_calibration": IWSettings.calibration, "pad_to_multiple_of": None}
_DATA_KEYS = (
    "task_name", "dataset_name", "dataset_config_name", "train_file", "max_train_samples", "max_seq_length",
    "pad_to_max_length", "pad_to_multiple_of",
)  # fmt: skip


def run_settings(parsed: ParsedArgs) -> dict[str, Any]:
    """The settings a checkpoint must share with the run that resumes it (JSON-ready)."""
    model, data, adapter, training = parsed.model_args, parsed.data_args, parsed.adapter_args, parsed.training_args
    method = get_method(adapter.adapter)
    options = parsed.method_args.get(method.arguments) if method.arguments else None
    settings: dict[str, Any] = {"model_name_or_path": model.model_name_or_path, "world_size": training.world_size}
    settings.update({k: getattr(data, k) for k in _DATA_KEYS})
    settings.update(
        adapter=adapter.adapter,
        lora_r=adapter.lora_r,
        lora_alpha=adapter.lora_alpha,
        lora_dropout=adapter.lora_dropout,
        lora_target_modules=adapter.lora_target_modules,
    )
    if options is not None:
        settings.update(dataclasses.asdict(options))
    settings.update({k: getattr(training, k, None) for k in _TRAINING_KEYS})  # None: not in this version
    return json.loads(json.dumps(settings, default=str))  # what the file holds, so comparisons are like for like


class RunSettingsCallback(TrainerCallback):
    """Writes ``run_settings.json`` into every checkpoint the Trainer saves (main process)."""

    def __init__(self, settings: dict[str, Any]) -> None:
        self.settings = settings

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        if state.is_world_process_zero and os.path.isdir(folder):
            write_json(os.path.join(folder, RUN_SETTINGS_FILE), self.settings)


def checkpoint_to_resume(parsed: ParsedArgs, settings: dict[str, Any]) -> str | None:
    """The checkpoint this run continues (``None``: start fresh), checked against ``settings``.

    ``ValueError`` (one line) for a ``--resume_from_checkpoint`` that is no checkpoint, or a checkpoint written with
    other settings or by something else than this script.
    """
    training, output = parsed.training_args, parsed.output_args
    if not training.do_train:
        return None
    explicit = training.resume_from_checkpoint
    if explicit is not None:
        if not os.path.isdir(explicit):
            raise ValueError(
                f"--resume_from_checkpoint {explicit!r} does not exist; expected a checkpoint folder such as "
                f"{os.path.join(training.output_dir, PREFIX_CHECKPOINT_DIR)}-500"
            )
        checkpoint, flag = explicit, f"--resume_from_checkpoint {explicit}"
    elif output.overwrite_output_dir or not os.path.isdir(training.output_dir):
        return None
    else:
        checkpoint = get_last_checkpoint(training.output_dir)
        if checkpoint is None:
            return None
        flag = f"the last checkpoint in --output_dir {training.output_dir} ({os.path.basename(checkpoint)})"
    fresh = "pass --overwrite_output_dir to start fresh (or another --output_dir)"
    problem = get_method(parsed.adapter_args.adapter).checkpoint_problem(checkpoint)
    if problem:
        raise ValueError(f"{flag} cannot be resumed: {problem}")
    path = os.path.join(checkpoint, RUN_SETTINGS_FILE)
    if not os.path.isfile(path):
        raise ValueError(f"{flag} has no {RUN_SETTINGS_FILE}: it was not written by run_glue_iw.py; {fresh}")
    with open(path) as handle:
        saved = {**_LATER_DEFAULTS, **json.load(handle)}
    differ = [k for k in sorted(set(saved) | set(settings)) if saved.get(k) != settings.get(k)]
    if differ:
        shown = ", ".join(f"{k}: {saved.get(k)!r} there, {settings.get(k)!r} now" for k in differ[:4])
        more = f" (+{len(differ) - 4} more)" if len(differ) > 4 else ""
        raise ValueError(
            f"{flag} was written with other settings ({shown}{more}); resume with the same flags, or {fresh}"
        )
    if training.iw_settings.calibrates and get_method(parsed.adapter_args.adapter).uses_iw:
        found = [f for f in (IMPORTANCE_FILE, PARTIAL_FILE) if os.path.isfile(os.path.join(checkpoint, f))]
        if not found or (found == [PARTIAL_FILE] and training.iw_settings.calibration != "online"):
            raise ValueError(
                f"{flag} has no {IMPORTANCE_FILE}: the importance weights must come from the original calibration, "
                f"never a new one mid-run; {fresh}"
            )
    logger.info("Checkpoint detected, resuming training at %s", checkpoint)
    return checkpoint
