"""``IWTrainingArguments``: ``TrainingArguments`` plus the IW-LoRA fields.

The fields live on the arguments (not on the trainer) so ``HfArgumentParser``, YAML configs and
``Trainer.hyperparameter_search`` (which sets trial values on ``args``) all reach them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from transformers import TrainingArguments

from .importance import NORMALIZATIONS
from .penalty import PENALTY_FORMS


@dataclass
class IWTrainingArguments(TrainingArguments):
    r"""
    Arguments for [`IWTrainer`]: everything of [`~transformers.TrainingArguments`] plus

    Parameters:
        iw_alpha (`float`, *optional*, defaults to `1e-4`):
            α, the strength of the importance-weighted penalty `α·Σ_k (1−w_k)^β·‖Δ_k‖_F²` added to the task loss.
            `0` disables the penalty *and* the calibration: training is then plain LoRA.
        iw_beta (`float`, *optional*, defaults to `1.0`):
            β, the exponent of the per-matrix coefficient `(1−w_k)^β`.
        iw_calib_steps (`int`, *optional*, defaults to `150`):
            N, the number of training batches (optimizer steps' worth of data) over which the sensitivities
            `s_k = mean_b ‖∂L/∂W_k‖_F` are averaged before optimizer step 0. No optimizer step is taken.
        iw_normalize (`str`, *optional*, defaults to `"sum"`):
            How importance weights are normalised: `"sum"` (`w_k = s_k/Σ_j s_j`, the source's definition; with
            many matrices the penalty is then close to a uniform L2) or `"max"` (`w_k = s_k/max_j s_j`, the most
            sensitive matrix is not penalised).
        iw_penalty (`str`, *optional*, defaults to `"delta"`):
            `"delta"`: the exact `‖Δ_k‖_F² = s²‖B_k A_k‖_F²` (via r×r Gram matrices); `"factors"`: the source
            code's surrogate `‖A_k‖_F² + ‖B_k‖_F²`.
    """

    iw_alpha: float = field(
        default=1e-4,
        metadata={"help": "Strength α of the IW penalty α·Σ_k (1−w_k)^β·‖Δ_k‖²; 0 = plain LoRA (no calibration)."},
    )
    iw_beta: float = field(default=1.0, metadata={"help": "Exponent β of the coefficient (1−w_k)^β."})
    iw_calib_steps: int = field(
        default=150, metadata={"help": "Calibration batches N used to average the sensitivities s_k."}
    )
    iw_normalize: str = field(
        default="sum",
        metadata={"help": "Importance normalisation: 'sum' (w=s/Σs) or 'max' (w=s/max s).", "choices": NORMALIZATIONS},
    )
    iw_penalty: str = field(
        default="delta",
        metadata={"help": "Penalty form: 'delta' (exact ‖Δ‖²) or 'factors' (‖A‖²+‖B‖²).", "choices": PENALTY_FORMS},
    )

    def __post_init__(self):
        super().__post_init__()
        validate_iw_settings(self)


def check_iw_values(
    alpha: float | None = None,
    beta: float | None = None,
    calib_steps: int | None = None,
    normalize: str | None = None,
    penalty: str | None = None,
) -> None:
    """Raise ``ValueError`` naming the argument for an out-of-range IW setting; ``None`` means "not given"."""
    if alpha is not None and (not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha < 0):
        raise ValueError(f"iw_alpha must be a finite number >= 0, got {alpha!r}")
    if beta is not None and (not isinstance(beta, (int, float)) or not math.isfinite(beta) or beta < 0):
        raise ValueError(f"iw_beta must be a finite number >= 0, got {beta!r}")
    if calib_steps is not None and (
        not isinstance(calib_steps, int) or isinstance(calib_steps, bool) or calib_steps < 1
    ):
        raise ValueError(f"iw_calib_steps must be an integer >= 1, got {calib_steps!r}")
    if normalize is not None and normalize not in NORMALIZATIONS:
        raise ValueError(f"iw_normalize must be one of {NORMALIZATIONS}, got {normalize!r}")
    if penalty is not None and penalty not in PENALTY_FORMS:
        raise ValueError(f"iw_penalty must be one of {PENALTY_FORMS}, got {penalty!r}")


def validate_iw_settings(args: object) -> None:
    """``check_iw_values`` on the IW fields of ``args`` (also re-run on HPO trial values)."""
    check_iw_values(
        getattr(args, "iw_alpha", None),
        getattr(args, "iw_beta", None),
        getattr(args, "iw_calib_steps", None),
        getattr(args, "iw_normalize", None),
        getattr(args, "iw_penalty", None),
    )
