"""Calibration: per-matrix sensitivity ``s_k = mean_b ‖∂L_task/∂W_k‖_F`` of the *frozen base weights*.

peft initialises ``B = 0``, so the LoRA factors' own gradients are zero at step 0 (``∂L/∂A = s·Bᵀ·∂L/∂ΔW``);
the base-weight gradient is what carries information. It is computed exactly without turning on
``requires_grad`` for any base weight: a forward hook on each LoRA layer keeps the layer's input ``X_c`` of every
call ``c`` (a module may run more than once per forward pass, e.g. DeBERTa-v2/v3's ``query_proj``/``key_proj``
with ``share_att_key``) and a tensor hook on its output receives ``G_c = ∂L/∂Y_c`` during the backward pass, so
``∂L/∂W = Σ_c G_cᵀ X_c`` (transposed for Conv1D, which has the same norm). No parameter ``.grad`` is touched and no
optimizer is involved.

A "batch" ``b`` is one optimizer step's worth of data: the ``gradient_accumulation_steps`` micro-batches of
every process. Micro-batch gradients are weighted by their number of loss terms — examples, or label tokens for
token-level losses such as a causal LM's (its mean over the micro-batch's tokens times their count is their sum,
as the Trainer normalises by ``num_items_in_batch``) — and, under
``torch.distributed``, summed across ranks before the norm, so ``s_k`` is the norm of the full-batch gradient
and is identical on every rank, for any split of the same global batch across devices and accumulation steps.

Memory (issue 15: IW-LoRA's peak GPU memory was 1.24× LoRA's on all-mpnet-base-v2). Sizes for its 72 targets
(Σ_k d_out·d_in = 84,934,656; largest 768×3072), a batch of 32×128 tokens, bf16 autocast; peaks are CPU allocator
bytes above the model for one batch (torch.profiler memory events), against 1,888 MiB for a plain eval
forward/backward and 2,548 MiB for a LoRA training step (dropout masks of one byte, as CUDA keeps them):

* before: one flat fp32 buffer of every target's sum (340 MB, 324 MiB), and ``autograd.grad`` w.r.t. the 72
  outputs, which held every ``G_c`` and ``Y_c`` (648 MiB each) and ``X_c`` (648 MiB) until the pass ended — peak
  3,154 MiB, 606 MiB above the training step: calibration set the run's peak (the GPU runs: +402 MiB on CoLA's
  ≤ 64 tokens, +760 MiB on RTE's 128).
* now: ``autograd.grad`` w.r.t. one 0-dim probe added to every output (``_CallTaps``), so each ``G_c`` is used by
  its hook and freed at once; each ``X_c`` is held, in the half dtype it is multiplied in (one copy per input
  tensor), only until its ``G_c`` arrives (≈ 10.5 KB per token and layer: 504 MiB here, the one cost left); with
  one micro-batch per batch on one process each target's sum lives from its first call's gradient to its last, in a
  temporary of its own size (≤ 9 MiB + its 4.5 MiB bf16 product), reduced to its norm at once — peak 2,368 MiB,
  below the training step (at 32×16 tokens 421 MiB against 417: the held inputs scale with the tokens like the
  training step's dropout masks). Sensitivities are bit-identical to before.
* gradient accumulation or data parallelism: the batch's sum spans micro-batches or ranks, so the flat buffer
  (324 MiB) must outlive each backward pass — the definition's minimum (the norm of a sum needs the sum).

Speed (issue 15: 150 eager calibration batches are ~2 % of a 3-epoch SST-2 LoRA run, more against a compiled one). A
batch of 32 short sequences is launch-bound on a GPU, so ``group`` (``iw_calib_group``) stacks up to that many batches
of one shape into one forward/backward pass: the model is in eval mode and no example interacts with another, so each
batch's ``G_c`` rows are exactly its own, and each call's ``Gᵀ X`` is taken per batch in one batched matmul
(:func:`segment_weight_grads`; the stacked mean loss is scaled by the total item count, and each batch's norm divided
by its own). Same ``s_k`` up to float rounding; ``group``× the held inputs (the memory figures above, per stack).

Nothing outlives :func:`compute_sensitivities`: it returns floats; buffers, inputs, hooks and graph are freed.
"""

from __future__ import annotations

import contextlib
import logging
import random
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from accelerate.utils import send_to_device
from torch import nn
from tqdm.auto import tqdm

from .compiled import run_eagerly
from .targets import LoraTarget, find_lora_targets, transformers_model, unwrap_model

logger = logging.getLogger(__name__)

LossFn = Callable[[nn.Module, Mapping[str, Any]], torch.Tensor]


def default_loss_fn(model: nn.Module, batch: Mapping[str, Any]) -> torch.Tensor:
    """The model's own task loss (``outputs.loss``), as the HF Trainer uses it (no KV cache: nothing generates)."""
    if getattr(getattr(model, "config", None), "use_cache", False):
        batch = {**batch, "use_cache": False}
    outputs = model(**batch)
    loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs[0]
    if loss is None:
        raise ValueError(
            "calibration: the model returned no loss; the training batches must contain labels "
            f"(batch keys: {sorted(batch)})"
        )
    return loss


def loss_shifts_labels(model: nn.Module) -> bool:
    """Whether the model's own loss is a causal LM's (label ``t+1`` predicted at ``t``).

    The loss function the model resolves (``PreTrainedModel.loss_function``: its ``loss_type``, and ``ForCausalLM``
    when that is unset, e.g. GPT-2's ``LMHeadModel``), read without triggering its "unrecognized" warning.
    """
    from transformers.loss.loss_utils import LOSS_MAPPING, ForCausalLMLoss

    inner = transformers_model(model)
    if not hasattr(inner, "loss_type"):
        return False  # not a transformers model: labels are what the user's loss says
    loss = getattr(inner, "_loss_function", None) or LOSS_MAPPING.get(inner.loss_type or "ForCausalLM")
    return loss is ForCausalLMLoss and not getattr(getattr(inner, "config", None), "is_encoder_decoder", False)


def loss_items(batch: Mapping[str, Any], shifts_labels: bool = False) -> int | torch.Tensor:
    """How many terms the micro-batch's mean loss averages: its examples, or for token-level labels (2-D and more)
    the label tokens that are not ``-100`` — of ``labels[..., 1:]`` for causal LMs, of ``shift_labels`` when the
    collator provides them. The rule of ``Trainer``'s ``num_items_in_batch``; a device tensor (no host sync)."""
    labels = batch.get("shift_labels", batch.get("labels"))
    if torch.is_tensor(labels) and labels.dim() >= 2:
        if shifts_labels and "shift_labels" not in batch:
            labels = labels[..., 1:]
        return labels.ne(-100).sum()
    if torch.is_tensor(labels):
        return int(labels.shape[0])
    for value in batch.values():
        if torch.is_tensor(value) and value.dim() > 0:
            return int(value.shape[0])
    return 1


def _base_shape(target: LoraTarget) -> tuple[int, int]:
    """(d_out, d_in) of the base weight, whatever its storage layout: GPT-2's ``Conv1D`` stores it transposed,
    bitsandbytes' ``Linear4bit`` packed (its ``nn.Linear`` features are the logical shape; only ``G`` and ``X`` are
    used, so a quantized base weight is never dequantized)."""
    base = target.module.get_base_layer()
    if isinstance(base, nn.Linear):
        return base.out_features, base.in_features
    w = base.weight
    return w.shape[1], w.shape[0]


_HALF = (torch.float16, torch.bfloat16)


class _CallTaps:
    """Forward hooks that route ``G_c = ∂L/∂Y_c`` of every LoRA-layer call (while grad is on) into ``sink`` *during*
    the backward pass, with the call's input ``X_c``; neither is kept once it has been used.

    Each output ``Y_c`` is replaced by ``Y_c + probe`` — ``probe`` a 0-dim leaf holding ``-0.0``, and ``y + (-0.0)``
    is ``y`` bit for bit, signed zeros included — whose tensor hook receives ``G_c``. Differentiating the loss with
    respect to ``probe`` alone then visits every call that reaches the loss and returns one scalar: no ``G_c`` is
    captured as an output (``autograd.grad`` w.r.t. the outputs themselves would hold all of them, the size of the
    layer outputs, until it returns) and no parameter's ``.grad`` is touched.

    ``X_c`` is held detached, already in the dtype :func:`add_weight_grad_` multiplies in (the half dtype of ``G_c``,
    which is ``Y_c``'s, under autocast), cast once per input tensor during a forward pass: layers that share an fp32
    input (query/key/value) share one half-precision copy instead of holding the fp32 tensor.
    """

    def __init__(self, targets: list[LoraTarget], sink: WeightGradNorms, device: torch.device):
        self.sink = sink
        self.probe = torch.full((), -0.0, device=device, requires_grad=True)
        self.calls = 0  # this micro-batch's tapped calls
        self.frozen: list[int] = []  # targets whose output did not require grad in this micro-batch
        self._casts: dict[tuple[int, int, torch.dtype], tuple[weakref.ref, torch.Tensor]] = {}  # this forward's
        self._handles = [t.module.register_forward_hook(self._hook(i)) for i, t in enumerate(targets)]

    def _held_input(self, x: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
        half = out_dtype if out_dtype in _HALF else x.dtype if x.dtype in _HALF else None
        if half is None or x.dtype == half:
            return x.detach()
        if x.is_inference():  # no version counter: not cached
            return x.to(half)
        key = (id(x), x._version, half)
        source, cast = self._casts.get(key, (None, None))
        if source is None or source() is not x:
            cast = x.detach().to(half)
            self._casts[key] = (weakref.ref(x), cast)
        return cast

    def _hook(self, index: int):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
            if not torch.is_grad_enabled():
                return None
            self.calls += 1
            if not output.requires_grad:
                self.frozen.append(index)
                return None
            tapped = output + self.probe
            held = [self._held_input(args[0], output.dtype)]  # until its G_c arrives
            sink = self.sink

            def on_grad(g: torch.Tensor) -> None:
                sink.add(index, g, held.pop())

            tapped.register_hook(on_grad)
            sink.expect(index)
            return tapped

        return hook

    def start_micro_batch(self) -> None:
        self.calls = 0
        self.frozen = []

    def end_forward(self) -> None:
        """Forget the forward pass's casts: each is then held only until its last call's gradient has arrived."""
        self._casts.clear()

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self._casts.clear()


def _samplers(dataloader: Any) -> list[Any]:
    """The dataloader's sampler chain (accelerate wraps samplers several levels deep)."""
    found, todo = [], [dataloader]
    while todo:
        obj = todo.pop()
        if obj is None or any(obj is f for f in found):
            continue
        found.append(obj)
        for attr in ("base_dataloader", "sampler", "batch_sampler"):
            todo.append(getattr(obj, attr, None))
    return found


@contextlib.contextmanager
def preserved_training_state(dataloader: Any = None) -> Iterator[None]:
    """Restore every RNG and the dataloader's sampler position on exit, so calibration leaves no trace.

    Covers Python/NumPy/torch (CPU and CUDA) RNGs, sampler ``generator`` states, and accelerate's epoch
    counters (``iteration`` / ``epoch``): the training loop then draws exactly the batches it would have drawn.
    """
    py, npy, cpu = random.getstate(), np.random.get_state(), torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    saved: list[tuple[Any, str, Any]] = []
    for obj in _samplers(dataloader):
        gen = getattr(obj, "generator", None)
        if isinstance(gen, torch.Generator):
            saved.append((gen, "__state__", gen.get_state()))
        for attr in ("iteration", "epoch"):
            if isinstance(getattr(obj, attr, None), int):
                saved.append((obj, attr, getattr(obj, attr)))
    try:
        yield
    finally:
        random.setstate(py)
        np.random.set_state(npy)
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)
        for obj, attr, value in saved:
            if attr == "__state__":
                obj.set_state(value)
            else:
                setattr(obj, attr, value)


def world_size() -> int:
    """Processes in the default ``torch.distributed`` group (1 without one)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _distributed() -> bool:
    return world_size() > 1


def _half_product(g2: torch.Tensor, x2: torch.Tensor) -> torch.Tensor | None:
    """``Gᵀ X`` in half precision when either is half, as autocast computes a weight gradient; else ``None``."""
    half = [t.dtype for t in (g2, x2) if t.dtype in _HALF]
    return torch.mm(g2.t().to(half[0]), x2.to(half[0])) if half else None


@torch.no_grad()
def add_weight_grad_(acc: torch.Tensor, g: torch.Tensor, x: torch.Tensor) -> None:
    """``acc += Gᵀ X`` (the base weight's gradient for one call of its layer), over every leading dimension."""
    g2 = g.reshape(-1, g.shape[-1])
    x2 = x.reshape(-1, x.shape[-1])
    product = _half_product(g2, x2)
    if product is not None:  # half-precision matmul, fp32 sum across calls
        acc.add_(product)
    else:
        acc.addmm_(g2.t().to(acc.dtype), x2.to(acc.dtype))


@torch.no_grad()
def weight_grad(g: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A new fp32 ``Gᵀ X``: the numbers :func:`add_weight_grad_` adds to zeros, without the zeros (nor, under
    autocast, a second fp32 copy of the product)."""
    g2 = g.reshape(-1, g.shape[-1])
    x2 = x.reshape(-1, x.shape[-1])
    product = _half_product(g2, x2)
    if product is not None:
        return product.float()
    acc = torch.zeros(g2.shape[-1], x2.shape[-1], device=g2.device, dtype=torch.float32)
    return acc.addmm_(g2.t().float(), x2.float())


@torch.no_grad()
def segment_weight_grads(g: torch.Tensor, x: torch.Tensor, segments: int) -> torch.Tensor:
    """``(segments, d_out, d_in)`` fp32: ``G_mᵀ X_m`` of each of ``segments`` equal slices of dim 0 (the batches
    stacked in one micro-batch), in one batched matmul; half precision as :func:`weight_grad` multiplies."""
    gs = g.reshape(segments, -1, g.shape[-1])
    xs = x.reshape(segments, -1, x.shape[-1])
    half = [t.dtype for t in (gs, xs) if t.dtype in _HALF]
    dtype = half[0] if half else torch.float32
    return torch.bmm(gs.transpose(1, 2).to(dtype), xs.to(dtype)).float()


def flat_buffers(targets: list[LoraTarget], device: torch.device) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """One flat fp32 buffer and its per-target ``(d_out, d_in)`` views: one ``zero_()``, one all-reduce a batch."""
    shapes = [_base_shape(t) for t in targets]
    flat = torch.zeros(sum(o * i for o, i in shapes), device=device, dtype=torch.float32)
    accs, offset = [], 0
    for o, i in shapes:
        accs.append(flat[offset : offset + o * i].view(o, i))
        offset += o * i
    return flat, accs


class WeightGradNorms:
    """Per batch, ``‖Σ_c G_cᵀ X_c‖_F`` of every target, fed one call at a time from the backward pass.

    ``buffered=False`` (one micro-batch per batch, one process): a target's sum exists only from its first call's
    gradient to its last, in a temporary of its own size, and is reduced to its norm at once. ``buffered=True``
    (gradient accumulation or data parallelism: the batch's sum spans micro-batches or ranks, so every target's sum
    must outlive the backward pass): the sums live in the flat buffer of :func:`flat_buffers`, all-reduced before
    the norms.
    """

    @classmethod
    def for_batches(cls, targets: list[LoraTarget], device: torch.device, micro_batches: int) -> WeightGradNorms:
        """Buffered exactly when a batch's sums span micro-batches or ranks (``micro_batches`` > 1 or
        ``torch.distributed``): one micro-batch per batch on one process reduces each sum during the backward pass."""
        return cls(targets, device, buffered=micro_batches > 1 or _distributed())

    def __init__(self, targets: list[LoraTarget], device: torch.device, buffered: bool):
        self.flat, self.accs = flat_buffers(targets, device) if buffered else (None, [])
        self.norms = torch.zeros(len(targets), device=device, dtype=torch.float32)  # unbuffered: this batch's
        self.names = [t.name for t in targets]
        self.segments = 1  # batches stacked in the micro-batch (unbuffered only): see set_segments
        self._partial: dict[int, torch.Tensor] = {}
        self._expected = [0] * len(targets)
        self._arrived = [0] * len(targets)

    def expect(self, index: int) -> None:
        """A call of target ``index`` whose gradient may arrive in this micro-batch's backward."""
        self._expected[index] += 1

    def set_segments(self, segments: int, rows: int) -> None:
        """The next micro-batch stacks ``segments`` batches of ``rows // segments`` examples each along dim 0: each
        call's ``Gᵀ X`` is then taken per batch (:func:`segment_weight_grads`), and :attr:`norms` is
        ``(segments, K)``. Unbuffered only (one process, one micro-batch per batch)."""
        if self.flat is not None and segments > 1:
            raise ValueError("stacked calibration batches need one process and one micro-batch per batch")
        self.segments, self._rows = segments, rows
        shape = (segments, len(self.names)) if segments > 1 else (len(self.names),)
        self.norms = torch.zeros(shape, device=self.norms.device, dtype=torch.float32)

    def add(self, index: int, g: torch.Tensor, x: torch.Tensor) -> None:
        """Add ``Gᵀ X`` of one call of target ``index``."""
        if self.flat is not None:
            add_weight_grad_(self.accs[index], g, x)
            return
        acc = self._partial.get(index)
        if self.segments > 1:
            if g.dim() < 2 or g.shape[0] != self._rows or x.shape[0] != self._rows:
                raise ValueError(
                    f"iw_calib_group: a call of LoRA layer '{self.names[index]}' ran on an input of shape "
                    f"{tuple(x.shape)}, not split by example along dim 0 ({self._rows} rows: a tensor shared by the "
                    "batch, e.g. DeBERTa's relative positions, or packed sequences); its gradient cannot be taken "
                    "per batch: use iw_calib_group=1"
                )
            product = segment_weight_grads(g, x, self.segments)
            self._partial[index] = product if acc is None else acc.add_(product)
        elif acc is None:
            self._partial[index] = weight_grad(g, x)
        else:
            add_weight_grad_(acc, g, x)
        self._arrived[index] += 1
        if self._arrived[index] == self._expected[index]:
            self._reduce(index)

    def _reduce(self, index: int) -> None:
        partial = self._partial.pop(index)
        if self.segments > 1:  # one norm per stacked batch
            self.norms[:, index] = torch.linalg.vector_norm(partial, dim=(1, 2))
        else:
            self.norms[index] = torch._foreach_norm([partial])[0]

    def end_micro_batch(self) -> None:
        """After a micro-batch's backward: sums of calls that never reached the loss are complete too."""
        for index in list(self._partial):
            self._reduce(index)
        self._expected = [0] * len(self._expected)
        self._arrived = [0] * len(self._arrived)

    def batch_norms(self) -> torch.Tensor:
        """The batch's per-target norms (fp32, on the device); under ``torch.distributed`` of the rank-summed sums."""
        if self.flat is None:
            return self.norms
        if _distributed():
            dist.all_reduce(self.flat)
        return torch.stack(torch._foreach_norm(self.accs))

    def zero_(self) -> None:
        """Start a batch."""
        (self.flat if self.flat is not None else self.norms).zero_()


class Sensitivities(dict):
    """``{target name: s_k}`` plus ``batches``, the number of (optimizer-step) batches actually averaged over."""

    def __init__(self, values: Mapping[str, float], batches: int) -> None:
        super().__init__(values)
        self.batches = batches


def _shape_key(batch: Mapping[str, Any]) -> tuple:
    """What batches must share to be stacked: every key, tensor shape and dtype; other values themselves."""
    return tuple(
        (k, tuple(v.shape), v.dtype, v.device) if torch.is_tensor(v) and v.dim() > 0 else (k, repr(v))
        for k, v in sorted(batch.items())
    )


def _stacks(iterator: Iterator[Mapping[str, Any]], num_steps: int, group: int) -> Iterator[list[Mapping[str, Any]]]:
    """The first ``num_steps`` batches, as lists of up to ``group`` batches of one shape (a full list as soon as it
    is full; the partial ones once ``num_steps`` batches are read or the data ends)."""
    pending: dict[tuple, list[Mapping[str, Any]]] = {}
    for read, batch in enumerate(iterator, 1):
        key = _shape_key(batch)
        same = pending.setdefault(key, [])
        same.append(batch)
        if len(same) == group:
            yield pending.pop(key)
        if read == num_steps:
            break
    yield from pending.values()


def _stack(batches: list[Mapping[str, Any]]) -> dict[str, Any]:
    """One batch of the same-shaped ``batches`` concatenated along dim 0 (other values: the first's, all equal)."""
    first = batches[0]
    return {
        k: torch.cat([b[k] for b in batches]) if torch.is_tensor(v) and v.dim() > 0 else v for k, v in first.items()
    }


def _rows(batch: Mapping[str, Any]) -> int:
    """Examples in a stacked batch: the leading dimension its tensors share."""
    return next(int(v.shape[0]) for v in batch.values() if torch.is_tensor(v) and v.dim() > 0)


def compute_sensitivities(
    model: nn.Module,
    batches: Iterable[Mapping[str, Any]],
    num_steps: int = 150,
    gradient_accumulation_steps: int = 1,
    loss_fn: LossFn | None = None,
    adapter_name: str | None = None,
    autocast_dtype: torch.dtype | None = None,
    loss_scale: float | None = None,
    show_progress: bool = True,
    group: int = 1,
) -> Sensitivities:
    """Average full-batch gradient norm ``s_k = mean_b ‖∂L/∂W_k‖_F`` of every LoRA target's base weight.

    Returns a dict (:class:`Sensitivities`) whose ``batches`` says how many batches were measured: fewer than
    ``num_steps`` when the data runs out (a warning says so too).

    Args:
        model: a peft LoRA model (DDP/compile wrappers are unwrapped).
        batches: an iterable of training micro-batches (dicts of tensors; moved to the model's device).
        num_steps: number of (optimizer-step) batches ``b`` to average over.
        gradient_accumulation_steps: micro-batches that make one batch on each process.
        loss_fn: ``loss_fn(model, batch) -> scalar`` mean task loss; default: the model's ``outputs.loss``.
        adapter_name: the LoRA adapter whose layers are measured (default: the active one).
        autocast_dtype: run forward under ``torch.autocast`` with this dtype (as training does).
        loss_scale: constant multiplier on the loss before differentiation (defaults to 2**12 under fp16 so
            small gradients do not underflow; divided out again, so ``s_k`` does not depend on it).
        show_progress: show a tqdm bar (only on the main process).
        group: batches of identical shapes stacked into one forward/backward pass (``iw_calib_group``), each batch's
            ``Gᵀ X`` still taken apart (one batched matmul per call), so ``s_k`` is the same up to float rounding at
            up to ``group``× fewer, larger passes and ``group``× the activation memory. Batches of another shape wait
            for a group of their own (none is reordered into a different batch, none is padded); one process, one
            micro-batch per batch, and every tapped call's input split by example along dim 0.

    The model is put in eval mode (dropout off, so ``s_k`` is a deterministic function of the data) and
    restored afterwards; weights, ``.grad`` buffers and optimizer are untouched.
    """
    if num_steps < 1:
        raise ValueError(f"iw_calib_steps must be >= 1, got {num_steps}")
    if gradient_accumulation_steps < 1:
        raise ValueError(f"gradient_accumulation_steps must be >= 1, got {gradient_accumulation_steps}")
    if group > 1 and (gradient_accumulation_steps > 1 or _distributed()):
        raise ValueError(
            f"iw_calib_group={group} needs one process and gradient_accumulation_steps=1 (each stacked batch's sum "
            f"must end with its backward pass); got {world_size()} processes, gradient_accumulation_steps="
            f"{gradient_accumulation_steps}: use iw_calib_group=1"
        )
    loss_fn = loss_fn or default_loss_fn
    inner = unwrap_model(model)
    targets = find_lora_targets(inner, adapter_name)
    shifts = loss_shifts_labels(inner)
    device = next(inner.parameters()).device
    if loss_scale is None:
        loss_scale = 2.0**12 if autocast_dtype == torch.float16 else 1.0

    # One micro-batch per batch on one process: each target's sum is reduced to its norm during the backward pass;
    # otherwise the batch's sums must outlive it (see the module docstring for the sizes).
    sums = WeightGradNorms.for_batches(targets, device, gradient_accumulation_steps)
    totals = torch.zeros(len(targets), device=device, dtype=torch.float64)
    examples = torch.zeros((), device=device, dtype=torch.float64)

    # Every module's own flag, restored afterwards: ``inner.train(was_training)`` would switch on the dropouts of a
    # base model that from_pretrained left in eval mode under peft's (training) wrapper.
    modes = [(m, m.training) for m in inner.modules()]
    taps = _CallTaps(targets, sums, device)
    is_main = not _distributed() or dist.get_rank() == 0
    bar = tqdm(total=num_steps, desc="IW calibration", disable=not (show_progress and is_main), leave=False)
    amp = (
        torch.autocast(device_type=device.type, dtype=autocast_dtype)
        if autocast_dtype is not None
        else contextlib.nullcontext()
    )
    measured = 0
    iterator = iter(batches)

    def backward(batch: Mapping[str, Any], n: int | torch.Tensor) -> None:
        """One micro-batch's forward pass and its backward to the taps, for a loss summed over its ``n`` items."""
        taps.start_micro_batch()
        with amp, run_eagerly(inner):  # compiled in place: hooks and autograd.grad need eager tensors
            loss = loss_fn(inner, batch)
        taps.end_forward()
        if not taps.calls:
            raise ValueError("calibration: no LoRA layer ran in the forward pass; check target_modules")
        if taps.frozen:
            raise ValueError(
                f"calibration: the output of LoRA layer '{targets[taps.frozen[0]].name}' does not require "
                "grad; the LoRA parameters must be trainable (requires_grad=True)"
            )
        # The taps' hooks add every call's Gᵀ X as the backward pass reaches it; the result is one scalar.
        torch.autograd.grad(loss.float() * (n * loss_scale), taps.probe, allow_unused=True)
        del loss
        sums.end_micro_batch()

    try:
        inner.eval()
        for stacked in _stacks(iterator, num_steps, group) if group > 1 else ():
            batch = send_to_device(_stack(stacked), device, non_blocking=True)
            items = [loss_items(b, shifts) for b in stacked]  # each batch's own: its mean loss's item count
            sums.set_segments(len(stacked), _rows(batch))
            backward(batch, sum(items))  # the stacked mean loss times all items: every batch's summed loss
            norms = sums.batch_norms().double().reshape(len(stacked), -1)  # (batches, K)
            counts = torch.stack([torch.as_tensor(i, dtype=torch.float64, device=device) for i in items])
            totals += (norms / (counts.reshape(-1, 1) * loss_scale)).sum(0)
            measured += len(stacked)
            bar.update(len(stacked))
        for _ in range(num_steps if group == 1 else 0):
            sums.zero_()
            examples.zero_()
            got = 0
            for batch in iterator:
                batch = send_to_device(batch, device, non_blocking=True)
                n = loss_items(batch, shifts)
                backward(batch, n)
                examples += n
                got += 1
                if got == gradient_accumulation_steps:
                    break
            if got < gradient_accumulation_steps:
                break  # data exhausted: only complete batches count
            norms = sums.batch_norms().double()  # all-reduced across ranks (buffered)
            if _distributed():
                dist.all_reduce(examples)
            totals += norms / (examples * loss_scale)
            measured += 1
            bar.update(1)
    finally:
        taps.remove()
        bar.close()
        for module, training in modes:
            module.training = training
        if hasattr(iterator, "close"):
            iterator.close()
        end = getattr(batches, "end", None)
        if callable(end) and getattr(batches, "gradient_state", None) is not None:
            end()  # accelerate's DataLoaderShard registers itself on iter(); unregister like a full pass would

    if measured == 0:
        raise ValueError(
            "calibration: the training data has fewer micro-batches than one optimizer step "
            f"(gradient_accumulation_steps={gradient_accumulation_steps})"
        )
    if measured < num_steps:
        logger.warning("iw_calib_steps=%d but the training data gave only %d batches", num_steps, measured)
    values = (totals / measured).tolist()  # the only host sync
    return Sensitivities({t.name: v for t, v in zip(targets, values)}, measured)
