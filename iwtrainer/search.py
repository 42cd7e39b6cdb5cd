"""Hyperparameter search through the Trainer's own API (``model_init`` + ``Trainer.hyperparameter_search``).

The search space is a small YAML file (``configs/hpo_space.yaml`` is the source documents' space, also shipped as
:data:`DEFAULT_SPACE`)::

    learning_rate: {type: loguniform, low: 1.0e-5, high: 5.0e-4}
    per_device_train_batch_size: {type: categorical, choices: [16, 32, 64]}
    iw_alpha: {type: loguniform, low: 1.0e-5, high: 1.0e-3}

Every key is a field of :class:`~iwtrainer.IWTrainingArguments`; the Trainer sets the sampled values on ``args`` at
the start of each trial. :func:`run_search` runs the search on a trainer built with ``model_init`` and writes
``hpo_results.json`` (every trial) and ``best_hyperparameters.json`` (flag -> value) into the output directory.
Each trial trains a fresh model and calibrates the IW importance on it; its files (``iw_importance.json``,
checkpoints) go to ``<output_dir>/run-<trial number>/``, never to the top level.

With optuna, ``storage`` (``sqlite:///path.db`` or any SQLAlchemy URL) lets several workers on several machines
share one study: each runs its own ``n_trials`` and the results files list the whole study.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import logging
import math
import os
import re
import socket
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from .errors import one_line
from .files import write_json
from .training_args import IWTrainingArguments

logger = logging.getLogger(__name__)

BACKENDS = ("optuna", "ray")
DIRECTIONS = ("maximize", "minimize")
PARAM_TYPES = ("loguniform", "uniform", "int", "categorical")
RESULTS_FILE = "hpo_results.json"
BEST_FILE = "best_hyperparameters.json"
RAY_EXTRA = "pip install 'iwtrainer[ray]'"
DEFAULT_STUDY_NAME = "iwtrainer-hpo"

DEFAULT_SPACE: dict[str, dict[str, Any]] = {
    "learning_rate": {"type": "loguniform", "low": 1e-5, "high": 5e-4},
    "per_device_train_batch_size": {"type": "categorical", "choices": [16, 32, 64]},
    "iw_alpha": {"type": "loguniform", "low": 1e-5, "high": 1e-3},
}
"""The source documents' space (SPEC.md §4), identical to ``configs/hpo_space.yaml``."""

# The metric keys a classification/regression evaluation reports first, in the order GLUE's tasks use them.
_GLUE_KEYS = ("eval_combined_score", "eval_matthews_correlation", "eval_accuracy")


class BackendNotInstalled(ImportError):
    """The requested search backend is not installed (a user error: the message names the pip extra)."""


# ---- search space ------------------------------------------------------------------------------------------------
def _training_fields() -> set[str]:
    return {f.name for f in dataclasses.fields(IWTrainingArguments) if f.init}


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_space(space: Mapping[str, Any], source: str = "search space") -> dict[str, dict[str, Any]]:
    """Validate ``space`` (field -> ``{type, ...}``), return a normalised copy; ``ValueError`` names source + key."""
    if not isinstance(space, Mapping) or not space:
        raise ValueError(
            f"{source}: expected a non-empty mapping of TrainingArguments field -> {{type: ..., ...}}, got "
            f"{type(space).__name__ if space is not None else 'nothing'}"
        )
    known = _training_fields()
    out: dict[str, dict[str, Any]] = {}
    for name, spec in space.items():
        where = f"{source}: {name!r}"
        if name not in known:
            close = difflib.get_close_matches(str(name), known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(
                f"{where} is not a field of IWTrainingArguments{hint}; the Trainer sets trial values on args"
            )
        if not isinstance(spec, Mapping) or "type" not in spec:
            raise ValueError(f"{where}: expected a mapping with 'type' (one of {list(PARAM_TYPES)}), got {spec!r}")
        kind = spec["type"]
        if kind not in PARAM_TYPES:
            raise ValueError(f"{where}: unknown type {kind!r}; expected one of {list(PARAM_TYPES)}")
        allowed = {"type", "choices"} if kind == "categorical" else {"type", "low", "high"}
        if kind == "int":
            allowed |= {"step", "log"}
        extra = sorted(set(spec) - allowed)
        if extra:
            raise ValueError(f"{where}: unexpected key(s) {extra} for type {kind}; allowed: {sorted(allowed)}")
        if kind == "categorical":
            choices = spec.get("choices")
            if not isinstance(choices, list) or not choices:
                raise ValueError(f"{where}: categorical needs a non-empty list 'choices', got {choices!r}")
            bad = [c for c in choices if c is not None and not isinstance(c, (bool, int, float, str))]
            if bad:
                raise ValueError(f"{where}: choices must be numbers, strings, booleans or null, got {bad[0]!r}")
            out[name] = {"type": kind, "choices": list(choices)}
            continue
        for key in ("low", "high"):
            if key not in spec:
                raise ValueError(f"{where}: type {kind} needs '{key}'")
            if not _is_number(spec[key]) or (kind == "int" and not isinstance(spec[key], int)):
                need = "an integer" if kind == "int" else "a finite number"
                raise ValueError(f"{where}: '{key}' must be {need}, got {spec[key]!r}")
        low, high = spec["low"], spec["high"]
        if kind == "int" and low > high or kind != "int" and not low < high:
            raise ValueError(f"{where}: needs low {'<=' if kind == 'int' else '<'} high, got low={low} high={high}")
        entry: dict[str, Any] = {"type": kind, "low": low, "high": high}
        if kind == "int":
            step, log = spec.get("step", 1), spec.get("log", False)
            if isinstance(step, bool) or not isinstance(step, int) or step < 1:
                raise ValueError(f"{where}: 'step' must be an integer >= 1, got {step!r}")
            if not isinstance(log, bool):
                raise ValueError(f"{where}: 'log' must be true or false, got {log!r}")
            if log and (step != 1 or low < 1):
                raise ValueError(f"{where}: log: true needs low >= 1 and step 1")
            entry.update(step=step, log=log)
        elif kind == "loguniform" and low <= 0:
            raise ValueError(f"{where}: loguniform needs low > 0, got {low}")
        out[name] = entry
    return out


def load_search_space(path: str | os.PathLike[str]) -> dict[str, dict[str, Any]]:
    """Read and validate a YAML/JSON search space file; ``ValueError`` naming the file (and the key) otherwise."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise ValueError(
            f"search space file {str(p)!r} does not exist; expected a YAML file like configs/hpo_space.yaml"
        )
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))  # JSON is YAML
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise ValueError(f"{p}: cannot be parsed: {' '.join(str(exc).split())}") from exc
    return check_space(data, str(p))


def optuna_hp_space(space: Mapping[str, Any]) -> Callable[[Any], dict[str, Any]]:
    """``hp_space`` for ``Trainer.hyperparameter_search(backend="optuna")``: ``trial -> {field: sampled value}``."""
    space = check_space(space)

    def hp_space(trial: Any) -> dict[str, Any]:
        params: dict[str, Any] = {}
        for name, spec in space.items():
            kind = spec["type"]
            if kind == "categorical":
                params[name] = trial.suggest_categorical(name, spec["choices"])
            elif kind == "int":
                params[name] = trial.suggest_int(name, spec["low"], spec["high"], step=spec["step"], log=spec["log"])
            else:
                params[name] = trial.suggest_float(name, spec["low"], spec["high"], log=kind == "loguniform")
        return params

    return hp_space


def require_backend(backend: str) -> None:
    """Raise :class:`BackendNotInstalled` (naming the pip extra) when ``backend`` cannot be imported."""
    if backend not in BACKENDS:
        raise ValueError(f"hpo backend must be one of {list(BACKENDS)}, got {backend!r}")
    try:
        if backend == "ray":
            import ray.tune  # noqa: F401
        else:
            import optuna  # noqa: F401
    except ImportError as exc:
        extra = RAY_EXTRA if backend == "ray" else "pip install 'iwtrainer[hpo]'"
        raise BackendNotInstalled(f"--hpo_backend {backend} needs {backend}, which is not installed: {extra}") from exc


def ray_hp_space(space: Mapping[str, Any]) -> Callable[[Any], dict[str, Any]]:
    """``hp_space`` for ``backend="ray"``: ``_ -> {field: ray.tune distribution}`` (ray imported lazily)."""
    space = check_space(space)
    require_backend("ray")

    def hp_space(trial: Any = None) -> dict[str, Any]:
        from ray import tune

        params: dict[str, Any] = {}
        for name, spec in space.items():
            kind = spec["type"]
            if kind == "categorical":
                params[name] = tune.choice(spec["choices"])
            elif kind == "int" and spec["step"] > 1:
                params[name] = tune.qrandint(spec["low"], spec["high"], spec["step"])  # upper bound inclusive
            elif kind == "int":
                sampler = tune.lograndint if spec["log"] else tune.randint
                params[name] = sampler(spec["low"], spec["high"] + 1)  # upper bound exclusive
            elif kind == "loguniform":
                params[name] = tune.loguniform(spec["low"], spec["high"])
            else:
                params[name] = tune.uniform(spec["low"], spec["high"])
        return params

    return hp_space


# ---- objective ---------------------------------------------------------------------------------------------------
def glue_objective(metrics: Mapping[str, float]) -> float:
    """The task's GLUE metric from ``Trainer.evaluate`` metrics (to maximise).

    ``eval_combined_score`` (MRPC, STS-B, QQP: mean of accuracy/F1 or Pearson/Spearman), else
    ``eval_matthews_correlation`` (CoLA), else ``eval_accuracy`` (MNLI matched, SST-2, RTE, QNLI, WNLI).
    """
    for key in _GLUE_KEYS:
        if key in metrics:
            return float(metrics[key])
    raise ValueError(
        f"no GLUE metric ({', '.join(_GLUE_KEYS)}) in the evaluation metrics {sorted(metrics)}; pass "
        "compute_metrics=make_compute_metrics(task) to the trainer, or a compute_objective of your own"
    )


def metric_objective(key: str) -> Callable[[Mapping[str, float]], float]:
    """``compute_objective`` reading one metric; a clear error when the evaluation did not produce it."""

    def objective(metrics: Mapping[str, float]) -> float:
        if key not in metrics:
            raise ValueError(
                f"the hyperparameter search objective {key!r} is not in the evaluation metrics {sorted(metrics)}"
            )
        return float(metrics[key])

    objective.__name__ = f"objective_{key}"
    return objective


# ---- the search --------------------------------------------------------------------------------------------------
def redact(url: str | None) -> str | None:
    """A storage URL without its password (it goes to files and logs)."""
    return None if url is None else re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", url)


def open_study(storage: Any, study_name: str, direction: str = "maximize") -> Any:
    """Create or load the optuna study; ``ValueError`` for an unusable storage or a study with another direction."""
    import optuna

    try:
        study = optuna.create_study(storage=storage, study_name=study_name, direction=direction, load_if_exists=True)
    except Exception as exc:  # sqlalchemy / optuna errors for a bad URL or an unreachable database
        where = redact(storage) if isinstance(storage, str) else type(storage).__name__
        raise ValueError(f"--hpo_storage {where!r}: cannot open study {study_name!r}: {one_line(exc)}") from exc
    if [d.name.lower() for d in study.directions] != [direction]:
        raise ValueError(
            f"optuna study {study_name!r} in {redact(storage) if isinstance(storage, str) else 'the storage'} "
            f"was created with direction(s) {[d.name.lower() for d in study.directions]}, not {direction!r}; pick "
            "another --hpo_study_name"
        )
    return study


def run_search(
    trainer: Any,
    n_trials: int = 30,
    backend: str = "optuna",
    space: Mapping[str, Any] | None = None,
    storage: str | Any | None = None,
    study_name: str | None = None,
    direction: str = "maximize",
    output_dir: str | os.PathLike[str] | None = None,
    compute_objective: Callable[[Mapping[str, float]], float] = glue_objective,
    **backend_kwargs: Any,
) -> Any:
    """Run ``trainer.hyperparameter_search`` over ``space`` (default :data:`DEFAULT_SPACE`) and write the results.

    ``trainer`` must be built with ``model_init`` (a fresh model per trial). Writes ``<output_dir>/hpo_results.json``
    (the best trial and every trial's params, objective and state; with optuna the whole study, read back from the
    storage, so workers sharing ``storage`` + ``study_name`` each list all trials) and ``best_hyperparameters.json``
    (field -> value), both atomically; if the search fails, they record what ran (and the error).
    ``output_dir`` defaults to ``trainer.args.output_dir`` and ``study_name`` to its folder name. Further keyword
    arguments go to the backend (optuna: ``sampler``, ``pruner``, ``timeout``, ...; optuna's default MedianPruner
    stops trials whose intermediate evaluations lag when the trainer evaluates during training). Returns
    transformers' ``BestRun`` (``None`` on processes other than the main one).
    """
    if getattr(trainer, "model_init", None) is None:
        raise ValueError("run_search needs a trainer built with model_init=... (each trial trains a fresh model)")
    if isinstance(n_trials, bool) or not isinstance(n_trials, int) or n_trials < 1:
        raise ValueError(f"n_trials must be a positive integer, got {n_trials!r}")
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {list(DIRECTIONS)}, got {direction!r}")
    space = check_space(DEFAULT_SPACE if space is None else space)
    require_backend(backend)
    output_dir = os.fspath(output_dir if output_dir is not None else trainer.args.output_dir)
    kwargs = dict(backend_kwargs)
    study = None
    if backend == "optuna":
        import optuna

        if storage is None:
            storage = optuna.storages.InMemoryStorage()  # read back below: transformers returns only the best run
        if study_name is None:
            study_name = Path(output_dir).resolve().name or DEFAULT_STUDY_NAME
        study = open_study(storage, study_name, direction)
        kwargs.update(storage=storage, study_name=study_name, load_if_exists=True)
        hp_space = _tagging(optuna_hp_space(space), trainer)
    else:
        if storage is not None:
            raise ValueError("storage is an optuna storage; it needs backend='optuna'")
        hp_space = ray_hp_space(space)
    main = trainer.is_world_process_zero()
    best = None
    try:
        best = trainer.hyperparameter_search(
            hp_space=hp_space,
            compute_objective=compute_objective,
            n_trials=n_trials,
            direction=direction,
            backend=backend,
            **kwargs,
        )
    except BaseException as exc:
        if main and study is not None:
            with contextlib.suppress(Exception):
                write_results(output_dir, study_summary(storage, study.study_name, space, direction), error=exc)
        raise
    if not main or best is None:
        return best
    if study is not None:
        summary = study_summary(storage, study.study_name, space, direction)
    else:
        summary = _ray_summary(best, space, backend, direction)
    write_results(output_dir, summary)
    logger.info(
        "hyperparameter search: best trial %s, objective %s, %s; written to %s",
        summary["best"]["trial"] if summary["best"] else None,
        summary["best"]["objective"] if summary["best"] else None,
        summary["best_flags"],
        os.path.join(output_dir, RESULTS_FILE),
    )
    return best


def _tagging(hp_space: Callable[[Any], dict[str, Any]], trainer: Any) -> Callable[[Any], dict[str, Any]]:
    """Record on each optuna trial where its outputs are (a shared study spans machines)."""
    host = socket.gethostname()

    def tagged(trial: Any) -> dict[str, Any]:
        if getattr(trial, "number", None) is not None and hasattr(trial, "set_user_attr"):
            with contextlib.suppress(Exception):  # e.g. a FixedTrial on other ranks
                trial.set_user_attr("run_dir", os.path.abspath(trainer._get_output_dir(trial)))  # honours hp_name
                trial.set_user_attr("host", host)
        return hp_space(trial)

    return tagged


def as_flags(params: Mapping[str, Any]) -> str:
    """``{"learning_rate": 1e-4}`` -> ``"--learning_rate 0.0001"``: a search result as command-line flags."""
    return " ".join(f"--{k} {v}" for k, v in params.items())


def study_summary(storage: Any, study_name: str, space: Mapping[str, Any], direction: str = "maximize") -> dict:
    """The content of ``hpo_results.json`` for an optuna study, read back from ``storage`` (every worker's trials)."""
    import optuna

    study = optuna.load_study(study_name=study_name, storage=storage)
    trials = []
    for t in study.get_trials(deepcopy=False):
        trials.append(
            {
                "number": t.number,
                "state": t.state.name,
                "objective": t.value,
                "params": dict(t.params),
                "run_dir": t.user_attrs.get("run_dir"),
                "host": t.user_attrs.get("host"),
                "intermediate_values": {str(k): v for k, v in sorted(t.intermediate_values.items())},
                "datetime_start": t.datetime_start.isoformat() if t.datetime_start else None,
                "datetime_complete": t.datetime_complete.isoformat() if t.datetime_complete else None,
            }
        )
    complete = [t for t in trials if t["state"] == "COMPLETE"]
    best = None
    if complete:
        b = study.best_trial
        best = {
            "trial": b.number,
            "objective": b.value,
            "params": dict(b.params),
            "run_dir": b.user_attrs.get("run_dir"),
        }
    return {
        "backend": "optuna",
        "study_name": study.study_name,
        "storage": redact(storage) if isinstance(storage, str) else None,
        "direction": direction,
        "space": dict(space),
        "best": best,
        "best_flags": as_flags(best["params"]) if best else None,
        "n_trials": len(trials),
        "n_complete": len(complete),
        "trials": trials,
    }


def _ray_summary(best: Any, space: Mapping[str, Any], backend: str, direction: str) -> dict:
    analysis = getattr(best, "run_summary", None)
    trials = []
    for t in getattr(analysis, "trials", None) or []:
        result = getattr(t, "last_result", None) or {}
        trials.append(
            {
                "number": str(getattr(t, "trial_id", "")),
                "state": str(getattr(t, "status", "")),
                "objective": result.get("objective"),
                "params": {k: v for k, v in (getattr(t, "config", None) or {}).items() if k in space},
                "run_dir": str(getattr(t, "local_path", "") or "") or None,
            }
        )
    params = {k: v for k, v in dict(best.hyperparameters).items() if k in space}
    return {
        "backend": backend,
        "study_name": None,
        "storage": None,
        "direction": direction,
        "space": dict(space),
        "best": {"trial": best.run_id, "objective": best.objective, "params": params, "run_dir": None},
        "best_flags": as_flags(params),
        "n_trials": len(trials),
        "n_complete": sum(1 for t in trials if t["state"] == "TERMINATED"),
        "trials": trials,
    }


def write_results(output_dir: str, summary: Mapping[str, Any], error: BaseException | None = None) -> None:
    """``hpo_results.json`` (+ ``best_hyperparameters.json`` once a trial completed), each written atomically."""
    os.makedirs(output_dir, exist_ok=True)
    data = dict(summary)
    if error is not None:
        data["error"] = f"{type(error).__name__}: {one_line(error)}"
    write_json(os.path.join(output_dir, RESULTS_FILE), data)
    if data.get("best"):  # the best completed trial so far, also when a later trial failed
        write_json(os.path.join(output_dir, BEST_FILE), data["best"]["params"])
