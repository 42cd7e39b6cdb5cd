"""Online calibration (``iw_calibration="online"``): ``s_k`` from the first N training steps' own backward passes.

A training step's gradient of the frozen base weight is ``∂L/∂W_k = Σ_c G_cᵀ X_c`` over the calls ``c`` of the LoRA
layer in the step's micro-batches — the same quantity the separate pass (``sensitivity.py``) measures, taken from
the backward passes the Trainer runs anyway. A forward hook keeps each call's input ``X_c`` and hooks the output,
whose gradient ``G_c`` arrives during the Trainer's backward; ``Gᵀ X`` is added into one flat fp32 buffer. After
each optimizer step the buffer is all-reduced (and divided by the world size, as DDP averages the ranks'
gradients) and its per-target norms are added up on the device: no host sync, identical on every rank.

Differences from the separate pass, by design: dropout is on (training mode), the LoRA factors move during the N
steps (they start at ``B = 0`` and move little under the learning-rate warm-up, the source's "very small learning
rate"), and the penalty is off until step N, when the importance is known. Cost: one ``d_out × d_in × tokens``
matmul per layer call during N steps (the weight gradient a full fine-tune computes) and each layer input kept
until its backward; no extra forward or backward pass.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .sensitivity import Sensitivities, add_weight_grad_, flat_buffers, world_size
from .targets import find_lora_targets, unwrap_model

PARTIAL_FILE = "iw_calibration_partial.pt"  # in checkpoints written before the N steps are complete


class OnlineSensitivity:
    """Hooks that accumulate every LoRA target's base-weight gradient during training; ``end_step`` after each
    optimizer step, ``result`` for the mean norm, ``remove`` to detach the hooks."""

    def __init__(self, model: nn.Module, adapter_name: str | None = None) -> None:
        inner = unwrap_model(model)
        self.targets = find_lora_targets(inner, adapter_name)
        device = next(inner.parameters()).device
        self.flat, self.accs = flat_buffers(self.targets, device)
        self.totals = torch.zeros(len(self.targets), dtype=torch.float64, device=device)
        self.steps = 0
        self._handles = [t.module.register_forward_hook(self._hook(i)) for i, t in enumerate(self.targets)]

    def _hook(self, index: int):
        acc = self.accs[index]

        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            if module.training and torch.is_grad_enabled() and output.requires_grad:  # training forwards only
                x = args[0].detach()
                output.register_hook(lambda g: add_weight_grad_(acc, g, x))

        return hook

    @torch.no_grad()
    def end_step(self) -> None:
        """One optimizer step's backward passes are done: add the norms of its (rank-averaged) gradients."""
        world = world_size()
        if world > 1:
            dist.all_reduce(self.flat)
            self.flat.div_(world)
        self.totals += torch.stack(torch._foreach_norm(self.accs)).double()
        self.flat.zero_()
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
