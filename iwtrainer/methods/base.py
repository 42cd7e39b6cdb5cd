"""The small interface every fine-tuning method implements, so no caller switches on a method's name.

A :class:`Method` turns a loaded model and the chosen target matrices into a :class:`MethodSetup` — the model to
train plus what the trainer runs beside the task loss — and owns its steps around training:

    build(model, ctx)                      wrap the model (peft LoRA/AdaLoRA, WSA layers, nothing for full fine-tuning)
    setup.callbacks, setup.regularizers    what the Trainer runs with it (AdaLoRA's allocator, WSA's gate L1, ...)
    prepare(setup, dataset, collator, a)   steps that need the tokenized training data, before the Trainer exists
    save(setup, trainer, tokenizer)        what it writes when training ends (default: ``trainer.save_model()``)
    merge(setup)                           the adapter folded into the base weights (``--merge_adapter``)
    uses_iw                                whether the IW penalty applies (plain LoRA factors B·A to weight)

A method's own flags are one dataclass (``Method.arguments``) that the GLUE script's single parser includes; the
LoRA-family flags shared by every adapter are :class:`AdapterArguments`. A new method is one module and one line in
``iwtrainer/methods/__init__.py``.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from ..targets import split_names
from ..training_args import IWTrainingArguments


class _TargetModulesAction(argparse.Action):
    """``--lora_target_modules a b --lora_target_modules c`` -> ``[a, b, c]``.

    The first use on a command line *replaces* the default (which may come from a config file), later uses extend:
    argparse's own ``extend`` action would append to a config file's list instead of overriding it.
    """

    def __call__(
        self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any, option_string=None
    ):
        seen = getattr(self, "_seen_in", None) is namespace
        current = list(getattr(namespace, self.dest) or []) if seen else []
        self._seen_in = namespace
        setattr(namespace, self.dest, current + list(values))


@dataclass
class AdapterArguments:
    """Which method trains which matrices: ``--adapter`` and the LoRA-family flags every adapter shares."""

    adapter: str = field(
        default="lora",
        metadata={
            "help": "The fine-tuning method (iwtrainer.methods): lora (peft LoRA; IW-LoRA when --iw_alpha > 0, the "
            "default 1e-4; plain LoRA with --iw_alpha 0), gradnorm (LoRA with per-matrix ranks from gradient "
            "norms; combines with --iw_alpha), adalora (peft AdaLoRA, same average rank budget), wsa (Weighted "
            "Spectral Adapter), full (full fine-tuning), pissa / dora / eva (peft's LoRA variants; eva combines "
            "with --iw_alpha). The IW penalty needs plain LoRA factors that start at 0: for methods without "
            "them --iw_alpha defaults to 0 and an explicit --iw_alpha > 0 is an error."
        },
    )
    lora_r: int = field(default=8, metadata={"help": "LoRA rank r."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA scaling numerator: Δ = (lora_alpha / r)·B·A."})
    lora_dropout: float = field(
        default=0.1,
        metadata={"help": "Dropout on the LoRA branch input (0.1 as in peft's GLUE LoRA recipes; peft's own is 0)."},
    )
    lora_target_modules: list[str] | None = field(
        default=None,
        metadata={
            "help": "Modules to adapt: names or name suffixes (peft semantics), comma-separated and/or several "
            "values (repeating the flag adds to the list); a single value with regex characters is a regex matched "
            "against the full module name. Default: every nn.Linear/Conv1D inside the transformer blocks "
            "(e.g. 6 per layer for BERT/DeBERTa), never the classification head or pooler.",
            "action": _TargetModulesAction,
        },
    )
    merge_adapter: bool = field(
        default=False,
        metadata={
            "help": "After training, also write <output_dir>/merged: the adapter folded into the base weights, a "
            "plain transformers model that AutoModelForSequenceClassification.from_pretrained loads alone."
        },
    )
    rank_allocation: str = field(
        default="none",
        metadata={
            "help": "Deprecated spelling of --adapter gradnorm: --rank_allocation gradnorm (with --adapter lora) "
            "selects the gradnorm method.",
            "choices": ("none", "gradnorm"),
        },
    )

    def __post_init__(self) -> None:
        from . import METHODS  # the registry imports this module

        if self.rank_allocation not in ("none", "gradnorm"):
            raise ValueError(f"--rank_allocation must be one of ['none', 'gradnorm'], got {self.rank_allocation!r}")
        if self.rank_allocation == "gradnorm":
            if self.adapter not in ("lora", "gradnorm"):
                raise ValueError(
                    f"--rank_allocation gradnorm allocates LoRA ranks and needs --adapter lora, got --adapter "
                    f"{self.adapter} (adalora allocates its own ranks)"
                )
            self.adapter = "gradnorm"
        # Values from a config file bypass argparse's `choices`, so check here too.
        if self.adapter not in METHODS:
            raise ValueError(f"--adapter must be one of {list(METHODS)}, got {self.adapter!r}")
        if self.lora_target_modules is not None:
            self.lora_target_modules = split_names(self.lora_target_modules, "--lora_target_modules")
        if self.lora_r < 1:
            raise ValueError(f"--lora_r must be >= 1, got {self.lora_r}")
        if not 0 <= self.lora_dropout < 1:
            raise ValueError(f"--lora_dropout must be in [0, 1), got {self.lora_dropout}")


@dataclass
class MethodContext:
    """What :meth:`Method.build` gets beside the model: the chosen matrices and the run's arguments."""

    targets: list[str]
    """Module paths of the matrices to adapt (empty for methods that adapt none)."""
    spec: str
    """The same set as one regex (peft ``target_modules``)."""
    heads: list[str]
    """Modules trained in full beside the adapter (task head, pooler, anything missing from the checkpoint)."""
    adapter_args: AdapterArguments
    options: Any
    """The method's own arguments (an instance of ``Method.arguments``), or ``None`` when it has none."""
    training_args: IWTrainingArguments


@dataclass
class MethodSetup:
    """The model to train and what the trainer needs beside it."""

    model: nn.Module
    method: str
    target_names: list[str]
    head_names: list[str]
    regularizers: dict[str, Callable[[nn.Module], torch.Tensor]] = field(default_factory=dict)
    callbacks: list[Any] = field(default_factory=list)
    options: Any = None
    state: Any = None
    """Per-run state of the method (e.g. WSA's config, gradnorm's calibration record)."""
    _prepared: bool = field(default=False, init=False, repr=False)

    @property
    def adapter(self) -> str:
        return self.method

    def prepare_training(self, train_dataset: Any, collator: Callable, training_args: IWTrainingArguments) -> None:
        """The method's steps that need the tokenized training split (:meth:`Method.prepare`); runs once."""
        if self._prepared or train_dataset is None:
            return
        get_method(self.method).prepare(self, train_dataset, collator, training_args)
        self._prepared = True


class Method:
    """One fine-tuning method; subclasses set the class attributes and override what they need."""

    name: ClassVar[str]
    arguments: ClassVar[type | None] = None
    """The dataclass of the method's own flags (parsed by the GLUE script's single parser), or ``None``."""
    uses_iw: ClassVar[bool] = False
    """Whether the IW penalty applies: the model has plain peft LoRA factors ``B·A``."""
    adapts_targets: ClassVar[bool] = True
    """Whether the method adapts chosen matrices (full fine-tuning trains everything instead)."""

    def checkpoint_problem(self, checkpoint: str) -> str | None:
        """Why ``checkpoint`` of this method cannot be resumed exactly (the run then refuses), or ``None``."""
        return None

    def build(self, model: nn.Module, ctx: MethodContext) -> MethodSetup:
        raise NotImplementedError

    def prepare(self, setup: MethodSetup, train_dataset: Any, collator: Callable, args: IWTrainingArguments) -> None:
        """Checks and steps that need the training data (run length, calibration); default: nothing."""

    def save(self, setup: MethodSetup, trainer: Any, tokenizer: Any) -> None:
        """Write the trained model: adapter (+ head) for peft methods, the whole model for full fine-tuning."""
        trainer.save_model()

    def merge(self, setup: MethodSetup) -> nn.Module:
        """The trained model with the adapter folded into the base weights (a plain transformers model; in place)."""
        model = setup.model
        return model.merge_and_unload() if hasattr(model, "merge_and_unload") else model

    def search_problem(self, setup: MethodSetup) -> str | None:
        """Why a hyperparameter search (a fresh model per trial) cannot run this setup, or ``None``."""
        if setup.callbacks:
            return "its trainer callbacks are bound to one model, but every trial builds a fresh one"
        return None


def get_method(name: str) -> Method:
    from . import METHODS

    if name not in METHODS:
        raise ValueError(f"--adapter must be one of {list(METHODS)}, got {name!r}")
    return METHODS[name]


# -- the run's length, for methods whose schedule depends on it ----------------------------------------------------
def world_size(args: Any) -> int:
    """Processes of the run: ``$WORLD_SIZE`` (torchrun/accelerate) first, so nothing is initialised to find out."""
    env = int(os.environ.get("WORLD_SIZE", "1") or 1)
    return env if env > 1 else int(getattr(args, "world_size", 1) or 1)


def has_length(dataset: Any) -> bool:
    try:
        len(dataset)
    except TypeError:
        return False
    return True


def optimizer_steps_per_epoch(num_examples: int, training_args: IWTrainingArguments) -> int:
    """Optimizer steps in one epoch of ``num_examples``, as the Trainer counts them (per process batches / GA)."""
    per_process = math.ceil(num_examples / world_size(training_args))
    batch = training_args.train_batch_size
    batches = per_process // batch if training_args.dataloader_drop_last else math.ceil(per_process / batch)
    return max(math.ceil(batches / training_args.gradient_accumulation_steps), 1)


def estimate_train_steps(num_examples: int, training_args: IWTrainingArguments) -> int:
    """The run's optimizer steps: ``--max_steps`` when > 0, else ``ceil(epochs × steps per epoch)``."""
    if training_args.max_steps > 0:
        return training_args.max_steps
    return math.ceil(training_args.num_train_epochs * optimizer_steps_per_epoch(num_examples, training_args))


# -- measuring on the training data before the Trainer exists (gradnorm calibration, EVA) --------------------------
def shuffled_training_batches(
    dataset: Any, collator: Callable, args: IWTrainingArguments, drop_last: bool = False
) -> torch.utils.data.DataLoader:
    """The training rows in shuffled batches of the training batch size, seeded by ``--data_seed`` (else
    ``--seed``), so a measurement before training is reproducible."""
    from torch.utils.data import DataLoader

    seed = args.data_seed if args.data_seed is not None else args.seed
    return DataLoader(
        dataset,
        batch_size=args.per_device_train_batch_size,
        shuffle=True,
        generator=torch.Generator().manual_seed(seed),
        collate_fn=collator,
        drop_last=drop_last,
    )


@contextlib.contextmanager
def on_training_device(model: nn.Module, args: IWTrainingArguments) -> Iterator[nn.Module]:
    """``model`` on ``args.device`` inside the block, back where it was afterwards (the Trainer moves it later)."""
    home = next(model.parameters()).device
    model.to(args.device)
    try:
        yield model
    finally:
        model.to(home)
