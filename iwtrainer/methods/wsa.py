"""Weighted Spectral Adapter (WSA).

For each target weight ``W`` (``d_out x d_in``) a truncated SVD ``W = U S V^T`` is computed once at wrap time and
the top-``r`` spectral part is made trainable::

    U_r' = U_r + dU,   V_r' = V_r + dV,   g = tanh(s),   S_r' = S_r * (1 + g)
    W'   = W - U_r diag(S_r) V_r^T + U_r' diag(S_r') V_r'^T

``dU``, ``dV`` and ``s`` start at zero, so ``W' == W`` at init. The forward never materialises ``W'``: it runs the
frozen base layer and adds a rank-``r`` correction through the thin factors, using the exact expansion::

    W' - W = dU diag(S_r') V_r'^T + U_r diag(S_r g) V_r'^T + U_r diag(S_r) dV^T

Every term carries a factor ``dU``, ``g`` or ``dV``, so at init the correction is a sum of exact zeros and the output
is bit-identical to ``base(x)`` (no cancellation of two large, equal terms). The expansion is also a sum over
directions, so dropping a direction ``i`` (pruning) reverts it to the base weight's own component
``u_i s_i v_i^T``, which is still inside the untouched ``W``.

An L1 penalty on the gates (:func:`wsa_gate_l1`) pushes unneeded ``g_i`` to zero; :func:`prune_wsa` then drops
directions with ``|g_i| < tau``.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D  # GPT-2 style layer: weight stored d_in x d_out, y = x @ W + b.

from ..files import write_json
from ..targets import candidates_message, is_under, linear_types, module_matches
from .base import Method, MethodContext, MethodSetup

logger = logging.getLogger(__name__)

WSA_CONFIG_NAME = "wsa_config.json"
WSA_WEIGHTS_NAME = "wsa_model.safetensors"
WSA_FORMAT_VERSION = 1


@dataclass
class WSAConfig:
    """Hyper-parameters of the Weighted Spectral Adapter.

    Args:
        r_init: number of top singular directions made trainable per matrix (clipped to ``min(d_out, d_in)``).
        gate_l1: weight ``lambda`` of the gate penalty ``lambda * sum ||tanh(s)||_1`` added to the loss.
        prune_threshold: ``tau``; after training, directions with ``|tanh(s_i)| < tau`` are pruned.
        target_modules: module-name suffixes (``name == t or name.endswith("." + t)``) or a regex string matched
            with ``re.fullmatch`` (peft semantics). ``None`` uses peft's LoRA default for ``model.config.model_type``.
        modules_to_save: modules kept fully trainable and saved with the adapter (e.g. ``["classifier", "score"]``).
    """

    r_init: int = 16
    gate_l1: float = 1e-3
    prune_threshold: float = 0.05
    target_modules: list[str] | str | None = None
    modules_to_save: list[str] | None = field(default=None)

    def __post_init__(self) -> None:
        if isinstance(self.r_init, bool) or not isinstance(self.r_init, int) or self.r_init < 1:
            raise ValueError(f"WSAConfig.r_init must be a positive int, got {self.r_init!r}")
        if self.gate_l1 < 0:
            raise ValueError(f"WSAConfig.gate_l1 must be >= 0, got {self.gate_l1!r}")
        if not 0 <= self.prune_threshold <= 1:  # |tanh| < 1, so tau > 1 has no meaning
            raise ValueError(f"WSAConfig.prune_threshold must be in [0, 1], got {self.prune_threshold!r}")
        if self.target_modules is not None and not isinstance(self.target_modules, str):
            self.target_modules = list(self.target_modules)
        if isinstance(self.modules_to_save, str):
            self.modules_to_save = [self.modules_to_save]
        elif self.modules_to_save is not None:
            self.modules_to_save = list(self.modules_to_save)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> WSAConfig:
        """Build from a dict, ignoring keys that are not config fields (e.g. the per-layer ranks in the JSON)."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


class WSALinear(nn.Module):
    """Spectral adapter around a frozen ``nn.Linear`` or GPT-2 ``Conv1D``.

    ``y = base(x) + x V_r' diag(S_r') dU^T + x V_r' diag(S_r g) U_r^T + x dV diag(S_r) U_r^T``
    with ``V_r' = V_r + dV``, ``g = tanh(s)``, ``S_r' = S_r (1 + g)``; i.e. ``y = x W'^T + b``.

    Buffers ``U_r (d_out, r)``, ``S_r (r,)``, ``V_r (d_in, r)`` are persistent (float32); trainable parameters are
    ``delta_U (d_out, r)``, ``delta_V (d_in, r)`` and ``s (r,)``, all zero at init.
    """

    def __init__(self, base_layer: nn.Module, r: int = 16, *, init_svd: bool = True) -> None:
        """Wrap ``base_layer``; ``init_svd=False`` only allocates rank-``r`` slots (filled by :func:`load_wsa`)."""
        super().__init__()
        if not isinstance(base_layer, linear_types()):
            raise TypeError(f"WSALinear supports nn.Linear and transformers Conv1D, got {type(base_layer).__name__}")
        self.base_layer = base_layer
        self.is_conv1d = isinstance(base_layer, Conv1D)
        weight = base_layer.weight
        self.out_features, self.in_features = (weight.shape[1], weight.shape[0]) if self.is_conv1d else weight.shape
        r = int(min(r, self.out_features, self.in_features))
        self.r_init = r
        for p in base_layer.parameters():
            p.requires_grad_(False)

        device = weight.device
        if init_svd:
            with torch.no_grad():
                w = self._dense_base_weight().to(torch.float32)
                u, s, vh = torch.linalg.svd(w, full_matrices=False)
                u_r, s_r, v_r = u[:, :r].contiguous(), s[:r].contiguous(), vh[:r].T.contiguous()
        else:
            u_r = torch.zeros(self.out_features, r, device=device)
            s_r = torch.zeros(r, device=device)
            v_r = torch.zeros(self.in_features, r, device=device)
        self.register_buffer("U_r", u_r, persistent=True)
        self.register_buffer("S_r", s_r, persistent=True)
        self.register_buffer("V_r", v_r, persistent=True)
        self.delta_U = nn.Parameter(torch.zeros_like(u_r))
        self.delta_V = nn.Parameter(torch.zeros_like(v_r))
        self.s = nn.Parameter(torch.zeros_like(s_r))

    # -- helpers -------------------------------------------------------------------------------------------------
    @property
    def r(self) -> int:
        """Current number of adapted directions (``r_init`` before pruning, ``r_eff`` after)."""
        return self.S_r.shape[0]

    @property
    def weight(self) -> torch.Tensor:
        """The frozen base weight (in the base layer's own layout), for code that inspects ``module.weight``."""
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    def gates(self) -> torch.Tensor:
        """``g = tanh(s)``."""
        return torch.tanh(self.s)

    def _dense_base_weight(self) -> torch.Tensor:
        """Base weight as ``d_out x d_in`` (Conv1D stores its transpose)."""
        w = self.base_layer.weight
        return w.T if self.is_conv1d else w

    def delta_weight(self) -> torch.Tensor:
        """Dense ``W' - W`` (``d_out x d_in``, float32); only for merging/inspection, the forward never builds it."""
        g = self.gates()
        v_new = self.V_r + self.delta_V
        s_new = self.S_r * (1 + g)
        return (
            (self.delta_U * s_new) @ v_new.T
            + (self.U_r * (self.S_r * g)) @ v_new.T
            + (self.U_r * self.S_r) @ self.delta_V.T
        )

    # -- forward -------------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        r = self.r
        if r == 0:
            return out
        xf = x.to(self.V_r.dtype)
        # One thin matmul for both x V_r and x dV: (..., d_in) @ (d_in, 2r).
        xv, xd = (xf @ torch.cat([self.V_r, self.delta_V], dim=1)).split(r, dim=-1)
        g = torch.tanh(self.s)
        h = xv + xd  # x V_r'
        # Left factors pair with [dU, U_r]: x V_r' S_r' dU^T + (x V_r' diag(S_r g) + x dV diag(S_r)) U_r^T.
        left = torch.cat([h * (self.S_r * (1 + g)), h * (self.S_r * g) + xd * self.S_r], dim=-1)
        corr = left @ torch.cat([self.delta_U, self.U_r], dim=1).T
        return out + corr.to(out.dtype)

    # -- pruning -------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def prune(self, keep: torch.Tensor) -> None:
        """Keep only directions where the boolean mask ``keep`` is True; the others revert to the base weight."""
        idx = torch.nonzero(keep.to(self.S_r.device), as_tuple=False).flatten()
        self.U_r = self.U_r[:, idx].contiguous()
        self.S_r = self.S_r[idx].contiguous()
        self.V_r = self.V_r[:, idx].contiguous()
        # New Parameter objects: any optimizer holding the old ones must be rebuilt (pruning is post-training).
        self.delta_U = nn.Parameter(self.delta_U[:, idx].contiguous(), requires_grad=self.delta_U.requires_grad)
        self.delta_V = nn.Parameter(self.delta_V[:, idx].contiguous(), requires_grad=self.delta_V.requires_grad)
        self.s = nn.Parameter(self.s[idx].contiguous(), requires_grad=self.s.requires_grad)

    def extra_repr(self) -> str:
        kind = "Conv1D" if self.is_conv1d else "Linear"
        dims = f"in_features={self.in_features}, out_features={self.out_features}"
        return f"{kind}, {dims}, r={self.r}, r_init={self.r_init}"


# ---- module selection ------------------------------------------------------------------------------------------
def _resolve_targets(model: nn.Module, config: WSAConfig) -> str | list[str]:
    if config.target_modules is not None:
        return config.target_modules
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    try:
        from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as defaults
    except ImportError:  # pragma: no cover
        defaults = {}
    if model_type in defaults:
        return list(defaults[model_type])
    raise ValueError(
        f"WSAConfig.target_modules is None and there is no default for model_type={model_type!r}; "
        f"set target_modules. {candidates_message(model)}"
    )


def _modules_to_save_names(model: nn.Module, config: WSAConfig) -> list[str]:
    if not config.modules_to_save:
        return []
    names = [n for n, _ in model.named_modules() if n and module_matches(n, config.modules_to_save)]
    # Drop nested matches: a saved module's children are saved with it.
    names = [n for n in names if not is_under(n, [p for p in names if p != n])]
    if not names:
        # Typical lists name heads of several architectures (["classifier", "score"]), so only warn.
        logger.warning("WSA modules_to_save=%s matched no module", config.modules_to_save)
    return names


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def _freeze_for_wsa(model: nn.Module, save_names: list[str]) -> None:
    """Only WSA parameters and ``modules_to_save`` stay trainable."""
    for p in model.parameters():
        p.requires_grad_(False)
    for _, layer in wsa_layers(model):
        for p in (layer.delta_U, layer.delta_V, layer.s):
            p.requires_grad_(True)
    for n in save_names:
        for p in model.get_submodule(n).parameters():
            p.requires_grad_(True)


def _wrap(model: nn.Module, names_to_rank: dict[str, int | None], init_svd: bool) -> None:
    for name, r in names_to_rank.items():
        module = model.get_submodule(name)
        if not isinstance(module, linear_types()):
            raise TypeError(
                f"WSA target module {name!r} is a {type(module).__name__}; only nn.Linear and transformers Conv1D "
                f"can be adapted. Adjust target_modules; {candidates_message(model)}"
            )
        _set_submodule(model, name, WSALinear(module, r, init_svd=init_svd))


# ---- public API ------------------------------------------------------------------------------------------------
def wsa_layers(model: nn.Module) -> list[tuple[str, WSALinear]]:
    """All WSA layers of ``model`` as ``(qualified_name, layer)``."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, WSALinear)]


def apply_wsa(model: nn.Module, config: WSAConfig) -> nn.Module:
    """Wrap every target Linear/Conv1D of ``model`` in place with :class:`WSALinear` and freeze the rest.

    Trainable afterwards: ``delta_U``, ``delta_V``, ``s`` of each WSA layer and all of ``modules_to_save``.
    Targets inside a ``modules_to_save`` module are not wrapped (that module is trained in full anyway).
    """
    if wsa_layers(model):
        raise ValueError("model already contains WSA layers; apply_wsa must be called on a plain model")
    targets = _resolve_targets(model, config)
    save_names = _modules_to_save_names(model, config)
    names = [n for n, _ in model.named_modules() if n and module_matches(n, targets) and not is_under(n, save_names)]
    if not names:
        raise ValueError(f"WSA target_modules={targets!r} matched no module of the model; {candidates_message(model)}")
    _wrap(model, dict.fromkeys(names, config.r_init), init_svd=True)
    _freeze_for_wsa(model, save_names)
    return model


def wsa_gate_l1(model: nn.Module) -> torch.Tensor:
    """``sum_layers ||tanh(s)||_1`` (differentiable); the trainer adds ``gate_l1 * wsa_gate_l1(model)``."""
    terms = [layer.gates().abs().sum() for _, layer in wsa_layers(model)]
    if not terms:
        p = next(model.parameters(), None)
        return torch.zeros((), device=p.device if p is not None else None)
    return torch.stack(terms).sum()


@torch.no_grad()
def prune_wsa(model: nn.Module, tau: float = 0.05) -> dict[str, dict[str, Any]]:
    """Drop directions with ``|tanh(s_i)| < tau`` in every WSA layer (tensors shrink to ``r_eff`` columns).

    A dropped direction reverts to the base component ``u_i s_i v_i^T`` (still in the frozen ``W``). Returns per
    layer ``{"r_init", "r_eff", "gates" (all gates before pruning), "kept" (indices into the pre-prune directions)}``.
    """
    report: dict[str, dict[str, Any]] = {}
    for name, layer in wsa_layers(model):
        g = layer.gates().detach().float()
        keep = g.abs() >= tau
        report[name] = {
            "r_init": layer.r_init,
            "r_eff": int(keep.sum()),
            "gates": [float(v) for v in g.cpu()],
            "kept": [int(i) for i in torch.nonzero(keep).flatten().cpu()],
        }
        layer.prune(keep)
    return report


def save_wsa_ranks(report: dict[str, dict[str, Any]], path: str | Path) -> Path:
    """Write the :func:`prune_wsa` report as JSON (the trainer uses ``<output_dir>/wsa_ranks.json``)."""
    return Path(write_json(path, report))


def save_wsa(model: nn.Module, directory: str | Path, config: WSAConfig) -> Path:
    """Save WSA layer state, ``modules_to_save`` state and the config with per-layer ranks.

    Writes ``wsa_config.json`` (config fields + ``wsa_layers: {name: {r, r_init}}`` + ``saved_modules``) and
    ``wsa_model.safetensors`` (``<layer>.{U_r,S_r,V_r,delta_U,delta_V,s}`` and ``<module>.<param/buffer>``).
    """
    from safetensors.torch import save_file

    layers = wsa_layers(model)
    if not layers:
        raise ValueError("model has no WSA layers; call apply_wsa first")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_names = _modules_to_save_names(model, config)

    tensors: dict[str, torch.Tensor] = {}
    for name, layer in layers:
        for key in ("U_r", "S_r", "V_r", "delta_U", "delta_V", "s"):
            tensors[f"{name}.{key}"] = getattr(layer, key)
    for mod_name in save_names:
        for key, t in model.get_submodule(mod_name).state_dict().items():
            tensors[f"{mod_name}.{key}"] = t
    # clone: safetensors refuses shared storage (e.g. tied heads) and non-contiguous views.
    save_file(
        {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}, str(directory / WSA_WEIGHTS_NAME)
    )

    meta = config.to_dict()
    meta.update(
        format_version=WSA_FORMAT_VERSION,
        wsa_layers={name: {"r": layer.r, "r_init": layer.r_init} for name, layer in layers},
        saved_modules=save_names,
        base_model_name_or_path=getattr(getattr(model, "config", None), "_name_or_path", None),
    )
    write_json(directory / WSA_CONFIG_NAME, meta)
    return directory


def load_wsa(model: nn.Module, directory: str | Path) -> nn.Module:
    """Apply WSA with the saved per-layer ranks to a freshly loaded base ``model`` and load the saved state.

    No SVD is recomputed: the saved ``U_r, S_r, V_r`` are loaded, so outputs match the saved model exactly
    (given the same base weights). Freezing is as in :func:`apply_wsa`.
    """
    from safetensors.torch import load_file

    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"WSA directory not found: {directory}")
    cfg_path, weights_path = directory / WSA_CONFIG_NAME, directory / WSA_WEIGHTS_NAME
    for p in (cfg_path, weights_path):
        if not p.is_file():
            raise FileNotFoundError(f"missing {p.name} in WSA directory {directory}")
    if wsa_layers(model):
        raise ValueError("model already contains WSA layers; load_wsa expects a plain base model")

    meta = json.loads(cfg_path.read_text())
    layer_meta: dict[str, dict[str, int]] = meta.get("wsa_layers") or {}
    if not layer_meta:
        raise ValueError(f"{cfg_path} lists no WSA layers")
    module_names = {n for n, _ in model.named_modules()}
    missing = [n for n in layer_meta if n not in module_names]
    if missing:
        raise ValueError(f"saved WSA layers not found in the model: {missing[:8]}; {candidates_message(model)}")
    _wrap(model, {n: m["r_init"] for n, m in layer_meta.items()}, init_svd=False)

    state = load_file(str(weights_path))
    expected: set[str] = set()
    for name, layer in wsa_layers(model):
        r_saved = layer_meta[name]["r"]
        if r_saved != layer.r:
            layer.prune(torch.arange(layer.r) < r_saved)  # shrink the empty slots to the saved r_eff
        for key in ("U_r", "S_r", "V_r", "delta_U", "delta_V", "s"):
            full = f"{name}.{key}"
            expected.add(full)
            if full not in state:
                raise KeyError(f"{weights_path.name} is missing {full}")
            target = getattr(layer, key)
            if state[full].shape != target.shape:
                raise ValueError(
                    f"shape mismatch for {full}: saved {tuple(state[full].shape)}, model {tuple(target.shape)}"
                )
            with torch.no_grad():
                target.copy_(state[full])

    save_names: list[str] = list(meta.get("saved_modules") or [])
    for mod_name in save_names:
        module = model.get_submodule(mod_name)
        sub_state = {k[len(mod_name) + 1 :]: v for k, v in state.items() if k.startswith(mod_name + ".")}
        expected.update(f"{mod_name}.{k}" for k in sub_state)
        module.load_state_dict(sub_state, strict=True)
    unexpected = sorted(set(state) - expected)
    if unexpected:
        raise ValueError(f"{weights_path.name} has unexpected tensors: {unexpected[:8]}")

    _freeze_for_wsa(model, save_names)
    return model


@torch.no_grad()
def merge_wsa(model: nn.Module) -> nn.Module:
    """Replace each WSA layer by its base layer carrying the merged weight ``W' = W + (W' - W)``.

    Equal to the adapted forward up to float rounding. A fresh frozen Parameter is used, so a base weight tied to
    another module is not modified in place.
    """
    for name, layer in wsa_layers(model):
        base = layer.base_layer
        merged = layer._dense_base_weight().to(torch.float32) + layer.delta_weight()
        new_w = merged.T if layer.is_conv1d else merged
        base.weight = nn.Parameter(new_w.to(base.weight.dtype).contiguous(), requires_grad=False)
        _set_submodule(model, name, base)
    return model


# ---- the method --------------------------------------------------------------------------------------------------
@dataclass
class WSAArguments:
    """``--adapter wsa``: the Weighted Spectral Adapter's rank, gate penalty and pruning threshold."""

    wsa_r_init: int = field(default=16, metadata={"help": "WSA: top singular directions trained per matrix."})
    wsa_gate_l1: float = field(default=1e-3, metadata={"help": "WSA: λ of the gate penalty λ·Σ‖tanh(s)‖₁."})
    wsa_prune_threshold: float = field(
        default=0.05, metadata={"help": "WSA: after training, drop directions with |tanh(s_i)| < this τ."}
    )

    def __post_init__(self) -> None:
        if self.wsa_r_init < 1:
            raise ValueError(f"--wsa_r_init must be >= 1, got {self.wsa_r_init}")
        if self.wsa_gate_l1 < 0:
            raise ValueError(f"--wsa_gate_l1 must be >= 0, got {self.wsa_gate_l1}")
        if not 0 <= self.wsa_prune_threshold <= 1:
            raise ValueError(f"--wsa_prune_threshold must be in [0, 1], got {self.wsa_prune_threshold}")


class WSAMethod(Method):
    """WSA on the same targets; ``λ·Σ‖tanh(s)‖₁`` goes to the trainer as a regulariser; pruned when training ends."""

    name = "wsa"
    arguments = WSAArguments

    def build(self, model: nn.Module, ctx: MethodContext) -> MethodSetup:
        opts: WSAArguments = ctx.options
        config = WSAConfig(
            r_init=opts.wsa_r_init,
            gate_l1=opts.wsa_gate_l1,
            prune_threshold=opts.wsa_prune_threshold,
            target_modules=ctx.spec,
            modules_to_save=list(ctx.heads) or None,
        )
        model = apply_wsa(model, config)
        lam = config.gate_l1
        regularizers: dict[str, Callable[[nn.Module], torch.Tensor]] = {}
        if lam > 0:
            regularizers["wsa_gate_l1"] = lambda m: lam * wsa_gate_l1(m)
        return MethodSetup(model, self.name, ctx.targets, ctx.heads, regularizers=regularizers, state=config)

    def merge(self, setup: MethodSetup) -> nn.Module:
        return merge_wsa(setup.model)

    def save(self, setup: MethodSetup, trainer: Any, tokenizer: Any) -> None:
        """Prune directions with |tanh(s)| < τ (every rank: evaluation then sees the saved model), then write
        ``wsa_ranks.json`` and the WSA state."""
        config: WSAConfig = setup.state
        report = prune_wsa(setup.model, config.prune_threshold)
        logger.info(
            "WSA pruning (tau=%g): rank %d -> %d over %d matrices",
            config.prune_threshold,
            sum(r["r_init"] for r in report.values()),
            sum(r["r_eff"] for r in report.values()),
            len(report),
        )
        if trainer.is_world_process_zero():
            out = trainer.args.output_dir
            save_wsa_ranks(report, os.path.join(out, "wsa_ranks.json"))
            save_wsa(setup.model, out, config)
            if tokenizer is not None:
                tokenizer.save_pretrained(out)
