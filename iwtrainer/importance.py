"""Importance weights ``w_k`` and penalty coefficients ``(1 − w_k)^β`` from sensitivities, and their JSON file.

sum:      w_k = s_k / Σ_j s_j      (the source's definition; with K targets every w_k ≈ 1/K)
max:      w_k = s_k / max_j s_j    (the most sensitive matrix gets coefficient 0)
uniform:  w_k = 0                  (every coefficient 1: a plain L2 on the updates, "ΔL2" — the ablation that tells
                                    importance weighting apart from the penalty itself; needs no sensitivities)
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from typing import Any

from .files import write_json
from .settings import NORMALIZATIONS

IMPORTANCE_FILE = "iw_importance.json"


def importance_weights(sensitivities: Mapping[str, float | None], normalize: str = "sum") -> dict[str, float]:
    """``w_k`` for every matrix; raises ``ValueError`` on an unknown ``normalize`` or degenerate sensitivities.

    ``uniform`` reads only the keys (its sensitivities may be ``None``: nothing was measured).
    """
    if normalize not in NORMALIZATIONS:
        raise ValueError(f"iw_normalize must be one of {NORMALIZATIONS}, got {normalize!r}")
    if not sensitivities:
        raise ValueError("sensitivities: empty; calibration measured no LoRA target")
    if normalize == "uniform":
        return dict.fromkeys(sensitivities, 0.0)
    bad = {k: v for k, v in sensitivities.items() if not math.isfinite(v) or v < 0}
    if bad:
        name, value = next(iter(bad.items()))
        raise ValueError(
            f"sensitivities: {len(bad)} non-finite or negative value(s), e.g. {name}={value}; check the loss "
            "during calibration (fp16 overflow, NaN inputs)"
        )
    denom = sum(sensitivities.values()) if normalize == "sum" else max(sensitivities.values())
    if denom <= 0:
        raise ValueError(
            "sensitivities: all zero; the task loss has no gradient w.r.t. the target matrices "
            "(are labels present in the batches, and do the targets feed the loss?)"
        )
    return {k: v / denom for k, v in sensitivities.items()}


def penalty_coefficients(weights: Mapping[str, float], beta: float = 1.0) -> dict[str, float]:
    """``c_k = (1 − w_k)^β`` (clamped at 0 so float round-off cannot make it negative or complex)."""
    return {k: max(0.0, 1.0 - w) ** beta for k, w in weights.items()}


def importance_record(
    sensitivities: Mapping[str, float | None], normalize: str, beta: float, settings: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """The content of ``iw_importance.json``: per-module numbers plus the run's IW settings (``sensitivity`` is
    ``null`` where nothing was measured: ``uniform``)."""
    weights = importance_weights(sensitivities, normalize)
    coefs = penalty_coefficients(weights, beta)
    return {
        "settings": {"iw_normalize": normalize, "iw_beta": beta, **(settings or {})},
        "modules": {
            k: {"sensitivity": _float_or_none(sensitivities[k]), "weight": weights[k], "coefficient": coefs[k]}
            for k in sensitivities
        },
    }


def _float_or_none(value: float | None) -> float | None:
    return None if value is None else float(value)


def save_importance(record: Mapping[str, Any], directory: str) -> str:
    """Write ``directory/iw_importance.json`` atomically (a crash never leaves half a file)."""
    return write_json(os.path.join(directory, IMPORTANCE_FILE), record)


def load_importance(directory_or_file: str) -> dict[str, Any]:
    path = directory_or_file
    if os.path.isdir(path):
        path = os.path.join(path, IMPORTANCE_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no {IMPORTANCE_FILE} (expected one written by iwtrainer's calibration)")
    with open(path) as f:
        record = json.load(f)
    if "modules" not in record or not isinstance(record["modules"], dict):
        raise ValueError(f"{path}: not an iwtrainer importance file (no 'modules' mapping)")
    return record
