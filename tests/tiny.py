"""Tiny models built from configs (no download) and random classification data, shared by the tests."""

from __future__ import annotations

import torch
from peft import LoraConfig, get_peft_model
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    DebertaV2Config,
    DebertaV2ForSequenceClassification,
    GPT2Config,
    GPT2ForSequenceClassification,
    TrainingArguments,
)

VOCAB = 97


def tiny_base(kind: str, seed: int = 0, num_labels: int = 2) -> torch.nn.Module:
    """Dropout-free (dropout masks depend on batch shapes, which would hide accumulation bugs)."""
    torch.manual_seed(seed)
    if kind == "bert":
        cfg = BertConfig(
            vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37,
            max_position_embeddings=64, num_labels=num_labels, hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
        )  # fmt: skip
        return BertForSequenceClassification(cfg)
    if kind == "deberta":
        # DeBERTa-v3-base's attention settings: share_att_key runs query_proj/key_proj a second time on the
        # relative position embeddings in every forward pass.
        cfg = DebertaV2Config(
            vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37,
            max_position_embeddings=64, relative_attention=True, position_buckets=16, max_relative_positions=-1,
            share_att_key=True, pos_att_type=["p2c", "c2p"], norm_rel_ebd="layer_norm", position_biased_input=False,
            num_labels=num_labels, pooler_hidden_size=32, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
            pooler_dropout=0.0,
        )  # fmt: skip
        return DebertaV2ForSequenceClassification(cfg)
    if kind == "gpt2":
        cfg = GPT2Config(
            vocab_size=VOCAB,
            n_embd=32,
            n_layer=2,
            n_head=2,
            n_positions=64,
            num_labels=num_labels,
            pad_token_id=0,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            summary_first_dropout=0.0,
        )
        return GPT2ForSequenceClassification(cfg)
    raise ValueError(kind)


TARGETS = {
    "bert": ["query", "key", "value", "dense"],
    "deberta": ["query_proj", "key_proj", "value_proj", "dense"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],
}
HEAD = {"bert": ["classifier"], "deberta": ["classifier", "pooler"], "gpt2": ["score"]}


def tiny_lora(kind: str, seed: int = 0, r: int = 4, init_lora_weights: bool = True, **lora_kwargs) -> torch.nn.Module:  # noqa: E501
    """A tiny peft LoRA classifier; ``init_lora_weights=False`` gives B ≠ 0 so the penalty is active at once."""
    base = tiny_base(kind, seed)
    torch.manual_seed(seed + 1)
    cfg = LoraConfig(
        r=r,
        lora_alpha=2 * r,
        target_modules=TARGETS[kind],
        modules_to_save=HEAD[kind],
        fan_in_fan_out=kind == "gpt2",
        init_lora_weights=init_lora_weights,
        **{"lora_dropout": 0.0, **lora_kwargs},
    )
    return get_peft_model(base, cfg)


class RandomClassification(torch.utils.data.Dataset):
    def __init__(self, n: int = 64, seq: int = 12, seed: int = 0, num_labels: int = 2):
        g = torch.Generator().manual_seed(seed)
        self.input_ids = torch.randint(1, VOCAB, (n, seq), generator=g)
        self.attention_mask = torch.ones(n, seq, dtype=torch.long)
        self.attention_mask[n // 2 :, seq - 3 :] = 0  # some padding
        self.labels = torch.randint(0, num_labels, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids[i], "attention_mask": self.attention_mask[i], "labels": self.labels[i]}


def batches(ds: RandomClassification, batch_size: int) -> list[dict[str, torch.Tensor]]:
    out = []
    for s in range(0, len(ds), batch_size):
        out.append(
            {
                "input_ids": ds.input_ids[s : s + batch_size],
                "attention_mask": ds.attention_mask[s : s + batch_size],
                "labels": ds.labels[s : s + batch_size],
            }
        )
    return out


def base_weight(target) -> torch.nn.Parameter:
    return target.module.get_base_layer().weight


def tiny_args(output_dir, cls: type = TrainingArguments, **kw) -> TrainingArguments:
    """Trainer arguments for a short, quiet, deterministic CPU run (constant lr, seed 0, nothing saved or reported);
    ``kw`` sets the run's own values and overrides these."""
    quiet = dict(
        output_dir=str(output_dir), lr_scheduler_type="constant", report_to="none", use_cpu=True,
        save_strategy="no", disable_tqdm=True, seed=0,
    )  # fmt: skip
    return cls(**{**quiet, **kw})
