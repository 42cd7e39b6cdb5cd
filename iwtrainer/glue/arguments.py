"""run_glue_iw.py's command line: its argument dataclasses and ``[config.yaml|json] [--flag value ...]`` parsing.

One ``HfArgumentParser`` over every dataclass (model, data, adapter, each method's own flags, training with the
``iw_*`` fields, search): a config file's values become the parser's defaults, flags override them. Per-method
defaults (``--iw_alpha`` is 0 for methods without plain LoRA factors) are resolved once, in :func:`parse_args`.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import logging
import os
import re
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from ..errors import one_line, one_line_errors
from ..methods import METHODS, AdapterArguments, method_arguments
from ..search import BACKENDS, DIRECTIONS
from ..settings import IWSettings
from ..training_args import IWTrainingArguments
from .tasks import GLUE_TASKS, GlueDataError, get_glue_task

logger = logging.getLogger(__name__)

CONFIG_SUFFIXES = (".yaml", ".yml", ".json")
USER_ERRORS: tuple[type[BaseException], ...] = (GlueDataError, ValueError, OSError, NotImplementedError)
"""Errors of the setup phase that are the user's input, reported as one line without a traceback."""
_ENV_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


class _MethodDefault:
    """The parser's default for ``--iw_alpha``, whose value depends on the method (resolved in ``parse_args``)."""

    def __repr__(self) -> str:
        return f"{IWSettings.alpha:g} for methods with plain LoRA factors, else 0"


_NOT_GIVEN = _MethodDefault()

__all__ = [
    "CONFIG_SUFFIXES",
    "USER_ERRORS",
    "AdapterArguments",
    "DataTrainingArguments",
    "HpoArguments",
    "ModelArguments",
    "OutputArguments",
    "ParsedArgs",
    "build_parser",
    "load_config_file",
    "one_line",
    "parse_args",
]


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
            "Defaults to $GLUE_DIR when set; without it --task_name loads nyu-mll/glue from the hub. 'builtin': the "
            "STS-B sample embedded in the package (1,000 train / 375 dev rows, CC BY-SA), also what --task_name stsb "
            "uses when the hub is unreachable."
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
    pad_to_multiple_of: int | None = field(
        default=None,
        metadata={
            "help": "With --pad_to_max_length false: pad each batch to a multiple of this many tokens (32 with "
            "--max_seq_length 128: lengths 32, 64, 96, 128), so a compiled model (--torch_compile, above all "
            "--torch_compile_mode reduce-overhead) meets a few shapes again and again instead of one per batch "
            "length. Default: the batch's longest row (a multiple of 8 under --fp16)."
        },
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
        positive = ("max_seq_length", "max_train_samples", "max_eval_samples", "max_predict_samples",
                    "pad_to_multiple_of")  # fmt: skip
        for flag in positive:
            value = getattr(self, flag)
            if value is not None and value < 1:
                raise ValueError(f"--{flag} must be a positive integer, got {value}")
        multiple = self.pad_to_multiple_of
        if multiple is not None and self.pad_to_max_length:  # the default: every batch already has one shape
            raise ValueError(f"--pad_to_multiple_of {multiple} pads dynamic batches: add --pad_to_max_length false")
        if multiple is not None and self.max_seq_length % multiple:  # no batch padded past --max_seq_length
            raise ValueError(
                f"--pad_to_multiple_of {multiple} must divide --max_seq_length {self.max_seq_length}, so that no "
                "batch is padded past it"
            )


@dataclass
class HpoArguments:
    """Hyperparameter search flags of ``run_glue_iw.py`` (``--hpo_*``; also accepted as ``hpo_*`` config keys)."""

    hpo_trials: int = field(
        default=0,
        metadata={
            "help": "Trials of hyperparameter search (0: no search, train once). Each trial trains a fresh model "
            "with --do_train and scores it on the validation split; with a shared --hpo_storage this many trials "
            "run on this worker."
        },
    )
    hpo_backend: str = field(
        default="optuna", metadata={"help": "Search backend: optuna or ray (pip install 'iwtrainer[ray]')."}
    )
    hpo_space: str | None = field(
        default=None,
        metadata={
            "help": "YAML search space (see configs/hpo_space.yaml); default: the source documents' space "
            "(learning_rate loguniform [1e-5, 5e-4], per_device_train_batch_size {16, 32, 64}, iw_alpha "
            "loguniform [1e-5, 1e-3])."
        },
    )
    hpo_storage: str | None = field(
        default=None,
        metadata={
            "help": "optuna storage shared by several workers: sqlite:///path.db (one machine) or a database URL "
            "such as postgresql://user:password@host/db (several machines). Default: in memory."
        },
    )
    hpo_study_name: str | None = field(
        default=None,
        metadata={"help": "optuna study name (workers sharing --hpo_storage and this name share the study); "
                  "default: the name of --output_dir."},
    )  # fmt: skip
    hpo_direction: str = field(
        default="maximize", metadata={"help": "maximize (GLUE metrics) or minimize the objective."}
    )

    def __post_init__(self) -> None:
        if isinstance(self.hpo_trials, bool) or not isinstance(self.hpo_trials, int) or self.hpo_trials < 0:
            raise ValueError(f"--hpo_trials must be an integer >= 0 (0: no search), got {self.hpo_trials!r}")
        if self.hpo_backend not in BACKENDS:
            raise ValueError(f"--hpo_backend must be one of {list(BACKENDS)}, got {self.hpo_backend!r}")
        if self.hpo_direction not in DIRECTIONS:
            raise ValueError(f"--hpo_direction must be one of {list(DIRECTIONS)}, got {self.hpo_direction!r}")
        if self.hpo_storage is not None and self.hpo_backend != "optuna":
            raise ValueError("--hpo_storage is an optuna storage; it needs --hpo_backend optuna")


@dataclass
class OutputArguments:
    """What happens to an existing ``--output_dir``."""

    overwrite_output_dir: bool = field(
        default=False,
        metadata={
            "help": "Start fresh even if --output_dir holds checkpoints of an earlier run (they are not resumed and "
            "are replaced as training writes its own). Without it a run resumes the last checkpoint there, and "
            "refuses one written with different settings."
        },
    )


class ParsedArgs(NamedTuple):
    """Every dataclass of one command line (the first four in the order of earlier releases' tuple)."""

    model_args: ModelArguments
    data_args: DataTrainingArguments
    adapter_args: AdapterArguments
    training_args: IWTrainingArguments
    hpo_args: HpoArguments
    method_args: dict[type, Any]
    """Each method's own arguments, keyed by their dataclass (``build_adapter`` picks the chosen method's)."""
    output_args: OutputArguments


def _dataclass_types() -> tuple[type, ...]:
    return (ModelArguments, DataTrainingArguments, AdapterArguments, *method_arguments(), IWTrainingArguments,
            HpoArguments, OutputArguments)  # fmt: skip


def build_parser() -> Any:
    """One ``HfArgumentParser`` over every argument dataclass of ``run_glue_iw.py``."""
    from transformers import HfArgumentParser

    parser = HfArgumentParser(_dataclass_types())
    parser._option_string_actions["--adapter"].choices = list(METHODS)  # the registry decides
    return one_line_errors(parser)


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


def parse_args(argv: Sequence[str] | None = None) -> ParsedArgs:
    """Parse ``[config.yaml|json] [--flag value ...]``: the file's values become defaults, flags override them.

    One argparse pass; then the method's defaults are applied where the user gave no value (``--iw_alpha`` is 0 for
    methods without plain LoRA factors — an explicit value > 0 there, in the file or on the command line, is an
    error), and the dataclasses are built (each validates its own fields).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    file_values: dict[str, Any] = {}
    config_path: str | None = None
    if argv and not argv[0].startswith("-") and argv[0].lower().endswith(CONFIG_SUFFIXES):
        config_path, argv = argv[0], argv[1:]
        known = {a.dest for a in parser._actions if a.dest not in ("help", "==SUPPRESS==")}
        file_values = load_config_file(config_path, known)
        # Values as defaults: argparse converts string defaults with the flag's type, and command-line flags win.
        parser.set_defaults(**file_values)
        for action in parser._actions:
            if action.dest in file_values:
                action.required = False  # e.g. --model_name_or_path given by the file
    if "iw_alpha" not in file_values:
        parser.set_defaults(iw_alpha=_NOT_GIVEN)
    values = vars(parser.parse_args(argv))
    resolve_method_defaults(values)
    parsed = {type(obj): obj for obj in parser.parse_dict(values)}
    output_dir = values.get("output_dir")
    if output_dir and os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise ValueError(f"--output_dir {output_dir!r} is a file; expected a folder (created when missing)")
    for flag in ("model_name_or_path", "glue_dir", "output_dir"):
        value = values.get(flag)
        var = _ENV_VAR.search(value or "")
        if var:
            raise ValueError(
                f"--{flag} is {value!r}{f' (from {config_path})' if config_path else ''} but ${var.group(1)} is "
                f"not set; export {var.group(1)} or pass --{flag} on the command line"
            )
    return ParsedArgs(
        parsed[ModelArguments],
        parsed[DataTrainingArguments],
        parsed[AdapterArguments],
        parsed[IWTrainingArguments],
        parsed[HpoArguments],
        {cls: parsed[cls] for cls in method_arguments()},
        parsed[OutputArguments],
    )


def resolve_method_defaults(values: dict[str, Any]) -> None:
    """The one place where the method changes other flags: the IW penalty needs plain LoRA factors, so ``iw_alpha``
    defaults to 0 for other methods and an explicit value > 0 there is an error; another method's own flags (set on
    the command line or in the config) have no effect and are an error too."""
    given = values["iw_alpha"] is not _NOT_GIVEN
    adapter = "gradnorm" if values.get("rank_allocation") == "gradnorm" else values["adapter"]
    method = METHODS.get(adapter)
    uses_iw = method is None or method.uses_iw  # an unknown --adapter: AdapterArguments names it
    for other in METHODS.values():
        if other is method or other.arguments is None:
            continue
        for f in dataclasses.fields(other.arguments):
            if f.name in values and values[f.name] != f.default:
                raise ValueError(
                    f"--{f.name} is a flag of --adapter {other.name}; it has no effect with --adapter {adapter}: "
                    f"leave it out or pass --adapter {other.name}"
                )
    if not given:
        values["iw_alpha"] = IWSettings.alpha if uses_iw else 0.0
        if not uses_iw:
            logger.info("--adapter %s: --iw_alpha defaults to 0 (the IW penalty is defined on LoRA factors)", adapter)
    elif not uses_iw and values["iw_alpha"] != 0:
        raise ValueError(
            f"--iw_alpha {values['iw_alpha']:g} needs plain LoRA factors (--adapter "
            f"{' or '.join(n for n, m in METHODS.items() if m.uses_iw)}); --adapter "
            f"{adapter} has none to weight: pass --iw_alpha 0 or leave it out (it then defaults to 0)"
        )


def _file_extension(path: str) -> str:
    return path.rsplit(".", 1)[-1].lower()
