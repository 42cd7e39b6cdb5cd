"""Resuming the final checkpoint of a ``max_steps`` run: IWTrainer ends at ``max_steps`` (plain transformers trains
one step past it, which is what made a re-run into the same ``--output_dir`` end at max_steps + 1)."""

from __future__ import annotations

from tiny import RandomClassification, tiny_args, tiny_lora

from iwtrainer import IWTrainer, IWTrainingArguments


def test_resuming_a_finished_run_trains_no_further(tmp_path):
    args = tiny_args(tmp_path, IWTrainingArguments, max_steps=4, save_strategy="steps", save_steps=2,
                     per_device_train_batch_size=8, iw_alpha=1e-3, iw_calib_steps=2)  # fmt: skip
    first = IWTrainer(model=tiny_lora("bert"), args=args, train_dataset=RandomClassification(n=64))
    first.train()
    assert first.state.global_step == 4
    again = IWTrainer(model=tiny_lora("bert"), args=args, train_dataset=RandomClassification(n=64))
    again.train(resume_from_checkpoint=str(tmp_path / "checkpoint-4"))
    assert again.state.global_step == 4
    final = {n: p for n, p in first.model.named_parameters() if p.requires_grad}
    for name, param in again.model.named_parameters():
        if param.requires_grad:  # the checkpoint's weights, untouched by an extra step
            assert (param == final[name]).all(), name
