"""``run_glue_iw.py --hpo_trials N``: a hyperparameter search over the run ``prepare`` validated and loaded.

The generic part (space, backends, results files) is :mod:`iwtrainer.search`; here: checking a search request
against the run, and a trainer whose ``model_init`` reloads the model and rebuilds the method for every trial.
"""

from __future__ import annotations

import copy
import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..methods import build_adapter, get_method
from ..search import (
    BEST_FILE,
    DEFAULT_SPACE,
    DEFAULT_STUDY_NAME,
    as_flags,
    load_search_space,
    metric_objective,
    open_study,
    require_backend,
    run_search,
)
from .arguments import HpoArguments
from .data import data_collator_for, label_mapping, make_compute_metrics
from .modeling import load_model_and_tokenizer
from .tasks import objective_metric
from .trainer import GlueTrainer

if TYPE_CHECKING:
    from .run import Run

logger = logging.getLogger(__name__)


def search_space(hpo_args: HpoArguments) -> dict[str, dict[str, Any]]:
    """The backend check and the space of ``--hpo_space`` (default :data:`DEFAULT_SPACE`): before loading a model."""
    require_backend(hpo_args.hpo_backend)
    if hpo_args.hpo_space is not None:
        return load_search_space(hpo_args.hpo_space)
    return copy.deepcopy(DEFAULT_SPACE)


def check_search(run: Run, hpo_args: HpoArguments, space: Mapping[str, Any]) -> None:
    """Validate a search request against the loaded run (no output written).

    ``run`` is the :class:`~iwtrainer.glue.run.Run` validated and loaded by ``prepare``.
    """
    source = hpo_args.hpo_space or "the default search space"
    args = run.training_args
    if not args.do_train:
        raise ValueError("--hpo_trials > 0 trains one model per trial: it needs --do_train")
    if not args.do_eval or not run.splits.get("eval"):
        raise ValueError("--hpo_trials > 0 scores each trial on the validation split: it needs --do_eval")
    adapter = run.setup.method
    method = get_method(adapter)
    if "iw_alpha" in space and not method.uses_iw:
        raise ValueError(
            f"{source}: 'iw_alpha' is searched but --adapter {adapter} has no LoRA factors to weight; pass an "
            "--hpo_space without iw_alpha"
        )
    problem = method.search_problem(run.setup)
    if problem:
        raise ValueError(f"--hpo_trials with --adapter {adapter} is not supported: {problem}")
    metric = objective_metric(run.data_args.task_name, run.data.is_regression)
    if metric == "eval_mse" and hpo_args.hpo_direction != "minimize":
        raise ValueError(
            "regression data without --task_name: the objective is eval_mse; pass --hpo_direction minimize"
        )
    if args.do_predict:
        logger.warning("--hpo_trials: --do_predict is ignored (the search writes hpo_results.json only)")
    if hpo_args.hpo_storage is not None:
        study_name = hpo_args.hpo_study_name or Path(args.output_dir).resolve().name or DEFAULT_STUDY_NAME
        open_study(hpo_args.hpo_storage, study_name, hpo_args.hpo_direction)  # a bad URL fails before training


def run_glue_search(run: Run, hpo_args: HpoArguments, space: Mapping[str, Any]) -> Any:
    """The ``--hpo_trials`` branch of ``run_glue_iw.py``: a ``GlueTrainer`` with ``model_init`` and :func:`run_search`.

    The tokenized datasets are built once; ``model_init`` reloads the checkpoint and rebuilds the adapter (the model
    built while validating the input serves the trainer's construction, then is dropped).
    """

    args, data_args = run.training_args, run.data_args
    pending = [run.setup.model]
    run.setup.model = None

    def model_init() -> Any:
        if pending:
            return pending.pop()  # not trained yet: as fresh as a reloaded one
        _, model, missing = load_model_and_tokenizer(run.model_args, run.data, data_args.task_name)
        label_mapping(model, run.data, data_args)
        return build_adapter(model, run.adapter_args, args, missing, run.setup.options).model

    collator = data_collator_for(run.tokenizer, data_args, args)
    trainer = GlueTrainer(
        model_init=model_init,
        args=args,
        train_dataset=run.splits["train"][0][1],
        eval_dataset=run.splits["eval"][0][1],
        compute_metrics=make_compute_metrics(data_args.task_name, run.data.is_regression),
        processing_class=run.tokenizer,
        data_collator=collator,
        regularizers=run.setup.regularizers,
    )
    kwargs: dict[str, Any] = {}
    if hpo_args.hpo_backend == "optuna" and hpo_args.hpo_storage is None:
        import optuna

        kwargs["sampler"] = optuna.samplers.TPESampler(seed=args.seed)  # a single worker's search is reproducible
    metric = objective_metric(data_args.task_name, run.data.is_regression)
    logger.info(
        "hyperparameter search: %d trials (%s), %s %s over %s",
        hpo_args.hpo_trials,
        hpo_args.hpo_backend,
        hpo_args.hpo_direction,
        metric,
        json.dumps(dict(space)),
    )
    best = run_search(
        trainer,
        n_trials=hpo_args.hpo_trials,
        backend=hpo_args.hpo_backend,
        space=space,
        storage=hpo_args.hpo_storage,
        study_name=hpo_args.hpo_study_name,
        direction=hpo_args.hpo_direction,
        output_dir=args.output_dir,
        compute_objective=metric_objective(metric),
        **kwargs,
    )
    if best is not None and trainer.is_world_process_zero():
        logger.info(
            "best hyperparameters in %s; train with them: python run_glue_iw.py <same config> %s",
            os.path.join(args.output_dir, BEST_FILE),
            as_flags({k: v for k, v in best.hyperparameters.items() if k in space}),
        )
    return best
