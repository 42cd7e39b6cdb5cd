"""``IWTrainingArguments``: ``TrainingArguments`` plus the IW-LoRA fields (``iw_*`` = the fields of ``IWSettings``).

The fields live on the arguments (not on the trainer) so ``HfArgumentParser``, YAML configs and
``Trainer.hyperparameter_search`` (which sets trial values on ``args``) all reach them. Defaults and validation are
``IWSettings``'; :attr:`IWTrainingArguments.iw_settings` is the validated view.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import TrainingArguments

from .settings import CALIBRATIONS, NORMALIZATIONS, PENALTY_FORMS, IWSettings


@dataclass
class IWFields:
    r"""
    The IW-LoRA fields, for any arguments dataclass: list it before the base, ``class X(IWFields, SFTConfig)``, so
    the base's fields keep their positions (``IWTrainingArguments``, ``iwtrainer.sft.IWSFTConfig``).

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
            many matrices the penalty is then close to a uniform L2), `"max"` (`w_k = s_k/max_j s_j`, the most
            sensitive matrix is not penalised) or `"uniform"` (`w_k = 0`: every coefficient is 1, a plain L2 on
            the LoRA updates, "ΔL2" — no calibration runs).
        iw_penalty (`str`, *optional*, defaults to `"delta"`):
            `"delta"`: the exact `‖Δ_k‖_F² = s²‖B_k A_k‖_F²` (via r×r Gram matrices); `"factors"`: the source
            code's surrogate `‖A_k‖_F² + ‖B_k‖_F²`.
        iw_calibration (`str`, *optional*, defaults to `"separate"`):
            `"separate"`: the sensitivities come from a forward/backward pass over N batches before step 0 (no
            optimizer step). `"online"`: from the backward passes of the first N training steps themselves (no extra
            pass; the base-weight gradient `Σ G_cᵀ X_c` is accumulated in hooks), the penalty switching on at step N.
        iw_calib_group (`int`, *optional*, defaults to `1`):
            Separate calibration: up to this many batches of the same shape stacked into one forward/backward pass,
            each batch's gradient `Σ G_cᵀ X_c` still taken apart (one batched matmul), so `s_k` is the same up to
            float rounding in up to this many times fewer passes, at this many times the calibration's activation
            memory. Pad to a few lengths (`pad_to_multiple_of`) so batches share shapes. One process, no gradient
            accumulation, and no LoRA layer run on a tensor shared by the batch (DeBERTa's relative positions).
    """

    iw_alpha: float = field(
        default=IWSettings.alpha,
        metadata={"help": "Strength α of the IW penalty α·Σ_k (1−w_k)^β·‖Δ_k‖²; 0 = plain LoRA (no calibration)."},
    )
    iw_beta: float = field(default=IWSettings.beta, metadata={"help": "Exponent β of the coefficient (1−w_k)^β."})
    iw_calib_steps: int = field(
        default=IWSettings.calib_steps,
        metadata={"help": "Calibration batches N used to average the sensitivities s_k."},
    )
    iw_normalize: str = field(
        default=IWSettings.normalize,
        metadata={
            "help": "Importance normalisation: 'sum' (w=s/Σs), 'max' (w=s/max s) or 'uniform' (w=0: every "
            "coefficient 1, a plain L2 on the LoRA updates; no calibration). On all-mpnet-base-v2 'uniform' "
            "scored level with 'sum' and 'max' at the same cost minus calibration (benchmarks/results/"
            "GLUE_MPNET.md).",
            "choices": NORMALIZATIONS,
        },
    )
    iw_penalty: str = field(
        default=IWSettings.penalty,
        metadata={"help": "Penalty form: 'delta' (exact ‖Δ‖²) or 'factors' (‖A‖²+‖B‖²).", "choices": PENALTY_FORMS},
    )
    iw_calibration: str = field(
        default=IWSettings.calibration,
        metadata={
            "help": "Where the sensitivities come from: 'separate' (a pass over N batches before step 0) or 'online' "
            "(the first N training steps' own backward passes; the penalty starts at step N).",
            "choices": CALIBRATIONS,
        },
    )
    iw_calib_group: int = field(
        default=IWSettings.calib_group,
        metadata={
            "help": "Separate calibration: stack up to this many same-shaped batches into one forward/backward pass "
            "(each batch's gradient still taken apart: same s_k up to rounding, fewer passes, × activation memory; "
            "one process, no gradient accumulation)."
        },
    )

    @property
    def iw_settings(self) -> IWSettings:
        """The ``iw_*`` fields as validated :class:`IWSettings` (read anew: search trials set fields on ``args``)."""
        return IWSettings.from_args(self)

    def check_iw_fields(self) -> None:
        """Validate the ``iw_*`` fields and the batch sizes (the Trainer would fail later inside a DataLoader,
        not naming the argument); call from ``__post_init__`` after the base class's."""
        self.iw_settings  # noqa: B018 - validates, naming the iw_* argument
        for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"--{name} must be an integer >= 1, got {value!r}")


@dataclass
class IWTrainingArguments(IWFields, TrainingArguments):
    r"""
    Arguments for [`IWTrainer`]: everything of [`~transformers.TrainingArguments`] plus the ``iw_*`` fields of
    [`IWFields`] (α, β, N, normalisation and penalty form; defaults and validation are [`IWSettings`]').
    """

    def __post_init__(self):
        super().__post_init__()
        self.check_iw_fields()
