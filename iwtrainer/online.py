"""Online calibration (``iw_calibration="online"``): ``s_k`` from the first N training steps' own backward passes.

A training step's gradient of the frozen base weight is ``∂L/∂W_k = Σ_c G_cᵀ X_c`` over the calls ``c`` of the LoRA
layer in the step's micro-batches — the same quantity the separate pass (``sensitivity.py``) measures, taken from
the backward passes the Trainer runs anyway. A forward hook keeps each call's input ``X_c`` and hooks the output,
whose gradient ``G_c`` arrives during the Trainer's backward; the sums ``Σ_c G_cᵀ X_c`` are kept by
:class:`~iwtrainer.sensitivity.WeightGradNorms`, as in the separate pass: with one micro-batch per step on one process
each target's sum lives only from its first call's gradient to its last and is reduced to its norm at once (no
buffer); with gradient accumulation or several processes the sums span micro-batches or ranks, so they live in one
flat fp32 buffer, all-reduced after the optimizer step (and divided by the world size, as DDP averages the ranks'
gradients). The per-target norms are added up on the device: no host sync, identical on every rank.

Differences from the separate pass, by design: dropout is on (training mode), the LoRA factors move during the N
steps (they start at ``B = 0`` and move little under the learning-rate warm-up, the source's "very small learning
rate"), and the penalty is off until step N, when the importance is known. Cost: one ``d_out × d_in × tokens``
matmul per layer call during N steps (the weight gradient a full fine-tune computes) and each layer input kept
until its backward; no extra forward or backward pass.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .sensitivity import Sensitivities, WeightGradNorms, world_size
from .targets import find_lora_targets, unwrap_model

PARTIAL_FILE = "iw_calibration_partial.pt"  # in checkpoints written before the N steps are complete


class OnlineSensitivity:
    """Hooks that accumulate every LoRA target's base-weight gradient during training; ``end_step`` after each
    optimizer step, ``result`` for the mean norm, ``remove`` to detach the hooks."""

    def __init__(self, model: nn.Module, adapter_name: str | None = None, gradient_accumulation_steps: int = 1):
        inner = unwrap_model(model)
        self.targets = find_lora_targets(inner, adapter_name)
        device = next(inner.parameters()).device
        self.sums = WeightGradNorms.for_batches(self.targets, device, gradient_accumulation_steps)
        self.totals = torch.zeros(len(self.targets), dtype=torch.float64, device=device)
        self.steps = 0
        self._handles = [t.module.register_forward_hook(self._hook(i)) for i, t in enumerate(self.targets)]

    def _hook(self, index: int):
        sums = self.sums

        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            if module.training and torch.is_grad_enabled() and output.requires_grad:  # training forwards only
                x = args[0].detach()
                sums.expect(index)
                output.register_hook(lambda g: sums.add(index, g, x))

        return hook

    @torch.no_grad()
    def end_step(self) -> None:
        """One optimizer step's backward passes are done: add the norms of its (rank-averaged) gradients."""
        self.sums.end_micro_batch()
        norms = self.sums.batch_norms()  # under torch.distributed: of the rank-summed gradients
        self.totals += norms.double() / world_size()
        self.sums.zero_()
        self.steps += 1

    def result(self) -> Sensitivities:
        values = (self.totals / max(self.steps, 1)).tolist()  # the only host sync
        return Sensitivities({t.name: v for t, v in zip(self.targets, values)}, self.steps)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def state_dict(self) -> dict[str, Any]:
        return {"totals": self.totals.cpu(), "steps": self.steps, "names": [t.name for t in self.targets]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["names"] != [t.name for t in self.targets]:
            raise ValueError(f"{PARTIAL_FILE}: its modules do not match the model's LoRA targets")
        self.totals.copy_(state["totals"])
        self.steps = int(state["steps"])
