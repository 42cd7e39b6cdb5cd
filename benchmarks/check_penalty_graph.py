"""GPU checks of the IW penalty's CUDA graph (``IWPenalty.add_grad_``): correct, cheap in memory, safe to share.

The penalty gradient is one captured CUDA graph per ``IWPenalty``, warmed up and captured on one side stream per
device (``penalty._capture_stream``). cuBLAS keeps a workspace per stream, and some torch versions clear a stream's
workspaces when *a* graph captured on it is destroyed (pytorch/pytorch#193402) — a hazard for a second live graph on
the same stream. This script checks, on one GPU, with mpnet-base-shaped LoRA factors (72 targets, r = 8):

1. **equal**: the replayed gradient equals the eager closed form (fp32, relative to the largest entry);
2. **memory**: what stays allocated after the first ``add_grad_`` beyond the gradients themselves (the graph's
   outputs + the capture stream's cuBLAS workspace), and after a second penalty is captured (should add only its
   own outputs: the stream and its workspace are shared);
3. **shared stream survives a destroyed graph**: two penalties captured on the stream, the first deleted, the second
   replayed 50 times and compared with eager again (an illegal-address fault or a wrong result would show here);
4. **recapture does not grow memory**: 20 recaptures (factors replaced) of one penalty, allocated memory before/after.

    python benchmarks/check_penalty_graph.py --out benchmarks/results/penalty_graph

Writes OUT.json and OUT.md; exits 1 if a check fails. ``--device cpu`` is a smoke run of the script itself (the
penalty then takes its eager path: nothing about graphs or GPU memory is checked, and the report says so).
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from iwtrainer.penalty import IWPenalty  # noqa: E402
from iwtrainer.targets import LoraTarget  # noqa: E402

# all-mpnet-base-v2's adapted matrices: per layer q, k, v, o (768×768), intermediate (3072×768), output (768×3072).
SHAPES = [(768, 768)] * 4 + [(3072, 768), (768, 3072)]
LAYERS = 12
RANK = 8
MIB = 2**20


class _Lora(nn.Module):
    """The attributes of a peft LoRA layer that a ``LoraTarget`` reads, with random A and B (B ≠ 0)."""

    def __init__(self, d_out: int, d_in: int, g: torch.Generator):
        super().__init__()
        device = g.device
        self.lora_A = nn.ModuleDict({"default": nn.Linear(d_in, RANK, bias=False, device=device)})
        self.lora_B = nn.ModuleDict({"default": nn.Linear(RANK, d_out, bias=False, device=device)})
        with torch.no_grad():
            self.lora_A["default"].weight.copy_(torch.randn(RANK, d_in, device=device, generator=g) * 0.02)
            self.lora_B["default"].weight.copy_(torch.randn(d_out, RANK, device=device, generator=g) * 0.02)
        self.scaling = {"default": 2.0}


def factors(seed: int, device: str) -> list[LoraTarget]:
    """72 LoRA targets of mpnet-base's shapes."""
    g = torch.Generator(device=device).manual_seed(seed)
    return [LoraTarget(f"layer.{layer}.m{i}", _Lora(d_out, d_in, g), "default")
            for layer in range(LAYERS) for i, (d_out, d_in) in enumerate(SHAPES)]  # fmt: skip


def grads_of(penalty: IWPenalty, params: list[nn.Parameter], graph: bool) -> list[torch.Tensor]:
    for p in params:
        p.grad = None
    penalty.cuda_graph = graph
    penalty.add_grad_(1e-3)
    out = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    return out


def max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    """Largest absolute difference relative to the largest gradient entry of ``b``."""
    return max(float((x - y).abs().max()) for x, y in zip(a, b)) / max(float(y.abs().max()) for y in b)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="benchmarks/results/penalty_graph", help="writes OUT.json and OUT.md")
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help="cpu: a smoke run of this script")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA GPU here (the penalty's graph path is CUDA-only; --device cpu smoke-runs)")
    cuda = args.device == "cuda"
    allocated = torch.cuda.memory_allocated if cuda else lambda: 0
    sync = torch.cuda.synchronize if cuda else lambda: None

    checks: list[dict] = []

    def check(name: str, value: float, limit: float) -> None:
        checks.append({"check": name, "value": value, "limit": limit, "ok": value <= limit})

    first = factors(0, args.device)
    coefs = {t.name: 0.5 + (i % 7) / 10 for i, t in enumerate(first)}
    params = [q for t in first for q in (t.lora_A, t.lora_B)]
    grad_mib = sum(q.numel() * q.element_size() for q in params) / MIB
    pen = IWPenalty(first, coefs)

    eager = grads_of(pen, params, graph=False)
    sync()
    gc.collect()
    before = allocated()
    pen.cuda_graph = True
    pen.add_grad_(1e-3)  # first call: warm-up + capture + replay; .grad become views of the graph's outputs
    sync()
    kept_first = (allocated() - before) / MIB
    graphed = [q.grad.clone() for q in params]
    for q in params:
        q.grad = None
    check("graph gradient = eager gradient (largest difference ÷ largest entry)", max_diff(graphed, eager), 1e-5)
    check("MiB kept after the first penalty, beyond its 5 MiB of outputs (workspace)", kept_first - grad_mib, 33.0)

    second = factors(1, args.device)
    params2 = [q for t in second for q in (t.lora_A, t.lora_B)]
    pen2 = IWPenalty(second, coefs)
    eager2 = grads_of(pen2, params2, graph=False)
    gc.collect()
    before = allocated()
    pen2.cuda_graph = True
    pen2.add_grad_(1e-3)
    sync()
    for q in params2:
        q.grad = None
    kept_second = (allocated() - before) / MIB
    check("MiB a second penalty's graph keeps (its outputs only: stream shared)", kept_second, grad_mib + 1)

    del pen  # destroys the first graph captured on the shared stream
    gc.collect()
    worst = 0.0
    for _ in range(50):
        got = grads_of(pen2, params2, graph=True)
        worst = max(worst, max_diff(got, eager2))
    sync()
    check("second graph after the first is destroyed: 50 replays, largest relative difference", worst, 1e-5)

    gc.collect()
    before = allocated()
    for _ in range(20):  # replaced factors: every call recaptures
        for q in params2:
            q.data = q.data.clone()
        grads_of(pen2, params2, graph=True)
    sync()
    gc.collect()
    grown = (allocated() - before) / MIB
    check("MiB grown over 20 recaptures", grown, 1.0)

    report = {"device": torch.cuda.get_device_name() if cuda else "cpu (smoke run: eager path, no memory)",
              "torch": torch.__version__, "targets": len(first),
              "rank": RANK, "gradient_mib": grad_mib, "checks": checks}  # fmt: skip
    lines = [
        "# The IW penalty's CUDA graph: equal, small, safe to share",
        "",
        f"`python benchmarks/check_penalty_graph.py` on {report['device']}, torch {report['torch']}: "
        f"{len(first)} random LoRA targets of all-mpnet-base-v2's shapes, r = {RANK} "
        f"({grad_mib:.1f} MiB of fp32 gradients).",
        "",
        "| check | measured | limit | met |",
        "|---|---:|---:|---|",
        *(
            f"| {c['check']} | {c['value']:.3g} | {c['limit']:.3g} | {'yes' if c['ok'] else '**no**'} |"
            for c in checks
        ),  # fmt: skip
        "",
    ]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
    out.with_suffix(".md").write_text("\n".join(lines))
    print("\n".join(lines))
    if not all(c["ok"] for c in checks):
        raise SystemExit(1)
    return report


if __name__ == "__main__":
    main()
