"""Loading the model and tokenizer; finding the task head and the Linear/Conv1D modules to adapt."""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

from torch import nn

from .arguments import ModelArguments, _is_regex, one_line
from .data import TaskData


def _looks_local(name: str) -> bool:
    """A hub id is ``name`` or ``org/name``; anything path-like is meant as a local folder."""
    return (
        os.path.isabs(name) or name.startswith((".", "~")) or name.count("/") > 1 or os.sep != "/" and os.sep in name
    )


def check_model_paths(model_args: ModelArguments) -> None:
    """Fail early (before any download attempt) on a local-looking model/config/tokenizer path that is absent."""
    for flag in ("model_name_or_path", "config_name", "tokenizer_name"):
        value = getattr(model_args, flag)
        if value and _looks_local(value) and not os.path.exists(os.path.expanduser(value)):
            raise ValueError(
                f"--{flag} {value!r} does not exist; expected a local model folder (config.json + weights) or a "
                "hub model id such as microsoft/deberta-v3-base"
            )


def load_model_and_tokenizer(
    model_args: ModelArguments, data: TaskData, task_name: str | None
) -> tuple[Any, nn.Module, list[str]]:
    """``(tokenizer, model, missing_keys)``; ``OSError`` from ``from_pretrained`` is re-raised naming the flag."""
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    check_model_paths(model_args)
    common = {
        "cache_dir": model_args.cache_dir,
        "revision": model_args.model_revision,
        "token": model_args.token,
        "trust_remote_code": model_args.trust_remote_code,
    }
    name = model_args.model_name_or_path
    try:
        flag, value = (
            ("config_name", model_args.config_name) if model_args.config_name else ("model_name_or_path", name)
        )
        config = AutoConfig.from_pretrained(value, num_labels=data.num_labels, finetuning_task=task_name, **common)
        flag, value = (
            ("tokenizer_name", model_args.tokenizer_name)
            if model_args.tokenizer_name
            else ("model_name_or_path", name)
        )
        tokenizer = AutoTokenizer.from_pretrained(value, use_fast=model_args.use_fast_tokenizer, **common)
        flag, value = "model_name_or_path", name
        with _quiet_local_load(name):
            model, info = AutoModelForSequenceClassification.from_pretrained(
                name,
                config=config,
                ignore_mismatched_sizes=model_args.ignore_mismatched_sizes,
                output_loading_info=True,
                **common,
            )
    except OSError as exc:
        raise OSError(f"--{flag} {value!r}: {one_line(exc)}") from exc
    return tokenizer, model, sorted(info.get("missing_keys", ()))


@contextlib.contextmanager
def _quiet_local_load(name: str) -> Iterator[None]:
    """No "Loading weights" progress bar for a local folder (instant, and it would clutter stderr); downloads keep
    theirs."""
    from transformers.utils import logging as hf_logging

    quiet = os.path.isdir(os.path.expanduser(name)) and hf_logging.is_progress_bar_enabled()
    if quiet:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if quiet:
            hf_logging.enable_progress_bar()


def _linear_types() -> tuple[type, ...]:
    from transformers.pytorch_utils import Conv1D

    return (nn.Linear, Conv1D)


def _under(name: str, prefixes: Iterable[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


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
        if key in params and owner and not _under(owner, heads):
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
    kinds = _linear_types()
    return [n for n, m in model.named_modules() if n and isinstance(m, kinds) and not _under(n, exclude)]


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
        found = [n for n in names if pattern.fullmatch(n)]
    else:
        found = [n for n in names if any(n == t or n.endswith("." + t) for t in requested)]
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
