"""run_glue_iw.py's command line: the argument dataclasses and ``[config.yaml|json] [--flag value ...]`` parsing."""

from __future__ import annotations

import argparse
import difflib
import json
import logging
import os
import re
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .glue import GLUE_TASKS, GlueDataError, get_glue_task
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


def _file_extension(path: str) -> str:
    return path.rsplit(".", 1)[-1].lower()
