"""Find the LoRA-adapted weight matrices W_k of a peft model.

A *target* is one peft LoRA layer wrapping an ``nn.Linear`` or a GPT-2 style ``Conv1D`` (weight stored
transposed). Everything else in iwtrainer is keyed by the target's name, which is the module path in the
user's base model (peft's ``base_model.model.`` prefix removed), e.g. ``bert.encoder.layer.0.attention.self.query``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

_PEFT_PREFIX = "base_model.model."


@dataclass(frozen=True)
class LoraTarget:
    """One adapted matrix: ``Δ = scaling · B A``, ``A = lora_A.weight`` (r×d_in), ``B = lora_B.weight`` (d_out×r)."""

    name: str
    module: nn.Module
    adapter: str

    @property
    def lora_A(self) -> torch.Tensor:  # noqa: N802 - peft's name
        return self.module.lora_A[self.adapter].weight

    @property
    def lora_B(self) -> torch.Tensor:  # noqa: N802 - peft's name
        return self.module.lora_B[self.adapter].weight

    @property
    def scaling(self) -> float:
        return float(self.module.scaling[self.adapter])


def unwrap_model(model: nn.Module) -> nn.Module:
    """Strip DDP / DataParallel / torch.compile wrappers (never peft's own)."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def layout_version(model: nn.Module) -> int:
    """Bumped by :func:`mark_layout_changed` whenever LoRA layers are rebuilt (e.g. rank re-allocation)."""
    return getattr(unwrap_model(model), "_iw_layout_version", 0)


def mark_layout_changed(model: nn.Module) -> None:
    """Tell cached structures (the penalty's shape groups) that LoRA parameters were replaced."""
    inner = unwrap_model(model)
    inner._iw_layout_version = layout_version(inner) + 1


def short_name(name: str) -> str:
    return name[len(_PEFT_PREFIX) :] if name.startswith(_PEFT_PREFIX) else name


def _is_lora_layer(module: nn.Module) -> bool:
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:  # pragma: no cover - peft is a hard requirement
        return False
    return isinstance(module, LoraLayer)


def _is_supported_base(module: nn.Module) -> bool:
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, (nn.Linear, Conv1D))


def find_lora_targets(model: nn.Module, adapter_name: str | None = None) -> list[LoraTarget]:
    """Every LoRA layer of ``model`` for one adapter, in module order.

    Raises ``ValueError`` naming what is wrong when the model has no LoRA layer, more than one active adapter,
    or a LoRA layer iwtrainer cannot penalise exactly (DoRA / other variants, LoRA on embeddings or convolutions).
    """
    model = unwrap_model(model)
    targets: list[LoraTarget] = []
    for name, module in model.named_modules():
        if not _is_lora_layer(module) or not hasattr(module, "lora_A"):
            continue
        adapters = [a for a in module.active_adapters if a in module.lora_A]
        if adapter_name is not None:
            adapters = [a for a in adapters if a == adapter_name]
        if not adapters:
            continue
        if len(adapters) > 1:
            raise ValueError(
                f"iwtrainer: module '{short_name(name)}' has several active LoRA adapters {adapters}; "
                "pass adapter_name=... to choose the one to weight."
            )
        adapter = adapters[0]
        if not _is_supported_base(module.get_base_layer()):
            raise ValueError(
                f"iwtrainer: LoRA layer '{short_name(name)}' wraps a {type(module.get_base_layer()).__name__}; "
                "only nn.Linear and transformers Conv1D targets are supported (check lora target_modules)."
            )
        if adapter in getattr(module, "lora_variant", {}) or getattr(module, "use_dora", {}).get(adapter, False):
            raise ValueError(
                f"iwtrainer: LoRA layer '{short_name(name)}' uses a LoRA variant (e.g. DoRA); the IW penalty is "
                "defined for plain LoRA Δ = s·BA only."
            )
        targets.append(LoraTarget(short_name(name), module, adapter))
    if not targets:
        raise ValueError(
            "iwtrainer: the model has no LoRA layers"
            + (f" for adapter '{adapter_name}'" if adapter_name else "")
            + ": wrap it with peft.get_peft_model(model, LoraConfig(...)) before training with iw_alpha > 0."
        )
    return targets
