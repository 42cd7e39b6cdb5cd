"""Loading the model and tokenizer of ``--model_name_or_path`` (``--config_name``, ``--tokenizer_name``)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

from torch import nn

from .arguments import ModelArguments, one_line
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
        hint = "" if os.path.isdir(os.path.expanduser(value)) else "; offline, pass a local model folder instead"
        raise OSError(f"--{flag} {value!r}: {one_line(exc)}{hint}") from exc
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
