"""Pieces of ``run_glue_iw.py``: argument dataclasses, config-file parsing, GLUE data and adapter building.

Everything the script needs that is worth importing (and testing) on its own lives here, so the script itself only
orchestrates: parse -> validate and load (no output written) -> train / evaluate / predict -> write results.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import inspect
import json
import logging
import math
import os
import re
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from .adalora import AdaLoraCallback, adalora_config, adalora_schedule
from .glue import GLUE_TASKS, GlueDataError, compute_glue_metrics, get_glue_task, load_glue_from_dir
from .rank_allocation import RANK_ALLOCATION_FILE, GradNormRankCallback, allocate_ranks, rebuild_lora_ranks
from .sensitivity import compute_sensitivities
from .targets import find_lora_targets
from .training_args import IWTrainingArguments

logger = logging.getLogger(__name__)

ADAPTERS = ("lora", "adalora", "full", "wsa")
NON_IW_ADAPTERS = ("adalora", "full", "wsa")  # no plain LoRA factors B·A, so the IW penalty has nothing to weight
RANK_ALLOCATIONS = ("none", "gradnorm")
RANK_ALLOCATION_MODES = ("ema", "calibration")
CONFIG_SUFFIXES = (".yaml", ".yml", ".json")
USER_ERRORS: tuple[type[BaseException], ...] = (GlueDataError, ValueError, OSError, NotImplementedError)
"""Errors of the setup phase that are the user's input, reported as one line without a traceback."""
_ENV_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
_REGEX_CHARS = set("*+?[](){}|^$\\")
_REMAPPED = "_iw_label_id"


# ---- arguments ---------------------------------------------------------------------------------------------------
@dataclass
class ModelArguments:
    """Which model/config/tokenizer to fine-tune from (as transformers' ``run_glue.py``)."""

    model_name_or_path: str = field(
        metadata={"help": "Path to a local model folder or a model identifier from huggingface.co/models."}
    )
    config_name: str | None = field(
        default=None, metadata={"help": "Pretrained config name or path if not the same as model_name_or_path."}
    )
    tokenizer_name: str | None = field(
        default=None, metadata={"help": "Pretrained tokenizer name or path if not the same as model_name_or_path."}
    )
    cache_dir: str | None = field(
        default=None, metadata={"help": "Where to store the pretrained models downloaded from huggingface.co."}
    )
    use_fast_tokenizer: bool = field(
        default=True, metadata={"help": "Whether to use a fast tokenizer (backed by the tokenizers library)."}
    )
    model_revision: str = field(
        default="main", metadata={"help": "The model version to use (branch name, tag name or commit id)."}
    )
    token: str | None = field(
        default=None, metadata={"help": "The token to use as HTTP bearer authorization for remote files."}
    )
    trust_remote_code: bool = field(
        default=False,
        metadata={"help": "Allow custom models defined on the Hub in their own modeling files (runs their code)."},
    )
    ignore_mismatched_sizes: bool = field(
        default=False, metadata={"help": "Enable loading a pretrained model whose head has a different size."}
    )


def _env_glue_dir() -> str | None:
    return os.environ.get("GLUE_DIR") or None


@dataclass
class DataTrainingArguments:
    """What data to train and evaluate on (as ``run_glue.py``, plus ``--glue_dir`` for the offline TSV layout)."""

    task_name: str | None = field(
        default=None, metadata={"help": "The GLUE task to train on: " + ", ".join(sorted(GLUE_TASKS))}
    )
    glue_dir: str | None = field(
        default_factory=_env_glue_dir,
        metadata={
            "help": "Directory in the original GLUE TSV layout (<dir>/RTE/train.tsv, ...); read locally, no network. "
            "Defaults to $GLUE_DIR when set; without it --task_name loads nyu-mll/glue from the hub."
        },
    )
    dataset_name: str | None = field(
        default=None, metadata={"help": "The name of the dataset to use (via the datasets library)."}
    )
    dataset_config_name: str | None = field(
        default=None, metadata={"help": "The configuration name of the dataset to use (via the datasets library)."}
    )
    max_seq_length: int = field(
        default=128,
        metadata={"help": "Maximum total input length after tokenization; longer is truncated, shorter padded."},
    )
    overwrite_cache: bool = field(default=False, metadata={"help": "Overwrite the cached preprocessed datasets."})
    pad_to_max_length: bool = field(
        default=True,
        metadata={"help": "Pad all samples to max_seq_length; if False, pad dynamically to the longest in a batch."},
    )
    max_train_samples: int | None = field(
        default=None, metadata={"help": "Truncate the number of training examples to this value if set."}
    )
    max_eval_samples: int | None = field(
        default=None, metadata={"help": "Truncate the number of evaluation examples to this value if set."}
    )
    max_predict_samples: int | None = field(
        default=None, metadata={"help": "Truncate the number of prediction examples to this value if set."}
    )
    train_file: str | None = field(default=None, metadata={"help": "A csv or a json file with the training data."})
    validation_file: str | None = field(
        default=None, metadata={"help": "A csv or a json file with the validation data."}
    )
    test_file: str | None = field(default=None, metadata={"help": "A csv or a json file with the test data."})

    def __post_init__(self) -> None:
        if self.task_name is not None:
            self.task_name = get_glue_task(self.task_name).name  # GlueDataError naming --task_name
        elif self.dataset_name is not None:
            pass
        elif self.train_file is None or self.validation_file is None:
            raise ValueError(
                "need --task_name (a GLUE task), --dataset_name, or both --train_file and --validation_file"
            )
        else:
            for flag in ("train_file", "validation_file", "test_file"):
                path = getattr(self, flag)
                if path is not None and _file_extension(path) not in ("csv", "json"):
                    raise ValueError(f"--{flag} {path!r} must be a .csv or .json file")
            if _file_extension(self.validation_file) != _file_extension(self.train_file):
                raise ValueError("--validation_file must have the same extension (csv or json) as --train_file")
        for flag in ("max_seq_length", "max_train_samples", "max_eval_samples", "max_predict_samples"):
            value = getattr(self, flag)
            if value is not None and value < 1:
                raise ValueError(f"--{flag} must be a positive integer, got {value}")


class _TargetModulesAction(argparse.Action):
    """``--lora_target_modules a b --lora_target_modules c`` -> ``[a, b, c]``.

    The first use on a command line *replaces* the default (which may come from a config file), later uses extend:
    argparse's own ``extend`` action would append to a config file's list instead of overriding it.
    """

    def __call__(
        self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any, option_string=None
    ):
        seen = getattr(self, "_seen_in", None) is namespace
        current = list(getattr(namespace, self.dest) or []) if seen else []
        self._seen_in = namespace
        setattr(namespace, self.dest, current + list(values))


@dataclass
class AdapterArguments:
    """Which parameters are trained: LoRA / IW-LoRA, AdaLoRA, full fine-tuning or WSA."""

    adapter: str = field(
        default="lora",
        metadata={
            "help": "lora: peft LoRA (IW-LoRA when --iw_alpha > 0, the default 1e-4; plain LoRA with --iw_alpha 0). "
            "full: full fine-tuning. wsa: Weighted Spectral Adapter. adalora: peft AdaLoRA with the same average "
            "rank budget (target_r = --lora_r, init_r = ceil(1.5·lora_r)), pruned on the --adalora_* schedule. "
            "The IW penalty needs LoRA factors: with full/wsa/adalora --iw_alpha defaults to 0 and any "
            "explicit --iw_alpha > 0 is an error.",
            "choices": ADAPTERS,
        },
    )
    lora_r: int = field(default=8, metadata={"help": "LoRA rank r."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA scaling numerator: Δ = (lora_alpha / r)·B·A."})
    lora_dropout: float = field(
        default=0.1,
        metadata={"help": "Dropout on the LoRA branch input (0.1 as in peft's GLUE LoRA recipes; peft's own is 0)."},
    )
    lora_target_modules: list[str] | None = field(
        default=None,
        metadata={
            "help": "Modules to adapt: names or name suffixes (peft semantics), comma-separated and/or several "
            "values (repeating the flag adds to the list); a single value with regex characters is a regex matched "
            "against the full module name. Default: every nn.Linear/Conv1D inside the transformer blocks "
            "(e.g. 6 per layer for BERT/DeBERTa), never the classification head or pooler.",
            "action": _TargetModulesAction,
        },
    )
    wsa_r_init: int = field(default=16, metadata={"help": "WSA: top singular directions trained per matrix."})
    wsa_gate_l1: float = field(default=1e-3, metadata={"help": "WSA: λ of the gate penalty λ·Σ‖tanh(s)‖₁."})
    wsa_prune_threshold: float = field(
        default=0.05, metadata={"help": "WSA: after training, drop directions with |tanh(s_i)| < this τ."}
    )
    adalora_tinit_frac: float = field(
        default=0.1,
        metadata={"help": "AdaLoRA: fraction of the run's optimizer steps trained at the initial budget (tinit)."},
    )
    adalora_tfinal_frac: float = field(
        default=0.2,
        metadata={"help": "AdaLoRA: fraction of the run's optimizer steps trained at the final budget (tfinal)."},
    )
    adalora_delta_t: int = field(
        default=10, metadata={"help": "AdaLoRA: optimizer steps between two rank re-allocations (deltaT)."}
    )
    adalora_orth_reg_weight: float = field(
        default=0.5, metadata={"help": "AdaLoRA: weight of the orthogonality regulariser on P and Q."}
    )
    rank_allocation: str = field(
        default="none",
        metadata={
            "help": "Per-matrix LoRA ranks (--adapter lora only; combines with --iw_alpha): none (every matrix gets "
            "--lora_r) or gradnorm (GLoRA: r_k proportional to a gradient norm, Σ r_k = --rank_budget; rank 0 "
            "drops the matrix's adapter). Writes rank_allocation.json.",
            "choices": RANK_ALLOCATIONS,
        },
    )
    rank_allocation_mode: str = field(
        default="ema",
        metadata={
            "help": "gradnorm: ema (the source's method: an EMA of the LoRA gradient norms over --rank_warmup_steps "
            "optimizer steps, then the LoRA layers are rebuilt in place with their new ranks, optimizer state "
            "kept; single process only) or calibration (cheap: base-weight gradient norms over --iw_calib_steps "
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

    def __post_init__(self) -> None:
        # Values from a config file bypass argparse's `choices`, so check here too.
        if self.adapter not in ADAPTERS:
            raise ValueError(f"--adapter must be one of {list(ADAPTERS)}, got {self.adapter!r}")
        if self.rank_allocation not in RANK_ALLOCATIONS:
            raise ValueError(
                f"--rank_allocation must be one of {list(RANK_ALLOCATIONS)}, got {self.rank_allocation!r}"
            )
        if self.lora_target_modules is not None:
            self.lora_target_modules = split_names(self.lora_target_modules, "--lora_target_modules")
        if self.lora_r < 1:
            raise ValueError(f"--lora_r must be >= 1, got {self.lora_r}")
        if not 0 <= self.lora_dropout < 1:
            raise ValueError(f"--lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if self.wsa_r_init < 1:
            raise ValueError(f"--wsa_r_init must be >= 1, got {self.wsa_r_init}")
        if self.wsa_gate_l1 < 0:
            raise ValueError(f"--wsa_gate_l1 must be >= 0, got {self.wsa_gate_l1}")
        if not 0 <= self.wsa_prune_threshold <= 1:
            raise ValueError(f"--wsa_prune_threshold must be in [0, 1], got {self.wsa_prune_threshold}")
        self._check_adalora()
        self._check_rank_allocation()

    def _check_adalora(self) -> None:
        for flag in ("adalora_tinit_frac", "adalora_tfinal_frac"):
            if not 0 <= getattr(self, flag) < 1:
                raise ValueError(f"--{flag} must be in [0, 1), got {getattr(self, flag)}")
        if self.adalora_tinit_frac + self.adalora_tfinal_frac >= 1:
            raise ValueError(
                f"--adalora_tinit_frac {self.adalora_tinit_frac:g} + --adalora_tfinal_frac "
                f"{self.adalora_tfinal_frac:g} must be < 1: AdaLoRA needs steps in between to prune the rank budget"
            )
        if self.adalora_delta_t < 1:
            raise ValueError(f"--adalora_delta_t must be >= 1, got {self.adalora_delta_t}")
        if self.adalora_orth_reg_weight < 0:
            raise ValueError(f"--adalora_orth_reg_weight must be >= 0, got {self.adalora_orth_reg_weight}")

    def _check_rank_allocation(self) -> None:
        if self.rank_allocation_mode not in RANK_ALLOCATION_MODES:
            raise ValueError(
                f"--rank_allocation_mode must be one of {list(RANK_ALLOCATION_MODES)}, got "
                f"{self.rank_allocation_mode!r}"
            )
        if self.rank_allocation != "none" and self.adapter != "lora":
            raise ValueError(
                f"--rank_allocation {self.rank_allocation} allocates LoRA ranks and needs --adapter lora, got "
                f"--adapter {self.adapter} (adalora allocates its own ranks)"
            )
        if self.rank_budget is not None and self.rank_budget < 1:
            raise ValueError(f"--rank_budget must be >= 1, got {self.rank_budget}")
        if self.rank_min < 0:
            raise ValueError(f"--rank_min must be >= 0, got {self.rank_min}")
        if self.rank_warmup_steps is not None and self.rank_warmup_steps < 1:
            raise ValueError(f"--rank_warmup_steps must be >= 1, got {self.rank_warmup_steps}")


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


def _is_regex(text: str) -> bool:
    return any(c in _REGEX_CHARS for c in text)


ArgsTuple = tuple[ModelArguments, DataTrainingArguments, AdapterArguments, IWTrainingArguments]


def build_parser() -> Any:
    """``HfArgumentParser((ModelArguments, DataTrainingArguments, AdapterArguments, IWTrainingArguments))``."""
    from transformers import HfArgumentParser

    return HfArgumentParser((ModelArguments, DataTrainingArguments, AdapterArguments, IWTrainingArguments))


def load_config_file(path: str | os.PathLike[str], known: Iterable[str]) -> dict[str, Any]:
    """Read a flat YAML/JSON mapping of flag names to values; ``${VAR}`` in strings is taken from the environment.

    Raises ``ValueError`` naming the file (and the key) for an unreadable file or a key that is no flag.
    """
    import yaml

    p = Path(path)
    if not p.is_file():
        raise ValueError(f"config file {str(p)!r} does not exist; expected a YAML or JSON file of flag: value pairs")
    try:
        text = p.read_text(encoding="utf-8")
        data = json.loads(text) if p.suffix.lower() == ".json" else yaml.safe_load(text)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, yaml.YAMLError) as exc:
        raise ValueError(f"{p}: cannot be parsed: {one_line(exc)}") from exc
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ValueError(f"{p}: expected a mapping of flag names to values, got {type(data).__name__}")
    known = set(known)
    for key in data:
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"{p}: unknown key {key!r}{hint}; keys must be flag names of run_glue_iw.py (see --help)")
    return {k: _expand_env(v) for k, v in data.items()}


def _expand_env(value: Any) -> Any:
    if isinstance(value, str):
        return _ENV_VAR.sub(lambda m: os.environ.get(m.group(1), m.group(0)), value)
    if isinstance(value, list):
        return [_expand_env(v) for v in value]
    return value


def parse_args(argv: Sequence[str] | None = None) -> ArgsTuple:
    """Parse ``[config.yaml|json] [--flag value ...]``: the file's values become defaults, flags override them.

    ``--iw_alpha`` defaults to 0 for adapters without LoRA factors (full, wsa, adalora); an explicit value > 0
    there (in the file or on the command line) is an error.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    file_values: dict[str, Any] = {}
    config_path: str | None = None
    if argv and not argv[0].startswith("-") and argv[0].lower().endswith(CONFIG_SUFFIXES):
        config_path, argv = argv[0], argv[1:]
        known = {a.dest for a in parser._actions if a.dest != argparse.SUPPRESS and a.dest != "help"}
        file_values = load_config_file(config_path, known)
        # Values as defaults: argparse converts string defaults with the flag's type, and command-line flags win.
        parser.set_defaults(**file_values)
        for action in parser._actions:
            if action.dest in file_values:
                action.required = False  # e.g. --model_name_or_path given by the file
    # One cheap argparse pass to learn whether --iw_alpha was typed: an untouched preset survives parsing.
    unset = object()
    probe, _ = parser.parse_known_args(argv, namespace=argparse.Namespace(iw_alpha=unset))
    iw_alpha_given = "iw_alpha" in file_values or probe.iw_alpha is not unset
    model_args, data_args, adapter_args, training_args = parser.parse_args_into_dataclasses(args=argv)
    resolve_iw_alpha(adapter_args, training_args, iw_alpha_given)
    for flag, value in (
        ("model_name_or_path", model_args.model_name_or_path),
        ("glue_dir", data_args.glue_dir),
        ("output_dir", training_args.output_dir),
    ):
        var = _ENV_VAR.search(value or "")
        if var:
            raise ValueError(
                f"--{flag} is {value!r}{f' (from {config_path})' if config_path else ''} but ${var.group(1)} is "
                f"not set; export {var.group(1)} or pass --{flag} on the command line"
            )
    return model_args, data_args, adapter_args, training_args


def resolve_iw_alpha(adapter_args: AdapterArguments, training_args: IWTrainingArguments, given: bool) -> None:
    """IW needs LoRA factors: default ``iw_alpha`` to 0 for full/wsa/adalora, reject an explicit value > 0."""
    if adapter_args.adapter not in NON_IW_ADAPTERS or training_args.iw_alpha == 0:
        return
    if given:
        raise ValueError(
            f"--iw_alpha {training_args.iw_alpha:g} needs LoRA factors (--adapter lora); --adapter "
            f"{adapter_args.adapter} has none to weight: pass --iw_alpha 0 or leave it out (it then defaults to 0)"
        )
    logger.info(
        "--adapter %s: --iw_alpha defaults to 0 (the IW penalty is defined on LoRA factors)", adapter_args.adapter
    )
    training_args.iw_alpha = 0.0


def one_line(exc: BaseException | str) -> str:
    """An exception message on a single line (transformers/hub errors span several)."""
    text = str(exc) if not isinstance(exc, KeyError) or not exc.args else str(exc.args[0])
    return " ".join(text.split()) or type(exc).__name__


# ---- data --------------------------------------------------------------------------------------------------------
def _file_extension(path: str) -> str:
    return path.rsplit(".", 1)[-1].lower()


@dataclass
class TaskData:
    """Raw splits plus what the model head and the metric need to know about the labels."""

    raw: Any  # datasets.DatasetDict
    is_regression: bool
    label_list: list[Any] | None
    sentence_keys: tuple[str, str | None]
    source: str  # for error messages: which flag the data came from

    @property
    def num_labels(self) -> int:
        return 1 if self.is_regression else len(self.label_list or [])


def load_task_data(
    data_args: DataTrainingArguments, model_args: ModelArguments, training_args: IWTrainingArguments
) -> TaskData:
    """Load the raw splits: ``--glue_dir`` (local TSV), hub GLUE for ``--task_name``, ``--dataset_name``, or files."""
    from datasets import load_dataset

    task = get_glue_task(data_args.task_name) if data_args.task_name else None
    if task is not None and data_args.glue_dir:
        raw = load_glue_from_dir(data_args.glue_dir, task.name)  # GlueDataError: missing folder/column, bad label
        source = f"--glue_dir {data_args.glue_dir}"
    elif task is not None:
        raw = load_dataset("nyu-mll/glue", task.name, cache_dir=model_args.cache_dir, token=model_args.token)
        source = f"hub dataset nyu-mll/glue ({task.name})"
    elif data_args.dataset_name is not None:
        raw = load_dataset(
            data_args.dataset_name,
            data_args.dataset_config_name,
            cache_dir=model_args.cache_dir,
            token=model_args.token,
        )
        source = f"--dataset_name {data_args.dataset_name}"
    else:
        data_files = {"train": data_args.train_file, "validation": data_args.validation_file}
        if training_args.do_predict:
            if data_args.test_file is None:
                raise ValueError("--do_predict needs --task_name or --test_file")
            if _file_extension(data_args.test_file) != _file_extension(data_args.train_file):
                raise ValueError("--test_file must have the same extension (csv or json) as --train_file")
            data_files["test"] = data_args.test_file
        for flag, path in (("train_file", data_args.train_file), ("validation_file", data_args.validation_file)):
            if not os.path.isfile(path):
                raise ValueError(f"--{flag} {path!r} does not exist")
        raw = load_dataset(
            _file_extension(data_args.train_file), data_files=data_files, cache_dir=model_args.cache_dir
        )
        source = "--train_file/--validation_file"

    if task is not None:
        # The task fixes the labels (also when only dev/test splits exist, e.g. QNLI offline).
        return TaskData(raw, task.is_regression, list(task.label_names) or None, task.sentence_keys, source)

    reference = raw["train"] if "train" in raw else next(iter(raw.values()))
    if "label" not in reference.column_names:
        raise ValueError(f"{source}: expected a 'label' column, found {reference.column_names}")
    is_regression = reference.features["label"].dtype in ("float32", "float64")
    label_list = None
    if not is_regression:
        label_list = sorted(reference.unique("label"))  # sorted for determinism, as run_glue.py
    non_label = [c for c in reference.column_names if c != "label"]
    if "sentence1" in non_label and "sentence2" in non_label:
        keys: tuple[str, str | None] = ("sentence1", "sentence2")
    elif len(non_label) >= 2:
        keys = (non_label[0], non_label[1])
    elif non_label:
        keys = (non_label[0], None)
    else:
        raise ValueError(f"{source}: expected at least one text column beside 'label'")
    return TaskData(raw, is_regression, label_list, keys, source)


def select_splits(
    data: TaskData, data_args: DataTrainingArguments, training_args: IWTrainingArguments
) -> dict[str, list[tuple[str, Any]]]:
    """``{"train"|"eval"|"predict": [(task label, split), ...]}`` after ``--max_*_samples`` (MNLI: matched + mm).

    Selecting before tokenizing gives the same rows as run_glue.py (it tokenizes everything, then selects) without
    tokenizing all of e.g. SST-2's 67k training sentences for a 2k-sample run.
    """
    raw, mnli = data.raw, data_args.task_name == "mnli"
    task = data_args.task_name

    def need(split: str, flag: str) -> Any:
        if split not in raw:
            raise ValueError(f"{flag} needs a {split!r} split but {data.source} has only {sorted(raw)}")
        return raw[split]

    def cap(ds: Any, limit: int | None) -> Any:
        return ds.select(range(min(len(ds), limit))) if limit is not None else ds

    out: dict[str, list[tuple[str, Any]]] = {"train": [], "eval": [], "predict": []}
    if training_args.do_train:
        out["train"] = [(str(task), cap(need("train", "--do_train"), data_args.max_train_samples))]
    if training_args.do_eval:
        if mnli:
            out["eval"] = [
                ("mnli", cap(need("validation_matched", "--do_eval"), data_args.max_eval_samples)),
                ("mnli-mm", cap(need("validation_mismatched", "--do_eval"), data_args.max_eval_samples)),
            ]
        else:
            out["eval"] = [(str(task), cap(need("validation", "--do_eval"), data_args.max_eval_samples))]
    if training_args.do_predict:
        if mnli:
            out["predict"] = [
                ("mnli", cap(need("test_matched", "--do_predict"), data_args.max_predict_samples)),
                ("mnli-mm", cap(need("test_mismatched", "--do_predict"), data_args.max_predict_samples)),
            ]
        else:
            out["predict"] = [(str(task), cap(need("test", "--do_predict"), data_args.max_predict_samples))]
    return out


def label_mapping(model: nn.Module, data: TaskData, data_args: DataTrainingArguments) -> dict[Any, int] | None:
    """Dataset label -> model output index (``None``: labels are already indices), as run_glue.py.

    A checkpoint fine-tuned with its own ``label2id`` (e.g. an MNLI model) keeps its output order; the model config
    is given the dataset's label names either way.
    """
    from transformers import PretrainedConfig

    if data.is_regression:
        return None
    label_list = list(data.label_list or [])
    label_to_id: dict[Any, int] | None = None
    if data_args.task_name is None:
        label_to_id = {v: i for i, v in enumerate(label_list)}
        names = {str(v): i for i, v in enumerate(label_list)}
    elif model.config.label2id != PretrainedConfig(num_labels=data.num_labels).label2id:
        by_name = {str(k).lower(): int(v) for k, v in model.config.label2id.items()}
        if sorted(by_name) == sorted(label_list):
            label_to_id = {i: by_name[name] for i, name in enumerate(label_list)}
        else:
            logger.warning(
                "The model's labels %s do not match the dataset's %s; ignoring the model's labels.",
                sorted(by_name),
                sorted(label_list),
            )
    if data_args.task_name is not None:
        names = {name: (label_to_id[i] if label_to_id else i) for i, name in enumerate(label_list)}
    model.config.label2id = names
    model.config.id2label = {i: name for name, i in names.items()}
    return label_to_id


def tokenize_splits(
    splits: dict[str, list[tuple[str, Any]]],
    data: TaskData,
    tokenizer: Any,
    label_to_id: Mapping[Any, int] | None,
    data_args: DataTrainingArguments,
    training_args: IWTrainingArguments,
) -> dict[str, list[tuple[str, Any]]]:
    """Tokenize every selected split; the main process goes first so other ranks reuse its cache files."""
    if data_args.max_seq_length > tokenizer.model_max_length:
        logger.warning(
            "--max_seq_length %d is larger than the model's maximum %d; using %d",
            data_args.max_seq_length,
            tokenizer.model_max_length,
            tokenizer.model_max_length,
        )
    max_len = min(data_args.max_seq_length, tokenizer.model_max_length)
    padding = "max_length" if data_args.pad_to_max_length else False
    key1, key2 = data.sentence_keys

    def preprocess(examples: dict[str, list[Any]]) -> dict[str, Any]:
        texts = (examples[key1],) if key2 is None else (examples[key1], examples[key2])
        result = tokenizer(*texts, padding=padding, max_length=max_len, truncation=True)
        if label_to_id is not None and "label" in examples:
            result[_REMAPPED] = [label_to_id[label] if label != -1 else -1 for label in examples["label"]]
        return result

    def encode(ds: Any, kind: str) -> Any:
        remap = label_to_id is not None and "label" in ds.column_names
        ds = ds.map(
            preprocess,
            batched=True,
            # datasets keeps an overwritten column's old (string) type, so new ids go to a fresh column first.
            remove_columns=["label"] if remap else None,
            load_from_cache_file=not data_args.overwrite_cache,
            desc=f"Running tokenizer on {kind} dataset",
        )
        return ds.rename_column(_REMAPPED, "label") if remap else ds

    with training_args.main_process_first(desc="dataset map pre-processing"):
        return {kind: [(name, encode(ds, kind)) for name, ds in items] for kind, items in splits.items()}


def make_compute_metrics(task_name: str | None, is_regression: bool) -> Callable[[Any], dict[str, float]]:
    """GLUE metrics from the packaged metric script (never a hub download); accuracy / mse for custom files."""

    def compute_metrics(p: Any) -> dict[str, float]:
        preds = p.predictions[0] if isinstance(p.predictions, tuple) else p.predictions
        if task_name is not None:
            return compute_glue_metrics(task_name, preds, p.label_ids)
        preds = np.squeeze(preds) if is_regression else np.argmax(preds, axis=1)
        if is_regression:
            return {"mse": float(((preds - p.label_ids) ** 2).mean())}
        return {"accuracy": float((preds == p.label_ids).astype(np.float32).mean())}

    return compute_metrics


# ---- model -------------------------------------------------------------------------------------------------------
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


@dataclass
class AdapterSetup:
    """The model to train and what the trainer needs beside it."""

    model: nn.Module
    adapter: str
    target_names: list[str]
    head_names: list[str]
    regularizers: dict[str, Callable[[nn.Module], torch.Tensor]] = field(default_factory=dict)
    callbacks: list[Any] = field(default_factory=list)
    wsa_config: Any = None
    adapter_args: AdapterArguments | None = None
    rank_calibration: RankCalibration | None = None
    """``--rank_allocation_mode calibration``: allocates the ranks in :meth:`prepare_training`; holds the record."""
    _prepared: bool = field(default=False, init=False, repr=False)

    def prepare_training(
        self,
        splits: Mapping[str, Sequence[tuple[str, Any]]],
        tokenizer: Any,
        data_args: DataTrainingArguments,
        training_args: IWTrainingArguments,
    ) -> None:
        """The adapter steps that need the tokenized training split; call after tokenizing, before the Trainer.

        Checks the run length against the AdaLoRA schedule and the gradnorm warm-up (``ValueError`` naming the flags,
        before anything is written) and, for ``--rank_allocation_mode calibration``, measures the sensitivities and
        rebuilds the LoRA layers with their allocated ranks. ``splits`` is :func:`tokenize_splits`' result. Runs once;
        a no-op without training data.
        """
        train = splits.get("train") or []
        if self._prepared or not train:
            return
        dataset = train[0][1]
        args = self.adapter_args
        if args is not None and _has_length(dataset):
            steps = estimate_train_steps(len(dataset), training_args)
            if self.adapter == "adalora":
                adalora_schedule(steps, args.adalora_tinit_frac, args.adalora_tfinal_frac)
            if args.rank_allocation == "gradnorm" and args.rank_allocation_mode == "ema":
                _check_warmup(args.rank_warmup_steps, steps, optimizer_steps_per_epoch(len(dataset), training_args))
        if self.rank_calibration is not None:
            collator = data_collator_for(tokenizer, data_args, training_args)
            self.rank_calibration.run(self.model, dataset, collator, training_args)
        self._prepared = True


def build_adapter(
    model: nn.Module,
    adapter_args: AdapterArguments,
    training_args: IWTrainingArguments,
    missing_keys: Iterable[str] = (),
) -> AdapterSetup:
    """Wrap ``model`` for ``--adapter``; raises ``ValueError`` (one line, naming the flag) on bad targets.

    Steps that need the tokenized training data follow in :meth:`AdapterSetup.prepare_training`.
    """
    heads = find_head_modules(model, missing_keys)
    adapter = adapter_args.adapter
    if adapter == "full":
        return AdapterSetup(model, adapter, [], heads)
    if adapter_args.lora_target_modules:
        targets = match_target_modules(model, adapter_args.lora_target_modules, exclude=heads)
    else:
        targets = discover_target_modules(model, exclude=heads)
        if not targets:
            raise ValueError(
                f"found no nn.Linear/Conv1D inside the transformer blocks of {type(model).__name__}; pass "
                f"--lora_target_modules; candidates: {candidates_message(model, heads)}"
            )
    spec = targets_regex(model, targets)
    if adapter == "wsa":
        setup = build_wsa(model, adapter_args, spec, targets, heads)
    elif adapter == "adalora":
        setup = build_adalora(model, adapter_args, training_args, spec, targets, heads)
    else:
        setup = build_lora(model, adapter_args, spec, targets, heads)
        apply_rank_allocation(setup, adapter_args, training_args)
    setup.adapter_args = adapter_args
    return setup


def build_lora(
    model: nn.Module, adapter_args: AdapterArguments, spec: str, targets: list[str], heads: list[str]
) -> AdapterSetup:
    """peft LoRA on ``spec`` with the head in ``modules_to_save``; IW-LoRA is this plus ``--iw_alpha > 0``."""
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers.pytorch_utils import Conv1D

    modules = dict(model.named_modules())
    conv1d = [n for n in targets if isinstance(modules[n], Conv1D)]
    if conv1d and len(conv1d) != len(targets):
        raise ValueError(
            "--lora_target_modules mixes nn.Linear and GPT-2 Conv1D layers; peft's fan_in_fan_out is one setting "
            "per adapter, pick modules of one kind"
        )
    config = LoraConfig(
        task_type=TaskType.SEQ_CLS,
        r=adapter_args.lora_r,
        lora_alpha=adapter_args.lora_alpha,
        lora_dropout=adapter_args.lora_dropout,
        target_modules=spec,
        modules_to_save=list(heads) or None,
        fan_in_fan_out=bool(conv1d),
    )
    return AdapterSetup(get_peft_model(model, config), "lora", targets, heads)


def build_wsa(
    model: nn.Module, adapter_args: AdapterArguments, spec: str, targets: list[str], heads: list[str]
) -> AdapterSetup:
    """Weighted Spectral Adapter on the same targets; ``λ·Σ‖tanh(s)‖₁`` goes to the trainer as a regularizer."""
    from .wsa import WSAConfig, apply_wsa, wsa_gate_l1

    config = WSAConfig(
        r_init=adapter_args.wsa_r_init,
        gate_l1=adapter_args.wsa_gate_l1,
        prune_threshold=adapter_args.wsa_prune_threshold,
        target_modules=spec,
        modules_to_save=list(heads) or None,
    )
    model = apply_wsa(model, config)
    lam = config.gate_l1
    regularizers = {"wsa_gate_l1": lambda m: lam * wsa_gate_l1(m)} if lam > 0 else {}
    return AdapterSetup(model, "wsa", targets, heads, regularizers=regularizers, wsa_config=config)


# ---- AdaLoRA and gradnorm rank allocation -----------------------------------------------------------------------
_PROVISIONAL_TOTAL_STEPS = 10_000
"""AdaLoRA's ``total_step`` when neither ``--max_steps`` nor the data size is known yet; ``AdaLoraCallback`` sets the
run's real length (and re-derives tinit/tfinal from the fractions) at ``on_train_begin``."""


def _world_size(training_args: IWTrainingArguments) -> int:
    """Processes of the run: ``$WORLD_SIZE`` (torchrun/accelerate) first, so nothing is initialised to find out."""
    env = int(os.environ.get("WORLD_SIZE", "1") or 1)
    return env if env > 1 else int(training_args.world_size)


def _has_length(dataset: Any) -> bool:
    try:
        len(dataset)
    except TypeError:
        return False
    return True


def optimizer_steps_per_epoch(num_examples: int, training_args: IWTrainingArguments) -> int:
    """Optimizer steps in one epoch of ``num_examples``, as the Trainer counts them (per process batches / GA)."""
    per_process = math.ceil(num_examples / _world_size(training_args))
    batch = training_args.train_batch_size
    batches = per_process // batch if training_args.dataloader_drop_last else math.ceil(per_process / batch)
    return max(math.ceil(batches / training_args.gradient_accumulation_steps), 1)


def estimate_train_steps(num_examples: int, training_args: IWTrainingArguments) -> int:
    """The run's optimizer steps: ``--max_steps`` when > 0, else ``ceil(epochs × steps per epoch)``."""
    if training_args.max_steps > 0:
        return training_args.max_steps
    return math.ceil(training_args.num_train_epochs * optimizer_steps_per_epoch(num_examples, training_args))


def _check_warmup(warmup: int | None, total_steps: int, steps_per_epoch: int) -> None:
    if (warmup or steps_per_epoch) < total_steps:
        return
    given = f"--rank_warmup_steps {warmup}" if warmup else f"--rank_warmup_steps (one epoch: {steps_per_epoch})"
    raise ValueError(
        f"{given} must be < the run's {total_steps} optimizer steps, or the ranks are never re-allocated: pass a "
        "smaller --rank_warmup_steps or train longer (--max_steps / --num_train_epochs)"
    )


def build_adalora(
    model: nn.Module,
    adapter_args: AdapterArguments,
    training_args: IWTrainingArguments,
    spec: str,
    targets: list[str],
    heads: list[str],
) -> AdapterSetup:
    """peft AdaLoRA on the LoRA targets with LoRA's average rank budget, driven by ``AdaLoraCallback``.

    ``total_step`` is provisional (``--max_steps``, else checked against the data size in ``prepare_training``); the
    callback corrects it to the Trainer's ``max_steps`` at ``on_train_begin``.
    """
    from peft import get_peft_model

    total = training_args.max_steps if training_args.max_steps > 0 else _PROVISIONAL_TOTAL_STEPS
    config = adalora_config(
        spec,
        lora_r=adapter_args.lora_r,
        lora_alpha=adapter_args.lora_alpha,
        lora_dropout=adapter_args.lora_dropout,
        total_step=total,
        tinit_frac=adapter_args.adalora_tinit_frac,
        tfinal_frac=adapter_args.adalora_tfinal_frac,
        delta_t=adapter_args.adalora_delta_t,
        orth_reg_weight=adapter_args.adalora_orth_reg_weight,
        modules_to_save=list(heads) or None,
    )
    callback = AdaLoraCallback(adapter_args.adalora_tinit_frac, adapter_args.adalora_tfinal_frac)
    return AdapterSetup(get_peft_model(model, config), "adalora", targets, heads, callbacks=[callback])


def apply_rank_allocation(
    setup: AdapterSetup, adapter_args: AdapterArguments, training_args: IWTrainingArguments
) -> None:
    """``--rank_allocation gradnorm`` on a LoRA setup: checks the budget, then adds the mode's callback.

    ema: a ``GradNormRankCallback`` (single process). calibration: ``setup.rank_calibration``, run by
    ``prepare_training``, plus a callback that writes its record when training ends.
    """
    if adapter_args.rank_allocation == "none":
        return
    lora_targets = find_lora_targets(setup.model)
    caps = {t.name: min(t.lora_A.shape[1], t.lora_B.shape[0]) for t in lora_targets}
    k = len(caps)
    budget = adapter_args.rank_budget if adapter_args.rank_budget is not None else k * adapter_args.lora_r
    flag = f"--rank_budget {budget}" if adapter_args.rank_budget is not None else f"the rank budget {budget}"
    if budget < adapter_args.rank_min * k:
        raise ValueError(
            f"{flag} is below --rank_min {adapter_args.rank_min} × {k} adapted matrices; lower --rank_min or raise "
            "--rank_budget"
        )
    if budget > sum(caps.values()):
        raise ValueError(
            f"{flag} exceeds {sum(caps.values())}, the largest total rank of the {k} adapted matrices "
            "(Σ min(d_in, d_out)); lower --rank_budget / --lora_r"
        )
    smallest = min(caps, key=caps.__getitem__)
    if adapter_args.rank_min > caps[smallest]:
        raise ValueError(
            f"--rank_min {adapter_args.rank_min} exceeds min(d_in, d_out) = {caps[smallest]} of {smallest}"
        )
    if adapter_args.rank_allocation_mode == "ema":
        world = _world_size(training_args)
        if world > 1 or training_args.deepspeed or training_args.fsdp:
            where = f"{world} processes" if world > 1 else "DeepSpeed/FSDP"
            raise ValueError(
                "--rank_allocation_mode ema rebuilds the LoRA layers mid-run, which only works in a single process, "
                f"not with {where}: use --rank_allocation_mode calibration"
            )
        warmup = adapter_args.rank_warmup_steps
        if warmup is not None and training_args.max_steps > 0:
            _check_warmup(warmup, training_args.max_steps, warmup)
        setup.callbacks.append(_EmaRankCallback(warmup, total_rank=budget, min_rank=adapter_args.rank_min))
    else:
        setup.rank_calibration = RankCalibration(budget, adapter_args.rank_min, caps)
        setup.callbacks.append(_CalibratedRankCallback(setup.rank_calibration))


def _write_rank_allocation(args: TrainingArguments, state: TrainerState, record: Mapping[str, Any] | None) -> None:
    if record is None or not state.is_world_process_zero:
        return
    os.makedirs(args.output_dir, exist_ok=True)
    with open(os.path.join(args.output_dir, RANK_ALLOCATION_FILE), "w") as f:
        json.dump(record, f, indent=2)


class _EmaRankCallback(GradNormRankCallback):
    """``GradNormRankCallback`` with the warm-up defaulting to one epoch of the Trainer's optimizer steps;
    ``rank_allocation.json`` is written when training ends (with ``"rank_allocation_mode": "ema"``)."""

    def __init__(self, warmup_steps: int | None, **kwargs: Any) -> None:
        super().__init__(warmup_steps or 1, write_file=False, **kwargs)
        self.requested_warmup = warmup_steps

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self.requested_warmup is None:
            loader = kwargs.get("train_dataloader")
            if loader is None or not _has_length(loader):
                raise ValueError("--rank_warmup_steps is required when the training data has no length")
            ga = args.gradient_accumulation_steps
            self.warmup_steps = max(len(loader) // ga + int(len(loader) % ga > 0), 1)  # the Trainer's epoch
        super().on_train_begin(args, state, control, **kwargs)

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self.record is not None:
            self.record["rank_allocation_mode"] = "ema"
        _write_rank_allocation(args, state, self.record)


@dataclass
class RankCalibration:
    """``--rank_allocation_mode calibration``: ranks from the base weights' gradient norms, applied before training.

    ``s_k = mean_b ‖∂L/∂W_k‖_F`` (:func:`compute_sensitivities`, the IW calibration's measure) over
    ``--iw_calib_steps`` batches of a plain shuffled DataLoader, ``r = allocate_ranks(s, budget, min_rank, caps)``,
    then :func:`rebuild_lora_ranks` in place (same model object; rank 0 removes the adapter). ``record`` is the
    content of ``rank_allocation.json``.
    """

    budget: int
    min_rank: int
    caps: dict[str, int]
    record: dict[str, Any] | None = None

    def run(self, model: nn.Module, dataset: Any, collator: Callable, training_args: IWTrainingArguments) -> None:
        from torch.utils.data import DataLoader

        seed = training_args.data_seed if training_args.data_seed is not None else training_args.seed
        loader = DataLoader(
            _model_input_columns(dataset, model),
            batch_size=training_args.per_device_train_batch_size,
            shuffle=True,
            generator=torch.Generator().manual_seed(seed),
            collate_fn=collator,
            drop_last=training_args.dataloader_drop_last,
        )
        home = next(model.parameters()).device
        autocast = torch.bfloat16 if training_args.bf16 else torch.float16 if training_args.fp16 else None
        model.to(training_args.device)
        try:
            sensitivities = compute_sensitivities(
                model,
                loader,
                num_steps=training_args.iw_calib_steps,
                gradient_accumulation_steps=training_args.gradient_accumulation_steps,
                autocast_dtype=autocast,
                show_progress=not training_args.disable_tqdm,
            )
        finally:
            model.to(home)
        ranks = allocate_ranks(sensitivities, self.budget, self.min_rank, self.caps)
        info = rebuild_lora_ranks(model, ranks)
        total = sum(sensitivities.values()) or 1.0
        self.record = {
            "mode": "gradnorm",
            "rank_allocation_mode": "calibration",
            "iw_calib_steps": training_args.iw_calib_steps,
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
                "AdapterSetup.prepare_training(...) after tokenizing and before building the Trainer"
            )

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        _write_rank_allocation(args, state, self.calibration.record)


def data_collator_for(tokenizer: Any, data_args: DataTrainingArguments, training_args: IWTrainingArguments) -> Any:
    """run_glue_iw.py's batch collator (for its ``None``, the Trainer's default: padding with the tokenizer)."""
    from transformers import DataCollatorWithPadding, default_data_collator

    if data_args.pad_to_max_length:
        return default_data_collator
    return DataCollatorWithPadding(tokenizer, pad_to_multiple_of=8 if training_args.fp16 else None)


def count_trainable_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
