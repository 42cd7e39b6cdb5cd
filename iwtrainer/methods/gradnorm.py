"""Gradient-norm rank allocation (``--adapter gradnorm``; the source documents call it GLoRA).

Each LoRA target k gets its own rank from an importance ``g_k``:

    p_k = g_k / Σ_j g_j,    r_k ≈ R · p_k,    Σ_k r_k = R exactly  (R = K × r by default)

Two ways to get ``g_k`` (``--rank_allocation_mode``):

* **ema** (the source's method, :class:`GradNormRankCallback`): an EMA (β = 0.9) of the LoRA update-gradient norm
  ``‖[∂L/∂A_k, ∂L/∂B_k]‖_F`` over a warm-up of W optimizer steps; then every LoRA layer is rebuilt in place with its
  new rank, keeping its learned directions and its optimizer state, and training continues in the same run. Single
  process only.
* **calibration** (:class:`RankCalibration`): the base-weight gradient norms ``s_k = mean_b ‖∂L/∂W_k‖_F`` (IW's
  calibration measure, ``sensitivity.py``) over ``--rank_calib_steps`` batches before training, which then starts
  with the allocated ranks. Works under DDP.

Conventions shared by both modes:

* **Rank 0 means no adapter**: the module's peft LoRA wrapper is replaced by the original base layer, so ``Δ_k = 0``
  and it has no trainable parameters.
* **Scaling stays uniform**: every module keeps ``scaling = lora_alpha / r`` of the uniform-rank model (``/ sqrt(r)``
  with rsLoRA), expressed to peft through ``alpha_pattern`` (``alpha_k = scaling · r_k``). With peft's default
  ``lora_alpha / r_k`` a rank-1 module would get an r× larger scale, i.e. an r× larger effective learning rate under
  Adam; a uniform scale keeps every kept direction on the same footing, keeps ``Δ`` unchanged by a rebuild and keeps
  the IW penalty's ``s²`` factor unchanged.

Both modes write their record to ``<output_dir>/rank_allocation.json``.
"""

from __future__ import annotations

import inspect
import json
import logging
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from ..files import write_json
from ..sensitivity import compute_sensitivities
from ..settings import IWSettings
from ..targets import LoraTarget, find_lora_targets, mark_layout_changed, unwrap_model
from ..training_args import IWTrainingArguments
from .base import (
    Method,
    MethodContext,
    MethodSetup,
    estimate_train_steps,
    has_length,
    on_training_device,
    optimizer_steps_per_epoch,
    shuffled_training_batches,
    world_size,
)

logger = logging.getLogger(__name__)

RANK_ALLOCATION_FILE = "rank_allocation.json"
GRADNORM_STATE_FILE = "gradnorm_state.json"  # in every checkpoint of an ema run: its EMA, or its allocation

RankCap = int | Mapping[str, int] | None


# -- allocation ------------------------------------------------------------------------------------------------


def _waterfill(g: np.ndarray, lo: np.ndarray, hi: np.ndarray, total: float) -> np.ndarray:
    """Continuous quotas ``q_k = clip(λ·g_k, lo_k, hi_k)`` with ``Σ q_k = total`` (λ by bisection)."""
    simple = total * g / g.sum()
    if np.all(simple >= lo) and np.all(simple <= hi):
        return simple  # the common case, exact: q_k = R·p_k
    pos = g > 0
    reachable = hi[pos].sum() + lo[~pos].sum()
    if reachable < total:
        # The important modules are all at their caps: the rest of the budget goes evenly to the zero-importance ones.
        q = np.where(pos, hi, lo).astype(np.float64)
        q[~pos] = _waterfill(np.ones(int((~pos).sum())), lo[~pos], hi[~pos], total - hi[pos].sum())
        return q

    def filled(lam: float) -> float:
        return float(np.clip(lam * g, lo, hi).sum())

    lam_lo, lam_hi = 0.0, total / g.sum()
    while filled(lam_hi) < total:
        lam_hi *= 2.0
    for _ in range(200):  # Σ clip(λg) is monotone in λ; 200 halvings reach float precision
        mid = 0.5 * (lam_lo + lam_hi)
        if filled(mid) < total:
            lam_lo = mid
        else:
            lam_hi = mid
    return np.clip(lam_hi * g, lo, hi)


def _caps(names: list[str], max_rank: RankCap) -> np.ndarray:
    if max_rank is None:
        return np.full(len(names), np.inf)
    if isinstance(max_rank, Mapping):
        return np.array([float(max_rank.get(n, np.inf)) for n in names])
    return np.full(len(names), float(max_rank))


def allocate_ranks(
    importance: Mapping[str, float], total_rank: int, min_rank: int = 0, max_rank: RankCap = None
) -> dict[str, int]:
    """Integer ranks ``r_k`` proportional to ``g_k`` with ``Σ_k r_k == total_rank`` exactly.

    ``q_k = R · g_k / Σ_j g_j`` (clipped to ``[min_rank, max_rank_k]`` by water-filling when a bound binds), then
    largest remainders: every module gets ``floor(q_k)`` and the ``R − Σ floor(q_k)`` modules with the largest
    fractional parts get one more, so each ``r_k`` is ``floor(q_k)`` or ``ceil(q_k)`` — ``round(q_k)`` corrected to
    meet the budget. Ties break by larger importance, then by order, so ``g_i > g_j`` implies ``r_i ≥ r_j`` (with
    equal bounds). ``max_rank`` is an int or a per-module cap mapping (e.g. ``min(d_in, d_out)``). All-zero
    importance falls back to a uniform allocation.
    """
    names = list(importance)
    if not names:
        raise ValueError("allocate_ranks: no modules")
    if isinstance(total_rank, bool) or int(total_rank) != total_rank or total_rank < 0:
        raise ValueError(f"allocate_ranks: total_rank must be a non-negative integer, got {total_rank!r}")
    if min_rank < 0:
        raise ValueError(f"allocate_ranks: min_rank must be >= 0, got {min_rank}")
    g = np.array([float(importance[n]) for n in names], dtype=np.float64)
    if not np.all(np.isfinite(g)) or np.any(g < 0):
        bad = names[int(np.argmax(~np.isfinite(g) | (g < 0)))]
        raise ValueError(f"allocate_ranks: importance must be finite and >= 0, got {importance[bad]} for '{bad}'")
    lo = np.full(len(names), float(min_rank))
    hi = _caps(names, max_rank)
    if np.any(hi < lo):
        bad = names[int(np.argmax(hi < lo))]
        raise ValueError(f"allocate_ranks: max_rank {hi[names.index(bad)]:g} < min_rank {min_rank} for '{bad}'")
    if not lo.sum() <= total_rank <= hi.sum():
        raise ValueError(
            f"allocate_ranks: a budget of {total_rank} cannot be met within the bounds: {len(names)} modules need at "
            f"least {lo.sum():g} (min_rank={min_rank}) and take at most {hi.sum():g} (max_rank)"
        )
    if g.sum() == 0:
        logger.warning("allocate_ranks: every importance is 0; allocating the budget uniformly")
        g = np.ones_like(g)

    q = _waterfill(g, lo, hi, float(total_rank))
    ranks = np.clip(np.floor(q), lo, hi).astype(np.int64)
    remainder = q - ranks
    deficit = int(total_rank - ranks.sum())
    # Hand out (or take back, after float error) single units in remainder order; ties by importance, then order.
    while deficit > 0:
        order = sorted((i for i in range(len(names)) if ranks[i] < hi[i]), key=lambda i: (-remainder[i], -g[i], i))
        for i in order[:deficit]:
            ranks[i] += 1
            remainder[i] -= 1.0
        deficit = int(total_rank - ranks.sum())
    while deficit < 0:
        order = sorted((i for i in range(len(names)) if ranks[i] > lo[i]), key=lambda i: (remainder[i], g[i], -i))
        for i in order[:-deficit]:
            ranks[i] -= 1
            remainder[i] += 1.0
        deficit = int(total_rank - ranks.sum())
    return {n: int(r) for n, r in zip(names, ranks)}


def _uniform_scale_alpha(scaling: float, rank: int, use_rslora: bool) -> float:
    """``alpha_k`` with ``alpha_k / r_k == scaling`` (``/ sqrt(r_k)`` with rsLoRA): peft rebuilds that scale."""
    return scaling * (math.sqrt(rank) if use_rslora else rank)


# -- in-place rebuild (faithful mode) ------------------------------------------------------------------------------


def _torch_optimizer(optimizer: Any) -> torch.optim.Optimizer | None:
    """accelerate's ``AcceleratedOptimizer`` wraps the torch optimizer in ``.optimizer``."""
    while (
        optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer) and hasattr(optimizer, "optimizer")
    ):
        optimizer = optimizer.optimizer
    return optimizer


def _move_optimizer_state(
    optimizer: torch.optim.Optimizer | None,
    old: nn.Parameter,
    new: nn.Parameter | None,
    reshape: Callable[[torch.Tensor], torch.Tensor],
) -> None:
    """Put ``new`` where ``old`` was in ``param_groups`` (or drop it) and carry the per-parameter state over.

    Tensors shaped like the parameter (Adam's ``exp_avg``/``exp_avg_sq``, momentum buffers) go through ``reshape``
    (kept rows/columns, zeros for new ones); scalars such as ``step`` are copied, so bias correction continues.
    """
    if optimizer is None:
        return
    for group in optimizer.param_groups:
        params = group["params"]
        for i, p in enumerate(params):
            if p is old:
                if new is None:
                    del params[i]
                else:
                    params[i] = new
                break
    state = optimizer.state.pop(old, None)
    if not state or new is None:
        return
    moved = {}
    for key, value in state.items():
        if torch.is_tensor(value) and value.shape == old.shape:
            moved[key] = reshape(value)
        elif torch.is_tensor(value) and value.numel() <= 1:
            moved[key] = value.clone()
        elif torch.is_tensor(value):
            raise ValueError(
                f"rank re-allocation: cannot re-shape the optimizer state '{key}' of shape {tuple(value.shape)} for a "
                f"parameter of shape {tuple(old.shape)} ({type(optimizer).__name__}); use AdamW/SGD-style optimizers"
            )
        else:
            moved[key] = value
    optimizer.state[new] = moved


def _rows(keep: torch.Tensor, rank: int) -> Callable[[torch.Tensor], torch.Tensor]:
    def reshape(t: torch.Tensor) -> torch.Tensor:
        out = t.new_zeros((rank, *t.shape[1:]))
        out[: len(keep)] = t[keep]
        return out

    return reshape


def _cols(keep: torch.Tensor, rank: int) -> Callable[[torch.Tensor], torch.Tensor]:
    def reshape(t: torch.Tensor) -> torch.Tensor:
        out = t.new_zeros((t.shape[0], rank))
        out[:, : len(keep)] = t[:, keep]
        return out

    return reshape


def _peft_config(model: nn.Module, adapter: str) -> Any:
    configs = getattr(model, "peft_config", None)
    return configs.get(adapter) if isinstance(configs, Mapping) else None


def kept_directions(target: LoraTarget, rank: int) -> torch.Tensor:
    """Indices (ascending) of the ``min(rank, r)`` directions ``i`` with the largest ``‖B[:, i]‖·‖A[i, :]‖``."""
    with torch.no_grad():
        contribution = target.lora_B.float().norm(dim=0) * target.lora_A.float().norm(dim=1)
        n = min(rank, contribution.numel())
        # stable sort: equal contributions (e.g. B = 0) keep the lowest indices
        order = torch.sort(contribution, descending=True, stable=True).indices[:n]
        return torch.sort(order).values


@torch.no_grad()
def rebuild_lora_ranks(
    model: nn.Module,
    ranks: Mapping[str, int],
    optimizer: Any = None,
    adapter_name: str | None = None,
) -> dict[str, dict[str, Any]]:
    """Rebuild every LoRA layer in place with rank ``ranks[name]``, keeping ``Δ`` on the kept directions.

    For ``A`` (r×d_in) and ``B`` (d_out×r) the ``r_k`` directions with the largest ``‖B[:, i]‖·‖A[i, :]‖`` are kept;
    when ``r_k > r`` new ``A`` rows are drawn like peft's default (kaiming-uniform, a=√5) and new ``B`` columns are
    zero, so ``Δ_k = s·B[:, kept] A[kept, :]`` right after the rebuild. ``scaling`` is kept (see module docstring);
    ``r``/``lora_alpha`` and the peft config's ``rank_pattern``/``alpha_pattern``/``target_modules`` are updated so
    ``save_pretrained``/``from_pretrained`` rebuild the same shapes. ``r_k = 0`` replaces the LoRA wrapper by its base
    layer. With ``optimizer`` (torch or accelerate-wrapped), replaced parameters are swapped in ``param_groups`` and
    their state is sliced/zero-padded (same ``step``). Calls ``mark_layout_changed(model)``.

    Returns ``{name: {"old_rank", "rank", "kept"}}``.
    """
    inner = unwrap_model(model)
    targets = find_lora_targets(inner, adapter_name)
    names = [t.name for t in targets]
    if set(ranks) != set(names):
        missing, extra = sorted(set(names) - set(ranks)), sorted(set(ranks) - set(names))
        raise ValueError(
            f"rebuild_lora_ranks: ranks must cover exactly the LoRA targets (missing {missing}, unknown {extra})"
        )
    torch_opt = _torch_optimizer(optimizer)
    full_name = {id(m): n for n, m in inner.named_modules()}
    adapter = targets[0].adapter
    info: dict[str, dict[str, Any]] = {}
    kept_alpha: dict[str, float] = {}
    removed: list[str] = []
    for t in targets:
        module, new_rank = t.module, int(ranks[t.name])
        if new_rank < 0:
            raise ValueError(f"rebuild_lora_ranks: negative rank {new_rank} for '{t.name}'")
        old_a, old_b = t.lora_A, t.lora_B
        old_rank = old_a.shape[0]
        keep = kept_directions(t, new_rank)
        info[t.name] = {"old_rank": old_rank, "rank": new_rank, "kept": keep.tolist()}
        rslora = bool(getattr(module, "use_rslora", {}).get(adapter, False))
        if new_rank == 0:
            # No adapter: swap the peft wrapper for the frozen base layer; its LoRA parameters leave the optimizer.
            path = full_name[id(module)]
            parent_path, _, child = path.rpartition(".")
            setattr(inner.get_submodule(parent_path) if parent_path else inner, child, module.get_base_layer())
            for p in module.lora_A[adapter].parameters():
                _move_optimizer_state(torch_opt, p, None, lambda x: x)
            for p in module.lora_B[adapter].parameters():
                _move_optimizer_state(torch_opt, p, None, lambda x: x)
            removed.append(t.name)
            continue
        kept_alpha[t.name] = _uniform_scale_alpha(t.scaling, new_rank, rslora)
        module.lora_alpha[adapter] = kept_alpha[t.name]
        if new_rank == old_rank:
            continue  # same shape: nothing to replace (Δ, parameters and optimizer state unchanged)
        d_out, d_in = old_b.shape[0], old_a.shape[1]
        a_weight = torch.empty((new_rank, d_in), dtype=old_a.dtype, device=old_a.device)
        nn.init.kaiming_uniform_(a_weight, a=math.sqrt(5))  # peft's default LoRA A init, for rows beyond the old rank
        a_weight[: len(keep)] = old_a[keep]
        b_weight = old_b.new_zeros((d_out, new_rank))  # new B columns are zero: Δ does not move
        b_weight[:, : len(keep)] = old_b[:, keep]
        new_a = nn.Linear(d_in, new_rank, bias=False, device=old_a.device, dtype=old_a.dtype)
        new_a.weight = nn.Parameter(a_weight, requires_grad=old_a.requires_grad)
        old_bias = module.lora_B[adapter].bias
        new_b = nn.Linear(new_rank, d_out, bias=False, device=old_b.device, dtype=old_b.dtype)
        new_b.weight = nn.Parameter(b_weight, requires_grad=old_b.requires_grad)
        if old_bias is not None:
            new_b.bias = old_bias  # lora_bias does not depend on the rank: same Parameter, same optimizer state
        new_a.train(module.lora_A[adapter].training)
        new_b.train(module.lora_B[adapter].training)
        module.lora_A[adapter] = new_a
        module.lora_B[adapter] = new_b
        module.r[adapter] = new_rank
        _move_optimizer_state(torch_opt, old_a, new_a.weight, _rows(keep.to(old_a.device), new_rank))
        _move_optimizer_state(torch_opt, old_b, new_b.weight, _cols(keep.to(old_b.device), new_rank))

    config = _peft_config(inner, adapter)
    if config is not None:
        # Fresh dicts of full module names: peft takes the *first* matching pattern key, so no stale key may precede.
        config.rank_pattern = {n: info[n]["rank"] for n in names if n in kept_alpha}
        config.alpha_pattern = dict(kept_alpha)
        if removed:
            config.target_modules = set(kept_alpha)
    mark_layout_changed(inner)
    return info


# -- faithful mode ---------------------------------------------------------------------------------------------------


def save_rank_allocation(record: Mapping[str, Any] | None, output_dir: str, state: TrainerState) -> None:
    """Write ``<output_dir>/rank_allocation.json`` on the main process (nothing when no record exists yet)."""
    if record is not None and state.is_world_process_zero:
        write_json(os.path.join(output_dir, RANK_ALLOCATION_FILE), record)


def check_single_process(args: Any) -> None:
    """The ema mode rebuilds LoRA parameters mid-run: only possible in one process (raises ``ValueError``)."""
    world = world_size(args)
    if world > 1 or getattr(args, "deepspeed", None) or getattr(args, "fsdp", None):
        where = f"{world} processes" if world > 1 else "DeepSpeed/FSDP"
        raise ValueError(
            "--rank_allocation_mode ema rebuilds the LoRA layers mid-run (DDP's gradient buckets and FSDP/DeepSpeed "
            f"shards would keep the old parameters), which only works in a single process, not with {where}: use "
            "--rank_allocation_mode calibration"
        )


class GradNormRankCallback(TrainerCallback):
    """ema mode: EMA of ``‖[∂L/∂A_k, ∂L/∂B_k]‖_F`` over ``warmup_steps`` optimizer steps, then re-allocate.

    ``g_k ← β·g_k + (1−β)·‖[∂L/∂A_k, ∂L/∂B_k]‖_F`` once per optimizer step (β = 0.9), read in
    ``on_pre_optimizer_step`` — the accumulated gradients of the whole step, after clipping: clipping multiplies every
    module by the same factor within a step, so it only re-weights steps in the EMA, not modules against each other.
    The norms stay on the device (one ``_foreach_norm``); the EMA is committed in ``on_optimizer_step`` unless the
    fp16 grad scaler skipped the step. At ``on_step_end`` with ``global_step == warmup_steps`` the ranks
    ``allocate_ranks(g, R)`` (``R`` = current total rank, i.e. K × r, by default; each capped at ``min(d_in, d_out)``)
    are applied with :func:`rebuild_lora_ranks`, including the optimizer's parameters and state, and
    ``rank_allocation.json`` is written to ``output_dir``. ``warmup_steps=None`` means one epoch of the Trainer's
    optimizer steps.

    Single-process only (:func:`check_single_process`; use ``--rank_allocation_mode calibration`` elsewhere). Resuming
    a run after the rebuild is not supported (the checkpoint has the new shapes; build the model from
    ``rank_allocation.json`` instead).
    """

    def __init__(
        self,
        warmup_steps: int | None,
        total_rank: int | None = None,
        beta: float = 0.9,
        min_rank: int = 0,
        max_rank: RankCap = None,
        adapter_name: str | None = None,
        write_file: bool = True,
    ) -> None:
        if warmup_steps is not None and warmup_steps < 1:
            raise ValueError(f"GradNormRankCallback: warmup_steps must be >= 1, got {warmup_steps}")
        if not 0 <= beta < 1:
            raise ValueError(f"GradNormRankCallback: beta must lie in [0, 1), got {beta}")
        self.requested_warmup = warmup_steps
        self.warmup_steps = warmup_steps or 1
        self.total_rank = total_rank
        self.beta = beta
        self.min_rank = min_rank
        self.max_rank = max_rank
        self.adapter_name = adapter_name
        self.write_file = write_file
        self.record: dict[str, Any] | None = None
        self.done = False
        self._resumed: dict[str, Any] | None = None
        self._reset()

    def _reset(self) -> None:
        self._targets: list[LoraTarget] = []
        self._params: list[nn.Parameter] = []
        self._ema: torch.Tensor | None = None
        self._pending: torch.Tensor | None = None
        self._count = 0

    def on_train_begin(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: nn.Module | None = None,
        **kwargs: Any,
    ) -> None:
        check_single_process(args)
        if self.requested_warmup is None:
            loader = kwargs.get("train_dataloader")
            if loader is None or not has_length(loader):
                raise ValueError("--rank_warmup_steps is required when the training data has no length")
            ga = args.gradient_accumulation_steps
            self.warmup_steps = max(len(loader) // ga + int(len(loader) % ga > 0), 1)  # the Trainer's epoch
        if self.warmup_steps >= state.max_steps:
            raise ValueError(
                f"GradNormRankCallback: warmup_steps={self.warmup_steps} >= the run's {state.max_steps} optimizer "
                "steps; the ranks would never be re-allocated. Shorten the warm-up or train longer."
            )
        resumed, self._resumed = self._resumed, None
        if state.global_step > 0 and resumed is None:
            raise RuntimeError(
                f"GradNormRankCallback: resuming at step {state.global_step} without the checkpoint's "
                f"{GRADNORM_STATE_FILE}; resume through IWTrainer.train(resume_from_checkpoint=...), which restores "
                "the allocated ranks and the gradient-norm EMA before the weights"
            )
        self._reset()
        if resumed is not None and resumed["done"]:  # the ranks were allocated before the checkpoint: nothing to do
            self.record, self.done = resumed["record"], True
            return
        self.record, self.done = None, False
        self._targets = find_lora_targets(model, self.adapter_name)
        self._params = [p for t in self._targets for p in (t.lora_A, t.lora_B)]
        self._ema = torch.zeros(len(self._targets), dtype=torch.float32, device=self._params[0].device)
        if resumed is not None:  # inside the warm-up: the EMA continues where the checkpoint left it
            ema = resumed["ema"]
            self._ema.copy_(torch.tensor([ema[t.name] for t in self._targets], dtype=torch.float32))
            self._count = resumed["count"]

    # -- exact resume ------------------------------------------------------------------------------------------------
    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        """``gradnorm_state.json`` in the checkpoint: the EMA and its count, or the allocation once it happened."""
        folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        if not state.is_world_process_zero or not os.path.isdir(folder):
            return
        ema = self._ema.tolist() if self._ema is not None else []  # one sync per checkpoint
        write_json(
            os.path.join(folder, GRADNORM_STATE_FILE),
            {
                "done": self.done,
                "count": self._count,
                "ema": {t.name: v for t, v in zip(self._targets, ema)},
                "record": self.record,
            },
        )

    def load_resume_state(self, checkpoint: str, model: nn.Module) -> None:
        """Called by [`IWTrainer`] before the checkpoint's weights are loaded: rebuild the LoRA layers with the
        allocated ranks (so the weights and the optimizer state fit), or keep the warm-up's EMA for
        ``on_train_begin``."""
        path = os.path.join(checkpoint, GRADNORM_STATE_FILE)
        if not os.path.isfile(path):
            raise ValueError(
                f"{checkpoint} has no {GRADNORM_STATE_FILE}: it was not written by a gradnorm run, so its ranks and "
                "gradient-norm EMA cannot be restored; start fresh"
            )
        with open(path) as handle:
            self._resumed = json.load(handle)
        if self._resumed["done"]:
            ranks = {name: m["rank"] for name, m in self._resumed["record"]["modules"].items()}
            rebuild_lora_ranks(model, ranks, adapter_name=self.adapter_name)

    def on_pre_optimizer_step(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self.done or self._ema is None or state.global_step >= self.warmup_steps:
            return
        grads = [p.grad if p.grad is not None else p.new_zeros(()) for p in self._params]
        norms = torch.stack([n.float() for n in torch._foreach_norm(grads)]).view(-1, 2)  # (K, [A, B])
        self._pending = norms.square().sum(dim=1).sqrt().to(self._ema.device)

    def on_optimizer_step(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, optimizer: Any = None, **kwargs
    ) -> None:
        if self._pending is None:
            return
        if not getattr(optimizer, "step_was_skipped", False):  # fp16 overflow: inf/nan norms must not enter the EMA
            self._ema.mul_(self.beta).add_(self._pending, alpha=1 - self.beta)
            self._count += 1
        self._pending = None

    def on_step_end(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: nn.Module | None = None,
        optimizer: Any = None,
        **kwargs: Any,
    ) -> None:
        if self.done or self._ema is None or state.global_step != self.warmup_steps:
            return
        if self._count == 0:
            raise RuntimeError("gradnorm: no optimizer step completed during the warm-up; nothing to allocate from")
        ema = (self._ema / (1 - self.beta**self._count)).tolist()  # bias-corrected; the only host sync
        names = [t.name for t in self._targets]
        importance = dict(zip(names, ema))
        budget = self.total_rank if self.total_rank is not None else sum(t.lora_A.shape[0] for t in self._targets)
        caps = {}
        for t in self._targets:
            user = self.max_rank.get(t.name) if isinstance(self.max_rank, Mapping) else self.max_rank
            caps[t.name] = min(t.lora_A.shape[1], t.lora_B.shape[0], *([user] if user is not None else []))
        ranks = allocate_ranks(importance, budget, self.min_rank, caps)
        info = rebuild_lora_ranks(model, ranks, optimizer, self.adapter_name)
        self.done = True
        self._reset()
        total = sum(importance.values()) or 1.0
        self.record = {
            "mode": "gradnorm",
            "rank_allocation_mode": "ema",
            "warmup_steps": self.warmup_steps,
            "beta": self.beta,
            "budget": budget,
            "min_rank": self.min_rank,
            "modules": {
                n: {
                    "ema_grad_norm": importance[n],
                    "share": importance[n] / total,
                    "old_rank": info[n]["old_rank"],
                    "rank": ranks[n],
                    "kept": info[n]["kept"],
                }
                for n in names
            },
        }
        if self.write_file:
            save_rank_allocation(self.record, args.output_dir, state)
        dropped = [n for n, r in ranks.items() if r == 0]
        logger.info(
            "gradnorm: re-allocated %d ranks over %d matrices after %d steps (min %d, max %d, %d without adapter)",
            budget,
            len(ranks),
            self.warmup_steps,
            min(ranks.values()),
            max(ranks.values()),
            len(dropped),
        )


# -- calibration mode ------------------------------------------------------------------------------------------------
@dataclass
class RankCalibration:
    """calibration mode: ranks from the base weights' gradient norms, applied before training.

    ``s_k = mean_b ‖∂L/∂W_k‖_F`` (:func:`compute_sensitivities`, the IW calibration's measure) over ``calib_steps``
    batches of a plain shuffled DataLoader, ``r = allocate_ranks(s, budget, min_rank, caps)``, then
    :func:`rebuild_lora_ranks` in place (same model object; rank 0 removes the adapter). ``record`` is the content of
    ``rank_allocation.json``.
    """

    budget: int
    min_rank: int
    caps: dict[str, int]
    calib_steps: int = IWSettings.calib_steps
    record: dict[str, Any] | None = None

    def run(self, model: nn.Module, dataset: Any, collator: Callable, training_args: IWTrainingArguments) -> None:
        loader = shuffled_training_batches(
            _model_input_columns(dataset, model), collator, training_args, training_args.dataloader_drop_last
        )
        autocast = torch.bfloat16 if training_args.bf16 else torch.float16 if training_args.fp16 else None
        with on_training_device(model, training_args):
            sensitivities = compute_sensitivities(
                model,
                loader,
                num_steps=self.calib_steps,
                gradient_accumulation_steps=training_args.gradient_accumulation_steps,
                autocast_dtype=autocast,
                show_progress=not training_args.disable_tqdm,
            )
        ranks = allocate_ranks(sensitivities, self.budget, self.min_rank, self.caps)
        info = rebuild_lora_ranks(model, ranks)
        total = sum(sensitivities.values()) or 1.0
        self.record = {
            "mode": "gradnorm",
            "rank_allocation_mode": "calibration",
            "rank_calib_steps": self.calib_steps,
            "budget": self.budget,
            "min_rank": self.min_rank,
            "modules": {
                n: {"sensitivity": s, "share": s / total, "old_rank": info[n]["old_rank"], "rank": ranks[n]}
                for n, s in sensitivities.items()
            },
        }
        logger.info(
            "gradnorm (calibration): allocated %d ranks over %d matrices (min %d, max %d, %d without adapter)",
            self.budget,
            len(ranks),
            min(ranks.values()),
            max(ranks.values()),
            sum(r == 0 for r in ranks.values()),
        )


def _model_input_columns(dataset: Any, model: nn.Module) -> Any:
    """``dataset`` without the columns the model's forward does not take (as the Trainer's remove_unused_columns)."""
    if not hasattr(dataset, "remove_columns"):
        return dataset
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    keep = set(inspect.signature(inner.forward).parameters) | {"label", "label_ids", "labels"}
    return dataset.remove_columns([c for c in dataset.column_names if c not in keep])


class _CalibratedRankCallback(TrainerCallback):
    """Refuses to train when the calibration did not run; writes ``rank_allocation.json`` when training ends."""

    def __init__(self, calibration: RankCalibration) -> None:
        self.calibration = calibration

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self.calibration.record is None:
            raise RuntimeError(
                "--rank_allocation_mode calibration: the ranks were not allocated; call "
                "MethodSetup.prepare_training(...) after tokenizing and before building the Trainer"
            )

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        save_rank_allocation(self.calibration.record, args.output_dir, state)


# -- the method ----------------------------------------------------------------------------------------------------
RANK_ALLOCATION_MODES = ("ema", "calibration")


@dataclass
class GradNormArguments:
    """``--adapter gradnorm``: per-matrix LoRA ranks proportional to a gradient norm, Σ r_k = --rank_budget."""

    rank_allocation_mode: str = field(
        default="ema",
        metadata={
            "help": "gradnorm: ema (the source's method: an EMA of the LoRA gradient norms over --rank_warmup_steps "
            "optimizer steps, then the LoRA layers are rebuilt in place with their new ranks, optimizer state "
            "kept; single process only) or calibration (base-weight gradient norms over --rank_calib_steps "
            "batches before training, which then starts with the allocated ranks; works under DDP).",
            "choices": RANK_ALLOCATION_MODES,
        },
    )
    rank_budget: int | None = field(
        default=None,
        metadata={"help": "gradnorm: total rank Σ_k r_k to allocate. Default: K × --lora_r for K adapted matrices."},
    )
    rank_min: int = field(
        default=0,
        metadata={
            "help": "gradnorm: smallest rank per matrix. 0 (default) lets the allocation drop a matrix: rank 0 means "
            "no adapter at all on it (Δ = 0, no trainable parameters); 1 keeps every matrix adapted."
        },
    )
    rank_warmup_steps: int | None = field(
        default=None,
        metadata={
            "help": "gradnorm ema: optimizer steps over which the gradient norms are averaged before re-allocating. "
            "Default: one epoch of optimizer steps (training examples / (batch size × processes), / accumulation)."
        },
    )
    rank_calib_steps: int = field(
        default=IWSettings.calib_steps,
        metadata={"help": "gradnorm calibration: batches over which the base-weight gradient norms are averaged."},
    )

    def __post_init__(self) -> None:
        if self.rank_allocation_mode not in RANK_ALLOCATION_MODES:
            raise ValueError(
                f"--rank_allocation_mode must be one of {list(RANK_ALLOCATION_MODES)}, got "
                f"{self.rank_allocation_mode!r}"
            )
        if self.rank_budget is not None and self.rank_budget < 1:
            raise ValueError(f"--rank_budget must be >= 1, got {self.rank_budget}")
        if self.rank_min < 0:
            raise ValueError(f"--rank_min must be >= 0, got {self.rank_min}")
        if self.rank_warmup_steps is not None and self.rank_warmup_steps < 1:
            raise ValueError(f"--rank_warmup_steps must be >= 1, got {self.rank_warmup_steps}")
        if self.rank_calib_steps < 1:
            raise ValueError(f"--rank_calib_steps must be >= 1, got {self.rank_calib_steps}")


def _check_warmup(warmup: int | None, total_steps: int, steps_per_epoch: int) -> None:
    if (warmup or steps_per_epoch) < total_steps:
        return
    given = f"--rank_warmup_steps {warmup}" if warmup else f"--rank_warmup_steps (one epoch: {steps_per_epoch})"
    raise ValueError(
        f"{given} must be < the run's {total_steps} optimizer steps, or the ranks are never re-allocated: pass a "
        "smaller --rank_warmup_steps or train longer (--max_steps / --num_train_epochs)"
    )


class GradNormMethod(Method):
    """LoRA (with the IW penalty when ``--iw_alpha > 0``) whose ranks are re-allocated by gradient norm."""

    name = "gradnorm"
    arguments = GradNormArguments
    uses_iw = True

    def build(self, model: nn.Module, ctx: MethodContext) -> MethodSetup:
        from .lora import LoraMethod

        setup = LoraMethod().build(model, ctx)
        setup.method = self.name
        opts: GradNormArguments = ctx.options
        lora_targets = find_lora_targets(setup.model)
        caps = {t.name: min(t.lora_A.shape[1], t.lora_B.shape[0]) for t in lora_targets}
        k = len(caps)
        budget = opts.rank_budget if opts.rank_budget is not None else k * ctx.adapter_args.lora_r
        flag = f"--rank_budget {budget}" if opts.rank_budget is not None else f"the rank budget {budget}"
        if budget < opts.rank_min * k:
            raise ValueError(
                f"{flag} is below --rank_min {opts.rank_min} × {k} adapted matrices; lower --rank_min or raise "
                "--rank_budget"
            )
        if budget > sum(caps.values()):
            raise ValueError(
                f"{flag} exceeds {sum(caps.values())}, the largest total rank of the {k} adapted matrices "
                "(Σ min(d_in, d_out)); lower --rank_budget / --lora_r"
            )
        smallest = min(caps, key=caps.__getitem__)
        if opts.rank_min > caps[smallest]:
            raise ValueError(f"--rank_min {opts.rank_min} exceeds min(d_in, d_out) = {caps[smallest]} of {smallest}")
        if opts.rank_allocation_mode == "ema":
            check_single_process(ctx.training_args)
            warmup, max_steps = opts.rank_warmup_steps, ctx.training_args.max_steps
            if warmup is not None and max_steps > 0:
                _check_warmup(warmup, max_steps, warmup)
            setup.callbacks.append(GradNormRankCallback(warmup, total_rank=budget, min_rank=opts.rank_min))
        else:
            setup.state = RankCalibration(budget, opts.rank_min, caps, opts.rank_calib_steps)
            setup.callbacks.append(_CalibratedRankCallback(setup.state))
        return setup

    def prepare(self, setup: MethodSetup, train_dataset: Any, collator: Callable, args: IWTrainingArguments) -> None:
        opts: GradNormArguments = setup.options
        if opts.rank_allocation_mode == "ema":
            if has_length(train_dataset):
                steps = estimate_train_steps(len(train_dataset), args)
                _check_warmup(opts.rank_warmup_steps, steps, optimizer_steps_per_epoch(len(train_dataset), args))
        else:
            setup.state.run(setup.model, train_dataset, collator, args)
