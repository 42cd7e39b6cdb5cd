"""The GLUE program's trainer: ``IWTrainer`` with evaluation and prediction that score every row."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from ..trainer import IWTrainer
from ..training_args import IWTrainingArguments


@contextlib.contextmanager
def _keep_last_batch(args: IWTrainingArguments) -> Iterator[None]:
    drop, args.dataloader_drop_last = args.dataloader_drop_last, False
    try:
        yield
    finally:
        args.dataloader_drop_last = drop


class GlueTrainer(IWTrainer):
    """``IWTrainer`` whose evaluation and prediction score every row: ``--dataloader_drop_last`` (the compiled
    recipe's way to keep one training batch shape) drops the last short *training* batch only. The Trainer applies
    it to every dataloader, which would score SST-2's 872 dev rows as 768 at eval batch 128 and still report 872."""

    def get_eval_dataloader(self, eval_dataset: Any = None) -> Any:
        with _keep_last_batch(self.args):
            return super().get_eval_dataloader(eval_dataset)

    def get_test_dataloader(self, test_dataset: Any) -> Any:
        with _keep_last_batch(self.args):
            return super().get_test_dataloader(test_dataset)
