"""The methods registry (iwtrainer.methods): every ``--adapter`` builds through ``build_adapter`` behind one
``Method`` interface, the IW penalty applies exactly to the methods with plain LoRA factors, and the modules import
in any order."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from helpers import ROOT
from tiny import RandomClassification, batches, tiny_base

from iwtrainer import IWPenalty, IWTrainingArguments, find_lora_targets
from iwtrainer.methods import METHODS, AdapterArguments, Method, MethodSetup, build_adapter, get_method
from iwtrainer.methods.gradnorm import GradNormArguments
from iwtrainer.targets import discover_target_modules, find_head_modules

HEADS = ["classifier", "bert.pooler"]  # tiny BERT's head, trained in full by every method


def training_args(tmp_path, **kw) -> IWTrainingArguments:
    return IWTrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", iw_alpha=0.0, **kw)


def build(tmp_path, name: str, **adapter) -> MethodSetup:
    adapter_args = AdapterArguments(adapter=name, lora_r=2, **adapter)
    return build_adapter(tiny_base("bert"), adapter_args, training_args(tmp_path))


def test_registry_names_and_lookup():
    assert list(METHODS)[:5] == ["lora", "gradnorm", "adalora", "wsa", "full"]  # --help's order; new methods follow
    for name, method in METHODS.items():
        assert isinstance(method, Method) and method.name == name and get_method(name) is method
        assert method.arguments is None or callable(method.arguments)
    with pytest.raises(ValueError, match=r"--adapter must be one of \['lora', 'gradnorm', 'adalora', 'wsa', 'full'"):
        get_method("lorax")
    with pytest.raises(ValueError, match=r"--adapter must be one of \['lora', 'gradnorm'"):
        AdapterArguments(adapter="lorax")  # a config file's value bypasses argparse's choices


@pytest.mark.parametrize("name", list(METHODS))
def test_every_method_builds_on_a_tiny_bert(tmp_path, name):
    method = METHODS[name]
    plain = tiny_base("bert")
    total = plain.num_parameters()
    heads = find_head_modules(plain)
    expected_targets = discover_target_modules(plain, exclude=heads) if method.adapts_targets else []
    setup = build(tmp_path, name)
    assert isinstance(setup, MethodSetup) and setup.method == setup.adapter == name
    assert setup.head_names == HEADS and setup.target_names == expected_targets
    assert len(setup.target_names) == (12 if method.adapts_targets else 0)  # 2 layers × 6 linear layers
    if method.arguments is None:
        assert setup.options is None
    else:
        assert setup.options == method.arguments()  # the defaults when no options are given
    trainable = setup.model.num_parameters(only_trainable=True)
    if name == "full":
        assert trainable == total
    else:
        assert 0 < trainable < total
    params = dict(setup.model.named_parameters())
    for head in HEADS:  # the head trains in full with every method (peft keeps a trainable copy)
        assert any(p.requires_grad and f"{head}." in n for n, p in params.items()), head
    out = setup.model(**batches(RandomClassification(n=4), 4)[0])
    assert out.logits.shape == (4, 2) and torch.isfinite(out.loss)
    assert (method.search_problem(setup) is None) == (setup.callbacks == [])


@pytest.mark.parametrize("name", list(METHODS))
def test_uses_iw_exactly_where_the_lora_factors_are_plain_and_start_at_zero(tmp_path, name):
    """The IW penalty weights ``Δ_k = s·B_k A_k``: a method may use it iff ``find_lora_targets`` finds its chosen
    matrices as plain LoRA layers (``A``: r×d_in, ``B``: d_out×r) and ``Δ_k = 0`` before training."""
    setup = build(tmp_path, name)
    try:
        targets = find_lora_targets(setup.model)
    except ValueError:
        targets = None
    plain_at_zero = False
    if targets is not None:
        try:
            [(t.lora_A, t.lora_B) for t in targets]
        except AttributeError as exc:  # an SVD-form or other non-plain layer taken for a LoRA layer
            t = targets[0]
            pytest.fail(
                f"find_lora_targets accepted {type(t.module).__name__} '{t.name}' of --adapter {name} as a plain LoRA "
                f"layer, but its factors are no nn.Linear ({exc}); IWTrainer with iw_alpha > 0 then fails the same way"
            )
        names = [t.name for t in targets]
        shapes = all(t.lora_A.dim() == 2 and t.lora_A.shape[0] == t.lora_B.shape[1] for t in targets)
        zero = all(not (t.lora_B @ t.lora_A).any() for t in targets)
        plain_at_zero = names == setup.target_names and shapes and zero
    assert METHODS[name].uses_iw == plain_at_zero
    if METHODS[name].uses_iw:  # and the penalty is defined on them: 0 at the start
        penalty = IWPenalty(targets, dict.fromkeys((t.name for t in targets), 1.0))
        assert penalty().item() == 0.0


def test_options_are_an_instance_a_mapping_or_the_defaults(tmp_path):
    args, adapter = training_args(tmp_path), AdapterArguments(adapter="gradnorm", lora_r=2)
    given = GradNormArguments(rank_budget=20, rank_min=1)
    by_instance = build_adapter(tiny_base("bert"), adapter, args, options=given)
    by_mapping = build_adapter(tiny_base("bert"), adapter, args, options={GradNormArguments: given, int: 3})
    default = build_adapter(tiny_base("bert"), adapter, args, options={})
    assert by_instance.options is given and by_mapping.options is given
    assert by_instance.callbacks[0].total_rank == by_mapping.callbacks[0].total_rank == 20
    assert default.options == GradNormArguments() and default.callbacks[0].total_rank == 12 * 2  # K × r
    lora = build_adapter(tiny_base("bert"), AdapterArguments(lora_r=2), args, options={GradNormArguments: given})
    assert lora.options is None  # only the chosen method's arguments are picked


def test_targets_and_errors_are_shared_by_the_methods(tmp_path):
    for name in ("lora", "wsa", "adalora"):
        setup = build(tmp_path, name, lora_target_modules=["query", "value"])
        assert [n.rsplit(".", 1)[1] for n in setup.target_names] == ["query", "value"] * 2, name
        with pytest.raises(ValueError, match=r"--lora_target_modules \['q_proj'\] matched no .*candidates:"):
            build(tmp_path, name, lora_target_modules=["q_proj"])
    assert build(tmp_path, "full", lora_target_modules=["q_proj"]).target_names == []  # full adapts no targets


def test_prepare_training_runs_the_method_step_once(tmp_path, monkeypatch):
    setup = build(tmp_path, "lora")
    calls = []
    monkeypatch.setattr(type(METHODS["lora"]), "prepare", lambda self, *a: calls.append(a))
    setup.prepare_training(None, None, training_args(tmp_path))  # no training split: nothing to prepare
    assert calls == []
    data = RandomClassification(n=8)
    setup.prepare_training(data, None, training_args(tmp_path))
    setup.prepare_training(data, None, training_args(tmp_path))
    assert len(calls) == 1 and calls[0][0] is setup and calls[0][1] is data


@pytest.mark.parametrize(
    "module",
    ["iwtrainer.methods", "iwtrainer.methods.base", "iwtrainer.methods.lora", "iwtrainer.methods.gradnorm",
     "iwtrainer.methods.adalora", "iwtrainer.methods.wsa", "iwtrainer.targets", "iwtrainer.settings"],
)  # fmt: skip
def test_each_module_imports_first(module):
    """No import cycle: every module can be the first one imported."""
    subprocess.run([sys.executable, "-c", f"import {module}"], cwd=ROOT, check=True)
