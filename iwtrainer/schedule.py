"""A run's length in optimizer steps, and the two modes of gradnorm rank allocation (ema, calibration)."""

from __future__ import annotations

import inspect
import json
import logging
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from .rank_allocation import RANK_ALLOCATION_FILE, GradNormRankCallback, allocate_ranks, rebuild_lora_ranks
from .sensitivity import compute_sensitivities
from .training_args import IWTrainingArguments

logger = logging.getLogger(__name__)


def _world_size(training_args: IWTrainingArguments) -> int:
    """Processes of the run: ``$WORLD_SIZE`` (torchrun/accelerate) first, so nothing is initialised to find out."""
    env = int(os.environ.get("WORLD_SIZE", "1") or 1)
    return env if env > 1 else int(training_args.world_size)


def _has_length(dataset: Any) -> bool:
    try:
        len(dataset)
    except TypeError:
        return False
    return True


def optimizer_steps_per_epoch(num_examples: int, training_args: IWTrainingArguments) -> int:
    """Optimizer steps in one epoch of ``num_examples``, as the Trainer counts them (per process batches / GA)."""
    per_process = math.ceil(num_examples / _world_size(training_args))
    batch = training_args.train_batch_size
    batches = per_process // batch if training_args.dataloader_drop_last else math.ceil(per_process / batch)
    return max(math.ceil(batches / training_args.gradient_accumulation_steps), 1)


def estimate_train_steps(num_examples: int, training_args: IWTrainingArguments) -> int:
    """The run's optimizer steps: ``--max_steps`` when > 0, else ``ceil(epochs × steps per epoch)``."""
    if training_args.max_steps > 0:
        return training_args.max_steps
    return math.ceil(training_args.num_train_epochs * optimizer_steps_per_epoch(num_examples, training_args))


def _check_warmup(warmup: int | None, total_steps: int, steps_per_epoch: int) -> None:
    if (warmup or steps_per_epoch) < total_steps:
        return
    given = f"--rank_warmup_steps {warmup}" if warmup else f"--rank_warmup_steps (one epoch: {steps_per_epoch})"
    raise ValueError(
        f"{given} must be < the run's {total_steps} optimizer steps, or the ranks are never re-allocated: pass a "
        "smaller --rank_warmup_steps or train longer (--max_steps / --num_train_epochs)"
    )


def _write_rank_allocation(args: TrainingArguments, state: TrainerState, record: Mapping[str, Any] | None) -> None:
    if record is None or not state.is_world_process_zero:
        return
    os.makedirs(args.output_dir, exist_ok=True)
    with open(os.path.join(args.output_dir, RANK_ALLOCATION_FILE), "w") as f:
        json.dump(record, f, indent=2)


class _EmaRankCallback(GradNormRankCallback):
    """``GradNormRankCallback`` with the warm-up defaulting to one epoch of the Trainer's optimizer steps;
    ``rank_allocation.json`` is written when training ends (with ``"rank_allocation_mode": "ema"``)."""

    def __init__(self, warmup_steps: int | None, **kwargs: Any) -> None:
        super().__init__(warmup_steps or 1, write_file=False, **kwargs)
        self.requested_warmup = warmup_steps

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self.requested_warmup is None:
            loader = kwargs.get("train_dataloader")
            if loader is None or not _has_length(loader):
                raise ValueError("--rank_warmup_steps is required when the training data has no length")
            ga = args.gradient_accumulation_steps
            self.warmup_steps = max(len(loader) // ga + int(len(loader) % ga > 0), 1)  # the Trainer's epoch
        super().on_train_begin(args, state, control, **kwargs)

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self.record is not None:
            self.record["rank_allocation_mode"] = "ema"
        _write_rank_allocation(args, state, self.record)


@dataclass
class RankCalibration:
    """``--rank_allocation_mode calibration``: ranks from the base weights' gradient norms, applied before training.

    ``s_k = mean_b ‖∂L/∂W_k‖_F`` (:func:`compute_sensitivities`, the IW calibration's measure) over
    ``--iw_calib_steps`` batches of a plain shuffled DataLoader, ``r = allocate_ranks(s, budget, min_rank, caps)``,
    then :func:`rebuild_lora_ranks` in place (same model object; rank 0 removes the adapter). ``record`` is the
    content of ``rank_allocation.json``.
    """

    budget: int
    min_rank: int
    caps: dict[str, int]
    record: dict[str, Any] | None = None

    def run(self, model: nn.Module, dataset: Any, collator: Callable, training_args: IWTrainingArguments) -> None:
        from torch.utils.data import DataLoader

        seed = training_args.data_seed if training_args.data_seed is not None else training_args.seed
        loader = DataLoader(
            _model_input_columns(dataset, model),
            batch_size=training_args.per_device_train_batch_size,
            shuffle=True,
            generator=torch.Generator().manual_seed(seed),
            collate_fn=collator,
            drop_last=training_args.dataloader_drop_last,
        )
        home = next(model.parameters()).device
        autocast = torch.bfloat16 if training_args.bf16 else torch.float16 if training_args.fp16 else None
        model.to(training_args.device)
        try:
            sensitivities = compute_sensitivities(
                model,
                loader,
                num_steps=training_args.iw_calib_steps,
                gradient_accumulation_steps=training_args.gradient_accumulation_steps,
                autocast_dtype=autocast,
                show_progress=not training_args.disable_tqdm,
            )
        finally:
            model.to(home)
        ranks = allocate_ranks(sensitivities, self.budget, self.min_rank, self.caps)
        info = rebuild_lora_ranks(model, ranks)
        total = sum(sensitivities.values()) or 1.0
        self.record = {
            "mode": "gradnorm",
            "rank_allocation_mode": "calibration",
            "iw_calib_steps": training_args.iw_calib_steps,
            "budget": self.budget,
            "min_rank": self.min_rank,
            "modules": {
                n: {"sensitivity": s, "share": s / total, "old_rank": info[n]["old_rank"], "rank": ranks[n]}
                for n, s in sensitivities.items()
            },
        }
        logger.info(
            "gradnorm (calibration): allocated %d ranks over %d matrices (min %d, max %d, %d without adapter)",
            self.budget,
            len(ranks),
            min(ranks.values()),
            max(ranks.values()),
            sum(r == 0 for r in ranks.values()),
        )


def _model_input_columns(dataset: Any, model: nn.Module) -> Any:
    """``dataset`` without the columns the model's forward does not take (as the Trainer's remove_unused_columns)."""
    if not hasattr(dataset, "remove_columns"):
        return dataset
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    keep = set(inspect.signature(inner.forward).parameters) | {"label", "label_ids", "labels"}
    return dataset.remove_columns([c for c in dataset.column_names if c not in keep])


class _CalibratedRankCallback(TrainerCallback):
    """Refuses to train when the calibration did not run; writes ``rank_allocation.json`` when training ends."""

    def __init__(self, calibration: RankCalibration) -> None:
        self.calibration = calibration

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self.calibration.record is None:
            raise RuntimeError(
                "--rank_allocation_mode calibration: the ranks were not allocated; call "
                "AdapterSetup.prepare_training(...) after tokenizing and before building the Trainer"
            )

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        _write_rank_allocation(args, state, self.calibration.record)
