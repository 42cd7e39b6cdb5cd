"""``torch.compile`` and IW-LoRA: the one place where IW-LoRA needs the model to run eagerly.

With ``torch_compile=True`` the Trainer wraps the model (``torch.compile(model)``, outermost) and only its forward and
backward are compiled. IW-LoRA's per-step work runs outside that graph and adds no graph break or recompile: the
penalty gradient goes into ``.grad`` after the backward (closed form, eager; a CUDA graph of its own on GPU), and the
loss terms and logs are plain tensor ops in ``compute_loss``.

Calibration is different: it keeps each LoRA layer's input and output from forward hooks and asks
``torch.autograd.grad`` for the gradient of the outputs. In a compiled graph the hooks are traced and the outputs come
out of one compiled autograd node, so no gradient reaches them: ``autograd.grad`` returns ``None`` and every
sensitivity would be a silent 0. The separate pass already runs on the unwrapped model, but a model compiled in place
(``module.compile()``) or online calibration (which measures inside the compiled training steps) would not, so both
run their forward passes under :func:`run_eagerly`.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn


def _is_compiled(module: nn.Module) -> bool:
    """``torch.compile(module)``'s wrapper, or a module compiled in place (``module.compile()``)."""
    return hasattr(module, "_orig_mod") or getattr(module, "_compiled_call_impl", None) is not None


def run_eagerly(model: nn.Module) -> contextlib.AbstractContextManager:
    """A context in which ``model`` runs eagerly even when it, or any part of it, is compiled.

    ``torch.compiler.set_stance("force_eager")`` (torch >= 2.6) makes every compiled function run its original code;
    it leaves the compiled graphs and their guards untouched, so the compiled steps afterwards neither recompile nor
    see the hooks (they are removed before then). Older torch has no such switch: a compiled model is then refused.
    """
    set_stance = getattr(torch.compiler, "set_stance", None)  # torch >= 2.6
    if set_stance is not None:
        return set_stance("force_eager")
    if any(_is_compiled(m) for m in model.modules()):
        raise RuntimeError(
            f"IW calibration needs the LoRA layers to run eagerly, but the model is compiled and torch "
            f"{torch.__version__} cannot run it eagerly (torch.compiler.set_stance needs torch >= 2.6): upgrade "
            "torch, or use iw_calibration='separate' with the Trainer's torch_compile=True and do not compile the "
            "model yourself"
        )
    return contextlib.nullcontext()
