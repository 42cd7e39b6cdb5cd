"""EVA through peft (``init_lora_weights="eva"``): LoRA's ``A`` from the SVD of each layer's input activations.

    A_k ← top-r_k right singular vectors of X_k (the layer's inputs over training batches, incremental SVD),  B = 0

with the ranks ``r_k`` redistributed by explained variance (``--eva_rho`` > 1 lets a matrix take up to ρ·r; Σ r_k is
kept). ``B = 0`` keeps ``Δ_k = 0`` at step 0, so the IW penalty applies (``uses_iw``) and is computed on the ranks EVA
chose. The initialisation runs in :meth:`EvaMethod.prepare`, on shuffled training batches without labels (sequence-
level labels are not a token mask), before the Trainer exists: EVA replaces LoRA layers whose rank changes, which
must happen before the optimizer holds their parameters (a ``TrainerCallback``'s ``on_train_begin`` runs after the
optimizer is built).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from ..targets import mark_layout_changed
from ..training_args import IWTrainingArguments
from .base import Method, MethodContext, MethodSetup, on_training_device, shuffled_training_batches
from .lora import lora_config


@dataclass
class EvaArguments:
    """``--adapter eva``: peft's ``EvaConfig`` knobs."""

    eva_rho: float = field(
        default=2.0, metadata={"help": "EVA: rank redistribution; a matrix may take up to rho × --lora_r (1: none)."}
    )
    eva_tau: float = field(
        default=0.99, metadata={"help": "EVA: cosine-similarity threshold at which the incremental SVD has converged."}
    )

    def __post_init__(self) -> None:
        if self.eva_rho < 1:
            raise ValueError(f"--eva_rho must be >= 1, got {self.eva_rho}")
        if not 0 < self.eva_tau <= 1:
            raise ValueError(f"--eva_tau must be in (0, 1], got {self.eva_tau}")


class EvaMethod(Method):
    name = "eva"
    arguments = EvaArguments
    uses_iw = True

    def build(self, model: nn.Module, ctx: MethodContext) -> MethodSetup:
        from peft import EvaConfig, get_peft_model

        opts: EvaArguments = ctx.options
        eva = EvaConfig(rho=opts.eva_rho, tau=opts.eva_tau, use_label_mask=False)
        config = lora_config(model, ctx, init_lora_weights="eva", eva_config=eva)
        return MethodSetup(get_peft_model(model, config), self.name, ctx.targets, ctx.heads)

    def prepare(self, setup: MethodSetup, train_dataset: Any, collator: Callable, args: IWTrainingArguments) -> None:
        from peft import initialize_lora_eva_weights

        columns = getattr(train_dataset, "column_names", None)
        if columns is not None:  # inputs only: a [batch] label vector is no token mask
            keep = {"input_ids", "attention_mask", "token_type_ids"}
            train_dataset = train_dataset.remove_columns([c for c in columns if c not in keep])
        # peft wants each batch as a plain dict, not a BatchEncoding
        loader = shuffled_training_batches(train_dataset, lambda rows: dict(collator(rows)), args)
        model = setup.model
        with on_training_device(model, args):
            initialize_lora_eva_weights(model, loader, show_progress_bar=not args.disable_tqdm)
        mark_layout_changed(model)
