r"""IW-LoRA under QLoRA on one GPU: sensitivities of 4-bit NF4 / 8-bit vs bf16 base weights, IW-LoRA ÷ LoRA step
time on a 4-bit model with the calibration cost, and peak GPU memory of bf16 LoRA, 4-bit LoRA and 4-bit IW-LoRA.

Model: all-mpnet-base-v2 (real weights, sequence classification, 72 LoRA targets: every linear layer of the 12
blocks; the newly initialised ``classifier`` head is seeded once and copied into every load, kept unquantized and
trained in full) with real SST-2 batches (the first ``n × batch`` rows of ``train.tsv``, padded to ``--seq``). The
encoder itself is quantized: bitsandbytes replaces every ``nn.Linear`` outside the head by ``Linear4bit`` /
``Linear8bitLt`` (checked on CPU with transformers 5.24 + bitsandbytes 0.50.2: all 72 targets load as
``Linear4bit`` and calibrate), so no random-weight decoder stands in for it — a random model's importance ranking
would say nothing about how quantization moves a real one's. Every load is the same checkpoint, the bf16 and
quantized ones with ``dtype=bfloat16`` (embeddings, norms, head): only the 72 matrices differ between them:

* ``bf16`` — the reference; ``nf4`` — ``BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
  bnb_4bit_compute_dtype=torch.bfloat16)``; ``int8`` — ``BitsAndBytesConfig(load_in_8bit=True)``; ``fp32`` — the
  checkpoint in float32 without autocast (TF32 off), a noise floor: how far bf16 itself is from full precision.
  A variant other than bf16 and nf4 that fails to load or calibrate is recorded with its error, not fatal.

1. **Sensitivities**: ``compute_sensitivities`` (what ``IWTrainer`` runs before step 0, bf16 autocast as with
   ``--bf16``) on the same ``--calib_steps`` batches for each variant; per variant vs bf16 (and vs fp32): Spearman ρ
   over the matrices, relative difference per matrix (max, median), the max change of the penalty coefficients
   (1 − w)^β under ``sum`` and ``max`` normalisation, top-quarter overlap.
2. **Step time**: bf16 LoRA, 4-bit LoRA and 4-bit IW-LoRA (α = 1e-4, coefficients from the 4-bit calibration) in
   one process, each step what the Trainer does (``IWTrainer.compute_loss``, backward, the penalty gradient, AdamW
   step, zero_grad) under bf16 autocast; ``benchmarks/bench_step.py``'s interleaved rounds (median ms/step) and
   adjacent-block paired ratio, and its calibration cost (``--calib_steps`` batches on the 4-bit model, warmed up)
   as LoRA steps and as a share of a 3-epoch SST-2 run.
3. **Peak memory**: ``torch.cuda.max_memory_allocated``, reset before each phase, one model on the GPU at a time:
   bf16 LoRA training steps, 4-bit LoRA training steps, 4-bit IW-LoRA calibration and 4-bit IW-LoRA training steps
   (no gradient checkpointing). Calibration is measured twice: with one micro-batch per batch (what this run's
   Trainer does: each target's gradient lives only in a temporary of its own size) and with gradient accumulation 2
   (then it keeps one flat fp32 buffer of every adapted base weight's gradient, as under DDP: ``4 × Σ d_out·d_in``
   bytes, stated beside the measured peaks as computed from the shapes).

Output: ``--out PREFIX`` writes ``PREFIX.json`` (every number, the per-matrix sensitivities of every variant,
versions, device, command line) and ``PREFIX.md`` (each number and whether it meets the checks: IW/LoRA step
≤ 1.01, Spearman 4-bit/8-bit vs bf16 ≥ ``--min_spearman``, IW-LoRA training peak ≤ 1.01 × LoRA's under 4-bit, 4-bit
IW-LoRA's peak including calibration below bf16 LoRA's).

On the GPU machine (one H200; torch+cu130, transformers, peft, accelerate, scipy there, bitsandbytes not): the model
staged at /tmp/models/all-mpnet-base-v2 by earlier calls (``.mp/`` holds it in four ≤ 55 MiB parts:
``sh reassemble.sh DIR_WITH_PARTS /tmp/models``), then one call carrying ``.whl_bnb`` (the bitsandbytes 0.50.2
manylinux wheel) and ``.gpu/glue`` (with ``SST-2/train.tsv``):

    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl_bnb/*.whl && \
      export PYTHONPATH=/tmp/site:$PWD && \
      python3 benchmarks/bench_qlora.py --model /tmp/models/all-mpnet-base-v2 --glue_dir .gpu/glue --out $OUT/qlora

(``bash benchmarks/bench_qlora.sh`` does the same and keeps the log in ``$OUT``); copy ``$OUT/qlora.{json,md}`` to
``benchmarks/results/``. On a CPU, ``--tiny`` runs every code path in seconds on an MPNet of hidden size 64 built
from its config (random weights, random tokens, one thread, no CUDA memory numbers; the numbers mean nothing):

    python benchmarks/bench_qlora.py --tiny --out /tmp/qlora_tiny
"""

from __future__ import annotations

import argparse
import gc
import importlib.metadata
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers
from scipy.stats import spearmanr

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from bench_step import (  # noqa: E402
    STEP_STAGES,
    calibration_cost,
    make_step,
    paired_ratio,
    random_batches,
    sst2_batches,
    time_methods,
)

from iwtrainer import IWTrainer, IWTrainingArguments, compute_sensitivities, find_lora_targets  # noqa: E402
from iwtrainer.importance import importance_record  # noqa: E402
from iwtrainer.targets import discover_target_modules, find_head_modules  # noqa: E402

REFERENCE = "bf16"
VARIANTS = ("bf16", "nf4", "int8", "fp32")
LABELS = {"bf16": "bf16", "nf4": "4-bit NF4", "int8": "8-bit (LLM.int8)", "fp32": "fp32 (no autocast)"}
ALPHA = 1e-4
TINY = dict(batch=4, seq=16, calib_steps=2, rounds=2, steps=1, pairs=2, block=1, mem_steps=1)
FULL = dict(batch=32, seq=128, calib_steps=150, rounds=7, steps=30, pairs=60, block=5, mem_steps=3)
START = time.perf_counter()
VERSIONED = ("torch", "transformers", "peft", "accelerate", "bitsandbytes", "scipy")


def _cuda() -> bool:
    return torch.cuda.is_available()


def _sync() -> None:
    if _cuda():
        torch.cuda.synchronize()


def _free() -> None:
    """Drop what the last phase left on the GPU (on a CPU nothing is measured: a collection would only cost time)."""
    if _cuda():
        gc.collect()
        torch.cuda.empty_cache()


def _say(message: str) -> None:
    print(f"[{time.perf_counter() - START:7.1f} s] {message}", flush=True)


def _gib(value: int) -> float | None:
    return value / 2**30 if _cuda() else None


def tiny_model(folder: Path) -> str:
    """An MPNet classifier of hidden size 64 (bitsandbytes quantizes in blocks of 64) saved in fp32."""
    from transformers import MPNetConfig, MPNetForSequenceClassification

    torch.manual_seed(0)
    cfg = MPNetConfig(vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                      intermediate_size=128, max_position_embeddings=80, num_labels=2)  # fmt: skip
    MPNetForSequenceClassification(cfg).save_pretrained(folder)
    return str(folder)


class Loader:
    """Loads the checkpoint as each variant with the same LoRA targets and the same (seeded) head weights.

    The first load (bf16) fixes the head modules, the adapted matrices and the head's weights; quantized loads skip
    the head (``llm_int8_skip_modules``), so it stays a bf16 ``nn.Linear`` trained in full as in the bf16 model.
    """

    def __init__(self, path: str, device: str):
        self.path, self.device = path, device
        self.heads: list[str] = []
        self.targets: list[str] = []
        self.head_state: dict[str, dict[str, torch.Tensor]] = {}
        base = self.base(REFERENCE)
        self.heads = find_head_modules(base)
        self.targets = discover_target_modules(base, exclude=self.heads)
        self.head_state = {
            h: {k: v.detach().float().cpu().clone() for k, v in base.get_submodule(h).state_dict().items()}
            for h in self.heads
        }
        del base

    def base(self, variant: str) -> torch.nn.Module:
        from transformers import AutoModelForSequenceClassification, BitsAndBytesConfig

        kwargs = {"num_labels": 2, "dtype": torch.float32 if variant == "fp32" else torch.bfloat16}
        if variant == "nf4":
            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16,
                llm_int8_skip_modules=self.heads,
            )  # fmt: skip
        elif variant == "int8":
            kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=self.heads)
        if "quantization_config" in kwargs:
            kwargs["device_map"] = {"": torch.cuda.current_device() if self.device == "cuda" else "cpu"}
        torch.manual_seed(0)
        model = AutoModelForSequenceClassification.from_pretrained(self.path, **kwargs)
        if "quantization_config" not in kwargs:
            model.to(self.device)
        for head, state in self.head_state.items():
            model.get_submodule(head).load_state_dict(state)
        return model

    def lora(self, variant: str) -> torch.nn.Module:
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.1, target_modules=self.targets,
                            modules_to_save=self.heads)  # fmt: skip
        model = get_peft_model(self.base(variant), config)
        found = len(find_lora_targets(model))
        if found != len(self.targets):
            raise RuntimeError(f"{variant}: {found} LoRA targets, expected {len(self.targets)}")
        return model


def base_layer_types(model: torch.nn.Module) -> list[str]:
    return sorted({type(t.module.get_base_layer()).__name__ for t in find_lora_targets(model)})


def calibration_buffer_gib(model: torch.nn.Module) -> float:
    """What calibration's flat fp32 gradient buffer holds: one ``d_out × d_in`` matrix per target (from the shapes)."""
    layers = [t.module.get_base_layer() for t in find_lora_targets(model)]
    return 4 * sum(b.out_features * b.in_features for b in layers) / 2**30


def _trainer(model: torch.nn.Module, alpha: float, out: str) -> IWTrainer:
    args = IWTrainingArguments(output_dir=out, iw_alpha=alpha, report_to="none", bf16=_cuda(), save_strategy="no",
                               disable_tqdm=True)  # fmt: skip
    return IWTrainer(model=model, args=args)


def _method(model: torch.nn.Module, alpha: float, out: str, sensitivities: dict | None = None) -> tuple:
    """(trainer, model, optimizer) as bench_step builds them; IW-LoRA gets its record from ``sensitivities``."""
    trainer = _trainer(model, alpha, out)
    if alpha:
        trainer.iw_callback.record = importance_record(sensitivities, "sum", 1.0)
    return trainer, model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)


def _require_penalty(trainer: IWTrainer) -> None:
    """An IW-LoRA step must carry the penalty (its value is logged wherever it is added)."""
    if "iw_penalty" not in trainer._iw_logs:
        raise RuntimeError("an IW-LoRA step ran without the IW penalty")


def _calibrate(model: torch.nn.Module, variant: str, batches: list[dict], n: int, ga: int = 1):
    autocast = None if variant == "fp32" else torch.bfloat16
    return compute_sensitivities(model, batches, num_steps=n, gradient_accumulation_steps=ga, autocast_dtype=autocast,
                                 show_progress=False)  # fmt: skip


def compare(ref: dict[str, float], other: dict[str, float]) -> dict:
    """``other``'s sensitivities against ``ref``'s, matrix by matrix (in ``ref``'s order)."""
    names = list(ref)
    if sorted(names) != sorted(other):
        raise ValueError("the two sensitivity dicts name different matrices")
    rel = {n: abs(other[n] / ref[n] - 1) for n in names}
    worst = max(rel, key=rel.get)
    top = lambda d: set(sorted(d, key=d.get, reverse=True)[: max(1, len(d) // 4)])  # noqa: E731
    coef = {}
    for norm in ("sum", "max"):
        a, b = importance_record(ref, norm, 1.0)["modules"], importance_record(other, norm, 1.0)["modules"]
        coef[norm] = max(abs(a[n]["coefficient"] - b[n]["coefficient"]) for n in names)
    return {
        "spearman": float(spearmanr([ref[n] for n in names], [other[n] for n in names]).statistic),
        "max_rel_diff": rel[worst],
        "max_rel_diff_matrix": worst,
        "median_rel_diff": statistics.median(rel.values()),
        "coefficient_max_abs_diff": coef,
        "top_quarter_overlap": len(top(ref) & top(other)) / len(top(ref)),
        "rel_diff": rel,
    }


def _sensitivity_run(loader: Loader, variant: str, batches: list[dict], n: int) -> dict:
    model = loader.lora(variant)
    _sync()
    t0 = time.perf_counter()
    sens = _calibrate(model, variant, batches, n)
    _sync()
    return {
        "base_layers": base_layer_types(model),
        "batches": sens.batches,
        "seconds_incl_first_call": time.perf_counter() - t0,
        "sensitivities": dict(sens),
    }


def sensitivities(loader: Loader, variants: list[str], batches: list[dict], n: int) -> dict:
    """Each variant calibrated on the same ``n`` batches, then compared matrix by matrix with bf16 (and fp32)."""
    runs = {}
    for variant in variants:
        try:
            runs[variant] = _sensitivity_run(loader, variant, batches, n)
        except Exception as exc:  # an extra variant (int8, fp32) must not cost the run its main numbers
            if variant in (REFERENCE, "nf4"):
                raise
            runs[variant] = {"error": f"{type(exc).__name__}: {exc}"}
        _free()
        _say(f"sensitivities {variant}: {runs[variant].get('base_layers', runs[variant].get('error'))}")
    ok = {v: r["sensitivities"] for v, r in runs.items() if "sensitivities" in r}
    comparisons = {ref: {v: compare(ok[ref], s) for v, s in ok.items() if v != ref} for ref in (REFERENCE, "fp32")
                   if ref in ok}  # fmt: skip
    return {"runs": runs, "vs": comparisons}


def _phase(out: dict, name: str, fn, **extra) -> None:
    """Run ``fn`` with the peak-memory counter reset (peak None on CPU, where the phase still runs)."""
    _free()
    resident = torch.cuda.memory_allocated() if _cuda() else 0
    if _cuda():
        torch.cuda.reset_peak_memory_stats()
    fn()
    _sync()
    peak = torch.cuda.max_memory_allocated() if _cuda() else 0
    out[name] = {"peak_gib": _gib(peak), "resident_before_gib": _gib(resident), **extra}
    _say(f"memory {name}: {out[name]}")


def _stage_peak(stage: str, step: int) -> dict:
    """The peak allocated GiB since the last reset (the stage that just ran) and the GiB still allocated after it;
    resets the peak counter for the next stage. On CPU: None."""
    if not _cuda():
        return {"step": step, "stage": stage, "peak_gib": None, "after_gib": None}
    torch.cuda.synchronize()
    row = {"step": step, "stage": stage, "peak_gib": _gib(torch.cuda.max_memory_allocated()),
           "after_gib": _gib(torch.cuda.memory_allocated())}  # fmt: skip
    torch.cuda.reset_peak_memory_stats()
    return row


def _memory_of(out: dict, loader: Loader, variant: str, alpha: float, batches: list[dict], args, tmp: str) -> None:
    name = f"{variant}_{'iw_lora' if alpha else 'lora'}"
    start = torch.cuda.memory_allocated() if _cuda() else 0
    model = loader.lora(variant)
    info = {"model_footprint_gib": model.get_memory_footprint() / 2**30, "start_gib": _gib(start)}
    sens: dict[str, float] = {}
    if alpha:
        info["calibration_buffer_gib"] = calibration_buffer_gib(model)
        n = min(args.calib_steps, 4)
        _phase(out, f"{name}_calibration", lambda: sens.update(_calibrate(model, variant, batches, n)),
               calib_batches=n, gradient_accumulation_steps=1, **info)  # fmt: skip
        n2 = max(1, min(n, len(batches) // 2))
        _phase(out, f"{name}_calibration_ga2", lambda: _calibrate(model, variant, batches, n2, ga=2),
               calib_batches=n2, gradient_accumulation_steps=2, **info)  # fmt: skip
    method = _method(model, alpha, tmp, sens)
    stages: list[dict] = []  # per step and stage: the peak since the previous stage ended, and what stays allocated
    probe = lambda stage: stages.append(_stage_peak(stage, len(stages) // len(STEP_STAGES)))  # noqa: E731
    step = make_step(name, *method, probe=probe)
    _phase(out, name, lambda: [step(b) for b in batches[: args.mem_steps]], steps=args.mem_steps, **info)
    out[name]["stages"] = stages
    if _cuda():  # the stages reset the counter: the phase's peak is the largest of theirs
        out[name]["peak_gib"] = max([out[name]["peak_gib"], *(r["peak_gib"] for r in stages)])
    if alpha:
        _require_penalty(method[0])


def memory(loader: Loader, batches: list[dict], args: argparse.Namespace, tmp: str) -> dict:
    """Peak allocated GiB per phase, one model on the GPU at a time: bf16 LoRA, 4-bit LoRA, 4-bit IW-LoRA's
    calibration and its training steps (each model built, measured and dropped before the next)."""
    out: dict[str, dict] = {}
    for variant, alpha in (("bf16", 0.0), ("nf4", 0.0), ("nf4", ALPHA)):
        _free()
        _memory_of(out, loader, variant, alpha, batches, args, tmp)
    _free()
    return out


def timing(loader: Loader, sens_nf4: dict, batches: list[dict], args: argparse.Namespace, tmp: str) -> dict:
    methods = {
        "bf16_lora": _method(loader.lora("bf16"), 0.0, tmp),
        "nf4_lora": _method(loader.lora("nf4"), 0.0, tmp),
        "nf4_iw_lora": _method(loader.lora("nf4"), ALPHA, tmp, sens_nf4),
    }
    steps = {k: make_step(k, *v) for k, v in methods.items()}
    steps["nf4_iw_lora"](batches[0])
    _require_penalty(methods["nf4_iw_lora"][0])
    rounds = time_methods(steps, batches, args.rounds, args.steps)
    lora_ms = rounds["nf4_lora"]["ms_per_step"]
    for v in rounds.values():
        v["ratio_vs_nf4_lora"] = v["ms_per_step"] / lora_ms
    _say(f"timing {json.dumps(rounds)}")
    paired = None
    if args.pairs:
        paired = paired_ratio(steps["nf4_lora"], steps["nf4_iw_lora"], batches, args.pairs, args.block)
    _say(f"paired nf4_iw_lora / nf4_lora {json.dumps(paired)}")
    calibration = calibration_cost(methods["nf4_lora"][1], batches, lora_ms, args.calib_steps)
    _say(f"calibration {json.dumps(calibration)}")
    del methods, steps
    _free()
    return {"rounds": rounds, "paired_nf4_iw_over_lora": paired, "nf4_calibration": calibration}


def _check(name: str, value: float | None, op: str, threshold: float) -> dict:
    met = None if value is None else (value <= threshold if op == "<=" else value >= threshold)
    return {"check": name, "value": value, "op": op, "threshold": threshold, "met": met}


def checks(result: dict, min_spearman: float) -> list[dict]:
    """The issue's checks, each with its measured value (None where this run could not measure it: CPU memory)."""
    t, vs, mem = result["step_time"], result["sensitivity"]["vs"].get(REFERENCE, {}), result["memory"]
    rounds, paired = t["rounds"]["nf4_iw_lora"]["ratio_vs_nf4_lora"], t["paired_nf4_iw_over_lora"]
    paired = paired["ratio_median"] if paired else None
    out = [
        _check("4-bit IW-LoRA / LoRA step time, median of interleaved rounds", rounds, "<=", 1.01),
        _check("4-bit IW-LoRA / LoRA step time, median of paired adjacent blocks", paired, "<=", 1.01),
    ]
    for v in ("nf4", "int8"):
        rho = vs[v]["spearman"] if v in vs else None
        out.append(_check(f"Spearman ρ of {LABELS[v]} vs bf16 sensitivities", rho, ">=", min_spearman))
    peak = {k: v["peak_gib"] for k, v in mem.items()}
    iw, lora, bf16 = peak["nf4_iw_lora"], peak["nf4_lora"], peak["bf16_lora"]
    iw_all = max(iw, peak["nf4_iw_lora_calibration"]) if iw is not None else None
    out.append(_check("4-bit IW-LoRA training peak ÷ 4-bit LoRA training peak", iw / lora if iw else None, "<=", 1.01))
    out.append(_check("4-bit IW-LoRA peak incl. calibration ÷ bf16 LoRA training peak",
                      iw_all / bf16 if iw_all else None, "<=", 1.0))  # fmt: skip
    return out


def _fmt(value: float | None, spec: str = ".4f") -> str:
    return "not measured" if value is None else format(value, spec)


def to_markdown(r: dict) -> str:
    s, t, mem = r["setup"], r["step_time"], r["memory"]
    head = "# IW-LoRA under QLoRA: sensitivities, step time and memory" + (" (TINY CPU MODE)" if r["tiny"] else "")
    lines = [
        head,
        "",
        f"Produced by `{r['command']}` on {r['device']} in {r['seconds']:.0f} s; "
        + ", ".join(f"{k} {v}" for k, v in r["versions"].items())
        + f"; iwtrainer commit {r['commit'] or 'unknown'}.",
        "",
        f"Model: {s['model']} ({s['targets']} LoRA targets, r = 8; head {', '.join(s['heads'])} trained in full, "
        f"unquantized); data: {s['data']}; batch {s['batch']}, sequence length {s['seq']}; bf16 autocast on "
        f"every variant but fp32; α = {ALPHA:g} for IW-LoRA (`sum` normalisation, β = 1).",
    ]
    if r["tiny"]:
        lines += ["", "**Tiny mode: a random config-built model on random tokens; these numbers check the code "
                      "paths only and mean nothing about QLoRA.**"]  # fmt: skip
    lines += ["", "## Checks", "", "| check | measured | threshold | met |", "|---|---:|---:|---|"]
    for c in r["checks"]:
        met = "not measured" if c["met"] is None else ("yes" if c["met"] else "**no**")
        lines.append(f"| {c['check']} | {_fmt(c['value'])} | {c['op']} {c['threshold']:g} | {met} |")
    runs = r["sensitivity"]["runs"]
    lines += [
        "",
        f"## 1. Sensitivities ({s['calib_steps']} calibration batches, the same for every variant)",
        "",
        "| variant | vs | base layers | Spearman ρ | max rel. diff (matrix) | median rel. diff | max Δ coefficient "
        "(sum / max) | top-quarter overlap |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for ref, others in r["sensitivity"]["vs"].items():
        for v, c in others.items():
            cd = c["coefficient_max_abs_diff"]
            lines.append(
                f"| {LABELS[v]} | {ref} | {', '.join(runs[v]['base_layers'])} | {c['spearman']:.4f} | "
                f"{c['max_rel_diff']:.2e} (`{c['max_rel_diff_matrix']}`) | {c['median_rel_diff']:.2e} | "
                f"{cd['sum']:.1e} / {cd['max']:.1e} | {c['top_quarter_overlap']:.2f} |"
            )
    for v, run in runs.items():
        if "error" in run:
            lines.append(f"| {LABELS[v]} | – | failed: `{run['error'][:200]}` | | | | | |")
    lines += [
        "",
        "Relative difference per matrix = |s_variant / s_ref − 1|; every matrix's value is in the JSON "
        "(`sensitivity.runs.*.sensitivities`, `sensitivity.vs.*.*.rel_diff`).",
        "",
        "## 2. Step time (one process, interleaved rounds)",
        "",
        "| method | ms/step (median) | × 4-bit LoRA | min–max ms | rounds |",
        "|---|---:|---:|---:|---:|",
    ]
    for k, v in t["rounds"].items():
        lines.append(f"| {k} | {v['ms_per_step']:.2f} | {v['ratio_vs_nf4_lora']:.4f} | {v['ms_min']:.2f}–"
                     f"{v['ms_max']:.2f} | {v['rounds']} |")  # fmt: skip
    p = t["paired_nf4_iw_over_lora"]
    if p:
        lines += [
            "",
            f"Paired nf4_iw_lora / nf4_lora: **{p['ratio_median']:.4f}×** (median of {p['pairs']} adjacent "
            f"{p['block']}-step blocks, interquartile {p['ratio_q1']:.4f}–{p['ratio_q3']:.4f}).",
        ]
    c = t["nf4_calibration"]
    share = (f"; a 3-epoch SST-2 run at batch 32 ({c['sst2_3epoch_lora_steps']} steps at this 4-bit LoRA step time) "
             f"would spend **{100 * c['calib_share_of_sst2_run']:.2f} %** of its time calibrating"
             if s["batch"] == 32 else "")  # fmt: skip
    lines += [
        "",
        f"Calibration on the 4-bit model: {c['calib_batches']} batches in {c['calib_seconds']:.2f} s "
        f"({c['calib_ms_per_batch']:.1f} ms/batch = {c['calib_batch_over_lora_step']:.2f} 4-bit LoRA steps){share}.",
        "",
        "## 3. Peak GPU memory (reset before each phase, one model on the GPU)",
        "",
        "| phase | peak GiB | allocated before the phase GiB | model footprint GiB |",
        "|---|---:|---:|---:|",
    ]
    for k, v in mem.items():
        if "calib_batches" in v:
            what = f"{k} ({v['calib_batches']} batches × {v['gradient_accumulation_steps']} micro-batches)"
        else:
            what = f"{k} (training steps: {v['steps']})"
        lines.append(f"| {what} | {_fmt(v['peak_gib'], '.3f')} | {_fmt(v['resident_before_gib'], '.3f')} | "
                     f"{v['model_footprint_gib']:.3f} |")  # fmt: skip
    buffer = mem["nf4_iw_lora"]["calibration_buffer_gib"]
    lines += [
        "",
        f"The flat fp32 buffer that calibration keeps under gradient accumulation (and DDP) for these "
        f"{s['targets']} matrices, computed from their shapes (not measured): {buffer:.3f} GiB; with one micro-batch "
        "per batch on one process there is none. Model footprint: `get_memory_footprint()` of the peft model.",
        "",
    ]
    staged = {k: v["stages"] for k, v in mem.items() if v.get("stages")}
    if staged and all(r["peak_gib"] is not None for rows in staged.values() for r in rows):
        lines += [
            "Peak GiB of each stage of each training step (the counter reset when the previous stage ended; after it: "
            "what stays allocated):",
            "",
            "| step / stage | " + " | ".join(staged) + " |",
            "|---|" + "---:|" * len(staged),
        ]
        for i, row in enumerate(next(iter(staged.values()))):
            cells = [f"{rows[i]['peak_gib']:.3f} (after {rows[i]['after_gib']:.3f})" for rows in staged.values()]
            lines.append(f"| {row['step']} / {row['stage']} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def versions() -> dict[str, str]:
    out = {}
    for name in VERSIONED:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    out["torch"] = torch.__version__
    out["python"] = platform.python_version()
    return out


def commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip() or None  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="all-mpnet-base-v2 folder (real weights)")
    p.add_argument("--glue_dir", help="GLUE folder with SST-2/train.tsv (TSV, header sentence<TAB>label)")
    p.add_argument("--tiny", action="store_true", help="CPU check: a hidden-64 MPNet from its config, random tokens")
    p.add_argument("--out", required=True, help="output prefix: writes PREFIX.json and PREFIX.md")
    p.add_argument("--variants", default=",".join(VARIANTS), help="bf16 (always) and any of nf4, int8, fp32")
    p.add_argument("--min_spearman", type=float, default=0.95)
    for key, value in FULL.items():
        p.add_argument(f"--{key}", type=int, help=f"default {value} ({TINY[key]} with --tiny)")
    args = p.parse_args(argv)
    for key, value in (TINY if args.tiny else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if not args.tiny and not (args.model and args.glue_dir):
        p.error("--model and --glue_dir are required (or --tiny)")
    variants = [v for v in args.variants.split(",") if v]
    if set(variants) - set(VARIANTS) or "nf4" not in variants:
        p.error(f"--variants: from {VARIANTS}, with nf4")
    args.variants = [REFERENCE] + [v for v in variants if v != REFERENCE]
    return args


def measure(args: argparse.Namespace, device: str) -> tuple[Loader, str, str, dict, dict, dict]:
    """The three measurements: memory first (the GPU still empty), then sensitivities, then step time."""
    with tempfile.TemporaryDirectory() as tmp:
        n_batches = args.calib_steps if args.tiny else max(args.calib_steps, 40)
        if args.tiny:
            path, data = tiny_model(Path(tmp) / "model"), "random tokens (seeded)"
            batches = random_batches(1000, n_batches, args.batch, args.seq, device)
        else:
            if not (Path(args.model) / "config.json").is_file():
                sys.exit(f"no model at {args.model} (stage all-mpnet-base-v2 there first)")
            path, data = args.model, f"SST-2 train.tsv, first {n_batches * args.batch} rows"
            batches = sst2_batches(args.model, os.path.join(args.glue_dir, "SST-2"), n_batches, args.batch, args.seq,
                                   device)  # fmt: skip
        loader = Loader(path, device)
        mem = memory(loader, batches, args, tmp)
        sens = sensitivities(loader, args.variants, batches, args.calib_steps)
        steps = timing(loader, sens["runs"]["nf4"]["sensitivities"], batches, args, tmp)
    return loader, path, data, mem, sens, steps


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    start = time.perf_counter()
    device = "cuda" if _cuda() else "cpu"
    log = transformers.utils.logging
    bars, verbosity, tf32 = log.is_progress_bar_enabled(), log.get_verbosity(), torch.backends.cuda.matmul.allow_tf32
    log.disable_progress_bar()  # eleven loads: their bars and load reports (the head is new) would bury the log
    log.set_verbosity_error()
    threads = torch.get_num_threads()
    if args.tiny:  # tiny matmuls: on a busy CPU, threads waiting for each other cost ~10× (measured)
        torch.set_num_threads(1)
    torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 reference is fp32 (the others run under bf16 autocast)
    try:
        loader, path, data, mem, sens, steps = measure(args, device)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.set_num_threads(threads)
        log.set_verbosity(verbosity)
        if bars:
            log.enable_progress_bar()
    result = {
        "tiny": args.tiny,
        "command": shlex.join(["python3", *(sys.argv if argv is None else [os.path.relpath(__file__, ROOT), *argv])]),
        "argv": sys.argv if argv is None else argv,
        "device": torch.cuda.get_device_name() if _cuda() else platform.processor() or "cpu",
        "versions": versions(),
        "commit": commit(),
        "tf32_matmul": False,
        "setup": {
            "model": "MPNet hidden 64, 2 layers, random weights (tiny)" if args.tiny else "all-mpnet-base-v2",
            "path": path if not args.tiny else None,
            "data": data,
            "batch": args.batch,
            "seq": args.seq,
            "calib_steps": args.calib_steps,
            "targets": len(loader.targets),
            "heads": loader.heads,
            "variants": args.variants,
            "alpha": ALPHA,
        },
        "memory": mem,
        "sensitivity": sens,
        "step_time": steps,
    }
    result["checks"] = checks(result, args.min_spearman)
    result["seconds"] = time.perf_counter() - start
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_name(out.name + ".json").write_text(json.dumps(result, indent=1))
    md = to_markdown(result)
    out.with_name(out.name + ".md").write_text(md)
    print(md, flush=True)
    return result


if __name__ == "__main__":
    main()
