"""The AdaLoRA baseline (peft ``AdaLoraConfig``), wired into the HF Trainer correctly.

AdaLoRA parametrises each adapted matrix as ``Δ_k = (α / r_init) · P_k diag(E_k) Q_k`` (peft: ``lora_B``, ``lora_E``,
``lora_A``) and prunes singular values ``E_k,i`` by an importance score until the total rank budget falls from
``init_r·K`` to ``target_r·K`` on a cubic schedule:

    b(t) = init_bgt                                                          t ≤ tinit
    b(t) = target_bgt + (init_bgt − target_bgt) · (1 − (t − tinit)/(T − tfinal − tinit))³   tinit < t < T − tfinal
    b(t) = target_bgt                                                        t ≥ T − tfinal

Two things make or break it, and neither is done by the Trainer: peft's ``update_and_allocate(step)`` must be called
after *every* optimizer step while gradients still exist, and the schedule's ``total_step`` T must be the run's real
length. Without the call AdaLoRA silently trains as a (rank ``init_r``) LoRA with orthogonality regulariser and nothing
is ever pruned. [`AdaLoraCallback`] makes the call (``on_optimizer_step``: after ``optimizer.step()``, before
``model.zero_grad()``) and fixes T from ``state.max_steps``.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from peft import AdaLoraConfig
from torch import nn
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from ..files import write_json
from ..targets import unwrap_model
from ..training_args import IWTrainingArguments
from .base import Method, MethodContext, MethodSetup, estimate_train_steps, has_length

logger = logging.getLogger(__name__)

ADALORA_FILE = "adalora_ranks.json"
STATE_FILE = "adalora_state.pt"  # in every checkpoint: the allocator's EMAs, the rank pattern, the mask history


def missing_state(checkpoint: str) -> str | None:
    """Why an AdaLoRA ``checkpoint`` cannot be resumed exactly (it lacks ``adalora_state.pt``), or ``None``."""
    if os.path.isfile(os.path.join(checkpoint, STATE_FILE)):
        return None
    return (
        f"it has no {STATE_FILE} (the AdaLoRA allocator's importance EMAs and rank pattern; written by an older "
        "iwtrainer), so the resumed run would prune differently; start fresh (--overwrite_output_dir)"
    )


def adalora_schedule(total_step: int, tinit_frac: float, tfinal_frac: float) -> tuple[int, int]:
    """``(tinit, tfinal) = (round(tinit_frac·T), max(1, round(tfinal_frac·T)))``, checked so a budgeting phase exists.

    ``tfinal ≥ 1`` because the Trainer passes 0-based step indices ``0..T−1``: peft fixes the final mask at step
    ``T − tfinal``, which a run never reaches when ``tfinal = 0``.
    """
    if not 0 <= tinit_frac < 1 or not 0 <= tfinal_frac < 1:
        raise ValueError(f"AdaLoRA: tinit_frac and tfinal_frac must lie in [0, 1), got {tinit_frac} and {tfinal_frac}")
    tinit = int(round(tinit_frac * total_step))
    tfinal = max(1, int(round(tfinal_frac * total_step)))
    _check_schedule(total_step, tinit, tfinal)
    return tinit, tfinal


def _check_schedule(total_step: int | None, tinit: int, tfinal: int) -> None:
    if total_step is None or total_step <= 0:
        raise ValueError(f"AdaLoRA: total_step must be the number of optimizer steps (> 0), got {total_step}")
    if tfinal < 1:
        raise ValueError(
            "AdaLoRA: tfinal must be >= 1 (the Trainer's steps run 0..total_step-1, so with tfinal=0 peft never "
            "applies the final budget); raise tfinal_frac (--adalora_tfinal_frac)"
        )
    if tinit + tfinal >= total_step:
        raise ValueError(
            f"AdaLoRA: the run is too short for its rank schedule: total_step={total_step} optimizer steps but "
            f"tinit={tinit} + tfinal={tfinal} >= total_step leaves no budgeting phase. Train longer "
            "(--max_steps / --num_train_epochs) or lower tinit_frac / tfinal_frac "
            "(--adalora_tinit_frac / --adalora_tfinal_frac)."
        )


def adalora_config(
    target_modules: Iterable[str] | str,
    lora_r: int = 8,
    lora_alpha: float = 16,
    lora_dropout: float = 0.0,
    total_step: int | None = None,
    tinit_frac: float = 0.1,
    tfinal_frac: float = 0.2,
    delta_t: int = 10,
    beta1: float = 0.85,
    beta2: float = 0.85,
    orth_reg_weight: float = 0.5,
    modules_to_save: list[str] | None = None,
    task_type: str | None = "SEQ_CLS",
) -> AdaLoraConfig:
    """An ``AdaLoraConfig`` with LoRA's average rank budget: ``target_r = lora_r``, ``init_r = ceil(1.5·lora_r)``.

    ``tinit``/``tfinal`` are ``tinit_frac``/``tfinal_frac`` of ``total_step`` (the run's optimizer steps). A ValueError
    names the flags when the run is too short for a budgeting phase. ``lora_alpha`` is passed as is: peft's AdaLoRA
    scales ``Δ`` by ``lora_alpha / init_r`` (its ``ranknum``), not by ``lora_alpha / lora_r``.
    """
    if lora_r < 1:
        raise ValueError(f"AdaLoRA: lora_r must be >= 1, got {lora_r}")
    if delta_t < 1:
        raise ValueError(f"AdaLoRA: delta_t (--adalora_delta_t) must be >= 1, got {delta_t}")
    if total_step is None:
        raise ValueError("AdaLoRA: total_step (the run's number of optimizer steps) is required")
    tinit, tfinal = adalora_schedule(total_step, tinit_frac, tfinal_frac)
    return AdaLoraConfig(
        target_modules=target_modules if isinstance(target_modules, str) else list(target_modules),
        target_r=lora_r,
        init_r=math.ceil(1.5 * lora_r),
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        total_step=total_step,
        tinit=tinit,
        tfinal=tfinal,
        deltaT=delta_t,
        beta1=beta1,
        beta2=beta2,
        orth_reg_weight=orth_reg_weight,
        modules_to_save=modules_to_save,
        task_type=task_type,
    )


def _adalora_model(model: torch.nn.Module) -> torch.nn.Module:
    """peft's ``AdaLoraModel`` inside a (possibly DDP-wrapped) ``PeftModel``."""
    from peft.tuners.adalora import AdaLoraModel

    inner = unwrap_model(model)
    tuner = getattr(inner, "base_model", inner)
    if not isinstance(tuner, AdaLoraModel):
        raise TypeError(
            f"AdaLoRA: expected a peft AdaLoRA model (get_peft_model(model, AdaLoraConfig(...))), got "
            f"{type(inner).__name__} wrapping {type(tuner).__name__}"
        )
    if not hasattr(tuner, "rankallocator"):
        raise ValueError("AdaLoRA: the adapter is in inference mode (no RankAllocator); nothing to train")
    return tuner


def _tuner_and_config(model: torch.nn.Module) -> tuple[Any, AdaLoraConfig]:
    """peft's ``AdaLoraModel`` (see :func:`_adalora_model`) and the config of its trainable adapter."""
    tuner = _adalora_model(model)
    return tuner, tuner.peft_config[tuner.trainable_adapter_name]


def _module_name(param_name: str, adapter: str) -> str:
    """``bert.….query.lora_E.default`` (or ``….lora_E`` once peft has saved the pattern) -> ``bert.….query``."""
    name = param_name
    if name.endswith(f".{adapter}"):
        name = name[: -len(adapter) - 1]
    return name.removesuffix(".lora_E")


def _pattern_ranks(rank_pattern: Mapping[str, Any], adapter: str) -> dict[str, int]:
    return {_module_name(k, adapter): int(sum(bool(b) for b in v)) for k, v in rank_pattern.items()}


def adalora_effective_ranks(model: torch.nn.Module) -> dict[str, int]:
    """Rank kept per adapted matrix: ``Σ_i mask_i`` from peft's ``rank_pattern`` (the mask that save/load applies).

    Before any mask was applied (no pattern yet) nothing is pruned and every module has its full ``init_r``. Keys are
    module paths in the base model (``bert.encoder.layer.0.attention.self.query``), as elsewhere in iwtrainer.
    """
    from peft.tuners.adalora import AdaLoraLayer

    tuner = _adalora_model(model)
    adapter = tuner.trainable_adapter_name
    pattern = tuner.peft_config[adapter].rank_pattern
    if pattern:
        return _pattern_ranks(pattern, adapter)
    return {
        name: int(module.r[adapter])
        for name, module in tuner.model.named_modules()
        if isinstance(module, AdaLoraLayer) and adapter in module.lora_E
    }


def adalora_nonzero_ranks(model: torch.nn.Module) -> dict[str, int]:
    """Number of nonzero singular values ``E_k,i`` per module (the rank ``Δ_k`` can actually have right now)."""
    from peft.tuners.adalora import AdaLoraLayer

    tuner = _adalora_model(model)
    adapter = tuner.trainable_adapter_name
    return {
        name: int((module.lora_E[adapter] != 0).sum())
        for name, module in tuner.model.named_modules()
        if isinstance(module, AdaLoraLayer) and adapter in module.lora_E
    }


class AdaLoraCallback(TrainerCallback):
    """Drive peft's AdaLoRA rank allocation from the Trainer loop.

    * ``on_train_begin``: sets the schedule's ``total_step`` to ``state.max_steps`` (on the config, which peft's
      ``RankAllocator`` shares) when it is unset or differs; with ``tinit_frac``/``tfinal_frac`` given, ``tinit`` and
      ``tfinal`` are re-derived from the real length too, else they are kept and checked.
    * ``on_optimizer_step`` (after ``optimizer.step()``, before ``model.zero_grad()``, once per optimizer step whatever
      the gradient accumulation): ``update_and_allocate(state.global_step)`` with the 0-based step index, as in peft's
      own training loop. Steps that the fp16 grad scaler skipped (inf/nan gradients) do not update the importance EMA.
    * ``on_train_end``: stores the final ``rank_pattern`` and per-module ranks and writes ``adalora_ranks.json``.
    * Checkpoints resume exactly. peft would save the adapter truncated to the current ``rank_pattern`` (which no
      longer fits the full-rank model and its optimizer state) and keeps the allocator's importance EMAs in memory
      only. So around each checkpoint save the pattern is lifted from the config (the adapter is saved at full
      rank: the pruned singular values are zeros, the same model), and ``adalora_state.pt`` holds the EMAs, the
      pattern and the mask history; :meth:`load_resume_state` reads it back and ``on_train_begin`` restores it.

    ``self.history`` has one entry per mask update: ``{"global_step", "budget", "total_rank"}``.
    """

    drives_update_and_allocate = True  # what IWTrainer checks for before training a peft AdaLoRA model

    def load_resume_state(self, checkpoint: str, model: torch.nn.Module) -> None:
        """Called by [`IWTrainer`] before a checkpoint is loaded: reads ``adalora_state.pt`` (applied at
        ``on_train_begin``, after the run's schedule is set)."""
        problem = missing_state(checkpoint)
        if problem:
            raise ValueError(f"cannot resume {checkpoint}: {problem}")
        self._resumed = torch.load(os.path.join(checkpoint, STATE_FILE), map_location="cpu", weights_only=True)

    def __init__(
        self, tinit_frac: float | None = None, tfinal_frac: float | None = None, write_file: bool = True
    ) -> None:
        if (tinit_frac is None) != (tfinal_frac is None):
            raise ValueError("AdaLoraCallback: pass both tinit_frac and tfinal_frac, or neither")
        self.tinit_frac = tinit_frac
        self.tfinal_frac = tfinal_frac
        self.write_file = write_file
        self.history: list[dict[str, int]] = []
        self.final_rank_pattern: dict[str, list[bool]] | None = None
        self.final_ranks: dict[str, int] | None = None
        self.record: dict[str, Any] | None = None
        self._skipped = 0
        self._resumed: dict[str, Any] | None = None  # adalora_state.pt of the checkpoint being resumed
        self._lifted: Any = None  # the rank pattern, off the config while a checkpoint is saved

    def on_train_begin(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: torch.nn.Module | None = None,
        **kwargs: Any,
    ) -> None:
        tuner, config = _tuner_and_config(model)
        self.history, self.final_rank_pattern, self.final_ranks, self.record, self._skipped = [], None, None, None, 0
        total = state.max_steps
        old = (config.total_step, config.tinit, config.tfinal)
        tinit, tfinal = config.tinit, config.tfinal
        if self.tinit_frac is not None:
            tinit, tfinal = adalora_schedule(total, self.tinit_frac, self.tfinal_frac)
        _check_schedule(total, tinit, tfinal)
        if config.total_step != total or (tinit, tfinal) != (config.tinit, config.tfinal):
            config.total_step, config.tinit, config.tfinal = total, tinit, tfinal
            tuner.rankallocator.peft_config = config  # normally the same object; make sure the allocator sees it
            tuner.rankallocator.set_total_step(total)
            logger.info(
                "AdaLoRA: schedule (total_step, tinit, tfinal) %s -> %s to match the run's %d optimizer steps",
                old,
                (total, tinit, tfinal),
                total,
            )
        alloc = tuner.rankallocator
        if self._resumed is not None and state.global_step > 0:
            self._restore(tuner, config, self._resumed)
        self._resumed = None
        logger.info(
            "AdaLoRA: budget %d -> %d over %d matrices, tinit=%d tfinal=%d deltaT=%d total_step=%d",
            alloc.init_bgt,
            alloc.target_bgt,
            len(alloc.name_set),
            tinit,
            tfinal,
            config.deltaT,
            total,
        )

    def on_optimizer_step(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: torch.nn.Module | None = None,
        optimizer: Any = None,
        **kwargs: Any,
    ) -> None:
        tuner, config = _tuner_and_config(model)
        step = state.global_step  # 0-based index of the optimizer step that just ran (incremented after this event)
        final_step = config.total_step - config.tfinal
        if step < final_step and getattr(optimizer, "step_was_skipped", False):
            # fp16 overflow: the gradients are inf/nan and would poison the importance EMAs. (At and after the
            # final step peft reads no gradients, so those calls always run.)
            self._skipped += 1
            return
        if step < final_step:
            budget, masks = tuner.rankallocator.budget_schedule(step)
        else:
            budget, masks = tuner.rankallocator.target_bgt, step == final_step
        tuner.update_and_allocate(step)
        if masks and config.rank_pattern:
            total_rank = sum(_pattern_ranks(config.rank_pattern, tuner.trainable_adapter_name).values())
            self.history.append({"global_step": step, "budget": int(budget), "total_rank": total_rank})

    # -- checkpoints ------------------------------------------------------------------------------------------
    def on_step_end(self, args, state, control, model=None, **kwargs):
        self._lift_pattern_if_saving(control, model)

    def on_epoch_end(self, args, state, control, model=None, **kwargs):
        self._lift_pattern_if_saving(control, model)

    def _lift_pattern_if_saving(self, control: TrainerControl, model: torch.nn.Module | None) -> None:
        """A checkpoint is about to be saved (the Trainer saves right after these events): take the rank pattern off
        the config so peft saves the adapter at full rank; :meth:`on_save` puts it back."""
        if not control.should_save or model is None:
            return
        tuner, config = _tuner_and_config(model)
        if config.rank_pattern:
            self._lifted, config.rank_pattern = config.rank_pattern, None

    def on_save(self, args, state, control, model=None, **kwargs):
        tuner, config = _tuner_and_config(model)
        if self._lifted is not None:
            config.rank_pattern, self._lifted = self._lifted, None
        folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        if state.is_world_process_zero and os.path.isdir(folder):
            alloc = tuner.rankallocator
            torch.save(
                {
                    "ipt": alloc.ipt, "exp_avg_ipt": alloc.exp_avg_ipt, "exp_avg_unc": alloc.exp_avg_unc,
                    "rank_pattern": config.rank_pattern, "history": self.history, "skipped": self._skipped,
                },
                os.path.join(folder, STATE_FILE),
            )  # fmt: skip

    def _restore(self, tuner: Any, config: Any, saved: dict[str, Any]) -> None:
        alloc = tuner.rankallocator
        device = next(tuner.parameters()).device
        for key in ("ipt", "exp_avg_ipt", "exp_avg_unc"):
            setattr(alloc, key, {name: value.to(device) for name, value in saved[key].items()})
        config.rank_pattern = saved["rank_pattern"]
        self.history, self._skipped = list(saved["history"]), int(saved["skipped"])
        logger.info("AdaLoRA: allocator state restored (%d importance entries)", len(alloc.ipt))

    def on_train_end(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: torch.nn.Module | None = None,
        **kwargs: Any,
    ) -> None:
        tuner = _adalora_model(model)
        adapter = tuner.trainable_adapter_name
        config = tuner.peft_config[adapter]
        pattern = config.rank_pattern
        self.final_rank_pattern = {k: [bool(b) for b in v] for k, v in pattern.items()} if pattern else None
        self.final_ranks = adalora_effective_ranks(model)
        final_step = config.total_step - config.tfinal
        if state.global_step <= final_step:
            logger.warning(
                "AdaLoRA: training stopped at step %d before the final budget (step %d); ranks are not final",
                state.global_step,
                final_step,
            )
        if self._skipped:
            logger.info("AdaLoRA: %d skipped optimizer steps did not update the importance scores", self._skipped)
        self.record = {
            "target_r": config.target_r,
            "init_r": config.init_r,
            "total_step": config.total_step,
            "tinit": config.tinit,
            "tfinal": config.tfinal,
            "delta_t": config.deltaT,
            "final_budget": sum(self.final_ranks.values()),
            "target_budget": tuner.rankallocator.target_bgt,
            "final_rank_pattern": self.final_ranks,
            "history": self.history,
        }
        if self.write_file and state.is_world_process_zero:
            write_json(os.path.join(args.output_dir, ADALORA_FILE), self.record)
        logger.info(
            "AdaLoRA: final total rank %d (target %d) over %d matrices",
            self.record["final_budget"],
            self.record["target_budget"],
            len(self.final_ranks),
        )


# -- the method ----------------------------------------------------------------------------------------------------
@dataclass
class AdaLoraArguments:
    """``--adapter adalora``: target_r = --lora_r, init_r = ceil(1.5·lora_r), pruned on this schedule."""

    adalora_tinit_frac: float = field(
        default=0.1,
        metadata={"help": "AdaLoRA: fraction of the run's optimizer steps trained at the initial budget (tinit)."},
    )
    adalora_tfinal_frac: float = field(
        default=0.2,
        metadata={"help": "AdaLoRA: fraction of the run's optimizer steps trained at the final budget (tfinal)."},
    )
    adalora_delta_t: int = field(
        default=10, metadata={"help": "AdaLoRA: optimizer steps between two rank re-allocations (deltaT)."}
    )
    adalora_orth_reg_weight: float = field(
        default=0.5, metadata={"help": "AdaLoRA: weight of the orthogonality regulariser on P and Q."}
    )

    def __post_init__(self) -> None:
        for flag in ("adalora_tinit_frac", "adalora_tfinal_frac"):
            if not 0 <= getattr(self, flag) < 1:
                raise ValueError(f"--{flag} must be in [0, 1), got {getattr(self, flag)}")
        if self.adalora_tinit_frac + self.adalora_tfinal_frac >= 1:
            raise ValueError(
                f"--adalora_tinit_frac {self.adalora_tinit_frac:g} + --adalora_tfinal_frac "
                f"{self.adalora_tfinal_frac:g} must be < 1: AdaLoRA needs steps in between to prune the rank budget"
            )
        if self.adalora_delta_t < 1:
            raise ValueError(f"--adalora_delta_t must be >= 1, got {self.adalora_delta_t}")
        if self.adalora_orth_reg_weight < 0:
            raise ValueError(f"--adalora_orth_reg_weight must be >= 0, got {self.adalora_orth_reg_weight}")


_PROVISIONAL_TOTAL_STEPS = 10_000
"""AdaLoRA's ``total_step`` when neither ``--max_steps`` nor the data size is known yet; ``AdaLoraCallback`` sets the
run's real length (and re-derives tinit/tfinal from the fractions) at ``on_train_begin``."""


class AdaLoraMethod(Method):
    """peft AdaLoRA on the LoRA targets with LoRA's average rank budget, driven by :class:`AdaLoraCallback`.

    ``total_step`` is provisional (``--max_steps``, else checked against the data size in :meth:`prepare`); the
    callback corrects it to the Trainer's ``max_steps`` at ``on_train_begin``.
    """

    name = "adalora"
    arguments = AdaLoraArguments

    def checkpoint_problem(self, checkpoint: str) -> str | None:
        return missing_state(checkpoint)

    def build(self, model: nn.Module, ctx: MethodContext) -> MethodSetup:
        from peft import get_peft_model

        opts: AdaLoraArguments = ctx.options
        training_args, lora = ctx.training_args, ctx.adapter_args
        total = training_args.max_steps if training_args.max_steps > 0 else _PROVISIONAL_TOTAL_STEPS
        config = adalora_config(
            ctx.spec,
            lora_r=lora.lora_r,
            lora_alpha=lora.lora_alpha,
            lora_dropout=lora.lora_dropout,
            total_step=total,
            tinit_frac=opts.adalora_tinit_frac,
            tfinal_frac=opts.adalora_tfinal_frac,
            delta_t=opts.adalora_delta_t,
            orth_reg_weight=opts.adalora_orth_reg_weight,
            modules_to_save=list(ctx.heads) or None,
        )
        callback = AdaLoraCallback(opts.adalora_tinit_frac, opts.adalora_tfinal_frac)
        return MethodSetup(get_peft_model(model, config), self.name, ctx.targets, ctx.heads, callbacks=[callback])

    def prepare(self, setup: MethodSetup, train_dataset: Any, collator: Callable, args: IWTrainingArguments) -> None:
        if has_length(train_dataset):  # the schedule must fit the run: a clear error before anything is written
            opts: AdaLoraArguments = setup.options
            adalora_schedule(
                estimate_train_steps(len(train_dataset), args), opts.adalora_tinit_frac, opts.adalora_tfinal_frac
            )
