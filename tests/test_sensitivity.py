"""Calibration: exact base-weight gradient norms, no side effects, accumulation/split invariance."""

import copy
import gc
import weakref
from types import SimpleNamespace

import pytest
import torch
from tiny import RandomClassification, base_weight, batches, tiny_args, tiny_lora

from iwtrainer import compute_sensitivities, find_lora_targets, preserved_training_state, sensitivity


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


def test_restores_every_modules_mode():
    """A model as from_pretrained + get_peft_model leaves it (base in eval mode, peft's new layers training) keeps
    each module's own flag: calibration used to end with ``train(True)`` on the whole model, which switched the
    base model's dropouts on (one method of a benchmark then ran dropouts the others did not)."""
    model = tiny_lora("bert", init_lora_weights=False)
    model.train()
    model.base_model.model.eval()
    for t in find_lora_targets(model):
        t.module.lora_dropout.train()
    before = {name: m.training for name, m in model.named_modules()}
    assert len(set(before.values())) == 2  # a mixed model, else the test shows nothing
    compute_sensitivities(model, batches(RandomClassification(n=16), 8), num_steps=2, show_progress=False)
    assert {name: m.training for name, m in model.named_modules()} == before


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


# -- memory: what the calibration holds, and that nothing of it outlives it ------------------------------------------
class RecordingSums(sensitivity.WeightGradNorms):
    """The calibration's accumulator, recording in ``logs`` (which holds no tensor and not the accumulator itself)
    weak references to everything it is handed or makes, and what it held at once."""

    logs: list[SimpleNamespace] = []

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.log = SimpleNamespace(
            flat_bytes=None if self.flat is None else self.flat.nbytes,
            refs=[weakref.ref(t) for t in (self.norms, self.flat) if t is not None],  # every tensor seen or made
            grads=[],  # weakrefs to each call's ∂L/∂Y
            most_live_grads=0,  # earlier calls' ∂L/∂Y still alive when a call's gradient arrives
            most_sum_bytes=0,  # per-target sums alive at once (unbuffered)
        )
        RecordingSums.logs.append(self.log)

    def add(self, index, g, x):
        log = self.log
        log.most_live_grads = max(log.most_live_grads, sum(r() is not None for r in log.grads))
        log.grads.append(weakref.ref(g))
        log.refs += [weakref.ref(g), weakref.ref(x)]
        super().add(index, g, x)

    def _reduce(self, index):
        self.log.most_sum_bytes = max(self.log.most_sum_bytes, sum(t.nbytes for t in self._partial.values()))
        self.log.refs.append(weakref.ref(self._partial[index]))
        super()._reduce(index)


@pytest.fixture
def recording(monkeypatch) -> list[SimpleNamespace]:
    """The logs of the accumulators that calibration creates while the test runs."""
    RecordingSums.logs = []
    monkeypatch.setattr(sensitivity, "WeightGradNorms", RecordingSums)
    return RecordingSums.logs


def target_bytes(model) -> list[int]:
    """fp32 bytes of each target's ∂L/∂W (d_out × d_in)."""
    return [base_weight(t).numel() * 4 for t in find_lora_targets(model)]


def alive(log: SimpleNamespace) -> list[torch.Tensor]:
    gc.collect()
    return [r() for r in log.refs if r() is not None]


def test_calibration_holds_one_target_sum_and_no_layer_gradients(recording):
    """One micro-batch per batch: no buffer of every target's size (mpnet-base: 85M floats, 340 MB); each target's
    sum lives alone and briefly, and each call's ∂L/∂Y is freed before the next one arrives."""
    model = tiny_lora("bert", init_lora_weights=False)
    data = batches(RandomClassification(n=16, seed=5), 8)
    compute_sensitivities(model, data, num_steps=2, show_progress=False)
    (log,) = recording
    assert log.flat_bytes is None
    assert 0 < log.most_sum_bytes <= max(target_bytes(model))
    assert len(log.grads) == 2 * len(find_lora_targets(model))  # every call of both batches
    assert log.most_live_grads <= 1  # autograd.grad w.r.t. the outputs held all of them until it returned


@pytest.mark.parametrize("kind, ga", [("bert", 1), ("deberta", 1), ("bert", 2)])
def test_nothing_of_the_calibration_outlives_it(recording, kind, ga):
    """Buffers, sums, layer inputs and output gradients, hooks: all gone once compute_sensitivities returns (under
    gradient accumulation the batch's sums need the one flat buffer, Σ_k d_out·d_in fp32, while it runs)."""
    model = tiny_lora(kind, init_lora_weights=False)
    data = batches(RandomClassification(n=16, seed=6), 8 // ga)
    compute_sensitivities(model, data, num_steps=2, gradient_accumulation_steps=ga, show_progress=False)
    (log,) = recording
    assert log.flat_bytes == (sum(target_bytes(model)) if ga > 1 else None)
    assert len(log.refs) > 3 * len(find_lora_targets(model))
    assert alive(log) == []
    assert all(not t.module._forward_hooks for t in find_lora_targets(model))


def test_training_starts_with_nothing_of_the_calibration_alive(recording, tmp_path):
    """In the Trainer: by the first training step the calibration's tensors are gone (the record keeps floats)."""
    from transformers import TrainerCallback

    from iwtrainer import IWTrainer, IWTrainingArguments

    at_step_0: list[int] = []

    class Check(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == 0:
                at_step_0.append(len(alive(recording[0])))

    args = tiny_args(tmp_path, IWTrainingArguments, max_steps=1, per_device_train_batch_size=8, iw_alpha=1e-2,
                     iw_calib_steps=2)  # fmt: skip
    trainer = IWTrainer(model=tiny_lora("bert", init_lora_weights=False), args=args,
                        train_dataset=RandomClassification(n=16), callbacks=[Check()])  # fmt: skip
    trainer.train()
    assert len(recording) == 1 and len(recording[0].refs) > 3 * len(find_lora_targets(trainer.model))
    assert at_step_0 == [0]


@pytest.mark.parametrize("autocast", [None, torch.bfloat16])
def test_buffered_and_streamed_sums_are_the_same_numbers(monkeypatch, autocast):
    """The flat buffer (gradient accumulation, DDP) and the per-target temporaries add the same products in the same
    order: bit-identical sensitivities, DeBERTa's twice-called shared-key layers included, in fp32 and under bf16
    autocast (half-precision products, fp32 sums)."""
    model = tiny_lora("deberta", init_lora_weights=False)
    data = batches(RandomClassification(n=24, seed=7), 8)
    run = dict(num_steps=3, autocast_dtype=autocast, show_progress=False)
    streamed = compute_sensitivities(model, data, **run)
    always_buffered = classmethod(lambda cls, targets, device, micro_batches: cls(targets, device, buffered=True))
    monkeypatch.setattr(sensitivity.WeightGradNorms, "for_batches", always_buffered)
    buffered = compute_sensitivities(model, data, **run)
    assert sensitivity.WeightGradNorms.for_batches([], torch.device("cpu"), 1).flat is not None  # the patch took
    assert streamed == buffered


def test_taps_leave_the_forward_pass_bit_identical():
    """Each tapped output is ``y + (-0.0)``: the same bits, signed zeros included."""
    model = tiny_lora("deberta", init_lora_weights=False).eval()
    batch = batches(RandomClassification(n=8, seed=8), 8)[0]
    plain = model(**batch).logits
    targets = find_lora_targets(model)
    cpu = torch.device("cpu")
    taps = sensitivity._CallTaps(targets, sensitivity.WeightGradNorms(targets, cpu, buffered=False), cpu)
    tapped = model(**batch).logits
    taps.remove()
    assert taps.calls > len(targets)  # DeBERTa: query_proj/key_proj run twice
    assert torch.equal(plain, tapped)
    zeros = torch.tensor([-0.0, 0.0, 1.5])
    assert torch.equal(zeros + taps.probe.detach(), zeros)
    assert (zeros + taps.probe.detach()).signbit().tolist() == [True, False, False]


# -- stacked batches (iw_calib_group): one pass for several batches, each batch's gradient taken apart ---------------
@pytest.mark.parametrize("kind", ["bert", "gpt2"])
@pytest.mark.parametrize("group, steps", [(3, 6), (2, 5), (8, 6)])  # full stacks; a partial last one; one stack
def test_stacked_batches_match_autograd_per_batch(kind, group, steps):
    model = tiny_lora(kind, init_lora_weights=False)
    data = batches(RandomClassification(n=48, seed=5), 8)
    got = compute_sensitivities(model, data, num_steps=steps, group=group, show_progress=False)
    want = reference_sensitivities(model, data[:steps])
    assert got.batches == steps and list(got) == list(want)
    for name in want:
        assert got[name] == pytest.approx(want[name], rel=1e-5), name


def test_stacks_only_batches_of_one_shape(monkeypatch):
    """Batches of two lengths, interleaved: each stack holds one shape; the mean still covers every batch."""
    model = tiny_lora("bert", init_lora_weights=False)
    short, long = batches(RandomClassification(n=24, seq=8, seed=6), 8), batches(RandomClassification(n=24, seed=7), 8)
    data = [b for pair in zip(short, long) for b in pair]  # 6 batches: 8, 12, 8, 12, 8, 12 tokens
    stacks = []
    set_segments = sensitivity.WeightGradNorms.set_segments
    monkeypatch.setattr(
        sensitivity.WeightGradNorms,
        "set_segments",
        lambda self, segments, rows: (stacks.append((segments, rows)), set_segments(self, segments, rows))[1],
    )
    got = compute_sensitivities(model, data, num_steps=6, group=2, show_progress=False)
    assert stacks == [(2, 16), (2, 16), (1, 8), (1, 8)]  # two full stacks of a shape each, then the leftovers
    want = reference_sensitivities(model, data)
    assert got == pytest.approx(want, rel=1e-5)


def test_stacked_causal_lm_weighs_each_batch_by_its_label_tokens():
    """Token-level loss: the batches (same width) hold different numbers of label tokens; each batch's mean stays
    its own when stacked (the stacked mean over all tokens times their count is every batch's sum)."""
    from tiny import causal_autograd_sensitivities, causal_batch, causal_rows, tiny_causal_lora

    model = tiny_causal_lora("llama", init_lora_weights=False)
    rows = causal_rows(24, seed=8, min_len=10, max_len=10)
    data = [causal_batch(rows, list(range(i, i + 4))) for i in range(0, 24, 4)]
    counts = {int((b["labels"][:, 1:] != -100).sum()) for b in data}
    assert len(counts) > 1  # the weighting is exercised
    got = compute_sensitivities(model, data, num_steps=6, group=3, show_progress=False)
    want = causal_autograd_sensitivities(model, [[b] for b in data])
    for name in want:
        assert got[name] == pytest.approx(want[name], rel=1e-5), name


def test_stacking_refuses_what_it_cannot_split():
    data = batches(RandomClassification(n=32, seed=9), 8)
    with pytest.raises(ValueError) as info:  # DeBERTa's query/key projections also run on the relative positions
        compute_sensitivities(tiny_lora("deberta"), data, num_steps=4, group=2, show_progress=False)
    message = str(info.value)
    assert "\n" not in message and "not split by example" in message and "use iw_calib_group=1" in message
    with pytest.raises(ValueError, match="needs one process and gradient_accumulation_steps=1"):
        compute_sensitivities(
            tiny_lora("bert"), data, num_steps=2, gradient_accumulation_steps=2, group=2, show_progress=False
        )
