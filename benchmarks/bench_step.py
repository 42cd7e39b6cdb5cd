"""Step time and peak memory: LoRA vs IW-LoRA (vs full fine-tuning, AdaLoRA, WSA) in one process, alternating.

Each method trains its own copy of the model with AdamW under bf16 autocast; a step is exactly what the
Trainer does per batch: ``IWTrainer.compute_loss`` (task loss + the method's regulariser), backward,
optimizer step, zero_grad. Methods run in interleaved rounds so clock and thermal drift hit all of them alike;
the reported ms/step is the median over rounds, and ratios are taken within this one process.

Also measured: calibration cost (150 batches vs a training step) expressed as a share of a 3-epoch SST-2 LoRA
run, and how stable the importance ranking is when fewer calibration batches are used (Spearman ρ against the
150-batch estimate).

    python benchmarks/bench_step.py --minilm PATH --sst2 DIR --out benchmarks/results

``--compile none,default,reduce-overhead`` adds eager vs ``torch.compile`` step times of LoRA, IW-LoRA and ΔL2 in
the same process (the model compiled as the Trainer's ``torch_compile=True`` compiles it, ``--compile_backend``
inductor by default), with each method × mode's compile time (its warm-up: one pass over every batch shape) reported
apart from its steady ms/step, and the graphs compiled, graph breaks and recompiles while timing (there should be
none). ``--pad_to_multiple_of 32`` pads each SST-2 batch to a multiple of 32 tokens instead of ``--seq``: a few
shapes that repeat, which CUDA graphs (``reduce-overhead``) need. ``--compile_only`` skips everything else. The GPU
run (all-mpnet-base-v2, real SST-2 batches):

    python benchmarks/bench_step.py --model /tmp/models/all-mpnet-base-v2 --sst2 .gpu/glue/SST-2 --compile_only \
        --compile none,default,reduce-overhead,max-autotune-no-cudagraphs --pad_to_multiple_of 32 \
        --out benchmarks/results --name compile_step_time

``--deberta only`` runs the same comparison on a random DeBERTa-v3-base-shaped model alone; with ``--model``,
``--sst2`` and ``--pad_to_multiple_of`` it trains on the SST-2 batches' padded shapes (``--model``'s token ids, which
DeBERTa-v3's 128,100-id vocabulary holds), the shapes a compiled SST-2 run meets:

    python benchmarks/bench_step.py --model /tmp/models/all-mpnet-base-v2 --sst2 .gpu/glue/SST-2 --deberta only \
        --compile_only --compile none,reduce-overhead --pad_to_multiple_of 32 --out $OUT --name compile_step_deberta

and a CPU smoke run of the same code (tiny, seconds; ``aot_eager`` instead of inductor's C++ compile):

    python benchmarks/bench_step.py --model ../shared/models/all-MiniLM-L6-v2 --sst2 ../shared/data/glue/SST-2 \
        --compile_only --compile none,default --compile_backend aot_eager --batch 4 --seq 32 --pad_to_multiple_of 16 \
        --rounds 2 --steps 2 --out /tmp/bench_smoke
"""

from __future__ import annotations

import argparse
import copy
import csv
import gc
import json
import math
import os
import platform
import signal
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from scipy.stats import binom, spearmanr
from transformers import AutoModelForSequenceClassification, AutoTokenizer, DebertaV2Config

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from iwtrainer import IWPenalty, IWTrainer, IWTrainingArguments, compute_sensitivities, importance_record  # noqa: E402

SST2_TRAIN_ROWS = 67349  # GLUE SST-2 train size: a 3-epoch run at batch 32 is 3 × ceil(67349/32) steps


def deberta_v3_base_config() -> DebertaV2Config:
    """microsoft/deberta-v3-base's architecture (random weights: only shapes matter for speed)."""
    return DebertaV2Config(
        vocab_size=128100, hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
        max_position_embeddings=512, relative_attention=True, position_buckets=256, norm_rel_ebd="layer_norm",
        share_att_key=True, pos_att_type=["p2c", "c2p"], max_relative_positions=-1, position_biased_input=False,
        type_vocab_size=0, layer_norm_eps=1e-7, num_labels=2,
    )  # fmt: skip


LORA_TARGETS = {
    "bert": ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"],
    "deberta-v2": [
        "query_proj", "key_proj", "value_proj", "attention.output.dense", "intermediate.dense", "output.dense"
    ],
    "mpnet": ["q", "k", "v", "o", "intermediate.dense", "output.dense"],
}  # fmt: skip
COMPILE_MODES = ("none", "default", "reduce-overhead", "max-autotune-no-cudagraphs", "max-autotune")
COMPILE_METHODS = {  # α, normalize
    "lora": (0.0, "sum"),
    "iw_lora": (1e-4, "sum"),
    "delta_l2": (1e-4, "uniform"),
    "iw_lora_fused": (1e-4, "sum"),  # IW-LoRA with its penalty math compiled (fuse_penalty): an experiment
    "iw_lora_matmul": (1e-4, "sum"),  # IW-LoRA with its penalty graph's products as batched matmuls (graph_blas)
}


def _targets(model: torch.nn.Module) -> list[str]:
    return LORA_TARGETS[model.config.model_type]


def _lora(base: torch.nn.Module, r: int = 8) -> torch.nn.Module:
    cfg = LoraConfig(
        r=r, lora_alpha=16, lora_dropout=0.1, target_modules=_targets(base), modules_to_save=["classifier"]
    )
    return get_peft_model(base, cfg)


def _trainer(model: torch.nn.Module, alpha: float, out: str, normalize: str = "sum", **kw) -> IWTrainer:
    args = IWTrainingArguments(
        output_dir=out, iw_alpha=alpha, iw_normalize=normalize, report_to="none", bf16=torch.cuda.is_available()
    )
    return IWTrainer(model=model, args=args, **kw)


def build_methods(base: torch.nn.Module, batches: list[dict], out: str) -> dict[str, tuple]:
    """method -> (trainer, model, optimizer). Extra methods are added when their modules are importable."""
    methods: dict[str, tuple] = {}
    lora = _lora(copy.deepcopy(base))
    methods["lora"] = (_trainer(lora, 0.0, out), lora)

    iw = _lora(copy.deepcopy(base))
    trainer = _trainer(iw, 1e-4, out)
    sens = compute_sensitivities(iw, batches[:4], num_steps=4, show_progress=False)
    trainer.iw_callback.record = importance_record(sens, "sum", 1.0)
    methods["iw_lora"] = (trainer, iw)

    iw_ag = _lora(copy.deepcopy(base))  # the same penalty through the autograd graph, for comparison
    trainer_ag = _trainer(iw_ag, 1e-4, out)
    trainer_ag.iw_callback.record = trainer.iw_callback.record
    trainer_ag.penalty_backend = "autograd"
    methods["iw_lora_autograd"] = (trainer_ag, iw_ag)

    full = copy.deepcopy(base)
    methods["full"] = (_trainer(full, 0.0, out), full)

    try:  # AdaLoRA: peft's own, with the update_and_allocate call the Trainer would make after each step
        from iwtrainer.methods.adalora import adalora_config

        ada_cfg = adalora_config(
            _targets(base), lora_r=8, lora_alpha=16, total_step=10_000, modules_to_save=["classifier"]
        )
        ada = get_peft_model(copy.deepcopy(base), ada_cfg)
        methods["adalora"] = (_trainer(ada, 0.0, out), ada)
    except ImportError:
        pass
    try:
        from iwtrainer.methods.wsa import WSAConfig, apply_wsa, wsa_gate_l1

        wsa = apply_wsa(
            copy.deepcopy(base), WSAConfig(r_init=16, target_modules=_targets(base), modules_to_save=["classifier"])
        )
        methods["wsa"] = (_trainer(wsa, 0.0, out, regularizers={"wsa_gate_l1": lambda m: 1e-3 * wsa_gate_l1(m)}), wsa)
    except ImportError:
        pass
    return {
        name: (t, m, torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-5))
        for name, (t, m) in methods.items()
    }


STEP_STAGES = ("forward", "backward", "penalty", "optimizer")  # where make_step's probe runs, in order


def make_step(
    name: str,
    trainer: IWTrainer,
    model: torch.nn.Module,
    opt: torch.optim.Optimizer,
    runner: torch.nn.Module | None = None,
    probe: Callable[[str], None] | None = None,
) -> Callable:
    """One Trainer step: train mode, ``compute_loss`` through ``runner`` (the compiled wrapper, else the model) under
    bf16 autocast, backward, IW's closed-form penalty gradient after it (``add_penalty_grad``, as ``training_step``
    adds it), optimizer step, zero_grad. ``probe(stage)``, when given, runs after each stage of ``STEP_STAGES``: a
    memory benchmark reads and resets its peak counter there."""
    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    counter = {"step": 0}
    runner = model if runner is None else runner
    mark = probe or (lambda stage: None)

    def step(batch: dict) -> None:
        # Train mode, as Trainer.training_step sets it: from_pretrained leaves the base model in eval mode (peft's
        # new layers not), and without this a method whose model went through model.train() once (calibration
        # before 2026-11-30 did) would run every dropout while the others ran only LoRA's.
        model.train()
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=device_type == "cuda"):
            loss = trainer.compute_loss(runner, batch)
        mark("forward")
        loss.backward()
        mark("backward")
        trainer.add_penalty_grad(runner, loss)  # α·∇P into .grad: the "grad" backend adds nothing in compute_loss
        mark("penalty")
        opt.step()
        if name == "adalora":  # what AdaLoraCallback does at on_optimizer_step
            model.base_model.update_and_allocate(counter["step"])
        opt.zero_grad(set_to_none=True)
        trainer.guard.step_done()  # what the guard's on_step_end does: the step's divergence check
        mark("optimizer")
        counter["step"] += 1
        trainer.state.global_step += 1

    return step


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def time_methods(steps: dict[str, Callable], batches: list[dict], rounds: int, per_round: int) -> dict[str, dict]:
    for fn in steps.values():  # warm-up: allocator, cuBLAS heuristics, optimizer state
        for b in batches[:3]:
            fn(b)
    samples: dict[str, list[float]] = {k: [] for k in steps}
    gc.collect()
    gc.disable()  # a collection inside one method's round would be charged to that method
    for r in range(rounds):
        order = list(steps) if r % 2 == 0 else list(reversed(steps))
        for name in order:
            _sync()
            t0 = time.perf_counter()
            for i in range(per_round):
                steps[name](batches[i % len(batches)])
            _sync()
            samples[name].append((time.perf_counter() - t0) * 1000 / per_round)
    gc.enable()
    return {
        k: {"ms_per_step": statistics.median(v), "ms_min": min(v), "ms_max": max(v), "rounds": len(v)}
        for k, v in samples.items()
    }


def paired_ratio(base: Callable, other: Callable, batches: list[dict], pairs: int, block: int) -> dict:
    """Median over ``pairs`` of time(other)/time(base) for adjacent ``block``-step runs, alternating the order.

    Adjacent blocks share the machine's state of the moment, so host/GPU drift (±15 % between rounds on a
    shared machine) cancels in each ratio. What is left still scatters the ratios (±5–8 % interquartile on a
    15 ms compiled step), so the result carries the median's 95 % confidence interval (``median_ci``) and every
    ratio: whether a difference of 1 % is resolved depends on the pairs, and the interval says so.
    """
    ratios = []
    gc.collect()
    gc.disable()
    for i in range(pairs):
        times = {}
        for key, fn in (("base", base), ("other", other)) if i % 2 == 0 else (("other", other), ("base", base)):
            _sync()
            t0 = time.perf_counter()
            for j in range(block):
                fn(batches[(i * block + j) % len(batches)])
            _sync()
            times[key] = time.perf_counter() - t0
        ratios.append(times["other"] / times["base"])
    gc.enable()
    q = statistics.quantiles(ratios, n=4)
    lo, hi = median_ci(ratios)
    return {
        "ratio_median": statistics.median(ratios),
        "ratio_q1": q[0],
        "ratio_q3": q[2],
        "ratio_ci95": [lo, hi],
        "ratios": ratios,
        "pairs": pairs,
        "block": block,
    }


def median_ci(values: list[float], level: float = 0.95) -> tuple[float, float]:
    """Distribution-free confidence interval of the median: the order statistics x_(j), x_(n+1-j) with the largest
    j such that P(j <= Binomial(n, 1/2) <= n - j) >= ``level`` (each value falls below the true median with
    probability 1/2, whatever the distribution). For n = 50 at 95 % that is the 18th and 33rd smallest."""
    xs = sorted(values)
    n = len(xs)
    j = 0  # 1-based rank of the lower end; 0: too few values for this level
    for cand in range(1, n // 2 + 1):  # the coverage falls as cand grows: stop at the first that misses the level
        if binom.cdf(n - cand, n, 0.5) - binom.cdf(cand - 1, n, 0.5) < level:
            break
        j = cand
    if j == 0:
        return (xs[0], xs[-1]) if xs else (math.nan, math.nan)
    return xs[j - 1], xs[n - j]


def penalty_overhead(trainer: IWTrainer, model: torch.nn.Module, lora_ms: float, iters: int = 500) -> dict:
    """Exactly what IWTrainer.compute_loss adds per micro-batch, timed alone over many iterations.

    The end-to-end ratio on a shared machine swings by several % between adjacent blocks; the penalty's own cost
    (closed-form gradient into .grad, the loss term, two on-device log accumulators) is stable to a few µs.
    Grads are reset to None before each iteration, as after the Trainer's zero_grad; that reset is timed alone
    and subtracted. In a launch-bound step this cost adds 1:1; otherwise it is an upper bound.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    loss = torch.ones((), device=params[0].device, requires_grad=True)
    penalty = trainer._penalty(model)

    def reset() -> None:
        for p in params:
            p.grad = None

    def iw_ops() -> None:
        reset()
        value = penalty.add_grad_(trainer._grad_scale())
        torch.add(loss, value, alpha=trainer.args.iw_alpha)
        trainer._iw_track("loss_task", loss.detach(), 1.0)
        trainer._iw_track("iw_penalty", value, trainer.args.iw_alpha)

    def timed(fn: Callable) -> float:
        for _ in range(20):
            fn()
        _sync()
        gc.collect()
        gc.disable()
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        _sync()
        gc.enable()
        return (time.perf_counter() - t0) * 1e6 / iters

    def grads() -> list[torch.Tensor]:
        reset()
        penalty.add_grad_(trainer._grad_scale())
        return [p.grad.clone() for p in params if p.grad is not None]

    reset_us = timed(reset)
    out = {"lora_ms_per_step": lora_ms}
    for mode in (False, True):
        penalty.cuda_graph = mode
        cost = timed(iw_ops) - reset_us
        name = "graph" if mode else "eager"
        out[f"{name}_us_per_step"] = cost
        out[f"{name}_overhead_vs_lora"] = cost / (lora_ms * 1000)
    penalty.cuda_graph = False
    eager = grads()
    penalty.cuda_graph = True
    graphed = grads()
    out["graph_vs_eager_max_abs_diff"] = max((a - b).abs().max().item() for a, b in zip(eager, graphed))
    out["grad_max_abs"] = max(a.abs().max().item() for a in eager)
    reset()
    trainer._iw_logs = {}
    return out


def peak_memory(methods: dict[str, tuple], steps: dict[str, Callable], batches: list[dict]) -> dict[str, float]:
    """Peak allocated GiB per method with only that method's model and optimizer on the GPU."""
    if not torch.cuda.is_available():
        return {}
    out = {}
    for name in methods:
        for other, (_, m, opt) in methods.items():
            _move(m, opt, "cuda" if other == name else "cpu")
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        for b in batches[:3]:
            steps[name](b)
        _sync()
        out[name] = torch.cuda.max_memory_allocated() / 2**30
    for _, m, opt in methods.values():
        _move(m, opt, "cuda")
    return out


def _move(model: torch.nn.Module, opt: torch.optim.Optimizer, device: str) -> None:
    model.to(device)
    for state in opt.state.values():
        for k, v in state.items():
            if torch.is_tensor(v) and v.dim() > 0:
                state[k] = v.to(device)


def calibration_cost(model: torch.nn.Module, batches: list[dict], lora_ms: float, n: int = 150) -> dict:
    autocast = torch.bfloat16 if torch.cuda.is_available() else None
    compute_sensitivities(model, batches[:2], num_steps=2, autocast_dtype=autocast, show_progress=False)  # warm-up
    _sync()
    t0 = time.perf_counter()
    compute_sensitivities(model, batches, num_steps=n, autocast_dtype=autocast, show_progress=False)
    _sync()
    calib_s = time.perf_counter() - t0
    run_steps = 3 * math.ceil(SST2_TRAIN_ROWS / 32)
    run_s = run_steps * lora_ms / 1000
    return {
        "calib_batches": n,
        "calib_seconds": calib_s,
        "calib_ms_per_batch": calib_s * 1000 / n,
        "calib_batch_over_lora_step": calib_s * 1000 / n / lora_ms,
        "sst2_3epoch_lora_steps": run_steps,
        "sst2_3epoch_lora_seconds_est": run_s,
        "calib_share_of_sst2_run": calib_s / (calib_s + run_s),
    }


def ranking_stability(model: torch.nn.Module, batches: list[dict], ns: list[int], ref_n: int) -> dict:
    autocast = torch.bfloat16 if torch.cuda.is_available() else None
    ref = compute_sensitivities(model, batches, num_steps=ref_n, autocast_dtype=autocast, show_progress=False)
    names = list(ref)
    out = {}
    for n in ns:
        est = compute_sensitivities(model, batches, num_steps=n, autocast_dtype=autocast, show_progress=False)
        rho = spearmanr([ref[k] for k in names], [est[k] for k in names]).statistic
        top = lambda d: set(sorted(d, key=d.get, reverse=True)[: len(d) // 4])  # noqa: E731
        out[n] = {
            "spearman_vs_ref": float(rho),
            "ref_batches": ref_n,
            "top_quarter_overlap": len(top(ref) & top(est)) / len(top(ref)),
        }
    weights = importance_record(ref, "sum", 1.0)["modules"]
    coefs = [v["coefficient"] for v in weights.values()]
    max_w = importance_record(ref, "max", 1.0)["modules"]
    out["coefficients_sum"] = {"min": min(coefs), "max": max(coefs), "K": len(coefs)}
    out["coefficients_max"] = {
        "min": min(v["coefficient"] for v in max_w.values()),
        "max": max(v["coefficient"] for v in max_w.values()),
    }
    return out


def sst2_batches(
    model_dir: str, sst2_dir: str, n: int, batch: int, seq: int, device: str, multiple: int | None = None
) -> list[dict]:
    """``n`` batches of SST-2 training rows, each padded to ``seq`` tokens, or with ``multiple`` to the smallest
    multiple of it that holds the batch's longest row (a few shapes, as ``run_glue_iw.py --pad_to_multiple_of``)."""
    tok = AutoTokenizer.from_pretrained(model_dir)
    with open(os.path.join(sst2_dir, "train.tsv"), newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))[: n * batch]
    padding = {"padding": "longest", "pad_to_multiple_of": multiple} if multiple else {"padding": "max_length"}
    out = []
    for s in range(0, len(rows), batch):
        chunk = rows[s : s + batch]
        enc = tok([r["sentence"] for r in chunk], truncation=True, max_length=seq, return_tensors="pt", **padding)
        enc["labels"] = torch.tensor([int(r["label"]) for r in chunk])
        out.append({k: v.to(device) for k, v in enc.items()})
    return out


def random_batches(vocab: int, n: int, batch: int, seq: int, device: str) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    return [
        {
            "input_ids": torch.randint(5, vocab, (batch, seq), generator=g).to(device),
            "attention_mask": torch.ones(batch, seq, dtype=torch.long, device=device),
            "labels": torch.randint(0, 2, (batch,), generator=g).to(device),
        }
        for _ in range(n)
    ]


def bench_model(label: str, base: torch.nn.Module, batches: list[dict], args: argparse.Namespace) -> dict:
    device = batches[0]["input_ids"].device
    base = base.to(device)
    methods = build_methods(base, batches, args.tmp)
    steps = {k: make_step(k, *v) for k, v in methods.items()}
    timing = time_methods(steps, batches, args.rounds, args.steps)
    print(label, json.dumps(timing), flush=True)
    paired = {
        k: paired_ratio(steps["lora"], steps[k], batches, args.pairs, args.block)
        for k in ("iw_lora", "iw_lora_autograd")
        if args.pairs
    }
    print(label, "paired", json.dumps(paired), flush=True)
    overhead = penalty_overhead(methods["iw_lora"][0], methods["iw_lora"][1], timing["lora"]["ms_per_step"])
    print(label, "penalty", json.dumps(overhead), flush=True)
    memory = peak_memory(methods, steps, batches)
    lora_ms = timing["lora"]["ms_per_step"]
    result = {
        "model": label,
        "lora_matrices": len(_targets(base)) * base.config.num_hidden_layers,
        "batch": batches[0]["input_ids"].shape[0],
        "seq": batches[0]["input_ids"].shape[1],
        "paired_vs_lora": paired,
        "penalty_overhead": overhead,
        "methods": {
            k: {
                **timing[k],
                "ratio_vs_lora": timing[k]["ms_per_step"] / lora_ms,
                "peak_gib": memory.get(k),
                "trainable_params": sum(p.numel() for p in methods[k][1].parameters() if p.requires_grad),
            }
            for k in methods
        },
    }
    if args.calib_steps:
        result["calibration"] = calibration_cost(methods["lora"][1], batches, lora_ms, args.calib_steps)
    return result


def _dynamo_stats() -> dict[str, int]:
    """Dynamo's process-wide counts: frames compiled (a recompile is one more), graphs, graph breaks."""
    from torch._dynamo.utils import counters

    return {
        "frames": counters["frames"]["total"],
        "graphs": counters["stats"]["unique_graphs"],
        "graph_breaks": sum(counters["graph_break"].values()),
    }


def _compile_kwargs(mode: str, backend: str) -> dict:
    """``torch.compile``'s arguments for a ``--compile`` mode: what the Trainer's ``torch_compile_backend`` /
    ``torch_compile_mode`` make accelerate pass (modes are inductor's)."""
    if backend != "inductor" and mode != "default":
        raise SystemExit(f"--compile {mode} is an inductor mode; with --compile_backend {backend} use none,default")
    return {"backend": backend, **({"mode": mode} if backend == "inductor" else {})}


def _on_penalty(trainer: IWTrainer, change: Callable[[IWPenalty], None]) -> None:
    """``change`` applied to every penalty ``trainer`` builds, as it hands it out (iwtrainer unchanged)."""
    original = trainer._penalty

    def penalty(model: torch.nn.Module):
        pen = original(model)
        change(pen)
        return pen

    trainer._penalty = penalty


def fuse_penalty(trainer: IWTrainer, backend: str) -> None:
    """An experiment on ``trainer``'s penalty (iwtrainer unchanged): its closed-form math compiled by ``backend``.

    Under ``reduce-overhead`` IW-LoRA's step is 1.01–1.04× LoRA's (compile_step_pairs*.md): the penalty's CUDA graph
    removes its ~50 launches, not the run time of its ~50 small kernels. Inductor fuses the elementwise ops (the
    batched matmuls stay), and the graph then captures the fused kernels: the penalty is warmed up (compiled) outside
    the capture, as ``IWPenalty._replay`` does for any ``_grad_math``. The numbers are the same math's."""

    def compile_math(pen: IWPenalty) -> None:
        if "_grad_math" not in vars(pen):  # once per penalty object (a new one after a layout change)
            pen._grad_math = torch.compile(pen._grad_math, backend=backend)

    _on_penalty(trainer, compile_math)


def matmul_penalty(trainer: IWTrainer) -> None:
    """``trainer``'s penalty graph with batched matmuls (``IWPenalty.graph_blas``; cuBLAS on the capture stream), the
    form small ranks used before the broadcast one: the two side by side in one run."""
    _on_penalty(trainer, lambda pen: setattr(pen, "graph_blas", True))


def build_compiled(base: torch.nn.Module, batches: list[dict], args: argparse.Namespace) -> dict[str, Callable]:
    """``method@mode`` -> its step, for LoRA, IW-LoRA and ΔL2 in every ``--compile`` mode; each its own model (the
    same LoRA initialisation everywhere), trainer and optimizer, compiled as the Trainer compiles (``torch.compile``
    of the whole peft model; ``none`` = eager)."""
    sens = compute_sensitivities(_lora(copy.deepcopy(base)), batches[:4], num_steps=4, show_progress=False)
    records = {
        "iw_lora": importance_record(sens, "sum", 1.0),
        "delta_l2": importance_record(dict.fromkeys(sens), "uniform", 1.0),  # every coefficient 1, nothing measured
    }
    records["iw_lora_fused"] = records["iw_lora_matmul"] = records["iw_lora"]
    steps = {}
    for method in args.compile_methods:
        alpha, normalize = COMPILE_METHODS[method]
        for mode in args.compile:
            torch.manual_seed(0)
            model = _lora(copy.deepcopy(base))
            trainer = _trainer(model, alpha, args.tmp, normalize)
            if method in records:
                trainer.iw_callback.record = records[method]
            if method == "iw_lora_fused":
                fuse_penalty(trainer, args.compile_backend)
            if method == "iw_lora_matmul":
                matmul_penalty(trainer)
            opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
            runner = model if mode == "none" else torch.compile(model, **_compile_kwargs(mode, args.compile_backend))
            steps[f"{method}@{mode}"] = make_step(method, trainer, model, opt, runner)
    return steps


def bench_compiled(
    label: str, base: torch.nn.Module, batches: list[dict], args: argparse.Namespace, warm: dict | None = None
) -> dict:
    """Eager vs compiled LoRA / IW-LoRA / ΔL2: compile time (warm-up over every batch shape) apart from the steady
    ms/step (``time_methods``' interleaved rounds), and whether anything recompiled while timing. ``warm`` is filled
    with each method's warm-up as it finishes (what a run stopped early still reports)."""
    device = batches[0]["input_ids"].device
    base = base.to(device)
    # Sequence classifiers set config.problem_type in their first forward and dynamo recompiles for it once: set
    # beforehand (to what that forward sets) so each compile time is one compile.
    base.config.problem_type = "single_label_classification" if base.config.num_labels > 1 else "regression"
    torch._dynamo.config.recompile_limit = 64  # 8 by default; method × mode × shape compiles of one forward
    steps = build_compiled(base, batches, args)
    eager = [fn for name, fn in steps.items() if name.endswith("@none")]
    if eager:  # the process's one-time costs (allocator, thread pools, first kernels) charged to no one's warm-up
        eager[0](batches[0])
    shapes = {}
    for b in batches:  # one batch of every shape: the warm-up compiles (and records CUDA graphs) for each
        shapes.setdefault(tuple(b["input_ids"].shape), b)
    warm = {} if warm is None else warm
    for name, fn in steps.items():
        before = _dynamo_stats()
        _sync()
        t0 = time.perf_counter()
        try:
            for b in shapes.values():
                for _ in range(3):  # reduce-overhead: a warm-up run, the CUDA graph's recording, a replay
                    fn(b)
        except Exception as exc:  # one failing mode must not cost the GPU run the others
            warm[name] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"}
            print(label, name, "failed:", warm[name]["error"], flush=True)
            continue
        _sync()
        after = _dynamo_stats()
        warm[name] = {"warmup_s": time.perf_counter() - t0, "warmup_steps": 3 * len(shapes)}
        warm[name].update({k: after[k] - before[k] for k in after})
        print(label, name, "warm-up", json.dumps(warm[name]), flush=True)
    steps = {k: v for k, v in steps.items() if "error" not in warm[k]}
    before = _dynamo_stats()
    timing = time_methods(steps, batches, args.rounds, args.steps)
    # Each penalised method against LoRA in the same mode, in adjacent blocks: the rounds' medians of a 10 ms
    # compiled step drift by more than the 1 % the target asks about.
    paired = {
        name: paired_ratio(steps[f"lora@{name.split('@')[1]}"], fn, batches, args.compile_pairs, args.block)
        for name, fn in steps.items()
        if not name.startswith("lora@") and f"lora@{name.split('@')[1]}" in steps and args.compile_pairs
    }
    during = {k: v - before[k] for k, v in _dynamo_stats().items()}
    out: dict[str, dict] = {}
    for name, w in warm.items():
        method, mode = name.split("@")
        entry = dict(w)
        if name in timing:
            t = timing[name]
            entry.update(t)
            if mode != "none":
                entry["compile_s"] = w["warmup_s"] - w["warmup_steps"] * t["ms_per_step"] / 1000
            if f"{method}@none" in timing:
                entry["ratio_vs_eager"] = t["ms_per_step"] / timing[f"{method}@none"]["ms_per_step"]
        if name in paired:
            entry["paired_vs_lora"] = paired[name]
        out.setdefault(method, {})[mode] = entry
    result = {
        "model": label,
        "backend": args.compile_backend,
        "modes": list(args.compile),
        "batch": batches[0]["input_ids"].shape[0],
        "shapes": [list(s) for s in shapes],
        "dynamo_while_timing": during,  # all zero: nothing compiled, recompiled or broke during the timed steps
        "methods": out,
    }
    print(label, "compiled", json.dumps(result), flush=True)
    return result


def _method_rows(methods: dict[str, dict], modes: list[str], cell: Callable[[dict], str]) -> list[str]:
    """One table row per method: ``cell`` of its entry in each mode (an empty dict where the mode has none)."""
    return [f"| {method} | " + " | ".join(cell(by_mode.get(m, {})) for m in modes) + " |"
            for method, by_mode in methods.items()]  # fmt: skip


def compiled_markdown(r: dict) -> list[str]:
    if not r.get("complete", True):  # stopped before its timing: the warm-ups that finished
        return [f"## {r['model']}: torch.compile — stopped before the timing; warm-ups that finished", "",
                *(f"- {name}: {json.dumps(w)}" for name, w in r["warmup"].items()), ""]  # fmt: skip
    modes = r["modes"]
    lines = [
        f"## {r['model']}: eager vs torch.compile ({r['backend']}), batch {r['batch']}, shapes "
        f"{', '.join('×'.join(map(str, s)) for s in r['shapes'])}",
        "",
        "| method | " + " | ".join(f"{m} ms/step (× eager)" for m in modes) + " |",
        "|---|" + "---:|" * len(modes),
    ]

    def speed(e: dict) -> str:
        return e["error"] if "error" in e else f"{e['ms_per_step']:.2f} ({e.get('ratio_vs_eager', float('nan')):.3f})"

    lines += _method_rows(r["methods"], modes, speed)
    penalised = {m: by_mode for m, by_mode in r["methods"].items() if m != "lora"}
    if any("paired_vs_lora" in e for by_mode in penalised.values() for e in by_mode.values()):
        first = next(e["paired_vs_lora"] for by_mode in penalised.values() for e in by_mode.values()
                     if "paired_vs_lora" in e)  # fmt: skip
        lines += [
            "",
            f"Step time ÷ LoRA's in the same mode, paired: median over {first['pairs']} adjacent "
            f"{first['block']}-step blocks (interquartile range; 95 % confidence interval of the median, from the "
            "order statistics).",
            "",
            "| method | " + " | ".join(modes) + " |",
            "|---|" + "---:|" * len(modes),
        ]

        def ratio(e: dict) -> str:
            p = e.get("paired_vs_lora")
            if p is None:
                return "–"
            ci = p.get("ratio_ci95")  # (results written before it have none)
            ci = f"; 95 % CI {ci[0]:.3f}–{ci[1]:.3f}" if ci else ""
            return f"{p['ratio_median']:.3f} ({p['ratio_q1']:.3f}–{p['ratio_q3']:.3f}{ci})"

        lines += _method_rows(penalised, modes, ratio)
    compiled = [m for m in modes if m != "none"]

    def compile_cost(e: dict) -> str:
        return (
            "–"
            if "compile_s" not in e
            else f"{e['compile_s']:.1f} s, {e['frames']} / {e['graphs']} / {e['graph_breaks']}"
        )

    if compiled:  # an eager-only run (--compile none) has no compile time to report
        lines += [
            "",
            "Compile time (the warm-up over every shape, 3 steps each, minus those steps at the steady speed); "
            "frames / graphs compiled / graph breaks. A method with 0 frames reused the graphs an earlier method "
            "compiled in this process (the same model code: dynamo's guards pass); a training run compiles once per "
            "process, so its compile cost is the mode's first row.",
            "",
            "| method | " + " | ".join(compiled) + " |",
            "|---|" + "---:|" * len(compiled),
            *_method_rows(r["methods"], compiled, compile_cost),
        ]
    d = r["dynamo_while_timing"]
    lines += [
        "",
        f"While timing: {d['frames']} frames compiled, {d['graphs']} graphs, {d['graph_breaks']} graph breaks "
        "(0 = every timed step ran the graphs of its warm-up).",
        "",
    ]
    return lines


def to_markdown(results: dict) -> str:
    lines = [
        "# Step time and memory: LoRA vs IW-LoRA and the other methods",
        "",
        f"Device: {results['device']}; torch {results['torch']}; bf16 autocast; AdamW; median of "
        f"{results['rounds']} interleaved rounds of {results['steps_per_round']} steps. Produced by "
        "`benchmarks/bench_step.py`.",
        "",
    ]
    for r in results["models"]:
        lines += [
            f"## {r['model']} — {r['lora_matrices']} LoRA matrices, batch {r['batch']}, seq {r['seq']}",
            "",
            "| method | ms/step | × LoRA | min–max ms | peak GiB | trainable params |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for k, m in r["methods"].items():
            peak = f"{m['peak_gib']:.2f}" if m["peak_gib"] is not None else "–"
            lines.append(
                f"| {k} | {m['ms_per_step']:.2f} | {m['ratio_vs_lora']:.3f} | {m['ms_min']:.2f}–{m['ms_max']:.2f} "
                f"| {peak} | {m['trainable_params']:,} |"
            )
        o = r["penalty_overhead"]
        lines.append(
            f"\nIW-LoRA's own per-step work (closed-form penalty gradient, loss term, log accumulators), timed "
            f"alone: eager {o['eager_us_per_step']:.0f} µs = {100 * o['eager_overhead_vs_lora']:.2f} %; "
            f"CUDA graph (default on GPU) **{o['graph_us_per_step']:.0f} µs = "
            f"{100 * o['graph_overhead_vs_lora']:.2f} % of a LoRA step**; graph vs eager gradients max |Δ| "
            f"{o['graph_vs_eager_max_abs_diff']:.1e} (max |grad| {o['grad_max_abs']:.1e})."
        )
        for k, v in r.get("paired_vs_lora", {}).items():
            ci = v.get("ratio_ci95")  # (results written before it have none)
            ci = f", 95 % CI of the median {ci[0]:.4f}–{ci[1]:.4f}" if ci else ""
            lines.append(
                f"\nPaired {k} / lora: **{v['ratio_median']:.4f}×** (median of {v['pairs']} adjacent "
                f"{v['block']}-step blocks, interquartile {v['ratio_q1']:.4f}–{v['ratio_q3']:.4f}{ci})."
            )
        if "calibration" in r:
            c = r["calibration"]
            lines += [
                "",
                f"Calibration: {c['calib_batches']} batches in {c['calib_seconds']:.2f} s "
                f"({c['calib_ms_per_batch']:.1f} ms/batch = {c['calib_batch_over_lora_step']:.2f} LoRA steps); "
                f"a 3-epoch SST-2 LoRA run at this step time is {c['sst2_3epoch_lora_steps']} steps "
                f"≈ {c['sst2_3epoch_lora_seconds_est']:.0f} s, so calibration is "
                f"**{100 * c['calib_share_of_sst2_run']:.2f} %** of the run.",
            ]
        lines.append("")
    for r in results.get("compiled", []):
        lines += compiled_markdown(r)
    if "ranking_stability" in results:
        s = results["ranking_stability"]
        lines += [
            "## Importance ranking vs number of calibration batches (MiniLM, real SST-2 batches)",
            "",
            "| batches | Spearman ρ vs the longest estimate | top-quarter overlap |",
            "|---:|---:|---:|",
        ]
        lines += [
            f"| {n} (vs {v['ref_batches']}) | {v['spearman_vs_ref']:.4f} | {v['top_quarter_overlap']:.2f} |"
            for n, v in s.items()
            if str(n).isdigit()
        ]
        cs, cm = s["coefficients_sum"], s["coefficients_max"]
        lines += [
            "",
            f"Penalty coefficients (1−w)^β over K={cs['K']} matrices: `sum` normalisation "
            f"{cs['min']:.4f}–{cs['max']:.4f} (nearly uniform L2); `max` normalisation "
            f"{cm['min']:.4f}–{cm['max']:.4f}.",
            "",
        ]
    return "\n".join(lines)


def run_model(label: str, base: torch.nn.Module, batches: list[dict], args: argparse.Namespace, results: dict) -> None:
    """The method comparison (unless ``--compile_only``) and the ``--compile`` comparison of one model."""
    if not args.compile_only:
        results["models"].append(bench_model(label, base, batches, args))
        print(json.dumps(results["models"][-1], indent=1), flush=True)
    if args.compile:
        entry: dict = {"model": label, "complete": False, "warmup": {}}  # partial until the timing is done
        results["compiled"].append(entry)
        entry.update(bench_compiled(label, base, batches, args, entry["warmup"]), complete=True)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minilm", "--model", dest="model", help="a local encoder folder (real weights, BERT or MPNet "
                   "layout): all-MiniLM-L6-v2, all-mpnet-base-v2")  # fmt: skip
    p.add_argument("--sst2", help="GLUE SST-2 folder (train.tsv) for real batches")
    p.add_argument(
        "--deberta",
        nargs="?",
        const="also",
        choices=("also", "only"),
        help="also (bare flag) a random DeBERTa-v3-base-shaped model; only: that model alone. With --model, --sst2 "
        "and --pad_to_multiple_of it trains on the SST-2 batches' shapes (--model's token ids, all within "
        "DeBERTa-v3's vocabulary), else on random ids padded to --seq",
    )
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--steps", type=int, default=30, help="steps per method per round")
    p.add_argument("--pairs", type=int, default=60, help="adjacent LoRA/IW-LoRA block pairs (0: skip)")
    p.add_argument("--block", type=int, default=5, help="steps per block in the paired measurement")
    p.add_argument("--calib_steps", type=int, default=150)
    p.add_argument("--stability", default="8,16,32,64,100", help="calibration batch counts to compare with 150")
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--name", default="step_time")
    p.add_argument("--tmp", default="/tmp/iw_bench")
    p.add_argument("--compile", default="", help=f"comma-separated modes of {COMPILE_MODES}: eager vs compiled "
                   "LoRA / IW-LoRA / ΔL2 (none = eager)")  # fmt: skip
    p.add_argument("--compile_backend", default="inductor", help="torch.compile backend (aot_eager: CPU smoke runs)")
    p.add_argument("--compile_only", action="store_true", help="only the --compile comparison")
    p.add_argument(
        "--compile_pairs", type=int, default=30, help="block pairs of each penalised method vs LoRA per --compile mode"
    )
    p.add_argument("--pad_to_multiple_of", type=int, help="pad SST-2 batches to a multiple of this, not to --seq")
    p.add_argument(
        "--compile_methods",
        default="lora,iw_lora,delta_l2",
        help=f"comma-separated methods of {list(COMPILE_METHODS)} in the --compile comparison (lora always: the "
        "paired ratios divide by it)",
    )
    return p


def main(argv: list[str] | None = None) -> None:
    p = parser()
    args = p.parse_args(argv)
    args.compile = [m for m in args.compile.split(",") if m]
    unknown = [m for m in args.compile if m not in COMPILE_MODES]
    if unknown or (args.compile_only and not args.compile):
        p.error(f"--compile takes modes of {COMPILE_MODES} (comma-separated), got {unknown or 'none'}")
    args.compile_methods = [m for m in args.compile_methods.split(",") if m]
    bad = [m for m in args.compile_methods if m not in COMPILE_METHODS]
    if bad or "lora" not in args.compile_methods:
        known = list(COMPILE_METHODS)
        p.error(f"--compile_methods takes methods of {known} including lora, got {args.compile_methods}")
    args.compile_methods = [m for m in COMPILE_METHODS if m in args.compile_methods]  # LoRA first: its warm-up
    if args.pad_to_multiple_of and args.seq % args.pad_to_multiple_of:
        p.error(f"--pad_to_multiple_of {args.pad_to_multiple_of} must divide --seq {args.seq}")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.backends.cuda.matmul.allow_tf32 = True
    results = {
        "device": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "rounds": args.rounds,
        "steps_per_round": args.steps,
        "models": [],
        "compiled": [],
    }
    # `timeout` (and the device machine's limit) send SIGTERM: leave through the finally below, which saves what
    # was measured (a compile warm-up alone can take minutes).
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(124))
    try:
        n_batches = 40 if args.compile_only else max(args.calib_steps, 40)
        batches = []
        if args.model:
            pad = args.pad_to_multiple_of
            batches = sst2_batches(args.model, args.sst2, n_batches, args.batch, args.seq, device, pad)
        if args.model and args.deberta != "only":
            base = AutoModelForSequenceClassification.from_pretrained(args.model, num_labels=2)
            label = f"{Path(args.model).name} (real weights, SST-2 batches)"
            run_model(label, base, batches, args, results)
            if args.stability and not args.compile_only:
                ns = [int(x) for x in args.stability.split(",")]
                lora = _lora(copy.deepcopy(base)).to(device)
                results["ranking_stability"] = ranking_stability(lora, batches, ns, args.calib_steps)
        if args.deberta:
            cfg = deberta_v3_base_config()
            torch.manual_seed(0)
            base = AutoModelForSequenceClassification.from_config(cfg)
            label = "DeBERTa-v3-base shapes (random init)"
            if batches and args.pad_to_multiple_of:  # the compiled run's shapes: SST-2's padded lengths
                batches = [{k: v for k, v in b.items() if k != "token_type_ids"} for b in batches]  # type_vocab 0
                label = "DeBERTa-v3-base shapes (random init, SST-2 batch shapes)"
            else:
                batches = random_batches(cfg.vocab_size, n_batches, args.batch, args.seq, device)
            run_model(label, base, batches, args, results)
        results["complete"] = True
    finally:
        save(results, args)


def save(results: dict, args: argparse.Namespace) -> None:
    os.makedirs(args.out, exist_ok=True)
    Path(args.out, f"{args.name}.json").write_text(json.dumps(results, indent=1))
    md = to_markdown(results)
    if not results.get("complete"):
        md += "\n**Stopped early (SIGTERM or an error): only the sections above were measured.**\n"
    Path(args.out, f"{args.name}.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
