"""``IWMixin``: the IW-LoRA behaviour for any ``Trainer`` subclass (``class MyTrainer(IWMixin, SFTTrainer)``).

L_total = L_task + α · Σ_k (1 − w_k)^β · ‖Δ_k‖_F²

Calibration before step 0 (a [`SensitivityCallback`]), the penalty added in ``compute_loss`` exactly once per optimizer
step whatever the gradient accumulation and the loss normalisation (``num_items_in_batch`` or a per-batch mean), the
``loss_task`` / ``iw_penalty`` / ``iw_coefficient/*`` logs, the importance record in every checkpoint and its reuse on
resume, and the divergence guard. The mixin only overrides ``Trainer`` hooks and calls ``super()``, so it composes
with subclasses that override the same hooks (trl's ``SFTTrainer`` overrides ``compute_loss`` and ``log``).

Settings — one rule: ``iw=IWSettings(...)`` passed to the trainer, *or* the ``iw_*`` fields of ``args``
([`IWTrainingArguments`], read anew at every ``train()`` so ``hyperparameter_search`` trials reach them); never both.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from .callbacks import SensitivityCallback
from .compiled import run_eagerly
from .guard import DivergenceGuard
from .penalty import IWPenalty
from .settings import IWSettings
from .targets import find_lora_targets, layout_version, transformers_model, unwrap_model


def model_uses_num_items(model: nn.Module) -> bool:
    """Whether the model's forward normalises its loss by ``num_items_in_batch`` (through ``self.loss_function``)."""
    inner = transformers_model(model)
    if hasattr(inner, "accepts_loss_kwargs"):
        return bool(inner.accepts_loss_kwargs)
    try:
        source = inspect.getsource(type(inner).forward)
    except (OSError, TypeError):
        return True  # cannot tell: keep the Trainer's own decision
    return "loss_function" in source or "num_items_in_batch" in source


def has_iw_fields(args: Any) -> bool:
    """Whether ``args`` carries the ``iw_*`` fields (``IWTrainingArguments`` or a user's dataclass with them)."""
    return hasattr(args, "iw_alpha")


class IWMixin:
    """The IW-LoRA penalty and calibration for a ``Trainer`` subclass: put it first, ``class T(IWMixin, SFTTrainer)``.

    It installs a [`SensitivityCallback`] (or uses one passed in ``callbacks``) that measures the per-matrix
    sensitivities before optimizer step 0, and adds ``α·Σ_k (1−w_k)^β·‖Δ_k‖_F²`` to the training loss. With
    ``alpha=0`` the trainer behaves exactly like the class it is mixed into. Logs ``loss_task`` and ``iw_penalty``
    (the α-scaled term) beside ``loss``, and the coefficients ``iw_coefficient/<matrix>`` once per run.

    Keyword arguments (all others go to the trainer class):
        iw: the [`IWSettings`]; leave it out when ``args`` has ``iw_*`` fields ([`IWTrainingArguments`]). Passing both
            is refused, passing neither too: there is one source of the settings.
        regularizers: maps a log name to ``fn(model) -> Tensor``, a further term added to the training loss through
            the same accumulation-safe path (e.g. WSA's ``λ·‖g‖₁``).

    Gradient accumulation: the penalty's contribution to each optimizer step is ``α·∇P`` whatever the accumulation
    steps, the loss normalisation (token-level losses normalised by ``num_items_in_batch``, or per-micro-batch means)
    and the number of processes. Its closed-form gradient is added once, after the step's last backward (see
    :meth:`training_step`); terms that go through autograd (regularisers, the ``"autograd"`` backend) are divided by
    the accumulation steps exactly when the Trainer will *not* divide the returned loss itself. Neither is multiplied
    by the process count (DDP averages identical gradients). For
    models whose loss ignores ``num_items_in_batch`` (sequence classifiers), the Trainer is told to divide the loss by
    the accumulation steps, so 16 × 2 gives the same update as 32 × 1.

    Every ``train()`` rebuilds the penalty on the model it trains; during ``hyperparameter_search`` each trial's
    ``iw_importance.json`` goes to its run folder (``<output_dir>/run-N``) like its checkpoints.

    ``torch_compile=True``: the Trainer compiles the model's forward and backward; the penalty gradient, the loss terms
    and the logs run outside that graph (no graph break, no recompile), and calibration runs eagerly, online
    calibration's first N steps included (:mod:`iwtrainer.compiled`; ``tests/test_compile.py``).
    """

    def __init__(
        self,
        *args: Any,
        iw: IWSettings | None = None,
        regularizers: Mapping[str, Callable[[nn.Module], torch.Tensor]] | None = None,
        **kwargs: Any,
    ):
        if iw is not None and not isinstance(iw, IWSettings):
            raise TypeError(f"{type(self).__name__}: iw must be an iwtrainer.IWSettings, got {type(iw).__name__}")
        super().__init__(*args, **kwargs)
        name = type(self).__name__
        if iw is not None and has_iw_fields(self.args):
            raise ValueError(
                f"{name}: IW settings given twice, as iw=IWSettings(...) and as the iw_* fields of "
                f"{type(self.args).__name__}; pass plain TrainingArguments with iw=, or IWTrainingArguments alone"
            )
        if iw is None and not has_iw_fields(self.args):
            raise TypeError(
                f"{name} needs the IW settings: iw=IWSettings(alpha=...) or args=IWTrainingArguments(...), "
                f"got args of type {type(self.args).__name__} without iw_* fields"
            )
        self._iw_fixed = iw
        self._check_loss_kwargs(self.model)  # the model= argument, or the one Trainer built with model_init
        found = [cb for cb in self.callback_handler.callbacks if isinstance(cb, SensitivityCallback)]
        self.iw_callback: SensitivityCallback = found[0] if found else SensitivityCallback()
        if not found:
            self.add_callback(self.iw_callback)
        self.iw_callback.iw = iw
        self.guard = DivergenceGuard()  # a non-finite loss, penalty or gradient stops the run (TrainingDiverged)
        self.add_callback(self.guard)
        self._iw_penalty: IWPenalty | None = None
        self._iw_penalty_key: tuple | None = None
        self._iw_unwrapped: tuple[nn.Module, nn.Module] | None = None  # (model as passed, unwrap_model of it)
        self.regularizers = dict(regularizers or {})
        # "grad": closed-form penalty gradient added to .grad in one fused op per shape group (fast, default);
        # "autograd": the penalty joins the loss graph (used where .grad is not a plain tensor, e.g. DeepSpeed).
        self.penalty_backend = "autograd" if self.is_deepspeed_enabled else "grad"
        self._iw_logs: dict[str, torch.Tensor] = {}
        self._iw_coefficients_logged = False
        self._iw_last_logged_step = 0
        if self.model is not None and self.iw_settings.active:  # the trained model: trl may have wrapped it in peft
            self._check_supported()
            find_lora_targets(self.model, self.iw_callback.adapter_name)  # fail at construction, not after calibration

    @property
    def iw_settings(self) -> IWSettings:
        """``iw=``, or ``args``' ``iw_*`` fields, validated; read live, as ``hyperparameter_search`` sets a trial's
        values on ``args`` inside ``train()``."""
        return self._iw_fixed if self._iw_fixed is not None else IWSettings.from_args(self.args)

    # -- checks -------------------------------------------------------------------------------------------
    def _check_supported(self) -> None:
        if self.is_fsdp_enabled and not getattr(self.accelerator, "is_fsdp2", False):
            raise ValueError(
                "iw_alpha > 0 with FSDP needs FSDP2 (fsdp_version: 2 in the accelerate config, or "
                'fsdp_config={"fsdp_version": 2}): FSDP1 flattens the LoRA factors into shards of one flat parameter, '
                "where the penalty cannot address each factor; FSDP2 shards every factor as its own DTensor. "
                "Or use DDP: LoRA's trainable parameters are small"
            )
        if self.is_deepspeed_enabled and self.accelerator.state.deepspeed_plugin.zero_stage == 3:
            raise ValueError("iw_alpha > 0 is not supported with DeepSpeed ZeRO-3 (sharded parameters); use ZeRO-1/2")

    def _check_loss_kwargs(self, model: nn.Module | None) -> None:
        """Let the Trainer divide the loss by the accumulation steps when ``model`` ignores ``num_items_in_batch``.

        The Trainer skips its 1/accumulation division for any forward with ``**kwargs``, but e.g.
        ``*ForSequenceClassification`` heads ignore ``num_items_in_batch`` and return a per-micro-batch mean: the
        gradient would then grow with ``gradient_accumulation_steps``.
        """
        if getattr(self, "model_accepts_loss_kwargs", False) and model is not None and not model_uses_num_items(model):
            self.model_accepts_loss_kwargs = False

    def _check_step_driven_tuner(self) -> None:
        """A peft tuner with ``update_and_allocate`` (AdaLoRA) must be driven after every optimizer step by a
        callback that says so (``drives_update_and_allocate = True``); without one it silently trains as plain LoRA."""
        tuner = getattr(unwrap_model(self.model), "base_model", None) if self.model is not None else None
        if not callable(getattr(tuner, "update_and_allocate", None)):
            return
        if not any(getattr(cb, "drives_update_and_allocate", False) for cb in self.callback_handler.callbacks):
            raise ValueError(
                f"{type(tuner).__name__} needs update_and_allocate after each optimizer step: add "
                "iwtrainer.methods.adalora.AdaLoraCallback; without it training is plain LoRA with a fixed rank"
            )

    def call_model_init(self, trial: Any = None) -> nn.Module:
        """``model_init``'s model (at construction and at every ``train()``), checked like a ``model=`` argument."""
        model = super().call_model_init(trial)
        self._check_loss_kwargs(model)  # at construction the Trainer decides afterwards; __init__ checks again
        return model

    @property
    def iw_active(self) -> bool:
        return self.iw_settings.active

    @property
    def _penalty_on(self) -> bool:
        """α > 0 and the importance known (online calibration measures during the first N steps, penalty off)."""
        return self.iw_active and not self.iw_callback.measuring

    def _penalty(self, model: nn.Module) -> IWPenalty:
        record = self.iw_callback.record
        if record is None:
            raise RuntimeError(
                "IWTrainer: no importance weights; calibration did not run (was the SensitivityCallback removed?)"
            )
        inner = self._unwrapped(model)
        key = (id(record), id(inner), layout_version(inner, unwrapped=True), self.iw_settings.penalty)
        if self._iw_penalty is None or self._iw_penalty_key != key:
            targets = find_lora_targets(inner, self.iw_callback.adapter_name)
            self._iw_penalty = IWPenalty(targets, self.iw_callback.coefficients, self.iw_settings.penalty)
            self._iw_penalty_key = key
        return self._iw_penalty

    def _unwrapped(self, model: nn.Module) -> nn.Module:
        """``unwrap_model(model)``, once per wrapper object: accelerate's unwrapping walks every module in search of
        compiled regions (~1 ms on a base-size model), a per-step cost plain LoRA does not pay."""
        if self._iw_unwrapped is None or self._iw_unwrapped[0] is not model:
            self._iw_unwrapped = (model, unwrap_model(model))
        return self._iw_unwrapped[1]

    def _trainer_divides_by_ga(self, num_items_in_batch: Any) -> bool:
        """Mirror of ``Trainer.training_step``'s rule for dividing the returned loss by the accumulation steps."""
        declared = getattr(self, "loss_is_scaled_for_ga", None)  # a subclass's own statement (transformers >= 5.2x)
        if declared is not None:
            return not declared
        return (not self.model_accepts_loss_kwargs or num_items_in_batch is None) and self.compute_loss_func is None

    # -- training -----------------------------------------------------------------------------------------
    def train(
        self,
        resume_from_checkpoint: str | bool | None = None,
        trial: Any = None,
        ignore_keys_for_eval: list[str] | None = None,
        **kwargs: Any,
    ):
        self.iw_settings  # noqa: B018 - validates before any work (trial values are checked again as they are set)
        self._check_step_driven_tuner()
        if self.iw_active:
            self._check_supported()
        self._iw_logs = {}
        self._iw_coefficients_logged = False
        self._iw_last_logged_step = None  # set at the run's first step (a resumed run starts past 0)
        # The penalty is cached under id()s of the record and the model, which a new run (a search trial) may
        # reuse once the previous run's objects are freed: rebuild it for every run.
        self._iw_penalty = None
        self._iw_penalty_key = None
        self._iw_unwrapped = None
        # During hyperparameter_search the calibration file goes to the trial's run folder (<output_dir>/run-N).
        self.iw_callback.output_dir = self._get_output_dir(trial) if trial is not None else None
        return super().train(
            resume_from_checkpoint=resume_from_checkpoint,
            trial=trial,
            ignore_keys_for_eval=ignore_keys_for_eval,
            **kwargs,
        )

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, torch.Tensor | Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ):
        # Online calibration hooks the LoRA layers of these forward passes: eager even under torch_compile (the
        # compiled graph would trace the hooks and hide the outputs' gradients); compiled steps start at step N.
        eager = run_eagerly(model) if self.iw_callback.measuring else contextlib.nullcontext()
        with eager:
            # return_outputs passed through: asking a subclass for outputs it was not asked for can cost it work
            # (trl's SFTTrainer computes token accuracy from them).
            result = super().compute_loss(
                model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
            )
        loss, outputs = result if return_outputs else (result, None)
        # name -> (value, coefficient): the term added to the training loss is coefficient·value.
        terms: dict[str, tuple[torch.Tensor, float]] = {}
        ga = getattr(self, "current_gradient_accumulation_steps", self.args.gradient_accumulation_steps)
        if model.training and torch.is_grad_enabled():
            if self._penalty_on and self.penalty_backend != "grad":  # "grad": added in training_step, see there
                terms["iw_penalty"] = (self._penalty(model)(), self.iw_settings.alpha)
            for name, fn in self.regularizers.items():
                terms[name] = (fn(model), 1.0)
            self.guard.track("task loss", loss)
            for name, (value, _) in terms.items():
                self.guard.track("IW penalty" if name == "iw_penalty" else f"regulariser {name}", value)
        if not terms and not (self._penalty_on and model.training and torch.is_grad_enabled()):
            return (loss, outputs) if return_outputs else loss
        if self._iw_last_logged_step is None:
            self._iw_last_logged_step = self.state.global_step
        divides = self._trainer_divides_by_ga(num_items_in_batch)
        task = loss.detach() if loss.dim() == 0 else loss.detach().mean()
        self._iw_track("loss_task", task, 1 / ga if divides else 1.0)
        total = loss
        for name, (value, coef) in terms.items():
            # Per optimizer step each term must contribute its gradient once: each of the `ga` micro-batches
            # carries coef·value/ga after the Trainer's own division (or ours, when the Trainer will not divide).
            total = torch.add(total, value, alpha=coef if divides else coef / ga)
            self._iw_track(name, value.detach(), coef / ga)
        return (total, outputs) if return_outputs else total

    def training_step(self, model: nn.Module, inputs: dict[str, Any], *args: Any, **kwargs: Any) -> torch.Tensor:
        """The Trainer's forward/backward of one micro-batch; after the last micro-batch of an optimizer step (the
        task gradients accumulated and, under DDP, averaged), ``α·∇P`` is added to the factors' ``.grad`` in closed
        form, once. Added last, the step's gradient is ``Σ_micro g + α∇P`` for any accumulation split: exactly what
        the task gradient alone is up to its own summation order. The returned (reported) loss gains ``α·P`` there."""
        loss = super().training_step(model, inputs, *args, **kwargs)
        return self.add_penalty_grad(model, loss) if self.accelerator.sync_gradients else loss

    def add_penalty_grad(self, model: nn.Module, loss: torch.Tensor) -> torch.Tensor:
        """``α·∇P`` into the LoRA factors' ``.grad`` (closed form, outside any compiled graph) and ``loss + α·P``, when
        the penalty is on and uses the ``"grad"`` backend; else ``loss``. Once per optimizer step, after its last
        backward: :meth:`training_step` calls it, and so can a loop that runs its own backward (a benchmark)."""
        if not (self._penalty_on and self.penalty_backend == "grad"):
            return loss
        alpha = self.iw_settings.alpha
        value = self._penalty(model).add_grad_(self._grad_scale())
        self.guard.track("IW penalty", value)
        self._iw_track("iw_penalty", value, alpha)
        return loss + alpha * value.to(loss.dtype)

    def _grad_scale(self) -> float | torch.Tensor:
        """α, times the fp16 GradScaler's current scale (a device tensor: no host sync)."""
        scale: float | torch.Tensor = self.iw_settings.alpha
        scaler = getattr(self.accelerator, "scaler", None)
        if scaler is not None and scaler.is_enabled():
            current = getattr(scaler, "_scale", None)
            scale = scale * (current if current is not None else scaler.get_scale())
        return scale

    def _iw_track(self, key: str, value: torch.Tensor, weight: float) -> None:
        """Accumulate ``weight·value`` on device for the next log (one in-place kernel, no host sync)."""
        acc = self._iw_logs.get(key)
        if acc is None:
            self._iw_logs[key] = value.float() * weight
        else:
            acc.add_(value, alpha=weight)

    def _run_epoch(self, *args: Any, **kwargs: Any) -> Any:
        """The Trainer's epoch, skipped once the run is complete: resuming from the final checkpoint of a
        ``max_steps`` run would otherwise train one step past ``max_steps`` (transformers checks only after a step)."""
        if self.state.max_steps > 0 and self.state.global_step >= self.state.max_steps:
            return None
        return super()._run_epoch(*args, **kwargs)

    def _get_grad_norm(self, model: nn.Module, grad_norm: Any = None) -> Any:
        """The Trainer's gradient norm of each optimizer step, also tracked by the divergence guard (fp16's grad
        scaler skips inf steps by design, so there only the loss terms are watched)."""
        grad_norm = super()._get_grad_norm(model, grad_norm=grad_norm)
        if torch.is_tensor(grad_norm) and not self.args.fp16:
            self.guard.track("gradient", grad_norm)
        return grad_norm

    def _save_checkpoint(self, model: nn.Module, trial: Any) -> None:
        self.guard.check()  # never write a checkpoint of a diverged model: the last good one stays the last one
        super()._save_checkpoint(model, trial)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:
            self.guard.check()  # the Trainer syncs here anyway; its NaN filter would log a diverged loss as finite
        if "loss" in logs and self._iw_logs:
            steps = max(1, self.state.global_step - (self._iw_last_logged_step or 0))
            for key, acc in self._iw_logs.items():
                if self.args.world_size > 1:
                    acc = self.accelerator.reduce(acc, reduction="mean")
                logs[key] = acc.item() / steps
            self._iw_logs = {}
            self._iw_last_logged_step = self.state.global_step
        if "loss" in logs and not self._iw_coefficients_logged and self.iw_active and self.iw_callback.record:
            # Once per run, with the first training log: every report_to integration gets the per-matrix
            # coefficients (1 − w_k)^β beside loss_task and iw_penalty.
            logs.update({f"iw_coefficient/{name}": c for name, c in self.iw_callback.coefficients.items()})
            self._iw_coefficients_logged = True
        super().log(logs, start_time)

    # -- checkpoints --------------------------------------------------------------------------------------
    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        # Callbacks that change the model's layout (gradnorm's allocated ranks) restore it first, so the
        # checkpoint's weights and optimizer state fit.
        for callback in self.callback_handler.callbacks:
            restore = getattr(callback, "load_resume_state", None)
            if callable(restore):
                restore(resume_from_checkpoint, unwrap_model(model if model is not None else self.model))
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        self.iw_callback.resume_dir = resume_from_checkpoint
