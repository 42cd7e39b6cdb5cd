"""The run_glue.py-compatible program: parse, load and check everything, then train / evaluate / predict.

    command line ──parse_args──▶ ParsedArgs ──prepare──▶ Run (data, tokenized splits, model wrapped by the method)
        ──train_and_evaluate──▶ GlueTrainer.train ──▶ output_dir: adapter/model, all_results.json, iw_importance.json…

``run_glue_iw.py`` at the repository root and the console command ``iwtrainer-glue`` both call :func:`main`.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from dataclasses import dataclass, field
from typing import Any

import datasets
import numpy as np
import torch
import transformers
from transformers import set_seed

from ..files import write_json
from ..guard import TrainingDiverged
from ..methods import AdapterArguments, MethodSetup, build_adapter, get_method
from ..plot import plot_run
from ..search import BackendNotInstalled
from ..training_args import IWTrainingArguments
from .arguments import USER_ERRORS, DataTrainingArguments, ModelArguments, ParsedArgs, one_line, parse_args
from .data import (
    TaskData,
    data_collator_for,
    label_mapping,
    load_task_data,
    make_compute_metrics,
    select_splits,
    tokenize_splits,
)
from .modeling import load_model_and_tokenizer
from .resume import RunSettingsCallback, checkpoint_to_resume, run_settings
from .search import check_search, run_glue_search, search_space
from .trainer import GlueTrainer

logger = logging.getLogger(__name__)
PROG = "run_glue_iw.py"
COMMAND = "iwtrainer-glue"


def prog() -> str:
    """The program's name in its one-line errors: the console command's when it runs as one, else the script's."""
    return COMMAND if os.path.basename(sys.argv[0]) == COMMAND else PROG


MERGED_DIR = "merged"


@dataclass
class Run:
    """Everything validated and loaded before the first file is written."""

    model_args: ModelArguments
    data_args: DataTrainingArguments
    adapter_args: AdapterArguments
    training_args: IWTrainingArguments
    data: TaskData
    splits: dict[str, list[tuple[str, Any]]]
    tokenizer: Any
    setup: MethodSetup
    settings: dict[str, Any] = field(default_factory=dict)
    """The run's defining settings (``run_settings.json`` in every checkpoint)."""
    checkpoint: str | None = None
    """The checkpoint this run resumes (checked to belong to it), or ``None``."""


def setup_logging(training_args: IWTrainingArguments) -> None:
    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s",
        datefmt="%m/%d/%Y %H:%M:%S",
        handlers=[logging.StreamHandler(sys.stdout)],
    )
    if training_args.should_log:
        # As run_glue.py: TrainingArguments' default log level is "passive"; the script's default is INFO.
        transformers.utils.logging.set_verbosity_info()
    log_level = training_args.get_process_log_level()
    logger.setLevel(log_level)
    logging.getLogger("iwtrainer").setLevel(log_level)
    datasets.utils.logging.set_verbosity(log_level)
    transformers.utils.logging.set_verbosity(log_level)
    # transformers' records go through the stdout handler above like this script's: stderr is left to progress
    # bars and to the one-line error of bad input.
    transformers.utils.logging.disable_default_handler()
    transformers.utils.logging.enable_propagation()


def check_report_to(training_args: IWTrainingArguments) -> None:
    """Each ``--report_to`` integration can start (its package is installed): a clear error before anything runs."""
    from transformers.integrations import get_reporting_integration_callbacks

    for name in training_args.report_to or []:
        try:
            for callback in get_reporting_integration_callbacks([name]):
                callback()  # integrations check their package in __init__ (e.g. TensorBoard's SummaryWriter)
        except (RuntimeError, ImportError, ValueError) as exc:
            raise ValueError(f"--report_to {name}: {one_line(exc)}") from exc


def prepare(argv: list[str] | None, parsed: ParsedArgs | None = None) -> Run:
    """Parse, load and check data, model and adapter targets; writes nothing (errors here are the user's)."""
    parsed = parsed or parse_args(argv)
    model_args, data_args, adapter_args, training_args = parsed[:4]
    setup_logging(training_args)
    logger.warning(
        "Process rank: %s, device: %s, n_gpu: %s, distributed training: %s, 16-bits training: %s",
        training_args.local_process_index,
        training_args.device,
        training_args.n_gpu,
        training_args.world_size > 1,
        training_args.fp16,
    )
    logger.info("Training/evaluation parameters %s", training_args)
    check_report_to(training_args)
    settings = run_settings(parsed)
    checkpoint = checkpoint_to_resume(parsed, settings)  # a foreign checkpoint is refused before anything is loaded
    set_seed(training_args.seed)  # before the head is initialised

    data = load_task_data(data_args, model_args, training_args)
    splits = select_splits(data, data_args, training_args)
    tokenizer, model, missing = load_model_and_tokenizer(model_args, data, data_args.task_name)
    label_to_id = label_mapping(model, data, data_args)
    setup = build_adapter(model, adapter_args, training_args, missing, parsed.method_args)
    splits = tokenize_splits(splits, data, tokenizer, label_to_id, data_args, training_args)
    train = splits["train"][0][1] if splits["train"] else None
    setup.prepare_training(train, data_collator_for(tokenizer, data_args, training_args), training_args)
    return Run(
        model_args, data_args, adapter_args, training_args, data, splits, tokenizer, setup, settings, checkpoint
    )


def train_and_evaluate(run: Run) -> None:
    """Train / evaluate / predict, writing each phase's files as run_glue.py does (train metrics and
    ``trainer_state.json`` right after training, eval metrics after evaluation, the model card at the end)."""
    args, data_args = run.training_args, run.data_args
    model = run.setup.model
    trainable = model.num_parameters(only_trainable=True)
    logger.info(
        "adapter %s: %d trainable parameters, %d adapted matrices, trained in full: %s",
        run.setup.method,
        trainable,
        len(run.setup.target_names),
        run.setup.head_names,
    )
    collator = data_collator_for(run.tokenizer, data_args, args)
    train_dataset = run.splits["train"][0][1] if run.splits["train"] else None
    eval_dataset = run.splits["eval"][0][1] if run.splits["eval"] else None
    trainer = GlueTrainer(
        model=model,
        args=args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        compute_metrics=make_compute_metrics(data_args.task_name, run.data.is_regression),
        processing_class=run.tokenizer,
        data_collator=collator,
        callbacks=[*run.setup.callbacks, RunSettingsCallback(run.settings)],
        regularizers=run.setup.regularizers,
    )
    wrote_results = False

    if args.do_train:
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        train_result = trainer.train(resume_from_checkpoint=run.checkpoint)
        metrics = dict(train_result.metrics)
        metrics["train_samples"] = len(train_dataset)
        metrics["train_ms_per_step"] = metrics["train_runtime"] / max(1, trainer.state.global_step) * 1000.0
        if torch.cuda.is_available():
            metrics["peak_gpu_memory_mb"] = torch.cuda.max_memory_allocated() / 2**20
        get_method(run.setup.method).save(run.setup, trainer, run.tokenizer)  # WSA prunes: evaluated as saved
        trainer.log_metrics("train", metrics)
        trainer.save_metrics("train", metrics)
        trainer.save_state()
        wrote_results = True

    if args.do_eval:
        logger.info("*** Evaluate ***")
        combined: dict[str, Any] = {}
        for task, dataset in run.splits["eval"]:
            metrics = trainer.evaluate(eval_dataset=dataset)
            metrics["eval_samples"] = len(dataset)
            if task == "mnli-mm":
                metrics = {f"{k}_mm": v for k, v in metrics.items()}
            trainer.log_metrics("eval", metrics)
            combined.update(metrics)
            trainer.save_metrics("eval", combined)  # MNLI: matched and mismatched together, as run_glue.py
        wrote_results = True

    if args.do_predict:
        logger.info("*** Predict ***")
        for task, dataset in run.splits["predict"]:
            if "label" in dataset.column_names:
                dataset = dataset.remove_columns("label")  # test labels are -1
            predictions = trainer.predict(dataset, metric_key_prefix="predict").predictions
            predictions = predictions[0] if isinstance(predictions, tuple) else predictions
            predictions = np.squeeze(predictions) if run.data.is_regression else np.argmax(predictions, axis=1)
            if trainer.is_world_process_zero():
                path = os.path.join(args.output_dir, f"predict_results_{task}.txt")
                with open(path, "w") as writer:
                    logger.info("***** Predict results %s *****", task)
                    writer.write("index\tprediction\n")
                    for index, item in enumerate(np.atleast_1d(predictions)):
                        if run.data.is_regression:
                            writer.write(f"{index}\t{item:3.3f}\n")
                        else:
                            writer.write(f"{index}\t{run.data.label_list[item]}\n")

    if args.do_train and trainer.is_world_process_zero():
        plot_run(args.output_dir)  # iw_importance.png: weights, final ‖Δ_k‖_F and the method's ranks
    if wrote_results and trainer.is_world_process_zero():
        path = os.path.join(args.output_dir, "all_results.json")
        with open(path) as handle:
            merged = json.load(handle)
        merged.update(adapter=run.setup.method, trainable_params=trainable)
        write_json(path, dict(sorted(merged.items())), indent=4)
    kwargs = {"finetuned_from": run.model_args.model_name_or_path, "tasks": "text-classification"}
    if data_args.task_name is not None:
        kwargs.update(
            language="en",
            dataset_tags="glue",
            dataset_args=data_args.task_name,
            dataset=f"GLUE {data_args.task_name.upper()}",
        )
    if args.push_to_hub:
        trainer.push_to_hub(**kwargs)
    elif trainer.is_world_process_zero():
        trainer.create_model_card(**kwargs)
    if run.adapter_args.merge_adapter and args.do_train and trainer.is_world_process_zero():
        # Last: merging folds the adapter into the model in place.
        merged_dir = os.path.join(args.output_dir, MERGED_DIR)
        get_method(run.setup.method).merge(run.setup).save_pretrained(merged_dir)
        run.tokenizer.save_pretrained(merged_dir)
        logger.info("merged model (adapter folded into the base weights) written to %s", merged_dir)


def main(argv: list[str] | None = None) -> None:
    """Entry point; bad input ends the process with ``run_glue_iw.py: error: <one line>`` and exit status 1, before
    anything is written; so does a run that diverges (a non-finite loss, penalty or gradient), with its last good
    checkpoint intact.

    With ``--hpo_trials N`` (and --do_train --do_eval) it runs a hyperparameter search instead of one training run
    (``iwtrainer.glue.search``): ``<output_dir>/hpo_results.json`` lists every trial, ``best_hyperparameters.json`` the
    best values (pass them back as flags to train with them); each trial's files are in ``<output_dir>/run-N/``.
    """
    try:
        parsed = parse_args(argv)
        hpo_args = parsed.hpo_args
        space = search_space(hpo_args) if hpo_args.hpo_trials > 0 else None
        run = prepare(argv, parsed)
        if space is not None:
            check_search(run, hpo_args, space)
    except (*USER_ERRORS, BackendNotInstalled) as exc:
        logger.debug("setup failed", exc_info=True)  # the traceback, for --log_level debug
        sys.exit(f"{prog()}: error: {one_line(exc)}")
    try:
        if space is not None:
            run_glue_search(run, hpo_args, space)
        else:
            train_and_evaluate(run)
    except TrainingDiverged as exc:
        sys.exit(f"{prog()}: error: {one_line(exc)}")
