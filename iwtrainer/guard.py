"""Divergence guard: stop a run whose task loss, IW penalty, regulariser or gradient went non-finite.

The HF Trainer keeps training on NaN: its ``logging_nan_inf_filter`` logs a non-finite loss as the running mean (or
``0`` at the first log), evaluation reports ``nan`` and the run exits 0. Here every term is checked on the device —
``first[term] = step`` the first time ``isfinite(term)`` fails, a ``torch.where`` per term and step, no host sync —
and the flags are read only where the Trainer syncs anyway (logging) and before a checkpoint is written, so the last
good checkpoint stays intact and the run stops with :class:`TrainingDiverged` naming the optimizer step and the term.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from .targets import whole_tensor


class TrainingDiverged(RuntimeError):
    """A training term became non-finite; the message names the term and the first optimizer step where it did."""


class DivergenceGuard(TrainerCallback):
    """Device-side record of the first optimizer step at which each tracked term was non-finite.

    As a callback it follows the run's steps (``on_train_begin`` / ``on_step_end``) and checks at ``on_train_end``;
    [`IWTrainer`] installs one, tracks its terms in ``compute_loss`` and the gradient norm, and checks when it logs
    and before it writes a checkpoint.
    """

    def __init__(self) -> None:
        self._first: dict[str, torch.Tensor] = {}
        self._step: torch.Tensor | None = None
        self._base = 0

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any):
        self.reset(state.global_step)

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any):
        self.step_done()

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any):
        self.check()

    def reset(self, global_step: int) -> None:
        """Start of a run (or a resumed run at ``global_step``)."""
        self._first, self._step, self._base = {}, None, global_step

    def step_done(self) -> None:
        """One optimizer step finished (an in-place add on the device, when anything is tracked)."""
        if self._step is not None:
            self._step.add_(1)

    def track(self, term: str, value: torch.Tensor) -> None:
        """Remember the current step for ``term`` if ``value`` is not finite and no earlier step was recorded."""
        value = whole_tensor(value.detach())  # FSDP2's gradient norm is a DTensor: its reduced value
        if self._step is None:
            self._step = torch.zeros((), dtype=torch.int64, device=value.device)
        first = self._first.get(term)
        if first is None:
            first = self._first[term] = torch.full((), -1, dtype=torch.int64, device=value.device)
        bad = ~torch.isfinite(value).all() & (first < 0)
        first.copy_(torch.where(bad, self._step.to(first.device), first))

    def check(self) -> None:
        """Raise :class:`TrainingDiverged` for the earliest non-finite term (one host sync, for all terms)."""
        if not self._first:
            return
        names = list(self._first)
        steps = torch.stack([self._first[n].cpu() for n in names]).tolist()
        bad = [(s, n) for s, n in zip(steps, names) if s >= 0]
        if not bad:
            return
        step, term = min(bad)
        also = sorted({n for s, n in bad if n != term})
        raise TrainingDiverged(
            f"training diverged: the {term} became non-finite (NaN/inf) at optimizer step {self._base + step + 1}"
            + (f" (then also: {', '.join(also)})" if also else "")
            + "; the last checkpoint written before it is intact. Lower --learning_rate, check the data, or use "
            "--max_grad_norm / bf16 instead of fp16"
        )
