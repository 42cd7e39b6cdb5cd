"""Target matrices (iwtrainer.targets): default discovery, the head, user names matched like peft, the regex handed
to peft, and finding the LoRA layers of a wrapped model."""

from __future__ import annotations

import re

import pytest
import torch
from tiny import tiny_base, tiny_lora

from iwtrainer.targets import (
    candidates_message,
    discover_target_modules,
    find_head_modules,
    find_lora_targets,
    is_under,
    linear_module_names,
    linear_types,
    match_target_modules,
    module_matches,
    split_names,
    targets_regex,
    unwrap_model,
)


# ---- target and head discovery ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kind", "heads", "per_layer"),
    [
        ("bert", ["classifier", "bert.pooler"], ["attention.self.query", "attention.self.key", "attention.self.value",
                                                 "attention.output.dense", "intermediate.dense", "output.dense"]),
        ("deberta", ["pooler", "classifier"], ["attention.self.query_proj", "attention.self.key_proj",
                                               "attention.self.value_proj", "attention.output.dense",
                                               "intermediate.dense", "output.dense"]),
        ("gpt2", ["score"], ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]),
    ],
)  # fmt: skip
def test_default_targets_are_the_block_linears(kind, heads, per_layer):
    model = tiny_base(kind)
    assert find_head_modules(model) == heads
    targets = discover_target_modules(model, exclude=heads)
    prefix = {"bert": "bert.encoder.layer", "deberta": "deberta.encoder.layer", "gpt2": "transformer.h"}[kind]
    assert targets == [f"{prefix}.{i}.{rel}" for i in range(2) for rel in per_layer]
    spec = targets_regex(model, targets)
    assert {n for n, _ in model.named_modules() if n and re.fullmatch(spec, n)} == set(targets)


def test_head_includes_modules_missing_from_the_checkpoint():
    model = tiny_base("bert")
    missing = ["classifier.weight", "bert.encoder.layer.1.output.dense.weight", "bert.embeddings.position_ids"]
    heads = find_head_modules(model, missing)
    assert heads == ["classifier", "bert.pooler", "bert.encoder.layer.1.output.dense"]
    assert "bert.encoder.layer.1.output.dense" not in discover_target_modules(model, exclude=heads)


def test_user_targets_match_like_peft_and_list_candidates_otherwise():
    model = tiny_base("bert")
    assert len(match_target_modules(model, ["query", "value"])) == 4
    assert match_target_modules(model, [r".*\.0\.attention\.self\.query"]) == [
        "bert.encoder.layer.0.attention.self.query"
    ]
    with pytest.raises(ValueError) as info:
        match_target_modules(model, ["q_proj"], exclude=["classifier", "bert.pooler"])
    message = str(info.value)
    assert "\n" not in message and "--lora_target_modules ['q_proj'] matched no" in message
    assert "attention.self.query" in message and "inside bert.encoder.layer.N" in message


# ---- the matching rules -------------------------------------------------------------------------------------------
QUERY = "bert.encoder.layer.0.attention.self.query"


def test_module_matches_names_and_suffixes_like_peft():
    assert module_matches(QUERY, ["query"]) and module_matches(QUERY, ["self.query"])
    assert module_matches(QUERY, [QUERY])
    assert module_matches(QUERY, ["key", "query"])  # any item
    assert not module_matches(QUERY, ["uery"])  # a suffix is whole dotted parts, not characters
    assert not module_matches(QUERY + "_proj", ["query"]) and not module_matches("query.dense", ["query"])
    assert not module_matches(QUERY, []) and not module_matches(QUERY, ["attention.self"])  # a parent is no match
    assert module_matches("query", ["query"])  # a top-level module


def test_module_matches_a_string_as_a_full_regex():
    assert module_matches(QUERY, r".*\.0\.attention\.self\.query")
    assert module_matches(QUERY, r"bert\.encoder\.layer\.\d+\.attention\.self\.(query|key)")
    assert not module_matches(QUERY, "query")  # a string is a regex over the full name: fullmatch, not search
    assert not module_matches(QUERY, r".*\.1\.attention\.self\.query")
    assert module_matches(QUERY, QUERY)  # a plain full name is a regex matching itself


def test_is_under():
    assert is_under("bert.pooler", ["bert.pooler"]) and is_under("bert.pooler.dense", ["classifier", "bert.pooler"])
    assert not is_under("bert.pooler_x.dense", ["bert.pooler"]) and not is_under("bert", ["bert.pooler"])
    assert not is_under("classifier", [])


def test_split_names():
    assert split_names(["query,value", " key "], "--x") == ["query", "value", "key"]
    assert split_names("query, value,", "--x") == ["query", "value"]
    assert split_names([r"(query|key)\.{1,2}"], "--x") == [r"(query|key)\.{1,2}"]  # a lone regex is kept whole
    with pytest.raises(ValueError, match="--lora_target_modules is empty; expected module names such as query,value"):
        split_names([" , "], "--lora_target_modules")


def test_linear_modules_and_candidates():
    model = tiny_base("gpt2")
    names = linear_module_names(model)
    assert names == [f"transformer.h.{i}.{rel}" for i in range(2)
                     for rel in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")] + ["score"]  # fmt: skip
    assert all(isinstance(model.get_submodule(n), linear_types()) for n in names)
    assert linear_module_names(model, exclude=["score", "transformer.h.1"]) == names[:4]
    message = candidates_message(model)
    inside = "attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj (inside transformer.h.N)"
    assert message == f"{inside}; other linear layers: score"
    assert candidates_message(model, exclude=["score"]) == message.split("; ")[0]
    assert candidates_message(torch.nn.Sequential(torch.nn.ReLU())) == "none (the model has no nn.Linear/Conv1D layer)"


def test_targets_regex_falls_back_to_the_full_names():
    model = tiny_base("bert")
    some = ["bert.encoder.layer.0.attention.self.query", "bert.encoder.layer.1.attention.self.value"]
    spec = targets_regex(model, some)  # no compact form matches exactly these two
    assert {n for n, _ in model.named_modules() if n and re.fullmatch(spec, n)} == set(some)
    with_pooler = [*some, "bert.pooler.dense"]  # outside the block list
    spec = targets_regex(model, with_pooler)
    assert {n for n, _ in model.named_modules() if n and re.fullmatch(spec, n)} == set(with_pooler)


def test_find_lora_targets_through_a_parallel_wrapper():
    model = tiny_lora("bert")
    wrapped = torch.nn.DataParallel(model)  # on CPU a plain wrapper: what DDP/DataParallel look like to callbacks
    assert unwrap_model(wrapped) is model and unwrap_model(model) is model  # never peft's own wrapper
    names = [t.name for t in find_lora_targets(wrapped)]
    assert names == [t.name for t in find_lora_targets(model)] and len(names) == 13
    assert all(not n.startswith("base_model.model.") for n in names)  # names in the user's base model
    with pytest.raises(ValueError, match="no LoRA layers for adapter 'other'"):
        find_lora_targets(model, adapter_name="other")
