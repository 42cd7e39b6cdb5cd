"""Calibration: exact base-weight gradient norms, no side effects, accumulation/split invariance."""

import copy

import pytest
import torch
from tiny import RandomClassification, base_weight, batches, tiny_lora

from iwtrainer import compute_sensitivities, find_lora_targets, preserved_training_state


def reference_sensitivities(model, batch_list, ga: int = 1) -> dict[str, float]:
    """Independent computation: base weights temporarily require grad, autograd, per-batch norms averaged."""
    targets = find_lora_targets(model)
    weights = [base_weight(t) for t in targets]
    model.eval()
    for w in weights:
        w.requires_grad_(True)
    sums = torch.zeros(len(targets), dtype=torch.float64)
    steps = len(batch_list) // ga
    for s in range(steps):
        group = batch_list[s * ga : (s + 1) * ga]
        n_total = sum(len(b["labels"]) for b in group)
        loss = sum(model(**b).loss * len(b["labels"]) / n_total for b in group)
        grads = torch.autograd.grad(loss, weights)
        sums += torch.stack([g.double().norm() for g in grads])
    for w in weights:
        w.requires_grad_(False)
    return {t.name: v / steps for t, v in zip(targets, sums.tolist())}


@pytest.mark.parametrize("kind", ["bert", "deberta", "gpt2"])
def test_matches_autograd_on_base_weights(kind):
    model = tiny_lora(kind, init_lora_weights=False)  # B ≠ 0: LoRA path active too
    data = batches(RandomClassification(n=48, seed=1), 8)
    got = compute_sensitivities(model, data, num_steps=6, show_progress=False)
    want = reference_sensitivities(model, data)
    assert list(got) == list(want)
    assert len(got) == len(find_lora_targets(model))
    for name in want:
        assert want[name] > 0
        assert got[name] == pytest.approx(want[name], rel=1e-5), name


def test_deberta_shared_key_runs_twice_and_is_summed():
    """share_att_key: query_proj/key_proj run on hidden states and on relative embeddings in one forward."""
    model = tiny_lora("deberta")
    targets = {t.name: t for t in find_lora_targets(model)}
    q = targets["deberta.encoder.layer.0.attention.self.query_proj"]
    calls = []
    handle = q.module.register_forward_hook(lambda m, a, o: calls.append(a[0].shape))
    data = batches(RandomClassification(n=8, seed=2), 8)
    model(**data[0])
    handle.remove()
    assert len(calls) == 2 and calls[0] != calls[1]
    # The norm of the summed gradient, not the sum (or last) of per-call norms.
    got = compute_sensitivities(model, data, num_steps=1, show_progress=False)[q.name]
    want = reference_sensitivities(model, data)[q.name]
    assert got == pytest.approx(want, rel=1e-5)


def test_leaves_model_and_grads_untouched():
    model = tiny_lora("bert", init_lora_weights=False)
    model.train()
    before = copy.deepcopy(model.state_dict())
    data = batches(RandomClassification(n=32), 8)
    compute_sensitivities(model, data, num_steps=4, show_progress=False)
    assert model.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(p.grad is None for p in model.parameters())
    assert all(not base_weight(t).requires_grad for t in find_lora_targets(model))


def test_invariant_to_accumulation_split():
    """A batch of 16 gives the same s_k as two accumulated micro-batches of 8."""
    model = tiny_lora("bert", init_lora_weights=False)
    ds = RandomClassification(n=64, seed=3)
    full = compute_sensitivities(model, batches(ds, 16), num_steps=4, show_progress=False)
    split = compute_sensitivities(
        model, batches(ds, 8), num_steps=4, gradient_accumulation_steps=2, show_progress=False
    )
    ref = reference_sensitivities(model, batches(ds, 8), ga=2)
    for name in full:
        assert split[name] == pytest.approx(full[name], rel=1e-5)
        assert split[name] == pytest.approx(ref[name], rel=1e-5)


def test_uses_only_complete_batches_and_rejects_too_little_data():
    model = tiny_lora("bert")
    ds = RandomClassification(n=24)
    few = compute_sensitivities(model, batches(ds, 8), num_steps=10, show_progress=False)
    ref = reference_sensitivities(model, batches(ds, 8))
    assert few == pytest.approx(ref, rel=1e-5)
    with pytest.raises(ValueError, match="gradient_accumulation_steps=4"):
        compute_sensitivities(model, batches(ds, 8), num_steps=1, gradient_accumulation_steps=4, show_progress=False)


def test_bad_input_errors():
    model = tiny_lora("bert")
    data = batches(RandomClassification(n=16), 8)
    with pytest.raises(ValueError, match="iw_calib_steps"):
        compute_sensitivities(model, data, num_steps=0)
    no_labels = [{k: v for k, v in b.items() if k != "labels"} for b in data]
    with pytest.raises(ValueError, match="no loss.*labels"):
        compute_sensitivities(model, no_labels, num_steps=1, show_progress=False)
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="does not require grad"):
        compute_sensitivities(model, data, num_steps=1, show_progress=False)


def test_preserved_training_state_restores_rng_and_sampler():
    ds = RandomClassification(n=32)
    gen = torch.Generator().manual_seed(7)
    loader = torch.utils.data.DataLoader(ds, batch_size=4, shuffle=True, generator=gen)
    torch.manual_seed(0)
    with preserved_training_state(loader):
        next(iter(loader))
        torch.rand(3)
    first = [b["labels"].tolist() for b in loader]
    after_rng = torch.rand(1)

    gen.manual_seed(7)
    torch.manual_seed(0)
    expected = [b["labels"].tolist() for b in loader]
    assert first == expected
    assert torch.equal(after_rng, torch.rand(1))


def test_bf16_autocast_matches_fp32():
    """Under bf16 autocast (layer outputs bf16, residual inputs fp32) the estimate stays close to fp32."""
    model = tiny_lora("deberta", init_lora_weights=False)
    data = batches(RandomClassification(n=32, seed=4), 8)
    exact = compute_sensitivities(model, data, num_steps=4, show_progress=False)
    bf16 = compute_sensitivities(model, data, num_steps=4, autocast_dtype=torch.bfloat16, show_progress=False)
    for name in exact:
        assert bf16[name] == pytest.approx(exact[name], rel=5e-2), name
