"""``torch_compile=True``: compiled training equals eager training for LoRA, IW-LoRA, ΔL2, online calibration and
stacked calibration (``iw_calib_group``), and nothing of iwtrainer breaks the graph or recompiles it.

Backend: ``aot_eager`` by default (``IWTRAINER_COMPILE_BACKEND=inductor`` runs the same tests through inductor, which
needs a C++ compiler on CPU and takes minutes). ``aot_eager`` is the whole capture the Trainer's compile does —
dynamo tracing with its guards and graph breaks, AOTAutograd's joint forward/backward graph — with eager kernels in
place of inductor's generated code, so the tests take seconds.

Tolerance: with ``aot_eager`` the compiled graph runs the same ATen kernels on the same fp32 tensors, so losses and
weights come out bitwise equal (observed); the tests allow 1e-6 relative on the losses, a few fp32 ulps accumulated
over 4 steps, and 1e-7 on the weights, in case a decomposition reorders a sum. Inductor fuses kernels and reorders fp32
reductions: on CPU the per-step losses differed by up to 6e-8 (1e-7 relative), allowed 1e-5 relative; the weights by
up to 5.3e-6, because Adam scales every update to about lr = 1e-2 whatever the gradient's size, so an element whose
gradient is mostly rounding noise moves by a visible fraction of lr when that noise changes: allowed 1e-4 (1 % of
one step). Sensitivities are compared exactly: calibration runs eagerly on the unwrapped model whatever the backend.

Transformers' sequence classifiers set ``config.problem_type`` in their first forward; dynamo guards on it and
recompiles once at step 2 for any trainer. The tests set it beforehand so that every remaining recompile would be
iwtrainer's: a compiled run then compiles exactly once (one frame, one graph, no graph break).
"""

from __future__ import annotations

import os

import pytest
import torch
from helpers import assert_one_line
from tiny import RandomClassification, batches, lora_state, tiny_args, tiny_lora
from torch._dynamo.utils import counters

from iwtrainer import IWTrainer, IWTrainingArguments, compute_sensitivities

BACKEND = os.environ.get("IWTRAINER_COMPILE_BACKEND", "aot_eager")
LOSS_RTOL, WEIGHT_ATOL = (1e-6, 1e-7) if BACKEND == "aot_eager" else (1e-5, 1e-4)
CASES = {
    "lora": {"iw_alpha": 0.0},
    "iw_lora": {"iw_alpha": 1e-2, "gradient_accumulation_steps": 2},  # the penalty after the last micro-batch
    "delta_l2": {"iw_alpha": 1e-2, "iw_normalize": "uniform"},
    "online": {"iw_alpha": 1e-2, "iw_calibration": "online"},  # steps 1-2 measure (eager), 3-4 compiled
    "calib_group": {"iw_alpha": 1e-2, "iw_calib_group": 2},  # the compiled recipe's config: both batches in one pass
}


def train(tmp_path, compiled: bool, **kw) -> tuple[IWTrainer, dict[str, int]]:
    """4 steps of a tiny BERT (B ≠ 0: the penalty acts from step 1); the dynamo counters of this run."""
    torch._dynamo.reset()
    counters.clear()
    model = tiny_lora("bert", init_lora_weights=False)
    model.config.problem_type = "single_label_classification"  # what the first forward would set (see above)
    compile_args = {"torch_compile": True, "torch_compile_backend": BACKEND} if compiled else {}
    args = tiny_args(
        tmp_path / ("compiled" if compiled else "eager"), IWTrainingArguments, max_steps=4,
        per_device_train_batch_size=8, learning_rate=1e-2, logging_steps=1, iw_calib_steps=2,
        **compile_args, **kw,
    )  # fmt: skip
    trainer = IWTrainer(model=model, args=args, train_dataset=RandomClassification(64))
    trainer.train()
    wrapped = type(trainer.model_wrapped).__name__
    assert (wrapped == "OptimizedModule") == compiled, wrapped  # accelerate's shared state holds the last plugin
    stats = {
        "frames": counters["frames"]["total"],
        "graphs": counters["stats"]["unique_graphs"],
        "graph_breaks": sum(counters["graph_break"].values()),
    }
    return trainer, stats


def step_logs(trainer: IWTrainer) -> list[dict[str, float]]:
    keys = ("loss", "loss_task", "iw_penalty")
    return [{k: h[k] for k in keys if k in h} for h in trainer.state.log_history if "loss" in h]


@pytest.mark.parametrize("case", list(CASES))
def test_compiled_training_equals_eager_and_compiles_once(tmp_path, case):
    eager, _ = train(tmp_path, compiled=False, **CASES[case])
    compiled, stats = train(tmp_path, compiled=True, **CASES[case])

    logs, compiled_logs = step_logs(eager), step_logs(compiled)
    assert len(logs) == 4 and [h.keys() for h in logs] == [h.keys() for h in compiled_logs]
    for step, (a, b) in enumerate(zip(logs, compiled_logs), 1):
        for key in a:
            assert b[key] == pytest.approx(a[key], rel=LOSS_RTOL, abs=1e-8), (step, key)
    if CASES[case]["iw_alpha"] > 0:
        assert logs[-1]["iw_penalty"] > 0  # the penalty is really in these losses
    state, compiled_state = lora_state(eager.model), lora_state(compiled.model)
    for name in state:
        torch.testing.assert_close(compiled_state[name], state[name], rtol=0, atol=WEIGHT_ATOL, msg=name)
    if CASES[case]["iw_alpha"] > 0:  # the same importance record: measured eagerly in both runs
        assert compiled.iw_callback.record["modules"] == eager.iw_callback.record["modules"]
        settings = compiled.iw_callback.record["settings"]
        assert settings["iw_calib_group"] == CASES[case].get("iw_calib_group", 1)
    # One compile at the first compiled step and nothing after it: no graph break, no recompile (IW's penalty
    # gradient, loss terms and logs run outside the graph; online calibration's hooked steps run eagerly).
    assert stats == {"frames": 1, "graphs": 1, "graph_breaks": 0}


def test_calibration_of_a_model_compiled_in_place_is_exact():
    """``module.compile()`` keeps no wrapper to strip: the hooked forward must still run eagerly (under a compiled
    graph autograd.grad gets no gradient for the hooked outputs, and every sensitivity was a silent 0)."""
    data = batches(RandomClassification(32), 8)
    expected = compute_sensitivities(tiny_lora("bert"), data, num_steps=4, show_progress=False)
    torch._dynamo.reset()
    model = tiny_lora("bert")
    model.compile(backend=BACKEND)
    got = compute_sensitivities(model, data, num_steps=4, show_progress=False)
    assert got == expected and min(got.values()) > 0


def test_torch_without_set_stance_refuses_a_compiled_model_in_one_line(monkeypatch):
    monkeypatch.delattr(torch.compiler, "set_stance")  # torch < 2.6
    data = batches(RandomClassification(16), 8)
    assert compute_sensitivities(tiny_lora("bert"), data, num_steps=2, show_progress=False)  # eager: unaffected
    model = tiny_lora("bert")
    model.compile(backend=BACKEND)
    with pytest.raises(RuntimeError) as exc:
        compute_sensitivities(model, data, num_steps=2, show_progress=False)
    assert_one_line(exc, "torch >= 2.6", "iw_calibration='separate'", "torch_compile=True")
