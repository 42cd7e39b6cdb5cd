"""benchmarks/bench_step.py's DeBERTa-v3-base shapes in the eager vs compiled comparison: ``--deberta only`` with
``--model``, ``--sst2`` and ``--pad_to_multiple_of`` trains the DeBERTa architecture on the SST-2 batches' padded
shapes (no token_type_ids: DeBERTa-v3 has no token types), compiled as the Trainer compiles it, and reports its
compile time, steady ms/step and graph breaks. A 1-layer DeBERTa-v3 of the real vocabulary stands in for the base
size (whose CPU run takes minutes); ``aot_eager`` instead of inductor's C++ compile."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from helpers import GLUE, MODEL, needs_shared

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
import bench_step  # noqa: E402

BASE_CONFIG = bench_step.deberta_v3_base_config


def tiny_deberta_v3():
    """deberta_v3_base_config's architecture (relative attention, shared keys, p2c/c2p, no token types) at 1 layer
    of width 32; the vocabulary stays DeBERTa-v3's (128,100 ids: every MiniLM token id fits)."""
    config = BASE_CONFIG()
    config.update({"hidden_size": 32, "pooler_hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2})
    config.intermediate_size = 64
    return config


@needs_shared
def test_deberta_shapes_compile_on_sst2_batch_shapes(tmp_path, monkeypatch):
    monkeypatch.setattr(bench_step, "deberta_v3_base_config", tiny_deberta_v3)
    monkeypatch.setattr(bench_step.signal, "signal", lambda *a: None)  # main's SIGTERM handler stays out of pytest
    argv = ["--model", str(MODEL), "--sst2", str(GLUE / "SST-2"), "--deberta", "only", "--compile_only",
            "--compile", "none,default", "--compile_backend", "aot_eager", "--batch", "4", "--seq", "32",
            "--pad_to_multiple_of", "16", "--rounds", "1", "--steps", "1", "--compile_pairs", "2", "--block", "1",
            "--compile_methods", "iw_lora,lora", "--out", str(tmp_path), "--name", "deb",
            "--tmp", str(tmp_path / "tmp")]  # fmt: skip
    bench_step.main(argv)
    results = json.loads((tmp_path / "deb.json").read_text())
    assert results["complete"] and results["models"] == []  # only: no --model benchmark
    (r,) = results["compiled"]
    assert r["model"] == "DeBERTa-v3-base shapes (random init, SST-2 batch shapes)"
    assert r["shapes"] and all(b == 4 and s in (16, 32) for b, s in r["shapes"])  # padded to multiples of 16
    assert r["dynamo_while_timing"] == {"frames": 0, "graphs": 0, "graph_breaks": 0}
    assert list(r["methods"]) == ["lora", "iw_lora"]  # --compile_methods: ΔL2 left out, LoRA first whatever the order
    lora, iw = r["methods"]["lora"], r["methods"]["iw_lora"]
    assert lora["default"]["frames"] >= 1 and lora["default"]["graph_breaks"] == 0 and "compile_s" in lora["default"]
    assert iw["default"]["frames"] == 0  # IW-LoRA reuses LoRA's graphs
    assert all(e["ms_per_step"] > 0 for by_mode in r["methods"].values() for e in by_mode.values())
    assert "paired_vs_lora" in iw["default"]
    md = (tmp_path / "deb.md").read_text()
    assert "## DeBERTa-v3-base shapes (random init, SST-2 batch shapes): eager vs torch.compile (aot_eager)" in md


def test_deberta_flag_keeps_its_bare_form():
    """``--deberta`` alone still means "also" (the committed commands use it bare); ``only`` drops --model's run."""
    parse = bench_step.parser().parse_args
    assert parse(["--deberta"]).deberta == "also" and parse(["--deberta", "only"]).deberta == "only"
    assert parse([]).deberta is None


@pytest.mark.parametrize("methods", ["iw_lora", "lora,dora"])
def test_compile_methods_needs_lora_and_known_methods(methods, capsys):
    with pytest.raises(SystemExit) as exc:
        bench_step.main(["--compile_only", "--compile", "none", "--compile_methods", methods])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    known = "['lora', 'iw_lora', 'delta_l2', 'iw_lora_fused', 'iw_lora_matmul']"
    assert f"--compile_methods takes methods of {known} including lora" in err


def test_matmul_penalty_forces_the_graphs_matmul_form():
    """matmul_penalty (iw_lora_matmul): the trainer's penalty, same coefficients, with ``graph_blas`` on — the
    graph's form before the broadcast one, for side-by-side timing; these shapes' default is the broadcast form."""
    from tiny import tiny_lora

    from iwtrainer import find_lora_targets
    from iwtrainer.importance import importance_record

    model = tiny_lora("bert", init_lora_weights=False)
    trainer = bench_step._trainer(model, 1e-4, "/tmp/iw_bench_matmul")
    names = [t.name for t in find_lora_targets(model)]
    trainer.iw_callback.record = importance_record({n: float(i + 1) for i, n in enumerate(names)}, "sum", 1.0)
    assert not trainer._penalty(model).graph_blas
    bench_step.matmul_penalty(trainer)
    assert trainer._penalty(model).graph_blas


def test_fused_penalty_is_the_same_math_compiled():
    """fuse_penalty (the iw_lora_fused experiment): the trainer's penalty computes what IWPenalty computes, through a
    compiled ``_grad_math``. It compiles twice (the first call fills the penalty's weight cache, which the second
    reads) and never again: ``IWPenalty._replay``'s two warm-up calls take both compiles out of the CUDA-graph
    capture."""
    import torch
    from tiny import tiny_lora
    from torch._dynamo.utils import counters

    from iwtrainer import find_lora_targets
    from iwtrainer.importance import importance_record
    from iwtrainer.penalty import IWPenalty

    torch._dynamo.reset()
    model = tiny_lora("bert", init_lora_weights=False)
    trainer = bench_step._trainer(model, 1e-4, "/tmp/iw_bench_fused")
    names = [t.name for t in find_lora_targets(model)]
    trainer.iw_callback.record = importance_record({n: float(i + 1) for i, n in enumerate(names)}, "sum", 1.0)
    plain = IWPenalty(find_lora_targets(model), trainer.iw_callback.coefficients)
    bench_step.fuse_penalty(trainer, "aot_eager")
    counters.clear()
    fused = trainer._penalty(model)
    for _ in range(2):
        value, grads = fused._grad_math(1e-4)
    assert counters["stats"]["unique_graphs"] == 2 and trainer._penalty(model) is fused
    value, grads = fused._grad_math(1e-4)
    assert counters["stats"]["unique_graphs"] == 2
    want_value, want_grads = plain._grad_math(1e-4)
    torch.testing.assert_close(value, want_value)
    for (d_a, d_b), (w_a, w_b) in zip(grads, want_grads):
        torch.testing.assert_close(d_a, w_a)
        torch.testing.assert_close(d_b, w_b)


@pytest.mark.parametrize("n, ranks", [(10, (2, 9)), (20, (6, 15)), (50, (18, 33)), (100, (40, 61))])
def test_median_ci_takes_the_tabulated_order_statistics(n, ranks):
    """The distribution-free 95 % interval of a median is (x_(j), x_(n+1-j)); j from the standard tables
    (n = 10: 2, n = 20: 6, n = 50: 18, n = 100: 40), values given as their own ranks."""
    values = [float(i) for i in range(n, 0, -1)]  # shuffled order must not matter: reversed
    assert bench_step.median_ci(values) == tuple(float(r) for r in ranks)


def test_median_ci_covers_the_median_at_its_level():
    """Over 2,000 samples of 50 ratios from a skewed distribution, the interval holds the true median in ~95 %
    of them (binomial coverage at n = 50 is 96.7 %)."""
    import random

    rng = random.Random(0)
    true_median = 1.0 + 0.05 * 1.0  # lognormal-ish: exp(N(0,1)) has median 1
    hits = 0
    for _ in range(2000):
        xs = [1.0 + 0.05 * rng.lognormvariate(0.0, 1.0) for _ in range(50)]
        lo, hi = bench_step.median_ci(xs)
        hits += lo <= true_median <= hi
    assert 0.95 <= hits / 2000 <= 0.985


def test_paired_ratio_reports_every_ratio_and_the_median_interval():
    """Two stand-in steps whose cost differs by a known factor: the median ratio, its interval and the raw ratios."""
    import time

    def base(_batch):
        time.sleep(0.002)

    def other(_batch):
        time.sleep(0.003)

    out = bench_step.paired_ratio(base, other, [{}], pairs=12, block=2)
    assert len(out["ratios"]) == 12 and out["pairs"] == 12
    lo, hi = out["ratio_ci95"]
    ranked = sorted(out["ratios"])
    assert (lo, hi) == (ranked[2], ranked[9]) and lo <= out["ratio_median"] <= hi  # n = 12: 3rd and 10th smallest
    assert 1.2 < out["ratio_median"] < 1.8


def test_eager_only_report_has_no_compile_time_table():
    """``--compile none`` (eager pairs alone): the paired table, and no compile-time table with empty columns."""
    entry = {"ms_per_step": 66.7, "ratio_vs_eager": 1.0, "warmup_s": 0.4, "frames": 0, "graphs": 0, "graph_breaks": 0}
    paired = {"ratio_median": 0.983, "ratio_q1": 0.923, "ratio_q3": 1.046, "ratio_ci95": [0.956, 1.012],
              "pairs": 100, "block": 10}  # fmt: skip
    r = {"model": "m", "backend": "inductor", "modes": ["none"], "batch": 32, "shapes": [[32, 64]],
         "dynamo_while_timing": {"frames": 0, "graphs": 0, "graph_breaks": 0},
         "methods": {"lora": {"none": entry}, "iw_lora": {"none": {**entry, "paired_vs_lora": paired}}}}  # fmt: skip
    text = "\n".join(bench_step.compiled_markdown(r))
    assert "| iw_lora | 0.983 (0.923–1.046; 95 % CI 0.956–1.012) |" in text
    assert "Compile time" not in text and "| method |  |" not in text
    r["modes"] = ["none", "default"]
    r["methods"]["lora"]["default"] = {**entry, "compile_s": 40.0}
    r["methods"]["iw_lora"]["default"] = {**entry, "compile_s": 0.5}
    assert "| lora | 40.0 s, 0 / 0 / 0 |" in "\n".join(bench_step.compiled_markdown(r))
