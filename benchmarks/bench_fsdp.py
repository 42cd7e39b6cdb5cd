"""IW-LoRA under FSDP2 against DDP on 2 GPUs: the same run (a Llama-layout decoder built from its config, LoRA on
all seven projections, token-level loss, IWTrainer at α = 1e-2) launched both ways; the sensitivities and the loss,
task-loss and penalty curves must match (up to the float order of a sharded reduction).

    accelerate launch --config_file benchmarks/accelerate_ddp.yaml benchmarks/bench_fsdp.py --out $OUT/ddp.json
    accelerate launch --config_file benchmarks/accelerate_fsdp2.yaml benchmarks/bench_fsdp.py --out $OUT/fsdp2.json
    python benchmarks/bench_fsdp.py --compare $OUT/ddp.json $OUT/fsdp2.json --results benchmarks/results/fsdp2_vs_ddp

(``benchmarks/bench_fsdp.sh`` runs all three on the 2-GPU machine.)
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch


def build(seed: int = 0):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=97, hidden_size=512, num_hidden_layers=4, num_attention_heads=8,
                      num_key_value_heads=4, intermediate_size=1376, max_position_embeddings=256)  # fmt: skip
    projections = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, task_type="CAUSAL_LM", target_modules=projections)
    return get_peft_model(LlamaForCausalLM(cfg), lora)


class Tokens(torch.utils.data.Dataset):
    """Seeded token sequences of one length (no padding): the prompt half masked out of the labels."""

    def __init__(self, n: int = 1024, length: int = 128, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(4, 97, (n, length), generator=g)
        self.labels = self.ids.clone()
        self.labels[:, : length // 2] = -100

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "attention_mask": torch.ones_like(self.ids[i]), "labels": self.labels[i]}


def train(out: str) -> None:
    from iwtrainer import IWTrainer, IWTrainingArguments

    args = IWTrainingArguments(
        output_dir="/tmp/bench_fsdp", per_device_train_batch_size=8, max_steps=20, learning_rate=2e-3,
        lr_scheduler_type="constant", warmup_steps=0, logging_steps=1, save_strategy="no", report_to="none", seed=0,
        data_seed=0, iw_alpha=1e-2, iw_calib_steps=4, disable_tqdm=True, dataloader_drop_last=True,
    )  # fmt: skip
    trainer = IWTrainer(model=build(), args=args, train_dataset=Tokens())
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    if trainer.is_world_process_zero():
        logs = [h for h in trainer.state.log_history if "loss" in h]
        result = {
            "mode": "fsdp2" if trainer.is_fsdp_enabled else "ddp",
            "world_size": trainer.args.world_size,
            "train_seconds": seconds,
            "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None,
            "sensitivities": {k: v["sensitivity"] for k, v in trainer.iw_callback.record["modules"].items()},
            "loss": [h["loss"] for h in logs],
            "loss_task": [h["loss_task"] for h in logs],
            "iw_penalty": [h["iw_penalty"] for h in logs],
            "versions": {"torch": torch.__version__, "transformers": __import__("transformers").__version__},
        }
        Path(out).write_text(json.dumps(result, indent=1))
        print(json.dumps({k: result[k] for k in ("mode", "world_size", "train_seconds", "peak_memory_gib")}))


def compare(a_path: str, b_path: str, results: str) -> None:
    from scipy.stats import spearmanr

    a, b = json.loads(Path(a_path).read_text()), json.loads(Path(b_path).read_text())
    names = list(a["sensitivities"])
    rel = [abs(b["sensitivities"][n] / a["sensitivities"][n] - 1) for n in names]
    curves = {k: max(abs(x - y) for x, y in zip(a[k], b[k])) for k in ("loss", "loss_task", "iw_penalty")}
    summary = {
        "reference": a["mode"], "candidate": b["mode"], "targets": len(names),
        "sensitivity_max_rel_diff": max(rel), "sensitivity_spearman": spearmanr(
            [a["sensitivities"][n] for n in names], [b["sensitivities"][n] for n in names]).correlation,
        "curve_max_abs_diff": curves, "final_loss": {a["mode"]: a["loss"][-1], b["mode"]: b["loss"][-1]},
        "train_seconds": {a["mode"]: a["train_seconds"], b["mode"]: b["train_seconds"]},
        "peak_memory_gib": {a["mode"]: a["peak_memory_gib"], b["mode"]: b["peak_memory_gib"]},
        "versions": a["versions"], "runs": {a["mode"]: a, b["mode"]: b},
    }  # fmt: skip
    Path(results + ".json").write_text(json.dumps(summary, indent=1))
    rows = [
        "| | " + a["mode"] + " | " + b["mode"] + " |", "|---|---|---|",
        f"| final loss | {a['loss'][-1]:.5f} | {b['loss'][-1]:.5f} |",
        f"| final IW penalty | {a['iw_penalty'][-1]:.5f} | {b['iw_penalty'][-1]:.5f} |",
        f"| train seconds (20 steps) | {a['train_seconds']:.1f} | {b['train_seconds']:.1f} |",
        f"| peak GPU memory, GiB (rank 0) | {a['peak_memory_gib']:.2f} | {b['peak_memory_gib']:.2f} |",
    ]  # fmt: skip
    text = (
        "# IW-LoRA under FSDP2 vs DDP (2 × H200)\n\nProduced by `bash benchmarks/bench_fsdp.sh` (see "
        "`benchmarks/bench_fsdp.py`). Llama-layout decoder (4 layers, hidden 512) from its config, LoRA r = 8 on "
        "all seven projections, 2 × 8 sequences of 128 tokens per step, α = 1e-2, 4 calibration batches, fp32.\n\n"
        f"- sensitivities, {len(names)} matrices: max relative difference {max(rel):.2e}, Spearman "
        f"{summary['sensitivity_spearman']:.4f}\n"
        f"- per-step curves, max absolute difference over 20 steps: loss {curves['loss']:.2e}, task loss "
        f"{curves['loss_task']:.2e}, penalty {curves['iw_penalty']:.2e}\n\n" + "\n".join(rows) + "\n"
    )
    Path(results + ".md").write_text(text)
    print(text)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "run.json"))
    parser.add_argument("--compare", nargs=2, metavar=("REFERENCE", "CANDIDATE"))
    parser.add_argument("--results", default="benchmarks/results/fsdp2_vs_ddp")
    ns = parser.parse_args()
    compare(*ns.compare, ns.results) if ns.compare else train(ns.out)
