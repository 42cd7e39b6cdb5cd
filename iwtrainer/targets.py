"""Which weight matrices ``W_k`` are adapted: choosing them in a plain model, finding them in a peft model.

Before wrapping: :func:`discover_target_modules` (default: every ``nn.Linear``/``Conv1D`` inside the transformer
blocks), :func:`match_target_modules` (user names with peft's matching rules), :func:`find_head_modules` (the task
head, trained in full) and :func:`targets_regex` (the chosen set as one peft ``target_modules`` regex).

After wrapping: a *target* is one peft LoRA layer wrapping an ``nn.Linear`` or a GPT-2 style ``Conv1D`` (weight stored
transposed). Everything else in iwtrainer is keyed by the target's name, which is the module path in the
user's base model (peft's ``base_model.model.`` prefix removed), e.g. ``bert.encoder.layer.0.attention.self.query``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from accelerate.utils import extract_model_from_parallel
from torch import nn

_REGEX_CHARS = set("*+?[](){}|^$\\")

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
    """Strip DDP / DataParallel / DeepSpeed / FSDP / torch.compile wrappers (never peft's own)."""
    return extract_model_from_parallel(model, keep_torch_compile=False)


def transformers_model(model: nn.Module) -> nn.Module:
    """The transformers model inside parallel wrappers and a peft wrapper (itself when there is none)."""
    inner = unwrap_model(model)
    return getattr(getattr(inner, "base_model", None), "model", inner)


def whole_tensor(x: torch.Tensor) -> torch.Tensor:
    """``x``, gathered when it is an FSDP2 ``DTensor`` shard (a collective: every rank must call it)."""
    return x.full_tensor() if hasattr(x, "full_tensor") else x


def layout_version(model: nn.Module, unwrapped: bool = False) -> int:
    """Bumped by :func:`mark_layout_changed` whenever LoRA layers are rebuilt (e.g. rank re-allocation).
    ``unwrapped=True``: ``model`` is :func:`unwrap_model`'s result already (unwrapping walks every module)."""
    return getattr(model if unwrapped else unwrap_model(model), "_iw_layout_version", 0)


def mark_layout_changed(model: nn.Module) -> None:
    """Tell cached structures (the penalty's shape groups) that LoRA parameters were replaced."""
    inner = unwrap_model(model)
    inner._iw_layout_version = layout_version(inner, unwrapped=True) + 1


def short_name(name: str) -> str:
    return name[len(_PEFT_PREFIX) :] if name.startswith(_PEFT_PREFIX) else name


def _is_lora_layer(module: nn.Module) -> bool:
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:  # pragma: no cover - peft is a hard requirement
        return False
    return isinstance(module, LoraLayer)


def linear_types() -> tuple[type, ...]:
    """The layers a target can be: ``nn.Linear`` and transformers' GPT-2 ``Conv1D`` (weight stored transposed)."""
    from transformers.pytorch_utils import Conv1D

    return (nn.Linear, Conv1D)


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
        if not isinstance(module.get_base_layer(), linear_types()):
            raise ValueError(
                f"iwtrainer: LoRA layer '{short_name(name)}' wraps a {type(module.get_base_layer()).__name__}; "
                "only nn.Linear and transformers Conv1D targets are supported (check lora target_modules)."
            )
        if not isinstance(module.lora_A[adapter], nn.Linear):  # AdaLoRA's SVD layers keep A, E, B as Parameters
            raise ValueError(
                f"iwtrainer: LoRA layer '{short_name(name)}' is a {type(module).__name__} (e.g. AdaLoRA); the IW "
                "penalty is defined for plain LoRA Δ = s·BA only."
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


def _is_regex(text: str) -> bool:
    return any(c in _REGEX_CHARS for c in text)


def split_names(values: str | Iterable[str], flag: str) -> list[str]:
    """``["a,b", "c"]`` or ``"a,b"`` -> ``["a", "b", "c"]`` (a regex is kept whole: it may contain commas)."""
    items = [values] if isinstance(values, str) else list(values)
    out: list[str] = []
    for item in items:
        item = str(item).strip()
        parts = [item] if len(items) == 1 and _is_regex(item) else [p.strip() for p in item.split(",")]
        out.extend(p for p in parts if p)
    if not out:
        raise ValueError(f"{flag} is empty; expected module names such as query,value")
    return out


def is_under(name: str, prefixes: Iterable[str]) -> bool:
    """Whether module ``name`` is one of ``prefixes`` or inside one of them."""
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def module_matches(name: str, targets: str | Sequence[str]) -> bool:
    """peft's ``target_modules`` rule: a string is a regex ``re.fullmatch``-ed against the full name, a list matches
    a name equal to an item or ending in ``.<item>``."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def find_head_modules(model: nn.Module, missing_keys: Iterable[str] = ()) -> list[str]:
    """Modules trained in full beside the adapter: the task head and anything the checkpoint did not provide.

    The head is every top-level child with parameters that is not the backbone (``model.base_model_prefix``) plus
    the backbone's ``pooler`` when it has one: ``bert.pooler`` + ``classifier`` (BERT), ``pooler`` + ``classifier``
    (DeBERTa), ``classifier`` (RoBERTa), ``score`` (GPT-2), ``pre_classifier`` + ``classifier`` (DistilBERT). Modules
    whose parameters were missing from the checkpoint (newly initialised) are added: a frozen random layer could
    never learn.
    """
    base = getattr(model, getattr(model, "base_model_prefix", "") or "", None)
    heads: list[str] = []
    if isinstance(base, nn.Module) and base is not model:
        for name, child in model.named_children():
            if child is not base and next(child.parameters(), None) is not None:
                heads.append(name)
        # The backbone's own pooler (BERT: bert.pooler) only feeds the classifier: it is part of the task head.
        pooler = getattr(base, "pooler", None)
        prefix = next((n for n, child in model.named_children() if child is base), None)
        if isinstance(pooler, nn.Module) and prefix and next(pooler.parameters(), None) is not None:
            heads.append(f"{prefix}.pooler")
    params = dict(model.named_parameters())
    for key in missing_keys:
        owner = key.rpartition(".")[0]
        if key in params and owner and not is_under(owner, heads):
            heads.append(owner)
    return heads


def _block_split(name: str, modules: Mapping[str, nn.Module]) -> tuple[str, str] | None:
    """``bert.encoder.layer.3.attention.self.query`` -> ``("bert.encoder.layer", "attention.self.query")``.

    The block list is the outermost ``nn.ModuleList`` in the name whose index is followed by more of the name.
    """
    parts = name.split(".")
    for i in range(1, len(parts) - 1):
        if parts[i].isdigit() and isinstance(modules.get(".".join(parts[:i])), nn.ModuleList):
            return ".".join(parts[:i]), ".".join(parts[i + 1 :])
    return None


def linear_module_names(model: nn.Module, exclude: Iterable[str] = ()) -> list[str]:
    """Names of every ``nn.Linear`` / ``Conv1D`` of ``model`` outside the ``exclude`` modules."""
    exclude = list(exclude)
    kinds = linear_types()
    return [n for n, m in model.named_modules() if n and isinstance(m, kinds) and not is_under(n, exclude)]


def discover_target_modules(model: nn.Module, exclude: Iterable[str] = ()) -> list[str]:
    """Default targets: every Linear/Conv1D inside a transformer block (a numbered child of an ``nn.ModuleList``).

    Pooler, head, embeddings projections and anything else outside the block list are left alone.
    """
    modules = dict(model.named_modules())
    return [n for n in linear_module_names(model, exclude) if _block_split(n, modules) is not None]


def candidates_message(model: nn.Module, exclude: Iterable[str] = ()) -> str:
    """One line naming what ``--lora_target_modules`` can match."""
    modules = dict(model.named_modules())
    inside: dict[str, set[str]] = {}
    outside: list[str] = []
    for n in linear_module_names(model, exclude):
        split = _block_split(n, modules)
        if split is None:
            outside.append(n)
        else:
            inside.setdefault(split[0], set()).add(split[1])
    parts = [f"{', '.join(sorted(rel))} (inside {prefix}.N)" for prefix, rel in inside.items()]
    if outside:
        parts.append(f"other linear layers: {', '.join(outside[:8])}" + (" ..." if len(outside) > 8 else ""))
    return "; ".join(parts) or "none (the model has no nn.Linear/Conv1D layer)"


def match_target_modules(model: nn.Module, requested: Sequence[str], exclude: Iterable[str] = ()) -> list[str]:
    """Linear/Conv1D modules matching ``requested`` with peft's rules: exact name or ``.``-suffix, or one regex."""
    names = linear_module_names(model, exclude)
    if len(requested) == 1 and _is_regex(requested[0]):
        try:
            pattern = re.compile(requested[0])
        except re.error as exc:
            raise ValueError(f"--lora_target_modules {requested[0]!r} is not a valid regex: {exc}") from exc
        found = [n for n in names if module_matches(n, pattern.pattern)]
    else:
        found = [n for n in names if module_matches(n, list(requested))]
    if not found:
        raise ValueError(
            f"--lora_target_modules {list(requested)} matched no nn.Linear/Conv1D module of "
            f"{type(model).__name__}; candidates: {candidates_message(model, exclude)}"
        )
    return found


def targets_regex(model: nn.Module, names: Sequence[str]) -> str:
    """A regex (peft ``target_modules`` as a string is ``re.fullmatch``-ed) matching exactly ``names``.

    Compact form ``<block list>\\.\\d+\\.(?:<names inside a block>)`` when that matches exactly the same set (so
    ``adapter_config.json`` stays readable), else an alternation of the full names.
    """
    modules = dict(model.named_modules())
    groups: dict[str, set[str]] = {}
    compact_ok = True
    for n in names:
        split = _block_split(n, modules)
        if split is None:
            compact_ok = False
            break
        groups.setdefault(split[0], set()).add(split[1])
    exact = "|".join(re.escape(n) for n in names)
    if not compact_ok:
        return exact
    pattern = "|".join(
        rf"{re.escape(prefix)}\.\d+\.(?:{'|'.join(re.escape(r) for r in sorted(rel))})"
        for prefix, rel in groups.items()
    )
    matched = {n for n in modules if n and re.fullmatch(pattern, n)}
    return pattern if matched == set(names) else exact
