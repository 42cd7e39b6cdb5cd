"""DoRA through peft (``LoraConfig(use_dora=True)``): weight-decomposed LoRA, a trained magnitude per output row.

    W' = m · (W + s·B A) / ‖W + s·B A‖_c   (column-wise norm ‖·‖_c; m initialised to ‖W‖_c, B = 0)

The IW penalty is refused (``uses_iw = False``): the update is not ``s·B A`` alone (the magnitude vector rescales
every row), so ``‖Δ‖_F²`` has no Gram form over the LoRA factors.
"""

from __future__ import annotations

from torch import nn

from .base import Method, MethodContext, MethodSetup
from .lora import lora_config


class DoraMethod(Method):
    name = "dora"

    def build(self, model: nn.Module, ctx: MethodContext) -> MethodSetup:
        from peft import get_peft_model

        config = lora_config(model, ctx, use_dora=True)
        return MethodSetup(get_peft_model(model, config), self.name, ctx.targets, ctx.heads)
