"""``IWSFTTrainer``: trl's ``SFTTrainer`` with IW-LoRA (``IWMixin`` + ``SFTTrainer``); ``pip install iwtrainer[trl]``.

Supervised fine-tuning of causal LMs: the token-level loss is normalised by ``num_items_in_batch`` (the label tokens
of the whole optimizer step), calibration weights each micro-batch by its label tokens, and the penalty enters each
optimizer step once — so the update does not depend on the gradient-accumulation split. Settings from
``iw=IWSettings(...)`` beside a ``trl.SFTConfig``, or the ``iw_*`` fields of :class:`IWSFTConfig` (what a script
parses with ``TrlParser``: ``--iw_alpha 1e-3``, or ``iw_alpha: 1e-3`` in its ``--config`` file).
"""

from __future__ import annotations

from dataclasses import dataclass

try:
    from trl import SFTConfig, SFTTrainer
except ImportError as error:  # pragma: no cover - exercised only without trl
    raise ImportError("iwtrainer.IWSFTTrainer needs trl: pip install 'iwtrainer[trl]'") from error

from .mixin import IWMixin
from .training_args import IWFields


@dataclass
class IWSFTConfig(IWFields, SFTConfig):
    r"""trl's ``SFTConfig`` plus the ``iw_*`` fields of [`IWFields`] (α, β, N, normalisation, penalty form)."""

    def __post_init__(self):
        super().__post_init__()
        self.check_iw_fields()


class IWSFTTrainer(IWMixin, SFTTrainer):
    """trl's ``SFTTrainer`` plus IW-LoRA: ``IWSFTTrainer(model, args=SFTConfig(...), iw=IWSettings(alpha=1e-3),
    peft_config=LoraConfig(...), train_dataset=...)``. Everything else is ``SFTTrainer``'s and [`IWMixin`]'s."""
