"""Full fine-tuning: every parameter of the model trains; no adapter, so no IW penalty."""

from __future__ import annotations

from torch import nn

from .base import Method, MethodContext, MethodSetup


class FullMethod(Method):
    name = "full"
    adapts_targets = False

    def build(self, model: nn.Module, ctx: MethodContext) -> MethodSetup:
        return MethodSetup(model, self.name, [], ctx.heads)
