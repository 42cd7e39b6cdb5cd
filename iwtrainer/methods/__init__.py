"""Fine-tuning methods behind one small interface (:class:`~iwtrainer.methods.base.Method`) and a registry.

| name       | module       | what it trains                                                   | IW penalty |
|------------|--------------|------------------------------------------------------------------|------------|
| `lora`     | `lora.py`    | peft LoRA, rank r on every target (IW-LoRA with `--iw_alpha > 0`) | yes        |
| `gradnorm` | `gradnorm.py`| LoRA with per-matrix ranks ∝ a gradient norm, Σ r_k fixed         | yes        |
| `adalora`  | `adalora.py` | peft AdaLoRA, SVD-form ranks pruned on a cubic budget schedule    | no         |
| `wsa`      | `wsa.py`     | Weighted Spectral Adapter: top-r singular directions + gates      | no         |
| `full`     | `full.py`    | every parameter                                                   | no         |
| `pissa`    | `pissa.py`   | peft LoRA initialised on W's top-r singular directions            | no         |
| `dora`     | `dora.py`    | peft DoRA: LoRA direction + a trained magnitude per row           | no         |
| `eva`      | `eva.py`     | peft LoRA with A from the SVD of the layer inputs, ranks by variance | yes     |

Adding a method: a module with a :class:`Method` subclass (and its arguments dataclass, if it has flags), and one
entry in :data:`METHODS`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from torch import nn

from ..targets import (
    candidates_message,
    discover_target_modules,
    find_head_modules,
    match_target_modules,
    targets_regex,
)
from ..training_args import IWTrainingArguments
from .adalora import AdaLoraMethod
from .base import AdapterArguments, Method, MethodContext, MethodSetup, get_method
from .dora import DoraMethod
from .eva import EvaMethod
from .full import FullMethod
from .gradnorm import GradNormMethod
from .lora import LoraMethod
from .pissa import PissaMethod
from .wsa import WSAMethod

METHODS: dict[str, Method] = {
    method.name: method
    for method in (
        LoraMethod(),
        GradNormMethod(),
        AdaLoraMethod(),
        WSAMethod(),
        FullMethod(),
        PissaMethod(),
        DoraMethod(),
        EvaMethod(),
    )
}
"""``--adapter`` name -> method, in the order ``--help`` lists them."""

__all__ = ["METHODS", "AdapterArguments", "Method", "MethodContext", "MethodSetup", "build_adapter", "get_method"]


def method_arguments() -> list[type]:
    """The methods' own argument dataclasses, for one parser over every flag."""
    return [m.arguments for m in METHODS.values() if m.arguments is not None]


def build_adapter(
    model: nn.Module,
    adapter_args: AdapterArguments,
    training_args: IWTrainingArguments,
    missing_keys: Iterable[str] = (),
    options: Mapping[type, Any] | Any = None,
) -> MethodSetup:
    """Choose the target matrices and the head of ``model``, then let ``--adapter``'s method wrap it.

    ``options`` is the method's arguments instance, or a mapping from argument class to instance (the parser's
    output); missing ones take their defaults. Raises ``ValueError`` (one line, naming the flag) on bad targets.
    Steps that need the tokenized training data follow in :meth:`MethodSetup.prepare_training`.
    """
    method = get_method(adapter_args.adapter)
    if isinstance(options, Mapping):
        options = options.get(method.arguments)
    if options is None and method.arguments is not None:
        options = method.arguments()
    heads = find_head_modules(model, missing_keys)
    targets: list[str] = []
    if method.adapts_targets:
        if adapter_args.lora_target_modules:
            targets = match_target_modules(model, adapter_args.lora_target_modules, exclude=heads)
        else:
            targets = discover_target_modules(model, exclude=heads)
            if not targets:
                raise ValueError(
                    f"found no nn.Linear/Conv1D inside the transformer blocks of {type(model).__name__}; pass "
                    f"--lora_target_modules; candidates: {candidates_message(model, heads)}"
                )
    spec = targets_regex(model, targets) if targets else ""
    ctx = MethodContext(targets, spec, heads, adapter_args, options, training_args)
    setup = method.build(model, ctx)
    setup.options = options
    return setup
