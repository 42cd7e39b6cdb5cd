"""GPU checks of the IW penalty's CUDA graph (``IWPenalty.add_grad_``): correct, cheap in memory, safe to share.

The penalty gradient is one captured CUDA graph per ``IWPenalty``, warmed up and captured on one side stream per
device (``penalty._capture_stream``). cuBLAS keeps a workspace per stream (32 MiB on Hopper), and some torch versions
clear a stream's workspaces when *a* graph captured on it is destroyed (pytorch/pytorch#193402) — a hazard for a
second live graph on the same stream. For small ranks the graph forms its products by broadcasting, without cuBLAS
(``IWPenalty.graph_blas`` False), so the stream should get no workspace at all. This script checks, on one GPU, with
mpnet-base-shaped LoRA factors (72 targets, r = 8):

1. **equal**: the replayed gradient equals the eager closed form (fp32, relative to the largest entry);
2. **memory**: what stays allocated after the first ``add_grad_`` beyond the gradients themselves (the graph's
   outputs; a cuBLAS workspace if the graph ran matmuls), and after a second penalty is captured (should add only its
   own outputs);
3. **shared stream survives a destroyed graph**: two penalties captured on the stream, the first deleted, the second
   replayed 50 times and compared with eager again (an illegal-address fault or a wrong result would show here);
4. **recapture does not grow memory**: 20 recaptures (factors replaced) of one penalty, allocated memory before/after;
5. **the two forms side by side** (information, not checks): for r = 8 and r = 16, the broadcast and the matmul graph
   of the same factors — allocated and reserved MiB each first capture adds (broadcast ones first: a matmul graph
   leaves the stream's workspace for the rest of the process) and the GPU time of one replay, timed in alternating
   rounds of back-to-back replays (CUDA events), with the broadcast ÷ matmul ratio of each round's pair.

    python benchmarks/check_penalty_graph.py --out benchmarks/results/penalty_graph

Writes OUT.json and OUT.md; exits 1 if a check fails. ``--device cpu`` is a smoke run of the script itself (the
penalty then takes its eager path: nothing about graphs or GPU memory is checked, and the report says so).
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
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

    def __init__(self, d_out: int, d_in: int, g: torch.Generator, rank: int = RANK):
        super().__init__()
        device = g.device
        self.lora_A = nn.ModuleDict({"default": nn.Linear(d_in, rank, bias=False, device=device)})
        self.lora_B = nn.ModuleDict({"default": nn.Linear(rank, d_out, bias=False, device=device)})
        with torch.no_grad():
            self.lora_A["default"].weight.copy_(torch.randn(rank, d_in, device=device, generator=g) * 0.02)
            self.lora_B["default"].weight.copy_(torch.randn(d_out, rank, device=device, generator=g) * 0.02)
        self.scaling = {"default": 2.0}


def factors(seed: int, device: str, rank: int = RANK) -> list[LoraTarget]:
    """72 LoRA targets of mpnet-base's shapes."""
    g = torch.Generator(device=device).manual_seed(seed)
    return [LoraTarget(f"layer.{layer}.m{i}", _Lora(d_out, d_in, g, rank), "default")
            for layer in range(LAYERS) for i, (d_out, d_in) in enumerate(SHAPES)]  # fmt: skip


def factor_params(targets: list[LoraTarget]) -> list[nn.Parameter]:
    """Every target's A and B, in the order of the targets."""
    return [q for t in targets for q in (t.lora_A, t.lora_B)]


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


def replay_after_destroyed(penalty: IWPenalty, params: list[nn.Parameter], eager: list[torch.Tensor]) -> float:
    """Largest relative difference from eager over 50 replays of ``penalty``'s graph."""
    gc.collect()
    worst = 0.0
    for _ in range(50):
        worst = max(worst, max_diff(grads_of(penalty, params, graph=True), eager))
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return worst


def compare_forms(device: str, rounds: int, replays: int) -> list[dict]:
    """For r = 8 and 16: the broadcast and the matmul graph of the same factors — MiB allocated / reserved that each
    first capture adds beyond its outputs, and the GPU µs of one replay (median of ``rounds`` alternating rounds of
    ``replays`` back-to-back replays); broadcast ÷ matmul is the median of each round's ratio."""
    if device != "cuda":
        return []
    rows, graphs = [], {}
    for blas in (False, True):  # broadcast first: a matmul capture leaves the stream's workspace behind
        for rank in (8, 16):
            targets = factors(2 + rank, device, rank)
            params = factor_params(targets)
            pen = IWPenalty(targets, {t.name: 1.0 for t in targets})
            default_form = "matmul" if pen.graph_blas else "broadcast"
            pen.graph_blas = blas
            out_mib = sum(q.numel() * q.element_size() for q in params) / MIB
            torch.cuda.synchronize()
            gc.collect()
            alloc, reserved = torch.cuda.memory_allocated(), torch.cuda.memory_reserved()
            pen.add_grad_(1e-3)
            torch.cuda.synchronize()
            rows.append({"rank": rank, "form": "matmul" if blas else "broadcast", "outputs_mib": out_mib,
                         "allocated_beyond_outputs_mib": (torch.cuda.memory_allocated() - alloc) / MIB - out_mib,
                         "reserved_added_mib": (torch.cuda.memory_reserved() - reserved) / MIB,
                         "default_form": default_form})  # fmt: skip
            graphs[(rank, blas)] = (pen, params)
    times: dict[tuple, list[float]] = {key: [] for key in graphs}
    for _ in range(rounds):
        for key, (pen, _) in graphs.items():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(replays):
                pen._graph.replay()
            end.record()
            end.synchronize()
            times[key].append(start.elapsed_time(end) * 1000 / replays)
    for row in rows:
        key = (row["rank"], row["form"] == "matmul")
        row["replay_us"] = statistics.median(times[key])
        if row["form"] == "broadcast":
            pairs = zip(times[key], times[(row["rank"], True)])
            row["broadcast_over_matmul"] = statistics.median(x / y for x, y in pairs)
    return rows


def forms_table(rows: list[dict], rounds: int, replays: int) -> list[str]:
    """The markdown section of :func:`compare_forms`' rows (none on CPU)."""
    if not rows:
        return []

    def cells(r: dict) -> str:
        ratio = f"{r['broadcast_over_matmul']:.3f}" if "broadcast_over_matmul" in r else ""
        default = "yes" if r["default_form"] == r["form"] else "no"
        return (f"| {r['rank']} | {r['form']} | {default} | {r['outputs_mib']:.2f} "
                f"| {r['allocated_beyond_outputs_mib']:.2f} | {r['reserved_added_mib']:.1f} | {r['replay_us']:.1f} "
                f"| {ratio} |")  # fmt: skip

    return [
        "## Broadcast vs matmul graph (information)",
        "",
        "The same factors captured in each form; memory each first capture adds beyond its outputs (broadcast first: "
        f"a matmul capture leaves its stream's cuBLAS workspace); GPU µs of one replay, median of {rounds} "
        f"alternating rounds of {replays} back-to-back replays; broadcast ÷ matmul: median of the rounds' ratios.",
        "",
        "| r | form | the default at this r | outputs MiB | allocated beyond outputs MiB | reserved added MiB "
        "| replay µs | broadcast ÷ matmul |",
        "|---:|---|---|---:|---:|---:|---:|---:|",
        *map(cells, rows),
        "",
    ]


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="benchmarks/results/penalty_graph", help="writes OUT.json and OUT.md")
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help="cpu: a smoke run of this script")
    p.add_argument("--rounds", type=int, default=20, help="alternating timing rounds of the two forms")
    p.add_argument("--replays", type=int, default=100, help="back-to-back replays timed in one round")
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
    params = factor_params(first)
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
    form = "matmul" if pen.graph_blas else "broadcast"
    check(f"MiB kept after the first penalty ({form} form), beyond its 5 MiB of outputs", kept_first - grad_mib, 1.0)

    second = factors(1, args.device)
    params2 = factor_params(second)
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
    check("second graph after the first is destroyed: 50 replays, largest relative difference",
          replay_after_destroyed(pen2, params2, eager2), 1e-5)  # fmt: skip

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

    forms = compare_forms(args.device, args.rounds, args.replays)
    if cuda:  # the pytorch#193402 case proper: matmul graphs, whose stream has a cuBLAS workspace to lose
        third, fourth = factors(3, args.device), factors(4, args.device)
        pen3, pen4 = IWPenalty(third, coefs), IWPenalty(fourth, coefs)
        pen3.graph_blas = pen4.graph_blas = True
        params4 = factor_params(fourth)
        eager4 = grads_of(pen4, params4, graph=False)
        grads_of(pen3, factor_params(third), graph=True)
        grads_of(pen4, params4, graph=True)
        del pen3
        check("matmul form: second graph after the first is destroyed, largest relative difference",
              replay_after_destroyed(pen4, params4, eager4), 1e-5)  # fmt: skip

    report = {"device": torch.cuda.get_device_name() if cuda else "cpu (smoke run: eager path, no memory)",
              "torch": torch.__version__, "targets": len(first),
              "rank": RANK, "gradient_mib": grad_mib, "checks": checks, "forms": forms}  # fmt: skip
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
    lines += forms_table(forms, args.rounds, args.replays)
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
