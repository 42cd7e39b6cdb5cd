"""``IWTrainer``: the HF ``Trainer`` with the IW-LoRA penalty in ``compute_loss`` — ``IWMixin`` + ``Trainer``.

L_total = L_task + α · Σ_k (1 − w_k)^β · ‖Δ_k‖_F²

The behaviour lives in :class:`iwtrainer.mixin.IWMixin`, so any other ``Trainer`` subclass gets it the same way
(``class MyTrainer(IWMixin, SFTTrainer)``; trl's is shipped as ``iwtrainer.IWSFTTrainer``).
"""

from __future__ import annotations

from transformers import Trainer

from .mixin import IWMixin, model_uses_num_items

__all__ = ["IWTrainer", "model_uses_num_items"]


class IWTrainer(IWMixin, Trainer):
    """A ``Trainer`` for peft LoRA models that adds the importance-weighted penalty to the task loss.

    Settings come from ``args=IWTrainingArguments(...)`` (its ``iw_*`` fields; the form ``HfArgumentParser``, YAML
    configs and ``hyperparameter_search`` use) or from ``iw=IWSettings(...)`` beside plain ``TrainingArguments``.
    With ``alpha=0`` it behaves exactly like ``Trainer``. Everything else is [`IWMixin`]'s.
    """
