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


def lora_state(model) -> dict[str, torch.Tensor]:
    """A copy of the trainable parameters (the LoRA factors and the trained head)."""
    return {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}


def assert_states_close(a, b, rtol=1e-5, atol=1e-6):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=rtol, atol=atol, msg=k)


def max_gap(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """The largest absolute difference between two parameter states."""
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def tiny_args(output_dir, cls: type = TrainingArguments, **kw) -> TrainingArguments:
    """Trainer arguments for a short, quiet, deterministic CPU run (constant lr, seed 0, nothing saved or reported);
    ``kw`` sets the run's own values and overrides these."""
    quiet = dict(
        output_dir=str(output_dir), lr_scheduler_type="constant", report_to="none", use_cpu=True,
        save_strategy="no", disable_tqdm=True, seed=0,
    )  # fmt: skip
    return cls(**{**quiet, **kw})


# -- causal LMs -------------------------------------------------------------------------------------------------------
CAUSAL_TARGETS = {
    "gpt2": ["c_attn", "c_proj", "c_fc"],  # fused q/k/v in one Conv1D (weight stored transposed)
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],  # unfused nn.Linear
}


def tiny_causal(kind: str, seed: int = 0) -> torch.nn.Module:
    """A dropout-free tiny decoder: GPT-2 (fused Conv1D projections) or Llama (unfused Linear, also Qwen/Mistral's)."""
    from transformers import GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    if kind == "gpt2":
        cfg = GPT2Config(
            vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2, n_positions=64, resid_pdrop=0.0, embd_pdrop=0.0,
            attn_pdrop=0.0, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        )  # fmt: skip
        return GPT2LMHeadModel(cfg)
    if kind == "llama":
        cfg = LlamaConfig(
            vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=40, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        )  # fmt: skip
        return LlamaForCausalLM(cfg)
    raise ValueError(kind)


def tiny_causal_lora(kind: str, seed: int = 0, r: int = 4, init_lora_weights: bool = True) -> torch.nn.Module:
    base = tiny_causal(kind, seed)
    torch.manual_seed(seed + 1)
    cfg = LoraConfig(
        r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=CAUSAL_TARGETS[kind], task_type="CAUSAL_LM",
        fan_in_fan_out=kind == "gpt2", init_lora_weights=init_lora_weights,
    )  # fmt: skip
    return get_peft_model(base, cfg)


def tiny_tokenizer():
    """A word-level tokenizer over ``VOCAB`` ids (pad 0, bos 1, eos 2, "t4" …), built offline, with a chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, **{f"t{i}": i for i in range(4, VOCAB)}}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    tok.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }} </s>"
        "{% endgeneration %}{% else %}{{ m['content'] }} {% endif %}{% endfor %}"
    )
    return tok


def causal_rows(n: int, seed: int = 0, min_len: int = 6, max_len: int = 14) -> dict[str, list]:
    """``n`` pre-tokenized prompt/completion rows of varied length: ``input_ids`` and ``completion_mask`` (1 on the
    completion), what trl's SFTTrainer takes as a processed dataset."""
    g = torch.Generator().manual_seed(seed)
    ids, masks = [], []
    for _ in range(n):
        length = int(torch.randint(min_len, max_len + 1, (1,), generator=g))
        prompt = int(torch.randint(2, length - 2, (1,), generator=g))
        ids.append(torch.randint(4, VOCAB, (length,), generator=g).tolist())
        masks.append([0] * prompt + [1] * (length - prompt))
    return {"input_ids": ids, "completion_mask": masks}


def causal_batch(rows: dict[str, list], idx: list[int]) -> dict[str, torch.Tensor]:
    """Right-padded micro-batch of ``rows[idx]``: labels −100 on the prompt and the padding."""
    seqs = [rows["input_ids"][i] for i in idx]
    width = max(map(len, seqs))
    input_ids = torch.zeros(len(idx), width, dtype=torch.long)
    attention = torch.zeros(len(idx), width, dtype=torch.long)
    labels = torch.full((len(idx), width), -100, dtype=torch.long)
    for row, i in enumerate(idx):
        seq, mask = torch.tensor(rows["input_ids"][i]), torch.tensor(rows["completion_mask"][i])
        input_ids[row, : len(seq)] = seq
        attention[row, : len(seq)] = 1
        labels[row, : len(seq)] = torch.where(mask.bool(), seq, torch.tensor(-100))
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}


def causal_autograd_sensitivities(model, steps: list[list[dict]]) -> dict[str, float]:
    """mean over steps of ‖∂L/∂W_k‖_F, L = Σ_tokens NLL / (label tokens of the step): hand-rolled shift and mask."""
    from iwtrainer import find_lora_targets

    targets = find_lora_targets(model)
    weights = [base_weight(t) for t in targets]
    for w in weights:
        w.requires_grad_(True)
    model.eval()
    totals = torch.zeros(len(targets), dtype=torch.float64)
    for micro_batches in steps:
        count = sum(int((mb["labels"][:, 1:] != -100).sum()) for mb in micro_batches)
        loss = 0.0
        for mb in micro_batches:
            logits = model(input_ids=mb["input_ids"], attention_mask=mb["attention_mask"]).logits
            logp = logits[:, :-1].double().log_softmax(-1)
            target = mb["labels"][:, 1:]
            nll = -logp.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
            loss = loss + (nll * (target != -100)).sum()
        grads = torch.autograd.grad(loss / count, weights)
        totals += torch.stack([g.double().norm() for g in grads])
    for w in weights:
        w.requires_grad_(False)
    return {t.name: float(v) for t, v in zip(targets, totals / len(steps))}
