"""Peak memory of the IW calibration against a LoRA training step, on all-mpnet-base-v2's shapes (issue 15).

A random-weight MPNet built from its config (768 hidden, 12 layers, 3072 intermediate: 72 LoRA targets, r = 8,
lora_dropout 0.1, as the GLUE runs), one batch of ``--batch`` × ``--seq`` tokens. Each phase's peak above the memory
held before it (the model, and the optimizer state for the training step):

* ``plain_eval``: an eval-mode forward and backward of the batch (the least any gradient calibration needs);
* ``calibration``: :func:`compute_sensitivities` on the batch (``--ga 2`` splits it into two micro-batches);
* ``train_step``: forward, backward and AdamW step in training mode, as the Trainer runs one.

On CUDA the peaks are ``torch.cuda.max_memory_allocated`` (as ``peak_gpu_memory_mb``); on CPU the allocator events of
``torch.profiler`` (CPU dropout keeps a mask as large as its input, CUDA's fused dropout one byte per element, so
``--cuda_like_dropout`` keeps a one-byte mask on CPU too).

    python benchmarks/bench_calibration_memory.py --batch 32 --seq 128 --bf16        # RTE's shape
    python benchmarks/bench_calibration_memory.py --batch 32 --seq 128 --bf16 --ga 1,2 \
        --out benchmarks/results/calibration_memory

``--out PREFIX`` writes ``PREFIX.json`` and a markdown table ``PREFIX.md``; ``--ga`` takes a comma list (one row each).
"""

from __future__ import annotations

import argparse
import gc
import json
from collections.abc import Callable
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import MPNetConfig, MPNetForSequenceClassification

from iwtrainer import compute_sensitivities

MIB = 2**20


class _OneByteDropout(torch.autograd.Function):
    """Dropout that keeps a bool mask for backward, as CUDA's fused kernel does."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, p: float) -> torch.Tensor:
        mask = torch.rand_like(x, dtype=torch.float32) >= p
        ctx.save_for_backward(mask)
        ctx.scale = 1 / (1 - p)
        return x * mask * ctx.scale

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (mask,) = ctx.saved_tensors
        return grad * mask * ctx.scale, None


def peak_mib(fn: Callable[[], object], device: torch.device) -> float:
    """Peak bytes allocated while ``fn`` runs, above those allocated when it starts."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        start = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - start) / MIB
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted(
        (e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"
    )
    now = top = 0
    for _, nbytes in events:
        now += nbytes
        top = max(top, now)
    return top / MIB


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (the GLUE runs' --bf16 true)")
    p.add_argument("--ga", default="1", help="calibration micro-batches per batch (comma list: one row each)")
    p.add_argument("--cuda_like_dropout", action="store_true", help="CPU: one-byte dropout masks")
    p.add_argument("--out", help="write PREFIX.json and PREFIX.md")
    args = p.parse_args()
    try:
        gas = [int(x) for x in args.ga.split(",")]
    except ValueError:
        p.error(f"--ga takes positive integers separated by commas, got {args.ga!r}")
    if any(x < 1 for x in gas):
        p.error(f"--ga takes positive integers separated by commas, got {args.ga!r}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if args.bf16 else None
    torch.manual_seed(0)
    config = MPNetConfig(hidden_size=768, num_hidden_layers=args.layers, num_attention_heads=12,
                         intermediate_size=3072, vocab_size=30527)  # fmt: skip
    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.1, task_type="SEQ_CLS",
                      target_modules=["q", "k", "v", "o", "intermediate.dense", "output.dense"])  # fmt: skip
    model = get_peft_model(MPNetForSequenceClassification(config), lora).to(device)
    g = torch.Generator().manual_seed(1)
    batch = {
        "input_ids": torch.randint(5, 30000, (args.batch, args.seq), generator=g),
        "attention_mask": torch.ones(args.batch, args.seq, dtype=torch.long),
        "labels": torch.randint(0, 2, (args.batch,), generator=g),
    }
    batch = {k: v.to(device) for k, v in batch.items()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    amp = torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)

    def plain_eval() -> None:
        model.eval()
        with amp:
            loss = model(**batch).loss
        torch.autograd.grad(loss, trainable)
        model.train()

    def calibration(ga: int) -> None:
        micro = [{k: v[i::ga] for k, v in batch.items()} for i in range(ga)]
        compute_sensitivities(model, micro, num_steps=1, gradient_accumulation_steps=ga, autocast_dtype=dtype,
                              show_progress=False)  # fmt: skip

    optimizer = torch.optim.AdamW(trainable, lr=1e-4)

    def train_step() -> None:
        model.train()
        with amp:
            loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    if args.cuda_like_dropout and device.type == "cpu":

        def dropout(x, p=0.5, training=True, inplace=False):  # noqa: ARG001 - F.dropout's signature
            return _OneByteDropout.apply(x, p) if training and p > 0 else x

        torch.nn.functional.dropout = dropout
    model_mib = (torch.cuda.memory_allocated() / MIB) if device.type == "cuda" else None
    result = {"device": torch.cuda.get_device_name() if device.type == "cuda" else str(device),
              "tokens": args.batch * args.seq, "layers": args.layers, "batch": args.batch, "seq": args.seq,
              "bf16": args.bf16, "model_mib": model_mib, "rows": []}  # fmt: skip
    plain = peak_mib(plain_eval, device)
    train_step()  # the optimizer state exists, as in every step after the first
    train = peak_mib(train_step, device)
    for ga in gas:
        calib = peak_mib(lambda: calibration(ga), device)  # noqa: B023 - called at once
        result["rows"].append({"ga": ga, "plain_eval_mib": plain, "calibration_mib": calib, "train_step_mib": train,
                               "calibration_over_train_step": calib / train})  # fmt: skip
    print(json.dumps(result, indent=1))
    if args.out:
        Path(args.out + ".json").write_text(json.dumps(result, indent=1) + "\n")
        Path(args.out + ".md").write_text(to_markdown(result))


def to_markdown(r: dict) -> str:
    lines = [
        "# Calibration's peak memory against a LoRA training step (mpnet-base shapes)",
        "",
        f"`benchmarks/bench_calibration_memory.py` on {r['device']}: a random-weight MPNet of all-mpnet-base-v2's "
        f"shapes ({r['layers']} layers: {6 * r['layers']} LoRA targets, r = 8, lora_dropout 0.1), one batch of "
        f"{r['batch']} × {r['seq']} tokens"
        f"{', bf16 autocast' if r['bf16'] else ''}. Peak MiB above what was held before each phase.",
        "",
        "| calibration micro-batches | eval forward+backward | calibration | training step | calibration ÷ step |",
        "|---:|---:|---:|---:|---:|",
    ]
    for row in r["rows"]:
        lines.append(f"| {row['ga']} | {row['plain_eval_mib']:.0f} | {row['calibration_mib']:.0f} | "
                     f"{row['train_step_mib']:.0f} | {row['calibration_over_train_step']:.3f} |")  # fmt: skip
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
