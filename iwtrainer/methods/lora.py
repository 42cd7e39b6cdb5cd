"""LoRA through peft (``LoraConfig``); IW-LoRA is this method with ``--iw_alpha > 0`` (the trainer adds the penalty).

h = W x + (lora_alpha / r) · B A x,   A: r × d_in (kaiming-uniform), B: d_out × r (zeros), W frozen
"""

from __future__ import annotations

from typing import Any

from torch import nn

from .base import Method, MethodContext, MethodSetup


def lora_config(model: nn.Module, ctx: MethodContext, **overrides: Any) -> Any:
    """A peft ``LoraConfig`` on ``ctx``'s targets with the head in ``modules_to_save`` (GPT-2 Conv1D handled)."""
    from peft import LoraConfig, TaskType
    from transformers.pytorch_utils import Conv1D

    modules = dict(model.named_modules())
    conv1d = [n for n in ctx.targets if isinstance(modules[n], Conv1D)]
    if conv1d and len(conv1d) != len(ctx.targets):
        raise ValueError(
            "--lora_target_modules mixes nn.Linear and GPT-2 Conv1D layers; peft's fan_in_fan_out is one setting "
            "per adapter, pick modules of one kind"
        )
    args = ctx.adapter_args
    return LoraConfig(
        task_type=TaskType.SEQ_CLS,
        r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        target_modules=ctx.spec,
        modules_to_save=list(ctx.heads) or None,
        fan_in_fan_out=bool(conv1d),
        **overrides,
    )


class LoraMethod(Method):
    name = "lora"
    uses_iw = True

    def build(self, model: nn.Module, ctx: MethodContext) -> MethodSetup:
        from peft import get_peft_model

        return MethodSetup(get_peft_model(model, lora_config(model, ctx)), self.name, ctx.targets, ctx.heads)
