"""``IWSettings``: the IW-LoRA hyperparameters, their defaults and their validation, in one place.

    L_total = L_task + α · Σ_k (1 − w_k)^β · ‖Δ_k‖_F²,   w_k from s_k = mean_b ‖∂L/∂W_k‖_F over N batches

``IWTrainingArguments`` (the ``iw_*`` fields), ``SensitivityCallback`` and ``IWTrainer`` all read their values through
this class, so a default or a bound is written once. Messages name the ``iw_*`` argument a user sets.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from typing import Any

NORMALIZATIONS = ("sum", "max", "uniform")
PENALTY_FORMS = ("delta", "factors")
CALIBRATIONS = ("separate", "online")


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class IWSettings:
    """
    Parameters:
        alpha (`float`, defaults to `1e-4`): α, the strength of the penalty; `0` disables penalty and calibration.
        beta (`float`, defaults to `1.0`): β, the exponent of the per-matrix coefficient `(1 − w_k)^β`.
        calib_steps (`int`, defaults to `150`): N, calibration batches (optimizer steps' worth of data).
        normalize (`str`, defaults to `"sum"`): `"sum"` (`w_k = s_k/Σ_j s_j`), `"max"` (`w_k = s_k/max_j s_j`) or
            `"uniform"` (`w_k = 0`: every coefficient is 1, a plain L2 on the LoRA updates, "ΔL2"; no calibration).
        penalty (`str`, defaults to `"delta"`): `"delta"` (exact `‖Δ_k‖_F²`) or `"factors"` (`‖A_k‖² + ‖B_k‖²`).
        calibration (`str`, defaults to `"separate"`): `"separate"` (a forward/backward pass over N batches before step
            0, no optimizer step) or `"online"` (measured inside the first N training steps from their own backward
            passes — no extra forward pass; the penalty starts at step N, when the importance is known).
        calib_group (`int`, defaults to `1`): separate calibration only: up to this many same-shaped batches stacked
            into one forward/backward pass, each batch's gradient still taken apart, so the sensitivities are the
            same up to float rounding in fewer, larger passes (× the activation memory); one process, no gradient
            accumulation, and no LoRA layer run on a tensor shared across the batch (DeBERTa's relative positions).
    """

    alpha: float = 1e-4
    beta: float = 1.0
    calib_steps: int = 150
    normalize: str = "sum"
    penalty: str = "delta"
    calibration: str = "separate"
    calib_group: int = 1

    def __post_init__(self) -> None:
        if not _is_real(self.alpha) or self.alpha < 0:
            raise ValueError(f"iw_alpha must be a finite number >= 0, got {self.alpha!r}")
        if not _is_real(self.beta) or self.beta < 0:
            raise ValueError(f"iw_beta must be a finite number >= 0, got {self.beta!r}")
        if not isinstance(self.calib_steps, int) or isinstance(self.calib_steps, bool) or self.calib_steps < 1:
            raise ValueError(f"iw_calib_steps must be an integer >= 1, got {self.calib_steps!r}")
        if self.normalize not in NORMALIZATIONS:
            raise ValueError(f"iw_normalize must be one of {NORMALIZATIONS}, got {self.normalize!r}")
        if self.penalty not in PENALTY_FORMS:
            raise ValueError(f"iw_penalty must be one of {PENALTY_FORMS}, got {self.penalty!r}")
        if self.calibration not in CALIBRATIONS:
            raise ValueError(f"iw_calibration must be one of {CALIBRATIONS}, got {self.calibration!r}")
        if not isinstance(self.calib_group, int) or isinstance(self.calib_group, bool) or self.calib_group < 1:
            raise ValueError(f"iw_calib_group must be an integer >= 1, got {self.calib_group!r}")
        if self.calib_group > 1 and self.calibration != "separate":
            raise ValueError(
                f"iw_calib_group={self.calib_group} stacks the batches of the separate calibration pass; "
                f"iw_calibration={self.calibration!r} has none: leave iw_calib_group at 1"
            )

    @property
    def active(self) -> bool:
        """Whether the penalty runs: ``alpha > 0``."""
        return self.alpha > 0

    @property
    def calibrates(self) -> bool:
        """Whether sensitivities are measured before step 0: the penalty runs and its weights depend on them."""
        return self.active and self.normalize != "uniform"

    @classmethod
    def from_args(cls, args: Any, **overrides: Any) -> IWSettings:
        """The ``iw_<field>`` attributes of ``args`` (absent ones take the defaults), then non-``None`` overrides."""
        values = {f.name: getattr(args, f"iw_{f.name}") for f in fields(cls) if hasattr(args, f"iw_{f.name}")}
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def as_args(self) -> dict[str, Any]:
        """``{"iw_alpha": ..., ...}``: the argument names users set (and the importance record's keys)."""
        return {f"iw_{f.name}": getattr(self, f.name) for f in fields(self)}

    def replace(self, **changes: Any) -> IWSettings:
        return replace(self, **changes)
