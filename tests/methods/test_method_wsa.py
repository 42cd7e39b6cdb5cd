"""The Weighted Spectral Adapter (iwtrainer.methods.wsa) on tiny BERT (nn.Linear) and GPT-2 (Conv1D) models."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn
from transformers import BertConfig, BertForSequenceClassification, GPT2Config, GPT2ForSequenceClassification
from transformers.pytorch_utils import Conv1D

from iwtrainer.methods.wsa import (
    WSA_CONFIG_NAME,
    WSA_WEIGHTS_NAME,
    WSAConfig,
    WSALinear,
    apply_wsa,
    load_wsa,
    merge_wsa,
    prune_wsa,
    save_wsa,
    save_wsa_ranks,
    wsa_gate_l1,
    wsa_layers,
)

VOCAB, NUM_LABELS, BATCH, SEQ = 100, 3, 4, 9
TARGETS = {"bert": ["query", "value", "dense"], "gpt2": ["c_attn", "c_proj", "c_fc"]}
SAVE = ["classifier", "score"]


def make_model(kind: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    if kind == "bert":
        cfg = BertConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=37,
            max_position_embeddings=32,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
            num_labels=NUM_LABELS,
        )
        model = BertForSequenceClassification(cfg)
    else:
        cfg = GPT2Config(
            vocab_size=VOCAB,
            n_embd=32,
            n_layer=2,
            n_head=2,
            n_positions=32,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=1,
            num_labels=NUM_LABELS,
        )
        model = GPT2ForSequenceClassification(cfg)
    return model.eval()


def make_inputs(seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(1, VOCAB, (BATCH, SEQ), generator=g)}  # no pad id (0) in the batch


def wsa_config(kind: str, r: int = 8) -> WSAConfig:
    return WSAConfig(r_init=r, target_modules=TARGETS[kind], modules_to_save=SAVE)


def randomize(model: nn.Module, seed: int = 2, scale: float = 0.1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in wsa_layers(model):
            layer.delta_U.copy_(torch.randn(layer.delta_U.shape, generator=g) * scale)
            layer.delta_V.copy_(torch.randn(layer.delta_V.shape, generator=g) * scale)
            layer.s.copy_(torch.randn(layer.s.shape, generator=g))


def dense_weight(layer: WSALinear) -> torch.Tensor:
    """Original weight as d_out x d_in."""
    w = layer.base_layer.weight.detach()
    return w.T if isinstance(layer.base_layer, Conv1D) else w


def reference_weight(w: torch.Tensor, r: int, du, dv, s, keep=None) -> torch.Tensor:
    """W' = W - U_K S_K V_K^T + (U_K + dU) diag(S_K (1 + tanh s)) (V_K + dV)^T, in float64, SVD recomputed here."""
    u, sv, vh = torch.linalg.svd(w.float(), full_matrices=False)
    u, sv, v = u[:, :r].double(), sv[:r].double(), vh[:r].T.double()
    if keep is not None:
        u, sv, v = u[:, keep], sv[keep], v[:, keep]
    du, dv, g = du.double(), dv.double(), torch.tanh(s.double())
    return w.double() - (u * sv) @ v.T + ((u + du) * (sv * (1 + g))) @ (v + dv).T


def dense_model(original: nn.Module, weights: dict[str, torch.Tensor], extra_state: nn.Module) -> nn.Module:
    """Plain copy of ``original`` with materialised W' per layer and the trained heads from ``extra_state``."""
    ref = copy.deepcopy(original)
    for name, w in weights.items():
        mod = ref.get_submodule(name)
        mod.weight.data = (w.T if isinstance(mod, Conv1D) else w).float().contiguous()
    for name in SAVE:
        if hasattr(ref, name):
            getattr(ref, name).load_state_dict(getattr(extra_state, name).state_dict())
    return ref


def logits(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


KINDS = ["bert", "gpt2"]


# (1) init equality ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_init_output_bit_identical(kind):
    base = make_model(kind)
    inputs = make_inputs()
    expected = logits(base, inputs)
    model = apply_wsa(copy.deepcopy(base), wsa_config(kind))
    layers = wsa_layers(model)
    assert layers and all(isinstance(layer, WSALinear) for _, layer in layers)
    assert all(layer.base_layer.__class__ is (Conv1D if kind == "gpt2" else nn.Linear) for _, layer in layers)
    # The correction is a sum of exact zeros at init, so the output is bit-identical, not just close.
    assert torch.equal(logits(model, inputs), expected)


def test_rank_clipped_and_buffers_persistent():
    model = apply_wsa(make_model("bert"), WSAConfig(r_init=100, target_modules=["query", "intermediate.dense"]))
    for _, layer in wsa_layers(model):
        assert layer.r == layer.r_init == min(layer.in_features, layer.out_features) == 32
        assert layer.U_r.shape == (layer.out_features, 32) and layer.V_r.shape == (layer.in_features, 32)
    keys = model.state_dict().keys()
    for suffix in ("U_r", "S_r", "V_r", "delta_U", "delta_V", "s", "base_layer.weight"):
        assert "bert.encoder.layer.0.attention.self.query." + suffix in keys


def test_default_targets_from_model_type():
    model = apply_wsa(make_model("bert"), WSAConfig(r_init=4))
    assert {n.rsplit(".", 1)[-1] for n, _ in wsa_layers(model)} == {"query", "value"}


# (2) fast forward == dense W' ----------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_forward_matches_dense_formula(kind):
    base = make_model(kind)
    original = {n: p.detach().clone() for n, p in base.named_parameters()}
    model = apply_wsa(copy.deepcopy(base), wsa_config(kind))
    randomize(model)
    inputs = make_inputs()
    weights = {}
    g = torch.Generator().manual_seed(3)
    for name, layer in wsa_layers(model):
        # base weight untouched by wrapping/training
        assert torch.equal(layer.base_layer.weight, original[name + ".weight"])
        w_ref = reference_weight(dense_weight(layer), layer.r, layer.delta_U, layer.delta_V, layer.s).detach()
        weights[name] = w_ref
        # layer level, float64 reference
        x = torch.randn(5, 3, layer.in_features, generator=g)
        expected = x.double() @ w_ref.T + layer.base_layer.bias.double()
        with torch.no_grad():
            torch.testing.assert_close(layer(x).double(), expected, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(
                layer.delta_weight().double(), w_ref - dense_weight(layer).double(), atol=1e-5, rtol=1e-5
            )
    ref = dense_model(base, weights, model)
    torch.testing.assert_close(logits(model, inputs), logits(ref, inputs), rtol=1e-5, atol=1e-5)


# (3) gradients only where intended -----------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_gradients_only_to_wsa_and_modules_to_save(kind):
    model = apply_wsa(make_model(kind), wsa_config(kind))
    head = "classifier" if kind == "bert" else "score"
    labels = torch.tensor([0, 1, 2, 0])
    out = model(**make_inputs(), labels=labels)
    (out.loss + 1e-3 * wsa_gate_l1(model)).backward()
    for name, p in model.named_parameters():
        wsa_param = name.rsplit(".", 1)[-1] in ("delta_U", "delta_V", "s")
        trainable = wsa_param or name.startswith(head + ".")
        assert p.requires_grad == trainable, name
        if trainable:
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
            if wsa_param:
                assert p.grad.abs().sum() > 0, name  # zero-init deltas and gates still receive gradient
        else:
            assert p.grad is None, name
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert n_train < sum(p.numel() for p in model.parameters()) / 2


# (4) gate L1 ---------------------------------------------------------------------------------------------------
def test_gate_l1_matches_hand_computation():
    model = apply_wsa(make_model("gpt2"), wsa_config("gpt2"))
    assert wsa_gate_l1(model).item() == 0.0
    randomize(model)
    by_hand = sum(torch.tanh(layer.s).abs().sum() for _, layer in wsa_layers(model))
    value = wsa_gate_l1(model)
    torch.testing.assert_close(value, by_hand)
    value.backward()
    for _, layer in wsa_layers(model):
        torch.testing.assert_close(layer.s.grad, torch.sign(layer.s) * (1 - torch.tanh(layer.s) ** 2))
    assert wsa_gate_l1(make_model("bert")).item() == 0.0  # no WSA layers


# (5) pruning ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_prune_matches_dense_formula_with_kept_directions(kind, tmp_path):
    base = make_model(kind)
    model = apply_wsa(copy.deepcopy(base), wsa_config(kind, r=8))
    randomize(model)
    with torch.no_grad():
        for i, (_, layer) in enumerate(wsa_layers(model)):
            s = torch.full((layer.r,), 0.5)
            s[i % 3 :: 3] = 0.02  # |tanh(0.02)| < 0.05 -> pruned
            s[1] = -0.04  # negative small gate pruned too
            s[-1] = -0.6  # negative large gate kept
            layer.s.copy_(s)
    before = {
        n: (m.delta_U.detach().clone(), m.delta_V.detach().clone(), m.s.detach().clone()) for n, m in wsa_layers(model)
    }
    report = prune_wsa(model, tau=0.05)
    weights = {}
    for name, layer in wsa_layers(model):
        du, dv, s = before[name]
        keep = torch.tanh(s).abs() >= 0.05
        entry = report[name]
        assert entry["r_init"] == 8 and entry["r_eff"] == int(keep.sum()) == layer.r < 8
        assert entry["kept"] == torch.nonzero(keep).flatten().tolist()
        assert entry["gates"] == pytest.approx(torch.tanh(s).tolist())
        assert layer.delta_U.shape == (layer.out_features, layer.r) and layer.V_r.shape == (layer.in_features, layer.r)
        assert layer.s.requires_grad
        weights[name] = reference_weight(dense_weight(layer), 8, du[:, keep], dv[:, keep], s[keep], keep=keep)
    inputs = make_inputs()
    ref = dense_model(base, weights, model)
    expected = logits(ref, inputs)
    torch.testing.assert_close(logits(model, inputs), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits(merge_wsa(copy.deepcopy(model)), inputs), expected, rtol=1e-5, atol=1e-5)

    path = save_wsa_ranks(report, tmp_path / "out" / "wsa_ranks.json")
    assert json.loads(path.read_text()) == json.loads(json.dumps(report))


@pytest.mark.parametrize("kind", KINDS)
def test_prune_of_inactive_directions_is_noop(kind):
    model = apply_wsa(make_model(kind), wsa_config(kind, r=8))
    randomize(model)
    with torch.no_grad():
        for _, layer in wsa_layers(model):  # directions 0, 2, 5 inactive: gate exactly 0 and zero deltas
            for i in (0, 2, 5):
                layer.s[i] = 0.0
                layer.delta_U[:, i] = 0.0
                layer.delta_V[:, i] = 0.0
            layer.s[[1, 3, 4, 6, 7]] = torch.tensor([0.3, -0.4, 0.5, 1.0, -1.0])
    inputs = make_inputs()
    before = logits(model, inputs)
    report = prune_wsa(model, tau=0.05)
    assert all(e["r_eff"] == 5 and e["kept"] == [1, 3, 4, 6, 7] for e in report.values())
    # Only summation order inside the thin matmuls changes, so equal up to float32 rounding.
    torch.testing.assert_close(logits(model, inputs), before, rtol=1e-6, atol=1e-6)


def test_prune_everything_with_zero_deltas_is_exactly_base():
    base = make_model("bert")
    inputs = make_inputs()
    model = apply_wsa(copy.deepcopy(base), wsa_config("bert"))
    with torch.no_grad():
        model.classifier.load_state_dict(base.classifier.state_dict())
    report = prune_wsa(model, tau=0.05)
    assert all(e["r_eff"] == 0 for e in report.values())
    assert torch.equal(logits(model, inputs), logits(base, inputs))
    assert wsa_gate_l1(model).item() == 0.0


# (6) save / load -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_save_load_round_trip_after_pruning(kind, tmp_path):
    base = make_model(kind)
    base_state = {k: v.clone() for k, v in base.state_dict().items()}
    cfg = wsa_config(kind)
    model = apply_wsa(copy.deepcopy(base), cfg)
    randomize(model)
    with torch.no_grad():
        head = model.classifier if kind == "bert" else model.score
        head.weight.add_(torch.randn_like(head.weight))  # trained head must be restored from the adapter dir
    prune_wsa(model, tau=0.5)
    ranks = {n: layer.r for n, layer in wsa_layers(model)}
    assert len(set(ranks.values())) > 1  # per-layer ranks differ after pruning
    save_wsa(model, tmp_path / "adapter", cfg)
    assert (tmp_path / "adapter" / WSA_CONFIG_NAME).is_file() and (tmp_path / "adapter" / WSA_WEIGHTS_NAME).is_file()
    meta = json.loads((tmp_path / "adapter" / WSA_CONFIG_NAME).read_text())
    assert WSAConfig.from_dict(meta) == cfg and {n: m["r"] for n, m in meta["wsa_layers"].items()} == ranks

    # fresh base: same backbone weights, newly initialised head (as from_pretrained of the base checkpoint)
    fresh = make_model(kind, seed=123)
    head_prefix = "classifier." if kind == "bert" else "score."
    fresh.load_state_dict({k: v for k, v in base_state.items() if not k.startswith(head_prefix)}, strict=False)
    loaded = load_wsa(fresh, tmp_path / "adapter")
    assert {n: layer.r for n, layer in wsa_layers(loaded)} == ranks
    assert all(layer.r_init == 8 for _, layer in wsa_layers(loaded))
    inputs = make_inputs()
    assert torch.equal(logits(loaded, inputs), logits(model, inputs))
    assert {n for n, p in loaded.named_parameters() if p.requires_grad} == {
        n for n, p in model.named_parameters() if p.requires_grad
    }


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_wsa(make_model("bert"), tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=WSA_CONFIG_NAME):
        load_wsa(make_model("bert"), tmp_path / "empty")
    cfg = wsa_config("bert")
    save_wsa(apply_wsa(make_model("bert"), cfg), tmp_path / "a", cfg)
    (tmp_path / "a" / WSA_WEIGHTS_NAME).unlink()
    with pytest.raises(FileNotFoundError, match=WSA_WEIGHTS_NAME):
        load_wsa(make_model("bert"), tmp_path / "a")


# (7) configuration errors --------------------------------------------------------------------------------------
def test_no_match_error_names_target_modules_and_candidates():
    with pytest.raises(ValueError, match="target_modules") as exc:
        apply_wsa(make_model("bert"), WSAConfig(target_modules=["q_proj"]))
    assert "query" in str(exc.value) and "classifier" in str(exc.value)
    # the candidates read like LoRA's (iwtrainer.targets.candidates_message): names inside the blocks, then the rest
    assert "attention.self.query" in str(exc.value) and "(inside bert.encoder.layer.N)" in str(exc.value)
    assert "other linear layers: bert.pooler.dense, classifier" in str(exc.value) and "\n" not in str(exc.value)
    with pytest.raises(ValueError, match="target_modules") as exc:
        apply_wsa(make_model("gpt2"), WSAConfig(target_modules=r".*\.q_proj"))
    assert "c_attn" in str(exc.value) and "(inside transformer.h.N)" in str(exc.value)


def test_non_linear_target_and_bad_config_errors():
    with pytest.raises(TypeError, match="BertAttention"):
        apply_wsa(make_model("bert"), WSAConfig(target_modules=["attention"]))
    with pytest.raises(ValueError, match="r_init"):
        WSAConfig(r_init=0)
    model = apply_wsa(make_model("bert"), WSAConfig(r_init=2, target_modules=["query"]))
    with pytest.raises(ValueError, match="already"):
        apply_wsa(model, WSAConfig(r_init=2, target_modules=["key"]))


def test_regex_targets():
    model = apply_wsa(make_model("gpt2"), WSAConfig(r_init=4, target_modules=r".*\.h\.1\.attn\.c_attn"))
    assert [n for n, _ in wsa_layers(model)] == ["transformer.h.1.attn.c_attn"]


# (8) short training run, then merge ---------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_training_reduces_loss_and_merge_matches(kind):
    cfg = wsa_config(kind, r=4)
    model = apply_wsa(make_model(kind), cfg).train()
    torch.manual_seed(0)
    inputs = make_inputs(seed=5)
    labels = torch.randint(0, NUM_LABELS, (BATCH,))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(20):
        task_loss = model(**inputs, labels=labels).loss
        loss = task_loss + cfg.gate_l1 * wsa_gate_l1(model)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(task_loss.item())
    assert losses[-1] < 0.5 * losses[0], losses
    assert any(layer.s.abs().sum() > 0 and layer.delta_U.abs().sum() > 0 for _, layer in wsa_layers(model))

    model.eval()
    adapted = logits(model, inputs)
    merged = merge_wsa(model)
    assert not wsa_layers(merged)
    torch.testing.assert_close(logits(merged, inputs), adapted, rtol=1e-5, atol=1e-5)


# (9) the method through build_adapter ---------------------------------------------------------------------------
def test_method_wraps_the_lora_targets_and_adds_the_gate_penalty(tmp_path):
    from tiny import tiny_base

    from iwtrainer import IWTrainingArguments
    from iwtrainer.methods import AdapterArguments, build_adapter
    from iwtrainer.methods.wsa import WSAArguments

    args = IWTrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", iw_alpha=0.0)
    options = WSAArguments(wsa_r_init=4, wsa_gate_l1=0.5, wsa_prune_threshold=0.1)
    setup = build_adapter(tiny_base("bert"), AdapterArguments(adapter="wsa"), args, options=options)
    assert [n for n, _ in wsa_layers(setup.model)] == setup.target_names and len(setup.target_names) == 12
    assert all(layer.r == 4 for _, layer in wsa_layers(setup.model))
    assert setup.head_names == ["classifier", "bert.pooler"] and setup.callbacks == []
    trainable = {n.split(".")[0] for n, p in setup.model.named_parameters() if p.requires_grad and "encoder" not in n}
    assert trainable == {"classifier", "bert"}  # the head and bert.pooler, trained in full
    config = setup.state
    assert (config.r_init, config.gate_l1, config.prune_threshold) == (4, 0.5, 0.1)
    assert config.modules_to_save == ["classifier", "bert.pooler"]
    randomize(setup.model)
    torch.testing.assert_close(setup.regularizers["wsa_gate_l1"](setup.model), 0.5 * wsa_gate_l1(setup.model))
    off = build_adapter(tiny_base("bert"), AdapterArguments(adapter="wsa"), args, options=WSAArguments(wsa_gate_l1=0))
    assert off.regularizers == {}  # λ = 0: no penalty term at all
    for kwargs, message in [
        (dict(wsa_r_init=0), "--wsa_r_init must be >= 1"),
        (dict(wsa_gate_l1=-1.0), "--wsa_gate_l1 must be >= 0"),
        (dict(wsa_prune_threshold=1.5), r"--wsa_prune_threshold must be in \[0, 1\]"),
    ]:
        with pytest.raises(ValueError, match=message):
            WSAArguments(**kwargs)
