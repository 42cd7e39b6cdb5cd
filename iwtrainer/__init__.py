"""iwtrainer: Importance-Weighted LoRA (IW-LoRA) for the Hugging Face Trainer.

L_total = L_task + α · Σ_k (1 − w_k)^β · ‖Δ_k‖_F²,   w_k from gradient sensitivities ‖∂L/∂W_k‖_F
"""

from . import _quiet  # noqa: F401 - first: before anything imports peft (and through it bitsandbytes)
from .callbacks import SensitivityCallback
from .guard import DivergenceGuard, TrainingDiverged
from .importance import (
    IMPORTANCE_FILE,
    importance_record,
    importance_weights,
    load_importance,
    penalty_coefficients,
    save_importance,
)
from .mixin import IWMixin
from .penalty import IWPenalty, iw_penalty
from .sensitivity import compute_sensitivities, preserved_training_state
from .settings import IWSettings
from .targets import LoraTarget, find_lora_targets
from .trainer import IWTrainer
from .training_args import IWFields, IWTrainingArguments

__version__ = "0.1.0"


def __getattr__(name: str):
    if name in ("IWSFTTrainer", "IWSFTConfig"):  # trl is optional (pip install 'iwtrainer[trl]'): loaded on use
        from . import sft

        return getattr(sft, name)
    raise AttributeError(f"module 'iwtrainer' has no attribute {name!r}")


__all__ = [
    "IMPORTANCE_FILE",
    "DivergenceGuard",
    "IWFields",
    "IWMixin",
    "IWPenalty",
    "IWSFTConfig",
    "IWSFTTrainer",
    "IWSettings",
    "IWTrainer",
    "IWTrainingArguments",
    "LoraTarget",
    "SensitivityCallback",
    "TrainingDiverged",
    "compute_sensitivities",
    "find_lora_targets",
    "importance_record",
    "importance_weights",
    "iw_penalty",
    "load_importance",
    "penalty_coefficients",
    "preserved_training_state",
    "save_importance",
]
