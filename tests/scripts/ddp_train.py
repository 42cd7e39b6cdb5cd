"""Worker for tests/test_distributed.py: train a tiny IW-LoRA BERT and dump sensitivities + adapter weights.

Run as ``torchrun --nproc_per_node N ddp_train.py OUT GLOBAL_BATCH [CALIBRATION]`` (or plain python for one process);
CALIBRATION is ``separate`` (default) or ``online``.
"""

import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from tiny import RandomClassification, tiny_lora  # noqa: E402

from iwtrainer import IWTrainer, IWTrainingArguments  # noqa: E402


def main() -> None:
    out, global_batch = sys.argv[1], int(sys.argv[2])
    calibration = sys.argv[3] if len(sys.argv) > 3 else "separate"
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    args = IWTrainingArguments(
        output_dir=out, per_device_train_batch_size=global_batch // world, max_steps=3, learning_rate=0.05,
        optim="sgd", lr_scheduler_type="constant", iw_alpha=0.5, iw_calib_steps=2, iw_calibration=calibration,
        report_to="none", use_cpu=True,
        ddp_backend="gloo" if world > 1 else None, save_strategy="no", logging_steps=1, disable_tqdm=True,
        seed=0, data_seed=0,
    )  # fmt: skip
    model = tiny_lora("bert", init_lora_weights=False)
    trainer = IWTrainer(model=model, args=args, train_dataset=RandomClassification(n=96))
    trainer.train()
    sens = {k: v["sensitivity"] for k, v in trainer.iw_callback.record["modules"].items()}
    state = {k: v.detach().cpu() for k, v in model.named_parameters() if v.requires_grad}
    torch.save({"sensitivities": sens, "state": state, "log": trainer.state.log_history}, f"{out}/rank{rank}.pt")


if __name__ == "__main__":
    main()
