"""Host reads of device values during compiled training steps: iwtrainer adds none.

On a GPU every read of a tensor's value on the host (``bool(t)``, ``t.item()``, ``t.tolist()``, ``t.cpu()``…) waits
for all queued work: the host cannot run ahead, so its per-step work (optimizer launches, collation, callbacks) adds
to the GPU's instead of overlapping it. A compiled step is short (9–22 ms on all-mpnet-base-v2), so each such wait
costs a visible fraction of it. These tests count the reads of a compiled Trainer step on CPU (the same Python path)
between logging steps: with transformers' ``logging_nan_inf_filter`` off, an IW-LoRA step reads nothing, as a LoRA
step; with it on (the Trainer's default) the reads are the Trainer's own (it checks each step's loss for NaN/inf on
the host), which is why the README's compiled recipe turns the filter off. (The batch copy to the GPU is the other
per-step wait, ``non_blocking=False`` in accelerate's dataloader: no copy happens on CPU, so it is not seen here.)
"""

from __future__ import annotations

import traceback

import pytest
import torch
from tiny import RandomClassification, tiny_args, tiny_lora
from transformers import TrainerCallback

from iwtrainer import IWTrainer, IWTrainingArguments

READS = ("__bool__", "item", "tolist", "__float__", "__int__", "cpu", "numpy")
PROBED_STEPS = range(3, 8)  # after calibration and the first compile, before any logging step


class _Probe(TrainerCallback):
    """Turns the read probe on for the optimizer steps in ``PROBED_STEPS``."""

    def __init__(self, state: dict) -> None:
        self.state = state

    def on_step_begin(self, args, state, control, **kwargs):
        self.state["on"] = state.global_step in PROBED_STEPS

    def on_step_end(self, args, state, control, **kwargs):
        self.state["on"] = state.global_step + 1 in PROBED_STEPS


def _reads_in_steps(tmp_path, monkeypatch, alpha: float, nan_filter: bool) -> list[tuple[str, str]]:
    """(method, the first caller frame outside torch) of every host read during ``PROBED_STEPS``."""
    probe = {"on": False}
    reads: list[tuple[str, str]] = []

    def wrap(name: str):
        original = getattr(torch.Tensor, name)

        def read(self, *args, **kwargs):
            if probe["on"]:
                frames = [f for f in traceback.extract_stack()[:-1] if "/torch/" not in f.filename]
                reads.append((name, f"{frames[-1].filename}:{frames[-1].lineno}"))
            return original(self, *args, **kwargs)

        return read

    model = tiny_lora("bert")
    model.base_model.model.config.problem_type = "single_label_classification"  # no recompile at step 2
    args = tiny_args(
        tmp_path, IWTrainingArguments, per_device_train_batch_size=8, max_steps=10, logging_steps=100,
        iw_alpha=alpha, iw_calib_steps=2, logging_nan_inf_filter=nan_filter, torch_compile=True,
        torch_compile_backend="aot_eager",
    )  # fmt: skip
    trainer = IWTrainer(model=model, args=args, train_dataset=RandomClassification(128), callbacks=[_Probe(probe)])
    for name in READS:
        monkeypatch.setattr(torch.Tensor, name, wrap(name))
    trainer.train()
    return reads


@pytest.mark.parametrize("alpha", [0.0, 1e-2], ids=["lora", "iw_lora"])
def test_recipe_step_reads_nothing_from_the_device(tmp_path, monkeypatch, alpha):
    """Filter off: no host read in 5 compiled steps, the penalty's included (its logs accumulate on the device)."""
    assert _reads_in_steps(tmp_path, monkeypatch, alpha, nan_filter=False) == []


def test_the_default_nan_filter_reads_the_loss_every_step(tmp_path, monkeypatch):
    """Filter on (the Trainer's default): reads in every probed step, all of them the Trainer's own loss check."""
    reads = _reads_in_steps(tmp_path, monkeypatch, 1e-2, nan_filter=True)
    assert len(reads) >= len(PROBED_STEPS)
    assert {where.split(":")[0].rsplit("/", 2)[-2:] == ["transformers", "trainer.py"] for _, where in reads} == {True}
