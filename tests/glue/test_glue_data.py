"""run_glue_iw.py's data helpers (iwtrainer.glue.data): label ids, the collator and the metrics function."""

from __future__ import annotations

import numpy as np
import pytest
from tiny import tiny_base, tiny_tokenizer
from transformers import DataCollatorWithPadding, EvalPrediction, default_data_collator

from iwtrainer import IWTrainingArguments
from iwtrainer.glue.arguments import DataTrainingArguments
from iwtrainer.glue.data import TaskData, data_collator_for, label_mapping, make_compute_metrics
from iwtrainer.glue.tasks import compute_glue_metrics


def test_checkpoint_label_order_is_kept():
    model = tiny_base("bert", num_labels=3)
    model.config.label2id = {"CONTRADICTION": 0, "NEUTRAL": 1, "ENTAILMENT": 2}  # e.g. an MNLI checkpoint
    data = TaskData(None, False, ["entailment", "neutral", "contradiction"], ("premise", "hypothesis"), "test")
    mapping = label_mapping(model, data, DataTrainingArguments(task_name="mnli", glue_dir=None))
    assert mapping == {0: 2, 1: 1, 2: 0}
    assert model.config.id2label == {2: "entailment", 1: "neutral", 0: "contradiction"}


def test_fresh_head_takes_the_dataset_labels_and_custom_files_map_their_values():
    model = tiny_base("bert", num_labels=2)  # default label2id: LABEL_0, LABEL_1
    data = TaskData(None, False, ["entailment", "not_entailment"], ("sentence1", "sentence2"), "test")
    assert label_mapping(model, data, DataTrainingArguments(task_name="rte", glue_dir=None)) is None
    assert model.config.label2id == {"entailment": 0, "not_entailment": 1}
    custom = TaskData(None, False, ["neg", "pos"], ("sentence", None), "--train_file")
    args = DataTrainingArguments(train_file="t.csv", validation_file="v.csv")
    assert label_mapping(tiny_base("bert"), custom, args) == {"neg": 0, "pos": 1}
    regression = TaskData(None, True, None, ("sentence1", "sentence2"), "test")
    assert label_mapping(tiny_base("bert", num_labels=1), regression, args) is None


def test_collator_pads_to_max_length_or_dynamically(tmp_path):
    args = IWTrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    assert data_collator_for(None, DataTrainingArguments(task_name="rte"), args) is default_data_collator
    dynamic = data_collator_for(object(), DataTrainingArguments(task_name="rte", pad_to_max_length=False), args)
    assert isinstance(dynamic, DataCollatorWithPadding) and dynamic.pad_to_multiple_of is None


def test_collator_pads_to_a_multiple_so_compiled_models_see_few_shapes(tmp_path):
    args = IWTrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    data = DataTrainingArguments(task_name="rte", pad_to_max_length=False, pad_to_multiple_of=16, max_seq_length=64)
    collate = data_collator_for(tiny_tokenizer(), data, args)
    widths = [collate([{"input_ids": [4] * n, "label": 0}, {"input_ids": [5] * 3, "label": 1}])["input_ids"].shape[1]
              for n in (1, 15, 16, 17, 40, 64)]  # fmt: skip
    assert widths == [16, 16, 16, 32, 48, 64]


def test_compute_metrics_uses_the_glue_metric_or_accuracy_and_mse():
    logits = np.array([[2.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 3.0]])
    labels = np.array([0, 1, 1, 1])
    assert make_compute_metrics("mrpc", False)(EvalPrediction(logits, labels)) == compute_glue_metrics(
        "mrpc", logits, labels
    )
    assert make_compute_metrics("rte", False)(EvalPrediction((logits, None), labels)) == {"accuracy": 0.75}
    assert make_compute_metrics(None, False)(EvalPrediction(logits, labels)) == {"accuracy": 0.75}
    scores = np.array([[1.0], [2.0], [4.0]])
    mse = make_compute_metrics(None, True)(EvalPrediction(scores, np.array([1.0, 3.0, 4.0])))
    assert mse == {"mse": pytest.approx(1 / 3)}
