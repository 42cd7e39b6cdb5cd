"""Gradient-norm rank allocation (``gradnorm``; the source documents call it GLoRA).

Each LoRA target k gets its own rank from an importance ``g_k``:

    p_k = g_k / Σ_j g_j,    r_k ≈ R · p_k,    Σ_k r_k = R exactly  (R = K × r by default)

Two ways to get ``g_k``:

* **cheap** (:func:`gradnorm_rank_pattern`): the calibration sensitivities ``s_k = mean_b ‖∂L/∂W_k‖_F`` (base-weight
  gradients, see ``sensitivity.py``), before training; the result is a peft ``LoraConfig`` with a ``rank_pattern``.
* **faithful** (:class:`GradNormRankCallback`): an EMA (β = 0.9) of the LoRA update-gradient norm
  ``‖[∂L/∂A_k, ∂L/∂B_k]‖_F`` over a warm-up of W optimizer steps; then every LoRA layer is rebuilt in place with its
  new rank, keeping its learned directions and its optimizer state, and training continues in the same run.

Conventions shared by both modes:

* **Rank 0 means no adapter**: the module is not adapted at all (cheap: left out of ``target_modules``; faithful: its
  peft LoRA wrapper is replaced by the original base layer), so ``Δ_k = 0`` and it has no trainable parameters.
* **Scaling stays uniform**: every module keeps ``scaling = lora_alpha / r`` of the uniform-rank model (``/ sqrt(r)``
  with rsLoRA), expressed to peft through ``alpha_pattern`` (``alpha_k = scaling · r_k``). With peft's default
  ``lora_alpha / r_k`` a rank-1 module would get an r× larger scale, i.e. an r× larger effective learning rate under
  Adam; a uniform scale keeps every kept direction on the same footing, keeps ``Δ`` unchanged by a faithful rebuild
  and keeps the IW penalty's ``s²`` factor unchanged.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from peft import LoraConfig
from torch import nn
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from .targets import LoraTarget, find_lora_targets, mark_layout_changed, unwrap_model

logger = logging.getLogger(__name__)

RANK_ALLOCATION_FILE = "rank_allocation.json"

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


# -- cheap mode ----------------------------------------------------------------------------------------------------


@dataclass
class RankPlan:
    """Per-module ranks and the peft patterns that express them (modules with rank 0 are left out)."""

    ranks: dict[str, int]
    rank_pattern: dict[str, int]
    alpha_pattern: dict[str, float]
    target_modules: list[str]
    lora_r: int
    lora_alpha: float
    use_rslora: bool = False
    importance: dict[str, float] = field(default_factory=dict)

    @property
    def budget(self) -> int:
        return sum(self.ranks.values())

    def lora_config(self, **kwargs: Any) -> LoraConfig:
        """``LoraConfig(r=lora_r, lora_alpha, target_modules, rank_pattern, alpha_pattern, use_rslora, **kwargs)``."""
        return LoraConfig(
            r=self.lora_r,
            lora_alpha=self.lora_alpha,
            target_modules=list(self.target_modules),
            rank_pattern=dict(self.rank_pattern),
            alpha_pattern=dict(self.alpha_pattern),
            use_rslora=self.use_rslora,
            **kwargs,
        )


def _as_importance(sensitivities: Mapping[str, Any]) -> dict[str, float]:
    """``{name: s_k}``, ``SensitivityCallback.record`` or its ``["modules"]`` (``{name: {"sensitivity": …}}``)."""
    if isinstance(sensitivities.get("modules"), Mapping):
        sensitivities = sensitivities["modules"]
    return {k: float(v["sensitivity"] if isinstance(v, Mapping) else v) for k, v in sensitivities.items()}


def gradnorm_rank_pattern(
    sensitivities: Mapping[str, Any],
    lora_r: int,
    lora_alpha: float = 16,
    total_rank: int | None = None,
    min_rank: int = 0,
    max_rank: RankCap = None,
    use_rslora: bool = False,
) -> RankPlan:
    """Cheap mode: ranks from calibration sensitivities, as a peft ``rank_pattern`` to use before training.

    ``r_k = allocate_ranks(s, R)`` with ``R = K × lora_r`` by default. Keys are module paths in the base model
    (``bert.encoder.layer.0.attention.self.query``), which peft's pattern matching takes as full names. Modules with
    ``r_k = 0`` are left out of ``target_modules``. ``alpha_pattern`` keeps ``scaling = lora_alpha / lora_r`` for every
    module. Build the model with ``plan.lora_config(modules_to_save=..., lora_dropout=...)``.
    """
    importance = _as_importance(sensitivities)
    budget = len(importance) * lora_r if total_rank is None else total_rank
    ranks = allocate_ranks(importance, budget, min_rank, max_rank)
    scaling = lora_alpha / (math.sqrt(lora_r) if use_rslora else lora_r)
    kept = [n for n, r in ranks.items() if r > 0]
    if not kept:
        raise ValueError("gradnorm_rank_pattern: every module got rank 0 (budget 0); nothing to adapt")
    return RankPlan(
        ranks=ranks,
        rank_pattern={n: ranks[n] for n in kept},
        alpha_pattern={n: _uniform_scale_alpha(scaling, ranks[n], use_rslora) for n in kept},
        target_modules=kept,
        lora_r=lora_r,
        lora_alpha=lora_alpha,
        use_rslora=use_rslora,
        importance=importance,
    )


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


def _world_size(args: TrainingArguments) -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(getattr(args, "world_size", 1) or 1)


class GradNormRankCallback(TrainerCallback):
    """Faithful gradnorm: EMA of ``‖[∂L/∂A_k, ∂L/∂B_k]‖_F`` over ``warmup_steps`` optimizer steps, then re-allocate.

    ``g_k ← β·g_k + (1−β)·‖[∂L/∂A_k, ∂L/∂B_k]‖_F`` once per optimizer step (β = 0.9), read in
    ``on_pre_optimizer_step`` — the accumulated gradients of the whole step, after clipping: clipping multiplies every
    module by the same factor within a step, so it only re-weights steps in the EMA, not modules against each other.
    The norms stay on the device (one ``_foreach_norm``); the EMA is committed in ``on_optimizer_step`` unless the
    fp16 grad scaler skipped the step. At ``on_step_end`` with ``global_step == warmup_steps`` the ranks
    ``allocate_ranks(g, R)`` (``R`` = current total rank, i.e. K × r, by default; each capped at ``min(d_in, d_out)``)
    are applied with :func:`rebuild_lora_ranks`, including the optimizer's parameters and state, and
    ``rank_allocation.json`` is written to ``output_dir``.

    Single-process only: DDP's gradient buckets, FSDP and DeepSpeed hold views of the old parameters, so those raise at
    ``on_train_begin`` (use the cheap mode, :func:`gradnorm_rank_pattern`, there). Resuming a run after the rebuild
    is not supported (the checkpoint has the new shapes; build the model from ``rank_allocation.json`` instead).
    """

    def __init__(
        self,
        warmup_steps: int,
        total_rank: int | None = None,
        beta: float = 0.9,
        min_rank: int = 0,
        max_rank: RankCap = None,
        adapter_name: str | None = None,
        write_file: bool = True,
    ) -> None:
        if warmup_steps < 1:
            raise ValueError(f"GradNormRankCallback: warmup_steps must be >= 1, got {warmup_steps}")
        if not 0 <= beta < 1:
            raise ValueError(f"GradNormRankCallback: beta must lie in [0, 1), got {beta}")
        self.warmup_steps = warmup_steps
        self.total_rank = total_rank
        self.beta = beta
        self.min_rank = min_rank
        self.max_rank = max_rank
        self.adapter_name = adapter_name
        self.write_file = write_file
        self.record: dict[str, Any] | None = None
        self.done = False
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
        if _world_size(args) > 1 or getattr(args, "deepspeed", None) or getattr(args, "fsdp", None):
            raise RuntimeError(
                "GradNormRankCallback (faithful gradnorm rank allocation) rebuilds the LoRA parameters mid-run, which "
                "only works in a single process: DDP's gradient buckets (and FSDP/DeepSpeed shards) keep the old "
                "parameters. Use the cheap mode instead: ranks from the calibration sensitivities before training "
                "(iwtrainer.rank_allocation.gradnorm_rank_pattern)."
            )
        if self.warmup_steps >= state.max_steps:
            raise ValueError(
                f"GradNormRankCallback: warmup_steps={self.warmup_steps} >= the run's {state.max_steps} optimizer "
                "steps; the ranks would never be re-allocated. Shorten the warm-up or train longer."
            )
        if state.global_step >= self.warmup_steps:
            raise RuntimeError(
                "GradNormRankCallback: resuming after the rank re-allocation is not supported; build the model with "
                f"the ranks in {RANK_ALLOCATION_FILE} (gradnorm_rank_pattern / rebuild_lora_ranks) and train on"
            )
        if state.global_step > 0:
            logger.warning("gradnorm: resuming inside the warm-up; the gradient-norm EMA restarts from zero")
        self._reset()
        self.record, self.done = None, False
        self._targets = find_lora_targets(model, self.adapter_name)
        self._params = [p for t in self._targets for p in (t.lora_A, t.lora_B)]
        self._ema = torch.zeros(len(self._targets), dtype=torch.float32, device=self._params[0].device)

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
        if self.write_file and state.is_world_process_zero:
            os.makedirs(args.output_dir, exist_ok=True)
            with open(os.path.join(args.output_dir, RANK_ALLOCATION_FILE), "w") as f:
                json.dump(self.record, f, indent=2)
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
