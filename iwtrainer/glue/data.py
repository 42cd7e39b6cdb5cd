"""run_glue_iw.py's data: loading the splits, selecting samples, label ids, tokenizing, metrics and the collator."""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import numpy as np
from torch import nn

from ..errors import one_line
from ..training_args import IWTrainingArguments
from .arguments import DataTrainingArguments, ModelArguments, _file_extension
from .tasks import compute_glue_metrics, get_glue_task
from .tsv import BUILTIN_GLUE_DIR, SAMPLE_DESCRIPTION, SAMPLE_TASKS, load_glue_from_dir

logger = logging.getLogger(__name__)

_REMAPPED = "_iw_label_id"


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
        builtin = data_args.glue_dir == BUILTIN_GLUE_DIR
        source = f"the embedded {task.folder} sample" if builtin else f"--glue_dir {data_args.glue_dir}"
    elif task is not None:
        try:
            raw = _load_hub_glue(task.name, model_args)
            source = f"hub dataset nyu-mll/glue ({task.name})"
        except Exception as exc:  # ConnectionError, OSError, DatasetNotFoundError, ...: say how to run offline
            if task.name not in SAMPLE_TASKS:
                raise ValueError(
                    f"--task_name {task.name}: the hub dataset nyu-mll/glue could not be loaded ({one_line(exc)}); "
                    f"offline, pass --glue_dir DIR (or set $GLUE_DIR) with the original GLUE TSV layout "
                    f"(DIR/{task.folder}/train.tsv, dev.tsv), or run --task_name {SAMPLE_TASKS[0]}, which runs "
                    f"offline on the embedded sample (--glue_dir {BUILTIN_GLUE_DIR})"
                ) from exc
            logger.warning(
                "--task_name %s: the hub dataset nyu-mll/glue could not be loaded and no --glue_dir is set; using "
                "the embedded sample (%s), not the full task: pass --glue_dir DIR (or set $GLUE_DIR) for it",
                task.name,
                SAMPLE_DESCRIPTION,
            )
            raw = load_glue_from_dir(BUILTIN_GLUE_DIR, task.name)
            source = f"the embedded {task.folder} sample"
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
        for flag, path in (("train_file", data_args.train_file), ("validation_file", data_args.validation_file),
                           ("test_file", data_files.get("test"))):  # fmt: skip
            if path is not None and not os.path.isfile(path):
                raise ValueError(f"--{flag} {path!r} does not exist")
            if path is not None and os.path.getsize(path) == 0:
                raise ValueError(f"--{flag} {path!r} is empty; expected a header row and labelled rows")
            if path is not None and path.lower().endswith(".csv") and _non_empty_lines(path) < 2:
                raise ValueError(f"--{flag} {path!r} has a header but no rows; expected labelled rows")
        extension = _file_extension(data_args.train_file)
        try:
            raw = load_dataset(extension, data_files=data_files, cache_dir=model_args.cache_dir)
        except Exception as exc:  # datasets wraps every parse error in DatasetGenerationError
            cause = exc.__cause__ or exc
            raise ValueError(
                f"--train_file/--validation_file: cannot be read as {extension}: {one_line(cause)}"
            ) from exc
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


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether a TCP connection to the hub (``$HF_ENDPOINT``) opens within ``timeout`` seconds; ``True`` behind a
    proxy (the proxy, not this machine, resolves the hub there)."""
    if any(os.environ.get(name) for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    url = urlsplit(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    try:
        socket.create_connection((url.hostname, url.port or (80 if url.scheme == "http" else 443)), timeout).close()
    except OSError:
        return False
    return True


def _load_hub_glue(task_name: str, model_args: ModelArguments) -> Any:
    """``load_dataset("nyu-mll/glue", task_name)``; with the hub unreachable, from the local cache only (as with
    ``HF_DATASETS_OFFLINE=1``), which fails in a second instead of after ~25 s of retries."""
    import datasets
    from datasets import load_dataset

    offline = datasets.config.HF_HUB_OFFLINE
    if not offline and not hub_reachable():
        datasets.config.HF_HUB_OFFLINE = True
    try:
        return load_dataset("nyu-mll/glue", task_name, cache_dir=model_args.cache_dir, token=model_args.token)
    finally:
        datasets.config.HF_HUB_OFFLINE = offline


def _non_empty_lines(path: str, enough: int = 2) -> int:
    """Non-blank lines of a text file, counting no further than ``enough``."""
    count = 0
    with open(path, encoding="utf-8", errors="replace") as handle:
        for line in handle:
            count += bool(line.strip())
            if count >= enough:
                break
    return count


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
        if len(raw[split]) == 0:
            raise ValueError(f"{flag}: the {split!r} split of {data.source} has no rows; expected labelled rows")
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
        names = dict(label_to_id)  # the label values themselves, as run_glue.py (not their str())
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

    from sklearn.metrics import accuracy_score, mean_squared_error

    def compute_metrics(p: Any) -> dict[str, float]:
        preds = p.predictions[0] if isinstance(p.predictions, tuple) else p.predictions
        if task_name is not None:
            return compute_glue_metrics(task_name, preds, p.label_ids)
        preds = np.squeeze(preds) if is_regression else np.argmax(preds, axis=1)
        # In float64, as evaluate's "mse" / "accuracy" metrics that run_glue.py loads (sklearn underneath).
        if is_regression:
            return {"mse": float(mean_squared_error(np.float64(p.label_ids), np.float64(preds)))}
        return {"accuracy": float(accuracy_score(p.label_ids, preds))}

    return compute_metrics


def data_collator_for(tokenizer: Any, data_args: DataTrainingArguments, training_args: IWTrainingArguments) -> Any:
    """run_glue_iw.py's batch collator (for its ``None``, the Trainer's default: padding with the tokenizer)."""
    from transformers import DataCollatorWithPadding, default_data_collator

    if data_args.pad_to_max_length:
        return default_data_collator
    multiple = data_args.pad_to_multiple_of or (8 if training_args.fp16 else None)  # fp16 tensor cores: 8
    return DataCollatorWithPadding(tokenizer, pad_to_multiple_of=multiple)
