"""What an IW-LoRA step dispatches beyond a LoRA step, on the GPU path (the penalty gradient one CUDA-graph replay).

A compiled step on all-mpnet-base-v2 is host-bound (benchmarks/results/profile_iw_vs_lora.md): every op IW-LoRA
dispatches per step costs its host time in full, and paired timing puts the sum at ≈ 2 % of the step
(compile_step_pairs_ci.md). This pins that budget on CPU, where ops can be counted exactly: a Trainer step of each
method, the penalty's graph replaced by its cached outputs (what ``_replay`` returns on CUDA), ops counted by a
dispatch mode over five steps between logging steps. IW-LoRA's own: the two logged terms' accumulators, their
detaches, ``loss + α·P`` and one foreach accumulation of the gradient — 7 ops; a regression (say, recomputing the
factor list or the model unwrap per step) shows as more.
"""

from __future__ import annotations

from collections import Counter

from helpers import DispatchedOps
from tiny import RandomClassification, tiny_args, tiny_lora
from transformers import TrainerCallback

from iwtrainer import IWTrainer, IWTrainingArguments
from iwtrainer.penalty import IWPenalty, _flat_views

STEPS = range(3, 8)  # after calibration, before any logging step


class _Probe(TrainerCallback):
    def __init__(self, probe: dict):
        self.probe = probe

    def on_step_begin(self, args, state, control, **kwargs):
        self.probe["on"] = state.global_step in STEPS

    def on_step_end(self, args, state, control, **kwargs):
        self.probe["on"] = False


def _ops_per_step(tmp_path, monkeypatch, alpha: float) -> Counter:
    replayed: dict[int, tuple] = {}

    def replay(self, scale):  # the graph's outputs, computed once: a replay dispatches nothing
        if id(self) not in replayed:
            value, grads = self._grad_math(scale, blas=self.graph_blas)
            replayed[id(self)] = (value, _flat_views(grads))
        return replayed[id(self)]

    monkeypatch.setattr(IWPenalty, "_graphed", lambda self, scale: True)
    monkeypatch.setattr(IWPenalty, "_replay", replay)
    probe = {"on": False}
    args = tiny_args(tmp_path, IWTrainingArguments, per_device_train_batch_size=8, max_steps=10, logging_steps=100,
                     iw_alpha=alpha, iw_calib_steps=2, logging_nan_inf_filter=False)  # fmt: skip
    trainer = IWTrainer(model=tiny_lora("bert"), args=args, train_dataset=RandomClassification(128),
                        callbacks=[_Probe(probe)])  # fmt: skip
    with DispatchedOps(probe) as ops:
        trainer.train()
    return Counter({op: n // len(STEPS) for op, n in Counter(ops.names).items()})


def test_iw_step_adds_seven_ops_to_a_lora_step(tmp_path, monkeypatch):
    lora = _ops_per_step(tmp_path / "lora", monkeypatch, 0.0)
    iw = _ops_per_step(tmp_path / "iw", monkeypatch, 1e-2)
    assert sum(lora.values()) > 300  # the counter saw the steps (forward, backward, optimizer)
    added = iw - lora
    assert lora - iw == Counter()  # IW-LoRA leaves out nothing LoRA does
    assert added == Counter({"detach": 2, "add_": 2, "_foreach_add_": 1, "mul": 1, "add": 1}), added
