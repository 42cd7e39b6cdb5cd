"""GLUE benchmark metric, usable offline through ``evaluate.load(<path to this file>, config_name=task)``.

Output keys match the Hugging Face hub ``glue`` metric:

- ``cola``: ``matthews_correlation``
- ``mrpc``, ``qqp``: ``accuracy`` and ``f1`` (F1 of the positive class 1)
- ``stsb``: ``pearson`` and ``spearmanr``
- ``sst2``, ``mnli``, ``mnli_matched``, ``mnli_mismatched``, ``qnli``, ``rte``, ``wnli``, ``hans``: ``accuracy``

This file is self-contained (no relative imports) because ``evaluate`` copies it into its module cache.
"""

import datasets
import evaluate
import numpy as np
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import f1_score, matthews_corrcoef

_CITATION = """\
@inproceedings{wang2019glue,
  title={{GLUE}: A Multi-Task Benchmark and Analysis Platform for Natural Language Understanding},
  author={Wang, Alex and Singh, Amanpreet and Michael, Julian and Hill, Felix and Levy, Omer and Bowman, Samuel R.},
  booktitle={International Conference on Learning Representations},
  year={2019}
}
"""

_DESCRIPTION = """\
Metrics of the GLUE benchmark (https://gluebenchmark.com/): Matthews correlation for CoLA, accuracy and F1 for
MRPC and QQP, Pearson and Spearman correlation for STS-B, and accuracy for the other tasks.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions: predicted labels (class indices), or predicted scores for ``stsb``.
    references: gold labels (class indices), or gold scores for ``stsb``.
Returns: a dict with, depending on the config:
    "accuracy": fraction of predictions equal to the reference;
    "f1": F1 score of the positive class (1);
    "pearson": Pearson correlation;
    "spearmanr": Spearman rank correlation;
    "matthews_correlation": Matthews correlation coefficient.
Examples:
    >>> glue_metric = evaluate.load("path/to/metrics/glue", config_name="mrpc")
    >>> glue_metric.compute(predictions=[0, 1, 1, 0], references=[0, 1, 0, 0])
    {'accuracy': 0.75, 'f1': 0.6666666666666666}
"""

ACCURACY_TASKS = ("sst2", "mnli", "mnli_matched", "mnli_mismatched", "qnli", "rte", "wnli", "hans")
ACCURACY_F1_TASKS = ("mrpc", "qqp")
CONFIG_NAMES = ("cola", "stsb") + ACCURACY_F1_TASKS + ACCURACY_TASKS


def _accuracy(predictions: np.ndarray, references: np.ndarray) -> float:
    return float(np.mean(predictions == references))


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Glue(evaluate.Metric):
    """GLUE metric; the config name selects the task."""

    def _info(self) -> evaluate.MetricInfo:
        if self.config_name not in CONFIG_NAMES:
            raise KeyError(
                f"Unknown GLUE metric config_name {self.config_name!r}; expected one of {list(CONFIG_NAMES)}"
            )
        value_type = "float32" if self.config_name == "stsb" else "int64"
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value(value_type), "references": datasets.Value(value_type)}
            ),
            codebase_urls=[],
            reference_urls=["https://gluebenchmark.com/"],
            format="numpy",
        )

    def _compute(self, predictions, references) -> dict[str, float]:
        preds = np.asarray(predictions)
        refs = np.asarray(references)
        if self.config_name == "cola":
            return {"matthews_correlation": float(matthews_corrcoef(refs, preds))}
        if self.config_name == "stsb":
            preds = preds.astype(np.float64)
            refs = refs.astype(np.float64)
            return {
                "pearson": float(pearsonr(preds, refs)[0]),
                "spearmanr": float(spearmanr(preds, refs)[0]),
            }
        if self.config_name in ACCURACY_F1_TASKS:
            return {"accuracy": _accuracy(preds, refs), "f1": float(f1_score(y_true=refs, y_pred=preds))}
        return {"accuracy": _accuracy(preds, refs)}
