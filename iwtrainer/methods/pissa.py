"""PiSSA through peft (``LoraConfig(init_lora_weights="pissa")``): LoRA initialised on the principal components.

    W = U S Vᵀ,  B A = U_r S_r^{1/2} · S_r^{1/2} V_rᵀ (top-r),  W_res = W − s·B A frozen;  h = W_res x + s·B A x

The IW penalty is refused (``uses_iw = False``): ``B·A`` starts at the top-r part of ``W`` itself, so
``‖s·B A‖_F²`` would pull the model towards deleting its principal components rather than keep the update small.
"""

from __future__ import annotations

from torch import nn

from .base import Method, MethodContext, MethodSetup
from .lora import lora_config


class PissaMethod(Method):
    name = "pissa"

    def build(self, model: nn.Module, ctx: MethodContext) -> MethodSetup:
        from peft import get_peft_model

        config = lora_config(model, ctx, init_lora_weights="pissa")
        return MethodSetup(get_peft_model(model, config), self.name, ctx.targets, ctx.heads)
