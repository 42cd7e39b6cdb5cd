"""The penalty equals the explicit s²‖B@A‖² sum (value and gradient); importance weights and their errors."""

import math

import pytest
import torch
from helpers import DispatchedOps
from tiny import tiny_lora

from iwtrainer import IWPenalty, find_lora_targets, importance_weights, iw_penalty, penalty_coefficients


def explicit_penalty(targets, coefs, form="delta"):
    total = 0.0
    for t in targets:
        if form == "delta":
            delta = t.scaling * (t.lora_B @ t.lora_A)  # materialised d_out × d_in, as the definition reads
            total = total + coefs[t.name] * delta.pow(2).sum()
        else:
            total = total + coefs[t.name] * (t.lora_A.pow(2).sum() + t.lora_B.pow(2).sum())
    return total


@pytest.mark.parametrize("kind", ["bert", "deberta", "gpt2"])
@pytest.mark.parametrize("form", ["delta", "factors"])
def test_value_and_gradient_match_explicit(kind, form):
    model = tiny_lora(kind, init_lora_weights=False).double()  # float64: compare formulas, not round-off
    targets = find_lora_targets(model)
    g = torch.Generator().manual_seed(0)
    coefs = {t.name: float(torch.rand((), generator=g)) for t in targets}
    params = [p for t in targets for p in (t.lora_A, t.lora_B)]

    got = IWPenalty(targets, coefs, form)()
    grads_got = torch.autograd.grad(got, params)
    want = explicit_penalty(targets, coefs, form)
    grads_want = torch.autograd.grad(want, params)

    assert got.item() > 0
    assert got.item() == pytest.approx(want.item(), rel=1e-12)
    for a, b in zip(grads_got, grads_want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-14)


def test_uses_peft_scaling_including_rslora():
    model = tiny_lora("bert", init_lora_weights=False, use_rslora=True)
    targets = find_lora_targets(model)
    assert targets[0].scaling == pytest.approx(8 / math.sqrt(4))
    coefs = dict.fromkeys((t.name for t in targets), 1.0)
    assert IWPenalty(targets, coefs)().item() == pytest.approx(explicit_penalty(targets, coefs).item(), rel=1e-5)


def test_functional_iw_penalty_takes_weights_and_beta():
    model = tiny_lora("gpt2", init_lora_weights=False)
    targets = find_lora_targets(model)
    weights = {t.name: (i + 1) / (2 * len(targets)) for i, t in enumerate(targets)}
    coefs = {k: (1 - w) ** 2.0 for k, w in weights.items()}
    got = iw_penalty(model, weights, beta=2.0)
    assert got.item() == pytest.approx(explicit_penalty(targets, coefs).item(), rel=1e-5)


def test_zero_at_peft_init_and_bad_form():
    model = tiny_lora("bert")  # B = 0
    targets = find_lora_targets(model)
    coefs = dict.fromkeys((t.name for t in targets), 1.0)
    assert IWPenalty(targets, coefs)().item() == 0.0
    with pytest.raises(ValueError, match="iw_penalty"):
        IWPenalty(targets, coefs, form="l1")
    with pytest.raises(ValueError, match="no importance coefficient"):
        IWPenalty(targets, {})


def test_importance_weights_sum_and_max():
    s = {"a": 1.0, "b": 3.0, "c": 4.0}
    assert importance_weights(s, "sum") == pytest.approx({"a": 0.125, "b": 0.375, "c": 0.5})
    w = importance_weights(s, "max")
    assert w == pytest.approx({"a": 0.25, "b": 0.75, "c": 1.0})
    assert penalty_coefficients(w, beta=2.0) == pytest.approx({"a": 0.5625, "b": 0.0625, "c": 0.0})


@pytest.mark.parametrize(
    ("sens", "normalize", "match"),
    [
        ({"a": 0.0, "b": 0.0}, "sum", "sensitivities: all zero"),
        ({"a": float("nan"), "b": 1.0}, "sum", "sensitivities: .*non-finite"),
        ({"a": float("inf"), "b": 1.0}, "max", "sensitivities: .*non-finite"),
        ({"a": 1.0}, "mean", "iw_normalize"),
        ({}, "sum", "sensitivities: empty"),
    ],
)
def test_importance_errors(sens, normalize, match):
    with pytest.raises(ValueError, match=match):
        importance_weights(sens, normalize)


def test_no_lora_layers_error():
    from tiny import tiny_base

    with pytest.raises(ValueError, match="no LoRA layers"):
        find_lora_targets(tiny_base("bert"))


@pytest.mark.parametrize("kind", ["deberta", "gpt2"])
@pytest.mark.parametrize("form", ["delta", "factors"])
def test_closed_form_gradient_matches_autograd(kind, form):
    """add_grad_ (the trainer's fused path) adds exactly scale·∇P to .grad, accumulating onto what is there."""
    model = tiny_lora(kind, init_lora_weights=False).double()
    targets = find_lora_targets(model)
    coefs = {t.name: 0.1 * (i + 1) for i, t in enumerate(targets)}
    params = [p for t in targets for p in (t.lora_A, t.lora_B)]
    penalty = IWPenalty(targets, coefs, form)
    want = torch.autograd.grad(3.0 * explicit_penalty(targets, coefs, form), params)

    value = penalty.add_grad_(scale=3.0)  # from .grad = None
    assert value.item() == pytest.approx(explicit_penalty(targets, coefs, form).item(), rel=1e-12)
    for p, w in zip(params, want):
        torch.testing.assert_close(p.grad, w, rtol=1e-10, atol=1e-14)
    existing = [p.grad.clone() for p in params]
    penalty.add_grad_(scale=3.0)  # accumulates like autograd would
    for p, e, w in zip(params, existing, want):
        torch.testing.assert_close(p.grad, e + w, rtol=1e-10, atol=1e-14)


def test_gradient_lands_on_each_factor_with_some_grads_missing():
    """One foreach over every factor of every shape group: each factor gets its own slice of the stacked result,
    whether its ``.grad`` existed (accumulated) or not (set), in a model whose targets form several shape groups."""
    model = tiny_lora("gpt2", init_lora_weights=False).double()
    targets = find_lora_targets(model)
    assert len({(t.lora_A.shape, t.lora_B.shape) for t in targets}) > 1
    coefs = {t.name: 0.1 * (i + 1) for i, t in enumerate(targets)}
    params = [p for t in targets for p in (t.lora_A, t.lora_B)]
    want = torch.autograd.grad(explicit_penalty(targets, coefs, "delta"), params)
    for i, p in enumerate(params):
        p.grad = torch.full_like(p, float(i)) if i % 3 == 0 else None
    IWPenalty(targets, coefs).add_grad_()
    for i, (p, w) in enumerate(zip(params, want)):
        torch.testing.assert_close(p.grad, w + (i if i % 3 == 0 else 0), rtol=1e-10, atol=1e-14)


def _math_ops(fn) -> set[str]:
    """The aten ops ``fn()`` dispatches."""
    with DispatchedOps() as ops:
        fn()
    return set(ops.names)


@pytest.mark.parametrize("kind", ["bert", "gpt2"])
def test_blas_free_products_equal_matmuls_and_call_no_matmul(kind):
    """The CUDA graph's broadcast form (``blas=False``) gives the closed form's value and gradients — checked against
    autograd on the explicitly materialised s·B@A — and dispatches no matmul (so cuBLAS never runs on its stream)."""
    model = tiny_lora(kind, init_lora_weights=False).double()
    targets = find_lora_targets(model)
    coefs = {t.name: 0.1 * (i + 1) for i, t in enumerate(targets)}
    params = [p for t in targets for p in (t.lora_A, t.lora_B)]
    penalty = IWPenalty(targets, coefs)
    assert not penalty.graph_blas  # tiny shapes: the graph would take the broadcast form
    want = torch.autograd.grad(2.5 * explicit_penalty(targets, coefs), params)
    with torch.no_grad():
        value, grads = penalty._grad_math(2.5, blas=False)
        ops = _math_ops(lambda: penalty._grad_math(2.5, blas=False))
    assert value.item() == pytest.approx(explicit_penalty(targets, coefs).item(), rel=1e-12)
    flat = [g for d_a, d_b in grads for g in (*d_a.unbind(0), *d_b.unbind(0))]
    got = dict(zip(map(id, penalty._params), flat))
    for p, w in zip(params, want):
        torch.testing.assert_close(got[id(p)], w, rtol=1e-10, atol=1e-14)
    assert not ops & {"mm", "bmm", "matmul", "addmm", "baddbmm", "einsum"}, ops
    with torch.no_grad():  # the matmul form does call them: the check above can fail
        assert "bmm" in _math_ops(lambda: penalty._grad_math(2.5, blas=True))


def test_graph_takes_matmuls_above_the_product_limit(monkeypatch):
    """``graph_blas``: the broadcast product of the largest shape group, n·r²·max(d_in, d_out) values, against
    ``BLAS_FREE_MAX_BYTES``; the source's ``factors`` form has no products at all."""
    import iwtrainer.penalty as penalty_module

    model = tiny_lora("gpt2", init_lora_weights=False)
    targets = find_lora_targets(model)
    coefs = dict.fromkeys((t.name for t in targets), 1.0)
    groups: dict[tuple, int] = {}
    for t in targets:
        key = (tuple(t.lora_A.shape), tuple(t.lora_B.shape))
        groups[key] = groups.get(key, 0) + 1
    largest = max(n * a[0] * a[0] * max(a[1], b[0]) * 4 for (a, b), n in groups.items())  # fp32 math
    monkeypatch.setattr(penalty_module, "BLAS_FREE_MAX_BYTES", largest)
    assert not IWPenalty(targets, coefs).graph_blas
    monkeypatch.setattr(penalty_module, "BLAS_FREE_MAX_BYTES", largest - 1)
    assert IWPenalty(targets, coefs).graph_blas
    assert not IWPenalty(targets, coefs, "factors").graph_blas
