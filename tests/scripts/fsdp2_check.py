"""Run under ``torchrun --nproc_per_node 2`` (CPU, gloo): IW-LoRA's calibration and penalty on an FSDP2-sharded
(``fully_shard``) tiny Llama against single-process references; prints ``FSDP2 OK`` on rank 0, fails otherwise.

1. sensitivities: each rank measures its own micro-batch, the ranks all-reduce; equals hand-rolled autograd of the
   token-mean loss over both micro-batches on an unsharded copy.
2. penalty: after each rank's backward (FSDP2 averages the sharded gradients), ``add_grad_(α)`` adds α·∇P to the
   sharded ``.grad``; the gathered gradient equals autograd of mean-over-ranks loss + α·Σ c_k‖s B_k A_k‖² unsharded.
3. end of training: the divergence guard takes FSDP2's DTensor gradient norm, and the final ``‖Δ_k‖`` (for
   ``iw_importance.png``) are gathered on every rank (computed on rank 0 alone they would hang the other rank).
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: tiny.py
from tiny import causal_autograd_sensitivities, causal_batch, causal_rows, tiny_causal_lora  # noqa: E402

from iwtrainer import DivergenceGuard, IWPenalty, compute_sensitivities, find_lora_targets  # noqa: E402
from iwtrainer.plot import delta_norms_from_model  # noqa: E402

ALPHA = 0.3


def main() -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    model = tiny_causal_lora("llama", init_lora_weights=False)
    reference = copy.deepcopy(model)
    rows = causal_rows(8, seed=5)
    batches = [causal_batch(rows, [0, 1, 2]), causal_batch(rows, [3, 4, 5, 6, 7])]  # different token counts
    for layer in model.base_model.model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    targets = find_lora_targets(model)
    assert type(targets[0].lora_A).__name__ == "DTensor"

    # 1. calibration
    got = compute_sensitivities(model, [batches[rank]], num_steps=1, show_progress=False)
    expected = causal_autograd_sensitivities(reference, [batches])
    for name, value in expected.items():
        assert abs(got[name] - value) <= 2e-5 * value, (name, got[name], value)

    # 2. penalty gradient on the sharded factors
    coefficients = {t.name: 0.5 + i / len(targets) for i, t in enumerate(targets)}
    model.train()
    model(**batches[rank]).loss.backward()
    penalty = IWPenalty(targets, coefficients)
    assert penalty.sharded
    value = penalty.add_grad_(ALPHA)
    sharded = {t.name: (t.lora_A.grad.full_tensor(), t.lora_B.grad.full_tensor()) for t in targets}

    reference.train()
    ref_targets = find_lora_targets(reference)
    loss = sum(reference(**b).loss for b in batches) / len(batches)
    explicit = sum(coefficients[t.name] * (t.scaling * t.lora_B @ t.lora_A).pow(2).sum() for t in ref_targets)
    (loss + ALPHA * explicit).backward()
    explicit_value = float(explicit.detach())
    assert abs(float(value) - explicit_value) <= 1e-5 * explicit_value, (float(value), explicit_value)
    for t in ref_targets:
        grad_a, grad_b = sharded[t.name]
        torch.testing.assert_close(grad_a, t.lora_A.grad, rtol=1e-5, atol=1e-7, msg=t.name)
        torch.testing.assert_close(grad_b, t.lora_B.grad, rtol=1e-5, atol=1e-7, msg=t.name)

    # 3. end of training
    norm = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], 1e9)
    guard = DivergenceGuard()
    guard.track("gradient", norm)
    guard.check()
    norms = delta_norms_from_model(model)
    for t in ref_targets:
        expected_norm = float((t.scaling * t.lora_B.detach() @ t.lora_A.detach()).norm())
        assert abs(norms[t.name] - expected_norm) <= 1e-5 * expected_norm, (t.name, norms[t.name], expected_norm)
    dist.barrier()
    if rank == 0:
        print("FSDP2 OK", len(targets), "targets")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
