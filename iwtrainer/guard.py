"""Divergence guard: stop a run whose task loss, IW penalty, regulariser or gradient went non-finite.

The HF Trainer keeps training on NaN: its ``logging_nan_inf_filter`` logs a non-finite loss as the running mean (or
``0`` at the first log), evaluation reports ``nan`` and the run exits 0. Here every term is checked on the device —
``first[term] = step`` the first time the term is not finite, all of a step's terms checked together at its end in a
handful of kernels, no host sync —
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
        self._slot: dict[str, int] = {}  # term -> its index in _first, in the order terms first appeared
        self._first: torch.Tensor | None = None  # per term: the first non-finite step, or -1
        self._pending: list[tuple[str, torch.Tensor]] = []  # this step's values, checked together at its end
        self._index: dict[tuple[str, ...], torch.Tensor | None] = {}  # a step's term pattern -> its slots (None: all)
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
        self._slot, self._first, self._pending, self._index = {}, None, [], {}
        self._step, self._base = None, global_step

    def step_done(self) -> None:
        """One optimizer step finished: its tracked values are checked (a few kernels for all of them) and the device
        step counter moves on."""
        self._flush()
        if self._step is not None:
            self._step.add_(1)

    def track(self, term: str, value: torch.Tensor) -> None:
        """Remember ``value`` for the end of the step, where the first step at which ``term`` is not finite is kept.

        Nothing runs here: checking each value as it came dispatched ~7 ops per term and step (3–4 terms an IW
        step), each a kernel launch on a GPU, where a compiled step is launch-bound; the step's values are checked
        together in :meth:`_flush`.
        """
        self._pending.append((term, whole_tensor(value.detach())))  # FSDP2's gradient norm: its reduced value
        if len(self._pending) > 256:  # a loop that never ends a step (no on_step_end): keep memory bounded
            self._flush()

    def _flush(self) -> None:
        """``_first[slot] = step`` for each term with a non-finite pending value and no earlier step recorded."""
        if not self._pending:
            return
        terms = tuple(term for term, _ in self._pending)
        device = self._pending[0][1].device
        # A scalar is non-finite iff it is; a larger tensor is summarised as NaN when any element is not finite.
        values = [v if v.dim() == 0 else torch.where(torch.isfinite(v).all(), 0.0, torch.nan)
                  for _, v in self._pending]  # fmt: skip
        self._pending = []
        stacked = torch.stack([v.to(device, torch.float32) for v in values])
        bad = (stacked - stacked) != 0  # NaN exactly for NaN and ±inf: two kernels (isfinite decomposes into five)
        new = [t for t in dict.fromkeys(terms) if t not in self._slot]
        if self._step is None:
            self._step = torch.zeros((), dtype=torch.int64, device=device)
        if new:  # the first steps of a run: slots for terms seen for the first time
            base = len(self._slot)
            self._slot.update((t, base + i) for i, t in enumerate(new))
            grown = torch.full((len(new),), -1, dtype=torch.int64, device=device)
            self._first = grown if self._first is None else torch.cat([self._first, grown])
            self._index = {}
        if terms not in self._index:  # None: every term once, in slot order (the usual step), so bad is per slot
            slots = [self._slot[t] for t in terms]
            self._index[terms] = None if slots == list(range(len(self._slot))) else torch.tensor(slots, device=device)
        index = self._index[terms]
        if index is not None:  # a term several times (accumulation) or not at all: any non-finite value per slot
            bad = torch.zeros(len(self._slot), dtype=torch.int64, device=device).index_add_(0, index, bad.long()) > 0
        self._first = torch.where(bad & (self._first < 0), self._step, self._first)

    def check(self) -> None:
        """Raise :class:`TrainingDiverged` for the earliest non-finite term (one host sync, for all terms)."""
        self._flush()
        if self._first is None:
            return
        names = list(self._slot)
        steps = self._first.tolist()
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
