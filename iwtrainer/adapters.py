"""Wrapping the model for ``--adapter`` (LoRA / IW-LoRA, AdaLoRA, full, WSA) and ``--rank_allocation``."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .adalora import AdaLoraCallback, adalora_config, adalora_schedule
from .arguments import AdapterArguments, DataTrainingArguments
from .data import data_collator_for
from .modeling import (
    candidates_message,
    discover_target_modules,
    find_head_modules,
    match_target_modules,
    targets_regex,
)
from .schedule import (
    RankCalibration,
    _CalibratedRankCallback,
    _check_warmup,
    _EmaRankCallback,
    _has_length,
    _world_size,
    estimate_train_steps,
    optimizer_steps_per_epoch,
)
from .targets import find_lora_targets
from .training_args import IWTrainingArguments


@dataclass
class AdapterSetup:
    """The model to train and what the trainer needs beside it."""

    model: nn.Module
    adapter: str
    target_names: list[str]
    head_names: list[str]
    regularizers: dict[str, Callable[[nn.Module], torch.Tensor]] = field(default_factory=dict)
    callbacks: list[Any] = field(default_factory=list)
    wsa_config: Any = None
    adapter_args: AdapterArguments | None = None
    rank_calibration: RankCalibration | None = None
    """``--rank_allocation_mode calibration``: allocates the ranks in :meth:`prepare_training`; holds the record."""
    _prepared: bool = field(default=False, init=False, repr=False)

    def prepare_training(
        self,
        splits: Mapping[str, Sequence[tuple[str, Any]]],
        tokenizer: Any,
        data_args: DataTrainingArguments,
        training_args: IWTrainingArguments,
    ) -> None:
        """The adapter steps that need the tokenized training split; call after tokenizing, before the Trainer.

        Checks the run length against the AdaLoRA schedule and the gradnorm warm-up (``ValueError`` naming the flags,
        before anything is written) and, for ``--rank_allocation_mode calibration``, measures the sensitivities and
        rebuilds the LoRA layers with their allocated ranks. ``splits`` is :func:`tokenize_splits`' result. Runs once;
        a no-op without training data.
        """
        train = splits.get("train") or []
        if self._prepared or not train:
            return
        dataset = train[0][1]
        args = self.adapter_args
        if args is not None and _has_length(dataset):
            steps = estimate_train_steps(len(dataset), training_args)
            if self.adapter == "adalora":
                adalora_schedule(steps, args.adalora_tinit_frac, args.adalora_tfinal_frac)
            if args.rank_allocation == "gradnorm" and args.rank_allocation_mode == "ema":
                _check_warmup(args.rank_warmup_steps, steps, optimizer_steps_per_epoch(len(dataset), training_args))
        if self.rank_calibration is not None:
            collator = data_collator_for(tokenizer, data_args, training_args)
            self.rank_calibration.run(self.model, dataset, collator, training_args)
        self._prepared = True


def build_adapter(
    model: nn.Module,
    adapter_args: AdapterArguments,
    training_args: IWTrainingArguments,
    missing_keys: Iterable[str] = (),
) -> AdapterSetup:
    """Wrap ``model`` for ``--adapter``; raises ``ValueError`` (one line, naming the flag) on bad targets.

    Steps that need the tokenized training data follow in :meth:`AdapterSetup.prepare_training`.
    """
    heads = find_head_modules(model, missing_keys)
    adapter = adapter_args.adapter
    if adapter == "full":
        return AdapterSetup(model, adapter, [], heads)
    if adapter_args.lora_target_modules:
        targets = match_target_modules(model, adapter_args.lora_target_modules, exclude=heads)
    else:
        targets = discover_target_modules(model, exclude=heads)
        if not targets:
            raise ValueError(
                f"found no nn.Linear/Conv1D inside the transformer blocks of {type(model).__name__}; pass "
                f"--lora_target_modules; candidates: {candidates_message(model, heads)}"
            )
    spec = targets_regex(model, targets)
    if adapter == "wsa":
        setup = build_wsa(model, adapter_args, spec, targets, heads)
    elif adapter == "adalora":
        setup = build_adalora(model, adapter_args, training_args, spec, targets, heads)
    else:
        setup = build_lora(model, adapter_args, spec, targets, heads)
        apply_rank_allocation(setup, adapter_args, training_args)
    setup.adapter_args = adapter_args
    return setup


def build_lora(
    model: nn.Module, adapter_args: AdapterArguments, spec: str, targets: list[str], heads: list[str]
) -> AdapterSetup:
    """peft LoRA on ``spec`` with the head in ``modules_to_save``; IW-LoRA is this plus ``--iw_alpha > 0``."""
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers.pytorch_utils import Conv1D

    modules = dict(model.named_modules())
    conv1d = [n for n in targets if isinstance(modules[n], Conv1D)]
    if conv1d and len(conv1d) != len(targets):
        raise ValueError(
            "--lora_target_modules mixes nn.Linear and GPT-2 Conv1D layers; peft's fan_in_fan_out is one setting "
            "per adapter, pick modules of one kind"
        )
    config = LoraConfig(
        task_type=TaskType.SEQ_CLS,
        r=adapter_args.lora_r,
        lora_alpha=adapter_args.lora_alpha,
        lora_dropout=adapter_args.lora_dropout,
        target_modules=spec,
        modules_to_save=list(heads) or None,
        fan_in_fan_out=bool(conv1d),
    )
    return AdapterSetup(get_peft_model(model, config), "lora", targets, heads)


def build_wsa(
    model: nn.Module, adapter_args: AdapterArguments, spec: str, targets: list[str], heads: list[str]
) -> AdapterSetup:
    """Weighted Spectral Adapter on the same targets; ``λ·Σ‖tanh(s)‖₁`` goes to the trainer as a regularizer."""
    from .wsa import WSAConfig, apply_wsa, wsa_gate_l1

    config = WSAConfig(
        r_init=adapter_args.wsa_r_init,
        gate_l1=adapter_args.wsa_gate_l1,
        prune_threshold=adapter_args.wsa_prune_threshold,
        target_modules=spec,
        modules_to_save=list(heads) or None,
    )
    model = apply_wsa(model, config)
    lam = config.gate_l1
    regularizers = {"wsa_gate_l1": lambda m: lam * wsa_gate_l1(m)} if lam > 0 else {}
    return AdapterSetup(model, "wsa", targets, heads, regularizers=regularizers, wsa_config=config)


_PROVISIONAL_TOTAL_STEPS = 10_000
"""AdaLoRA's ``total_step`` when neither ``--max_steps`` nor the data size is known yet; ``AdaLoraCallback`` sets the
run's real length (and re-derives tinit/tfinal from the fractions) at ``on_train_begin``."""


def build_adalora(
    model: nn.Module,
    adapter_args: AdapterArguments,
    training_args: IWTrainingArguments,
    spec: str,
    targets: list[str],
    heads: list[str],
) -> AdapterSetup:
    """peft AdaLoRA on the LoRA targets with LoRA's average rank budget, driven by ``AdaLoraCallback``.

    ``total_step`` is provisional (``--max_steps``, else checked against the data size in ``prepare_training``); the
    callback corrects it to the Trainer's ``max_steps`` at ``on_train_begin``.
    """
    from peft import get_peft_model

    total = training_args.max_steps if training_args.max_steps > 0 else _PROVISIONAL_TOTAL_STEPS
    config = adalora_config(
        spec,
        lora_r=adapter_args.lora_r,
        lora_alpha=adapter_args.lora_alpha,
        lora_dropout=adapter_args.lora_dropout,
        total_step=total,
        tinit_frac=adapter_args.adalora_tinit_frac,
        tfinal_frac=adapter_args.adalora_tfinal_frac,
        delta_t=adapter_args.adalora_delta_t,
        orth_reg_weight=adapter_args.adalora_orth_reg_weight,
        modules_to_save=list(heads) or None,
    )
    callback = AdaLoraCallback(adapter_args.adalora_tinit_frac, adapter_args.adalora_tfinal_frac)
    return AdapterSetup(get_peft_model(model, config), "adalora", targets, heads, callbacks=[callback])


def apply_rank_allocation(
    setup: AdapterSetup, adapter_args: AdapterArguments, training_args: IWTrainingArguments
) -> None:
    """``--rank_allocation gradnorm`` on a LoRA setup: checks the budget, then adds the mode's callback.

    ema: a ``GradNormRankCallback`` (single process). calibration: ``setup.rank_calibration``, run by
    ``prepare_training``, plus a callback that writes its record when training ends.
    """
    if adapter_args.rank_allocation == "none":
        return
    lora_targets = find_lora_targets(setup.model)
    caps = {t.name: min(t.lora_A.shape[1], t.lora_B.shape[0]) for t in lora_targets}
    k = len(caps)
    budget = adapter_args.rank_budget if adapter_args.rank_budget is not None else k * adapter_args.lora_r
    flag = f"--rank_budget {budget}" if adapter_args.rank_budget is not None else f"the rank budget {budget}"
    if budget < adapter_args.rank_min * k:
        raise ValueError(
            f"{flag} is below --rank_min {adapter_args.rank_min} × {k} adapted matrices; lower --rank_min or raise "
            "--rank_budget"
        )
    if budget > sum(caps.values()):
        raise ValueError(
            f"{flag} exceeds {sum(caps.values())}, the largest total rank of the {k} adapted matrices "
            "(Σ min(d_in, d_out)); lower --rank_budget / --lora_r"
        )
    smallest = min(caps, key=caps.__getitem__)
    if adapter_args.rank_min > caps[smallest]:
        raise ValueError(
            f"--rank_min {adapter_args.rank_min} exceeds min(d_in, d_out) = {caps[smallest]} of {smallest}"
        )
    if adapter_args.rank_allocation_mode == "ema":
        world = _world_size(training_args)
        if world > 1 or training_args.deepspeed or training_args.fsdp:
            where = f"{world} processes" if world > 1 else "DeepSpeed/FSDP"
            raise ValueError(
                "--rank_allocation_mode ema rebuilds the LoRA layers mid-run, which only works in a single process, "
                f"not with {where}: use --rank_allocation_mode calibration"
            )
        warmup = adapter_args.rank_warmup_steps
        if warmup is not None and training_args.max_steps > 0:
            _check_warmup(warmup, training_args.max_steps, warmup)
        setup.callbacks.append(_EmaRankCallback(warmup, total_rank=budget, min_rank=adapter_args.rank_min))
    else:
        setup.rank_calibration = RankCalibration(budget, adapter_args.rank_min, caps)
        setup.callbacks.append(_CalibratedRankCallback(setup.rank_calibration))


def count_trainable_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
